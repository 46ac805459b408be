"""Memory-mapped GGUF reading through the ``gguf`` package, with validation.

Every problem with the file surfaces as :class:`sparkinfer_cute.errors.GGUFError` naming the file, the tensor and the
reason; nothing here reads outside the mapped file (each tensor's byte range is checked against the file size before a
view is handed out).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from ..errors import GGUFError

Q = GGMLQuantizationType

# Quant types this package reads (numpy reference dequant) and ships GPU kernels for.
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})


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
        return int(np.prod(self.shape, dtype=np.int64))

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


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    ``metadata`` maps every key to a plain Python value (str, int, float, bool, list). ``tensors`` maps names to
    :class:`TensorInfo`. ``raw(name)`` is a zero-copy uint8 view of a tensor's bytes shaped (…, n_out, row_bytes);
    ``dequant(name)`` is the float32 numpy reference.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(self.path, "no such file")
        self.file_size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(self.path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            self._reader = GGUFReader(self.path, "r")
        except GGUFError:
            raise
        except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on malformed input
            raise GGUFError(self.path, f"malformed or truncated GGUF header ({type(e).__name__}: {e})") from None
        self.version = int(self._reader.fields["GGUF.version"].contents()) if "GGUF.version" in self._reader.fields else 0
        if self.version not in (2, 3):
            raise GGUFError(self.path, f"unsupported GGUF version {self.version} (supported: 2, 3)")
        self.metadata = self._read_metadata()
        self.tensors = self._read_tensors()

    # ------------------------------------------------------------------ metadata
    def _read_metadata(self) -> dict:
        md = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                val = field.contents()
            except Exception as e:
                raise GGUFError(self.path, f"metadata key {key!r} cannot be decoded ({e})") from None
            md[key] = val
        return md

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

    # ------------------------------------------------------------------ tensors
    def _read_tensors(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            name = str(t.name)
            try:
                qt = GGMLQuantizationType(int(t.tensor_type))
            except ValueError:
                raise GGUFError(self.path, f"unknown ggml type id {int(t.tensor_type)}", name) from None
            shape = tuple(int(d) for d in t.shape)
            if not shape or any(d <= 0 for d in shape):
                raise GGUFError(self.path, f"invalid shape {shape}", name)
            bs, ts = GGML_QUANT_SIZES[qt]
            if shape[0] % bs:
                raise GGUFError(self.path, f"row length {shape[0]} is not a multiple of the {qt.name} block ({bs})", name)
            n_el = int(np.prod(shape, dtype=np.int64))
            nbytes = n_el // bs * ts
            offset = int(t.data_offset)
            if offset < 0 or offset + nbytes > self.file_size:
                raise GGUFError(
                    self.path,
                    f"data [{offset}, {offset + nbytes}) runs past the end of the file ({self.file_size} bytes): truncated",
                    name,
                )
            if name in out:
                raise GGUFError(self.path, "duplicate tensor name", name)
            out[name] = TensorInfo(name, qt, shape, offset, nbytes)
        return out

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, "missing required tensor", name) from None

    def check_supported(self, name: str) -> TensorInfo:
        ti = self.tensor(name)
        if ti.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(
                self.path,
                f"unsupported quant type {ti.ggml_type.name} (supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})",
                name,
            )
        return ti

    @cached_property
    def _mm(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of the tensor's bytes, shaped (…, n_out, row_bytes) (numpy order)."""
        ti = self.tensor(name)
        flat = self._mm[ti.offset : ti.offset + ti.nbytes]
        return flat.reshape(*ti.np_shape[:-1], ti.row_bytes)

    def dequant(self, name: str) -> np.ndarray:
        """float32 numpy array in numpy order (reversed ggml dims), via the package's own numpy dequantizers."""
        from .quants import dequantize

        ti = self.check_supported(name)
        return dequantize(self.raw(name), ti.ggml_type).reshape(ti.np_shape)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, arch={self.metadata.get('general.architecture')!r}, tensors={len(self.tensors)})"


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
