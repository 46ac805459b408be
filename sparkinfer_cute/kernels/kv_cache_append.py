"""Append the decoded token's K (after RoPE) and V rows to the paged fp16 KV cache, CuTe DSL.

Inputs ``k``, ``v``: f32 ``[B, n_kv_head, D]``; ``pos``: int32 ``[B]`` in device memory (read by the kernel, so
the launch can live in a CUDA graph); the pools and page table are laid out as described in
:mod:`sparkinfer_cute.kernels.paged_kv`. Row ``(b, h)`` goes to ``pool[page_table[b, pos // P], pos % P, h, :]``.

f32 -> f16 uses ``cvt.rn.f16.f32`` (round to nearest even, overflow to inf), the same rounding as numpy's
``astype(np.float16)`` and llama.cpp's ``GGML_FP32_TO_FP16`` on the F16 cache, so the stored bits are exact and the
test compares them bit for bit.

Grid ``(n_kv_head, B)``; each thread converts 4 contiguous elements of K and of V (16-byte f32 loads, 8-byte f16
stores).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import numpy as np
from cutlass import Float16, Float32, Int32

from .common import cu_stream, gptr, pdl_prologue
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

_VEC = 4


class KVCacheAppend:
    def __init__(self, n_kv_head: int, head_dim: int, page_size: int):
        self.pdl = pdl_enabled()
        if head_dim % _VEC:
            raise ValueError(f"head_dim must be a multiple of {_VEC}")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.n_kv_head, self.head_dim, self.page_size = n_kv_head, head_dim, page_size
        self.num_threads = head_dim // _VEC

    @cute.jit
    def __call__(self, pK: cute.Pointer, pV: cute.Pointer, pKPool: cute.Pointer, pVPool: cute.Pointer,
                 pPageTable: cute.Pointer, pPos: cute.Pointer, batch: Int32, n_pages: Int32, pages_per_seq: Int32,
                 stream: cuda.CUstream):
        KV, D, P = self.n_kv_head, self.head_dim, self.page_size
        row_layout = cute.make_layout((batch, KV, D), stride=(KV * D, D, 1))
        pool_layout = cute.make_layout((n_pages, P, KV, D), stride=(P * KV * D, KV * D, D, 1))
        mK = cute.make_tensor(pK, row_layout)
        mV = cute.make_tensor(pV, row_layout)
        mKPool = cute.make_tensor(pKPool, pool_layout)
        mVPool = cute.make_tensor(pVPool, pool_layout)
        mPT = cute.make_tensor(pPageTable, cute.make_layout((batch, pages_per_seq), stride=(pages_per_seq, 1)))
        mPos = cute.make_tensor(pPos, cute.make_layout(batch))
        self.kernel(mK, mV, mKPool, mVPool, mPT, mPos).launch(use_pdl=self.pdl, 
            grid=[KV, batch, 1], block=[self.num_threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mK: cute.Tensor, mV: cute.Tensor, mKPool: cute.Tensor, mVPool: cute.Tensor,
               mPT: cute.Tensor, mPos: cute.Tensor):
        pdl_prologue(self.pdl)
        P = self.page_size
        tidx, _, _ = cute.arch.thread_idx()
        h, b, _ = cute.arch.block_idx()
        pos = mPos[b]
        page = mPT[b, pos // P]
        slot = pos % P
        for src, dst in ((mK, mKPool), (mV, mVPool)):
            r32 = cute.make_rmem_tensor((_VEC,), Float32)
            cute.autovec_copy(cute.local_tile(src[b, h, None], (_VEC,), (tidx,)), r32)
            r16 = cute.make_rmem_tensor((_VEC,), Float16)
            r16.store(r32.load().to(Float16))
            cute.autovec_copy(r16, cute.local_tile(dst[page, slot, h, None], (_VEC,), (tidx,)))


@kernel_cache
def compile_kv_cache_append(n_kv_head: int, head_dim: int, page_size: int):
    """Runtime args: (k, v f32; k_pool, v_pool f16; page_table, pos int32 pointers, batch, n_pages, pages_per_seq,
    stream)."""
    k = KVCacheAppend(n_kv_head, head_dim, page_size)
    f32, f16, i32 = gptr(Float32, 0), gptr(Float16, 0, align=8), gptr(Int32, 0, align=4)
    return cute.compile(k, f32, f32, f16, f16, i32, i32, Int32(1), Int32(1), Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


def kv_cache_append(k, v, k_pool, v_pool, page_table, pos, *, stream=None):
    """Store f16(k), f16(v) (f32 [B, n_kv_head, D] or [n_kv_head, D]) at position ``pos[b]`` of each sequence.

    ``k_pool``/``v_pool`` must be DeviceArrays (they are written in place); the others may be numpy or DeviceArrays.
    """
    from ..runtime import DeviceArray, as_device, resolve_stream

    if not isinstance(k_pool, DeviceArray) or not isinstance(v_pool, DeviceArray):
        raise TypeError("k_pool and v_pool must be DeviceArrays (the cache is updated in place)")
    stream = resolve_stream(stream)
    n_pages, P, KV, D = k_pool.shape
    if tuple(v_pool.shape) != tuple(k_pool.shape) or k_pool.dtype != np.float16 or v_pool.dtype != np.float16:
        raise TypeError("k_pool and v_pool must be f16 DeviceArrays of the same shape")
    k_shape = tuple(k.shape)
    B = 1 if len(k_shape) == 2 else k_shape[0]
    if k_shape[-2:] != (KV, D) or tuple(v.shape) != k_shape:
        raise ValueError(f"k {k_shape} / v {tuple(v.shape)} must be [B, {KV}, {D}]")
    pages_per_seq = tuple(page_table.shape)[-1]
    dk, _ = as_device(k, stream, np.float32)
    dv, _ = as_device(v, stream, np.float32)
    dpt, _ = as_device(page_table, stream, np.int32)
    dpos, _ = as_device(pos, stream, np.int32)
    f = compile_kv_cache_append(KV, D, P)
    f(gptr(Float32, dk.ptr), gptr(Float32, dv.ptr), gptr(Float16, k_pool.ptr, align=8),
      gptr(Float16, v_pool.ptr, align=8), gptr(Int32, dpt.ptr, align=4), gptr(Int32, dpos.ptr, align=4),
      Int32(B), Int32(n_pages), Int32(pages_per_seq), cu_stream(stream))


# (n_kv_head, head_dim, page_size) per model attention layer type.
MODEL_CONFIGS = {
    "qwen3moe-30b-a3b": dict(n_kv_head=4, head_dim=128, page_size=64),
    "gemma3-270m": dict(n_kv_head=1, head_dim=256, page_size=64),
    "gemma4-26b-a4b-swa": dict(n_kv_head=8, head_dim=256, page_size=64),
    "gemma4-26b-a4b-full": dict(n_kv_head=2, head_dim=512, page_size=64),
    "qwen35moe-full": dict(n_kv_head=2, head_dim=256, page_size=64),
    "tiny": dict(n_kv_head=2, head_dim=64, page_size=64),
}


register("kv_cache_append", compile_kv_cache_append, list(MODEL_CONFIGS.values()))
