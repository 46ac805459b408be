"""RoPE NEOX kernel: independent float64 references, partial rotary, frequency factors, device-side positions
(CUDA-graph replay)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.rope import rope_neox
from sparkinfer_cute.reference.kernel_refs import check_rope, rope_neox_ref, theta_scale_f32


def _rope_loop(x, pos, n_rot, base, ff=None):
    """Independent scalar reference: llama.cpp's CPU loop structure (theta *= theta_scale per pair), in float64."""
    y = np.array(x, np.float64)
    half = n_rot // 2
    scale = base ** (-2.0 / n_rot)
    for t in range(y.shape[0]):
        theta = float(pos[t])
        for i in range(half):
            th = theta / (ff[i] if ff is not None else 1.0)
            c, s = math.cos(th), math.sin(th)
            for h in range(y.shape[1]):
                a, b = y[t, h, i], y[t, h, i + half]
                y[t, h, i], y[t, h, i + half] = a * c - b * s, a * s + b * c
            theta *= scale
    return y


def test_reference_matches_scalar_loop(rng):
    x = rng.standard_normal((2, 3, 16))
    pos = np.array([5, 300])
    ff = rng.uniform(1, 4, 6)
    np.testing.assert_allclose(rope_neox_ref(x, pos, n_rot=12, base=1e4, freq_factors=ff),
                               _rope_loop(x, pos, 12, 1e4, ff), rtol=1e-12, atol=1e-12)
    # f32 theta differs from exact theta by a few ulp of theta only
    y32 = rope_neox_ref(x, pos, n_rot=12, base=1e4, f32_theta=True)
    assert np.max(np.abs(y32 - _rope_loop(x, pos, 12, 1e4))) < 300 * 4 * 2.0 ** -24 * np.abs(x).max() * 2


def test_theta_scale_is_f32_powf():
    ts = theta_scale_f32(1e6, 128)
    assert ts.dtype == np.float32 and abs(float(ts) - 1e6 ** (-2 / 128)) <= 2 * np.spacing(ts)


# The check (reference/kernel_refs.py check_rope, bound rope_error_bound): pass-through dims bit-identical, rotated
# dims against the f32-theta float64 reference within (|x0| + |x1|) * (8 ulp(theta) + 5e-7) + 4e-7 max|x| (CUDA
# powf <= 4 ulp, libm <= 1 ulp, product/quotient roundings; sinf/cosf <= 2 ulp; the f32 rotation ~3 ulp).


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(head_dim=st.sampled_from([64, 128, 256, 512]), rot_frac=st.sampled_from([1.0, 0.5, 0.25]),
       n_tokens=st.integers(1, 4), n_heads=st.integers(1, 33), max_pos=st.sampled_from([1, 100, 4096, 40960]),
       use_ff=st.booleans(), base=st.sampled_from([1e4, 1e6, 1e7]), seed=st.integers(0, 2**32 - 1))
def test_rope_matches_reference(head_dim, rot_frac, n_tokens, n_heads, max_pos, use_ff, base, seed):
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    n_rot = int(head_dim * rot_frac)
    half = n_rot // 2
    x = rng.standard_normal((n_tokens, n_heads, head_dim)).astype(np.float32)
    pos = rng.integers(0, max_pos + 1, n_tokens).astype(np.int32)
    ff = None
    if use_ff:  # Gemma 4 style: ones then 1e30 (rotation off), plus random factors
        ff = np.where(rng.random(half) < 0.3, np.float32(1e30), rng.uniform(1, 8, half)).astype(np.float32)
    xd = DeviceArray.from_numpy(x)
    rope_neox(xd, DeviceArray.from_numpy(pos), n_rot=n_rot, base=base,
              freq_factors=None if ff is None else DeviceArray.from_numpy(ff))
    y = xd.to_numpy()
    check_rope(y, x, pos, n_rot, base, ff)


@pytest.mark.gpu
def test_rope_numpy_single_token_and_exact_theta_small_pos(rng):
    from sparkinfer_cute.reference.kernel_refs import rel_err

    q = rng.standard_normal((32, 128)).astype(np.float32)
    y = rope_neox(q, 17, base=1e6)
    assert isinstance(y, np.ndarray) and y.shape == q.shape
    # small position: theta <= 17 carries <= ~8 ulp(16) = 1.5e-5 absolute error (f32 powf + product), so against
    # the exact-theta float64 reference the error is <= (|x0|+|x1|) * 1.5e-5 <= 2 max|x| * 1.5e-5
    assert rel_err(y, rope_neox_ref(q, [17], base=1e6)) < 3e-5


@pytest.mark.gpu
def test_rope_position_is_read_from_device_in_graph_replay(rng):
    from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Stream

    s = Stream()
    x0 = rng.standard_normal((1, 4, 128)).astype(np.float32)
    xd = DeviceArray.from_numpy(x0)
    pos = DeviceArray.from_numpy(np.array([0], np.int32))
    rope_neox(xd, pos, base=1e6, stream=s)  # warm-up: compile + module load happen outside the capture
    s.synchronize()
    with CudaGraph.capture(s) as g:
        rope_neox(xd, pos, base=1e6, stream=s)
    g.keep(xd, pos)
    for p in [5, 1234, 3]:
        xd.copy_from_numpy(x0)
        pos.copy_from_numpy(np.array([p], np.int32))
        g.replay(s)
        s.synchronize()
        check_rope(xd.to_numpy(), x0, np.array([p]), 128, 1e6)
