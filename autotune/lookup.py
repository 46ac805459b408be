"""The engine's side of the autotuner: load the tuned configs of this GPU once, look them up per kernel call site.

    from sparkinfer_cute.autotune import load_tuned, describe_tuning

    tuned = load_tuned(device)                       # once at start-up (<= 0.1 s; no kernel or cutlass import)
    cfg = tuned.get("gemv_q8", dict(qtype="Q4_K", n_in=2048, n_out=4096))
    # cfg: e.g. {"mapping": "chunk", "rows_per_warp": 1} -- the tuning arguments of the kernel's compile function
    # (see the op's adapter in autotune/ops/) -- or None: nothing tuned for this shape, use today's heuristic
    print(describe_tuning())                         # bench: whether tuned configs were used

``SPARKINFER_AUTOTUNE=0`` disables lookups (every ``get`` returns None) for A/B runs against the defaults.
"""

from __future__ import annotations

import os

from .cache import DeviceIdentity, TuneCache, current_metadata
from .registry import Shape, get_op

ENV_SWITCH = "SPARKINFER_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class TunedConfigs:
    """The tuned entries of one GPU (maybe none) and the lookups made against them."""

    def __init__(self, entries: dict | None = None, *, status: str = "ok", source=None, device: str = ""):
        self.entries = entries or {}
        self.status = status
        self.source = source
        self.device = device
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.status == "ok"

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def get(self, op: str, shape: Shape) -> dict | None:
        """The tuned config of ``op`` at ``shape`` (a copy), or None: fall back to the default heuristic.

        ``shape`` needs every field of the op's ``shape_keys`` (extra fields are ignored); it is bucketed as the
        search bucketed it (e.g. attention context lengths round up to a power of two)."""
        if not self.enabled:
            self.misses += 1
            return None
        entry = self.entries.get(op, {}).get(get_op(op).shape_key(shape))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return dict(entry["config"])


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
    _last = TunedConfigs(entries, status=status, source=cache.path, device=ident.name)
    return _last


def describe_tuning(tuned: TunedConfigs | None = None) -> str:
    """One line for the bench/run output: whether tuned configs were used (default: the last :func:`load_tuned`)."""
    t = tuned if tuned is not None else _last
    if t is None:
        return "autotune: not consulted (defaults)"
    if not t.enabled:
        return f"autotune: defaults ({t.status}; cache {t.source})"
    looked = t.hits + t.misses
    used = f"{t.hits} of {looked} lookups tuned" if looked else "no lookups yet"
    return f"autotune: {len(t)} tuned configs for {t.device}, {used} (cache {t.source})"
