"""The mma.sync peak kernel (kernels/mma_peak.py): its output against a float64 model built from the fragment layouts
kernels/common.py documents (on the GPU), so the instructions the microbench times are the ones described; and the
model itself checked on the CPU against a direct per-element evaluation of the documented layout."""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.kernels import mma_peak as mp
from sparkinfer_cute.runtime.testing import assert_all_written, poisoned


@pytest.mark.gpu
@pytest.mark.parametrize("kind", mp.KINDS)
@pytest.mark.parametrize("n_ctas,iters", [(1, 0), (1, 1), (3, 3)])
def test_kernel_matches_the_fragment_layout_model(kind, n_ctas, iters):
    out = poisoned((n_ctas * mp.THREADS,), np.float32)
    mp.mma_peak(kind, n_ctas, iters, out=out)
    y = out.to_numpy()
    assert_all_written(y, "per-thread sums")
    # every product and sum is exact in f32 for these few rounds (module docstring): equality, not a tolerance
    np.testing.assert_array_equal(y.astype(np.float64), mp.reference_sums(kind, n_ctas, iters))


@pytest.mark.parametrize("kind", mp.KINDS)
def test_model_is_the_documented_layout(kind):
    """reference_sums builds whole A/B matrices; here one thread's four D elements come from the layout rules
    written out element by element (PTX ISA, mma.m16n8k32 .s8 / m16n8k16 .f16 fragments)."""
    iters = 2
    K, per = (32, 4) if kind == "s8" else (16, 2)
    thread = np.arange(64, dtype=np.uint32)

    def value(word, i):
        if kind == "s8":
            return float((int(word) >> (8 * i)) & 0xFF)
        return float(np.uint16((int(word) >> (16 * i)) & 0xFFFF).view(np.float16))

    words = {c: [mp.register_word(kind, thread, c, r) for r in range(6)] for c in range(mp.CHAINS)}

    def a_elem(warp, c, row, k):  # lane (g, t) holds row g/g+8, k per*t + i (+ K/2 for a2/a3)
        g, hi = row % 8, row >= 8
        upper, kk = divmod(k, K // 2)
        t, i = divmod(kk, per)
        reg = (1 if hi else 0) + (2 if upper else 0)
        return value(words[c][reg][warp * 32 + 4 * g + t], i)

    def b_elem(warp, c, k, col):
        upper, kk = divmod(k, K // 2)
        t, i = divmod(kk, per)
        return value(words[c][5 if upper else 4][warp * 32 + 4 * col + t], i)

    want = np.zeros(64)
    for th in range(64):
        warp, lane = divmod(th, 32)
        g, t = divmod(lane, 4)
        for c in range(mp.CHAINS):
            for row, col in ((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)):
                want[th] += iters * sum(a_elem(warp, c, row, k) * b_elem(warp, c, k, col) for k in range(K))
    # the kernel launches whole CTAs: model 1 CTA, compare its first 64 threads
    np.testing.assert_array_equal(mp.reference_sums(kind, 1, iters)[:64], want)


def test_refusals_and_flops():
    with pytest.raises(ValueError, match="kind must be one of"):
        mp.MmaPeak("bf16")
    assert mp.launch_flops("s8", 2, 10) == 2 * 16 * 8 * 32 * mp.CHAINS * 10 * 2 * (mp.THREADS // 32)
