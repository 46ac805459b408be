"""Helpers shared by every kernel module: pointer wrapping and argument checks on the host side; PDL prologue and
warp/block reductions on the device side. The one helper dialect of the package: kernels use these, not local
copies.

Reductions are shuffle butterflies (``shfl.sync.bfly``): there is no f32 ``redux.sync`` on SM120 (quack
``reduce.py`` docstring), so the same code is used on every target. Block reductions go through a small smem buffer
of one slot per warp and leave the result in *every* thread (an all-reduce), which is what normalization and
softmax kernels want.
"""

from __future__ import annotations

import operator

import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm
from cutlass._mlir.dialects import nvvm as _nvvm
from cutlass.cutlass_dsl import T, dsl_user_op

from .arch import pdl_enabled

WARP = 32
F32_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------------------------------------- host side
def gptr(dtype, addr: int, align: int = 16) -> cute.Pointer:
    """A global-memory ``cute.Pointer`` for launching through raw device addresses.

    Never pass a plain int where a pointer was compiled: the non-TVM-FFI path silently truncates it to Int32
    (cute-dsl.md §2.1 of the project spec). ``align`` must match what the kernel was compiled with (alignment is
    static).
    """
    return cute.runtime.make_ptr(dtype, int(addr), cute.AddressSpace.gmem, assumed_align=align)


def fake_ptr(dtype, align: int = 16) -> cute.Pointer:
    """Placeholder pointer for ``cute.compile`` (the address is irrelevant at compile time)."""
    return gptr(dtype, 0, align)


def aligned(a, what: str, align: int = 16):
    """``a`` (anything with ``.ptr``), after checking that its address is ``align``-byte aligned (ValueError else):
    the kernels are compiled with 16-byte pointer alignment and read with 128-bit loads."""
    if a.ptr % align:
        raise ValueError(f"{what} must be {align}-byte aligned (ptr {a.ptr:#x}); the kernel uses 128-bit loads")
    return a


def cu_stream(stream):
    """``cuda.bindings.driver.CUstream`` for a runtime Stream / int handle / None (the package default stream)."""
    from ..runtime.stream import resolve_stream

    return resolve_stream(stream).cu


def as_device_bytes(w, stream):
    """Raw weight bytes on the device: a DeviceArray passes through (any dtype: only its bytes are read), anything
    else is uploaded as uint8."""
    from ..runtime import DeviceArray, as_device

    if isinstance(w, DeviceArray):
        return w
    return as_device(np.ascontiguousarray(w).view(np.uint8), stream)[0]


def sm_count() -> int:
    """Streaming multiprocessors of the current GPU (the launch heuristics size grids with it)."""
    from ..runtime import get_device

    return get_device().sm_count


# ---------------------------------------------------------------------------------------------- kernel base
class WarpRowKernel:
    """Base of the one-warp-per-row kernels (GEMV, MoE FFN): ``WARPS`` warps per CTA, each owning one output row (or
    a few rows, or a share of one row); grid.x covers the rows, grid.y the slots (selected experts / activation
    rows). A subclass keeps its static config in ``__init__`` (after ``super().__init__()``), launches from its
    ``@cute.jit __call__`` with :meth:`launch_rows`, and starts its ``@cute.kernel`` with ``pdl_prologue(self.pdl)``
    and :meth:`thread_coords`. What the rows hold and how a warp walks them stays in the subclass."""

    WARPS = 4
    experts = False  # grid.y runs over selected-expert slots (expert ids read from device memory)
    x_per_slot = False  # with experts: slot j reads activation row j (else row 0)

    def __init__(self):
        self.pdl = pdl_enabled()

    def launch_rows(self, kernel, n_rows, rows_per_cta: int, n_slots, stream):
        """Launch ``kernel`` (a bound ``self.kernel(...)``) over ``ceil(n_rows / rows_per_cta)`` x ``n_slots`` CTAs."""
        kernel.launch(grid=[cute.ceil_div(n_rows, rows_per_cta), n_slots, 1], block=[self.WARPS * 32, 1, 1],
                      stream=stream, use_pdl=self.pdl)

    @staticmethod
    def thread_coords():
        """(thread, CTA x, slot = CTA y, warp, lane) of the calling thread (device side)."""
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        return tid, bx, slot, tid // 32, tid % 32

    @staticmethod
    def expert_id(pIds, slot):
        """The expert id of ``slot``, read from the int32 device array ``pIds`` (device side: no host sync)."""
        ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
        return ids[slot]

    def slot_row(self, pIds, slot, n_rows, o):
        """(weight row, activation row) of output row ``o`` in ``slot`` (device side): dense (o, 0); expert-indexed
        (ids[slot] * n_rows + o, slot if ``x_per_slot`` else 0)."""
        if self.experts:
            return self.expert_id(pIds, slot) * n_rows + o, (slot if self.x_per_slot else 0)
        return o, 0


# ---------------------------------------------------------------------------------------------- device side
@cute.jit
def pdl_prologue(enabled: cutlass.Constexpr[bool]):
    """First statement of every kernel: with PDL, wait until the previous grid in the stream has completed and
    flushed (so nothing below reads or writes memory early), then allow the next grid to launch. Without PDL a no-op."""
    if const_expr(enabled):
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()


@cute.jit
def warp_reduce(val, op: cutlass.Constexpr, width: cutlass.Constexpr[int] = WARP,
                small_offsets_first: cutlass.Constexpr[bool] = False):
    """Butterfly all-reduce over groups of ``width`` consecutive lanes (every lane gets the result, the same bits in
    every lane). Stages run with offsets width/2, ..., 2, 1, or 1, 2, ..., width/2 with ``small_offsets_first``
    (the order the q8_1 kernels were validated with; for a float sum the order decides the rounding)."""
    if const_expr(small_offsets_first):
        offset = 1
        while const_expr(offset < width):
            val = op(val, cute.arch.shuffle_sync_bfly(val, offset=offset))
            offset = offset * 2
    else:
        offset = width // 2
        while const_expr(offset > 0):
            val = op(val, cute.arch.shuffle_sync_bfly(val, offset=offset))
            offset = offset // 2
    return val


@cute.jit
def warp_reduce_sum(val, width: cutlass.Constexpr[int] = WARP, small_offsets_first: cutlass.Constexpr[bool] = False):
    return warp_reduce(val, operator.add, width, small_offsets_first)


@cute.jit
def warp_reduce_max(val, width: cutlass.Constexpr[int] = WARP, small_offsets_first: cutlass.Constexpr[bool] = False):
    return warp_reduce(val, cute.arch.fmax, width, small_offsets_first)


@cute.jit
def warp_argmax(v: Float32, i: Int32, width: cutlass.Constexpr[int] = WARP):
    """Warp all-reduce of (value, index) to the max value, ties -> lowest index (every lane gets the result)."""
    offset = width // 2
    while const_expr(offset > 0):
        ov = cute.arch.shuffle_sync_bfly(v, offset=offset)
        oi = cute.arch.shuffle_sync_bfly(i, offset=offset)
        take = (ov > v) | ((ov == v) & (oi < i))
        v = ov if take else v
        i = oi if take else i
        offset = offset // 2
    return v, i


@cute.jit
def block_reduce(val, op: cutlass.Constexpr, buf: cute.Tensor, num_warps: cutlass.Constexpr[int], init):
    """All-reduce ``val`` over the whole block. ``buf``: smem tensor with >= num_warps elements of val's type.

    Ends with every thread holding the result. Contains two barriers, so it may be called repeatedly with the same
    ``buf`` (the second barrier protects the buffer from being overwritten by a later call before everyone read it).

    The second stage reduces the per-warp partials within groups of ``pow2(num_warps)`` lanes, so only lanes
    ``< num_warps`` hold the total after it; lane 0's value is then broadcast (without it the other lanes hold the
    identity: RESULTS.md, "block_reduce broadcast").
    """
    val = warp_reduce(val, op)
    if const_expr(num_warps > 1):
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        if lane == 0:
            buf[warp] = val
        cute.arch.barrier()
        r = init
        if lane < num_warps:
            r = buf[lane]
        val = warp_reduce(r, op, _pow2_at_least(num_warps))
        val = cute.arch.shuffle_sync(val, 0)  # lanes >= num_warps reduced only identities: take lane 0's total
        cute.arch.barrier()
    return val


@cute.jit
def block_reduce_sum(val: Float32, buf: cute.Tensor, num_warps: cutlass.Constexpr[int]) -> Float32:
    return block_reduce(val, operator.add, buf, num_warps, Float32(0.0))


@cute.jit
def block_reduce_max(val: Float32, buf: cute.Tensor, num_warps: cutlass.Constexpr[int]) -> Float32:
    return block_reduce(val, cute.arch.fmax, buf, num_warps, Float32(-F32_MAX))


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return min(p, WARP)


# ---------------------------------------------------------------------------------------------- PTX helpers
@dsl_user_op
def cp_async(dst: cute.Pointer, src: cute.Pointer, size: int, src_bytes, *, loc=None, ip=None):
    """cp.async of ``size`` (4/8/16) bytes global -> shared, reading only ``src_bytes`` (runtime, 0..size) bytes of
    the source and zero-filling the rest."""
    _nvvm.cp_async_shared_global(dst.to_llvm_ptr(loc=loc, ip=ip), src.to_llvm_ptr(loc=loc, ip=ip), size,
                                 _nvvm.LoadCacheModifierKind.CG if size == 16 else _nvvm.LoadCacheModifierKind.CA,
                                 cp_size=Int32(src_bytes).ir_value(loc=loc, ip=ip), loc=loc, ip=ip)


@dsl_user_op
def mma_f16_m16n8k16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, *, loc=None, ip=None):
    """D = A(16x16 f16, row) * B(16x8 f16, col) + C, f32 accumulate (``mma.sync.aligned.m16n8k16``).

    Fragments (g = lane // 4, t = lane % 4; each A/B register packs two f16, the lower column/k in the low half):
    A: a0 (row g, k 2t..2t+1), a1 (row g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..);
    B: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g); C/D: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, ...).
    Returns the 4 Float32 of D."""
    args = [Uint32(v).ir_value(loc=loc, ip=ip) for v in (a0, a1, a2, a3, b0, b1)]
    args += [Float32(v).ir_value(loc=loc, ip=ip) for v in (c0, c1, c2, c3)]
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.f32(), T.f32(), T.f32(), T.f32()]), args,
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
        "{$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def mma_s8_m16n8k32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, *, loc=None, ip=None):
    """D = A(16x32 s8, row) * B(32x8 s8, col) + C, int32 accumulate (``mma.sync.aligned.m16n8k32``).

    Fragments (g = lane // 4, t = lane % 4; each A/B register packs four s8, the lowest k in the low byte):
    A: a0 (row g, k 4t..4t+3), a1 (row g+8, k 4t..), a2 (row g, k 4t+16..), a3 (row g+8, k 4t+16..);
    B: b0 (k 4t..4t+3, col g), b1 (k 4t+16.., col g); C/D: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, ...).
    Returns the 4 Int32 of D."""
    args = [Uint32(v).ir_value(loc=loc, ip=ip) for v in (a0, a1, a2, a3, b0, b1)]
    args += [Int32(v).ir_value(loc=loc, ip=ip) for v in (c0, c1, c2, c3)]
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32(), T.i32(), T.i32()]), args,
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
        "{$10, $11, $12, $13};",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", loc=loc, ip=ip)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def ldmatrix_x4(smem_ptr: cute.Pointer, transpose: bool = False, *, loc=None, ip=None):
    """``ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16``: four 8x8 16-bit matrices; lanes 8i..8i+7 give the
    shared-memory addresses of the 8 rows (16 bytes each) of matrix i. Register i of lane l holds, of matrix i,
    row l // 4, elements 2(l % 4), 2(l % 4)+1 (``transpose``: column l // 4, rows 2(l % 4), 2(l % 4)+1).
    Returns 4 Uint32."""
    i32 = ir.IntegerType.get_signless(32)
    res = _nvvm.ldmatrix(smem_ptr.to_llvm_ptr(loc=loc, ip=ip), 4,
                         _nvvm.MMALayout.col if transpose else _nvvm.MMALayout.row,
                         results=[llvm.StructType.get_literal([i32] * 4)], loc=loc, ip=ip)
    return [Uint32(llvm.extractvalue(i32, res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def nanosleep(ns: int, *, loc=None, ip=None):
    """``nanosleep.u32 ns``: a polling thread yields its issue slots (and L2 bandwidth) to the warps doing work."""
    _nvvm.nanosleep(Int32(ns).ir_value(loc=loc, ip=ip), loc=loc, ip=ip)


@dsl_user_op
def trap(*, loc=None, ip=None):
    """PTX ``trap``: abort the kernel (the launch, and the stream's next synchronization, report an error)."""
    llvm.inline_asm(None, [], "trap;", "", has_side_effects=True, loc=loc, ip=ip)


@dsl_user_op
def pack_f16x2(lo, hi, *, loc=None, ip=None):
    """Two f32 rounded to nearest f16 and packed into one 32-bit register, ``lo`` in the low half (the element with
    the lower column index of an mma fragment). PTX ``cvt.rn.f16x2.f32 d, a, b`` puts ``a`` in the upper half."""
    args = [Float32(v).ir_value(loc=loc, ip=ip) for v in (hi, lo)]
    return Uint32(llvm.inline_asm(T.i32(), args, "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", loc=loc, ip=ip))


__all__ = ["WARP", "F32_MAX", "gptr", "fake_ptr", "nanosleep", "trap", "aligned", "cu_stream", "as_device_bytes", "sm_count",
           "WarpRowKernel", "pdl_prologue", "warp_reduce",
           "warp_reduce_sum", "warp_reduce_max", "warp_argmax", "block_reduce", "block_reduce_sum", "block_reduce_max",
           "cp_async", "mma_f16_m16n8k16", "ldmatrix_x4", "pack_f16x2"]

