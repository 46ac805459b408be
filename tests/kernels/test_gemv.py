"""Decode GEMV over raw GGUF weights (dense and expert-indexed) vs a float64 numpy reference.

Checks (functions of sparkinfer_cute/reference/kernel_refs.py, derivations there; tests/mutation/ runs the same
functions on broken-kernel emulations):

* f32 activations, ``check_gemv``: the rigorous elementwise bound of ``gemv_error_bound`` ((n_in + 8) * 2^-24 *
  sum_i A_oi |x_i|, A = |W| up to the K-quant min term: <= 2 roundings per decoded weight, n_in in the f32 sum),
  and, on top, the spec's 1e-3 relative error, which the bound implies for these sizes.
* int8 activations (dp4a), ``check_gemv_q8``: **tight**, the same f32-level bound around the float64 GEMV of the
  *same* q8_1-quantized activations (the integer dots are exact); **loose**, the q8_1 quantization bound around
  the GEMV of the f32 activations. The loose bound alone (18-55% of the median |y|) let a zeroed 32-element block
  and 1-in-64 dropped inputs through; the tight one rejects them (tests/mutation/, on an emulation of the
  kernel's arithmetic).

Every output is poisoned (0xFF = NaN) before launch, numpy-path calls included, and the checks reject a NaN.
Randomness: hypothesis-drawn seeds, or the ``rng`` fixture (its seed is printed on failure).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.gemv import gemv, gemv_experts
from sparkinfer_cute.kernels.quant_decode import QTYPES, spec
from sparkinfer_cute.reference.kernel_refs import (
    check_gemv,
    check_gemv_q8,
    dequant_rows_f64,
    gemv_error_bound,
    gemv_experts_ref,
    gemv_ref,
    random_quant_bytes,
)

SEEDS = st.integers(0, 2**32 - 1)


def rand_weight(q, n_rows, n_in, rng):
    sp = spec(q)
    return random_quant_bytes(q, n_rows * n_in // sp.block_elems, rng).reshape(n_rows, sp.row_bytes(n_in))


def _poisoned(shape):
    from sparkinfer_cute.runtime.testing import poisoned

    return poisoned(shape, np.float32)


def test_reference_matches_plain_float64_matmul(rng):
    """The reference path (gguf dequant + f64 matmul) against an explicit loop on one Q8_0 row (d * int8)."""
    w = rand_weight("Q8_0", 3, 64, rng)
    x = rng.standard_normal(64)
    y = gemv_ref(w, "Q8_0", x)
    for o in range(3):
        blocks = w[o].reshape(2, 34)
        vals = np.concatenate([np.float64(b[:2].view(np.float16)[0]) * b[2:].view(np.int8) for b in blocks])
        assert abs(y[o] - vals @ x) <= 1e-12 * max(1.0, np.abs(vals) @ np.abs(x))


def test_error_bound_is_positive_and_scales(rng):
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
    out = _poisoned((rows, n_out))
    gemv(DeviceArray.from_numpy(w), q, DeviceArray.from_numpy(x), n_out=n_out, out=out)
    check_gemv(out.to_numpy(), w, q, x)


@pytest.mark.gpu
@pytest.mark.parametrize("mapping", ["slice", "unit"])
@pytest.mark.parametrize("warps_per_row", [1, 2, 4])
@pytest.mark.parametrize("q,n_in,n_out", [("Q4_K", 2048, 4096), ("Q6_K", 2048, 512), ("Q4_K", 4096, 2048),
                                          ("Q5_0", 640, 1024), ("Q8_0", 640, 256), ("Q4_K", 2048, 13)])
def test_gemv_model_shapes(q, n_in, n_out, warps_per_row, mapping, rng):
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = _poisoned((n_out,))
    y = gemv(w, q, x, mapping=mapping, warps_per_row=warps_per_row, out=out)
    assert y.shape == (n_out,)
    check_gemv(y, w, q, x)


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_in,n_out,per_slot", [("Q4_K", 2048, 768, False), ("Q6_K", 768, 2048, True),
                                                   ("Q4_K", 768, 2048, True), ("Q8_0", 256, 96, False)])
def test_gemv_experts(q, n_in, n_out, per_slot, rng):
    n_expert, k = 16, 8
    w = rand_weight(q, n_expert * n_out, n_in, rng).reshape(n_expert, n_out, -1)
    ids = rng.choice(n_expert, size=k, replace=False).astype(np.int32)
    ids[-1] = ids[0] if k > 1 else ids[-1]  # a repeated expert must work too
    x = rng.standard_normal((k if per_slot else 1, n_in)).astype(np.float32)
    y = gemv_experts(w, q, x, ids, n_out=n_out, n_in=n_in, x_per_slot=per_slot, out=_poisoned((k, n_out)))
    assert y.shape == (k, n_out)
    check_gemv(y, w, q, x, ids=ids, n_out=n_out, x_per_slot=per_slot)


# ---------------------------------------------------------------------------------------------------------------
# int8 activation path: q8_1 quantization + dp4a GEMV

from sparkinfer_cute.kernels.gemv import gemv_q8, gemv_q8_experts  # noqa: E402
from sparkinfer_cute.kernels.q8_1 import quantize_q8_1  # noqa: E402
from sparkinfer_cute.kernels.quant_decode import INT_QTYPES  # noqa: E402
from sparkinfer_cute.reference.kernel_refs import dequantize_q8_1, quantize_q8_1_ref  # noqa: E402


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
    y = gemv_q8(w, q, x, mapping=mapping, out=_poisoned((rows, n_out)))
    assert y.shape == (rows, n_out)
    check_gemv_q8(y, w, q, x)  # tight (GEMV of q8_1(x)) and loose (GEMV of x, q8_1 bound)


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_in,n_out,per_slot", [("Q4_K", 2048, 768, False), ("Q6_K", 768, 2048, True),
                                                   ("Q5_0", 384, 384, False), ("Q8_0", 384, 384, True)])
def test_gemv_q8_experts(q, n_in, n_out, per_slot, rng):
    E, k = 16, 8
    w = rand_weight(q, E * n_out, n_in, rng).reshape(E, n_out, -1)
    ids = rng.integers(0, E, size=k).astype(np.int32)
    x = rng.standard_normal((k if per_slot else 1, n_in)).astype(np.float32)
    y = gemv_q8_experts(w, q, x, ids, n_out, x_per_slot=per_slot, out=_poisoned((k, n_out)))
    assert y.shape == (k, n_out)
    check_gemv_q8(y, w, q, x, ids=ids, n_out=n_out, x_per_slot=per_slot)


@pytest.mark.gpu
def test_gemv_q8_device_arrays_real_shape(rng):
    """Device-resident path (Q8Act reused across two GEMVs, as the model does once per norm)."""
    from sparkinfer_cute.runtime import DeviceArray

    x = rng.standard_normal(2048).astype(np.float32)
    xq = quantize_q8_1(DeviceArray.from_numpy(x[None]))
    for q, n_out in (("Q4_K", 4096), ("Q6_K", 512)):
        w = rand_weight(q, n_out, 2048, rng)
        out = _poisoned((n_out,))
        gemv_q8(DeviceArray.from_numpy(w), q, xq, n_out=n_out, out=out)
        check_gemv_q8(out.to_numpy(), w, q, x)


def test_expert_reference_matches_full_dequant(rng):
    """The per-expert reference (dequantizes only the selected experts) equals a full-tensor dequant + matmul."""
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
def test_gemv_accumulate_into_residual(path, warps_per_row, rng):
    """out += W x in place (the output projection's residual add)."""
    from sparkinfer_cute.runtime import DeviceArray

    n_in, n_out = 4096, 2048
    w = rand_weight("Q4_K", n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    resid = rng.standard_normal(n_out).astype(np.float32)
    out = DeviceArray.from_numpy(resid)
    if path == "float":
        gemv(DeviceArray.from_numpy(w), "Q4_K", DeviceArray.from_numpy(x), n_out=n_out, out=out,
             warps_per_row=warps_per_row, accumulate=True)
        check_gemv(out.to_numpy(), w, "Q4_K", x, resid=resid)
    else:
        if warps_per_row != 1:
            pytest.skip("gemv_q8 runs one warp per row (the dp4a configs are gated that way)")
        gemv_q8(DeviceArray.from_numpy(w), "Q4_K", DeviceArray.from_numpy(x[None]), n_out=n_out, out=out,
                accumulate=True)
        check_gemv_q8(out.to_numpy(), w, "Q4_K", x, resid=resid)


# ---------------------------------------------------------------------------------------------------------------
# chunk mapping (GemvChunk: wide per-lane steps, all weight loads first; float and dp4a)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q,n_in,n_out", [("Q4_K", 2048, 4096), ("Q4_K", 4096, 2048), ("Q6_K", 2048, 4352),
                                          ("Q6_K", 2048, 513), ("Q6_K_P", 1024, 77), ("Q4_K", 1024, 2113),
                                          ("Q4_K", 3072, 30)])
def test_gemv_chunk(path, q, n_in, n_out, rng):
    from sparkinfer_cute.kernels.gemv import resolve_mapping
    from sparkinfer_cute.kernels.gemv_chunk import chunk_ok
    from sparkinfer_cute.runtime import DeviceArray

    assert chunk_ok(q, n_in) and resolve_mapping("auto", q, n_in, 1) == "chunk"
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = _poisoned((n_out,))
    if path == "float":
        gemv(DeviceArray.from_numpy(w), q, DeviceArray.from_numpy(x), n_out=n_out, out=out, mapping="chunk")
        check_gemv(out.to_numpy(), w, q, x)
    else:
        gemv_q8(DeviceArray.from_numpy(w), q, DeviceArray.from_numpy(x[None]), n_out=n_out, out=out, mapping="chunk")
        check_gemv_q8(out.to_numpy(), w, q, x)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("mats", [(("Q4_K", 4096), ("Q4_K", 512), ("Q6_K_P", 512)),
                                  (("Q4_K", 2048), ("Q6_K", 333)), (("Q6_K", 1000),)])
def test_gemv_multi(path, mats, rng):
    """q/k/v in one launch: every output equals its own GEMV reference (checks as for gemv / gemv_q8)."""
    from sparkinfer_cute.kernels.gemv import gemv_multi
    from sparkinfer_cute.runtime import DeviceArray

    n_in = 2048
    ws = [rand_weight(q, n, n_in, rng) for q, n in mats]
    x = rng.standard_normal(n_in).astype(np.float32)
    ys = [_poisoned((n,)) for _, n in mats]
    dx = DeviceArray.from_numpy(x[None])
    xin = dx if path == "float" else quantize_q8_1(dx)
    gemv_multi([(DeviceArray.from_numpy(w), q, y) for w, (q, _), y in zip(ws, mats, ys)], xin)
    for w, (q, _), y in zip(ws, mats, ys):
        yn = y.to_numpy()
        if path == "float":
            check_gemv(yn, w, q, x)
        else:
            check_gemv_q8(yn, w, q, x)


@pytest.mark.gpu
@settings(max_examples=3, deadline=None)
@given(seed=SEEDS, warps_per_row=st.sampled_from([1, 2]))
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q1,n1,q2,n2,n_in", [("Q4_K", 6144, "Q6_K_P", 2048, 2816),  # Gemma 4 26B-A4B q|k + v
                                             ("Q5_0", 1280, "Q8_0", 256, 640),      # Gemma 3 270M
                                             ("Q4_K", 384, "Q6_K_P", 128, 256)])    # the synthetic tiny Gemma 4
def test_gemv_second_matrix(path, q1, n1, q2, n2, n_in, warps_per_row, seed):
    """Two matrices of different types in one slice launch (Gemv ``second``, models/ops.py gemv_qkv's
    fused_qkv_mixed): the first n1 outputs bit-identical to the slice GEMV of the first matrix alone, the next n2 to
    the slice GEMV of the second (same kernel code per row, same warps per row), and each within its reference's
    bound (checks as for gemv / gemv_q8). Output poisoned."""
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    w1, w2 = rand_weight(q1, n1, n_in, rng), rand_weight(q2, n2, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    dx = DeviceArray.from_numpy(x[None])
    xin = dx.view(np.float32, (n_in,)) if path == "float" else quantize_q8_1(dx)
    d1, d2 = DeviceArray.from_numpy(w1), DeviceArray.from_numpy(w2)
    wpr = warps_per_row if path == "float" else 1
    y = _poisoned((n1 + n2,))
    gemv(d1, q1, xin, n_out=n1, out=y, mapping="slice", warps_per_row=wpr, second=(d2, q2, n2))
    alone1 = gemv(d1, q1, xin, n_out=n1, mapping="slice", warps_per_row=wpr).to_numpy()
    alone2 = gemv(d2, q2, xin, n_out=n2, mapping="slice", warps_per_row=wpr).to_numpy()
    yn = y.to_numpy()
    np.testing.assert_array_equal(yn[:n1].view(np.uint32), alone1.reshape(-1).view(np.uint32))
    np.testing.assert_array_equal(yn[n1:].view(np.uint32), alone2.reshape(-1).view(np.uint32))
    check = check_gemv if path == "float" else check_gemv_q8
    check(yn[:n1], w1, q1, x)
    check(yn[n1:], w2, q2, x)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("knobs", [{"mapping": "chunk", "rows_per_warp": 4}, {"mapping": "chunk", "rows_per_warp": 1},
                                   {"mapping": "slice", "warps_per_row": 4}, {"mapping": "slice", "warps_per_row": 2}])
def test_gemv_tuned_launch_knobs(path, knobs, rng):
    """The wrapper arguments the autotuner's gemv / gemv_q8 configs set (models/ops.py passes a config as keyword
    arguments): chunk rows per warp (also explicitly 1 where the heuristic picks 2), slice warps per row."""
    from sparkinfer_cute.runtime import DeviceArray

    q, n_in, n_out = "Q4_K", 2048, 4096
    w = rand_weight(q, n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(np.float32)
    dx = DeviceArray.from_numpy(x[None] if path == "dp4a" else x)
    out = _poisoned((n_out,))
    gemv(DeviceArray.from_numpy(w), q, quantize_q8_1(dx) if path == "dp4a" else dx, n_out=n_out, out=out, **knobs)
    (check_gemv_q8 if path == "dp4a" else check_gemv)(out.to_numpy(), w, q, x)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("rows_per_warp", [(1, 1, 1), (4, 2, 2), (None, 4, None)])
def test_gemv_multi_tuned_rows_per_warp(path, rows_per_warp, rng):
    """The fused q/k/v launch with each matrix's tuned rows per warp (None: the heuristic's), Qwen3 shapes."""
    from sparkinfer_cute.kernels.gemv import gemv_multi
    from sparkinfer_cute.runtime import DeviceArray

    mats, n_in = (("Q4_K", 4096), ("Q4_K", 512), ("Q6_K_P", 512)), 2048
    ws = [rand_weight(q, n, n_in, rng) for q, n in mats]
    x = rng.standard_normal(n_in).astype(np.float32)
    ys = [_poisoned((n,)) for _, n in mats]
    dx = DeviceArray.from_numpy(x[None])
    gemv_multi([(DeviceArray.from_numpy(w), q, y) for w, (q, _), y in zip(ws, mats, ys)],
               dx if path == "float" else quantize_q8_1(dx), rows_per_warp=rows_per_warp)
    for w, (q, _), y in zip(ws, mats, ys):
        (check_gemv if path == "float" else check_gemv_q8)(y.to_numpy(), w, q, x)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [2048, 640, 256])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_q8_1_fused(N, residual, rng):
    """h matches rmsnorm(_residual)_ref; the q8_1 part equals quantize_q8_1_ref of the kernel's own h bit for bit;
    the residual sum equals the f32 x + r (rmsnorm.py semantics)."""
    from sparkinfer_cute.kernels.q8_1 import Q8Act, rmsnorm_q8_1
    from sparkinfer_cute.reference.kernel_refs import check_rmsnorm

    rows = 2
    x = rng.standard_normal((rows, N)).astype(np.float32) * 3
    w = rng.standard_normal(N).astype(np.float32)
    xq = Q8Act(rows, N)
    for a in (xq.qs, xq.d, xq.s):
        a.fill_bytes(0xFF)  # poison (qs: -1 is a valid quant, but the bit-exact comparison below catches it)
    if residual:
        r = rng.standard_normal((rows, N)).astype(np.float32)
        h, s, (qs, d, sq) = rmsnorm_q8_1(x, w, 1e-6, residual=r, out=_poisoned((rows, N)), xq=xq)
        check_rmsnorm(h, x, w, 1e-6, residual=r, s=s)
    else:
        h, (qs, d, sq) = rmsnorm_q8_1(x, w, 1e-6, out=_poisoned((rows, N)), xq=xq)
        check_rmsnorm(h, x, w, 1e-6)
    rq, rd, rs = quantize_q8_1_ref(h)
    np.testing.assert_array_equal(qs, rq)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(sq, rs)
