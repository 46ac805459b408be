"""The search loop with a fake backend (tests/autotune/fake_ops.py), on the CPU: verification before timing, the
cache short-cut, the budget, compile failures, the compile process pool."""

from __future__ import annotations

import os

import pytest
from fake_ops import BEHAVIOUR, COMPILE_FAILS, DEFAULT_BEHAVIOUR, SLOW_FIRST, Calls

from sparkinfer_cute.autotune.cache import DeviceIdentity, TuneCache, current_metadata
from sparkinfer_cute.autotune.registry import TuneContext
from sparkinfer_cute.autotune.search import SearchOptions, Searcher
from sparkinfer_cute.autotune.shapes import Task

CTX = TuneContext(sm_count=10, smem_budget=101376, l2_bytes=1 << 20)
IDENT = DeviceIdentity("Fake GPU", 10, (12, 0), 12080)


@pytest.fixture(autouse=True)
def _fresh():
    BEHAVIOUR.clear()
    BEHAVIOUR.update(DEFAULT_BEHAVIOUR)
    COMPILE_FAILS.clear()
    SLOW_FIRST.clear()
    Calls.reset()
    yield


def _searcher(tmp_path, **opt):
    cache = TuneCache(tmp_path / "autotune.json")
    return Searcher(CTX, SearchOptions(progress=False, **opt), cache=cache, ident=IDENT,
                    meta=current_metadata(IDENT)), cache


def _task(n=8):
    return Task("fake_op", dict(n=n), count=3, uses={"role": 3})


def test_fast_wrong_candidate_never_wins_and_is_never_timed(tmp_path):
    s, cache = _searcher(tmp_path)
    (out,) = s.run([_task()])
    # v=2 is the fastest (1 µs) but returns 2x: rejected before timing; v=3 (7 µs) is the fastest right one
    assert out.status == "tuned" and out.best == {"v": 3} and out.best_us == 7.0
    assert out.default == {"v": 0} and out.default_us == 10.0
    # every verified candidate timed once, then the default and the winner again, back to back
    assert 2 not in Calls.timed and Calls.timed == [0, 1, 3, 4, 0, 3]
    (cfg, reason), = out.rejected
    assert cfg == {"v": 2} and reason.startswith("wrong output: max error")
    assert out.gain == pytest.approx(10 / 7 - 1)
    entries, status = cache.block_for(IDENT, current_metadata(IDENT))
    assert status == "ok"
    e = entries["fake_op"]["n=8"]
    assert e["config"] == {"v": 3} and e["default"] == {"v": 0} and e["us"] == 7.0 and e["timing"] == "cold-l2"


def test_second_run_is_answered_from_the_cache_without_timing(tmp_path):
    s, _ = _searcher(tmp_path)
    s.run([_task()])
    Calls.reset()
    (out,) = s.run([_task()])
    assert out.status == "cached" and out.best == {"v": 3} and out.best_us == 7.0
    assert Calls.built == 0 and Calls.run == [] and Calls.timed == []
    # --force searches again; another timing mode is another search
    (out,) = _searcher(tmp_path, force=True)[0].run([_task()])
    assert out.status == "tuned" and Calls.timed
    Calls.reset()
    (out,) = _searcher(tmp_path, cold=False)[0].run([_task()])
    assert out.status == "tuned" and Calls.timed


def test_a_gain_below_the_noise_threshold_keeps_the_default(tmp_path):
    BEHAVIOUR.clear()
    BEHAVIOUR.update({0: (1.0, 10.0), 1: (1.0, 9.9)})  # 1% faster: noise
    (out,) = _searcher(tmp_path)[0].run([_task()])
    assert out.status == "default kept" and out.best == {"v": 0} and out.best_us == 10.0


def test_the_winner_is_confirmed_against_the_default_back_to_back(tmp_path):
    BEHAVIOUR.clear()
    BEHAVIOUR.update({0: (1.0, 10.0), 1: (1.0, 9.9)})
    SLOW_FIRST[0] = 20.0  # the default's first timing is off: alone it would make v=1 look 2x faster
    (out,) = _searcher(tmp_path)[0].run([_task()])
    assert Calls.timed == [0, 1, 0, 1]
    assert out.status == "default kept" and out.default_us == 10.0 and out.best == {"v": 0}


def test_a_broken_default_is_reported_and_not_cached(tmp_path):
    BEHAVIOUR[0] = (3.0, 10.0)
    s, cache = _searcher(tmp_path)
    (out,) = s.run([_task()])
    assert out.status == "default failed" and "wrong output" in out.detail
    assert Calls.timed == []
    assert cache.block_for(IDENT, current_metadata(IDENT))[0] == {}


def test_compile_failures_are_rejected_with_their_first_line(tmp_path):
    COMPILE_FAILS.add(3)
    (out,) = _searcher(tmp_path)[0].run([_task()])
    assert out.best == {"v": 1}  # v=3 would have won
    reasons = dict((c["v"], r) for c, r in out.rejected)
    assert reasons[3] == "compile failed: RuntimeError: cannot compile v=3"
    assert 3 not in Calls.run and 3 not in Calls.timed


def test_invalid_default_marks_the_shape_unsupported(tmp_path, monkeypatch):
    import dataclasses

    from sparkinfer_cute.autotune import registry

    monkeypatch.setitem(registry.REGISTRY, "fake_op",
                        dataclasses.replace(registry.REGISTRY["fake_op"], default=lambda s, c: dict(v=9)))
    (out,) = _searcher(tmp_path)[0].run([_task()])
    assert out.status == "unsupported" and "shared memory" in out.detail and Calls.built == 0


def test_budget_cut_tasks_are_not_cached_and_searched_again(tmp_path):
    t = [0.0]

    def clock():
        return t[0]

    class SlowRunner:  # each timing takes 1 "second" of the fake clock
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def time_us(self, config, **kw):
            t[0] += 1.0
            return self.inner.time_us(config, **kw)

    import dataclasses

    from sparkinfer_cute.autotune import registry

    op = registry.REGISTRY["fake_op"]
    slow = dataclasses.replace(op, build=lambda s, c: SlowRunner(op.build(s, c)))
    registry.REGISTRY["fake_op"] = slow
    try:
        cache = TuneCache(tmp_path / "autotune.json")
        s = Searcher(CTX, SearchOptions(progress=False, budget_s=2.5), cache=cache, ident=IDENT,
                     meta=current_metadata(IDENT), clock=clock)
        first, second = s.run([_task(8), _task(16)])
    finally:
        registry.REGISTRY["fake_op"] = op
    # task 1: v=0, v=1 timed (clock 2), v=2 rejected, v=3 timed (clock 3 > 2.5): v=4 not tried
    assert first.status == "budget" and "not tried" in first.detail and first.best == {"v": 3}
    assert second.status == "budget" and second.detail.startswith("not started")
    assert cache.block_for(IDENT, current_metadata(IDENT))[0] == {}


def test_compile_pool_uses_spawned_worker_processes(tmp_path, monkeypatch):
    log = tmp_path / "compiled.txt"
    monkeypatch.setenv("FAKE_COMPILE_LOG", str(log))
    from sparkinfer_cute.autotune.compile_pool import compile_all
    from sparkinfer_cute.autotune.registry import REGISTRY

    op = REGISTRY["fake_op"]
    jobs = {v: (op, dict(v=v), dict(n=8)) for v in range(5)}
    jobs["bad"] = (op, dict(v="x"), dict(n=8))  # raises inside the worker
    res = compile_all(jobs, workers=2)
    assert set(res) == set(jobs)
    assert all(res[v] is None for v in range(5))
    assert res["bad"].startswith("TypeError")
    pids = {line.split()[0] for line in log.read_text().splitlines()}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2


def test_compile_pool_in_process_respects_the_deadline(tmp_path):
    from sparkinfer_cute.autotune.compile_pool import compile_all
    from sparkinfer_cute.autotune.registry import REGISTRY

    op = REGISTRY["fake_op"]
    jobs = {v: (op, dict(v=v), dict(n=8)) for v in range(3)}
    assert compile_all(jobs, workers=0, deadline=0.0) == {}  # monotonic() is past 0
    COMPILE_FAILS.add(1)
    res = compile_all(jobs, workers=0)
    assert res[0] is None and res[2] is None and res[1].startswith("RuntimeError: cannot compile v=1")


def test_a_crashing_compile_worker_fails_its_jobs_not_the_search():
    from sparkinfer_cute.autotune.compile_pool import compile_all
    from sparkinfer_cute.autotune.registry import REGISTRY

    op = REGISTRY["fake_op"]
    jobs = {v: (op, dict(v=v), dict(n=8)) for v in (8, 0, 1, 2, 3)}
    res = compile_all(jobs, workers=1)
    assert set(res) == set(jobs)  # every job has an answer
    assert res[8] is not None and "BrokenProcessPool" in res[8]


def test_outcome_table(capsys):
    from sparkinfer_cute.autotune.__main__ import print_outcomes

    COMPILE_FAILS.add(4)
    s = Searcher(CTX, SearchOptions(progress=False))
    print_outcomes(s.run([_task(8), Task("fake_op", dict(n=16), count=2, uses={"r": 2})]))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["op", "shape", "uses", "default", "µs", "tuned", "µs", "gain", "timed", "status"]
    assert out[2].split() == ["fake_op", "n=8", "3", "v=0", "10.00", "v=3", "7.00", "+42.9%", "3/5", "tuned"]
    assert "  fake_op            default       50.0 µs -> tuned       35.0 µs  (+42.9%, 2 shapes)" in out
    assert "rejected candidates (never timed): 2 compile failed, 2 wrong output" in out
    assert "  fake_op [n=8] v=2: wrong output: max error 8 > 1e-12" in out
