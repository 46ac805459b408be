"""Quantize f32 activations to q8_1-style int8 blocks of 32 (for the dp4a GEMV / MoE paths, quant_dot.py).

For every block of 32 consecutive elements of a row: ``d = amax / 127`` (f32), ``q = rint(x / d)`` (int8, |q| <=
127; q = 0 and d = 0 for an all-zero block), ``s = d * sum(q)`` (f32; the K-quants' min term needs the sum of the
*quantized* block so that the dp4a GEMV equals an exact GEMV against ``deq(q8(x)) = d*q``).

Layout (three separate, 16-byte-aligned arrays; unlike llama.cpp's interleaved ``block_q8_1`` so that the int8 data
can be read with 128-bit loads): ``qs`` int8 [rows, n], ``d`` f32 [rows, n/32], ``s`` f32 [rows, n/32].

Elementwise error: |x - d*q| <= d/2 (+ the f32 rounding of x/d, <= 127 * 2^-24 * d), the bound the dp4a tests use.

One warp per block, one element per lane: warp max of |x|, warp sum of q (exact in f32: |sum| <= 32*127).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, cute
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from .arch import pdl_enabled
from .common import WarpRowKernel, aligned, gptr, pdl_prologue, warp_reduce_max, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .quant_decode import QK8_1
from .registry import register

WARPS = WarpRowKernel.WARPS


@dsl_user_op
def rint_s32(x, *, loc=None, ip=None) -> Int32:
    """Round to nearest (ties to even) f32 -> s32."""
    return Int32(llvm.inline_asm(Int32.mlir_type, [Float32(x).ir_value(loc=loc, ip=ip)], "cvt.rni.s32.f32 $0, $1;",
                                 "=r,f", loc=loc, ip=ip))


class QuantizeQ8_1(WarpRowKernel):
    """One warp per q8_1 block of 32 elements (the "rows" of :class:`WarpRowKernel`), one element per lane."""

    def __init__(self, n: int):
        super().__init__()
        assert n % QK8_1 == 0, f"row length {n} must be a multiple of {QK8_1}"
        self.n = n

    @cute.jit
    def __call__(self, pX: cute.Pointer, pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, rows: Int32,
                 stream: cuda.CUstream):
        n_blocks = rows * (self.n // QK8_1)
        self.launch_rows(self.kernel(pX, pQ, pD, pS, n_blocks), n_blocks, WARPS, 1, stream)

    @cute.kernel
    def kernel(self, pX: cute.Pointer, pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, n_blocks: Int32):
        pdl_prologue(self.pdl)
        _, bx, _, warp, lane = self.thread_coords()
        b = bx * WARPS + warp
        if b < n_blocks:
            mX = cute.make_tensor(pX, cute.make_layout(n_blocks * QK8_1))
            mQ = cute.make_tensor(pQ, cute.make_layout(n_blocks * QK8_1))
            mD = cute.make_tensor(pD, cute.make_layout(n_blocks))
            mS = cute.make_tensor(pS, cute.make_layout(n_blocks))
            quantize_block_warp(mX[b * QK8_1 + lane], b, lane, mQ, mD, mS)


@cute.jit
def quantize_block_warp(x: Float32, block: Int32, lane: Int32, mQ: cute.Tensor, mD: cute.Tensor, mS: cute.Tensor):
    """q8_1 block ``block`` from the 32 lanes of a warp, lane i holding element i (``x``): writes
    ``mQ[block*32 + lane]`` and, from lane 0, ``mD[block]``, ``mS[block]`` (flat tensors). The one definition of the
    rounding: kernels that quantize their own output (attention_decode.py ``quantize_out``) call it too, so their q8_1
    copy has the bits :class:`QuantizeQ8_1` would give. All 32 lanes must call it (warp shuffles)."""
    amax = warp_reduce_max(cute.math.absf(x), small_offsets_first=True)
    d = amax / Float32(127.0)
    q = Int32(0)
    if amax > Float32(0.0):
        q = rint_s32(x / d)
    mQ[block * QK8_1 + lane] = Int8(q)
    qs = warp_reduce_sum(Float32(q), small_offsets_first=True)
    if lane == 0:
        mD[block] = d
        mS[block] = d * qs


@cute.jit
def quantize_block_when_complete(pX: cute.Pointer, pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer,
                                 pCnt: cute.Pointer, block: Int32, arrivals: cutlass.Constexpr[int], warp: Int32,
                                 lane: Int32):
    """For a kernel whose CTAs each write part of an f32 vector and that should also leave its q8_1 copy (the
    input of the next int8 matmul) without a quantize launch: call it once per CTA, by every thread, after the
    CTA's stores into q8_1 block ``block`` of ``pX``. The ``arrivals``-th CTA to finish that block (an int32
    counter per block in ``pCnt``, zero before the launch) quantizes it with :func:`quantize_block_warp` (warp 0)
    and puts the counter back to zero for the next launch / graph replay.

    Release/acquire as in attention_decode.py's fused combine (the cooperative-groups grid-sync pattern): the
    barrier orders the CTA's stores before lane 0's GPU-scope fence + acq_rel atomic; the last CTA fences before it
    reads the block through L2 (``ld.global.cg``: other CTAs wrote it). No CTA waits for another: deadlock-free
    under any residency. Uses no shared memory (the arrival count is broadcast with a warp shuffle)."""
    cute.arch.sync_threads()
    if warp == 0:
        seen = Int32(0)
        if lane == 0:
            cute.arch.fence_acq_rel_gpu()
            seen = cute.arch.atomic_add((pCnt + block).llvm_ptr, Int32(1), sem="acq_rel", scope="gpu")
        seen = cute.arch.shuffle_sync(seen, 0)
        # bar.warp.sync orders memory among the warp (a shuffle alone does not, in the PTX memory model), so lanes
        # 1-31 are ordered after lane 0's acquire before their fence and the block reads
        cute.arch.sync_warp()
        if seen == arrivals - 1:
            cute.arch.fence_acq_rel_gpu()
            x = cute.arch.load((pX + block * QK8_1 + lane).llvm_ptr, Float32, cop="cg")
            quantize_block_warp(x, block, lane, cute.make_tensor(pQ, cute.make_layout((block + 1) * QK8_1)),
                                cute.make_tensor(pD, cute.make_layout(block + 1)),
                                cute.make_tensor(pS, cute.make_layout(block + 1)))
            if lane == 0:
                cnt = cute.make_tensor(pCnt, cute.make_layout(block + 1))
                cnt[block] = Int32(0)


class RmsNormQ8_1:
    """Fused ``[s = x + r;] h = rmsnorm(s) * w`` -> h (f32) AND its q8_1 quantization (qs, d, s), one row per CTA.

    Same semantics and summation structure as rmsnorm.py (``residual=True``: ``s`` written to ``residual_out``, which
    may alias ``r``; h = (s * rstd) * w, ggml order; rstd = rsqrt(mean(s^2) + eps)); then the q8_1 rules of this
    module applied to the f32 h. A thread owns 8 consecutive elements (two 16-byte vectors), so a q8_1 block of 32 is
    4 neighbouring lanes: amax and sum(q) are 2-step shuffle butterflies. Saves the separate quantize launch that
    the dp4a GEMVs would need after every norm."""

    EPT = 8  # elements per thread

    def __init__(self, N: int, residual: bool = False, has_weight: bool = True):
        self.pdl = pdl_enabled()

        assert N % QK8_1 == 0, f"row length {N} must be a multiple of {QK8_1}"
        self.N, self.residual, self.has_weight = N, residual, has_weight
        self.active = N // self.EPT
        self.threads = -(-self.active // 32) * 32
        assert self.threads <= 1024
        self.warps = self.threads // 32

    @cute.jit
    def __call__(self, pX: cute.Pointer, pR: cute.Pointer, pRO: cute.Pointer, pW: cute.Pointer, pH: cute.Pointer,
                 pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, M: Int32, eps: Float32, stream: cuda.CUstream):
        self.kernel(pX, pR, pRO, pW, pH, pQ, pD, pS, eps).launch(
            grid=[M, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pX: cute.Pointer, pR: cute.Pointer, pRO: cute.Pointer, pW: cute.Pointer, pH: cute.Pointer,
               pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, eps: Float32):
        pdl_prologue(self.pdl)
        N, E = self.N, self.EPT
        tid = cute.arch.thread_idx()[0]
        row = cute.arch.block_idx()[0]
        warp, lane = tid // 32, tid % 32
        smem = cutlass.memory.SmemAllocator()
        red = smem.allocate_tensor(Float32, cute.make_layout(self.warps), byte_alignment=16)
        v = cute.make_rmem_tensor((E,), Float32)
        tmp = cute.make_rmem_tensor((E,), Float32)
        ss = Float32(0.0)
        e0 = row * N + tid * E
        if tid < self.active:
            cute.autovec_copy(cute.make_tensor(pX + cute.assume(e0, divby=E), cute.make_layout(E)), v)
            if cutlass.const_expr(self.residual):
                cute.autovec_copy(cute.make_tensor(pR + cute.assume(e0, divby=E), cute.make_layout(E)), tmp)
                for i in cutlass.range_constexpr(E):
                    v[i] = v[i] + tmp[i]
                cute.autovec_copy(v, cute.make_tensor(pRO + cute.assume(e0, divby=E), cute.make_layout(E)))
            for i in cutlass.range_constexpr(E):
                ss = ss + v[i] * v[i]
        ss = warp_reduce_sum(ss, small_offsets_first=True)
        if lane == 0:
            red[warp] = ss
        cute.arch.barrier()
        tot = Float32(0.0)
        for i in cutlass.range_constexpr(self.warps):
            tot = tot + red[i]
        rstd = cute.math.rsqrt(tot / Float32(N) + eps)
        if tid < self.active:
            if cutlass.const_expr(self.has_weight):
                cute.autovec_copy(cute.make_tensor(pW + cute.assume(tid * E, divby=E), cute.make_layout(E)), tmp)
            for i in cutlass.range_constexpr(E):
                h = v[i] * rstd
                if cutlass.const_expr(self.has_weight):
                    h = h * tmp[i]
                v[i] = h
            cute.autovec_copy(v, cute.make_tensor(pH + cute.assume(e0, divby=E), cute.make_layout(E)))
        store_q8_1_of_eight(v, tid < self.active, tid, e0, pQ, pD, pS)


@cute.jit
def store_q8_1_of_eight(v: cute.Tensor, active, tid: Int32, e0: Int32, pQ: cute.Pointer, pD: cute.Pointer,
                        pS: cute.Pointer):
    """The q8_1 copy of a row held 8 consecutive f32 per thread (``v``: elements ``e0 .. e0+7`` of the flat buffer,
    ``e0 = 8 * tid`` within a row of a multiple of 32): a q8_1 block of 32 is 4 neighbouring lanes, so amax and
    sum(q) are 2-step shuffle butterflies. All lanes of the warp call it (shuffles); ``active``: this thread holds
    elements (all 4 lanes of a block alike). Used by :class:`RmsNormQ8_1` and norm_chain.py."""
    E = 8
    amax = Float32(0.0)
    if active:
        for i in cutlass.range_constexpr(E):
            amax = cute.arch.fmax(amax, cute.math.absf(v[i]))
    amax = warp_reduce_max(amax, width=4, small_offsets_first=True)
    d = amax / Float32(127.0)
    qsum = Int32(0)
    if active:
        qv = cute.make_rmem_tensor((E,), Int8)
        for i in cutlass.range_constexpr(E):
            qi = Int32(0)
            if amax > Float32(0.0):
                qi = rint_s32(v[i] / d)
            qv[i] = Int8(qi)
            qsum = qsum + qi
        cute.autovec_copy(qv, cute.make_tensor(pQ + cute.assume(e0, divby=E), cute.make_layout(E)))
    qsum = warp_reduce_sum(qsum, width=4, small_offsets_first=True)
    if active:
        if tid % 4 == 0:
            b = e0 // QK8_1
            mD = cute.make_tensor(pD, cute.make_layout(b + 1))
            mS = cute.make_tensor(pS, cute.make_layout(b + 1))
            mD[b] = d
            mS[b] = d * Float32(qsum)


@kernel_cache
def compile_rmsnorm_q8_1(N: int, residual: bool = False, has_weight: bool = True):
    p = gptr(Float32, 0)
    return cute.compile(RmsNormQ8_1(N, residual, has_weight), p, p, p, p, p, gptr(Int8, 0), p, p, Int32(1),
                        Float32(1e-6), cute.runtime.make_fake_stream(), options=compile_options())


def rmsnorm_q8_1(x, w=None, eps: float = 1e-6, *, residual=None, out=None, residual_out=None, xq: Q8Act | None = None,
                 stream=None):
    """``h = rmsnorm(x [+ residual]) * w`` (f32) and ``q8_1(h)`` in one launch.

    ``residual`` given: ``s = x + residual`` is written to ``residual_out`` (default: ``residual`` itself, in place),
    exactly as kernels/rmsnorm.py's ``rmsnorm_residual``. DeviceArray in -> ``(h, xq)`` or ``(h, s, xq)`` with
    ``xq`` a :class:`Q8Act`; numpy in -> numpy ``(h, (qs, d, s_q))`` / ``(h, s, (qs, d, s_q))``."""
    from ..runtime import DeviceArray, as_device, default_stream

    st = stream if stream is not None else default_stream()
    dx, x_np = as_device(x, st, np.float32)
    N = int(dx.shape[-1])
    M = int(np.prod(dx.shape[:-1])) if len(dx.shape) > 1 else 1
    dw = as_device(w, st, np.float32)[0] if w is not None else None
    dr = as_device(residual, st, np.float32)[0] if residual is not None else None
    ro = residual_out if residual_out is not None else dr
    h = out if out is not None else DeviceArray.empty(dx.shape, np.float32)
    q = xq if xq is not None else Q8Act(M, N)
    fn = compile_rmsnorm_q8_1(N, dr is not None, dw is not None)
    for a in (dx, h, dr, ro, dw):
        if a is not None and a.ptr % 16:
            raise ValueError("rmsnorm_q8_1 needs 16-byte aligned buffers (32-byte loads per thread)")
    fn(gptr(Float32, dx.ptr), gptr(Float32, (dx if dr is None else dr).ptr), gptr(Float32, (dx if ro is None else ro).ptr),
       gptr(Float32, (dx if dw is None else dw).ptr), gptr(Float32, h.ptr), gptr(Int8, q.qs.ptr), gptr(Float32, q.d.ptr),
       gptr(Float32, q.s.ptr), Int32(M), Float32(eps), cuda.CUstream(st.handle))
    if x_np:
        hq = tuple(a.reshape(*dx.shape[:-1], -1) if len(dx.shape) > 1 else a[0] for a in q.to_numpy())
        hn = h.to_numpy(stream=st)
        return (hn, ro.to_numpy(stream=st), hq) if dr is not None else (hn, hq)
    return (h, ro, q) if dr is not None else (h, q)


@kernel_cache
def compile_quantize_q8_1(n: int):
    return cute.compile(QuantizeQ8_1(n), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0),
                        Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


class Q8Act:
    """Device buffers of a q8_1-quantized activation: ``qs`` int8 [rows, n], ``d``/``s`` f32 [rows, n/32]."""

    def __init__(self, rows: int, n: int):
        from ..runtime import DeviceArray

        self.rows, self.n = rows, n
        self.qs = DeviceArray.empty((rows, n), np.int8)
        self.d = DeviceArray.empty((rows, n // QK8_1), np.float32)
        self.s = DeviceArray.empty((rows, n // QK8_1), np.float32)

    def narrow(self, n: int) -> "Q8Act":
        """A Q8Act of ``n`` values per row over the start of this one's buffers (rows packed at the new width): the
        q8_1 input of a layer narrower than the widest (Gemma 4's sliding layers feed a 16 x 256 attention output
        to their O projection, its global layers 16 x 512). No allocation, so a graph capture may call it."""
        if n == self.n:
            return self
        if n % QK8_1 or n > self.n:
            raise ValueError(f"q8_1 view of width {n}: must be a multiple of {QK8_1} and at most {self.n}")
        view = Q8Act.__new__(Q8Act)
        view.rows, view.n = self.rows, n
        view.qs = self.qs.view(np.int8, (self.rows, n))
        view.d = self.d.view(np.float32, (self.rows, n // QK8_1))
        view.s = self.s.view(np.float32, (self.rows, n // QK8_1))
        return view

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
    fn(gptr(Float32, dx.ptr, 4), gptr(Int8, q.qs.ptr), gptr(Float32, q.d.ptr), gptr(Float32, q.s.ptr), Int32(rows),
       cuda.CUstream(st.handle))
    if x_np:
        qs, d, s = q.to_numpy()
        if len(dx.shape) == 1:
            return qs[0], d[0], s[0]
        return qs, d, s
    return q


def as_q8(x, stream):
    """(Q8Act, was numpy): ``x`` as int8 activations, quantized here unless it already is a :class:`Q8Act`."""
    from ..runtime import DeviceArray

    if isinstance(x, Q8Act):
        return x, False
    x_np = not isinstance(x, DeviceArray)
    dx = DeviceArray.from_numpy(np.ascontiguousarray(x, np.float32), stream) if x_np else x
    return quantize_q8_1(dx, stream=stream), x_np


def x_pointers(x) -> tuple:
    """(x f32, xq i8, xd f32, xs f32) launch pointers of an activation that is either f32 (a DeviceArray: the float
    kernels read ``x``) or a :class:`Q8Act` (the dp4a kernels read ``xq``, ``xd``, ``xs``). The pointers a path does
    not read are any valid address."""
    if isinstance(x, Q8Act):
        return gptr(Float32, x.d.ptr), gptr(Int8, x.qs.ptr), gptr(Float32, x.d.ptr), gptr(Float32, x.s.ptr)
    p = aligned(x, "x").ptr
    return gptr(Float32, p), gptr(Int8, p), gptr(Float32, p), gptr(Float32, p)


register("quantize_q8_1", compile_quantize_q8_1, [dict(n=n) for n in (256, 384, 512, 640, 768, 1024, 1536, 2048, 4096)])
register("rmsnorm_q8_1", compile_rmsnorm_q8_1,
         [dict(N=n, residual=r) for n in (2048, 640, 2816, 256, 384, 512) for r in (False, True)])
