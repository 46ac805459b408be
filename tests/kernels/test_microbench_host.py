"""The microbench's new GPU benchmarks, host side on the CPU: ``bench_mma_peak`` and ``bench_prefill_gemm`` run with
device memory faked (host arrays at fake 4 KiB-aligned addresses), ``cute.compile`` replaced by a recorder that
checks each launch's argument count against the compile call, and the graph timer replaced by one call of each
launch. The real kernel wrappers (kernels/quant_gemm.py ``quant_gemm``, kernels/mma_peak.py ``mma_peak``) run their
argument checks on the way; a scarce GPU loan then does not end in a host-side error. Timings here are stand-ins
(1 µs each), so only the rows' shape and arithmetic are checked."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sparkinfer_cute.runtime.testing import HostDeviceArray


class FakeStream:
    handle = 0
    cu = None

    def synchronize(self):
        pass


@pytest.fixture
def fake_gpu(monkeypatch):
    import cutlass.cute as cute

    import sparkinfer_cute.runtime as rt
    from sparkinfer_cute.kernels import microbench, mma_peak, quant_gemm

    launches = []

    def compile_(kernel, *args, options=None):
        def launch(*got):
            assert len(got) == len(args), f"{type(kernel).__name__}: {len(got)} launch args, compiled with {len(args)}"
            launches.append(type(kernel).__name__)
        return launch

    monkeypatch.setattr(rt, "DeviceArray", HostDeviceArray)
    monkeypatch.setattr(rt, "Stream", FakeStream)
    monkeypatch.setattr(rt, "resolve_stream", lambda s: s if s is not None else FakeStream())
    monkeypatch.setattr(rt, "get_device", lambda: SimpleNamespace(name="fake GPU", sm_count=4))
    monkeypatch.setattr(cute, "compile", compile_)
    # bypass the in-process memo: nothing fake must stay cached
    monkeypatch.setattr(quant_gemm, "compile_quant_gemm", quant_gemm.compile_quant_gemm.uncached)
    monkeypatch.setattr(mma_peak, "compile_mma_peak", mma_peak.compile_mma_peak.uncached)

    def time_graph(fns, stream, reps):
        for f in fns:
            f()
        return 1.0, 1.0
    monkeypatch.setattr(microbench, "_time_graph", time_graph)
    return launches


def test_mma_peak_rows(fake_gpu):
    from sparkinfer_cute.kernels import microbench
    from sparkinfer_cute.kernels import mma_peak as mp

    rows = microbench.bench_mma_peak(iters=16)
    assert [r["kind"] for r in rows] == ["s8"] * 5 + ["f16"] * 5 and fake_gpu == ["MmaPeak"] * 10
    for r in rows:  # 1 µs per launch: TFLOP/s = flops / 1e6
        assert r["tflops"] == round(mp.launch_flops(r["kind"], 4 * r["ctas_per_sm"], 16) / 1e6, 1)
    assert sum(r["peak"] for r in rows) == 2 and microbench.peak_tflops(rows, "f16") == rows[-1]["tflops"]


def test_prefill_gemm_rows(fake_gpu):
    from sparkinfer_cute.kernels import microbench

    rows = microbench.bench_prefill_gemm(tokens=64, reps=1, int8_peak=100.0)
    assert len(rows) == 6 * 2 + 3 * 2 and set(fake_gpu) == {"QuantGemm"} and len(fake_gpu) == len(rows)
    gate_up = next(r for r in rows if r["case"].startswith("grouped gate+up"))
    assert gate_up["tflops"] == round(2.0 * 64 * 8 * 2048 * 2 * 768 / 1e6, 2)
    # peak 100 TFLOP/s: the % equals the TFLOP/s figure (up to the two roundings)
    assert all(abs(r["pct_of_mma_peak"] - r["tflops"]) <= 0.06 for r in rows), rows
