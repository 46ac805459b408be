"""Decode GEMV, chunk mapping (Q4_K / Q6_K / Q6_K_P, n_in % 1024 == 0, one activation row): the default where it
applies (kernels/gemv.py ``mapping="auto"``).

A lane owns 32 weights of a block per step (a 16-byte Q4_K qs vector; 8+8+8 bytes of Q6_K; quant_dot.py "Chunks"),
the steps are unrolled at trace time and every weight load of the lane is issued before any math: one DRAM round
trip per warp instead of one per step (RESULTS.md, "Chunk GEMV (kernels/gemv_chunk.py) vs the slice GEMV"). ``rows_per_warp`` output rows per warp share the
activation loads; float (prmt byte->f32, factored scales) or dp4a (``q8=True``) in the same kernel.

:class:`GemvChunk` is one GEMV (dense, or expert-indexed over grid.y); :class:`GemvMulti` runs up to 3 chunk GEMVs
on the same activation row in one launch (the q/k/v projections).
"""

from __future__ import annotations

import os

import cuda.bindings.driver as cuda
import cutlass
from cutlass import Float32, Int8, Int32, Uint8, cute

from .common import WarpRowKernel, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .norm_chain import AttnTail, FfnTail, tail_fake_args
from .quant_dot import (
    CHUNKS_PER_BLOCK,
    chunk_dot_f32,
    chunk_dot_q8,
    chunk_load,
    chunk_supported,
    chunk_x_f32,
    chunk_x_q8,
    x_sums_f32,
)
from .registry import register

WARPS = WarpRowKernel.WARPS
# Chunk GEMVs without expert ids issue their weight loads before griddepcontrol.wait (PDL only): the weights are
# constant during decode, so the loads overlap the previous kernel's tail. SPARKINFER_EARLY_WEIGHTS=0 (read once at
# import) turns it off for A/B runs.
EARLY_WEIGHTS = os.environ.get("SPARKINFER_EARLY_WEIGHTS", "1") not in ("0", "false", "no")


def chunk_ok(qtype: str, n_in: int) -> bool:
    """The chunk mapping needs a supported type and whole warps of chunks per row (n_in % 1024 == 0)."""
    return chunk_supported(qtype) and n_in % 256 == 0 and (n_in // 256 * CHUNKS_PER_BLOCK) % 32 == 0


def choose_rows_per_warp(n_out_total: int, sm_count: int = 132) -> int:
    """Rows per warp of the chunk GEMV: 2 (halves the activation traffic) while >= 8 warps per SM remain."""
    return 2 if n_out_total % 2 == 0 and n_out_total // 2 >= 8 * sm_count else 1


def chunk_rows_partial(qtype: str, q8: bool, rows, xargs, xrow_base, lane, chunks_per_lane: int,
                       x_loads_first: bool = False, pdl_after_weights: bool = False):
    """Per-lane partial dots of ``len(rows)`` weight rows with one activation row.

    ``rows``: list of (Uint8 weight pointer, global block index of the row's first block); ``xargs``: (pX,) f32 or
    (pXq, pXd) q8_1; ``xrow_base``: element index of the activation row. Lane L takes chunks C = L + 32 t,
    t < ``chunks_per_lane`` (block C // 8, chunk s = L % 8). Every weight load of the lane is issued before any math
    (``x_loads_first``, dp4a only: the activation loads, cache hits, go before them)."""
    s = lane & (CHUNKS_PER_BLOCK - 1)
    kb0 = lane >> 3
    xqs = []
    if q8 and x_loads_first:
        xqs = [chunk_x_q8(qtype, xargs[0], xargs[1], xrow_base + (kb0 + 4 * t) * 256, s)
               for t in range(chunks_per_lane)]
    raws = [[chunk_load(qtype, pW, blk0 + kb0 + 4 * t, s) for pW, blk0 in rows] for t in range(chunks_per_lane)]
    if pdl_after_weights:
        # PDL with early weights: the weights are constant during decode, so their loads are issued before waiting
        # for the previous kernel (they overlap its tail); everything it writes (x, y) is read after the wait.
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()
    acc = [None] * len(rows)
    for t in range(chunks_per_lane):
        xbase = xrow_base + (kb0 + 4 * t) * 256
        if q8:
            xq = xqs[t] if xqs else chunk_x_q8(qtype, xargs[0], xargs[1], xbase, s)
            vals = [chunk_dot_q8(qtype, raw, s, xq) for raw in raws[t]]
        else:
            xv = chunk_x_f32(qtype, xargs[0], xbase, s)
            xs = x_sums_f32(qtype, xv)
            vals = [chunk_dot_f32(qtype, raw, s, xv, xs) for raw in raws[t]]
        acc = [v if a is None else a + v for a, v in zip(acc, vals)]
    return acc


class GemvChunk(WarpRowKernel):
    """``y[slot, o] (+)= W[e(slot), o] . x[xrow(slot)]``; dense: n_slots = 1, e = 0, xrow = 0; expert-indexed
    (``experts``): e = ids[slot], xrow = slot if ``x_per_slot`` else 0. A warp owns ``rows_per_warp`` consecutive
    output rows (n_out % rows_per_warp == 0). ``q8``: int8 activations (q8_1.py) and dp4a, else f32.
    ``tail`` (norm_chain.py :class:`AttnTail` or :class:`FfnTail`, dense only): the last CTA to finish then runs the
    norm chain after the projection on ``y`` (a row of ``tail.row_len`` = n_out)."""

    def __init__(self, qtype: str, n_in: int, rows_per_warp: int = 1, experts: bool = False,
                 x_per_slot: bool = False, accumulate: bool = False, q8: bool = False,
                 tail: AttnTail | FfnTail | None = None):
        super().__init__()
        assert chunk_ok(qtype, n_in), (qtype, n_in)
        assert tail is None or not experts, "a tail follows a dense GEMV"
        self.tail = tail.chain(WARPS * 32) if tail is not None else None
        self.qtype, self.n_in, self.rows_per_warp = qtype, n_in, rows_per_warp
        self.experts, self.x_per_slot, self.accumulate, self.q8 = experts, x_per_slot, accumulate, q8
        self.chunks_per_lane = n_in // 256 * CHUNKS_PER_BLOCK // 32
        # dense: weight loads before griddepcontrol.wait (chunk_rows_partial); experts need the ids first
        self.early = self.pdl and not experts and EARLY_WEIGHTS

    @cute.jit
    def __call__(self, pW: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pY: cute.Pointer,
                 pIds: cute.Pointer, n_out: Int32, n_slots: Int32, tCnt: cute.Pointer, t0: cute.Pointer,
                 t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer,
                 t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer,
                 t11: cute.Pointer, eps: Float32, stream: cuda.CUstream):
        self.launch_rows(self.kernel(pW, pX, pXq, pXd, pY, pIds, n_out, tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9,
                                     t10, t11, eps),
                         n_out, WARPS * self.rows_per_warp, n_slots, stream)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pY: cute.Pointer,
               pIds: cute.Pointer, n_out: Int32, tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer,
               t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer,
               t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer,
               eps: Float32):
        if cutlass.const_expr(not self.early):
            pdl_prologue(self.pdl)
        _, bx, slot, warp, lane = self.thread_coords()
        o0 = (bx * WARPS + warp) * self.rows_per_warp
        nbpr = self.n_in // 256
        if o0 < n_out:
            row0, xrow = self.slot_row(pIds, slot, n_out, o0)
            rows = [(pW, (row0 + r) * nbpr) for r in range(self.rows_per_warp)]
            xargs = (pXq, pXd) if self.q8 else (pX,)
            acc = chunk_rows_partial(self.qtype, self.q8, rows, xargs, xrow * self.n_in, lane, self.chunks_per_lane,
                                     pdl_after_weights=self.early)
            mY = cute.make_tensor(pY, cute.make_layout(n_out * (slot + 1)))
            for r in cutlass.range_constexpr(self.rows_per_warp):
                t = warp_reduce_sum(acc[r])
                if lane == r:
                    yi = slot * n_out + o0 + r
                    if cutlass.const_expr(self.accumulate):
                        t = t + mY[yi]
                    mY[yi] = t
        if cutlass.const_expr(self.tail is not None):
            if cutlass.const_expr(self.early):
                # warps without a row never waited (chunk_rows_partial waits after the weight loads): the tail reads
                # what the previous kernel wrote (x, the norm's inputs), so every thread waits here (a no-op twice)
                cute.arch.griddepcontrol_wait()
            self.tail.tail(tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, eps)


@kernel_cache
def compile_gemv_chunk(qtype: str, n_in: int, rows_per_warp: int = 1, experts: bool = False,
                       x_per_slot: bool = False, accumulate: bool = False, q8: bool = False,
                       tail: AttnTail | FfnTail | None = None):
    """Runtime args: (W u8, x f32, xq i8, xd f32, y f32, ids i32 (align 4) pointers, n_out, n_slots, the tail's
    arguments (norm_chain.py ``AttnTailArgs`` / ``FfnTailArgs.launch_args``, or ``no_tail_args``), stream)."""
    return cute.compile(GemvChunk(qtype, n_in, rows_per_warp, experts, x_per_slot, accumulate, q8, tail),
                        gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0),
                        gptr(Int32, 0, 4), Int32(1), Int32(1), *tail_fake_args(), cute.runtime.make_fake_stream(),
                        options=compile_options())


class GemvMulti(WarpRowKernel):
    """Up to 3 chunk-mapping GEMVs on the same activation row in ONE launch (e.g. the q, k and v projections):
    ``mats`` = ((qtype, n_out), ...) static; matrix m owns a contiguous range of CTAs (blockIdx.x), each with its
    own rows per warp. Float (``q8=False``) or dp4a on a q8_1 activation (``q8=True``).

    ``rows_per_warp``: one per matrix (a tuned config), or None: :func:`choose_rows_per_warp` for each."""

    def __init__(self, mats: tuple, n_in: int, q8: bool = False, sm_count: int = 132,
                 rows_per_warp: tuple | None = None):
        super().__init__()
        assert 1 <= len(mats) <= 3
        self.mats, self.n_in, self.q8 = tuple(mats), n_in, q8
        for q, _ in mats:
            assert chunk_ok(q, n_in), (q, n_in)
        self.chunks_per_lane = n_in // 256 * CHUNKS_PER_BLOCK // 32
        if rows_per_warp is None:
            rows_per_warp = tuple(choose_rows_per_warp(n, sm_count) for _, n in mats)
        assert len(rows_per_warp) == len(mats) and all(r in (1, 2, 4) and n % r == 0
                                                       for r, (_, n) in zip(rows_per_warp, mats)), rows_per_warp
        self.rows_per_warp = tuple(rows_per_warp)
        self.ctas = tuple(-(-n // (WARPS * r)) for (_, n), r in zip(mats, self.rows_per_warp))
        self.starts = tuple(sum(self.ctas[:m]) for m in range(len(mats)))
        self.early = self.pdl and EARLY_WEIGHTS

    @cute.jit
    def __call__(self, pW0: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pX: cute.Pointer,
                 pXq: cute.Pointer, pXd: cute.Pointer, pY0: cute.Pointer, pY1: cute.Pointer, pY2: cute.Pointer,
                 stream: cuda.CUstream):
        self.launch_rows(self.kernel(pW0, pW1, pW2, pX, pXq, pXd, pY0, pY1, pY2), sum(self.ctas), 1, 1, stream)

    @cute.kernel
    def kernel(self, pW0: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer,
               pXd: cute.Pointer, pY0: cute.Pointer, pY1: cute.Pointer, pY2: cute.Pointer):
        if cutlass.const_expr(not self.early):
            pdl_prologue(self.pdl)
        _, bx, _, warp, lane = self.thread_coords()
        nbpr = self.n_in // 256
        pWs = (pW0, pW1, pW2)
        pYs = (pY0, pY1, pY2)
        xargs = (pXq, pXd) if self.q8 else (pX,)
        for m in cutlass.range_constexpr(len(self.mats)):
            if bx >= self.starts[m]:
                if bx < self.starts[m] + self.ctas[m]:
                    rows_per_warp = self.rows_per_warp[m]
                    n_out = self.mats[m][1]
                    o0 = ((bx - self.starts[m]) * WARPS + warp) * rows_per_warp
                    if o0 < n_out:
                        rows = [(pWs[m], (o0 + r) * nbpr) for r in range(rows_per_warp)]
                        acc = chunk_rows_partial(self.mats[m][0], self.q8, rows, xargs, 0, lane,
                                                 self.chunks_per_lane, pdl_after_weights=self.early)
                        mY = cute.make_tensor(pYs[m], cute.make_layout(n_out))
                        for r in cutlass.range_constexpr(rows_per_warp):
                            t = warp_reduce_sum(acc[r])
                            if lane == r:
                                mY[o0 + r] = t


@kernel_cache
def compile_gemv_multi(mats: tuple, n_in: int, q8: bool = False, sm_count: int = 132,
                       rows_per_warp: tuple | None = None):
    """Runtime args: (W0, W1, W2 u8, x f32, xq i8, xd f32, y0, y1, y2 f32 pointers, stream)."""
    p8, pf = gptr(Uint8, 0), gptr(Float32, 0)
    return cute.compile(GemvMulti(mats, n_in, q8, sm_count, rows_per_warp), p8, p8, p8, pf, gptr(Int8, 0), pf, pf,
                        pf, pf, cute.runtime.make_fake_stream(), options=compile_options())


# ---------------------------------------------------------------------------------------------------------------
# Registered configurations (compile gate)


def chunk_configs():
    """The chunk GEMV at the model shapes (both paths): Qwen3-30B-A3B q/k/v/router (2048 ->), o-proj (4096 ->, also
    fused with the residual add), LM head (Q6_K / Q6_K_P 2048 -> 151936), experts gate/up (2048 -> 768, x shared);
    Gemma 3 270M o-proj (1024 -> 640) and down (2048 -> 640)."""
    shapes = [("Q4_K", 2048, 4096), ("Q4_K", 2048, 512), ("Q6_K", 2048, 512), ("Q6_K_P", 2048, 512),
              ("Q4_K", 2048, 128), ("Q4_K", 4096, 2048), ("Q6_K", 2048, 151936), ("Q6_K_P", 2048, 151936),
              ("Q4_K", 1024, 640), ("Q4_K", 2048, 640), ("Q6_K", 2048, 640)]
    cfgs = []
    for q8 in (False, True):
        cfgs += [dict(qtype=q, n_in=n, rows_per_warp=choose_rows_per_warp(o), q8=q8) for q, n, o in shapes]
        cfgs += [dict(qtype="Q4_K", n_in=n, rows_per_warp=choose_rows_per_warp(o), accumulate=True, q8=q8)
                 for n, o in ((4096, 2048), (1024, 640))]
        cfgs += [dict(qtype="Q4_K", n_in=2048, rows_per_warp=choose_rows_per_warp(8 * 768), experts=True, q8=q8)]
    return cfgs


# Qwen3-30B-A3B q/k/v (attn_v is Q4_K or Q6_K per layer in Q4_K_M; Q6_K_P after the upload repack)
MULTI_CONFIGS = [dict(mats=(("Q4_K", 4096), ("Q4_K", 512), (v, 512)), n_in=2048, q8=q8)
                 for v in ("Q4_K", "Q6_K", "Q6_K_P") for q8 in (False, True)]

# the O projection with the post-attention norm chain as its tail (models/ops.py AfterAttention): Gemma 4 26B-A4B
# (4096 / 8192 -> 2816, dp4a, three outputs and the experts' q8_1 copy), Gemma 3 270M (1024 -> 640, f32, one output)
TAIL_CONFIGS = [dict(qtype="Q4_K", n_in=n, rows_per_warp=choose_rows_per_warp(2816), q8=True,
                     tail=AttnTail(2816, 3, True)) for n in (4096, 8192)]
TAIL_CONFIGS += [dict(qtype="Q4_K", n_in=1024, rows_per_warp=choose_rows_per_warp(640), tail=AttnTail(640, 1, False))]
# Gemma 3 270M's dense down projection (2048 -> 640, f32) with the post-FFN chain and the next attn_norm as its tail
TAIL_CONFIGS += [dict(qtype=q, n_in=2048, rows_per_warp=choose_rows_per_warp(640), tail=FfnTail(640))
                 for q in ("Q4_K", "Q6_K_P")]
register("gemv_chunk", compile_gemv_chunk, chunk_configs() + TAIL_CONFIGS)
register("gemv_multi", compile_gemv_multi, MULTI_CONFIGS)
