"""The engine applies tuned launch configs (autotune/): a dry run of a GPU forward on the CPU.

The forward is built through its real ``__init__`` (``GPUDecoder(..., tuned=...)``) and run through the real
``models/ops.py`` call sites, with device memory faked (buffers that keep their shapes, weight handles named after
their tensors), the non-tunable ops stubbed, and the six kernel wrappers that take tuned knobs (``gemv``,
``gemv_multi``, ``moe_gate_up``, ``moe_down``, ``attention_decode``, ``quant_gemm``) replaced by recorders of their
keyword arguments. The cache holds, for every op and shape the model runs (the search's own shape list), a valid
config other than the default; the test then checks call by call, against a run without tuning:

* a call site the lookup reports as tuned passes every knob of its config to the wrapper;
* every other call (no entry, refused, not applicable) is exactly the untuned call;
* ``SPARKINFER_AUTOTUNE=0``, a stale metadata block and an invalid config all give the untuned calls (the invalid
  one with a warning naming it).
"""

from __future__ import annotations

import dataclasses

import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from tuned_cache import applicable_everywhere, model_task_keys, write_tuned_cache

from sparkinfer_cute.autotune import describe_tuning, load_tuned
from sparkinfer_cute.autotune.cache import DeviceIdentity, TuneCache, current_metadata
from sparkinfer_cute.autotune.lookup import DEFAULT, NOT_APPLICABLE, REFUSED, TUNED
from sparkinfer_cute.autotune.registry import TuneContext
from sparkinfer_cute.gguf.synth import write_synthetic

IDENT = DeviceIdentity("NVIDIA Fake 5090", 132, (12, 0), 12080)
MAX_CONTEXT = 256
PROMPT = 20  # prefill chunk length: token bucket 32
# kernel wrapper -> the autotune ops whose configs it takes
WRAPPER_OPS = {"gemv": {"gemv", "gemv_q8"}, "gemv_multi": {"gemv", "gemv_q8"},
               "moe_gate_up": {"moe_gate_up", "moe_gate_up_q8"}, "moe_down": {"moe_down", "moe_down_q8"},
               "attention_decode": {"attention_decode"}, "quant_gemm": {"quant_gemm"}}
# ops of models/ops.py that run as written (the tunable call sites and what they are built from)
KEEP = {"gemv", "gemv_qkv", "gemv_qk", "attention", "self_attention", "fused_qk_attention", "moe_gate_up", "moe_down", "gemm", "moe_rows", "tuned",
        "tuned_configs", "attention_config", "attention_splits", "enabled", "dp4a_for", "prefer_dp4a",
        "attention_geometry", "gemm_supports", "rows", "row", "new_q8", "gate_up_writes_act_q8"}


class FakeArray:
    """A device buffer stand-in that keeps its shape (and, for weights and KV pools, a name)."""

    ptr = 0

    def __init__(self, shape=(1,), dtype=np.float32, name=""):
        self.shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        self.dtype, self.name = np.dtype(dtype), name

    size = property(lambda self: int(np.prod(self.shape)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    @classmethod
    def empty(cls, shape, dtype=np.float32, *a, **k):
        return cls(shape, dtype)

    zeros = empty

    @classmethod
    def from_numpy(cls, arr, *a, **k):
        arr = np.asarray(arr)
        return cls(arr.shape, arr.dtype)

    def view(self, dtype=None, shape=None, offset_bytes=0):
        return FakeArray(self.shape if shape is None else shape, self.dtype if dtype is None else dtype, self.name)

    def to_numpy(self, *a, **k):
        return np.zeros(self.shape, self.dtype)

    def copy_from_numpy(self, *a, **k):
        pass

    def fill_bytes(self, *a, **k):
        return self


class FakeKV:
    def __init__(self, layers, max_context):
        self.head_dim = [g.head_dim for g in layers]
        self.n_kv_head = [g.n_head_kv for g in layers]
        self.k = [FakeArray(name=f"blk.{l}.attention") for l in range(len(layers))]
        self.v = list(self.k)
        self.page_table = FakeArray((1, -(-max_context // 64)), np.int32)

    @staticmethod
    def bytes_needed(layers, max_context):
        return 0


class FakeWeights(dict):
    resident_bytes = 0

    def __init__(self, g, names, *, repack_q6k=frozenset(), **kw):
        from sparkinfer_cute.runtime.weights import QWeight

        super().__init__()
        for n in names:
            t = g.tensor(n)
            q = "Q6_K_P" if t.ggml_type.name == "Q6_K" and n in repack_q6k else t.ggml_type.name
            self[n] = QWeight(n, q, tuple(int(v) for v in t.shape), FakeArray((t.nbytes,), np.uint8, n), 0)


class FakeStream:
    def synchronize(self):
        pass


def _plain(v):
    """A recorded argument, comparable between two builds (buffers by shape and name, not identity)."""
    if isinstance(v, FakeArray):
        return ("buffer", v.shape, v.name)
    if isinstance(v, (FakeStream, SimpleNamespace)):
        return type(v).__name__
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # e.g. attention's QKPrologue: its buffers and numbers
        return tuple(_plain(x) for x in v)
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # e.g. moe_down's post-FFN tail (FfnTailArgs)
        return (type(v).__name__, tuple(_plain(getattr(v, f.name)) for f in dataclasses.fields(v)))
    return v


def _where(fn, args, kwargs):
    """The call sites (weight / layer names) a recorded wrapper call belongs to."""
    if fn == "gemv_multi":
        return [item[0].name for item in args[0]]
    if fn == "attention_decode":
        return [args[1].name]
    return [args[0].name]


@pytest.fixture
def dry(monkeypatch):
    """``run(path, tuned) -> (decoder, calls)``: build the GPU forward of ``path`` with ``tuned`` and run one decode
    step and one prefill chunk of PROMPT tokens (every position's logits), recording the kernel wrapper calls as
    (wrapper, call sites, keyword arguments)."""
    import sparkinfer_cute.models as models_pkg
    from sparkinfer_cute.kernels import (attention_decode, gemv, moe_ffn, moe_route, q8_1, quant_gemm, routed_experts,
                                         router, router_gemv)
    from sparkinfer_cute.models import base, ops

    calls: list = []

    def recorder(fn):
        def rec(*args, **kwargs):
            calls.append((fn, _where(fn, args, kwargs), {k: _plain(v) for k, v in kwargs.items()}))
        return rec

    for mod, fn in ((gemv, "gemv"), (gemv, "gemv_multi"), (moe_ffn, "moe_gate_up"), (moe_ffn, "moe_down"),
                    (attention_decode, "attention_decode"), (quant_gemm, "quant_gemm")):
        monkeypatch.setattr(mod, fn, recorder(fn))
    def route_gemv(**kw):  # the fused router (called with keywords): recorded with its weight first
        w = kw.pop("w_router")
        recorder("route_gemv")(w, **kw)

    def routed(route, gate_up, chain, *, down=None, stream=None):  # one launch of the router, the gate/up and the
        route_gemv(**route)                                            # down: recorded as the wrapper calls it
        kw = dict(gate_up)                                             # replaces
        args = tuple(kw.pop(k) for k in ("w_gate", "w_up", "qtype", "h", "ids", "n_ff"))
        recorder("moe_gate_up")(*args, stream=stream, **kw)
        if down is not None:
            kw = dict(down)
            args = tuple(kw.pop(k) for k in ("w_down", "qtype", "act", "ids", "weights", "n_out"))
            recorder("moe_down")(*args, stream=stream, **kw)

    monkeypatch.setattr(routed_experts, "routed_experts", routed)
    monkeypatch.setattr(router_gemv, "route_gemv", route_gemv)
    for mod, fn in ((moe_route, "router_logits"), (moe_route, "moe_align"), (moe_route, "moe_combine"),
                    (router, "route"), (q8_1, "quantize_q8_1")):
        monkeypatch.setattr(mod, fn, lambda *a, **k: None)
    for name, obj in list(vars(ops).items()):
        if callable(obj) and not isinstance(obj, type) and not name.startswith("_") and name not in KEEP \
                and getattr(obj, "__module__", None) == ops.__name__:
            monkeypatch.setattr(ops, name, (lambda *a, **k: 1.0) if name == "qk_prologue" else (lambda *a, **k: None))
    monkeypatch.setattr(ops, "new_q8", lambda n, rows=1: FakeQ8(n=n, rows=rows))
    monkeypatch.setattr(ops, "PagedKV", FakeKV)
    device = SimpleNamespace(name=IDENT.name, sm_count=IDENT.sm_count)
    monkeypatch.setattr(ops, "get_device", lambda: device)
    monkeypatch.setattr(base, "get_device", lambda: device)
    monkeypatch.setattr(base, "WeightStore", FakeWeights)
    monkeypatch.setattr(base, "Stream", FakeStream)
    for mod in {ops, base, *(sys.modules[c.__module__] for c in models_pkg.GPU_FORWARDS.values())}:
        if hasattr(mod, "DeviceArray"):
            monkeypatch.setattr(mod, "DeviceArray", FakeArray)

    def run(path, tuned):
        from sparkinfer_cute.gguf import GGUFFile
        from sparkinfer_cute.gguf.config import load_config

        calls.clear()
        g = GGUFFile(path)
        cfg = load_config(g)
        m = models_pkg.load_gpu_model(g, cfg, max_context=MAX_CONTEXT, progress=False, tuned=tuned)
        m.step_eager(1)
        m.reset()
        m._prefill_batched(list(range(1, PROMPT + 1)), all_logits=FakeArray((PROMPT, cfg.vocab_size)))
        return m, list(calls)

    return run


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARKINFER_AUTOTUNE", raising=False)
    return tmp_path


# (arch, tiny preset overrides): n_embd 1024 puts q/k/v and the experts' gate/up on the chunk kernels (n_in % 1024
# == 0), so the fused q/k/v launch (GemvMulti) runs; the plain tiny presets run the slice / per-matrix paths
MODELS = {"qwen3moe": ("qwen3moe", None), "qwen3moe-1024": ("qwen3moe", {"n_embd": 1024}),
          "gemma3": ("gemma3", None), "gemma4": ("gemma4", None)}


def _write(path, name):
    arch, overrides = MODELS[name]
    write_synthetic(path, arch=arch, preset="tiny", seed=3, overrides=overrides)
    return path


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    return _write(str(tmp_path_factory.mktemp("tuned") / f"{request.param}.gguf"), request.param)



def _ctx():
    from sparkinfer_cute.kernels.arch import smem_budget

    return TuneContext(sm_count=IDENT.sm_count, smem_budget=smem_budget())


def _site_of(tuned, fn, where):
    sites = [s for s in tuned.sites.values() if s.where == where and s.op in WRAPPER_OPS[fn]]
    assert len(sites) <= 1, sites
    return sites[0] if sites else None


def _check_calls(tuned, calls, base_calls):
    """Every call: the tuned knobs where the lookup says tuned, else exactly the untuned call. Returns the ops with
    a tuned call."""
    assert [(f, w) for f, w, _ in calls] == [(f, w) for f, w, _ in base_calls]
    applied = set()
    for (fn, where, kw), (_, _, base_kw) in zip(calls, base_calls):
        if fn == "gemv_multi":
            for i, name in enumerate(where):
                site = _site_of(tuned, fn, name)
                got = (kw.get("rows_per_warp") or (None,) * len(where))[i]
                if site is not None and site.source == TUNED:
                    assert got == site.config["rows_per_warp"], (name, site, kw)
                    applied.add(site.op)
                else:
                    assert got is None, (name, site, kw)
            continue
        site = _site_of(tuned, fn, where[0])
        if site is not None and site.source == TUNED:
            assert {k: kw.get(k) for k in site.config} == site.config, (fn, where, site, kw)
            applied.add(site.op)
        else:
            assert kw == base_kw, (fn, where, site, kw, base_kw)
    return applied


class FakeQ8(SimpleNamespace):
    """A q8_1 activation buffer: its width and rows (``Q8Act.narrow`` keeps the rows)."""

    def narrow(self, n):
        return FakeQ8(n=n, rows=self.rows)


def test_tuned_knobs_reach_the_kernel_wrappers(model, dry, cache_dir, rng):
    _, base_calls = dry(model, None)
    # untuned: the wrappers choose (their defaults); only the token tile is the call site's own constant
    knobs = {"mapping", "rows_per_warp", "warps_per_row", "x_loads_first", "stages", "tile_rows", "heads_per_cta",
             "keys_per_iter"}
    assert base_calls and not [(f, w, kw) for f, w, kw in base_calls if knobs & set(kw) - {"rows_per_warp"}
                               or kw.get("rows_per_warp") is not None]
    stored = write_tuned_cache(model, IDENT, _ctx(), cache_dir / "autotune.json", rng, max_context=MAX_CONTEXT,
                               prefill_tokens=PROMPT, prefer=applicable_everywhere)
    tuned = load_tuned(IDENT)
    assert tuned.enabled and len(tuned) == sum(len(v) for v in stored.values()) > 0
    m, calls = dry(model, tuned)
    applied = _check_calls(tuned, calls, base_calls)
    multi = [kw for f, _, kw in calls if f == "gemv_multi"]
    if multi:  # the fused q/k/v launch got the tuned rows per warp
        assert any(r is not None for kw in multi for r in kw.get("rows_per_warp") or ())
    # the call sites ask with exactly the keys the search stores: every shape looked up is one of the model's
    # tasks (except the all-position LM-head GEMM of the accuracy path, which the search does not list), and every
    # stored entry is asked for by this build or by the other activation path of the same kernel (the search tunes
    # f32 and dp4a shapes alike; SPARKINFER_DP4A picks one)
    tasks = model_task_keys(model, max_context=MAX_CONTEXT, prefill_tokens=PROMPT)
    looked_up = {(s.op, s.key) for s in tuned.sites.values()}
    lm_head = {(s.op, s.key) for s in tuned.sites.values()
               if s.op == "quant_gemm" and s.where in ("output.weight", "token_embd.weight")}
    assert looked_up - lm_head <= tasks, sorted(looked_up - lm_head - tasks)
    twin = {"gemv": "gemv_q8", "moe_gate_up": "moe_gate_up_q8", "moe_down": "moe_down_q8"}
    twin.update({v: k for k, v in twin.items()})
    missing = [(op, k) for op, by in stored.items() for k in by
               if (op, k) not in looked_up and (twin.get(op), k) not in looked_up]
    assert not missing, f"stored entries no call site asked for: {missing}"
    assert tuned.count(TUNED) > 0 and tuned.count(REFUSED) == tuned.count(NOT_APPLICABLE) == 0
    assert {s.op for s in tuned.sites.values() if s.source == TUNED} == applied
    assert {"attention_decode", "quant_gemm"} <= applied
    # the split workspace is sized for the tuned split counts
    assert m.attn_ws.num_splits == [c["num_splits"] for c in m.attn_ws.configs]
    line = describe_tuning(tuned)
    assert f"tuned config at {tuned.count(TUNED)} of {len(tuned.sites)} call sites" in line
    assert f"default at {tuned.count(DEFAULT)}" in line


def test_switched_off_or_stale_cache_gives_the_default_calls(model, dry, cache_dir, rng, monkeypatch):
    _, base_calls = dry(model, None)
    write_tuned_cache(model, IDENT, _ctx(), cache_dir / "autotune.json", rng, max_context=MAX_CONTEXT,
                      prefill_tokens=PROMPT)
    monkeypatch.setenv("SPARKINFER_AUTOTUNE", "0")
    off = load_tuned(IDENT)
    _, calls = dry(model, off)
    assert calls == base_calls and not off.sites
    assert describe_tuning(off).startswith("autotune: defaults (off (SPARKINFER_AUTOTUNE=0)")
    monkeypatch.delenv("SPARKINFER_AUTOTUNE")
    # the same entries under another driver's metadata: ignored
    data = TuneCache().read()
    block = data["devices"][IDENT.key]
    TuneCache().clear()
    TuneCache().put(IDENT, dict(block["meta"], driver=IDENT.driver_version + 10), block["entries"])
    stale = load_tuned(IDENT)
    assert not stale.enabled and "driver" in stale.status
    _, calls = dry(model, stale)
    assert calls == base_calls


def test_an_invalid_tuned_config_is_refused_with_a_warning(dry, cache_dir, rng, capsys, tmp_path):
    path = _write(str(tmp_path / "q.gguf"), "qwen3moe-1024")
    _, base_calls = dry(path, None)
    stored = write_tuned_cache(path, IDENT, _ctx(), cache_dir / "autotune.json", rng, max_context=MAX_CONTEXT,
                               prefill_tokens=PROMPT, prefer=applicable_everywhere)
    # corrupt one attention entry and one MoE down entry: values their validity checks reject
    bad = {"attention_decode": {"num_splits": 3, "heads_per_cta": 1, "keys_per_iter": 1},
           "moe_down_q8": {"mapping": "chunk", "rows_per_warp": 5}}
    meta = current_metadata(IDENT)
    TuneCache().put(IDENT, meta, {op: {k: {"config": cfg} for k in stored[op]} for op, cfg in bad.items()})
    tuned = load_tuned(IDENT)
    _, calls = dry(path, tuned)
    _check_calls(tuned, calls, base_calls)
    refused = [s for s in tuned.sites.values() if s.source == REFUSED]
    assert {s.op for s in refused} == set(bad)
    assert all(s.config is None and s.reason for s in refused)
    err = capsys.readouterr().err
    for op in bad:  # one warning per refused entry (not one per layer)
        assert err.count("refusing the tuned config") >= 1 and err.count(f" of {op} [") == len(stored[op])
    # the refused sites ran the untuned calls (checked by _check_calls); the other tuned entries still apply
    assert tuned.count(TUNED) > 0
    assert f"{len(refused)} refused" in describe_tuning(tuned)


def test_a_config_its_call_site_cannot_run_is_not_applied(dry, cache_dir, rng, tmp_path):
    """Valid configs the call site cannot take: a slice mapping for a matrix of the fused q/k/v launch, a grouped
    GEMM tile other than the routing tables' (the lookup says why; the calls are the untuned ones)."""
    path = _write(str(tmp_path / "q.gguf"), "qwen3moe-1024")
    _, base_calls = dry(path, None)
    write_tuned_cache(path, IDENT, _ctx(), cache_dir / "autotune.json", rng, max_context=MAX_CONTEXT,
                      prefill_tokens=PROMPT, prefer=lambda op, cfg: not applicable_everywhere(op, cfg))
    tuned = load_tuned(IDENT)
    _, calls = dry(path, tuned)
    _check_calls(tuned, calls, base_calls)
    na = [s for s in tuned.sites.values() if s.source == NOT_APPLICABLE]
    assert {s.where for s in na} >= {"blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"}, na
    for s in na:
        assert ("fused q/k/v" in s.reason if s.op.startswith("gemv") else "routing tables" in s.reason), s
        assert s.config is None
    assert f"{len(na)} not applicable" in describe_tuning(tuned)


def test_start_up_lookup_is_fast_and_imports_no_kernel(cache_dir, rng, tmp_path):
    """load_tuned in a fresh process, after what the engine has imported and resolved by then (the runtime, the GGUF
    reader, the compile target: ``gpu_usable`` / ``get_device``): <= 0.1 s with a cache of the model's entries
    (the metadata check hashes the kernel sources once), and neither cutlass nor a kernel module imported."""
    path = str(tmp_path / "q.gguf")
    write_synthetic(path, arch="qwen3moe", preset="tiny", seed=3)
    stored = write_tuned_cache(path, IDENT, _ctx(), cache_dir / "autotune.json", rng, max_context=MAX_CONTEXT,
                               prefill_tokens=PROMPT)
    code = (
        "import sys, time\n"
        "import sparkinfer_cute.gguf, sparkinfer_cute.runtime, sparkinfer_cute.kernels.arch as arch\n"
        "arch.compile_target(), arch.kernel_family(), arch.pdl_enabled()\n"
        "from sparkinfer_cute.autotune import load_tuned\n"
        "from sparkinfer_cute.autotune.cache import DeviceIdentity\n"
        f"ident = DeviceIdentity({IDENT.name!r}, {IDENT.sm_count}, {IDENT.capability!r}, {IDENT.driver_version})\n"
        "t0 = time.perf_counter()\n"
        "t = load_tuned(ident)\n"
        "dt = time.perf_counter() - t0\n"
        "kernels = sorted(m for m in sys.modules if m.startswith('sparkinfer_cute.kernels.') and m not in\n"
        "                 ('sparkinfer_cute.kernels.arch', 'sparkinfer_cute.kernels.compile'))\n"
        "print(dt, len(t), 'cutlass' in sys.modules, kernels)\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(tmp_path), env=_env(cache_dir)).stdout.split(maxsplit=3)
    assert time.perf_counter() - t0 < 30
    assert int(out[1]) == sum(len(v) for v in stored.values())
    assert out[2] == "False" and out[3].strip() == "[]", out
    assert float(out[0]) <= 0.1, f"load_tuned took {float(out[0]):.3f} s"


def _env(cache_dir):
    import os

    import sparkinfer_cute

    env = dict(os.environ, SPARKINFER_CACHE_DIR=str(cache_dir))
    root = os.path.dirname(os.path.dirname(sparkinfer_cute.__file__))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_a_gate_up_config_that_cannot_write_its_q8_copy_is_refused():
    """fused_moe_act_q8: the gate/up CTAs must tile the q8_1 blocks of 32 they quantize; a tuned rows_per_warp
    that makes CTAs of 64 rows is refused at the call site (the default applies) instead of failing the capture."""
    from sparkinfer_cute.models import ops

    assert ops._act_q8_blocks(768, {"rows_per_warp": 1}) is None
    assert ops._act_q8_blocks(768, {"rows_per_warp": 8}) is None
    assert "(64 rows per CTA)" in ops._act_q8_blocks(768, {"rows_per_warp": 16})


@pytest.mark.parametrize("arch,preset", [("qwen3moe", "tiny"), ("qwen3moe", "30b-a3b"), ("gemma3", "270m"),
                                         ("gemma4", "tiny"), ("gemma4", "26b-a4b")])
def test_tuner_and_engine_agree_on_the_attention_prologue(arch, preset, monkeypatch):
    """The autotuner tunes decode attention with the Q/K prologue inside exactly where the engine runs it
    (``qk_rot`` of autotune/shapes.py = of models/ops.py ``attention_config``'s lookup), for every layer kind; with
    the pass off, the engine looks up ``qk_rot`` 0 (attention alone)."""
    from sparkinfer_cute.autotune.ops.attention import prologue_rot
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.gguf.synth import synthetic_header
    from sparkinfer_cute.models import ops

    cfg = load_config(synthetic_header(arch, preset))
    looked_up = []
    monkeypatch.setattr(ops, "tuned", lambda op, shape, **kw: looked_up.append(shape) or None)
    for g in ops.attention_geometry(cfg):
        ops.attention_config(g, 4096, sm_count=132)
        assert looked_up[-1]["qk_rot"] == prologue_rot(g.n_head, g.n_head_kv, g.head_dim, g.n_rot) == g.n_rot > 0
    monkeypatch.setattr(ops, "DISABLED", ops.DISABLED | {"fused_qk_attention"})
    ops.attention_config(ops.attention_geometry(cfg)[0], 4096, sm_count=132)
    assert looked_up[-1]["qk_rot"] == 0


@pytest.mark.parametrize("name", ["qwen3moe", "qwen3moe-1024", "gemma4"])
def test_the_routed_launch_gets_what_the_separate_launches_get(dry, tmp_path, monkeypatch, name):
    """models/ops.py RouteFirst / ExpertsDown: with fused_route_gate_up and fused_experts_down on, a decode step hands
    the one routed launch (kernels/routed_experts.py) exactly the router, gate/up and down arguments that the
    separate launches get with both passes off (tails and tuned-config keywords included): the same wrapper calls in
    the same order with the same keywords. Also with only the down projection left separate."""
    from sparkinfer_cute.kernels import routed_experts
    from sparkinfer_cute.models import ops

    path = _write(str(tmp_path / f"{name}.gguf"), name)
    recorded, launches = routed_experts.routed_experts, []

    def counted(route, gate_up, chain, *, down=None, stream=None):
        launches.append(down is not None)
        recorded(route, gate_up, chain, down=down, stream=stream)

    monkeypatch.setattr(routed_experts, "routed_experts", counted)
    runs, phases = {}, {}
    for build, off in (("routed", frozenset()), ("down apart", frozenset({"fused_experts_down"})),
                       ("separate", frozenset({"fused_route_gate_up", "fused_experts_down"}))):
        monkeypatch.setattr(ops, "DISABLED", off)
        launches.clear()
        m, runs[build] = dry(path, None)
        phases[build] = list(launches)
    n_moe = sum(1 for l in range(m.cfg.n_layer) if not hasattr(m.cfg, "is_moe") or m.cfg.is_moe(l))
    assert phases == {"routed": [True] * n_moe, "down apart": [False] * n_moe, "separate": []}
    fns = [f for f, _, _ in runs["separate"]]
    assert "route_gemv" in fns and "moe_gate_up" in fns and "moe_down" in fns
    for build in ("routed", "down apart"):
        for got, want in zip(runs[build], runs["separate"]):
            assert got == want, (build, got, want)
        assert len(runs[build]) == len(runs["separate"])
