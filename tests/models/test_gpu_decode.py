"""End-to-end GPU decode (the whole step captured in one CUDA graph) against the numpy reference forward.

Gates (``sparkinfer_cute.reference.metrics.E2E_GATES`` / ``e2e_gate``, calibration written there; tests/mutation/
shows on the CPU what they reject), on teacher-forced logits where every position is a decode step
(``SPARKINFER_PREFILL=loop``: the batched prefill runs int8 GEMMs, which would put a first position of other
numerics into an f32 build):

* f32 builds (``SPARKINFER_DP4A=none``; Gemma's default): against the exact f32 reference, median KL <= 1e-5,
  mean KL <= 3e-4, top-1 (near-ties < 0.05 nats forgiven) >= 0.99.
* the default int8-activation Qwen build: against the reference run with the *same* q8_1 activation rounding on
  exactly the matmuls the build runs on int8 (``models/int8_plan.py``, checked against the calls the build really
  makes), median KL <= max(3 x the float64 twin's median, 1e-4), mean KL <= 2e-3, top-1 >= 0.95; the loose
  comparison with the exact f32 reference (mean KL <= 0.01) only says the quantization is right-sized.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.gguf.synth import write_synthetic

pytestmark = pytest.mark.gpu


def _gpu(path, ctx=160):
    from sparkinfer_cute.engine import Engine

    return Engine(path, backend_name="gpu", max_context=ctx, progress=False)


def _teacher_forced(backend, tokens):
    """Logits after each of ``tokens[:-1]``, every position a decode-graph replay."""
    import os

    backend.reset()
    old = os.environ.get("SPARKINFER_PREFILL")
    os.environ["SPARKINFER_PREFILL"] = "loop"
    try:
        rows = [backend.prefill([tokens[0]])]
    finally:
        if old is None:
            os.environ.pop("SPARKINFER_PREFILL")
        else:
            os.environ["SPARKINFER_PREFILL"] = old
    for t in tokens[1:-1]:
        rows.append(backend.decode(t))
    return np.stack(rows)


def _judge(got, path, tokens, kind, act_q8_1=()):
    """(gate verdict, metrics): ``got`` against the reference of ``path`` (with ``act_q8_1``'s rounding), by
    ``e2e_gate(kind)``; the int8 gate measures its noise floor with the reference's float64 twin."""
    from sparkinfer_cute.reference import load_reference
    from sparkinfer_cute.reference.metrics import e2e_gate, teacher_forced_compare

    n = len(tokens) + 8
    ref = load_reference(path, max_context=n, act_q8_1=act_q8_1).forward(tokens[:-1], all_logits=True)
    m = teacher_forced_compare(got, ref, np.asarray(tokens[1:]))
    noise = None
    if kind == "int8":
        twin = load_reference(path, max_context=n, act_q8_1=act_q8_1, dtype=np.float64).forward(tokens[:-1])
        noise = teacher_forced_compare(twin, ref, np.asarray(tokens[1:]))
    v = e2e_gate(m, kind, noise)
    print(f"{kind} gate: {'PASS' if v['passed'] else 'FAIL'} worst ratio {v['ratio']:.3g}, median KL "
          f"{m['median_kl']:.3g} (limit {v['limits']['median_kl']:.3g}), mean KL {m['mean_kl']:.3g}, "
          f"top-1 {m['top1_agreement_tol']:.4f}")
    return v, m


def _compare(path, tokens, kind="f32"):
    eng = _gpu(path, ctx=len(tokens) + 8)
    got = _teacher_forced(eng.backend, tokens)
    assert np.isfinite(got).all()
    # top-1 counted with near-ties forgiven (reference margin < 0.05 nats): random synthetic models have nearly flat
    # next-token distributions, where f32 summation-order differences legitimately flip the argmax (seen once in 64
    # positions on the H100); KL is the strict measure.
    v, m = _judge(got, path, tokens, kind)
    assert v["passed"], (v, m)
    return eng, m


@pytest.fixture
def f32_activations(monkeypatch):
    """The GPU forward with exact f32 activations (SPARKINFER_DP4A=none): what the f32 gates measure. The default
    Qwen build quantizes activations to q8_1 for dp4a GEMVs, like llama.cpp; it has its own gate (int8)."""
    from sparkinfer_cute.models import ops

    monkeypatch.setattr(ops, "DP4A", "none")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_qwen3moe_synthetic_gpu_vs_reference(tmp_path, preset, f32_activations, rng):
    p = str(tmp_path / f"q_{preset}.gguf")
    write_synthetic(p, arch="qwen3moe", preset=preset, seed=5)
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = rng.integers(0, vocab, size=65).tolist()
    eng, m = _compare(p, tokens)
    from sparkinfer_cute.models.launch_plan import launch_plan

    b = eng.backend  # the live count = the launch plan's dry run = the driver's kernel nodes of the decode graph
    assert b.kernels_per_token == launch_plan(b.g, b.cfg).kernels_per_token == b._graph.kernel_nodes() > 0


@pytest.mark.parametrize("rope_scaling", [None, 8.0, 3.0])
def test_gemma3_tiny_synthetic_gpu_vs_reference(tmp_path, rng, rope_scaling):
    """rope_scaling: linear RoPE scaling of the global layer (Gemma 3 4B+: factor 8, theta / 8 exact in f32; 3: a
    factor whose reciprocal rounds, theta / 3 vs llama.cpp's theta * fl(1/3), one ulp of theta apart)."""
    p = str(tmp_path / "g_tiny.gguf")
    write_synthetic(p, arch="gemma3", preset="tiny", seed=6, overrides={"rope_scaling_factor": rope_scaling})
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = [2] + rng.integers(4, vocab, size=80).tolist()  # crosses the tiny preset's sliding window
    _compare(p, tokens)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_gemma4_synthetic_gpu_vs_reference(tmp_path, preset, f32_activations, rng):
    """Gemma 4 (sliding hd/KV heads vs full layers with K = V and rope_freqs, GeGLU experts + dense MLP, output and
    per-expert scales, softcap) with f32 activations: the strict gate; tokens cross the tiny preset's window."""
    p = str(tmp_path / f"g4_{preset}.gguf")
    write_synthetic(p, arch="gemma4", preset=preset, seed=7)
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = [2] + rng.integers(4, vocab, size=80).tolist()
    _compare(p, tokens)


def test_gemma4_tiny_default_build_kl(tmp_path, rng):
    """The default build (int8 activations for the attention projections and the experts) by the int8 gate: against
    the reference with the same q8_1 rounding on the matmuls the dry run plans (as the Qwen int8 test)."""
    from sparkinfer_cute.models.int8_plan import int8_activation_tensors

    p = str(tmp_path / "g4_tiny.gguf")
    write_synthetic(p, arch="gemma4", preset="tiny", seed=8)
    planned = int8_activation_tensors(p, path="decode")
    assert planned, "the default Gemma 4 build runs int8 activations"
    # 128 positions: at 64 the int8 gate passed an ignored rope_freqs (tests/mutation: ratio 0.9), at 128 it rejects
    # it (3 - 9.5 over three seeds) while the float64 twin passes (<= 0.63)
    eng = _gpu(p, ctx=137)
    tokens = [2] + rng.integers(4, eng.cfg.vocab_size, size=128).tolist()
    got = _teacher_forced(eng.backend, tokens)
    assert np.isfinite(got).all()
    v, m = _judge(got, p, tokens, "int8", act_q8_1=planned)
    assert v["passed"], (v, m)


def test_gemma3_real_gpu_vs_reference(gemma3_path):
    from sparkinfer_cute.accuracy import default_text
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.tokenizer import Tokenizer

    tokens = Tokenizer.from_gguf(GGUFFile(gemma3_path)).encode(default_text())[:129]
    _, m = _compare(gemma3_path, tokens)
    assert m["top1_agreement_tol"] >= 0.995, m  # a real model's distributions are peaked: few near-ties
    assert m["ppl_rel_diff"] == m["ppl_rel_diff"]  # finite


def test_graph_replay_equals_eager_steps(tmp_path):
    """The captured graph computes exactly what the same kernels launched eagerly compute."""
    p = str(tmp_path / "q.gguf")
    write_synthetic(p, arch="qwen3moe", preset="tiny", seed=7)
    eng = _gpu(p, ctx=32)
    b = eng.backend
    toks = [3, 99, 7, 512, 42]
    b.reset()
    graph_logits = [b.decode(t) for t in toks]
    b.reset()
    eager = []
    for t in toks:
        b.step_eager(t)
        eager.append(b.logits.to_numpy(b.stream))
    np.testing.assert_array_equal(np.stack(graph_logits), np.stack(eager))


def test_greedy_gpu_equals_cpu_on_gemma3(gemma3_path):
    from sparkinfer_cute.engine import Engine

    g = _gpu(gemma3_path, ctx=64)
    # the GPU path is gated against exact float32 math, so compare with the CPU backend's exact numerics
    c = Engine(gemma3_path, backend_name="cpu", max_context=64, progress=False, cpu_numerics="exact")
    prompt = "The capital of France is"
    ids_g, text_g = g.complete(prompt, 16)
    ids_c, text_c = c.complete(prompt, 16)
    assert ids_g == ids_c, (text_g, text_c)


def test_model_too_large_is_a_clear_error(tmp_path, monkeypatch):
    from sparkinfer_cute.errors import DeviceOutOfMemoryError
    from sparkinfer_cute.runtime import weights

    p = str(tmp_path / "q.gguf")
    write_synthetic(p, arch="qwen3moe", preset="tiny", seed=8)
    monkeypatch.setattr(weights.WeightStore, "HEADROOM", 1 << 50)  # pretend the GPU is far too small
    with pytest.raises(DeviceOutOfMemoryError, match="nothing was uploaded"):
        _gpu(p)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_qwen3moe_int8_activations_vs_same_rounding_reference(tmp_path, preset, rng):
    """Default Qwen build (q8_1 activations + dp4a GEMVs) by the int8 gate: against the reference with the same
    q8_1 rounding on the same matmuls. The set of matmuls comes from the dry run of the forward
    (``int8_activation_tensors``) and must equal the one the build uses in its warm-up step. Loosely also against
    the exact f32 reference (H100, 2026-11-25, small preset: top-1 96.1%, mean KL 0.00038)."""
    from sparkinfer_cute.models.int8_plan import int8_activation_tensors, recording
    from sparkinfer_cute.reference import load_reference
    from sparkinfer_cute.reference.metrics import teacher_forced_compare

    p = str(tmp_path / f"q_{preset}.gguf")
    write_synthetic(p, arch="qwen3moe", preset=preset, seed=5)
    planned = int8_activation_tensors(p, path="decode")
    assert planned, "the default Qwen build runs int8 activations"
    seen: set = set()
    with recording(seen):
        eng = _gpu(p, ctx=73)
        eng.backend.reset()
        eng.backend.decode(3)  # the first step runs every op eagerly (warm-up), then captures the graph
    assert seen == planned, (sorted(seen ^ planned)[:8], "dry run and live build disagree")
    tokens = rng.integers(0, eng.cfg.vocab_size, size=65).tolist()
    got = _teacher_forced(eng.backend, tokens)
    assert np.isfinite(got).all()
    v, m = _judge(got, p, tokens, "int8", act_q8_1=planned)
    assert v["passed"], (v, m)
    exact = load_reference(p, max_context=73).forward(tokens[:-1])
    loose = teacher_forced_compare(got, exact, np.asarray(tokens[1:]))
    assert loose["mean_kl"] <= 0.01 and loose["top1_agreement_tol"] >= 0.85, loose


def test_hidden_after_layers_matches_reference(tmp_path, f32_activations, rng):
    """The truncated-step check used on models too big for a whole CPU reference (accuracy --hidden-layers)."""
    from sparkinfer_cute.reference import load_reference

    p = str(tmp_path / "q.gguf")
    write_synthetic(p, arch="qwen3moe", preset="tiny", seed=9)
    eng = _gpu(p, ctx=16)
    toks = rng.integers(0, eng.cfg.vocab_size, size=6).tolist()
    for L in (1, 2):
        got = eng.backend.hidden_after_layers(toks, L)
        ref = load_reference(p, max_context=16)
        ref.n_layer = L
        cap: dict = {}
        ref.forward(toks, capture=cap)
        want = cap[f"resid.{L - 1}"]
        rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        assert rel.max() < 1e-3, (L, rel)


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_declared_launches_are_the_graph_kernels(tmp_path, arch):
    """The kernels per token the decode graph really holds (driver-counted kernel nodes) = the live launch counter =
    the launch plan's dry run (models/launch_plan.py): all from one declaration per op (``@ops.launches``), checked
    here against the driver, which no declaration can fake."""
    from sparkinfer_cute.models.launch_plan import launch_plan

    p = str(tmp_path / f"{arch}.gguf")
    write_synthetic(p, arch=arch, preset="tiny", seed=3)
    m = _gpu(p).backend
    m.warm_up()
    plan = launch_plan(m.g, m.cfg, depth=0, sm_count=m.device.sm_count)
    assert m.kernels_per_token == plan.kernels_per_token == m._graph.kernel_nodes()


def test_declared_prefill_launches_are_the_graph_kernels(tmp_path):
    """Same for a batched prefill chunk of the qwen3moe tiny model (moe_rows declares 7 launches)."""
    p = str(tmp_path / "q.gguf")
    write_synthetic(p, arch="qwen3moe", preset="tiny", seed=3)
    m = _gpu(p).backend
    if not m.batched_prefill():
        pytest.skip("SPARKINFER_PREFILL=loop: no batched prefill graph")
    m.prefill(list(range(5)))
    assert m.kernels_per_prefill_chunk == m._pf_graphs[5].kernel_nodes()


# (arch, tiny-preset overrides, activations): n_embd 1024 puts q/k/v and the experts' gate/up on the chunk kernels,
# so the fused q/k/v launch (GemvMulti) runs with tuned rows per warp
TUNED_BUILDS = {"qwen3moe-1024-f32": ("qwen3moe", {"n_embd": 1024}, "f32"),
                "qwen3moe-1024-int8": ("qwen3moe", {"n_embd": 1024}, "int8"),
                "gemma3-tiny-f32": ("gemma3", None, "f32")}


@pytest.mark.parametrize("build", list(TUNED_BUILDS))
def test_decode_with_tuned_configs_vs_reference(tmp_path, monkeypatch, rng, build):
    """The engine with an autotune cache holding, for every op and shape the model decodes with, a valid config
    other than the default (drawn with the rng; see tests/models/tuned_cache.py): the configs are applied at start-up
    (tuned call sites > 0) and the decode passes the same gate as the default build (f32: the exact reference;
    int8: the reference with the same q8_1 rounding)."""
    from tuned_cache import applicable_everywhere, write_tuned_cache

    from sparkinfer_cute.autotune import cache as tune_cache
    from sparkinfer_cute.autotune import describe_sites, describe_tuning
    from sparkinfer_cute.autotune.lookup import REFUSED, TUNED
    from sparkinfer_cute.autotune.registry import TuneContext
    from sparkinfer_cute.models import ops
    from sparkinfer_cute.models.int8_plan import int8_activation_tensors
    from sparkinfer_cute.runtime import get_device

    arch, overrides, kind = TUNED_BUILDS[build]
    p = str(tmp_path / f"{build}.gguf")
    write_synthetic(p, arch=arch, preset="tiny", seed=5, overrides=overrides)
    if kind == "f32":
        monkeypatch.setattr(ops, "DP4A", "none")
    # the tuned file in tmp; the kernel disk cache stays where it is (the default configs' kernels load from it)
    monkeypatch.setattr(tune_cache, "cache_path", lambda: tmp_path / "autotune.json")
    monkeypatch.delenv("SPARKINFER_AUTOTUNE", raising=False)
    # (Gemma: BOS first, as the Gemma tests above; 65 positions cross the tiny preset's 32-token window)
    tokens = ([2] if arch == "gemma3" else []) + rng.integers(4, 1024, size=65).tolist()
    ctx = len(tokens) + 8
    dev = get_device()
    stored = write_tuned_cache(p, tune_cache.DeviceIdentity.of(dev), TuneContext.for_device(dev),
                               tmp_path / "autotune.json", rng, max_context=ctx, prefill_tokens=0,
                               prefer=applicable_everywhere)
    eng = _gpu(p, ctx=ctx)
    tuned = eng.backend.tuned
    print(describe_tuning(tuned))
    print("\n".join(describe_sites(tuned)))
    assert tuned.enabled and len(tuned) == sum(len(v) for v in stored.values())
    assert tuned.count(TUNED) > 0 and tuned.count(REFUSED) == 0, describe_tuning(tuned)
    got = _teacher_forced(eng.backend, tokens)
    assert np.isfinite(got).all()
    planned = int8_activation_tensors(p, path="decode") if kind == "int8" else ()
    v, m = _judge(got, p, tokens, kind, act_q8_1=planned)
    assert v["passed"], (v, m)
