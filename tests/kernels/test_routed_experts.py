"""kernels/routed_experts.py: the router, the routed experts' gate/up and (optionally) down projection in one launch.

CPU: the wrapper refuses what the kernel cannot do (more than one token, ids / weights the router does not write, a
short or misaligned chain state), and the kernel class refuses phases that cannot share a grid.
GPU: every output of the one launch is bit-identical to the launches it replaces (router_gemv.py ``route_gemv``, then
moe_ffn.py ``moe_gate_up``, then ``moe_down`` with its norm-chain tail: each has its own reference tests), on the
registered shapes (Qwen3-30B-A3B's chunk kernels with the pre-FFN norm and the residual + next-norm tail, the synthetic
tiny file's slice kernels, Gemma 4 26B-A4B's fused GeGLU experts with per-expert scales and the post-FFN chain);
outputs poisoned first; the chain state, the router's, the q8_1 and the tail's arrival counters are back at zero after
each launch, and a second launch from that state (new inputs) holds the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.kernels import routed_experts as rg

SHAPES = {  # name: (n_expert, n_embd, n_ff, k, gate/up qtype, fused, glu, prenorm (Qwen) or expert scale (Gemma 4),
    #                down qtype)
    "qwen3_30b": (128, 2048, 768, 8, "Q4_K", False, "silu", True, "Q4_K"),
    "qwen3_tiny": (16, 256, 256, 4, "Q4_K", False, "silu", True, "Q4_K"),
    "gemma4_26b": (128, 2816, 704, 8, "Q4_K", True, "gelu_tanh", False, "Q8_0"),
}


def test_registered_configs_cover_both_basket_models():
    """The compile gate builds the Qwen (chunk, prenorm) and Gemma 4 (slice, expert scale, GeGLU) variants."""
    cfgs = rg._configs()
    routers = [dict(c["router"]) for c in cfgs]
    assert any(r.get("prenorm_q8") for r in routers) and any(r.get("expert_scale") for r in routers)
    assert {c["mapping"] for c in cfgs} == {"chunk", "slice"}
    downs = [dict(c["down"]) for c in cfgs if c.get("down")]
    assert {d["tail"].post_norm for d in downs} == {False, True}  # Qwen's residual tail, Gemma 4's post-FFN chain


def test_kernel_refuses_mismatched_phases():
    from sparkinfer_cute.kernels.moe_ffn_chunk import MoeDownChunk, MoeGateUpChunk
    from sparkinfer_cute.kernels.router_gemv import RouterGemvTopK

    g = MoeGateUpChunk("Q4_K", 2048, 768, q8=True)
    with pytest.raises(ValueError, match="picks 8 experts"):
        rg.RoutedExperts(RouterGemvTopK(128, 2048, 8), g, 4)
    kern = rg.RoutedExperts(RouterGemvTopK(128, 2048, 8), g, 8)
    assert kern.n_ctas == kern.n_route + kern.n_x * 8 and kern.n_x * g.rows_per_cta >= 768
    d = MoeDownChunk("Q4_K", 768, 2048, 8, q8=True)
    kern = rg.RoutedExperts(RouterGemvTopK(128, 2048, 8), g, 8, d)
    assert kern.n_down * d.rows_per_cta >= 2048 and kern.n_ctas == kern.n_route + kern.n_gate + kern.n_down


def _inputs(name, rng):
    from sparkinfer_cute.runtime import DeviceArray
    from tests.kernels.test_moe_ffn import experts

    E, n, f, k, q, fused, glu, prenorm, qd = SHAPES[name]
    w_router = DeviceArray.from_numpy((rng.standard_normal((E, n)) / np.sqrt(n)).astype(np.float32))
    g, u = experts(q, E, f, n, rng), experts(q, E, f, n, rng)
    wg, wu = ((np.concatenate([g, u], axis=1), None) if fused else (g, u))
    wg = DeviceArray.from_numpy(np.ascontiguousarray(wg))
    wu = None if wu is None else DeviceArray.from_numpy(np.ascontiguousarray(wu))
    scale = None if prenorm else DeviceArray.from_numpy(rng.uniform(0.5, 2.0, E).astype(np.float32))
    wd = DeviceArray.from_numpy(np.ascontiguousarray(experts(qd, E, n, f, rng)))
    tail_w = [DeviceArray.from_numpy((1 + 0.3 * rng.standard_normal(n)).astype(np.float32)) for _ in range(4)]
    return w_router, wg, wu, scale, wd, tail_w


def _q8(n, rows=1):
    from sparkinfer_cute.kernels.q8_1 import Q8Act

    a = Q8Act(rows, n)
    a.qs.fill_bytes(0x7F)
    a.d.fill_bytes(0xFF)
    a.s.fill_bytes(0xFF)
    return a


def _run(name, weights, inputs, phases, chain=None, state=None):
    """One MoE step (routing, gate/up, down with the norms after it as its tail) on fresh copies of the inputs:
    ``phases`` 0 as separate launches, 2 routing + gate/up in one launch then down, 3 all in one launch. Returns
    every output as numpy (f32 as uint32 bits)."""
    from sparkinfer_cute.kernels.moe_ffn import moe_down, moe_gate_up
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.router_gemv import route_gemv
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    E, n, f, k, q, fused, glu, prenorm, qd = SHAPES[name]
    w_router, wg, wu, scale, wd, (w1, w2, w, w_next) = weights
    x0, delta0, third, f0 = inputs
    rcnt, gcnt, tcnt = state
    ids, p, logits = poisoned((1, k), np.int32), poisoned((1, k), np.float32), poisoned((1, E), np.float32)
    act, actq = poisoned((k, f), np.float32), _q8(f, k)
    x = DeviceArray.from_numpy(x0)
    if prenorm:  # Qwen: the router forms h = rmsnorm(x + delta) * w_norm and its q8_1 copy, the experts read that
        delta, wn = DeviceArray.from_numpy(delta0), DeviceArray.from_numpy(third)
        h, hq = poisoned((1, n), np.float32), _q8(n)
        pre, gate_in, r_in = (x, delta, wn, 1e-6, hq), hq, h
    else:  # Gemma 4: the router's input and the experts' (another norm of x1, with its q8_1 copy) are given
        pre, gate_in, r_in = None, quantize_q8_1(DeviceArray.from_numpy(third)), DeviceArray.from_numpy(delta0)
    y, h_next, hq_next = poisoned((n,), np.float32), poisoned((n,), np.float32), _q8(n)
    if prenorm:  # x += y; h = rmsnorm(x) * w_next (+ q8_1): into the buffers the router wrote, as the model does
        h_next, hq_next = h, hq
        tail = FfnTailArgs(y, None, None, None, None, x, None, 1e-6, tcnt, (w_next, h_next, hq_next),
                           post_norm=False)
    else:  # the post-FFN chain on the dense output f0 and the experts' y, then the next attn_norm (+ q8_1)
        tail = FfnTailArgs(DeviceArray.from_numpy(f0), y, w1, w2, w, x,
                           DeviceArray.from_numpy(np.array([0.37], np.float32)), 1e-6, tcnt, (w_next, h_next, hq_next))
    route = dict(w_router=w_router, h=r_in, k=k, ids_out=ids, weights_out=p, scratch=logits, counter=rcnt,
                 n_expert=E, expert_scale=scale, prenorm=pre)
    gate_up = dict(w_gate=wg, w_up=wu, qtype=q, h=gate_in, ids=ids, n_ff=f, out=act, act=glu, out_q8=actq,
                   counters=gcnt)
    down = dict(w_down=wd, qtype=qd, act=actq, ids=ids, weights=p, n_out=n, out=y, tail=tail)
    if phases == 3:
        rg.routed_experts(route, gate_up, chain, down=down)
    else:
        if phases == 2:
            rg.routed_experts(route, gate_up, chain)
        else:
            route_gemv(**route)
            moe_gate_up(**gate_up)
        moe_down(**down)
    out = {"ids": ids.to_numpy(), "weights": p.to_numpy().view(np.uint32), "logits": logits.to_numpy().view(np.uint32),
           "act": act.to_numpy().view(np.uint32), "y": y.to_numpy().view(np.uint32),
           "x": x.to_numpy().view(np.uint32), "h": h_next.to_numpy().view(np.uint32)}
    for name_, q8 in (("act", actq), ("h", hq_next)):
        out.update(zip((name_ + "_qs", name_ + "_d", name_ + "_s"), (a.view(np.uint8) for a in q8.to_numpy())))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("phases", [2, 3])
@pytest.mark.parametrize("name", list(SHAPES))
def test_one_launch_equals_the_ones_it_replaces(name, phases, rng):
    from sparkinfer_cute.runtime import DeviceArray

    E, n, f, k, q, fused, glu, prenorm, qd = SHAPES[name]
    weights = _inputs(name, rng)
    chain = rg.new_chain_state()
    state = (DeviceArray.zeros((1,), np.int32), DeviceArray.zeros((k * f // 32,), np.int32),
             DeviceArray.zeros((1,), np.int32))
    for step in range(2):
        inputs = (rng.standard_normal(n).astype(np.float32), (0.5 * rng.standard_normal(n)).astype(np.float32),
                  ((1 + 0.3 * rng.standard_normal(n)) if prenorm else rng.standard_normal(n)).astype(np.float32),
                  rng.standard_normal(n).astype(np.float32))
        apart = _run(name, weights, inputs, 0, state=state)
        one = _run(name, weights, inputs, phases, chain=chain, state=state)
        for key in apart:
            np.testing.assert_array_equal(one[key], apart[key], err_msg=f"{name} step {step}: {key}")
        assert len(set(apart["ids"].reshape(-1).tolist())) == k, "the router picked k distinct experts"
        assert (chain.to_numpy() == 0).all(), f"chain state not reset: {chain.to_numpy()}"
        assert all((c.to_numpy() == 0).all() for c in state), "arrival counters not reset"


def test_wrapper_refuses_what_the_kernel_cannot_do(monkeypatch):
    """One token per launch, the gate/up must read the router's ids (and the down its ids and weights), the chain
    state must be CHAIN_INTS aligned int32: each a one-line ValueError before anything is compiled or launched (fake
    device buffers: no GPU needed)."""
    import sparkinfer_cute.kernels.router_gemv as router
    import sparkinfer_cute.runtime as runtime

    monkeypatch.setattr(runtime, "resolve_stream", lambda s: s)

    class Buf:
        def __init__(self, shape, ptr=0x1000, nbytes=None, dtype=np.float32):
            self.shape, self.ptr, self.dtype = shape, ptr, dtype
            self.nbytes = nbytes if nbytes is not None else 4 * int(np.prod(shape))
            self.size = int(np.prod(shape))

    def plan(T, ids):
        return router.RouteGemvLaunch({}, (), T, ids, wts, False, ())

    ids, wts, chain = Buf((1, 8)), Buf((1, 8)), Buf((8,), dtype=np.int32)
    monkeypatch.setattr(router, "plan_route_gemv", lambda **kw: plan(2, ids))
    with pytest.raises(ValueError, match="one token"):
        rg.routed_experts({}, {"ids": ids}, chain, stream=0)
    monkeypatch.setattr(router, "plan_route_gemv", lambda **kw: plan(1, ids))
    with pytest.raises(ValueError, match="ids the router writes"):
        rg.routed_experts({}, {"ids": Buf((1, 8))}, chain, stream=0)
    with pytest.raises(ValueError, match="ids and weights the router writes"):
        rg.routed_experts({}, {"ids": ids}, chain, down={"ids": ids, "weights": Buf((1, 8))}, stream=0)
    with pytest.raises(ValueError, match="chain state"):
        rg.routed_experts({}, {"ids": ids}, Buf((4,), dtype=np.int32), stream=0)
    with pytest.raises(ValueError, match="chain state"):
        rg.routed_experts({}, {"ids": ids}, Buf((8,), ptr=0x1004, dtype=np.int32), stream=0)


@pytest.mark.parametrize("shape", ["qwen3_30b", "qwen3_tiny", "gemma4_26b"])
def test_launch_arguments_reach_their_phase(monkeypatch, shape):
    """The one launch takes ~50 arguments (the router's, the gate/up's, the down's with its tail's, the chain state):
    with device memory faked and ``cute.compile`` recording (tests/kernels/test_tail_launch_args.py), each must be
    of the compiled count, dtype and alignment, and land on the parameter of the phase that reads it: the router's
    outputs on the gate/up's and the down's inputs, the gate/up's q8_1 output on the down's input, the down's own
    output on its tail's input. No GPU."""
    import inspect

    import cutlass.cute as cute

    import sparkinfer_cute.runtime as runtime
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs
    from sparkinfer_cute.kernels.quant_decode import spec
    from tests.kernels.test_tail_launch_args import FakeStream, Recorder, _addr, fdev, fq8

    monkeypatch.setattr(cute, "compile", lambda kernel, *args, options=None: Recorder(kernel, args))
    monkeypatch.setattr(rg, "compile_routed_experts", rg.compile_routed_experts.uncached)
    monkeypatch.setattr(runtime, "resolve_stream", lambda s: s)
    Recorder.calls = []
    E, n, f, k, q, fused, glu, prenorm, qd = SHAPES[shape]

    def q8_rows(n_, rows):
        a = fq8(n_)
        a.rows, a.qs, a.d, a.s = rows, fdev((rows, n_), np.int8), fdev((rows, n_ // 32)), fdev((rows, n_ // 32))
        return a

    w_router = fdev((E, n))
    wg = fdev((E * (2 if fused else 1) * f * spec(q).row_bytes(n),), np.uint8)
    wu = None if fused else fdev((E * f * spec(q).row_bytes(n),), np.uint8)
    wd = fdev((E * n * spec(qd).row_bytes(f),), np.uint8)
    ids, p, logits, rcnt = fdev((1, k), np.int32), fdev((1, k)), fdev((1, E)), fdev(1, np.int32)
    act, actq, gcnt = fdev((k, f)), q8_rows(f, k), fdev(k * f // 32, np.int32)
    x, delta, wn, h, hq = fdev(n), fdev(n), fdev(n), fdev((1, n)), fq8(n)
    y, w_next, h2, hq2, tcnt, chain = fdev(n), fdev(n), fdev(n), fq8(n), fdev(1, np.int32), fdev(8, np.int32)
    scale = None if prenorm else fdev(E)
    route = dict(w_router=w_router, h=h, k=k, ids_out=ids, weights_out=p, scratch=logits, counter=rcnt, n_expert=E,
                 expert_scale=scale, prenorm=(x, delta, wn, 1e-6, hq) if prenorm else None)
    gate_in = hq if prenorm else fq8(n)
    gate_up = dict(w_gate=wg, w_up=wu, qtype=q, h=gate_in, ids=ids, n_ff=f, out=act, act=glu, out_q8=actq,
                   counters=gcnt)
    tail = FfnTailArgs(y, None, None, None, None, x, None, 1e-6, tcnt, (w_next, h2, hq2), post_norm=False)
    down = dict(w_down=wd, qtype=qd, act=actq, ids=ids, weights=p, n_out=n, out=y, tail=tail)
    rg.routed_experts(route, gate_up, chain, down=down, stream=FakeStream())
    (kernel, named), = Recorder.calls
    got = {name: _addr(v) for name, v in named.items() if name != "stream"}
    assert isinstance(kernel, rg.RoutedExperts) and kernel.down is not None and kernel.k == k
    assert kernel.router.prenorm == prenorm and kernel.router.expert_scale == (not prenorm)
    assert (got["pRw"], got["pH"], got["pScratch"], got["pRcnt"]) == (w_router.ptr, h.ptr, logits.ptr, rcnt.ptr)
    assert got["pIds"] == got["pGids"] == got["pDids"] == ids.ptr  # the router's ids feed both expert phases
    assert got["pWeights"] == got["pDw"] == p.ptr                  # its weights the down projection
    if prenorm:
        assert (got["pX"], got["pDelta"], got["pNormW"]) == (x.ptr, delta.ptr, wn.ptr)
        assert got["pQ"] == got["pGxq"] == hq.qs.ptr and got["pQd"] == got["pGxd"] == hq.d.ptr
    else:
        assert got["pScale"] == scale.ptr and got["pGxq"] == gate_in.qs.ptr
    assert (got["pWg"], got["pAct"], got["pCnt"]) == (wg.ptr, act.ptr, gcnt.ptr)
    assert got["pWu"] == (wg if wu is None else wu).ptr
    assert got["pAq"] == got["pDaq"] == actq.qs.ptr and got["pAd"] == got["pDad"] == actq.d.ptr  # gate/up -> down
    assert (got["pWd"], got["pY"], got["n_slots"], got["tCnt"]) == (wd.ptr, y.ptr, k, tcnt.ptr)
    body = [p_ for p_ in inspect.signature(type(kernel.down.tail).body).parameters if p_ != "self"][:12]
    chain_args = {name: got[f"t{i}"] for i, name in enumerate(body)}
    assert chain_args["pF"] == y.ptr and chain_args["pX"] == x.ptr and chain_args["pH"] == h2.ptr  # down -> tail
    assert got["pChain"] == chain.ptr and got["eps"] == pytest.approx(1e-6 if prenorm else 0.0)
