"""Decode GEMV over raw GGUF-quantized weights: ``y[r, o] = sum_i W[o, i] * x[r, i]``, f32 or int8 activations.

Design (memory-bound, batch 1-8):
- one warp per output row (or ``warps_per_row`` = 2/4 warps per row when n_out is small, partial sums combined in
  a fixed order through shared memory); grid.x over rows, grid.y = selected-expert slot for the expert-indexed
  variant (W is [n_expert, n_out, n_in], expert ids read from a device int32 array: no host sync, CUDA-graph safe,
  all slots in one launch).
- lanes stride over the row's *slices* (quant_decode.py: 4 consecutive quant bytes -> 4-16 weights per lane):
  neighbouring lanes read neighbouring weight bytes (Q4_K: one coalesced 128-byte request per warp for the quants
  plus a broadcast 16-byte header) and neighbouring 16-byte groups of x, so every load of a warp is coalesced.
  The first version gave each lane a 32-64-element *unit* (lane addresses 128-256 B apart: ~8x the L1 wavefronts
  for the x loads); it is kept as ``mapping="unit"`` for comparison/fallback.
- the step dot (quant_dot.py) is f32 (decoded weights in registers, contraction allowed: <= 1 ulp per weight; x
  read with 128-bit loads, L1/L2 resident) or, with ``q8``, dp4a against q8_1 int8 activations (q8_1.py).
- f32 accumulation, 2-way unrolled loop, butterfly shuffle reduction (fixed order: deterministic), lane 0 stores.

``mapping="chunk"`` (gemv_chunk.py) is the default where it applies (Q4_K / Q6_K / Q6_K_P, n_in % 1024 == 0, one
activation row); ``mapping="auto"`` picks it. The float64 references and the error bounds the tests assert are in
``sparkinfer_cute.reference.kernel_refs`` (``gemv_ref``, ``gemv_error_bound``, ``gemv_q8_error_bound``).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, Uint8, cute

from .common import WarpRowKernel, aligned, as_device_bytes, gptr, pdl_prologue, sm_count, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .gemv_chunk import choose_rows_per_warp, chunk_ok, compile_gemv_chunk, compile_gemv_multi
from .norm_chain import AttnTail, AttnTailArgs, FfnTail, FfnTailArgs, tail_fake_args, tail_launch
from .q8_1 import Q8Act, as_q8, x_pointers
from .quant_decode import INT_QTYPES, Tiling, check_weight_bytes, qtype_name, spec
from .quant_dot import decode_int_slice, decode_int_unit, group_dot, step_dot
from .registry import register

WARPS = WarpRowKernel.WARPS
MAX_ROWS = 8


class Gemv(WarpRowKernel):
    """``y[slot, r, o] (+)= sum_i W[e(slot), o, i] * x[xrow(slot, r), i]``, slice or unit mapping.

    Dense: n_slots = 1, e = 0, xrow = r (``rows`` activation rows). Expert-indexed (``experts=True``): e = ids[slot];
    xrow = slot if ``x_per_slot`` else 0, rows must be 1. ``accumulate``: y += W x (in-place residual add).
    ``q8``: x is q8_1 int8 (pointers pXq, pXd, pXs) and the step dot is dp4a; else x is f32 (pX).

    ``warps_per_row`` (1/2/4): a row's steps are split over that many warps of the CTA (warp w takes steps
    lane + 32*(w % warps_per_row) + 32*warps_per_row*t) and the partial sums are added in a fixed order through
    shared memory. Used when n_out is small (2048 -> 512: 512 rows would be 512 warps, ~4 per SM, too few loads in
    flight).

    ``second`` = ``(qtype2, split)`` (dense, one row): output rows ``o >= split`` come from a second matrix of
    another type (``pW2``, its row ``o - split``), continuing the output: the q|k rows packed in one weight and a v
    of another type (models/base.py ``fuse_rows``) as one launch.

    ``tail`` (norm_chain.py :class:`AttnTail` or :class:`FfnTail`; dense, one activation row): the last CTA to
    finish then runs the norm chain after the projection on ``y``."""

    def __init__(self, qtype: str, n_in: int, rows: int = 1, experts: bool = False, x_per_slot: bool = False,
                 mapping: str = "slice", warps_per_row: int = 1, accumulate: bool = False, q8: bool = False,
                 tail: AttnTail | FfnTail | None = None, second: tuple | None = None):
        super().__init__()
        assert tail is None or (not experts and rows == 1), "a tail follows a dense one-row GEMV"
        assert second is None or (not experts and rows == 1 and mapping == "slice"), "a second matrix: dense, slice"
        self.tail = tail.chain(WARPS * 32) if tail is not None else None
        self.second, self.split = (second[0], int(second[1])) if second is not None else (None, 0)
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, mapping)
        self.parts = [(qtype, self.sp, self.tiling)]
        if second is not None:
            self.parts.append((self.second, spec(self.second), Tiling(self.second, mapping)))
        for q, sp, _ in self.parts:
            assert n_in % sp.block_elems == 0, f"{q}: n_in {n_in} % {sp.block_elems}"
            assert not q8 or q in INT_QTYPES, f"the dp4a GEMV supports {INT_QTYPES}"
        assert 1 <= rows <= MAX_ROWS
        assert not (experts and rows != 1), "the expert-indexed GEMV takes one activation row per slot"
        assert warps_per_row in (1, 2, 4)
        self.n_in, self.rows, self.experts, self.x_per_slot = n_in, rows, experts, x_per_slot
        self.mapping, self.warps_per_row, self.accumulate, self.q8 = mapping, warps_per_row, accumulate, q8
        self.rows_per_cta = WARPS // warps_per_row

    @cute.jit
    def __call__(self, pW: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer,
                 pY: cute.Pointer, pIds: cute.Pointer, n_out: Int32, n_slots: Int32, pW2: cute.Pointer,
                 tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer,
                 t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer,
                 t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer, eps: Float32, stream: cuda.CUstream):
        self.launch_rows(self.kernel(pW, pX, pXq, pXd, pXs, pY, pIds, n_out, pW2, tCnt, t0, t1, t2, t3, t4, t5, t6, t7,
                                     t8, t9, t10, t11, eps),
                         n_out, self.rows_per_cta, n_slots, stream)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer,
               pY: cute.Pointer, pIds: cute.Pointer, n_out: Int32, pW2: cute.Pointer, tCnt: cute.Pointer,
               t0: cute.Pointer, t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer,
               t5: cute.Pointer, t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer,
               t10: cute.Pointer, t11: cute.Pointer, eps: Float32):
        pdl_prologue(self.pdl)
        wpr = self.warps_per_row
        tid, bx, slot, warp, lane = self.thread_coords()
        kpart = warp % wpr
        o = bx * self.rows_per_cta + warp // wpr
        acc = cute.make_rmem_tensor((self.rows,), Float32)
        acc.fill(0.0)
        if o < n_out:
            if cutlass.const_expr(self.second is None):
                row, xrow0 = self.slot_row(pIds, slot, n_out, o)
                self.row_steps(acc, 0, pW, row, xrow0, lane, kpart, pX, pXq, pXd, pXs)
            else:
                if o < self.split:
                    self.row_steps(acc, 0, pW, o, 0, lane, kpart, pX, pXq, pXd, pXs)
                else:
                    self.row_steps(acc, 1, pW2, o - self.split, 0, lane, kpart, pX, pXq, pXd, pXs)
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
        if cutlass.const_expr(self.tail is not None):
            self.tail.tail(tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, eps)

    @cute.jit
    def row_steps(self, acc: cute.Tensor, part: cutlass.Constexpr[int], pW: cute.Pointer, row: Int32, xrow0: Int32,
                  lane: Int32, kpart: Int32, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
                  pXs: cute.Pointer):
        """This warp's share of weight row ``row`` of matrix ``part`` (its type's decode) dotted with the activation
        rows from ``xrow0``, added into ``acc[r]``."""
        # the part's type, spec and tiling are read through self.parts inside the loop: a Python object bound to a
        # local before a runtime `for` would be taken for a loop-carried value (the DSL refuses it)
        wpr = self.warps_per_row
        nbpr = self.n_in // self.parts[part][1].block_elems
        upb = self.parts[part][2].per_block
        blk0 = row * nbpr
        w = self.parts[part][2].buffer()
        for U in cutlass.range(lane + 32 * kpart, nbpr * upb, 32 * wpr, unroll=2):
            kb = U // upb
            u = U - kb * upb
            if cutlass.const_expr(self.q8):
                decode = decode_int_slice if self.mapping == "slice" else decode_int_unit
                groups = decode(self.parts[part][0], pW, blk0 + kb, u)
                xb = kb * self.parts[part][1].block_elems + self.parts[part][2].base(u)
                for r in cutlass.range_constexpr(self.rows):
                    for g in groups:
                        acc[r] = acc[r] + group_dot(g, pXq, pXd, pXs, (xrow0 + r) * self.n_in, xb, 0)
            else:
                self.parts[part][2].decode(pW, blk0 + kb, u, w, exact=False)
                xb = kb * self.parts[part][1].block_elems + self.parts[part][2].base(u)
                for r in cutlass.range_constexpr(self.rows):
                    acc[r] = acc[r] + step_dot(self.parts[part][2], w, pX, (xrow0 + r) * self.n_in + xb)


@kernel_cache
def compile_gemv(qtype: str, n_in: int, rows: int = 1, experts: bool = False, x_per_slot: bool = False,
                 mapping: str = "slice", warps_per_row: int = 1, accumulate: bool = False, q8: bool = False,
                 tail: AttnTail | FfnTail | None = None, second: tuple | None = None):
    """Runtime args: (W u8, x f32, xq i8, xd f32, xs f32, y f32, ids i32 (align 4) pointers, n_out, n_slots, W2 u8
    (read with ``second``), the tail's arguments (norm_chain.py ``AttnTailArgs.launch_args``, or ``no_tail_args``),
    stream); :func:`x_pointers` gives the four x pointers of a float or q8_1 activation."""
    return cute.compile(Gemv(qtype, n_in, rows, experts, x_per_slot, mapping, warps_per_row, accumulate, q8, tail,
                             second),
                        gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0),
                        gptr(Float32, 0), gptr(Int32, 0, 4), Int32(1), Int32(1), gptr(Uint8, 0), *tail_fake_args(),
                        cute.runtime.make_fake_stream(), options=compile_options())


# ---------------------------------------------------------------------------------------------------------------
# Host side


def choose_warps_per_row(n_out_total: int, steps_per_row: int, sm_count: int = 132) -> int:
    """Warps per row: enough warps for ~16 per SM (loads in flight), but >= 2 steps per lane per warp."""
    wpr = 1
    while wpr < 4 and n_out_total * wpr < 16 * sm_count and steps_per_row >= 32 * 2 * (wpr * 2):
        wpr *= 2
    return wpr


def _warps_per_row(q, n_in, n_rows_total, mapping="slice"):
    steps = n_in // spec(q).block_elems * Tiling(q, mapping).per_block
    return choose_warps_per_row(n_rows_total, steps, sm_count())


def resolve_mapping(mapping: str, qtype: str, n_in: int, rows: int) -> str:
    """"auto": the chunk mapping where it applies (Q4_K/Q6_K, n_in % 1024 == 0, one activation row), else slice."""
    if mapping == "auto":
        return "chunk" if rows == 1 and chunk_ok(qtype, n_in) else "slice"
    if mapping == "chunk" and not (rows == 1 and chunk_ok(qtype, n_in)):
        raise ValueError(f"mapping='chunk' needs Q4_K/Q6_K, n_in % 1024 == 0 and one row ({qtype}, {n_in}, {rows})")
    return mapping


def _launch(dw, q: str, x, di, n_in: int, rows: int, n_out: int, n_slots: int, experts: bool, x_per_slot: bool,
            y, st, mapping: str, warps_per_row: int | None, accumulate: bool, rows_per_warp: int | None = None,
            tail: AttnTailArgs | FfnTailArgs | None = None, second: tuple | None = None):
    """One GEMV launch on device buffers: ``x`` a float DeviceArray or a Q8Act (then the dp4a path), ``di`` the
    expert ids (any valid int32 buffer when dense). ``rows_per_warp`` (chunk mapping) / ``warps_per_row`` (slice):
    None = the heuristic's choice. ``tail``: the norm chain after the projection (norm_chain.py
    :class:`AttnTailArgs` / :class:`FfnTailArgs`, reading ``y``), run by the same launch. ``second`` = ``(dw2, q2, split)``: rows
    ``>= split`` of the ``n_out`` come from ``dw2`` (slice mapping, :class:`Gemv` ``second``)."""
    q8 = isinstance(x, Q8Act)
    if tail is not None and (experts or rows != 1 or accumulate):
        raise ValueError("a GEMV tail follows a dense one-row GEMV without accumulate")
    tkw, targs = tail_launch(tail, n_out, y)
    px, pxq, pxd, pxs = x_pointers(x)
    aligned(dw, "weights")
    mapping = resolve_mapping(mapping, q, n_in, rows)
    pw2 = gptr(Uint8, dw.ptr)  # read only with a second matrix
    if second is not None:
        dw2, q2, split = second
        if experts or rows != 1 or not 0 < split < n_out:
            raise ValueError(f"a second matrix follows the first's {split} rows of a dense one-row GEMV of {n_out}")
        check_weight_bytes(dw2, q2, n_out - split, n_in)
        pw2 = gptr(Uint8, aligned(dw2, "second weights").ptr)
        tkw["second"] = (q2, int(split))
        mapping = "slice"
    if mapping == "chunk":
        if rows_per_warp is not None:  # a tuned config (autotune) or a test
            if n_out % rows_per_warp:
                raise ValueError(f"chunk GEMV: n_out {n_out} is not a multiple of rows_per_warp {rows_per_warp}")
        elif warps_per_row is not None or n_out % 2:  # a forced warps_per_row (tests) means one row per warp here
            rows_per_warp = 1
        else:
            rows_per_warp = choose_rows_per_warp(n_out * n_slots, sm_count())
        fn = compile_gemv_chunk(q, n_in, rows_per_warp, experts, x_per_slot, accumulate, q8, **tkw)
        fn(gptr(Uint8, dw.ptr), px, pxq, pxd, gptr(Float32, y.ptr), gptr(Int32, di.ptr, 4), Int32(n_out),
           Int32(n_slots), *targs, cuda.CUstream(st.handle))
        return
    if warps_per_row is None:
        warps_per_row = 1 if q8 else _warps_per_row(q, n_in, n_out * n_slots, mapping)
    fn = compile_gemv(q, n_in, rows, experts, x_per_slot, mapping, warps_per_row, accumulate, q8, **tkw)
    fn(gptr(Uint8, dw.ptr), px, pxq, pxd, pxs, gptr(Float32, y.ptr), gptr(Int32, di.ptr, 4), Int32(n_out),
       Int32(n_slots), pw2, *targs, cuda.CUstream(st.handle))


def gemv(w, qtype, x, n_out: int | None = None, out=None, stream=None, mapping: str = "auto",
         warps_per_row: int | None = None, accumulate: bool = False, rows_per_warp: int | None = None,
         tail: AttnTailArgs | FfnTailArgs | None = None, second: tuple | None = None):
    """y = x @ W.T for raw GGUF weights ``w`` ([n_out, row_bytes] uint8, numpy or DeviceArray) and ``x``: f32
    ([rows, n_in] or [n_in], rows <= 8) or a :class:`Q8Act` (then the dp4a path). numpy in -> numpy out ([rows,
    n_out] or [n_out]). ``accumulate=True``: ``out += x @ W.T`` in place (``out`` required; the residual add of an
    output projection). Launch knobs (the autotuner's ``gemv`` / ``gemv_q8`` configs): ``mapping``, the slice
    mapping's ``warps_per_row`` and the chunk mapping's ``rows_per_warp``; None = the heuristic's choice.
    ``tail`` (norm_chain.py :class:`AttnTailArgs` / :class:`FfnTailArgs`, reading ``out``): the same launch then runs
    the norm chain after the projection (the last CTA to finish). ``second`` = ``(w2, qtype2, n_out2)``: ``n_out2`` more
    output rows (after ``n_out``) from the raw weights ``w2`` of another type, same n_in, in the same launch (slice
    mapping): a q|k packed weight and a v of another type."""
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into `out`: pass the residual buffer as out")
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    if n_out is None:
        n_out = int(w.shape[0])
    dw = as_device_bytes(w, st)
    if isinstance(x, Q8Act):
        dx, x_np, n_in, rows, shape = x, False, x.n, x.rows, ((x.rows, n_out) if x.rows > 1 else (n_out,))
    else:
        dx, x_np = as_device(x, st, np.float32)
        xs = tuple(x.shape)
        n_in, rows = xs[-1], (1 if len(xs) == 1 else xs[0])
        shape = (rows, n_out) if len(xs) > 1 else (n_out,)
    check_weight_bytes(dw, q, n_out, n_in)
    sec = None
    if second is not None:
        w2, q2, n_out2 = second
        sec = (as_device_bytes(w2, st), qtype_name(q2), n_out)
        n_out += int(n_out2)
        shape = (rows, n_out) if len(shape) > 1 else (n_out,)
        if out is not None and out.size < n_out:
            raise ValueError(f"gemv with a second matrix writes {n_out} rows into a buffer of {out.size}")
    y = out if out is not None else DeviceArray.empty(shape, np.float32)
    _launch(dw, q, dx, dx.d if isinstance(dx, Q8Act) else dx, n_in, rows, n_out, 1, False, False, y, st, mapping,
            warps_per_row, accumulate, rows_per_warp, tail, sec)
    return y.to_numpy(stream=st) if x_np else y


def gemv_experts(w, qtype, x, ids, n_out: int, n_in: int | None = None, x_per_slot: bool = False, out=None,
                 stream=None, mapping: str = "auto"):
    """Expert-indexed GEMV: ``y[j] = W[ids[j]] @ x[j if x_per_slot else 0]`` for every slot j, one launch.

    ``w``: [n_expert, n_out, row_bytes] raw bytes; ``ids``: int32 [n_slots] (device or numpy); ``x``: f32
    [n_slots or 1, n_in] or a :class:`Q8Act` (dp4a path). Returns [n_slots, n_out]."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    dw = as_device_bytes(w, st)
    if isinstance(x, Q8Act):
        dx, x_np, n_in = x, False, x.n
    else:
        dx, x_np = as_device(x, st, np.float32)
        n_in = int(dx.shape[-1]) if n_in is None else n_in
    di, _ = as_device(ids, st, np.int32)
    n_slots = int(np.prod(di.shape))
    if dw.nbytes % (n_out * spec(q).row_bytes(n_in)):
        raise ValueError(f"{q} expert weight bytes {dw.nbytes} not a multiple of {n_out} rows x {n_in}")
    y = out if out is not None else DeviceArray.empty((n_slots, n_out), np.float32)
    _launch(dw, q, dx, di, n_in, 1, n_out, n_slots, True, bool(x_per_slot), y, st, mapping, None, False)
    return y.to_numpy(stream=st) if x_np else y


def gemv_q8(w, qtype, x, n_out: int | None = None, out=None, stream=None, mapping: str = "auto",
            accumulate: bool = False):
    """:func:`gemv` through int8 activations: ``x`` f32 (numpy/DeviceArray, quantized here) or a :class:`Q8Act`."""
    from ..runtime import default_stream

    st = stream if stream is not None else default_stream()
    xq, x_np = as_q8(x, st)
    n_out = int(w.shape[0]) if n_out is None else n_out
    y = gemv(w, qtype, xq, n_out=n_out, out=out, stream=st, mapping=mapping, accumulate=accumulate)
    if x_np:
        r = y.to_numpy(stream=st)
        return r.reshape(n_out) if np.ndim(x) == 1 else r.reshape(-1, n_out)
    return y


def gemv_q8_experts(w, qtype, x, ids, n_out: int, x_per_slot: bool = False, out=None, stream=None):
    """:func:`gemv_experts` through int8 activations (``x`` f32, quantized here, or a :class:`Q8Act`)."""
    from ..runtime import default_stream

    st = stream if stream is not None else default_stream()
    xq, x_np = as_q8(x, st)
    y = gemv_experts(w, qtype, xq, ids, n_out, x_per_slot=x_per_slot, out=out, stream=st)
    return y.to_numpy(stream=st) if x_np else y


def gemv_multi(items, x, stream=None, rows_per_warp: tuple | None = None):
    """``y_m = W_m @ x`` for up to 3 (w, qtype, y) items sharing one activation row, in one launch.

    ``x``: f32 DeviceArray ([n_in] or [1, n_in]; float path) or a q8_1 ``Q8Act`` with one row (dp4a path).
    ``y``: f32 DeviceArrays of n_out elements (written). Every (qtype, n_in) must suit the chunk mapping
    (:func:`chunk_ok`); otherwise the items are launched one by one through :func:`gemv`. ``rows_per_warp``: one
    per item, None entries (or None) = :func:`choose_rows_per_warp` (a tuned config of the standalone GEMV)."""
    from ..runtime import default_stream

    st = stream if stream is not None else default_stream()
    q8 = isinstance(x, Q8Act)
    n_in = x.n if q8 else int(x.shape[-1])
    mats = tuple((qtype_name(q), int(np.prod(y.shape))) for _, q, y in items)
    if not (1 <= len(items) <= 3) or not all(chunk_ok(q, n_in) for q, _ in mats):
        for i, (w, q, y) in enumerate(items):
            gemv(w, q, x, n_out=int(np.prod(y.shape)), out=y, stream=st,
                 rows_per_warp=None if rows_per_warp is None else rows_per_warp[i])
        return [y for _, _, y in items]
    dws = [as_device_bytes(w, st) for w, _, _ in items]
    for dw, (q, n) in zip(dws, mats):
        check_weight_bytes(dw, q, n, n_in)
        aligned(dw, "weights")
    pw = [dw.ptr for dw in dws] + [dws[0].ptr] * (3 - len(dws))
    py = [y.ptr for _, _, y in items] + [items[0][2].ptr] * (3 - len(items))
    px, pxq, pxd, _ = x_pointers(x)
    rpw = None
    if rows_per_warp is not None and any(r is not None for r in rows_per_warp):
        rpw = tuple(r if r is not None else choose_rows_per_warp(n, sm_count())
                    for r, (_, n) in zip(rows_per_warp, mats))
    fn = compile_gemv_multi(mats, n_in, q8, sm_count(), rpw)  # rpw None: the kernel picks per matrix
    fn(gptr(Uint8, pw[0]), gptr(Uint8, pw[1]), gptr(Uint8, pw[2]), px, pxq, pxd, gptr(Float32, py[0]),
       gptr(Float32, py[1]), gptr(Float32, py[2]), cuda.CUstream(st.handle))
    return [y for _, _, y in items]


# ---------------------------------------------------------------------------------------------------------------
# Registered configurations (compile gate): Qwen3-30B-A3B Q4_K_M and Gemma 3 270M Q4_K_M shapes.

# (qtype, n_in) of every dense projection: Qwen3-30B-A3B (q/k/v 2048 ->, o 4096 ->, LM head Q6_K 2048 ->),
# Gemma 3 270M (q/k/v/gate/up 640 -> Q5_0/Q8_0, o 1024 -> Q4_K, down 2048 -> Q4_K/Q6_K, tied LM head Q8_0 640 ->),
# and the synthetic tiny configs of gguf/synth.py (n_embd 256/384/512, o-proj 512/1024/2048, ffn 768/1024/1536).
DENSE_CONFIGS = sorted({
    *[(q, n) for q in ("Q4_K", "Q6_K") for n in (256, 512, 768, 1024, 1536, 2048, 4096)],
    *[("Q6_K_P", n) for n in (256, 768, 2048)],
    *[(q, n) for q in ("Q5_0", "Q8_0") for n in (384, 640, 768, 1536)],
    # Gemma 4 26B-A4B: n_embd 2816 (q/k/v/o-in, dense gate/up, the tied Q6_K LM head), dense down 2112 (Q5_0/Q8_0:
    # 2112 % 256 != 0), attention out 4096 / 8192 (16 heads x 256 / 512)
    *[(q, 2816) for q in ("Q4_K", "Q6_K", "Q6_K_P")], *[(q, 2112) for q in ("Q5_0", "Q8_0")],
    ("Q4_K", 8192),
})
# (qtype, n_in, x_per_slot) of the expert-indexed GEMV: gate/up (x shared) and down (x per slot)
EXPERT_CONFIGS = [("Q4_K", 2048, False), ("Q4_K", 768, True), ("Q6_K", 768, True), ("Q6_K_P", 768, True),
                  ("Q4_K", 256, False), ("Q4_K", 256, True), ("Q6_K", 256, True), ("Q4_K", 512, False),
                  ("Q5_0", 384, False), ("Q5_0", 384, True), ("Q8_0", 384, True)]


def registered_configs(q8: bool | None = None):
    """Gate configs of :func:`compile_gemv`: the f32 path (q8=False), the dp4a path (q8=True), or both (None)."""
    cfgs = []
    if q8 is not True:
        cfgs += [dict(qtype=q, n_in=n, rows=1, warps_per_row=k) for q, n in DENSE_CONFIGS for k in (1, 2, 4)
                 if choose_warps_per_row(1, n // spec(q).block_elems * Tiling(q).per_block) >= k]
        cfgs += [dict(qtype=q, n_in=n, rows=1, experts=True, x_per_slot=per) for q, n, per in EXPERT_CONFIGS]
        cfgs += [dict(qtype="Q4_K", n_in=2048, rows=r) for r in (2, 4, 8)]
        # output projections with the residual add fused (x += Wo o): Qwen3 4096 ->, Gemma 3 1024 ->, synthetic
        cfgs += [dict(qtype="Q4_K", n_in=n, rows=1, warps_per_row=k, accumulate=True) for n in (512, 1024, 2048, 4096)
                 for k in (1, 2, 4)]
        # the per-lane-unit mapping (first version; kept as a fallback / for comparison in the microbench)
        cfgs += [dict(qtype=q, n_in=2048, rows=1, mapping="unit") for q in ("Q4_K", "Q6_K")]
    if q8 is not False:
        cfgs += [dict(qtype=q, n_in=n, rows=1, q8=True) for q, n in DENSE_CONFIGS if q in INT_QTYPES]
        cfgs += [dict(qtype=q, n_in=n, rows=1, experts=True, x_per_slot=p, q8=True) for q, n, p in EXPERT_CONFIGS]
        cfgs += [dict(qtype="Q4_K", n_in=2048, rows=r, q8=True) for r in (2, 4, 8)]
        cfgs += [dict(qtype=q, n_in=2048, rows=1, mapping="unit", q8=True) for q in ("Q4_K", "Q6_K")]
        cfgs += [dict(qtype="Q4_K", n_in=n, rows=1, accumulate=True, q8=True) for n in (512, 1024, 2048, 4096)]
    return cfgs


# the O projection with the post-attention norm chain as its tail (models/ops.py AfterAttention): the synthetic tiny
# Gemma 4 file's (slice: 256 / 512 -> 256, three outputs and the experts' q8_1 copy); the synthetic tiny Gemma 3's
# dense down projection (768 -> 384, f32) with the post-FFN chain and the next attn_norm
TAIL_CONFIGS = [dict(qtype="Q4_K", n_in=n, rows=1, q8=True, tail=AttnTail(256, 3, True)) for n in (256, 512)]
TAIL_CONFIGS += [dict(qtype=q, n_in=768, rows=1, warps_per_row=choose_warps_per_row(384, 768 // 32 * Tiling(q).per_block),
                      tail=FfnTail(384)) for q in ("Q4_K", "Q6_K_P")]
# packed q|k rows and a v of another type in one launch (models/ops.py gemv_qkv, pass fused_qkv_mixed): Gemma 4
# 26B-A4B and the synthetic tiny file (dp4a), Gemma 3 270M (f32: warps per row as _launch picks them on 132 SMs)
SECOND_CONFIGS = [dict(qtype="Q4_K", n_in=n, rows=1, q8=True, second=("Q6_K_P", split))
                  for n, split in ((2816, 6144), (256, 384))]
SECOND_CONFIGS += [dict(qtype="Q5_0", n_in=640, rows=1, second=("Q8_0", 1280),
                        warps_per_row=choose_warps_per_row(1536, 640 // 32 * Tiling("Q5_0").per_block))]
register("gemv", compile_gemv, registered_configs() + TAIL_CONFIGS + SECOND_CONFIGS)
