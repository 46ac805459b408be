"""The thread count of numpy's BLAS (OpenBLAS in the numpy wheels), set at run time for the CPU reference backend.

Why: OpenBLAS threads spin while they wait for work. When other processes keep the cores busy, a small product then
waits for descheduled threads: measured on a 2-core machine under load (load average 7), a 1x640 @ 640x2048 product
took 12.4 ms with 2 BLAS threads against 0.11 ms with 1, a 128-row prompt product 36.7 ms against 8.9 ms. Leaving one
core to the rest of the system avoids that; ``-t N`` on the command line chooses otherwise.

The count is process-wide (numpy has one BLAS). Found the way threadpoolctl finds it, without the dependency: the
loaded OpenBLAS library from /proc/self/maps and its ``*openblas_set_num_threads*`` entry point. Elsewhere (no
/proc, another BLAS) nothing is changed, and ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` still apply.
"""

from __future__ import annotations

import ctypes
import os

# the entry points of the OpenBLAS builds numpy ships (scipy-openblas, 64-bit ints) and of a system OpenBLAS
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """All available cores but one (at least 1), so that a busy system does not stall BLAS (module docstring)."""
    return max(1, available_cores() - 1)


def _openblas_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if ".so" in os.path.basename(p))


def set_blas_threads(n: int) -> bool:
    """Set numpy's BLAS to ``n`` threads; True if a BLAS library took it. Imports numpy first (so its BLAS is
    loaded)."""
    if n < 1:
        raise ValueError(f"BLAS threads must be >= 1 (got {n})")
    import numpy  # noqa: F401  (loads the BLAS library)

    done = False
    for path in _openblas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                fn(n)
                done = True
                break
    return done


def blas_threads() -> int | None:
    """numpy's BLAS thread count, or None when it cannot be read."""
    import numpy  # noqa: F401

    for path in _openblas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                return int(fn())
    return None
