"""Tunable ops: what a kernel family declares so the autotuner can search it.

A :class:`TunableOp` names one kernel family with a real launch-time choice and gives the search everything it needs
about it, without the search knowing any kernel:

- ``shape_keys``: the fields of a *shape* (a plain dict of the op's static problem: quant type, sizes, path), in
  display order. ``bucket(shape)`` maps a shape to the key the cache stores (most ops: the shape itself; attention:
  the context length rounded up to a power of two).
- ``space(shape, ctx)``: the candidate configs (plain dicts of the compile function's tuning arguments), and
  ``default(shape, ctx)``: the config today's heuristic picks (so the table can show the gain over it, and so the
  engine can fall back to it when nothing is cached).
- ``why_invalid(config, shape, ctx)``: a cheap static check (shared memory against the family budget, divisibility,
  supported values) returning the reason a config cannot run, or None when it can. ``space`` may be a plain grid:
  :meth:`TunableOp.candidates` prunes the points that fail the check (the search never compiles one).
- ``canonical(config, shape, ctx)``: resolves "automatic" values (0 = let the kernel pick) to what the kernel
  actually picks, so the default and the equal explicit candidate are one candidate.
- ``compile(config, shape)``: compile (or load from the kernel disk cache) exactly what the runner will launch; run
  in worker processes by :mod:`autotune.compile_pool`. ``compile_key`` says which shape fields the compiled object
  depends on, so shapes that differ only at run time (attention context) share one compile.
- ``build(shape, ctx)``: a :class:`autotune.measure.KernelRunner` (GPU: inputs, reference, launches, timing).

The op declarations live in ``autotune/ops/*.py``, one adapter module per kernel family; those modules import the
kernel modules only inside functions, so listing ops and looking up cached configs never imports cutlass.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

Config = dict[str, Any]
Shape = dict[str, Any]


@dataclass(frozen=True)
class TuneContext:
    """The device facts a config space or a heuristic depends on (no GPU needed to build one)."""

    sm_count: int
    smem_budget: int  # bytes of shared memory per block the selected kernel family may use
    l2_bytes: int = 50 << 20

    @classmethod
    def for_device(cls, dev) -> "TuneContext":
        from sparkinfer_cute.kernels.arch import smem_budget

        return cls(sm_count=dev.sm_count, smem_budget=smem_budget(), l2_bytes=dev.l2_bytes)


def _identity_bucket(shape: Shape) -> Shape:
    return shape


def _identity_canonical(config: Config, shape: Shape, ctx: TuneContext) -> Config:
    return config


@dataclass(frozen=True)
class TunableOp:
    name: str
    summary: str
    shape_keys: tuple[str, ...]
    space: Callable[[Shape, TuneContext], list[Config]]
    default: Callable[[Shape, TuneContext], Config]
    why_invalid: Callable[[Config, Shape, TuneContext], str | None]
    compile: Callable[[Config, Shape], Any]
    build: Callable[[Shape, TuneContext], Any]
    bucket: Callable[[Shape], Shape] = _identity_bucket
    canonical: Callable[[Config, Shape, TuneContext], Config] = _identity_canonical
    # shape fields the compiled kernel depends on (None: all of them)
    compile_shape_keys: tuple[str, ...] | None = None
    module: str = field(default="", compare=False)
    # ((field, default), ...): shape fields a shape may leave out (taken as the default), written into the cache key
    # only when they differ from it, so the keys of shapes without them stay what they were; always compiled in
    optional_shape_keys: tuple[tuple[str, Any], ...] = ()

    def full_shape(self, shape: Shape) -> Shape:
        """``shape``'s fields of this op: every ``shape_keys`` field, then the optional ones (defaults filled in)."""
        out = {k: shape[k] for k in self.shape_keys}
        out.update((k, shape.get(k, d)) for k, d in self.optional_shape_keys)
        return out

    def shape_key(self, shape: Shape) -> str:
        """The cache key of ``shape``: its bucket, as ``k=v`` pairs in ``shape_keys`` order, then the optional
        fields that differ from their defaults. A shape missing a field is a caller bug (the engine asked with the
        wrong dict): ValueError naming the field."""
        missing = [k for k in self.shape_keys if k not in shape]
        if missing:
            raise ValueError(f"autotune op {self.name!r}: shape {shape} lacks {', '.join(missing)} "
                             f"(expected fields: {', '.join(self.shape_keys)})")
        b = self.bucket(self.full_shape(shape))
        parts = [f"{k}={_fmt(b[k])}" for k in self.shape_keys]
        parts += [f"{k}={_fmt(b[k])}" for k, d in self.optional_shape_keys if b[k] != d]
        return ",".join(parts)

    def compile_key(self, config: Config, shape: Shape) -> Hashable:
        keys = self.shape_keys if self.compile_shape_keys is None else self.compile_shape_keys
        full = self.full_shape(shape)
        return (self.name, config_key(config),
                tuple((k, full[k]) for k in tuple(keys) + tuple(k for k, _ in self.optional_shape_keys)))

    def candidates(self, shape: Shape, ctx: TuneContext) -> tuple[Config, list[Config], list[tuple[Config, str]]]:
        """(canonical default, the valid canonical candidates with the default first and duplicates removed, the
        grid points of ``space`` the validity check pruned with their reasons)."""
        default = self.canonical(dict(self.default(shape, ctx)), shape, ctx)
        valid, pruned, seen = [default], [], {config_key(default)}
        for c in self.space(shape, ctx):
            c = self.canonical(dict(c), shape, ctx)
            k = config_key(c)
            if k in seen:
                continue
            seen.add(k)
            why = self.why_invalid(c, shape, ctx)
            if why is None:
                valid.append(c)
            else:
                pruned.append((c, why))
        return default, valid, pruned


def pow2_bucket(n: int, minimum: int) -> int:
    """``n`` rounded up to a power of two, at least ``minimum``: sizes that vary at run time (context length,
    prompt tokens) share one cache entry per bucket."""
    return max(minimum, 1 << (max(1, int(n)) - 1).bit_length())


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def config_key(config: Config) -> tuple:
    """A hashable, order-independent form of a config dict."""
    return tuple(sorted(config.items()))


def format_config(config: Config | None) -> str:
    if config is None:
        return "-"
    return " ".join(f"{k}={_fmt(v)}" for k, v in config.items())


REGISTRY: dict[str, TunableOp] = {}

# The adapter modules that declare the real ops (imported by :func:`load_ops`).
OP_MODULES = ("gemv", "moe_ffn", "attention", "quant_gemm")


def register(op: TunableOp, module: str) -> TunableOp:
    """Add ``op`` (declared in ``module``, which a spawned compile worker imports to find it again)."""
    from dataclasses import replace

    op = replace(op, module=module)
    REGISTRY[op.name] = op
    return op


def load_ops() -> dict[str, TunableOp]:
    """Import every adapter module in ``autotune/ops/`` (each registers its ops); cheap: no kernel imports.
    Returns the registry in a stable order: the adapters' (``OP_MODULES``), then ops registered elsewhere."""
    for m in OP_MODULES:
        importlib.import_module(f"{__package__}.ops.{m}")
    rank = {f"{__package__}.ops.{m}": i for i, m in enumerate(OP_MODULES)}
    ordered = sorted(REGISTRY.values(), key=lambda op: rank.get(op.module, len(rank)))  # stable within a module
    return {op.name: op for op in ordered}


def get_op(name: str) -> TunableOp:
    if name not in REGISTRY:
        load_ops()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown autotune op {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def unknown_keys_reason(config: Config, allowed: set[str]) -> str | None:
    """The reason for a config carrying tuning arguments its kernel does not take, else None."""
    extra = sorted(set(config) - allowed)
    if extra:
        return f"unknown tuning argument(s) {', '.join(extra)} (this kernel takes {', '.join(sorted(allowed))})"
    return None


def int_in(config: Config, key: str, allowed) -> str | None:
    """The reason ``config[key]`` is not one of ``allowed`` (an int), else None."""
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
        return f"{key}={v!r} is not one of {', '.join(str(a) for a in allowed)}"
    return None
