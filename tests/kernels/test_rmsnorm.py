"""RMSNorm kernel vs a float64 numpy reference (plain, fused residual, weightless, per-head)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.rmsnorm import RMSNorm, rmsnorm, rmsnorm_per_head, rmsnorm_residual
from sparkinfer_cute.reference.kernel_refs import RMSNORM_TOL, check_rmsnorm, rmsnorm_ref
from sparkinfer_cute.runtime.testing import assert_all_written, poisoned

# Tolerance (reference/kernel_refs.py RMSNORM_TOL = 1e-5, relative to max|ref|, applied by check_rmsnorm): the
# kernel squares and sums in f32 (per-thread sequential sum of <= 16 terms, then a shuffle tree and a fixed-order
# sum of <= 8 warp partials), so the mean of squares carries a relative error <= (16 + 5 + 8) * 2^-24 ~ 1.7e-6;
# rsqrt.approx adds <= 2^-22.9 ~ 1.3e-7; the two f32 multiplies (x*rstd)*w add 2 * 2^-24. Total < 2.5e-6; 1e-5
# leaves 4x margin while still catching any real bug (wrong eps, N, or element; a 1% scale error is 1000x over,
# tests/mutation/).
assert RMSNORM_TOL == 1e-5


def test_layout_choices_cover_every_vector():
    for N in [4, 64, 128, 256, 384, 512, 640, 2048, 2816, 4096, 8192, 12]:
        k = RMSNorm(N)
        assert k.tpr * k.vpt >= N // 4 > k.tpr * (k.vpt - 1)  # every vector owned, no thread idle for a whole k
        assert k.threads <= 256 and k.tpr % 32 == 0 and k.vpt <= 4 or N > 4096


def _inputs(rng, M, N, scale):
    x = (rng.standard_normal((M, N)) * scale).astype(np.float32)
    w = (1.0 + 0.5 * rng.standard_normal(N)).astype(np.float32)
    return x, w


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 1200).map(lambda n: 4 * n), M=st.integers(1, 19), has_w=st.booleans(),
       log_scale=st.floats(-3, 3), eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 2**32 - 1))
def test_rmsnorm(N, M, has_w, log_scale, eps, seed):
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    x, w = _inputs(rng, M, N, 10.0 ** log_scale)
    w = w if has_w else None
    big = poisoned((M + 3, N), np.float32)  # rows past M must stay untouched
    out = big[:M]
    rmsnorm(DeviceArray.from_numpy(x), None if w is None else DeviceArray.from_numpy(w), eps, out=out)
    y = out.to_numpy()
    assert_all_written(y)
    assert np.isnan(big.to_numpy()[M:]).all(), "kernel wrote past the last row"
    check_rmsnorm(y, x, w, eps)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [2048, 640, 2816, 256, 384, 512])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_rmsnorm_residual_in_place(N, M, rng):
    from sparkinfer_cute.runtime import DeviceArray

    x, w = _inputs(rng, M, N, 1.0)
    r = (rng.standard_normal((M, N)) * 3).astype(np.float32)
    rd = DeviceArray.from_numpy(r)
    out = poisoned((M, N), np.float32)
    o, s = rmsnorm_residual(DeviceArray.from_numpy(x), rd, DeviceArray.from_numpy(w), 1e-6, out=out)
    assert s is rd and o is out
    y, s_new = o.to_numpy(), rd.to_numpy()
    assert_all_written(y)
    check_rmsnorm(y, x, w, 1e-6, residual=r, s=s_new)  # s: the f32 add, bit for bit (exact to round)


@pytest.mark.gpu
def test_rmsnorm_residual_separate_output_and_numpy_path(rng):
    x, w = _inputs(rng, 2, 640, 1.0)
    r = rng.standard_normal((2, 640)).astype(np.float32)
    y, s = rmsnorm_residual(x, r, w, out=poisoned((2, 640)), residual_out=poisoned((2, 640)))
    assert isinstance(y, np.ndarray)
    assert_all_written(s, "residual sum")
    check_rmsnorm(y, x, w, residual=r, s=s)


@pytest.mark.gpu
@pytest.mark.parametrize("n_heads,head_dim,has_w", [(32, 128, True), (4, 128, True), (4, 256, True), (1, 256, True),
                                                    (16, 256, False), (2, 512, False), (16, 512, True), (8, 64, True)])
def test_rmsnorm_per_head_in_place(n_heads, head_dim, has_w, rng):
    from sparkinfer_cute.reference.kernel_refs import check_rel
    from sparkinfer_cute.runtime import DeviceArray

    q = (rng.standard_normal((n_heads, head_dim)) * 4).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(head_dim)).astype(np.float32) if has_w else None
    qd = DeviceArray.from_numpy(q)
    rmsnorm_per_head(qd, None if w is None else DeviceArray.from_numpy(w), 1e-6, out=qd)
    y = qd.to_numpy()
    ref = np.stack([rmsnorm_ref(q[h], w, 1e-6) for h in range(n_heads)])  # head by head, independently
    check_rel(y, ref, RMSNORM_TOL, "per-head RMSNorm")


@pytest.mark.gpu
def test_rmsnorm_numpy_in_numpy_out_three_lines(rng):
    x = rng.standard_normal((1, 2048)).astype(np.float32)
    w = rng.standard_normal(2048).astype(np.float32)
    y = rmsnorm(x, w, out=poisoned((1, 2048)))
    assert isinstance(y, np.ndarray)
    check_rmsnorm(y, x, w)
