"""Compile-gate registry: every kernel module registers the static configurations the models use, and the gate
(``python -m sparkinfer_cute.kernels --compile-all --arch sm_120a``) compiles each of them for real (the *uncached*
compile function) and reports shared memory, registers and compile time, failing on any error or on shared memory
over the family budget (101376 B for sm120, i.e. every sm_120a/sm_121a kernel).

Usage in a kernel module::

    from .registry import register
    register("rmsnorm", compile_rmsnorm, [dict(N=2048), dict(N=640)], launch_example=_example)

``launch_example(**config)`` (optional) returns a zero-argument callable that launches the kernel once on small
device buffers, marshalling its arguments exactly like the public wrapper; :func:`launch_overhead_us` times it.

Where the numbers come from (no GPU needed):
- registers: ``EIATTR_REGCOUNT`` (0x2f) entries of the cubin's ``.nv.info*`` ELF sections;
- static shared memory: non-extern ``.shared`` declarations in the PTX;
- dynamic shared memory: the ``sharedMem`` field (index 2 of the ``cudaLaunchConfig_t`` struct) that the host
  function stores before ``_cudaLaunchKernelEx`` in the lowered host IR (``compiled.ir_module``). The DSL fills it
  from ``cute.kernel_smem_size`` (the SmemAllocator total) when ``launch(smem=None)``, or from ``smem=``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

# Modules of this package that are infrastructure or device helpers, not kernels (they register nothing).
_NON_KERNEL_MODULES = {"arch", "common", "compile", "microbench", "paged_kv", "quant_decode", "quant_dot",
                       "registry"}


@dataclass
class KernelEntry:
    name: str
    compile_fn: Callable
    configs: list[dict]
    module: str
    launch_example: Callable | None = None
    families: tuple[str, ...] = ("sm120",)


REGISTRY: dict[str, KernelEntry] = {}
IMPORT_ERRORS: dict[str, str] = {}


def register(name: str, compile_fn: Callable, configs: list[dict], *, launch_example: Callable | None = None,
             families: tuple[str, ...] = ("sm120",)) -> None:
    """Register ``compile_fn(**cfg)`` for each ``cfg`` in ``configs`` (kwargs of the compile function).

    ``families``: kernel families whose budget the configs must fit (default sm120 = 101376 B smem).
    Re-registering a name replaces it (module reloads)."""
    configs = [dict(c) for c in configs]
    for c in configs:
        hash(tuple(sorted(c.items())))  # configs must be hashable static config
    REGISTRY[name] = KernelEntry(name, compile_fn, configs, compile_fn.__module__, launch_example, tuple(families))


def kernel_module_names() -> list[str]:
    from . import __path__ as pkg_path

    return sorted(m.name for m in pkgutil.iter_modules(pkg_path)
                  if not m.name.startswith("_") and m.name not in _NON_KERNEL_MODULES)


def load_all_kernels() -> dict[str, KernelEntry]:
    """Import every kernel module (they register on import). Import failures are kept in ``IMPORT_ERRORS``."""
    for mod in kernel_module_names():
        full = f"{__package__}.{mod}"
        try:
            importlib.import_module(full)
        except Exception:
            IMPORT_ERRORS[full] = traceback.format_exc()
    return REGISTRY


# --------------------------------------------------------------------------------------------- artifact analysis
EIATTR_REGCOUNT = 0x2F
EIFMT_SVAL = 0x04


def _elf_sections(blob: bytes) -> list[dict]:
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        raise ValueError("not a 64-bit ELF")
    e_shoff, = struct.unpack_from("<Q", blob, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    secs = []
    for i in range(e_shnum):
        name, typ, _flags, _addr, off, size, link, info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", blob, e_shoff + i * e_shentsize)
        secs.append(dict(name_off=name, type=typ, off=off, size=size, link=link, info=info, entsize=entsize))
    shstr = secs[e_shstrndx]
    for s in secs:
        start = shstr["off"] + s["name_off"]
        s["name"] = blob[start:blob.index(b"\0", start)].decode()
    return secs


def cubin_register_counts(cubin: bytes) -> dict[str, int]:
    """{kernel symbol: registers per thread} from the ``EIATTR_REGCOUNT`` attributes of a cubin."""
    secs = _elf_sections(cubin)
    symtab = next((s for s in secs if s["name"] == ".symtab"), None)
    names: list[str] = []
    if symtab is not None:
        strtab = secs[symtab["link"]]
        for k in range(symtab["size"] // 24):
            st_name, = struct.unpack_from("<I", cubin, symtab["off"] + 24 * k)
            start = strtab["off"] + st_name
            names.append(cubin[start:cubin.index(b"\0", start)].decode())
    out: dict[str, int] = {}
    for s in secs:
        if not (s["name"] == ".nv.info" or s["name"].startswith(".nv.info.")):
            continue
        p, end = s["off"], s["off"] + s["size"]
        while p + 4 <= end:
            fmt, attr, size = struct.unpack_from("<BBH", cubin, p)
            p += 4
            if fmt == EIFMT_SVAL:
                if attr == EIATTR_REGCOUNT and size >= 8:
                    sym, regs = struct.unpack_from("<II", cubin, p)
                    out[names[sym] if sym < len(names) else f"sym{sym}"] = regs
                p += size
    return out


_PTX_STATIC_SHARED = re.compile(
    r"^\s*(?!\.extern)(?:\.\w+\s+)*?\.shared\s+(?:\.align\s+\d+\s+)?\.(?:b|u|s|f)(\d+)\s+[\w$]+\s*((?:\[\d+\])*)\s*;",
    re.M)


def ptx_static_smem(ptx: str) -> int:
    """Bytes of static (non-extern) ``.shared`` arrays declared in the PTX."""
    total = 0
    for m in _PTX_STATIC_SHARED.finditer(ptx):
        if ".extern" in m.group(0):
            continue
        n = int(m.group(1)) // 8
        for dim in re.findall(r"\[(\d+)\]", m.group(2)):
            n *= int(dim)
        total += n
    return total


_LAUNCH_CFG = "!llvm.struct<(array<3 x i32>, array<3 x i32>, i64, ptr, ptr, i32)>"


def host_dynamic_smem(ir_text: str) -> list[int | None]:
    """Dynamic smem bytes of each kernel launch in the lowered host IR (None where it is not a constant)."""
    out: list[int | None] = []
    consts: dict[str, int] = {}
    smem_slots: set[str] = set()
    for line in ir_text.splitlines():
        if "llvm.func @" in line:
            consts.clear()
            smem_slots.clear()
            continue
        m = re.match(r"\s*(%\w+) = llvm\.mlir\.constant\((-?\d+) : i64\) : i64", line)
        if m:
            consts[m.group(1)] = int(m.group(2))
            continue
        m = re.match(r"\s*(%\w+) = llvm\.getelementptr %\w+\[0, 2\] : \(!llvm\.ptr\) -> !llvm\.ptr, (.*)$", line)
        if m and m.group(2).strip() == _LAUNCH_CFG:
            smem_slots.add(m.group(1))
            continue
        m = re.match(r"\s*llvm\.store (%\w+), (%\w+) : i64, !llvm\.ptr", line)
        if m and m.group(2) in smem_slots:
            out.append(consts.get(m.group(1)))
    return out


def ptx_targets(ptx: str) -> list[str]:
    return re.findall(r"^\s*\.target\s+(\w+)", ptx, re.M)


def ptxas_executable() -> str | None:
    """A CUDA toolkit ``ptxas`` for ``--spills`` (PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin), or None."""
    import shutil

    found = shutil.which("ptxas")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "ptxas"), os.X_OK):
            return os.path.join(root, "bin", "ptxas")
    return None


_PTXAS_PROPS = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def parse_ptxas_verbose(text: str) -> dict[str, tuple[int, int, int]]:
    """{function: (stack frame, spill store, spill load bytes)} from ``ptxas -v`` output."""
    return {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in _PTXAS_PROPS.finditer(text)}


def ptxas_spills(ptx: str, arch_name: str, exe: str) -> dict[str, tuple[int, int, int]]:
    """Assemble ``ptx`` for ``arch_name`` with the toolkit's ``ptxas -v`` (what the DSL's own assembler does, at
    its default -O3) and return :func:`parse_ptxas_verbose` of it. Register spills cost local-memory traffic in the
    kernel's loops; a stack frame without spills is a local array (e.g. the slow path of ``sincosf``)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="sparkinfer_ptxas_") as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, f"-arch={arch_name}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-500:]}")
    return parse_ptxas_verbose(r.stderr + r.stdout)


# --------------------------------------------------------------------------------------------- the gate
@dataclass
class GateResult:
    kernel: str
    config: dict
    arch: str
    ok: bool
    seconds: float = 0.0
    smem_static: int = 0
    smem_dynamic: int | None = 0
    registers: dict = field(default_factory=dict)
    ptx_target: str = ""
    error: str = ""
    stack: int | None = None  # with spills=True: the largest stack frame (bytes) of the config's functions
    spill: int | None = None  # with spills=True: spill store + load bytes over the config's functions

    @property
    def smem(self) -> int | None:
        return None if self.smem_dynamic is None else self.smem_static + self.smem_dynamic

    @property
    def max_registers(self) -> int:
        return max(self.registers.values(), default=0)


def smem_limit(arch_name: str, families: tuple[str, ...]) -> int:
    from .arch import SMEM_CAPACITY

    cap = SMEM_CAPACITY["sm120"] if arch_name in ("sm_120a", "sm_121a") else SMEM_CAPACITY["sm90"]
    return min([cap] + [SMEM_CAPACITY[f] for f in families])


def compile_one(name: str, config: dict, arch_name: str, spills: bool = False) -> GateResult:
    """Compile one registered config for ``arch_name`` (uncached) and analyse its PTX/cubin/host IR; ``spills``:
    also assemble the PTX with the toolkit's ``ptxas -v`` and record its stack frame and spill bytes (a report,
    not a failure: a few bytes around a non-inlined slow path, e.g. of a division or ``sincosf``, are ABI saves)."""
    from . import arch as _arch
    from .compile import extra_options

    entry = REGISTRY[name]
    fn = getattr(entry.compile_fn, "uncached", entry.compile_fn)
    res = GateResult(name, dict(config), arch_name, ok=False)
    t0 = time.perf_counter()
    try:
        # --keep-* dumps files (default: the current directory, under a name that is the same for every config of
        # a kernel): use a private directory; the artifacts are read into memory before it is removed.
        with tempfile.TemporaryDirectory(prefix="sparkinfer_gate_") as dump_dir, _arch.target(arch_name), \
                extra_options("--keep-ptx", "--keep-cubin", f"--dump-dir={dump_dir}"):
            compiled = fn(**config)
        res.seconds = time.perf_counter() - t0
        ptx = compiled.artifacts.PTX
        ptx = ptx.decode() if isinstance(ptx, bytes) else (ptx or "")
        cubin = compiled.artifacts.CUBIN or b""
        targets = ptx_targets(ptx)
        res.ptx_target = ",".join(sorted(set(targets)))
        res.smem_static = ptx_static_smem(ptx)
        dyn = host_dynamic_smem(str(compiled.ir_module))
        res.smem_dynamic = None if any(d is None for d in dyn) else max(dyn, default=0)
        res.registers = cubin_register_counts(cubin) if cubin else {}
        problems = []
        if not targets or set(targets) != {arch_name}:
            problems.append(f"PTX .target {targets} != {arch_name}")
        limit = smem_limit(arch_name, entry.families)
        if res.smem is None:
            problems.append("dynamic smem is not a compile-time constant")
        elif res.smem > limit:
            problems.append(f"smem {res.smem} B > {limit} B budget")
        if not res.registers:
            problems.append("no EIATTR_REGCOUNT in cubin")
        if spills:
            exe = ptxas_executable()
            if exe is None:
                problems.append("--spills needs a CUDA toolkit ptxas (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin)")
            else:
                props = ptxas_spills(ptx, arch_name, exe).values()
                res.stack = max((p[0] for p in props), default=0)
                res.spill = sum(p[1] + p[2] for p in props)
        res.ok = not problems
        res.error = "; ".join(problems)
    except Exception as e:
        res.seconds = time.perf_counter() - t0
        res.error = f"{type(e).__name__}: {e}".strip()[:2000]
    return res


def _worker_init():
    os.environ.setdefault("SPARKINFER_DISK_CACHE", "0")
    load_all_kernels()


def _worker_task(task):
    return compile_one(*task)


def run_gate(archs: list[str], kernels: list[str] | None = None, jobs: int = 1, log=None,
             spills: bool = False) -> list[GateResult]:
    """Compile every registered config (optionally only ``kernels``) for each arch; returns one result per
    (kernel, config, arch), in registration order. ``jobs > 1`` uses a spawn process pool (cute.compile is not
    thread-safe, and a forked MLIR context is not safe either). ``spills``: see :func:`compile_one`."""
    load_all_kernels()
    tasks = [(e.name, c, a, spills) for e in REGISTRY.values() if kernels is None or e.name in kernels
             for c in e.configs for a in archs]
    if jobs <= 1 or len(tasks) <= 2:
        results = []
        for t in tasks:
            results.append(compile_one(*t))
            if log:
                log(results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
        results = []
        for r in ex.map(_worker_task, tasks):
            results.append(r)
            if log:
                log(r)
        return results


def format_table(results: list[GateResult]) -> str:
    with_spills = any(r.spill is not None for r in results)
    rows = [("kernel", "config", "arch", "smem B (static+dyn)", "regs")
            + (("stack B", "spill B") if with_spills else ()) + ("compile s", "status")]
    for r in results:
        cfg = ",".join(f"{k}={v}" for k, v in r.config.items())
        smem = "?" if r.smem is None else f"{r.smem} ({r.smem_static}+{r.smem_dynamic})"
        spill_cols = (("-" if r.stack is None else str(r.stack), "-" if r.spill is None else str(r.spill))
                      if with_spills else ())
        rows.append((r.kernel, cfg, r.arch, smem if r.ptx_target else "-", str(r.max_registers or "-"))
                    + spill_cols + (f"{r.seconds:.2f}", "ok" if r.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if not r.ok:
            lines.append(f"FAIL {r.kernel} {r.config} {r.arch}: {r.error}")
    for r in results:
        if r.spill:
            lines.append(f"SPILL {r.kernel} {r.config} {r.arch}: {r.spill} B of spill stores + loads, stack frame "
                         f"{r.stack} B (ptxas -v)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- launch overhead
def launch_overhead_us(kernels: list[str] | None = None, n: int = 1000) -> dict[str, float]:
    """Host µs per launch (median of ``n`` timed calls, after warm-up) of each registered kernel that provides a
    ``launch_example``, using its first config: the compiled function call including ``make_ptr`` marshalling
    and the CUstream wrapper, as the public wrappers do it. GPU only."""
    import statistics

    from ..runtime import get_device, synchronize

    get_device()
    load_all_kernels()
    out = {}
    for e in REGISTRY.values():
        if e.launch_example is None or (kernels is not None and e.name not in kernels):
            continue
        launch = e.launch_example(**e.configs[0])
        for _ in range(20):
            launch()
        synchronize()
        times = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            launch()
            times.append(time.perf_counter_ns() - t0)
            if i % 100 == 99:
                synchronize()  # keep the launch queue from filling up and blocking the host
        synchronize()
        out[e.name] = statistics.median(times) / 1000.0
    return out


def main_compile_all(archs: list[str], kernels: list[str] | None, jobs: int, verbose: bool = False,
                     spills: bool = False) -> int:
    t0 = time.perf_counter()

    def log(r):
        if verbose:
            print(f"  {r.kernel} {r.config} {r.arch}: {'ok' if r.ok else 'FAIL'} {r.seconds:.2f}s", file=sys.stderr)

    results = run_gate(archs, kernels, jobs, log, spills=spills)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    for mod, tb in IMPORT_ERRORS.items():
        print(f"FAIL import {mod}:\n{tb}")
    print(f"{len(results)} compiles, {len(bad)} failed, {len(IMPORT_ERRORS)} import errors, "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if bad or IMPORT_ERRORS else 0
