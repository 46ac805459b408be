"""Causal flash-attention prefill over the paged fp16 KV cache, on tensor cores (``mma.sync`` m16n8k16), CuTe DSL.

**Status: compile-gated (sm_120a, sm_121a, sm_90a; no spills); its GPU tests pass on the H100 (RESULTS.md,
2026-12-07); its speed is not yet measured.** The CPU tests (tests/kernels/test_attention_prefill.py) check the
kernel's own range/mask/index functions (shared plain functions below): the tile plan against the visibility rule, a
float64 emulation of the algorithm (with its f16 roundings) against the float64 reference within the GPU test's error
bound, and a lane-by-lane model of its ``ldmatrix`` / ``mma.sync`` fragments (PTX layouts) for S, the slice exchange
and PV. The GPU tests in the same file check the float64 bound, q = 0 key counting, and NaN-poisoned invisible slots
and output. The reference that rounds like this kernel (for the model-level gates) is
``sparkinfer_cute/reference/ops.py attention_f16_tiles``.

One prompt chunk of T queries of one sequence, at positions ``p0 .. p0+T-1`` after a cached prefix of ``p0`` keys
(``p0 = pos[0]``, read from device memory so a graph captured for a chunk length replays at every offset). The
chunk's own K/V are already in the cache (``qk_norm_rope_kv_rows`` appends them first). Layouts:

* ``q``           f32 ``[T, n_head, D]`` (normed + RoPE'd; ``scale`` is applied here, in f32, to the logits)
* ``k_pool``      f16 ``[n_pages, page_size, n_kv_head, D]`` (:mod:`sparkinfer_cute.kernels.paged_kv`), ``v_pool`` same
* ``page_table``  int32 ``[pages_per_seq]``: the sequence's row (key ``p`` is in pool page ``page_table[p // page_size]``,
  slot ``p % page_size``)
* ``pos``         int32, ``pos[0] = p0``
* ``out``         f32 ``[T, n_head, D]`` (what ``quantize_rows`` consumes)

Masking (models.md, Attention conventions): key ``p`` is visible to the query at position ``q`` iff ``p <= q`` and
(``window == 0`` or ``q - p < window``). GQA: q head ``h`` reads kv head ``h // G``, ``G = n_head / n_kv_head``.
Logits ``s = scale * q.k``, optionally ``softcap * tanh(s / softcap)``; softmax in f32, base 2 (online).

**Tiles.** A CTA owns one kv head and ``BM`` rows of the GQA-packed M dimension: row ``m`` is (token ``m // G``, q
head ``kvh*G + m % G``), so the ``G`` heads that share a kv head share every K/V tile the CTA loads (a chunk of a few
tokens still fills the 16-row MMA tiles: T = 1 with G = 8 uses 8 of 16 rows, not 1). Rows past the chunk compute as
copies of the last token and are never stored. The CTA walks key tiles of ``BN`` keys from the first key any of its
rows sees (``max(0, p0 + first_token - window + 1)``) to the last (``p0 + last_token``): tiles wholly outside (the
causal future, before the window) are never visited, and only tiles that cross a row's visibility edge are masked.
Grid: (M tiles, n_kv_head); the M tiles are issued last-first, so the CTAs with the most keys start first. Only
the head size and the softcap flag are compiled in: head counts, GQA group, page size (a power of two, passed as its
log2), chunk length, window, scale and softcap value are runtime arguments (the divisions by G run once per thread).

**Warps.** Each warp owns a 16-row m16 tile and a ``DS = min(D, 128)``-wide slice of the head dim: ``DC = D / DS``
warps share a row group (``RG`` row groups, ``NW = RG * DC`` warps, ``BM = 16 * RG``). Per thread the O accumulator
is then always 16 x DS / 32 = 64 f32 (hd 512 would need 256 per thread with one warp per row group), and the Q
fragments of the warp's (rows, slice) stay in 32 registers for the whole CTA (loaded once from global f32, rounded
to f16). ``S = Q K^T``: each warp computes the partial sum over its slice; with ``DC > 1`` the warps of a row group
exchange partials through shared memory (f32, XOR-swizzled) and every one of them sums the ``DC`` partials in the same
order, so all hold bit-identical S, m, l and P; then each multiplies P (registers, f16: the S accumulator layout of
two n8 tiles is the A-fragment layout of one k16 step) by its slice of V.

    D    DS  DC  RG  warps  BM  BN   smem: K + V (+ S exchange)   registers sm_120a / sm_121a / sm_90a (softcap)
    64   64  1   4   4      64  64    8 K +  8 K        = 16 KB     211 / 211 / 221  (168 / 168 / 223)
    128  128 1   4   4      64  64   16 K + 16 K        = 32 KB     248 / 248 / 255  (252 / 252 / 255)
    256  128 2   4   8      64  32   16 K + 16 K + 16 K = 48 KB     251 / 251 / 255  (252 / 252 / 254)
    512  128 4   2   8      32  32   32 K + 32 K + 16 K = 80 KB     255 / 255 / 255  (255 / 255 / 255)

No configuration spills: the DSL's own ptxas (``CUTE_DSL_COMPILER_OPT="remarks{ptx}"``) reports 0 bytes stack
frame, spill stores and spill loads for every config on all three targets. ptxas takes up to the 255-register cap
(the fully unrolled K/V ``ldmatrix`` loads are hoisted ahead of their MMAs), so re-check the spill line after any
change to the loop body. Two things were changed to stay under it: hd 256 uses BN = 32 (BN = 64 fit 96 KB of smem
but spilled 24 bytes), and the softcap's tanh is one ex2 + one rcp (the exact two-branch tanh spilled 20-36 bytes at
hd 64/128). One CTA of 8 warps (or two of 4) per SM.

**Pipeline** (FlashAttention-2 order, cp.async groups, one K and one V buffer): V(j) is loaded while S(j) = Q K(j)^T
and the softmax run, K(j+1) while O += P V(j). Every 16-byte chunk is a ``cp.async`` whose source is looked up
through the page table per key row, so a tile may span pages of any power-of-two size; keys outside the CTA's range
are zero-filled (never read), so no NaN or stale slot can reach the MMA. K/V rows in shared memory are XOR-swizzled
in 16-byte chunks (chunk ``c`` of row ``r`` at ``c ^ (r % 8)``), which makes every ``ldmatrix`` (K plain, V
``.trans``) conflict-free.

**Accuracy.** K/V are the stored fp16 values; q is rounded to f16 (relative 2^-11) and P to f16 before the PV
product; QK^T and PV accumulate in f32, the softmax is f32 with ``ex2.approx`` (2^-22); the softcap's tanh is
``1 - 2 / (2^(2y log2 e) + 1)`` with ``ex2.approx`` and ``rcp.approx`` (2^-21 absolute). The error bound the tests
use is derived in :func:`sparkinfer_cute.reference.kernel_refs.attention_prefill_bound`.
"""

from __future__ import annotations

import math

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float16, Float32, Int32, Uint32, const_expr, cute

from sparkinfer_cute.kernels.arch import pdl_enabled, smem_budget
from sparkinfer_cute.kernels.common import (
    cp_async,
    cu_stream,
    gptr,
    ldmatrix_x4,
    mma_f16_m16n8k16,
    pack_f16x2,
    pdl_prologue,
)
from sparkinfer_cute.kernels.compile import compile_options, kernel_cache
from sparkinfer_cute.kernels.registry import register

LOG2_E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------- index math
# Plain functions of ints: the kernel traces them with DSL Int32 values, the CPU tests call them with Python ints
# (tests/kernels/test_attention_prefill.py emulates ldmatrix / mma.sync lane by lane on exactly these offsets).
def swizzled_offset(row, chunk, head_dim: int):
    """Element offset of 16-byte chunk ``chunk`` of K/V row ``row`` in a shared-memory tile: chunk ``c`` of row ``r``
    is stored at chunk ``c ^ (r % 8)``, so the 8 rows an ``ldmatrix`` reads at one logical chunk hit 8 different
    4-bank groups."""
    return row * head_dim + ((chunk ^ (row % 8)) * 8)


def pool_offset(page, key, chunk, kvh, n_kv_head, head_dim: int, page_shift):
    """Element offset in a K/V pool ``[n_pages, 2^page_shift, n_kv_head, head_dim]`` of 16-byte chunk ``chunk`` of
    key ``key``'s row of kv head ``kvh``, the key's logical page ``key >> page_shift`` living in pool page ``page``."""
    slot = key - ((key >> page_shift) << page_shift)
    return (((page << page_shift) + slot) * n_kv_head + kvh) * head_dim + chunk * 8


def loader_chunk(tidx, it: int, num_threads: int, chunks_per_row: int):
    """(tile row, chunk) of the ``it``-th 16-byte copy of thread ``tidx`` when loading a K/V tile."""
    c = tidx + it * num_threads
    return c // chunks_per_row, c % chunks_per_row


def q_fragment_col(d0, ks: int, half: int, t):
    """Head-dim column of the first of the two q values in A-fragment register ``2*half + r`` (row g + 8r) of
    k16 step ``ks`` for the lane with ``t = lane % 4``."""
    return d0 + ks * 16 + half * 8 + 2 * t


def k_fragment_row_chunk(lane, npair: int, ks: int, d0):
    """(key row, chunk) whose address ``lane`` gives ``ldmatrix.x4`` for the B fragments of S n8 tiles ``2*npair``
    and ``2*npair + 1`` at k16 step ``ks``: matrices (keys +0..7, k lo), (keys +0..7, k hi), (keys +8..15, k lo),
    (keys +8..15, k hi) -> registers b0, b1 of tile 2*npair, then b0, b1 of tile 2*npair + 1."""
    mi = lane // 8
    return npair * 16 + (mi // 2) * 8 + lane % 8, (d0 + ks * 16) // 8 + mi % 2


def v_fragment_row_chunk(lane, kk: int, dpair: int, d0):
    """(key row, chunk) whose address ``lane`` gives ``ldmatrix.x4.trans`` for the B fragments of O n8 tiles
    ``2*dpair`` and ``2*dpair + 1`` at key step ``kk``: matrices (keys +0..7, d +0..7), (keys +8..15, d +0..7),
    (keys +0..7, d +8..15), (keys +8..15, d +8..15)."""
    mi = lane // 8
    return kk * 16 + (mi % 2) * 8 + lane % 8, (d0 + dpair * 16) // 8 + mi // 2


def exchange_offset(warp, row, nt: int, t, block_n: int):
    """f32 offset of the column pair (2(4 nt + t), +1) of partial-S row ``row`` of ``warp`` in the exchange buffer:
    the pair index is XORed with ``(row % 4) * 4``, so the 8-byte accesses of a half warp (rows g = 0..3) land on
    four different 8-bank groups."""
    pair = (nt * 4 + t) ^ ((row % 4) * 4)
    return warp * 16 * block_n + row * block_n + pair * 2


def logit_multipliers(scale, softcap, has_softcap: bool):
    """``(s_mul, cap2)`` of the base-2 logit of a raw score ``s = q.k``: ``s * s_mul`` (= scale log2(e) s), or with
    softcap :func:`softcapped_logit_base2` (= softcap log2(e) tanh(scale s / softcap)). Works on floats and on the
    kernel's Float32 values."""
    if has_softcap:
        return scale / softcap * (2.0 * LOG2_E), softcap * LOG2_E
    return scale * LOG2_E, softcap * LOG2_E


def softcapped_logit_base2(s, s_mul, cap2, exp2, rcp):
    """``cap2 * tanh(y)`` as ``cap2 - 2 cap2 / (2^(2 y log2 e) + 1)`` (``s * s_mul = 2 y log2 e``): one exp2 and one
    reciprocal (``exp2``/``rcp``: ex2.approx / rcp.approx in the kernel, numpy in the tests); +-cap2 at +-inf."""
    return cap2 - (cap2 + cap2) * rcp(exp2(s * s_mul) + 1.0)


def tile_config(head_dim: int) -> dict:
    """Static tile geometry of a head size (see the module docstring's table)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention_prefill: head_dim {head_dim} not supported (one of {SUPPORTED_HEAD_DIMS})")
    ds = min(head_dim, 128)
    dc = head_dim // ds
    rg = 4 if head_dim <= 256 else 2
    bn = 64 if head_dim <= 128 else 32
    return {"d_slice": ds, "d_split": dc, "row_groups": rg, "warps": rg * dc, "block_m": 16 * rg, "block_n": bn}


class HostInts:
    """Integer ops for evaluating the range math below on Python ints (tests, :func:`tile_plan`)."""

    min = staticmethod(min)
    max = staticmethod(max)

    @staticmethod
    def select(cond, a, b):
        return a if cond else b


class DeviceInts:
    """The same ops on the kernel's Int32 values."""

    min = staticmethod(cutlass.min)
    max = staticmethod(cutlass.max)
    select = staticmethod(cutlass.select_)


def cta_key_range(m0, n_tokens, group, block_m: int, p0, window, ops):
    """``(k_lo, k_hi, lo_max, hi_min)`` of the CTA whose GQA-packed rows start at ``m0``: the keys any of its rows
    sees are ``[k_lo, k_hi]``; every row sees every key in ``[lo_max, hi_min]`` (a tile inside it needs no mask).
    Rows past the chunk count as its last token."""
    i_lo = m0 // group
    i_hi = ops.min(n_tokens - 1, (m0 + block_m - 1) // group)
    k_lo = ops.select(window > 0, ops.max(p0 + i_lo - window + 1, 0), 0)
    lo_max = ops.select(window > 0, ops.max(p0 + i_hi - window + 1, 0), 0)
    return k_lo, p0 + i_hi, lo_max, p0 + i_lo


def tile_needs_mask(kb, block_n: int, lo_max, hi_min):
    """Whether the key tile starting at ``kb`` holds a key some row of the CTA must not see."""
    return (kb < lo_max) | (kb + block_n - 1 > hi_min)


def row_query(m, n_tokens, group, p0, window, ops):
    """``(token, q head within the kv group, query position, first visible key)`` of GQA-packed row ``m`` (a row
    past the chunk is a copy of the last token: computed, never stored)."""
    tok = ops.min(m // group, n_tokens - 1)
    qpos = p0 + tok
    return tok, m % group, qpos, ops.select(window > 0, ops.max(qpos - window + 1, 0), 0)


def key_visible(key, first_key, qpos):
    """models.md's rule with the row's first visible key precomputed: ``first_key <= key <= qpos``."""
    return (key >= first_key) & (key <= qpos)


def tile_plan(T: int, p0: int, group: int, block_m: int, block_n: int, window: int):
    """The key tiles each M tile of a chunk visits and which of them are masked, from the kernel's own range
    functions (for tests and docs): a list over M tiles of ``(first_key, last_key, [(tile, needs_mask), ...])``."""
    plan = []
    for mt in range(-(-T * group // block_m)):
        k_lo, k_hi, lo_max, hi_min = cta_key_range(mt * block_m, T, group, block_m, p0, window, HostInts)
        tiles = [(j, bool(tile_needs_mask(j * block_n, block_n, lo_max, hi_min)))
                 for j in range(k_lo // block_n, k_hi // block_n + 1)]
        plan.append((k_lo, k_hi, tiles))
    return plan


class AttentionPrefill:
    """Causal flash attention of one prompt chunk over the paged KV cache; see the module docstring."""

    def __init__(self, head_dim: int, has_softcap: bool):
        self.pdl = pdl_enabled()
        self.head_dim, self.has_softcap = head_dim, has_softcap
        c = tile_config(head_dim)
        self.d_slice, self.d_split, self.row_groups = c["d_slice"], c["d_split"], c["row_groups"]
        self.num_warps, self.block_m, self.block_n = c["warps"], c["block_m"], c["block_n"]
        self.num_threads = 32 * self.num_warps
        self.chunks_per_row = head_dim // 8  # 16-byte chunks of one K/V row
        assert self.chunks_per_row >= 8  # the XOR swizzle permutes the low 3 bits of the chunk index
        assert (self.block_n * self.chunks_per_row) % self.num_threads == 0
        if self.smem_bytes() > smem_budget():
            raise ValueError(f"attention prefill config needs {self.smem_bytes()} B smem > budget {smem_budget()} B")

    def smem_bytes(self) -> int:
        kv = 2 * self.block_n * self.head_dim * 2
        exchange = self.num_warps * 16 * self.block_n * 4 if self.d_split > 1 else 0
        return kv + exchange + 3 * 128  # + alignment padding of the three buffers

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, pQ: cute.Pointer, pK: cute.Pointer, pV: cute.Pointer, pPageTable: cute.Pointer,
                 pPos: cute.Pointer, pOut: cute.Pointer, n_tokens: Int32, n_head: Int32, n_kv_head: Int32,
                 page_shift: Int32, pages_per_seq: Int32, scale: Float32, window: Int32, softcap: Float32,
                 stream: cuda.CUstream):
        D = self.head_dim
        mQ = cute.make_tensor(pQ, cute.make_layout((n_tokens, n_head, D), stride=(n_head * D, D, 1)))
        mOut = cute.make_tensor(pOut, cute.make_layout((n_tokens, n_head, D), stride=(n_head * D, D, 1)))
        mPT = cute.make_tensor(pPageTable, cute.make_layout(pages_per_seq))
        mPos = cute.make_tensor(pPos, cute.make_layout(1))
        group = n_head // n_kv_head
        n_mtiles = (n_tokens * group + self.block_m - 1) // self.block_m
        self.kernel(mQ, pK, pV, mPT, mPos, mOut, n_tokens, group, n_kv_head, page_shift, scale, window,
                    softcap).launch(use_pdl=self.pdl, grid=[n_mtiles, n_kv_head, 1], block=[self.num_threads, 1, 1],
                                    smem=self.smem_bytes(), stream=stream)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, pK: cute.Pointer, pV: cute.Pointer, mPT: cute.Tensor, mPos: cute.Tensor,
               mOut: cute.Tensor, n_tokens: Int32, group: Int32, n_kv_head: Int32, page_shift: Int32, scale: Float32,
               window: Int32, softcap: Float32):
        pdl_prologue(self.pdl)
        D = self.head_dim
        DS, DC, BM, BN = self.d_slice, self.d_split, self.block_m, self.block_n
        KS = DS // 16  # k16 steps of the S product over this warp's head-dim slice
        NS = BN // 8  # n8 tiles of S (keys)
        NO = DS // 8  # n8 tiles of O (head-dim columns of the slice)

        tidx, _, _ = cute.arch.thread_idx()
        bx, kvh, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(tidx // 32)
        lane = tidx % 32
        g = lane // 4  # mma groupID: fragment rows g and g + 8
        t = lane % 4  # thread in group: fragment columns 2t, 2t + 1
        rg = warp // DC  # row group: CTA rows [16 rg, 16 rg + 16)
        dc = warp % DC  # head-dim slice: columns [dc DS, dc DS + DS)
        d0 = dc * DS

        n_mtiles = (n_tokens * group + BM - 1) // BM
        mtile = n_mtiles - 1 - bx  # last tiles (most keys) first
        m0 = mtile * BM
        p0 = mPos[0]

        # ---- shared memory ----
        smem = cutlass.memory.SmemAllocator()
        sK = smem.allocate_tensor(Float16, cute.make_layout(BN * D), byte_alignment=128)
        sV = smem.allocate_tensor(Float16, cute.make_layout(BN * D), byte_alignment=128)
        sX = None
        if const_expr(DC > 1):
            sX = smem.allocate_tensor(Float32, cute.make_layout(self.num_warps * 16 * BN), byte_alignment=128)

        # ---- key range of the CTA (every key in it is visible to at least one of its rows) ----
        k_lo, k_hi, lo_max, hi_min = cta_key_range(m0, n_tokens, group, BM, p0, window, DeviceInts)
        j_lo = k_lo // BN
        j_hi = k_hi // BN

        self.load_tile(pK, sK, j_lo, k_lo, k_hi, mPT, kvh, n_kv_head, page_shift, tidx)
        cute.arch.cp_async_commit_group()

        # ---- this thread's two rows: query position, first visible key; Q fragments (f16) of (rows, slice) ----
        qpos = cute.make_rmem_tensor((2,), Int32)
        qlo = cute.make_rmem_tensor((2,), Int32)
        qf = cute.make_rmem_tensor((KS * 4,), Uint32)
        for r in cutlass.range_constexpr(2):
            tok, hq, qp, first_key = row_query(m0 + rg * 16 + g + 8 * r, n_tokens, group, p0, window, DeviceInts)
            head = kvh * group + hq
            qpos[r] = qp
            qlo[r] = first_key
            for ks in cutlass.range_constexpr(KS):
                for half in cutlass.range_constexpr(2):  # k columns 2t.. (a0/a1) and 2t+8.. (a2/a3)
                    d = q_fragment_col(d0, ks, half, t)
                    qf[ks * 4 + half * 2 + r] = pack_f16x2(mQ[tok, head, d], mQ[tok, head, d + 1])

        # ---- online softmax state (base 2) and the O accumulator of (rows g, g+8) x slice ----
        rM = cute.make_rmem_tensor((2,), Float32)
        rL = cute.make_rmem_tensor((2,), Float32)
        for r in cutlass.range_constexpr(2):
            rM[r] = -Float32.inf
            rL[r] = Float32(0.0)
        acc_o = cute.make_rmem_tensor((NO * 4,), Float32)
        acc_o.fill(0.0)
        acc_s = cute.make_rmem_tensor((NS * 4,), Float32)

        s_mul, cap2 = logit_multipliers(scale, softcap, self.has_softcap)  # base-2 logits

        for j in cutlass.range(j_lo, j_hi + 1, 1, unroll=1):
            # K(j) landed (this thread's copies), and every thread's copies are visible; V buffer is free
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()
            self.load_tile(pV, sV, j, k_lo, k_hi, mPT, kvh, n_kv_head, page_shift, tidx)
            cute.arch.cp_async_commit_group()

            # ---- S = Q K(j)^T over this warp's head-dim slice ----
            acc_s.fill(0.0)
            for ks in cutlass.range_constexpr(KS):
                for npair in cutlass.range_constexpr(NS // 2):
                    krow, kch = k_fragment_row_chunk(lane, npair, ks, d0)
                    b = ldmatrix_x4(sK.iterator + swizzled_offset(krow, kch, D))
                    for sub in cutlass.range_constexpr(2):
                        nt = npair * 2 + sub
                        c = mma_f16_m16n8k16(qf[ks * 4], qf[ks * 4 + 1], qf[ks * 4 + 2], qf[ks * 4 + 3],
                                             b[2 * sub], b[2 * sub + 1], acc_s[nt * 4], acc_s[nt * 4 + 1],
                                             acc_s[nt * 4 + 2], acc_s[nt * 4 + 3])
                        for e in cutlass.range_constexpr(4):
                            acc_s[nt * 4 + e] = c[e]

            if const_expr(DC > 1):
                # partial sums of the row group's DC warps through smem; all DC warps add them in slice order
                self.exchange_partials(sX, acc_s, warp, rg, g, t)

            # ---- logits in base 2, mask at visibility edges, online softmax ----
            for i in cutlass.range_constexpr(NS * 4):
                if const_expr(self.has_softcap):
                    # ex2.approx + rcp.approx (|error| <= 2^-21 absolute on tanh): the exact tanh's two-branch
                    # expansion pushed hd 64/128 over the register file
                    acc_s[i] = softcapped_logit_base2(acc_s[i], s_mul, cap2, _ex2_approx, cute.arch.rcp_approx)
                else:
                    acc_s[i] = acc_s[i] * s_mul
            kb = j * BN
            if tile_needs_mask(kb, BN, lo_max, hi_min):
                for nt in cutlass.range_constexpr(NS):
                    for e in cutlass.range_constexpr(4):
                        r = e // 2
                        key = kb + nt * 8 + 2 * t + e % 2
                        visible = key_visible(key, qlo[r], qpos[r])
                        acc_s[nt * 4 + e] = cutlass.select_(visible, acc_s[nt * 4 + e], -Float32.inf)
            for r in cutlass.range_constexpr(2):
                mx = -Float32.inf
                for nt in cutlass.range_constexpr(NS):
                    mx = cute.arch.fmax(mx, cute.arch.fmax(acc_s[nt * 4 + 2 * r], acc_s[nt * 4 + 2 * r + 1]))
                mx = cute.arch.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=1))
                mx = cute.arch.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=2))
                m_new = cute.arch.fmax(rM[r], mx)
                # a row with no visible key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, never NaN)
                m_use = cutlass.select_(m_new == -Float32.inf, Float32(0.0), m_new)
                alpha = cute.math.exp2(rM[r] - m_use, fastmath=True)
                rM[r] = m_new
                row_sum = Float32(0.0)
                for nt in cutlass.range_constexpr(NS):
                    for e in cutlass.range_constexpr(2):
                        i = nt * 4 + 2 * r + e
                        p = cute.math.exp2(acc_s[i] - m_use, fastmath=True)
                        acc_s[i] = p
                        row_sum += p
                rL[r] = rL[r] * alpha + row_sum
                for nt in cutlass.range_constexpr(NO):
                    acc_o[nt * 4 + 2 * r] = acc_o[nt * 4 + 2 * r] * alpha
                    acc_o[nt * 4 + 2 * r + 1] = acc_o[nt * 4 + 2 * r + 1] * alpha

            # everyone is done with K(j) (and the exchange buffer): K(j+1) may overwrite it
            cute.arch.sync_threads()
            if j < j_hi:
                self.load_tile(pK, sK, j + 1, k_lo, k_hi, mPT, kvh, n_kv_head, page_shift,
                               tidx)
            cute.arch.cp_async_commit_group()  # (an empty group on the last tile keeps the count uniform)
            cute.arch.cp_async_wait_group(1)  # V(j) landed; K(j+1) may still be in flight
            cute.arch.sync_threads()

            # ---- O += P V(j): P from the S registers (two n8 tiles of C = one k16 A fragment) ----
            for kk in cutlass.range_constexpr(BN // 16):
                a0 = pack_f16x2(acc_s[(2 * kk) * 4], acc_s[(2 * kk) * 4 + 1])
                a1 = pack_f16x2(acc_s[(2 * kk) * 4 + 2], acc_s[(2 * kk) * 4 + 3])
                a2 = pack_f16x2(acc_s[(2 * kk + 1) * 4], acc_s[(2 * kk + 1) * 4 + 1])
                a3 = pack_f16x2(acc_s[(2 * kk + 1) * 4 + 2], acc_s[(2 * kk + 1) * 4 + 3])
                for dpair in cutlass.range_constexpr(NO // 2):
                    vrow, vch = v_fragment_row_chunk(lane, kk, dpair, d0)
                    b = ldmatrix_x4(sV.iterator + swizzled_offset(vrow, vch, D), transpose=True)
                    for sub in cutlass.range_constexpr(2):
                        nt = dpair * 2 + sub
                        c = mma_f16_m16n8k16(a0, a1, a2, a3, b[2 * sub], b[2 * sub + 1], acc_o[nt * 4],
                                             acc_o[nt * 4 + 1], acc_o[nt * 4 + 2], acc_o[nt * 4 + 3])
                        for e in cutlass.range_constexpr(4):
                            acc_o[nt * 4 + e] = c[e]

        # ---- normalize and store the valid rows ----
        cute.arch.cp_async_wait_group(0)
        for r in cutlass.range_constexpr(2):
            l_row = rL[r]
            l_row += cute.arch.shuffle_sync_bfly(l_row, offset=1)
            l_row += cute.arch.shuffle_sync_bfly(l_row, offset=2)
            inv = cutlass.select_(l_row > Float32(0.0), Float32(1.0) / l_row, Float32(0.0))
            m = m0 + rg * 16 + g + 8 * r
            tok = m // group
            head = kvh * group + m % group
            if tok < n_tokens:
                for nt in cutlass.range_constexpr(NO):
                    d = d0 + nt * 8 + 2 * t
                    mOut[tok, head, d] = acc_o[nt * 4 + 2 * r] * inv
                    mOut[tok, head, d + 1] = acc_o[nt * 4 + 2 * r + 1] * inv

    @cute.jit
    def load_tile(self, pSrc: cute.Pointer, sDst: cute.Tensor, j: Int32, k_lo: Int32, k_hi: Int32, mPT: cute.Tensor,
                  kvh: Int32, n_kv_head: Int32, page_shift: Int32, tidx: Int32):
        """Issue the cp.async copies of key tile ``j`` (keys ``j*BN ..``) of kv head ``kvh`` into ``sDst``: 16-byte
        chunks, the page looked up per key row (a tile may span pages), chunk ``c`` of row ``r`` stored at chunk
        ``c ^ (r % 8)``; keys outside ``[k_lo, k_hi]`` are zero-filled from an in-range address (nothing is read)."""
        D, BN = self.head_dim, self.block_n
        NT, CPR = self.num_threads, self.chunks_per_row
        kb = j * BN
        for it in cutlass.range_constexpr(BN * CPR // NT):
            row, ch = loader_chunk(tidx, it, NT, CPR)
            key = kb + row
            valid = (key >= k_lo) & (key <= k_hi)
            key_c = cutlass.select_(valid, key, k_lo)
            src = pool_offset(mPT[key_c >> page_shift], key_c, ch, kvh, n_kv_head, D, page_shift)
            nbytes = cutlass.select_(valid, Int32(16), Int32(0))
            cp_async(sDst.iterator + swizzled_offset(row, ch, D), pSrc + src, 16, nbytes)

    @cute.jit
    def exchange_partials(self, sX: cute.Tensor, acc_s: cute.Tensor, warp: Int32, rg: Int32, g: Int32, t: Int32):
        """Replace this warp's partial S (its head-dim slice) by the sum over the DC slices of its row group.

        Layout: warp w's 16 x BN f32 block at ``w * 16 * BN``, pairs XOR-swizzled (:func:`exchange_offset`). Barriers: the partials are complete before anyone
        reads, and (the caller's next barrier) read before the next tile overwrites them."""
        DC, BN, NS = self.d_split, self.block_n, self.block_n // 8
        for nt in cutlass.range_constexpr(NS):
            for r in cutlass.range_constexpr(2):
                base = exchange_offset(warp, g + 8 * r, nt, t, BN)
                sX[base] = acc_s[nt * 4 + 2 * r]
                sX[base + 1] = acc_s[nt * 4 + 2 * r + 1]
        cute.arch.sync_threads()
        for i in cutlass.range_constexpr(NS * 4):
            acc_s[i] = Float32(0.0)
        for c in cutlass.range_constexpr(DC):
            w = rg * DC + c
            for nt in cutlass.range_constexpr(NS):
                for r in cutlass.range_constexpr(2):
                    base = exchange_offset(w, g + 8 * r, nt, t, BN)
                    acc_s[nt * 4 + 2 * r] = acc_s[nt * 4 + 2 * r] + sX[base]
                    acc_s[nt * 4 + 2 * r + 1] = acc_s[nt * 4 + 2 * r + 1] + sX[base + 1]


def _ex2_approx(x):
    return cute.math.exp2(x, fastmath=True)


# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////
# Compile + launch
# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////


@kernel_cache
def compile_attention_prefill(head_dim: int, softcap: bool = False):
    """Compile the prefill kernel of one head size (the only static geometry: heads, GQA group, page size, chunk
    length, window and scale are runtime arguments). Runtime args: (q f32, k_pool f16, v_pool f16, page_table row
    (int32, align 4), pos (int32, align 4), out f32 pointers, n_tokens, n_head, n_kv_head, log2(page_size),
    pages_per_seq, scale, window, softcap, stream)."""
    k = AttentionPrefill(head_dim, softcap)
    f32, f16, i32 = gptr(Float32, 0), gptr(Float16, 0), gptr(Int32, 0, align=4)
    return cute.compile(k, f32, f16, f16, i32, i32, f32, Int32(1), Int32(1), Int32(1), Int32(6), Int32(1),
                        Float32(1.0), Int32(0), Float32(1.0), cute.runtime.make_fake_stream(),
                        options=compile_options())


def attention_prefill(q, k_pool, v_pool, page_table, pos, *, scale: float, window: int = 0, softcap: float = 0.0,
                      out=None, stream=None):
    """Causal attention of a chunk of T consecutive queries (positions ``pos[0] .. pos[0]+T-1``) over a paged fp16
    KV cache that already holds their keys. ``q`` f32 [T, n_head, D]; ``k_pool``/``v_pool`` f16 [n_pages,
    page_size, n_kv_head, D]; ``page_table`` int32 [pages_per_seq] (or [B, pages_per_seq]: row 0 is used);
    ``pos`` int32 (device memory; element 0 is read). ``scale`` multiplies q.k; ``window`` 0 = full causal;
    ``softcap`` 0 = off. Accepts numpy arrays or DeviceArrays; numpy ``q`` in -> numpy out (unless ``out`` given).
    One launch; graph-capturable when every argument is a device buffer."""
    from sparkinfer_cute.runtime import DeviceArray, as_device, resolve_stream

    stream = resolve_stream(stream)
    T, H, D = tuple(q.shape)
    n_pages, P, KV, Dk = tuple(k_pool.shape)
    if Dk != D or tuple(v_pool.shape) != tuple(k_pool.shape):
        raise ValueError(f"k_pool {tuple(k_pool.shape)} / v_pool {tuple(v_pool.shape)} do not match q {(T, H, D)}")
    if n_pages * P * KV * D >= 2**31:
        raise ValueError("a KV pool of >= 2^31 elements per layer overflows the kernel's Int32 offsets")
    if T < 1:
        raise ValueError("attention_prefill needs at least one query")
    if H % KV:
        raise ValueError(f"n_head {H} must be a multiple of n_kv_head {KV}")
    if P <= 0 or P & (P - 1):
        raise ValueError(f"page_size must be a power of two, got {P}")
    pages_per_seq = tuple(page_table.shape)[-1]
    dq, q_was_np = as_device(q, stream, np.float32)
    dk, _ = as_device(k_pool, stream, np.float16)
    dv, _ = as_device(v_pool, stream, np.float16)
    dpt, _ = as_device(page_table, stream, np.int32)
    dpos, _ = as_device(pos, stream, np.int32)
    out_dev = out if out is not None else DeviceArray.empty((T, H, D), np.float32)
    has_softcap = softcap != 0.0
    fn = compile_attention_prefill(head_dim=D, softcap=has_softcap)
    fn(gptr(Float32, dq.ptr), gptr(Float16, dk.ptr), gptr(Float16, dv.ptr), gptr(Int32, dpt.ptr, align=4),
       gptr(Int32, dpos.ptr, align=4), gptr(Float32, out_dev.ptr), Int32(T), Int32(H), Int32(KV),
       Int32(P.bit_length() - 1), Int32(pages_per_seq), Float32(scale), Int32(window),
       Float32(softcap if has_softcap else 1.0), cu_stream(stream))
    if q_was_np and out is None:
        return out_dev.to_numpy(stream)
    return out_dev


# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////
# Compile-gate registry
# ////////////////////////////////////////////////////////////////////////////////////////////////////////////////

# The attention layer types the models prefill (page size 64, models/ops.py PAGE_SIZE). Only the head size and the
# softcap flag are static: one compiled kernel per head size serves every head count, GQA group, page size, chunk
# length and window, so the configs the GPU tests draw are exactly these (precompiled by tools/precompile.py).
MODEL_CONFIGS: dict[str, dict] = {
    "qwen3moe-30b-a3b": {"n_head": 32, "n_kv_head": 4, "head_dim": 128, "page_size": 64},
    "gemma3-270m": {"n_head": 4, "n_kv_head": 1, "head_dim": 256, "page_size": 64},
    "gemma4-26b-a4b-swa": {"n_head": 16, "n_kv_head": 8, "head_dim": 256, "page_size": 64},
    "gemma4-26b-a4b-full": {"n_head": 16, "n_kv_head": 2, "head_dim": 512, "page_size": 64},
    "qwen35moe-full": {"n_head": 16, "n_kv_head": 2, "head_dim": 256, "page_size": 64},
    "tiny": {"n_head": 8, "n_kv_head": 2, "head_dim": 64, "page_size": 64},
}
_CONFIGS = [{"head_dim": d, "softcap": cap} for d in SUPPORTED_HEAD_DIMS for cap in (False, True)]


def _launch_example(head_dim: int, softcap: bool = False):
    """One launch on small zeroed buffers (16 queries, 8 heads / 2 kv heads, keys 0..15 in pool page 0),
    marshalled like :func:`attention_prefill` (host-overhead probe)."""
    from sparkinfer_cute.runtime import DeviceArray, default_stream

    T, H, KV, P = 16, 8, 2, 64
    q = DeviceArray.zeros((T, H, head_dim), np.float32)
    kv = DeviceArray.zeros((2, P, KV, head_dim), np.float16)
    table = DeviceArray.zeros((2,), np.int32)
    pos = DeviceArray.zeros((1,), np.int32)
    out = DeviceArray.empty((T, H, head_dim), np.float32)
    fn = compile_attention_prefill(head_dim=head_dim, softcap=softcap)
    s = default_stream()

    def launch():
        fn(gptr(Float32, q.ptr), gptr(Float16, kv.ptr), gptr(Float16, kv.ptr), gptr(Int32, table.ptr, align=4),
           gptr(Int32, pos.ptr, align=4), gptr(Float32, out.ptr), Int32(T), Int32(H), Int32(KV),
           Int32(P.bit_length() - 1), Int32(2), Float32(0.1), Int32(0), Float32(1.0), cu_stream(s))

    return launch


register("attention_prefill", compile_attention_prefill, _CONFIGS, launch_example=_launch_example)
