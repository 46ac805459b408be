"""Helpers for GPU tests and notebooks: poisoned outputs and the check that a kernel wrote every element."""

from __future__ import annotations

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
