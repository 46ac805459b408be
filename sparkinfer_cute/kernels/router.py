"""MoE router: softmax over ``n_expert`` logits -> top-k -> (optional) renormalization, all on the device.

Per token row (models.md §1, llama.cpp ``build_moe_ffn`` with ``LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX``)::

    p   = softmax(logits)                                  # over all experts, f32
    top = the k largest p, in descending order             # ggml_argsort_top_k
    w   = p[top] / max(sum(p[top]), 6.103515625e-5)        # norm_topk (Qwen3 MoE, Qwen3.5, Gemma 4); else p[top]

Outputs: ``ids[T, k]`` int32 and ``weights[T, k]`` f32 in device memory, no host synchronization.

**Ties** (equal logits): the lower expert index ranks first, i.e. the order of numpy's *stable* argsort of the
negated logits, ``np.argsort(-logits, kind="stable")[:k]``. Ranking is done on the logits, which orders exactly
like the exact softmax (exp is strictly increasing); the f32 probabilities themselves can round two different
logits to the same p, and ranking on those (as ggml does) could only differ from ours between such p-ties.

Masked experts (``-inf`` logits) get p = 0 and rank after every finite logit, in index order (as the stable
argsort does); excluded/padding slots hold ``(-inf, index + 2^24)`` so they lose even that tie.

Mapping: one block per token, one thread per expert (``threads = n_expert`` rounded up to a warp, <= 256 when
``n_expert <= 256``; more experts are folded ``ceil(n_expert / 256)`` per thread). Max and sum are block
all-reductions; each of the k selections is a block arg-max over (logit, -index) with already-chosen experts
excluded, so every thread knows the winner and can accumulate the selected probabilities itself.

The fused variant (the router GEMV and this softmax/top-k in one launch) is router_gemv.py.
"""

from __future__ import annotations

import operator

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, const_expr

from .common import F32_MAX, fake_ptr, gptr, pdl_prologue, warp_argmax, warp_reduce
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

NORM_TOPK_MIN = 6.103515625e-5  # llama.cpp clamps the renormalization denominator (2^-14)
_TAKEN = 1 << 24  # added to the index of an excluded expert so it loses every tie against a live one


@cute.jit
def softmax_topk_block(mRow: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, red_v: cute.Tensor, red_i: cute.Tensor,
                       n_expert: cutlass.Constexpr[int], k: cutlass.Constexpr[int], norm_topk: cutlass.Constexpr[bool],
                       threads: cutlass.Constexpr[int], coherent: cutlass.Constexpr[bool]):
    """Softmax -> top-k -> renormalize of one row of ``n_expert`` logits ``mRow`` by a block of ``threads`` threads
    (a multiple of 32; expert e is held by thread ``e % threads``); writes ``mIds[0:k]``, ``mW[0:k]``.

    ``red_v``/``red_i``: smem (f32, int32) with one slot per warp. ``coherent``: read the logits with
    ``ld.global.cg`` (L2), for logits written by other CTAs of the same grid (:class:`RouterGemvTopK`).
    Shared by :class:`Router` and :class:`RouterGemvTopK`, so both rank and weight bit-identically."""
    per_thread = -(-n_expert // threads)
    warps = threads // 32
    tid, _, _ = cute.arch.thread_idx()
    lane = tid % 32
    warp = tid // 32

    vals = cute.make_rmem_tensor(cute.make_layout(per_thread), Float32)
    idxs = cute.make_rmem_tensor(cute.make_layout(per_thread), Int32)
    m = Float32(-F32_MAX)
    for j in cutlass.range_constexpr(per_thread):
        e = tid + j * threads
        vals[j] = -Float32.inf
        idxs[j] = e + _TAKEN  # padding lanes never win (they lose the tie even against a live -inf logit)
        if e < n_expert:
            if const_expr(coherent):
                vals[j] = cute.arch.load((mRow.iterator + e).llvm_ptr, Float32, cop="cg")
            else:
                vals[j] = mRow[e]
            idxs[j] = e
            m = cute.arch.fmax(m, vals[j])
    # block max
    m = warp_reduce(m, cute.arch.fmax)
    if const_expr(warps > 1):
        if lane == 0:
            red_v[warp] = m
        cute.arch.barrier()
        m = red_v[0]
        for w in cutlass.range_constexpr(1, warps):
            m = cute.arch.fmax(m, red_v[w])
        cute.arch.barrier()
    # block sum of exp
    ssum = Float32(0.0)
    for j in cutlass.range_constexpr(per_thread):
        if idxs[j] < n_expert:
            ssum += cute.math.exp(vals[j] - m)
    ssum = warp_reduce(ssum, operator.add)
    if const_expr(warps > 1):
        if lane == 0:
            red_v[warp] = ssum
        cute.arch.barrier()
        ssum = Float32(0.0)
        for w in cutlass.range_constexpr(warps):  # fixed order: every thread gets the same bits
            ssum += red_v[w]
        cute.arch.barrier()
    inv_sum = Float32(1.0) / ssum

    # k rounds of block arg-max; selected probabilities kept in registers (identical in every thread)
    sel_p = cute.make_rmem_tensor(cute.make_layout(k), Float32)
    sel_i = cute.make_rmem_tensor(cute.make_layout(k), Int32)
    psum = Float32(0.0)
    for r in cutlass.range_constexpr(k):
        bv = vals[0]
        bi = idxs[0]
        for j in cutlass.range_constexpr(1, per_thread):
            if (vals[j] > bv) | ((vals[j] == bv) & (idxs[j] < bi)):
                bv = vals[j]
                bi = idxs[j]
        bv, bi = warp_argmax(bv, bi)
        if const_expr(warps > 1):
            if lane == 0:
                red_v[warp] = bv
                red_i[warp] = bi
            cute.arch.barrier()
            bv = red_v[0]
            bi = red_i[0]
            for w in cutlass.range_constexpr(1, warps):
                ov = red_v[w]
                oi = red_i[w]
                if (ov > bv) | ((ov == bv) & (oi < bi)):
                    bv = ov
                    bi = oi
            cute.arch.barrier()
        p = cute.math.exp(bv - m) * inv_sum
        sel_p[r] = p
        sel_i[r] = bi
        psum += p
        for j in cutlass.range_constexpr(per_thread):
            if idxs[j] == bi:
                vals[j] = -Float32.inf
                idxs[j] = bi + _TAKEN
    scale = Float32(1.0)
    if const_expr(norm_topk):
        scale = Float32(1.0) / cute.arch.fmax(psum, Float32(NORM_TOPK_MIN))
    if tid < k:
        for r in cutlass.range_constexpr(k):
            if tid == r:
                mIds[r] = sel_i[r]
                mW[r] = sel_p[r] * scale


class Router:
    """Static config: ``n_expert``, ``k``, ``norm_topk``."""

    def __init__(self, n_expert: int, k: int, norm_topk: bool = True):
        self.pdl = pdl_enabled()
        if not 0 < k <= min(n_expert, 32):
            raise ValueError(f"bad top-k {k} for {n_expert} experts")
        self.n_expert = n_expert
        self.k = k
        self.norm_topk = norm_topk
        self.threads = min(256, -(-n_expert // 32) * 32)
        self.per_thread = -(-n_expert // self.threads)
        self.warps = self.threads // 32

    @cute.jit
    def __call__(self, pLogits: cute.Pointer, pIds: cute.Pointer, pW: cute.Pointer, n_tokens: Int32,
                 stream: cuda.CUstream):
        mL = cute.make_tensor(pLogits, cute.make_layout((n_tokens, self.n_expert), stride=(self.n_expert, 1)))
        mI = cute.make_tensor(pIds, cute.make_layout((n_tokens, self.k), stride=(self.k, 1)))
        mW = cute.make_tensor(pW, cute.make_layout((n_tokens, self.k), stride=(self.k, 1)))
        self.kernel(mL, mI, mW).launch(use_pdl=self.pdl, grid=[n_tokens, 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mL: cute.Tensor, mI: cute.Tensor, mW: cute.Tensor):
        pdl_prologue(self.pdl)
        tok, _, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        red_v = smem.allocate_tensor(Float32, cute.make_layout(self.warps), byte_alignment=16)
        red_i = smem.allocate_tensor(Int32, cute.make_layout(self.warps), byte_alignment=16)
        softmax_topk_block(mL[tok, None], mI[tok, None], mW[tok, None], red_v, red_i, self.n_expert, self.k,
                           self.norm_topk, self.threads, False)


@kernel_cache
def compile_router(n_expert: int, k: int, norm_topk: bool = True):
    return cute.compile(Router(n_expert, k, norm_topk), fake_ptr(Float32, 4), fake_ptr(Int32, 4),
                        fake_ptr(Float32, 4), Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


def route(logits, k: int, *, norm_topk: bool = True, ids_out=None, weights_out=None, stream=None):
    """Router for ``logits[n_tokens, n_expert]`` (or ``[n_expert]``) -> ``(ids int32[T, k], weights f32[T, k])``.
    numpy in -> numpy out; DeviceArray in -> DeviceArrays (``ids_out``/``weights_out`` if given)."""
    from ..runtime import DeviceArray, as_device, resolve_stream

    ld, was_np = as_device(logits, stream, np.float32)
    n_expert = ld.shape[-1]
    T = ld.size // n_expert
    ids = ids_out if ids_out is not None else DeviceArray.empty((T, k), np.int32)
    w = weights_out if weights_out is not None else DeviceArray.empty((T, k), np.float32)
    if T:
        compile_router(n_expert, k, norm_topk)(gptr(Float32, ld.ptr, 4), gptr(Int32, ids.ptr, 4),
                                               gptr(Float32, w.ptr, 4), Int32(T), resolve_stream(stream).cu)
    if was_np:
        return ids.to_numpy(stream), w.to_numpy(stream)
    return ids, w


def _launch_example(n_expert: int, k: int, norm_topk: bool = True):
    from ..runtime import DeviceArray, default_stream

    lg = DeviceArray.zeros((1, n_expert), np.float32)
    ids = DeviceArray.empty((1, k), np.int32)
    w = DeviceArray.empty((1, k), np.float32)
    s = default_stream()
    fn = compile_router(n_expert, k, norm_topk)

    def launch():
        fn(gptr(Float32, lg.ptr, 4), gptr(Int32, ids.ptr, 4), gptr(Float32, w.ptr, 4), Int32(1), s.cu)

    return launch


register("router", compile_router, [
    dict(n_expert=128, k=8),    # Qwen3-30B-A3B, Gemma 4 26B-A4B
    dict(n_expert=256, k=8),    # Qwen3.5 MoE
    dict(n_expert=16, k=4),     # synthetic tiny
    dict(n_expert=32, k=8),     # synthetic
    dict(n_expert=128, k=8, norm_topk=False),
], launch_example=_launch_example)
