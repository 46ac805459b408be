"""`python -m sparkinfer_cute.bench MODEL.gguf [--prompt-len P[,P2...]] [--gen N] [--depth D] [--runs R]
[--llama-bench PATH]`

Decode tok/s (median of R >= 5 timed runs after a warm-up run; greedy, whole step replayed from one CUDA graph),
prefill tok/s (for each prompt length, e.g. ``--prompt-len 512,4096``), kernels per token, bytes moved per token,
the minimum (routed experts' + dense weights + KV, each once) and their ratio (all from the launch plan,
models/launch_plan.py), the % of the measured device-to-device copy bandwidth the minimum at the measured speed
represents, resident GPU memory. With --llama-bench it runs llama.cpp's
llama-bench on the same file in the same process run and prints the ratio. Prints a table, writes JSON (--json) and
appends a line to the results log (--log, default RESULTS.md's sibling results/bench.jsonl).

Needs a CUDA GPU. Exit status: 0 done; 2 could not run as asked (a bad argument, no GPU), with a one-line
`error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import time

import numpy as np

from .cli_args import ArgumentParser, existing_file, fail, int_at_least, require_gpu, writable_path


def measure_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (median of reps)."""
    from .runtime import DeviceArray, Event, Stream, elapsed_ms
    from .runtime._driver import check, driver

    cu = driver()
    s = Stream()
    a = DeviceArray.empty((nbytes,), np.uint8)
    b = DeviceArray.empty((nbytes,), np.uint8)
    a.fill_bytes(1, s)
    times = []
    for i in range(reps + 3):
        e0, e1 = Event(), Event()
        e0.record(s)
        check(cu.cuMemcpyDtoDAsync(b.ptr, a.ptr, nbytes, s.cu))
        e1.record(s)
        e1.synchronize()
        if i >= 3:
            times.append(elapsed_ms(e0, e1))
    return 2 * nbytes / (statistics.median(times) * 1e-3)


def decode_plan(model, depth: int):
    """The launch plan of the loaded model's decode step at KV depth ``depth`` (models/launch_plan.py): the one
    accounting of kernels and bytes per token, shared with ``python -m sparkinfer_cute.perf_model``."""
    from sparkinfer_cute.models.launch_plan import launch_plan

    return launch_plan(model.g, model.cfg, depth=depth, sm_count=model.device.sm_count,
                       max_context=model.max_context)


def prompt_lengths(s: str) -> list[int]:
    """``type=`` converter for ``--prompt-len``: one or more comma-separated integers >= 1."""
    conv = int_at_least(1)
    out = [conv(x.strip()) for x in s.split(",")]
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"a prompt length is repeated ({s!r})")
    return out


def run_llama_bench(path: str, exe: str, p, n: int, d: int, reps: int) -> dict:
    """llama.cpp's llama-bench on the same file: ``p`` one prompt length or a list (one ``-p`` list)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.path.dirname(os.path.abspath(exe)) + ":" + env.get("LD_LIBRARY_PATH", "")
    out = {}
    plist = ",".join(str(x) for x in (p if isinstance(p, (list, tuple)) else [p]))
    cmd = [exe, "-m", path, "-ngl", "99", "-fa", "1", "-p", plist, "-n", str(n), "-r", str(reps), "-o", "json"]
    if d:
        cmd += ["-d", f"0,{d}"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:], "cmd": " ".join(cmd)}
    for row in json.loads(res.stdout):
        key = ("pp" if row["n_prompt"] else "tg") + str(row["n_prompt"] or row["n_gen"]) + (
            f"@d{row.get('n_depth', 0)}" if row.get("n_depth") else "")
        out[key] = {"avg_ts": row["avg_ts"], "stddev_ts": row["stddev_ts"]}
    out["cmd"] = " ".join(cmd)
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.bench", description=__doc__.split("\n\n")[1],
                        epilog=__doc__.split("\n\n")[2])
    ap.add_argument("model", type=existing_file, help="GGUF file")
    ap.add_argument("--prompt-len", type=prompt_lengths, default=[512],
                    help="prompt tokens for the prefill figure; a comma-separated list measures each (512,4096)")
    ap.add_argument("--gen", type=int_at_least(2), default=128, help="tokens generated per timed decode run")
    ap.add_argument("--depth", type=int_at_least(0), default=0,
                    help="also measure decode with this many tokens already cached (0: no)")
    ap.add_argument("--runs", type=int_at_least(5), default=5, help="timed decode runs (the median is reported)")
    ap.add_argument("--llama-bench", type=existing_file,
                    help="path of llama.cpp's llama-bench for a same-run comparison")
    ap.add_argument("--llama-reps", type=int_at_least(1), default=3, help="llama-bench repetitions (-r)")
    ap.add_argument("--json", type=writable_path, help="write the results as JSON here")
    ap.add_argument("--log", default=os.path.join("results", "bench.jsonl"),
                    help="append the results as one JSON line here ('' for none)")
    ap.add_argument("--note", default="", help="free text stored with the results")
    args = ap.parse_args(argv)
    require_gpu(ap.prog, "the benchmark")

    from .engine import Engine
    from .errors import SparkinferError
    from .gguf import GGUFFile
    from .gguf.config import load_config
    from .runtime import get_device

    lens = args.prompt_len
    ctx = max(max(lens), args.depth) + args.gen + 8
    try:  # a bad file, a model too large, a misspelt SPARKINFER_DISABLE pass: one line, no traceback
        # the context the runs need, checked on the header before minutes of weight upload
        n_ctx = load_config(GGUFFile(args.model)).context_length
        if ctx > n_ctx:
            fail(f"{args.model}: the bench needs a context of {ctx} tokens (prompt {max(lens)}, depth {args.depth}, "
                 f"gen {args.gen}, + 8) but the model's is {n_ctx}")
        dev = get_device()
        eng = Engine(args.model, backend_name="gpu", max_context=ctx, progress=True)
    except SparkinferError as e:
        fail(e)
    m = eng.backend
    rng = np.random.default_rng(0)
    vocab = eng.cfg.vocab_size
    prompts = {n: rng.integers(0, vocab, size=n).tolist() for n in lens}
    prompt = prompts[lens[0]]

    def decode_run(start_pos: int) -> float:
        m.pos = start_pos
        m.decode_greedy(int(prompt[0]))
        t0 = time.perf_counter()
        for _ in range(args.gen - 1):
            m.decode_greedy(None)  # the id stays on the device; only 4 bytes come back per token
        return (args.gen - 1) / (time.perf_counter() - t0)

    # prefill: batched chunks (a CUDA graph per chunk length) unless SPARKINFER_PREFILL=loop; one untimed run first
    # builds the chunk graphs and loads the prefill kernels, then the median of 3 (prefill returns the logits to the
    # host, so each timing ends with the device idle).
    pp_by_len, pps_by_len = {}, {}
    for n, pr in prompts.items():
        m.reset()
        m.prefill(pr)
        runs = []
        for _ in range(3):
            m.reset()
            t0 = time.perf_counter()
            m.prefill(pr)
            runs.append(n / (time.perf_counter() - t0))
        pp_by_len[n], pps_by_len[n] = statistics.median(runs), runs
    pp, pps = pp_by_len[lens[0]], pps_by_len[lens[0]]
    decode_run(0)  # warm-up
    tg = [decode_run(0) for _ in range(args.runs)]
    res = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": dev.name, "target": dev.target, "kernel_family": m._family(), "model": os.path.basename(args.model),
        "arch": eng.cfg.arch, "prompt_len": lens[0], "prompt_lens": lens, "gen": args.gen, "runs": args.runs,
        "decode_tps_median": statistics.median(tg), "decode_tps_all": tg, "prefill_tps": pp, "prefill_tps_all": pps,
        "prefill_tps_by_len": {str(n): v for n, v in pp_by_len.items()},
        "prefill_path": "batched" if getattr(m, "batched_prefill", lambda: False)() else "decode-graph loop",
        "kernels_per_prefill_chunk": getattr(m, "kernels_per_prefill_chunk", None),
        "kernels_per_token": m.kernels_per_token, "resident_bytes": m.resident_bytes,
    }
    bw = measure_copy_bandwidth()
    plan = decode_plan(m, args.gen // 2)  # tg runs start at position 0: mean KV depth gen/2
    bpt, mpt = plan.bytes_per_token, plan.minimum_bytes
    res.update(copy_bandwidth_GBps=bw / 1e9, bytes_per_token=bpt, minimum_bytes_per_token=mpt,
               bytes_over_minimum=plan.ratio, plan_kernels_per_token=plan.kernels_per_token,
               bytes_accounting="models/launch_plan.py (weights as uploaded, KV, activations)",
               roofline_tps=bw / mpt, pct_of_roofline=100 * res["decode_tps_median"] * mpt / bw)
    if args.depth:
        m.reset()
        dprompt = rng.integers(0, vocab, size=args.depth).tolist()
        m.prefill(dprompt)
        tgd = [decode_run(args.depth) for _ in range(args.runs)]
        res.update(depth=args.depth, decode_tps_at_depth_median=statistics.median(tgd), decode_tps_at_depth_all=tgd)
    if args.llama_bench:
        lb = run_llama_bench(args.model, args.llama_bench, lens, args.gen, args.depth, args.llama_reps)
        res["llama_bench"] = lb
        tgk = f"tg{args.gen}"
        if tgk in lb:
            res["ratio_tg_vs_llama"] = res["decode_tps_median"] / lb[tgk]["avg_ts"]
        for n in lens:  # ratio_pp_vs_llama: the first length (the key older rows have); each length under its own
            if f"pp{n}" in lb:
                res[f"ratio_pp{n}_vs_llama"] = pp_by_len[n] / lb[f"pp{n}"]["avg_ts"]
        if f"ratio_pp{lens[0]}_vs_llama" in res:
            res["ratio_pp_vs_llama"] = res[f"ratio_pp{lens[0]}_vs_llama"]
        dk = f"tg{args.gen}@d{args.depth}"
        if args.depth and dk in lb:
            res["ratio_tg_at_depth_vs_llama"] = res["decode_tps_at_depth_median"] / lb[dk]["avg_ts"]
    from .autotune import describe_sites, describe_tuning

    # the engine's load_tuned at start-up: cache status, and how many call sites ran a tuned config vs the default
    res["tuning"] = describe_tuning()
    res["tuning_sites"] = describe_sites()  # every call site that took (or refused) a tuned config, with its knobs
    from .models import ops

    # which speed passes this build ran without (SPARKINFER_DISABLE, and models/ops.py OFF_BY_DEFAULT unless
    # SPARKINFER_ENABLE named them): an A/B row says what it measured, not only its --note
    res["passes_off"] = sorted(ops.DISABLED)
    res["note"] = args.note
    rows = [("GPU", f"{dev.name} ({dev.target}), kernel family {res['kernel_family']}"),
            ("model", f"{res['model']} ({res['arch']})"),
            (f"decode tg{args.gen} tok/s (median of {args.runs})", f"{res['decode_tps_median']:.1f}"),
            *((f"prefill pp{n} tok/s ({res['prefill_path']}, median of 3)", f"{pp_by_len[n]:.1f}") for n in lens),
            ("kernels per token", f"{m.kernels_per_token}" + (
                "" if plan.kernels_per_token == m.kernels_per_token
                else f" (launch plan: {plan.kernels_per_token}: they disagree)")),
            ("bytes moved per token (launch plan)", f"{bpt / 1e6:.1f} MB"),
            ("minimum bytes per token", f"{mpt / 1e6:.1f} MB (bytes/minimum {plan.ratio:.3f})"),
            ("copy bandwidth (measured)", f"{bw / 1e9:.0f} GB/s"),
            ("% of bandwidth roofline", f"{res['pct_of_roofline']:.1f}%"),
            ("resident GPU memory", f"{m.resident_bytes / 2**30:.2f} GiB"),
            ("kernel configs", res["tuning"]),
            ("speed passes off", ", ".join(res["passes_off"]) or "none")]
    if args.depth:
        rows.append((f"decode tok/s at depth {args.depth}", f"{res['decode_tps_at_depth_median']:.1f}"))
    if "llama_bench" in res:
        for k, v in res["llama_bench"].items():
            if isinstance(v, dict):
                rows.append((f"llama.cpp {k} tok/s", f"{v['avg_ts']:.1f} ± {v['stddev_ts']:.1f}"))
        for k in ("ratio_tg_vs_llama", *(f"ratio_pp{n}_vs_llama" for n in lens), "ratio_tg_at_depth_vs_llama"):
            if k in res:
                rows.append((k.replace("_", " "), f"{res[k]:.2f}x"))
        if "error" in res["llama_bench"]:
            rows.append(("llama-bench error", res["llama_bench"]["error"][-300:]))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.log:
        os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
