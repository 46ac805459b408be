"""Shared fixtures for kernel tests (GPU gating itself lives in tests/conftest.py; importable helpers live in
``sparkinfer_cute.runtime.testing``: ``poisoned``, ``assert_all_written``).

Fixtures: ``rel_err`` (the package's float64 max-relative-error helper), ``poisoned`` (a factory of device arrays
filled with 0xFF bytes = NaN for f32/f16, -1 for int32, so an element the kernel never wrote is detected), and
``rng`` (a fresh numpy Generator; seeds are printed on failure by hypothesis / visible in the fixture repr).
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.reference.kernel_refs import rel_err as _rel_err


@pytest.fixture
def rel_err():
    return _rel_err


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture(name="poisoned")
def _poisoned_fixture():
    from sparkinfer_cute.runtime.testing import poisoned

    return poisoned
