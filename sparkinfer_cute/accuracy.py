"""`python -m sparkinfer_cute.accuracy MODEL.gguf [--reference cpu|FIXTURE.npz] [-n 128] [--text FILE]`

Teacher-forces a fixed text through the GPU path and a reference (the numpy CPU reference forward, or a compact
top-K fixture saved from llama.cpp) and prints top-1 agreement, mean KL (nats, on the reference's top-32 support) and
the perplexity of both. This is the gate every speed change must pass against the previous build:
``--save-topk FILE.npz`` records this build's top-32 so the next build can be compared with ``--reference FILE.npz``.

Exit status: 0 the gates given with --min-top1 / --max-kl / --max-ppl-rel / --max-hidden-rel pass (or none was
given); 1 a gate is missed; 2 could not run as asked (a bad argument or file, --backend gpu without a GPU), with a
one-line `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.resources import files

import numpy as np

from .cli_args import ArgumentParser, existing_file, fail, float_in, int_at_least, require_gpu, writable_path
from .engine import CPU_NUMERICS, DEFAULT_CPU_NUMERICS


def default_text() -> str:
    return files("sparkinfer_cute").joinpath("data/accuracy_text.txt").read_text()


def teacher_forced_logits(backend, tokens: list[int], first: int = 0, n_rows: int | None = None) -> np.ndarray:
    """Logits after tokens[first], tokens[first + 1], ... (row j predicts tokens[first + j + 1]), ``n_rows`` rows
    (default: up to the last token but one), from an empty cache: tokens[:first + 1] in one prefill (the context
    before the first scored position, as llama-perplexity scores only the second half of its chunk), then one decode
    step per further scored position."""
    if n_rows is None:
        n_rows = len(tokens) - 1 - first
    backend.reset()
    rows = [backend.prefill(tokens[: first + 1])]
    for t in tokens[first + 1 : first + n_rows]:
        rows.append(backend.decode(t))
    return np.stack(rows).astype(np.float32)


def reference_logits(g, tokens: list[int], max_context: int, first: int = 0) -> np.ndarray:
    """The exact float32 CPU reference's logits after tokens[first:-1] (rows as :func:`teacher_forced_logits`)."""
    from .reference import load_reference

    ref = load_reference(g, max_context=max_context)
    if first:
        ref.forward(tokens[:first], all_logits=False)
    return ref.forward(tokens[first:-1], all_logits=True)


FIXTURE_KEYS = ("tokens", "topk_ids", "topk_logprobs")


def load_fixture(path: str) -> dict:
    """A top-K reference record (.npz): ``tokens`` (N,), ``topk_ids`` / ``topk_logprobs`` (R, K), optionally
    ``target_logprob`` (R,) and ``first`` (default 0). Row j holds the reference's distribution after
    tokens[first + j], i.e. its prediction of tokens[first + j + 1] (llama-perplexity fixtures have first = N // 2;
    records written by ``--save-topk`` have first = 0). Raises ValueError saying what is wrong."""
    try:
        with np.load(path) as f:
            fx = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz top-K record ({type(e).__name__}: {e})") from None
    missing = [k for k in FIXTURE_KEYS if k not in fx]
    if missing:
        raise ValueError(f"{path}: not a top-K record (missing {', '.join(missing)})")
    fx["first"] = int(fx.get("first", 0))
    n_tok, n_rows = len(fx["tokens"]), len(fx["topk_ids"])
    if fx["first"] < 0 or fx["first"] + n_rows > n_tok - 1:
        raise ValueError(f"{path}: {n_rows} rows from position {fx['first']} do not fit its {n_tok} tokens")
    return fx


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


def _token_list(s: str) -> list[int]:
    """``--tokens`` converter: comma-separated non-negative integers."""
    try:
        ids = [int(t) for t in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token ids, e.g. 2,818,5279 (got {s!r})") from None
    if len(ids) < 2 or min(ids) < 0:
        raise argparse.ArgumentTypeError("needs at least 2 token ids, each >= 0")
    return ids


def _reference(s: str) -> str:
    """``--reference`` converter: 'cpu' or a readable top-K .npz record (checked now, before any model loads)."""
    if s == "cpu":
        return s
    existing_file(s)
    try:
        load_fixture(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.accuracy", description=__doc__.split("\n\n")[1],
                        epilog=__doc__.split("\n\n")[2])
    ap.add_argument("model", nargs="?", type=existing_file, default=None,
                    help="GGUF file (default: the packaged Gemma 3 270M)")
    ap.add_argument("--reference", type=_reference, default="cpu",
                    help="'cpu' (the exact float32 numpy reference forward) or a top-K .npz record (from "
                         "--save-topk or a llama.cpp fixture; its tokens and first scored position are used)")
    ap.add_argument("--backend", default="gpu", choices=("gpu", "cpu"), help="the side under test")
    ap.add_argument("--cpu-numerics", default=DEFAULT_CPU_NUMERICS, choices=CPU_NUMERICS,
                    help="numerics of the CPU backend when it is the side under test (--backend cpu); the 'cpu' "
                         "reference itself is always exact float32")
    ap.add_argument("-n", "--positions", type=int_at_least(1), default=128,
                    help="scored positions (>= 128 for the gates)")
    ap.add_argument("--text", type=existing_file,
                    help="text file to teacher-force (default: the packaged English passage)")
    ap.add_argument("--tokens", type=_token_list,
                    help="comma-separated token ids instead of text (e.g. for synthetic vocabularies)")
    ap.add_argument("--random-tokens", type=int_at_least(0), default=None, metavar="SEED",
                    help="teacher-force random token ids (synthetic models, whose vocabularies are not language)")
    ap.add_argument("--hidden-layers", type=int_at_least(0), default=None, metavar="L",
                    help="instead of logits, compare the residual stream after the first L layers with the CPU "
                         "reference (GPU only; for models too large to run whole on the CPU); prints per-position "
                         "rel. error")
    ap.add_argument("--max-hidden-rel", type=float_in(0.0, lo_open=True), default=None,
                    help="gate for --hidden-layers: largest relative error allowed (e.g. 1e-3)")
    ap.add_argument("--save-topk", type=writable_path, help="write this run's top-32 record (+ tokens) to an .npz")
    ap.add_argument("--json", type=writable_path, help="write the metrics as JSON here")
    ap.add_argument("--min-top1", type=float_in(0.0, 1.0), default=None,
                    help="gate: smallest top-1 agreement allowed, a fraction in [0, 1]")
    ap.add_argument("--max-kl", type=float_in(0.0), default=None, help="gate: largest mean KL allowed, nats")
    ap.add_argument("--max-ppl-rel", type=float_in(0.0), default=None,
                    help="gate: largest relative perplexity difference allowed (0.005 = 0.5%%)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    sources = [o for o, v in (("--text", args.text), ("--tokens", args.tokens),
                              ("--random-tokens", args.random_tokens)) if v is not None]
    if len(sources) > 1:
        ap.error(f"give one token source, not {' and '.join(sources)}")
    if args.hidden_layers is not None and args.backend != "gpu":
        ap.error("--hidden-layers compares the GPU path's residual stream: it needs --backend gpu")
    if args.backend == "gpu":
        require_gpu(ap.prog, "--backend gpu (the default side under test; --backend cpu tests the CPU backend)")

    from .engine import Engine, default_model_path
    from .errors import SparkinferError
    from .reference.metrics import teacher_forced_compare, topk_record

    fx = None if args.reference == "cpu" else load_fixture(args.reference)
    first = 0 if fx is None else fx["first"]
    n = args.positions
    if fx is not None and n > len(fx["topk_ids"]):
        print(f"warning: {args.reference} has {len(fx['topk_ids'])} scored positions; scoring those", file=sys.stderr)
        n = len(fx["topk_ids"])
    try:
        path = args.model or default_model_path()
        eng = Engine(path, backend_name=args.backend, max_context=first + n + 8, progress=False,
                     cpu_numerics=args.cpu_numerics)
    except SparkinferError as e:
        fail(e)
    if args.tokens:
        tokens = args.tokens
    elif args.random_tokens is not None:
        rng = np.random.default_rng(args.random_tokens)
        tokens = rng.integers(0, eng.cfg.vocab_size, size=first + n + 1).tolist()
        if eng.tokenizer.add_bos:
            tokens[0] = eng.tokenizer.bos_id
    elif args.text or fx is None:
        try:
            text = open(args.text, encoding="utf-8").read() if args.text else default_text()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{args.text}: cannot read as UTF-8 text ({e})")
        tokens = eng.tokenizer.encode(text)
    else:
        tokens = [int(t) for t in fx["tokens"]]  # the record's own sequence
    tokens = tokens[: first + n + 1]
    bad = [t for t in tokens if t >= eng.cfg.vocab_size]
    if bad:
        fail(f"token ids outside the vocabulary [0, {eng.cfg.vocab_size}): {bad[:5]}")
    if fx is not None and [int(t) for t in fx["tokens"][: len(tokens)]] != tokens:
        fail(f"{args.reference} was recorded on other tokens than this run's")
    if len(tokens) < first + n + 1:
        print(f"warning: the text has only {len(tokens)} tokens; scoring {len(tokens) - 1 - first} positions",
              file=sys.stderr)
    n = len(tokens) - 1 - first
    if n < 1:
        fail(f"only {len(tokens)} tokens: nothing to score")
    targets = np.asarray(tokens[first + 1 :])
    if args.hidden_layers is not None:
        return hidden_check(eng, tokens[:n], args)
    t0 = time.perf_counter()
    logits = teacher_forced_logits(eng.backend, tokens, first, n)
    t_test = time.perf_counter() - t0
    if fx is None:
        t0 = time.perf_counter()
        ref = reference_logits(eng.gguf, tokens, len(tokens) + 1)
        t_ref = time.perf_counter() - t0
        ref_name = "cpu-reference (numpy f32)"
    else:
        ref = {k: fx[k][:n] for k in ("topk_ids", "topk_logprobs", "target_logprob") if k in fx}
        t_ref, ref_name = 0.0, args.reference
    m = teacher_forced_compare(logits, ref, targets)
    m.update(model=path, backend=eng.backend.name, reference=ref_name, positions=len(targets), first=first,
             seconds_test=round(t_test, 2), seconds_reference=round(t_ref, 2))
    if getattr(eng.backend, "tuned", None) is not None:  # the GPU build: which kernel configs were measured
        from .autotune import describe_tuning

        m["tuning"] = describe_tuning(eng.backend.tuned)
    if args.save_topk:
        np.savez_compressed(args.save_topk, tokens=np.asarray(tokens), first=np.int32(first),
                            **topk_record(logits, targets))
    where = f" (from position {first})" if first else ""
    print(f"accuracy: {eng.backend.name} vs {ref_name} over {m['positions']} teacher-forced positions{where} of "
          f"{eng.cfg.arch}")
    print(f"  top-1 agreement {m['top1_agreement'] * 100:.2f}%   mean KL {m['mean_kl']:.5f} nats "
          f"(max {m['max_kl']:.4f})   ppl {m['ppl_a']:.4f} vs {m['ppl_b']:.4f} "
          f"(rel diff {m['ppl_rel_diff'] * 100:.3f}%)")
    if "tuning" in m:
        print(f"  {m['tuning']}")
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
