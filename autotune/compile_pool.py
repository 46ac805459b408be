"""Compile candidate configs in parallel worker processes.

``cute.compile`` is not thread-safe (MLIR thread-local state; ``kernels/compile.py`` serializes it with a lock), so
parallel compiles need processes. Workers start with the ``spawn`` method (a fork of a process that has initialized
CUDA or MLIR is unsafe), import the adapter module that declares the op (it registers the op again in the worker)
and call the op's ``compile``: the kernel's own ``compile_*`` function, whose ``kernel_cache`` writes the compiled
object to the package's disk cache (``kernels/compile.py``, atomic writes under a file lock). The parent's later call
with the same arguments then loads it from disk in ~1 ms instead of compiling.

Without the disk cache (``SPARKINFER_DISK_CACHE=0``, or no GPU driver: ``disk_cache_enabled()``) a worker's compile
cannot reach the parent, so everything compiles in the parent, one after another (``workers=0`` does the same).
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Callable, Hashable

from .registry import REGISTRY


def _compile_one(module: str, op_name: str, config: dict, shape: dict) -> str | None:
    """Worker body: compile one config; None on success, else a one-line error."""
    try:
        importlib.import_module(module)
        REGISTRY[op_name].compile(config, shape)
        return None
    except Exception as e:  # a failing candidate is rejected, never fatal
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def default_workers() -> int:
    """Worker processes: one per core, at most 16 (each holds a cutlass import, ~0.5-1 GB)."""
    return max(1, min(16, os.cpu_count() or 1))


def disk_cache_usable() -> bool:
    from sparkinfer_cute.kernels.compile import disk_cache_enabled

    return disk_cache_enabled()


def compile_all(jobs: dict[Hashable, tuple], *, workers: int, deadline: float | None = None,
                on_done: Callable[[Hashable, str | None], None] | None = None,
                clock: Callable[[], float] = time.monotonic) -> dict[Hashable, str | None]:
    """Compile every job ``{key: (op, config, shape)}``; returns ``{key: None | error}``. Jobs not started by
    ``deadline`` (on ``clock``) are not compiled (key absent). ``on_done(key, error)`` after each."""
    results: dict[Hashable, str | None] = {}

    def done(key, err):
        results[key] = err
        if on_done is not None:
            on_done(key, err)

    if workers <= 0:
        for key, (op, config, shape) in jobs.items():
            if deadline is not None and clock() > deadline:
                break
            done(key, _compile_one(op.module, op.name, config, shape))
        return results

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = iter(jobs.items())
    with ProcessPoolExecutor(max_workers=min(workers, max(1, len(jobs))), mp_context=mp.get_context("spawn")) as ex:
        running = {}

        def submit_next() -> bool:
            if deadline is not None and clock() > deadline:
                return False
            nxt = next(pending, None)
            if nxt is None:
                return False
            key, (op, config, shape) = nxt
            try:
                running[ex.submit(_compile_one, op.module, op.name, config, shape)] = key
            except Exception as e:  # the pool broke (a worker crashed): the remaining jobs fail the same way
                done(key, f"compile pool failed: {type(e).__name__}: {e}"[:300])
            return True

        while True:
            # keep the pool busy but never queue far ahead, so a budget stop leaves little compiled for nothing
            while len(running) < 2 * workers and submit_next():
                pass
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                key = running.pop(f)
                try:
                    err = f.result()
                except Exception as e:  # the worker died (e.g. killed for memory)
                    err = f"compile worker failed: {type(e).__name__}: {e}"[:300]
                done(key, err)
    return results
