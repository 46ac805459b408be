"""Decode GEMV over raw GGUF-quantized weights, f32 activations: ``y[r, o] = sum_i W[o, i] * x[r, i]``.

Design (memory-bound, batch 1-8):
- one warp per output row (or ``wpr`` = 2/4 warps per row when n_out is small, partial sums combined in a fixed
  order through shared memory); grid.x over rows, grid.y = selected-expert slot for the expert-indexed variant (W
  is [n_expert, n_out, n_in], expert ids read from a device int32 array: no host sync, CUDA-graph safe, all slots
  in one launch).
- lanes stride over the row's *slices* (quant_decode.py: 4 consecutive quant bytes -> 4-16 weights per lane):
  neighbouring lanes read neighbouring weight bytes (Q4_K: one coalesced 128-byte request per warp for the quants
  plus a broadcast 16-byte header) and neighbouring 16-byte groups of x, so every load of a warp is coalesced.
  The first version gave each lane a 32-64-element *unit* (lane addresses 128-256 B apart: ~8x the L1 wavefronts
  for the x loads); it is kept as ``mapping="unit"`` for comparison/fallback.
- x is read straight from global memory with 128-bit loads (a few KB, L1/L2 resident; the ``rows`` activation rows
  reuse the decoded weights). Decoded weights are f32 in registers (contraction allowed: <= 1 ulp per weight).
- f32 accumulation, 2-way unrolled loop, butterfly shuffle reduction (fixed order: deterministic), lane 0 stores.

``mapping="chunk"`` (:class:`GemvChunk`, the default where it applies: Q4_K / Q6_K / Q6_K_P, n_in % 1024 == 0, one
activation row): a lane owns 32 weights of a block per step (a 16-byte Q4_K qs vector; 8+8+8 bytes of Q6_K), the
steps are unrolled at trace time and every weight load of the lane is issued before any math; ``rpw`` output rows per
warp share the activation loads; float (prmt byte->f32, factored scales) or dp4a (``q8=True``) in the same kernel.
H100 microbench (2026-11-25, median of graph replays; RESULTS.md): Q4_K 2048->4096 dp4a 7.41 -> 3.37 µs, float
7.83 -> 4.89 µs; 4096->2048 dp4a 9.72 -> 4.25; LM head Q6_K_P 2048->151936 dp4a 88 µs (99% of copy BW).
:class:`GemvMulti` runs up to 3 chunk GEMVs on the same x in one launch (q/k/v: dp4a 5.05 µs vs 7.73 for three).

Error bound used by the tests (``gemv_error_bound``), u = 2^-24: ``d*sc`` and ``dmin*m`` are rounded exactly as
gguf-py rounds them; the remaining decode step (``*q``, ``- dmin*m``, possibly fused) differs from gguf-py's by at
most 2u A_i, where A_i = |d*sc*q_i| + |dmin*m| (K-quants; = |W_i| otherwise: the subtraction may cancel); an f32
sum of n products adds at most ~n u sum |w x| (Higham's gamma_n). So |y - y_ref| <= (n_in + 8) u sum_i A_oi |x_i|.
"""

from __future__ import annotations

import os

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, Uint8, cute

from .arch import pdl_enabled
from .common import aligned, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .quant_decode import (
    CHUNKS_PER_BLOCK,
    Tiling,
    chunk_dot_f32,
    chunk_dot_q8,
    chunk_load,
    chunk_supported,
    chunk_x_f32,
    chunk_x_q8,
    dot_values,
    load_x_runs,
    qtype_name,
    spec,
    x_sums_f32,
)

WARPS = 4
MAX_ROWS = 8
# chunk GEMVs without expert ids issue their weight loads before griddepcontrol.wait (PDL only).
# SPARKINFER_EARLY_WEIGHTS=0 (read once at import) turns it off for A/B runs.
EARLY_WEIGHTS = os.environ.get("SPARKINFER_EARLY_WEIGHTS", "1") not in ("0", "false", "no")


def step_dot(t: Tiling, w, pX, xoff):
    """sum over one decoded step: w[i] * x[xoff + step positions]."""
    return dot_values(w, load_x_runs(t, pX, xoff), t.elems)


class Gemv:
    """``y[slot, r, o] = sum_i W[e(slot), o, i] * x[xrow(slot, r), i]``.

    Dense: n_slots = 1, e = 0, xrow = r (``rows`` activation rows). Expert-indexed (``experts=True``): e = ids[slot];
    xrow = slot if ``x_per_slot`` else 0, rows must be 1.

    ``wpr`` (warps per row, 1/2/4): a row's steps are split over ``wpr`` warps of the CTA (warp w takes steps
    lane + 32*(w % wpr) + 32*wpr*t) and the partial sums are added in a fixed order through shared memory. Used
    when n_out is small (2048 -> 512: 512 rows would be 512 warps, ~4 per SM, too few loads in flight)."""

    def __init__(self, qtype: str, n_in: int, rows: int = 1, experts: bool = False, x_per_slot: bool = False,
                 mapping: str = "slice", wpr: int = 1, accumulate: bool = False):
        self.pdl = pdl_enabled()
        self.qtype = qtype
        self.accumulate = accumulate  # y += W x (in-place residual add, e.g. x = x + Wo o)
        self.sp = spec(qtype)
        self.tiling = Tiling(qtype, mapping)
        assert n_in % self.sp.block_elems == 0, f"{qtype}: n_in {n_in} % {self.sp.block_elems}"
        assert 1 <= rows <= MAX_ROWS
        assert not (experts and rows != 1), "the expert-indexed GEMV takes one activation row per slot"
        assert wpr in (1, 2, 4)
        self.n_in, self.rows, self.experts, self.x_per_slot, self.wpr = n_in, rows, experts, x_per_slot, wpr
        self.rows_per_cta = WARPS // wpr

    @cute.jit
    def __call__(self, pW: cute.Pointer, pX: cute.Pointer, pY: cute.Pointer, pIds: cute.Pointer, n_out: Int32,
                 n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pW, pX, pY, pIds, n_out).launch(
            grid=[cute.ceil_div(n_out, self.rows_per_cta), n_slots, 1], block=[WARPS * 32, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pX: cute.Pointer, pY: cute.Pointer, pIds: cute.Pointer, n_out: Int32):
        pdl_prologue(self.pdl)
        sp = self.sp
        wpr = self.wpr
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        warp = tid // 32
        lane = tid % 32
        kpart = warp % wpr
        o = bx * self.rows_per_cta + warp // wpr
        nbpr = self.n_in // sp.block_elems
        upb = self.tiling.per_block
        acc = cute.make_rmem_tensor((self.rows,), Float32)
        acc.fill(0.0)
        if o < n_out:
            row = o
            xrow0 = 0
            if cutlass.const_expr(self.experts):
                ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
                row = ids[slot] * n_out + o
                if cutlass.const_expr(self.x_per_slot):
                    xrow0 = slot
            blk0 = row * nbpr
            w = self.tiling.buffer()
            for U in cutlass.range(lane + 32 * kpart, nbpr * upb, 32 * wpr, unroll=2):
                kb = U // upb
                u = U - kb * upb
                self.tiling.decode(pW, blk0 + kb, u, w, exact=False)
                xb = kb * sp.block_elems + self.tiling.base(u)
                for r in cutlass.range_constexpr(self.rows):
                    acc[r] = acc[r] + step_dot(self.tiling, w, pX, (xrow0 + r) * self.n_in + xb)
        for r in cutlass.range_constexpr(self.rows):
            acc[r] = warp_reduce_sum(acc[r])
        # y is [n_slots * rows, n_out] row-major: y[slot*rows + r, o]
        mY = cute.make_tensor(pY, cute.make_layout((n_out * self.rows) * (slot + 1)))
        if cutlass.const_expr(wpr == 1):
            if o < n_out:  # noqa: SIM102 (runtime conditions, kept as nested DSL ifs)
                if lane == 0:
                    for r in cutlass.range_constexpr(self.rows):
                        yi = (slot * self.rows + r) * n_out + o
                        if cutlass.const_expr(self.accumulate):
                            mY[yi] = mY[yi] + acc[r]
                        else:
                            mY[yi] = acc[r]
        else:
            smem = cutlass.memory.SmemAllocator()
            part = smem.allocate_tensor(Float32, cute.make_layout(WARPS * self.rows), byte_alignment=16)
            if lane == 0:
                for r in cutlass.range_constexpr(self.rows):
                    part[warp * self.rows + r] = acc[r]
            cute.arch.barrier()
            if o < n_out:  # noqa: SIM102 (runtime conditions, kept as nested DSL ifs)
                if tid % (32 * wpr) == 0:  # lane 0 of the row's first warp
                    for r in cutlass.range_constexpr(self.rows):
                        t = part[warp * self.rows + r]
                        for k in cutlass.range_constexpr(1, wpr):
                            t = t + part[(warp + k) * self.rows + r]
                        yi = (slot * self.rows + r) * n_out + o
                        if cutlass.const_expr(self.accumulate):
                            t = t + mY[yi]
                        mY[yi] = t


def chunk_rows_partial(qtype: str, q8: bool, rows, xargs, xrow_base, lane, cpl: int, xfirst: bool = False,
                       pdl_after_weights: bool = False):
    """Per-lane partial dots of ``len(rows)`` weight rows with one activation row (``mapping="chunk"``).

    ``rows``: list of (Uint8 weight pointer, global block index of the row's first block); ``xargs``: (pX,) f32 or
    (pXq, pXd) q8_1; ``xrow_base``: element index of the activation row. Lane L takes chunks C = L + 32 t,
    t < ``cpl`` (block C // 8, chunk s = L % 8). Every weight load of the lane is issued before any math."""
    s = lane & (CHUNKS_PER_BLOCK - 1)
    kb0 = lane >> 3
    xqs = []
    if q8 and xfirst:  # activation loads (cache hits) issued before the weights
        xqs = [chunk_x_q8(qtype, xargs[0], xargs[1], xrow_base + (kb0 + 4 * t) * 256, s) for t in range(cpl)]
    raws = [[chunk_load(qtype, pW, blk0 + kb0 + 4 * t, s) for pW, blk0 in rows] for t in range(cpl)]
    if pdl_after_weights:
        # PDL with early weights: the weights are constant during decode, so their loads are issued before waiting
        # for the previous kernel (they overlap its tail); everything it writes (x, y) is read after the wait.
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()
    acc = [None] * len(rows)
    for t in range(cpl):
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


def chunk_ok(qtype: str, n_in: int) -> bool:
    """The chunk mapping needs a supported type and whole warps of chunks per row (n_in % 1024 == 0)."""
    return chunk_supported(qtype) and n_in % 256 == 0 and (n_in // 256 * CHUNKS_PER_BLOCK) % 32 == 0


class GemvChunk:
    """``mapping="chunk"`` GEMV (float or dp4a with ``q8``): ``rpw`` output rows per warp share the activation
    loads; all weight loads of a lane are in flight before the math (quant_decode.py "Chunks").
    ``y[slot, o] (+)= W[e(slot), o] . x[xrow(slot)]``; dense: n_slots = 1. Needs n_out % rpw == 0."""

    def __init__(self, qtype: str, n_in: int, rpw: int = 1, experts: bool = False, x_per_slot: bool = False,
                 accumulate: bool = False, q8: bool = False):
        self.pdl = pdl_enabled()
        assert chunk_ok(qtype, n_in), (qtype, n_in)
        self.qtype, self.n_in, self.rpw, self.experts, self.x_per_slot = qtype, n_in, rpw, experts, x_per_slot
        self.accumulate, self.q8 = accumulate, q8
        self.cpl = n_in // 256 * CHUNKS_PER_BLOCK // 32
        # dense: weight loads before griddepcontrol.wait (chunk_rows_partial); experts need the ids first
        self.early = self.pdl and not experts and EARLY_WEIGHTS

    @cute.jit
    def __call__(self, pW: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pY: cute.Pointer,
                 pIds: cute.Pointer, n_out: Int32, n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pW, pX, pXq, pXd, pY, pIds, n_out).launch(
            grid=[cute.ceil_div(n_out, WARPS * self.rpw), n_slots, 1], block=[WARPS * 32, 1, 1], stream=stream,
            use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pY: cute.Pointer,
               pIds: cute.Pointer, n_out: Int32):
        if cutlass.const_expr(not self.early):
            pdl_prologue(self.pdl)
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        warp, lane = tid // 32, tid % 32
        o0 = (bx * WARPS + warp) * self.rpw
        nbpr = self.n_in // 256
        if o0 < n_out:
            row0 = o0
            xrow = 0
            if cutlass.const_expr(self.experts):
                ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
                row0 = ids[slot] * n_out + o0
                if cutlass.const_expr(self.x_per_slot):
                    xrow = slot
            rows = [(pW, (row0 + r) * nbpr) for r in range(self.rpw)]
            xargs = (pXq, pXd) if self.q8 else (pX,)
            acc = chunk_rows_partial(self.qtype, self.q8, rows, xargs, xrow * self.n_in, lane, self.cpl,
                                     pdl_after_weights=self.early)
            mY = cute.make_tensor(pY, cute.make_layout(n_out * (slot + 1)))
            for r in cutlass.range_constexpr(self.rpw):
                t = warp_reduce_sum(acc[r])
                if lane == r:
                    yi = slot * n_out + o0 + r
                    if cutlass.const_expr(self.accumulate):
                        t = t + mY[yi]
                    mY[yi] = t


@kernel_cache
def compile_gemv_chunk(qtype: str, n_in: int, rpw: int = 1, experts: bool = False, x_per_slot: bool = False,
                       accumulate: bool = False, q8: bool = False):
    return cute.compile(GemvChunk(qtype, n_in, rpw, experts, x_per_slot, accumulate, q8),
                        gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0),
                        gptr(Int32, 0, 4), Int32(1), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


def choose_rpw(n_out_total: int, sm_count: int = 132) -> int:
    """Rows per warp of the chunk GEMV: 2 (halves the activation traffic) while >= 8 warps per SM remain."""
    return 2 if n_out_total % 2 == 0 and n_out_total // 2 >= 8 * sm_count else 1


class GemvMulti:
    """Up to 3 chunk-mapping GEMVs on the same activation row in ONE launch (e.g. the q, k and v projections):
    ``mats`` = ((qtype, n_out), ...) static; matrix m owns a contiguous range of CTAs (blockIdx.x), each with its
    own rows per warp. Float (``q8=False``) or dp4a on a q8_1 activation (``q8=True``)."""

    def __init__(self, mats: tuple, n_in: int, q8: bool = False, sm_count: int = 132):
        self.pdl = pdl_enabled()
        assert 1 <= len(mats) <= 3
        self.mats, self.n_in, self.q8 = tuple(mats), n_in, q8
        for q, _ in mats:
            assert chunk_ok(q, n_in), (q, n_in)
        self.cpl = n_in // 256 * CHUNKS_PER_BLOCK // 32
        self.rpws = tuple(choose_rpw(n, sm_count) for _, n in mats)
        self.ctas = tuple(-(-n // (WARPS * r)) for (_, n), r in zip(mats, self.rpws))
        self.starts = tuple(sum(self.ctas[:m]) for m in range(len(mats)))
        self.early = self.pdl and EARLY_WEIGHTS

    @cute.jit
    def __call__(self, pW0: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pX: cute.Pointer,
                 pXq: cute.Pointer, pXd: cute.Pointer, pY0: cute.Pointer, pY1: cute.Pointer, pY2: cute.Pointer,
                 stream: cuda.CUstream):
        self.kernel(pW0, pW1, pW2, pX, pXq, pXd, pY0, pY1, pY2).launch(
            grid=[sum(self.ctas), 1, 1], block=[WARPS * 32, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW0: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer,
               pXd: cute.Pointer, pY0: cute.Pointer, pY1: cute.Pointer, pY2: cute.Pointer):
        if cutlass.const_expr(not self.early):
            pdl_prologue(self.pdl)
        tid = cute.arch.thread_idx()[0]
        bx = cute.arch.block_idx()[0]
        warp, lane = tid // 32, tid % 32
        nbpr = self.n_in // 256
        pWs = (pW0, pW1, pW2)
        pYs = (pY0, pY1, pY2)
        xargs = (pXq, pXd) if self.q8 else (pX,)
        for m in cutlass.range_constexpr(len(self.mats)):
            if bx >= self.starts[m]:
                if bx < self.starts[m] + self.ctas[m]:
                    rpw = self.rpws[m]
                    n_out = self.mats[m][1]
                    o0 = ((bx - self.starts[m]) * WARPS + warp) * rpw
                    if o0 < n_out:
                        rows = [(pWs[m], (o0 + r) * nbpr) for r in range(rpw)]
                        acc = chunk_rows_partial(self.mats[m][0], self.q8, rows, xargs, 0, lane, self.cpl,
                                                 pdl_after_weights=self.early)
                        mY = cute.make_tensor(pYs[m], cute.make_layout(n_out))
                        for r in cutlass.range_constexpr(rpw):
                            t = warp_reduce_sum(acc[r])
                            if lane == r:
                                mY[o0 + r] = t


@kernel_cache
def compile_gemv_multi(mats: tuple, n_in: int, q8: bool = False, sm_count: int = 132):
    p8, pf = gptr(Uint8, 0), gptr(Float32, 0)
    return cute.compile(GemvMulti(mats, n_in, q8, sm_count), p8, p8, p8, pf, gptr(Int8, 0), pf, pf, pf, pf,
                        cute.runtime.make_fake_stream(), options=compile_options())


def gemv_multi(items, x, stream=None):
    """``y_m = W_m @ x`` for up to 3 (w, qtype, y) items sharing one activation row, in one launch.

    ``x``: f32 DeviceArray ([n_in] or [1, n_in]; float path) or a q8_1 ``Q8Act`` with one row (dp4a path).
    ``y``: f32 DeviceArrays of n_out elements (written). Every (qtype, n_in) must suit the chunk mapping
    (:func:`chunk_ok`); otherwise the items are launched one by one through :func:`gemv` / ``gemv_q8``."""
    from ..runtime import default_stream
    from .q8_1 import Q8Act

    st = stream if stream is not None else default_stream()
    q8 = isinstance(x, Q8Act)
    n_in = x.n if q8 else int(x.shape[-1])
    mats = tuple((qtype_name(q), int(np.prod(y.shape))) for _, q, y in items)
    if not (1 <= len(items) <= 3) or not all(chunk_ok(q, n_in) for q, _ in mats):
        for w, q, y in items:
            if q8:
                from .gemv_q8 import gemv_q8

                gemv_q8(w, q, x, n_out=int(np.prod(y.shape)), out=y, stream=st)
            else:
                gemv(w, q, x, n_out=int(np.prod(y.shape)), out=y, stream=st)
        return [y for _, _, y in items]
    dws = [as_device_bytes(w, st) for w, _, _ in items]
    for dw, (q, n) in zip(dws, mats):
        _check_w(dw, q, n, n_in)
        aligned(dw, "weights")
    pw = [dw.ptr for dw in dws] + [dws[0].ptr] * (3 - len(dws))
    py = [y.ptr for _, _, y in items] + [items[0][2].ptr] * (3 - len(items))
    fn = compile_gemv_multi(mats, n_in, q8, _sm_count())
    if q8:
        xp, xq, xd = x.d.ptr, x.qs.ptr, x.d.ptr
    else:
        xp = xq = xd = aligned(x, "x").ptr
    fn(gptr(Uint8, pw[0]), gptr(Uint8, pw[1]), gptr(Uint8, pw[2]), gptr(Float32, xp), gptr(Int8, xq),
       gptr(Float32, xd), gptr(Float32, py[0]), gptr(Float32, py[1]), gptr(Float32, py[2]), cuda.CUstream(st.handle))
    return [y for _, _, y in items]


def choose_wpr(n_out_total: int, steps_per_row: int, sm_count: int = 132) -> int:
    """Warps per row: enough warps for ~16 per SM (loads in flight), but >= 2 steps per lane per warp."""
    wpr = 1
    while wpr < 4 and n_out_total * wpr < 16 * sm_count and steps_per_row >= 32 * 2 * (wpr * 2):
        wpr *= 2
    return wpr


@kernel_cache
def compile_gemv(qtype: str, n_in: int, rows: int = 1, experts: bool = False, x_per_slot: bool = False,
                 mapping: str = "slice", wpr: int = 1, accumulate: bool = False):
    return cute.compile(Gemv(qtype, n_in, rows, experts, x_per_slot, mapping, wpr, accumulate),
                        gptr(Uint8, 0), gptr(Float32, 0),
                        gptr(Float32, 0), gptr(Int32, 0, 4), Int32(1), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


def _wpr(q, n_in, n_rows_total, mapping="slice"):
    from ..runtime import get_device

    steps = n_in // spec(q).block_elems * Tiling(q, mapping).per_block
    return choose_wpr(n_rows_total, steps, get_device().sm_count)


def as_device_bytes(w, stream):
    """Raw weight bytes on the device: a DeviceArray passes through (any dtype: only its bytes are read), anything
    else is uploaded as uint8."""
    from ..runtime import DeviceArray, as_device

    if isinstance(w, DeviceArray):
        return w
    return as_device(np.ascontiguousarray(w).view(np.uint8), stream)[0]


def _check_w(w, q, n_rows_total, n_in):
    need = n_rows_total * spec(q).row_bytes(n_in)
    if w.nbytes != need:
        raise ValueError(f"{q} weight has {w.nbytes} bytes, expected {need} ({n_rows_total} rows x {n_in})")


def resolve_mapping(mapping: str, qtype: str, n_in: int, rows: int) -> str:
    """"auto": the chunk mapping where it applies (Q4_K/Q6_K, n_in % 1024 == 0, one activation row), else slice."""
    if mapping == "auto":
        return "chunk" if rows == 1 and chunk_ok(qtype, n_in) else "slice"
    if mapping == "chunk" and not (rows == 1 and chunk_ok(qtype, n_in)):
        raise ValueError(f"mapping='chunk' needs Q4_K/Q6_K, n_in % 1024 == 0 and one row ({qtype}, {n_in}, {rows})")
    return mapping


def _sm_count() -> int:
    from ..runtime import get_device

    return get_device().sm_count


def gemv(w, qtype, x, n_out: int | None = None, out=None, stream=None, mapping: str = "auto", wpr: int | None = None,
         accumulate: bool = False):
    """y = x @ W.T for raw GGUF weights ``w`` ([n_out, row_bytes] uint8, numpy or DeviceArray) and f32 ``x``
    ([rows, n_in] or [n_in], rows <= 8). numpy in -> numpy out ([rows, n_out] or [n_out]).
    ``accumulate=True``: ``out += x @ W.T`` in place (``out`` required; the residual add of an output projection)."""
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into `out`: pass the residual buffer as out")
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    xs = tuple(x.shape)
    n_in = xs[-1]
    rows = 1 if len(xs) == 1 else xs[0]
    if n_out is None:
        n_out = int(w.shape[0])
    dw = as_device_bytes(w, st)
    dx, x_np = as_device(x, st, np.float32)
    _check_w(dw, q, n_out, n_in)
    aligned(dw, "weights"), aligned(dx, "x")
    y = out if out is not None else DeviceArray.empty((rows, n_out) if len(xs) > 1 else (n_out,), np.float32)
    mapping = resolve_mapping(mapping, q, n_in, rows)
    if mapping == "chunk":
        rpw = choose_rpw(n_out, _sm_count()) if wpr is None else 1
        fn = compile_gemv_chunk(q, n_in, rpw, False, False, accumulate, False)
        fn(gptr(Uint8, dw.ptr), gptr(Float32, dx.ptr), gptr(Int8, dx.ptr), gptr(Float32, dx.ptr), gptr(Float32, y.ptr),
           gptr(Int32, dx.ptr, 4), Int32(n_out), Int32(1), cuda.CUstream(st.handle))
        return y.to_numpy(stream=st) if x_np else y
    fn = compile_gemv(q, n_in, rows, False, False, mapping, wpr or _wpr(q, n_in, n_out, mapping), accumulate)
    fn(gptr(Uint8, dw.ptr), gptr(Float32, dx.ptr), gptr(Float32, y.ptr), gptr(Int32, dx.ptr, 4), Int32(n_out),
       Int32(1), cuda.CUstream(st.handle))
    return y.to_numpy(stream=st) if x_np else y


def gemv_experts(w, qtype, x, ids, n_out: int, n_in: int, x_per_slot: bool = False, out=None, stream=None,
                 mapping: str = "auto"):
    """Expert-indexed GEMV: ``y[j] = W[ids[j]] @ x[j if x_per_slot else 0]`` for every slot j, one launch.

    ``w``: [n_expert, n_out, row_bytes] raw bytes; ``ids``: int32 [n_slots] (device or numpy); ``x``: f32
    [n_slots or 1, n_in]. Returns [n_slots, n_out]."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    dw = as_device_bytes(w, st)
    dx, x_np = as_device(x, st, np.float32)
    di, _ = as_device(ids, st, np.int32)
    aligned(dw, "weights"), aligned(dx, "x")
    n_slots = int(np.prod(di.shape))
    if dw.nbytes % (n_out * spec(q).row_bytes(n_in)):
        raise ValueError(f"{q} expert weight bytes {dw.nbytes} not a multiple of {n_out} rows x {n_in}")
    y = out if out is not None else DeviceArray.empty((n_slots, n_out), np.float32)
    mapping = resolve_mapping(mapping, q, n_in, 1)
    if mapping == "chunk":
        rpw = choose_rpw(n_out * n_slots, _sm_count()) if n_out % 2 == 0 else 1
        fn = compile_gemv_chunk(q, n_in, rpw, True, bool(x_per_slot), False, False)
        fn(gptr(Uint8, dw.ptr), gptr(Float32, dx.ptr), gptr(Int8, dx.ptr), gptr(Float32, dx.ptr), gptr(Float32, y.ptr),
           gptr(Int32, di.ptr, 4), Int32(n_out), Int32(n_slots), cuda.CUstream(st.handle))
        return y.to_numpy(stream=st) if x_np else y
    fn = compile_gemv(q, n_in, 1, True, bool(x_per_slot), mapping, _wpr(q, n_in, n_out * n_slots, mapping))
    fn(gptr(Uint8, dw.ptr), gptr(Float32, dx.ptr), gptr(Float32, y.ptr), gptr(Int32, di.ptr, 4), Int32(n_out),
       Int32(n_slots), cuda.CUstream(st.handle))
    return y.to_numpy(stream=st) if x_np else y


# ---------------------------------------------------------------------------------------------------------------
# Registered configurations (compile gate): Qwen3-30B-A3B Q4_K_M and Gemma 3 270M Q4_K_M shapes.

# (qtype, n_in) of every dense projection: Qwen3-30B-A3B (q/k/v 2048 ->, o 4096 ->, LM head Q6_K 2048 ->),
# Gemma 3 270M (q/k/v/gate/up 640 -> Q5_0/Q8_0, o 1024 -> Q4_K, down 2048 -> Q4_K/Q6_K, tied LM head Q8_0 640 ->),
# and the synthetic tiny configs of gguf/synth.py (n_embd 256/384/512, o-proj 512/1024/2048, ffn 768/1024/1536).
DENSE_CONFIGS = sorted({
    *[(q, n) for q in ("Q4_K", "Q6_K") for n in (256, 512, 768, 1024, 1536, 2048, 4096)],
    *[("Q6_K_P", n) for n in (256, 768, 2048)],
    *[(q, n) for q in ("Q5_0", "Q8_0") for n in (384, 640, 768, 1536)],
})
# (qtype, n_in, x_per_slot) of the expert-indexed GEMV: gate/up (x shared) and down (x per slot)
EXPERT_CONFIGS = [("Q4_K", 2048, False), ("Q4_K", 768, True), ("Q6_K", 768, True), ("Q6_K_P", 768, True),
                  ("Q4_K", 256, False), ("Q4_K", 256, True), ("Q6_K", 256, True), ("Q4_K", 512, False),
                  ("Q5_0", 384, False), ("Q5_0", 384, True), ("Q8_0", 384, True)]


def registered_configs():
    cfgs = [dict(qtype=q, n_in=n, rows=1, wpr=k) for q, n in DENSE_CONFIGS for k in (1, 2, 4)
            if choose_wpr(1, n // spec(q).block_elems * Tiling(q).per_block) >= k]
    cfgs += [dict(qtype=q, n_in=n, rows=1, experts=True, x_per_slot=per) for q, n, per in EXPERT_CONFIGS]
    cfgs += [dict(qtype="Q4_K", n_in=2048, rows=r) for r in (2, 4, 8)]
    # output projections with the residual add fused (x += Wo o): Qwen3 4096 ->, Gemma 3 1024 ->, synthetic 512/2048
    cfgs += [dict(qtype="Q4_K", n_in=n, rows=1, wpr=k, accumulate=True) for n in (512, 1024, 2048, 4096)
             for k in (1, 2, 4)]
    # the per-lane-unit mapping (first version; kept as a fallback / for comparison in the microbench)
    cfgs += [dict(qtype=q, n_in=2048, rows=1, mapping="unit") for q in ("Q4_K", "Q6_K")]
    return cfgs


def chunk_configs():
    """The chunk GEMV at the model shapes (both paths): Qwen3-30B-A3B q/k/v/router (2048 ->), o-proj (4096 ->, also
    fused with the residual add), LM head (Q6_K / Q6_K_P 2048 -> 151936), experts gate/up (2048 -> 768, x shared);
    Gemma 3 270M o-proj (1024 -> 640) and down (2048 -> 640)."""
    shapes = [("Q4_K", 2048, 4096), ("Q4_K", 2048, 512), ("Q6_K", 2048, 512), ("Q6_K_P", 2048, 512),
              ("Q4_K", 2048, 128), ("Q4_K", 4096, 2048), ("Q6_K", 2048, 151936), ("Q6_K_P", 2048, 151936),
              ("Q4_K", 1024, 640), ("Q4_K", 2048, 640), ("Q6_K", 2048, 640)]
    cfgs = []
    for q8 in (False, True):
        cfgs += [dict(qtype=q, n_in=n, rpw=choose_rpw(o), q8=q8) for q, n, o in shapes]
        cfgs += [dict(qtype="Q4_K", n_in=n, rpw=choose_rpw(o), accumulate=True, q8=q8) for n, o in ((4096, 2048), (1024, 640))]
        cfgs += [dict(qtype="Q4_K", n_in=2048, rpw=choose_rpw(8 * 768), experts=True, q8=q8)]
    return cfgs


# Qwen3-30B-A3B q/k/v (attn_v is Q4_K or Q6_K per layer in Q4_K_M; Q6_K_P after the upload repack)
MULTI_CONFIGS = [dict(mats=(("Q4_K", 4096), ("Q4_K", 512), (v, 512)), n_in=2048, q8=q8)
                 for v in ("Q4_K", "Q6_K", "Q6_K_P") for q8 in (False, True)]


def _register():
    try:
        from .registry import register
    except ImportError:  # registry.py is owned by another module; absent in early checkouts
        return
    register("gemv", compile_gemv, registered_configs())
    register("gemv_chunk", compile_gemv_chunk, chunk_configs())
    register("gemv_multi", compile_gemv_multi, MULTI_CONFIGS)


_register()
