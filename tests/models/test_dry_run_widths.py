"""Every matrix op of every GPU forward gets an input as wide as its weight's rows, on the decode step and on a
prefill chunk, for every architecture (models/dry_run.py ``WIDTH_CHECKS``, no GPU). Gemma 4 is the case that needs
it: its sliding layers' O projection takes 16 x 256 inputs, its global layers' 16 x 512, from buffers sized for the
widest layer; a forward that passed the whole buffer failed at graph capture (decode) or read past the weight
(prefill: the grouped GEMM walks the weight at the input's row size)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.models.dry_run import PATHS, DryArray, WidthMismatch, check_widths, record
from sparkinfer_cute.runtime.weights import QWeight


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_every_matrix_op_gets_its_weights_width(tiny_files, arch, path):
    m, calls = record(tiny_files[arch], path=path)  # raises WidthMismatch on the first mismatched call
    checked = [c for c in calls if c.op in ("gemv", "gemm", "gemv_qkv", "gemv_qk")]
    assert checked, "no matrix op was recorded"
    if arch == "gemma4":
        widths = {a.n_head * a.head_dim for a in m.attn_layers}
        assert len(widths) == 2, "the preset must mix head sizes for this test to mean anything"
        o_in = {c.args[1].shape[-1] for c in calls if c.op in ("gemv", "gemm")
                and c.args[0].name.endswith("attn_output.weight")}
        assert o_in == widths


def test_the_check_refuses_a_wider_input():
    w = QWeight("blk.0.attn_output.weight", "Q4_K", (256, 64), DryArray((64 * 144,), np.uint8), 144)
    check_widths("gemv", (w, DryArray((256,), np.float32), None), {})
    check_widths("gemm", (w, DryArray((4, 256), "q8_1"), None, 4), {})
    with pytest.raises(WidthMismatch, match="input width 512"):
        check_widths("gemv", (w, DryArray((512,), np.float32), None), {})
    with pytest.raises(WidthMismatch, match="xq width 512"):
        check_widths("gemv", (w, DryArray((256,), np.float32), None), {"xq": DryArray((1, 512), "q8_1")})
    with pytest.raises(WidthMismatch):
        check_widths("gemm", (w, DryArray((4, 512), "q8_1"), None, 4), {})
    with pytest.raises(WidthMismatch):  # a narrowed copy of the wrong width
        check_widths("gemm", (w, DryArray((4, 512), "q8_1").narrow(128), None, 4), {})


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_batched_prefill_only_where_the_gemm_takes_every_weight(tiny_files, arch, monkeypatch):
    """Plain Q6_K (SPARKINFER_REPACK_Q6K=0) is a type the grouped GEMM does not read: such a model prefills through
    the decode-graph loop instead of failing on its first prompt chunk; the padded Q6_K_P upload takes the batched
    path. Exact f32 activations (SPARKINFER_DP4A=none) also take the loop: the grouped GEMM is int8 only."""
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.models import GPU_FORWARDS
    from sparkinfer_cute.models.dry_run import dry_model, dry_run

    g = GGUFFile(tiny_files[arch])
    cfg = load_config(g)
    with dry_run([]):
        padded = dry_model(GPU_FORWARDS[arch], g, cfg, repack=True)
        plain = dry_model(GPU_FORWARDS[arch], g, cfg, repack=False)
        assert padded.prefill_unsupported_weights() == []
        assert padded.batched_prefill()
        refused = plain.prefill_unsupported_weights()
        assert refused and all(plain.w[n].qtype == "Q6_K" for n in refused)
        assert not plain.batched_prefill()
        from sparkinfer_cute.models import ops

        monkeypatch.setattr(ops, "DP4A", "none")
        assert not padded.batched_prefill()


def test_gpu_forwards_refuse_what_their_kernels_do_not_compute(tiny_files):
    """A file the GPU kernels would compute wrongly is refused with a one-line GGUFError before anything touches
    the GPU: linear RoPE scaling on Gemma 4 (its global layers' rope_freqs take the kernels' divisor input) and
    Gemma 4 dense MLPs of per-layer widths (the MLP buffers have one width)."""
    import dataclasses

    from sparkinfer_cute.errors import GGUFError
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.models import GPU_FORWARDS

    g = GGUFFile(tiny_files["gemma4"])
    cfg = dataclasses.replace(load_config(g), rope_freq_scale=0.125)
    with pytest.raises(GGUFError, match="linear RoPE scaling .factor 8 on 2 layers. has no GPU forward for gemma4"):
        GPU_FORWARDS["gemma4"](g, cfg)
    g = GGUFFile(tiny_files["gemma4"])
    cfg = load_config(g)
    widths = (cfg.n_ff[0] // 2,) + tuple(cfg.n_ff[1:])
    with pytest.raises(GGUFError, match="per-layer dense MLP widths"):
        GPU_FORWARDS["gemma4"](g, dataclasses.replace(cfg, n_ff=widths))


@pytest.mark.parametrize("path", PATHS)
def test_gemma3_linear_rope_scaling_reaches_the_global_layers_rope(tmp_path, path):
    """Gemma 3 4B and larger scale their global layers' RoPE (rope.scaling.type linear, factor 8): the GPU forward
    hands those layers' RoPE (decode: the attention's Q/K prologue; prefill: the batched Q/K kernel) a divisor
    vector of the factor, and the sliding-window layers none. The vector's values: models/base.py
    linear_rope_factors (the dry run allocates nothing)."""
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.gguf.synth import write_synthetic

    f = tmp_path / "g3_scaled.gguf"
    write_synthetic(str(f), arch="gemma3", preset="tiny", seed=1, overrides={"rope_scaling_factor": 8.0})
    cfg = load_config(GGUFFile(str(f)))
    glob = [l for l in range(cfg.n_layer) if not cfg.is_swa(l)]
    assert glob and [l for l in range(cfg.n_layer) if cfg.rope_freq_scale_for(l) != 1.0] == glob
    m, calls = record(str(f), path=path)
    op = "self_attention" if path == "decode" else "qk_norm_rope_kv_rows"
    rope_calls = [c for c in calls if c.op == op]
    assert len(rope_calls) == cfg.n_layer
    for l, c in enumerate(rope_calls):
        ff = c.kwargs.get("freq_factors")
        if l in glob:
            assert ff is not None and ff.qtype == "F32" and ff.shape == (cfg.n_rot // 2,), (l, ff)
        else:
            assert ff is None, l


def test_linear_rope_factors_values(tmp_path, monkeypatch):
    """The divisor vectors: the factor in every pair of each scaled layer, one buffer shared by the layers of one
    (factor, rotary width), none for an unscaled layer (the device upload replaced by a numpy stand-in)."""
    import types

    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.gguf.synth import write_synthetic
    from sparkinfer_cute.models import base, ops

    f = tmp_path / "g3_scaled.gguf"
    write_synthetic(str(f), arch="gemma3", preset="tiny", seed=1,
                    overrides={"rope_scaling_factor": 3.0, "n_layer": 12})
    cfg = load_config(GGUFFile(str(f)))

    class HostArray:
        @staticmethod
        def from_numpy(a, stream=None):
            return types.SimpleNamespace(host=a.copy())

    monkeypatch.setattr(base, "DeviceArray", HostArray)
    m = types.SimpleNamespace(cfg=cfg, attn_layers=ops.attention_geometry(cfg), stream=None)
    m.rope_scaled_layers = types.MethodType(base.GPUDecoder.rope_scaled_layers, m)
    got = base.GPUDecoder.linear_rope_factors(m)
    assert sorted(got) == [5, 11] == [l for l in range(12) if not cfg.is_swa(l)]
    assert got[5] is got[11]
    vals = got[5].data.host.view(np.float32)
    assert vals.shape == (cfg.n_rot // 2,) and (vals == np.float32(3.0)).all()


@pytest.mark.parametrize("path", PATHS)
def test_gemma3_4b_geometry_dry_run(path):
    """The Gemma 3 4B preset's header (no file: 2.5 GB): n_embd 2560 (a multiple of 256 but not of 1024), 8 heads /
    4 KV of 256, linear RoPE scaling 8: every matrix op gets its weight's width (record raises otherwise) and the 5
    global layers' RoPE gets the divisor vector."""
    from sparkinfer_cute.gguf.synth import synthetic_header

    h = synthetic_header("gemma3", "4b")
    m, calls = record(h, path=path)
    op = "self_attention" if path == "decode" else "qk_norm_rope_kv_rows"
    scaled = [l for l, c in enumerate(c for c in calls if c.op == op) if c.kwargs.get("freq_factors") is not None]
    assert scaled == [5, 11, 17, 23, 29]
