"""The shapes the autotuner collects from a GGUF file (autotune/shapes.py): synthetic qwen3moe / gemma3 files and
the real Gemma 3 270M of the demo extra. Expected values are written from the models' tensor inventories
(gguf/config.py, shared/spec/models.md), not from the collector."""

from __future__ import annotations

import pytest

from sparkinfer_cute.autotune.registry import load_ops
from sparkinfer_cute.autotune.shapes import load_model_tasks

ALL = list(load_ops())


def _by(tasks, op):
    return {tuple(sorted(t.shape.items())): t for t in tasks if t.op == op}


def _get(tasks, op, **shape):
    return _by(tasks, op).get(tuple(sorted(shape.items())))


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    from sparkinfer_cute.gguf.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth") / "qwen_tiny.gguf", "qwen3moe", "tiny")


def test_qwen3moe_tiny(qwen_tiny):
    arch, tasks, notes = load_model_tasks(qwen_tiny, ALL)
    assert arch == "qwen3moe"
    # tiny: n_embd 256, 4 layers, 8 heads x 64 (q 512), 2 kv heads (k/v 128), 16 experts, top-4, n_ff_exp 256,
    # vocab 1536, context 512: attn_o 512 -> 256; the LM head is output.weight Q6_K -> Q6_K_P on the GPU
    assert _get(tasks, "gemv", qtype="Q6_K_P", n_in=256, n_out=1536).where == "lm_head x1"
    assert _get(tasks, "gemv_q8", qtype="Q4_K", n_in=256, n_out=512).count == 4
    assert _get(tasks, "gemv", qtype="Q4_K", n_in=512, n_out=256).where == "attn_output x4"
    kv = [t for t in tasks if t.op == "gemv" and t.shape["n_in"] == 256 and t.shape["n_out"] == 128]
    assert sum(t.count for t in kv) == 8  # attn_k and attn_v of 4 layers (Q4_K, or Q6_K -> Q6_K_P)
    gu = [t for t in tasks if t.op == "moe_gate_up"]
    assert [t.shape for t in gu] == [dict(qtype="Q4_K", n_in=256, n_ff=256, n_expert=16, k=4, fused=False)]
    assert gu[0].count == 4
    down = [t for t in tasks if t.op == "moe_down_q8"]
    assert sum(t.count for t in down) == 4 and {t.shape["qtype"] for t in down} <= {"Q4_K", "Q6_K_P"}
    assert all(t.shape["n_ff"] == 256 and t.shape["n_out"] == 256 and t.shape["k"] == 4 for t in down)
    # prefill: grouped gated gate+up (silu) and grouped down, tokens = the chunk (512), not tokens * k
    assert _get(tasks, "quant_gemm", qtype="Q4_K", n_in=256, n_out=256, tokens=512, n_expert=16, k=4,
                act="silu").count == 4
    # attention: only the 512 bucket fits the 512-token context
    att = [t for t in tasks if t.op == "attention_decode"]
    # qk_rot 64: the Q/K prologue the default build runs inside attention (tuned with it)
    assert [t.shape for t in att] == [dict(n_head=8, n_kv_head=2, head_dim=64, qk_rot=64, ctx=512)] and att[0].count == 4
    assert "context 4096 > the model's 512: not tuned" in notes
    # no router GEMV (F32, its own fused kernel), no embedding lookup
    assert not [t for t in tasks if t.op == "gemv" and t.shape["n_out"] == 16]


def test_op_selection_and_prefill_switch(qwen_tiny):
    _, tasks, _ = load_model_tasks(qwen_tiny, ["attention_decode", "gemv_q8"], ctxs=(100, 300), prefill_tokens=0)
    assert {t.op for t in tasks} == {"attention_decode", "gemv_q8"}
    assert sorted(t.shape["ctx"] for t in tasks if t.op == "attention_decode") == [128, 512]
    _, tasks, _ = load_model_tasks(qwen_tiny, ["quant_gemm"], prefill_tokens=0)
    assert tasks == []
    _, tasks, _ = load_model_tasks(qwen_tiny, ["quant_gemm"], prefill_tokens=100)
    assert {t.shape["tokens"] for t in tasks} == {128}


def test_repack_switch_keeps_q6_k(qwen_tiny, monkeypatch):
    monkeypatch.setenv("SPARKINFER_REPACK_Q6K", "0")
    _, tasks, _ = load_model_tasks(qwen_tiny, ["gemv"])
    assert _get(tasks, "gemv", qtype="Q6_K", n_in=256, n_out=1536) is not None
    assert not [t for t in tasks if t.shape["qtype"] == "Q6_K_P"]


def test_gemma3_270m(gemma3_path):
    arch, tasks, notes = load_model_tasks(gemma3_path, ALL)
    assert arch == "gemma3" and notes == []
    # 18 layers, n_embd 640, 4 heads x 256 (q 1024), 1 kv head (k/v 256), n_ff 2048, tied LM head: token_embd
    # (Q8_0 in this Q4_K_M file) is not repacked; sliding window 512 on 15 of 18 layers, context 32768
    assert _get(tasks, "gemv", qtype="Q8_0", n_in=640, n_out=262144).where == "lm_head x1"
    assert _get(tasks, "gemv", qtype="Q5_0", n_in=640, n_out=1024).count == 18
    assert _get(tasks, "gemv", qtype="Q5_0", n_in=640, n_out=2048).where == "ffn_gate x18, ffn_up x18"
    assert _get(tasks, "gemv", qtype="Q4_K", n_in=1024, n_out=640).where == "attn_output x18"
    down = [t for t in tasks if t.op == "gemv" and (t.shape["n_in"], t.shape["n_out"]) == (2048, 640)]
    assert sum(t.count for t in down) == 18 and {t.shape["qtype"] for t in down} == {"Q4_K", "Q6_K_P"}
    assert _get(tasks, "quant_gemm", qtype="Q5_0", n_in=640, n_out=2048, tokens=512, n_expert=0, k=0,
                act="gelu_tanh").where == "ffn_gate+up x18"
    att = {t.shape["ctx"]: t for t in tasks if t.op == "attention_decode"}
    assert set(att) == {512, 4096, 32768}
    assert att[512].where == "swa512 x15, full x3"  # the window caps SWA layers at 512 live keys
    assert att[4096].count == 3 and att[32768].count == 3
    assert all(t.shape["n_head"] == 4 and t.shape["n_kv_head"] == 1 and t.shape["head_dim"] == 256
               for t in att.values())
    assert not [t for t in tasks if t.op.startswith("moe")]


def test_gemma4_and_scaled_gemma3_attention_shapes_name_the_prologue_terms(tmp_path, monkeypatch):
    """The attention kernel a layer runs has its prologue's V norm (Gemma 4) and theta divisors (Gemma 4 global
    layers' rope_freqs; Gemma 3 4B+'s linear scaling on global layers) compiled in: the tuned shape says so
    (optional fields, absent when false), and the models' lookup (models/ops.py attention_config) asks with the same
    key, so the config found was timed on that kernel."""
    from sparkinfer_cute.autotune.registry import get_op
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.gguf.synth import write_synthetic
    from sparkinfer_cute.models import ops

    op = get_op("attention_decode")
    asked = []
    monkeypatch.setattr(ops, "tuned", lambda name, shape, where="": asked.append(op.shape_key(shape)) or None)
    for arch, overrides in (("gemma4", None), ("gemma3", {"rope_scaling_factor": 8.0}), ("gemma3", None)):
        f = write_synthetic(tmp_path / f"{arch}{bool(overrides)}.gguf", arch, "tiny", overrides=overrides)
        cfg = load_config(GGUFFile(str(f)))
        _, tasks, _ = load_model_tasks(f, ["attention_decode"], ctxs=(256,), prefill_tokens=0)
        keys = {op.shape_key(t.shape) for t in tasks}
        asked.clear()
        for g in ops.attention_geometry(cfg):
            ops.attention_config(g, 256, sm_count=132)
        assert set(asked) == keys, (arch, asked, keys)
        divided = [k for k in keys if "qk_freq_factors=1" in k]
        glob = {l for l in range(cfg.n_layer) if not cfg.is_swa(l)}
        assert {l for l in range(cfg.n_layer) if cfg.rope_divided_for(l)} == (glob if arch == "gemma4" or overrides
                                                                              else set())
        if arch == "gemma4":
            assert divided and all("v_norm=1" in k for k in keys if "qk_rot=0" not in k)
        else:
            assert not any("v_norm" in k for k in keys)
            assert bool(divided) == bool(overrides), keys
