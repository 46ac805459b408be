"""The search: for each (op, shape) task, every candidate config is compiled, verified against the reference, and
only then timed; the fastest verified config is cached.

Rules that keep a result trustworthy:

- a candidate whose output is outside the reference bound (or unwritten, or whose compile or launch fails) is
  rejected with its reason and never timed, so a fast wrong config cannot win;
- the default config is verified first: when it fails, the reference or the kernel is broken, the task reports
  ``default failed`` and nothing is cached for it;
- a candidate replaces the default only when it is at least ``MIN_GAIN`` faster (below that, timing noise picks),
  in a confirmation that times the default and the winner again back to back (each keeps its better median);
- only complete tasks (every candidate timed or rejected) are cached; a task cut by the budget is shown with its
  best-so-far and searched again by the next run;
- a task whose entry is cached (same GPU block, same timing mode) is not compiled, built or timed at all.

The search knows ops only through :class:`autotune.registry.TunableOp` (so the CPU tests drive it with fake ops).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from .cache import DeviceIdentity, TuneCache, now_iso
from .registry import REGISTRY, TuneContext, config_key
from .shapes import Task

MIN_GAIN = 0.02


@dataclass
class SearchOptions:
    budget_s: float | None = None  # wall-clock seconds for the whole search (None: no limit)
    cold: bool = True  # cold-L2 timing (rotate input copies), else warm
    reps: int = 30
    workers: int = 0  # compile processes (0: compile in this process)
    force: bool = False  # search again even where an entry is cached
    progress: bool = True

    @property
    def mode(self) -> str:
        return "cold-l2" if self.cold else "warm"


@dataclass
class Outcome:
    task: Task
    key: str
    status: str  # cached | tuned | default kept | no choice | unsupported | default failed | budget | error
    default: dict | None = None
    best: dict | None = None
    default_us: float | None = None
    best_us: float | None = None
    n_candidates: int = 0  # valid candidates (default included)
    n_pruned: int = 0  # grid points of the op's space its validity check removed
    n_timed: int = 0
    rejected: list = field(default_factory=list)  # (config, reason)
    detail: str = ""

    @property
    def gain(self) -> float | None:
        """Speed-up of the chosen config over the default (0.05 = 5% faster), when both were timed."""
        if self.default_us and self.best_us:
            return self.default_us / self.best_us - 1.0
        return None


@dataclass
class _Pending:
    outcome: Outcome
    op: object
    candidates: list  # valid canonical configs, default first
    compile_errors: dict = field(default_factory=dict)  # config key -> error
    not_compiled: set = field(default_factory=set)  # config keys the budget left uncompiled


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="cfg", file=sys.stderr, disable=not enabled, leave=False)


class Searcher:
    def __init__(self, ctx: TuneContext, options: SearchOptions, *, cache: TuneCache | None = None,
                 ident: DeviceIdentity | None = None, meta: dict | None = None, clock=time.monotonic):
        self.ctx, self.opt, self.cache, self.ident, self.meta, self.clock = ctx, options, cache, ident, meta, clock

    def run(self, tasks: list[Task]) -> list[Outcome]:
        start = self.clock()
        deadline = None if self.opt.budget_s is None else start + self.opt.budget_s
        cached: dict = {}
        if self.cache is not None and self.ident is not None and not self.opt.force:
            cached, _ = self.cache.block_for(self.ident, self.meta)
        outcomes, pending = [], []
        for task in tasks:
            p = self._plan(task, cached)
            outcomes.append(p.outcome if isinstance(p, _Pending) else p)
            if isinstance(p, _Pending):
                pending.append(p)
        if pending:
            self._compile(pending, deadline)
            bar = _bar(sum(len(p.candidates) for p in pending), "verify+time", self.opt.progress)
            try:
                for p in pending:
                    self._measure(p, deadline, bar)
            finally:
                bar.close()
        return outcomes

    # ------------------------------------------------------------------ planning
    def _plan(self, task: Task, cached: dict):
        op = REGISTRY[task.op]
        key = op.shape_key(task.shape)
        hit = cached.get(op.name, {}).get(key)
        if hit is not None and hit.get("timing") == self.opt.mode:
            return Outcome(task, key, "cached", default=hit.get("default"), best=hit["config"],
                           default_us=hit.get("default_us"), best_us=hit.get("us"),
                           n_candidates=hit.get("candidates", 0))
        out = Outcome(task, key, "error")
        try:
            default, cands, pruned = op.candidates(task.shape, self.ctx)
            why = op.why_invalid(default, task.shape, self.ctx)
        except Exception as e:
            out.detail = f"could not list candidates: {type(e).__name__}: {e}"
            return out
        out.default, out.n_candidates, out.n_pruned = default, len(cands), len(pruned)
        if why is not None:
            out.status, out.detail = "unsupported", why
            return out
        if len(cands) == 1:  # nothing to choose: the default runs, no need to time it
            out.status, out.best = "no choice", default
            return out
        return _Pending(out, op, cands)

    # ------------------------------------------------------------------ compiling
    def _compile(self, pending: list[_Pending], deadline) -> None:
        from .compile_pool import compile_all

        jobs, owners = {}, {}
        for p in pending:
            for c in p.candidates:
                k = p.op.compile_key(c, p.outcome.task.shape)
                jobs.setdefault(k, (p.op, c, p.outcome.task.shape))
                owners.setdefault(k, []).append((p, c))
        bar = _bar(len(jobs), f"compile ({self.opt.workers or 'in-process'})", self.opt.progress)
        try:
            results = compile_all(jobs, workers=self.opt.workers, deadline=deadline,
                                  on_done=lambda k, e: bar.update(1), clock=self.clock)
        finally:
            bar.close()
        for k, users in owners.items():
            for p, c in users:
                if k not in results:
                    p.not_compiled.add(config_key(c))
                elif results[k] is not None:
                    p.compile_errors[config_key(c)] = results[k]

    # ------------------------------------------------------------------ verifying + timing
    def _measure(self, p: _Pending, deadline, bar) -> None:
        out, op, shape = p.outcome, p.op, p.outcome.task.shape
        if deadline is not None and self.clock() > deadline:
            out.status, out.detail = "budget", "not started: budget spent"
            bar.update(len(p.candidates))
            return
        try:
            runner = op.build(shape, self.ctx)
        except Exception as e:
            out.status, out.detail = "error", f"could not set up the inputs: {type(e).__name__}: {e}"
            bar.update(len(p.candidates))
            return
        timed: list[tuple[float, dict]] = []
        incomplete = 0
        try:
            for i, c in enumerate(p.candidates):
                bar.update(1)
                ck = config_key(c)
                if ck in p.not_compiled or (deadline is not None and self.clock() > deadline):
                    if i == 0:
                        out.status, out.detail = "budget", "default not timed: budget spent"
                        bar.update(len(p.candidates) - 1)
                        return
                    incomplete += 1
                    continue
                reason = (f"compile failed: {p.compile_errors[ck]}" if ck in p.compile_errors
                          else self._verify(runner, c))
                us = None
                if reason is None:
                    try:
                        us = runner.time_us(c, cold=self.opt.cold, reps=self.opt.reps)
                    except Exception as e:
                        reason = f"timing failed: {type(e).__name__}: {e}"
                if reason is not None:
                    out.rejected.append((c, reason))
                    if i == 0:  # the default itself failed: the reference or the kernel is broken
                        out.status, out.detail = "default failed", reason
                        bar.update(len(p.candidates) - 1)
                        return
                    continue
                timed.append((us, c))
                if i == 0:
                    out.default_us = us
            self._finish(p, runner, timed, incomplete)
        finally:
            runner.close()

    def _finish(self, p: _Pending, runner, timed: list, incomplete: int) -> None:
        out = p.outcome
        out.n_timed = len(timed)
        best_us, best = min(timed, key=lambda t: t[0])
        if best is not p.candidates[0]:
            # confirm back to back: the default was timed first, the winner later (clocks, other load may drift)
            try:
                out.default_us = min(out.default_us, runner.time_us(p.candidates[0], cold=self.opt.cold,
                                                                    reps=self.opt.reps))
                best_us = min(best_us, runner.time_us(best, cold=self.opt.cold, reps=self.opt.reps))
            except Exception as e:
                out.status, out.detail = "error", f"confirmation timing failed: {type(e).__name__}: {e}"
                return
            if best_us > out.default_us * (1 - MIN_GAIN):
                best_us, best = out.default_us, p.candidates[0]
        out.best, out.best_us = best, best_us
        if incomplete:
            out.status = "budget"
            out.detail = f"{incomplete} of {len(p.candidates)} candidates not tried (budget); not cached"
            return
        out.status = "tuned" if best is not p.candidates[0] else "default kept"
        self._store(out)

    @staticmethod
    def _verify(runner, config: dict) -> str | None:
        """None when the config's output is within the reference bound, else the reason it is rejected."""
        try:
            got = runner.run(config)
        except Exception as e:
            return f"launch failed: {type(e).__name__}: {e}"
        try:
            reason = runner.check(config, got)
        except Exception as e:
            return f"check failed: {type(e).__name__}: {e}"
        return None if reason is None else f"wrong output: {reason}"

    def _store(self, out: Outcome) -> None:
        if self.cache is None or self.ident is None:
            return
        entry = dict(config=out.best, default=out.default, us=round(out.best_us, 4),
                     default_us=round(out.default_us, 4) if out.default_us else None, timing=self.opt.mode,
                     reps=self.opt.reps, candidates=out.n_candidates, timed=out.n_timed,
                     rejected=len(out.rejected), date=now_iso())
        self.cache.put(self.ident, self.meta, {out.task.op: {out.key: entry}})
