"""Memory-mapped GGUF reading with a bounds-checked parser of our own.

Every problem with the file surfaces as :class:`sparkinfer_cute.errors.GGUFError` naming the file, the tensor
(if any) and the reason: not a GGUF, unsupported version, truncated header / metadata / tensor data, unknown
ggml type, unsupported quant type, invalid shape, overlapping or misaligned tensor data, missing tensor. Never
an IndexError, struct.error or MemoryError, and never a read outside the file.

Why not ``gguf.GGUFReader``: it trusts the header's counts and lengths (a corrupted array length of 2**60
makes it build gigantic index arrays or loop for ages), and it builds a numpy field object per array element,
which takes ~9 s for the 262144-token Gemma 3 vocabulary. This parser checks every count and length against
the bytes that remain before reading, decodes fixed-size arrays with one ``np.frombuffer`` each, and opens the
same file in ~0.3 s. The layout is the GGUF v2/v3 spec (gguf-py ``gguf_reader.py``, ggml ``gguf.cpp``); the
checks mirror ``gguf.cpp``'s (power-of-two alignment, aligned tensor offsets, at most 4 dims, data inside the
file).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import GGUFError

Q = GGMLQuantizationType

# Quant types this package reads (numpy reference dequant) and ships GPU kernels for.
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 4
# Longest metadata array accepted. Real ones are vocabularies (262144 tokens for Gemma; scores/merges alike);
# a corrupted count that still "fits" in a multi-GB file (zero bytes read as empty strings) would otherwise
# build a list of billions of Python objects (MemoryError, or minutes of work) before failing.
MAX_ARRAY_LEN = 1 << 24

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones.
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32, _T_BOOL = range(8)
_T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 8, 9, 10, 11, 12
_SCALAR = {
    _T_UINT8: ("<B", np.dtype("<u1")),
    _T_INT8: ("<b", np.dtype("<i1")),
    _T_UINT16: ("<H", np.dtype("<u2")),
    _T_INT16: ("<h", np.dtype("<i2")),
    _T_UINT32: ("<I", np.dtype("<u4")),
    _T_INT32: ("<i", np.dtype("<i4")),
    _T_FLOAT32: ("<f", np.dtype("<f4")),
    _T_BOOL: ("<B", np.dtype("<u1")),
    _T_UINT64: ("<Q", np.dtype("<u8")),
    _T_INT64: ("<q", np.dtype("<i8")),
    _T_FLOAT64: ("<d", np.dtype("<f8")),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. ``shape`` is in ggml order (ne0, the contiguous input dimension, first)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def np_shape(self) -> tuple[int, ...]:
        """numpy order: (…, n_out, n_in) — reversed ggml dims."""
        return tuple(reversed(self.shape))

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def row_bytes(self) -> int:
        """Bytes of one ne0-row."""
        return self.shape[0] // self.block_size * self.type_size


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every overrun is a GGUFError saying what was being
    read."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.what = "header"

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                self.path,
                f"truncated or corrupt {self.what}: needs {n} bytes at offset {self.pos}, "
                f"file has {self.size}",
            )

    def scalar(self, fmt: str, n: int):
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(
                self.path, f"invalid UTF-8 in a string of the {self.what} at offset {self.pos - n}: {e}"
            ) from None

    def array(self, count: int, dtype: np.dtype) -> np.ndarray:
        if count > (self.size - self.pos) // dtype.itemsize:
            raise GGUFError(
                self.path,
                f"truncated or corrupt {self.what}: array of {count} x {dtype.itemsize} bytes "
                f"at offset {self.pos} "
                f"runs past the end of the file ({self.size} bytes)",
            )
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return a


def _read_value(c: _Cursor, vtype: int, depth: int = 0):
    if vtype in _SCALAR:
        fmt, dt = _SCALAR[vtype]
        v = c.scalar(fmt, dt.itemsize)
        return bool(v) if vtype == _T_BOOL else v
    if vtype == _T_STRING:
        return c.string()
    if vtype == _T_ARRAY:
        if depth >= _MAX_ARRAY_NESTING:
            raise GGUFError(c.path, f"corrupt {c.what}: arrays nested deeper than {_MAX_ARRAY_NESTING}")
        etype = c.u32()
        count = c.u64()
        if count > MAX_ARRAY_LEN:
            raise GGUFError(
                c.path, f"corrupt {c.what}: array of {count} elements (more than {MAX_ARRAY_LEN})"
            )
        if etype in _SCALAR:
            a = c.array(count, _SCALAR[etype][1])
            if etype == _T_BOOL:
                return (a != 0).tolist()
            return a.tolist()
        if etype == _T_STRING:
            if count > (c.size - c.pos) // 8:  # every string has at least its 8-byte length
                raise GGUFError(
                    c.path, f"truncated or corrupt {c.what}: {count} strings cannot fit in the file"
                )
            return [c.string() for _ in range(count)]
        if etype == _T_ARRAY:
            if count > (c.size - c.pos) // 12:  # every nested array has at least its type and count
                raise GGUFError(
                    c.path, f"truncated or corrupt {c.what}: {count} arrays cannot fit in the file"
                )
            return [_read_value(c, _T_ARRAY, depth + 1) for _ in range(count)]
        raise GGUFError(c.path, f"corrupt {c.what}: unknown array element type {etype}")
    raise GGUFError(c.path, f"corrupt {c.what}: unknown metadata value type {vtype}")


class GGUFHeader:
    """What a GGUF header answers, for any holder of ``path``, ``metadata`` and ``tensors`` (name -> TensorInfo):
    :class:`GGUFFile`, and gguf/synth.py's ``SyntheticHeader`` (a synthetic model's header, no file)."""

    path: str
    metadata: dict
    tensors: dict

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(self.path, "missing metadata key general.architecture")
        return arch

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise GGUFError(self.path, f"missing required metadata key {key!r}")
        return self.metadata[key]

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, "missing required tensor", name) from None


class GGUFFile(GGUFHeader):
    """A validated, memory-mapped GGUF file.

    ``metadata`` maps every key to a plain Python value (str, int, float, bool, list). ``tensors`` maps names
    to :class:`TensorInfo` (file order). ``raw(name)`` is a zero-copy uint8 view of a tensor's bytes shaped
    (…, n_out, row_bytes); ``dequant(name)`` is the float32 numpy reference. ``version``, ``alignment`` and
    ``data_offset`` (absolute start of the tensor data section) describe the container.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            if not os.path.isfile(self.path):
                raise GGUFError(self.path, "no such file")
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 4 or f.read(4) != GGUF_MAGIC:
                    f.seek(0)
                    raise GGUFError(
                        self.path, f"not a GGUF file (magic {f.read(4)!r}, expected {GGUF_MAGIC!r})"
                    )
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(self.path, f"cannot read the file ({e})") from None
        self._parse()

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        c = _Cursor(self._map, self.file_size, self.path)
        c.pos = 4
        self.version = c.u32()
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (byte-swapped: a big-endian GGUF?)" if self.version & 0xFFFF == 0 else ""
            raise GGUFError(
                self.path, f"unsupported GGUF version {self.version}{hint} (supported: {SUPPORTED_VERSIONS})"
            )
        n_tensors, n_kv = c.u64(), c.u64()
        # Minimum encoded sizes: a KV is key length (8) + type (4) + >= 1 value byte; a tensor info is name
        # length (8) + n_dims (4) + >= 1 dim (8) + type (4) + offset (8). Larger counts cannot be real.
        if n_kv > (self.file_size - c.pos) // 13 or n_tensors > (self.file_size - c.pos) // 32:
            raise GGUFError(
                self.path,
                f"corrupt header: {n_tensors} tensors / {n_kv} metadata keys cannot fit in the file",
            )
        self.metadata = self._read_metadata(c, n_kv)
        self.alignment = self._alignment()
        infos = self._read_tensor_infos(c, n_tensors)
        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        self.tensors = self._place_tensors(infos)

    def _read_metadata(self, c: _Cursor, n_kv: int) -> dict:
        md: dict = {}
        for i in range(n_kv):
            c.what = f"metadata (key #{i})"
            key = c.string()
            c.what = f"metadata value of {key!r}"
            vtype = c.u32()
            val = _read_value(c, vtype)
            if key in md:
                raise GGUFError(self.path, f"duplicate metadata key {key!r}")
            md[key] = val
        return md

    def _alignment(self) -> int:
        a = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a & (a - 1):
            raise GGUFError(self.path, f"general.alignment must be a positive power of two, got {a!r:.40}")
        return a

    def _read_tensor_infos(self, c: _Cursor, n_tensors: int) -> list[tuple[str, int, tuple[int, ...], int]]:
        infos = []
        for i in range(n_tensors):
            c.what = f"tensor info #{i}"
            name = c.string()
            c.what = f"tensor info of {name!r}"
            n_dims = c.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(self.path, f"invalid number of dimensions {n_dims} (1..{MAX_DIMS})", name)
            shape = tuple(c.u64() for _ in range(n_dims))
            type_id = c.u32()
            rel_offset = c.u64()
            infos.append((name, type_id, shape, rel_offset))
        return infos

    def _place_tensors(self, infos) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for name, type_id, shape, rel_offset in infos:
            if name in out:
                raise GGUFError(self.path, "duplicate tensor name", name)
            try:
                qt = GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFError(self.path, f"unknown ggml type id {type_id}", name) from None
            if qt not in GGML_QUANT_SIZES:
                raise GGUFError(self.path, f"ggml type {qt.name} has no known block size", name)
            if any(d <= 0 for d in shape):
                raise GGUFError(self.path, f"invalid shape {shape} (every dimension must be >= 1)", name)
            bs, ts = GGML_QUANT_SIZES[qt]
            if shape[0] % bs:
                raise GGUFError(
                    self.path, f"row length {shape[0]} is not a multiple of the {qt.name} block ({bs})", name
                )
            n_el = 1
            for d in shape:
                n_el *= d  # Python ints: no overflow; absurd sizes fail the range check below
            nbytes = n_el // bs * ts
            if rel_offset % self.alignment:
                raise GGUFError(
                    self.path,
                    f"data offset {rel_offset} is not a multiple of the alignment {self.alignment}",
                    name,
                )
            start = self.data_offset + rel_offset
            if start + nbytes > self.file_size:
                raise GGUFError(
                    self.path,
                    f"data [{start}, {start + nbytes}) runs past the end of the file "
                    f"({self.file_size} bytes): "
                    "truncated",
                    name,
                )
            out[name] = TensorInfo(name, qt, shape, start, nbytes)
        # Tensor data regions must not overlap (the writer lays them out back to back with alignment padding).
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values() if t.nbytes)
        for (_, end0, n0), (s1, _, n1) in zip(spans, spans[1:], strict=False):
            if s1 < end0:
                raise GGUFError(self.path, f"data overlaps that of tensor {n0!r}", n1)
        return out

    # ------------------------------------------------------------------ metadata
    # ------------------------------------------------------------------ tensors
    def check_supported(self, name: str) -> TensorInfo:
        ti = self.tensor(name)
        if ti.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(
                self.path,
                f"unsupported quant type {ti.ggml_type.name} (supported: "
                f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))})",
                name,
            )
        return ti

    @cached_property
    def _mm(self) -> np.ndarray:
        return np.frombuffer(self._map, dtype=np.uint8)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only uint8 view of the tensor's bytes, shaped (…, n_out, row_bytes) (numpy
        order)."""
        ti = self.tensor(name)
        flat = self._mm[ti.offset : ti.offset + ti.nbytes]
        return flat.reshape(*ti.np_shape[:-1], ti.row_bytes)

    def dequant(self, name: str) -> np.ndarray:
        """float32 numpy array in numpy order (reversed ggml dims), via the package's own numpy
        dequantizers."""
        from .quants import dequantize

        ti = self.check_supported(name)
        return dequantize(self.raw(name), ti.ggml_type).reshape(ti.np_shape)

    # ------------------------------------------------------------------ summary
    def describe(self) -> str:
        """A short human summary: architecture, name, tensor count, type histogram, sizes."""
        hist = Counter(t.ggml_type.name for t in self.tensors.values())
        data = sum(t.nbytes for t in self.tensors.values())
        n_params = sum(t.n_elements for t in self.tensors.values())
        types = ", ".join(f"{k} x{v}" for k, v in sorted(hist.items(), key=lambda kv: -kv[1]))
        return (
            f"{os.path.basename(self.path)}: GGUF v{self.version}, "
            f"arch {self.metadata.get('general.architecture')!r}"
            f" ({self.metadata.get('general.name', '?')}), {len(self.metadata)} metadata keys, "
            f"{len(self.tensors)} tensors ({n_params / 1e6:.1f}M params, {data / 2**20:.1f} MiB data; "
            f"{types}), file {self.file_size / 2**20:.1f} MiB"
        )

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture")
        return f"GGUFFile({self.path!r}, arch={arch!r}, tensors={len(self.tensors)})"


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
