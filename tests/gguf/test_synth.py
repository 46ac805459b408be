"""Synthetic GGUF writer: files open and validate, types follow llama.cpp's Q4_K_M rules, weights are well
scaled, output is deterministic, the 30b-a3b plan has the real model's size.

Independent references used: the type lists and sizes quoted in shared/spec/models.md (derived from
llama-quant.cpp and checked against real files), the real Gemma 3 270M Q4_K_M file (when installed), gguf-py's
dequantizers, and the HF ``tokenizers`` BPE.

llama.cpp checks run by hand on this machine (CPU build, /work/llama/llama.cpp/build/bin, 2 threads),
2026-11-25, seed 0 files from ``python -m sparkinfer_cute.gguf.synth --arch A --preset P -o F``, all loaded
and ran:
  llama-bench -m F -p 16 -n 4 -r 1 (pp16 and tg4 rows printed):
    qwen3moe/tiny            8.58 MiB  14.70 M params
    qwen3moe/tiny-fallback  22.57 MiB  31.49 M params
    gemma3/tiny              7.92 MiB  12.01 M params
    qwen3moe/30b-a3b --max-layers 1 (real shapes)  795.26 MiB  1.25 B params
  llama-perplexity -f <short English text, 16 chunks> -c 64: PPL 2405 ± 110 (qwen3moe/tiny), 2280 ± 95
    (tiny-fallback), 2342 ± 54 (gemma3/tiny): finite and near V·e^(1/2), as for random unit-std logits.
  llama-completion -p "The quick brown fox" -n 32 --temp 0: varied greedy continuations, e.g.
    qwen3moe/tiny: "An� gmey nxcmunuj ww oywlbm`ghak wwtyu tr Ts� gm wsts nz ga- hbtkbm lr rr"
    gemma3/tiny:   "'mp wkgupgbt ht i i hi wsiweo paYcnjn nb nb nbsh nbsh uu td tdfcw tqdyok"
2026-12-07, llama.cpp 0c1e570 CPU build (AVX2, the same directory, 2 threads), gemma4 seed 0 files:
  llama-bench -p 16 -n 4 (-p 8 -n 2 for 26b-a4b) loads and runs gemma4/tiny (9.28 MiB, 14.95 M), gemma4/small
    (335.96 MiB, 537.26 M) and the whole gemma4/26b-a4b file ("gemma4 26B.A4B Q4_K - Medium", 15.63 GiB,
    25.23 B params; written in 2 min 35 s on this 2-core box, max RSS 341 MB).
  llama-perplexity on english_text.txt: PPL 1146 (tiny, -c 64), 4313 (small, -c 128), 292931 (26b-a4b, -c 32,
    2 chunks): near the vocabulary size (1024 / 4096 / 262144), finite.
  llama-completion -p "The quick brown fox" -n 32 --temp 0 on gemma4/tiny: "xut-x do�dr gi do�Z\btsur oh he
    ds do do sr gi Fdsii il" then newlines and "ftftftft" (its tiny vocabulary's EOG tokens end it early).
  Files without a full layer must not hold rope_freqs ("wrong number of tensors"), and a 1-layer file aborts
    (GGML_ASSERT n_layer_kv_from_start >= 2): both checked, both mirrored by the writer and the config.
test_llama_cpp_loads_and_scores repeats the bench/perplexity checks when a llama.cpp build is present.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from sparkinfer_cute.gguf import GGUFFile, synth
from sparkinfer_cute.gguf.synth import PRESETS, plan_summary, plan_synthetic, use_more_bits, write_synthetic

TINY = [("qwen3moe", "tiny"), ("qwen3moe", "tiny-fallback"), ("gemma3", "tiny")]
K_QUANTS = {Q.Q4_K, Q.Q5_K, Q.Q6_K}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return {(a, p): write_synthetic(d / f"{a}-{p}.gguf", a, p, seed=1234) for a, p in TINY}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------------------------------- type
# rules
def test_use_more_bits_matches_spec_lists():
    # models.md §1 (n = 48) and §4 (n = 18)
    n48 = set(range(6)) | set(range(8, 42, 3)) | set(range(42, 48))
    assert {i for i in range(48) if use_more_bits(i, 48)} == n48
    assert {i for i in range(18) if use_more_bits(i, 18)} == {0, 1, 4, 7, 10, 13, 15, 16, 17}


def test_plan_30b_a3b_matches_real_model():
    plan = plan_synthetic("qwen3moe", "30b-a3b")
    s = plan_summary(plan)
    assert len(plan) == 3 + 12 * 48
    assert 30.52e9 < s["n_params"] < 30.54e9  # Qwen3-30B-A3B: 30.53 B
    assert 17.26 < s["n_bytes"] / 2**30 < 17.29  # Q4_K_M file: 17.28 GiB
    assert {k: v[0] for k, v in s["types"].items()} == {"F32": 241, "Q4_K": 289, "Q6_K": 49}
    types = {t.name: t.ggml_type for t in plan}
    shapes = {t.name: t.shape for t in plan}
    more = set(range(6)) | set(range(8, 42, 3)) | set(range(42, 48))
    for i in range(48):
        want = Q.Q6_K if i in more else Q.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == want
        assert types[f"blk.{i}.ffn_down_exps.weight"] == want
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps"):
            assert types[f"blk.{i}.{n}.weight"] == Q.Q4_K
        for n in ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm", "ffn_gate_inp"):
            assert types[f"blk.{i}.{n}.weight"] == Q.F32
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert shapes["blk.7.ffn_down_exps.weight"] == (768, 2048, 128)
    assert shapes["blk.7.ffn_gate_inp.weight"] == (2048, 128)
    assert shapes["blk.7.attn_q.weight"] == (2048, 4096) and shapes["blk.7.attn_k.weight"] == (2048, 512)
    assert shapes["output.weight"] == (2048, 151936)


def test_plan_gemma3_270m_type_histogram():
    # models.md "Checked against the real Gemma 3 270M Q4_K_M file": F32 109, Q5_0 81, Q4_K 27, Q8_0 10, Q6_K
    # 9
    s = plan_summary(plan_synthetic("gemma3", "270m"))
    assert {k: v[0] for k, v in s["types"].items()} == {
        "F32": 109,
        "Q5_0": 81,
        "Q4_K": 27,
        "Q8_0": 10,
        "Q6_K": 9,
    }


def test_plan_gemma3_270m_equals_real_file(gemma3_path):
    g = GGUFFile(gemma3_path)
    real = {n: (t.ggml_type, tuple(t.shape)) for n, t in g.tensors.items()}
    plan = {t.name: (t.ggml_type, t.shape) for t in plan_synthetic("gemma3", "270m")}
    assert plan == real


@pytest.mark.parametrize("arch,preset", list(PRESETS))
def test_plan_rules_hold_for_every_preset(arch, preset):
    cfg = synth.synthetic_config(arch, preset)
    L = cfg["n_layer"]
    plan = plan_synthetic(arch, preset)
    # llama-quant.cpp counts attn_v tensors in file order (i_attention_wv, n_attention_wv); ffn_down by layer
    attn_v = [t.name for t in plan if t.name.endswith("attn_v.weight")]
    for name, t, shape in plan:
        ne0 = shape[0]
        if len(shape) == 1 or "ffn_gate_inp" in name:
            assert t == Q.F32, name
            continue
        assert t in {Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0}, (name, t)
        if t in K_QUANTS:
            assert ne0 % 256 == 0, name
        else:  # 32-block types appear only as fallbacks of rows that K-quants cannot hold
            assert ne0 % 256 != 0, name
        output_like = name == "output.weight" or (arch != "qwen3moe" and name == "token_embd.weight")  # tied
        if output_like:
            assert t == (Q.Q6_K if ne0 % 256 == 0 else Q.Q8_0), name
        elif "attn_v" in name or "ffn_down" in name:
            if "attn_v" in name:
                more = use_more_bits(attn_v.index(name), len(attn_v))
            else:
                more = use_more_bits(int(name.split(".")[1]), L)
            hi, lo = (Q.Q6_K, Q.Q4_K) if ne0 % 256 == 0 else (Q.Q8_0, Q.Q5_0)
            assert t == (hi if more else lo), name
        else:
            assert t == (Q.Q4_K if ne0 % 256 == 0 else Q.Q5_0), name


def test_fallback_variant_exercises_fallbacks_and_tiny_does_not():
    tiny = {t.ggml_type for t in plan_synthetic("qwen3moe", "tiny")}
    fb = {t.ggml_type for t in plan_synthetic("qwen3moe", "tiny-fallback")}
    assert tiny == {Q.F32, Q.Q4_K, Q.Q6_K}
    assert {Q.Q5_0, Q.Q8_0, Q.Q4_K} <= fb
    # the same via overrides: n_embd 384 pushes token_embd/attn_q to Q5_0 and output to Q8_0
    p = {t.name: t.ggml_type for t in plan_synthetic("qwen3moe", "tiny", overrides={"n_embd": 384})}
    assert (
        p["token_embd.weight"] == Q.Q5_0
        and p["output.weight"] == Q.Q8_0
        and p["blk.0.attn_q.weight"] == Q.Q5_0
    )
    assert p["blk.0.attn_output.weight"] == Q.Q4_K  # ne0 = 8*64 = 512


def test_eight_expert_rules_and_q5_1_refusal():
    # llama-quant.cpp: n_expert == 8 bumps attn_v / attn_k to Q8_0 and attn_output to Q5_K
    p = {
        t.name: t.ggml_type
        for t in plan_synthetic("qwen3moe", "tiny", overrides={"n_expert": 8, "n_expert_used": 2})
    }
    assert p["blk.0.attn_v.weight"] == Q.Q8_0 and p["blk.0.attn_k.weight"] == Q.Q8_0
    assert p["blk.0.attn_output.weight"] == Q.Q5_K
    with pytest.raises(ValueError, match="Q5_1"):  # attn_output ne0 = 6*64 = 384: Q5_K -> Q5_1
        plan_synthetic(
            "qwen3moe", "tiny", overrides={"n_expert": 8, "n_expert_used": 2, "n_head": 6, "n_head_kv": 2}
        )


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        plan_synthetic("qwen3moe", "nope")
    with pytest.raises(ValueError, match="unknown override"):
        plan_synthetic("qwen3moe", "tiny", overrides={"n_embed": 1})
    with pytest.raises(ValueError, match="ftype"):
        plan_synthetic("qwen3moe", "tiny", ftype="Q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        plan_synthetic("qwen3moe", "tiny", overrides={"n_embd": 200})


# --------------------------------------------------------------------------------------------------- written
# files
@pytest.mark.parametrize("arch,preset", TINY)
def test_tiny_file_opens_and_validates(tiny_files, arch, preset):
    from sparkinfer_cute.gguf.config import load_config, validate_tensors

    g = GGUFFile(tiny_files[(arch, preset)])
    cfg = load_config(g)
    validate_tensors(g, cfg)
    want = PRESETS[(arch, preset)]
    assert g.architecture == arch
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim) == (
        want["n_embd"],
        want["n_layer"],
        want["n_head"],
        want["n_head_kv"],
        want["head_dim"],
    )
    assert cfg.vocab_size == want["n_vocab"] == len(g.metadata["tokenizer.ggml.tokens"])
    assert cfg.context_length == want["n_ctx"]
    assert g.metadata["general.file_type"] == 15 and g.metadata["general.quantization_version"] == 2
    if arch == "qwen3moe":
        assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == (
            want["n_expert"],
            want["n_expert_used"],
            want["n_ff_exp"],
        )
        assert not cfg.tied_output
    else:
        assert cfg.tied_output and cfg.sliding_window == want["sliding_window"] and cfg.n_ff == want["n_ff"]
        assert [cfg.is_swa(i) for i in range(6)] == [True] * 5 + [False]
    # the file holds exactly the plan, in order
    plan = plan_synthetic(arch, preset)
    assert [(n, t.ggml_type, tuple(t.shape)) for n, t in g.tensors.items()] == [tuple(p) for p in plan]


@pytest.mark.parametrize("arch,preset", TINY)
def test_tiny_file_weight_scales(tiny_files, arch, preset):
    g = GGUFFile(tiny_files[(arch, preset)])
    n_embd = PRESETS[(arch, preset)]["n_embd"]
    for name, ti in g.tensors.items():
        w = gguf_dequantize(np.asarray(g.raw(name)), ti.ggml_type).astype(
            np.float64
        )  # independent dequantizer
        assert np.isfinite(w).all(), name
        rms = math.sqrt(np.mean(w * w))
        if len(ti.shape) == 1:  # norms: gain * U(0.9, 1.1)
            gain = (
                next((v for k, v in synth.GEMMA3_POST_NORM_GAIN.items() if k in name), 1.0)
                if arch == "gemma3"
                else 1.0
            )
            assert 0.9 * gain - 1e-6 <= w.min() and w.max() <= 1.1 * gain + 1e-6, name
            assert w.std() > 0.02 * gain, name
            continue
        if name.endswith("ffn_gate_inp.weight"):
            target = 1 / math.sqrt(n_embd)
        elif name == "token_embd.weight":
            target = 1.0 if arch == "qwen3moe" else synth.GEMMA3_EMBD_RMS_SQRT_N / math.sqrt(n_embd)
        else:
            target = 1 / math.sqrt(ti.shape[0])
        assert abs(rms / target - 1) < 0.05, (name, ti.ggml_type.name, rms, target)
        assert abs(w.mean()) < 0.03 * rms, name
        rows = w.reshape(-1, ti.shape[0])
        row_rms = np.sqrt(np.mean(rows * rows, axis=1))
        # one block per row at n_in 256: spread of d jitter x sub-block scales, measured 0.53..1.61 x target
        assert row_rms.min() > 0.35 * target and row_rms.max() < 2.0 * target, (
            name
        )  # no dead or exploding rows
    # the package's own dequantizer agrees on one tensor of each type
    seen = set()
    for name, ti in g.tensors.items():
        if ti.ggml_type in seen:
            continue
        seen.add(ti.ggml_type)
        ref = gguf_dequantize(np.asarray(g.raw(name)), ti.ggml_type).reshape(ti.np_shape)
        np.testing.assert_array_equal(g.dequant(name), ref)


def test_router_logits_are_not_degenerate(tiny_files, rng):
    g = GGUFFile(tiny_files[("qwen3moe", "tiny")])
    wr = g.dequant("blk.0.ffn_gate_inp.weight").astype(np.float64)  # (n_expert, n_embd)
    h = rng.standard_normal((256, wr.shape[1]))  # RMS-1 inputs, as after ffn_norm
    r = h @ wr.T
    p = np.exp(r - r.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    k = PRESETS[("qwen3moe", "tiny")]["n_expert_used"]
    top = np.sort(p, axis=1)[:, ::-1][:, :k]
    assert 0.5 < r.std() < 2.0
    assert np.median(top[:, 0] / top.sum(1)) < 0.8  # the best expert does not take all the weight
    assert len(np.unique(np.argmax(r, axis=1))) > wr.shape[0] // 2  # routing spreads over experts


@pytest.mark.parametrize("arch,preset", TINY)
def test_k_quant_fields_are_valid(tiny_files, arch, preset):
    g = GGUFFile(tiny_files[(arch, preset)])
    for name, ti in g.tensors.items():
        raw = np.asarray(g.raw(name)).reshape(-1, ti.type_size)
        if ti.ggml_type == Q.Q4_K:
            d = raw[:, 0:4].copy().view(np.float16).astype(np.float32)
            assert (d > 0).all() and np.isfinite(d).all(), name
        elif ti.ggml_type == Q.Q6_K:
            d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
            s = raw[:, 192:208].view(np.int8)
            assert (d > 0).all() and (s != 0).all() and (s < 0).any() and (s > 0).any(), name
        elif ti.ggml_type == Q.Q8_0:
            qs = raw[:, 2:34].view(np.int8)
            assert qs.min() >= -127, name  # llama.cpp's quantizer never emits -128


def test_determinism_per_seed_and_thread_count(tmp_path):
    a = write_synthetic(tmp_path / "a.gguf", "gemma3", "tiny", seed=7, n_threads=1)
    b = write_synthetic(tmp_path / "b.gguf", "gemma3", "tiny", seed=7, n_threads=3)
    c = write_synthetic(tmp_path / "c.gguf", "gemma3", "tiny", seed=8)
    assert _sha(a) == _sha(b)
    ga, gc = GGUFFile(a), GGUFFile(c)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight"):
        assert not np.array_equal(ga.raw(name), gc.raw(name)), name


def test_tensor_data_does_not_depend_on_overrides_of_other_tensors(tmp_path):
    # chunk seeds are keyed by tensor name: changing the vocab leaves the layer weights unchanged
    a = GGUFFile(write_synthetic(tmp_path / "a.gguf", "qwen3moe", "tiny", seed=3))
    b = GGUFFile(
        write_synthetic(tmp_path / "b.gguf", "qwen3moe", "tiny", seed=3, overrides={"n_vocab": 1024})
    )
    np.testing.assert_array_equal(a.raw("blk.1.ffn_up_exps.weight"), b.raw("blk.1.ffn_up_exps.weight"))


def test_multi_chunk_tensor(tmp_path, monkeypatch):
    # force several chunks per tensor (ragged last chunk) and check sizes/offsets and that chunks differ
    monkeypatch.setattr(synth, "CHUNK_BYTES", 144 * 7 + 5)
    p = write_synthetic(tmp_path / "m.gguf", "qwen3moe", "tiny", seed=0, n_threads=2)
    g = GGUFFile(p)
    raw = np.asarray(g.raw("blk.0.ffn_gate_exps.weight")).reshape(-1, 144)
    assert not np.array_equal(raw[:7], raw[7:14])
    w = g.dequant("blk.0.ffn_gate_exps.weight")
    assert abs(math.sqrt(np.mean(w.astype(np.float64) ** 2)) * 16 - 1) < 0.05


def test_max_layers_truncation(tmp_path):
    g = GGUFFile(write_synthetic(tmp_path / "t.gguf", "qwen3moe", "small", max_layers=2))
    assert g.metadata["qwen3moe.block_count"] == 2
    assert not any(n.startswith("blk.2.") for n in g.tensors)
    # types keep the full-depth rules: layer 0 of 8 uses more bits, layer 1 does not
    assert g.tensors["blk.0.attn_v.weight"].ggml_type == Q.Q6_K
    assert g.tensors["blk.1.attn_v.weight"].ggml_type == Q.Q4_K


# ---------------------------------------------------------------------------------------------------
# tokenizers
def test_qwen_vocab_is_a_consistent_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, types, merges, special = synth.qwen_vocab(1536)
    assert len(tokens) == 1536 == len(set(tokens)) == len(types)
    assert len(merges) >= 1
    vocab = {t: i for i, t in enumerate(tokens)}
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    assert [tokens[special[s]] for s in synth.QWEN_SPECIALS] == list(synth.QWEN_SPECIALS)
    assert all(types[special[s]] == 3 for s in synth.QWEN_SPECIALS)
    # the HF BPE built from the vocab produces multi-character tokens and round-trips text
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "the rain in Spain stays mainly in the plain, 42 ünïcödé!"
    ids = tok.encode(text).ids
    assert len(ids) < 0.75 * len(text.encode())
    assert max(len(tokens[i]) for i in ids) >= 3
    assert tok.decode(ids) == text


def test_qwen_vocab_real_size_has_real_special_ids():
    tokens, types, _, special = synth.qwen_vocab(151936)
    assert len(tokens) == 151936 == len(set(tokens))
    # Qwen3: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645 (models.md §6); rows past them
    # UNUSED
    assert special == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    assert set(types[151646:]) == {5}


def test_gemma_vocab_layout(tiny_files):
    g = GGUFFile(tiny_files[("gemma3", "tiny")])
    md = g.metadata
    tokens, scores, types = (
        md["tokenizer.ggml.tokens"],
        md["tokenizer.ggml.scores"],
        md["tokenizer.ggml.token_type"],
    )
    assert md["tokenizer.ggml.model"] == "llama"
    assert (
        len(tokens) == len(set(tokens)) == len(scores) == len(types) == PRESETS[("gemma3", "tiny")]["n_vocab"]
    )
    assert tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_space_prefix"] is False
    assert [t for t, ty in zip(tokens, types) if ty == 6] == [f"<0x{b:02X}>" for b in range(256)]
    normal = [i for i, ty in enumerate(types) if ty == 1]
    assert "▁" in tokens and any(tokens[i].startswith("▁") and len(tokens[i]) > 1 for i in normal)
    assert all(scores[a] > scores[b] for a, b in itertools.pairwise(normal))  # distinct, decreasing scores


def test_qwen_metadata(tiny_files):
    md = GGUFFile(tiny_files[("qwen3moe", "tiny")]).metadata
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    toks = md["tokenizer.ggml.tokens"]
    assert toks[md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert toks[md["tokenizer.ggml.bos_token_id"]] == "<|endoftext|>"
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert md["qwen3moe.expert_count"] == 16 and md["qwen3moe.expert_used_count"] == 4


# ---------------------------------------------------------------------------------------------- llama.cpp
# loads
# Opt-in (LLAMA_CPP_BIN=<dir of a llama.cpp build>): CI has no llama.cpp, and an auto-detected local build made this
# check depend on whatever binary happened to be on the machine (it flaked twice in ~25 runs while that build was
# being rebuilt). The load checks recorded in the module docstring were run with it set.
LLAMA_BIN = os.environ.get("LLAMA_CPP_BIN", "")
_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model made of random numbers reads text, splits "
    "it into tokens and predicts the next one; the results mean nothing, but the shapes are right and the "
    "numbers finite. "
) * 4


def _llama(tool: str, *args: str) -> str:
    import subprocess

    env = dict(os.environ, LD_LIBRARY_PATH=LLAMA_BIN)
    r = subprocess.run(
        [os.path.join(LLAMA_BIN, tool), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.skipif(
    not LLAMA_BIN or not os.path.exists(os.path.join(LLAMA_BIN, "llama-perplexity")),
    reason="set LLAMA_CPP_BIN to a llama.cpp build directory to run the llama.cpp load check",
)
@pytest.mark.parametrize("arch,preset", [*TINY, ("gemma4", "tiny")])
def test_llama_cpp_loads_and_scores(tiny_files, gemma4_tiny, arch, preset, tmp_path):
    import re

    path = gemma4_tiny if arch == "gemma4" else tiny_files[(arch, preset)]
    out = _llama("llama-bench", "-m", path, "-p", "8", "-n", "2", "-r", "1", "-t", "2")
    assert re.search(r"\btg2\b", out), out[-2000:]
    (tmp_path / "t.txt").write_text(_TEXT)
    out = _llama(
        "llama-perplexity",
        "-m",
        path,
        "-f",
        str(tmp_path / "t.txt"),
        "-c",
        "64",
        "-t",
        "2",
    )
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    assert m, out[-3000:]
    ppl = float(m.group(1))
    # random logits with std ~1 over V tokens: PPL near V*exp(1/2) (uniform would be V)
    n_vocab = PRESETS[(arch, preset)]["n_vocab"]
    assert math.isfinite(ppl) and 0.3 * n_vocab < ppl < 5 * n_vocab, ppl


# ---------------------------------------------------------------------------------------------------------
# gemma4
@pytest.fixture(scope="module")
def gemma4_tiny(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("g4") / "gemma4-tiny.gguf", "gemma4", "tiny", seed=1234)


def test_plan_gemma4_26b_a4b_by_hand():
    """The 26B-A4B plan against shapes and types derived here from models.md §3 and llama-quant.cpp's Q4_K_M
    rules: attn_v Q6_K iff use_more_bits(rank among the 25 attn_v tensors, 25); ffn_down / ffn_down_exps (ne0
    2112 / 704, not multiples of 256) Q8_0 iff use_more_bits(layer, 30), else Q5_0; tied token_embd Q6_K
    (2816 % 256 == 0); every other matrix Q4_K; vectors and the router F32."""
    plan = plan_synthetic("gemma4", "26b-a4b")
    types = {t.name: t.ggml_type for t in plan}
    shapes = {t.name: t.shape for t in plan}
    full = [5, 11, 17, 23, 29]
    E, V, H, NE = 2816, 262144, 16, 128
    n = E * V + 256 + E  # token_embd, rope_freqs, output_norm
    v_rank = 0
    for i in range(30):
        b = f"blk.{i}."
        d, kv = (512, 2) if i in full else (256, 8)
        n += (
            E * (H * d) * 2 + E * kv * d + 2 * d + 2 * E + 1
        )  # q, o, k, q/k norms, attn_norm, post-attn, out scale
        n += 3 * E * 2112 + 2 * E  # dense MLP and its two norms
        n += (
            E * NE + E + 3 * E + NE * (E * 2 * 704 + 704 * E) + NE
        )  # router, scale, 3 norms, experts, down scale
        assert shapes[b + "attn_q.weight"] == (E, H * d) and shapes[b + "attn_k.weight"] == (E, kv * d)
        assert shapes[b + "attn_output.weight"] == (H * d, E) and shapes[b + "attn_q_norm.weight"] == (d,)
        assert shapes[b + "ffn_gate_up_exps.weight"] == (E, 1408, NE)
        assert shapes[b + "ffn_down_exps.weight"] == (704, E, NE) and shapes[b + "ffn_down.weight"] == (
            2112,
            E,
        )
        if i in full:
            assert b + "attn_v.weight" not in types
        else:
            n += E * kv * d
            assert shapes[b + "attn_v.weight"] == (E, kv * d)
            assert types[b + "attn_v.weight"] == (Q.Q6_K if use_more_bits(v_rank, 25) else Q.Q4_K), i
            v_rank += 1
        want_down = Q.Q8_0 if use_more_bits(i, 30) else Q.Q5_0
        assert types[b + "ffn_down.weight"] == types[b + "ffn_down_exps.weight"] == want_down, i
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_gate_up_exps"):
            assert types[b + t + ".weight"] == Q.Q4_K, (i, t)
        for t in (
            "ffn_gate_inp.weight",
            "ffn_gate_inp.scale",
            "ffn_down_exps.scale",
            "layer_output_scale.weight",
        ):
            assert types[b + t] == Q.F32
    assert v_rank == 25
    # the same rule written out: attn_v ranks 0-2, 5, 8, 11, 14, 17, 20-24 are the sliding layers below
    q6_v = [i for i in range(30) if types.get(f"blk.{i}.attn_v.weight") == Q.Q6_K]
    assert q6_v == [0, 1, 2, 6, 9, 13, 16, 20, 24, 25, 26, 27, 28]
    assert types["token_embd.weight"] == Q.Q6_K and "output.weight" not in types
    assert shapes["rope_freqs.weight"] == (256,)
    s = plan_summary(plan)
    assert s["n_params"] == n and 25.2e9 < n < 25.3e9  # "26B-A4B": 25.2 B parameters
    assert 15.5 < s["n_bytes"] / 2**30 < 15.7


def test_gemma4_tiny_file(gemma4_tiny):
    """The tiny file validates against the config's inventory (exactly the file's tensors) and echoes the
    preset; the deterministic and scaled tensors hold what synth.py's docstrings say."""
    from sparkinfer_cute.gguf.config import Gemma4Config, load_config, validate_tensors

    g = GGUFFile(gemma4_tiny)
    c = load_config(g)
    want = PRESETS[("gemma4", "tiny")]
    assert isinstance(c, Gemma4Config)
    assert set(validate_tensors(g, c)) == set(g.tensors)
    assert [t.name for t in plan_synthetic("gemma4", "tiny")] == list(g.tensors)
    swa = [i % 3 < 2 for i in range(6)]
    assert list(c.swa_layers) == swa and c.sliding_window == want["sliding_window"]
    for i, sw in enumerate(swa):
        assert c.head_dim_for(i) == (64 if sw else 128) and c.n_head_kv_for(i) == (2 if sw else 1)
        assert c.n_rot_for(i) == c.head_dim_for(i) and c.rope_base_for(i) == (1e4 if sw else 1e6)
        assert c.k_eq_v(i) == (not sw) and c.is_moe(i) and c.has_out_scale(i) and c.has_down_exps_scale(i)
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.n_ff[0]) == (16, 4, 160, 320)
    assert c.tied_output and c.final_logit_softcap == 2.0 and c.vocab_size == 1024
    assert g.metadata["general.file_type"] == 15
    rf = g.dequant("rope_freqs.weight")
    assert (
        rf.shape == (64,) and np.all(rf[:16] == 1.0) and np.all(rf[16:] == np.float32(1e30))
    )  # 0.25 of 64 pairs
    for i in range(6):
        s = float(g.dequant(f"blk.{i}.layer_output_scale.weight")[0])
        assert 0.7 <= s <= 1.3
        ds = g.dequant(f"blk.{i}.ffn_down_exps.scale")
        assert ds.shape == (16,) and 0.5 <= ds.min() and ds.max() <= 1.5 and ds.max() - ds.min() > 0.3
        d = c.head_dim_for(i)
        gain = (synth.GEMMA4_SCORE_STD / math.sqrt(d)) ** 0.5
        for nrm in ("attn_q_norm", "attn_k_norm"):
            w = g.dequant(f"blk.{i}.{nrm}.weight")
            assert 0.9 * gain - 1e-6 <= w.min() and w.max() <= 1.1 * gain + 1e-6
    emb = gguf_dequantize(np.asarray(g.raw("token_embd.weight")), Q.Q6_K).astype(np.float64)
    assert abs(math.sqrt(np.mean(emb**2)) * math.sqrt(256) / synth.GEMMA4_EMBD_RMS_SQRT_N - 1) < 0.05
    wr = g.dequant("blk.0.ffn_gate_inp.weight").astype(np.float64)
    assert abs(wr.std() - synth.ROUTER_LOGIT_STD) < 0.05


def test_gemma4_vocab_is_a_consistent_bpe(gemma4_tiny):
    """Every merge joins two tokens into a third; llama.cpp's special ids; our tokenizer (validated against
    llama-tokenize on gemma4 vocabularies in tests/tokenizer) encodes text into multi-character tokens and
    back."""
    from sparkinfer_cute.tokenizer import Tokenizer

    g = GGUFFile(gemma4_tiny)
    md = g.metadata
    toks, types, merges = (
        md["tokenizer.ggml.tokens"],
        md["tokenizer.ggml.token_type"],
        md["tokenizer.ggml.merges"],
    )
    assert len(toks) == len(set(toks)) == len(types) == 1024
    vocab = set(toks)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    assert (md["tokenizer.ggml.model"], toks[2], toks[1], toks[105], toks[106]) == (
        "gemma4",
        "<bos>",
        "<eos>",
        "<|turn>",
        "<turn|>",
    )
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert [t for t, ty in zip(toks, types) if ty == 6] == [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer.from_gguf(g)
    text = "the rain in Spain stays mainly in the plain"
    ids = tok.encode(text)
    assert ids[0] == 2 and len(ids) < 0.7 * len(text)
    assert max(len(toks[i]) for i in ids) >= 3
    assert tok.decode(ids[1:]) == text
    text = "line\n\nünïcödé 42!"  # a newline-run token, byte fallback for characters outside the vocabulary
    ids = tok.encode(text, add_bos=False)
    assert toks.index("\n\n") in ids and tok.decode(ids) == text
    assert {1, 106} <= set(tok.eog_ids)
    big = synth.gemma4_vocab(262144)
    assert len(big[0]) == len(set(big[0])) == 262144 and big[3]["<|turn>"] == 105


def test_gemma4_deterministic_and_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK_BYTES", 4099)  # several chunks in most tensors, ragged last chunks
    a = write_synthetic(tmp_path / "a.gguf", "gemma4", "tiny", seed=3, n_threads=1)
    b = write_synthetic(tmp_path / "b.gguf", "gemma4", "tiny", seed=3, n_threads=3)
    assert _sha(a) == _sha(b)
    rf = GGUFFile(a).dequant("rope_freqs.weight")  # the deterministic tensor survives chunking
    assert np.all(rf[:16] == 1.0) and np.all(rf[16:] > 1e29)


def test_gemma4_rope_freqs_only_with_a_full_layer(tmp_path):
    """llama.cpp creates rope_freqs at the first full layer: a file without one must not hold it (its loader
    then refuses the file: "wrong number of tensors"), whether the preset or --max-layers removes the full
    layers."""
    from sparkinfer_cute.gguf.config import load_config, validate_tensors

    assert "rope_freqs.weight" not in {
        t.name for t in plan_synthetic("gemma4", "tiny", overrides={"n_layer": 2})
    }
    g = GGUFFile(write_synthetic(tmp_path / "s.gguf", "gemma4", "tiny", max_layers=2))
    assert "rope_freqs.weight" not in g.tensors and g.metadata["gemma4.block_count"] == 2
    c = load_config(g)
    assert not c.has_rope_freqs and set(validate_tensors(g, c)) == set(g.tensors)


def test_gemma4_max_layers_slice(tmp_path):
    """A 7-block slice of 26b-a4b keeps the real shapes and full-depth type rules (metadata arrays sliced)."""
    plan = {t.name: t for t in plan_synthetic("gemma4", "26b-a4b")}
    c = synth.synthetic_config("gemma4", "26b-a4b")
    c["n_layer"] = 7
    c["n_vocab"] = (
        1024  # the metadata arrays checked here do not depend on it (the real vocabulary takes seconds)
    )
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma4")
    synth._add_metadata(w, "gemma4", "26b-a4b", c, "Q4_K_M", 0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    md = GGUFFile(tmp_path / "m.gguf").metadata
    assert md["gemma4.block_count"] == 7
    assert md["gemma4.attention.sliding_window_pattern"] == [True] * 5 + [False, True]
    assert md["gemma4.attention.head_count_kv"] == [8] * 5 + [2, 8]
    assert plan["blk.5.attn_k.weight"].shape == (2816, 1024)


# ---------------------------------------------------------------------------------------------------------
# CLI
def test_cli_dry_run_and_write(tmp_path, capsys):
    assert synth.main(["--arch", "qwen3moe", "--preset", "30b-a3b", "--dry-run"]) == 0
    err = capsys.readouterr().err
    import re

    params, gib = map(float, re.search(r"([\d.]+) B params, ([\d.]+) GiB", err).groups())
    assert abs(params - 30.53) < 0.01 and abs(gib - 17.28) < 0.01
    out = tmp_path / "g.gguf"
    assert (
        synth.main(
            [
                "--arch",
                "gemma3",
                "--preset",
                "tiny",
                "-o",
                str(out),
                "--no-progress",
                "--set",
                "n_layer=2",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert GGUFFile(out).metadata["gemma3.block_count"] == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "nope"],
        ["--set", "foo=1"],
        ["--arch", "gemma4", "--set", "n_head_kv=3"],
        ["--set", "novalue"],
    ],
)
def test_cli_usage_errors_are_one_line(argv, capsys):
    assert synth.main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_module_exit_status_without_traceback(tmp_path):
    import subprocess
    import sys

    for argv in (["--preset", "nope"], ["--set", "foo=1"]):
        r = subprocess.run(
            [sys.executable, "-m", "sparkinfer_cute.gguf.synth", *argv, "-o", str(tmp_path / "x")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPARKINFER_SLOW"), reason="writes ~800 MB; set SPARKINFER_SLOW=1")
def test_30b_a3b_one_layer_slice(tmp_path):
    """Real shapes: ~800 MB (token_embd + output + one block)."""
    from sparkinfer_cute.gguf.config import load_config, validate_tensors

    g = GGUFFile(write_synthetic(tmp_path / "q.gguf", "qwen3moe", "30b-a3b", max_layers=1))
    validate_tensors(g, load_config(g))
    w = g.dequant("blk.0.ffn_down_exps.weight")[:4]
    assert abs(math.sqrt(np.mean(w.astype(np.float64) ** 2)) * math.sqrt(768) - 1) < 0.05


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPARKINFER_SLOW"), reason="writes ~2 GB; set SPARKINFER_SLOW=1")
@pytest.mark.parametrize("preset,max_layers", [("small", None), ("26b-a4b", 6)])
def test_gemma4_real_shapes_validate_and_stay_well_scaled(tmp_path, preset, max_layers):
    """small, and the first 6 blocks of 26b-a4b (five sliding layers and the first full one, real shapes): the
    file validates, and the reference forward keeps the residual stream O(1) and the logits finite and
    varied."""
    from sparkinfer_cute.gguf.config import load_config, validate_tensors
    from sparkinfer_cute.reference import load_reference

    p = write_synthetic(tmp_path / "g.gguf", "gemma4", preset, max_layers=max_layers)
    g = GGUFFile(p)
    validate_tensors(g, load_config(g))
    m = load_reference(g)
    cap: dict = {}
    logits = m.forward(np.random.default_rng(0).integers(0, 4096, 8), capture=cap)
    for l in range(m.n_layer):
        rms = float(np.sqrt(np.mean(cap[f"resid.{l}"].astype(np.float64) ** 2)))
        assert 0.3 < rms < 10, (l, rms)
    assert np.isfinite(logits).all() and 0.2 < logits.std(axis=-1).mean() < 5


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma3", "gemma4"])
def test_synthetic_header_is_the_file_header(tmp_path, arch):
    """SyntheticHeader (no file written) shows what GGUFFile shows of write_synthetic's file: metadata, tensor names,
    types, shapes and byte sizes (offsets aside); tensor data is refused."""
    from sparkinfer_cute.errors import GGUFError
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.synth import synthetic_header

    g = GGUFFile(write_synthetic(str(tmp_path / "m.gguf"), arch=arch, preset="tiny", seed=0))
    h = synthetic_header(arch, "tiny")
    assert h.metadata == g.metadata
    assert [(t.name, t.ggml_type, t.shape, t.nbytes) for t in h.tensors.values()] == \
           [(t.name, t.ggml_type, t.shape, t.nbytes) for t in g.tensors.values()]
    with pytest.raises(GGUFError, match="no tensor data"):
        h.dequant("token_embd.weight")
