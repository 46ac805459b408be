"""The host side of every op's verification (the ``*Problem`` classes of autotune/ops/*.py), on the CPU.

For each op the ideal kernel output is computed here independently (gguf-py dequantization of the whole weight
tensors, float64 products written out per row), rounded to f32 as a kernel's output is; the problem's check must
accept it and reject the output 1% off, one element off by 10x its bound, and an unwritten (NaN) element. This is
what keeps a fast wrong config from winning on the GPU: the sampled rows, expert selection, sorted-row mapping and
page tables of the references are checked here without one."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from sparkinfer_cute.autotune.ops.attention import PAGE_SIZE, AttentionProblem
from sparkinfer_cute.autotune.ops.gemv import GemvProblem
from sparkinfer_cute.autotune.ops.moe_ffn import DownProblem, GateUpProblem
from sparkinfer_cute.autotune.ops.quant_gemm import QuantGemmProblem


def deq(raw, q, n_in):
    """gguf-py dequantization of raw rows (Q6_K_P: drop the 2 pad bytes of every 212-byte block first)."""
    raw = np.ascontiguousarray(raw, np.uint8)
    if q == "Q6_K_P":
        raw, q = raw.reshape(-1, 212)[:, :210], "Q6_K"
    return gguf_dequantize(raw.reshape(-1), GGMLQuantizationType[q]).astype(np.float64).reshape(-1, n_in)


def q8_deq(x):
    """x rounded through q8_1 as the kernels quantize it (d = amax / 127, q = rint(x / d))."""
    xb = np.asarray(x, np.float32).reshape(*np.shape(x)[:-1], -1, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(xb / d[..., None]), 0)
    return (q * d[..., None].astype(np.float64)).reshape(np.shape(x))


def silu(g):
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g))


def gelu_tanh(g):
    return 0.5 * g * (1 + np.tanh(0.7978845608028654 * g * (1 + 0.044715 * g * g)))


def assert_check_discriminates(problem, ideal, sampled_index):
    """``sampled_index``: an index of ``ideal`` the reference covers (where a wrong value must be caught)."""
    y = ideal.astype(np.float32)
    assert problem.check(y) is None, problem.check(y)
    assert problem.check(y * np.float32(1.01)) is not None
    off = y.copy()
    off[sampled_index] += np.float32(10 * problem.bound.max() + 1e-3 * np.abs(y).max())
    assert problem.check(off) is not None
    nan = y.copy()
    nan.reshape(-1)[-1] = np.nan  # an element nobody samples: caught as unwritten
    assert "not finite" in problem.check(nan)


@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("q,n_in,n_out", [("Q4_K", 1024, 520), ("Q6_K_P", 512, 300), ("Q5_0", 320, 96),
                                          ("Q8_0", 64, 700)])
def test_gemv(q, n_in, n_out, q8):
    p = GemvProblem(dict(qtype=q, n_in=n_in, n_out=n_out), q8, np.random.default_rng(1))
    x = q8_deq(p.x) if q8 else p.x.astype(np.float64)
    ideal = deq(p.w, q, n_in) @ x
    assert len(p.rows) == min(n_out, 256) and p.rows[-1] == n_out - 1
    assert_check_discriminates(p, ideal, p.rows[len(p.rows) // 2])


@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_moe_gate_up(fused, q8):
    s = dict(qtype="Q4_K", n_in=512, n_ff=192, n_expert=12, k=3, fused=fused)
    p = GateUpProblem(s, q8, np.random.default_rng(2))
    h = q8_deq(p.h) if q8 else p.h.astype(np.float64)
    ideal = []
    for e in p.ids:
        if fused:
            both = deq(p.mats[0][e], "Q4_K", 512)
            G, U = both[:192], both[192:]
        else:
            G, U = deq(p.mats[0][e], "Q4_K", 512), deq(p.mats[1][e], "Q4_K", 512)
        ideal.append(silu(G @ h) * (U @ h))
    assert_check_discriminates(p, np.stack(ideal), (1, p.rows[3]))


@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("q", ["Q6_K_P", "Q8_0"])
def test_moe_down(q, q8):
    n_ff = 256 if q == "Q6_K_P" else 96
    s = dict(qtype=q, n_ff=n_ff, n_out=160, n_expert=10, k=4)
    p = DownProblem(s, q8, np.random.default_rng(3))
    act = q8_deq(p.act) if q8 else p.act.astype(np.float64)
    ideal = sum(float(p.w[j]) * (deq(p.mats[0][e], q, n_ff) @ act[j]) for j, e in enumerate(p.ids))
    assert_check_discriminates(p, ideal, p.rows[5])


@pytest.mark.parametrize("H,KV,D,ctx", [(8, 2, 64, 200), (4, 1, 256, 64), (4, 2, 128, 130)])
def test_attention(H, KV, D, ctx):
    s = dict(n_head=H, n_kv_head=KV, head_dim=D, qk_rot=0, ctx=ctx)
    p = AttentionProblem(s, 3, np.random.default_rng(4))
    assert len(p.tables) == 3 and p.k_pool.shape[0] == 3 * p.pages
    # set 0 owns pool pages 0 .. pages-1, in its table's (permuted) order
    assert sorted(p.tables[0][0]) == list(range(p.pages))
    ideal = np.empty((1, H, D))
    for h in range(H):
        kv = h // (H // KV)
        ks = np.stack([p.k_pool[p.tables[0][0, t // PAGE_SIZE], t % PAGE_SIZE, kv] for t in range(ctx)])
        vs = np.stack([p.v_pool[p.tables[0][0, t // PAGE_SIZE], t % PAGE_SIZE, kv] for t in range(ctx)])
        s_ = (ks.astype(np.float64) @ p.q[0, h]) * p.scale
        w = np.exp(s_ - s_.max())
        ideal[0, h] = (w / w.sum()) @ vs.astype(np.float64)
    y = ideal.astype(np.float32)
    assert p.check(y) is None
    assert p.check(y * np.float32(1.01)) is not None  # rel. error 1e-2 > 1e-3
    wrong_set = y.copy()
    wrong_set[0, 1] = y[0, 0]
    assert p.check(wrong_set) is not None
    nan = y.copy()
    nan[0, -1, -1] = np.nan
    assert "not finite" in p.check(nan)


@pytest.mark.parametrize("q,act,E,k", [("Q4_K", "none", 0, 0), ("Q5_0", "gelu_tanh", 0, 0), ("Q4_K", "silu", 6, 2),
                                       ("Q6_K_P", "none", 6, 2), ("Q4_0", "none", 0, 0), ("Q8_0", "silu", 5, 3)])
def test_quant_gemm(q, act, E, k):
    n_in = 256 if q in ("Q4_K", "Q6_K_P") else 96
    n_out, T = 64, 20
    s = dict(qtype=q, n_in=n_in, n_out=n_out, tokens=T, n_expert=E, k=k, act=act)
    p = QuantGemmProblem(s, np.random.default_rng(5))
    x = (p.qs.astype(np.float64).reshape(p.qs.shape[0], -1, 32) * p.d[..., None]).reshape(p.qs.shape[0], n_in)
    groups = max(E, 1)
    W = [deq(m, q, n_in).reshape(groups, n_out, n_in) for m in p.mats]
    if E:
        # independent of the problem's sorted order: assignment (t, j) -> its sorted row, rows ordered by
        # (expert, token) as the device sort orders them
        order = sorted(((int(p.ids[t, j]), t, j) for t in range(T) for j in range(k)))
        rows = [(e, t) for e, t, _ in order]
        assert len(rows) == p.n_rows == T * k
    else:
        rows = [(0, t) for t in range(T)]
    ideal = np.empty((len(rows), n_out))
    for r, (e, t) in enumerate(rows):
        xr = x[t] if (not E or act != "none") else x[r]  # grouped down reads the sorted rows
        if act == "none":
            ideal[r] = W[0][e] @ xr
        else:
            g, u = W[0][e] @ xr, W[1][e] @ xr
            ideal[r] = (silu(g) if act == "silu" else gelu_tanh(g)) * u
    assert_check_discriminates(p, ideal, (len(rows) // 2, p.cols[2]))


@pytest.mark.parametrize("H,KV,D,rot,ctx,extra", [(8, 2, 64, 64, 200, {}), (8, 1, 128, 32, 70, {}),
                                                 (8, 2, 64, 64, 200, dict(v_norm=True, qk_freq_factors=True)),
                                                 (8, 1, 128, 32, 70, dict(qk_freq_factors=True))])
def test_attention_with_the_qk_prologue(H, KV, D, rot, ctx, extra):
    """With ``qk_rot`` the problem's reference is attention after the Q/K prologue: by hand here (per-head RMSNorm
    with weights, NEOX RoPE of the first ``rot`` dims at float64 theta (divided per pair by the problem's divisors
    with ``qk_freq_factors``), this token's K/V row in the cache as f16, V RMS-normed without a weight with
    ``v_norm``); the check rejects an output that skipped the prologue."""
    from sparkinfer_cute.autotune.ops.attention import EPS, ROPE_BASE

    s = dict(n_head=H, n_kv_head=KV, head_dim=D, qk_rot=rot, ctx=ctx, **extra)
    p = AttentionProblem(s, 2, np.random.default_rng(5))
    pos = ctx - 1
    assert (p.freq_factors is not None) == bool(extra.get("qk_freq_factors")) and p.v_norm == bool(extra.get("v_norm"))
    ff = np.ones(rot // 2) if p.freq_factors is None else p.freq_factors.astype(np.float64)

    def norm_rope(x, w):
        x = x.astype(np.float64)
        x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w.astype(np.float64)
        th = pos * ROPE_BASE ** (-2.0 * np.arange(rot // 2) / rot) / ff
        a, b = x[..., : rot // 2].copy(), x[..., rot // 2: rot].copy()
        x[..., : rot // 2], x[..., rot // 2: rot] = a * np.cos(th) - b * np.sin(th), a * np.sin(th) + b * np.cos(th)
        return x

    q = norm_rope(p.q[0], p.q_norm)
    k_row = norm_rope(p.k_new[0], p.k_norm).astype(np.float16)
    v_new = p.v_new[0].astype(np.float64)
    if p.v_norm:
        v_new = v_new / np.sqrt(np.mean(v_new * v_new, -1, keepdims=True) + EPS)
    ideal, skipped = np.empty((1, H, D)), np.empty((1, H, D))
    for h in range(H):
        kv = h // (H // KV)
        ks = np.stack([p.k_pool[p.tables[0][0, t // PAGE_SIZE], t % PAGE_SIZE, kv] for t in range(ctx)])
        vs = np.stack([p.v_pool[p.tables[0][0, t // PAGE_SIZE], t % PAGE_SIZE, kv] for t in range(ctx)])
        for out, qh, k_last, v_last in ((ideal, q[h], k_row[kv], v_new[kv].astype(np.float16)),
                                        (skipped, p.q[0, h].astype(np.float64), ks[-1], vs[-1])):
            kk, vv = ks.astype(np.float64), vs.astype(np.float64)
            kk[-1], vv[-1] = k_last, v_last
            s_ = (kk @ qh) * p.scale
            w = np.exp(s_ - s_.max())
            out[0, h] = (w / w.sum()) @ vv
    assert p.check(ideal.astype(np.float32)) is None
    assert p.check(skipped.astype(np.float32)) is not None
