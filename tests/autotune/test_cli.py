"""`python -m sparkinfer_cute.autotune` without a GPU: argument errors are one line and exit 2, --show / --clear /
--plan work, tuning refuses with one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparkinfer_cute.autotune.__main__ import main
from sparkinfer_cute.autotune.cache import DeviceIdentity, TuneCache, current_metadata


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKINFER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARKINFER_NO_GPU", "1")  # the same answers on the GPU host


@pytest.fixture
def gguf(tmp_path):
    from sparkinfer_cute.gguf.synth import write_synthetic

    return write_synthetic(tmp_path / "tiny.gguf", "qwen3moe", "tiny")


def _run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,msg", [
    ((), "give a MODEL.gguf to tune"),
    (("/no/such/model.gguf",), "/no/such/model.gguf: no such file"),
    (("--show", "--clear"), "--show and --clear exclude each other"),
    (("{gguf}", "--ops", "gemv,bogus"), "unknown op(s) bogus; known: gemv, gemv_q8"),
    (("{gguf}", "--ops", ","), "unknown op(s) (none given)"),
    (("{gguf}", "--budget", "0"), "argument --budget: 0 is not a positive finite number of seconds"),
    (("{gguf}", "--budget", "nan"), "argument --budget: nan is not a positive finite number of seconds"),
    (("{gguf}", "--budget", "soon"), "argument --budget: 'soon' is not a number of seconds"),
    (("{gguf}", "--reps", "3"), "--reps 3: at least 5 timed replays"),
    (("{gguf}", "--ctx", "0"), "argument --ctx: 0 is not positive"),
    (("{gguf}", "--jobs", "-1"), "argument --jobs: -1 is negative"),
    (("{gguf}", "--ops", "quant_gemm", "--prefill-tokens", "0"), "--ops quant_gemm needs --prefill-tokens > 0"),
    (("{gguf}", "--bogus-flag"), "unrecognized arguments: --bogus-flag"),
    (("{gguf}",), "SPARKINFER_NO_GPU is set: the autotuner times kernels on the GPU it tunes for"),
])
def test_argument_errors_are_one_line(capsys, gguf, argv, msg):
    rc, out, err = _run(capsys, *(a.format(gguf=gguf) for a in argv))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m sparkinfer_cute.autotune: error: "), err
    assert msg in lines[0], lines[0]
    assert out == ""


def test_bad_gguf_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.autotune", str(bad), "--plan"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m sparkinfer_cute.autotune: error: ")
    assert str(bad) in lines[0]


def test_show_and_clear_without_a_gpu(capsys, tmp_path):
    rc, out, _ = _run(capsys, "--show")
    assert rc == 0 and out.strip() == f"no autotune cache at {tmp_path / 'cache' / 'autotune.json'}"
    ident = DeviceIdentity("NVIDIA Fake 5090", 170, (12, 0), 12080)
    TuneCache().put(ident, current_metadata(ident), {"gemv_q8": {"qtype=Q4_K,n_in=2048,n_out=4096": dict(
        config=dict(mapping="chunk", rows_per_warp=1), default=dict(mapping="chunk", rows_per_warp=2), us=3.0,
        default_us=3.6,
        timing="cold-l2", date="2026-12-07T00:00:00")}})
    rc, out, _ = _run(capsys, "--show")
    assert rc == 0
    assert "NVIDIA Fake 5090|170|sm_120: not checked (no GPU here)" in out
    row = [ln for ln in out.splitlines() if ln.startswith("gemv_q8")]
    assert row and row[0].split()[:8] == ["gemv_q8", "qtype=Q4_K,n_in=2048,n_out=4096", "mapping=chunk",
                                          "rows_per_warp=1", "3.00", "mapping=chunk", "rows_per_warp=2", "3.60"]
    assert "+20.0%" in row[0]
    rc, out, _ = _run(capsys, "--clear")
    assert rc == 0 and out.startswith("removed ") and not TuneCache().path.exists()
    rc, out, _ = _run(capsys, "--clear")
    assert rc == 0 and out.startswith("no autotune cache at")


def test_plan_lists_shapes_and_candidates_without_a_gpu(capsys, gguf):
    rc, out, err = _run(capsys, gguf, "--plan", "--ops", "gemv_q8,attention_decode,quant_gemm", "--sm-count", "48")
    assert rc == 0, err
    assert "(qwen3moe): " in out and "assumed 48 SMs" in out
    rows = {(ln.split()[0], ln.split()[1]): ln for ln in out.splitlines() if ln[:1].isalpha() and "=" in ln}
    att = rows[("attention_decode", "n_head=8,n_kv_head=2,head_dim=64,qk_rot=64,ctx=512")]
    assert "full x4" in att
    assert ("gemv_q8", "qtype=Q4_K,n_in=512,n_out=256") in rows
    assert any(op == "quant_gemm" for op, _ in rows)
    assert "note: context 4096 > the model's 512: not tuned" in out


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_plan_of_every_op_has_no_error_rows(capsys, tmp_path, arch):
    """Every op's adapter lists its candidates for every shape of the synthetic models (an adapter that lost a
    kernel name shows an ``error:`` row, and --plan exits 1)."""
    from sparkinfer_cute.gguf.synth import write_synthetic

    path = write_synthetic(tmp_path / f"{arch}.gguf", arch, "tiny")
    rc, out, err = _run(capsys, path, "--plan")
    assert rc == 0, err
    assert f"({arch}): " in out
    rows = [ln for ln in out.splitlines() if ln[:1].isalpha() and "=" in ln and not ln.startswith("note:")]
    assert rows and not [r for r in rows if "error:" in r], out
    ops = {r.split()[0] for r in rows}
    assert {"gemv", "gemv_q8", "quant_gemm", "attention_decode"} <= ops
    if arch != "gemma3":
        assert {"moe_down", "moe_down_q8", "moe_gate_up", "moe_gate_up_q8"} <= ops


def test_plan_exits_1_on_an_adapter_error(capsys, monkeypatch, gguf):
    from dataclasses import replace

    from sparkinfer_cute.autotune.registry import REGISTRY, get_op

    def broken(shape, ctx):
        raise ImportError("cannot import name 'gemv_q8' from 'sparkinfer_cute.kernels'")

    monkeypatch.setitem(REGISTRY, "gemv_q8", replace(get_op("gemv_q8"), space=broken))
    rc, out, err = _run(capsys, gguf, "--plan", "--ops", "gemv,gemv_q8")
    assert rc == 1
    assert "error: ImportError: cannot import name 'gemv_q8'" in out
    assert err.strip().endswith("shapes could not be planned (the rows marked error)")


def test_search_end_to_end_with_a_fake_gpu_and_op(capsys, monkeypatch, tmp_path, gguf):
    """The CLI glue around the search (header, table, JSON, cache, second run) with the fake op of fake_ops.py."""
    import json
    from types import SimpleNamespace

    import fake_ops

    from sparkinfer_cute.autotune import __main__ as cli
    from sparkinfer_cute.autotune import shapes
    from sparkinfer_cute.autotune.cache import DeviceIdentity

    fake_ops.Calls.reset()
    dev = SimpleNamespace(name="NVIDIA Fake 5090", sm_count=170, capability=(12, 0), target="sm_120a",
                          l2_bytes=96 << 20)
    monkeypatch.setattr(cli, "_gpu_or_reason", lambda: (dev, None))
    monkeypatch.setattr(DeviceIdentity, "of", staticmethod(lambda d: DeviceIdentity(d.name, d.sm_count,
                                                                                     d.capability, 12080)))
    task = shapes.Task("fake_op", dict(n=8), count=4, uses={"blk": 4})
    monkeypatch.setattr(shapes, "load_model_tasks", lambda path, ops, **kw: ("fakearch", [task], ["a note"]))
    argv = [gguf, "--ops", "fake_op", "--jobs", "0", "--no-progress", "--json", str(tmp_path / "out.json")]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    assert out.startswith("autotune ") and "on NVIDIA Fake 5090 (170 SMs, sm_120a, L2 96 MiB): 1 shapes" in out
    assert "fake_op  n=8    4     v=0      10.00  v=3    7.00  +42.9%  4/5    tuned" in out
    assert "note: a note" in out and "1 shapes: 0 from the cache, 4 configs timed" in out
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["outcomes"][0]["tuned"] == {"v": 3} and res["outcomes"][0]["rejected"][0]["config"] == {"v": 2}
    fake_ops.Calls.reset()
    rc, out, err = _run(capsys, *argv)
    assert rc == 0 and "1 shapes: 1 from the cache, 0 configs timed" in out and fake_ops.Calls.timed == []
    rc, out, err = _run(capsys, "--show")
    assert "NVIDIA Fake 5090|170|sm_120: in use on this GPU" in out
