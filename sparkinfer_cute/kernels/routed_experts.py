"""MoE routing, the routed experts' gate/up and (optionally) their down projection in ONE launch (decode, one token).

A decode step ran them as three launches: router_gemv.py :class:`RouterGemvTopK` (router GEMV, softmax / top-k, for
Qwen3-MoE also the pre-FFN norm with its residual add), then the gate/up kernel (moe_ffn_chunk.py
:class:`MoeGateUpChunk` or moe_ffn.py :class:`MoeGateUp`), whose CTAs need the expert ids the first launch writes,
then the down kernel (:class:`MoeDownChunk` / :class:`MoeDown`, with its norm-chain tail), whose CTAs need every
expert's activations. Here one grid runs them as phases ordered by **tickets**:

- every CTA first takes a ticket, ``atom.add`` on ``chain[TICKET]`` (the order in which CTAs *start*; block indices
  carry no such guarantee);
- tickets ``0 .. n_route - 1`` run the router's CTAs (:meth:`RouterGemvTopK.route`); its last CTA, after writing the
  ids, weights and (prenorm) x, h and h's q8_1 copy, stores 1 into ``chain[READY]`` with release semantics;
- the next ``n_gate`` tickets run the gate/up CTAs (their kernel's ``rows``, ticket ``n_route + slot * n_x + x``):
  thread 0 spins on ``chain[READY]`` with acquire loads (and ``nanosleep``) before the CTA reads ids or activations;
  with the down phase, each such CTA then counts itself done in ``chain[DONE]`` (release) once its activations and
  their q8_1 blocks are written;
- (``down``) the last ``n_down`` tickets run the down CTAs, which spin until ``chain[DONE]`` is ``n_gate``; the
  down kernel's tail (the next norms) runs on the last of *them* to finish (norm_chain.py ``tail`` ``arrivals``).

Deadlock-free at any residency (the argument of CUB's single-pass scan): a waiting CTA holds a ticket above every
CTA it waits for, so those have all started, and each runs to its end waiting only on CTAs with lower tickets still.

Graph-replayable: the CTA that draws the last ticket puts ``chain[TICKET]`` back to zero; the CTAs of a waiting
phase count themselves in ``chain[PASSED]`` / ``chain[PASSED_DOWN]`` once past their wait, and the last of them puts
the flag they waited on and that count back to zero. The next launch on the stream starts after this grid has
completed (stream order; with PDL its ``griddepcontrol.wait``), so it finds every slot at zero. One zeroed
``int32[CHAIN_INTS]`` serves every layer.

What this was meant to save is one kernel boundary per phase; what it costs is the hand-off (a flag polled through
L2) and every phase running at the largest phase's register count. Measured on an H100 with PDL, the cost is the
larger: 31.5 / 36.9 µs for two / three phases against 27.1 µs as three launches at the Qwen3-30B shape, 321.0 against
374.2 tok/s end to end (RESULTS.md, 2026-12-08), so models/ops.py keeps its passes off by default. Every phase
computes exactly what its own kernel computes (the same device code), so the outputs are bit-identical to the
separate launches (tests/kernels/test_routed_experts.py, passed on the H100).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int8, Int32, Uint8

from .common import fake_ptr, gptr, nanosleep, pdl_prologue, trap
from .compile import compile_options, kernel_cache
from .moe_ffn import MoeDown, MoeGateUp
from .moe_ffn_chunk import MoeDownChunk, MoeGateUpChunk, q8_out_fake_ptrs
from .norm_chain import FfnTail, tail_fake_args
from .registry import register
from .router_gemv import RouterGemvTopK

TICKET, READY, PASSED, DONE, PASSED_DOWN = range(5)  # the int32 slots of the chain state
CHAIN_INTS = 8  # its size (32 bytes; three slots spare)
_SPIN_NS = 64  # nanosleep between two polls of a flag: short against a phase's microseconds, light on L2
_MAX_POLLS = 1 << 23  # seconds of polling (>= 64 ns each): a wait no correct launch comes near


@cute.jit
def _wait_at_least(p: cute.Pointer, target: Int32, count: cute.Pointer, waiters: cutlass.Constexpr[int]):
    """Thread 0 of a CTA (the caller barriers after it): poll ``p[0]`` with GPU-scope acquire loads until it is at
    least ``target``, then count this CTA in ``count[0]``; the ``waiters``-th CTA to pass zeroes both for the next
    launch (every waiter of this launch has passed by then). After ``_MAX_POLLS`` polls the kernel traps."""
    v = cute.arch.load(p.llvm_ptr, Int32, sem="acquire", scope="gpu")
    polls = Int32(0)
    while v < target:
        nanosleep(_SPIN_NS)
        v = cute.arch.load(p.llvm_ptr, Int32, sem="acquire", scope="gpu")
        polls = polls + 1
        if polls == _MAX_POLLS:
            trap()  # a phase that never finishes is a bug: an error at the next synchronization, not a hung GPU
    cute.arch.fence_acq_rel_gpu()
    passed = cute.arch.atomic_add(count.llvm_ptr, Int32(1), sem="relaxed", scope="gpu")
    if passed == waiters - 1:
        cute.arch.store(p.llvm_ptr, Int32(0))
        cute.arch.store(count.llvm_ptr, Int32(0))


class RoutedExperts:
    """Static config: the router (a :class:`RouterGemvTopK` for one token), the gate/up kernel it feeds
    (:class:`MoeGateUpChunk` or :class:`MoeGateUp`), ``k`` (routed experts: the gate/up grid's slots) and, for the
    third phase, the down kernel (:class:`MoeDownChunk` or :class:`MoeDown`, its tail included) or None: what their
    own launches would run."""

    def __init__(self, router: RouterGemvTopK, gate_up: MoeGateUp | MoeGateUpChunk, k: int,
                 down: MoeDown | MoeDownChunk | None = None):
        if router.k != k:
            raise ValueError(f"the router picks {router.k} experts, the gate/up grid has {k} slots")
        if router.threads != gate_up.WARPS * 32 or (down is not None and down.WARPS != gate_up.WARPS):
            raise ValueError("the phases' CTAs must have the same size")
        self.pdl = router.pdl and gate_up.pdl
        self.router, self.gate_up, self.k, self.down = router, gate_up, k, down
        self.n_route = router.n_ctas
        self.n_x = -(-gate_up.n_ff // gate_up.rows_per_cta)  # gate/up CTAs per slot
        self.n_gate = self.n_x * k
        self.n_down = -(-down.n_out // down.rows_per_cta) if down is not None else 0
        self.n_ctas = self.n_route + self.n_gate + self.n_down
        self.threads = router.threads

    @cute.jit
    def __call__(self, pRw: cute.Pointer, pH: cute.Pointer, pScratch: cute.Pointer, pRcnt: cute.Pointer,
                 pIds: cute.Pointer, pWeights: cute.Pointer, pScale: cute.Pointer, pX: cute.Pointer,
                 pDelta: cute.Pointer, pNormW: cute.Pointer, pQ: cute.Pointer, pQd: cute.Pointer, pQs: cute.Pointer,
                 eps: Float32, pWg: cute.Pointer, pWu: cute.Pointer, pGx: cute.Pointer, pGxq: cute.Pointer,
                 pGxd: cute.Pointer, pGxs: cute.Pointer, pGids: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer,
                 pAd: cute.Pointer, pAs: cute.Pointer, pCnt: cute.Pointer, pWd: cute.Pointer, pDa: cute.Pointer,
                 pDaq: cute.Pointer, pDad: cute.Pointer, pDas: cute.Pointer, pDids: cute.Pointer, pDw: cute.Pointer,
                 pResid: cute.Pointer, pY: cute.Pointer, n_slots: Int32, tCnt: cute.Pointer, t0: cute.Pointer,
                 t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer,
                 t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer,
                 t11: cute.Pointer, teps: Float32, pChain: cute.Pointer, stream: cuda.CUstream):
        tensors = self.router.tensors(pRw, pH, pScratch, pRcnt, pIds, pWeights, pScale, pX, pDelta, pNormW, pQ, pQd,
                                      pQs, 1)
        self.kernel(*tensors, eps, pWg, pWu, pGx, pGxq, pGxd, pGxs, pGids, pAct, pAq, pAd, pAs, pCnt, pWd, pDa, pDaq,
                    pDad, pDas, pDids, pDw, pResid, pY, n_slots, tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10,
                    t11, teps, pChain).launch(grid=[self.n_ctas, 1, 1], block=[self.threads, 1, 1], stream=stream,
                                              use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mRw: cute.Tensor, mH: cute.Tensor, mS: cute.Tensor, mRcnt: cute.Tensor, mI: cute.Tensor,
               mP: cute.Tensor, mScale: cute.Tensor, mX: cute.Tensor, mD: cute.Tensor, mNw: cute.Tensor,
               mQ: cute.Tensor, mQd: cute.Tensor, mQs: cute.Tensor, eps: Float32, pWg: cute.Pointer,
               pWu: cute.Pointer, pGx: cute.Pointer, pGxq: cute.Pointer, pGxd: cute.Pointer, pGxs: cute.Pointer,
               pGids: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer,
               pCnt: cute.Pointer, pWd: cute.Pointer, pDa: cute.Pointer, pDaq: cute.Pointer, pDad: cute.Pointer,
               pDas: cute.Pointer, pDids: cute.Pointer, pDw: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer,
               n_slots: Int32, tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer, t2: cute.Pointer,
               t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer, t7: cute.Pointer,
               t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer, teps: Float32,
               pChain: cute.Pointer):
        pdl_prologue(self.pdl)
        tid, _, _ = cute.arch.thread_idx()
        warp, lane = tid // 32, tid % 32
        red_v, red_i, sFlag = RouterGemvTopK.shared()
        # ---- the ticket: this CTA's place in the start order ----
        if tid == 0:
            t = cute.arch.atomic_add((pChain + TICKET).llvm_ptr, Int32(1), sem="relaxed", scope="gpu")
            sFlag[0] = t
            if t == self.n_ctas - 1:
                cute.arch.store((pChain + TICKET).llvm_ptr, Int32(0))  # every ticket is drawn: zero for the next
        cute.arch.barrier()
        ticket = sFlag[0]
        cute.arch.barrier()  # sFlag is the router's arrival flag below
        if ticket < self.n_route:
            self.router.route(ticket, Int32(0), mRw, mH, mS, mRcnt, mI, mP, mScale, mX, mD, mNw, mQ, mQd, mQs, eps,
                              red_v, red_i, sFlag, pChain + READY, True)
        elif ticket < self.n_route + self.n_gate:
            if tid == 0:
                _wait_at_least(pChain + READY, Int32(1), pChain + PASSED, self.n_gate)
            cute.arch.barrier()  # the routing is visible to the whole CTA from here
            g = ticket - self.n_route
            slot = g // self.n_x
            self.gate_up.rows(g - slot * self.n_x, slot, warp, lane, pWg, pWu, pGx, pGxq, pGxd, pGxs, pGids, pAct,
                              pAq, pAd, pAs, pCnt)
            if cutlass.const_expr(self.down is not None):
                cute.arch.barrier()  # the CTA's act stores (and any q8_1 block it completed) before the release
                if tid == 0:
                    cute.arch.fence_acq_rel_gpu()
                    cute.arch.atomic_add((pChain + DONE).llvm_ptr, Int32(1), sem="release", scope="gpu")
        else:
            if cutlass.const_expr(self.down is not None):
                if tid == 0:
                    _wait_at_least(pChain + DONE, Int32(self.n_gate), pChain + PASSED_DOWN, self.n_down)
                cute.arch.barrier()  # every expert's activations are visible to the whole CTA from here
                self.down.rows(ticket - self.n_route - self.n_gate, warp, lane, pWd, pDa, pDaq, pDad, pDas, pDids,
                               pDw, pResid, pY, n_slots, tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11,
                               teps, self.n_down)


_DOWN = {"chunk": MoeDownChunk, "slice": MoeDown}
_GATE_UP = {"chunk": MoeGateUpChunk, "slice": MoeGateUp}


@kernel_cache
def compile_routed_experts(router: tuple, gate_up: tuple, k: int, mapping: str = "chunk", down: tuple = (),
                           down_mapping: str = "chunk"):
    """Compile :class:`RoutedExperts` (``router``, ``gate_up``, ``down``: the sorted keyword items of router_gemv.py
    :func:`compile_router_gemv`, of the gate/up kernel's compile function of ``mapping`` (moe_ffn_chunk.py
    :func:`compile_moe_gate_up_chunk`, "chunk"; moe_ffn.py :func:`compile_moe_gate_up`, "slice") and of the down
    kernel's of ``down_mapping``; ``down`` empty: no down phase). Runtime args: the router's up to ``eps``; the
    gate/up kernel's (Wg, Wu, x, xq, xd, xs, ids, act, aq, ad, as, counters); the down kernel's (W, act, aq, ad, as,
    ids, weights, resid, y, n_slots, the tail's arguments; any valid pointers without ``down``); the chain state
    (int32, 16-byte aligned); the stream."""
    r = RouterGemvTopK(**dict(router))
    g = _GATE_UP[mapping](**dict(gate_up))
    d = _DOWN[down_mapping](**dict(down)) if down else None
    return cute.compile(RoutedExperts(r, g, k, d),
                        fake_ptr(Float32, 16), fake_ptr(Float32, 16), fake_ptr(Float32, 4), fake_ptr(Int32, 4),
                        fake_ptr(Int32, 4), fake_ptr(Float32, 4), fake_ptr(Float32, 4), fake_ptr(Float32, 16),
                        fake_ptr(Float32, 16), fake_ptr(Float32, 16), fake_ptr(Int8, 4), fake_ptr(Float32, 4),
                        fake_ptr(Float32, 4), Float32(1e-6),
                        gptr(Uint8, 0), gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0),
                        gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0), *q8_out_fake_ptrs(),
                        *_down_fake_args(), gptr(Int32, 0, 16), cute.runtime.make_fake_stream(),
                        options=compile_options())


def _down_fake_args() -> tuple:
    """Compile-time stand-ins of the down phase's runtime arguments (moe_ffn.py ``moe_down`` ``plan_only``)."""
    return (gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0), gptr(Int32, 0, 4),
            gptr(Float32, 0, 4), gptr(Float32, 0), gptr(Float32, 0), Int32(1), *tail_fake_args())


def new_chain_state():
    """The zeroed int32 state one :func:`routed_experts` launch after another shares (each leaves it zero)."""
    from ..runtime import DeviceArray

    return DeviceArray.zeros((CHAIN_INTS,), np.int32)


def routed_experts(route: dict, gate_up: dict, chain, *, down: dict | None = None, stream=None):
    """Router, routed experts' gate/up and (``down``) their down projection in one launch (:class:`RoutedExperts`),
    for one token.

    ``route``: the keywords of router_gemv.py :func:`route_gemv` (``ids_out``, ``weights_out``, ``scratch`` and
    ``counter`` given: nothing is allocated, CUDA-graph safe); ``gate_up``: those of moe_ffn.py ``moe_gate_up``,
    whose ``ids`` must be the router's ``ids_out``; ``down``: those of moe_ffn.py ``moe_down`` (its ``ids`` and
    ``weights`` the router's outputs, its ``act`` the gate/up's output or its q8_1 copy; a ``tail`` runs on the last
    down CTA). ``chain``: :func:`new_chain_state`'s buffer, zero before the launch (the launch leaves it zero).
    Outputs: those of the separate calls, bit-identical."""
    from ..runtime import resolve_stream
    from .moe_ffn import moe_down, moe_gate_up
    from .router_gemv import plan_route_gemv

    st = resolve_stream(stream)
    plan = plan_route_gemv(**{k_: v for k_, v in route.items() if k_ != "stream"}, stream=st)
    if plan.n_tokens != 1:
        raise ValueError(f"routed_experts routes one token per launch, got {plan.n_tokens}")
    if gate_up.get("ids") is not plan.ids:
        raise ValueError("routed_experts: the gate/up projection must read the ids the router writes (ids_out)")
    if down is not None and (down.get("ids") is not plan.ids or down.get("weights") is not plan.weights):
        raise ValueError("routed_experts: the down projection must read the ids and weights the router writes")
    if chain.nbytes < 4 * CHAIN_INTS or chain.ptr % 16:
        raise ValueError(f"routed_experts: the chain state is {CHAIN_INTS} int32, 16-byte aligned")
    mapping, cfg, args, k, keep = moe_gate_up(**gate_up, stream=st, plan_only=True)
    down_mapping, dcfg, dargs, dkeep = "chunk", {}, _down_fake_args(), ()
    if down is not None:
        down_mapping, dcfg, dargs, dkeep = moe_down(**down, stream=st, plan_only=True)
    fn = compile_routed_experts(tuple(sorted(plan.cfg.items())), tuple(sorted(cfg.items())), k, mapping,
                                tuple(sorted(dcfg.items())), down_mapping)
    fn(*plan.args, *args, *dargs, gptr(Int32, chain.ptr, 16), cuda.CUstream(st.handle))
    del keep, dkeep  # numpy inputs uploaded by the planning above live until the launch is queued, as in their own
    # wrappers


def _configs():
    from .moe_ffn_chunk import down_rows_per_warp, gate_up_rows_per_warp

    def items(**kw):
        return tuple(sorted(kw.items()))

    out = []
    # Qwen3-30B-A3B: the pre-FFN norm formed by the router (+ the experts' q8_1 input), int8 experts writing their
    # output's q8_1 copy; the down projection with Qwen's tail (x += y, the next attn_norm + its q8_1); the synthetic
    # tiny file's shape (16 experts of 256, top 4: the slice kernels)
    for E, n, f, k, mapping in ((128, 2048, 768, 8, "chunk"), (16, 256, 256, 4, "slice")):
        chunk = dict(rows_per_warp=gate_up_rows_per_warp(True), x_loads_first=False) if mapping == "chunk" else {}
        router = items(n_expert=E, n_embd=n, k=k, norm_topk=True, warps_per_row=0, prenorm=True, prenorm_q8=True)
        gate_up = items(qtype="Q4_K", n_in=n, n_ff=f, fused=False, q8=True, act="silu", quantize_out=True, **chunk)
        tail = FfnTail(n, next_q8=True, post_norm=False)
        if mapping == "chunk":
            down = items(qtype="Q4_K", n_ff=f, n_out=n, k=k, add_residual=False, q8=True,
                         rows_per_warp=down_rows_per_warp("Q4_K", True), x_loads_first=False, tail=tail)
        else:
            down = items(qtype="Q4_K", n_ff=f, n_out=n, add_residual=False, q8=True, tail=tail)
        out.append(dict(router=router, gate_up=gate_up, k=k, mapping=mapping))
        out.append(dict(router=router, gate_up=gate_up, k=k, mapping=mapping, down=down, down_mapping=mapping))
    # Gemma 4 26B-A4B: per-expert down scale folded into the weights, fused gate|up experts with GeGLU (n_in 2816 is
    # not whole warps of 1024-element chunks: the slice kernels); its down projection runs the post-FFN chain
    router = items(n_expert=128, n_embd=2816, k=8, norm_topk=True, warps_per_row=0, expert_scale=True)
    gate_up = items(qtype="Q4_K", n_in=2816, n_ff=704, fused=True, q8=True, act="gelu_tanh", quantize_out=True)
    out.append(dict(router=router, gate_up=gate_up, k=8, mapping="slice"))
    for q in ("Q5_0", "Q8_0"):
        down = items(qtype=q, n_ff=704, n_out=2816, add_residual=False, q8=True,
                     tail=FfnTail(2816, has_experts=True, next_q8=True))
        out.append(dict(router=router, gate_up=gate_up, k=8, mapping="slice", down=down, down_mapping="slice"))
    return out


register("routed_experts", compile_routed_experts, _configs())
