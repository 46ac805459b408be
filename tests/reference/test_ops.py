"""ops.py against independent float64 references written as plain loops / closed forms (fresh random inputs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.reference import ops


def _rng(seed):
    return np.random.default_rng(seed)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), eps=st.sampled_from([1e-6, 1e-5]))
def test_rmsnorm_matches_float64_formula(seed, n, eps):
    r = _rng(seed)
    x = (r.standard_normal((3, n)) * r.uniform(0.01, 100)).astype(np.float32)
    w = r.uniform(0.5, 1.5, n).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * w
    got = ops.rmsnorm(x, w, eps)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ops.rmsnorm(x64, w.astype(np.float64), eps), want, rtol=1e-13)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    head_dim=st.sampled_from([64, 128, 256]),
    partial=st.booleans(),
    base=st.sampled_from([1e4, 1e6]),
    freq=st.booleans(),
)
def test_rope_neox_matches_pairwise_loop(seed, head_dim, partial, base, freq):
    """A per-element loop of the NEOX rotation with theta = pos * base^(-2i/n_rot) / ff in float64."""
    r = _rng(seed)
    n_rot = head_dim // 2 if partial else head_dim
    pos = r.integers(0, 4096, 5)
    x = r.standard_normal((5, 3, head_dim))
    ff = r.uniform(1, 8, n_rot // 2) if freq else None
    got = ops.rope_neox(x, pos, n_rot, base, ff)
    want = x.copy()
    for t in range(5):
        for i in range(n_rot // 2):
            th = pos[t] * base ** (-2.0 * i / n_rot) / (ff[i] if freq else 1.0)
            a, b = x[t, :, i], x[t, :, i + n_rot // 2]
            want[t, :, i] = a * math.cos(th) - b * math.sin(th)
            want[t, :, i + n_rot // 2] = a * math.sin(th) + b * math.cos(th)
    # llama.cpp builds theta by repeated float32 multiplication; at pos ~4000 that drifts by ~1e-3 rad at worst.
    np.testing.assert_allclose(got, want, atol=5e-3)
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])  # pass-through dims untouched
    # norms of each rotated pair are preserved exactly-ish
    h = n_rot // 2
    np.testing.assert_allclose(
        got[..., :h] ** 2 + got[..., h:n_rot] ** 2, x[..., :h] ** 2 + x[..., h:n_rot] ** 2, rtol=1e-6
    )


def test_rope_theta_is_float32_recurrence():
    """theta_i = float32 product chain (ggml_rope_cache_init), not the exact power: check one value by hand."""
    pos, n_rot, base = 3000, 128, 1e6
    cos, sin = ops.rope_cos_sin(np.array([pos]), n_rot, base, dtype=np.float64)
    ts = np.float32(np.power(np.float32(base), np.float32(-2.0 / n_rot)))
    t = np.float32(pos)
    for _ in range(40):
        t = np.float32(t * ts)
    assert cos[0, 40] == pytest.approx(math.cos(float(t)), abs=1e-12)
    assert sin[0, 40] == pytest.approx(math.sin(float(t)), abs=1e-12)


def _naive_attention(q, k, v, q_pos, k_pos, scale, window, softcap):
    n_q, H, _ = q.shape
    n_k, Hkv, _ = k.shape
    out = np.zeros((n_q, H, v.shape[-1]))
    for t in range(n_q):
        for h in range(H):
            kh = h // (H // Hkv)
            s = np.array([scale * q[t, h] @ k[j, kh] for j in range(n_k)])
            if softcap:
                s = softcap * np.tanh(s / softcap)
            vis = [
                (k_pos[j] <= q_pos[t]) and (window is None or q_pos[t] - k_pos[j] < window)
                for j in range(n_k)
            ]
            s = np.where(vis, s, -np.inf)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = p @ v[:, kh]
    return out


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_kv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 4]),
    n_q=st.integers(1, 9),
    past=st.integers(0, 12),
    window=st.sampled_from([None, 1, 3, 8]),
    softcap=st.sampled_from([None, 20.0]),
)
def test_attention_matches_naive_loops(seed, n_kv, group, n_q, past, window, softcap):
    r = _rng(seed)
    d = 16
    H = n_kv * group
    n_k = past + n_q
    q = r.standard_normal((n_q, H, d))
    k = r.standard_normal((n_k, n_kv, d))
    v = r.standard_normal((n_k, n_kv, d))
    q_pos = np.arange(past, past + n_q)
    k_pos = np.arange(n_k)
    scale = 1 / math.sqrt(d)
    got = ops.attention(q, k, v, q_pos, k_pos, scale=scale, window=window, softcap=softcap)
    want = _naive_attention(q, k, v, q_pos, k_pos, scale, window, softcap)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_window_mask_boundary():
    """window 4: query 10 sees keys 7..10 (p1 - p0 < 4), not 6."""
    m = ops.causal_window_mask(np.array([10]), np.arange(12), window=4)
    assert m[0].tolist() == [False] * 7 + [True] * 4 + [False]


def test_gqa_head_mapping_is_floor_division():
    """With 4 query heads on 2 KV heads, heads 0,1 read KV head 0 and heads 2,3 KV head 1 (not 0,2 / 1,3)."""
    d = 4
    q = np.zeros((1, 4, d))
    k = np.zeros((1, 2, d))
    v = np.stack([np.full(d, 1.0), np.full(d, 2.0)])[None]
    o = ops.attention(q, k, v, np.array([0]))
    assert o[0, :, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gelu_silu_softmax(seed):
    r = _rng(seed)
    x = r.standard_normal(257) * 4
    want_gelu = np.array(
        [0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))) for t in x]
    )
    np.testing.assert_allclose(ops.gelu_tanh(x), want_gelu, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(ops.silu(x), [t / (1 + math.exp(-t)) for t in x], rtol=1e-12)
    p = ops.softmax(x)
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.log(p), ops.log_softmax(x), rtol=1e-10, atol=1e-12)
    tab = ops.gelu_tanh_fp16_table(x.astype(np.float32))
    np.testing.assert_allclose(tab, want_gelu, atol=2e-2, rtol=2e-3)  # fp16-table emulation: fp16-close


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8))
def test_topk_desc(seed, k):
    r = _rng(seed)
    x = r.standard_normal((5, 16))
    got = ops.topk_desc(x, k)
    for row, idx in zip(x, got):
        assert sorted(idx.tolist()) == sorted(np.argsort(row)[::-1][:k].tolist())
        assert np.all(np.diff(row[idx]) <= 0)  # largest first


def test_topk_ties_lower_index_first():
    assert ops.topk_desc(np.array([1.0, 3.0, 3.0, 0.0, 3.0]), 3).tolist() == [1, 2, 4]


def test_round_fp16():
    x = np.array([1.0 + 2**-12, 65504.0, 1e-8], dtype=np.float32)
    assert ops.round_fp16(x).tolist() == [1.0, 65504.0, float(np.float32(np.float16(1e-8)))]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_activation_quantizers_error_bounds(seed, scale):
    """Q8_0 / Q8_K activation rounding: values on a 127-step grid per block, error <= half a step (+ fp16 d)."""
    r = _rng(seed)
    x = (r.standard_normal((2, 512)) * scale).astype(np.float32)
    q0 = ops.quantize_activation_q8_0(x)
    step0 = np.abs(x.reshape(2, -1, 32)).max(-1, keepdims=True) / 127
    d_err = np.abs(
        step0.astype(np.float16).astype(np.float64) - step0
    )  # d is stored as fp16 (subnormal when tiny)
    assert np.all(np.abs(q0 - x).reshape(2, -1, 32) <= step0 * 0.5001 + 127 * d_err + 1e-12)
    qk = ops.quantize_activation_q8_K(x)
    stepk = np.abs(x.reshape(2, -1, 256)).max(-1, keepdims=True) / 127
    assert np.all(np.abs(qk - x).reshape(2, -1, 256) <= stepk * 0.5001)
    assert not np.array_equal(q0, x)  # it does round


def test_rope_linear_freq_scale(rng):
    """Linear scaling by factor 8 (freq_scale 1/8) rotates position p as the unscaled rope rotates p/8."""
    x = rng.standard_normal((1, 2, 64))
    a = ops.rope_neox(x, np.array([800]), 64, 1e6, freq_scale=0.125)
    b = ops.rope_neox(x, np.array([100]), 64, 1e6)
    np.testing.assert_allclose(a, b, atol=1e-4)
