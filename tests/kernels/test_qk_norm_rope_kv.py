"""Fused per-head Q/K RMSNorm + NEOX RoPE + q scale + paged fp16 KV append (kernels/qk_norm_rope_kv.py).

CPU tests: the kernel's f32 theta (binary exponentiation) against the exact float64 theta with a derived bound, the
float64 reference against an independent scalar loop, the thread -> element mapping (every element owned exactly
once), constructor checks, compiles of off-registry configs. GPU tests (``gpu`` marker): hypothesis over heads /
head_dim / n_rot / flags / batch / positions with poisoned pools, q against float64 (tight: kernel theta; bounded:
exact theta), cache slots as fp16 within 1 ulp, every other pool byte untouched; q_out / v-aliases-k / numpy paths;
agreement with the unfused kernels; CUDA-graph replay with the position read from device memory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels import arch
from sparkinfer_cute.reference.kernel_refs import f16_ulp_distance
from sparkinfer_cute.kernels.qk_norm_rope_kv import (
    MODEL_CONFIGS,
    HeadNormRope,
    QKNormRopeKV,
    compile_qk_norm_rope_kv,
    qk_norm_rope_kv,
)
from sparkinfer_cute.reference.kernel_refs import qk_norm_rope_kv_ref, rope_theta_f32, theta_scale_f32

U = 2.0**-24  # unit roundoff of f32


# ------------------------------------------------------------------------------------------------ theta
def _theta_bound(theta_exact: np.ndarray, i: np.ndarray) -> np.ndarray:
    """|theta_kernel - theta_exact| bound. theta_scale in f32 is within ~1.7 u of base^(-2/n_rot) (0.5 u rounding
    + <= 1 ulp libm powf + the f32 rounding of the exponent -2/n_rot), which the i-th power turns into <= 1.7 i u;
    binary exponentiation adds <= (i - 1 + popcount(i)) u (each squaring doubles the relative error, each product
    adds u); the product with pos and the quotient by ff add u each. Total <= (2.7 i + popcount(i) + 2) u
    <= (3 i + 12) u relative (popcount <= 9 for i < 512)."""
    return (3 * i + 12) * U * np.abs(theta_exact) + 1e-37


@settings(max_examples=60, deadline=None)
@given(n_rot=st.sampled_from([2, 16, 32, 64, 96, 128, 256, 512]), base=st.sampled_from([1e4, 1e6, 1e7, 5e5]),
       pos=st.integers(0, 2**20), use_ff=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_theta_vs_exact(n_rot, base, pos, use_ff, seed):
    rng = np.random.default_rng(seed)
    half = n_rot // 2
    i = np.arange(half)
    ff = rng.uniform(0.5, 8.0, half).astype(np.float32) if use_ff else None
    th = rope_theta_f32([pos], n_rot, base, ff)[0].astype(np.float64)
    exact = pos * np.power(float(base), -2.0 * i / n_rot)
    if ff is not None:
        exact = exact / ff.astype(np.float64)
    assert (np.abs(th - exact) <= _theta_bound(exact, i)).all()


def test_kernel_theta_small_cases_exact():
    # i = 0 -> theta = pos exactly; i = 1 -> one rounding of pos * theta_scale
    th = rope_theta_f32([0, 1, 12345], 128, 1e6)
    assert (th[0] == 0).all() and th[1, 0] == 1 and th[2, 0] == 12345
    ts = theta_scale_f32(1e6, 128)
    assert th[2, 1] == np.float32(np.float32(12345) * ts) and th[1, 1] == ts
    # binary exponentiation order: theta_scale^3 = (1 * s) * s^2
    assert th[1, 3] == np.float32(np.float32(ts) * np.float32(ts * ts))


# ------------------------------------------------------------------------------------------------ reference
def _scalar_ref(q, k, v, qn, kn, pos, n_rot, base, eps, q_scale, ff, v_norm):
    """Independent scalar float64 loop (textbook RMSNorm, exact theta, per-pair rotation)."""
    def norm(x, w):
        r = 1.0 / math.sqrt(sum(float(t) ** 2 for t in x) / len(x) + eps)
        return [float(x[e]) * r * (1.0 if w is None else float(w[e])) for e in range(len(x))]

    def rope(x):
        y = list(x)
        half = n_rot // 2
        for i in range(half):
            th = pos * base ** (-2.0 * i / n_rot) / (1.0 if ff is None else float(ff[i]))
            c, s = math.cos(th), math.sin(th)
            y[i], y[i + half] = x[i] * c - x[i + half] * s, x[i] * s + x[i + half] * c
        return y

    qo = [[t * q_scale for t in rope(norm(h, qn) if qn is not None else list(map(float, h)))] for h in q]
    ko = [rope(norm(h, kn) if kn is not None else list(map(float, h))) for h in k]
    vo = [norm(h, None) if v_norm else list(map(float, h)) for h in v]
    return np.array(qo), np.array(ko), np.array(vo)


@pytest.mark.parametrize("use_norm,use_ff,v_norm,n_rot", [(True, False, False, 16), (True, True, True, 8),
                                                           (False, False, False, 12), (True, False, True, 16)])
def test_reference_matches_scalar_loop(use_norm, use_ff, v_norm, n_rot, rng):
    H, KV, D = 3, 2, 16
    q, k, v = (rng.standard_normal((n, D)) for n in (H, KV, KV))
    qn, kn = (rng.uniform(0.5, 1.5, D) if use_norm else None for _ in range(2))
    ff = rng.uniform(1, 4, n_rot // 2) if use_ff else None
    pos, base, eps, qs = 37, 1e4, 1e-6, 0.125
    got = qk_norm_rope_kv_ref(q, k, v, qn, kn, pos, n_rot=n_rot, base=base, eps=eps, q_scale=qs, freq_factors=ff,
                              v_norm=v_norm, theta="exact")
    want = _scalar_ref(q, k, v, qn, kn, pos, n_rot, base, eps, qs, ff, v_norm)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    # the other theta modes differ only by f32 theta rounding: |dy| <= (|x0|+|x1|) dtheta, theta <= 37
    for mode in ("kernel", "llama_cpu"):
        alt = qk_norm_rope_kv_ref(q, k, v, qn, kn, pos, n_rot=n_rot, base=base, eps=eps, q_scale=qs,
                                  freq_factors=ff, v_norm=v_norm, theta=mode)
        for g, w in zip(alt, want):
            assert np.abs(g - w).max() <= 2 * np.abs(w).max() * (3 * n_rot + 12) * U * 37 * 4
    with pytest.raises(ValueError):
        qk_norm_rope_kv_ref(q, k, v, qn, kn, pos, n_rot=n_rot, base=base, eps=eps, theta="bogus")


# ------------------------------------------------------------------------------------------------ mapping
def _owned(cfg: HeadNormRope):
    """Emulate the kernel's index arithmetic: which elements each thread of the CTA touches (pairs, tail, v).
    Threads past ``T`` (a bigger CTA: attention's prologue) take ``owner_index`` one past the head."""
    T, D = cfg.T, cfg.head_dim
    head, v = [], []
    for tid in range(cfg.cta_threads):
        t = tid if tid < T else tid + D  # HeadNormRope.owner_index
        assert not (tid >= T and not cfg.idle)
        for j in range(cfg.n_pair):
            i = t + j * T
            if cfg.full_pair or i < cfg.half:
                assert i < cfg.half
                head += [i, i + cfg.half]
        for j in range(cfg.n_tail_pt):
            e = cfg.n_rot + t + j * T
            if cfg.full_tail or e < D:
                assert e < D
                head.append(e)
        for j in range(cfg.n_v):
            e = t + j * T
            if cfg.full_v or e < D:
                assert e < D
                v.append(e)
    return head, v


@settings(max_examples=80, deadline=None)
@given(D2=st.integers(1, 256), rot=st.floats(0.0, 1.0))
def test_every_element_owned_once(D2, rot):
    D = 2 * D2
    n_rot = max(2, 2 * round(rot * D2))
    cfg = QKNormRopeKV(4, 2, D, n_rot)
    head, v = _owned(cfg.heads)
    assert sorted(head) == list(range(D)) and sorted(v) == list(range(D))
    assert 32 <= cfg.threads <= 128 and cfg.threads % 32 == 0
    # in a CTA of more threads (attention with the prologue inside): the same elements, each once, and the
    # threads past T own none (so the sums see the standalone kernel's terms in its order, plus exact zeros)
    for cta in range(cfg.threads, 129, 32):
        wide = HeadNormRope(D, n_rot, cta_threads=cta)
        assert wide.T == cfg.threads and wide.idle == (cta > cfg.threads)
        assert _owned(wide) == (head, v)


def test_head_prologue_refuses_a_cta_smaller_than_its_mapping():
    with pytest.raises(ValueError, match="needs a CTA of >= 128 threads"):
        HeadNormRope(512, 512, cta_threads=64)
    with pytest.raises(ValueError):
        HeadNormRope(128, 128, cta_threads=80)  # not whole warps


def test_registered_configs_mapping_and_budget():
    for cfg in MODEL_CONFIGS.values():
        k = QKNormRopeKV(**cfg)
        head, v = _owned(k.heads)
        assert sorted(head) == list(range(k.head_dim)) == sorted(v)
        assert k.num_warps * 4 <= 101376


@pytest.mark.parametrize("bad", [dict(head_dim=63, n_rot=62), dict(head_dim=64, n_rot=66),
                                 dict(head_dim=64, n_rot=3), dict(head_dim=64, n_rot=64, page_size=48),
                                 dict(head_dim=64, n_rot=0), dict(head_dim=64, n_rot=64, q_stride=32)])
def test_constructor_rejects(bad):
    with pytest.raises(ValueError):
        QKNormRopeKV(4, 2, **bad)


@pytest.mark.parametrize("cfg", [dict(n_head=3, n_kv_head=3, head_dim=80, n_rot=48, page_size=16),
                                 dict(n_head=2, n_kv_head=1, head_dim=512, n_rot=128, has_qk_norm=False,
                                      has_freq_factors=True, has_v_norm=True, page_size=1)])
def test_compile_off_registry_configs(cfg):
    with arch.target("sm_120a"):
        assert compile_qk_norm_rope_kv.uncached(**cfg) is not None


def test_f16_ulp_distance():
    one = np.float16(1.0)
    nxt = np.nextafter(one, np.float16(2.0))
    assert f16_ulp_distance(one, nxt) == 1
    assert f16_ulp_distance(np.float16(-0.0), np.float16(0.0)) == 0
    tiny = np.float16(2.0**-24)  # smallest subnormal: -tiny and tiny are 2 ulps apart across zero
    assert f16_ulp_distance(-tiny, tiny) == 2
    assert (f16_ulp_distance([1.0, 2.0], [1.0, 2.0]) == 0).all()


# ------------------------------------------------------------------------------------------------ GPU helpers
def _check_f16(got16: np.ndarray, ref: np.ndarray, what: str):
    """fp16 cache rows vs the float64 reference, per head: <= 1 ulp of fp16. The kernel's f32 value is within
    ~2e-6 * max|head| of the reference (q bound below), so rounding both to fp16 differs by <= 1 ulp wherever
    that is below an fp16 ulp (|x| > ~1e-2 max|head|); tinier elements get the absolute f32 bound 1e-5 max|head|."""
    ref16 = ref.astype(np.float16)
    assert not np.isnan(got16).any(), f"{what}: NaN (poison) left in the written slot"
    dist = f16_ulp_distance(got16, ref16)
    scale = np.abs(ref).max(axis=-1, keepdims=True)
    near = np.abs(got16.astype(np.float64) - ref) <= 1e-5 * scale
    ok = (dist <= 1) | near
    assert ok.all(), f"{what}: {int((~ok).sum())} elements > 1 ulp, max dist {dist.max()}"


# q vs the kernel-theta float64 reference: rel_err <= 1e-5. f32 error budget, relative to max|q|: sum of
# squares over <= 512 terms (<= 8 sequential per thread, <= 7 butterfly levels, <= 4 warp partials: <= ~20 u
# = 1.2e-6 worst case) -> rstd (rsqrt.approx 2^-22.9, /D, +eps) <= ~0.8e-6; x*rstd*w 2 u; sin/cos <= 2 ulp
# (<= 1.2e-7 absolute); rotation 2 products + 1 add over a pair (|x0|+|x1| <= 2 max) ~ 4 u; q_scale u. Total
# <= ~2e-6; 1e-5 leaves 5x margin, while a wrong pair, position, weight or head gives errors of O(1e-2..1).
Q_TOL = 1e-5


def _setup(rng, B, H, KV, D, P, max_pos, v_hard=False):
    """Random inputs; pos page entries point to distinct pages, every other page-table entry to a trap page."""
    from sparkinfer_cute.runtime import DeviceArray

    scale = rng.choice([1e-3, 1.0, 50.0], size=(B, 1, 1))  # per-sequence magnitude: RMSNorm removes it
    q = (rng.standard_normal((B, H, D)) * scale).astype(np.float32)
    k = (rng.standard_normal((B, KV, D)) * scale).astype(np.float32)
    v = (rng.standard_normal((B, KV, D)) * scale).astype(np.float32)
    if v_hard:  # f16 edge cases (ties at half an ulp, largest finite, overflow, subnormals)
        specials = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504.0, 65520.0, 7e4, -7e4, 2.0**-24,
                             3 * 2.0**-25, -0.0, 1e-8], np.float32)
        flat = v.reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, specials.size), replace=False)
        flat[idx] = specials[: idx.size]
    pos = rng.integers(0, max_pos + 1, B).astype(np.int32)
    pps = max(int(pos.max()) // P + 1, 1)
    n_pages = B + 1
    trap = B
    table = np.full((B, pps), trap, np.int32)
    pages = rng.permutation(B).astype(np.int32)
    table[np.arange(B), pos // P] = pages
    k_pool = DeviceArray.empty((n_pages, P, KV, D), np.float16).fill_bytes(0xFF)
    v_pool = DeviceArray.empty((n_pages, P, KV, D), np.float16).fill_bytes(0xFF)
    return q, k, v, pos, table, pages, k_pool, v_pool


def _check_pools(k_pool, v_pool, pages, pos, P, kref, vref, v_exact):
    kp, vp = k_pool.to_numpy(), v_pool.to_numpy()
    mask = np.zeros(kp.shape[:2], bool)
    for b, (pg, p) in enumerate(zip(pages, pos)):
        mask[pg, p % P] = True
        _check_f16(kp[pg, p % P], kref[b], f"k seq {b}")
        if v_exact:  # no V-norm: the stored bits are cvt.rn of the input, exactly numpy's astype
            np.testing.assert_array_equal(vp[pg, p % P].view(np.uint16), vref[b].astype(np.float16).view(np.uint16))
        else:
            _check_f16(vp[pg, p % P], vref[b], f"v seq {b}")
    for name, pool in (("k_pool", kp), ("v_pool", vp)):
        untouched = pool.view(np.uint16)[~mask]
        assert (untouched == 0xFFFF).all(), f"{name}: {int((untouched != 0xFFFF).sum())} stray writes"


# ------------------------------------------------------------------------------------------------ GPU tests
@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(group=st.sampled_from([1, 2, 4, 8]), KV=st.sampled_from([1, 2, 4]), D=st.sampled_from([64, 128, 256, 512]),
       rot_frac=st.sampled_from([1.0, 0.5, 0.25]), B=st.integers(1, 3),
       max_pos=st.sampled_from([0, 5, 100, 4095, 40959, 262143]), has_qk_norm=st.booleans(),
       use_ff=st.booleans(), v_norm=st.booleans(), P=st.sampled_from([16, 64]),
       base=st.sampled_from([1e4, 1e6, 1e7]), q_scale=st.sampled_from([1.0, 0.0625]), gated=st.booleans(),
       seed=st.integers(0, 2**31))
def test_fused_matches_reference(group, KV, D, rot_frac, B, max_pos, has_qk_norm, use_ff, v_norm, P, base,
                                 q_scale, gated, seed):
    from sparkinfer_cute.reference.kernel_refs import rel_err
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    H = group * KV
    n_rot = int(D * rot_frac)
    half = n_rot // 2
    q, k, v, pos, table, pages, k_pool, v_pool = _setup(rng, B, H, KV, D, P, max_pos, v_hard=not v_norm)
    qn = rng.uniform(0.5, 1.5, D).astype(np.float32) if has_qk_norm else None
    kn = rng.uniform(0.5, 1.5, D).astype(np.float32) if has_qk_norm else None
    ff = None
    if use_ff:  # Gemma 4 style: ones then 1e30 (rotation off), plus random factors
        ff = np.where(rng.random(half) < 0.3, np.float32(1e30), rng.uniform(1, 8, half)).astype(np.float32)
    eps = 1e-6
    if gated:  # Qwen3.5 layout: (q, gate) per head, q_stride = 2 D; the gate must come back bit-identical
        gate = rng.standard_normal((B, H, D)).astype(np.float32)
        qd = DeviceArray.from_numpy(np.concatenate([q, gate], axis=-1))
    else:
        qd = DeviceArray.from_numpy(q)
    qk_norm_rope_kv(qd, DeviceArray.from_numpy(k), DeviceArray.from_numpy(v), qn, kn, k_pool, v_pool,
                    DeviceArray.from_numpy(table), DeviceArray.from_numpy(pos), n_rot=n_rot, base=base, eps=eps,
                    q_scale=q_scale, freq_factors=ff, v_norm=v_norm)
    y = qd.to_numpy()
    if gated:
        np.testing.assert_array_equal(y[..., D:], gate)
        y = y[..., :D]
    assert not np.isnan(y).any()
    qr, kr, vr = qk_norm_rope_kv_ref(q, k, v, qn, kn, pos, n_rot=n_rot, base=base, eps=eps, q_scale=q_scale,
                                     freq_factors=ff, v_norm=v_norm)
    for b in range(B):  # per sequence: magnitudes differ by 5e4 between sequences when there is no norm
        assert rel_err(y[b], qr[b]) <= Q_TOL, (b, rel_err(y[b], qr[b]))
    _check_pools(k_pool, v_pool, pages, pos, P, kr, vr, v_exact=not v_norm)
    # against the exact float64 theta: the f32 theta error bound (test_kernel_theta_vs_exact) times the pair size
    qe, _, _ = qk_norm_rope_kv_ref(q, k, v, qn, kn, pos, n_rot=n_rot, base=base, eps=eps, q_scale=q_scale,
                                   freq_factors=ff, v_norm=v_norm, theta="exact")
    i = np.arange(half)
    th = pos[:, None].astype(np.float64) * np.power(base, -2.0 * i / n_rot)[None, :]
    if ff is not None:
        th = th / ff.astype(np.float64)
    amp = np.abs(qe[..., :half]) + np.abs(qe[..., half:n_rot])
    bound = amp * _theta_bound(th, i)[:, None, :]
    bound = np.concatenate([bound, bound, np.zeros(qe.shape[:-1] + (D - n_rot,))], axis=-1)
    bound += Q_TOL * np.abs(qe).max(axis=(1, 2), keepdims=True)
    assert (np.abs(y - qe) <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_configs_numpy_in_q_out_and_v_aliasing_k(name, rng):
    """Registered configs, single token (2-D inputs), numpy inputs; q_out leaves q untouched; Gemma 4 full layers
    pass the raw K as V (v is k)."""
    from sparkinfer_cute.reference.kernel_refs import rel_err
    from sparkinfer_cute.runtime import DeviceArray

    c = MODEL_CONFIGS[name]
    H, KV, D, n_rot, P = c["n_head"], c["n_kv_head"], c["head_dim"], c["n_rot"], c.get("page_size", 64)
    has_norm, v_norm = c.get("has_qk_norm", True), c.get("has_v_norm", False)
    ff = np.where(np.arange(n_rot // 2) < 64, 1.0, 1e30).astype(np.float32) if c.get("has_freq_factors") else None
    q, k, v, pos, table, pages, k_pool, v_pool = _setup(rng, 1, H, KV, D, P, 9000)
    alias = c.get("has_freq_factors", False)
    QS = c.get("q_stride") or D
    if QS != D:  # Qwen3.5 gated layout: (q, gate) per head
        q = np.concatenate([q, rng.standard_normal((1, H, QS - D)).astype(np.float32)], axis=-1)
    v = k if alias else v
    qn = rng.uniform(0.5, 1.5, D).astype(np.float32) if has_norm else None
    kn = rng.uniform(0.5, 1.5, D).astype(np.float32) if has_norm else None
    qs = 1 / math.sqrt(D)
    kw = dict(n_rot=n_rot, base=1e6, eps=1e-6, q_scale=qs, freq_factors=ff, v_norm=v_norm)
    # numpy q (2-D, one token) -> numpy result
    y = qk_norm_rope_kv(q[0], k[0], k[0] if alias else v[0], qn, kn, k_pool, v_pool, table, int(pos[0]), **kw)
    assert isinstance(y, np.ndarray) and y.shape == (H, QS)
    qr, kr, vr = qk_norm_rope_kv_ref(q[0], k[0], v[0], qn, kn, pos, **kw)
    assert rel_err(y, qr) <= Q_TOL
    _check_pools(k_pool, v_pool, pages, pos, P, kr[None], vr[None], v_exact=not v_norm)
    # q_out: q is read, not written
    qd = DeviceArray.from_numpy(q)
    qo = DeviceArray.empty(q.shape, np.float32).fill_bytes(0xFF)
    r = qk_norm_rope_kv(qd, k, v, qn, kn, k_pool, v_pool, table, pos, q_out=qo, **kw)
    assert r is qo
    np.testing.assert_array_equal(qd.to_numpy(), q)
    yo = qo.to_numpy()[0]
    assert rel_err(yo[:, :D], qr[:, :D]) <= Q_TOL
    assert np.isnan(yo[:, D:]).all()  # columns past head_dim of q_out are not written


@pytest.mark.gpu
def test_matches_unfused_kernels(rng):
    """Same result as rmsnorm_per_head + rope_neox + kv_cache_append (Qwen3-30B-A3B shape, q_scale 1). The unfused
    rope takes theta_scale**i from powf (CUDA <= 4 ulp) where this kernel uses binary exponentiation; both are
    within (3 i + 12) u + 4 u of the exact theta_i = pos ts^i (ts = 0.806), so at pos <= 100 they differ by
    <= max_i (6 i + 28) u pos ts^i <= 28 u * 100 = 1.7e-4 absolute -> |dq| <= (|x0|+|x1|) 1.7e-4 <= 3.4e-4 max|q|
    (plus the 1e-5 f32 budget of each). A layout / pairing / position bug gives O(1) differences."""
    from sparkinfer_cute.reference.kernel_refs import rel_err
    from sparkinfer_cute.kernels.kv_cache_append import kv_cache_append
    from sparkinfer_cute.kernels.rmsnorm import rmsnorm_per_head
    from sparkinfer_cute.kernels.rope import rope_neox
    from sparkinfer_cute.runtime import DeviceArray

    H, KV, D, P = 32, 4, 128, 64
    q, k, v, pos, table, pages, k_pool, v_pool = _setup(rng, 1, H, KV, D, P, 100)
    qn, kn = (rng.uniform(0.5, 1.5, D).astype(np.float32) for _ in range(2))
    y = qk_norm_rope_kv(q, k, v, qn, kn, k_pool, v_pool, table, pos, n_rot=D, base=1e6, eps=1e-6)
    q2 = rope_neox(rmsnorm_per_head(q, qn, 1e-6), pos, n_rot=D, base=1e6)
    k2 = rope_neox(rmsnorm_per_head(k, kn, 1e-6), pos, n_rot=D, base=1e6)
    assert rel_err(y, q2) <= 4e-4
    k_pool2 = DeviceArray.zeros(tuple(k_pool.shape), np.float16)
    v_pool2 = DeviceArray.zeros(tuple(k_pool.shape), np.float16)
    kv_cache_append(k2, v, k_pool2, v_pool2, table, pos)
    pg, sl = pages[0], pos[0] % P
    a, b = k_pool.to_numpy()[pg, sl], k_pool2.to_numpy()[pg, sl]
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    tol = 4e-4 * np.abs(b64).max(axis=-1, keepdims=True) + np.spacing(np.abs(b)).astype(np.float64)
    assert (np.abs(a64 - b64) <= tol).all()
    np.testing.assert_array_equal(v_pool.to_numpy()[pg, sl], v_pool2.to_numpy()[pg, sl])


@pytest.mark.gpu
def test_position_is_read_from_device_in_graph_replay(rng):
    from sparkinfer_cute.reference.kernel_refs import rel_err
    from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Stream

    s = Stream()
    H, KV, D, P = 4, 1, 256, 16
    q0 = rng.standard_normal((1, H, D)).astype(np.float32)
    k0 = rng.standard_normal((1, KV, D)).astype(np.float32)
    v0 = rng.standard_normal((1, KV, D)).astype(np.float32)
    qn, kn = (DeviceArray.from_numpy(rng.uniform(0.5, 1.5, D).astype(np.float32)) for _ in range(2))
    qd, kd, vd = DeviceArray.from_numpy(q0), DeviceArray.from_numpy(k0), DeviceArray.from_numpy(v0)
    n_pages = 8
    table = DeviceArray.from_numpy(rng.permutation(n_pages).astype(np.int32).reshape(1, n_pages))
    k_pool = DeviceArray.empty((n_pages, P, KV, D), np.float16).fill_bytes(0xFF)
    v_pool = DeviceArray.empty((n_pages, P, KV, D), np.float16).fill_bytes(0xFF)
    pos = DeviceArray.from_numpy(np.array([0], np.int32))
    kw = dict(n_rot=D, base=1e6, eps=1e-6, q_scale=0.0625)
    qk_norm_rope_kv(qd, kd, vd, qn, kn, k_pool, v_pool, table, pos, stream=s, **kw)  # compile outside capture
    s.synchronize()
    with CudaGraph.capture(s) as g:
        qk_norm_rope_kv(qd, kd, vd, qn, kn, k_pool, v_pool, table, pos, stream=s, **kw)
    g.keep(qd, kd, vd, qn, kn, k_pool, v_pool, table, pos)
    tab = table.to_numpy()
    for p in [5, 100, 3, 127]:
        qd.copy_from_numpy(q0)
        pos.copy_from_numpy(np.array([p], np.int32))
        g.replay(s)
        s.synchronize()
        qr, kr, _ = qk_norm_rope_kv_ref(q0, k0, v0, qn.to_numpy(), kn.to_numpy(), [p], **kw)
        assert rel_err(qd.to_numpy(), qr) <= Q_TOL
        _check_f16(k_pool.to_numpy()[tab[0, p // P], p % P], kr[0], f"k at pos {p}")
        np.testing.assert_array_equal(v_pool.to_numpy()[tab[0, p // P], p % P], v0[0].astype(np.float16))
