"""Decode speed on consumer Blackwell, predicted from what we measured on the H100 ("Blackwell on paper").

`python -m sparkinfer_cute.perf_model --bench results/bench.jsonl --microbench results/microbench_*.json`

Model. A decode step is N kernels replayed from one CUDA graph, reading B bytes (weights of the routed experts and
the dense layers, plus the KV cache). Each kernel costs a fixed part (launch/drain gap in the graph + DRAM latency
ramp, which does not shrink with bandwidth) plus its bytes over the bandwidth it actually achieves:

    t_kernel = a + bytes / (eta * BW)          T_token = N * a_eff + B / (eta * BW)

* ``eta`` (streaming efficiency) and ``a`` come from a least-squares fit of the micro-benchmark's GEMV/MoE cases on
  the H100 (t against bytes / BW_copy; ``eta`` = 1/slope, ``a`` = intercept): how well our kernels stream once the
  fixed part is paid.
* ``a_eff`` is then solved from the end-to-end H100 decode measurement, T_h100 = N * a_eff + B / (eta * BW_h100):
  it absorbs everything per kernel that the GEMV fit does not see (small kernels, dependencies).
* Blackwell: the same N, B, eta and a_eff with the device's bandwidth. The fixed part is assumed equal: it is set by
  the graph's launch path and DRAM latency, not by bandwidth (an assumption: the RTX 5090 has 170 SMs and clocks
  ~20% higher than an H100 SXM, GB10 48 SMs of the same architecture; both would move it by tens of percent).
  Copy bandwidth is taken as ~85% of the datasheet figure, the fraction the H100 achieves (3.0 of 3.35 TB/s).

Every input is a file written by our benchmarks; nothing here is measured on Blackwell.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .cli_args import ArgumentParser, existing_file, fail

DEVICES = {  # name: datasheet DRAM bandwidth, bytes/s
    "RTX 5090 / RTX PRO 6000 (sm_120, GDDR7)": 1.792e12,
    "DGX Spark / GB10 (sm_121, LPDDR5X)": 0.273e12,
}
COPY_FRACTION = 3.0 / 3.35  # measured H100 copy / datasheet


def fit_streaming(micro: dict, path: str = "float") -> tuple[float, float]:
    """(eta, a_seconds) from the micro-benchmark: t = a + bytes / (eta * copy_BW)."""
    bw = micro["copy_GBps"] * 1e9
    rows = [r for r in micro["results"] if r.get("path") == path and ("gemv" in r["case"] or "moe" in r["case"]
                                                                    or "experts" in r["case"])]
    if any("chunk" in r["case"] for r in rows):  # the kernels the models run (mapping="auto") where measured
        rows = [r for r in rows if "chunk" in r["case"] or "gemv_multi" in r["case"]]
    x = np.array([r["bytes"] / bw for r in rows])
    t = np.array([r["us"] * 1e-6 for r in rows])
    A = np.stack([np.ones_like(x), x], 1)
    (a, slope), *_ = np.linalg.lstsq(A, t, rcond=None)
    return float(1.0 / slope), float(a)


def predict(bench: dict, eta: float) -> dict:
    T = 1.0 / bench["decode_tps_median"]
    N = bench["kernels_per_token"]
    B = bench["bytes_per_token"]
    bw = bench["copy_bandwidth_GBps"] * 1e9
    a_eff = (T - B / (eta * bw)) / N
    out = {"h100_measured_tps": bench["decode_tps_median"], "kernels": N, "bytes": B, "eta": eta,
           "a_eff_us": a_eff * 1e6, "devices": {}}
    for name, peak in DEVICES.items():
        bw_d = peak * COPY_FRACTION
        Td = N * a_eff + B / (eta * bw_d)
        out["devices"][name] = {"copy_BW_GBps": bw_d / 1e9, "tps": 1.0 / Td,
                                "roofline_tps": bw_d / B, "fixed_ms": N * a_eff * 1e3,
                                "stream_ms": B / (eta * bw_d) * 1e3}
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.perf_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", required=True, type=existing_file,
                    help="bench JSON/JSONL from python -m sparkinfer_cute.bench")
    ap.add_argument("--microbench", required=True, type=existing_file,
                    help="JSON from python -m sparkinfer_cute.kernels.microbench")
    ap.add_argument("--arch", default="qwen3moe", help="which benchmark rows to use (latest of this arch)")
    ap.add_argument("--path", default="float", choices=("float", "dp4a"),
                    help="micro-benchmark path whose fit gives eta")
    args = ap.parse_args(argv)
    try:
        with open(args.microbench) as f:
            micro = json.load(f)
        with open(args.bench) as f:
            text = f.read().strip()
        rows = [json.loads(l) for l in text.splitlines() if l.strip()] if "\n{" in text else [json.loads(text)]
    except (OSError, ValueError) as e:
        fail(f"cannot read the benchmark files as JSON: {e}")
    rows = [r for r in rows if isinstance(r, dict) and r.get("arch") == args.arch]
    if not rows:
        fail(f"no {args.arch} rows in {args.bench}")
    bench = rows[-1]
    try:
        eta, a = fit_streaming(micro, args.path)
        p = predict(bench, eta)
    except (KeyError, TypeError, ValueError, np.linalg.LinAlgError) as e:
        fail(f"{args.bench} / {args.microbench}: not the files this model reads ({type(e).__name__}: {e})")
    print(f"H100 measured: {p['h100_measured_tps']:.1f} tok/s, {p['kernels']} kernels/token, "
          f"{p['bytes'] / 1e9:.2f} GB/token ({bench.get('model', '?')}, {bench.get('date', '?')})")
    print(f"micro-benchmark fit ({args.path} path): eta = {eta:.2f} of copy bandwidth, a = {a * 1e6:.2f} us/kernel; "
          f"end-to-end fixed part a_eff = {p['a_eff_us']:.2f} us/kernel")
    print(f"{'device':<42} {'copy BW':>9} {'fixed ms':>9} {'stream ms':>10} {'pred tok/s':>11} {'roofline':>9}")
    for name, d in p["devices"].items():
        print(f"{name:<42} {d['copy_BW_GBps']:>7.0f}GB {d['fixed_ms']:>9.2f} {d['stream_ms']:>10.2f} "
              f"{d['tps']:>11.1f} {d['roofline_tps']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
