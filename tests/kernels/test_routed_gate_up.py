"""kernels/routed_gate_up.py: the router and the routed experts' gate/up projection in one launch.

CPU: the wrapper refuses what the kernel cannot do (more than one token, ids the router does not write, a short or
misaligned chain state), and the kernel class refuses a router / gate-up pair that cannot share a grid.
GPU: every output of the one launch is bit-identical to the two launches it replaces (router.py ``route_gemv`` then
moe_ffn.py ``moe_gate_up``, which have their own reference tests), on the three registered shapes (Qwen3-30B-A3B's
chunk kernel with the pre-FFN norm, the synthetic tiny file's slice kernel, Gemma 4 26B-A4B's fused GeGLU experts with
per-expert scales); outputs poisoned first; the chain state, the router's and the q8_1 arrival counters are back at
zero after each launch, and a second launch from that state (new inputs) holds the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.kernels import routed_gate_up as rg

SHAPES = {  # name: (n_expert, n_embd, n_ff, k, qtype, fused, glu, prenorm (Qwen) or expert scale (Gemma 4))
    "qwen3_30b": (128, 2048, 768, 8, "Q4_K", False, "silu", True),
    "qwen3_tiny": (16, 256, 256, 4, "Q4_K", False, "silu", True),
    "gemma4_26b": (128, 2816, 704, 8, "Q4_K", True, "gelu_tanh", False),
}


def test_registered_configs_cover_both_basket_models():
    """The compile gate builds the Qwen (chunk, prenorm) and Gemma 4 (slice, expert scale, GeGLU) variants."""
    cfgs = rg._configs()
    routers = [dict(c["router"]) for c in cfgs]
    assert any(r.get("prenorm_q8") for r in routers) and any(r.get("expert_scale") for r in routers)
    assert {c["mapping"] for c in cfgs} == {"chunk", "slice"}


def test_kernel_refuses_mismatched_phases():
    from sparkinfer_cute.kernels.moe_ffn_chunk import MoeGateUpChunk
    from sparkinfer_cute.kernels.router import RouterGemvTopK

    g = MoeGateUpChunk("Q4_K", 2048, 768, q8=True)
    with pytest.raises(ValueError, match="picks 8 experts"):
        rg.RoutedGateUp(RouterGemvTopK(128, 2048, 8), g, 4)
    kern = rg.RoutedGateUp(RouterGemvTopK(128, 2048, 8), g, 8)
    assert kern.n_ctas == kern.n_route + kern.n_x * 8 and kern.n_x * g.rows_per_cta >= 768


def _inputs(name, rng):
    from sparkinfer_cute.runtime import DeviceArray
    from tests.kernels.test_moe_ffn import experts

    E, n, f, k, q, fused, glu, prenorm = SHAPES[name]
    w_router = DeviceArray.from_numpy((rng.standard_normal((E, n)) / np.sqrt(n)).astype(np.float32))
    g, u = experts(q, E, f, n, rng), experts(q, E, f, n, rng)
    wg, wu = ((np.concatenate([g, u], axis=1), None) if fused else (g, u))
    wg = DeviceArray.from_numpy(np.ascontiguousarray(wg))
    wu = None if wu is None else DeviceArray.from_numpy(np.ascontiguousarray(wu))
    scale = None if prenorm else DeviceArray.from_numpy(rng.uniform(0.5, 2.0, E).astype(np.float32))
    return w_router, wg, wu, scale


def _q8(n, rows=1):
    from sparkinfer_cute.kernels.q8_1 import Q8Act

    a = Q8Act(rows, n)
    a.qs.fill_bytes(0x7F)
    a.d.fill_bytes(0xFF)
    a.s.fill_bytes(0xFF)
    return a


def _run(name, weights, x0, delta0, e_in0, fused_launch, chain=None, state=None):
    """One MoE step's routing + gate/up on fresh copies of the inputs: two launches, or one (``fused_launch``).
    Returns every output as numpy (f32 as uint32 bits)."""
    from sparkinfer_cute.kernels.moe_ffn import moe_gate_up
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.router import route_gemv
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    E, n, f, k, q, fused, glu, prenorm = SHAPES[name]
    w_router, wg, wu, scale = weights
    rcnt, gcnt = state
    ids, p, logits = poisoned((1, k), np.int32), poisoned((1, k), np.float32), poisoned((1, E), np.float32)
    act, actq = poisoned((k, f), np.float32), _q8(f, k)
    if prenorm:  # Qwen: the router forms h = rmsnorm(x + delta) * w_norm and its q8_1 copy, the experts read that
        x, delta, wn = (DeviceArray.from_numpy(a) for a in (x0, delta0, e_in0))
        h, hq = poisoned((1, n), np.float32), _q8(n)
        pre, gate_in = (x, delta, wn, 1e-6, hq), hq
    else:  # Gemma 4: the router's input and the experts' (another norm of x1, with its q8_1 copy) are given
        x = None
        h = DeviceArray.from_numpy(x0.reshape(1, n))
        pre, gate_in, hq = None, quantize_q8_1(DeviceArray.from_numpy(e_in0)), None
    route = dict(w_router=w_router, h=h, k=k, ids_out=ids, weights_out=p, scratch=logits, counter=rcnt, n_expert=E,
                 expert_scale=scale, prenorm=pre)
    gate_up = dict(w_gate=wg, w_up=wu, qtype=q, h=gate_in, ids=ids, n_ff=f, out=act, act=glu, out_q8=actq,
                   counters=gcnt)
    if fused_launch:
        rg.routed_gate_up(route, gate_up, chain)
    else:
        route_gemv(**route)
        moe_gate_up(**gate_up)
    out = {"ids": ids.to_numpy(), "weights": p.to_numpy().view(np.uint32), "logits": logits.to_numpy().view(np.uint32),
           "act": act.to_numpy().view(np.uint32)}
    out.update(zip(("act_qs", "act_d", "act_s"), (a.view(np.uint8) for a in actq.to_numpy())))
    if prenorm:
        out["x"] = x.to_numpy().view(np.uint32)
        out["h"] = h.to_numpy().view(np.uint32)
        out.update(zip(("h_qs", "h_d", "h_s"), (a.view(np.uint8) for a in hq.to_numpy())))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SHAPES))
def test_one_launch_equals_the_two_it_replaces(name):
    from sparkinfer_cute.runtime import DeviceArray

    E, n, f, k, q, fused, glu, prenorm = SHAPES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    weights = _inputs(name, rng)
    chain = rg.new_chain_state()
    state = (DeviceArray.zeros((1,), np.int32), DeviceArray.zeros((k * f // 32,), np.int32))
    for step in range(2):
        x0 = rng.standard_normal(n).astype(np.float32)
        delta0 = (0.5 * rng.standard_normal(n)).astype(np.float32)
        third = ((1 + 0.3 * rng.standard_normal(n)) if prenorm else rng.standard_normal(n)).astype(np.float32)
        two = _run(name, weights, x0, delta0, third, False, state=state)
        one = _run(name, weights, x0, delta0, third, True, chain=chain, state=state)
        for key in two:
            np.testing.assert_array_equal(one[key], two[key], err_msg=f"{name} step {step}: {key}")
        assert len(set(two["ids"].reshape(-1).tolist())) == k, "the router picked k distinct experts"
        assert (chain.to_numpy() == 0).all(), f"chain state not reset: {chain.to_numpy()}"
        assert (state[0].to_numpy() == 0).all() and (state[1].to_numpy() == 0).all(), "arrival counters not reset"


def test_wrapper_refuses_what_the_kernel_cannot_do(monkeypatch):
    """One token per launch, the gate/up must read the router's ids, the chain state must be 4 aligned int32: each a
    one-line ValueError before anything is compiled or launched (fake device buffers: no GPU needed)."""
    import sparkinfer_cute.kernels.router as router
    import sparkinfer_cute.runtime as runtime

    monkeypatch.setattr(runtime, "resolve_stream", lambda s: s)

    class Buf:
        def __init__(self, shape, ptr=0x1000, nbytes=None, dtype=np.float32):
            self.shape, self.ptr, self.dtype = shape, ptr, dtype
            self.nbytes = nbytes if nbytes is not None else 4 * int(np.prod(shape))
            self.size = int(np.prod(shape))

    def plan(T, ids):
        return router.RouteGemvLaunch({}, (), T, ids, None, False, ())

    ids = Buf((1, 8))
    monkeypatch.setattr(router, "plan_route_gemv", lambda **kw: plan(2, ids))
    with pytest.raises(ValueError, match="one token"):
        rg.routed_gate_up({}, {"ids": ids}, Buf((4,), dtype=np.int32), stream=0)
    monkeypatch.setattr(router, "plan_route_gemv", lambda **kw: plan(1, ids))
    with pytest.raises(ValueError, match="ids the router writes"):
        rg.routed_gate_up({}, {"ids": Buf((1, 8))}, Buf((4,), dtype=np.int32), stream=0)
    with pytest.raises(ValueError, match="chain state"):
        rg.routed_gate_up({}, {"ids": ids}, Buf((2,), dtype=np.int32), stream=0)
    with pytest.raises(ValueError, match="chain state"):
        rg.routed_gate_up({}, {"ids": ids}, Buf((4,), ptr=0x1004, dtype=np.int32), stream=0)
