"""Helpers of the tuned-config tests (CPU dry run and GPU decode): a fake autotune cache for a model, with an entry
for every (op, shape) the model runs, read from its GGUF file by the search's own shape list (``autotune/shapes.py``),
so the keys are exactly what a tuning run stores."""

from __future__ import annotations


def applicable_everywhere(op: str, cfg: dict) -> bool:
    """Candidates every call site can take (the fused q/k/v launch: the chunk mapping; a grouped GEMM: the routing
    tables' 32-token tile, ``models/ops.py MOE_TILE_TOKENS``), so that tuned calls show at every site kind."""
    return cfg.get("mapping", "chunk") == "chunk" and cfg.get("tile_tokens", 32) == 32


def model_task_keys(gguf_path: str, *, max_context: int, prefill_tokens: int) -> set:
    """(op, shape key) of every task the search would tune for the model."""
    from sparkinfer_cute.autotune.registry import load_ops
    from sparkinfer_cute.autotune.shapes import load_model_tasks

    ops = load_ops()
    _, tasks, _ = load_model_tasks(gguf_path, list(ops), ctxs=(max_context,), prefill_tokens=prefill_tokens)
    return {(t.op, ops[t.op].shape_key(t.shape)) for t in tasks}


def write_tuned_cache(gguf_path: str, ident, ctx, cache_path, rng, *, max_context: int, prefill_tokens: int,
                      prefer=None) -> dict:
    """Write ``cache_path`` (metadata of ``ident``: the block the engine loads) with, for every task of the model
    whose space has a valid candidate other than the default, one such candidate drawn with ``rng`` (a config the
    engine would not pick by itself, so its knobs are visible; among those ``prefer(op, config)`` accepts, when
    any). Returns {op: {shape key: config}}."""
    from sparkinfer_cute.autotune.cache import TuneCache, current_metadata
    from sparkinfer_cute.autotune.registry import config_key, load_ops
    from sparkinfer_cute.autotune.shapes import load_model_tasks

    ops = load_ops()
    _, tasks, _ = load_model_tasks(gguf_path, list(ops), ctxs=(max_context,), prefill_tokens=prefill_tokens)
    entries: dict = {}
    for t in tasks:
        op = ops[t.op]
        default, valid, _ = op.candidates(t.shape, ctx)
        others = [c for c in valid if config_key(c) != config_key(default)]
        if not others:
            continue
        pool = [c for c in others if prefer(t.op, c)] if prefer is not None else []
        pool = pool or others
        cfg = pool[int(rng.integers(len(pool)))]
        entries.setdefault(t.op, {})[op.shape_key(t.shape)] = {"config": cfg, "default": default, "us": 1.0,
                                                               "default_us": 2.0, "timing": "fake (test)"}
    TuneCache(cache_path).put(ident, current_metadata(ident), entries)
    return {op: {k: e["config"] for k, e in by.items()} for op, by in entries.items()}
