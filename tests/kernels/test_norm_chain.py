"""The one-launch RMSNorm chains of a Gemma 4 decode layer (kernels/norm_chain.py) vs float64 references.

Tolerance (relative to max|ref| of each output): every norm in the chain is the RMSNorm kernel's arithmetic (f32
sum of squares: <= (8 + 5 + 32) * 2^-24 ~ 2.7e-6 relative for rows up to 8192; rsqrt.approx 2^-22.9; two f32
multiplies), so one norm is within reference/kernel_refs.py's RMSNORM_TOL = 1e-5 with margin. A chain stacks at most
three norms and two f32 adds; an error of the inner norm enters the outer one scaled by at most 1 (RMSNorm is
1-Lipschitz in relative terms up to the weight), so 3 * 1e-5 bounds the chain. A 1% scale error anywhere is >= 300x
over it. The q8_1 copy must be bit-identical to the standalone quantize kernel applied to the f32 output the
kernel wrote (same rounding code). Outputs are NaN-poisoned before the launch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.norm_chain import PostAttentionNorms, PostFfnNorms
from sparkinfer_cute.reference.kernel_refs import RMSNORM_TOL, check_rel, post_attention_norms_ref, \
    post_ffn_norms_ref

CHAIN_TOL = 3 * RMSNORM_TOL
ROWS = st.sampled_from([256, 640, 2048, 2816, 4096])


def test_layout_covers_the_row_and_refuses_ragged_rows():
    for N in (32, 256, 640, 2816, 8192):
        k = PostAttentionNorms(N, 3, True)
        assert k.active * 8 == N and k.threads % 32 == 0 and k.threads - k.active < 32
    for bad in (100, 2820):
        with pytest.raises(ValueError, match="multiple of 32"):
            PostFfnNorms(bad, True)
    with pytest.raises(ValueError, match="n_out"):
        PostAttentionNorms(256, 4)


def test_references_compose_the_single_norm_reference():
    """The chain references are compositions of rmsnorm_ref (checked against an explicit formula here)."""
    rng = np.random.default_rng(0)
    N = 64
    o, x, f, y, wp, w1, w2, w = (rng.standard_normal(N) for _ in range(8))
    x1, (h,) = post_attention_norms_ref(o, x, wp, [w1], 1e-6)

    def rms(v):
        return v / np.sqrt(np.mean(v * v) + 1e-6)

    np.testing.assert_allclose(x1, x + rms(o) * wp, rtol=1e-14)
    np.testing.assert_allclose(h, rms(x1) * w1, rtol=1e-14)
    got = post_ffn_norms_ref(f, y, w1, w2, w, x, 0.5, 1e-6)
    np.testing.assert_allclose(got, (x + rms(rms(f) * w1 + rms(y) * w2) * w) * 0.5, rtol=1e-14)
    np.testing.assert_allclose(post_ffn_norms_ref(f, None, None, None, w, x, 2.0, 1e-6), (x + rms(f) * w) * 2.0,
                               rtol=1e-14)


def _dev(a):
    from sparkinfer_cute.runtime import DeviceArray

    return DeviceArray.from_numpy(np.ascontiguousarray(a, np.float32))


def _poisoned_q8(n):
    """A q8_1 buffer of one row filled with garbage (0x7F values, NaN scales and sums) before a kernel writes it."""
    from sparkinfer_cute.kernels.q8_1 import Q8Act

    xq = Q8Act(1, n)
    xq.qs.fill_bytes(0x7F)
    xq.d.fill_bytes(0xFF)
    xq.s.fill_bytes(0xFF)
    return xq


def _assert_q8_of(xq, h):
    """``xq`` holds exactly what the standalone quantize kernel makes of the f32 row ``h`` (same rounding code)."""
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1

    qs, d, s = xq.to_numpy()
    ref_qs, ref_d, ref_s = quantize_q8_1(np.asarray(h)[None])
    np.testing.assert_array_equal(qs.reshape(-1), ref_qs.reshape(-1))
    np.testing.assert_array_equal(d.reshape(-1).view(np.uint32), ref_d.reshape(-1).view(np.uint32))
    np.testing.assert_array_equal(s.reshape(-1).view(np.uint32), ref_s.reshape(-1).view(np.uint32))


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(N=ROWS, n_out=st.integers(1, 3), q8=st.booleans(), eps=st.sampled_from([1e-6, 1e-5]),
       seed=st.integers(0, 2**32 - 1))
def test_post_attention_norms(N, n_out, q8, eps, seed):
    from sparkinfer_cute.kernels.norm_chain import post_attention_norms
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    o = rng.standard_normal(N).astype(np.float32) * 3
    x = rng.standard_normal(N).astype(np.float32)
    w_post = (1 + 0.5 * rng.standard_normal(N)).astype(np.float32)
    ws = [(1 + 0.5 * rng.standard_normal(N)).astype(np.float32) for _ in range(n_out)]
    dx = _dev(x)
    outs = [poisoned((N,), np.float32) for _ in range(n_out)]
    xq = None
    if q8:
        xq = _poisoned_q8(N)
    post_attention_norms(_dev(o), dx, _dev(w_post), [(_dev(w), out) for w, out in zip(ws, outs)], eps, xq=xq)
    x1_ref, refs = post_attention_norms_ref(o, x, w_post, ws, eps)
    x1 = dx.to_numpy()
    check_rel(x1, x1_ref, RMSNORM_TOL, "x + rmsnorm(o) * w_post")
    got = [out.to_numpy() for out in outs]
    for g, r in zip(got, refs):
        check_rel(g, r, CHAIN_TOL, "rmsnorm(x1) * w")
    if q8:
        _assert_q8_of(xq, got[-1])


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(N=ROWS, experts=st.booleans(), eps=st.sampled_from([1e-6, 1e-5]), scale=st.sampled_from([1.0, 0.37, 2.5]),
       seed=st.integers(0, 2**32 - 1))
def test_post_ffn_norms(N, experts, eps, scale, seed):
    from sparkinfer_cute.kernels.norm_chain import post_ffn_norms

    rng = np.random.default_rng(seed)
    f, y, x = (rng.standard_normal(N).astype(np.float32) * s for s in (2.0, 5.0, 1.0))
    w1, w2, w = ((1 + 0.5 * rng.standard_normal(N)).astype(np.float32) for _ in range(3))
    dx = _dev(x)
    post_ffn_norms(_dev(f), _dev(y) if experts else None, _dev(w1) if experts else None,
                   _dev(w2) if experts else None, _dev(w), dx, _dev(np.array([scale])), eps)
    ref = post_ffn_norms_ref(f, y if experts else None, w1, w2, w, x, scale, eps)
    check_rel(dx.to_numpy(), ref, CHAIN_TOL, "post-FFN norms")


def test_tail_layout_spreads_the_row_over_the_host_kernels_threads():
    """As a tail (PostFfnNorms.tail) the chain runs on the CTA of the kernel it ends (128 threads for the MoE down
    kernels): groups of 8 in passes, every group held once; a thread count that is not whole warps is refused."""
    for N in (256, 2048, 2816, 4096):
        k = PostFfnNorms(N, True, True, True, tail_threads=128)
        assert k.threads == 128 and k.passes == -(-(N // 8) // 128) and k.in_tail
        assert (k.passes - 1) * 128 < k.active <= k.passes * 128
    with pytest.raises(ValueError, match="multiple of 32"):
        PostFfnNorms(256, False, tail_threads=100)
    with pytest.raises(ValueError, match="post_norm"):
        PostFfnNorms(256, True, post_norm=False)


@pytest.mark.gpu
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), path=st.sampled_from(["float", "dp4a"]))
@pytest.mark.parametrize("form,q,n_ff,n_out,E,k", [
    ("residual", "Q4_K", 768, 2048, 16, 8),     # Qwen3-30B-A3B's down (chunk kernel): x += y; h = next attn_norm
    ("residual", "Q8_0", 160, 256, 16, 4),      # the slice kernel
    ("post_ffn", "Q8_0", 704, 2816, 16, 8),     # Gemma 4 26B-A4B's down (slice kernel): the post-FFN norm chain
    ("post_ffn", "Q4_K", 768, 2048, 16, 8),     # the chunk kernel
])
def test_moe_down_runs_the_chain_as_its_tail(form, q, n_ff, n_out, E, k, path, seed):
    """moe_down with a tail (kernels/norm_chain.py FfnTailArgs): its own output bit-identical to the launch without
    one, then the chain on it as the separate launch's references say (float64, CHAIN_TOL), the q8_1 copy of h
    bit-identical to quantize_q8_1 of the h it wrote, the arrival counter back to zero; a second launch (graph
    replay, next layer) works from that zero. Outputs NaN-poisoned."""
    from sparkinfer_cute.kernels.moe_ffn import moe_down
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.quant_decode import spec
    from sparkinfer_cute.reference.kernel_refs import random_quant_bytes, rmsnorm_ref
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    sp = spec(q)
    wd = random_quant_bytes(q, E * n_out * n_ff // sp.block_elems, rng).reshape(E, n_out, sp.row_bytes(n_ff))
    dwd = DeviceArray.from_numpy(wd)
    act = rng.standard_normal((k, n_ff)).astype(np.float32)
    a = quantize_q8_1(_dev(act)) if path == "dp4a" else _dev(act)
    ids = DeviceArray.from_numpy(rng.choice(E, size=k, replace=False).astype(np.int32))
    wts = rng.random(k).astype(np.float32)
    wts = _dev(wts / wts.sum())
    y_plain = moe_down(dwd, q, a, ids, wts, n_out).to_numpy()
    eps = 1e-6
    f = rng.standard_normal(n_out).astype(np.float32) * 2
    w1, w2, w, w_next = ((1 + 0.5 * rng.standard_normal(n_out)).astype(np.float32) for _ in range(4))
    scale = np.float32(0.37)
    counter = DeviceArray.zeros((1,), np.int32)
    for launch in range(2):
        x = rng.standard_normal(n_out).astype(np.float32) * 3
        dx, dy, dh = _dev(x), poisoned((n_out,), np.float32), poisoned((n_out,), np.float32)
        xq = _poisoned_q8(n_out)
        if form == "residual":
            tail = FfnTailArgs(dy, None, None, None, None, dx, None, eps, counter, (_dev(w_next), dh, xq),
                               post_norm=False)
        else:
            tail = FfnTailArgs(_dev(f), dy, _dev(w1), _dev(w2), _dev(w), dx, _dev(np.array([scale])), eps, counter,
                               (_dev(w_next), dh, xq))
        moe_down(dwd, q, a, ids, wts, n_out, out=dy, tail=tail)
        np.testing.assert_array_equal(dy.to_numpy().view(np.uint32), y_plain.view(np.uint32))
        if form == "residual":
            x1_ref = (x + y_plain).astype(np.float64)  # one f32 add: exact below
            np.testing.assert_array_equal(dx.to_numpy(), (x + y_plain).astype(np.float32))
        else:
            x1_ref = post_ffn_norms_ref(f, y_plain, w1, w2, w, x, float(scale), eps)
            check_rel(dx.to_numpy(), x1_ref, CHAIN_TOL, "post-FFN chain (tail)")
        h = dh.to_numpy()
        check_rel(h, rmsnorm_ref(x1_ref, w_next, eps), CHAIN_TOL + RMSNORM_TOL, "next norm (tail)")
        _assert_q8_of(xq, h)
        assert counter.to_numpy()[0] == 0, f"launch {launch}: the tail left the arrival counter at {counter}"


@pytest.mark.gpu
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("q,n_in,n_out,n_outs,q8", [
    ("Q4_K", 4096, 2816, 3, True),   # Gemma 4 26B-A4B sliding O projection (chunk kernel, dp4a), experts' q8_1 copy
    ("Q4_K", 1024, 640, 1, False),   # Gemma 3 270M (chunk kernel, f32)
    ("Q4_K", 256, 256, 3, True),     # the synthetic tiny Gemma 4 (slice kernel)
])
def test_o_projection_runs_the_chain_as_its_tail(q, n_in, n_out, n_outs, q8, seed):
    """gemv with a tail (kernels/norm_chain.py AttnTailArgs): its own output bit-identical to the launch without
    one, then post_attention_norms on it as the float64 reference says, the q8_1 copy of the last output
    bit-identical to quantize_q8_1 of what it wrote, the arrival counter back to zero, a second launch from that
    zero. Outputs NaN-poisoned."""
    from sparkinfer_cute.kernels.gemv import gemv
    from sparkinfer_cute.kernels.norm_chain import AttnTailArgs
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.quant_decode import spec
    from sparkinfer_cute.reference.kernel_refs import random_quant_bytes
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    sp = spec(q)
    dw = DeviceArray.from_numpy(random_quant_bytes(q, n_out * n_in // sp.block_elems, rng).reshape(n_out, -1))
    a = rng.standard_normal(n_in).astype(np.float32)
    xa = quantize_q8_1(_dev(a)) if q8 else _dev(a)
    o_plain = gemv(dw, q, xa, n_out=n_out).to_numpy()
    eps = 1e-6
    w_post = (1 + 0.5 * rng.standard_normal(n_out)).astype(np.float32)
    ws = [(1 + 0.5 * rng.standard_normal(n_out)).astype(np.float32) for _ in range(n_outs)]
    counter = DeviceArray.zeros((1,), np.int32)
    for launch in range(2):
        x = rng.standard_normal(n_out).astype(np.float32) * 3
        dx, do = _dev(x), poisoned((n_out,), np.float32)
        outs = [poisoned((n_out,), np.float32) for _ in range(n_outs)]
        xq = None
        if q8:
            xq = _poisoned_q8(n_out)
        tail = AttnTailArgs(do, dx, _dev(w_post), [(_dev(w), out) for w, out in zip(ws, outs)], eps, counter, xq)
        gemv(dw, q, xa, n_out=n_out, out=do, tail=tail)
        np.testing.assert_array_equal(do.to_numpy().view(np.uint32), o_plain.view(np.uint32))
        x1_ref, refs = post_attention_norms_ref(o_plain, x, w_post, ws, eps)
        check_rel(dx.to_numpy(), x1_ref, RMSNORM_TOL, "x + rmsnorm(o) * w_post (tail)")
        got = [out.to_numpy() for out in outs]
        for g, r in zip(got, refs):
            check_rel(g, r, CHAIN_TOL, "rmsnorm(x1) * w (tail)")
        if q8:
            _assert_q8_of(xq, got[-1])
        assert counter.to_numpy()[0] == 0, f"launch {launch}: the tail left the arrival counter at {counter}"


@pytest.mark.gpu
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("q,n_in,n_out,mapping", [("Q4_K", 2048, 640, "chunk"),   # Gemma 3 270M's down projection
                                                  ("Q4_K", 768, 384, "slice")])   # the synthetic tiny Gemma 3
def test_dense_down_runs_the_chain_as_its_tail(q, n_in, n_out, mapping, seed):
    """gemv with a post-FFN tail whose f is the GEMV's own output (Gemma 3: x = x + rmsnorm(f) * w, then the next
    attn_norm): the output bit-identical to the launch without a tail, x and h as the float64 references say, the
    counter back to zero, twice. Outputs NaN-poisoned."""
    from sparkinfer_cute.kernels.gemv import gemv
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs
    from sparkinfer_cute.kernels.quant_decode import spec
    from sparkinfer_cute.reference.kernel_refs import random_quant_bytes, rmsnorm_ref
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    dw = DeviceArray.from_numpy(random_quant_bytes(q, n_out * n_in // spec(q).block_elems, rng).reshape(n_out, -1))
    xa = _dev(rng.standard_normal(n_in).astype(np.float32))
    kw = dict(mapping=mapping, rows_per_warp=1) if mapping == "chunk" else dict(mapping=mapping, warps_per_row=2)
    f_plain = gemv(dw, q, xa, n_out=n_out, **kw).to_numpy()
    eps = 1e-6
    w, w_next = ((1 + 0.5 * rng.standard_normal(n_out)).astype(np.float32) for _ in range(2))
    counter = DeviceArray.zeros((1,), np.int32)
    for launch in range(2):
        x = rng.standard_normal(n_out).astype(np.float32) * 3
        dx, df, dh = _dev(x), poisoned((n_out,), np.float32), poisoned((n_out,), np.float32)
        tail = FfnTailArgs(df, None, None, None, _dev(w), dx, _dev(np.array([1.0])), eps, counter,
                           (_dev(w_next), dh, None))
        gemv(dw, q, xa, n_out=n_out, out=df, tail=tail, **kw)
        np.testing.assert_array_equal(df.to_numpy().view(np.uint32), f_plain.view(np.uint32))
        x1_ref = post_ffn_norms_ref(f_plain, None, None, None, w, x, 1.0, eps)
        check_rel(dx.to_numpy(), x1_ref, CHAIN_TOL, "x + rmsnorm(f) * w (tail)")
        check_rel(dh.to_numpy(), rmsnorm_ref(x1_ref, w_next, eps), CHAIN_TOL + RMSNORM_TOL, "next norm (tail)")
        assert counter.to_numpy()[0] == 0, f"launch {launch}: the tail left the arrival counter at {counter}"
