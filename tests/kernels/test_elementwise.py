"""kernels/elementwise.py vs float64: the scaled residual add (2 f32 roundings: <= 2 ulp of the result) and the
softcap (tanh in f32, ~2 ulp; relative bound 8 * 2^-24 of the cap)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

U = 2.0**-24


@pytest.mark.gpu
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000).map(lambda v: 4 * v))
def test_residual_scale_and_softcap(seed, n):
    from sparkinfer_cute.kernels.elementwise import residual_scale, softcap
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * 10
    f = rng.standard_normal(n).astype(np.float32)
    s = np.array([rng.uniform(0.1, 3)], np.float32)
    dx = DeviceArray.from_numpy(x)
    residual_scale(dx, DeviceArray.from_numpy(f), DeviceArray.from_numpy(s))
    ref = (x.astype(np.float64) + f) * s[0]
    assert (np.abs(dx.to_numpy() - ref) <= 2 * U * (np.abs(x) + np.abs(f)) * s[0] + 1e-30).all()
    y = rng.standard_normal(n).astype(np.float32) * 80
    dy = DeviceArray.from_numpy(y)
    softcap(dy, 30.0)
    ref = 30.0 * np.tanh(y.astype(np.float64) / 30.0)
    assert (np.abs(dy.to_numpy() - ref) <= 8 * U * 30.0).all()


@pytest.mark.gpu
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 8))
def test_gather_scale(seed, k):
    """One f32 product per slot: exact to 1 ulp."""
    from sparkinfer_cute.kernels.elementwise import gather_scale
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    w = rng.random(k).astype(np.float32)
    ids = rng.choice(128, k, replace=False).astype(np.int32)
    s = rng.uniform(0.1, 4, 128).astype(np.float32)
    dw = DeviceArray.from_numpy(w)
    gather_scale(dw, DeviceArray.from_numpy(ids), DeviceArray.from_numpy(s))
    np.testing.assert_array_equal(dw.to_numpy(), (w * s[ids]).astype(np.float32))
