"""Batched MoE routing for prefill: router logits for T tokens, the sort of the (token, slot) assignments by expert
into grouped-GEMM tiles, and the weighted combine back to token order. All on the device, no host sync.

Per MoE layer of a prompt chunk (T tokens, top-k of E experts)::

    logits[T, E]   = h[T, K] @ W_router[E, K]^T          RouterLogits (f32 weights, f32 math)
    ids, w [T, k]  = softmax -> top-k -> renormalize      router.py Router (the decode router's block routine)
    tiles, sorted  = MoeAlign(ids)                        one CTA: counts, offsets, tile table, permutation
    act[sorted]    = GLU(W_gate/up[e] x[token])           quant_gemm.py, grouped + gather + gated
    y[sorted]      = W_down[e] act[sorted]                quant_gemm.py, grouped
    out[t] (+)=      sum_j w[t, j] (* scale[e]) y[pos[t, j]]  MoeCombine (fixed j order: deterministic)

**MoeAlign.** Counts per expert come from shared-memory atomics, so the order of the rows *inside* one expert's
group depends on thread timing; the result does not: every grouped-GEMM row is computed on its own (same K order
whatever tile or column it lands in) and the combine sums each token's k rows in slot order. The tile table is the
``reference.kernel_refs.grouped_tiles_host`` layout: (expert, first sorted row, valid rows, 0), experts ascending, tiles of
``tile_tokens`` rows; experts with no rows have no tile.

**RouterLogits.** A warp owns one token and ``experts_per_warp`` experts: its lanes hold the token's row in registers
(``n_in / 32`` floats) and read each expert row with coalesced 16-byte loads; a butterfly finishes each dot. The
f32 summation order differs from the decode router's, as llama.cpp's batched and single-token kernels differ.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, const_expr

from .arch import pdl_enabled
from .common import fake_ptr, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .registry import register

LOGIT_WARPS = 4


class RouterLogits:
    def __init__(self, n_expert: int, n_in: int, experts_per_warp: int = 16):
        self.pdl = pdl_enabled()
        assert n_in % 128 == 0, "router n_in must be a multiple of 128 (16-byte loads by 32 lanes)"
        self.n_expert, self.n_in = n_expert, n_in
        self.epw = min(experts_per_warp, n_expert)
        self.chunks = n_in // 128  # 16-byte loads per lane per row

    @cute.jit
    def __call__(self, pW: cute.Pointer, pX: cute.Pointer, pOut: cute.Pointer, n_tokens: Int32,
                 stream: cuda.CUstream):
        self.kernel(pW, pX, pOut, n_tokens).launch(
            grid=[cute.ceil_div(self.n_expert, self.epw), cute.ceil_div(n_tokens, LOGIT_WARPS), 1],
            block=[32 * LOGIT_WARPS, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pX: cute.Pointer, pOut: cute.Pointer, n_tokens: Int32):
        pdl_prologue(self.pdl)
        K, C = self.n_in, self.chunks
        tid = cute.arch.thread_idx()[0]
        bx, by, _ = cute.arch.block_idx()
        warp, lane = tid // 32, tid % 32
        t = by * LOGIT_WARPS + warp
        if t < n_tokens:
            xr = cute.make_rmem_tensor((C, 4), Float32)
            for c in cutlass.range_constexpr(C):
                src = cute.make_tensor(pX + cute.assume(t * K + c * 128 + lane * 4, divby=4), cute.make_layout(4))
                cute.autovec_copy(src, xr[c, None])
            mOut = cute.make_tensor(pOut, cute.make_layout((t + 1) * self.n_expert))
            wr = cute.make_rmem_tensor((4,), Float32)
            for i in cutlass.range(self.epw, unroll=1):
                e = bx * self.epw + i
                if e < self.n_expert:
                    acc = Float32(0.0)
                    for c in cutlass.range_constexpr(C):
                        src = cute.make_tensor(pW + cute.assume(e * K + c * 128 + lane * 4, divby=4),
                                               cute.make_layout(4))
                        cute.autovec_copy(src, wr)
                        for j in cutlass.range_constexpr(4):
                            acc = acc + wr[j] * xr[c, j]
                    acc = warp_reduce_sum(acc)
                    if lane == 0:
                        mOut[t * self.n_expert + e] = acc


@kernel_cache
def compile_router_logits(n_expert: int, n_in: int):
    return cute.compile(RouterLogits(n_expert, n_in), fake_ptr(Float32), fake_ptr(Float32), fake_ptr(Float32, 4),
                        Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


ALIGN_THREADS = 1024


class MoeAlign:
    """One CTA: ``ids`` [n, k] -> ``tiles`` [max_tiles, 4], ``n_tiles`` [1], ``sorted_token`` [n*k],
    ``sorted_pos`` [n*k] (see the module docstring)."""

    def __init__(self, n_expert: int, k: int, tile_tokens: int):
        self.pdl = pdl_enabled()
        self.n_expert, self.k, self.tile_tokens = n_expert, k, tile_tokens

    @cute.jit
    def __call__(self, pIds: cute.Pointer, pTiles: cute.Pointer, pNTiles: cute.Pointer, pSortedToken: cute.Pointer,
                 pSortedPos: cute.Pointer, n_tokens: Int32, stream: cuda.CUstream):
        self.kernel(pIds, pTiles, pNTiles, pSortedToken, pSortedPos, n_tokens).launch(
            grid=[1, 1, 1], block=[ALIGN_THREADS, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pIds: cute.Pointer, pTiles: cute.Pointer, pNTiles: cute.Pointer, pSortedToken: cute.Pointer,
               pSortedPos: cute.Pointer, n_tokens: Int32):
        pdl_prologue(self.pdl)
        E, k, BN = self.n_expert, self.k, self.tile_tokens
        tid = cute.arch.thread_idx()[0]
        n = n_tokens * k
        smem = cutlass.memory.SmemAllocator()
        counts = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        offsets = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        mIds = cute.make_tensor(pIds, cute.make_layout(n + 1))
        mPos = cute.make_tensor(pSortedPos, cute.make_layout(n + 1))
        mTok = cute.make_tensor(pSortedToken, cute.make_layout(n + 1))
        mTiles = cute.make_tensor(pTiles, cute.make_layout(4 * (n // BN + E + 1)))
        mNT = cute.make_tensor(pNTiles, cute.make_layout(1))
        for e in cutlass.range(tid, E, ALIGN_THREADS, unroll=1):
            counts[e] = Int32(0)
        cute.arch.sync_threads()
        # rank of each assignment inside its expert's group (kept in sorted_pos until the offsets are known)
        for a in cutlass.range(tid, n, ALIGN_THREADS, unroll=1):
            e = mIds[a]
            mPos[a] = cute.arch.atomic_add((counts.iterator + e).llvm_ptr, Int32(1))
        cute.arch.sync_threads()
        if tid == 0:
            start = Int32(0)
            nt = Int32(0)
            for e in cutlass.range(E, unroll=1):
                c = counts[e]
                offsets[e] = start
                for r in cutlass.range(0, c, BN, unroll=1):
                    mTiles[nt * 4] = e
                    mTiles[nt * 4 + 1] = start + r
                    mTiles[nt * 4 + 2] = cutlass.min(Int32(BN), c - r)
                    mTiles[nt * 4 + 3] = Int32(0)
                    nt = nt + 1
                start = start + c
            mNT[0] = nt
        cute.arch.sync_threads()
        for a in cutlass.range(tid, n, ALIGN_THREADS, unroll=1):
            p = offsets[mIds[a]] + mPos[a]
            mPos[a] = p
            mTok[p] = a // k


@kernel_cache
def compile_moe_align(n_expert: int, k: int, tile_tokens: int):
    p = fake_ptr(Int32, 4)
    return cute.compile(MoeAlign(n_expert, k, tile_tokens), p, p, p, p, p, Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


COMBINE_THREADS = 256


class MoeCombine:
    """``out[t, :] (+)= sum_j w[t, j] * (scale[ids[t, j]] if expert_scale) * y[pos[t*k + j], :]``, j ascending."""

    def __init__(self, n_embd: int, k: int, accumulate: bool = True, expert_scale: bool = False):
        self.pdl = pdl_enabled()
        assert n_embd % 4 == 0
        self.n_embd, self.k, self.accumulate, self.expert_scale = n_embd, k, accumulate, expert_scale
        self.vecs = n_embd // 4

    @cute.jit
    def __call__(self, pY: cute.Pointer, pPos: cute.Pointer, pW: cute.Pointer, pIds: cute.Pointer,
                 pScale: cute.Pointer, pOut: cute.Pointer, n_tokens: Int32, stream: cuda.CUstream):
        self.kernel(pY, pPos, pW, pIds, pScale, pOut).launch(
            grid=[cute.ceil_div(self.vecs, COMBINE_THREADS), n_tokens, 1], block=[COMBINE_THREADS, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pY: cute.Pointer, pPos: cute.Pointer, pW: cute.Pointer, pIds: cute.Pointer,
               pScale: cute.Pointer, pOut: cute.Pointer):
        pdl_prologue(self.pdl)
        N, k = self.n_embd, self.k
        tid = cute.arch.thread_idx()[0]
        bx, t, _ = cute.arch.block_idx()
        v = bx * COMBINE_THREADS + tid
        if v < self.vecs:
            mPos = cute.make_tensor(pPos, cute.make_layout((t + 1) * k))
            mW = cute.make_tensor(pW, cute.make_layout((t + 1) * k))
            mIds = cute.make_tensor(pIds, cute.make_layout((t + 1) * k))
            acc = cute.make_rmem_tensor((4,), Float32)
            yv = cute.make_rmem_tensor((4,), Float32)
            dst = cute.make_tensor(pOut + cute.assume(t * N + v * 4, divby=4), cute.make_layout(4))
            if const_expr(self.accumulate):
                cute.autovec_copy(dst, acc)
            else:
                acc.fill(0.0)
            for j in cutlass.range_constexpr(k):
                wj = mW[t * k + j]
                if const_expr(self.expert_scale):
                    mS = cute.make_tensor(pScale, cute.make_layout(mIds[t * k + j] + 1))
                    wj = wj * mS[mIds[t * k + j]]
                r = mPos[t * k + j]
                cute.autovec_copy(cute.make_tensor(pY + cute.assume(r * N + v * 4, divby=4), cute.make_layout(4)), yv)
                for i in cutlass.range_constexpr(4):
                    acc[i] = acc[i] + wj * yv[i]
            cute.autovec_copy(acc, dst)


@kernel_cache
def compile_moe_combine(n_embd: int, k: int, accumulate: bool = True, expert_scale: bool = False):
    return cute.compile(MoeCombine(n_embd, k, accumulate, expert_scale), fake_ptr(Float32), fake_ptr(Int32, 4),
                        fake_ptr(Float32, 4), fake_ptr(Int32, 4), fake_ptr(Float32, 4), fake_ptr(Float32),
                        Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


# ---------------------------------------------------------------------------------------------- host wrappers
def _st(stream):
    from ..runtime import default_stream

    return stream if stream is not None else default_stream()


def router_logits(w, x, n_tokens: int, out, *, stream=None):
    """``out[t, e] = x[t] . w[e]`` for f32 ``w`` [E, n_in] and ``x`` [>= n_tokens, n_in] (DeviceArrays)."""
    E, K = int(w.shape[0]), int(x.shape[-1])
    fn = compile_router_logits(E, K)
    fn(gptr(Float32, w.ptr), gptr(Float32, x.ptr), gptr(Float32, out.ptr, 4), Int32(n_tokens),
       cuda.CUstream(_st(stream).handle))
    return out


def moe_align(ids, n_tokens: int, n_expert: int, tile_tokens: int, tiles, n_tiles, sorted_token, sorted_pos, *,
              stream=None):
    k = int(ids.shape[-1])
    fn = compile_moe_align(n_expert, k, tile_tokens)
    fn(gptr(Int32, ids.ptr, 4), gptr(Int32, tiles.ptr, 4), gptr(Int32, n_tiles.ptr, 4),
       gptr(Int32, sorted_token.ptr, 4), gptr(Int32, sorted_pos.ptr, 4), Int32(n_tokens),
       cuda.CUstream(_st(stream).handle))


def moe_combine(y, sorted_pos, weights, ids, out, n_tokens: int, *, accumulate: bool = True, expert_scale=None,
                stream=None):
    N, k = int(out.shape[-1]), int(weights.shape[-1])
    fn = compile_moe_combine(N, k, accumulate, expert_scale is not None)
    sc = expert_scale if expert_scale is not None else weights
    fn(gptr(Float32, y.ptr), gptr(Int32, sorted_pos.ptr, 4), gptr(Float32, weights.ptr, 4), gptr(Int32, ids.ptr, 4),
       gptr(Float32, sc.ptr, 4), gptr(Float32, out.ptr), Int32(n_tokens), cuda.CUstream(_st(stream).handle))
    return out


register("router_logits", compile_router_logits, [dict(n_expert=128, n_in=2048), dict(n_expert=128, n_in=2816)])
register("moe_align", compile_moe_align, [dict(n_expert=128, k=8, tile_tokens=32)])
register("moe_combine", compile_moe_combine, [dict(n_embd=2048, k=8), dict(n_embd=2816, k=8, accumulate=False,
                                                                          expert_scale=True)])
