"""RMSNorm over rows of length N (f32 in/out, f32 weight), with a fused residual-add variant and a weightless one.

``out = x / sqrt(mean(x²) + eps) * w`` (ggml ``rms_norm`` + ``mul``; models.md "RMSNorm"). Variants (static config):

- ``residual=True``: ``s = x + r`` is written to ``residual_out`` (may alias ``r``: every element is read and
  written by the same thread) and ``out = rmsnorm(s) * w``: the "add the sublayer output to the residual stream,
  then normalize for the next sublayer" step, one pass over memory.
- ``has_weight=False``: no weight multiply (Gemma 4's V-norm and router-input norm).
- Per-head norms (Q/K norms: rows = heads of ``head_dim``, one shared ``{head_dim}`` weight) are the same kernel
  with ``M = n_heads, N = head_dim``: :func:`rmsnorm_per_head`.

Layout: a row is handled by ``tpr`` threads (a power of two, 32..256, chosen so each thread holds at most 4 float4
vectors); small rows are packed ``128 // tpr`` per block. Every thread loads its float4 vectors (16-byte
``ld.global.v4``: N % 4 == 0 and 16-byte aligned rows) into registers once, the sum of squares is reduced with a
shuffle butterfly (no f32 ``redux`` on SM120) and, when a row spans several warps, a fixed-order sum of the
per-warp partials in smem (deterministic, identical in every thread), then the registers are scaled and stored.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, const_expr

from .common import fake_ptr, gptr, warp_reduce_sum, pdl_prologue
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

VEC = 4  # f32 per 16-byte vector


def _pow2_ceil(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


class RMSNorm:
    """Static config: row length ``N`` (multiple of 4), ``residual``, ``has_weight``."""

    def __init__(self, N: int, residual: bool = False, has_weight: bool = True):
        self.pdl = pdl_enabled()
        if N % VEC:
            raise ValueError(f"RMSNorm needs N % {VEC} == 0, got {N}")
        self.N = N
        self.residual = residual
        self.has_weight = has_weight
        self.vecs = N // VEC
        self.tpr = min(256, max(32, _pow2_ceil(-(-self.vecs // 4))))  # threads per row, <= 4 vectors per thread
        self.vpt = -(-self.vecs // self.tpr)  # vectors per thread
        self.full = self.vecs % self.tpr == 0  # every thread's vectors are in range: no bounds checks
        self.rows_per_block = max(1, 128 // self.tpr)
        self.threads = self.tpr * self.rows_per_block
        self.warps_per_row = self.tpr // 32

    @cute.jit
    def __call__(self, pX: cute.Pointer, pR: cute.Pointer, pRO: cute.Pointer, pW: cute.Pointer,
                 pO: cute.Pointer, M: Int32, eps: Float32, stream: cuda.CUstream):
        layout = cute.make_layout((M, self.N), stride=(self.N, 1))
        mX = cute.make_tensor(pX, layout)
        mR = cute.make_tensor(pR, layout)
        mRO = cute.make_tensor(pRO, layout)
        mO = cute.make_tensor(pO, layout)
        mW = cute.make_tensor(pW, cute.make_layout(self.N))
        self.kernel(mX, mR, mRO, mW, mO, M, eps).launch(use_pdl=self.pdl, 
            grid=[(M + self.rows_per_block - 1) // self.rows_per_block, 1, 1], block=[self.threads, 1, 1],
            stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mR: cute.Tensor, mRO: cute.Tensor, mW: cute.Tensor, mO: cute.Tensor,
               M: Int32, eps: Float32):
        pdl_prologue(self.pdl)
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        row_in_block = tid // self.tpr
        t = tid % self.tpr
        row = bid * self.rows_per_block + row_in_block
        smem = cutlass.memory.SmemAllocator()
        red = smem.allocate_tensor(Float32, cute.make_layout((self.rows_per_block, self.warps_per_row)),
                                   byte_alignment=16)
        vals = cute.make_rmem_tensor(cute.make_layout((VEC, self.vpt)), Float32)
        tmp = cute.make_rmem_tensor(cute.make_layout(VEC), Float32)
        ss = Float32(0.0)
        if row < M:
            gX = cute.zipped_divide(mX[row, None], (VEC,))
            gR = cute.zipped_divide(mR[row, None], (VEC,))
            gRO = cute.zipped_divide(mRO[row, None], (VEC,))
            for k in cutlass.range_constexpr(self.vpt):
                v = t + k * self.tpr
                if const_expr(self.full) or v < self.vecs:
                    cute.autovec_copy(gX[None, v], vals[None, k])
                    if const_expr(self.residual):
                        cute.autovec_copy(gR[None, v], tmp)
                        s = vals[None, k].load() + tmp.load()
                        vals[None, k].store(s)
                        cute.autovec_copy(vals[None, k], gRO[None, v])
                    x = vals[None, k].load()
                    ss += (x * x).reduce(cute.ReductionOp.ADD, init_val=Float32(0.0), reduction_profile=0)
        ss = warp_reduce_sum(ss)
        if const_expr(self.warps_per_row > 1):
            if tid % 32 == 0:
                red[row_in_block, t // 32] = ss
            cute.arch.barrier()
            ss = Float32(0.0)
            for i in cutlass.range_constexpr(self.warps_per_row):
                ss += red[row_in_block, i]
        rstd = cute.math.rsqrt(ss / Float32(self.N) + eps)
        if row < M:
            gO = cute.zipped_divide(mO[row, None], (VEC,))
            gW = cute.zipped_divide(mW, (VEC,))
            for k in cutlass.range_constexpr(self.vpt):
                v = t + k * self.tpr
                if const_expr(self.full) or v < self.vecs:
                    y = vals[None, k].load() * rstd  # ggml order: (x * scale) * w
                    if const_expr(self.has_weight):
                        cute.autovec_copy(gW[None, v], tmp)
                        y = y * tmp.load()
                    tmp.store(y)
                    cute.autovec_copy(tmp, gO[None, v])


@kernel_cache
def compile_rmsnorm(N: int, residual: bool = False, has_weight: bool = True):
    p = fake_ptr(Float32)
    return cute.compile(RMSNorm(N, residual, has_weight), p, p, p, p, p, Int32(1), Float32(1e-6),
                        cute.runtime.make_fake_stream(), options=compile_options())


# ------------------------------------------------------------------------------------------------ wrappers
def _launch(x, r, r_out, w, out, M: int, N: int, eps: float, residual: bool, stream):
    from ..runtime import resolve_stream

    fn = compile_rmsnorm(N, residual, w is not None)
    wp = (w if w is not None else x).ptr
    fn(gptr(Float32, x.ptr), gptr(Float32, r.ptr), gptr(Float32, r_out.ptr), gptr(Float32, wp),
       gptr(Float32, out.ptr), Int32(M), Float32(eps), resolve_stream(stream).cu)


def _prep(x, w, stream):
    from ..runtime import as_device

    xd, was_np = as_device(x, stream, np.float32)
    N = xd.shape[-1]
    M = xd.size // N if N else 0
    wd = None
    if w is not None:
        wd, _ = as_device(w, stream, np.float32)
        if wd.size != N:
            raise ValueError(f"weight has {wd.size} elements, rows have {N}")
    return xd, wd, was_np, M, N


def rmsnorm(x, w=None, eps: float = 1e-6, *, out=None, stream=None):
    """``x / sqrt(mean(x², -1) + eps) * w`` over the last axis (f32). ``w=None``: no weight.
    numpy in -> numpy out; DeviceArray in -> DeviceArray out (``out`` may be ``x`` for in place)."""
    from ..runtime import DeviceArray

    xd, wd, was_np, M, N = _prep(x, w, stream)
    o = out if out is not None else DeviceArray.empty(xd.shape, np.float32)
    if M:
        _launch(xd, xd, xd, wd, o, M, N, eps, False, stream)
    return o.to_numpy(stream) if was_np else o


def rmsnorm_per_head(x, w=None, eps: float = 1e-6, *, head_dim: int | None = None, out=None, stream=None):
    """Per-head RMSNorm (Q/K norms): ``x`` is ``[..., n_heads, head_dim]`` (or flat with ``head_dim`` given);
    ``w`` is the shared ``{head_dim}`` weight. Same kernel as :func:`rmsnorm` with rows = heads."""
    if head_dim is not None and x.shape[-1] != head_dim:
        x = x.reshape(-1, head_dim)
        if out is not None:
            out = out.reshape(-1, head_dim)
    return rmsnorm(x, w, eps, out=out, stream=stream)


def rmsnorm_residual(x, residual, w=None, eps: float = 1e-6, *, out=None, residual_out=None, stream=None):
    """``s = x + residual``; returns ``(rmsnorm(s) * w, s)``. For DeviceArrays ``s`` is written into
    ``residual_out`` (default: ``residual`` itself, in place); numpy in -> numpy out."""
    from ..runtime import DeviceArray, as_device

    xd, wd, was_np, M, N = _prep(x, w, stream)
    rd, r_np = as_device(residual, stream, np.float32)
    if rd.shape != xd.shape:
        raise ValueError(f"residual shape {rd.shape} != x shape {xd.shape}")
    ro = residual_out if residual_out is not None else rd
    o = out if out is not None else DeviceArray.empty(xd.shape, np.float32)
    if M:
        _launch(xd, rd, ro, wd, o, M, N, eps, True, stream)
    if was_np or r_np:
        return o.to_numpy(stream), ro.to_numpy(stream)
    return o, ro


# ------------------------------------------------------------------------------------------------ registration
def _launch_example(N: int, residual: bool = False, has_weight: bool = True):
    from ..runtime import DeviceArray, default_stream

    x = DeviceArray.zeros((1, N), np.float32)
    w = DeviceArray.zeros((N,), np.float32)
    o = DeviceArray.empty((1, N), np.float32)
    s = default_stream()
    fn = compile_rmsnorm(N, residual, has_weight)

    def launch():
        fn(gptr(Float32, x.ptr), gptr(Float32, x.ptr), gptr(Float32, x.ptr), gptr(Float32, w.ptr),
           gptr(Float32, o.ptr), Int32(1), Float32(1e-6), s.cu)

    return launch


register("rmsnorm", compile_rmsnorm, [
    dict(N=2048, residual=False), dict(N=2048, residual=True),      # Qwen3-30B-A3B n_embd
    dict(N=640, residual=False), dict(N=640, residual=True),        # Gemma 3 270M n_embd
    dict(N=2816, residual=False), dict(N=2816, residual=True),      # Gemma 4 26B-A4B n_embd
    dict(N=2816, has_weight=False),                                 # Gemma 4 router input norm
    dict(N=128), dict(N=256), dict(N=512),                          # Q/K norms (head_dim 128 / 256 / 512)
    dict(N=256, has_weight=False), dict(N=512, has_weight=False),   # Gemma 4 V-norm
    dict(N=64), dict(N=256, residual=True), dict(N=384, residual=True), dict(N=512, residual=True),  # synthetic
], launch_example=_launch_example)
