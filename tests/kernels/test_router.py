"""MoE router kernels vs float64 numpy references with stable tie order: ``route`` (softmax -> top-k ->
renormalize of given logits) and router_gemv.py ``route_gemv`` (the fused router GEMV + the same softmax/top-k, one
launch)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.router import NORM_TOPK_MIN, route
from sparkinfer_cute.kernels.router_gemv import RouterGemvTopK, choose_router_warps_per_row, route_gemv
from sparkinfer_cute.reference.kernel_refs import ROUTE_TOL, check_route, route_ref
from sparkinfer_cute.runtime.testing import assert_all_written, poisoned

# Weight tolerance (relative to max|ref|): exp is ex2.approx (<= 2 ulp) of an f32 argument (l - max)*log2(e)
# whose rounding costs |l - max| * 2^-24 relative (|l - max| <= ~60 here -> 3.6e-6); the f32 sum over <= 384
# terms (per-thread <= 2, shuffle tree 5 levels, <= 8 warp partials) adds <= ~15 * 2^-24; the renormalization
# divide/multiply 2 ulp. Total < 5e-6; 2e-5 keeps margin. The ids must match exactly (ranking is on the exact
# f32 logits, like the reference's stable argsort).
TOL = ROUTE_TOL
assert TOL == 2e-5


def test_reference_properties(rng):
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
       norm=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_router_random(n_expert, k, T, sigma, norm, seed):
    lg = (np.random.default_rng(seed).standard_normal((T, n_expert)) * sigma).astype(np.float32)
    ids, w = _run(lg, k, norm)
    check_route(ids, w, lg, k, norm)  # ids exact, weights within TOL (reference/kernel_refs.py)


@pytest.mark.gpu
@pytest.mark.parametrize("n_expert,k", [(128, 8), (256, 8), (16, 4), (32, 8), (300, 8)])
def test_router_ties_follow_stable_order(n_expert, k, rng):
    lg = rng.integers(-2, 3, (4, n_expert)).astype(np.float32)  # only 5 distinct values: many ties
    ids, w = _run(lg, k, True)
    ref_ids, ref_w = route_ref(lg, k, True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, rtol=TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("n_finite", [3, 8, 20])
def test_router_masked_experts(n_finite, rng):
    lg = np.full((2, 64), -np.inf, np.float32)
    for r in range(2):
        lg[r, rng.choice(64, n_finite, replace=False)] = rng.standard_normal(n_finite)
    ids, w = _run(lg, 8, True)
    ref_ids, ref_w = route_ref(lg, 8, True)
    np.testing.assert_array_equal(ids, ref_ids)  # past the finite ones: -inf experts in index order, weight 0
    np.testing.assert_allclose(w, ref_w, rtol=TOL, atol=0)


@pytest.mark.gpu
def test_router_numpy_path_single_token(rng):
    lg = rng.standard_normal(128).astype(np.float32)
    ids, w = route(lg, 8, ids_out=poisoned((1, 8), np.int32), weights_out=poisoned((1, 8), np.float32))
    assert ids.shape == (1, 8)
    check_route(ids, w, lg, 8, True)


# ---------------------------------------------------------------------------------------------- fused router GEMV
# (n_expert, n_embd, k): Qwen3-30B-A3B, Qwen3.5 MoE, synthetic qwen3moe tiny / tiny-fallback / small presets
FUSED_CONFIGS = [(128, 2048, 8), (256, 2048, 8), (16, 256, 4), (16, 384, 4), (32, 512, 8)]
LOGIT_RTOL = 1e-5  # fused GEMV logits vs float64, relative to max|logit| (see _check_fused)


def test_choose_router_warps_per_row_and_grid():
    for n_expert, n_embd, k in FUSED_CONFIGS:
        kern = RouterGemvTopK(n_expert, n_embd, k)
        assert kern.warps_per_row == choose_router_warps_per_row(n_expert, n_embd) in (1, 2, 4)
        # every expert row is owned by exactly one (CTA, warp group)
        assert kern.n_ctas * kern.rows_per_cta >= n_expert > (kern.n_ctas - 1) * kern.rows_per_cta
        assert kern.chunks_per_lane * 32 * kern.warps_per_row * 4 >= n_embd
    assert RouterGemvTopK(128, 2048, 8).n_ctas == 64  # 30B-A3B: 2 warps per row, 64 CTAs (measured choice)
    with pytest.raises(ValueError):
        RouterGemvTopK(128, 2046, 8)  # not a multiple of 4 f32 (16-byte loads)
    with pytest.raises(ValueError):
        RouterGemvTopK(8, 256, 9)


def dot_error_bound(w, h):
    """Rigorous bound on |f32 dot - exact| per row (Higham gamma_n with n = n_embd + 8, u = 2^-24)."""
    return (w.shape[1] + 8) * 2.0**-24 * (np.abs(w.astype(np.float64)) @ np.abs(h.astype(np.float64)).T).T


def _run_fused(w, h, k, norm, warps_per_row=0, counter=None):
    from sparkinfer_cute.runtime import DeviceArray

    T, n_expert = h.shape[0], w.shape[0]
    ids, p = poisoned((T, k), np.int32), poisoned((T, k), np.float32)
    scratch = poisoned((T, n_expert), np.float32)
    counter = counter if counter is not None else DeviceArray.zeros((T,), np.int32)
    route_gemv(DeviceArray.from_numpy(w), DeviceArray.from_numpy(h), k, norm_topk=norm, ids_out=ids, weights_out=p,
               scratch=scratch, counter=counter, warps_per_row=warps_per_row)
    ids, p, logits = ids.to_numpy(), p.to_numpy(), scratch.to_numpy()
    assert_all_written(ids, "ids")
    assert_all_written(p, "weights")
    assert_all_written(logits, "logits scratch")
    assert (counter.to_numpy() == 0).all(), "arrival counter not reset"
    return ids, p, logits


def _check_fused(w, h, k, norm, ids, p, logits):
    from sparkinfer_cute.reference.kernel_refs import rel_err

    ref_logits = h.astype(np.float64) @ w.astype(np.float64).T
    bound = dot_error_bound(w, h)
    assert (np.abs(logits - ref_logits) <= bound).all()
    # f32 sums in chains of <= 16*4 products plus a 5-7 level tree: ~1e-6 relative typically; 1e-5 leaves margin
    assert rel_err(logits, ref_logits) < LOGIT_RTOL
    # softmax/top-k of the kernel's own logits: exact ids, same tolerance as the standalone router
    own_ids, own_w = route_ref(logits, k, norm)
    np.testing.assert_array_equal(ids, own_ids)
    assert rel_err(p, own_w) < TOL
    # a logit error d moves a weight by <= ~2 d relative (softmax derivative; renormalization)
    _assert_matches_f64(w, h, k, norm, ids, p, TOL + 4 * float(np.max(np.abs(logits - ref_logits))))


def _assert_matches_f64(w, h, k, norm, ids, p, wtol):
    """End to end vs route_ref(float64 W @ h): ids exact for every token whose top k+1 exact logits are more than
    2 * LOGIT_RTOL * max|logit| apart (the fused kernel's logits are asserted within LOGIT_RTOL of float64 in
    _check_fused, so their ranking cannot differ there; with continuous random data ~0.3% of tokens are skipped,
    chosen from the reference alone); weights to ``wtol`` relative."""
    from sparkinfer_cute.reference.kernel_refs import rel_err

    ref_logits = h.astype(np.float64) @ w.astype(np.float64).T
    ref_ids, ref_w = route_ref(ref_logits, k, norm)
    top = -np.sort(-ref_logits, axis=-1)[:, : k + 1]
    separated = (np.diff(-top, axis=-1) > 2 * LOGIT_RTOL * np.abs(ref_logits).max()).all(axis=-1)
    np.testing.assert_array_equal(ids[separated], ref_ids[separated])
    if separated.any():
        assert rel_err(p[separated], ref_w[separated]) < wtol


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(cfg=st.sampled_from(FUSED_CONFIGS + [(8, 4, 1), (40, 100, 5), (300, 1000, 8), (64, 2816, 8)]),
       T=st.integers(1, 3), warps_per_row=st.sampled_from([0, 1, 2, 4]), sigma=st.floats(0.1, 4.0), norm=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_route_gemv_random(cfg, T, warps_per_row, sigma, norm, seed):
    n_expert, n_embd, k = cfg
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_expert, n_embd)) * (sigma / np.sqrt(n_embd))).astype(np.float32)
    h = rng.standard_normal((T, n_embd)).astype(np.float32)
    ids, p, logits = _run_fused(w, h, k, norm, warps_per_row)
    _check_fused(w, h, k, norm, ids, p, logits)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", FUSED_CONFIGS)
def test_route_gemv_matches_route_on_its_logits(cfg, rng):
    """The last CTA runs the standalone router's code: same ids as route() on the logits the GEMV phase wrote, and the
    same weights to 4 ulp. Not bit-identical: measured on the H100 (2026-11-25) up to 2 ulp apart (6 of 16 weights) for
    n_expert 256: the two kernels inline the shared softmax/renormalize code into different surroundings and ptxas
    contracts/schedules its f32 ops differently."""
    from sparkinfer_cute.runtime import DeviceArray

    n_expert, n_embd, k = cfg
    w = (rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    h = rng.standard_normal((2, n_embd)).astype(np.float32)
    ids, p, logits = _run_fused(w, h, k, True)
    ids2, p2 = route(DeviceArray.from_numpy(logits), k)
    np.testing.assert_array_equal(ids, ids2.to_numpy())
    ulps = np.abs(p.view(np.int32).astype(np.int64) - p2.to_numpy().view(np.int32).astype(np.int64))
    assert ulps.max() <= 4, ulps
    _check_fused(w, h, k, True, ids, p, logits)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", FUSED_CONFIGS)
def test_route_gemv_ties_lowest_index_first(cfg, rng):
    """Duplicated weight rows give bit-equal logits (same code, same order): ties must rank by expert index."""
    n_expert, n_embd, k = cfg
    base = (rng.standard_normal((3, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    w = base[rng.integers(0, 3, n_expert)]  # only 3 distinct rows: many exact ties
    h = rng.standard_normal((1, n_embd)).astype(np.float32)
    ids, p, logits = _run_fused(w, h, k, True)
    ref_ids, ref_w = route_ref(logits, k, True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(p, ref_w, rtol=TOL)
    # float64 logits of equal rows are equal too: the same tie order end to end
    np.testing.assert_array_equal(ids, route_ref(h.astype(np.float64) @ w.astype(np.float64).T, k)[0])


@pytest.mark.gpu
def test_route_gemv_numpy_path(rng):
    w = (rng.standard_normal((128, 2048)) / 45).astype(np.float32)
    h = rng.standard_normal(2048).astype(np.float32)
    ids, p = route_gemv(w, h, 8, ids_out=poisoned((1, 8), np.int32), weights_out=poisoned((1, 8), np.float32))
    assert ids.shape == (1, 8) and p.shape == (1, 8)
    assert_all_written(ids, "ids")
    assert_all_written(p, "weights")
    _assert_matches_f64(w, h[None], 8, True, ids, p, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(128, 2048, 8), (16, 256, 4)])
def test_route_gemv_graph_replay(cfg, rng):
    """Two fused routers (two 'layers', one shared zeroed counter) captured once, replayed 20x with new weights and
    activations each time: every replay must be right, so each launch left the counter at 0 for the next one."""
    from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Stream

    n_expert, n_embd, k = cfg
    stream = Stream()
    w = [DeviceArray.empty((n_expert, n_embd), np.float32) for _ in range(2)]
    h = [DeviceArray.empty((1, n_embd), np.float32) for _ in range(2)]
    ids = [DeviceArray.empty((1, k), np.int32) for _ in range(2)]
    p = [DeviceArray.empty((1, k), np.float32) for _ in range(2)]
    scratch = DeviceArray.empty((1, n_expert), np.float32)
    counter = DeviceArray.zeros((1,), np.int32, stream=stream)

    def step():
        for i in range(2):
            route_gemv(w[i], h[i], k, ids_out=ids[i], weights_out=p[i], scratch=scratch, counter=counter,
                       stream=stream)

    for a in w + h:
        a.copy_from_numpy(np.zeros(a.shape, np.float32), stream)
    step()  # compile outside the capture
    with CudaGraph.capture(stream) as g:
        step()
    for _ in range(20):
        ws = [(rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)).astype(np.float32) for _ in range(2)]
        hs = [rng.standard_normal((1, n_embd)).astype(np.float32) for _ in range(2)]
        for i in range(2):
            w[i].copy_from_numpy(ws[i], stream)
            h[i].copy_from_numpy(hs[i], stream)
            ids[i].fill_bytes(0xFF, stream)
            p[i].fill_bytes(0xFF, stream)
        g.replay(stream)
        stream.synchronize()
        for i in range(2):
            got_ids, got_p = ids[i].to_numpy(stream), p[i].to_numpy(stream)
            assert_all_written(got_ids, "ids")
            assert_all_written(got_p, "weights")
            _assert_matches_f64(ws[i], hs[i], k, True, got_ids, got_p, 1e-4)
        assert counter.to_numpy(stream)[0] == 0


@pytest.mark.gpu
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(128, 2816, 8), (16, 256, 4)]),
       T=st.integers(1, 3))
def test_fused_router_expert_scale_is_the_gather_scale(seed, shape, T):
    """``expert_scale``: the routed weights come out times ``scale[id]``, the bits the separate GatherScale launch
    (elementwise.py, what Gemma 4 ran before) gives on the unscaled weights; the ids are unchanged."""
    from sparkinfer_cute.kernels.elementwise import gather_scale
    from sparkinfer_cute.runtime import DeviceArray

    n_expert, n_embd, k = shape
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    h = rng.standard_normal((T, n_embd)).astype(np.float32)
    scale = (0.5 + rng.random(n_expert)).astype(np.float32)
    outs = []
    for with_scale in (False, True):
        ids, p = poisoned((T, k), np.int32), poisoned((T, k), np.float32)
        route_gemv(DeviceArray.from_numpy(w), DeviceArray.from_numpy(h), k, ids_out=ids, weights_out=p,
                   expert_scale=DeviceArray.from_numpy(scale) if with_scale else None)
        outs.append((ids, p))
    (ids0, p0), (ids1, p1) = outs
    np.testing.assert_array_equal(ids1.to_numpy(), ids0.to_numpy())
    for t in range(T):  # the reference: GatherScale on each token's unscaled weights
        gather_scale(p0.view(np.float32, (k,), offset_bytes=4 * k * t),
                     ids0.view(np.int32, (k,), offset_bytes=4 * k * t), DeviceArray.from_numpy(scale))
    np.testing.assert_array_equal(p1.to_numpy().view(np.uint32), p0.to_numpy().view(np.uint32))


@pytest.mark.gpu
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(128, 2048, 8), (16, 256, 4), (32, 512, 8)]),
       T=st.integers(1, 3), q8=st.booleans())
def test_fused_router_prenorm(seed, shape, T, q8):
    """``prenorm``: the launch adds delta to x (the f32 sum, bit for bit), writes h = rmsnorm(x) * w within the
    RMSNorm tolerance of float64, its q8_1 copy as the quantize kernel would, and routes exactly as the plain fused
    router does on that stored h (same GEMV on the same bits: ids, weights and logits bit-identical)."""
    from sparkinfer_cute.kernels.q8_1 import Q8Act, quantize_q8_1
    from sparkinfer_cute.reference.kernel_refs import RMSNORM_TOL, check_rel, rmsnorm_ref
    from sparkinfer_cute.runtime import DeviceArray

    n_expert, n_embd, k = shape
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    x = rng.standard_normal((T, n_embd)).astype(np.float32)
    delta = (0.5 * rng.standard_normal((T, n_embd))).astype(np.float32)
    wn = (1 + 0.3 * rng.standard_normal(n_embd)).astype(np.float32)
    dx, dd, dwn, dw = (DeviceArray.from_numpy(a) for a in (x, delta, wn, w))
    h = poisoned((T, n_embd), np.float32)
    hq = None
    if q8:
        hq = Q8Act(T, n_embd)
        hq.qs.fill_bytes(0x7F)
        hq.d.fill_bytes(0xFF)
        hq.s.fill_bytes(0xFF)
    ids, p, logits = poisoned((T, k), np.int32), poisoned((T, k), np.float32), poisoned((T, n_expert), np.float32)
    route_gemv(dw, h, k, ids_out=ids, weights_out=p, scratch=logits, prenorm=(dx, dd, dwn, 1e-6, hq))
    s = x + delta
    np.testing.assert_array_equal(dx.to_numpy().view(np.uint32), s.view(np.uint32))
    hv = h.to_numpy()
    check_rel(hv, rmsnorm_ref(s, wn, 1e-6), RMSNORM_TOL, "prenorm h")
    if q8:
        ref_qs, ref_d, ref_s = quantize_q8_1(hv)
        qs, d, sm = hq.to_numpy()
        np.testing.assert_array_equal(qs.reshape(-1), ref_qs.reshape(-1))
        np.testing.assert_array_equal(d.reshape(-1).view(np.uint32), ref_d.reshape(-1).view(np.uint32))
        np.testing.assert_array_equal(sm.reshape(-1).view(np.uint32), ref_s.reshape(-1).view(np.uint32))
    ids2, p2, logits2 = _run_fused(w, hv, k, True)
    np.testing.assert_array_equal(logits.to_numpy().view(np.uint32), logits2.view(np.uint32))
    np.testing.assert_array_equal(ids.to_numpy(), ids2)
    np.testing.assert_array_equal(p.to_numpy().view(np.uint32), p2.view(np.uint32))
