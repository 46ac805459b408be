"""MoE router kernel (softmax -> top-k -> renormalize) vs a float64 numpy reference with stable tie order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.router import NORM_TOPK_MIN, route, route_ref
from sparkinfer_cute.runtime.testing import assert_all_written, poisoned

# Weight tolerance (relative to max|ref|): exp is ex2.approx (<= 2 ulp) of an f32 argument (l - max)*log2(e)
# whose rounding costs |l - max| * 2^-24 relative (|l - max| <= ~60 here -> 3.6e-6); the f32 sum over <= 384
# terms (per-thread <= 2, shuffle tree 5 levels, <= 8 warp partials) adds <= ~15 * 2^-24; the renormalization
# divide/multiply 2 ulp. Total < 5e-6; 2e-5 keeps margin. The ids must match exactly (ranking is on the exact
# f32 logits, like the reference's stable argsort).
TOL = 2e-5


def test_reference_properties():
    rng = np.random.default_rng()
    lg = rng.standard_normal((3, 128))
    ids, w = route_ref(lg, 8)
    assert np.allclose(w.sum(-1), 1.0)
    assert (np.diff(np.take_along_axis(lg, ids, -1), axis=-1) <= 0).all()
    ids2, w2 = route_ref(lg, 8, norm_topk=False)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(w2, np.take_along_axis(p, ids2, -1))
    # ties: lower index first; clamp applies when the selected mass is tiny
    ids3, _ = route_ref(np.array([[1.0, 3.0, 3.0, 0.0, 3.0]]), 3)
    assert ids3.tolist() == [[1, 2, 4]]
    _, w4 = route_ref(np.array([[0.0] + [-30.0] * 3 + [30.0]]), 1, norm_topk=True)
    assert w4[0, 0] == pytest.approx(1.0)
    _, w5 = route_ref(np.array([[-40.0, 40.0, 40.0, 40.0]]), 1)
    assert w5[0, 0] == pytest.approx(1.0)  # p = 1/3 > clamp -> normalized to 1
    assert NORM_TOPK_MIN == 2.0 ** -14


def _run(lg, k, norm):
    from sparkinfer_cute.runtime import DeviceArray

    T = lg.shape[0]
    ids, w = poisoned((T, k), np.int32), poisoned((T, k), np.float32)
    route(DeviceArray.from_numpy(lg), k, norm_topk=norm, ids_out=ids, weights_out=w)
    ids, w = ids.to_numpy(), w.to_numpy()
    assert_all_written(ids, "ids")
    assert_all_written(w, "weights")
    return ids, w


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(n_expert=st.integers(8, 384), k=st.integers(1, 8), T=st.integers(1, 5), sigma=st.floats(0.05, 8.0),
       norm=st.booleans())
def test_router_random(n_expert, k, T, sigma, norm):
    from sparkinfer_cute.kernels.common import rel_err

    lg = (np.random.default_rng().standard_normal((T, n_expert)) * sigma).astype(np.float32)
    ids, w = _run(lg, k, norm)
    ref_ids, ref_w = route_ref(lg, k, norm)
    np.testing.assert_array_equal(ids, ref_ids)
    assert rel_err(w, ref_w) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("n_expert,k", [(128, 8), (256, 8), (16, 4), (32, 8), (300, 8)])
def test_router_ties_follow_stable_order(n_expert, k):
    rng = np.random.default_rng()
    lg = rng.integers(-2, 3, (4, n_expert)).astype(np.float32)  # only 5 distinct values: many ties
    ids, w = _run(lg, k, True)
    ref_ids, ref_w = route_ref(lg, k, True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, rtol=TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("n_finite", [3, 8, 20])
def test_router_masked_experts(n_finite):
    rng = np.random.default_rng()
    lg = np.full((2, 64), -np.inf, np.float32)
    for r in range(2):
        lg[r, rng.choice(64, n_finite, replace=False)] = rng.standard_normal(n_finite)
    ids, w = _run(lg, 8, True)
    ref_ids, ref_w = route_ref(lg, 8, True)
    np.testing.assert_array_equal(ids, ref_ids)  # past the finite ones: -inf experts in index order, weight 0
    np.testing.assert_allclose(w, ref_w, rtol=TOL, atol=0)


@pytest.mark.gpu
def test_router_numpy_path_single_token():
    lg = np.random.default_rng().standard_normal(128).astype(np.float32)
    ids, w = route(lg, 8)
    ref_ids, ref_w = route_ref(lg, 8)
    assert ids.shape == (1, 8) and (ids == ref_ids).all()
    np.testing.assert_allclose(w, ref_w, rtol=TOL)
