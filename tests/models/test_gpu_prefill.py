"""Batched prefill (models' ``enqueue_prefill``: grouped GEMM with int8 activations, batched attention/KV append)
against the numpy reference and against the decode-loop prefill.

Gates: all-position teacher-forced logits (128 positions) by the int8 end-to-end gate
(``reference.metrics.e2e_gate``): against the CPU reference run with the same roundings (``models/int8_plan.py``
``rounding_plan``, path ``prefill_all_logits``: q8_1 activations on every GEMM, the LM head included, and the flash
attention kernel's f16 q and P), median KL <= max(3 x the float64 twin's median, 1e-4), mean KL <= 2e-3, top-1
(near-ties < 0.05 nats forgiven) >= 0.95; loosely also against the exact f32 reference (mean KL <= 0.005, top-1
within 4 of 128 positions of the same-rounding reference's own: the roundings are right-sized); the last-position
logits of a batched prefill vs the decode-loop prefill of the same prompt (KL <= 0.005, and the same greedy token
unless the loop's top two are within 0.05 nats); chunking (a prompt of several chunks, the later ones attending to
the cached prefix) equals one chunk within the same KL; replaying a captured chunk graph gives the eager result.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.gguf.synth import write_synthetic

pytestmark = pytest.mark.gpu


def _kl(p_logits, q_logits):
    def logsm(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(p_logits), logsm(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def _same_greedy(ref_logits, logits, tie_nats: float = 0.05) -> bool:
    """The greedy choice agrees with the reference's, unless the reference's top two are within ``tie_nats``
    (a near-tie that int8 activation rounding may flip)."""
    top2 = np.sort(np.asarray(ref_logits, np.float64))[-2:]
    return int(np.argmax(logits)) == int(np.argmax(ref_logits)) or top2[1] - top2[0] < tie_nats


def _model(tmp_path, arch, preset, seed, overrides=None):
    from sparkinfer_cute.engine import Engine

    p = str(tmp_path / f"{arch}_{preset}.gguf")
    write_synthetic(p, arch=arch, preset=preset, seed=seed, overrides=overrides)
    eng = Engine(p, backend_name="gpu", max_context=320, progress=False)
    return p, eng


def _tokens(eng, n, rng):
    return [2] + rng.integers(4, eng.cfg.vocab_size, size=n - 1).tolist()


@pytest.mark.parametrize("arch,preset", [("qwen3moe", "tiny"), ("qwen3moe", "small"), ("gemma3", "tiny"),
                                         ("gemma3", "tiny-rope-scaled"), ("gemma4", "tiny")])
def test_prefill_all_positions_vs_reference(tmp_path, arch, preset, rng):
    """``tiny-rope-scaled``: the tiny preset with Gemma 3 4B+'s linear RoPE scaling (factor 8) on its global layer."""
    from sparkinfer_cute.models.int8_plan import rounding_plan
    from sparkinfer_cute.reference import load_reference
    from sparkinfer_cute.reference.metrics import e2e_gate, teacher_forced_compare

    scaled = preset == "tiny-rope-scaled"
    p, eng = _model(tmp_path, arch, "tiny" if scaled else preset, 11,
                    overrides={"rope_scaling_factor": 8.0} if scaled else None)
    # crosses the tiny sliding windows; 128 positions: at 64 an ignored Gemma 4 rope_freqs passed the int8 gate
    # (tests/mutation)
    tokens = _tokens(eng, 129, rng)
    b = eng.backend
    b.reset()
    got = b.prefill_all_logits(tokens[:-1])
    assert got.shape == (128, eng.cfg.vocab_size) and np.isfinite(got).all()
    tg = np.asarray(tokens[1:])
    plan = rounding_plan(p, path="prefill_all_logits")  # the int8 GEMMs and the flash attention's f16 q and P
    ref = load_reference(p, max_context=160, **plan).forward(tokens[:-1], all_logits=True)
    twin = load_reference(p, max_context=160, dtype=np.float64, **plan).forward(tokens[:-1])
    m = teacher_forced_compare(got, ref, tg)
    v = e2e_gate(m, "int8", teacher_forced_compare(twin, ref, tg))
    assert v["passed"], (v, m)
    # loosely against the exact reference: the build's roundings cost what they cost the reference (its own top-1
    # flips of near-ties, plus at most 4 of the 128 positions for the tight gate's residue)
    exact_logits = load_reference(p, max_context=160).forward(tokens[:-1])
    exact = teacher_forced_compare(got, exact_logits, tg)
    rounding = teacher_forced_compare(ref, exact_logits, tg)
    assert exact["mean_kl"] <= 0.005, exact
    assert exact["top1_agreement_tol"] >= rounding["top1_agreement_tol"] - 4 / 128, (exact, rounding)


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_batched_vs_loop_prefill_and_chunks(tmp_path, arch, monkeypatch, rng):
    _, eng = _model(tmp_path, arch, "tiny", 12)
    b = eng.backend
    tokens = _tokens(eng, 150, rng)
    b.reset()
    batched = b.prefill(tokens)
    next_batched = int(b.tok.to_numpy()[0])
    b.reset()
    monkeypatch.setenv("SPARKINFER_PREFILL", "loop")
    loop = b.prefill(tokens)
    monkeypatch.delenv("SPARKINFER_PREFILL")
    assert _kl(loop, batched) <= 0.005
    assert _same_greedy(loop, batched)  # the first generated token is the loop prefill's
    assert int(np.argmax(batched)) == next_batched  # the chunk's argmax landed in the decode graph's token slot
    # several chunks (the later ones attend to the cached prefix) == one chunk
    monkeypatch.setattr(type(b), "PREFILL_CHUNK", 48)
    b._pf = None
    b.reset()
    chunked = b.prefill(tokens)
    assert _kl(batched, chunked) <= 0.005
    # replaying the captured graph of a chunk length gives the same logits as its first (eager + capture) run
    b.reset()
    again = b.prefill(tokens)
    np.testing.assert_array_equal(chunked, again)
    # decode continues from the batched prefill's cache: one step vs the loop-prefilled cache
    step_batched = b.decode(next_batched)
    b.reset()
    monkeypatch.setenv("SPARKINFER_PREFILL", "loop")
    b.prefill(tokens)
    step_loop = b.decode(next_batched)
    assert _kl(step_loop, step_batched) <= 0.005
    assert _same_greedy(step_loop, step_batched)
