"""bench's llama.cpp side on the CPU: the llama-bench command it builds for several prompt lengths and a depth, and
how it reads llama-bench's JSON rows into pp/tg keys (a stand-in executable prints fixed-format rows and records its
arguments; the numbers it prints are drawn per test, so nothing here matches a constant)."""

from __future__ import annotations

import json
import os
import stat

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
