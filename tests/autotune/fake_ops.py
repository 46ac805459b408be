"""A fake tunable op for the CPU tests of the search loop (importable by spawned compile workers, which find it by
module name: pytest puts this directory on sys.path and spawn passes sys.path on).

``fake_op``: candidates ``{"v": 0..4}``; ``v = 0`` is the default. The runner's "kernel" returns ``x * factor`` and
takes ``cost`` µs, both per candidate from ``BEHAVIOUR`` (a test rewrites it); the reference is ``x * 1``. A
candidate whose factor is not 1 is wrong. ``compile`` raises for candidates listed in ``COMPILE_FAILS`` and appends
(pid, config) to the file named by ``$FAKE_COMPILE_LOG`` (so a test sees which process compiled what); ``v = 8``
kills the compiling process.
"""

from __future__ import annotations

import os

import numpy as np

from sparkinfer_cute.autotune.registry import TunableOp, register

# v -> (factor, cost in µs)
DEFAULT_BEHAVIOUR = {0: (1.0, 10.0), 1: (1.0, 9.0), 2: (2.0, 1.0), 3: (1.0, 7.0), 4: (1.0, 12.0)}
BEHAVIOUR = dict(DEFAULT_BEHAVIOUR)
COMPILE_FAILS: set[int] = set()
SLOW_FIRST: dict[int, float] = {}  # v -> cost of its first timing only (a GPU still clocking up, say)


class Calls:
    """What the runners of this process were asked to do."""

    built = 0
    run: list = []
    timed: list = []

    @classmethod
    def reset(cls):
        cls.built, cls.run, cls.timed = 0, [], []


class FakeRunner:
    def __init__(self, shape, ctx):
        Calls.built += 1
        self.x = np.arange(1.0, 1.0 + shape["n"])

    def run(self, config):
        Calls.run.append(config["v"])
        return self.x * BEHAVIOUR[config["v"]][0]

    def check(self, config, out):
        err = np.abs(out - self.x).max()
        return None if err <= 1e-12 else f"max error {err:.3g} > 1e-12"

    def time_us(self, config, *, cold, reps):
        v = config["v"]
        first = v not in Calls.timed
        Calls.timed.append(v)
        return SLOW_FIRST.get(v, BEHAVIOUR[v][1]) if first else BEHAVIOUR[v][1]

    def close(self):
        pass


def _compile(config, shape):
    log = os.environ.get("FAKE_COMPILE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {config['v']}\n")
    if not isinstance(config["v"], int):
        raise TypeError(f"v={config['v']!r} is not an int")
    if config["v"] == 8:  # a compiler crash takes the worker process down
        os._exit(3)
    if config["v"] in COMPILE_FAILS:
        raise RuntimeError(f"cannot compile v={config['v']}\nsecond line of the message")
    return object()


def _why_invalid(config, shape, ctx):
    v = config.get("v")
    if not isinstance(v, int) or not 0 <= v <= 9:
        return f"v={v!r} out of range"
    if v == 9:
        return "v=9 needs too much shared memory"
    return None


FAKE = register(TunableOp(
    name="fake_op",
    summary="a fake op for the search-loop tests",
    shape_keys=("n",),
    space=lambda shape, ctx: [dict(v=v) for v in sorted(BEHAVIOUR)],
    default=lambda shape, ctx: dict(v=0),
    why_invalid=_why_invalid,
    compile=_compile,
    build=FakeRunner,
), __name__)
