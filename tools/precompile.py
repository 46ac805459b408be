"""Fill the kernel disk cache with parallel compiles, so a GPU session spends its minutes running, not compiling.

    python tools/precompile.py [--jobs N] [--only NAME ...]

Compiles (through each kernel's cached ``compile_*``, so the objects land in ``SPARKINFER_CACHE_DIR``) every
compile-gate config of the current kernel family plus the configs the prefill-GEMM GPU tests draw
(``tests/kernels/test_quant_gemm.py precompile_configs``), in a pool of spawned processes (``cute.compile`` is not
thread-safe). The disk cache is only written where a GPU driver is present (kernels/compile.py), so this is a GPU-host
tool; later processes load each object in ~1 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
import multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jobs(only):
    sys.path.insert(0, ROOT)
    from sparkinfer_cute.kernels.arch import kernel_family
    from sparkinfer_cute.kernels.registry import load_all_kernels

    jobs = []
    for name, e in load_all_kernels().items():
        if (only and name not in only) or kernel_family() not in e.families:
            continue
        jobs += [(name, cfg) for cfg in e.configs]
    if not only or "quant_gemm" in only:
        from tests.kernels.test_quant_gemm import precompile_configs

        jobs += [("quant_gemm", cfg) for cfg in precompile_configs()]
    return jobs


def _compile(job):
    sys.path.insert(0, ROOT)
    from sparkinfer_cute.kernels.registry import load_all_kernels

    name, cfg = job
    t0 = time.perf_counter()
    try:
        load_all_kernels()[name].compile_fn(**cfg)
        return name, cfg, time.perf_counter() - t0, ""
    except Exception as e:  # report and go on: the tests will show the failure in context
        return name, cfg, time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:200]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--only", nargs="*", default=[])
    args = ap.parse_args(argv)
    jobs = _jobs(set(args.only))
    t0 = time.perf_counter()
    bad = 0
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(_compile, j) for j in jobs]):
            name, cfg, dt, err = fut.result()
            if err:
                bad += 1
                print(f"FAILED {name} {cfg}: {err}", flush=True)
    print(f"precompiled {len(jobs) - bad} of {len(jobs)} kernel configs in {time.perf_counter() - t0:.0f} s "
          f"({args.jobs} processes)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
