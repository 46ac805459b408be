"""Config spaces of the real tunable ops (autotune/ops/*.py), on the CPU: every generated candidate passes its
validity check, the default is one of them, invalid configs are rejected with a reason, and one candidate per op
compiles for sm_120a through the adapter's compile call (the argument order the GPU runner launches with)."""

from __future__ import annotations

import pytest

from sparkinfer_cute.autotune.registry import TuneContext, get_op, load_ops
from sparkinfer_cute.kernels import arch

SM120_SMEM = 101376
CTX = TuneContext(sm_count=170, smem_budget=SM120_SMEM)
SPARK = TuneContext(sm_count=48, smem_budget=SM120_SMEM)

QWEN_GEMV = [("Q4_K", 2048, 4096), ("Q4_K", 2048, 512), ("Q6_K_P", 2048, 512), ("Q4_K", 4096, 2048),
             ("Q6_K_P", 2048, 151936)]
GEMMA_GEMV = [("Q5_0", 640, 1024), ("Q8_0", 640, 256), ("Q4_K", 1024, 640), ("Q6_K_P", 2048, 640),
              ("Q8_0", 640, 262144), ("Q5_0", 640, 2048), ("F16", 640, 640)]
SHAPES = {
    "gemv": [dict(qtype=q, n_in=i, n_out=o) for q, i, o in QWEN_GEMV + GEMMA_GEMV],
    "gemv_q8": [dict(qtype=q, n_in=i, n_out=o) for q, i, o in QWEN_GEMV + GEMMA_GEMV if q != "F16"],
    "moe_gate_up": [dict(qtype="Q4_K", n_in=2048, n_ff=768, n_expert=128, k=8, fused=f) for f in (False, True)]
    + [dict(qtype="Q5_0", n_in=384, n_ff=384, n_expert=16, k=4, fused=False)],
    "moe_down": [dict(qtype=q, n_ff=768, n_out=2048, n_expert=128, k=8) for q in ("Q4_K", "Q6_K_P")]
    + [dict(qtype="Q8_0", n_ff=384, n_out=384, n_expert=16, k=4), dict(qtype="Q4_K", n_ff=256, n_out=256,
                                                                         n_expert=16, k=3)],
    "attention_decode": [dict(n_head=h, n_kv_head=kv, head_dim=d, qk_rot=0, ctx=c) for h, kv, d in
                         ((32, 4, 128), (4, 1, 256), (16, 2, 512), (16, 8, 256), (8, 2, 64))
                         for c in (64, 512, 4096, 32768)],
    "quant_gemm": [dict(qtype=q, n_in=i, n_out=o, tokens=512, n_expert=0, k=0, act="none")
                   for q, i, o in [("Q4_K", 2048, 4096), ("Q6_K_P", 2048, 512), ("Q5_0", 640, 1024),
                                   ("Q8_0", 640, 256), ("Q4_K", 4096, 2048)]]
    + [dict(qtype="Q5_0", n_in=640, n_out=2048, tokens=512, n_expert=0, k=0, act="gelu_tanh"),
       dict(qtype="Q4_K", n_in=2048, n_out=768, tokens=512, n_expert=128, k=8, act="silu"),
       dict(qtype="Q6_K_P", n_in=768, n_out=2048, tokens=512, n_expert=128, k=8, act="none")],
}
SHAPES["moe_gate_up_q8"] = SHAPES["moe_gate_up"]
SHAPES["moe_down_q8"] = SHAPES["moe_down"]


def test_every_registered_op_is_covered():
    assert set(load_ops()) >= set(SHAPES)
    assert set(SHAPES) == {n for n in load_ops() if n != "fake_op"}


@pytest.mark.parametrize("ctx", [CTX, SPARK], ids=["5090", "spark"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_candidate_is_valid_and_the_default_is_one(name, ctx):
    op = get_op(name)
    choice = 0
    for shape in SHAPES[name]:
        default, cands, pruned = op.candidates(shape, ctx)
        assert op.why_invalid(default, shape, ctx) is None, (shape, default)
        assert cands[0] == default
        keys = [tuple(sorted(c.items())) for c in cands]
        assert len(set(keys)) == len(keys)
        for c in cands:
            assert op.why_invalid(c, shape, ctx) is None, (shape, c, op.why_invalid(c, shape, ctx))
        for c, why in pruned:
            assert why and op.why_invalid(c, shape, ctx) == why
        assert op.shape_key(shape)  # every shape field present
        choice += len(cands) >= 2
    assert choice, f"{name}: no shape with a real choice"


def test_candidates_construct_with_the_kernels_own_checks():
    """Independent of why_invalid: every candidate builds the kernel object (whose constructor checks smem against
    the sm120 budget and the divisibility rules), and the smem of every quant_gemm candidate is within 99 KB by the
    kernel's own formula (QuantGemm.smem_bytes); grid points over it were pruned with the smem reason."""
    from sparkinfer_cute.kernels.attention_decode import AttentionDecodeSplitKV
    from sparkinfer_cute.kernels.quant_gemm import QuantGemm

    qg = get_op("quant_gemm")
    for shape in SHAPES["quant_gemm"]:
        _, cands, pruned = qg.candidates(shape, CTX)
        gated = shape["act"] != "none"
        for c in cands:
            k = QuantGemm(shape["qtype"], shape["n_in"], tile_rows=c["tile_rows"], tile_tokens=c["tile_tokens"],
                          stages=c["stages"], gated=gated, act="silu" if not gated else shape["act"],
                          experts=shape["n_expert"] > 0, gather=shape["n_expert"] > 0 and gated)
            assert k.smem_bytes() <= SM120_SMEM
            assert shape["n_out"] % k.out_rows == 0  # n_out is a launch argument: whole CTAs of output rows
        assert any("smem" in why for _, why in pruned)  # 128x128 tiles x 4 stages do not fit in 99 KB
        assert all(("smem" in why) or ("gated tiles" in why) for _, why in pruned), pruned
    at = get_op("attention_decode")
    for shape in SHAPES["attention_decode"]:
        for c in at.candidates(shape, CTX)[1]:
            AttentionDecodeSplitKV(shape["n_head"], shape["n_kv_head"], shape["head_dim"], 64, c["num_splits"],
                                   False, keys_per_iter=c["keys_per_iter"], heads_per_cta=c["heads_per_cta"],
                                   fused_combine=True)


@pytest.mark.parametrize("name,config,shape,reason", [
    ("quant_gemm", dict(tile_rows=128, tile_tokens=128, stages=4),
     dict(qtype="Q4_K", n_in=2048, n_out=4096, tokens=512, n_expert=0, k=0, act="none"),
     "smem > budget 101376 B"),
    ("quant_gemm", dict(tile_rows=32, tile_tokens=64, stages=2),
     dict(qtype="Q4_K", n_in=2048, n_out=768, tokens=512, n_expert=128, k=8, act="silu"), "gated tiles need"),
    ("quant_gemm", dict(tile_rows=64, tile_tokens=48, stages=2),
     dict(qtype="Q4_K", n_in=2048, n_out=4096, tokens=512, n_expert=0, k=0, act="none"), "tile_tokens=48"),
    ("quant_gemm", dict(tile_rows=128, tile_tokens=16, stages=2),
     dict(qtype="Q4_K", n_in=2048, n_out=320, tokens=512, n_expert=0, k=0, act="none"), "not a multiple of 128"),
    ("quant_gemm", dict(tile_rows=64, tile_tokens=64, stages=2),
     dict(qtype="Q6_K", n_in=2048, n_out=512, tokens=512, n_expert=0, k=0, act="none"), "does not take Q6_K"),
    ("attention_decode", dict(num_splits=256, heads_per_cta=32, keys_per_iter=2),
     dict(n_head=32, n_kv_head=1, head_dim=512, qk_rot=0, ctx=32768), "smem > budget"),
    ("attention_decode", dict(num_splits=8, heads_per_cta=3, keys_per_iter=2),
     dict(n_head=32, n_kv_head=4, head_dim=128, qk_rot=0, ctx=4096), "must divide the GQA group"),
    ("attention_decode", dict(num_splits=12, heads_per_cta=4, keys_per_iter=2),
     dict(n_head=32, n_kv_head=4, head_dim=128, qk_rot=0, ctx=4096), "num_splits=12 is not one of"),
    ("attention_decode", dict(num_splits=8, heads_per_cta=4, keys_per_iter=2),
     dict(n_head=32, n_kv_head=4, head_dim=96, qk_rot=0, ctx=4096), "head_dim 96 not supported"),
    ("gemv", dict(mapping="chunk", rows_per_warp=2), dict(qtype="Q5_0", n_in=640, n_out=1024), "chunk mapping needs"),
    ("gemv", dict(mapping="chunk", rows_per_warp=2), dict(qtype="Q4_K", n_in=2048, n_out=1023),
     "not a multiple of rows_per_warp 2"),
    ("gemv", dict(mapping="chunk", rows_per_warp=3), dict(qtype="Q4_K", n_in=2048, n_out=1023),
     "rows_per_warp=3 is not one of"),
    ("gemv", dict(mapping="slice", warps_per_row=2, rows=4), dict(qtype="Q4_K", n_in=2048, n_out=512),
     "unknown tuning"),
    ("gemv", dict(mapping="unit"), dict(qtype="Q4_K", n_in=2048, n_out=512), "unknown mapping"),
    ("gemv", dict(mapping="slice", warps_per_row=1), dict(qtype="Q4_K", n_in=2000, n_out=512),
     "not a multiple of the Q4_K"),
    # the names before the kernels' rename (a config written under them is not taken for the new knob)
    ("gemv", dict(mapping="chunk", rpw=2), dict(qtype="Q4_K", n_in=2048, n_out=4096), "unknown tuning argument(s) rpw"),
    ("gemv", dict(mapping="slice", wpr=2), dict(qtype="Q4_K", n_in=2048, n_out=512), "unknown tuning argument(s) wpr"),
    ("gemv_q8", dict(mapping="slice", warps_per_row=1), dict(qtype="F16", n_in=2048, n_out=512), "does not take F16"),
    ("gemv_q8", dict(mapping="slice", warps_per_row=8), dict(qtype="Q4_K", n_in=2048, n_out=512),
     "warps_per_row=8 is not one of"),
    ("gemv_q8", dict(mapping="slice"), dict(qtype="Q4_K", n_in=2048, n_out=512), "warps_per_row=None is not one of"),
    ("moe_down", dict(mapping="chunk", rows_per_warp=1), dict(qtype="Q4_K", n_ff=256, n_out=256, n_expert=16, k=3),
     "whole warps of chunks"),
    ("moe_down", dict(mapping="slice", warps_per_row=8), dict(qtype="Q4_K", n_ff=768, n_out=2048, n_expert=128, k=8),
     "warps_per_row=8 is not one of"),
    ("moe_gate_up", dict(mapping="chunk", rows_per_warp=1, x_loads_first=True),
     dict(qtype="Q4_K", n_in=2048, n_ff=768, n_expert=128, k=8, fused=False),
     "unknown tuning argument(s) x_loads_first"),
    ("moe_gate_up_q8", dict(mapping="chunk", rows_per_warp=2, x_loads_first=1),
     dict(qtype="Q4_K", n_in=2048, n_ff=768, n_expert=128, k=8, fused=False), "x_loads_first=1 is not a bool"),
    ("moe_down_q8", dict(mapping="chunk", rpw=1, xfirst=False),
     dict(qtype="Q4_K", n_ff=768, n_out=2048, n_expert=128, k=8), "unknown tuning argument(s) rpw, xfirst"),
])
def test_invalid_configs_are_rejected_with_a_reason(name, config, shape, reason):
    op = get_op(name)
    why = op.why_invalid(config, shape, CTX)
    assert why is not None and reason in why, why


def test_defaults_follow_todays_heuristics():
    ctx = TuneContext(sm_count=132, smem_budget=SM120_SMEM)
    gemv = get_op("gemv")
    # choose_rows_per_warp: 2 while >= 8 warps per SM remain (4096 / 2 >= 8 * 132), else 1
    assert gemv.candidates(dict(qtype="Q4_K", n_in=2048, n_out=4096), ctx)[0] == dict(mapping="chunk",
                                                                                      rows_per_warp=2)
    assert gemv.candidates(dict(qtype="Q4_K", n_in=2048, n_out=512), ctx)[0] == dict(mapping="chunk",
                                                                                     rows_per_warp=1)
    assert gemv.candidates(dict(qtype="Q5_0", n_in=640, n_out=256), ctx)[0]["mapping"] == "slice"
    # gemv.py _launch: the dp4a slice GEMV runs one warp per row (the f32 one picks with choose_warps_per_row)
    assert get_op("gemv_q8").candidates(dict(qtype="Q5_0", n_in=640, n_out=256), ctx)[0] == dict(mapping="slice",
                                                                                                warps_per_row=1)
    # moe_ffn_chunk.py: gate_up_rows_per_warp / down_rows_per_warp; the slice down kernel's 2 warps per row
    gu = dict(qtype="Q4_K", n_in=2048, n_ff=768, n_expert=128, k=8, fused=False)
    assert get_op("moe_gate_up").candidates(gu, ctx)[0] == dict(mapping="chunk", rows_per_warp=2)
    assert get_op("moe_gate_up_q8").candidates(gu, ctx)[0] == dict(mapping="chunk", rows_per_warp=1,
                                                                   x_loads_first=False)
    dn = dict(qtype="Q6_K_P", n_ff=768, n_out=2048, n_expert=128, k=8)
    assert get_op("moe_down").candidates(dn, ctx)[0] == dict(mapping="chunk", rows_per_warp=2)
    assert get_op("moe_down_q8").candidates(dn, ctx)[0] == dict(mapping="chunk", rows_per_warp=1,
                                                                x_loads_first=False)
    assert get_op("moe_down").candidates(dict(qtype="Q8_0", n_ff=384, n_out=384, n_expert=16, k=4), ctx)[0] == \
        dict(mapping="slice", warps_per_row=2)
    attn = get_op("attention_decode")
    # the compile-gated MODEL_CONFIGS entry (qwen3moe-30b-a3b: 32 splits), capped at ctx / 64
    d = attn.candidates(dict(n_head=32, n_kv_head=4, head_dim=128, qk_rot=0, ctx=4096), ctx)[0]
    assert d["num_splits"] == 32 and d["heads_per_cta"] == 4  # automatic heads_per_cta resolved: 4 * 8 <= 32
    assert attn.candidates(dict(n_head=32, n_kv_head=4, head_dim=128, qk_rot=0, ctx=512), ctx)[0]["num_splits"] == 8
    qg = get_op("quant_gemm")
    d = qg.candidates(dict(qtype="Q4_K", n_in=2048, n_out=4096, tokens=512, n_expert=0, k=0, act="none"), ctx)[0]
    assert d["tile_rows"] == 64 and d["tile_tokens"] == 64 and d["stages"] in (2, 3, 4)
    # the grouped expert GEMMs run models/ops.py MOE_TILE_TOKENS = 32 token tiles
    d = qg.candidates(dict(qtype="Q4_K", n_in=2048, n_out=768, tokens=512, n_expert=128, k=8, act="silu"), ctx)[0]
    assert d["tile_rows"] == 64 and d["tile_tokens"] == 32 and d["stages"] in (2, 3, 4)


def test_bucketing_and_compile_keys():
    attn = get_op("attention_decode")
    s = dict(n_head=32, n_kv_head=4, head_dim=128, qk_rot=0, ctx=3000)
    assert attn.shape_key(s) == "n_head=32,n_kv_head=4,head_dim=128,qk_rot=0,ctx=4096"
    assert attn.shape_key(dict(s, ctx=10)) == "n_head=32,n_kv_head=4,head_dim=128,qk_rot=0,ctx=64"
    cfg = dict(num_splits=8, heads_per_cta=4, keys_per_iter=2)
    assert attn.compile_key(cfg, s) == attn.compile_key(cfg, dict(s, ctx=32768))  # the context is runtime
    assert attn.compile_key(cfg, s) != attn.compile_key(cfg, dict(s, qk_rot=128))  # the prologue is compiled in
    qg = get_op("quant_gemm")
    q = dict(qtype="Q4_K", n_in=2048, n_out=4096, tokens=300, n_expert=0, k=0, act="none")
    assert qg.shape_key(q).endswith("tokens=512,n_expert=0,k=0,act=none")
    g = get_op("gemv")
    assert g.shape_key(dict(qtype="Q4_K", n_in=2048, n_out=4096, extra=1)) == "qtype=Q4_K,n_in=2048,n_out=4096"


# one candidate per op (a non-default one where there is one), small shapes: the adapter's compile call must match
# the kernel's compile function
COMPILE_CASES = [
    ("gemv", dict(mapping="chunk", rows_per_warp=4), dict(qtype="Q6_K_P", n_in=1024, n_out=512)),
    ("gemv", dict(mapping="slice", warps_per_row=4), dict(qtype="Q4_K", n_in=1024, n_out=512)),
    ("gemv_q8", dict(mapping="slice", warps_per_row=2), dict(qtype="Q5_0", n_in=640, n_out=256)),
    ("gemv_q8", dict(mapping="chunk", rows_per_warp=2), dict(qtype="Q4_K", n_in=1024, n_out=256)),
    ("moe_gate_up_q8", dict(mapping="chunk", rows_per_warp=2, x_loads_first=True),
     dict(qtype="Q4_K", n_in=1024, n_ff=256, n_expert=16, k=4, fused=False)),
    ("moe_gate_up", dict(mapping="slice"), dict(qtype="Q5_0", n_in=384, n_ff=384, n_expert=16, k=4, fused=True)),
    ("moe_down", dict(mapping="slice", warps_per_row=4), dict(qtype="Q8_0", n_ff=384, n_out=384, n_expert=16, k=4)),
    ("moe_down_q8", dict(mapping="chunk", rows_per_warp=2, x_loads_first=False),
     dict(qtype="Q6_K_P", n_ff=256, n_out=256, n_expert=16, k=4)),
    ("attention_decode", dict(num_splits=16, heads_per_cta=2, keys_per_iter=1),
     dict(n_head=8, n_kv_head=2, head_dim=64, qk_rot=0, ctx=512)),
    ("quant_gemm", dict(tile_rows=32, tile_tokens=16, stages=3),
     dict(qtype="Q5_0", n_in=384, n_out=64, tokens=64, n_expert=0, k=0, act="none")),
]


@pytest.mark.parametrize("name,config,shape", COMPILE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(COMPILE_CASES)])
def test_adapter_compile_call(name, config, shape):
    op = get_op(name)
    assert op.why_invalid(config, shape, CTX) is None
    with arch.target("sm_120a"):
        assert op.compile(config, shape) is not None


def test_attention_optional_shape_fields():
    """``v_norm`` / ``qk_freq_factors``: absent and false are one cache key (older caches keep their keys), true
    adds the field to the key and to the compile key; they need the Q/K prologue, and must be bools."""
    from sparkinfer_cute.autotune.registry import get_op

    op = get_op("attention_decode")
    base = dict(n_head=16, n_kv_head=2, head_dim=512, qk_rot=128, ctx=3000)
    k0 = op.shape_key(base)
    assert k0 == "n_head=16,n_kv_head=2,head_dim=512,qk_rot=128,ctx=4096"
    assert op.shape_key(dict(base, v_norm=False, qk_freq_factors=False)) == k0
    assert op.shape_key(dict(base, v_norm=True, qk_freq_factors=True)) == k0 + ",v_norm=1,qk_freq_factors=1"
    assert op.shape_key(dict(base, qk_freq_factors=True)) == k0 + ",qk_freq_factors=1"
    cfg = dict(num_splits=16, heads_per_cta=1, keys_per_iter=1)
    assert op.compile_key(cfg, base) != op.compile_key(cfg, dict(base, qk_freq_factors=True))
    assert op.compile_key(cfg, base) == op.compile_key(cfg, dict(base, qk_freq_factors=False, ctx=100))
    assert op.why_invalid(cfg, dict(base, v_norm=True, qk_freq_factors=True), CTX) is None
    assert "needs the Q/K prologue" in op.why_invalid(cfg, dict(base, qk_rot=0, v_norm=True), CTX)
    assert "is not a bool" in op.why_invalid(cfg, dict(base, qk_freq_factors=1), CTX)
