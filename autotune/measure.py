"""Running and timing one candidate config on the GPU: the base of every op's runner.

Timing method (that of ``kernels/microbench.py``, whose helpers are used here): host-side marshalling of a CuTe DSL
launch (~5-8 µs) is longer than most decode kernels, so ``G`` launches are captured into one CUDA graph (as the
model's decode step is) and each replay is timed with a pair of CUDA events; the result is the median over ``reps``
replays (after warm-up replays) of replay time / G.

Two modes:

- **warm**: every launch reads the same inputs (L2-resident when they fit: a lower bound, not what decode sees);
- **cold-L2** (the default of the CLI): the launches rotate over enough copies of the inputs (weights, KV pages,
  expert-id sets) that the bytes touched between two uses of a copy exceed twice the L2 size read from the device,
  so every launch streams from DRAM, as a decode step whose weights are read once per token does.

Verification: :meth:`KernelRunner.run` poisons the outputs (0xFF bytes: NaN in f32), launches the config once on
input set 0 and returns the output; the op's :meth:`KernelRunner.check` compares it with the op's float64 reference
within the kernel's documented error bound. The search times only configs that pass.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .registry import Config, TuneContext

DEFAULT_REPS = 30
LAUNCHES_PER_GRAPH = 20
MAX_COPY_BYTES = 2 << 30  # input copies for the cold-L2 rotation stop here


def copies_for_cold_l2(nbytes: int, l2_bytes: int) -> int:
    """Input copies needed so that rotating over them touches > 2x the L2 between two uses of one copy."""
    from sparkinfer_cute.kernels.microbench import _n_copies

    return _n_copies(nbytes, l2_bytes, MAX_COPY_BYTES)


def time_launches(launches: list[Callable[[], None]], stream, reps: int) -> float:
    """Median µs per launch of a CUDA graph of ``launches`` (in order), over ``reps`` timed replays."""
    from sparkinfer_cute.kernels.microbench import _time_graph

    med, _ = _time_graph(launches, stream, reps)
    return float(med)


def ptr(dtype, addr: int, align: int = 16):
    from sparkinfer_cute.kernels.common import gptr

    return gptr(dtype, addr, align)


def x_pointers(x, xq=None) -> tuple:
    """(x f32, xq i8, xd f32, xs f32) launch pointers of an activation, as ``kernels/q8_1.py x_pointers`` gives them
    to the kernels that take both paths: ``xq`` (a q8_1 ``Q8Act``) given, the dp4a pointers, else those of the f32
    DeviceArray ``x``; the pointers a path does not read are any valid address."""
    from cutlass import Float32, Int8

    if xq is not None:
        return ptr(Float32, xq.d.ptr), ptr(Int8, xq.qs.ptr), ptr(Float32, xq.d.ptr), ptr(Float32, xq.s.ptr)
    return ptr(Float32, x.ptr), ptr(Int8, x.ptr), ptr(Float32, x.ptr), ptr(Float32, x.ptr)


def sample_rows(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` sorted distinct indices of ``range(n)``: the first and last two, the rest at random (the edges
    are where a tiling or rows-per-warp split goes wrong first)."""
    if n <= k:
        return np.arange(n)
    edges = {0, 1, n - 2, n - 1}
    rest = rng.choice(np.arange(2, n - 2), size=k - len(edges), replace=False)
    return np.array(sorted(edges | {int(i) for i in rest}))


def nonfinite(out: np.ndarray, what: str = "output") -> str | None:
    """One line when some element of ``out`` is not finite (unwritten: outputs are poisoned with NaN), else None."""
    bad = int(np.size(out) - np.isfinite(out).sum())
    if bad:
        return f"{bad} of {np.size(out)} {what} elements not finite (unwritten, or overflow)"
    return None


def bound_violation(got: np.ndarray, ref: np.ndarray, bound: np.ndarray, what: str = "output") -> str | None:
    """None when every element is finite and within its bound, else one line naming the worst element."""
    got = np.asarray(got, np.float64)
    why = nonfinite(got, what)
    if why:
        return why
    excess = np.abs(got - ref) - bound
    if (excess <= 0).all():
        return None
    i = np.unravel_index(int(np.argmax(excess)), excess.shape)
    return (f"{what}{list(i)} = {got[i]:.6g}, reference {ref[i]:.6g}: error {abs(got[i] - ref[i]):.3g} exceeds the "
            f"bound {bound[i]:.3g} ({int((excess > 0).sum())} elements out of bound)")


class KernelRunner:
    """One shape's inputs on the GPU, its reference, and launches of any config on them.

    Subclasses set ``self.n_sets`` (input sets for the cold-L2 rotation), ``self.outputs`` (device arrays poisoned
    before a verification run; the first is returned by :meth:`run`) and implement :meth:`launcher` and
    :meth:`check`."""

    def __init__(self, shape: dict, ctx: TuneContext, seed: int = 0):
        from sparkinfer_cute.runtime import Stream

        self.shape, self.ctx = dict(shape), ctx
        self.rng = np.random.default_rng(seed)
        self.stream = Stream()
        self.n_sets = 1
        self.outputs: list = []

    # ------------------------------------------------------------------ per op
    def launcher(self, config: Config, i: int) -> Callable[[], None]:
        """A zero-argument callable launching ``config`` on input set ``i`` into the output buffers."""
        raise NotImplementedError

    def check(self, config: Config, out: np.ndarray) -> str | None:
        """None when ``out`` (from :meth:`run`) matches the reference within the kernel's bound, else why not."""
        raise NotImplementedError

    def before_launch(self, config: Config) -> None:
        """Hook run before a verification launch and before a graph capture (e.g. zero arrival counters)."""

    # ------------------------------------------------------------------ shared
    def run(self, config: Config) -> np.ndarray:
        for o in self.outputs:
            o.fill_bytes(0xFF, self.stream)
        self.before_launch(config)
        self.launcher(config, 0)()
        self.stream.synchronize()
        return self.outputs[0].to_numpy(stream=self.stream)

    def time_us(self, config: Config, *, cold: bool, reps: int = DEFAULT_REPS) -> float:
        n = self.n_sets if cold else 1
        fns = [self.launcher(config, i % n) for i in range(max(LAUNCHES_PER_GRAPH, n))]
        self.before_launch(config)
        return time_launches(fns, self.stream, reps)

    def close(self) -> None:
        self.stream.synchronize()
        self.outputs = []
