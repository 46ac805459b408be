"""Gated linear unit on f32 vectors: ``out = act(gate) * up`` with act = SiLU (SwiGLU) or tanh-GELU (GeGLU).

Used by dense FFNs (Gemma 3: ``gelu_tanh(W_gate h) * (W_up h)``); the MoE path fuses SwiGLU into its GEMV instead.
GELU is the tanh form ggml uses (models.md, Conventions): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), evaluated in
f32 like ggml-cuda (the CPU backend's fp16 table differs by ~1e-3 relative; the reference follows the f32 formula).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, const_expr
from cutlass.cute.runtime import make_fake_stream

from .common import gptr, pdl_prologue
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.79788456080286535587989211986876


class GLU:
    def __init__(self, act: str, threads: int = 256):
        self.pdl = pdl_enabled()
        assert act in ("silu", "gelu_tanh"), act
        self.act = act
        self.threads = threads

    @cute.jit
    def __call__(self, p_gate: cute.Pointer, p_up: cute.Pointer, p_out: cute.Pointer, n: Int32,
                 stream: cuda.CUstream):
        mG = cute.make_tensor(p_gate, cute.make_layout(n))
        mU = cute.make_tensor(p_up, cute.make_layout(n))
        mO = cute.make_tensor(p_out, cute.make_layout(n))
        self.kernel(mG, mU, mO, n).launch(use_pdl=self.pdl, grid=[(n + self.threads - 1) // self.threads, 1, 1],
                                          block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mG: cute.Tensor, mU: cute.Tensor, mO: cute.Tensor, n: Int32):
        pdl_prologue(self.pdl)
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        i = bidx * self.threads + tidx
        if i < n:
            g = mG[i]
            a = Float32(0.0)
            if const_expr(self.act == "silu"):
                a = g / (Float32(1.0) + cute.math.exp(-g))
            else:
                inner = Float32(SQRT_2_OVER_PI) * g * (Float32(1.0) + Float32(GELU_COEF_A) * g * g)
                a = Float32(0.5) * g * (Float32(1.0) + cute.math.tanh(inner))
            mO[i] = a * mU[i]


@kernel_cache
def compile_glu(act: str):
    p = gptr(Float32, 0)
    return cute.compile(GLU(act), p, p, p, Int32(1), make_fake_stream(), options=compile_options())


def glu(gate, up, out=None, *, act: str = "silu", stream=None):
    """out = act(gate) * up, f32 (numpy in -> numpy out)."""
    from ..runtime import DeviceArray, as_device, default_stream

    stream = stream or default_stream()
    g, was_np = as_device(np.asarray(gate, np.float32) if isinstance(gate, np.ndarray) else gate, stream)
    u, _ = as_device(np.asarray(up, np.float32) if isinstance(up, np.ndarray) else up, stream)
    n = int(np.prod(g.shape))
    o = out if out is not None else DeviceArray.empty(g.shape, np.float32)
    compile_glu(act)(gptr(Float32, g.ptr), gptr(Float32, u.ptr), gptr(Float32, o.ptr), Int32(n),
                     cuda.CUstream(stream.handle))
    return o.to_numpy(stream) if was_np else o


register("glu", compile_glu, [dict(act="silu"), dict(act="gelu_tanh")])
