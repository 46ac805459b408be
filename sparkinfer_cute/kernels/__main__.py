"""``python -m sparkinfer_cute.kernels --compile-all --arch sm_120a`` (the compile gate; no GPU needed)
``python -m sparkinfer_cute.kernels --compile-all --arch sm_90a --spills`` (+ spill report, with a toolkit ptxas).
``python -m sparkinfer_cute.kernels --launch-overhead`` (host µs per launch; GPU).
``python -m sparkinfer_cute.kernels --list`` (registered kernels and configs)."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli_args import ArgumentParser, int_at_least, require_gpu


def _arch_list(s: str) -> list[str]:
    """``--arch`` converter: comma-separated compile targets or 'all', checked at parse time."""
    from ..errors import DeviceError
    from .arch import SUPPORTED_TARGETS, normalize_target

    out = []
    for part in s.split(","):
        try:
            out.extend(SUPPORTED_TARGETS if part.strip() == "all" else [normalize_target(part)])
        except DeviceError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.kernels", description=__doc__)
    ap.add_argument("--compile-all", action="store_true", help="compile every registered config (the gate)")
    ap.add_argument("--arch", action="append", default=None, type=_arch_list,
                    help="sm_120a | sm_121a | sm_90a | all (repeatable; default sm_120a)")
    ap.add_argument("--kernel", action="append", default=None, help="only these registered kernel names")
    ap.add_argument("--jobs", "-j", type=int_at_least(1), default=int(os.environ.get("SPARKINFER_GATE_JOBS", "1")),
                    help="compile processes (cute.compile is not thread-safe)")
    ap.add_argument("--list", action="store_true", help="list registered kernels and configs")
    ap.add_argument("--launch-overhead", action="store_true", help="host µs per launch of each kernel (GPU)")
    ap.add_argument("-n", type=int_at_least(1), default=1000, help="timed calls for --launch-overhead")
    ap.add_argument("-v", "--verbose", action="store_true", help="--compile-all: a line per compile on stderr")
    ap.add_argument("--spills", action="store_true",
                    help="--compile-all: also assemble each config with the CUDA toolkit's ptxas -v and report "
                         "its stack frame and register-spill bytes (a column, and a SPILL line per spilling config)")
    args = ap.parse_args(argv)
    if args.launch_overhead:
        require_gpu(ap.prog, "--launch-overhead")

    from . import registry

    archs = list(dict.fromkeys(a for group in args.arch or [["sm_120a"]] for a in group))
    if args.kernel:
        registry.load_all_kernels()
        unknown = sorted(set(args.kernel) - set(registry.REGISTRY))
        if unknown:
            ap.error(f"unknown kernel {', '.join(unknown)}; registered: {', '.join(sorted(registry.REGISTRY))}")

    if args.list:
        registry.load_all_kernels()
        for e in registry.REGISTRY.values():
            print(f"{e.name} ({e.module}): {len(e.configs)} configs")
            for c in e.configs:
                print(f"    {c}")
        for mod, tb in registry.IMPORT_ERRORS.items():
            print(f"IMPORT ERROR {mod}:\n{tb}")
        return 1 if registry.IMPORT_ERRORS else 0
    if args.launch_overhead:
        for name, us in registry.launch_overhead_us(args.kernel, n=args.n).items():
            print(f"{name:24s} {us:8.2f} us/launch (median of {args.n})")
        return 0
    if args.compile_all:
        os.environ.setdefault("SPARKINFER_DISK_CACHE", "0")
        if args.spills and registry.ptxas_executable() is None:
            ap.error("--spills needs a CUDA toolkit ptxas (on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin)")
        return registry.main_compile_all(archs, args.kernel, args.jobs, args.verbose, spills=args.spills)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
