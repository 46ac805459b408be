"""GPU bisection of a batched-prefill accuracy gap: where, layer by layer and stage by stage, the batched prefill
(``enqueue_prefill``) leaves the CPU reference run with the same q8_1 activation rounding.

For each layer L it runs the prefill of the prompt through L layers (``prefill_hidden_after_layers``) and prints
the per-position relative error of the residual stream against the same-rounding reference's
``resid.{L-1}`` (models/int8_plan.py ``rounding_plan``), and of that
layer's stage buffers against the reference's captures (q after RoPE, attention output, the normed attention and
FFN branches); then the per-position KL of the all-position logits by position band (window crossings), and the
decode-loop logits against a reference with the decode path's rounding (the same question asked of decode).

Usage (GPU host): ``python3 tools/prefill_bisect.py [--arch gemma4] [--preset tiny] [--n 96] [--seed 11]
[--gguf FILE] [--json OUT]``; ``SPARKINFER_DISABLE=flash_prefill`` etc. apply as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

# reference capture key -> prefill chunk buffer, per architecture (buffers that still hold the stage after the layer)
STAGES = {
    "gemma4": {"q": "q", "attn_o": "attn", "attn_out": "delta", "ffn_moe": "y2", "ffn_out": "fn"},  # (m holds m + y2)
    "gemma3": {"q": "q", "attn_o": "attn", "ffn_out": "delta"},
    "qwen3moe": {"q": "q", "attn_o": "attn"},
}


def rel_rows(got, want) -> np.ndarray:
    want = np.asarray(want, np.float64).reshape(len(want), -1)
    got = np.asarray(got, np.float64).reshape(-1)[: want.size].reshape(want.shape)
    return np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)


def kl_rows(p_logits, q_logits) -> np.ndarray:
    """KL(p || q) per row over the whole vocabulary (float64)."""
    from sparkinfer_cute.reference.ops import log_softmax

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), -1)


def bands(v: np.ndarray, width: int) -> str:
    return " ".join(f"[{i}:{min(i + width, len(v))}) {v[i:i + width].mean():.2e}/{v[i:i + width].max():.2e}"
                    for i in range(0, len(v), width))


def prompt(vocab: int, args) -> list[int]:
    rng = np.random.default_rng(args.seed)
    return [2] + rng.integers(4, vocab, size=args.n - 1).tolist()


def explain(path: str, args) -> int:
    """CPU: the reference with the q8_1 activations only against the one that also rounds like the flash prefill
    kernel, beside the GPU's measured KL against the former (``--json`` of a ``--no-attn-rounding`` run)."""
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.models.int8_plan import rounding_plan
    from sparkinfer_cute.reference import load_reference

    tokens = prompt(load_config(GGUFFile(path)).vocab_size, args)
    plan = rounding_plan(path, path="prefill_all_logits")
    q8 = load_reference(path, max_context=args.n + 1, act_q8_1=plan["act_q8_1"]).forward(tokens)
    both = load_reference(path, max_context=args.n + 1, **plan).forward(tokens)
    kl = kl_rows(q8, both)
    with open(args.explain) as f:
        gpu = np.asarray(json.load(f)["prefill_kl"])
    corr = np.corrcoef(np.log(kl + 1e-12), np.log(gpu + 1e-12))[0, 1]
    print(f"reference, q8_1 only -> q8_1 + flash f16 q/P (tiles {plan['attn_f16_tiles']}): KL mean {kl.mean():.2e} "
          f"median {np.median(kl):.2e}, top-1 {np.mean(q8.argmax(-1) == both.argmax(-1)):.3f}")
    print(f"GPU prefill against the q8_1-only reference ({args.explain}): KL mean {gpu.mean():.2e} "
          f"median {np.median(gpu):.2e}; per-position correlation of log KL {corr:.2f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gemma4")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--gguf", help="a model file instead of the synthetic preset")
    ap.add_argument("--n", type=int, default=96, help="prompt tokens (one chunk)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json")
    ap.add_argument("--explain", metavar="JSON",
                    help="CPU only: how far the flash kernel's f16 rounding alone moves the q8-only reference, next "
                         "to a --no-attn-rounding GPU run's per-position KL saved in JSON (same --arch/--seed/--n)")
    ap.add_argument("--no-attn-rounding", action="store_true",
                    help="the reference without the flash prefill kernel's f16 q and P (only the q8_1 activations)")
    args = ap.parse_args(argv)

    from sparkinfer_cute.gguf.synth import write_synthetic
    from sparkinfer_cute.models.int8_plan import int8_activation_tensors, rounding_plan
    from sparkinfer_cute.reference import load_reference

    path = args.gguf
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), f"{args.arch}_{args.preset}.gguf")
        write_synthetic(path, arch=args.arch, preset=args.preset, seed=args.seed)
    if args.explain:
        return explain(path, args)
    from sparkinfer_cute.engine import Engine

    eng = Engine(path, backend_name="gpu", max_context=max(320, args.n + 8), progress=False)
    b, cfg = eng.backend, eng.cfg
    tokens = prompt(cfg.vocab_size, args)
    window = int(getattr(cfg, "sliding_window", 0) or 0)
    print(f"{cfg.arch} {os.path.basename(path)}: {cfg.n_layer} layers, {args.n} tokens, window {window}, "
          f"SPARKINFER_DISABLE={os.environ.get('SPARKINFER_DISABLE', '')}")

    plan = rounding_plan(path, path="prefill_all_logits")  # int8 GEMMs, the flash attention's f16 q and P
    if args.no_attn_rounding:
        plan["attn_f16_tiles"] = {}
    cap: dict = {}
    ref_logits = load_reference(path, max_context=args.n + 1, **plan).forward(tokens, capture=cap)
    exact_logits = load_reference(path, max_context=args.n + 1).forward(tokens)
    out: dict = {"arch": cfg.arch, "n": args.n, "layers": []}
    stages = STAGES.get(cfg.arch, {})
    for L in range(1, cfg.n_layer + 1):
        x, bufs = b.prefill_hidden_after_layers(tokens, L)
        l = L - 1
        r = rel_rows(x, cap[f"resid.{l}"])
        row = {"layer": l, "resid": [float(r.mean()), float(r.max()), int(r.argmax())]}
        line = f"layer {l:2d} resid rel mean {r.mean():.2e} max {r.max():.2e} @{int(r.argmax()):3d}"
        for key, buf in stages.items():
            if f"{key}.{l}" in cap and buf in bufs:
                s = rel_rows(bufs[buf], cap[f"{key}.{l}"])
                row[key] = [float(s.mean()), float(s.max()), int(s.argmax())]
                line += f" | {key} {s.mean():.1e}/{s.max():.1e}@{int(s.argmax())}"
        if f"moe_sel.{l}" in cap and "ids" in bufs:  # routing flips: rows whose expert set differs
            sel = cap[f"moe_sel.{l}"]
            ids = bufs["ids"][: sel.size].reshape(sel.shape)
            flips = int(sum(set(a) != set(c) for a, c in zip(ids.tolist(), sel.tolist())))
            row["routing_flips"] = flips
            line += f" | routing flips {flips}/{len(sel)}"
        print(line, flush=True)
        out["layers"].append(row)

    got = b.prefill_all_logits(tokens)
    kl = kl_rows(ref_logits, got)
    kl_exact = kl_rows(exact_logits, got)
    kl_twin = kl_rows(exact_logits, ref_logits)  # what the activation rounding itself costs
    band = window or 32
    print(f"prefill logits KL vs same-rounding ref: mean {kl.mean():.2e} median {np.median(kl):.2e} "
          f"(mean/max by band: {bands(kl, band)})")
    print(f"prefill logits KL vs exact f32 ref:     mean {kl_exact.mean():.2e}; the rounding itself (ref q8 vs "
          f"exact): mean {kl_twin.mean():.2e}")
    top1 = float(np.mean(np.argmax(got, -1) == np.argmax(ref_logits, -1)))
    print(f"prefill top-1 vs same-rounding ref {top1:.3f}")
    out["prefill_kl"] = kl.tolist()
    out["prefill_kl_exact"] = kl_exact.tolist()

    # the decode loop on the same prompt, against the reference with the decode path's rounding
    dec_names = int8_activation_tensors(path, path="decode")
    ref_dec = load_reference(path, max_context=args.n + 1, act_q8_1=dec_names).forward(tokens)
    b.reset()
    dec = np.stack([b.decode(t) for t in tokens])
    b.reset()
    kd = kl_rows(ref_dec, dec)
    kd_exact = kl_rows(exact_logits, dec)
    print(f"decode  logits KL vs same-rounding ref: mean {kd.mean():.2e} median {np.median(kd):.2e} "
          f"(by band: {bands(kd, band)}); vs exact mean {kd_exact.mean():.2e}")
    print(f"prefill vs decode logits KL mean {kl_rows(dec, got).mean():.2e}")
    out["decode_kl"] = kd.tolist()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
