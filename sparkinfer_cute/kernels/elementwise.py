"""Small elementwise kernels of the model forwards: the scaled residual add and the final logit softcap.

    residual_scale:  x[i] = (x[i] + f[i]) * s          (s: one f32 in device memory; Gemma 4's layer_output_scale)
    softcap:         y[i] = c * tanh(y[i] / c)           (Gemma 2/4 final_logit_softcapping)

f32 in and out, 4 elements per thread (16-byte accesses), one launch each; graph-safe (no host reads).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, const_expr

from .arch import pdl_enabled
from .common import fake_ptr, gptr, pdl_prologue
from .compile import compile_options, kernel_cache
from .registry import register

THREADS = 256
OPS = ("residual_scale", "softcap")


class Elementwise:
    def __init__(self, op: str):
        assert op in OPS, op
        self.pdl = pdl_enabled()
        self.op = op

    @cute.jit
    def __call__(self, pX: cute.Pointer, pF: cute.Pointer, pS: cute.Pointer, n: Int32, cap: Float32,
                 stream: cuda.CUstream):
        self.kernel(pX, pF, pS, n, cap).launch(grid=[cute.ceil_div(n, 4 * THREADS), 1, 1], block=[THREADS, 1, 1],
                                               stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pX: cute.Pointer, pF: cute.Pointer, pS: cute.Pointer, n: Int32, cap: Float32):
        pdl_prologue(self.pdl)
        i = (cute.arch.block_idx()[0] * THREADS + cute.arch.thread_idx()[0]) * 4
        if i < n:
            x = cute.make_rmem_tensor((4,), Float32)
            dst = cute.make_tensor(pX + cute.assume(i, divby=4), cute.make_layout(4))
            cute.autovec_copy(dst, x)
            if const_expr(self.op == "residual_scale"):
                f = cute.make_rmem_tensor((4,), Float32)
                cute.autovec_copy(cute.make_tensor(pF + cute.assume(i, divby=4), cute.make_layout(4)), f)
                s = cute.make_tensor(pS, cute.make_layout(1))[0]
                for j in cutlass.range_constexpr(4):
                    x[j] = (x[j] + f[j]) * s
            else:
                inv = Float32(1.0) / cap
                for j in cutlass.range_constexpr(4):
                    x[j] = cap * cute.math.tanh(x[j] * inv)
            cute.autovec_copy(x, dst)


@kernel_cache
def compile_elementwise(op: str):
    return cute.compile(Elementwise(op), fake_ptr(Float32), fake_ptr(Float32), fake_ptr(Float32, 4), Int32(4),
                        Float32(1.0), cute.runtime.make_fake_stream(), options=compile_options())


def _launch(op, x, f, s, cap, stream):
    from ..runtime import resolve_stream

    n = int(np.prod(x.shape))
    if n % 4:
        raise ValueError(f"{op}: length {n} must be a multiple of 4")
    compile_elementwise(op)(gptr(Float32, x.ptr), gptr(Float32, (f if f is not None else x).ptr),
                            gptr(Float32, (s if s is not None else x).ptr, 4), Int32(n), Float32(cap),
                            resolve_stream(stream).cu)
    return x


def residual_scale(x, f, s, *, stream=None):
    """``x = (x + f) * s`` in place (DeviceArrays; ``s`` one f32 on the device)."""
    return _launch("residual_scale", x, f, s, 1.0, stream)


def softcap(y, cap: float, *, stream=None):
    """``y = cap * tanh(y / cap)`` in place (DeviceArray)."""
    return _launch("softcap", y, None, None, cap, stream)


register("elementwise", compile_elementwise, [dict(op=o) for o in OPS])


class GatherScale:
    """``w[j] *= s[ids[j]]`` for the k routed slots (one warp): Gemma 4's per-expert down scale
    (``ffn_down_exps.scale``) folded into the router weights before the expert FFN, which multiplies each expert's
    down output by its weight (llama.cpp ``build_lora_mm_id``'s ``w_s``: the same product, rounded in another order)."""

    def __init__(self, k: int):
        assert 1 <= k <= 32
        self.pdl = pdl_enabled()
        self.k = k

    @cute.jit
    def __call__(self, pW: cute.Pointer, pIds: cute.Pointer, pS: cute.Pointer, stream: cuda.CUstream):
        self.kernel(pW, pIds, pS).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pIds: cute.Pointer, pS: cute.Pointer):
        pdl_prologue(self.pdl)
        j = cute.arch.thread_idx()[0]
        if j < self.k:
            mW = cute.make_tensor(pW, cute.make_layout(self.k))
            mIds = cute.make_tensor(pIds, cute.make_layout(self.k))
            e = mIds[j]
            mS = cute.make_tensor(pS, cute.make_layout(e + 1))
            mW[j] = mW[j] * mS[e]


@kernel_cache
def compile_gather_scale(k: int):
    return cute.compile(GatherScale(k), fake_ptr(Float32, 4), fake_ptr(Int32, 4), fake_ptr(Float32, 4),
                        cute.runtime.make_fake_stream(), options=compile_options())


def gather_scale(w, ids, s, *, stream=None):
    """``w[j] *= s[ids[j]]`` in place (f32 w [k], int32 ids [k], f32 s [n_expert]; DeviceArrays)."""
    from ..runtime import resolve_stream

    k = int(np.prod(w.shape))
    compile_gather_scale(k)(gptr(Float32, w.ptr, 4), gptr(Int32, ids.ptr, 4), gptr(Float32, s.ptr, 4),
                            resolve_stream(stream).cu)
    return w


register("gather_scale", compile_gather_scale, [dict(k=8)])
