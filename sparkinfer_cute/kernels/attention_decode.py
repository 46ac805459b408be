"""Flash-decoding attention over a paged fp16 KV cache (split-KV + log-sum-exp combine), CuTe DSL.

(~600 lines: the split-KV kernel, the combine kernel and the combine code both run (:func:`combine_splits`), kept
in one file because the fused and the two-kernel paths must stay bit-identical.)

One query token per sequence attends to its sequence's keys ``0..pos`` (``pos`` read from device memory, so a CUDA
graph captured once replays for every token). Layouts (see :mod:`sparkinfer_cute.kernels.paged_kv` for the pool and
how the model code allocates it):

* ``q``           f32 ``[B, n_head, D]`` (already q-normed + RoPE'd; ``scale`` is applied here)
* ``k_pool``      f16 ``[n_pages, page_size, n_kv_head, D]``   (token-major inside a page; a token's K rows for all
  kv heads are one contiguous ``n_kv_head*D`` run, which is what :mod:`kv_cache_append` writes)
* ``v_pool``      f16, same shape
* ``page_table``  int32 ``[B, max_pages_per_seq]``: logical page ``t // page_size`` of sequence b lives in pool page
  ``page_table[b, t // page_size]`` at slot ``t % page_size``
* ``pos``         int32 ``[B]``: position of the query token; its own K/V must already be appended at ``pos``
* ``out``         f32 ``[B, n_head, D]``

Masking (models.md, Attention conventions): key p is visible to query q iff ``p <= q`` and (``window == 0`` or
``q - p < window``). GQA: q head h reads kv head ``h // (n_head // n_head_kv)``. Logits are
``s = scale * q.k``, then optionally ``softcap * tanh(s / softcap)``.

Algorithm (two kernels):

1. :class:`AttentionDecodeSplitKV`, grid ``(n_kv_head * head_tiles, num_splits, B)``. The live key range
   ``[max(0, pos+1-window), pos]`` is cut into ``num_splits`` equal chunks (chunk length computed on the device from
   ``pos``, so the work stays balanced at every length). A CTA owns one kv head, one chunk and ``GH`` of the
   ``G = n_head / n_kv_head`` q heads that share the kv head (all G when they fit in registers, else a head tile;
   the tiles of one kv head re-read the same K/V rows, mostly from L2), so each K/V row is loaded once for GH heads.
   Inside the CTA a *token group* of ``D / 8`` lanes (capped at 32) owns one key at a time: every lane loads 16 bytes
   (8 halves; 2x16 B for D = 512) of the K row and of the V row, converts to f32, forms partial dot products for the
   GH heads, and a butterfly shuffle inside the group completes them. Each token group issues the loads of
   ``keys_per_iter`` keys before any math (memory-level parallelism) and keeps its own online-softmax state (running
   max ``m``, sum ``l``, f32 accumulator ``acc[GH, D/lanes]``) in base 2. At the end the token groups are merged
   through shared memory and the CTA writes the normalized partial output ``O_s`` (f32) and its natural-log
   ``LSE_s = m + log(l)`` per (q head, split). A chunk with no live key (more splits than keys) writes ``O_s = 0``
   and ``LSE_s = -inf``, which the combine gives weight 0.
2. :class:`AttentionDecodeCombine`, grid ``(n_head, B)``: ``out = sum_s exp(LSE_s - M) O_s / sum_s exp(LSE_s - M)``
   with ``M = max_s LSE_s``.

``fused_combine=True`` (what the models run) folds step 2 into step 1: one launch instead of two. Each split CTA,
after writing its partials, bumps an int32 arrival counter of its (sequence, kv head, head tile) (barrier, then
thread 0: ``fence.acq_rel.gpu`` + ``atom.add.acq_rel.gpu``); the CTA that arrives last acquires (fence) and runs
:func:`combine_splits`, the combine kernel's own code, for its ``GH`` heads at once, then stores 0 into the counter so the
next launch (next layer, next graph replay) finds it zero. Same code and order: the output bits equal the
two-kernel path's (GPU-tested). No CTA waits for another, so any residency is deadlock-free.

Prologue (``qk_rot > 0``, the models' default: ``fused_qk_attention`` in models/ops.py): the kernel also does what
qk_norm_rope_kv.py does between the projections and attention, so a layer needs one launch fewer. ``q`` is then the
Q projection's raw output. Every CTA normalizes and rotates its ``GH`` q heads into shared memory (the heads of a
split are re-done by each split: a few hundred flops and one sincos per pair, against a launch); the CTA whose key
range holds ``pos`` normalizes and rotates this token's K (and V-norms V), stores them as f16 at ``pos`` in the cache
and then, after a barrier, reads that row back like every other key. Head tiles of one kv head store the same bits
to the same row. The code is qk_norm_rope_kv.py's ``HeadNormRope`` over the same thread mapping, so q and the cache
row carry exactly the standalone kernel's bits (the extra warps of a bigger CTA add exact zeros to the sums).

Decode attention is memory-bound (one 2-byte K and V element per 2*G flops), so the inner product is plain FMA on
CUDA cores; mma.sync would not help until the loads are pipelined deeper.

Accuracy: inputs are the fp16 values actually stored, products and sums are f32 (24-bit mantissa); the only
approximate functions are ``ex2.approx`` (max rel. error 2^-22) and ``lg2.approx`` on the merge path. The f32
accumulation over up to a few thousand keys contributes ~sqrt(n) * 2^-24 relative error, so results agree with a
float64 reference on the same fp16 K/V to ~1e-5 relative; tests use 1e-3 as a safe bound.
"""

from __future__ import annotations

import functools
import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float16, Float32, Int8, Int32, const_expr

from .arch import smem_budget, pdl_enabled
from .common import cu_stream, gptr, pdl_prologue
from .compile import compile_options, kernel_cache
from .q8_1 import QK8_1, Q8Act, quantize_block_warp
from .qk_norm_rope_kv import HeadNormRope, QKPrologue, device_weights
from .registry import register

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)

SUPPORTED_HEAD_DIMS = (64, 128, 256, 512)


# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////
# Split-KV kernel
# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////


class AttentionDecodeSplitKV:
    """Partial attention of one (kv head, split, sequence) per CTA; see the module docstring."""

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, page_size: int, num_splits: int,
                 has_softcap: bool, num_warps: int | None = None, keys_per_iter: int = 0,
                 heads_per_cta: int = 0, fused_combine: bool = False, quantize_out: bool = False,
                 qk_rot: int = 0, qk_norm: bool = True, qk_freq_factors: bool = False, v_norm: bool = False):
        self.pdl = pdl_enabled()
        self.fused_combine = fused_combine
        if quantize_out and not fused_combine:
            raise ValueError("quantize_out needs fused_combine (the combine kernel quantizes on the two-kernel path)")
        self.quantize_out = quantize_out
        if n_head % n_kv_head:
            raise ValueError(f"n_head {n_head} must be a multiple of n_kv_head {n_kv_head}")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {head_dim} not supported (one of {SUPPORTED_HEAD_DIMS})")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if num_splits < 1:
            raise ValueError("num_splits must be >= 1")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.page_size, self.num_splits, self.has_softcap = page_size, num_splits, has_softcap
        self.qk_rot = qk_rot
        self.group = n_head // n_kv_head
        # A token group: lanes that share one key row, 16 bytes (8 halves) per lane, at most a whole warp.
        self.lanes_per_tok = min(32, head_dim // 8)
        self.vec = head_dim // self.lanes_per_tok  # halves per lane per row: 8, or 16 for D=512
        self.tok_per_warp = 32 // self.lanes_per_tok
        # q heads per CTA (a divisor of G): the q slice and the f32 accumulator live in registers, GH*VEC each.
        # Capped at GH*VEC <= 32 so several keys' loads fit in flight next to them (ptxas, sm_120a: G=8, D=128 with
        # all 8 heads per CTA takes 220 registers with 1 key in flight and spills with 2). A kv group with more
        # heads runs as several CTAs (head tiles) that read the same K/V rows, the repeats mostly from L2.
        if not heads_per_cta:
            heads_per_cta = max(d for d in range(1, self.group + 1) if self.group % d == 0 and d * self.vec <= 32)
        if self.group % heads_per_cta:
            raise ValueError(f"heads_per_cta {heads_per_cta} must divide the GQA group {self.group}")
        self.heads_per_cta = heads_per_cta
        self.n_head_tiles = self.group // heads_per_cta
        # Keys in flight per token group per iteration (all their loads are issued before any math): as many as the
        # registers allow next to q and the accumulator (2*GH*VEC); a key costs ~2*VEC registers (f16 K/V + f32).
        if not keys_per_iter:
            live = 2 * heads_per_cta * self.vec
            keys_per_iter = next(u for u in (4, 2, 1) if u == 1 or live + 2 * u * self.vec <= 160)
        self.keys_per_iter = keys_per_iter
        if num_warps is None:
            num_warps = 4
            while num_warps > 1 and self.smem_bytes(num_warps) > smem_budget():
                num_warps //= 2
        self.num_warps = num_warps
        self.num_threads = 32 * num_warps
        self.n_tok_groups = num_warps * self.tok_per_warp
        # qk_rot > 0: the Q/K prologue (qk_norm_rope_kv.py) runs inside this kernel (module docstring, "Prologue")
        self.heads = (HeadNormRope(head_dim, qk_rot, qk_norm, qk_freq_factors, v_norm, cta_threads=self.num_threads)
                      if qk_rot else None)
        if self.smem_bytes(num_warps) > smem_budget():
            raise ValueError(f"attention decode config needs {self.smem_bytes(num_warps)} B smem > "
                             f"budget {smem_budget()} B")

    def smem_bytes(self, num_warps: int) -> int:
        n_groups = num_warps * self.tok_per_warp
        merge = n_groups * self.heads_per_cta * (self.head_dim + 2) * 4 + 64  # acc + m + l per token group
        if self.fused_combine:  # + the combine's LSE and weight per split, the arrival flag, alignment padding
            merge += 2 * 4 * self.heads_per_cta * self.num_splits + 8 * self.heads_per_cta + 16 + 48
        if self.qk_rot:  # + the prologue's q heads and its block-reduction slots (+ alignment)
            merge += self.heads_per_cta * self.head_dim * 4 + 4 * num_warps + 32
        return merge

    @property
    def n_counters_per_seq(self) -> int:
        """Arrival counters per sequence for ``fused_combine``: one per (kv head, head tile) = grid.x."""
        return self.n_kv_head * self.n_head_tiles

    @cute.jit
    def __call__(self, pQ: cute.Pointer, pK: cute.Pointer, pV: cute.Pointer, pPageTable: cute.Pointer,
                 pPos: cute.Pointer, pOPart: cute.Pointer, pLsePart: cute.Pointer, pOut: cute.Pointer,
                 pCounters: cute.Pointer, pOutQs: cute.Pointer, pOutQd: cute.Pointer, pOutQsum: cute.Pointer,
                 pKNew: cute.Pointer, pVNew: cute.Pointer, pQNorm: cute.Pointer, pKNorm: cute.Pointer,
                 pFF: cute.Pointer, batch: Int32, n_pages: Int32, pages_per_seq: Int32, scale: Float32, window: Int32,
                 softcap: Float32, theta_scale: Float32, eps: Float32, q_scale: Float32, stream: cuda.CUstream):
        H, KV, D, P, S = self.n_head, self.n_kv_head, self.head_dim, self.page_size, self.num_splits
        mQ = cute.make_tensor(pQ, cute.make_layout((batch, H, D), stride=(H * D, D, 1)))
        kv_layout = cute.make_layout((n_pages, P, KV, D), stride=(P * KV * D, KV * D, D, 1))
        mK = cute.make_tensor(pK, kv_layout)
        mV = cute.make_tensor(pV, kv_layout)
        mPT = cute.make_tensor(pPageTable, cute.make_layout((batch, pages_per_seq), stride=(pages_per_seq, 1)))
        mPos = cute.make_tensor(pPos, cute.make_layout(batch))
        mOPart = cute.make_tensor(pOPart, cute.make_layout((batch, H, S, D), stride=(H * S * D, S * D, D, 1)))
        mLsePart = cute.make_tensor(pLsePart, cute.make_layout((batch, H, S), stride=(H * S, S, 1)))
        # out / counters are only touched with fused_combine (the two-kernel path passes any valid pointers)
        mOut = cute.make_tensor(pOut, cute.make_layout((batch, H, D), stride=(H * D, D, 1)))
        mCnt = cute.make_tensor(pCounters, cute.make_layout(batch * KV * self.n_head_tiles))
        # the q8_1 copy of out (quantize_out only): qs int8 [batch * H * D], d / sum f32 [batch * H * D / 32]
        mOutQ = q8_tensors(pOutQs, pOutQd, pOutQsum, batch * H * D)
        # the prologue's inputs (qk_rot > 0 only): this token's k and v (f32, before the norm / RoPE), the Q/K norm
        # weights, RoPE's frequency divisors
        new_layout = cute.make_layout((batch, KV, D), stride=(KV * D, D, 1))
        mPro = (cute.make_tensor(pKNew, new_layout), cute.make_tensor(pVNew, new_layout),
                cute.make_tensor(pQNorm, cute.make_layout(D)), cute.make_tensor(pKNorm, cute.make_layout(D)),
                cute.make_tensor(pFF, cute.make_layout(max(1, self.qk_rot // 2))))
        self.kernel(mQ, mK, mV, mPT, mPos, mOPart, mLsePart, mOut, mCnt, *mOutQ, *mPro, scale, window, softcap,
                    theta_scale, eps, q_scale).launch(
            use_pdl=self.pdl, grid=[KV * self.n_head_tiles, S, batch], block=[self.num_threads, 1, 1],
            smem=self.smem_bytes(self.num_warps), stream=stream)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mPT: cute.Tensor, mPos: cute.Tensor,
               mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor, mCnt: cute.Tensor, mOutQs: cute.Tensor,
               mOutQd: cute.Tensor, mOutQsum: cute.Tensor, mKNew: cute.Tensor, mVNew: cute.Tensor, mQNorm: cute.Tensor,
               mKNorm: cute.Tensor, mFF: cute.Tensor, scale: Float32, window: Int32, softcap: Float32,
               theta_scale: Float32, eps: Float32, q_scale: Float32):
        pdl_prologue(self.pdl)
        G, GH, D, P, S = self.group, self.heads_per_cta, self.head_dim, self.page_size, self.num_splits
        LPT, VEC, TPW, U = self.lanes_per_tok, self.vec, self.tok_per_warp, self.keys_per_iter
        NG, NW, NT = self.n_tok_groups, self.num_warps, self.num_threads

        tidx, _, _ = cute.arch.thread_idx()
        head_tile, split, b = cute.arch.block_idx()
        kvh = head_tile // self.n_head_tiles
        warp = tidx // 32
        lane = tidx % 32
        grp_in_warp = lane // LPT
        grp = warp * TPW + grp_in_warp
        lig = lane % LPT  # lane in token group: owns head-dim elements [lig*VEC, (lig+1)*VEC)
        h0 = kvh * G + (head_tile % self.n_head_tiles) * GH  # first q head of this CTA (GQA: kv head h // G)

        # ---- shared memory: buffers to merge the token groups ----
        smem = cutlass.memory.SmemAllocator()
        sAcc = smem.allocate_tensor(Float32, cute.make_layout((NG, GH, D), stride=(GH * D, D, 1)), byte_alignment=16)
        sM = smem.allocate_tensor(Float32, cute.make_layout((NG, GH), stride=(GH, 1)), byte_alignment=16)
        sL = smem.allocate_tensor(Float32, cute.make_layout((NG, GH), stride=(GH, 1)), byte_alignment=16)

        # ---- this split's key range, from the device-side position ----
        pos = mPos[b]
        kv_end = pos + 1
        kv_begin = Int32(0)
        if window > 0:
            kv_begin = cutlass.max(Int32(0), kv_end - window)
        chunk = (kv_end - kv_begin + S - 1) // S
        t_begin = kv_begin + split * chunk
        t_end = cutlass.min(t_begin + chunk, kv_end)

        # ---- prologue (qk_rot > 0): this CTA's q heads normed + rotated into smem; the CTA whose split holds the
        # new key appends this token's K/V (normed, rotated, f16) to the cache and, after the barrier, reads it back
        # like every other key (a CTA's global stores are visible to its own threads after bar.sync). Head tiles of
        # one kv head store the same bits to the same row. ----
        sQ = sAcc  # (unused without the prologue)
        if const_expr(self.heads is not None):
            sQ = smem.allocate_tensor(Float32, cute.make_layout((GH, D), stride=(D, 1)), byte_alignment=16)
            sRed = smem.allocate_tensor(Float32, cute.make_layout(NW), byte_alignment=16)
            cs = cute.make_rmem_tensor(cute.make_layout(self.heads.n_pair), Float32)
            sn = cute.make_rmem_tensor(cute.make_layout(self.heads.n_pair), Float32)
            self.heads.rope_tables(cs, sn, pos.to(Float32), theta_scale, mFF)
            for g in cutlass.range_constexpr(GH):
                self.heads.norm_rope_head(mQ[b, h0 + g, None], mQNorm, sQ[g, None], cs, sn, sRed, eps, q_scale, True,
                                          Float32)
            if pos >= t_begin:
                if pos < t_end:
                    page_new = mPT[b, pos // P]
                    slot_new = pos % P
                    self.heads.norm_rope_head(mKNew[b, kvh, None], mKNorm, mK[page_new, slot_new, kvh, None], cs, sn,
                                              sRed, eps, q_scale, False, Float16)
                    self.heads.store_v(mVNew[b, kvh, None], mV[page_new, slot_new, kvh, None], sRed, eps)
            cute.arch.sync_threads()

        # ---- the query slice, pre-multiplied so the logit comes out in base 2 ----
        # no softcap: s2 = (scale*log2e * q) . k ; softcap: s2 = softcap*log2e * tanh((scale/softcap * q) . k)
        q_mul = scale * Float32(LOG2_E)
        if const_expr(self.has_softcap):
            q_mul = scale / softcap
        cap2 = softcap * Float32(LOG2_E)
        rQ = cute.make_rmem_tensor(cute.make_layout((GH, VEC), stride=(VEC, 1)), Float32)
        for g in cutlass.range_constexpr(GH):
            if const_expr(self.heads is not None):
                cute.autovec_copy(cute.local_tile(sQ[g, None], (VEC,), (lig,)), rQ[g, None])
            else:
                cute.autovec_copy(cute.local_tile(mQ[b, h0 + g, None], (VEC,), (lig,)), rQ[g, None])
        for g in cutlass.range_constexpr(GH):
            for i in cutlass.range_constexpr(VEC):
                rQ[g, i] = rQ[g, i] * q_mul

        # ---- online softmax per token group (base 2) ----
        rM = cute.make_rmem_tensor((GH,), Float32)
        rL = cute.make_rmem_tensor((GH,), Float32)
        rAcc = cute.make_rmem_tensor(cute.make_layout((GH, VEC), stride=(VEC, 1)), Float32)
        for g in cutlass.range_constexpr(GH):
            rM[g] = -Float32.inf
            rL[g] = Float32(0.0)
            for i in cutlass.range_constexpr(VEC):
                rAcc[g, i] = Float32(0.0)
        rK = cute.make_rmem_tensor(cute.make_layout((U, VEC), stride=(VEC, 1)), Float16)
        rV = cute.make_rmem_tensor(cute.make_layout((U, VEC), stride=(VEC, 1)), Float16)
        rS = cute.make_rmem_tensor((GH,), Float32)

        # One iteration covers U * NW * TPW consecutive keys: step u of warp w takes keys
        # [base + (u*NW + w)*TPW, ... + TPW), one per token group. All K/V loads of the U steps are issued before any
        # math, so each lane keeps 2*U 16-byte loads in flight (decode is latency-bound at low occupancy). Every lane
        # of a warp runs the same trip count and the same U steps (the shuffles need the whole warp); a token group
        # whose key is past the end loads a valid key instead and masks its softmax update.
        for base in cutlass.range(t_begin, t_end, U * NW * TPW, unroll=1):
            for u in cutlass.range_constexpr(U):
                t_mine = base + (u * NW + warp) * TPW + grp_in_warp
                t = cutlass.min(t_mine, t_end - 1)
                page = mPT[b, t // P]
                slot = t % P
                cute.autovec_copy(cute.local_tile(mK[page, slot, kvh, None], (VEC,), (lig,)), rK[u, None])
                cute.autovec_copy(cute.local_tile(mV[page, slot, kvh, None], (VEC,), (lig,)), rV[u, None])
            for u in cutlass.range_constexpr(U):
                valid = base + (u * NW + warp) * TPW + grp_in_warp < t_end
                kf = rK[u, None].load().to(Float32)
                vf = rV[u, None].load().to(Float32)
                for g in cutlass.range_constexpr(GH):
                    dot = Float32(0.0)
                    for i in cutlass.range_constexpr(VEC):
                        dot += rQ[g, i] * kf[i]
                    for k in cutlass.range_constexpr(int(math.log2(LPT))):
                        dot += cute.arch.shuffle_sync_bfly(dot, offset=LPT >> (k + 1))
                    if const_expr(self.has_softcap):
                        dot = cap2 * cute.math.tanh(dot)
                    rS[g] = dot
                if valid:
                    for g in cutlass.range_constexpr(GH):
                        m_new = cute.arch.fmax(rM[g], rS[g])
                        alpha = cute.math.exp2(rM[g] - m_new, fastmath=True)  # exp2(-inf) = 0 on the first key
                        p = cute.math.exp2(rS[g] - m_new, fastmath=True)
                        rL[g] = rL[g] * alpha + p
                        for i in cutlass.range_constexpr(VEC):
                            rAcc[g, i] = rAcc[g, i] * alpha + p * vf[i]
                        rM[g] = m_new

        # ---- merge the token groups of this CTA through shared memory ----
        for g in cutlass.range_constexpr(GH):
            cute.autovec_copy(rAcc[g, None], cute.local_tile(sAcc[grp, g, None], (VEC,), (lig,)))
        if lig == 0:
            for g in cutlass.range_constexpr(GH):
                sM[grp, g] = rM[g]
                sL[grp, g] = rL[g]
        cute.arch.sync_threads()

        for e in cutlass.range_constexpr((GH * D + NT - 1) // NT):
            idx = tidx + e * NT
            if const_expr((GH * D) % NT == 0) or idx < GH * D:
                g = idx // D
                d = idx % D
                m_cta = -Float32.inf
                for j in cutlass.range_constexpr(NG):
                    m_cta = cute.arch.fmax(m_cta, sM[j, g])
                # All groups empty (a split past the live range): keep exp2 arguments finite, get l = 0.
                m_ref = cutlass.select_(m_cta == -Float32.inf, Float32(0.0), m_cta)
                l_cta = Float32(0.0)
                o_cta = Float32(0.0)
                for j in cutlass.range_constexpr(NG):
                    w = cute.math.exp2(sM[j, g] - m_ref, fastmath=True)
                    l_cta += sL[j, g] * w
                    o_cta += sAcc[j, g, d] * w
                has_keys = l_cta > Float32(0.0)
                out = cutlass.select_(has_keys, o_cta / l_cta, Float32(0.0))
                mOPart[b, h0 + g, split, d] = out
                if d == 0:
                    lse = cutlass.select_(has_keys, (m_ref + cute.math.log2(l_cta, fastmath=True)) * Float32(LN_2),
                                          -Float32.inf)
                    mLsePart[b, h0 + g, split] = lse

        # ---- fused combine: the last of the S split CTAs of this (sequence, kv head, head tile) merges them ----
        if const_expr(self.fused_combine):
            sLse = smem.allocate_tensor(Float32, cute.make_layout(GH * S), byte_alignment=16)
            sWt = smem.allocate_tensor(Float32, cute.make_layout(GH * S), byte_alignment=16)
            sStat = smem.allocate_tensor(Float32, cute.make_layout(2 * GH), byte_alignment=16)
            sFlag = smem.allocate_tensor(Int32, cute.make_layout(1), byte_alignment=16)
            # threadFenceReduction / cooperative-groups grid-sync pattern: the CTA's partial O/LSE stores happen
            # before the barrier; thread 0 then releases them at GPU scope (fence + acq_rel atomic). The CTA that
            # sees S-1 arrivals before its own is the last: it acquires (fence) and reads every split's partials.
            # No CTA waits for another, so there is no deadlock whatever the residency.
            cute.arch.sync_threads()
            cnt_idx = b * self.n_counters_per_seq + head_tile
            if tidx == 0:
                cute.arch.fence_acq_rel_gpu()
                sFlag[0] = cute.arch.atomic_add((mCnt.iterator + cnt_idx).llvm_ptr, Int32(1), sem="acq_rel",
                                                scope="gpu")
            cute.arch.sync_threads()
            if sFlag[0] == S - 1:
                cute.arch.fence_acq_rel_gpu()
                combine_splits(mOPart, mLsePart, mOut, b, h0, sLse, sWt, sStat, tidx, self.n_head, D, S, NT, GH,
                               mOutQs, mOutQd, mOutQsum, self.quantize_out)
                if tidx == 0:
                    mCnt[cnt_idx] = Int32(0)  # all S arrivals are in: reset for the next launch / graph replay


# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////
# Combine kernel
# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////


COMBINE_LOADS_IN_FLIGHT = 32  # partial-O loads a thread issues per unrolled step of the split loop


@cute.jit
def combine_splits(mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor, b: Int32, h0: Int32,
                   sLse: cute.Tensor, sW: cute.Tensor, sStat: cute.Tensor, tidx: Int32, H: cutlass.Constexpr[int],
                   D: cutlass.Constexpr[int], S: cutlass.Constexpr[int], NT: cutlass.Constexpr[int],
                   NH: cutlass.Constexpr[int], mOutQs: cute.Tensor, mOutQd: cute.Tensor, mOutQsum: cute.Tensor,
                   quantize: cutlass.Constexpr[bool]):
    """``out[b, h] = sum_s w_s O_s / sum_s w_s``, ``w_s = exp(LSE_s - max_s LSE_s)``, for the ``NH`` heads
    ``h0 .. h0+NH-1`` of sequence ``b``, by the ``NT`` threads of a CTA (all must call it: it has barriers).
    ``sLse``/``sW``: smem of ``NH*S`` f32 each, ``sStat``: ``2*NH`` f32.

    Shared by :class:`AttentionDecodeCombine` (NH = 1) and the fused-combine split kernel (NH = its GH heads), so
    both give the same bits: every output element is ``num = 0; num += w_s * O_s for s = 0..S-1; num * (1/den)``
    with ``den = w_0 + w_1 + ...`` in split order, whichever thread computes it. The heads are combined together
    (the loads of all of a thread's elements are in flight at once; combining GH heads one after the other cost
    GH dependent rounds of L2 latency). Partials are read with ``ld.global.cg`` (L2): in the fused kernel they were
    written by other CTAs of the same grid (after the acquire fence), and nothing reuses them from L1 anyway.

    ``quantize``: also write the q8_1 copy of ``out`` into ``mOutQs``/``mOutQd``/``mOutQsum`` (flat over ``[B, H*D]``),
    the input of the int8 (dp4a) O projection, instead of a separate quantize launch after attention. Output element
    ``j = tidx + i*NT`` lands in q8_1 block ``((b*H + h0)*D + j) / 32`` at lane ``tidx % 32``: with ``NT`` and ``D``
    multiples of 32 each warp holds exactly one whole block per step ``i``, so :func:`q8_1.quantize_block_warp` (the
    rounding of the standalone quantize kernel) applies as is and gives the same bits."""
    NS = NH * S
    # The NH*S split LSEs (contiguous in lse_part) are loaded once, in parallel, into smem.
    lse_base = (b * H + h0) * S
    for i in cutlass.range_constexpr((NS + NT - 1) // NT):
        j = tidx + i * NT
        if const_expr(NS % NT == 0) or j < NS:
            sLse[j] = cute.arch.load((mLsePart.iterator + lse_base + j).llvm_ptr, Float32, cop="cg")
    cute.arch.sync_threads()
    if tidx < NH:  # per head: the reference LSE (0 when every split is empty, so the weights stay finite)
        lse_max = -Float32.inf
        for s in cutlass.range(S, unroll_full=True):
            lse_max = cute.arch.fmax(lse_max, sLse[tidx * S + s])
        sStat[tidx] = cutlass.select_(lse_max == -Float32.inf, Float32(0.0), lse_max)
    cute.arch.sync_threads()
    for i in cutlass.range_constexpr((NS + NT - 1) // NT):
        j = tidx + i * NT
        if const_expr(NS % NT == 0) or j < NS:
            sW[j] = cute.math.exp2((sLse[j] - sStat[j // S]) * Float32(LOG2_E), fastmath=True)
    cute.arch.sync_threads()
    if tidx < NH:  # per head: 1 / sum of the weights, summed in split order
        den = Float32(0.0)
        for s in cutlass.range(S, unroll_full=True):
            den += sW[tidx * S + s]
        sStat[NH + tidx] = cutlass.select_(den > Float32(0.0), Float32(1.0) / den, Float32(0.0))
    cute.arch.sync_threads()
    # Output elements j = tidx + i*NT of the NH*D outputs; E per thread. A split with no keys has w = 0 and O = 0
    # (never NaN), so it adds nothing.
    NE = NH * D
    E = (NE + NT - 1) // NT
    num = cute.make_rmem_tensor((E,), Float32)
    for i in cutlass.range_constexpr(E):
        num[i] = Float32(0.0)
    for s in cutlass.range(S, unroll=max(1, min(8, COMBINE_LOADS_IN_FLIGHT // E))):
        for i in cutlass.range_constexpr(E):
            j = tidx + i * NT
            if const_expr(NE % NT == 0) or j < NE:
                g = j // D
                d = j % D
                o = cute.arch.load((mOPart.iterator + ((b * H + h0 + g) * S + s) * D + d).llvm_ptr, Float32,
                                   cop="cg")
                num[i] += sW[g * S + s] * o
    for i in cutlass.range_constexpr(E):
        j = tidx + i * NT
        if const_expr(NE % NT == 0) or j < NE:  # warp-uniform (NE, NT multiples of 32): the quantizer's shuffles
            g = j // D
            val = num[i] * sStat[NH + g]
            mOut[b, h0 + g, j % D] = val
            if const_expr(quantize):
                quantize_block_warp(val, ((b * H + h0) * D + j) // QK8_1, tidx % 32, mOutQs, mOutQd, mOutQsum)


def q8_tensors(pQs: cute.Pointer, pQd: cute.Pointer, pQsum: cute.Pointer, n: Int32) -> tuple:
    """Flat tensors over a q8_1 buffer of ``n`` elements (q8_1.py ``Q8Act``: qs int8 [n], d and sum f32 [n/32])."""
    return (cute.make_tensor(pQs, cute.make_layout(n)), cute.make_tensor(pQd, cute.make_layout(n // QK8_1)),
            cute.make_tensor(pQsum, cute.make_layout(n // QK8_1)))


class AttentionDecodeCombine:
    """``out[b, h] = sum_s w_s O_s / sum_s w_s`` with ``w_s = exp(LSE_s - max LSE)``; one CTA per (q head, seq)."""

    def __init__(self, n_head: int, head_dim: int, num_splits: int, quantize_out: bool = False):
        self.pdl = pdl_enabled()
        self.n_head, self.head_dim, self.num_splits = n_head, head_dim, num_splits
        self.quantize_out = quantize_out
        self.num_threads = min(128, head_dim)

    @cute.jit
    def __call__(self, pOPart: cute.Pointer, pLsePart: cute.Pointer, pOut: cute.Pointer, pOutQs: cute.Pointer,
                 pOutQd: cute.Pointer, pOutQsum: cute.Pointer, batch: Int32, stream: cuda.CUstream):
        H, D, S = self.n_head, self.head_dim, self.num_splits
        mOPart = cute.make_tensor(pOPart, cute.make_layout((batch, H, S, D), stride=(H * S * D, S * D, D, 1)))
        mLsePart = cute.make_tensor(pLsePart, cute.make_layout((batch, H, S), stride=(H * S, S, 1)))
        mOut = cute.make_tensor(pOut, cute.make_layout((batch, H, D), stride=(H * D, D, 1)))
        mOutQ = q8_tensors(pOutQs, pOutQd, pOutQsum, batch * H * D)
        self.kernel(mOPart, mLsePart, mOut, *mOutQ).launch(use_pdl=self.pdl, grid=[H, batch, 1],
                                                            block=[self.num_threads, 1, 1],
                                                            smem=2 * 4 * S + 16 + 64, stream=stream)

    @cute.kernel
    def kernel(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor, mOutQs: cute.Tensor,
               mOutQd: cute.Tensor, mOutQsum: cute.Tensor):
        pdl_prologue(self.pdl)
        tidx, _, _ = cute.arch.thread_idx()
        h, b, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        sLse = smem.allocate_tensor(Float32, cute.make_layout(self.num_splits), byte_alignment=16)
        sW = smem.allocate_tensor(Float32, cute.make_layout(self.num_splits), byte_alignment=16)
        sStat = smem.allocate_tensor(Float32, cute.make_layout(2), byte_alignment=16)
        combine_splits(mOPart, mLsePart, mOut, b, h, sLse, sW, sStat, tidx, self.n_head, self.head_dim,
                       self.num_splits, self.num_threads, 1, mOutQs, mOutQd, mOutQsum, self.quantize_out)


# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////
# Compile + launch
# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////


@kernel_cache
def compile_attention_decode(n_head: int, n_kv_head: int, head_dim: int, page_size: int, num_splits: int,
                             softcap: bool = False, heads_per_cta: int = 0, keys_per_iter: int = 0,
                             fused_combine: bool = False, quantize_out: bool = False, qk_rot: int = 0,
                             qk_norm: bool = True, qk_freq_factors: bool = False, v_norm: bool = False):
    """Compile the split-KV kernel (``heads_per_cta``/``keys_per_iter`` 0 = automatic; tuning knobs). Runtime args:
    (q, k_pool, v_pool, page_table, pos, o_part, lse_part, out (align 4), counters (int32, align 4), out_qs (int8,
    align 4), out_d, out_sum, k_new, v_new, q_norm, k_norm, freq_factors (f32, align 4) pointers, batch, n_pages,
    pages_per_seq, scale, window, softcap, theta_scale, eps, q_scale, stream). ``out``/``counters`` are only used
    with ``fused_combine`` (then the kernel also writes ``out``; no combine launch), the ``out_*`` q8_1 buffers only
    with ``quantize_out`` (then it also writes the q8_1 copy of ``out``: no quantize launch before an int8 O
    projection), ``k_new`` .. ``freq_factors``, ``theta_scale``, ``eps``, ``q_scale`` only with ``qk_rot`` > 0 (the
    Q/K prologue in the kernel: ``q`` is then the projection's raw output)."""
    k = AttentionDecodeSplitKV(n_head, n_kv_head, head_dim, page_size, num_splits, softcap,
                               keys_per_iter=keys_per_iter, heads_per_cta=heads_per_cta, fused_combine=fused_combine,
                               quantize_out=quantize_out, qk_rot=qk_rot, qk_norm=qk_norm,
                               qk_freq_factors=qk_freq_factors, v_norm=v_norm)
    f32, f16 = gptr(Float32, 0), gptr(Float16, 0)
    i32_4, f32_4 = gptr(Int32, 0, align=4), gptr(Float32, 0, align=4)
    return cute.compile(k, f32, f16, f16, i32_4, i32_4, f32, f32_4, f32_4, i32_4, gptr(Int8, 0, align=4), f32_4, f32_4,
                        f32_4, f32_4, f32_4, f32_4, f32_4, Int32(1), Int32(1), Int32(1), Float32(1.0), Int32(0),
                        Float32(0.0), Float32(1.0), Float32(1e-6), Float32(1.0), cute.runtime.make_fake_stream(),
                        options=compile_options())


@functools.cache
def prologue_supported(n_head: int, n_kv_head: int, head_dim: int, num_splits: int, heads_per_cta: int = 0,
                       page_size: int = 64) -> bool:
    """Whether the fused-combine split-KV kernel of this geometry can run the Q/K prologue: its CTA has at least
    the prologue's threads (so the result has the standalone kernel's bits) and the prologue's smem fits."""
    try:
        AttentionDecodeSplitKV(n_head, n_kv_head, head_dim, page_size, num_splits, False, heads_per_cta=heads_per_cta,
                               fused_combine=True, qk_rot=2)
    except ValueError:
        return False
    return True


@functools.cache
def fused_counter_count(n_head: int, n_kv_head: int, head_dim: int, batch: int = 1, heads_per_cta: int = 0) -> int:
    """int32 arrival counters ``attention_decode(..., fused_combine=True, counters=...)`` needs: one per (sequence,
    kv head, head tile). They must be zero before the first launch; every launch leaves them zero. Never more than
    ``batch * n_head`` (a head tile holds >= 1 q head), so ``n_head`` counters per sequence fit every layer type."""
    k = AttentionDecodeSplitKV(n_head, n_kv_head, head_dim, 16, 1, False, heads_per_cta=heads_per_cta,
                               fused_combine=True)
    return batch * k.n_counters_per_seq


@kernel_cache
def compile_attention_combine(n_head: int, head_dim: int, num_splits: int, quantize_out: bool = False):
    """Compile the combine kernel. Runtime args: (o_part, lse_part, out, out_qs (int8, align 4), out_d, out_sum (f32,
    align 4) pointers, batch, stream); the ``out_*`` q8_1 buffers are written only with ``quantize_out``."""
    k = AttentionDecodeCombine(n_head, head_dim, num_splits, quantize_out=quantize_out)
    f32_4 = gptr(Float32, 0, align=4)
    return cute.compile(k, gptr(Float32, 0), f32_4, gptr(Float32, 0), gptr(Int8, 0, align=4), f32_4, f32_4, Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


def _prologue_args(pro: QKPrologue, B: int, KV: int, D: int, stream) -> tuple:
    """(pointers k, v, q_norm, k_norm, freq_factors; theta_scale, eps, q_scale; compile flags) of a prologue, its
    inputs checked as :func:`qk_norm_rope_kv` checks them."""
    from ..reference.kernel_refs import theta_scale_f32
    from ..runtime import as_device

    if pro.n_rot % 2 or not 0 < pro.n_rot <= D:
        raise ValueError(f"bad n_rot {pro.n_rot} for head_dim {D}")
    kd, _ = as_device(pro.k, stream, np.float32)
    vd = kd if pro.v is pro.k else as_device(pro.v, stream, np.float32)[0]
    if kd.size != B * KV * D or vd.size != B * KV * D:
        raise ValueError(f"prologue k ({kd.size}) / v ({vd.size}) must hold {B} x {KV} x {D} f32")
    norms, fd = device_weights(pro.q_norm, pro.k_norm, pro.freq_factors, D, pro.n_rot, stream)
    any_ptr = kd.ptr  # unused pointers get any valid address
    ptrs = (kd.ptr, vd.ptr, norms[0].ptr if norms else any_ptr, norms[1].ptr if norms else any_ptr,
            fd.ptr if fd is not None else any_ptr)
    flags = {"qk_rot": pro.n_rot}
    if not norms:
        flags["qk_norm"] = False
    if fd is not None:
        flags["qk_freq_factors"] = True
    if pro.v_norm:
        flags["v_norm"] = True
    return ptrs, (theta_scale_f32(pro.base, pro.n_rot), pro.eps, pro.q_scale), flags


def default_num_splits(n_kv_head: int, max_context: int, sm_count: int = 132, batch: int = 1) -> int:
    """Splits so that ``n_kv_head * splits * batch`` CTAs cover the GPU about twice, but keep >= 64 keys per split
    at the full context (static: the graph is captured once)."""
    want = max(1, -(-2 * sm_count // max(1, n_kv_head * batch)))
    cap = max(1, max_context // 64)
    return int(min(want, cap, 256))


def attention_decode(q, k_pool, v_pool, page_table, pos, *, scale: float, window: int = 0, softcap: float = 0.0,
                     num_splits: int = 16, out=None, o_partial=None, lse_partial=None, workspace=None,
                     stream=None, fused_combine: bool = False, counters=None, heads_per_cta: int = 0,
                     keys_per_iter: int = 0, out_q8=None, prologue: QKPrologue | None = None):
    """Decode attention for one query token per sequence over a paged fp16 KV cache.

    ``q`` f32 [B, n_head, D] (or [n_head, D] for B = 1); ``k_pool``/``v_pool`` f16 [n_pages, page_size, n_kv_head, D];
    ``page_table`` int32 [B, max_pages_per_seq]; ``pos`` int32 [B] (device memory: read by the kernel, so a captured
    graph follows it). Accepts numpy arrays or DeviceArrays; numpy ``q`` in -> numpy out (unless ``out`` is given).
    ``o_partial`` f32 [B, n_head, num_splits, D] and ``lse_partial`` f32 [B, n_head, num_splits] are the split
    workspace: pass them (or a runtime ``Workspace``) for CUDA-graph capture, else they are allocated here.
    ``scale`` multiplies q.k (pass 1.0 when q is already scaled); ``window`` 0 = full causal, else keys with
    ``pos - p < window``; ``softcap`` 0 = off (any other value compiles the softcap variant).

    The compiled functions are memoized, so calling this inside ``CudaGraph.capture`` (with ``out`` and the
    workspace given) records two kernel launches whose ``pos`` is re-read from device memory at every replay.
    ``num_splits`` is static: use the model's entry of ``MODEL_CONFIGS`` (what the compile gate checks).
    ``heads_per_cta`` / ``keys_per_iter`` (0: the kernel's automatic choice) are the other launch knobs the
    autotuner's ``attention_decode`` configs set.

    ``fused_combine=True``: ONE launch; the last split CTA of each (sequence, kv head, head tile) does the LSE
    combine (same code and order as the combine kernel: bit-identical output). It needs ``counters``: int32, at
    least :func:`fused_counter_count` elements, zero before the first launch (the kernel leaves them zero, so one
    buffer serves every layer and replay on one stream). Not given: taken from ``workspace`` (zeroed when first
    created there) or allocated zeroed here (not allowed inside a graph capture).

    ``out_q8`` (a q8_1.py ``Q8Act`` of ``B`` rows of ``n_head * D``): the kernel that writes ``out`` also writes its
    q8_1 copy (the input of an int8 O projection), with the bits ``quantize_q8_1(out)`` would give: one launch fewer.

    ``prologue`` (a qk_norm_rope_kv.py ``QKPrologue``; needs ``fused_combine``): ``q`` is the Q projection's raw
    output, and the kernel itself does what :func:`qk_norm_rope_kv` would do before it (Q/K RMSNorm, RoPE, q scale,
    fp16 append of this token's K/V at ``pos``), with the same bits; ``q`` is not written. One launch fewer.
    """
    from ..runtime import DeviceArray, as_device, resolve_stream

    stream = resolve_stream(stream)
    q_shape = tuple(q.shape)
    B, H, D = (1, *q_shape) if len(q_shape) == 2 else q_shape
    n_pages, P, KV, Dk = tuple(k_pool.shape)
    if Dk != D or tuple(v_pool.shape) != tuple(k_pool.shape):
        raise ValueError(f"k_pool {tuple(k_pool.shape)} / v_pool {tuple(v_pool.shape)} do not match q {q_shape}")
    if n_pages * P * KV * D >= 2**31:
        raise ValueError("a KV pool of >= 2^31 elements per layer overflows the kernel's Int32 offsets")
    pages_per_seq = tuple(page_table.shape)[-1]
    if int(np.prod(page_table.shape)) != B * pages_per_seq or int(np.prod(pos.shape)) != B:
        raise ValueError(f"page_table {tuple(page_table.shape)} / pos {tuple(pos.shape)} do not match batch {B}")
    dq, q_was_np = as_device(q, stream, np.float32)
    dk, _ = as_device(k_pool, stream, np.float16)
    dv, _ = as_device(v_pool, stream, np.float16)
    dpt, _ = as_device(page_table, stream, np.int32)
    dpos, _ = as_device(pos, stream, np.int32)
    S = num_splits
    if o_partial is None:
        o_partial = (workspace.get((B, H, S, D), np.float32, tag="attention_decode.o_partial") if workspace is not None
                     else DeviceArray.empty((B, H, S, D), np.float32))
    if lse_partial is None:
        lse_partial = (workspace.get((B, H, S), np.float32, tag="attention_decode.lse_partial") if workspace is not None
                       else DeviceArray.empty((B, H, S), np.float32))
    out_dev = out if out is not None else DeviceArray.empty((B, H, D), np.float32)
    if fused_combine:
        n_cnt = fused_counter_count(H, KV, D, B, heads_per_cta)
        if counters is None:
            if workspace is not None:
                n_before = len(workspace)
                counters = workspace.get((n_cnt,), np.int32, tag="attention_decode.counters")
                if len(workspace) != n_before:  # freshly allocated: zero once (the kernel keeps it zero)
                    counters.fill_bytes(0, stream)
            else:
                counters = DeviceArray.zeros((n_cnt,), np.int32, stream=stream)
        if counters.nbytes < 4 * n_cnt:
            raise ValueError(f"counters has {counters.nbytes} bytes; fused_combine needs {n_cnt} int32")
    quantize_out = out_q8 is not None
    # the kernel writes q8_1 blocks flat over [B, H*D]: one row may be longer (a buffer sized for the widest layer)
    if quantize_out and (out_q8.rows * out_q8.n < B * H * D or (B > 1 and out_q8.n != H * D)):
        raise ValueError(f"out_q8 holds {out_q8.rows} rows of {out_q8.n}; attention writes {B} rows of {H * D}")
    # without quantize_out no kernel touches the q8_1 pointers: any valid device pointers do
    q8_ptrs = (out_q8.qs.ptr, out_q8.d.ptr, out_q8.s.ptr) if quantize_out else (dpos.ptr,) * 3
    q8_args = (gptr(Int8, q8_ptrs[0], align=4), gptr(Float32, q8_ptrs[1], align=4), gptr(Float32, q8_ptrs[2], align=4))
    has_softcap = softcap != 0.0
    # keyword arguments, as the compile-gate registry calls them (one memo/disk-cache key per config; flags and
    # tuning knobs only when set, so the default configs keep their keys)
    flags = {"fused_combine": True} if fused_combine else {}
    if quantize_out and fused_combine:
        flags["quantize_out"] = True
    pro_ptrs, pro_scalars = (dpos.ptr,) * 5, (1.0, 1e-6, 1.0)  # (never touched without the prologue)
    if prologue is not None:
        if not fused_combine:
            raise ValueError("the Q/K prologue runs in the fused-combine kernel only")
        pro_ptrs, pro_scalars, pro_flags = _prologue_args(prologue, B, KV, D, stream)
        flags.update(pro_flags)
    tuning = {k: v for k, v in (("heads_per_cta", heads_per_cta), ("keys_per_iter", keys_per_iter)) if v}
    f_attn = compile_attention_decode(n_head=H, n_kv_head=KV, head_dim=D, page_size=P, num_splits=S,
                                      softcap=has_softcap, **flags, **tuning)
    cus = cu_stream(stream)
    # without fused_combine the kernel never touches out/counters: any valid pointers do
    cnt_ptr = counters.ptr if fused_combine else dpos.ptr
    f_attn(gptr(Float32, dq.ptr), gptr(Float16, dk.ptr), gptr(Float16, dv.ptr),
           gptr(Int32, dpt.ptr, align=4), gptr(Int32, dpos.ptr, align=4),
           gptr(Float32, o_partial.ptr), gptr(Float32, lse_partial.ptr, align=4),
           gptr(Float32, out_dev.ptr, align=4), gptr(Int32, cnt_ptr, align=4), *q8_args,
           *(gptr(Float32, p, align=4) for p in pro_ptrs), Int32(B), Int32(n_pages), Int32(pages_per_seq),
           Float32(scale), Int32(window), Float32(softcap if has_softcap else 1.0),
           *(Float32(float(x)) for x in pro_scalars), cus)
    if not fused_combine:
        f_comb = compile_attention_combine(n_head=H, head_dim=D, num_splits=S,
                                           **({"quantize_out": True} if quantize_out else {}))
        f_comb(gptr(Float32, o_partial.ptr), gptr(Float32, lse_partial.ptr, align=4), gptr(Float32, out_dev.ptr),
               *q8_args, Int32(B), cus)
    if q_was_np and out is None:
        return out_dev.to_numpy(stream).reshape(q_shape)
    return out_dev


def split_kv_ranges(pos: int, window: int, num_splits: int) -> list[tuple[int, int]]:
    """The [begin, end) key range of each split, exactly as the kernel computes it (for tests and docs)."""
    kv_end = pos + 1
    kv_begin = 0 if window <= 0 else max(0, kv_end - window)
    chunk = (kv_end - kv_begin + num_splits - 1) // num_splits
    out = []
    for s in range(num_splits):
        b = kv_begin + s * chunk
        out.append((b, min(b + chunk, kv_end)))
    return out


# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////
# Compile-gate registry
# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////

# (n_head, n_kv_head, head_dim, page_size, num_splits, softcap) per model attention layer type.
MODEL_CONFIGS: dict[str, dict] = {
    "qwen3moe-30b-a3b": dict(n_head=32, n_kv_head=4, head_dim=128, page_size=64, num_splits=32),
    "gemma3-270m": dict(n_head=4, n_kv_head=1, head_dim=256, page_size=64, num_splits=64),
    "gemma4-26b-a4b-swa": dict(n_head=16, n_kv_head=8, head_dim=256, page_size=64, num_splits=16),
    "gemma4-26b-a4b-full": dict(n_head=16, n_kv_head=2, head_dim=512, page_size=64, num_splits=64),
    "qwen35moe-full": dict(n_head=16, n_kv_head=2, head_dim=256, page_size=64, num_splits=64),
    "tiny": dict(n_head=8, n_kv_head=2, head_dim=64, page_size=64, num_splits=8),
}


def _launch_example(n_head: int, n_kv_head: int, head_dim: int, page_size: int, num_splits: int,
                    softcap: bool = False, fused_combine: bool = False, quantize_out: bool = False, **prologue):
    """One split-KV launch on small zeroed buffers, marshalled like :func:`attention_decode` (host-overhead probe)."""
    from ..runtime import DeviceArray, default_stream

    H, KV, D, P, S = n_head, n_kv_head, head_dim, page_size, num_splits
    q = DeviceArray.zeros((1, H, D), np.float32)
    k = DeviceArray.zeros((4, P, KV, D), np.float16)
    table = DeviceArray.zeros((1, 4), np.int32)
    pos = DeviceArray.zeros((1,), np.int32)
    o_part, lse_part = DeviceArray.empty((1, H, S, D), np.float32), DeviceArray.empty((1, H, S), np.float32)
    out = DeviceArray.empty((1, H, D), np.float32)
    counters = DeviceArray.zeros((fused_counter_count(H, KV, D),), np.int32)
    out_q8 = Q8Act(1, H * D)
    flags = {"fused_combine": True} if fused_combine else {}
    if quantize_out:
        flags["quantize_out"] = True
    fn = compile_attention_decode(n_head=H, n_kv_head=KV, head_dim=D, page_size=P, num_splits=S, softcap=softcap,
                                  **flags, **prologue)
    s = default_stream()
    f32_4 = gptr(Float32, q.ptr, align=4)  # the prologue's inputs (read only with qk_rot)

    def launch():
        fn(gptr(Float32, q.ptr), gptr(Float16, k.ptr), gptr(Float16, k.ptr), gptr(Int32, table.ptr, align=4),
           gptr(Int32, pos.ptr, align=4), gptr(Float32, o_part.ptr), gptr(Float32, lse_part.ptr, align=4),
           gptr(Float32, out.ptr, align=4), gptr(Int32, counters.ptr, align=4), gptr(Int8, out_q8.qs.ptr, align=4),
           gptr(Float32, out_q8.d.ptr, align=4), gptr(Float32, out_q8.s.ptr, align=4), f32_4, f32_4, f32_4, f32_4,
           f32_4, Int32(1), Int32(4), Int32(4), Float32(0.1), Int32(0), Float32(1.0), Float32(0.5), Float32(1e-6),
           Float32(1.0), cu_stream(s))

    return launch


# None of the target models caps attention logits (models.md); the softcap variant is gated on the tiny config.
_CONFIGS = [dict(c, softcap=False) for c in MODEL_CONFIGS.values()] + [dict(MODEL_CONFIGS["tiny"], softcap=True)]
# the models run the fused-combine variant (one launch per layer); the two-kernel path stays gated for A/B
_CONFIGS += [dict(c, softcap=False, fused_combine=True) for c in MODEL_CONFIGS.values()]
_CONFIGS += [dict(MODEL_CONFIGS["tiny"], softcap=True, fused_combine=True)]
# ... with the q8_1 copy of the output for the int8 O projection (what the models with int8 attention run)
_CONFIGS += [dict(c, softcap=False, fused_combine=True, quantize_out=True) for c in MODEL_CONFIGS.values()]
# ... with the Q/K prologue (what the models run by default: models/ops.py ``fused_qk_attention``), each layer type's
# prologue flags as in qk_norm_rope_kv.py MODEL_CONFIGS; f32 output (Gemma 3) and q8_1 output (int8 O projection)
PROLOGUE_CONFIGS = {
    "qwen3moe-30b-a3b": dict(qk_rot=128),
    "gemma3-270m": dict(qk_rot=256),
    "gemma4-26b-a4b-swa": dict(qk_rot=256, v_norm=True),
    "gemma4-26b-a4b-full": dict(qk_rot=512, qk_freq_factors=True, v_norm=True),
    "tiny": dict(qk_rot=64),
}
_CONFIGS += [dict(MODEL_CONFIGS[m], softcap=False, fused_combine=True, quantize_out=q8, **pro)
             for m, pro in PROLOGUE_CONFIGS.items() for q8 in (False, True)]
register("attention_decode", compile_attention_decode, _CONFIGS, launch_example=_launch_example)
_COMBINE = sorted({(c["n_head"], c["head_dim"], c["num_splits"]) for c in MODEL_CONFIGS.values()})
register("attention_combine", compile_attention_combine,
         [dict(n_head=h, head_dim=d, num_splits=s) for h, d, s in _COMBINE]
         + [dict(n_head=h, head_dim=d, num_splits=s, quantize_out=True) for h, d, s in _COMBINE[:1]])
