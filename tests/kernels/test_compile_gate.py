"""The compile gate (no GPU): every registered config of every kernel module compiles for sm_120a, sm_121a and
sm_90a, emits PTX for the right ``.target``, and fits the shared-memory budget; the artifact parsers the gate relies
on are checked against independent sources (ptxas -v, a kernel with a known smem size)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import cutlass
import cutlass.cute as cute
import pytest
from cuda.bindings import driver as cuda
from cutlass import Float32

from sparkinfer_cute.kernels import arch, registry
from sparkinfer_cute.kernels.common import fake_ptr
from sparkinfer_cute.kernels.compile import compile_options, extra_options, kernel_cache


@pytest.mark.parametrize("target", ["sm_120a", "sm_121a", "sm_90a"])
def test_every_registered_kernel_compiles(target):
    registry.load_all_kernels()
    assert not registry.IMPORT_ERRORS, "\n".join(f"{m}:\n{tb}" for m, tb in registry.IMPORT_ERRORS.items())
    assert registry.REGISTRY, "no kernel registered"
    # every kernel_cache'd compile function of every kernel module is registered with the gate
    registered_fns = {id(e.compile_fn) for e in registry.REGISTRY.values()}
    for mod in registry.kernel_module_names():
        m = sys.modules[f"sparkinfer_cute.kernels.{mod}"]
        for name, obj in vars(m).items():
            if callable(obj) and hasattr(obj, "uncached") and getattr(obj, "__module__", None) == m.__name__:
                assert id(obj) in registered_fns, f"{m.__name__}.{name} is not registered with the compile gate"
    # two compile processes where the machine has two cores (CI): 174 s -> 104 s for one arch on the 2-core box
    jobs = int(os.environ.get("SPARKINFER_GATE_JOBS", str(min(2, os.cpu_count() or 1))))
    results = registry.run_gate([target], jobs=jobs)
    assert len(results) == sum(len(e.configs) for e in registry.REGISTRY.values())
    print("\n" + registry.format_table(results))
    failed = [f"{r.kernel} {r.config}: {r.error}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    for r in results:
        assert r.ptx_target == target
        assert r.smem is not None and r.smem <= registry.smem_limit(target, ("sm120",))
        assert 0 < r.max_registers <= 255


# ------------------------------------------------------------------------------- a probe kernel of known smem use
class _SmemProbe:
    def __init__(self, n_floats: int):
        self.n = n_floats

    @cute.jit
    def __call__(self, pO: cute.Pointer, stream: cuda.CUstream):
        mO = cute.make_tensor(pO, cute.make_layout(128))
        self.kernel(mO).launch(grid=[1, 1, 1], block=[128, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mO: cute.Tensor):
        tid, _, _ = cute.arch.thread_idx()
        smem = cutlass.memory.SmemAllocator()
        buf = smem.allocate_tensor(Float32, cute.make_layout(self.n), byte_alignment=16)
        buf[tid] = Float32(tid)
        cute.arch.barrier()
        mO[tid] = buf[127 - tid]


@kernel_cache
def _compile_probe(n_floats: int):
    return cute.compile(_SmemProbe(n_floats), fake_ptr(Float32), cute.runtime.make_fake_stream(),
                        options=compile_options())


@pytest.fixture
def probe_registered():
    registry.register("_smem_probe", _compile_probe, [dict(n_floats=12345), dict(n_floats=30000)])
    yield
    registry.REGISTRY.pop("_smem_probe", None)


def test_gate_measures_dynamic_smem_and_enforces_budget(probe_registered):
    ok = registry.compile_one("_smem_probe", dict(n_floats=12345), "sm_120a")
    assert ok.ok, ok.error
    assert ok.smem_dynamic == 12345 * 4 and ok.smem == 12345 * 4
    big = registry.compile_one("_smem_probe", dict(n_floats=30000), "sm_121a")  # 120000 B > 101376 B
    assert not big.ok and "budget" in big.error
    # sm_90a hardware has 227 KB but the sm120 family budget still applies to every target
    assert not registry.compile_one("_smem_probe", dict(n_floats=30000), "sm_90a").ok


def test_gate_reports_compile_errors(probe_registered):
    r = registry.compile_one("_smem_probe", dict(n_floats=0), "sm_120a")  # allocate_tensor of 0 elements raises
    assert not r.ok and r.error


def test_main_exit_code_on_failure(probe_registered, capsys):
    rc = registry.main_compile_all(["sm_120a"], ["_smem_probe"], jobs=1)
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL _smem_probe" in out and "budget" in out


@pytest.mark.skipif(not shutil.which("ptxas") and not os.path.exists("/usr/local/cuda/bin/ptxas"),
                    reason="needs a CUDA toolkit ptxas for the independent register count")
def test_register_count_matches_ptxas(probe_registered, tmp_path):
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    with arch.target("sm_120a"), extra_options("--keep-ptx", "--keep-cubin", f"--dump-dir={tmp_path}"):
        compiled = _compile_probe.uncached(n_floats=12345)
    ours = registry.cubin_register_counts(compiled.artifacts.CUBIN)
    assert len(ours) == 1
    out = subprocess.run([ptxas, "-arch=sm_120a", "-v", "-o", os.devnull, "-"], input=compiled.artifacts.PTX,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"this ptxas cannot assemble sm_120a: {out.stderr[-300:]}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out.stderr)]
    assert regs and list(ours.values()) == regs


def test_static_smem_parser():
    ptx = """
    .shared .align 16 .b8 smem_a[1024];
    .extern .shared .align 1024 .b8 __dynamic_shmem__0[];
    .shared .align 4 .f32 red[4][8];
    """
    assert registry.ptx_static_smem(ptx) == 1024 + 128


def test_cli_lists_and_compiles_one_kernel():
    env = dict(os.environ, SPARKINFER_DISK_CACHE="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    out = subprocess.run([sys.executable, "-m", "sparkinfer_cute.kernels", "--list"], capture_output=True,
                         text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "argmax" in out.stdout and "configs" in out.stdout
    out = subprocess.run([sys.executable, "-m", "sparkinfer_cute.kernels", "--compile-all", "--arch", "sm_121a",
                          "--kernel", "argmax"], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^argmax\s+vocab=151936\s+sm_121a\s+\d+", out.stdout, re.M), out.stdout
    assert " 0 failed" in out.stdout


@pytest.mark.gpu
def test_launch_overhead_us():
    us = registry.launch_overhead_us(["rmsnorm", "rope_neox", "router", "argmax"], n=50)
    assert set(us) == {"rmsnorm", "rope_neox", "router", "argmax"}
    assert all(0 < v < 5000 for v in us.values()), us


def test_kernel_cache_memoizes_per_target_and_options(tmp_path):
    calls = []

    @kernel_cache
    def fake_compile(n: int, flag: bool = False):
        calls.append((n, flag, compile_options()))
        return object()

    with arch.target("sm_120a"):
        a = fake_compile(3)
        assert fake_compile(3) is a and len(calls) == 1
        assert calls[0][2] == "--gpu-arch sm_120a"
        b = fake_compile(3, flag=True)
        assert b is not a and len(calls) == 2
        with extra_options("--keep-ptx", f"--dump-dir={tmp_path}"):
            c = fake_compile(3)
            assert c is not a and calls[-1][2] == f"--gpu-arch sm_120a --keep-ptx --dump-dir={tmp_path}"
    with arch.target("sm_90a"):
        d = fake_compile(3)
        assert d is not a and calls[-1][2] == "--gpu-arch sm_90a"
    with arch.target("sm_120a"):
        assert fake_compile(3) is a
    assert fake_compile.uncached(3) is not a


def test_arch_knobs(monkeypatch):
    monkeypatch.setenv("SPARKINFER_ARCH", "sm_121")
    assert arch.compile_target() == "sm_121a"
    with arch.target("90"):
        assert arch.compile_target() == "sm_90a"
    monkeypatch.delenv("SPARKINFER_ARCH")
    monkeypatch.delenv("CUTE_DSL_ARCH", raising=False)
    from sparkinfer_cute.runtime.device import current_device_capability, target_from_capability

    cap = current_device_capability()
    assert arch.compile_target() == (target_from_capability(*cap) if cap else "sm_120a")
    monkeypatch.setenv("SPARKINFER_KERNEL_FAMILY", "SM_90")
    assert arch.kernel_family() == "sm90" and arch.smem_budget() == 232448
    monkeypatch.setenv("SPARKINFER_KERNEL_FAMILY", "sm70")
    with pytest.raises(Exception):
        arch.kernel_family()


def test_ptxas_verbose_parser():
    text = ("ptxas info    : Compiling entry function 'k1' for 'sm_90a'\n"
            "ptxas info    : Function properties for k1\n"
            "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 72 registers\n"
            "ptxas info    : Function properties for k2\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert registry.parse_ptxas_verbose(text) == {"k1": (8, 4, 12), "k2": (0, 0, 0)}


def test_spill_report_with_a_toolkit_ptxas():
    """--spills on one small kernel: the toolkit's ptxas assembles the DSL's PTX and reports no spill for the
    register-only MMA chains (kernels/mma_peak.py: 84 registers), and the table grows its two columns."""
    if registry.ptxas_executable() is None:
        pytest.skip("no CUDA toolkit ptxas on this machine (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    results = registry.run_gate(["sm_120a"], ["mma_peak"], spills=True)
    assert results and all(r.ok and r.spill == 0 and r.stack == 0 for r in results), results
    table = registry.format_table(results)
    assert "spill B" in table.splitlines()[0] and "SPILL" not in table


def test_spills_without_a_toolkit_ptxas_is_a_one_line_error(monkeypatch, capsys):
    from sparkinfer_cute.kernels.__main__ import main

    monkeypatch.setattr(registry, "ptxas_executable", lambda: None)
    with pytest.raises(SystemExit) as e:
        main(["--compile-all", "--kernel", "mma_peak", "--spills"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--spills needs a CUDA toolkit ptxas" in err[0], err
