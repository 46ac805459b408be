"""Fused selected-expert MoE FFN (gate/up + SwiGLU kernel, down + weighted-sum kernel) vs float64 numpy.

Every check is a function of ``sparkinfer_cute/reference/kernel_refs.py`` (derivations there), so the same check
also judges the broken-kernel emulations of tests/mutation/:

* f32 path: ``check_moe_gate_up`` (g and u are GEMV rows within the GEMV bound; silu' <= 1.1) and
  ``check_moe_down`` (a weighted sum of k GEMV rows).
* int8 (dp4a) path, two checks each: **tight**, the same f32-level bounds around the float64 reference computed on
  the *same* q8_1-quantized activations (the integer dots are exact); **loose**, around the reference on the f32
  activations within the q8_1 quantization bound. Only the tight one catches a zeroed 32-element activation block
  or a dropped input (the mutation table of tests/mutation/ shows both on an emulation of the kernel's arithmetic).

Outputs are poisoned (0xFF = NaN) before every launch, the numpy-path calls included; the checks reject a NaN.
The kernels are fuzzed with hypothesis over quant types, shapes, expert counts, routed slots (tokens' expert
choices, repeats included), mappings and the residual; all randomness comes from hypothesis-drawn seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.moe_ffn import moe_down, moe_down_q8, moe_ffn, moe_gate_up, moe_gate_up_q8
from sparkinfer_cute.kernels.quant_decode import spec
from sparkinfer_cute.reference.kernel_refs import (
    check_moe_down,
    check_moe_gate_up,
    moe_ffn_ref,
    moe_gate_up_ref,
    random_quant_bytes,
)

SEEDS = st.integers(0, 2**32 - 1)


def experts(q, n_expert, n_rows, n_in, rng):
    sp = spec(q)
    raw = random_quant_bytes(q, n_expert * n_rows * n_in // sp.block_elems, rng)
    return raw.reshape(n_expert, n_rows, sp.row_bytes(n_in))


def route(n_expert, k, rng, repeats=False):
    ids = (rng.integers(0, n_expert, size=k) if repeats else rng.choice(n_expert, size=k, replace=False))
    w = rng.random(k).astype(np.float32)
    return ids.astype(np.int32), (w / w.sum()).astype(np.float32)


def _poisoned(shape):
    from sparkinfer_cute.runtime.testing import poisoned

    return poisoned(shape, np.float32)


@settings(max_examples=5, deadline=None)
@given(seed=SEEDS)
def test_reference_fused_equals_separate(seed):
    """The fused gate_up layout reference (gate rows then up rows per expert) equals the separate-tensor one."""
    rng = np.random.default_rng(seed)
    E, n_ff, n_in = 4, 32, 256
    g, u = experts("Q4_K", E, n_ff, n_in, rng), experts("Q4_K", E, n_ff, n_in, rng)
    fused = np.concatenate([g, u], axis=1)
    h = rng.standard_normal(n_in)
    ids = np.array([3, 1], np.int32)
    np.testing.assert_array_equal(moe_gate_up_ref(fused, None, "Q4_K", h, ids, n_ff),
                                  moe_gate_up_ref(g, u, "Q4_K", h, ids, n_ff))


@settings(max_examples=3, deadline=None)
@given(seed=SEEDS)
def test_reference_gelu_gate(seed):
    """The GeGLU reference is the tanh GELU of the gate row times the up row, each dequantized by gguf.quants
    (independent of the kernel references' dequantizer)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(seed)
    q, n_ff, n_in = "Q8_0", 8, 64
    g, u = experts(q, 2, n_ff, n_in, rng), experts(q, 2, n_ff, n_in, rng)
    h = rng.standard_normal(n_in)
    G = dequantize(g[1], GGMLQuantizationType[q]).astype(np.float64)
    U = dequantize(u[1], GGMLQuantizationType[q]).astype(np.float64)
    x = G @ h
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))) * (U @ h)
    np.testing.assert_allclose(moe_gate_up_ref(g, u, q, h, np.array([1]), n_ff, act="gelu_tanh")[0], want,
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- model shapes, both paths
@pytest.mark.gpu
@settings(max_examples=2, deadline=None)
@given(seed=SEEDS)
@pytest.mark.parametrize("q,n_in,n_ff,fused,glu,rows_per_warp", [
    ("Q4_K", 2048, 768, False, "silu", 1), ("Q4_K", 2048, 768, True, "silu", 2),  # chunk kernel (Qwen3 30B)
    ("Q4_K", 2816, 704, True, "gelu_tanh", None),  # slice kernel (Gemma 4 26B-A4B experts)
    ("Q5_0", 384, 384, False, "silu", None)])
def test_gate_up_writes_q8_1_copy(q, n_in, n_ff, fused, glu, rows_per_warp, seed):
    """``out_q8``: the gate/up kernel's own q8_1 copy of its output (each 32-row block quantized by the last CTA
    that wrote into it) holds exactly the bits of the standalone quantize kernel on the same ``act``, the f32
    ``act`` is unchanged by the option, and the arrival counters are back at zero: launched twice on one counter
    buffer (the second launch with other experts), both must hold. q8_1 buffers poisoned (qs 0x7F, d/sum NaN)."""
    from sparkinfer_cute.kernels.q8_1 import Q8Act, quantize_q8_1
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    E, k = 16, 8
    g, u = experts(q, E, n_ff, n_in, rng), experts(q, E, n_ff, n_in, rng)
    wg, wu = (np.concatenate([g, u], axis=1), None) if fused else (g, u)
    h = DeviceArray.from_numpy(rng.standard_normal(n_in).astype(np.float32))
    hq = quantize_q8_1(h)
    counters = DeviceArray.zeros((k * n_ff // 32,), np.int32)
    for _ in range(2):
        ids, _ = route(E, k, rng)
        plain = _poisoned((k, n_ff))
        moe_gate_up(wg, wu, q, hq, ids, n_ff, out=plain, act=glu, rows_per_warp=rows_per_warp)
        act = _poisoned((k, n_ff))
        xq = Q8Act(k, n_ff)
        xq.qs.fill_bytes(0x7F)
        xq.d.fill_bytes(0xFF)
        xq.s.fill_bytes(0xFF)
        moe_gate_up(wg, wu, q, hq, ids, n_ff, out=act, act=glu, rows_per_warp=rows_per_warp, out_q8=xq,
                    counters=counters)
        a = act.to_numpy()
        np.testing.assert_array_equal(a.view(np.uint32), plain.to_numpy().view(np.uint32))
        ref_qs, ref_d, ref_s = quantize_q8_1(a)
        qs, d, sm = xq.to_numpy()
        np.testing.assert_array_equal(qs, ref_qs.reshape(qs.shape))
        np.testing.assert_array_equal(d.view(np.uint32), ref_d.reshape(d.shape).view(np.uint32))
        np.testing.assert_array_equal(sm.view(np.uint32), ref_s.reshape(sm.shape).view(np.uint32))
        assert (counters.to_numpy() == 0).all(), "arrival counters not reset"


@pytest.mark.gpu
@settings(max_examples=2, deadline=None)
@given(seed=SEEDS)
@pytest.mark.parametrize("glu", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("q,n_in,n_ff", [("Q8_0", 640, 2048), ("Q4_K", 2816, 2112), ("Q4_K", 2048, 768),
                                         ("Q5_0", 384, 384)])
def test_dense_glu_as_one_expert(q, n_in, n_ff, glu, seed):
    """A dense GLU MLP's gate+up run as expert 0 of the gate/up kernel (models/ops.py ``dense_glu``: Gemma 3 270M
    Q8_0 640 -> 2048, Gemma 4 26B-A4B Q4_K 2816 -> 2112), both gate activations, f32 activations: the float64
    reference within the GEMV-derived bound, output poisoned first."""
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    g, u = experts(q, 1, n_ff, n_in, rng), experts(q, 1, n_ff, n_in, rng)
    h = rng.standard_normal(n_in).astype(np.float32)
    ids = np.zeros(1, np.int32)
    act = _poisoned((1, n_ff))
    moe_gate_up(g, u, q, DeviceArray.from_numpy(h), ids, n_ff, out=act, act=glu)
    check_moe_gate_up(act.to_numpy(), g, u, q, h, ids, n_ff, glu=glu)


@pytest.mark.gpu
@settings(max_examples=1, deadline=None)
@given(seed=SEEDS)
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q,n_in,n_ff,E,k,fused", [("Q4_K", 2048, 768, 128, 8, False),
                                                   ("Q4_K", 2048, 768, 128, 8, True),
                                                   ("Q4_K", 256, 256, 16, 4, False), ("Q5_0", 384, 384, 16, 4, False)])
def test_gate_up(path, q, n_in, n_ff, E, k, fused, seed):
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    g, u = experts(q, E, n_ff, n_in, rng), experts(q, E, n_ff, n_in, rng)
    h = rng.standard_normal(n_in).astype(np.float32)
    ids, _ = route(E, k, rng)
    act = _poisoned((k, n_ff))
    fn = moe_gate_up if path == "float" else moe_gate_up_q8
    wg, wu = (np.concatenate([g, u], axis=1), None) if fused else (g, u)
    fn(wg, wu, q, DeviceArray.from_numpy(h) if path == "float" else h, ids, n_ff, out=act)
    check_moe_gate_up(act.to_numpy(), g, u, q, h, ids, n_ff, q8=path == "dp4a")


@pytest.mark.gpu
@settings(max_examples=1, deadline=None)
@given(seed=SEEDS)
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q,n_ff,n_out,E,k,resid", [("Q6_K", 768, 2048, 128, 8, True),
                                                    ("Q6_K_P", 768, 2048, 128, 8, False),
                                                    ("Q4_K", 768, 2048, 128, 8, False),
                                                    ("Q6_K", 256, 256, 16, 4, False), ("Q8_0", 384, 384, 16, 4, True)])
def test_down(path, q, n_ff, n_out, E, k, resid, seed):
    rng = np.random.default_rng(seed)
    d = experts(q, E, n_out, n_ff, rng)
    act = rng.standard_normal((k, n_ff)).astype(np.float32)
    ids, w = route(E, k, rng)
    r = rng.standard_normal(n_out).astype(np.float32) if resid else None
    out = _poisoned((n_out,))
    (moe_down if path == "float" else moe_down_q8)(d, q, act, ids, w, n_out, resid=r, out=out)
    check_moe_down(out.to_numpy(), d, q, act, ids, w, n_out, r, q8=path == "dp4a")


@pytest.mark.gpu
@settings(max_examples=1, deadline=None)
@given(seed=SEEDS)
def test_moe_ffn_qwen3_shape_end_to_end(seed):
    rng = np.random.default_rng(seed)
    E, k, n_embd, n_ff = 128, 8, 2048, 768
    g, u = experts("Q4_K", E, n_ff, n_embd, rng), experts("Q4_K", E, n_ff, n_embd, rng)
    d = experts("Q6_K", E, n_embd, n_ff, rng)
    h = rng.standard_normal(n_embd).astype(np.float32)
    resid = rng.standard_normal(n_embd).astype(np.float32)
    ids, w = route(E, k, rng)
    y = moe_ffn(g, u, d, "Q4_K", "Q6_K", h, ids, w, n_ff, resid=resid)
    assert not np.isnan(y).any()
    ref = moe_ffn_ref(g, u, d, "Q4_K", "Q6_K", h, ids, w, n_ff, resid=resid)
    assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()
    # deterministic: same inputs, same bits
    y2 = moe_ffn(g, u, d, "Q4_K", "Q6_K", h, ids, w, n_ff, resid=resid)
    np.testing.assert_array_equal(y.view(np.uint32), y2.view(np.uint32))


@pytest.mark.gpu
@settings(max_examples=1, deadline=None)
@given(seed=SEEDS)
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q_down", ["Q6_K_P", "Q4_K"])
@pytest.mark.parametrize("rows_per_warp", [1, 2])
def test_moe_chunk_rows_per_warp(path, q_down, rows_per_warp, seed):
    """The chunk-mapping MoE kernels with 1 and 2 rows per warp (Qwen3 shape) against the float64 reference."""
    rng = np.random.default_rng(seed)
    E, k, n_embd, n_ff = 32, 8, 2048, 768
    g, u = experts("Q4_K", E, n_ff, n_embd, rng), experts("Q4_K", E, n_ff, n_embd, rng)
    d = experts(q_down, E, n_embd, n_ff, rng)
    h = rng.standard_normal(n_embd).astype(np.float32)
    resid = rng.standard_normal(n_embd).astype(np.float32)
    ids, w = route(E, k, rng)
    q8 = path == "dp4a"
    act = _poisoned((k, n_ff))
    (moe_gate_up_q8 if q8 else moe_gate_up)(g, u, "Q4_K", h, ids, n_ff, out=act, rows_per_warp=rows_per_warp)
    a = act.to_numpy()
    check_moe_gate_up(a, g, u, "Q4_K", h, ids, n_ff, q8=q8)
    y = _poisoned((n_embd,))
    (moe_down_q8 if q8 else moe_down)(d, q_down, a, ids, w, n_embd, resid=resid, out=y,
                                      rows_per_warp=rows_per_warp)
    check_moe_down(y.to_numpy(), d, q_down, a, ids, w, n_embd, resid, q8=q8)


@pytest.mark.gpu
@settings(max_examples=1, deadline=None)
@given(seed=SEEDS)
@pytest.mark.parametrize("knobs", [{"mapping": "chunk", "rows_per_warp": 2, "x_loads_first": True},
                                   {"mapping": "chunk", "rows_per_warp": 1, "x_loads_first": True},
                                   {"mapping": "slice", "warps_per_row": 1}, {"mapping": "slice", "warps_per_row": 4}])
def test_moe_tuned_launch_knobs(knobs, seed):
    """The wrapper arguments the autotuner's MoE configs set (models/ops.py passes a config as keyword arguments):
    dp4a activation loads first, the slice down kernel's warps per row (Qwen3 shape, dp4a; gate+up takes the
    chunk configs' knobs, the slice configs as ``mapping="slice"``) against the float64 reference."""
    rng = np.random.default_rng(seed)
    E, k, n_embd, n_ff = 32, 8, 2048, 768
    g, u = experts("Q4_K", E, n_ff, n_embd, rng), experts("Q4_K", E, n_ff, n_embd, rng)
    d = experts("Q6_K_P", E, n_embd, n_ff, rng)
    h = rng.standard_normal(n_embd).astype(np.float32)
    ids, w = route(E, k, rng)
    gu = {key: v for key, v in knobs.items() if key != "warps_per_row"}
    act = _poisoned((k, n_ff))
    moe_gate_up_q8(g, u, "Q4_K", h, ids, n_ff, out=act, **gu)
    a = act.to_numpy()
    check_moe_gate_up(a, g, u, "Q4_K", h, ids, n_ff, q8=True)
    y = _poisoned((n_embd,))
    moe_down_q8(d, "Q6_K_P", a, ids, w, n_embd, out=y, **knobs)
    check_moe_down(y.to_numpy(), d, "Q6_K_P", a, ids, w, n_embd, None, q8=True)


# ------------------------------------------------------------------------------------------- fuzz
# (gate/up type, down type, n_embd choices): the model type mixes (K-quants on 256-multiples, the 32-element
# fallbacks of odd sizes). Sizes are drawn from short menus so that examples share compiled kernels.
FAMILIES = [("Q4_K", "Q6_K", (256, 512, 1024, 2048), (256, 512, 768)),
            ("Q4_K", "Q4_K", (256, 512, 2048), (256, 768)),
            ("Q4_K", "Q6_K_P", (512, 2048), (256, 768)),
            ("Q5_0", "Q8_0", (384, 640), (96, 384)),
            ("Q8_0", "Q5_0", (64, 384), (64, 160))]


@pytest.mark.gpu
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_moe_ffn_fuzz(data):
    """Both kernels on drawn shapes, expert counts (1..64), routed slots (1..8, repeated experts allowed), paths,
    mappings, the fused gate_up layout and the residual: every output poisoned first, every check of the model-shape
    tests applied."""
    qgu, qd, n_embds, n_ffs = data.draw(st.sampled_from(FAMILIES), label="types")
    n_embd = data.draw(st.sampled_from(n_embds), label="n_embd")
    n_ff = data.draw(st.sampled_from(n_ffs), label="n_ff")
    E = data.draw(st.integers(1, 64), label="n_expert")
    k = data.draw(st.integers(1, 8), label="slots")
    repeats = data.draw(st.booleans(), label="repeated experts") or k > E
    path = data.draw(st.sampled_from(["float", "dp4a"]), label="path")
    mapping = data.draw(st.sampled_from(["auto", "slice"]), label="mapping")
    fused = data.draw(st.booleans(), label="fused gate_up")
    resid = data.draw(st.booleans(), label="residual")
    rng = np.random.default_rng(data.draw(SEEDS, label="seed"))
    q8 = path == "dp4a"
    g, u = experts(qgu, E, n_ff, n_embd, rng), experts(qgu, E, n_ff, n_embd, rng)
    d = experts(qd, E, n_embd, n_ff, rng)
    h = (rng.standard_normal(n_embd) * rng.uniform(0.1, 10)).astype(np.float32)
    ids, w = route(E, k, rng, repeats)
    r = rng.standard_normal(n_embd).astype(np.float32) if resid else None
    act = _poisoned((k, n_ff))
    wg, wu = (np.concatenate([g, u], axis=1), None) if fused else (g, u)
    (moe_gate_up_q8 if q8 else moe_gate_up)(wg, wu, qgu, h, ids, n_ff, out=act, mapping=mapping)
    a = act.to_numpy()
    check_moe_gate_up(a, g, u, qgu, h, ids, n_ff, q8=q8)
    y = _poisoned((n_embd,))
    (moe_down_q8 if q8 else moe_down)(d, qd, a, ids, w, n_embd, resid=r, out=y, mapping=mapping)
    check_moe_down(y.to_numpy(), d, qd, a, ids, w, n_embd, r, q8=q8)
