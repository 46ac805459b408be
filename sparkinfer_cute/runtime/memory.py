"""Device memory: ``DeviceArray`` (cuMemAlloc'ed, freed on GC), copies, poison fills, views, DLPack/CAI export,
a ``Workspace`` of reusable scratch buffers, and ``as_device`` for numpy-or-device kernel wrappers.

Copy semantics: with ``stream=None`` the plain synchronous driver copies/memsets are used (they run on the legacy
NULL stream, which is ordered against :func:`default_stream` because that stream is a blocking stream). With a
stream, the ``*Async`` variants are enqueued on it (``to_numpy`` then synchronizes that stream).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DeviceError, DeviceOutOfMemoryError
from . import dlpack as _dl
from ._driver import check, driver
from .device import get_device
from .stream import Event, Stream, default_stream, resolve_stream


class _Allocation:
    """Owns one cuMemAlloc block; cuMemFree on GC."""

    __slots__ = ("ptr", "nbytes", "device", "__weakref__")

    def __init__(self, nbytes: int):
        self.ptr = 0
        self.nbytes = int(nbytes)
        self.device = get_device()
        if self.nbytes == 0:
            return
        cu = driver()
        res = cu.cuMemAlloc(self.nbytes)
        if res[0] == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            try:
                free = self.device.free_memory()
            except Exception:
                free = -1
            raise DeviceOutOfMemoryError(
                f"cuMemAlloc of {self.nbytes} bytes ({self.nbytes / 2**20:.1f} MiB) failed: CUDA_ERROR_OUT_OF_MEMORY; "
                f"free device memory {free} bytes ({free / 2**20:.1f} MiB) of {self.device.total_memory} on "
                f"{self.device.name}"
            )
        self.ptr = int(check(res, "cuMemAlloc"))

    def __del__(self):
        if getattr(self, "ptr", 0):
            try:
                driver().cuMemFree(self.ptr)
            except Exception:
                pass
            self.ptr = 0


def _shape_tuple(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


class DeviceArray:
    """A C-contiguous array in device memory: ``.ptr`` (int), ``.shape``, ``.dtype`` (numpy), ``.nbytes``."""

    def __init__(self, shape, dtype, *, _alloc: _Allocation | None = None, _offset: int = 0):
        self.shape = _shape_tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        if _alloc is None:
            _alloc = _Allocation(self.nbytes)
        if _offset + self.nbytes > _alloc.nbytes:
            raise ValueError(f"view of {self.nbytes} bytes at offset {_offset} exceeds allocation of {_alloc.nbytes}")
        self._alloc = _alloc
        self._offset = int(_offset)

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, shape, dtype=np.float32) -> "DeviceArray":
        return cls(shape, dtype)

    @classmethod
    def zeros(cls, shape, dtype=np.float32, stream=None) -> "DeviceArray":
        a = cls(shape, dtype)
        a.fill_bytes(0, stream)
        return a

    @classmethod
    def from_numpy(cls, arr, stream=None) -> "DeviceArray":
        arr = np.ascontiguousarray(arr)
        a = cls(arr.shape, arr.dtype)
        a.copy_from_numpy(arr, stream)
        return a

    # ---------------------------------------------------------------- properties
    @property
    def ptr(self) -> int:
        return self._alloc.ptr + self._offset if self._alloc.ptr else 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def device(self):
        return self._alloc.device

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"

    # ---------------------------------------------------------------- copies / fills
    def copy_from_numpy(self, arr, stream=None) -> "DeviceArray":
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.nbytes != self.nbytes:
            raise ValueError(f"copy_from_numpy: {arr.nbytes} bytes into a device array of {self.nbytes} bytes")
        if self.nbytes == 0:
            return self
        self.device.make_current()
        cu = driver()
        if stream is None:
            check(cu.cuMemcpyHtoD(self.ptr, arr.ctypes.data, self.nbytes), "cuMemcpyHtoD")
        else:
            # Pageable source: the driver stages it before returning, so ``arr`` may die right after the call.
            s = resolve_stream(stream)
            check(cu.cuMemcpyHtoDAsync(self.ptr, arr.ctypes.data, self.nbytes, s.cu), "cuMemcpyHtoDAsync")
        return self

    def to_numpy(self, stream=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        if self.nbytes == 0:
            return out
        self.device.make_current()
        cu = driver()
        if stream is None:
            check(cu.cuMemcpyDtoH(out.ctypes.data, self.ptr, self.nbytes), "cuMemcpyDtoH")
        else:
            s = resolve_stream(stream)
            check(cu.cuMemcpyDtoHAsync(out.ctypes.data, self.ptr, self.nbytes, s.cu), "cuMemcpyDtoHAsync")
            s.synchronize()
        return out

    def copy_from(self, other: "DeviceArray", stream=None) -> "DeviceArray":
        """Device-to-device copy of ``other`` (same byte size) into self."""
        if other.nbytes != self.nbytes:
            raise ValueError(f"copy_from: {other.nbytes} bytes into {self.nbytes}")
        if self.nbytes:
            self.device.make_current()
            s = resolve_stream(stream)
            check(driver().cuMemcpyDtoDAsync(self.ptr, other.ptr, self.nbytes, s.cu), "cuMemcpyDtoDAsync")
        return self

    def fill_bytes(self, value: int, stream=None) -> "DeviceArray":
        """Set every byte to ``value`` (0xFF poisons f32/f16 with NaN and int32 with -1)."""
        if self.nbytes == 0:
            return self
        self.device.make_current()
        cu = driver()
        if stream is None:
            check(cu.cuMemsetD8(self.ptr, int(value) & 0xFF, self.nbytes), "cuMemsetD8")
        else:
            s = resolve_stream(stream)
            check(cu.cuMemsetD8Async(self.ptr, int(value) & 0xFF, self.nbytes, s.cu), "cuMemsetD8Async")
        return self

    # ---------------------------------------------------------------- views
    def view(self, dtype=None, shape=None, offset_bytes: int = 0) -> "DeviceArray":
        """A new array over the same memory (reinterpreting bytes); ``shape`` defaults to the whole remaining span."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if shape is None:
            span = self.nbytes - offset_bytes
            if span % dtype.itemsize:
                raise ValueError(f"{span} bytes is not a whole number of {dtype} items")
            shape = (span // dtype.itemsize,)
        return DeviceArray(shape, dtype, _alloc=self._alloc, _offset=self._offset + int(offset_bytes))

    def reshape(self, *shape) -> "DeviceArray":
        shape = _shape_tuple(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return self.view(self.dtype, shape)

    def __getitem__(self, idx) -> "DeviceArray":
        """Leading-axis indexing only (an int or a step-1 slice): the result stays contiguous."""
        if not self.shape:
            raise IndexError("0-d DeviceArray")
        row = math.prod(self.shape[1:]) * self.itemsize
        n = self.shape[0]
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {idx} out of range for axis 0 of size {n}")
            return self.view(self.dtype, self.shape[1:], i * row)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                raise IndexError("DeviceArray slices must have step 1")
            return self.view(self.dtype, (max(stop - start, 0), *self.shape[1:]), start * row)
        raise IndexError(f"unsupported DeviceArray index {idx!r}")

    # ---------------------------------------------------------------- interop
    def __dlpack_device__(self) -> tuple[int, int]:
        return (_dl.KDL_CUDA, self.device.ordinal)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("DeviceArray.__dlpack__ does not copy")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"DeviceArray lives on {self.__dlpack_device__()}, not {dl_device}")
        # Our kernels run on default_stream() (a blocking stream, hence ordered before the legacy stream = 1 / None).
        # A consumer on another stream gets an event wait so it sees our finished writes; -1 means "no sync".
        if stream is not None and stream not in (-1, 1):
            ev = Event(timing=False).record(default_stream())
            check(driver().cuStreamWaitEvent(driver().CUstream(int(stream)), ev.cu, 0), "cuStreamWaitEvent")
        return _dl.make_capsule(self.ptr, self.shape, self.dtype, _dl.KDL_CUDA, self.device.ordinal, self)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3}


def as_device(x, stream=None, dtype=None) -> tuple[DeviceArray, bool]:
    """``(DeviceArray, was_numpy)``: a DeviceArray passes through; anything else is converted with numpy (to
    ``dtype`` if given) and uploaded. Wrappers return numpy when ``was_numpy``."""
    if isinstance(x, DeviceArray):
        if dtype is not None and x.dtype != np.dtype(dtype):
            raise TypeError(f"expected a {np.dtype(dtype)} DeviceArray, got {x.dtype}")
        return x, False
    arr = np.ascontiguousarray(x, dtype=dtype)
    return DeviceArray.from_numpy(arr, stream), True


class Workspace:
    """Scratch device buffers reused by (tag, size class).

    ``get(shape, dtype, tag)`` returns a view of a buffer whose byte size is the request rounded up to 256 B; the
    same tag and size class always returns the same memory, so pointers are stable (safe to capture into a CUDA
    graph). Use distinct tags for buffers that are live at the same time.
    """

    ALIGN = 256

    def __init__(self):
        self._buffers: dict[tuple[str, int], DeviceArray] = {}

    def get(self, shape, dtype=np.float32, tag: str = "") -> DeviceArray:
        shape = _shape_tuple(shape)
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        size_class = max(self.ALIGN, -(-nbytes // self.ALIGN) * self.ALIGN)
        key = (tag, size_class)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = DeviceArray((size_class,), np.uint8)
        return buf.view(dt, shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def __len__(self) -> int:
        return len(self._buffers)

    def clear(self) -> None:
        """Drop every buffer (memory is freed once no view of it is alive)."""
        self._buffers.clear()


__all__ = ["DeviceArray", "Workspace", "as_device", "DeviceError", "DeviceOutOfMemoryError", "Stream"]
