"""Shared helpers for kernel tests (GPU gating itself lives in tests/conftest.py).

Fixtures: ``rel_err`` (the package's float64 max-relative-error helper), ``poisoned`` (a factory of device arrays
filled with 0xFF bytes = NaN for f32/f16, -1 for int32, so an element the kernel never wrote is detected), and
``rng`` (a fresh numpy Generator; seeds are printed on failure by hypothesis / visible in the fixture repr).
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.kernels.common import rel_err as _rel_err


@pytest.fixture
def rel_err():
    return _rel_err


@pytest.fixture
def rng():
    return np.random.default_rng()


def poisoned(shape, dtype):
    """An uninitialized DeviceArray with every byte 0xFF."""
    from sparkinfer_cute.runtime import DeviceArray

    return DeviceArray.empty(shape, dtype).fill_bytes(0xFF)


@pytest.fixture(name="poisoned")
def _poisoned_fixture():
    return poisoned


def assert_all_written(y: np.ndarray, what: str = "output"):
    """Fail if any element still holds the 0xFF poison (NaN for floats, -1 for signed ints)."""
    y = np.asarray(y)
    if y.dtype.kind == "f":
        bad = np.isnan(y)
    else:
        bad = y == np.array(-1).astype(y.dtype)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {y.size} elements never written (poison left)"
