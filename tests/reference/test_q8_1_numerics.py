"""The reference's GPU-int8 numerics mode (``load_reference(..., act_q8_1=names)``): the matmuls named see their
activations rounded as the GPU's q8_1 kernels round them, everything else stays as in the default (exact) mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.gguf.synth import write_synthetic
from sparkinfer_cute.reference import load_reference, ops
from sparkinfer_cute.reference.kernel_refs import dequantize_q8_1, quantize_q8_1_ref
from sparkinfer_cute.reference.metrics import teacher_forced_compare


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), blocks=st.integers(1, 12), zero=st.booleans())
def test_q8_1_rounding_is_the_kernels(seed, rows, blocks, zero):
    """ops.quantize_activation_q8_1 is d*q of the kernel spec's quantizer (kernel_refs.quantize_q8_1_ref, which
    tests/kernels/test_gemv.py asserts bit-equal to the GPU's), within |x - d q| <= d/2 (+ f32 rounding)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 32 * blocks)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    if zero:
        x[0, :32] = 0
    q, d, _ = quantize_q8_1_ref(x)
    y = ops.quantize_activation_q8_1(x.astype(np.float64))
    np.testing.assert_array_equal(y, dequantize_q8_1(q, d))
    half = np.repeat(d.astype(np.float64), 32, axis=-1) * (0.5 + 128 * 2.0**-24)
    assert (np.abs(y - x) <= half).all()
    assert ops.quantize_activation_q8_1(x).dtype == np.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, module_rng):
    p = str(tmp_path_factory.mktemp("q8") / "qwen_tiny.gguf")
    write_synthetic(p, arch="qwen3moe", preset="tiny", seed=int(module_rng.integers(1 << 16)))
    return p


def test_act_for_rounds_only_the_named_tensors(tiny, rng):
    r = load_reference(tiny, max_context=16, act_q8_1={"blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight"})
    x = rng.standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(r.act_for(x, "blk.0.attn_q.weight"), ops.quantize_activation_q8_1(x))
    assert not np.array_equal(r.act_for(x, "blk.0.attn_q.weight"), x)
    assert r.act_for(x, "blk.0.attn_k.weight") is x  # not named: unchanged, as in the default mode
    assert load_reference(tiny, max_context=16).act_q8_1 == frozenset()


def test_default_mode_unchanged_and_int8_mode_close(tiny, rng):
    """Without names the forward is the default one, bit for bit; with every q/k/v/o and expert matmul rounded the
    logits move by the activation quantization only (mean KL well under the old int8 gate's 0.01)."""
    from sparkinfer_cute.models.int8_plan import int8_activation_tensors

    names = int8_activation_tensors(tiny, path="decode")
    toks = [2] + rng.integers(4, 1536, 24).tolist()
    a = load_reference(tiny, max_context=32).forward(toks)
    b = load_reference(tiny, max_context=32, act_q8_1=()).forward(toks)
    np.testing.assert_array_equal(a, b)
    c = load_reference(tiny, max_context=32, act_q8_1=names).forward(toks)
    m = teacher_forced_compare(c, a, np.asarray(toks[1:] + [0]))
    assert 0 < m["mean_kl"] < 0.01, m


def test_bad_names_and_emulate_cpu_refused(tiny):
    with pytest.raises(ValueError, match="does not have"):
        load_reference(tiny, act_q8_1={"blk.0.nope.weight"})
    with pytest.raises(ValueError, match="exclude each other"):
        load_reference(tiny, act_q8_1={"blk.0.attn_q.weight"}, emulate_cpu=True)
    with pytest.raises(ValueError, match="exclude each other"):
        load_reference(tiny, attn_f16_tiles={64: 64}, emulate_cpu=True)


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_every_planned_int8_tensor_moves_the_reference(tmp_path, arch, rng):
    """Each kind of tensor the GPU build runs on int8 activations (models/int8_plan.py, decode and prefill) must
    change the reference's logits when named alone in ``act_q8_1``: a reference that ignores a name is not the
    same-rounding reference the int8 gates compare with. (Gemma 4's experts ignored it until 2026-12-07: the GPU
    prefill's all-position int8 gate then failed on rounding the reference never did.)"""
    from sparkinfer_cute.models.int8_plan import flash_attention_tiles, int8_activation_tensors, rounding_plan

    p = str(tmp_path / f"{arch}.gguf")
    write_synthetic(p, arch=arch, preset="tiny", seed=int(rng.integers(1 << 16)))
    names = int8_activation_tensors(p, path="decode") | int8_activation_tensors(p, path="prefill_all_logits")
    kinds: dict[str, set] = {}
    for n in names:
        kind = n.split(".", 2)[-1] if n.startswith("blk.") else n
        # a MoE layer's gate and up share one quantized input (int8_activation_tensors lists both): one kind
        kinds.setdefault(kind.replace("ffn_up_exps", "ffn_gate_exps"), set()).add(n)
    toks = [2] + rng.integers(4, 200, 12).tolist()
    exact = load_reference(p, max_context=16).forward(toks)
    ignored = [kind for kind, group in sorted(kinds.items())
               if np.array_equal(load_reference(p, max_context=16, act_q8_1=group).forward(toks), exact)]
    assert len(kinds) >= 4 and not ignored, f"the reference ignores act_q8_1 for {ignored}"
    # the flash prefill attention's f16 q and P (rounding_plan's other half): planned for every layer type of the
    # batched prefill, never for decode, and each head size's tile moves the logits
    tiles = flash_attention_tiles(p, path="prefill_all_logits")
    assert tiles and not flash_attention_tiles(p, path="decode")
    for d, block_n in tiles.items():
        got = load_reference(p, max_context=16, attn_f16_tiles={d: block_n}).forward(toks)
        assert not np.array_equal(got, exact), f"attn_f16_tiles {{{d}: {block_n}}} changes nothing"
    plan = rounding_plan(p, path="prefill_all_logits")
    assert plan["act_q8_1"] == int8_activation_tensors(p, path="prefill_all_logits") and plan["attn_f16_tiles"] == tiles
