"""The engine's side of the autotuner: load the tuned configs of this GPU once, look them up per kernel call site.

    from sparkinfer_cute.autotune import load_tuned, describe_tuning

    tuned = load_tuned(device)                       # once at start-up (<= 0.1 s; no kernel or cutlass import)
    cfg = tuned.get("gemv_q8", dict(qtype="Q4_K", n_in=2048, n_out=4096))
    # cfg: e.g. {"mapping": "chunk", "rows_per_warp": 1} -- the tuning arguments of the kernel's compile function
    # (see the op's adapter in autotune/ops/) -- or None: nothing usable tuned for this shape, use today's heuristic
    print(describe_tuning())                         # bench: whether tuned configs were used, and where

The engine hands the :class:`TunedConfigs` to the GPU forward (``GPUDecoder(..., tuned=...)``); the binding layer
``models/ops.py`` asks it at every kernel call site with the op's shape. A cached config is re-checked against the
op's validity check (``TunableOp.why_invalid``, at the real shape) before it is handed out: a config that fails it
(a hand-edited file, a space that shrank) is refused with a one-line warning and the default is used. A caller may
also refuse a valid config its call site cannot take (``applicable``: the fused q/k/v launch has no slice mapping).
Every decision is recorded per call site (:attr:`TunedConfigs.sites`), so :func:`describe_tuning` says how many
call sites run a tuned config and how many the default.

``SPARKINFER_AUTOTUNE=0`` disables lookups (every ``get`` returns None) for A/B runs against the defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .cache import DeviceIdentity, TuneCache, current_metadata
from .registry import Shape, TuneContext, format_config, get_op

ENV_SWITCH = "SPARKINFER_AUTOTUNE"

# what :attr:`Site.source` says
TUNED, DEFAULT, REFUSED, NOT_APPLICABLE = "tuned", "default", "refused", "not applicable"


def autotune_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Site:
    """The decision at one call site: ``source`` (tuned / default / refused / not applicable), the tuned config
    handed out (None unless tuned), whether the search kept the default there (the cached config is the default's
    own: applied as cached, no gain expected) and, for a refusal, why."""

    op: str
    key: str
    where: str
    source: str
    config: dict | None = None
    reason: str = ""
    kept_default: bool = False


class TunedConfigs:
    """The tuned entries of one GPU (maybe none) and the lookups made against them.

    ``ctx``: the device facts the validity checks need (SM count, shared-memory budget of the kernel family)."""

    def __init__(self, entries: dict | None = None, *, status: str = "ok", source=None, device: str = "",
                 ctx: TuneContext | None = None):
        self.entries = entries or {}
        self.status = status
        self.source = source
        self.device = device
        self.ctx = ctx
        self.sites: dict[tuple[str, str, str], Site] = {}  # (where, op, shape key) -> decision
        self._valid: dict[tuple, str | None] = {}  # (op, shape values, config) -> why_invalid
        self._warned: set[tuple] = set()

    @property
    def enabled(self) -> bool:
        return self.status == "ok"

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def count(self, source: str) -> int:
        """Call sites whose decision was ``source`` (:data:`TUNED`, :data:`DEFAULT`, ...)."""
        return sum(1 for s in self.sites.values() if s.source == source)

    def get(self, op: str, shape: Shape, *, where: str = "",
            applicable: Callable[[dict], str | None] | None = None) -> dict | None:
        """The tuned config of ``op`` at ``shape`` (a copy), or None: fall back to the default heuristic.

        ``shape`` needs every field of the op's ``shape_keys`` (its optional fields default; extra fields are
        ignored); it is bucketed as the
        search bucketed it (e.g. attention context lengths round up to a power of two). The config must pass the
        op's validity check at ``shape`` (else: refused, warned once, None) and ``applicable`` when given (the call
        site's own limits: a reason string refuses it). ``where`` names the call site in :attr:`sites`."""
        if not self.enabled:
            return None
        top = get_op(op)
        key = top.shape_key(shape)
        site = (where or op, op, key)
        entry = self.entries.get(op, {}).get(key)
        if entry is None:
            self.sites[site] = Site(op, key, where or op, DEFAULT)
            return None
        cfg = dict(entry["config"])
        exact = top.full_shape(shape)
        why = self._why_invalid(top, cfg, exact)
        if why is not None:
            self.sites[site] = Site(op, key, where or op, REFUSED, reason=why)
            if (op, key) not in self._warned:
                self._warned.add((op, key))
                print(f"sparkinfer_cute.autotune: refusing the tuned config {format_config(cfg)} of {op} [{key}] "
                      f"({why}); using the default", file=sys.stderr)
            return None
        if applicable is not None:
            why = applicable(cfg)
            if why is not None:
                self.sites[site] = Site(op, key, where or op, NOT_APPLICABLE, reason=why)
                return None
        self.sites[site] = Site(op, key, where or op, TUNED, config=dict(cfg),
                                kept_default=entry.get("default") == entry["config"])
        return cfg

    def _why_invalid(self, top, cfg: dict, shape: Shape) -> str | None:
        memo = (top.name, tuple(shape.items()), tuple(sorted(cfg.items(), key=lambda kv: kv[0])))
        try:
            hash(memo)
        except TypeError:  # a config value that is not a plain scalar (a hand-edited list, say): not a config
            return f"config {cfg!r} has a value that is not a scalar"
        if memo not in self._valid:
            ctx = self.ctx if self.ctx is not None else _default_ctx()
            try:
                self._valid[memo] = top.why_invalid(cfg, shape, ctx)
            except (KeyError, TypeError, ValueError, AssertionError) as e:  # a malformed config breaks the check
                self._valid[memo] = f"{type(e).__name__}: {e}"
        return self._valid[memo]


def _default_ctx() -> TuneContext:
    from sparkinfer_cute.kernels.arch import smem_budget

    return TuneContext(sm_count=0, smem_budget=smem_budget())


def _context(device, ident: DeviceIdentity) -> TuneContext:
    from sparkinfer_cute.kernels.arch import smem_budget

    return TuneContext(sm_count=ident.sm_count, smem_budget=smem_budget(),
                       l2_bytes=int(getattr(device, "l2_bytes", 0) or (50 << 20)))


_last: TunedConfigs | None = None


def load_tuned(device=None, *, path=None) -> TunedConfigs:
    """The tuned configs for ``device`` (a ``runtime.Device``, a :class:`DeviceIdentity`, or None: the current GPU).

    Never raises for a missing, stale or corrupt cache (that is "nothing tuned"); returns an empty
    :class:`TunedConfigs` whose ``status`` says why."""
    global _last
    cache = TuneCache(path)
    if not autotune_enabled():
        _last = TunedConfigs(status=f"off ({ENV_SWITCH}=0)", source=cache.path)
        return _last
    try:
        if device is None:
            from sparkinfer_cute.runtime import get_device

            device = get_device()
        ident = DeviceIdentity.of(device)
    except Exception as e:  # no GPU/driver: nothing to tune for
        _last = TunedConfigs(status=f"no GPU ({type(e).__name__})", source=cache.path)
        return _last
    entries, status = cache.block_for(ident, current_metadata(ident))
    _last = TunedConfigs(entries, status=status, source=cache.path, device=ident.name, ctx=_context(device, ident))
    return _last


def describe_tuning(tuned: TunedConfigs | None = None) -> str:
    """One line for the bench/run output: whether tuned configs were used (default: the last :func:`load_tuned`):
    the cache status, and per call site (a kernel launch site of the forward at one shape) tuned vs default."""
    t = tuned if tuned is not None else _last
    if t is None:
        return "autotune: not consulted (defaults)"
    if not t.enabled:
        return f"autotune: defaults ({t.status}; cache {t.source})"
    n = len(t.sites)
    if not n:
        used = "no call site looked up yet"
    else:
        used = f"tuned config at {t.count(TUNED)} of {n} call sites, default at {t.count(DEFAULT)}"
        kept = sum(1 for s in t.sites.values() if s.source == TUNED and s.kept_default)
        extra = [f"{kept} of the tuned where the search kept the default"] if kept else []
        extra += [f"{t.count(s)} {s}" for s in (REFUSED, NOT_APPLICABLE) if t.count(s)]
        if extra:
            used += f" ({', '.join(extra)})"
    return f"autotune: {len(t)} tuned configs for {t.device}; {used} (cache {t.source})"


def describe_sites(tuned: TunedConfigs | None = None) -> list[str]:
    """One line per call site that did not simply take the default: what was applied, refused, or not applied."""
    t = tuned if tuned is not None else _last
    if t is None:
        return []
    return [f"{s.where}: {s.op} [{s.key}] {s.source}" + (" (the default kept)" if s.kept_default else "")
            + (f": {format_config(s.config)}" if s.config else "") + (f" ({s.reason})" if s.reason else "")
            for s in t.sites.values() if s.source != DEFAULT]
