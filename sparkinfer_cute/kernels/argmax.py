"""Greedy sampling: arg-max over the vocabulary for each of 1..8 rows of f32 logits -> int32 token ids on the device.

Two launches inside one compiled function (no host round trip):

1. ``grid = (n_chunks, rows)``: block ``c`` scans chunk ``c`` of its row with 16-byte loads (each thread visits its
   float4 vectors in increasing index order and keeps the first maximum), then a block arg-max reduction (shuffle
   butterfly on (value, index) pairs + one smem slot per warp) writes the chunk's (max, index) to a workspace.
2. ``grid = (rows,)``: one warp per row reduces the ``n_chunks`` partials and writes the id.

Ties -> lowest index everywhere (a candidate replaces the best only if strictly greater, or equal with a lower
index), so the result equals ``np.argmax``. NaN logits never win a comparison (no NaN is expected in logits).
Chunks are ~4096 elements (151936 -> 38 chunks, 262144 -> 64): enough blocks to spread one 0.6-1 MB row over the
SMs, and the second pass is a single warp per row.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float32, Int32

from .common import F32_MAX, fake_ptr, gptr, pdl_prologue, warp_argmax
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

VEC = 4
THREADS = 256
CHUNK = 4096  # target elements per block in pass 1


class ArgMax:
    """Static config: ``vocab`` (multiple of 4). Rows and the workspace pointer are runtime."""

    def __init__(self, vocab: int):
        self.pdl = pdl_enabled()
        if vocab % VEC:
            raise ValueError(f"vocab must be a multiple of {VEC}, got {vocab}")
        self.vocab = vocab
        self.vecs = vocab // VEC
        self.n_chunks = max(1, -(-vocab // CHUNK))
        self.chunk_vecs = -(-self.vecs // self.n_chunks)
        self.iters = -(-self.chunk_vecs // THREADS)
        self.warps = THREADS // 32
        self.pass2_iters = -(-self.n_chunks // 32)

    @cute.jit
    def __call__(self, pLogits: cute.Pointer, pIds: cute.Pointer, pWsV: cute.Pointer, pWsI: cute.Pointer,
                 rows: Int32, stream: cuda.CUstream):
        mL = cute.make_tensor(pLogits, cute.make_layout((rows, self.vocab), stride=(self.vocab, 1)))
        mIds = cute.make_tensor(pIds, cute.make_layout(rows))
        wl = cute.make_layout((rows, self.n_chunks), stride=(self.n_chunks, 1))
        mWsV = cute.make_tensor(pWsV, wl)
        mWsI = cute.make_tensor(pWsI, wl)
        self.chunk_kernel(mL, mWsV, mWsI).launch(use_pdl=self.pdl, grid=[self.n_chunks, rows, 1], block=[THREADS, 1, 1],
                                                 stream=stream)
        self.final_kernel(mWsV, mWsI, mIds).launch(use_pdl=self.pdl, grid=[rows, 1, 1], block=[32, 1, 1], stream=stream)

    @cute.kernel
    def chunk_kernel(self, mL: cute.Tensor, mWsV: cute.Tensor, mWsI: cute.Tensor):
        pdl_prologue(self.pdl)
        tid, _, _ = cute.arch.thread_idx()
        chunk, row, _ = cute.arch.block_idx()
        lane = tid % 32
        warp = tid // 32
        smem = cutlass.memory.SmemAllocator()
        red_v = smem.allocate_tensor(Float32, cute.make_layout(self.warps), byte_alignment=16)
        red_i = smem.allocate_tensor(Int32, cute.make_layout(self.warps), byte_alignment=16)
        gL = cute.zipped_divide(mL[row, None], (VEC,))
        frag = cute.make_rmem_tensor(cute.make_layout(VEC), Float32)
        bv = Float32(-F32_MAX)
        bi = Int32(self.vocab)  # sentinel index: loses every tie against a real element
        first = chunk * self.chunk_vecs
        for it in cutlass.range_constexpr(self.iters):
            v = first + tid + it * THREADS
            if (v < first + self.chunk_vecs) & (v < self.vecs):
                cute.autovec_copy(gL[None, v], frag)
                for e in cutlass.range_constexpr(VEC):
                    x = frag[e]
                    if x > bv:  # strictly greater: the first (lowest-index) maximum of this thread is kept
                        bv = x
                        bi = v * VEC + e
        bv, bi = warp_argmax(bv, bi)
        if lane == 0:
            red_v[warp] = bv
            red_i[warp] = bi
        cute.arch.barrier()
        if tid == 0:
            for w in cutlass.range_constexpr(1, self.warps):
                ov = red_v[w]
                oi = red_i[w]
                if (ov > bv) | ((ov == bv) & (oi < bi)):
                    bv = ov
                    bi = oi
            mWsV[row, chunk] = bv
            mWsI[row, chunk] = bi

    @cute.kernel
    def final_kernel(self, mWsV: cute.Tensor, mWsI: cute.Tensor, mIds: cute.Tensor):
        pdl_prologue(self.pdl)
        lane, _, _ = cute.arch.thread_idx()
        row, _, _ = cute.arch.block_idx()
        bv = Float32(-F32_MAX)
        bi = Int32(self.vocab)
        for it in cutlass.range_constexpr(self.pass2_iters):
            c = lane + it * 32
            if c < self.n_chunks:
                ov = mWsV[row, c]
                oi = mWsI[row, c]
                if (ov > bv) | ((ov == bv) & (oi < bi)):
                    bv = ov
                    bi = oi
        bv, bi = warp_argmax(bv, bi)
        if lane == 0:
            # all logits <= -F32_MAX (e.g. all -inf): fall back to index 0, as np.argmax does
            mIds[row] = bi if bi < self.vocab else Int32(0)


@kernel_cache
def compile_argmax(vocab: int):
    return cute.compile(ArgMax(vocab), fake_ptr(Float32, 16), fake_ptr(Int32, 4), fake_ptr(Float32, 4),
                        fake_ptr(Int32, 4), Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


def workspace_shape(rows: int, vocab: int) -> tuple[int, int]:
    return (rows, ArgMax(vocab).n_chunks)


def argmax(logits, *, out=None, workspace=None, stream=None):
    """``argmax(logits[rows, vocab], -1)`` -> int32 ids ``[rows]`` (ties -> lowest index).

    ``workspace``: a :class:`~sparkinfer_cute.runtime.Workspace` to take the partials from (graph-stable); default:
    fresh buffers. numpy in -> numpy out; DeviceArray in -> DeviceArray (``out`` if given)."""
    from ..runtime import DeviceArray, as_device, resolve_stream

    ld, was_np = as_device(logits, stream, np.float32)
    vocab = ld.shape[-1]
    rows = ld.size // vocab if vocab else 0
    if ld.ptr % 16:
        raise ValueError("logits must be 16-byte aligned (rows are read as float4)")
    ids = out if out is not None else DeviceArray.empty((rows,), np.int32)
    shape = workspace_shape(max(rows, 1), vocab)
    if workspace is not None:
        ws_v = workspace.get(shape, np.float32, tag="argmax.v")
        ws_i = workspace.get(shape, np.int32, tag="argmax.i")
    else:
        ws_v, ws_i = DeviceArray.empty(shape, np.float32), DeviceArray.empty(shape, np.int32)
    if rows:
        compile_argmax(vocab)(gptr(Float32, ld.ptr, 16), gptr(Int32, ids.ptr, 4), gptr(Float32, ws_v.ptr, 4),
                              gptr(Int32, ws_i.ptr, 4), Int32(rows), resolve_stream(stream).cu)
    return ids.to_numpy(stream) if was_np else ids


def _launch_example(vocab: int):
    from ..runtime import DeviceArray, default_stream

    lg = DeviceArray.zeros((1, vocab), np.float32)
    ids = DeviceArray.empty((1,), np.int32)
    shape = workspace_shape(1, vocab)
    wv, wi = DeviceArray.empty(shape, np.float32), DeviceArray.empty(shape, np.int32)
    s = default_stream()
    fn = compile_argmax(vocab)

    def launch():
        fn(gptr(Float32, lg.ptr, 16), gptr(Int32, ids.ptr, 4), gptr(Float32, wv.ptr, 4), gptr(Int32, wi.ptr, 4),
           Int32(1), s.cu)

    return launch


register("argmax", compile_argmax, [
    dict(vocab=151936),   # Qwen3
    dict(vocab=262144),   # Gemma 3 / Gemma 4
    dict(vocab=1536), dict(vocab=2048), dict(vocab=4096),  # synthetic
], launch_example=_launch_example)
