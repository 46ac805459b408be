"""Helpers for GPU tests and notebooks: poisoned outputs and the check that a kernel wrote every element; and
:class:`HostDeviceArray`, a host-memory stand-in for DeviceArray in CPU tests of launch marshalling and host logic."""

from __future__ import annotations

import itertools

import numpy as np

from .memory import DeviceArray


def poisoned(shape, dtype=np.float32) -> DeviceArray:
    """An uninitialized DeviceArray with every byte 0xFF (NaN for f32/f16, -1 for signed ints)."""
    return DeviceArray.empty(shape, dtype).fill_bytes(0xFF)


def assert_all_written(y, what: str = "output") -> None:
    """Fail if any element still holds the 0xFF poison (NaN for floats, -1 for signed ints)."""
    y = np.asarray(y)
    bad = np.isnan(y) if y.dtype.kind == "f" else (y == np.array(-1).astype(y.dtype))
    assert not bad.any(), f"{what}: {int(bad.sum())} of {y.size} elements never written (poison left)"


class HostDeviceArray:
    """Stands in for :class:`DeviceArray` where there is no GPU (monkeypatched over ``sparkinfer_cute.runtime``'s):
    host memory (``host``) at fake, distinct, 4 KiB-aligned addresses (``ptr``), with the constructors and copies the
    kernel wrappers and benchmark harnesses call. Nothing is launched on it; tests check what would be passed."""

    _addr = itertools.count(1 << 20, 1 << 12)

    def __init__(self, shape, dtype=np.float32):
        self.host = np.zeros(shape, dtype)
        self.shape, self.dtype, self.nbytes, self.size = self.host.shape, self.host.dtype, self.host.nbytes, \
            self.host.size
        self.ptr = next(self._addr)

    @classmethod
    def empty(cls, shape, dtype=np.float32, stream=None):
        return cls(shape, dtype)

    @classmethod
    def zeros(cls, shape, dtype=np.float32, stream=None):
        return cls(shape, dtype)

    @classmethod
    def from_numpy(cls, arr, stream=None):
        a = cls(np.shape(arr), np.asarray(arr).dtype)
        a.host[...] = arr
        return a

    def copy_from_numpy(self, arr, stream=None):
        self.host[...] = np.asarray(arr).reshape(self.shape)

    def fill_bytes(self, value, stream=None):
        self.host.view(np.uint8)[...] = value
        return self

    def to_numpy(self, stream=None):
        return self.host.copy()
