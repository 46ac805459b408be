"""Decode GEMV over raw GGUF weights (dense and expert-indexed) vs a float64 numpy reference.

Tolerance: the rigorous elementwise bound of ``gemv_error_bound`` ((n_in + 8) * 2^-24 * sum_i A_oi |x_i|, A = |W|
up to the K-quant min term, derived in gemv.py's docstring: <= 2 roundings per decoded weight, n_in in the f32 sum), and, on top, the spec's
1e-3 relative error (max|y - ref| / max|ref|), which the bound implies for these sizes (n_in <= 4096: 2.4e-4
relative to sum|W x|, which is within a small factor of max|ref| for random data).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels import arch
from sparkinfer_cute.reference.kernel_refs import random_quant_bytes
from sparkinfer_cute.kernels.gemv import compile_gemv, gemv, gemv_experts, registered_configs
from sparkinfer_cute.reference.kernel_refs import dequant_rows_f64, gemv_error_bound, gemv_experts_ref, gemv_ref
from sparkinfer_cute.kernels.quant_decode import QTYPES, spec


def rand_weight(q, n_rows, n_in, rng):
    sp = spec(q)
    return random_quant_bytes(q, n_rows * n_in // sp.block_elems, rng).reshape(n_rows, sp.row_bytes(n_in))


def test_reference_matches_plain_float64_matmul():
    """The reference path (gguf dequant + f64 matmul) against an explicit loop on one Q8_0 row (d * int8)."""
    rng = np.random.default_rng()
    w = rand_weight("Q8_0", 3, 64, rng)
    x = rng.standard_normal(64)
    y = gemv_ref(w, "Q8_0", x)
    for o in range(3):
        blocks = w[o].reshape(2, 34)
        vals = np.concatenate([np.float64(b[:2].view(np.float16)[0]) * b[2:].view(np.int8) for b in blocks])
        assert abs(y[o] - vals @ x) <= 1e-12 * max(1.0, np.abs(vals) @ np.abs(x))


def test_error_bound_is_positive_and_scales():
    rng = np.random.default_rng()
    w = rand_weight("Q4_K", 4, 512, rng)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    b = gemv_error_bound(w, "Q4_K", x)
    assert b.shape == (2, 4) and (b > 0).all()
    assert np.allclose(gemv_error_bound(w, "Q4_K", 2 * x), 2 * b)
    # the K-quant magnitude dominates |W| (it adds |d*sc*q| and |dmin*m| before they cancel), up to the float32
    # rounding of W itself: with random sign bits in d/dmin the two terms add, and fl32(p - r) may round up past
    # |p| + |r| by half an ulp (measured: 28 of 300 seeds exceed A, by at most 5.92e-8 relative < 2^-24)
    from sparkinfer_cute.reference.kernel_refs import weight_magnitude_f64
    A, W = weight_magnitude_f64(w, "Q4_K", 512), np.abs(dequant_rows_f64(w, "Q4_K", 512))
    assert (A * (1 + 2.0**-24) >= W).all()


@pytest.mark.parametrize("target", arch.SUPPORTED_TARGETS)
def test_registered_configs_compile(target):
    with arch.target(target):
        for cfg in registered_configs(q8=False):
            assert compile_gemv.uncached(**cfg) is not None, cfg


def _check(y, ref, bound):
    assert not np.isnan(y).any(), "unwritten outputs"
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]} > bound {bound[worst]} at {worst}"
    # the spec's 1e-3 relative error (implied by the bound unless every output is ~0 by cancellation, in which case
    # the bound above is the meaningful check)
    assert err.max() <= max(1e-3 * np.abs(ref).max(), bound.max())


@pytest.mark.gpu
@pytest.mark.parametrize("q", QTYPES)
@settings(max_examples=4, deadline=None)
@given(n_out=st.integers(1, 300), kblocks=st.integers(1, 12), rows=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_gemv_dense(q, n_out, kblocks, rows, seed):
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    sp = spec(q)
    n_in = kblocks * max(sp.block_elems, 64)
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    out = DeviceArray.empty((rows, n_out), np.float32)
    out.fill_bytes(0xFF)
    gemv(DeviceArray.from_numpy(w), q, DeviceArray.from_numpy(x), n_out=n_out, out=out)
    _check(out.to_numpy(), gemv_ref(w, q, x), gemv_error_bound(w, q, x))


@pytest.mark.gpu
@pytest.mark.parametrize("mapping", ["slice", "unit"])
@pytest.mark.parametrize("warps_per_row", [1, 2, 4])
@pytest.mark.parametrize("q,n_in,n_out", [("Q4_K", 2048, 4096), ("Q6_K", 2048, 512), ("Q4_K", 4096, 2048),
                                          ("Q5_0", 640, 1024), ("Q8_0", 640, 256), ("Q4_K", 2048, 13)])
def test_gemv_model_shapes(q, n_in, n_out, warps_per_row, mapping):
    rng = np.random.default_rng()
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    y = gemv(w, q, x, mapping=mapping, warps_per_row=warps_per_row)
    assert y.shape == (n_out,)
    _check(y, gemv_ref(w, q, x), gemv_error_bound(w, q, x))


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_in,n_out,per_slot", [("Q4_K", 2048, 768, False), ("Q6_K", 768, 2048, True),
                                                   ("Q4_K", 768, 2048, True), ("Q8_0", 256, 96, False)])
def test_gemv_experts(q, n_in, n_out, per_slot):
    rng = np.random.default_rng()
    n_expert, k = 16, 8
    w = rand_weight(q, n_expert * n_out, n_in, rng).reshape(n_expert, n_out, -1)
    ids = rng.choice(n_expert, size=k, replace=False).astype(np.int32)
    ids[-1] = ids[0] if k > 1 else ids[-1]  # a repeated expert must work too
    x = rng.standard_normal((k if per_slot else 1, n_in)).astype(np.float32)
    y = gemv_experts(w, q, x, ids, n_out=n_out, n_in=n_in, x_per_slot=per_slot)
    assert y.shape == (k, n_out)
    ref = gemv_experts_ref(w, q, x, ids, n_out, per_slot)
    _check(y, ref, gemv_error_bound(w, q, x, ids=ids, n_out=n_out, x_per_slot=per_slot))


# ---------------------------------------------------------------------------------------------------------------
# int8 activation path: q8_1 quantization + dp4a GEMV

from sparkinfer_cute.kernels.gemv import gemv_q8, gemv_q8_experts
from sparkinfer_cute.kernels.quant_decode import INT_QTYPES
from sparkinfer_cute.reference.kernel_refs import gemv_q8_error_bound
from sparkinfer_cute.kernels.q8_1 import compile_quantize_q8_1, quantize_q8_1
from sparkinfer_cute.reference.kernel_refs import dequantize_q8_1, quantize_q8_1_ref


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), nb=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), zero_block=st.booleans())
def test_q8_1_reference_error_bound(rows, nb, seed, zero_block):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, nb * 32)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    if zero_block:
        x[0, :32] = 0
    q, d, s = quantize_q8_1_ref(x)
    assert q.dtype == np.int8 and (np.abs(q.astype(np.int32)) <= 127).all()
    err = np.abs(x - dequantize_q8_1(q, d))
    half = np.repeat(d.astype(np.float64), 32, axis=-1) * (0.5 + 128 * 2.0**-24)
    assert (err <= half).all()
    if zero_block:
        assert d[0, 0] == 0 and not q[0, :32].any() and s[0, 0] == 0
    np.testing.assert_allclose(s, d * q.reshape(rows, nb, 32).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("target", arch.SUPPORTED_TARGETS)
def test_q8_registered_configs_compile(target):
    with arch.target(target):
        for n in (640, 2048):
            assert compile_quantize_q8_1.uncached(n) is not None
        for cfg in registered_configs(q8=True):
            assert compile_gemv.uncached(**cfg) is not None, cfg


@pytest.mark.gpu
@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 8), nb=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_quantize_q8_1_matches_reference(rows, nb, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, nb * 32)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    q, d, s = quantize_q8_1(x)
    rq, rd, rs = quantize_q8_1_ref(x)
    # same f32 operations (div.rn, round-to-nearest-even, exact integer sums): identical results
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(s, rs)


@pytest.mark.gpu
@pytest.mark.parametrize("mapping", ["slice", "unit"])
@pytest.mark.parametrize("q", INT_QTYPES)
@settings(max_examples=3, deadline=None)
@given(n_out=st.integers(1, 200), kblocks=st.integers(1, 8), rows=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_gemv_q8_dense(mapping, q, n_out, kblocks, rows, seed):
    rng = np.random.default_rng(seed)
    n_in = kblocks * max(spec(q).block_elems, 64)
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    y = gemv_q8(w, q, x, mapping=mapping)
    assert y.shape == (rows, n_out) and not np.isnan(y).any()
    # 1) against the exact GEMV of the quantized activations (checks the integer logic tightly)
    xq, xd, _ = quantize_q8_1_ref(x)
    xhat = dequantize_q8_1(xq, xd)
    _check(y, gemv_ref(w, q, xhat), gemv_error_bound(w, q, xhat))
    # 2) against the float64 GEMV of x, within the q8_1 quantization bound
    err = np.abs(y - gemv_ref(w, q, x))
    assert (err <= gemv_q8_error_bound(w, q, x)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_in,n_out,per_slot", [("Q4_K", 2048, 768, False), ("Q6_K", 768, 2048, True),
                                                   ("Q5_0", 384, 384, False), ("Q8_0", 384, 384, True)])
def test_gemv_q8_experts(q, n_in, n_out, per_slot):
    rng = np.random.default_rng()
    E, k = 16, 8
    w = rand_weight(q, E * n_out, n_in, rng).reshape(E, n_out, -1)
    ids = rng.integers(0, E, size=k).astype(np.int32)
    x = rng.standard_normal((k if per_slot else 1, n_in)).astype(np.float32)
    y = gemv_q8_experts(w, q, x, ids, n_out, x_per_slot=per_slot)
    assert y.shape == (k, n_out)
    err = np.abs(y - gemv_experts_ref(w, q, x, ids, n_out, per_slot))
    assert (err <= gemv_q8_error_bound(w, q, x, ids=ids, n_out=n_out, x_per_slot=per_slot)).all()


@pytest.mark.gpu
def test_gemv_q8_device_arrays_real_shape():
    """Device-resident path (Q8Act reused across two GEMVs, as the model does once per norm)."""
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng()
    x = rng.standard_normal(2048).astype(np.float32)
    xq = quantize_q8_1(DeviceArray.from_numpy(x[None]))
    for q, n_out in (("Q4_K", 4096), ("Q6_K", 512)):
        w = rand_weight(q, n_out, 2048, rng)
        out = DeviceArray.empty((n_out,), np.float32)
        out.fill_bytes(0xFF)
        gemv_q8(DeviceArray.from_numpy(w), q, xq, n_out=n_out, out=out)
        y = out.to_numpy()
        assert (np.abs(y - gemv_ref(w, q, x)) <= gemv_q8_error_bound(w, q, x[None])[0]).all()


def test_expert_reference_matches_full_dequant():
    """The per-expert reference (dequantizes only the selected experts) equals a full-tensor dequant + matmul."""
    rng = np.random.default_rng()
    E, n_out, n_in = 5, 7, 512
    w = rand_weight("Q6_K", E * n_out, n_in, rng).reshape(E, n_out, -1)
    ids = np.array([4, 0, 4], np.int32)
    x = rng.standard_normal((3, n_in))
    W = dequant_rows_f64(w, "Q6_K", n_in).reshape(E, n_out, n_in)
    full = np.stack([W[e] @ x[j] for j, e in enumerate(ids)])
    np.testing.assert_array_equal(gemv_experts_ref(w, "Q6_K", x, ids, n_out, x_per_slot=True), full)
    b = gemv_error_bound(w, "Q6_K", x, ids=ids, n_out=n_out, x_per_slot=True)
    np.testing.assert_allclose(b, (n_in + 8) * 2.0**-24 * np.stack([np.abs(W[e]) @ np.abs(x[j]) for j, e in enumerate(ids)]))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("warps_per_row", [1, 2, 4])
def test_gemv_accumulate_into_residual(path, warps_per_row):
    """out += W x in place (the output projection's residual add)."""
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng()
    n_in, n_out = 4096, 2048
    w = rand_weight("Q4_K", n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    resid = rng.standard_normal(n_out).astype(np.float32)
    out = DeviceArray.from_numpy(resid)
    if path == "float":
        gemv(DeviceArray.from_numpy(w), "Q4_K", DeviceArray.from_numpy(x), n_out=n_out, out=out,
             warps_per_row=warps_per_row, accumulate=True)
        bound = gemv_error_bound(w, "Q4_K", x)
    else:
        if warps_per_row != 1:
            pytest.skip("gemv_q8 runs one warp per row (the dp4a configs are gated that way)")
        gemv_q8(DeviceArray.from_numpy(w), "Q4_K", DeviceArray.from_numpy(x[None]), n_out=n_out, out=out,
                accumulate=True)
        bound = gemv_q8_error_bound(w, "Q4_K", x[None])[0]
    y = out.to_numpy().astype(np.float64)
    ref = resid + gemv_ref(w, "Q4_K", x)
    assert (np.abs(y - ref) <= bound + 2.0**-24 * np.abs(ref)).all()


# ---------------------------------------------------------------------------------------------------------------
# chunk mapping (GemvChunk: wide per-lane steps, all weight loads first; float and dp4a)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q,n_in,n_out", [("Q4_K", 2048, 4096), ("Q4_K", 4096, 2048), ("Q6_K", 2048, 4352),
                                          ("Q6_K", 2048, 513), ("Q6_K_P", 1024, 77), ("Q4_K", 1024, 2113),
                                          ("Q4_K", 3072, 30)])
def test_gemv_chunk(path, q, n_in, n_out):
    from sparkinfer_cute.kernels.gemv import resolve_mapping
    from sparkinfer_cute.kernels.gemv_chunk import chunk_ok
    from sparkinfer_cute.runtime import DeviceArray

    assert chunk_ok(q, n_in) and resolve_mapping("auto", q, n_in, 1) == "chunk"
    rng = np.random.default_rng()
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = DeviceArray.empty((n_out,), np.float32)
    out.fill_bytes(0xFF)
    if path == "float":
        gemv(DeviceArray.from_numpy(w), q, DeviceArray.from_numpy(x), n_out=n_out, out=out, mapping="chunk")
        _check(out.to_numpy(), gemv_ref(w, q, x), gemv_error_bound(w, q, x))
    else:
        gemv_q8(DeviceArray.from_numpy(w), q, DeviceArray.from_numpy(x[None]), n_out=n_out, out=out, mapping="chunk")
        y = out.to_numpy()
        assert not np.isnan(y).any()
        xq, xd, _ = quantize_q8_1_ref(x[None])
        xhat = dequantize_q8_1(xq, xd)[0]
        _check(y, gemv_ref(w, q, xhat), gemv_error_bound(w, q, xhat))
        assert (np.abs(y - gemv_ref(w, q, x)) <= gemv_q8_error_bound(w, q, x[None])[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("mats", [(("Q4_K", 4096), ("Q4_K", 512), ("Q6_K_P", 512)),
                                  (("Q4_K", 2048), ("Q6_K", 333)), (("Q6_K", 1000),)])
def test_gemv_multi(path, mats):
    """q/k/v in one launch: every output equals its own GEMV reference (bounds as for gemv / gemv_q8)."""
    from sparkinfer_cute.kernels.gemv import gemv_multi
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng()
    n_in = 2048
    ws = [rand_weight(q, n, n_in, rng) for q, n in mats]
    x = rng.standard_normal(n_in).astype(np.float32)
    ys = [DeviceArray.empty((n,), np.float32) for _, n in mats]
    for y in ys:
        y.fill_bytes(0xFF)
    dx = DeviceArray.from_numpy(x[None])
    xin = dx if path == "float" else quantize_q8_1(dx)
    gemv_multi([(DeviceArray.from_numpy(w), q, y) for w, (q, _), y in zip(ws, mats, ys)], xin)
    for w, (q, _), y in zip(ws, mats, ys):
        yn = y.to_numpy()
        assert not np.isnan(yn).any()
        if path == "float":
            _check(yn, gemv_ref(w, q, x), gemv_error_bound(w, q, x))
        else:
            assert (np.abs(yn - gemv_ref(w, q, x)) <= gemv_q8_error_bound(w, q, x[None])[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("N", [2048, 640, 256])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_q8_1_fused(N, residual):
    """h matches rmsnorm(_residual)_ref; the q8_1 part equals quantize_q8_1_ref of the kernel's own h bit for bit;
    the residual sum equals the f32 x + r (rmsnorm.py semantics)."""
    from sparkinfer_cute.kernels.q8_1 import rmsnorm_q8_1
    from sparkinfer_cute.reference.kernel_refs import rmsnorm_ref, rmsnorm_residual_ref

    rng = np.random.default_rng()
    rows = 2
    x = rng.standard_normal((rows, N)).astype(np.float32) * 3
    w = rng.standard_normal(N).astype(np.float32)
    if residual:
        r = rng.standard_normal((rows, N)).astype(np.float32)
        h, s, (qs, d, sq) = rmsnorm_q8_1(x, w, 1e-6, residual=r)
        ref, sref = rmsnorm_residual_ref(x, r, w, 1e-6)
        np.testing.assert_array_equal(s, sref.astype(np.float32))
    else:
        h, (qs, d, sq) = rmsnorm_q8_1(x, w, 1e-6)
        ref = rmsnorm_ref(x, w, 1e-6)
    # f32 norm: a sum of N squares and a few roundings, far under 1e-5 relative
    assert np.abs(h - ref).max() <= 1e-5 * np.abs(ref).max()
    rq, rd, rs = quantize_q8_1_ref(h)
    np.testing.assert_array_equal(qs, rq)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(sq, rs)
