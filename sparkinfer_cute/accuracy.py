"""`python -m sparkinfer_cute.accuracy MODEL.gguf [--reference cpu|FIXTURE.npz] [-n 128] [--text FILE]`

Teacher-forces a fixed text through the GPU path and a reference (the numpy CPU reference forward, or a compact
top-K fixture saved from llama.cpp) and prints top-1 agreement, mean KL (nats, on the reference's top-32 support) and
the perplexity of both. This is the gate every speed change must pass against the previous build:
``--save-topk FILE.npz`` records this build's top-32 so the next build can be compared with ``--reference FILE.npz``.
Exit status 1 when a threshold given with --min-top1 / --max-kl / --max-ppl-rel is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.resources import files

import numpy as np

from .engine import CPU_NUMERICS, DEFAULT_CPU_NUMERICS


def default_text() -> str:
    return files("sparkinfer_cute").joinpath("data/accuracy_text.txt").read_text()


def teacher_forced_logits(backend, tokens: list[int]) -> np.ndarray:
    """Logits after each of tokens[:-1] (row i predicts tokens[i+1]), one decode step per token, from an empty cache."""
    backend.reset()
    rows = [backend.prefill([tokens[0]])]
    for t in tokens[1:-1]:
        rows.append(backend.decode(t))
    return np.stack(rows).astype(np.float32)


def reference_logits(g, tokens: list[int], max_context: int) -> np.ndarray:
    from .reference import load_reference

    ref = load_reference(g, max_context=max_context)
    return ref.forward(tokens[:-1], all_logits=True)


def hidden_check(eng, tokens: list[int], args) -> int:
    """GPU residual stream after L layers vs the reference's ``resid.{L-1}`` (float32 numpy), per position."""
    from .reference import load_reference

    L = args.hidden_layers
    t0 = time.perf_counter()
    got = eng.backend.hidden_after_layers(tokens, L)
    t_test = time.perf_counter() - t0
    ref = load_reference(eng.gguf, max_context=len(tokens) + 1)
    ref.n_layer = L  # run only the first L layers of the reference (its forward loops over range(self.n_layer))
    cap: dict = {}
    t0 = time.perf_counter()
    ref.forward(tokens, all_logits=False, capture=cap)
    t_ref = time.perf_counter() - t0
    want = cap["embd"] if L == 0 else cap[f"resid.{L - 1}"]
    rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    print(f"hidden state after {L} layers of {eng.cfg.arch} ({eng.cfg.n_layer} layers), {len(tokens)} positions, "
          f"{eng.backend.name} vs cpu-reference: rel. error max {rel.max():.2e}, mean {rel.mean():.2e} "
          f"(gpu {t_test:.1f} s, reference {t_ref:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": L, "positions": len(tokens), "rel_max": float(rel.max()),
                       "rel_mean": float(rel.mean()), "per_position": rel.tolist()}, f, indent=1)
    ok = args.max_hidden_rel is None or rel.max() <= args.max_hidden_rel
    print("  gates:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparkinfer_cute.accuracy", description=__doc__.split("\n\n")[1])
    ap.add_argument("model", nargs="?", help="GGUF file (default: the packaged Gemma 3 270M)")
    ap.add_argument("--reference", default="cpu", help="'cpu' (numpy reference forward) or a top-K .npz fixture")
    ap.add_argument("--backend", default="gpu", choices=("gpu", "cpu"), help="the side under test")
    ap.add_argument("--cpu-numerics", default=DEFAULT_CPU_NUMERICS, choices=CPU_NUMERICS,
                    help="numerics of the CPU backend when it is the side under test (--backend cpu); the 'cpu' "
                         "reference itself is always exact float32")
    ap.add_argument("-n", "--positions", type=int, default=128, help="scored positions (>= 128 for the gates)")
    ap.add_argument("--text", help="text file to teacher-force (default: the packaged English passage)")
    ap.add_argument("--tokens", help="comma-separated token ids instead of text (e.g. for synthetic vocabularies)")
    ap.add_argument("--random-tokens", type=int, default=None, metavar="SEED",
                    help="teacher-force random token ids (synthetic models, whose vocabularies are not language)")
    ap.add_argument("--hidden-layers", type=int, default=None, metavar="L",
                    help="instead of logits, compare the residual stream after the first L layers with the CPU "
                         "reference (for models too large to run whole on the CPU); prints per-position rel. error")
    ap.add_argument("--max-hidden-rel", type=float, default=None, help="gate for --hidden-layers (e.g. 1e-3)")
    ap.add_argument("--save-topk", help="write this run's top-32 record (+ tokens) to an .npz")
    ap.add_argument("--json", help="write the metrics as JSON here")
    ap.add_argument("--min-top1", type=float, default=None)
    ap.add_argument("--max-kl", type=float, default=None)
    ap.add_argument("--max-ppl-rel", type=float, default=None)
    args = ap.parse_args(argv)

    from .engine import Engine, default_model_path
    from .reference.metrics import teacher_forced_compare, topk_record

    path = args.model or default_model_path()
    eng = Engine(path, backend_name=args.backend, max_context=args.positions + 8, progress=False,
                 cpu_numerics=args.cpu_numerics)
    n = args.positions
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    elif args.random_tokens is not None:
        rng = np.random.default_rng(args.random_tokens)
        tokens = rng.integers(0, eng.cfg.vocab_size, size=n + 1).tolist()
        if eng.tokenizer.add_bos:
            tokens[0] = eng.tokenizer.bos_id
    else:
        text = open(args.text).read() if args.text else default_text()
        tokens = eng.tokenizer.encode(text)
    tokens = tokens[: n + 1]
    if len(tokens) < n + 1:
        print(f"warning: the text has only {len(tokens)} tokens; scoring {len(tokens) - 1} positions", file=sys.stderr)
    targets = np.asarray(tokens[1:])
    if args.hidden_layers is not None:
        return hidden_check(eng, tokens[:n], args)
    t0 = time.perf_counter()
    logits = teacher_forced_logits(eng.backend, tokens)
    t_test = time.perf_counter() - t0
    if args.reference == "cpu":
        t0 = time.perf_counter()
        ref = reference_logits(eng.gguf, tokens, len(tokens) + 1)
        t_ref = time.perf_counter() - t0
        ref_name = "cpu-reference (numpy f32)"
    else:
        fx = np.load(args.reference)
        if list(fx["tokens"][: len(tokens)]) != tokens:
            raise SystemExit(f"{args.reference} was recorded on other tokens")
        ref = {k: fx[k][: len(targets)] for k in ("topk_ids", "topk_logprobs", "target_logprob") if k in fx}
        t_ref, ref_name = 0.0, args.reference
    m = teacher_forced_compare(logits, ref, targets)
    m.update(model=path, backend=eng.backend.name, reference=ref_name, positions=len(targets),
             seconds_test=round(t_test, 2), seconds_reference=round(t_ref, 2))
    if args.save_topk:
        np.savez_compressed(args.save_topk, tokens=np.asarray(tokens), **topk_record(logits, targets))
    print(f"accuracy: {eng.backend.name} vs {ref_name} over {m['positions']} teacher-forced positions of "
          f"{eng.cfg.arch}")
    print(f"  top-1 agreement {m['top1_agreement'] * 100:.2f}%   mean KL {m['mean_kl']:.5f} nats "
          f"(max {m['max_kl']:.4f})   ppl {m['ppl_a']:.4f} vs {m['ppl_b']:.4f} "
          f"(rel diff {m['ppl_rel_diff'] * 100:.3f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: (v if not isinstance(v, np.generic) else v.item()) for k, v in m.items()}, f, indent=1)
    ok = True
    if args.min_top1 is not None and m["top1_agreement"] < args.min_top1:
        ok = False
    if args.max_kl is not None and m["mean_kl"] > args.max_kl:
        ok = False
    if args.max_ppl_rel is not None and m["ppl_rel_diff"] > args.max_ppl_rel:
        ok = False
    print("  gates:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
