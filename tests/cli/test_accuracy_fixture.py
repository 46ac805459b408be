"""``accuracy --reference FIXTURE.npz`` scores the fixture's rows at the fixture's positions.

A llama-perplexity fixture scores only the second half of its chunk: row j is the distribution after token
``first + j`` (tests/reference/fixtures/gemma3_270m_teacher_forced.npz: 288 tokens, first = 144, 143 rows). The
harness must teacher-force the fixture's own tokens and compare row j with its logits at position first + j; a
fixture whose ``first`` is off by one (its rows then describe other positions) must fail the gate.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparkinfer_cute.accuracy import load_fixture, main as accuracy_main
from sparkinfer_cute.gguf.synth import write_synthetic
from sparkinfer_cute.reference import load_reference
from sparkinfer_cute.reference.metrics import topk_record

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "reference", "fixtures")


def _run(tmp_path, name, argv) -> dict:
    out = tmp_path / f"{name}.json"
    rc = accuracy_main([*argv, "--json", str(out)])
    m = json.loads(out.read_text())
    m["rc"] = rc
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, module_rng):
    p = tmp_path_factory.mktemp("acc") / "tiny_gemma3.gguf"
    write_synthetic(str(p), arch="gemma3", preset="tiny", seed=int(module_rng.integers(1 << 16)))
    return str(p)


def test_fixture_first_position_synthetic(tiny, tmp_path, rng):
    """A fixture recorded from the exact CPU reference on fresh random tokens, scoring from a random ``first``:
    aligned, the CPU backend (exact numerics) agrees at every position; with ``first`` off by one it fails."""
    n_tok, first = 48, int(rng.integers(8, 24))
    ref = load_reference(tiny, max_context=n_tok + 1)
    tokens = rng.integers(0, ref.vocab_size, size=n_tok).tolist()
    tokens[0] = 2  # BOS of the synthetic Gemma vocabulary
    logits = ref.forward(tokens[:-1], all_logits=True)[first:]
    rec = topk_record(logits, np.asarray(tokens[first + 1 :]))
    aligned, shifted = tmp_path / "aligned.npz", tmp_path / "shifted.npz"
    np.savez(aligned, tokens=np.asarray(tokens), first=np.int32(first), **rec)
    np.savez(shifted, tokens=np.asarray(tokens), first=np.int32(first - 1), **{k: v[1:] for k, v in rec.items()})
    assert load_fixture(str(aligned))["first"] == first

    gates = ["--min-top1", "0.99", "--max-kl", "0.001"]
    m = _run(tmp_path, "aligned", [tiny, "--backend", "cpu", "--reference", str(aligned), *gates])
    assert m["rc"] == 0 and m["first"] == first and m["positions"] == n_tok - 1 - first
    assert m["top1_agreement"] == 1.0 and m["mean_kl"] < 1e-6
    m = _run(tmp_path, "shifted", [tiny, "--backend", "cpu", "--reference", str(shifted), *gates])
    assert m["rc"] == 1 and m["first"] == first - 1
    assert m["top1_agreement"] < 0.9 and m["mean_kl"] > 0.01


def test_llama_perplexity_fixture_is_aligned(gemma3_path, tmp_path):
    """The committed llama-perplexity fixture (first = 144) against our exact CPU backend on the real Gemma 3 270M:
    aligned it passes the gate (llama.cpp's own CPU numerics differ from exact float32 only at near-ties). The same
    comparison with the fixture's rows one position off (what ignoring ``first`` amounts to, in miniature) fails
    it: checked on this run's saved record, without a second model load (the CLI path of a shifted fixture is
    test_fixture_first_position_synthetic's)."""
    from sparkinfer_cute.reference.metrics import teacher_forced_compare

    fx_path = os.path.join(FIXTURES, "gemma3_270m_teacher_forced.npz")
    fx = load_fixture(fx_path)
    assert fx["first"] == 144
    n = 24
    ours = tmp_path / "ours.npz"
    m = _run(tmp_path, "aligned", [gemma3_path, "--backend", "cpu", "--reference", fx_path, "-n", str(n),
                                   "--min-top1", "0.9", "--max-kl", "0.05", "--save-topk", str(ours)])
    assert m["rc"] == 0 and m["positions"] == n and m["first"] == 144, m
    rec = load_fixture(str(ours))
    assert rec["first"] == 144 and list(rec["tokens"]) == list(fx["tokens"][: 144 + n + 1])
    # our top-32 record against the fixture's rows shifted by one position
    la = np.full((n - 1, 262144), -100.0, np.float32)  # off-record tokens: negligible probability
    np.put_along_axis(la, rec["topk_ids"][1:].astype(np.int64), rec["topk_logprobs"][1:], axis=-1)
    shifted = {k: fx[k][: n - 1] for k in ("topk_ids", "topk_logprobs", "target_logprob")}
    bad = teacher_forced_compare(la, shifted, fx["tokens"][145 + 1 : 145 + n])
    assert bad["top1_agreement"] < 0.5 and bad["mean_kl"] > 0.05, bad
