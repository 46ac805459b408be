"""GGUF dequant kernel: bit-exact vs gguf-py (the independent reference) for every supported type."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.dequant import dequantize
from sparkinfer_cute.reference.kernel_refs import dequantize_ref, random_quant_bytes
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


@settings(max_examples=20, deadline=None)
@given(n_blocks=st.integers(1, 50), rows=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_q6k_padded_repack_roundtrip(n_blocks, rows, seed):
    from sparkinfer_cute.gguf.quants import repack_q6_k_padded, unpack_q6_k_padded

    raw = random_quant_bytes("Q6_K", rows * n_blocks, np.random.default_rng(seed)).reshape(rows, n_blocks * 210)
    packed = repack_q6_k_padded(raw)
    assert packed.shape == (rows, n_blocks * 212)
    blocks = packed.reshape(-1, 212)
    assert not blocks[:, 210:].any()
    np.testing.assert_array_equal(blocks[:, :210], raw.reshape(-1, 210))
    np.testing.assert_array_equal(unpack_q6_k_padded(packed), raw)
    np.testing.assert_array_equal(dequantize_ref(packed, "Q6_K_P"), dequantize_ref(raw, "Q6_K"))


def test_q6k_units_cover_block_exactly_once():
    sp = spec("Q6_K")
    pos = []
    for u in range(sp.units_per_block):
        base = (u >> 2) * 128 + (u & 3) * 8
        pos += [base + off + i for _, off, n in sp.runs for i in range(n)]
    assert sorted(pos) == list(range(256))


@pytest.mark.parametrize("q", QTYPES)
def test_random_blocks_are_finite(q, rng):
    raw = random_quant_bytes(q, 7, rng)
    assert raw.shape == (7, spec(q).block_bytes)
    y = dequantize_ref(raw, q)
    assert y.shape == (7 * spec(q).block_elems,) and np.isfinite(y).all()


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
def test_dequant_numpy_roundtrip_real_sizes(rng):
    from sparkinfer_cute.runtime.testing import poisoned

    raw = random_quant_bytes("Q4_K", 2048 * 8, rng)  # a 2048 x 2048 Q4_K matrix
    y = dequantize(raw, "Q4_K", out=poisoned((2048 * 2048,)))
    np.testing.assert_array_equal(y.view(np.uint32), dequantize_ref(raw, "Q4_K").view(np.uint32))


# ---------------------------------------------------------------------------------------------------------------
# CPU check of the decoders' index and bit logic: the very Python functions that the kernels trace
# (quant_decode.decode_unit / slice decoders, quant_dot.decode_int_slice / decode_int_unit) are executed with
# numpy-backed stand-ins for the few DSL primitives they use (typed pointer indexing, word loads, integer and f32
# scalar types, f16 bit conversion), over random blocks, and compared with gguf-py's dequantization.
# 
# This cannot catch DSL-semantics problems (those are for the GPU tests), but it checks every offset, shift and mask
# on a machine without a GPU. f32 products are numpy float32 scalars (each rounded, like mul.rn).

import types

from sparkinfer_cute.kernels import quant_dot as gq
from sparkinfer_cute.kernels import quant_decode as qd


def U32(x):
    return int(x) & 0xFFFFFFFF


def U16(x):
    return int(x) & 0xFFFF


def I32(x):
    v = int(x) & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


U32.np, U16.np, I32.np = np.uint32, np.uint16, np.int32


def F32(x):
    return np.float32(x)


F32.np = np.float32


class Ptr:
    def __init__(self, buf, dt):
        self.buf, self.dt = buf, dt
        self.view = buf.view(dt)

    def __getitem__(self, i):
        v = self.view[int(i)]
        return v.item() if self.dt != np.float32 else np.float32(v)


def _npdt(t):
    return t.np if hasattr(t, "np") else {"Uint16": np.uint16, "Uint32": np.uint32, "Int32": np.int32,
                                          "Float32": np.float32}[t.__name__]


def mock_load_words(ptr, idx, n, divby, dtype=U32):
    idx = int(idx)
    assert divby <= 1 or idx % divby == 0, f"alignment assumption violated: {idx} % {divby}"
    return ptr.view[idx:idx + n].copy()


def mock_byte(words, i):
    w = words.dtype.itemsize
    return (int(words[i // w]) >> (8 * (i % w))) & 0xFF


def _half(bits):
    return np.array([bits & 0xFFFF], np.uint16).view(np.float16).astype(np.float32)[0]


@pytest.fixture
def emulated(monkeypatch):
    fake_cute = types.SimpleNamespace(
        recast_ptr=lambda p, dtype=None: Ptr(p.buf, _npdt(dtype)),
        make_tensor=lambda p, layout: p, make_layout=lambda *a, **k: None)
    for mod in (qd, gq):
        monkeypatch.setattr(mod, "cute", fake_cute)
        monkeypatch.setattr(mod, "Uint32", U32)
        monkeypatch.setattr(mod, "Uint16", U16)
        monkeypatch.setattr(mod, "Int32", I32)
        monkeypatch.setattr(mod, "Float32", F32)
        monkeypatch.setattr(mod, "load_words", mock_load_words)
        monkeypatch.setattr(mod, "half_lo_to_f32", lambda w: _half(int(w)))
        monkeypatch.setattr(mod, "half_hi_to_f32", lambda w: _half(int(w) >> 16))
    monkeypatch.setattr(qd, "_byte", mock_byte)
    monkeypatch.setattr(qd, "mul_rn", lambda a, b: np.float32(np.float32(a) * np.float32(b)))
    monkeypatch.setattr(qd, "sub_rn", lambda a, b: np.float32(np.float32(a) - np.float32(b)))
    monkeypatch.setattr(qd, "bits_to_f32", lambda w: np.array([int(w) & 0xFFFFFFFF], np.uint32).view(np.float32)[0])


ALL = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q6_K_P", "F16", "BF16", "F32")


def _decode_all(q, raw, mode, exact):
    sp = qd.spec(q)
    t = qd.Tiling.__new__(qd.Tiling)
    qd.Tiling.__init__(t, q, mode)
    nb = raw.shape[0]
    y = np.full(nb * sp.block_elems, np.nan, np.float32)
    p = Ptr(raw.reshape(-1), np.uint8)
    for blk in range(nb):
        for u in range(t.per_block):
            out = np.zeros(t.elems, np.float32)
            if mode == "slice":
                qd._decode_slice(q, p, blk, u, out, exact)
            else:
                qd.decode_unit(q, p, blk, u, out, exact)
            base = blk * sp.block_elems + t.base(u)
            for start, off, n in t.runs:
                pos = base + off + np.arange(n)
                assert np.isnan(y[pos]).all(), "element decoded twice"
                y[pos] = out[start:start + n]
    return y


@pytest.mark.parametrize("mode", ["unit", "slice"])
@pytest.mark.parametrize("q", ALL)
def test_float_decoders_match_gguf(emulated, q, mode, rng):
    raw = random_quant_bytes(q, 3, rng)
    ref = dequantize_ref(raw, q)
    y = _decode_all(q, raw, mode, exact=True)
    assert not np.isnan(y).any(), "element never decoded"
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    # the fast (contractable) path computes the same products here (numpy never fuses)
    np.testing.assert_array_equal(_decode_all(q, raw, mode, exact=False), ref)


@pytest.mark.parametrize("mode", ["unit", "slice"])
@pytest.mark.parametrize("q", qd.INT_QTYPES)
def test_int_decoders_match_gguf(emulated, q, mode, rng):
    """Rebuild each weight from the dp4a groups: scale * (byte - off) - minc (the group's integer quants)."""
    sp = qd.spec(q)
    raw = random_quant_bytes(q, 3, rng)
    ref = dequantize_ref(raw, q).astype(np.float64)
    t = qd.Tiling(q, mode)
    y = np.full(ref.shape, np.nan)
    p = Ptr(raw.reshape(-1), np.uint8)
    for blk in range(raw.shape[0]):
        for u in range(t.per_block):
            groups = (gq.decode_int_slice if mode == "slice" else gq.decode_int_unit)(q, p, blk, u)
            for g in groups:
                for wi, word in enumerate(g.words):
                    for b in range(4):
                        v = (int(word) >> (8 * b)) & 0xFF
                        if g.signed and v >= 128:
                            v -= 256
                        val = float(g.scale) * (v - g.off) - (float(g.minc) if g.minc is not None else 0.0)
                        pos = blk * sp.block_elems + t.base(u) + g.xoff + 4 * wi + b
                        assert np.isnan(y[pos])
                        y[pos] = val
    assert not np.isnan(y).any()
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
