"""kernels/common.py block_reduce_sum / block_reduce_max: an all-reduce, so EVERY thread must hold the block total.

A tiny test kernel writes each thread's result; the GPU test checks all of them (the bug this guards against: the
second stage reduced the per-warp partials only within pow2(num_warps) lanes, so lanes >= num_warps of a multi-warp
block held the identity, which made the fused QK-norm kernel normalize with rsqrt(eps)). The CPU test compiles it.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
import pytest
from cutlass import Float32, Int32, cute

from sparkinfer_cute.kernels import arch
from sparkinfer_cute.kernels.common import block_reduce_max, block_reduce_sum, fake_ptr, gptr
from sparkinfer_cute.kernels.compile import compile_options


class _BlockReduceProbe:
    """Block b: x[b, t] for t < threads; out_sum[b, t] / out_max[b, t] = each thread's block_reduce result, twice
    in a row through the same smem buffer (the second call checks the buffer reuse barrier)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.num_warps = threads // 32

    @cute.jit
    def __call__(self, pX: cute.Pointer, pSum: cute.Pointer, pMax: cute.Pointer, blocks: Int32,
                 stream: cuda.CUstream):
        lay = cute.make_layout((blocks, self.threads), stride=(self.threads, 1))
        self.kernel(cute.make_tensor(pX, lay), cute.make_tensor(pSum, lay), cute.make_tensor(pMax, lay)).launch(
            grid=[blocks, 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mSum: cute.Tensor, mMax: cute.Tensor):
        tid, _, _ = cute.arch.thread_idx()
        b, _, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        red = smem.allocate_tensor(Float32, cute.make_layout(max(1, self.num_warps)), byte_alignment=16)
        x = mX[b, tid]
        s = block_reduce_sum(x, red, self.num_warps)
        m = block_reduce_max(x, red, self.num_warps)
        mSum[b, tid] = s
        mMax[b, tid] = m


def _compile(threads: int):
    f32 = fake_ptr(Float32, 4)
    return cute.compile(_BlockReduceProbe(threads), f32, f32, f32, Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


@pytest.mark.parametrize("target", ["sm_120a", "sm_121a"])
@pytest.mark.parametrize("threads", [32, 64, 128, 256, 1024])
def test_block_reduce_probe_compiles(threads, target):
    with arch.target(target):
        assert _compile(threads) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("threads", [32, 64, 96, 128, 256, 512, 1024])
def test_every_thread_holds_the_block_total(threads, rng):
    from sparkinfer_cute.runtime import DeviceArray, default_stream

    blocks = 5
    # small integers: every summation order gives the exact same f32 total, so all threads must agree bit for bit
    x = rng.integers(-1000, 1000, size=(blocks, threads)).astype(np.float32)
    xd = DeviceArray.from_numpy(x)
    sd = DeviceArray.empty((blocks, threads), np.float32).fill_bytes(0xFF)  # NaN poison
    md = DeviceArray.empty((blocks, threads), np.float32).fill_bytes(0xFF)
    s = default_stream()
    fn = _compile(threads)
    fn(gptr(Float32, xd.ptr, 4), gptr(Float32, sd.ptr, 4), gptr(Float32, md.ptr, 4), Int32(blocks), s.cu)
    got_s, got_m = sd.to_numpy(s), md.to_numpy(s)
    want_s = np.broadcast_to(x.astype(np.float64).sum(axis=1, keepdims=True), x.shape)
    want_m = np.broadcast_to(x.max(axis=1, keepdims=True), x.shape)
    bad = np.argwhere(got_s != want_s)
    assert bad.size == 0, f"{len(bad)} threads hold a wrong sum, first (block, thread) {bad[:4].tolist()}"
    np.testing.assert_array_equal(got_m, want_m)
