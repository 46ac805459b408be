"""The tensor-core rate a kernel of the SM120 feature set can reach: warps that do nothing but chains of ``mma.sync``
on register operands, so the prefill GEMM (kernels/quant_gemm.py, int8 ``m16n8k32``) and the flash prefill attention
(kernels/attention_prefill.py, f16 ``m16n8k16``, f32 accumulate) can report their TFLOP/s as a % of what this GPU
gives ``mma.sync`` (microbench ``--mma-peak``, ``--prefill-gemm``). A datasheet figure would not do: on sm_90a the
datasheet peak is WGMMA's, which the SM120 family does not have.

    kind "s8":  D = A(16x32 s8) * B(32x8 s8) + D, int32    (mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32)
    kind "f16": D = A(16x16 f16) * B(16x8 f16) + D, f32     (mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32)

Each thread keeps ``CHAINS`` independent accumulators (enough in flight to cover the MMA latency) and runs ``iters``
rounds of one MMA per chain. The A and B registers are hashes of the thread and chain (runtime values, so nothing
folds); the loop-carried accumulators keep every MMA live, and each thread writes the sum of its accumulators so
the result is observable: tests/kernels/test_mma_peak.py checks it against a numpy model of the fragment layouts
(the layouts kernels/common.py documents), which proves the timed instructions are the ones described.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, Uint32, const_expr

from .common import fake_ptr, gptr, mma_f16_m16n8k16, mma_s8_m16n8k32
from .compile import compile_options, kernel_cache
from .registry import register

KINDS = ("s8", "f16")
THREADS = 128
CHAINS = 8
HASH_THREAD = 0x9E3779B1
HASH_REG = 0x7F4A7C15
# flops of one warp-wide MMA: 2 * M * N * K
FLOPS_PER_MMA = {"s8": 2 * 16 * 8 * 32, "f16": 2 * 16 * 8 * 16}


def register_word(kind: str, thread, chain: int, reg: int):
    """The A/B register ``reg`` (a0..a3 = 0..3, b0, b1 = 4, 5) of ``thread`` for ``chain``: four s8 in 0..15 (s8), or
    two f16 in {1, 1.25, 1.5, 1.75} (f16), so every product and sum of the test's few rounds is exact. Works on a
    numpy uint32 array (the test's model) and on a device Uint32 alike."""
    u = (lambda v: np.uint32(v)) if isinstance(thread, np.ndarray) else Uint32
    h = thread * u(HASH_THREAD) + u(((chain * 6 + reg + 1) * HASH_REG) & 0xFFFFFFFF)  # both wrap mod 2^32
    if kind == "s8":
        return (h >> u(4)) & u(0x0F0F0F0F)
    return u(0x3C003C00) | ((h >> u(5)) & u(0x03000300))


class MmaPeak:
    """Static config: ``kind`` ("s8" or "f16"). The grid (CTAs of ``THREADS``) and ``iters`` are runtime."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind

    @cute.jit
    def __call__(self, pOut: cute.Pointer, n_ctas: Int32, iters: Int32, stream: cuda.CUstream):
        self.kernel(pOut, iters).launch(grid=[n_ctas, 1, 1], block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, pOut: cute.Pointer, iters: Int32):
        tid = cute.arch.thread_idx()[0]
        bx = cute.arch.block_idx()[0]
        gtid = bx * THREADS + tid
        thread = Uint32(gtid)
        regs = [[register_word(self.kind, thread, c, r) for r in range(6)] for c in range(CHAINS)]
        acc_type = Int32 if const_expr(self.kind == "s8") else Float32
        acc = cute.make_rmem_tensor((CHAINS * 4,), acc_type)
        for i in cutlass.range_constexpr(CHAINS * 4):
            acc[i] = acc_type(0)
        for _ in cutlass.range(iters, unroll=1):
            for c in cutlass.range_constexpr(CHAINS):
                a = regs[c]
                if const_expr(self.kind == "s8"):
                    d = mma_s8_m16n8k32(a[0], a[1], a[2], a[3], a[4], a[5], acc[4 * c], acc[4 * c + 1],
                                        acc[4 * c + 2], acc[4 * c + 3])
                else:
                    d = mma_f16_m16n8k16(a[0], a[1], a[2], a[3], a[4], a[5], acc[4 * c], acc[4 * c + 1],
                                         acc[4 * c + 2], acc[4 * c + 3])
                for j in cutlass.range_constexpr(4):
                    acc[4 * c + j] = d[j]
        total = Float32(0.0)
        for i in cutlass.range_constexpr(CHAINS * 4):
            total = total + Float32(acc[i])
        out = cute.make_tensor(pOut, cute.make_layout(gtid + 1))
        out[gtid] = total


@kernel_cache
def compile_mma_peak(kind: str):
    return cute.compile(MmaPeak(kind), fake_ptr(Float32, 4), Int32(1), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


def mma_peak(kind: str, n_ctas: int, iters: int, *, out=None, stream=None):
    """Launch ``n_ctas`` CTAs of ``THREADS`` threads, each running ``iters`` rounds of ``CHAINS`` MMAs; returns the
    float32 ``[n_ctas * THREADS]`` per-thread sums (a DeviceArray; ``out`` if given). The flops of one launch:
    :func:`launch_flops`."""
    from ..runtime import DeviceArray, resolve_stream

    if n_ctas < 1 or iters < 0:
        raise ValueError(f"need n_ctas >= 1 and iters >= 0 (got {n_ctas}, {iters})")
    y = out if out is not None else DeviceArray.empty((n_ctas * THREADS,), np.float32)
    if y.size < n_ctas * THREADS:
        raise ValueError(f"out holds {y.size} floats, the launch writes {n_ctas * THREADS}")
    compile_mma_peak(kind)(gptr(Float32, y.ptr, 4), Int32(n_ctas), Int32(iters), resolve_stream(stream).cu)
    return y


def launch_flops(kind: str, n_ctas: int, iters: int) -> float:
    return float(FLOPS_PER_MMA[kind]) * CHAINS * iters * n_ctas * (THREADS // 32)


def reference_sums(kind: str, n_ctas: int, iters: int) -> np.ndarray:
    """float64 model of :func:`mma_peak`'s output from the fragment layouts (kernels/common.py): per warp and chain,
    the A (16 x K) and B (K x 8) matrices the lanes' registers form, D = iters * A @ B, and each thread's sum of the
    four D elements it holds, over its chains."""
    n = n_ctas * THREADS
    thread = np.arange(n, dtype=np.uint32)
    lane = thread % 32
    g, t = lane // 4, lane % 4
    K = 32 if kind == "s8" else 16
    per = 4 if kind == "s8" else 2  # values per 32-bit register
    total = np.zeros(n)
    warps = n // 32
    for c in range(CHAINS):
        words = [register_word(kind, thread, c, r) for r in range(6)]
        if kind == "s8":
            vals = [np.stack([(w >> (8 * i)) & 0xFF for i in range(4)], -1).astype(np.float64) for w in words]
        else:
            vals = [np.stack([(w >> (16 * i)) & 0xFFFF for i in range(2)], -1).astype(np.uint16).view(np.float16)
                    .astype(np.float64) for w in words]
        A = np.zeros((warps, 16, K))
        B = np.zeros((warps, K, 8))
        w_of = thread // 32
        half = K // 2  # a2/a3 and b1 hold the upper half of k
        for r, (row_off, k_off) in enumerate(((0, 0), (8, 0), (0, half), (8, half))):
            for i in range(per):
                A[w_of, g + row_off, k_off + per * t + i] = vals[r][:, i]
        for r, k_off in ((4, 0), (5, half)):
            for i in range(per):
                B[w_of, k_off + per * t + i, g] = vals[r][:, i]
        D = iters * np.einsum("wmk,wkn->wmn", A, B)
        total += D[w_of, g, 2 * t] + D[w_of, g, 2 * t + 1] + D[w_of, g + 8, 2 * t] + D[w_of, g + 8, 2 * t + 1]
    return total


register("mma_peak", compile_mma_peak, [dict(kind="s8"), dict(kind="f16")])
