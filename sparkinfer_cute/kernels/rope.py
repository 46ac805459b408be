"""RoPE NEOX, in place, on ``x[n_tokens, n_heads, head_dim]`` (f32), positions read from device memory.

For pair ``i < n_rot/2`` of each head (models.md "RoPE NEOX"; ggml ``rotate_pairs(n_dims, n_dims/2)``)::

    theta_i = pos * theta_scale**i / freq_factor[i]        theta_scale = powf(base, -2/n_rot)  (f32, host)
    (x[i], x[i + n_rot/2]) <- (x[i] cos - x[i + n_rot/2] sin,  x[i] sin + x[i + n_rot/2] cos)

and dims ``>= n_rot`` pass through (partial rotary). ``theta_scale**i`` is ``powf`` per pair, as ggml-cuda's
``rope_neox`` does (``theta_base = pos * powf(theta_scale, i0/2)``); the CPU backend's repeated ``theta *=
theta_scale`` agrees to a few ulp. The position is an int32 read FROM DEVICE MEMORY (``pos[token]``), so a CUDA
graph captured once replays correctly for every decode step after the host (or a kernel) updates it.

Mapping: block ``(token, head group)``; thread ``i`` owns pair ``i``: it computes sin/cos once and rotates that
pair in ``HEADS_PER_BLOCK`` heads (trig is shared across heads; the accesses are coalesced over ``i``).

Precision: theta is an f32 product (as in llama.cpp), so its absolute error grows with the position:
|dtheta| <= ~3 ulp(theta) (powf <= 2 ulp + one rounding of the product; /freq_factor adds 0.5 ulp).
sin/cos are the precise (non-approx) libdevice versions with full range reduction.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32, const_expr

from .common import fake_ptr, gptr, pdl_prologue
from ..reference.kernel_refs import theta_scale_f32
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

HEADS_PER_BLOCK = 4


class RopeNeox:
    """Static config: ``head_dim``, ``n_rot`` (even, <= head_dim), ``has_freq_factors``."""

    def __init__(self, head_dim: int, n_rot: int, has_freq_factors: bool = False):
        self.pdl = pdl_enabled()
        if n_rot % 2 or not 0 < n_rot <= head_dim:
            raise ValueError(f"bad n_rot {n_rot} for head_dim {head_dim}")
        self.head_dim = head_dim
        self.n_rot = n_rot
        self.half = n_rot // 2
        self.has_ff = has_freq_factors
        self.threads = max(32, -(-self.half // 32) * 32)

    @cute.jit
    def __call__(self, pX: cute.Pointer, pPos: cute.Pointer, pFF: cute.Pointer, n_tokens: Int32, n_heads: Int32,
                 theta_scale: Float32, stream: cuda.CUstream):
        mX = cute.make_tensor(pX, cute.make_layout((n_tokens * n_heads, self.head_dim), stride=(self.head_dim, 1)))
        mPos = cute.make_tensor(pPos, cute.make_layout(n_tokens))
        mFF = cute.make_tensor(pFF, cute.make_layout(self.half))
        self.kernel(mX, mPos, mFF, n_heads, theta_scale).launch(use_pdl=self.pdl, 
            grid=[n_tokens, (n_heads + HEADS_PER_BLOCK - 1) // HEADS_PER_BLOCK, 1], block=[self.threads, 1, 1],
            stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mPos: cute.Tensor, mFF: cute.Tensor, n_heads: Int32, theta_scale: Float32):
        pdl_prologue(self.pdl)
        i, _, _ = cute.arch.thread_idx()
        tok, hgrp, _ = cute.arch.block_idx()
        if i < self.half:
            pos = mPos[tok].to(Float32)
            theta = pos * cute.math.pow(theta_scale, i.to(Float32))
            if const_expr(self.has_ff):
                theta = theta / mFF[i]
            c = cute.math.cos(theta)
            s = cute.math.sin(theta)
            for hh in cutlass.range_constexpr(HEADS_PER_BLOCK):
                h = hgrp * HEADS_PER_BLOCK + hh
                if h < n_heads:
                    row = tok * n_heads + h
                    x0 = mX[row, i]
                    x1 = mX[row, i + self.half]
                    mX[row, i] = x0 * c - x1 * s
                    mX[row, i + self.half] = x0 * s + x1 * c


@kernel_cache
def compile_rope(head_dim: int, n_rot: int, has_freq_factors: bool = False):
    return cute.compile(RopeNeox(head_dim, n_rot, has_freq_factors), fake_ptr(Float32, 4), fake_ptr(Int32, 4),
                        fake_ptr(Float32, 4), Int32(1), Int32(1), Float32(1.0), cute.runtime.make_fake_stream(),
                        options=compile_options())


def rope_neox(x, pos, *, n_rot: int | None = None, base: float = 10000.0, freq_factors=None, n_heads=None,
              stream=None):
    """Rotate ``x`` ``[n_tokens, n_heads, head_dim]`` (or ``[n_heads, head_dim]`` = one token) in place.

    ``pos``: int32 positions, one per token: a DeviceArray (read by the kernel at run time: graph-safe) or
    numpy/int (uploaded). ``freq_factors``: optional ``{n_rot/2}`` f32 divisors of theta. numpy ``x`` ->
    returns the rotated numpy array; DeviceArray ``x`` -> rotated in place and returned."""
    from ..runtime import as_device, resolve_stream

    xd, was_np = as_device(x, stream, np.float32)
    if xd.ndim < 2:
        raise ValueError("x must be [n_tokens, n_heads, head_dim] or [n_heads, head_dim]")
    head_dim = xd.shape[-1]
    n_heads = xd.shape[-2] if n_heads is None else n_heads
    n_tokens = xd.size // (n_heads * head_dim)
    n_rot = head_dim if n_rot is None else n_rot
    pd, _ = as_device(np.atleast_1d(np.asarray(pos, np.int32)) if not hasattr(pos, "ptr") else pos, stream,
                      np.int32)
    if pd.size < n_tokens:
        raise ValueError(f"{pd.size} positions for {n_tokens} tokens")
    fd = None
    if freq_factors is not None:
        fd, _ = as_device(freq_factors, stream, np.float32)
        if fd.size != n_rot // 2:
            raise ValueError(f"freq_factors has {fd.size} entries, expected n_rot/2 = {n_rot // 2}")
    if n_tokens:
        fn = compile_rope(head_dim, n_rot, fd is not None)
        fn(gptr(Float32, xd.ptr, 4), gptr(Int32, pd.ptr, 4), gptr(Float32, (xd if fd is None else fd).ptr, 4), Int32(n_tokens),
           Int32(n_heads), Float32(float(theta_scale_f32(base, n_rot))), resolve_stream(stream).cu)
    return xd.to_numpy(stream) if was_np else xd


def _launch_example(head_dim: int, n_rot: int, has_freq_factors: bool = False):
    from ..runtime import DeviceArray, default_stream

    x = DeviceArray.zeros((1, 4, head_dim), np.float32)
    p = DeviceArray.zeros((1,), np.int32)
    s = default_stream()
    fn = compile_rope(head_dim, n_rot, has_freq_factors)
    ts = Float32(float(theta_scale_f32(1e6, n_rot)))

    def launch():
        fn(gptr(Float32, x.ptr, 4), gptr(Int32, p.ptr, 4), gptr(Float32, x.ptr, 4), Int32(1), Int32(4), ts, s.cu)

    return launch


register("rope_neox", compile_rope, [
    dict(head_dim=128, n_rot=128),                            # Qwen3-30B-A3B
    dict(head_dim=256, n_rot=256),                            # Gemma 3 270M, Gemma 4 sliding layers
    dict(head_dim=512, n_rot=512, has_freq_factors=True),     # Gemma 4 global layers (rope_freqs)
    dict(head_dim=256, n_rot=64),                             # Qwen3.5 (IMROPE == NEOX for text, partial 64)
    dict(head_dim=64, n_rot=64),                              # synthetic
], launch_example=_launch_example)
