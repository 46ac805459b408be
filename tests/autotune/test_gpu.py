"""The real op runners and the search on a GPU (skipped without one): every op verifies its default and another
candidate against the float64 reference, rejects a perturbed output, and times; the CLI tunes a tiny model and
answers the second run from the cache."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from sparkinfer_cute.autotune.registry import TuneContext, get_op

pytestmark = pytest.mark.gpu

SMALL = [
    ("gemv", dict(qtype="Q4_K", n_in=1024, n_out=512)),
    ("gemv", dict(qtype="Q5_0", n_in=640, n_out=256)),
    ("gemv_q8", dict(qtype="Q6_K_P", n_in=2048, n_out=640)),
    ("gemv_q8", dict(qtype="Q8_0", n_in=640, n_out=256)),
    ("moe_gate_up", dict(qtype="Q4_K", n_in=1024, n_ff=256, n_expert=16, k=4, fused=False)),
    ("moe_gate_up_q8", dict(qtype="Q4_K", n_in=1024, n_ff=256, n_expert=16, k=4, fused=True)),
    ("moe_down", dict(qtype="Q6_K_P", n_ff=256, n_out=256, n_expert=16, k=4)),
    ("moe_down_q8", dict(qtype="Q8_0", n_ff=384, n_out=384, n_expert=16, k=4)),
    ("attention_decode", dict(n_head=8, n_kv_head=2, head_dim=64, qk_rot=0, ctx=512)),
    ("attention_decode", dict(n_head=4, n_kv_head=1, head_dim=256, qk_rot=0, ctx=1024)),
    ("attention_decode", dict(n_head=8, n_kv_head=2, head_dim=64, qk_rot=64, ctx=512)),  # the Q/K prologue inside
    ("quant_gemm", dict(qtype="Q4_K", n_in=512, n_out=256, tokens=64, n_expert=0, k=0, act="none")),
    ("quant_gemm", dict(qtype="Q5_0", n_in=640, n_out=256, tokens=64, n_expert=0, k=0, act="gelu_tanh")),
    ("quant_gemm", dict(qtype="Q4_K", n_in=512, n_out=128, tokens=64, n_expert=8, k=2, act="silu")),
    ("quant_gemm", dict(qtype="Q6_K_P", n_in=256, n_out=256, tokens=64, n_expert=8, k=2, act="none")),
]


@pytest.fixture(scope="module")
def ctx():
    from sparkinfer_cute.runtime import get_device

    return TuneContext.for_device(get_device())


@pytest.mark.parametrize("name,shape", SMALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SMALL)])
def test_runner_verifies_and_times(name, shape, ctx):
    op = get_op(name)
    default, cands, _ = op.candidates(shape, ctx)
    runner = op.build(shape, ctx)
    try:
        for c in (cands[0], cands[-1]):
            out = runner.run(c)
            assert runner.check(c, out) is None, (c, runner.check(c, out))
            # a wrong result is caught: a small relative error, one unwritten element
            assert runner.check(c, out * np.float32(1.01)) is not None
            bad = out.copy()
            bad.reshape(-1)[bad.size // 2] = np.nan
            assert "not finite" in runner.check(c, bad)
            for cold in (True, False):
                us = runner.time_us(c, cold=cold, reps=5)
                assert math.isfinite(us) and 0 < us < 1e5
        assert runner.n_sets >= 1
    finally:
        runner.close()


def test_search_then_cached(tmp_path, ctx):
    from sparkinfer_cute.autotune.cache import DeviceIdentity, TuneCache, current_metadata
    from sparkinfer_cute.autotune.search import SearchOptions, Searcher
    from sparkinfer_cute.autotune.shapes import Task
    from sparkinfer_cute.runtime import get_device

    ident = DeviceIdentity.of(get_device())
    cache = TuneCache(tmp_path / "autotune.json")
    tasks = [Task("gemv", dict(qtype="Q4_K", n_in=1024, n_out=512), 1),
             Task("attention_decode", dict(n_head=8, n_kv_head=2, head_dim=64, qk_rot=0, ctx=512), 1)]
    s = Searcher(ctx, SearchOptions(reps=5, workers=2, progress=False), cache=cache, ident=ident,
                 meta=current_metadata(ident))
    first = s.run(tasks)
    assert all(o.status in ("tuned", "default kept") for o in first), [(o.status, o.detail) for o in first]
    assert all(o.n_timed == o.n_candidates and not o.rejected for o in first), [o.rejected for o in first]
    second = s.run(tasks)
    assert [o.status for o in second] == ["cached", "cached"]
    assert [o.best for o in second] == [o.best for o in first]


def test_cli_tunes_a_tiny_model_then_answers_from_the_cache(tmp_path):
    from sparkinfer_cute.gguf.synth import write_synthetic

    path = write_synthetic(tmp_path / "tiny.gguf", "qwen3moe", "tiny")
    env = dict(os.environ, SPARKINFER_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "sparkinfer_cute.autotune", path, "--ops", "gemv_q8,moe_down_q8,attention_decode",
           "--reps", "5", "--budget", "300", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gemv_q8" in r.stdout and "attention_decode" in r.stdout and "0 from the cache" in r.stdout
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "0 configs timed" in r2.stdout
    n = int(r2.stdout.split(" from the cache")[0].rsplit(" ", 1)[-1])
    assert n > 0
    show = subprocess.run([sys.executable, "-m", "sparkinfer_cute.autotune", "--show"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert "in use on this GPU" in show.stdout
