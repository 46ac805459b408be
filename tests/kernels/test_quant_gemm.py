"""Grouped/dense GEMM over GGUF weights with q8_1 activations (kernels/quant_gemm.py) vs float64 numpy.

Reference: the weights dequantized by ``gguf.quants`` (float64), times the *dequantized q8_1 activations* (d * q,
float64) the kernel consumes: the integer dots inside the kernel are exact, so the only differences are f32 roundings
of the per-group scale products and of the accumulation. Bound (module docstring of quant_gemm.py): each scale group
contributes ``(s_w d_x) C - m_w s_x`` with <= 3 roundings, summed over ``G`` groups in f32, so
``|y - ref| <= (2G + 8) 2^-24 sum_i A_i |x_i|`` with ``A_i`` the magnitude of the quantity the kernel multiplies
(``|d sc q_i| + |dmin m|`` for K-quants, ``|d| (q_i + z)`` for the unsigned legacy quants with zero point z, ``|w_i|``
otherwise) and ``x`` the dequantized activation. Outputs are poisoned (NaN) before every launch: every valid element
must be written and nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


U = 2.0**-24
QTYPES = ("Q4_K", "Q5_K", "Q6_K_P", "Q8_0", "Q5_0", "Q4_0")
# n_in per type drawn by the tests (a short list: every distinct value is a compile on the GPU host; 96 = 3 blocks of
# 32 exercises the partial last K-tile and 2-byte-aligned rows, 640 the 8-byte-misaligned rows of Gemma 3 270M)
N_IN = {"Q4_K": (256, 768), "Q5_K": (256, 768), "Q6_K_P": (256, 768), "Q8_0": (96, 640), "Q5_0": (96, 640),
        "Q4_0": (96, 640)}
N_FF = 256  # grouped test: expert width (gate/up n_out, down n_in)


def precompile_configs():
    """Every kernel config the GPU tests below launch (tools/precompile.py compiles them in parallel first)."""
    cfgs = []
    for q, ns in N_IN.items():
        for n in ns:
            cfgs += [dict(qtype=q, n_in=n, tile_tokens=64, accumulate=a) for a in (False, True)]
            cfgs += [dict(qtype=q, n_in=n, tile_tokens=32, gated=True, act=act, experts=True, gather=True)
                     for act in ("silu", "gelu_tanh")]
        cfgs.append(dict(qtype=q, n_in=N_FF, tile_tokens=32, experts=True))
    return cfgs


def _spec(q):
    from sparkinfer_cute.kernels.quant_decode import spec

    return spec(q)


def rand_weight(q, n_rows, n_in, rng):
    from sparkinfer_cute.reference.kernel_refs import random_quant_bytes

    sp = _spec(q)
    return random_quant_bytes(q, n_rows * n_in // sp.block_elems, rng).reshape(n_rows, sp.row_bytes(n_in))


def _unpad(raw, q):
    """Q6_K_P (212-byte blocks) -> the GGUF Q6_K bytes (210)."""
    if q != "Q6_K_P":
        return raw, q
    b = np.asarray(raw, np.uint8).reshape(-1, 212)[:, :210]
    return b.reshape(np.shape(raw)[0], -1), "Q6_K"


def dequant_f64(raw, q, n_in):
    import gguf

    r, qq = _unpad(raw, q)
    t = getattr(gguf.GGMLQuantizationType, qq)
    return gguf.quants.dequantize(np.ascontiguousarray(r), t).astype(np.float64).reshape(-1, n_in)


def magnitude_f64(raw, q, n_in):
    """A_i (module docstring): the magnitude of what the kernel multiplies per weight."""
    if q in ("Q4_K", "Q5_K"):
        b = np.array(raw, np.uint8).reshape(-1, _spec(q).block_bytes)
        no_min, no_scale = b.copy(), b.copy()
        no_min[:, 2:4] = 0
        no_scale[:, 0:2] = 0
        shape = np.shape(raw)
        return (np.abs(dequant_f64(no_min.reshape(shape), q, n_in))
                + np.abs(dequant_f64(no_scale.reshape(shape), q, n_in)))
    if q in ("Q4_0", "Q5_0"):
        z = 8 if q == "Q4_0" else 16
        w = dequant_f64(raw, q, n_in)
        bb = _spec(q).block_bytes
        d = np.asarray(raw, np.uint8).reshape(-1, bb)[:, :2].copy().view(np.float16).astype(np.float64)
        d = np.repeat(d.reshape(w.shape[0], -1), 32, axis=1)
        return np.abs(w + z * d) + z * np.abs(d)  # w = d (q - z): |d q| + z |d|
    return np.abs(dequant_f64(raw, q, n_in))


def q8_1_f32(x):
    """q8_1 of f32 rows (as kernels/q8_1.py: d = amax/127, q = rint(x/d), s = d * sum(q)): (qs, d, s)."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[..., None] > 0, np.rint(xb / d[..., None]), 0).astype(np.int8)
    s = (d * q.astype(np.float32).sum(-1)).astype(np.float32)
    return q.reshape(x.shape), d, s


def upload_q8(qs, d, s):
    from sparkinfer_cute.kernels.q8_1 import Q8Act

    a = Q8Act(qs.shape[0], qs.shape[1])
    a.qs.copy_from_numpy(qs)
    a.d.copy_from_numpy(d)
    a.s.copy_from_numpy(s)
    return a


def n_groups(q, n_in):
    return n_in // 16 if q == "Q6_K_P" else n_in // 32


def test_grouped_tiles_host():
    from sparkinfer_cute.reference.kernel_refs import grouped_tiles_host

    ids = np.array([[2, 0], [0, 3], [2, 1]], np.int32)
    tiles, tok, pos = grouped_tiles_host(ids, 5, 1)
    # sorted rows: expert 0: (t0,j1) (t1,j0); 1: (t2,j1); 2: (t0,j0) (t2,j0); 3: (t1,j1)
    np.testing.assert_array_equal(tok, [0, 1, 2, 0, 2, 1])
    np.testing.assert_array_equal(pos.reshape(3, 2), [[3, 0], [1, 5], [4, 2]])
    np.testing.assert_array_equal(tiles[:, :3], [[0, 0, 1], [0, 1, 1], [1, 2, 1], [2, 3, 1], [2, 4, 1], [3, 5, 1]])


def _check(y, ref, bound, what):
    assert np.isfinite(y).all(), f"{what}: unwritten or non-finite outputs"
    err = np.abs(y - ref)
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), (f"{what}: max excess {np.max(err - bound):.3e} at {np.unravel_index(worst, y.shape)}"
                                  f" (err {err.flat[worst]:.3e}, bound {bound.flat[worst]:.3e})")


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), q=st.sampled_from(QTYPES), which=st.integers(0, 1),
       out_tiles=st.integers(1, 3), rows=st.integers(1, 150), accumulate=st.booleans())
def test_dense(seed, q, which, out_tiles, rows, accumulate):
    from sparkinfer_cute.kernels.quant_gemm import quant_gemm
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    tile_tokens = 64
    n_in, n_out = N_IN[q][which], 64 * out_tiles
    w = rand_weight(q, n_out, n_in, rng)
    x = (rng.standard_normal((rows, n_in)) * rng.uniform(0.1, 10)).astype(np.float32)
    qs, d, s = q8_1_f32(x)
    xdeq = (qs.astype(np.float64).reshape(rows, -1, 32) * d[..., None]).reshape(rows, n_in)
    W = dequant_f64(w, q, n_in)
    ref = xdeq @ W.T
    bound = (2 * n_groups(q, n_in) + 8) * U * (np.abs(xdeq) @ magnitude_f64(w, q, n_in).T)
    y0 = None
    if accumulate:
        y0 = rng.standard_normal((rows, n_out)).astype(np.float32)
        out = DeviceArray.from_numpy(y0)
        ref = ref + y0
        bound = bound + U * np.abs(ref)
    else:
        out = poisoned((rows, n_out))
    quant_gemm(DeviceArray.from_numpy(w), q, upload_q8(qs, d, s), n_out, out=out, accumulate=accumulate,
               tile_tokens=tile_tokens)
    _check(out.to_numpy(), ref, bound, f"{q} {n_in}->{n_out} rows {rows}")


def _act(g, act):
    if act == "silu":
        return g / (1.0 + np.exp(-g))
    return 0.5 * g * (1.0 + np.tanh(0.7978845608028654 * g * (1.0 + 0.044715 * g * g)))


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), q=st.sampled_from(QTYPES), which=st.integers(0, 1), n_tok=st.integers(0, 90),
       n_expert=st.integers(1, 9), k=st.integers(1, 4), act=st.sampled_from(["silu", "gelu_tanh"]))
def test_grouped_gated_and_down(seed, q, which, n_tok, n_expert, k, act):
    """MoE gate+up (gathered token rows, gated epilogue) then down (sorted rows) over device-style tile tables with
    0-token experts, ragged and tile-multiple groups."""
    from sparkinfer_cute.kernels.quant_gemm import max_grouped_tiles, quant_gemm
    from sparkinfer_cute.reference.kernel_refs import grouped_tiles_host
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    tile_tokens = 32
    k = min(k, n_expert)
    n_in, n_ff = N_IN[q][which], N_FF
    wg, wu = rand_weight(q, n_expert * n_ff, n_in, rng), rand_weight(q, n_expert * n_ff, n_in, rng)
    ids = np.array([rng.choice(n_expert, k, replace=False) for _ in range(n_tok)], np.int64).reshape(n_tok, k)
    if n_tok and rng.random() < 0.5:  # crowd one expert past a tile boundary
        ids[: min(n_tok, 70), 0] = 0
    tiles, sorted_token, sorted_pos = grouped_tiles_host(ids, n_expert, tile_tokens)
    n_rows = n_tok * k
    x = (rng.standard_normal((max(n_tok, 1), n_in)) * 3).astype(np.float32)
    qs, d, s = q8_1_f32(x)
    xdeq = (qs.astype(np.float64).reshape(qs.shape[0], -1, 32) * d[..., None]).reshape(qs.shape[0], n_in)
    Wg, Wu = dequant_f64(wg, q, n_in), dequant_f64(wu, q, n_in)
    Ag, Au = magnitude_f64(wg, q, n_in), magnitude_f64(wu, q, n_in)
    dev_tiles = DeviceArray.from_numpy(np.concatenate([tiles, np.zeros((1, 4), np.int32)]))
    dev_nt = DeviceArray.from_numpy(np.array([len(tiles)], np.int32))
    dev_tok = DeviceArray.from_numpy(np.concatenate([sorted_token, np.zeros(1, np.int32)]))
    out = poisoned((max(n_rows, 1), n_ff))
    mt = max_grouped_tiles(n_rows, n_expert, tile_tokens)
    quant_gemm(DeviceArray.from_numpy(wg), q, upload_q8(qs, d, s), n_ff, out=out, w_up=DeviceArray.from_numpy(wu),
               act=act, tiles=dev_tiles, n_tiles=dev_nt, max_tiles=mt, row_index=dev_tok, tile_tokens=tile_tokens)
    y = out.to_numpy()[:n_rows]
    G = 2 * n_groups(q, n_in) + 8
    ref = np.empty((n_rows, n_ff))
    bound = np.empty((n_rows, n_ff))
    for r in range(n_rows):
        t = sorted_token[r]
        e = ids.reshape(-1)[np.flatnonzero(sorted_pos == r)[0]]
        rows = slice(e * n_ff, (e + 1) * n_ff)
        g, u = Wg[rows] @ xdeq[t], Wu[rows] @ xdeq[t]
        bg, bu = G * U * (Ag[rows] @ np.abs(xdeq[t])), G * U * (Au[rows] @ np.abs(xdeq[t]))
        ref[r] = _act(g, act) * u
        # |act'| <= 1.13 for silu and gelu_tanh; the f32 activation itself ~4 ulp
        bound[r] = 1.13 * bg * (np.abs(u) + bu) + np.abs(_act(g, act)) * bu + 8 * U * np.abs(ref[r]) + 1e-30
    _check(y, ref, bound, f"gate_up {q} {n_in}->{n_ff} tokens {n_tok} experts {n_expert} k {k}")

    # down: sorted rows in, sorted rows out (no gather), weights [n_expert, n_out, n_ff]
    n_out = 64
    wd = rand_weight(q, n_expert * n_out, n_ff, rng)
    a = np.where(np.isfinite(y), y, 0).astype(np.float32) if n_rows else np.zeros((1, n_ff), np.float32)
    aq, ad, as_ = q8_1_f32(a)
    adeq = (aq.astype(np.float64).reshape(aq.shape[0], -1, 32) * ad[..., None]).reshape(aq.shape[0], n_ff)
    Wd, Ad = dequant_f64(wd, q, n_ff), magnitude_f64(wd, q, n_ff)
    out2 = poisoned((max(n_rows, 1), n_out))
    quant_gemm(DeviceArray.from_numpy(wd), q, upload_q8(aq, ad, as_), n_out, out=out2, tiles=dev_tiles,
               n_tiles=dev_nt, max_tiles=mt, tile_tokens=tile_tokens)
    y2 = out2.to_numpy()[:n_rows]
    Gd = 2 * n_groups(q, n_ff) + 8
    e_of_row = np.empty(n_rows, np.int64)
    e_of_row[sorted_pos] = ids.reshape(-1)
    ref2 = np.stack([Wd[e * n_out:(e + 1) * n_out] @ adeq[r] for r, e in enumerate(e_of_row)]) if n_rows else y2
    bound2 = np.stack([Gd * U * (Ad[e * n_out:(e + 1) * n_out] @ np.abs(adeq[r])) for r, e in enumerate(e_of_row)]) \
        if n_rows else y2
    _check(y2, ref2, bound2, f"down {q} {n_ff}->{n_out}")


def test_weight_size_check_is_exact_dense_and_whole_matrices_grouped():
    """kernels/quant_decode.py ``check_weight_bytes``, which the GEMV and the grouped GEMM call before launching:
    a weight of the wrong size (e.g. an input wider than its rows) is refused, never walked past its end."""
    from types import SimpleNamespace as W

    from sparkinfer_cute.kernels.quant_decode import check_weight_bytes, spec

    rb = spec("Q4_K").row_bytes(512)
    check_weight_bytes(W(nbytes=64 * rb), "Q4_K", 64, 512)
    check_weight_bytes(W(nbytes=3 * 64 * rb), "Q4_K", 64, 512, groups_any=True)
    for nbytes, grouped in ((3 * 64 * rb, False), (64 * rb - 1, False), (0, True), (64 * rb + rb, True),
                            (64 * rb, False)):
        n_in = 1024 if nbytes == 64 * rb else 512  # the last: a 512-wide weight read as 1024-wide
        with pytest.raises(ValueError, match="weight has"):
            check_weight_bytes(W(nbytes=nbytes), "Q4_K", 64, n_in, groups_any=grouped)
