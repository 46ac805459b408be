"""GGUF reader: agreement with gguf-py's GGUFReader on valid files, one error type (GGUFError) for every kind
of bad file, and a hypothesis fuzz (truncation, random byte overwrites, huge counts/lengths) that must never
raise anything
else, hang, or read outside the file."""

from __future__ import annotations

import struct
import time
import warnings

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.gguf.reader import SUPPORTED_TYPES

Q = GGMLQuantizationType


def write_small_gguf(
    path, rng: np.random.Generator, *, alignment: int | None = None
) -> dict[str, np.ndarray]:
    """A small valid GGUF via gguf-py's writer: every metadata value type and a few tensor types (one of them
    unsupported, Q2_K). Returns the arrays written (raw bytes for quantized ones)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", int(rng.integers(0, 256)))
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", int(rng.integers(0, 2**32)))
    w.add_int32("t.i32", -(2**31))
    w.add_float32("t.f32", float(rng.standard_normal()))
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ wörld")
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", float(rng.standard_normal()))
    w.add_array("t.arr_i32", [int(x) for x in rng.integers(-1000, 1000, 7)])
    w.add_array("t.arr_f32", [float(x) for x in rng.standard_normal(5).astype(np.float32)])
    w.add_array("t.arr_str", ["a", "", "<0x0A>", "▁the"])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_array("t.arr_empty", [])
    tensors = {
        "f32": rng.standard_normal((3, 8)).astype(np.float32),
        "f16": rng.standard_normal((2, 16)).astype(np.float16),
        "q8": rng.integers(0, 256, (2, 2 * 34), dtype=np.uint8),
        "q4k": rng.integers(0, 256, (2, 144), dtype=np.uint8),
        "q2k": rng.integers(0, 256, (1, 84), dtype=np.uint8),
    }
    types = {"q8": Q.Q8_0, "q4k": Q.Q4_K, "q2k": Q.Q2_K}
    for name, arr in tensors.items():
        w.add_tensor(name, arr, raw_dtype=types.get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture
def small(tmp_path, rng):
    p = tmp_path / "small.gguf"
    arrays = write_small_gguf(p, rng)
    return p, arrays


def touch_everything(g: GGUFFile) -> None:
    """What a loader does: read metadata, look at every tensor's bytes, dequantize the supported ones."""
    g.describe()
    repr(g)
    for name, ti in g.tensors.items():
        raw = g.raw(name)
        assert raw.dtype == np.uint8 and raw.size == ti.nbytes
        int(raw.reshape(-1)[-1]) if raw.size else None  # really read the last byte
        if ti.ggml_type in SUPPORTED_TYPES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g.dequant(name)
        else:
            with pytest.raises(GGUFError, match="unsupported quant type"):
                g.dequant(name)


# ------------------------------------------------------------------------------------------------ valid files
def _assert_same_as_gguf_py(g: GGUFFile, ref) -> None:
    """Every metadata value (value and Python type) and every tensor descriptor equal to gguf-py's GGUFReader's."""
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert g.metadata.keys() == want.keys()
    for k, v in want.items():
        assert g.metadata[k] == v and type(g.metadata[k]) is type(v), k
    assert [t.name for t in ref.tensors] == list(g.tensors)
    for t in ref.tensors:
        ti = g.tensor(t.name)
        assert (ti.offset, ti.shape, ti.ggml_type, ti.nbytes) == (
            t.data_offset, tuple(int(x) for x in t.shape), t.tensor_type, int(t.n_bytes)), t.name


def test_agrees_with_gguf_py_reader(small):
    path, arrays = small
    g = GGUFFile(path)
    ref = gguf.GGUFReader(str(path))
    _assert_same_as_gguf_py(g, ref)
    assert g.metadata["t.str"] == "héllo ▁ wörld"
    assert g.metadata["t.u64"] == 2**64 - 1 and g.metadata["t.i64"] == -(2**63)
    assert g.architecture == "gemma3" and g.version == 3
    for t in ref.tensors:
        assert np.array_equal(g.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    # dequant of plain float tensors returns exactly what was written, in numpy order
    assert np.array_equal(g.dequant("f32"), arrays["f32"])
    assert np.array_equal(g.dequant("f16"), arrays["f16"].astype(np.float32))
    assert g.raw("q8").shape == (2, 68) and g.dequant("q8").shape == (2, 64)
    touch_everything(g)


def test_custom_alignment(tmp_path, rng):
    p = tmp_path / "a.gguf"
    arrays = write_small_gguf(p, rng, alignment=64)
    g = GGUFFile(p)
    assert g.alignment == 64 and g.data_offset % 64 == 0
    assert all((t.offset - g.data_offset) % 64 == 0 for t in g.tensors.values())
    assert np.array_equal(g.dequant("f32"), arrays["f32"])


def test_describe_real_gemma3(gemma3_path):
    g = GGUFFile(gemma3_path)  # own parser: ~0.2-0.6 s on the CI machine (gguf.GGUFReader: ~9 s)
    s = g.describe()
    assert "gemma3" in s and "236 tensors" in s and "Q4_K x27" in s
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 262144


# -------------------------------------------------------------------------------------------- specific errors
def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _tensor_info_offset(path, name: str) -> int:
    """Byte offset just after the name of tensor ``name`` in its tensor info (i.e. at n_dims)."""
    b = open(path, "rb").read()
    key = struct.pack("<Q", len(name)) + name.encode()
    i = b.rfind(key)  # tensor infos come after the metadata
    assert i > 0
    return i + len(key)


def _expect(path, match: str):
    with pytest.raises(GGUFError, match=match) as ei:
        g = GGUFFile(path)
        touch_everything(g)
    assert ei.value.path == str(path)
    return ei.value


def test_missing_and_not_gguf(tmp_path):
    _expect(tmp_path / "nope.gguf", "no such file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _expect(tmp_path / "empty.gguf", "not a GGUF")
    (tmp_path / "text.gguf").write_bytes(b"hello world, not a model")
    _expect(tmp_path / "text.gguf", "not a GGUF")


def test_bad_version(small):
    path, _ = small
    _patch(path, 4, struct.pack("<I", 1))
    _expect(path, "unsupported GGUF version 1")
    _patch(path, 4, struct.pack(">I", 3))
    _expect(path, "big-endian")


def test_truncated_header(small):
    path, _ = small
    data = open(path, "rb").read()
    for cut in (5, 8, 20, 30, 60):
        path.write_bytes(data[:cut])
        _expect(path, "truncated|cannot fit")


@pytest.mark.parametrize("huge", [2**60, 2**63, 2**64 - 1])
def test_huge_counts_and_lengths(small, huge):
    path, _ = small
    data = open(path, "rb").read()
    for off in (8, 16, 24):  # n_tensors, n_kv, first key's length
        path.write_bytes(data)
        _patch(path, off, struct.pack("<Q", huge))
        t0 = time.perf_counter()
        _expect(path, "cannot fit|truncated|corrupt")
        assert time.perf_counter() - t0 < 1.0
    # the string array's count and the first string's length
    i = data.find(b"t.arr_str") + len(b"t.arr_str")  # then value type u32, elem type u32, count u64, strings
    for off in (i + 8, i + 16):
        path.write_bytes(data)
        _patch(path, off, struct.pack("<Q", huge))
        _expect(path, "cannot fit|truncated|corrupt")
    # an int array's count
    i = data.find(b"t.arr_i32") + len(b"t.arr_i32")
    path.write_bytes(data)
    _patch(path, i + 8, struct.pack("<Q", huge))
    _expect(path, "runs past|truncated|corrupt")


def test_array_length_cap(small, monkeypatch):
    """A count that passes the file-size bound (zero bytes read as empty strings) but is implausibly long is
    refused
    before a giant list is built. The cap is lowered here so the test file stays small."""
    import sparkinfer_cute.gguf.reader as reader_mod

    monkeypatch.setattr(reader_mod, "MAX_ARRAY_LEN", 1000)
    path, _ = small
    data = open(path, "rb").read()
    i = data.find(b"t.arr_str") + len(b"t.arr_str")
    path.write_bytes(data[: i + 8] + struct.pack("<Q", 1001) + bytes(8 * 1001) + data[i + 16 :])
    _expect(path, "more than 1000")


def test_unknown_value_type(small):
    path, _ = small
    data = open(path, "rb").read()
    i = data.find(b"t.u8") + len(b"t.u8")
    _patch(path, i, struct.pack("<I", 77))
    _expect(path, "unknown metadata value type 77")


def test_tensor_errors(small):
    path, _ = small
    data = open(path, "rb").read()
    at = _tensor_info_offset(path, "q8")  # n_dims u32, dims 2 x u64, type u32, offset u64

    def fresh():
        path.write_bytes(data)

    fresh(), _patch(path, at, struct.pack("<I", 9))
    _expect(path, "number of dimensions")
    fresh(), _patch(path, at + 4, struct.pack("<Q", 33))
    _expect(path, "not a multiple of the Q8_0 block")
    fresh(), _patch(path, at + 4, struct.pack("<Q", 0))
    _expect(path, "invalid shape")
    fresh(), _patch(path, at + 12, struct.pack("<Q", 10**9))
    e = _expect(path, "runs past the end of the file")
    assert e.tensor == "q8"
    fresh(), _patch(path, at + 20, struct.pack("<I", 250))
    _expect(path, "unknown ggml type id 250")
    fresh(), _patch(path, at + 24, struct.pack("<Q", 7))
    _expect(path, "not a multiple of the alignment")
    fresh(), _patch(path, at + 24, struct.pack("<Q", 0))  # same data as the first tensor
    _expect(path, "overlaps")
    fresh()
    g = GGUFFile(path)
    with pytest.raises(GGUFError, match="missing required tensor") as ei:
        g.tensor("blk.0.nothing.weight")
    assert ei.value.tensor == "blk.0.nothing.weight"
    with pytest.raises(GGUFError, match="unsupported quant type Q2_K"):
        g.check_supported("q2k")
    with pytest.raises(GGUFError, match="missing required metadata key"):
        g.require("gemma3.block_count")


def test_truncated_tensor_data(small):
    path, _ = small
    data = open(path, "rb").read()
    end = max(
        t.offset + t.nbytes for t in GGUFFile(path).tensors.values()
    )  # the writer pads after the last one
    path.write_bytes(data[: end - 1])
    e = _expect(path, "truncated")
    assert e.tensor is not None


# ------------------------------------------------------------------------------------------------ fuzz
_BASE_CACHE: dict[int, bytes] = {}


def _base_bytes(tmp_path_factory, variant: int) -> bytes:
    if variant not in _BASE_CACHE:
        p = tmp_path_factory.mktemp("fuzz") / f"base{variant}.gguf"
        write_small_gguf(p, np.random.default_rng(variant), alignment=(None, 64)[variant % 2])
        _BASE_CACHE[variant] = p.read_bytes()
    return _BASE_CACHE[variant]


@st.composite
def corruptions(draw):
    variant = draw(st.integers(0, 1))
    kind = draw(st.sampled_from(["truncate", "bytes", "u64", "u32"]))
    n_edits = draw(st.integers(1, 4))
    edits = []
    for _ in range(n_edits):
        pos = draw(st.floats(0.0, 1.0, allow_nan=False))
        if kind == "bytes":
            val = draw(st.binary(min_size=1, max_size=4))
        elif kind == "u64":
            val = struct.pack(
                "<Q", draw(st.sampled_from([0, 1, 7, 2**31, 2**32 - 1, 2**40, 2**60, 2**63, 2**64 - 1]))
            )
        else:
            val = struct.pack("<I", draw(st.sampled_from([0, 1, 4, 13, 255, 2**16, 2**31, 2**32 - 1])))
        edits.append((pos, val))
    # bias toward the header/metadata/tensor-info region, where lengths and counts live
    header_bias = draw(st.booleans())
    return variant, kind, edits, header_bias


@settings(
    max_examples=1000,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(corruptions())
def test_fuzz_only_gguferror(tmp_path_factory, case):
    variant, kind, edits, header_bias = case
    data = bytearray(_base_bytes(tmp_path_factory, variant))
    span = min(len(data), 700) if header_bias else len(data)
    if kind == "truncate":
        data = data[: int(edits[0][0] * len(data))]
    else:
        for pos, val in edits:
            i = 8 + int(pos * (span - 8))  # keep magic + version (tested on their own above)
            data[i : i + len(val)] = val
    p = tmp_path_factory.mktemp("f") / "x.gguf"
    p.write_bytes(bytes(data))
    try:
        g = GGUFFile(p)
        touch_everything(g)
        try:
            from sparkinfer_cute.gguf.config import load_config

            load_config(g)
        except GGUFError:
            pass
        event("opened and read")
    except GGUFError as e:
        assert e.path == str(p) and e.reason
        event("GGUFError: " + " ".join(w for w in e.reason.split()[:3] if not w.strip("[(,").isdigit()))


def test_agrees_with_gguf_py_reader_on_real_gemma3(gemma3_path):
    """The real file (the 262144-entry vocabulary arrays too) against gguf-py's own reader (the independent parser)."""
    _assert_same_as_gguf_py(GGUFFile(gemma3_path), gguf.GGUFReader(gemma3_path))
