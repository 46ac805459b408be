"""Decode speed on consumer Blackwell, predicted from the launch plan and what we measured on the H100.

    python -m sparkinfer_cute.perf_model plan --synth qwen3moe:30b-a3b [--depth D] [--json F]
    python -m sparkinfer_cute.perf_model --bench results/bench.jsonl --microbench results/microbench_*.json

``plan``: kernels per decode token, bytes per token and bytes / minimum, per layer type (``--launches``: every
launch), from the GPU forward's own code run without a GPU (models/launch_plan.py) on a GGUF file (``--model``) or a
synthetic preset's header (``--synth ARCH:PRESET``: no file is written); ``--disable PASSES`` plans the build without
those speed passes.

Prediction (the default command). A decode token is the plan's launches replayed from one CUDA graph. Launch i,
of kernel class c(i), costs

    t_i = kernels_i * a_c + dram_bytes_i / (eta_c * BW_copy) + l2_bytes_i / BW_L2

* Kernel by kernel: an op built from several kernels (the q8_1 quantization inside ``moe_down``, the unfused dense
  GLU, ...) is priced per kernel (models/launch_plan.py ``kernel_parts``).
* ``a_c``, ``eta_c``: per kernel class, fitted on the H100 micro-benchmark JSON (measured, file named in the
  output): ``gemv`` (GEMV / fused Q-K-V GEMV, the chunk kernels the models run, dp4a or f32 path as the call is)
  and ``moe`` (expert gate+up / down): least squares of t against bytes / BW_copy (a = intercept, eta = 1/slope);
  ``quantize`` and ``rmsnorm`` (the fused RMSNorm -> q8_1): their measured time (bytes negligible). Every other
  class (attention, the Q/K prologue, router, embedding, argmax, glu, elementwise) has no micro-benchmark row: they
  share one fallback ``a_other``, solved so that the model reproduces the measured end-to-end H100 decode of the
  bench row (``--bench``), and stream at the GEMV fit's eta. That fallback is printed. The calibration plan must be
  the build that was measured: its kernel count must equal the bench row's (``--calibrate-disable PASSES`` plans an
  older build); ``--disable PASSES`` predicts a build without those passes (a pass's predicted gain).
* ``dram_bytes``: weights and KV, unless they stay in L2 across graph replays; ``l2_bytes``: activations (written and
  read within the step, kilobytes: they never leave L2) plus weights/KV found in L2. L2 residency across replays:
  ``lru`` (default) holds the step's weights + KV only if all of them fit in ``L2_USABLE`` of the L2 (a cyclic scan
  larger than an LRU cache hits nothing), ``persist`` (what-if) pins up to ``PERSIST_FRACTION`` of the L2 for the
  dense weights and KV (a CUDA access-policy window; not implemented in the runtime).
* A launch whose last CTA runs a norm chain after the rest of its grid (a "tail", models/ops.py ``AfterFfn`` /
  ``AfterAttention``) adds a fixed time: the median ``tail_cost_us`` of ``--tails FILE`` (the JSON of
  ``python -m sparkinfer_cute.kernels.microbench --tails``), else ``TAIL_SECONDS`` (measured on an H100).
* Each hand-off between ticket-ordered phases of one launch (kernels/routed_experts.py: router -> gate/up ->
  down) adds ``PHASE_SECONDS`` (solved from an H100 measurement); the phases' kernels are otherwise priced as the one
  launch's class.
* Blackwell: the same plan, a_c and eta_c; the device's copy bandwidth = datasheet x the H100's measured
  copy/datasheet ratio; its L2 size. The fixed costs are assumed equal to the H100's (set by the graph launch path
  and DRAM latency, not by bandwidth): an assumption, as is every Blackwell input (nothing here ran on Blackwell).

What-if ``<= 4 kernels per layer`` (issue 15's target): every layer at 4 launches of the layer's mean fixed cost per
launch, bytes as planned; and the same with bytes at the plan's minimum (every byte once).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from sparkinfer_cute.cli_args import ArgumentParser, existing_file, fail, int_at_least, writable_path

H100_DATASHEET_BW = 3.35e12  # H100 SXM5 HBM3, bytes/s (datasheet)
L2_USABLE = 0.9              # assumption: share of the L2 an LRU scan of the step can keep
PERSIST_FRACTION = 0.75      # assumption: most of the L2 a persisting access-policy window may claim
L2_BW_OVER_DRAM = 3.0        # assumption: L2 bandwidth / DRAM copy bandwidth (only activations ride on it)
# the serial time a norm-chain tail adds to the kernel whose last CTA runs it (kernels/norm_chain.py
# RowNormChain.tail): the median tail_cost_us of results/micro_tails_2026-12-08_h100.json (3.50, 7.79, 6.23 us; H100,
# microbench --tails); --tails FILE takes another measurement
TAIL_SECONDS = 6.23e-6
# the serial time a hand-off between two ticket-ordered phases of one launch adds (kernels/routed_experts.py), with
# the launch it replaces not charged: solved from results/micro_routed_2026-12-08_h100.json, where three phases took
# 9.7 us (30B) / 4.9 us (26B) longer than three launches: (that + the router's and the down kernel's fixed costs,
# ~7 us) / 2 hand-offs, ~7 us each (rounded; the kernel classes' costs are this model's own fits)
PHASE_SECONDS = 7.0e-6


@dataclass(frozen=True)
class Device:
    name: str
    dram_bw: float         # datasheet bytes/s
    l2_bytes: int
    source: str            # where the figures come from


# Datasheet figures. RTX 5090 / RTX PRO 6000: NVIDIA's product pages (1.792 TB/s GDDR7; L2 96 MB on the 5090, 128 MB
# on the RTX PRO 6000's full GB202). GB10: 273 GB/s (shared/spec/targets.md); its GPU L2 size is not published.
DEVICES = (
    Device("RTX 5090", 1.792e12, 96 << 20, "datasheet BW and L2; nothing measured"),
    Device("RTX PRO 6000", 1.792e12, 128 << 20, "datasheet BW and L2; nothing measured"),
    Device("DGX Spark (GB10)", 0.273e12, 24 << 20, "datasheet BW; L2 24 MB is an assumption (unpublished)"),
)

# llama.cpp decode figures published for the same models (tok/s), with where they come from
PUBLISHED = {
    ("qwen3moe", "RTX 5090"): (365.7, "Qwen3-30B-A3B Q4_K_M tg128 (shared/spec/targets.md, issue 15)"),
    ("qwen3moe", "DGX Spark (GB10)"): (
        60.92, ("Qwen3-Coder-30B-A3B Q8_0 (30.25 GiB, not our Q4_K_M) tg32, llama.cpp build 6918: "
                "https://github.com/ggml-org/llama.cpp/blob/master/benches/dgx-spark.md")),
}

# kernel (models/launch_plan.py kernel_parts names) -> fitted class; any other kernel is "other"
KERNEL_CLASS = {"gemv": "gemv", "gemv_qkv": "gemv", "gemv_qk": "gemv", "moe_gate_up": "moe", "moe_down": "moe",
                "quantize": "quantize", "rmsnorm": "rmsnorm"}
FITTED = ("gemv", "moe", "quantize", "rmsnorm")


# ---------------------------------------------------------------------------------------------- fits (H100)
@dataclass(frozen=True)
class ClassCost:
    a: float     # fixed seconds per kernel
    eta: float   # fraction of the copy bandwidth its DRAM bytes stream at
    source: str


def _lstsq(rows, bw) -> tuple[float, float, str]:
    """(a, eta, note): t = a + x / eta over the rows (x = bytes / copy BW). Nothing streams faster than a copy: a
    free fit with eta > 1 (the rows span too few sizes to separate the two terms) is refitted with eta = 1."""
    x = np.array([r["bytes"] / bw for r in rows])
    t = np.array([r["us"] * 1e-6 for r in rows])
    (a, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), t, rcond=None)
    if slope < 1.0:
        return float(np.mean(t - x)), 1.0, f"; eta clamped to 1 (free fit {1.0 / slope:.2f})"
    return float(a), float(1.0 / slope), ""


def fit_classes(micro: dict, source: str = "microbench") -> dict:
    """Per kernel class and path (``gemv/dp4a``, ``gemv/float``, ``moe/dp4a``, ``moe/float``, ``quantize``,
    ``rmsnorm``): :class:`ClassCost` from the micro-benchmark JSON ``micro`` (kernels/microbench.py)."""
    bw = micro["copy_GBps"] * 1e9
    res = micro["results"]
    out = {}
    for path in ("dp4a", "float"):
        gemv = [r for r in res if r["path"] == path and ((r["case"].startswith("gemv ") and "[chunk" in r["case"])
                                                         or r["case"].startswith("gemv_multi"))]
        moe = [r for r in res if r["path"] == path and "[chunk" in r["case"]
               and (r["case"].startswith("moe ") or r["case"].startswith("experts"))]
        for cls, rows in (("gemv", gemv), ("moe", moe)):
            if len(rows) < 2:
                raise ValueError(f"{source}: fewer than 2 {cls} chunk-kernel rows on the {path} path")
            a, eta, note = _lstsq(rows, bw)
            out[f"{cls}/{path}"] = ClassCost(a, eta, f"fit of {len(rows)} {path} rows, {source}{note}")
    for cls, prefixes in (("quantize", ("quantize_q8_1", "moe quantize act")),
                          ("rmsnorm", ("rmsnorm_residual->q8_1 fused",))):
        rows = [r for r in res if r["case"].startswith(prefixes)]
        if not rows:
            raise ValueError(f"{source}: no {cls} row ({', '.join(prefixes)})")
        a = float(np.mean([r["us"] * 1e-6 - r["bytes"] / bw for r in rows]))
        out[cls] = ClassCost(a, out["gemv/dp4a"].eta, f"mean of {len(rows)} measured rows, {source}")
    return out


def _class_of(launch) -> list[tuple[str, int]]:
    """(class key, kernels) of one planned launch, kernel by kernel (its ``parts``): the fitted class and path
    (dp4a when the call's matmul input is q8_1) where there is one, else ``other``."""
    out = []
    for kernel, n in launch.parts or ((launch.op, launch.kernels),):
        cls = KERNEL_CLASS.get(kernel, "other")
        if cls in ("gemv", "moe"):
            cls = f"{cls}/{'dp4a' if launch.int8 else 'float'}"
        out.append((cls, n))
    return out


# ---------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Hardware:
    name: str
    copy_bw: float   # bytes/s
    l2_bytes: int
    l2_bw: float


def token_time(plan, costs: dict, hw: Hardware, *, l2_policy: str = "lru", breakdown: bool = False):
    """Seconds per decode token of ``plan`` on ``hw`` (costs: :func:`fit_classes` plus ``other``)."""
    by_kind = plan.bytes_by_kind()
    reusable = by_kind["dense"] + by_kind["routed"] + by_kind["kv_read"] + by_kind["kv_write"]
    if l2_policy == "lru":
        resident_share = 1.0 if reusable <= L2_USABLE * hw.l2_bytes else 0.0
        pinned = 0
    elif l2_policy == "persist":
        resident_share = 0.0
        pinned = min(PERSIST_FRACTION * hw.l2_bytes, by_kind["dense"] + by_kind["kv_read"])
    else:
        raise ValueError(f"l2_policy must be lru or persist, got {l2_policy!r}")
    fixed = stream = l2 = 0.0
    for x in plan.launches:
        heavy = sum(x.bytes[k] for k in ("routed", "dense", "kv_read", "kv_write"))
        act = x.bytes["act_read"] + x.bytes["act_write"]
        in_l2 = heavy * resident_share
        if pinned:  # the pinned set is the dense weights and KV, pro rata
            pin_src = x.bytes["dense"] + x.bytes["kv_read"]
            in_l2 += pin_src * pinned / (by_kind["dense"] + by_kind["kv_read"])
        parts = _class_of(x)
        # weights stream through the op's GEMV / MoE kernel where it has one (not its quantize or GLU kernel)
        eta = next((costs[c].eta for c, _ in parts if c.startswith(("gemv", "moe"))), costs[parts[-1][0]].eta)
        tail_a = costs["tail"].a if "tail" in costs else TAIL_SECONDS
        fixed += (sum(costs[c].a * n for c, n in parts) + getattr(x, "tails", 0) * tail_a
                  + getattr(x, "phases", 0) * PHASE_SECONDS)
        stream += (heavy - in_l2) / (eta * hw.copy_bw)
        l2 += (act + in_l2) / hw.l2_bw
    total = fixed + stream + l2
    return (total, {"fixed": fixed, "stream": stream, "l2": l2}) if breakdown else total


def calibrate_other(plan, costs: dict, hw: Hardware, measured_tps: float) -> float:
    """The fallback fixed cost ``a_other`` (seconds per kernel) that makes :func:`token_time` of ``plan`` equal the
    measured ``1 / measured_tps`` on ``hw`` (token time is linear in it)."""
    n_other = sum(n for x in plan.launches for c, n in _class_of(x) if c == "other")
    if not n_other:
        raise ValueError("the plan has no kernel outside the fitted classes: nothing to calibrate")
    t0 = token_time(plan, {**costs, "other": ClassCost(0.0, costs["gemv/dp4a"].eta, "")}, hw)
    return (1.0 / measured_tps - t0) / n_other


def what_if_kernels_per_layer(plan, costs: dict, hw: Hardware, per_layer: int, *, at_minimum: bool = False) -> float:
    """Token seconds if every layer ran ``per_layer`` launches, each at the layer's present mean fixed cost per
    launch, with the planned bytes (or, ``at_minimum``, the plan's minimum bytes streamed at the bandwidth-weighted
    mean eta of today's launches)."""
    layer = [x for x in plan.launches if x.segment == "layer"]
    rest = [x for x in plan.launches if x.segment != "layer"]
    n_layers = len(plan.layer_kind)
    mean_a = sum(costs[c].a * n for x in layer for c, n in _class_of(x)) / sum(x.kernels for x in layer)
    t_now, parts = token_time(plan, costs, hw, breakdown=True)
    fixed_rest = sum(costs[c].a * n for x in rest for c, n in _class_of(x))
    fixed_new = fixed_rest + n_layers * per_layer * mean_a
    if not at_minimum:
        return t_now - parts["fixed"] + fixed_new
    heavy = sum(plan.bytes_by_kind()[k] for k in ("routed", "dense", "kv_read", "kv_write"))
    eta_mean = heavy / (parts["stream"] * hw.copy_bw)  # the plan's bytes over its streaming time
    return fixed_new + plan.minimum_bytes / (eta_mean * hw.copy_bw)


def hardware(micro: dict) -> tuple[Hardware, list[Hardware]]:
    """The H100 the micro-benchmark ran on (measured copy BW and L2 size) and the Blackwell devices (datasheet x the
    H100's measured copy/datasheet ratio)."""
    h_copy = micro["copy_GBps"] * 1e9
    frac = h_copy / H100_DATASHEET_BW
    h100 = Hardware("H100", h_copy, int(micro.get("l2_bytes", 50 << 20)), L2_BW_OVER_DRAM * h_copy)
    bw = [Hardware(d.name, d.dram_bw * frac, d.l2_bytes, L2_BW_OVER_DRAM * d.dram_bw * frac) for d in DEVICES]
    return h100, bw


# ---------------------------------------------------------------------------------------------- CLI
SYNTH_DEFAULT = {"qwen3moe": "qwen3moe:30b-a3b", "gemma3": "gemma3:270m", "gemma4": "gemma4:26b-a4b"}
BASKET = ("qwen3moe:30b-a3b", "gemma4:26b-a4b", "gemma3:270m")


def synth_spec(s: str) -> tuple[str, str]:
    """argparse type for ``--synth ARCH:PRESET``; a unique prefix of the preset name will do (``qwen3moe:30b``)."""
    import argparse

    from sparkinfer_cute.gguf.synth import PRESETS

    arch, sep, preset = s.partition(":")
    if sep and (arch, preset) not in PRESETS and preset:
        matches = [p for a, p in PRESETS if a == arch and p.startswith(preset)]
        preset = matches[0] if len(matches) == 1 else preset
    if not sep or (arch, preset) not in PRESETS:
        known = ", ".join(f"{a}:{p}" for a, p in PRESETS)
        raise argparse.ArgumentTypeError(f"{s!r} is not ARCH:PRESET (known: {known})")
    return arch, preset


def passes(s: str) -> frozenset:
    """argparse type for ``--calibrate-disable``: SPARKINFER_DISABLE pass names that models/ops.py knows."""
    import argparse

    from sparkinfer_cute.models import ops

    known = ops.PASSES
    names = frozenset(x.strip() for x in s.split(",") if x.strip())
    if not names or names - known:
        raise argparse.ArgumentTypeError(f"{s!r}: unknown pass (models/ops.py knows {', '.join(sorted(known))})")
    return names


def build_plan(model: str | None, synth: tuple[str, str] | None, depth: int, disabled=frozenset()):
    """The launch plan of a GGUF file or a synthetic preset's header (refusals as one-line errors)."""
    from sparkinfer_cute.errors import SparkinferError
    from sparkinfer_cute.models.launch_plan import launch_plan

    try:
        if synth is not None:
            from sparkinfer_cute.gguf.synth import synthetic_header

            return launch_plan(synthetic_header(*synth), depth=depth, disabled=disabled,
                               name=f"{synth[0]}:{synth[1]} (synthetic shape)")
        from sparkinfer_cute.gguf import GGUFFile

        return launch_plan(GGUFFile(model), depth=depth, disabled=disabled, name=os.path.basename(model))
    except SparkinferError as e:
        fail(str(e))
    except KeyError as e:
        fail(f"{model}: no GPU forward for this architecture ({e})")


def _print_plan(p) -> None:
    mb = 1e6
    print(f"{p.model}: {p.arch}, decode at depth {p.depth}")
    tails, phases = sum(x.tails for x in p.launches), sum(x.phases for x in p.launches)
    print(f"  kernels/token {p.kernels_per_token} ({tails} of them end with a norm chain run by their last CTA; "
          f"{phases} phase hand-offs inside launches), "
          f"bytes/token {p.bytes_per_token / mb:.1f} MB, minimum {p.minimum_bytes / mb:.1f} MB, "
          f"bytes/minimum {p.ratio:.4f}")
    bk, mn = p.bytes_by_kind(), p.minimum
    print("  bytes by kind (MB): " + ", ".join(f"{k} {v / mb:.2f}" for k, v in bk.items())
          + f"; minimum: routed {mn['routed'] / mb:.2f}, dense {mn['dense'] / mb:.2f}, kv {mn['kv'] / mb:.2f}")
    print(f"  {'part':<12} {'layers':>6} {'kernels/layer':>13} {'MB/layer':>9} {'min MB/layer':>12} {'ratio':>7}  "
          "kernels by op (one layer)")
    for kind, r in p.by_layer_kind().items():
        mn_s = "" if r["minimum_per_layer"] is None else f"{r['minimum_per_layer'] / mb:.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.4f}"
        ops = " ".join(f"{o}:{n}" for o, n in r["ops"].items())
        print(f"  {kind:<12} {r['layers']:>6} {r['kernels_per_layer']:>13g} {r['bytes_per_layer'] / mb:>9.3f} "
              f"{mn_s:>12} {ratio:>7}  {ops}")


def _print_launches(p) -> None:
    print(f"  {'#':>4} {'op':<16} {'layer':>5} {'kernels':<34} " + " ".join(f"{k:>10}" for k in p.launches[0].bytes))
    for i, x in enumerate(p.launches):
        parts = "+".join(f"{k}x{n}" if n > 1 else k for k, n in x.parts)
        print(f"  {i:>4} {x.op:<16} {'' if x.layer is None else x.layer:>5} {parts:<34} "
              + " ".join(f"{v:>10}" for v in x.bytes.values()))


def plan_main(argv) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.perf_model plan",
                        description="Kernels and bytes per decode token from the GPU forward run without a GPU.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=existing_file, help="GGUF file (only its header is read)")
    src.add_argument("--synth", type=synth_spec, action="append",
                     help="ARCH:PRESET of gguf/synth.py (repeatable), e.g. qwen3moe:30b-a3b, gemma4:26b-a4b")
    ap.add_argument("--depth", type=int_at_least(0), default=0, help="KV positions already cached (default 0)")
    ap.add_argument("--disable", type=passes, default=None,
                    help="plan the build without these speed passes (comma-separated SPARKINFER_DISABLE names)")
    ap.add_argument("--launches", action="store_true",
                    help="also list every launch of the step: op, layer, kernels (by kernel), bytes by kind")
    ap.add_argument("--json", type=writable_path, help="write the plans' figures as JSON here")
    args = ap.parse_args(argv)
    args.disable = args.disable or frozenset()
    plans = [build_plan(args.model, None, args.depth, args.disable)] if args.model else [
        build_plan(None, s, args.depth, args.disable) for s in args.synth]
    for p in plans:
        _print_plan(p)
        if args.launches:
            _print_launches(p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([p.to_dict() for p in plans], f, indent=1)
    return 0


def _read_json_rows(path: str) -> list:
    with open(path) as f:
        text = f.read().strip()
    return [json.loads(l) for l in text.splitlines() if l.strip()] if "\n{" in text else [json.loads(text)]


def tail_cost(path: str | None) -> ClassCost:
    """The fixed cost of a tail: the median measured ``tail_cost_us`` (negatives clamped to 0) of a
    ``microbench --tails`` JSON, or ``TAIL_SECONDS`` (the committed H100 measurement) without one."""
    if path is None:
        return ClassCost(TAIL_SECONDS, 1.0, "TAIL_SECONDS (H100, results/micro_tails_2026-12-08_h100.json)")
    with open(path) as f:
        rows = json.load(f).get("tails") or []
    costs = [max(0.0, float(r["tail_cost_us"])) for r in rows if isinstance(r, dict) and "tail_cost_us" in r]
    if not costs:
        raise ValueError(f"{path}: no tail_cost_us rows (the JSON of microbench --tails)")
    return ClassCost(float(np.median(costs)) * 1e-6, 1.0, f"median of {len(costs)} measured tails, "
                                                          f"{os.path.basename(path)}")


def predict_main(argv) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.perf_model", description=__doc__.split("\n\n")[0],
                        epilog="`python -m sparkinfer_cute.perf_model plan --help`: the launch plan alone.")
    ap.add_argument("--bench", required=True, type=existing_file,
                    help="bench JSON/JSONL from python -m sparkinfer_cute.bench (the H100 decode it calibrates on)")
    ap.add_argument("--microbench", required=True, type=existing_file,
                    help="JSON from python -m sparkinfer_cute.kernels.microbench (per-class fits)")
    ap.add_argument("--arch", default="qwen3moe", help="which benchmark rows calibrate (latest of this arch)")
    ap.add_argument("--calibrate-synth", type=synth_spec,
                    help="ARCH:PRESET whose plan the bench row ran (default: the real-shape preset of --arch)")
    ap.add_argument("--calibrate-disable", type=passes, default=None,
                    help="speed passes the benchmarked build did not have (comma-separated SPARKINFER_DISABLE names), "
                         "so that its plan is the build that was measured")
    ap.add_argument("--synth", type=synth_spec, action="append",
                    help=f"models to predict (repeatable; default {', '.join(BASKET)})")
    ap.add_argument("--disable", type=passes, default=None,
                    help="predict the build without these speed passes (comma-separated SPARKINFER_DISABLE names): "
                         "a pass's predicted gain is the difference")
    ap.add_argument("--depth", type=int_at_least(0), default=64,
                    help="KV depth of the predicted tokens (default 64: the mean of a tg128 run from position 0)")
    ap.add_argument("--l2", choices=("lru", "persist"), default="lru",
                    help="L2 residency across graph replays: lru (default) or the persisting-window what-if")
    ap.add_argument("--tails", type=existing_file,
                    help="JSON of python -m sparkinfer_cute.kernels.microbench --tails: the measured cost of a "
                         "norm-chain tail (default: TAIL_SECONDS, the committed H100 measurement)")
    ap.add_argument("--json", type=writable_path, help="write the predictions as JSON here")
    args = ap.parse_args(argv)
    args.disable = args.disable or frozenset()
    args.calibrate_disable = args.calibrate_disable or frozenset()
    try:
        with open(args.microbench) as f:
            micro = json.load(f)
        rows = _read_json_rows(args.bench)
    except (OSError, ValueError) as e:
        fail(f"cannot read the benchmark files as JSON: {e}")
    rows = [r for r in rows if isinstance(r, dict) and r.get("arch") == args.arch]
    if not rows:
        fail(f"no {args.arch} rows in {args.bench}")
    try:
        tail = tail_cost(args.tails)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{args.tails}: not a microbench --tails JSON ({type(e).__name__}: {e})")
    bench = rows[-1]
    cal_synth = args.calibrate_synth or synth_spec(SYNTH_DEFAULT.get(args.arch, "qwen3moe:30b-a3b"))
    try:
        costs = fit_classes(micro, os.path.basename(args.microbench))
        costs["tail"] = tail
        h100, blackwell = hardware(micro)
        cal_depth = int(bench.get("gen", 128)) // 2
        cal_plan = build_plan(None, cal_synth, cal_depth, args.calibrate_disable)
        if bench.get("kernels_per_token") not in (None, cal_plan.kernels_per_token):
            fail(f"the bench row measured {bench['kernels_per_token']} kernels/token, the plan of "
                 f"{cal_synth[0]}:{cal_synth[1]} has {cal_plan.kernels_per_token}: not the same build (name the "
                 "passes it lacked with --calibrate-disable)")
        tps = float(bench["decode_tps_median"])
        a_other = calibrate_other(cal_plan, costs, h100, tps)
    except (KeyError, TypeError, ValueError, np.linalg.LinAlgError) as e:
        fail(f"{args.bench} / {args.microbench}: not the files this model reads ({type(e).__name__}: {e})")
    costs["other"] = ClassCost(a_other, costs["gemv/dp4a"].eta,
                               f"fallback, solved from {bench.get('model', '?')} {tps:.1f} tok/s ({args.bench})")
    print(f"calibration: H100 {bench.get('gpu', '?')} decode {tps:.1f} tok/s on {bench.get('model', '?')} "
          f"({bench.get('date', '?')}), bench kernels/token {bench.get('kernels_per_token')} = plan "
          f"{cal_plan.kernels_per_token} ({cal_synth[0]}:{cal_synth[1]}, depth {cal_depth}"
          + (f", without {','.join(sorted(args.calibrate_disable))})" if args.calibrate_disable else ")"))
    print(f"copy bandwidth {h100.copy_bw / 1e9:.0f} GB/s, L2 {h100.l2_bytes >> 20} MiB (measured, "
          f"{os.path.basename(args.microbench)}); Blackwell BW = datasheet x {h100.copy_bw / H100_DATASHEET_BW:.3f}")
    print(f"{'class':<12} {'a (us)':>7} {'eta':>6}  source")
    for k, c in costs.items():
        print(f"{k:<12} {c.a * 1e6:>7.2f} {c.eta:>6.3f}  {c.source}")
    out = {"calibration": {"bench": args.bench, "row_date": bench.get("date"), "h100_tps": tps,
                           "a_other_us": a_other * 1e6, "bench_kernels": bench.get("kernels_per_token"),
                           "plan_kernels": cal_plan.kernels_per_token},
           "classes": {k: {"a_us": c.a * 1e6, "eta": c.eta, "source": c.source} for k, c in costs.items()},
           "assumptions": {"L2_USABLE": L2_USABLE, "PERSIST_FRACTION": PERSIST_FRACTION,
                           "L2_BW_OVER_DRAM": L2_BW_OVER_DRAM, "fixed costs on Blackwell": "equal to the H100's",
                           "tail_us": tail.a * 1e6, "tail_source": tail.source,
                           "phase_handoff_us": PHASE_SECONDS * 1e6,
                           "devices": {d.name: d.source for d in DEVICES}},
           "models": {}}
    print(f"\n{'model':<22} {'device':<18} {'kern':>5} {'GB/tok':>7} {'fixed ms':>8} {'stream ms':>9} {'L2 ms':>6} "
          f"{'tok/s':>7} {'<=4/layer':>9} {'+min B':>7} {'roofline':>8}  llama.cpp published")
    for spec in args.synth or [synth_spec(s) for s in BASKET]:
        plan = build_plan(None, spec, args.depth, args.disable)
        rec = out["models"][f"{spec[0]}:{spec[1]}"] = {"plan": plan.to_dict(), "devices": {}}
        for hw in (h100, *blackwell):
            t, parts = token_time(plan, costs, hw, l2_policy=args.l2, breakdown=True)
            t4 = what_if_kernels_per_layer(plan, costs, hw, 4)
            t4m = what_if_kernels_per_layer(plan, costs, hw, 4, at_minimum=True)
            roof = hw.copy_bw / plan.minimum_bytes
            pub = PUBLISHED.get((spec[0], hw.name))
            rec["devices"][hw.name] = {"tps": 1 / t, "fixed_ms": parts["fixed"] * 1e3,
                                       "stream_ms": parts["stream"] * 1e3, "l2_ms": parts["l2"] * 1e3,
                                       "tps_4_per_layer": 1 / t4, "tps_4_per_layer_min_bytes": 1 / t4m,
                                       "roofline_tps": roof, "llama_cpp_published": pub}
            print(f"{spec[0] + ':' + spec[1]:<22} {hw.name:<18} {plan.kernels_per_token:>5} "
                  f"{plan.bytes_per_token / 1e9:>7.3f} {parts['fixed'] * 1e3:>8.3f} {parts['stream'] * 1e3:>9.3f} "
                  f"{parts['l2'] * 1e3:>6.3f} {1 / t:>7.1f} {1 / t4:>9.1f} {1 / t4m:>7.1f} {roof:>8.1f}  "
                  f"{'' if pub is None else f'{pub[0]} ({pub[1]})'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    return predict_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
