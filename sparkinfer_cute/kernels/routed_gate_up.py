"""MoE routing and the routed experts' gate/up projection in ONE launch (decode, one token).

A decode step ran them as two launches: router.py :class:`RouterGemvTopK` (router GEMV, softmax / top-k, for Qwen3-MoE
also the pre-FFN norm with its residual add), then moe_ffn_chunk.py :class:`MoeGateUpChunk`, whose CTAs need the
expert ids the first launch writes. Here one grid runs both, in two phases ordered by **tickets**:

- every CTA first takes a ticket, ``atom.add`` on ``chain[0]`` (the order in which CTAs *start*; block indices carry
  no such guarantee);
- tickets ``0 .. n_route - 1`` run the router's CTAs (:meth:`RouterGemvTopK.route`); its last CTA, after writing the
  ids, weights and (prenorm) x, h and h's q8_1 copy, stores 1 into ``chain[1]`` with release semantics;
- the other tickets run the gate/up CTAs (:meth:`MoeGateUpChunk.rows`, ticket ``n_route + slot * n_x + x``): thread 0
  spins on ``chain[1]`` with acquire loads (and ``nanosleep``) before the CTA reads ids or activations.

Deadlock-free at any residency (the argument of CUB's single-pass scan): a waiting CTA holds a ticket above every
router CTA's, so every CTA it waits for has already started and runs to its end without waiting itself.

Graph-replayable: the CTA that draws the last ticket puts ``chain[0]`` back to zero; the gate/up CTAs count
themselves in ``chain[2]`` once past the wait, and the last of them puts ``chain[1]`` and ``chain[2]`` back to zero.
The next launch on the stream starts after this grid has completed (stream order; with PDL its
``griddepcontrol.wait``), so it finds all three at zero. One zeroed ``int32[4]`` serves every layer.

What this saves is one kernel boundary per MoE layer (the launch gap and the experts' ramp after the router's
drain); what it costs is the gate/up CTAs' spin, which runs while the router works and replaces the boundary's idle
time. Both phases compute exactly what their own kernels compute (the same device code), so the outputs are
bit-identical to the two launches (tests/kernels/test_routed_gate_up.py, GPU).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import numpy as np
import cutlass.cute as cute
from cutlass import Float32, Int8, Int32, Uint8

from .common import fake_ptr, gptr, nanosleep, pdl_prologue
from .compile import compile_options, kernel_cache
from .moe_ffn import MoeGateUp
from .moe_ffn_chunk import MoeGateUpChunk, q8_out_fake_ptrs
from .registry import register
from .router import RouterGemvTopK

TICKET, READY, PASSED = 0, 1, 2  # the int32 slots of the chain state
CHAIN_INTS = 4  # its size (one slot spare, 16 bytes)
_SPIN_NS = 64  # nanosleep between two polls of the ready flag: short against the router's ~5 us, light on L2


class RoutedGateUp:
    """Static config: the router (a :class:`RouterGemvTopK` for one token) and the gate/up kernel it feeds
    (moe_ffn_chunk.py :class:`MoeGateUpChunk` or moe_ffn.py :class:`MoeGateUp`: what their own launch would run), and
    ``k`` (routed experts: the gate/up grid's slots)."""

    def __init__(self, router: RouterGemvTopK, gate_up: MoeGateUp | MoeGateUpChunk, k: int):
        if router.k != k:
            raise ValueError(f"the router picks {router.k} experts, the gate/up grid has {k} slots")
        if router.threads != gate_up.WARPS * 32:
            raise ValueError("router and gate/up CTAs must have the same size")
        self.pdl = router.pdl and gate_up.pdl
        self.router, self.gate_up, self.k = router, gate_up, k
        self.n_route = router.n_ctas
        self.n_x = -(-gate_up.n_ff // gate_up.rows_per_cta)  # gate/up CTAs per slot
        self.n_ctas = self.n_route + self.n_x * k
        self.threads = router.threads

    @cute.jit
    def __call__(self, pRw: cute.Pointer, pH: cute.Pointer, pScratch: cute.Pointer, pRcnt: cute.Pointer,
                 pIds: cute.Pointer, pWeights: cute.Pointer, pScale: cute.Pointer, pX: cute.Pointer,
                 pDelta: cute.Pointer, pNormW: cute.Pointer, pQ: cute.Pointer, pQd: cute.Pointer, pQs: cute.Pointer,
                 eps: Float32, pWg: cute.Pointer, pWu: cute.Pointer, pGx: cute.Pointer, pGxq: cute.Pointer,
                 pGxd: cute.Pointer, pGxs: cute.Pointer, pGids: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer,
                 pAs: cute.Pointer, pCnt: cute.Pointer, pChain: cute.Pointer, stream: cuda.CUstream):
        tensors = self.router.tensors(pRw, pH, pScratch, pRcnt, pIds, pWeights, pScale, pX, pDelta, pNormW, pQ, pQd,
                                      pQs, 1)
        self.kernel(*tensors, eps, pWg, pWu, pGx, pGxq, pGxd, pGxs, pGids, pAct, pAq, pAd, pAs, pCnt, pChain).launch(
            grid=[self.n_ctas, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mRw: cute.Tensor, mH: cute.Tensor, mS: cute.Tensor, mRcnt: cute.Tensor, mI: cute.Tensor,
               mP: cute.Tensor, mScale: cute.Tensor, mX: cute.Tensor, mD: cute.Tensor, mNw: cute.Tensor,
               mQ: cute.Tensor, mQd: cute.Tensor, mQs: cute.Tensor, eps: Float32, pWg: cute.Pointer,
               pWu: cute.Pointer, pGx: cute.Pointer, pGxq: cute.Pointer, pGxd: cute.Pointer, pGxs: cute.Pointer,
               pGids: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer, pCnt: cute.Pointer,
               pChain: cute.Pointer):
        pdl_prologue(self.pdl)
        tid, _, _ = cute.arch.thread_idx()
        red_v, red_i, sFlag = RouterGemvTopK.shared()
        # ---- the ticket: this CTA's place in the start order ----
        if tid == 0:
            t = cute.arch.atomic_add((pChain + TICKET).llvm_ptr, Int32(1), sem="relaxed", scope="gpu")
            sFlag[0] = t
            if t == self.n_ctas - 1:
                cute.arch.store((pChain + TICKET).llvm_ptr, Int32(0))  # every ticket is drawn: zero for the next launch
        cute.arch.barrier()
        ticket = sFlag[0]
        cute.arch.barrier()  # sFlag is the router's arrival flag below
        if ticket < self.n_route:
            self.router.route(ticket, Int32(0), mRw, mH, mS, mRcnt, mI, mP, mScale, mX, mD, mNw, mQ, mQd, mQs, eps,
                              red_v, red_i, sFlag, pChain + READY, True)
        else:
            if tid == 0:
                ready = cute.arch.load((pChain + READY).llvm_ptr, Int32, sem="acquire", scope="gpu")
                while ready == Int32(0):
                    nanosleep(_SPIN_NS)
                    ready = cute.arch.load((pChain + READY).llvm_ptr, Int32, sem="acquire", scope="gpu")
                cute.arch.fence_acq_rel_gpu()
                passed = cute.arch.atomic_add((pChain + PASSED).llvm_ptr, Int32(1), sem="relaxed", scope="gpu")
                if passed == self.n_x * self.k - 1:  # every gate/up CTA is past the wait: zero both
                    cute.arch.store((pChain + READY).llvm_ptr, Int32(0))
                    cute.arch.store((pChain + PASSED).llvm_ptr, Int32(0))
            cute.arch.barrier()  # the routing is visible to the whole CTA from here
            g = ticket - self.n_route
            slot = g // self.n_x
            warp = tid // 32
            self.gate_up.rows(g - slot * self.n_x, slot, warp, tid % 32, pWg, pWu, pGx, pGxq, pGxd, pGxs, pGids,
                              pAct, pAq, pAd, pAs, pCnt)


@kernel_cache
def compile_routed_gate_up(router: tuple, gate_up: tuple, k: int, mapping: str = "chunk"):
    """Compile :class:`RoutedGateUp` (``router``, ``gate_up``: the sorted keyword items of router.py
    :func:`compile_router_gemv` and of moe_ffn_chunk.py :func:`compile_moe_gate_up_chunk` (``mapping`` "chunk") or
    moe_ffn.py :func:`compile_moe_gate_up` ("slice")). Runtime args: the router's up to ``eps``; the gate/up
    kernel's (Wg, Wu, x, xq, xd, xs, ids, act, aq, ad, as, counters); the chain state (int32, 16-byte aligned); the
    stream."""
    r = RouterGemvTopK(**dict(router))
    g = (MoeGateUpChunk if mapping == "chunk" else MoeGateUp)(**dict(gate_up))
    return cute.compile(RoutedGateUp(r, g, k),
                        fake_ptr(Float32, 16), fake_ptr(Float32, 16), fake_ptr(Float32, 4), fake_ptr(Int32, 4),
                        fake_ptr(Int32, 4), fake_ptr(Float32, 4), fake_ptr(Float32, 4), fake_ptr(Float32, 16),
                        fake_ptr(Float32, 16), fake_ptr(Float32, 16), fake_ptr(Int8, 4), fake_ptr(Float32, 4),
                        fake_ptr(Float32, 4), Float32(1e-6),
                        gptr(Uint8, 0), gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0),
                        gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0), *q8_out_fake_ptrs(), gptr(Int32, 0, 16),
                        cute.runtime.make_fake_stream(), options=compile_options())


def new_chain_state():
    """The zeroed int32 state one :func:`routed_gate_up` launch after another shares (each leaves it zero)."""
    from ..runtime import DeviceArray

    return DeviceArray.zeros((CHAIN_INTS,), np.int32)


def routed_gate_up(route: dict, gate_up: dict, chain, *, stream=None):
    """Router and routed experts' gate/up projection in one launch (:class:`RoutedGateUp`), for one token.

    ``route``: the keywords of router.py :func:`route_gemv` (``ids_out``, ``weights_out``, ``scratch`` and
    ``counter`` given: nothing is allocated, CUDA-graph safe); ``gate_up``: those of moe_ffn.py ``moe_gate_up``,
    whose ``ids`` must be the router's ``ids_out``. ``chain``: :func:`new_chain_state`'s buffer, zero before the launch (the
    launch leaves it zero). Outputs: those of both calls, bit-identical to the two launches."""
    from ..runtime import resolve_stream
    from .moe_ffn import moe_gate_up
    from .router import plan_route_gemv

    st = resolve_stream(stream)
    plan = plan_route_gemv(**route, stream=st)
    if plan.n_tokens != 1:
        raise ValueError(f"routed_gate_up routes one token per launch, got {plan.n_tokens}")
    if gate_up.get("ids") is not plan.ids:
        raise ValueError("routed_gate_up: the gate/up projection must read the ids the router writes (ids_out)")
    if chain.nbytes < 4 * CHAIN_INTS or chain.ptr % 16:
        raise ValueError(f"routed_gate_up: the chain state is {CHAIN_INTS} int32, 16-byte aligned")
    mapping, cfg, args, k, keep = moe_gate_up(**gate_up, stream=st, plan_only=True)
    fn = compile_routed_gate_up(tuple(sorted(plan.cfg.items())), tuple(sorted(cfg.items())), k, mapping)
    fn(*plan.args, *args, gptr(Int32, chain.ptr, 16), cuda.CUstream(st.handle))
    del keep  # numpy inputs uploaded by the planning above live until the launch is queued, as in their own wrappers


def _configs():
    from .moe_ffn_chunk import gate_up_rows_per_warp

    def items(**kw):
        return tuple(sorted(kw.items()))

    out = []
    # Qwen3-30B-A3B: the pre-FFN norm formed by the router (+ the experts' q8_1 input), int8 experts writing their
    # output's q8_1 copy; the synthetic tiny file's shape (16 experts of 256, top 4)
    for E, n, f, k, mapping in ((128, 2048, 768, 8, "chunk"), (16, 256, 256, 4, "slice")):
        chunk = dict(rows_per_warp=gate_up_rows_per_warp(True), x_loads_first=False) if mapping == "chunk" else {}
        out.append(dict(router=items(n_expert=E, n_embd=n, k=k, norm_topk=True, warps_per_row=0, prenorm=True,
                                     prenorm_q8=True),
                        gate_up=items(qtype="Q4_K", n_in=n, n_ff=f, fused=False, q8=True, act="silu",
                                      quantize_out=True, **chunk), k=k, mapping=mapping))
    # Gemma 4 26B-A4B: per-expert down scale folded into the weights, fused gate|up experts with GeGLU
    # (n_in 2816 is not whole warps of 1024-element chunks: the slice kernel)
    out.append(dict(router=items(n_expert=128, n_embd=2816, k=8, norm_topk=True, warps_per_row=0, expert_scale=True),
                    gate_up=items(qtype="Q4_K", n_in=2816, n_ff=704, fused=True, q8=True, act="gelu_tanh",
                                  quantize_out=True), k=8, mapping="slice"))
    return out


register("routed_gate_up", compile_routed_gate_up, _configs())
