"""sparkinfer_cute/perf_model.py on synthetic inputs: known fixed costs and efficiencies give known predictions, the
fits recover the parameters the micro-benchmark rows were made from, the calibration inverts the model, and the
CLI prints the launch plan of a preset and predictions from the committed H100 files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparkinfer_cute import perf_model as pm
from sparkinfer_cute.models.launch_plan import KINDS, Launch, LaunchPlan
from sparkinfer_cute.models.ops import OFF_BY_DEFAULT

ROOT = Path(__file__).resolve().parents[1]


def _launch(op, kernels, *, segment="layer", layer=0, int8=False, parts=(), **b):
    return Launch(op, kernels, segment, layer if segment == "layer" else None, {**dict.fromkeys(KINDS, 0), **b},
                  (), int8, parts)


def _plan(launches, n_layer=1):
    kinds = {l: "full moe" for l in range(n_layer)}
    return LaunchPlan("synthetic", "qwen3moe", 0, launches, {"routed": 0, "dense": 1000, "kv": 0}, kinds,
                      dict.fromkeys(range(n_layer), 1000))


COSTS = {"gemv/dp4a": pm.ClassCost(2e-6, 0.8, "t"), "gemv/float": pm.ClassCost(3e-6, 0.5, "t"),
         "moe/dp4a": pm.ClassCost(5e-6, 0.9, "t"), "moe/float": pm.ClassCost(6e-6, 0.6, "t"),
         "quantize": pm.ClassCost(1e-6, 0.8, "t"), "rmsnorm": pm.ClassCost(1.5e-6, 0.8, "t"),
         "other": pm.ClassCost(4e-6, 0.8, "t")}
HW = pm.Hardware("test", 1e12, 1 << 20, 4e12)


def test_token_time_known_inputs():
    plan = _plan([
        _launch("gemv", 1, int8=True, dense=8_000_000, act_read=2_000, act_write=2_000),
        _launch("moe_down", 2, int8=True, routed=9_000_000, act_write=4_000,
                parts=(("quantize", 1), ("moe_down", 1))),
        _launch("attention", 1, kv_read=4_000_000),
    ])
    t, parts = pm.token_time(plan, COSTS, HW, breakdown=True)
    fixed = 2e-6 + (1e-6 + 5e-6) + 4e-6                       # gemv; quantize + moe; other
    stream = 8e6 / (0.8 * 1e12) + 9e6 / (0.9 * 1e12) + 4e6 / (0.8 * 1e12)
    l2 = 8_000 / 4e12
    assert parts == pytest.approx({"fixed": fixed, "stream": stream, "l2": l2}, rel=1e-12)
    assert t == pytest.approx(fixed + stream + l2, rel=1e-12)


def test_l2_policies():
    plan = _plan([_launch("gemv", 1, dense=500_000), _launch("attention", 1, kv_read=300_000)])
    _, parts = pm.token_time(plan, COSTS, HW, breakdown=True)   # 0.8 MB <= 0.9 x 1 MiB: all from L2
    assert parts["stream"] == 0 and parts["l2"] == pytest.approx(800_000 / 4e12)
    small = pm.Hardware("small L2", 1e12, 512 << 10, 4e12)            # 0.8 MB > 0.9 x 512 KiB: none (LRU)
    assert pm.token_time(plan, COSTS, small, breakdown=True)[1]["l2"] == 0
    pinned = pm.token_time(plan, COSTS, small, l2_policy="persist", breakdown=True)[1]
    share = pm.PERSIST_FRACTION * (512 << 10)                         # pinned pro rata of dense + KV
    assert pinned["l2"] == pytest.approx(share / 4e12)
    with pytest.raises(ValueError):
        pm.token_time(plan, COSTS, HW, l2_policy="mru")


def test_calibrate_other_inverts_the_model():
    plan = _plan([_launch("gemv", 1, int8=True, dense=10**8), _launch("argmax", 2, act_read=600_000),
                  _launch("attention", 1, kv_read=10**7)])
    want = 3.3e-6
    t = pm.token_time(plan, {**COSTS, "other": pm.ClassCost(want, COSTS["gemv/dp4a"].eta, "")}, HW)
    assert pm.calibrate_other(plan, COSTS, HW, 1 / t) == pytest.approx(want, rel=1e-9)


def test_what_if_four_per_layer():
    layer = [_launch("rmsnorm", 1, dense=0), _launch("gemv", 1, int8=True, dense=10**6),
             _launch("attention", 2, kv_read=0), _launch("moe_gate_up", 1, int8=True, routed=10**6)]
    plan = _plan(layer + [_launch("argmax", 2, segment="output")])
    t, parts = pm.token_time(plan, COSTS, HW, breakdown=True)
    mean_a = (1.5e-6 + 2e-6 + 2 * 4e-6 + 5e-6) / 5
    t4 = pm.what_if_kernels_per_layer(plan, COSTS, HW, 4)
    assert t4 == pytest.approx(t - parts["fixed"] + 2 * 4e-6 + 4 * mean_a, rel=1e-12)
    assert t4 < t


def _rows(a, eta, bw, sizes, case, path):
    return [{"case": f"{case} {i} [chunk rpw1]", "path": path, "bytes": b, "us": (a + b / (eta * bw)) * 1e6}
            for i, b in enumerate(sizes)]


def test_fit_classes_recovers_parameters():
    bw = 2e12
    sizes = [1e6, 4e6, 2e7, 2.5e8]
    res = (_rows(2.5e-6, 0.9, bw, sizes, "gemv Q4_K", "dp4a") + _rows(3e-6, 0.7, bw, sizes, "gemv Q4_K", "float")
           + _rows(4e-6, 0.95, bw, sizes, "moe gate+up", "dp4a") + _rows(5e-6, 0.6, bw, sizes, "moe down", "float")
           + [{"case": "quantize_q8_1 2048", "path": "dp4a", "bytes": 0, "us": 1.4},
              {"case": "rmsnorm_residual->q8_1 fused 2048", "path": "dp4a", "bytes": 0, "us": 1.9}])
    c = pm.fit_classes({"copy_GBps": bw / 1e9, "results": res})
    assert c["gemv/dp4a"].a == pytest.approx(2.5e-6) and c["gemv/dp4a"].eta == pytest.approx(0.9)
    assert c["gemv/float"].eta == pytest.approx(0.7) and c["moe/float"].a == pytest.approx(5e-6)
    assert c["quantize"].a == pytest.approx(1.4e-6) and c["rmsnorm"].a == pytest.approx(1.9e-6)
    # faster than a copy is not physical: refitted with eta = 1
    res2 = [r for r in res if not r["case"].startswith("moe gate")] + _rows(4e-6, 1.3, bw, sizes, "moe g", "dp4a")
    c2 = pm.fit_classes({"copy_GBps": bw / 1e9, "results": res2})
    assert c2["moe/dp4a"].eta == 1.0 and "clamped" in c2["moe/dp4a"].source
    with pytest.raises(ValueError, match="rmsnorm"):
        pm.fit_classes({"copy_GBps": bw / 1e9, "results": res[:-1]})


# the passes the committed H100 bench row (534 kernels/token) was measured without
OLD_BUILD = ("fused_attn_q8,fused_moe_act_q8,fused_head_q8,fused_router_norm,fused_qk_attention,fused_ffn_tail,"
             "fused_o_tail,fused_route_gate_up,fused_experts_down")


def test_committed_h100_files_reproduce_the_calibration(tmp_path):
    """On the committed H100 files the prediction for the calibration model on the H100 is its measured speed, and
    Blackwell predictions come out for both basket models (figures in RESULTS.md 2026-12-07)."""
    micro = ROOT / "results" / "microbench_2026-11-25_h100_after.json"
    out = tmp_path / "pred.json"
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.perf_model", "--bench", str(ROOT / "results" /
                        "bench.jsonl"), "--microbench", str(micro), "--synth", "qwen3moe:30b-a3b", "--synth",
                        "gemma4:26b-a4b", "--calibrate-disable", OLD_BUILD, "--disable", OLD_BUILD,
                        "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    q = d["models"]["qwen3moe:30b-a3b"]["devices"]
    assert q["H100"]["tps"] == pytest.approx(d["calibration"]["h100_tps"], rel=1e-9)
    assert d["calibration"]["bench_kernels"] == d["calibration"]["plan_kernels"]
    for m in d["models"].values():
        dev = m["devices"]
        assert np.isfinite([v["tps"] for v in dev.values()]).all()
        # bandwidth orders the devices; fewer launches never slow a token down
        assert dev["DGX Spark (GB10)"]["tps"] < dev["RTX 5090"]["tps"] < dev["H100"]["tps"]
        assert all(v["tps_4_per_layer"] > v["tps"] for v in dev.values())


def test_synth_spec_prefixes():
    assert pm.synth_spec("qwen3moe:30b") == ("qwen3moe", "30b-a3b")
    assert pm.synth_spec("qwen3moe:tiny") == ("qwen3moe", "tiny")  # exact beats the prefix of tiny-fallback
    for bad in ("qwen3moe:t", "qwen3moe", "llama:7b", "gemma4:"):
        with pytest.raises(Exception, match="ARCH:PRESET"):
            pm.synth_spec(bad)


def test_plan_cli_prints_the_plan():
    """The default build, and with SPARKINFER_ENABLE the passes that are off by default (models/ops.py
    OFF_BY_DEFAULT): the norm-chain tails, and router, gate/up and down in one launch per layer (two phase hand-offs
    in each)."""
    every = ",".join(sorted(OFF_BY_DEFAULT))
    for enable, count, tails, phases in (("", 45, 0, 0), ("fused_ffn_tail,fused_router_norm", 37, 8, 0),
                                         (every, 29, 8, 8)):
        env = dict(os.environ, SPARKINFER_ENABLE=enable, SPARKINFER_DISABLE="")
        r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.perf_model", "plan", "--synth", "qwen3moe:tiny"],
                           capture_output=True, text=True, timeout=300, check=False, env=env)
        assert r.returncode == 0, r.stderr
        assert (f"kernels/token {count} ({tails} of them end with a norm chain run by their last CTA; {phases} phase "
                "hand-offs") in r.stdout and "full moe" in r.stdout


def test_calibration_refuses_another_build():
    """The bench row's measured kernels/token must be the calibration plan's: the committed H100 row (534) is the
    build before fused_attn_q8, fused_moe_act_q8, fused_head_q8, fused_router_norm, fused_qk_attention and
    fused_ffn_tail, so calibrating today's default plan (389) against it is refused in one line."""
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.perf_model", "--bench", str(ROOT / "results" /
                        "bench.jsonl"), "--microbench", str(ROOT / "results" / "microbench_2026-11-25_h100_after.json")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "534" in r.stderr and "--calibrate-disable" in r.stderr


def test_bench_accounting_is_the_launch_plan():
    """bench.py reports kernels and bytes per token from the same launch plan (no second accounting): its
    decode_plan on a stand-in of a loaded model is the plan of that model."""
    from types import SimpleNamespace

    from sparkinfer_cute.bench import decode_plan
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.gguf.synth import synthetic_header
    from sparkinfer_cute.models.launch_plan import launch_plan

    h = synthetic_header("qwen3moe", "30b-a3b")
    m = SimpleNamespace(g=h, cfg=load_config(h), device=SimpleNamespace(sm_count=132), max_context=648)
    p = decode_plan(m, 64)
    q = launch_plan(h, depth=64, max_context=648)
    assert (p.kernels_per_token, p.bytes_per_token, p.minimum_bytes) == (q.kernels_per_token, q.bytes_per_token,
                                                                         q.minimum_bytes)
    # the old accounting counted the whole untied token_embd table (175 MB); the embedding gather reads one row
    emb = [x for x in p.launches if x.op == "embedding"]
    assert len(emb) == 1 and emb[0].bytes["dense"] == h.tensor("token_embd.weight").row_bytes


def test_tail_cost_is_the_measured_median_or_the_committed_one(tmp_path, monkeypatch):
    """A norm-chain tail's fixed cost: the median tail_cost_us of a microbench --tails JSON (a negative measurement
    clamped to 0), else TAIL_SECONDS, which is that median for the committed H100 file; each planned tail adds it to
    the token time."""
    f = tmp_path / "tails.json"
    f.write_text(json.dumps({"tails": [{"tail_cost_us": 0.8}, {"tail_cost_us": 1.2}, {"tail_cost_us": -0.1}]}))
    assert pm.tail_cost(str(f)).a == pytest.approx(0.8e-6)
    assert pm.tail_cost(None).a == pm.TAIL_SECONDS and "micro_tails" in pm.tail_cost(None).source
    assert pm.tail_cost(str(ROOT / "results" / "micro_tails_2026-12-08_h100.json")).a == pytest.approx(pm.TAIL_SECONDS)
    (tmp_path / "bad.json").write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="tail_cost_us"):
        pm.tail_cost(str(tmp_path / "bad.json"))
    from sparkinfer_cute.models import ops

    monkeypatch.setattr(ops, "DISABLED", frozenset())  # every pass on (the tails are off by default)
    plan = pm.build_plan(None, ("qwen3moe", "tiny"), 0)
    tails = sum(x.tails for x in plan.launches)
    assert tails == 8  # 4 layers: each expert down's next norm + each fused router's own input norm
    hw = pm.Hardware("h", 3e12, 50 << 20, 9e12)
    costs = {k: pm.ClassCost(1e-6, 0.9, "") for k in ("gemv/dp4a", "gemv/float", "moe/dp4a", "moe/float",
                                                      "quantize", "rmsnorm", "other")}
    t0 = pm.token_time(plan, {**costs, "tail": pm.ClassCost(0.0, 1.0, "")}, hw)
    t1 = pm.token_time(plan, {**costs, "tail": pm.ClassCost(2e-6, 1.0, "")}, hw)
    assert t1 - t0 == pytest.approx(tails * 2e-6)
