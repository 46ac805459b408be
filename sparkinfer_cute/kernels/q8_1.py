"""Quantize f32 activations to q8_1-style int8 blocks of 32 (for the dp4a GEMV, gemv_q8.py).

For every block of 32 consecutive elements of a row: ``d = amax / 127`` (f32), ``q = rint(x / d)`` (int8, |q| <=
127; q = 0 and d = 0 for an all-zero block), ``s = d * sum(q)`` (f32; the K-quants' min term needs the sum of the
*quantized* block so that the dp4a GEMV equals an exact GEMV against ``deq(q8(x)) = d*q``).

Layout (three separate, 16-byte-aligned arrays; unlike llama.cpp's interleaved ``block_q8_1`` so that the int8 data
can be read with 128-bit loads): ``qs`` int8 [rows, n], ``d`` f32 [rows, n/32], ``s`` f32 [rows, n/32].

Elementwise error: |x - d*q| <= d/2 (+ the f32 rounding of x/d, <= 127 * 2^-24 * d), the bound gemv_q8 tests use.

One warp per block, one element per lane: warp max of |x|, warp sum of q (exact in f32: |sum| <= 32*127).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import numpy as np
from cutlass import Float32, Int8, Int32, cute
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from .compile import kernel_cache
from .quant_decode import kernel_options

QK = 32
WARPS = 4


@dsl_user_op
def rint_s32(x, *, loc=None, ip=None) -> Int32:
    """Round to nearest (ties to even) f32 -> s32."""
    return Int32(llvm.inline_asm(Int32.mlir_type, [Float32(x).ir_value(loc=loc, ip=ip)], "cvt.rni.s32.f32 $0, $1;",
                                 "=r,f", loc=loc, ip=ip))


def _warp_max(v):
    for i in range(5):
        v = cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=1 << i))
    return v


def _warp_sum(v):
    for i in range(5):
        v = v + cute.arch.shuffle_sync_bfly(v, offset=1 << i)
    return v


class QuantizeQ8_1:
    def __init__(self, n: int):
        assert n % QK == 0, f"row length {n} must be a multiple of {QK}"
        self.n = n

    @cute.jit
    def __call__(self, pX: cute.Pointer, pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, rows: Int32,
                 stream: cuda.CUstream):
        n_blocks = rows * (self.n // QK)
        self.kernel(pX, pQ, pD, pS, n_blocks).launch(
            grid=[cute.ceil_div(n_blocks, WARPS), 1, 1], block=[WARPS * 32, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, pX: cute.Pointer, pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, n_blocks: Int32):
        tid = cute.arch.thread_idx()[0]
        bx = cute.arch.block_idx()[0]
        warp, lane = tid // 32, tid % 32
        b = bx * WARPS + warp
        if b < n_blocks:
            mX = cute.make_tensor(pX, cute.make_layout(n_blocks * QK))
            mQ = cute.make_tensor(pQ, cute.make_layout(n_blocks * QK))
            mD = cute.make_tensor(pD, cute.make_layout(n_blocks))
            mS = cute.make_tensor(pS, cute.make_layout(n_blocks))
            x = mX[b * QK + lane]
            amax = _warp_max(cute.math.absf(x))
            d = amax / Float32(127.0)
            q = Int32(0)
            if amax > Float32(0.0):
                q = rint_s32(x / d)
            mQ[b * QK + lane] = Int8(q)
            qs = _warp_sum(Float32(q))
            if lane == 0:
                mD[b] = d
                mS[b] = d * qs


def _ptr(dtype, addr, align=16):
    return cute.runtime.make_ptr(dtype, addr, cute.AddressSpace.gmem, assumed_align=align)


@kernel_cache
def compile_quantize_q8_1(n: int):
    return cute.compile(QuantizeQ8_1(n), _ptr(Float32, 0), _ptr(Int8, 0), _ptr(Float32, 0), _ptr(Float32, 0),
                        Int32(1), cute.runtime.make_fake_stream(), options=kernel_options())


class Q8Act:
    """Device buffers of a q8_1-quantized activation: ``qs`` int8 [rows, n], ``d``/``s`` f32 [rows, n/32]."""

    def __init__(self, rows: int, n: int):
        from ..runtime import DeviceArray

        self.rows, self.n = rows, n
        self.qs = DeviceArray.empty((rows, n), np.int8)
        self.d = DeviceArray.empty((rows, n // QK), np.float32)
        self.s = DeviceArray.empty((rows, n // QK), np.float32)

    def to_numpy(self):
        return self.qs.to_numpy(), self.d.to_numpy(), self.s.to_numpy()


def quantize_q8_1(x, out: Q8Act | None = None, stream=None):
    """Quantize f32 ``x`` ([rows, n] or [n], numpy or DeviceArray). numpy in -> (qs, d, s) numpy arrays;
    DeviceArray in -> a :class:`Q8Act` (``out`` if given)."""
    from ..runtime import as_device, default_stream

    st = stream if stream is not None else default_stream()
    dx, x_np = as_device(x, st, np.float32)
    n = int(dx.shape[-1])
    rows = int(np.prod(dx.shape[:-1])) if len(dx.shape) > 1 else 1
    q = out if out is not None else Q8Act(rows, n)
    fn = compile_quantize_q8_1(n)
    fn(_ptr(Float32, dx.ptr, 4), _ptr(Int8, q.qs.ptr), _ptr(Float32, q.d.ptr), _ptr(Float32, q.s.ptr), Int32(rows),
       cuda.CUstream(st.handle))
    if x_np:
        qs, d, s = q.to_numpy()
        if len(dx.shape) == 1:
            return qs[0], d[0], s[0]
        return qs, d, s
    return q


def quantize_q8_1_ref(x: np.ndarray):
    """numpy reference (f32 arithmetic like the kernel): returns (qs int8, d f32, s f32)."""
    x = np.asarray(x, dtype=np.float32)
    xb = x.reshape(*x.shape[:-1], -1, QK)
    amax = np.abs(xb).max(-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[..., None] > 0, np.rint(xb / d[..., None]), 0).astype(np.int8)
    s = (d * q.astype(np.float32).sum(-1)).astype(np.float32)
    return q.reshape(x.shape), d, s


def dequantize_q8_1(qs, d) -> np.ndarray:
    qs = np.asarray(qs, dtype=np.float64)
    return (qs.reshape(*qs.shape[:-1], -1, QK) * np.asarray(d, np.float64)[..., None]).reshape(qs.shape)


def _register():
    try:
        from .registry import register
    except ImportError:
        return
    register("quantize_q8_1", compile_quantize_q8_1,
             [dict(n=n) for n in (256, 384, 512, 640, 768, 1024, 1536, 2048, 4096)])


_register()
