"""End-to-end GPU decode (the whole step captured in one CUDA graph) against the numpy reference forward."""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.gguf.synth import write_synthetic

pytestmark = pytest.mark.gpu


def _gpu(path, ctx=160):
    from sparkinfer_cute.engine import Engine

    return Engine(path, backend_name="gpu", max_context=ctx, progress=False)


def _teacher_forced(backend, tokens):
    backend.reset()
    rows = [backend.prefill([tokens[0]])]
    for t in tokens[1:-1]:
        rows.append(backend.decode(t))
    return np.stack(rows)


def _compare(path, tokens, min_top1, max_kl):
    from sparkinfer_cute.reference import load_reference
    from sparkinfer_cute.reference.metrics import teacher_forced_compare

    eng = _gpu(path, ctx=len(tokens) + 8)
    got = _teacher_forced(eng.backend, tokens)
    assert np.isfinite(got).all()
    ref = load_reference(path, max_context=len(tokens) + 8).forward(tokens[:-1], all_logits=True)
    m = teacher_forced_compare(got, ref, np.asarray(tokens[1:]))
    # top-1 counted with near-ties forgiven (reference margin < 0.05 nats): random synthetic models have nearly flat
    # next-token distributions, where f32 summation-order differences legitimately flip the argmax (seen once in 64
    # positions on the H100); KL below is the strict measure.
    assert m["top1_agreement_tol"] >= min_top1, m
    assert m["mean_kl"] <= max_kl, m
    return eng, m


@pytest.fixture
def f32_activations(monkeypatch):
    """The GPU forward with exact f32 activations (SPARKINFER_DP4A=none): what the strict gates below measure. The
    default Qwen build quantizes activations to q8_1 for dp4a GEMVs, like llama.cpp; it has its own, looser test."""
    from sparkinfer_cute.models import ops

    monkeypatch.setattr(ops, "DP4A", "none")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_qwen3moe_synthetic_gpu_vs_reference(tmp_path, preset, f32_activations):
    p = str(tmp_path / f"q_{preset}.gguf")
    write_synthetic(p, arch="qwen3moe", preset=preset, seed=5)
    rng = np.random.default_rng()
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = rng.integers(0, vocab, size=65).tolist()
    eng, m = _compare(p, tokens, 0.99, 0.01)
    assert eng.backend.kernels_per_token > 0


def test_gemma3_tiny_synthetic_gpu_vs_reference(tmp_path):
    p = str(tmp_path / "g_tiny.gguf")
    write_synthetic(p, arch="gemma3", preset="tiny", seed=6)
    rng = np.random.default_rng()
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = [2] + rng.integers(4, vocab, size=80).tolist()  # crosses the tiny preset's sliding window
    _compare(p, tokens, 0.99, 0.01)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_gemma4_synthetic_gpu_vs_reference(tmp_path, preset, f32_activations):
    """Gemma 4 (sliding hd/KV heads vs full layers with K = V and rope_freqs, GeGLU experts + dense MLP, output and
    per-expert scales, softcap) with f32 activations: the strict gate; tokens cross the tiny preset's window."""
    p = str(tmp_path / f"g4_{preset}.gguf")
    write_synthetic(p, arch="gemma4", preset=preset, seed=7)
    rng = np.random.default_rng()
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = [2] + rng.integers(4, vocab, size=80).tolist()
    _compare(p, tokens, 0.99, 0.01)


def test_gemma4_tiny_default_build_kl(tmp_path):
    """The default build (int8 activations for the attention projections and the experts): the KL gate."""
    p = str(tmp_path / "g4_tiny.gguf")
    write_synthetic(p, arch="gemma4", preset="tiny", seed=8)
    rng = np.random.default_rng()
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = [2] + rng.integers(4, vocab, size=64).tolist()
    _compare(p, tokens, 0.9, 0.005)


def test_gemma3_real_gpu_vs_reference(gemma3_path):
    from sparkinfer_cute.accuracy import default_text
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.tokenizer import Tokenizer

    tokens = Tokenizer.from_gguf(GGUFFile(gemma3_path)).encode(default_text())[:129]
    _, m = _compare(gemma3_path, tokens, 0.995, 0.005)
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


def test_qwen3moe_int8_activations_close_to_reference(tmp_path):
    """Default Qwen build (q8_1 activations + dp4a GEMVs) vs the exact f32 reference. Synthetic random models have
    nearly flat next-token distributions, so top-1 flips on near-ties; KL is the meaningful measure (H100,
    2026-11-25, small preset: top-1 96.1%, mean KL 0.00038; real Gemma 3 270M with SPARKINFER_DP4A=all: top-1 99.2%,
    KL 0.00038)."""
    p = str(tmp_path / "q_small.gguf")
    write_synthetic(p, arch="qwen3moe", preset="small", seed=5)
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    vocab = load_config(GGUFFile(p)).vocab_size
    tokens = np.random.default_rng().integers(0, vocab, size=65).tolist()
    _compare(p, tokens, 0.85, 0.01)


def test_hidden_after_layers_matches_reference(tmp_path, f32_activations):
    """The truncated-step check used on models too big for a whole CPU reference (accuracy --hidden-layers)."""
    from sparkinfer_cute.reference import load_reference

    p = str(tmp_path / "q.gguf")
    write_synthetic(p, arch="qwen3moe", preset="tiny", seed=9)
    eng = _gpu(p, ctx=16)
    toks = np.random.default_rng().integers(0, eng.cfg.vocab_size, size=6).tolist()
    for L in (1, 2):
        got = eng.backend.hidden_after_layers(toks, L)
        ref = load_reference(p, max_context=16)
        ref.n_layer = L
        cap: dict = {}
        ref.forward(toks, capture=cap)
        want = cap[f"resid.{L - 1}"]
        rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        assert rel.max() < 1e-3, (L, rel)
