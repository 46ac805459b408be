"""Fused MoE router: the router GEMV ``logits = W h`` (W the f32 ``ffn_gate_inp``) and router.py's softmax / top-k /
renormalize on those logits in ONE launch (a decode step had two per MoE layer), :class:`RouterGemvTopK` and
:func:`route_gemv`. CTAs compute slices of the logits into a global scratch; the last CTA to arrive (int32 arrival
counter, fence + acq_rel atomic) runs the same :func:`softmax_topk_block` as router.py :class:`Router` on them and
resets the counter (graph-replayable). Its CTA body (:meth:`RouterGemvTopK.route`) is also the first phase of
routed_experts.py's launch.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int8, Int32, const_expr

from .arch import pdl_enabled
from .common import fake_ptr, gptr, pdl_prologue, warp_reduce
from .compile import compile_options, kernel_cache
from .norm_chain import RowNormChain
from .registry import register
from .router import softmax_topk_block

GEMV_WARPS = 4  # warps per CTA of the fused router (128 threads also run the softmax/top-k of the last CTA)
_CHUNK = 4  # f32 weights per lane per load: 16 bytes
_LOADS_IN_FLIGHT = 8  # 16-byte W loads (plus as many x loads) a lane issues before the FMAs of a batch


def choose_router_warps_per_row(n_expert: int, n_embd: int, target_ctas: int = 64) -> int:
    """Warps per expert row: split a row over 2/4 warps while there are fewer than ``target_ctas`` CTAs (1 MB of
    f32 router weights streams from more SMs), keeping >= 2 16-byte loads per lane."""
    warps_per_row = 1
    while (warps_per_row < GEMV_WARPS and -(-n_expert * warps_per_row // GEMV_WARPS) < target_ctas
           and n_embd >= 2 * 2 * warps_per_row * 32 * _CHUNK):
        warps_per_row *= 2
    return warps_per_row


class RouterGemvTopK:
    """``logits = W h`` (W: f32 ``[n_expert, n_embd]``, the GGUF ``ffn_gate_inp``) and :func:`softmax_topk_block`
    on those logits, in ONE launch (per token: grid ``(n_ctas, n_tokens)``).

    GEMV phase (``wpr`` = ``warps_per_row``): warp ``w`` of CTA ``c`` owns expert row ``c * (4 // wpr) + w // wpr``
    and the ``w % wpr``-th interleaved part of its 16-byte chunks (lane-contiguous: a warp's loads of one step are
    512 consecutive bytes); ``h`` is read from global memory (L1/L2 resident, 8 KB). Per lane the products are
    accumulated in a fixed order, then a butterfly shuffle and, for ``wpr`` > 1, a fixed-order sum of the warp
    partials through smem: the logits are deterministic. Each row's logit goes to the global
    ``scratch[token, n_expert]``.

    Last-CTA phase (the threadFenceReduction pattern): the writers fence (``fence.acq_rel.gpu``), the CTA barriers,
    thread 0 does ``atom.add.acq_rel.gpu`` on ``counter[token]``; the CTA that sees ``n_ctas - 1`` fences again
    (acquire), reads the logits back with ``ld.global.cg`` and runs the router's own softmax/top-k/renormalize
    (:func:`softmax_topk_block`, the code :class:`Router` runs), then stores 0 into the counter so the next launch
    (a CUDA-graph replay, the next layer) starts from zero. No CTA ever waits for another: no deadlock whatever
    the residency.

    ``expert_scale``: the last CTA then also multiplies each routed weight by ``scale[id]`` (Gemma 4's per-expert
    ``ffn_down_exps.scale``, the product elementwise.py :class:`GatherScale` forms in a launch of its own).

    ``prenorm``: the router's input is not read but formed, the block's pre-FFN RMSNorm with its residual add
    (Qwen3-MoE's ffn_norm, one launch fewer per layer): every CTA sums the squares of ``s = x + delta`` over the row
    (the same code and order in every CTA, so every CTA holds the same ``rstd`` bits) and feeds the GEMV with
    ``h = (s * rstd) * w_norm`` computed from its 16-byte loads of x, delta and w_norm; the last CTA, after every CTA
    has read the old x, writes ``x = s``, ``h`` and (``prenorm_q8``) the q8_1 copy of h (q8_1.py's rounding, through
    norm_chain.py ``RowNormChain``: the row over the CTA's threads in passes of 8) for the experts, which read them
    in the next launch."""

    def __init__(self, n_expert: int, n_embd: int, k: int, norm_topk: bool = True, warps_per_row: int = 0,
                 expert_scale: bool = False, prenorm: bool = False, prenorm_q8: bool = False):
        self.pdl = pdl_enabled()
        self.expert_scale = expert_scale
        if prenorm_q8 and not prenorm:
            raise ValueError("prenorm_q8 needs prenorm")
        if prenorm and n_embd % 32:
            raise ValueError(f"prenorm needs n_embd ({n_embd}) a multiple of 32 (q8_1 blocks, warp rows)")
        self.prenorm, self.prenorm_q8 = prenorm, prenorm_q8
        self.row = RowNormChain(n_embd, GEMV_WARPS * 32) if prenorm else None  # the last CTA's writes of x, h, hq
        if not 0 < k <= min(n_expert, 32):
            raise ValueError(f"bad top-k {k} for {n_expert} experts")
        if n_embd % _CHUNK:
            raise ValueError(f"n_embd {n_embd} must be a multiple of {_CHUNK} (16-byte f32 loads)")
        self.n_expert, self.n_embd, self.k, self.norm_topk = n_expert, n_embd, k, norm_topk
        self.warps_per_row = warps_per_row or choose_router_warps_per_row(n_expert, n_embd)
        if self.warps_per_row not in (1, 2, 4):
            raise ValueError(f"warps_per_row must be 1, 2 or 4, got {self.warps_per_row}")
        self.threads = GEMV_WARPS * 32
        self.rows_per_cta = GEMV_WARPS // self.warps_per_row
        self.n_ctas = -(-n_expert // self.rows_per_cta)
        self.n_chunks = n_embd // _CHUNK
        self.chunks_per_lane = -(-self.n_chunks // (32 * self.warps_per_row))

    @cute.jit
    def __call__(self, pW: cute.Pointer, pH: cute.Pointer, pScratch: cute.Pointer, pCounter: cute.Pointer,
                 pIds: cute.Pointer, pWeights: cute.Pointer, pScale: cute.Pointer, pX: cute.Pointer,
                 pDelta: cute.Pointer, pNormW: cute.Pointer, pQ: cute.Pointer, pQd: cute.Pointer, pQs: cute.Pointer,
                 eps: Float32, n_tokens: Int32, stream: cuda.CUstream):
        tensors = self.tensors(pW, pH, pScratch, pCounter, pIds, pWeights, pScale, pX, pDelta, pNormW, pQ, pQd, pQs,
                               n_tokens)
        self.kernel(*tensors, eps).launch(use_pdl=self.pdl, grid=[self.n_ctas, n_tokens, 1],
                                          block=[self.threads, 1, 1], stream=stream)

    def tensors(self, pW, pH, pScratch, pCounter, pIds, pWeights, pScale, pX, pDelta, pNormW, pQ, pQd, pQs, n_tokens):
        """The kernel's tensors over the launch's pointers (host side, while tracing a ``@cute.jit``)."""
        E, N, K = self.n_expert, self.n_embd, self.k
        mW = cute.make_tensor(pW, cute.make_layout((E, N), stride=(N, 1)))
        mH = cute.make_tensor(pH, cute.make_layout((n_tokens, N), stride=(N, 1)))
        mS = cute.make_tensor(pScratch, cute.make_layout((n_tokens, E), stride=(E, 1)))
        mCnt = cute.make_tensor(pCounter, cute.make_layout(n_tokens))
        mI = cute.make_tensor(pIds, cute.make_layout((n_tokens, K), stride=(K, 1)))
        mP = cute.make_tensor(pWeights, cute.make_layout((n_tokens, K), stride=(K, 1)))
        mScale = cute.make_tensor(pScale, cute.make_layout(E))  # read only with expert_scale
        # prenorm only: the residual stream, its addend, the norm weight; the q8_1 copy of h (flat over T rows)
        mX = cute.make_tensor(pX, cute.make_layout((n_tokens, N), stride=(N, 1)))
        mD = cute.make_tensor(pDelta, cute.make_layout((n_tokens, N), stride=(N, 1)))
        mNw = cute.make_tensor(pNormW, cute.make_layout(N))
        mQ = cute.make_tensor(pQ, cute.make_layout(n_tokens * N))
        mQd = cute.make_tensor(pQd, cute.make_layout(n_tokens * (N // 32)))
        mQs = cute.make_tensor(pQs, cute.make_layout(n_tokens * (N // 32)))
        return mW, mH, mS, mCnt, mI, mP, mScale, mX, mD, mNw, mQ, mQd, mQs

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mH: cute.Tensor, mS: cute.Tensor, mCnt: cute.Tensor, mI: cute.Tensor,
               mP: cute.Tensor, mScale: cute.Tensor, mX: cute.Tensor, mD: cute.Tensor, mNw: cute.Tensor,
               mQ: cute.Tensor, mQd: cute.Tensor, mQs: cute.Tensor, eps: Float32):
        pdl_prologue(self.pdl)
        cta, tok, _ = cute.arch.block_idx()
        red_v, red_i, sFlag = self.shared()
        self.route(cta, tok, mW, mH, mS, mCnt, mI, mP, mScale, mX, mD, mNw, mQ, mQd, mQs, eps, red_v, red_i, sFlag,
                   mCnt.iterator, False)

    @staticmethod
    def shared():
        """The shared memory :meth:`route` takes (device side): per-warp f32 / int32 reduction slots and a flag."""
        smem = cutlass.memory.SmemAllocator()
        red_v = smem.allocate_tensor(Float32, cute.make_layout(GEMV_WARPS), byte_alignment=16)
        red_i = smem.allocate_tensor(Int32, cute.make_layout(GEMV_WARPS), byte_alignment=16)
        sFlag = smem.allocate_tensor(Int32, cute.make_layout(1), byte_alignment=16)
        return red_v, red_i, sFlag

    @cute.jit
    def route(self, cta: Int32, tok: Int32, mW: cute.Tensor, mH: cute.Tensor, mS: cute.Tensor, mCnt: cute.Tensor,
              mI: cute.Tensor, mP: cute.Tensor, mScale: cute.Tensor, mX: cute.Tensor, mD: cute.Tensor,
              mNw: cute.Tensor, mQ: cute.Tensor, mQd: cute.Tensor, mQs: cute.Tensor, eps: Float32, red_v: cute.Tensor,
              red_i: cute.Tensor, sFlag: cute.Tensor, pReady: cute.Pointer, signal: cutlass.Constexpr[bool]):
        """What CTA ``cta`` of token ``tok`` does (the whole kernel but the PDL prologue; every thread calls it).
        ``signal``: once the last CTA has written everything it writes (ids, weights, and with ``prenorm`` x, h and
        hq), it stores 1 into ``pReady`` with release semantics, for CTAs of the same grid that wait for the routing
        (routed_experts.py); those put it back to zero."""
        warps_per_row, CPL, U = self.warps_per_row, self.chunks_per_lane, _LOADS_IN_FLIGHT
        tid, _, _ = cute.arch.thread_idx()
        lane = tid % 32
        warp = tid // 32
        kpart = warp % warps_per_row
        row = cta * self.rows_per_cta + warp // warps_per_row

        # ---- prenorm: rstd of s = x + delta over the row (the same sum in every CTA) ----
        rstd = Float32(1.0)
        if const_expr(self.prenorm):
            ss = Float32(0.0)
            for e in cutlass.range(tid, self.n_embd, self.threads, unroll=4):
                sv = mX[tok, e] + mD[tok, e]
                ss = ss + sv * sv
            ss = warp_reduce(ss, operator.add)
            if lane == 0:
                red_v[warp] = ss
            cute.arch.barrier()
            tot = Float32(0.0)
            for i in cutlass.range_constexpr(GEMV_WARPS):
                tot = tot + red_v[i]
            rstd = cute.math.rsqrt(tot / Float32(self.n_embd) + eps)
            cute.arch.barrier()  # red_v is reused below

        # ---- GEMV: this warp's part of row `row` ----
        acc = Float32(0.0)
        if row < self.n_expert:
            rW = cute.make_rmem_tensor(cute.make_layout((U, _CHUNK), stride=(_CHUNK, 1)), Float32)
            rX = cute.make_rmem_tensor(cute.make_layout((U, _CHUNK), stride=(_CHUNK, 1)), Float32)
            rD = cute.make_rmem_tensor(cute.make_layout((U, _CHUNK), stride=(_CHUNK, 1)), Float32)
            rN = cute.make_rmem_tensor(cute.make_layout((U, _CHUNK), stride=(_CHUNK, 1)), Float32)
            for i0 in cutlass.range_constexpr(0, CPL, U):
                nb = min(U, CPL - i0)
                for u in cutlass.range_constexpr(nb):
                    c = (i0 + u) * 32 * warps_per_row + kpart * 32 + lane  # chunk index: lane-contiguous per warp step
                    if const_expr(self.n_chunks % (32 * warps_per_row) == 0) or c < self.n_chunks:
                        cute.autovec_copy(cute.local_tile(mW[row, None], (_CHUNK,), (c,)), rW[u, None])
                        if const_expr(self.prenorm):  # h = ((x + delta) * rstd) * w_norm, as the last CTA stores it
                            cute.autovec_copy(cute.local_tile(mX[tok, None], (_CHUNK,), (c,)), rX[u, None])
                            cute.autovec_copy(cute.local_tile(mD[tok, None], (_CHUNK,), (c,)), rD[u, None])
                            cute.autovec_copy(cute.local_tile(mNw, (_CHUNK,), (c,)), rN[u, None])
                            for j in cutlass.range_constexpr(_CHUNK):
                                rX[u, j] = ((rX[u, j] + rD[u, j]) * rstd) * rN[u, j]
                        else:
                            cute.autovec_copy(cute.local_tile(mH[tok, None], (_CHUNK,), (c,)), rX[u, None])
                    else:
                        for j in cutlass.range_constexpr(_CHUNK):
                            rW[u, j] = Float32(0.0)
                            rX[u, j] = Float32(0.0)
                for u in cutlass.range_constexpr(nb):
                    for j in cutlass.range_constexpr(_CHUNK):
                        acc += rW[u, j] * rX[u, j]
        acc = warp_reduce(acc, operator.add)
        if const_expr(warps_per_row == 1):
            if row < self.n_expert:  # noqa: SIM102 (runtime conditions, kept as nested DSL ifs)
                if lane == 0:
                    mS[tok, row] = acc
                    cute.arch.fence_acq_rel_gpu()  # release this logit before the CTA's arrival below
        else:
            if lane == 0:
                red_v[warp] = acc
            cute.arch.barrier()
            if row < self.n_expert:  # noqa: SIM102 (runtime conditions, kept as nested DSL ifs)
                if tid % (32 * warps_per_row) == 0:  # lane 0 of the row's first warp: fixed-order sum of the parts
                    t = red_v[warp]
                    for j in cutlass.range_constexpr(1, warps_per_row):
                        t = t + red_v[warp + j]
                    mS[tok, row] = t
                    cute.arch.fence_acq_rel_gpu()

        # ---- arrival: the last CTA of this token runs the softmax/top-k ----
        cute.arch.barrier()
        if tid == 0:
            sFlag[0] = cute.arch.atomic_add((mCnt.iterator + tok).llvm_ptr, Int32(1), sem="acq_rel", scope="gpu")
        cute.arch.barrier()
        if sFlag[0] == self.n_ctas - 1:
            cute.arch.fence_acq_rel_gpu()  # acquire: every CTA's logits are visible below
            softmax_topk_block(mS[tok, None], mI[tok, None], mP[tok, None], red_v, red_i, self.n_expert, self.k,
                               self.norm_topk, self.threads, True)
            if const_expr(self.expert_scale):
                cute.arch.barrier()  # the routed ids / weights stored above are visible to the whole CTA
                if tid < self.k:
                    mP[tok, tid] = mP[tok, tid] * mScale[mI[tok, tid]]
            if const_expr(self.prenorm):
                # every CTA has read the old x (each arrived after its GEMV): x = s, h and its q8_1 copy, the row
                # over this CTA's threads in passes of 8 (norm_chain.py RowNormChain: every load of a thread is
                # issued before the dependent math, instead of one q8_1 block per warp per loop trip)
                rc = self.row
                sv, dv, hv = rc.regs(), rc.regs(), rc.regs()
                rc.load(mX[tok, None].iterator, sv, tid)
                rc.load(mD[tok, None].iterator, dv, tid)
                for j in cutlass.range_constexpr(rc.passes):
                    for i in cutlass.range_constexpr(8):
                        sv[j, i] = sv[j, i] + dv[j, i]
                rc.store(sv, mX[tok, None].iterator, tid)
                rc.normed(sv, rstd, mNw.iterator, hv, tid)
                rc.store(hv, mH[tok, None].iterator, tid)
                if const_expr(self.prenorm_q8):
                    nb = self.n_embd // 32
                    rc.store_q8(hv, tid, mQ.iterator + tok * self.n_embd, mQd.iterator + tok * nb,
                                mQs.iterator + tok * nb)
            if tid == 0:
                mCnt[tok] = Int32(0)  # all n_ctas arrivals are in: reset for the next launch / graph replay
            if const_expr(signal):
                cute.arch.barrier()  # every thread's stores above precede thread 0's release
                if tid == 0:
                    cute.arch.fence_acq_rel_gpu()
                    cute.arch.store(pReady.llvm_ptr, Int32(1), sem="release", scope="gpu")


@kernel_cache
def compile_router_gemv(n_expert: int, n_embd: int, k: int, norm_topk: bool = True, warps_per_row: int = 0,
                        expert_scale: bool = False, prenorm: bool = False, prenorm_q8: bool = False):
    """Compile :class:`RouterGemvTopK` (``warps_per_row`` 0 = :func:`choose_router_warps_per_row`). Runtime args:
    (w f32, h f32, scratch f32, counter int32, ids int32, weights f32, scale f32 (read with ``expert_scale``); x,
    delta, norm weight f32 (16-byte aligned), q int8, d, s f32 (read / written with ``prenorm``) pointers, eps,
    n_tokens, stream)."""
    return cute.compile(RouterGemvTopK(n_expert, n_embd, k, norm_topk, warps_per_row, expert_scale, prenorm,
                                       prenorm_q8),
                        fake_ptr(Float32, 16), fake_ptr(Float32, 16), fake_ptr(Float32, 4), fake_ptr(Int32, 4),
                        fake_ptr(Int32, 4), fake_ptr(Float32, 4), fake_ptr(Float32, 4), fake_ptr(Float32, 16),
                        fake_ptr(Float32, 16), fake_ptr(Float32, 16), fake_ptr(Int8, 4), fake_ptr(Float32, 4),
                        fake_ptr(Float32, 4), Float32(1e-6), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


def route_gemv(w_router, h, k: int, *, norm_topk: bool = True, ids_out=None, weights_out=None, scratch=None,
               counter=None, stream=None, n_expert: int | None = None, warps_per_row: int = 0, expert_scale=None,
               prenorm=None):
    """Fused MoE router: ``route(w_router @ h, k)`` in one launch.

    ``w_router``: f32 ``[n_expert, n_embd]`` (numpy, or a DeviceArray of any dtype holding those bytes, e.g. the raw
    GGUF ``ffn_gate_inp`` upload; pass ``n_expert`` when its shape does not say it), 16-byte aligned.
    ``h``: f32 ``[n_embd]`` or ``[T, n_embd]`` (16-byte aligned). Returns ``(ids int32 [T, k], weights f32 [T, k])``
    (numpy if ``h`` is numpy).

    CUDA-graph capture: pass ``ids_out``, ``weights_out``, ``scratch`` (f32, >= T * n_expert elements: the logits,
    readable afterwards) and ``counter`` (int32, >= T elements, **zero** before the first launch; the kernel leaves
    it zero, so one zeroed counter serves every layer and every replay on one stream). Anything not given is
    allocated here (the counter zeroed), which a capture must not do.

    ``expert_scale`` (f32 DeviceArray of ``n_expert``): each routed weight is also multiplied by
    ``expert_scale[id]`` (Gemma 4's ``ffn_down_exps.scale``), in the same launch.

    ``prenorm`` = ``(x, delta, w_norm, eps, hq)``: ``h`` (a DeviceArray) is an output: the launch adds ``delta`` to
    the residual stream ``x`` (in place), writes ``h = rmsnorm(x) * w_norm`` and, with ``hq`` (a q8_1 ``Q8Act``),
    its q8_1 copy, and routes that h (:class:`RouterGemvTopK` ``prenorm``)."""
    from ..runtime import resolve_stream

    st = resolve_stream(stream)
    plan = plan_route_gemv(w_router, h, k, norm_topk=norm_topk, ids_out=ids_out, weights_out=weights_out,
                           scratch=scratch, counter=counter, stream=st, n_expert=n_expert, warps_per_row=warps_per_row,
                           expert_scale=expert_scale, prenorm=prenorm)
    if plan.n_tokens:
        compile_router_gemv(**plan.cfg)(*plan.args, Int32(plan.n_tokens), st.cu)
    if plan.was_numpy:
        return plan.ids.to_numpy(st), plan.weights.to_numpy(st)
    return plan.ids, plan.weights


class RouteGemvLaunch(NamedTuple):
    """A checked :func:`route_gemv` call: the compile keywords of :func:`compile_router_gemv`, its runtime arguments
    up to ``eps`` (``n_tokens`` and the stream follow), and the outputs."""
    cfg: dict
    args: tuple
    n_tokens: int
    ids: object
    weights: object
    was_numpy: bool
    keep: tuple  # the device buffers the arguments point into (uploads made here stay alive until the launch)


def plan_route_gemv(w_router, h, k: int, *, norm_topk: bool = True, ids_out=None, weights_out=None, scratch=None,
                    counter=None, stream, n_expert: int | None = None, warps_per_row: int = 0, expert_scale=None,
                    prenorm=None) -> RouteGemvLaunch:
    """:func:`route_gemv`'s checks and arguments, without the launch (``stream``: a resolved stream, for uploads)."""
    from ..runtime import DeviceArray, as_device

    dh, was_np = as_device(h, stream, np.float32)
    n_embd = int(dh.shape[-1])
    T = dh.size // n_embd
    if isinstance(w_router, DeviceArray):
        dw = w_router
    else:
        dw, _ = as_device(np.ascontiguousarray(w_router, np.float32), stream, np.float32)
    if n_expert is None:
        if dw.dtype == np.float32 and len(dw.shape) == 2:
            n_expert = int(dw.shape[0])
        else:
            n_expert = dw.nbytes // (4 * n_embd)
    if dw.nbytes != 4 * n_expert * n_embd:
        raise ValueError(f"router weight has {dw.nbytes} bytes, expected f32 [{n_expert}, {n_embd}]")
    for a, what in ((dw, "w_router"), (dh, "h")):
        if a.ptr % 16:
            raise ValueError(f"{what} must be 16-byte aligned (ptr {a.ptr:#x}): the kernel uses 128-bit loads")
    ids = ids_out if ids_out is not None else DeviceArray.empty((T, k), np.int32)
    w = weights_out if weights_out is not None else DeviceArray.empty((T, k), np.float32)
    if scratch is None:
        scratch = DeviceArray.empty((T, n_expert), np.float32)
    if counter is None:
        counter = DeviceArray.zeros((T,), np.int32, stream=stream)
    if scratch.nbytes < 4 * T * n_expert or counter.nbytes < 4 * T:
        raise ValueError(f"scratch needs {T * n_expert} f32 and counter {T} int32 elements")
    if expert_scale is not None and int(np.prod(expert_scale.shape)) < n_expert:
        raise ValueError(f"expert_scale has {int(np.prod(expert_scale.shape))} entries for {n_expert} experts")
    cfg, args = _gemv_launch(n_expert, n_embd, k, norm_topk, warps_per_row, dw, dh, scratch, counter, ids, w,
                             expert_scale, prenorm, T)
    return RouteGemvLaunch(cfg, args, T, ids, w, was_np, (dw, dh, scratch, counter))


def _gemv_launch(n_expert, n_embd, k, norm_topk, warps_per_row, dw, dh, scratch, counter, ids, w, expert_scale,
                 prenorm, T):
    """(compile keywords of :func:`compile_router_gemv`, its runtime arguments up to ``eps``) of a checked
    :func:`route_gemv` call."""
    cfg = dict(n_expert=n_expert, n_embd=n_embd, k=k, norm_topk=norm_topk, warps_per_row=warps_per_row)
    if expert_scale is not None:
        cfg["expert_scale"] = True
    scale_ptr = expert_scale.ptr if expert_scale is not None else w.ptr  # (not read without the flag)
    eps, pre = 0.0, (dh.ptr,) * 3 + (dh.ptr,) * 3  # (never touched without prenorm)
    if prenorm is not None:
        x, delta, w_norm, eps, hq = prenorm
        for a in (x, delta, w_norm):
            if a.ptr % 16 or int(np.prod(a.shape)) < (n_embd if a is w_norm else T * n_embd):
                raise ValueError("prenorm: x, delta and w_norm must be 16-byte aligned rows of n_embd f32")
        cfg["prenorm"] = True
        if hq is not None:
            cfg["prenorm_q8"] = True
        pre = (x.ptr, delta.ptr, w_norm.ptr) + ((hq.qs.ptr, hq.d.ptr, hq.s.ptr) if hq is not None else (dh.ptr,) * 3)
    return cfg, (gptr(Float32, dw.ptr, 16), gptr(Float32, dh.ptr, 16), gptr(Float32, scratch.ptr, 4),
                 gptr(Int32, counter.ptr, 4), gptr(Int32, ids.ptr, 4), gptr(Float32, w.ptr, 4),
                 gptr(Float32, scale_ptr, 4), gptr(Float32, pre[0], 16), gptr(Float32, pre[1], 16),
                 gptr(Float32, pre[2], 16), gptr(Int8, pre[3], 4), gptr(Float32, pre[4], 4), gptr(Float32, pre[5], 4),
                 Float32(eps))


def _launch_example_gemv(n_expert: int, n_embd: int, k: int, norm_topk: bool = True, warps_per_row: int = 0):
    from ..runtime import DeviceArray, default_stream

    w = DeviceArray.zeros((n_expert, n_embd), np.float32)
    h = DeviceArray.zeros((1, n_embd), np.float32)
    scratch = DeviceArray.empty((1, n_expert), np.float32)
    counter = DeviceArray.zeros((1,), np.int32)
    ids = DeviceArray.empty((1, k), np.int32)
    p = DeviceArray.empty((1, k), np.float32)
    s = default_stream()
    fn = compile_router_gemv(n_expert=n_expert, n_embd=n_embd, k=k, norm_topk=norm_topk, warps_per_row=warps_per_row)

    def launch():
        fn(gptr(Float32, w.ptr, 16), gptr(Float32, h.ptr, 16), gptr(Float32, scratch.ptr, 4),
           gptr(Int32, counter.ptr, 4), gptr(Int32, ids.ptr, 4), gptr(Float32, p.ptr, 4), gptr(Float32, p.ptr, 4),
           gptr(Float32, h.ptr, 16), gptr(Float32, h.ptr, 16), gptr(Float32, h.ptr, 16), gptr(Int8, h.ptr, 4),
           gptr(Float32, h.ptr, 4), gptr(Float32, h.ptr, 4), Float32(1e-6), Int32(1), s.cu)

    return launch


register("router_gemv", compile_router_gemv, [
    dict(n_expert=128, n_embd=2048, k=8),   # Qwen3-30B-A3B
    dict(n_expert=256, n_embd=2048, k=8),   # Qwen3.5 MoE
    dict(n_expert=16, n_embd=256, k=4),     # synthetic qwen3moe tiny
    dict(n_expert=16, n_embd=384, k=4),     # synthetic qwen3moe tiny-fallback
    dict(n_expert=32, n_embd=512, k=8),     # synthetic qwen3moe small
    dict(n_expert=128, n_embd=2816, k=8),   # Gemma 4 26B-A4B
    dict(n_expert=16, n_embd=256, k=4),     # synthetic gemma4 tiny
    # Gemma 4: the per-expert down scale folded into the routed weights by the same launch
    dict(n_expert=128, n_embd=2816, k=8, expert_scale=True),
    dict(n_expert=16, n_embd=256, k=4, expert_scale=True),
    # Qwen3-MoE: the pre-FFN norm (+ residual, + the experts' q8_1 input) formed by the router launch
    dict(n_expert=128, n_embd=2048, k=8, prenorm=True, prenorm_q8=True),
    dict(n_expert=128, n_embd=2048, k=8, prenorm=True),
    dict(n_expert=16, n_embd=256, k=4, prenorm=True, prenorm_q8=True),
    dict(n_expert=32, n_embd=512, k=8, prenorm=True, prenorm_q8=True),
], launch_example=_launch_example_gemv)
