"""`python -m sparkinfer_cute.autotune MODEL.gguf [--budget S] [--ops OP,...] [--ctx N ...] [--prefill-tokens N]`

Searches the launch configurations of the kernels MODEL.gguf runs, on this GPU: for every op and shape the model
uses (read from the file), each candidate config is compiled (in parallel processes), checked against the float64
reference within the kernel's error bound, and only then timed inside a CUDA graph with CUDA events (median of
--reps replays; cold-L2 by default: inputs rotate so every launch streams from DRAM). Prints a table of the
winners with their gain over today's default, and caches them in $SPARKINFER_CACHE_DIR/autotune.json (default
~/.cache/sparkinfer_cute/), where the engine looks them up (``sparkinfer_cute.autotune.load_tuned``). A second run
on the same GPU is answered from the cache without timing anything (--force searches again).

    python -m sparkinfer_cute.autotune MODEL.gguf                   # all ops, budget 600 s
    python -m sparkinfer_cute.autotune MODEL.gguf --ops gemv_q8,attention_decode --budget 300
    python -m sparkinfer_cute.autotune MODEL.gguf --plan            # shapes and candidates only (no GPU needed)
    python -m sparkinfer_cute.autotune --show                       # what is cached
    python -m sparkinfer_cute.autotune --clear                      # drop the cache

Ops: gemv, gemv_q8 (decode GEMV, f32 / q8_1 activations), moe_gate_up[_q8], moe_down[_q8] (MoE expert FFN),
attention_decode (split-KV decode attention, per context bucket), quant_gemm (prefill GEMM, --prefill-tokens).
By default every op runs on both activation paths; the models run one (SPARKINFER_DP4A=auto: Qwen3-MoE the q8_1
ops, Gemma the f32 ones, the LM head q8_1 on Qwen3-MoE), so --ops narrows the search to what will be used:

    python -m sparkinfer_cute.autotune qwen3-30b-a3b.gguf --ops gemv_q8,moe_gate_up_q8,moe_down_q8,attention_decode
    python -m sparkinfer_cute.autotune gemma-3-270m.gguf --ops gemv,attention_decode
SPARKINFER_AUTOTUNE=0 makes the engine ignore the cache (A/B runs). Without a GPU only --plan, --show and --clear
run; anything else is a one-line error (exit 2). --plan exits 1 when an op's adapter fails on a shape (a row marked
``error:``, e.g. a kernel name that moved), so it doubles as a CPU check of the adapters against the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROG = "python -m sparkinfer_cute.autotune"
DEFAULT_BUDGET_S = 600.0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(minimum: int):
    """argparse type: an int >= ``minimum`` (0 or 1)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} is {'not positive' if minimum else 'negative'}")
        return v

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of seconds") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s} is not a positive finite number of seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[1])
    p.add_argument("model", nargs="?", help="GGUF file whose shapes to tune")
    p.add_argument("--budget", type=_seconds, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"wall-clock budget of the search (default {DEFAULT_BUDGET_S:.0f}); unfinished shapes are "
                        "not cached and are searched by the next run")
    p.add_argument("--ops", default=None, metavar="OP,...", help="ops to tune (default: all; see above)")
    p.add_argument("--ctx", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="context lengths for attention_decode (default 512 4096 32768, capped by the model's)")
    p.add_argument("--prefill-tokens", type=_nonneg_int, default=512, metavar="N",
                   help="prompt tokens per prefill chunk for quant_gemm (default 512; 0: skip quant_gemm)")
    p.add_argument("--reps", type=_positive_int, default=30, help="timed graph replays per candidate (>= 5)")
    p.add_argument("--cold-l2", action=argparse.BooleanOptionalAction, default=True,
                   help="rotate input copies so every launch reads DRAM (default); --no-cold-l2: warm L2")
    p.add_argument("--jobs", type=_nonneg_int, default=None, metavar="N",
                   help="compile processes (default: one per core, at most 16; 0: compile in this process)")
    p.add_argument("--force", action="store_true", help="search again where an entry is cached")
    p.add_argument("--plan", action="store_true", help="list shapes and candidates, compile and time nothing")
    p.add_argument("--sm-count", type=_positive_int, default=None, help="--plan without a GPU: SMs to assume (132)")
    p.add_argument("--show", action="store_true", help="print the cached configs and exit")
    p.add_argument("--clear", action="store_true", help="delete the cache file and exit")
    p.add_argument("--json", metavar="PATH", help="also write the outcome table as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="list every rejected candidate with its reason")
    p.add_argument("--no-progress", action="store_true")
    return p


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _parse_ops(text: str | None, prefill_tokens: int) -> list[str]:
    from .registry import load_ops

    known = list(load_ops())
    if text is None:
        return [o for o in known if o != "quant_gemm" or prefill_tokens > 0]
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in known]
    if bad or not ops:
        raise ValueError(f"unknown op(s) {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
    return ops


def _gpu_or_reason():
    """(device, None) or (None, why there is no usable GPU)."""
    if os.environ.get("SPARKINFER_NO_GPU"):
        return None, "SPARKINFER_NO_GPU is set"
    from sparkinfer_cute.errors import DeviceError
    from sparkinfer_cute.runtime import device_available, get_device

    if not device_available():
        return None, "no CUDA GPU or driver on this machine"
    try:
        dev = get_device()
        dev.target  # noqa: B018  (DeviceError for an unsupported compute capability)
        return dev, None
    except DeviceError as e:
        return None, str(e)


# ---------------------------------------------------------------------------------------------- printing
def _table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * x for x in w]), *(fmt(r) for r in rows)])


def _us(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _gain(default_us, us) -> str:
    if not default_us or not us:
        return "-"
    return f"{100 * (default_us / us - 1):+.1f}%"


def print_outcomes(outcomes, verbose: bool = False) -> None:
    from .registry import format_config

    rows = []
    for o in outcomes:
        checked = f"{o.n_timed}/{o.n_candidates}" if o.status != "cached" else "cache"
        rows.append([o.task.op, o.key, str(o.task.count), format_config(o.default), _us(o.default_us),
                     format_config(o.best), _us(o.best_us), _gain(o.default_us, o.best_us), checked, o.status])
    print(_table(rows, ["op", "shape", "uses", "default", "µs", "tuned", "µs", "gain", "timed", "status"]))
    # per-op totals over the uses of one decode step (prefill chunk for quant_gemm)
    totals: dict[str, list[float]] = {}
    for o in outcomes:
        if o.default_us and o.best_us:
            t = totals.setdefault(o.task.op, [0.0, 0.0, 0])
            t[0] += o.task.count * o.default_us
            t[1] += o.task.count * o.best_us
            t[2] += 1
    if totals:
        print("\nper op, summed over the shapes' uses per decode step (quant_gemm: per prefill chunk):")
        for op, (d, b, n) in totals.items():
            print(f"  {op:18s} default {d:10.1f} µs -> tuned {b:10.1f} µs  ({_gain(d, b)}, {n} shapes)")
    rejected = [(o, c, r) for o in outcomes for c, r in o.rejected]
    if rejected:
        kinds: dict[str, int] = {}
        for _, _, r in rejected:
            kinds[r.split(":")[0]] = kinds.get(r.split(":")[0], 0) + 1
        print("\nrejected candidates (never timed): " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        shown = rejected if verbose else [x for x in rejected if not x[2].startswith("invalid")][:10]
        for o, c, r in shown:
            print(f"  {o.task.op} [{o.key}] {format_config(c)}: {r}")
        if not verbose and len(rejected) > len(shown):
            print(f"  ... ({len(rejected) - len(shown)} more: -v lists them all)")
    notes = [o for o in outcomes if o.detail]
    for o in notes:
        print(f"note: {o.task.op} [{o.key}]: {o.status}: {o.detail}")


def show_cache() -> int:
    from .cache import DeviceIdentity, TuneCache, current_metadata
    from .registry import format_config

    cache = TuneCache()
    data = cache.read()
    if data is None:
        print(f"no autotune cache at {cache.path}" if not cache.path.exists() else
              f"autotune cache at {cache.path} is unusable (see the warning above)")
        return 0
    dev, _ = _gpu_or_reason()
    current = None
    if dev is not None:
        ident = DeviceIdentity.of(dev)
        current = (ident.key, current_metadata(ident))
    print(f"autotune cache {cache.path}")
    for key, block in data["devices"].items():
        meta = block["meta"]
        if current is None:
            state = "not checked (no GPU here)"
        elif current[0] != key:
            state = "another GPU"
        elif current[1] == meta:
            state = "in use on this GPU"
        else:
            diff = sorted(k for k in set(meta) | set(current[1]) if meta.get(k) != current[1].get(k))
            state = f"IGNORED on this GPU (other {', '.join(diff)})"
        print(f"\n{key}: {state}")
        print("  " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
        rows = [[op, sk, format_config(e.get("config")), _us(e.get("us")), format_config(e.get("default")),
                 _us(e.get("default_us")), _gain(e.get("default_us"), e.get("us")), str(e.get("timing", "")),
                 str(e.get("date", ""))]
                for op, by_shape in sorted(block["entries"].items()) for sk, e in sorted(by_shape.items())]
        if rows:
            print(_table(rows, ["op", "shape", "tuned", "µs", "default", "µs", "gain", "timing", "date"]))
        else:
            print("  (no entries)")
    return 0


def clear_cache() -> int:
    from .cache import TuneCache

    cache = TuneCache()
    print(f"removed {cache.path}" if cache.clear() else f"no autotune cache at {cache.path}")
    return 0


def plan(tasks, ctx) -> int:
    """Print the plan table; returns the number of tasks whose candidates could not be listed (an adapter error,
    e.g. a kernel module that moved: a row says ``error: ...``), which makes ``--plan`` exit 1."""
    from .registry import REGISTRY, format_config

    rows, errors = [], 0
    for t in tasks:
        op = REGISTRY[t.op]
        try:
            default, cands, pruned = op.candidates(t.shape, ctx)
            why = op.why_invalid(default, t.shape, ctx)
            info = [format_config(default), str(len(cands)), str(len(pruned)),
                    "" if why is None else f"unsupported: {why}"]
        except Exception as e:
            info = ["-", "-", "-", f"error: {type(e).__name__}: {e}"]
            errors += 1
        rows.append([t.op, op.shape_key(t.shape), str(t.count), t.where, *info])
    print(_table(rows, ["op", "shape", "uses", "where", "default", "candidates", "pruned", "note"]))
    return errors


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.show and args.clear:
        return _fail("--show and --clear exclude each other")
    if args.show:
        return show_cache()
    if args.clear:
        return clear_cache()
    if not args.model:
        return _fail("give a MODEL.gguf to tune (or --show / --clear)")
    if args.reps < 5:
        return _fail(f"--reps {args.reps}: at least 5 timed replays (the median of fewer is noise)")
    if not os.path.isfile(args.model):
        return _fail(f"{args.model}: no such file")
    try:
        ops = _parse_ops(args.ops, args.prefill_tokens)
    except ValueError as e:
        return _fail(str(e))
    if "quant_gemm" in ops and args.prefill_tokens == 0:
        return _fail("--ops quant_gemm needs --prefill-tokens > 0")
    dev, no_gpu = _gpu_or_reason()
    if dev is None and not args.plan:
        return _fail(f"{no_gpu}: the autotuner times kernels on the GPU it tunes for (--plan lists the shapes "
                     "and candidates without one; --show / --clear work anywhere)")

    from sparkinfer_cute.errors import SparkinferError

    from .shapes import DEFAULT_CTXS, load_model_tasks

    try:
        arch, tasks, notes = load_model_tasks(args.model, ops, ctxs=tuple(args.ctx or DEFAULT_CTXS),
                                              prefill_tokens=args.prefill_tokens)
    except SparkinferError as e:
        return _fail(str(e))
    from .registry import TuneContext

    if args.plan:
        from sparkinfer_cute.kernels.arch import smem_budget

        ctx = (TuneContext.for_device(dev) if dev is not None and args.sm_count is None else
               TuneContext(sm_count=args.sm_count or 132, smem_budget=smem_budget()))
        where = dev.name if dev is not None and args.sm_count is None else f"assumed {ctx.sm_count} SMs"
        print(f"{args.model} ({arch}): {len(tasks)} shapes to tune on {where}")
        errors = plan(tasks, ctx)
        for n in notes:
            print(f"note: {n}")
        if errors:
            print(f"{PROG}: {errors} of {len(tasks)} shapes could not be planned (the rows marked error)",
                  file=sys.stderr)
            return 1
        return 0
    return _search(args, dev, arch, tasks, notes)


def _search(args, dev, arch, tasks, notes) -> int:
    from .cache import DeviceIdentity, TuneCache, current_metadata
    from .compile_pool import default_workers, disk_cache_usable
    from .registry import TuneContext
    from .search import SearchOptions, Searcher

    ident = DeviceIdentity.of(dev)
    workers = default_workers() if args.jobs is None else args.jobs
    if workers and not disk_cache_usable():
        print(f"{PROG}: the kernel disk cache is off (SPARKINFER_DISK_CACHE=0), so worker processes cannot hand "
              "their compiles over: compiling in this process", file=sys.stderr)
        workers = 0
    opt = SearchOptions(budget_s=args.budget, cold=args.cold_l2, reps=args.reps, workers=workers, force=args.force,
                        progress=not args.no_progress)
    ctx = TuneContext.for_device(dev)
    cache = TuneCache()
    print(f"autotune {args.model} ({arch}) on {dev.name} ({dev.sm_count} SMs, {dev.target}, L2 "
          f"{dev.l2_bytes >> 20} MiB): {len(tasks)} shapes; {opt.mode} timing, median of {opt.reps} graph "
          f"replays; budget {opt.budget_s:.0f} s; cache {cache.path}", flush=True)
    t0 = time.monotonic()
    try:
        outcomes = Searcher(ctx, opt, cache=cache, ident=ident, meta=current_metadata(ident)).run(tasks)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished shapes are cached", file=sys.stderr)
        return 130
    print_outcomes(outcomes, args.verbose)
    for n in notes:
        print(f"note: {n}")
    n_cached = sum(o.status == "cached" for o in outcomes)
    timed = sum(o.n_timed for o in outcomes)
    print(f"\n{len(outcomes)} shapes: {n_cached} from the cache, {timed} configs timed, "
          f"{time.monotonic() - t0:.1f} s")
    if args.json:
        rows = [dict(op=o.task.op, shape=o.task.shape, key=o.key, uses=o.task.count, where=o.task.where,
                     status=o.status, default=o.default, default_us=o.default_us, tuned=o.best, tuned_us=o.best_us,
                     candidates=o.n_candidates, pruned=o.n_pruned, timed=o.n_timed, detail=o.detail,
                     rejected=[dict(config=c, reason=r) for c, r in o.rejected]) for o in outcomes]
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, gpu=dev.name, meta=current_metadata(ident), timing=opt.mode,
                           reps=opt.reps, outcomes=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
