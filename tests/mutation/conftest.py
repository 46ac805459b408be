"""The mutation check's table is printed in the test summary (the ``mutation_report`` fixture collects it), so CI
logs show the kill rate and the margins of every injected bug."""

from __future__ import annotations

import os

import pytest

_KEY = pytest.StashKey[list]()


@pytest.fixture
def mutation_report(request):
    """A list; text appended to it is printed in the terminal summary."""
    return request.config.stash.setdefault(_KEY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reports = config.stash.get(_KEY, [])
    if reports:
        terminalreporter.section("mutation check (tests/mutation)", sep="-")
        for text in reports:
            for line in text.splitlines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The mutation check runs many small reference forwards: one BLAS thread (OpenBLAS threads spin while they
    wait, which costs 3-10x wall time on a busy 2-core machine: sparkinfer_cute/blas_threads.py). Restored after."""
    from sparkinfer_cute.blas_threads import available_cores, set_blas_threads

    set_blas_threads(1)
    yield
    set_blas_threads(int(os.environ.get("OPENBLAS_NUM_THREADS") or available_cores()))
