"""Bit-exactness of the package's numpy dequantizers against gguf-py's (``gguf.quants.dequantize``), the
independent
reference, on random blocks and on every tensor of the real Gemma 3 270M file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkinfer_cute.gguf.quants import BLOCK_BYTES, BLOCK_ELEMS, QUANT_BLOCK, dequantize, dequantize_rows

Q = GGMLQuantizationType
TYPES = sorted(QUANT_BLOCK, key=int)


def gguf_ref(raw: np.ndarray, qtype) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf*0 in random scales
        return np.asarray(gguf_dequantize(np.ascontiguousarray(raw), qtype), dtype=np.float32)


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """Same shape, same NaN positions, and identical float32 bit patterns everywhere else. NaN payloads are
    not
    compared (they are an artifact of which operand's NaN the FPU propagates), though in practice they match
    too."""
    assert ours.dtype == np.float32, what
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_o, nan_r), f"{what}: NaN positions differ ({(nan_o != nan_r).sum()} elements)"
    diff = (ours.view(np.uint32) != ref.view(np.uint32)) & ~nan_o
    if diff.any():
        i = np.flatnonzero(diff.ravel())[0]
        raise AssertionError(
            f"{what}: {diff.sum()} elements differ in bits; first at flat {i}: ours {ours.ravel()[i]!r} "
            f"vs gguf-py {ref.ravel()[i]!r}"
        )


def test_block_table_matches_gguf():
    for t in TYPES:
        assert QUANT_BLOCK[t] == tuple(GGML_QUANT_SIZES[t]), t.name
        assert (BLOCK_ELEMS[t], BLOCK_BYTES[t]) == QUANT_BLOCK[t]


@st.composite
def random_rows(draw, sane_scales: bool):
    """(qtype, uint8 rows): random bytes; with ``sane_scales`` the f16 scale fields are overwritten with
    finite
    random halves of moderate magnitude (so the bulk of the values are ordinary numbers, not inf/NaN)."""
    qtype = draw(st.sampled_from(TYPES))
    be, bb = QUANT_BLOCK[qtype]
    n_rows = draw(st.integers(1, 4))
    blocks_per_row = draw(st.integers(1, 6 if be > 1 else 64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_rows, blocks_per_row * bb), dtype=np.uint8)
    if sane_scales and be > 1:
        blocks = raw.reshape(-1, bb)
        offs = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}.get(qtype, (0,))
        for o in offs:
            h = (rng.standard_normal(blocks.shape[0]) * 10.0 ** rng.uniform(-6, 2, blocks.shape[0])).astype(
                np.float16
            )
            blocks[:, o : o + 2] = h.view(np.uint8).reshape(-1, 2)
    return qtype, raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_rows(sane_scales=False))
def test_random_bytes_bit_exact(case):
    qtype, raw = case
    assert_bit_exact(dequantize(raw, qtype), gguf_ref(raw, qtype), qtype.name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_rows(sane_scales=True))
def test_random_blocks_finite_scales_bit_exact(case):
    qtype, raw = case
    ours = dequantize(raw, qtype)
    assert_bit_exact(ours, gguf_ref(raw, qtype), qtype.name)
    if QUANT_BLOCK[qtype][0] > 1:
        assert np.isfinite(ours).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_shapes_1d_and_leading_dims(qtype, rng):
    be, bb = QUANT_BLOCK[qtype]
    raw = rng.integers(0, 256, size=(2, 3, 4 * bb), dtype=np.uint8)
    ref = gguf_ref(raw, qtype)
    out = dequantize(raw, qtype)
    assert out.shape == (2, 3, 4 * be)
    assert_bit_exact(out, ref, "3-D")
    assert_bit_exact(dequantize(raw[1, 2].copy(), qtype), ref[1, 2], "1-D")
    # non-contiguous input (every other row)
    assert_bit_exact(dequantize(raw[:, ::2], qtype), ref[:, ::2], "strided")
    # row selection
    flat = raw.reshape(6, -1)
    idx = rng.integers(0, 6, size=5)
    assert_bit_exact(dequantize_rows(flat, idx, qtype), ref.reshape(6, -1)[idx], "rows")


def test_float_inputs_are_reinterpreted_as_bytes(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    assert np.array_equal(dequantize(x, Q.F32), x)
    h = x.astype(np.float16)
    assert np.array_equal(dequantize(h, Q.F16), h.astype(np.float32))


def test_errors():
    with pytest.raises(ValueError, match="whole number"):
        dequantize(np.zeros(35, np.uint8), Q.Q8_0)
    with pytest.raises(ValueError, match="Q2_K"):
        dequantize(np.zeros(84, np.uint8), Q.Q2_K)


def test_known_block_values():
    """Hand-built blocks whose values follow directly from the format description (spec §5)."""
    # Q8_0: d = 0.5, qs = -16..15 -> y = 0.5 * qs
    qs = np.arange(-16, 16, dtype=np.int8)
    blk = np.concatenate([np.array([0.5], np.float16).view(np.uint8), qs.view(np.uint8)])
    assert np.array_equal(dequantize(blk, Q.Q8_0), 0.5 * qs.astype(np.float32))
    # Q4_0: d = 2, qs[j] = j | (15 - j) << 4 -> y[j] = 2 (j - 8), y[j+16] = 2 (7 - j)
    j = np.arange(16, dtype=np.uint8)
    blk = np.concatenate([np.array([2.0], np.float16).view(np.uint8), j | ((15 - j) << 4)])
    want = np.concatenate([2.0 * (j.astype(np.float32) - 8), 2.0 * (7 - j.astype(np.float32))])
    assert np.array_equal(dequantize(blk, Q.Q4_0), want)


def test_every_tensor_of_real_gemma3(gemma3_path):
    """Every tensor of the real file, in row chunks (token_embd alone is 670 MB as float32)."""
    from sparkinfer_cute.gguf import GGUFFile

    g = GGUFFile(gemma3_path)
    seen = set()
    for name, ti in g.tensors.items():
        raw = g.raw(name).reshape(-1, ti.row_bytes)
        for s in range(0, raw.shape[0], 16384):
            chunk = np.ascontiguousarray(raw[s : s + 16384])
            assert_bit_exact(dequantize(chunk, ti.ggml_type), gguf_ref(chunk, ti.ggml_type), name)
        seen.add(ti.ggml_type)
    assert {Q.F32, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0} <= seen
