"""The mutation check's table is printed in the test summary (``REPORTS``: filled by test_mutation_table.py), so
CI logs show the kill rate and the margins of every injected bug."""

from __future__ import annotations

import os

REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if REPORTS:
        terminalreporter.section("mutation check (tests/mutation)", sep="-")
        for text in REPORTS:
            for line in text.splitlines():
                terminalreporter.write_line(line)


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The mutation check runs many small reference forwards: one BLAS thread (OpenBLAS threads spin while they
    wait, which costs 3-10x wall time on a busy 2-core machine: sparkinfer_cute/blas_threads.py). Restored after."""
    from sparkinfer_cute.blas_threads import available_cores, set_blas_threads

    set_blas_threads(1)
    yield
    set_blas_threads(int(os.environ.get("OPENBLAS_NUM_THREADS") or available_cores()))
