"""What share of a decode token the attention takes, per layer geometry (issue 14: "an hd512 attention share").

    python tools/attention_share.py --model FILE.gguf --bench bench.json --attention attn.json

``bench.json``: ``python -m sparkinfer_cute.bench FILE --depth D --json bench.json`` (its decode tok/s at depth D);
``attn.json``: ``python -m sparkinfer_cute.kernels.microbench --attention --prologue --config NAME ... --ctx N
--json attn.json`` (µs per call of the attention kernels of the model's geometries, the kernels/attention_decode.py
``MODEL_CONFIGS`` entries, with the Q/K prologue inside as the default build runs them). For each geometry: the
model's layers of that geometry (n_head, KV heads, head_dim), µs per call, ms per token, and the share of the token
time at depth. Pick the microbench contexts as the model sees them at depth D: D for full layers, the window for
sliding ones (their live keys). The share is an estimate: kernels overlap their neighbours under PDL, so the
isolated µs may overstate what a layer costs inside the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def attention_share(cfg, tok_per_s: float, rows: list[dict], model_configs: dict) -> list[dict]:
    """One row per microbench row whose config geometry the model has: {config, n_ctx, layers, us, ms_per_token,
    share}. ``cfg``: the model config (``n_layer``, ``n_head``, ``n_head_kv_for(l)``, ``head_dim_for(l)``);
    ``tok_per_s``: decode speed; ``model_configs``: attention_decode.py ``MODEL_CONFIGS``. Rows with the prologue
    are preferred over rows without for the same config and context (the default build runs it inside)."""
    token_ms = 1e3 / tok_per_s
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["config"], r["n_ctx"])
        if key not in best or (r.get("prologue") and not best[key].get("prologue")):
            best[key] = r
    out = []
    for (name, n_ctx), r in best.items():
        c = model_configs[name]
        layers = sum(1 for l in range(cfg.n_layer)
                     if (cfg.n_head, cfg.n_head_kv_for(l), cfg.head_dim_for(l)) ==
                     (c["n_head"], c["n_kv_head"], c["head_dim"]))
        if not layers:
            continue
        ms = layers * r["us"] / 1e3
        out.append(dict(config=name, n_ctx=n_ctx, head_dim=c["head_dim"], layers=layers, us=r["us"],
                        prologue=bool(r.get("prologue")), ms_per_token=round(ms, 4),
                        share=round(ms / token_ms, 4)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--attention", required=True)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.kernels.attention_decode import MODEL_CONFIGS

    bench = json.load(open(a.bench))
    tps = bench.get("decode_tps_at_depth_median") or bench["decode_tps_median"]
    depth = bench.get("depth", 0)
    rows = attention_share(load_config(GGUFFile(a.model)), tps, json.load(open(a.attention))["attention"],
                           MODEL_CONFIGS)
    print(f"decode {tps:.1f} tok/s at depth {depth} ({1e3 / tps:.3f} ms per token)")
    for r in rows:
        print(f"  {r['config']:24s} hd {r['head_dim']:3d}  ctx {r['n_ctx']:6d}  {r['layers']:2d} layers x "
              f"{r['us']:7.2f} us = {r['ms_per_token']:.3f} ms/token = {100 * r['share']:.1f}% of the token")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(decode_tps=tps, depth=depth, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
