"""GGUF dequant kernel: bit-exact vs gguf-py (the independent reference) for every supported type."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels import arch
from sparkinfer_cute.kernels.dequant import compile_dequant, dequantize, dequantize_ref, random_quant_bytes
from sparkinfer_cute.kernels.quant_decode import QTYPES, spec

QUANT = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@pytest.mark.parametrize("q", QUANT)
def test_spec_matches_gguf_block_sizes(q):
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[q]]
    sp = spec(q)
    assert (sp.block_elems, sp.block_bytes) == (block, nbytes)
    assert sp.block_elems % sp.unit_elems == 0
    covered = sorted(off + i for _, off, n in sp.runs for i in range(n))
    assert covered == list(range(sp.unit_elems)) or q == "Q6_K"  # Q6_K runs are strided, checked below


def test_q6k_units_cover_block_exactly_once():
    sp = spec("Q6_K")
    pos = []
    for u in range(sp.units_per_block):
        base = (u >> 2) * 128 + (u & 3) * 8
        pos += [base + off + i for _, off, n in sp.runs for i in range(n)]
    assert sorted(pos) == list(range(256))


@pytest.mark.parametrize("q", QTYPES)
def test_random_blocks_are_finite(q):
    raw = random_quant_bytes(q, 7, np.random.default_rng())
    assert raw.shape == (7, spec(q).block_bytes)
    y = dequantize_ref(raw, q)
    assert y.shape == (7 * spec(q).block_elems,) and np.isfinite(y).all()


@pytest.mark.parametrize("target", arch.SUPPORTED_TARGETS)
@pytest.mark.parametrize("q", ("Q4_0", "Q8_0", "Q4_K", "Q6_K"))
def test_compiles_for_every_target(target, q):
    with arch.target(target):
        assert compile_dequant.uncached(q) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("q", QTYPES)
@settings(max_examples=5, deadline=None)
@given(n_blocks=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_dequant_bit_exact(q, n_blocks, seed):
    from sparkinfer_cute.runtime import DeviceArray

    raw = random_quant_bytes(q, n_blocks, np.random.default_rng(seed))
    ref = dequantize_ref(raw, q)
    out = DeviceArray.empty(ref.shape, np.float32)
    out.fill_bytes(0xFF)  # poison: NaN everywhere not written
    dequantize(DeviceArray.from_numpy(raw), q, out=out)
    y = out.to_numpy()
    assert not np.isnan(y).any(), "unwritten outputs"
    # bit-exact: compare the f32 bit patterns (also distinguishes -0.0 from 0.0)
    mism = np.flatnonzero(y.view(np.uint32) != ref.view(np.uint32))
    assert mism.size == 0, f"{mism.size} mismatches, first at {mism[:5]}: {y[mism[:5]]} vs {ref[mism[:5]]}"


@pytest.mark.gpu
def test_dequant_numpy_roundtrip_real_sizes():
    rng = np.random.default_rng()
    raw = random_quant_bytes("Q4_K", 2048 * 8, rng)  # a 2048 x 2048 Q4_K matrix
    np.testing.assert_array_equal(dequantize(raw, "Q4_K").view(np.uint32), dequantize_ref(raw, "Q4_K").view(np.uint32))
