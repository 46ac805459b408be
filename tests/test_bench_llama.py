"""bench's llama.cpp side on the CPU: the llama-bench command it builds for several prompt lengths and a depth, and
how it reads llama-bench's JSON rows into pp/tg keys (a stand-in executable prints fixed-format rows and records its
arguments; the numbers it prints are drawn per test, so nothing here matches a constant)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sparkinfer_cute.bench import run_llama_bench


def _fake_llama_bench(tmp_path, rows):
    log = tmp_path / "argv.json"
    exe = tmp_path / "llama-bench"
    exe.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                   f"json.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n"
                   f"print({json.dumps(json.dumps(rows))})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, log


def test_several_prompt_lengths_and_a_depth_in_one_llama_bench_call(tmp_path, rng):
    ts = {k: float(rng.uniform(10, 9000)) for k in ("pp512", "pp4096", "tg128", "pp512@d4096", "tg128@d4096")}
    rows = [{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": ts["pp512"], "stddev_ts": 1.0},
            {"n_prompt": 4096, "n_gen": 0, "n_depth": 0, "avg_ts": ts["pp4096"], "stddev_ts": 2.0},
            {"n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ts": ts["tg128"], "stddev_ts": 3.0},
            {"n_prompt": 512, "n_gen": 0, "n_depth": 4096, "avg_ts": ts["pp512@d4096"], "stddev_ts": 4.0},
            {"n_prompt": 0, "n_gen": 128, "n_depth": 4096, "avg_ts": ts["tg128@d4096"], "stddev_ts": 5.0}]
    exe, log = _fake_llama_bench(tmp_path, rows)
    out = run_llama_bench("model.gguf", str(exe), [512, 4096], 128, 4096, 3)
    argv = json.loads(log.read_text())
    assert argv[argv.index("-p") + 1] == "512,4096" and argv[argv.index("-n") + 1] == "128"
    assert argv[argv.index("-d") + 1] == "0,4096" and argv[argv.index("-r") + 1] == "3"
    assert {k: v["avg_ts"] for k, v in out.items() if k != "cmd"} == ts
    # one length given as an int: the older call form
    out1 = run_llama_bench("model.gguf", str(exe), 512, 128, 0, 1)
    argv = json.loads(log.read_text())
    assert argv[argv.index("-p") + 1] == "512" and "-d" not in argv and "cmd" in out1


def test_a_failing_llama_bench_is_reported_not_raised(tmp_path):
    exe = tmp_path / "llama-bench"
    exe.write_text("#!/bin/sh\necho 'no CUDA device' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    out = run_llama_bench("model.gguf", str(exe), [512], 128, 0, 1)
    assert "no CUDA device" in out["error"] and os.path.basename(out["cmd"].split()[0]) == "llama-bench"


def test_bench_main_end_to_end_with_stand_ins(tmp_path, monkeypatch, rng, capsys):
    """bench's host logic on the CPU (what a scarce GPU loan must not lose to a crash): several prompt lengths, each
    prefilled (one untimed + 3 timed runs), decode runs, the launch-plan figures, llama-bench's rows and the ratios
    per length, the table and the JSON. The engine, device, copy bandwidth and launch plan are stand-ins; the
    llama.cpp rates are drawn per run, so the ratios checked are not constants."""
    import types

    from sparkinfer_cute import bench

    lens, gen = [64, 256], 8
    prefilled = []

    class Backend:
        pos = 0
        kernels_per_token = 123
        resident_bytes = 2**30
        kernels_per_prefill_chunk = 7

        def reset(self):
            self.pos = 0

        def prefill(self, ids):
            prefilled.append(len(ids))

        def decode_greedy(self, tok):
            self.pos += 1

        def batched_prefill(self):
            return True

        def _family(self):
            return "sm120"

    class Engine:
        def __init__(self, path, **kw):
            assert kw["max_context"] == max(lens) + gen + 8
            self.backend = Backend()
            self.cfg = types.SimpleNamespace(vocab_size=1000, arch="qwen3moe")

    llama = {f"pp{n}": float(rng.uniform(100, 9000)) for n in lens} | {f"tg{gen}": float(rng.uniform(50, 500))}
    rows = [{"n_prompt": n, "n_gen": 0, "avg_ts": llama[f"pp{n}"], "stddev_ts": 1.0} for n in lens]
    rows.append({"n_prompt": 0, "n_gen": gen, "avg_ts": llama[f"tg{gen}"], "stddev_ts": 1.0})
    exe, log = _fake_llama_bench(tmp_path, rows)
    plan = types.SimpleNamespace(bytes_per_token=2e9, minimum_bytes=1.5e9, ratio=4 / 3, kernels_per_token=123)
    monkeypatch.setattr(bench, "require_gpu", lambda *a: None)
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(bench, "decode_plan", lambda m, depth: plan)
    monkeypatch.setattr("sparkinfer_cute.engine.Engine", Engine)
    monkeypatch.setattr("sparkinfer_cute.runtime.get_device",
                        lambda: types.SimpleNamespace(name="stand-in GPU", target="sm_120a"))
    from sparkinfer_cute.gguf.synth import write_synthetic

    model = write_synthetic(str(tmp_path / "m.gguf"), arch="qwen3moe", preset="tiny", seed=1)  # context 512
    out = tmp_path / "out.json"
    assert bench.main([str(model), "--prompt-len", ",".join(map(str, lens)), "--gen", str(gen), "--runs", "5",
                       "--llama-bench", str(exe), "--json", str(out), "--log", ""]) == 0
    assert prefilled == [64] * 4 + [256] * 4  # per length: one untimed run, then the median of 3
    argv = json.loads(log.read_text())
    assert argv[argv.index("-p") + 1] == "64,256"
    res = json.loads(out.read_text())
    assert res["prompt_lens"] == lens and set(res["prefill_tps_by_len"]) == {"64", "256"}
    for n in lens:
        assert res[f"ratio_pp{n}_vs_llama"] == pytest.approx(res["prefill_tps_by_len"][str(n)] / llama[f"pp{n}"])
    assert res["ratio_pp_vs_llama"] == res["ratio_pp64_vs_llama"]
    assert res["ratio_tg_vs_llama"] == pytest.approx(res["decode_tps_median"] / llama[f"tg{gen}"])
    assert isinstance(res["passes_off"], list)
    table = capsys.readouterr().out
    assert "prefill pp64 tok/s" in table and "prefill pp256 tok/s" in table and "ratio pp256 vs llama" in table


def test_bench_refuses_a_context_the_model_lacks_before_loading(tmp_path, monkeypatch, capsys):
    """prompt 1024 + gen 8 + 8 on a 512-token model: one line naming both, before any engine is built."""
    from sparkinfer_cute import bench
    from sparkinfer_cute.gguf.synth import write_synthetic

    model = write_synthetic(str(tmp_path / "m.gguf"), arch="qwen3moe", preset="tiny", seed=1)
    monkeypatch.setattr(bench, "require_gpu", lambda *a: None)

    def no_engine(*a, **k):
        raise AssertionError("the engine must not be built")
    monkeypatch.setattr("sparkinfer_cute.engine.Engine", no_engine)
    with pytest.raises(SystemExit) as e:
        bench.main([model, "--prompt-len", "1024", "--gen", "8", "--log", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "needs a context of 1040 tokens" in err[0] and "the model's is 512" in err[0], err
