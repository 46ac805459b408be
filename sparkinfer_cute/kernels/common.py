"""Device helpers shared by every kernel module: pointer wrapping, warp/block reductions, launch-argument helpers.

Reductions are shuffle butterflies (``shfl.sync.bfly``): there is no f32 ``redux.sync`` on SM120 (quack
``reduce.py`` docstring), so the same code is used on every target. Block reductions go through a small smem buffer
of one slot per warp and leave the result in *every* thread (an all-reduce), which is what normalization and
softmax kernels want.
"""

from __future__ import annotations

import operator

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr

WARP = 32
F32_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------------------------------------- host side
def gptr(dtype, addr: int, align: int = 16) -> cute.Pointer:
    """A global-memory ``cute.Pointer`` for launching through raw device addresses.

    Never pass a plain int where a pointer was compiled: the non-TVM-FFI path silently truncates it to Int32
    (../shared/spec/cute-dsl.md §2.1). ``align`` must match what the kernel was compiled with (alignment is static).
    """
    return cute.runtime.make_ptr(dtype, int(addr), cute.AddressSpace.gmem, assumed_align=align)


def fake_ptr(dtype, align: int = 16) -> cute.Pointer:
    """Placeholder pointer for ``cute.compile`` (the address is irrelevant at compile time)."""
    return gptr(dtype, 0, align)


def cu_stream(stream):
    """``cuda.bindings.driver.CUstream`` for a runtime Stream / int handle / None (the package default stream)."""
    from ..runtime.stream import resolve_stream

    return resolve_stream(stream).cu


# ---------------------------------------------------------------------------------------------- device side
@cute.jit
def pdl_prologue(enabled: cutlass.Constexpr[bool]):
    """First statement of every kernel: with PDL, wait until the previous grid in the stream has completed and
    flushed (so nothing below reads or writes memory early), then allow the next grid to launch. Without PDL a no-op."""
    if const_expr(enabled):
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()


@cute.jit
def warp_reduce(val, op: cutlass.Constexpr, width: cutlass.Constexpr[int] = WARP):
    """Butterfly all-reduce over groups of ``width`` consecutive lanes (every lane gets the result)."""
    offset = width // 2
    while const_expr(offset > 0):
        val = op(val, cute.arch.shuffle_sync_bfly(val, offset=offset))
        offset = offset // 2
    return val


@cute.jit
def warp_reduce_sum(val, width: cutlass.Constexpr[int] = WARP):
    return warp_reduce(val, operator.add, width)


@cute.jit
def warp_reduce_max(val: Float32, width: cutlass.Constexpr[int] = WARP) -> Float32:
    return warp_reduce(val, cute.arch.fmax, width)


@cute.jit
def block_reduce(val, op: cutlass.Constexpr, buf: cute.Tensor, num_warps: cutlass.Constexpr[int], init):
    """All-reduce ``val`` over the whole block. ``buf``: smem tensor with >= num_warps elements of val's type.

    Ends with every thread holding the result. Contains two barriers, so it may be called repeatedly with the same
    ``buf`` (the second barrier protects the buffer from being overwritten by a later call before everyone read it).

    The second stage reduces the per-warp partials within groups of ``pow2(num_warps)`` lanes, so only lanes
    ``< num_warps`` hold the total after it; lane 0's value is then broadcast. (Without that broadcast, lanes >= 4 of
    a 4-warp block got the identity: the fused QK-norm kernel normalized with rsqrt(0 + eps), measured on the H100
    with tools/qk_fused_diag.py, 2026-11-25.)
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


__all__ = ["WARP", "F32_MAX", "gptr", "fake_ptr", "cu_stream", "warp_reduce", "warp_reduce_sum", "warp_reduce_max",
           "block_reduce", "block_reduce_sum", "block_reduce_max", "rel_err", "f16_ulp_distance"]


# ---------------------------------------------------------------------------------------------- host helpers
def rel_err(y, ref) -> float:
    """max|y - ref| / max(max|ref|, tiny), in float64 (the figure every kernel test reports)."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if y.shape != ref.shape:
        raise ValueError(f"shape mismatch {y.shape} vs {ref.shape}")
    if y.size == 0:
        return 0.0
    return float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def f16_ulp_distance(a, b):
    """Elementwise distance in fp16 ulps between ``a`` and ``b`` rounded to fp16 (int64 array): the bit patterns
    mapped to a monotonic integer line (-0 and +0 coincide), then subtracted."""
    import numpy as np

    def ordinal(x):
        u = np.asarray(x, np.float16).view(np.uint16).astype(np.int64)
        return np.where(u & 0x8000, -(u & 0x7FFF), u)

    return np.abs(ordinal(a) - ordinal(b))
