"""The Gemma 3 270M reference forward against llama.cpp on the real Q4_K_M file (fixtures from
tests/reference/make_llama_fixtures.py; commands in its docstring).

Two llama.cpp references, both CPU, default flash attention, fp16 KV cache:

* ``f32``: llama.cpp on an all-F32 copy of the file (the same weights, dequantized). Its matmuls then see exact
  activations, as ours do, so this checks the model math. Measured (2026-11-25): top-1 agreement 100 % (143/143),
  mean KL 5.5e-7 nats on llama.cpp's top-32 support, perplexity 22.00981 vs 22.00946 (1.6e-5 relative), greedy
  continuation identical for all 16 tokens. Asserted: top-1 >= 99 %, mean KL <= 1e-4, perplexity within 0.1 %,
  greedy 16/16.
* ``q4_k_m``: llama.cpp on the file itself, which rounds activations to Q8_0/Q8_K before each quantized matmul.
  That rounding moves llama.cpp's per-token log-probs by ~0.08 nats on this small model: llama.cpp against
  itself with flash attention on vs off gives top-1 93.7 %, mean KL 0.0057, perplexity 22.004 vs 22.369 (1.7 %).
  Ours vs llama.cpp: top-1 97.9 % (the 3 disagreements are near-ties: llama.cpp's own top-2 margins 0.022,
  0.065, 0.130 nats), mean KL 0.0042, perplexity 0.025 %; greedy: 15/16 tokens, the 16th a 0.013-nat tie.
  Asserted: top-1 >= 97 % with every disagreement a near-tie (llama.cpp margin < 0.25 nats), mean KL <= 0.01,
  perplexity within 1 %, greedy identical up to the first near-tie.
* ``q4_k_m`` with ``emulate_cpu=True``: our reference following llama.cpp's CPU numerics op by op (activation
  Q8_0/Q8_K rounding, each matmul kernel's float order, flash attention's tiled / fp16-accumulator paths, the GELU
  table, libm cos/sin/exp). Checked against llama.cpp's per-op tensors (a cb_eval dump of the same 288-token
  prefill and of the greedy decode): the residual stream is bit-identical in every layer; only the LM head (kept in
  numpy's float order for speed) differs, by ~1e-5 in the logits. Measured (2026-11-25), the 288 tokens in one
  batch as llama-perplexity runs them: top-1 100 % (143/143), mean KL 1.3e-9 nats (max 3.2e-9), perplexity
  22.004367 vs 22.004314 (2.4e-6 relative); greedy 16/16. (Split into 144 + 143-row batches instead, 3 rows of
  the second batch go through llama.cpp's Q4_K gemv kernel rather than the gemm one; that alone gives mean KL 5e-5.)
  Asserted: top-1 >= 99 %, mean KL <= 1e-5, perplexity within 1e-4, greedy 16/16 (the issue asks top-1 >= 99 %,
  KL <= 0.01, greedy identical). The bit-exactness relies on glibc's cosf/sinf/expf/tanhf (called through ctypes);
  another libm may differ in the last bit of a few values, which the Q8 roundings then amplify (then expect
  top-1 ~96-97 %, as with plain float32 math).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparkinfer_cute.reference import load_reference
from sparkinfer_cute.reference.metrics import teacher_forced_compare
from sparkinfer_cute.reference.ops import log_softmax

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TAG = {"f32": "_f32", "q4_k_m": ""}


@pytest.fixture(scope="module")
def gemma3_ref(gemma3_path):
    return load_reference(gemma3_path)


@pytest.mark.parametrize("variant", ["f32", "q4_k_m"])
def test_teacher_forced_vs_llamacpp(gemma3_ref, variant):
    f = dict(np.load(os.path.join(FIX, f"gemma3_270m{TAG[variant]}_teacher_forced.npz")))
    tokens, first = f["tokens"], int(f["first"])
    assert len(tokens) - 1 - first >= 128
    m = gemma3_ref
    m.reset()
    m.forward(tokens[:first], all_logits=False)  # context; llama.cpp scores only the second half
    logits = m.forward(tokens[first:-1])
    r = teacher_forced_compare(logits, f, tokens[first + 1 :])
    summary = json.dumps(r)  # also checks it serialises
    print(variant, summary)
    assert r["n"] >= 128
    llama_ppl = float(f["llama_ppl"])
    if variant == "f32":
        assert r["top1_agreement"] >= 0.99, summary
        assert r["mean_kl"] <= 1e-4, summary
        assert r["ppl_rel_diff"] <= 1e-3 and abs(r["ppl_a"] - llama_ppl) / llama_ppl <= 1e-3, summary
    else:
        assert r["top1_agreement"] >= 0.97, summary
        margins = np.asarray(r["disagree_margins_b"])
        assert np.all(margins < 0.25), f"disagreement where llama.cpp is confident: margins {margins}"
        assert r["mean_kl"] <= 0.01, summary
        assert r["ppl_rel_diff"] <= 0.01 and abs(r["ppl_a"] - llama_ppl) / llama_ppl <= 0.01, summary


@pytest.mark.parametrize("variant", ["f32", "q4_k_m"])
def test_greedy_continuation_vs_llamacpp(gemma3_ref, variant):
    with open(os.path.join(FIX, f"gemma3_270m{TAG[variant]}_greedy.json")) as fh:
        g = json.load(fh)
    prompt, want = g["prompt_ids"], g["generated_ids"]
    assert len(want) == 16
    m = gemma3_ref
    # free-running greedy through the decode path (prefill the prompt, then one token at a time)
    m.reset()
    logits = m.forward(prompt, all_logits=False)
    gen = []
    for _ in range(len(want)):
        t = int(logits[-1].argmax())
        gen.append(t)
        logits = m.forward([t])
    if variant == "f32":
        assert gen == want
        return
    # q4_k_m: teacher-forced over llama.cpp's continuation, each of its tokens is our argmax or within 0.05 nats of
    # it (a near-tie that llama.cpp's activation rounding can flip); free-running agrees up to the first such tie.
    m.reset()
    lp = log_softmax(m.forward(prompt + want[:-1])[len(prompt) - 1 :])
    gap = lp.max(-1) - lp[np.arange(len(want)), want]
    assert np.all(gap < 0.05), gap
    ties = np.nonzero(gap > 0)[0]
    first_tie = int(ties[0]) if len(ties) else len(want)
    assert first_tie >= 12 and len(ties) <= 1, gap
    assert gen[:first_tie] == want[:first_tie], (gen, want)


def test_fixture_tokens_match_our_tokenizer(gemma3_path):
    """The fixtures hold llama.cpp's token ids (so the tests above do not depend on our tokenizer); this cross-checks
    that sparkinfer_cute.tokenizer gives the same ids for the same text and prompt."""
    tokenizer = pytest.importorskip("sparkinfer_cute.tokenizer")
    from sparkinfer_cute.gguf.reader import GGUFFile

    tk = tokenizer.Tokenizer.from_gguf(GGUFFile(gemma3_path))
    with open(os.path.join(FIX, "english_text.txt")) as fh:
        text = fh.read()
    want = np.load(os.path.join(FIX, "gemma3_270m_teacher_forced.npz"))["tokens"].tolist()
    assert list(tk.encode(text))[: len(want)] == want
    with open(os.path.join(FIX, "gemma3_270m_greedy.json")) as fh:
        g = json.load(fh)
    assert list(tk.encode(g["prompt"])) == g["prompt_ids"]


@pytest.fixture(scope="module")
def gemma3_emulated(gemma3_path):
    return load_reference(gemma3_path, emulate_cpu=True)


def test_teacher_forced_emulated_vs_llamacpp_q4_k_m(gemma3_emulated):
    """``emulate_cpu=True`` against llama.cpp on the Q4_K_M file. The whole 288-token chunk is one batch, as
    llama-perplexity decodes it: batch size picks llama.cpp's kernels (Q4_K gemm for rows in groups of 4, gemv for the
    rest; flash attention tiled from 64 rows; Q6_K tiled from 8 rows), so the same batching gives the same bits."""
    f = dict(np.load(os.path.join(FIX, "gemma3_270m_teacher_forced.npz")))
    tokens, first = f["tokens"], int(f["first"])
    m = gemma3_emulated
    m.reset()
    logits = m.forward(tokens)[first:-1]
    r = teacher_forced_compare(logits, f, tokens[first + 1 :])
    summary = json.dumps(r)
    print("q4_k_m emulated", summary)
    assert r["n"] >= 128
    assert r["top1_agreement"] >= 0.99, summary
    assert r["mean_kl"] <= 1e-5, summary
    llama_ppl = float(f["llama_ppl"])
    assert abs(r["ppl_a"] - llama_ppl) / llama_ppl <= 1e-4, summary


def test_greedy_emulated_vs_llamacpp_q4_k_m(gemma3_emulated):
    """Free-running greedy through the decode path (prompt prefill of 6 rows, then one token at a time, as
    llama-completion runs it) reproduces llama.cpp's 16 tokens."""
    with open(os.path.join(FIX, "gemma3_270m_greedy.json")) as fh:
        g = json.load(fh)
    prompt, want = g["prompt_ids"], g["generated_ids"]
    m = gemma3_emulated
    m.reset()
    logits = m.forward(prompt, all_logits=False)
    gen = []
    for _ in range(len(want)):
        t = int(logits[-1].argmax())
        gen.append(t)
        logits = m.forward([t])
    assert gen == want, (gen, want)
