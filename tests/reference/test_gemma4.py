"""Gemma 4 reference forward (sparkinfer_cute/reference/gemma4.py) on the synthetic tiny file.

Against llama.cpp: fixtures/synth_gemma4_tiny_logprobs.npz (tests/reference/make_llama_fixtures.py --only
synth_gemma4; its docstring has the command and the llama.cpp build), teacher-forced over 128 positions (129..256)
that cross the 32-token window of the sliding layers many times over and go through the two full layers (hd 128,
K = V, partial rotary). The other tests check single mechanisms against float64 computations written here from
llama.cpp's graph (src/models/gemma4.cpp) on weights read straight from the file, and self-consistency
(decode == prefill, float32 ~ float64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.reference import Gemma4Reference, load_reference
from sparkinfer_cute.reference.metrics import centered_logprob_rel_rms, teacher_forced_compare

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sparkinfer_cute.gguf.synth import write_synthetic

    return write_synthetic(str(tmp_path_factory.mktemp("g4ref") / "gemma4-tiny.gguf"), "gemma4", "tiny", seed=0)


@pytest.fixture(scope="module")
def ref64(tiny):
    """One float64 reference for the module (its dequantized weights and experts are cached across tests)."""
    return load_reference(tiny, dtype=np.float64)


@pytest.fixture
def m64(ref64):
    ref64.reset()
    yield ref64
    ref64.reset()


def _rms_norm64(x, w=None, eps=1e-6):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * np.asarray(w, np.float64)


def _w(g: GGUFFile, name: str) -> np.ndarray:
    return np.asarray(g.dequant(name), np.float64)


# ------------------------------------------------------------------------------------------------ llama.cpp
def test_tiny_matches_llamacpp_teacher_forced(tiny):
    """Top-1 agreement and KL against llama-perplexity on the all-F32 copy of the same file (so llama.cpp does not
    round activations to Q8; its CPU GELU still reads an fp16 table, and its attention runs on fp16 K/V, as ours).

    Measured (2026-12-07, fixture from llama.cpp 0c1e570, CPU AVX2 build): float32 reference top-1 127/128 = 99.2 %
    (the miss, position 134, is a logit near-tie: our top two differ by 8.5e-4), mean KL 5.3e-6 (max 6.6e-4, at
    position 234), teacher-forced PPL 1110.63 vs llama.cpp's 1110.99; centered log-prob error median 1.2e-3, max
    2.0e-3 except position 234, where llama.cpp's layer 4 routes to our 5th-ranked expert (4th/5th router
    probabilities 1.9e-4 apart; with that expert swapped our error there is 1.5e-3). Layer by layer
    (tests/reference/llama_tensor_dump.cpp on the same batch): Q/K/V equal to 1.3e-7, attention output 1.3e-5, and
    the dense and expert GeGLU outputs equal llama.cpp's bit for bit once its fp16 GELU table
    (ops.gelu_tanh_fp16_table) is applied to its own inputs; the exact GELU differs by 3.2e-4 relative per layer,
    which is what the default exact reference keeps.

    Bounds: issue 14's acceptance (top-1 >= 99 %, mean KL <= 0.01), and a centered log-prob error <= 5e-3 at every
    position but at most two, each of which must have a router near-tie (4th/5th probability gap < 1e-3) in our
    forward. Ignoring the softcap (mean KL 3.0e-3, top-1 unchanged) or deriving V from the k_norm'ed K (KL 9.0e-4,
    top-1 91 %) passes the KL bound but not these; ignoring rope_freqs, the layer output scale, the per-expert down
    scale, the window, the V norm, the router input scale or its 1/sqrt(n_embd) gives KL 0.011 .. 0.13."""
    from sparkinfer_cute.reference import ops

    f = np.load(os.path.join(FIX, "synth_gemma4_tiny_logprobs.npz"))
    with open(tiny, "rb") as fh:
        got = hashlib.sha256(fh.read()).hexdigest()
    assert got == str(f["synth_sha256"]), (
        f"write_synthetic('gemma4', 'tiny', seed=0) output changed (sha256 {got}): rerun "
        "tests/reference/make_llama_fixtures.py --only synth_gemma4"
    )
    sm = f["scale_min"]
    llama_lp = sm[:, 1:2] + sm[:, 0:1] * f["codes"].astype(np.float32)
    tokens, positions = f["tokens"], f["positions"]
    assert len(positions) >= 128 and positions.min() > 4 * 32  # beyond the window, many times over
    assert np.all(llama_lp.max(-1) - llama_lp.min(-1) < 16)  # no log-prob clamped by llama.cpp's format
    cap: dict = {}
    logits = load_reference(tiny).forward(tokens[: positions.max() + 1], capture=cap)[positions]
    r = teacher_forced_compare(logits, llama_lp, tokens[positions + 1])
    assert r["top1_agreement"] >= 0.99, r
    assert r["mean_kl"] <= 0.01, r
    rel = centered_logprob_rel_rms(logits, llama_lp)
    gap = np.full(len(positions), np.inf)
    for l in range(6):
        p = np.sort(ops.softmax(cap[f"moe_logits.{l}"][positions].astype(np.float64)), axis=-1)[:, ::-1]
        gap = np.minimum(gap, p[:, 3] - p[:, 4])  # top-4 routing: the 4th and 5th experts
    off = rel > 5e-3
    assert off.sum() <= 2 and np.all(gap[off] < 1e-3), list(zip(positions[off], rel[off], gap[off]))


# ------------------------------------------------------------------------------------------------ mechanisms
def test_full_layer_k_eq_v_and_partial_rotary(tiny, m64):
    """Layer 2 is full (hd 128, 1 KV head, no attn_v): V = rmsnorm(raw K projection, no weight), unrotated; Q and K
    rotate only the first 16 of their 64 pairs (rope_freqs 1 then 1e30); layer 0 (sliding) rotates every pair."""
    g = GGUFFile(tiny)
    assert "blk.2.attn_v.weight" not in g.tensors and "blk.0.attn_v.weight" in g.tensors
    m = m64
    toks = np.random.default_rng(0).integers(0, 1024, 12)
    cap: dict = {}
    m.forward(toks, capture=cap)
    for l, hd, nkv, n_pairs in ((2, 128, 1, 16), (0, 64, 2, 32)):
        b = f"blk.{l}."
        h = _rms_norm64(cap[f"resid.{l - 1}"] if l else cap["embd"], _w(g, b + "attn_norm.weight"))
        kr = (h @ _w(g, b + "attn_k.weight").T).reshape(12, nkv, hd)
        vr = kr if l == 2 else (h @ _w(g, b + "attn_v.weight").T).reshape(12, nkv, hd)
        np.testing.assert_allclose(cap[f"v.{l}"], _rms_norm64(vr), rtol=1e-10, atol=1e-12)
        q0 = _rms_norm64((h @ _w(g, b + "attn_q.weight").T).reshape(12, 4, hd), _w(g, b + "attn_q_norm.weight"))
        k0 = _rms_norm64(kr, _w(g, b + "attn_k_norm.weight"))
        half = hd // 2
        rot = np.zeros(hd, bool)
        rot[:n_pairs] = rot[half : half + n_pairs] = True
        for got, pre in ((cap[f"q.{l}"], q0), (cap[f"k.{l}"], k0)):
            np.testing.assert_allclose(got[..., ~rot], pre[..., ~rot], rtol=1e-10, atol=1e-12)
            # rotation keeps each pair's norm and moves it (position 0 is the identity)
            norms = [np.hypot(a[..., :n_pairs], a[..., half : half + n_pairs]) for a in (got, pre)]
            np.testing.assert_allclose(norms[0], norms[1], rtol=1e-9)
            assert np.abs(got[1:, :, rot] - pre[1:, :, rot]).min(axis=-1).max() > 0
            np.testing.assert_allclose(got[0], pre[0], rtol=1e-10, atol=1e-12)


def test_router_by_hand(tiny, m64):
    """Router input rmsnorm(x1, no weight) / sqrt(n_embd) * ffn_gate_inp.scale, softmax over 16 experts, top-4 in
    descending order, renormalised."""
    g = GGUFFile(tiny)
    m = m64
    x1 = np.random.default_rng(1).standard_normal((9, 256)) * 3
    for l in (0, 2):
        sel, w, logits = m.route(x1, l)
        r = _rms_norm64(x1) / 16.0 * _w(g, f"blk.{l}.ffn_gate_inp.scale")
        lg = r @ _w(g, f"blk.{l}.ffn_gate_inp.weight").T
        np.testing.assert_allclose(logits, lg, rtol=1e-10, atol=1e-12)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        for i in range(9):
            order = np.argsort(-p[i])[:4]
            assert sel[i].tolist() == order.tolist()
            np.testing.assert_allclose(w[i], p[i, order] / p[i, order].sum(), rtol=1e-12)


def test_moe_block_by_hand(tiny, m64):
    """The routed-expert sum of one layer: Σ_j w_j * down_scale[e_j] * Wdown_e(gelu_tanh(Wgate_e x) * Wup_e x), with
    gate/up the two halves of ffn_gate_up_exps, on float64 weights dequantized here from the raw expert slices."""
    from gguf.quants import dequantize as gguf_dequantize

    g = GGUFFile(tiny)
    m = m64
    x1 = np.random.default_rng(2).standard_normal((5, 256))
    e_in = _rms_norm64(x1, _w(g, "blk.3.pre_ffw_norm_2.weight"))
    got = m.moe(e_in, x1, 3)
    sel, w, _ = m.route(x1, 3)
    gu, dn = g.tensors["blk.3.ffn_gate_up_exps.weight"], g.tensors["blk.3.ffn_down_exps.weight"]
    scale = _w(g, "blk.3.ffn_down_exps.scale")
    want = np.zeros_like(x1)
    for i in range(5):
        for j, e in enumerate(sel[i]):
            wgu = gguf_dequantize(np.asarray(g.raw(gu.name)[e]), gu.ggml_type).reshape(320, 256).astype(np.float64)
            wd = gguf_dequantize(np.asarray(g.raw(dn.name)[e]), dn.ggml_type).reshape(256, 160).astype(np.float64)
            gate, up = wgu[:160] @ e_in[i], wgu[160:] @ e_in[i]
            gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
            want[i] += w[i, j] * scale[e] * (wd @ (gelu * up))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_layer_output_scale_and_softcap(tiny, m64):
    """The residual leaves each layer multiplied by layer_output_scale; logits are c·tanh(z/c) of the tied head (the
    tiny preset has c = 2, so the cap bends its logits)."""
    g = GGUFFile(tiny)
    m = m64
    cap: dict = {}
    logits = m.forward([5, 9, 11], capture=cap)
    for l in range(6):
        prev = cap[f"resid.{l - 1}"] if l else cap["embd"]
        s = _w(g, f"blk.{l}.layer_output_scale.weight")[0]
        np.testing.assert_allclose(cap[f"resid.{l}"], (prev + cap[f"attn_out.{l}"] + cap[f"ffn_out.{l}"]) * s,
                                   rtol=1e-12, atol=1e-12)
    z = cap["output_norm"] @ _w(g, "token_embd.weight").T
    assert m.cfg.final_logit_softcap == 2.0 and np.abs(z).max() > 1.5  # the cap bends the largest logits by > 10 %
    # llama.cpp scales by the f32 constant 1.0f/2 (ggml_scale), then tanh, then by 2
    np.testing.assert_allclose(logits, 2 * np.tanh(z * np.float32(1 / 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cap["embd"], _w(g, "token_embd.weight")[[5, 9, 11]] * 16.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ consistency
def test_decode_equals_prefill(m64):
    """Token-by-token decoding through the per-layer KV cache (hd 64 and 128) gives the prefill's logits, across the
    window (40 tokens > 32)."""
    tokens = np.random.default_rng(3).integers(0, 1024, 40)
    m = m64
    full = m.forward(tokens)
    m.reset()
    part = [m.forward(tokens[:7])] + [m.forward([t]) for t in tokens[7:]]
    np.testing.assert_allclose(np.concatenate(part), full, rtol=1e-9, atol=1e-9)
    assert m.kv.k[0].shape[1:] == (2, 64) and m.kv.k[2].shape[1:] == (1, 128)


def test_sliding_window_changes_only_far_positions(m64):
    """Up to position 31 the 32-token window hides nothing: the logits equal those of the same model without a
    window; from position 32 on the sliding layers drop keys and the logits differ."""
    tokens = np.random.default_rng(4).integers(0, 1024, 44)
    m = m64
    base = m.forward(tokens)
    cfg = m.cfg
    m.cfg = dataclasses.replace(cfg, sliding_window=10**9)
    m.reset()
    try:
        nowin = m.forward(tokens)
    finally:
        m.cfg = cfg
    np.testing.assert_allclose(nowin[:32], base[:32], rtol=1e-10, atol=1e-10)
    assert np.abs(nowin[32:] - base[32:]).max(axis=-1).min() > 1e-6


def test_float32_close_to_float64(tiny, m64):
    tokens = np.random.default_rng(5).integers(0, 1024, 40)
    a = load_reference(tiny).forward(tokens)
    b = m64.forward(tokens)
    assert a.dtype == np.float32 and b.dtype == np.float64
    # float32 rounding through 6 layers; a routing near-tie could legitimately flip an expert (fixed draw)
    assert centered_logprob_rel_rms(a, b).max() < 1e-3


def test_emulate_cpu_falls_back_to_exact_with_a_warning(tiny):
    tokens = [3, 200, 17]
    with pytest.warns(RuntimeWarning, match="not implemented for gemma4"):
        m = load_reference(tiny, emulate_cpu=True)
    assert isinstance(m, Gemma4Reference) and not m.emulate_cpu
    np.testing.assert_array_equal(m.forward(tokens), load_reference(tiny).forward(tokens))


def test_refuses_what_it_does_not_implement(tiny):
    g = GGUFFile(tiny)
    m = load_reference(g)
    with pytest.raises(GGUFError, match="KV sharing"):
        Gemma4Reference(g, cfg=dataclasses.replace(m.cfg, shared_kv_layers=2))
    with pytest.raises(GGUFError, match="missing required tensor"):  # PLE tensors absent from the file
        Gemma4Reference(g, cfg=dataclasses.replace(m.cfg, n_embd_per_layer=8))


def test_run_cli_cpu_backend(tiny, capsys):
    """Issue 14 item 5: ``python -m sparkinfer_cute.run FILE --backend cpu -p hi -n 4`` runs on the tiny file."""
    from sparkinfer_cute import run

    assert run.main([tiny, "--backend", "cpu", "-p", "hi", "-n", "4", "--cpu-numerics", "exact"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hi") and "gemma4" in out.err
