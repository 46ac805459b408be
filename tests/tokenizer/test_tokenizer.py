"""Tokenizer parity with llama.cpp (committed llama-tokenize fixtures), round trips, streaming decode, chat templates.

Fixtures: tests/tokenizer/fixtures/llama_tokenize.json, made by tests/tokenizer/make_fixtures.py (see its docstring).
The Qwen-style BPE vocabularies are rebuilt here from code (qwen_tiny.py) and checked against the same fixture file,
plus an independent pure-Python port of llama.cpp's splitter and BPE session (bpe_reference.py) on random text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.tokenizer import Tokenizer, gpt2_bytes_to_unicode

from . import bpe_reference as ref
from . import gemma4_tiny
from .corpus import CORPUS
from .qwen_tiny import tiny_vocab, write_tiny_qwen_gguf

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "fixtures", "llama_tokenize.json"), encoding="utf-8") as _f:
    FIXTURE = json.load(_f)
REPO = os.path.dirname(os.path.dirname(HERE))

MODES = [("ids", {}), ("ids_no_parse_special", {"parse_special": False}), ("ids_no_bos", {"add_bos": False})]


def test_fixture_matches_corpus():
    assert FIXTURE["corpus_sha256"] == hashlib.sha256(json.dumps(CORPUS).encode()).hexdigest(), (
        "corpus.py changed: rerun tests/tokenizer/make_fixtures.py")
    tokens, _, merges = tiny_vocab()
    vocab_sha = hashlib.sha256(json.dumps([tokens, merges]).encode()).hexdigest()
    for pre in ("qwen2", "qwen35"):
        assert FIXTURE["models"][f"tiny_{pre}"]["vocab_sha256"] == vocab_sha, "qwen_tiny.py changed: rerun fixtures"
    tokens, _, merges = gemma4_tiny.tiny_vocab()
    vocab_sha = hashlib.sha256(json.dumps([tokens, merges]).encode()).hexdigest()
    assert FIXTURE["models"]["tiny_gemma4"]["vocab_sha256"] == vocab_sha, "gemma4_tiny.py changed: rerun fixtures"


# ----------------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return Tokenizer.from_gguf(gemma3_path)


@pytest.fixture(scope="module", params=["qwen2", "qwen35"])
def tiny_qwen(request, tmp_path_factory):
    path = write_tiny_qwen_gguf(tmp_path_factory.mktemp("tok") / f"tiny_{request.param}.gguf", pre=request.param)
    return request.param, path, Tokenizer.from_gguf(path)


def _check_cases(tok: Tokenizer, cases: list[dict]):
    mismatches = []
    for case in cases:
        for key, kw in MODES:
            got = tok.encode(case["text"], **kw)
            if got != case[key]:
                mismatches.append((key, case["text"][:50], got[:20], case[key][:20]))
    assert not mismatches, mismatches[:5]


# ----------------------------------------------------------------------------------------------- Gemma 3 (SPM)
def test_gemma3_metadata(gemma, gemma3_path):
    assert gemma.model == "llama" and gemma.vocab_size == 262144
    assert (gemma.bos_id, gemma.eos_id, gemma.add_bos) == (2, 1, True)
    # llama.cpp (-v) prints "EOG token = 1 '<eos>', 106 '<end_of_turn>', 212 '</s>'" for this file
    assert gemma.eog_ids == frozenset({1, 106, 212})
    assert gemma.token_to_id("<end_of_turn>") == 106


def test_gemma3_matches_llama_cpp(gemma, gemma3_path):
    _check_cases(gemma, FIXTURE["models"]["gemma3"]["cases"])


def test_gemma3_from_gguffile_same_as_from_path(gemma, gemma3_path):
    # the engine passes a GGUFFile, the CLI a path
    tok = Tokenizer.from_gguf(GGUFFile(gemma3_path))
    text = CORPUS[10] + CORPUS[7]
    assert tok.encode(text) == gemma.encode(text)
    assert tok.eog_ids == gemma.eog_ids


def test_gemma3_round_trip_and_stream(gemma):
    for text in CORPUS:
        ids = gemma.encode(text, add_bos=False)
        assert gemma.decode(ids) == text
        with_bos = gemma.encode(text)
        assert gemma.decode(with_bos) == "<bos>" + text
        # without special parsing, control-token text stays plain text; skip_special then drops only the BOS
        assert gemma.decode(gemma.encode(text, parse_special=False), skip_special=True) == text
        # streaming one id at a time reproduces decode() exactly, also for emoji split over <0xXX> byte tokens
        sd = gemma.stream_decoder()
        pieces = [sd.push(i) for i in with_bos] + [sd.flush()]
        assert "".join(pieces) == gemma.decode(with_bos)
        assert all("\ufffd" not in p for p in pieces)  # never emits half a character


def test_gemma3_byte_fallback_is_exercised(gemma):
    # the corpus must actually hit <0xXX> tokens split inside one character, or the streaming test proves nothing
    ids = gemma.encode(CORPUS[14], add_bos=False)
    byte_ids = [i for i in ids if gemma.token_type(i) == 6]
    assert len(byte_ids) >= 3
    assert all(len(gemma.token_bytes(i)) == 1 for i in byte_ids)
    assert gemma.token_bytes(gemma.token_to_id("▁the")) == b" the"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_gemma3_round_trip_random(gemma, text):
    ids = gemma.encode(text, add_bos=False, parse_special=False)
    assert gemma.decode(ids) == text
    sd = gemma.stream_decoder()
    assert "".join(sd.push(i) for i in ids) + sd.flush() == text


def test_gemma3_speed(gemma3_path, gemma):
    t0 = time.perf_counter()
    Tokenizer.from_gguf(gemma3_path)
    t_build = time.perf_counter() - t0
    text = (CORPUS[4] + CORPUS[5] + CORPUS[7] + CORPUS[10]) * 12  # ~5k characters
    t0 = time.perf_counter()
    gemma.encode(text)
    t_enc = time.perf_counter() - t0
    # measured 0.25 s / 0.02 s on the 2-core dev box; generous bounds for loaded CI machines
    assert t_build < 2.0 and t_enc < 0.5, (t_build, t_enc)


# ----------------------------------------------------------------------------------------------- Qwen-style BPE
def test_tiny_qwen_matches_llama_cpp(tiny_qwen):
    pre, _, tok = tiny_qwen
    assert tok.model == "gpt2" and tok.pre == pre and tok.add_bos is False
    _check_cases(tok, FIXTURE["models"][f"tiny_{pre}"]["cases"])


def test_tiny_qwen_specials_and_eog(tiny_qwen):
    _, path, tok = tiny_qwen
    t = {s: tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>", "<think>")}
    assert tok.eos_id == t["<|im_end|>"]
    # eos + "<|endoftext|>" by text + the FIM pad token (llama.cpp adds fim pad/rep/sep to the EOG set)
    assert tok.eog_ids == frozenset({t["<|im_end|>"], t["<|endoftext|>"], t["<|fim_pad|>"]})
    # CONTROL tokens split only with parse_special; USER_DEFINED (<think>) always
    assert tok.encode("<|im_start|>") == [t["<|im_start|>"]]
    assert t["<|im_start|>"] not in tok.encode("<|im_start|>", parse_special=False)
    assert tok.encode("<think>", parse_special=False) == [t["<think>"]]
    assert tok.decode([t["<|im_end|>"], t["<think>"]], skip_special=True) == "<think>"
    assert tok.token_bytes(tok.token_to_id("[PAD300]")) == b""  # UNUSED renders as nothing
    assert Tokenizer.from_gguf(GGUFFile(path)).encode(CORPUS[13]) == tok.encode(CORPUS[13])


def test_tiny_qwen_round_trip_and_stream(tiny_qwen):
    _, _, tok = tiny_qwen
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        sd = tok.stream_decoder()
        assert "".join(sd.push(i) for i in ids) + sd.flush() == text


_B2U = gpt2_bytes_to_unicode()
_POOL = st.sampled_from(
    [chr(c) for c in (*range(0x20, 0x7F), *range(0xA0, 0x180), *range(0x300, 0x310), *range(0x2000, 0x2070), 0x378,
                      0x3000, 0x85, 0x1C, 0x1F, 0x4E00, 0x1F600, 0x200D, 0x0915, 0x094D, 0x0660, 0xE000)]
    + list("\n\r\t   'sSreRllLdDvVm"))


@settings(max_examples=300, deadline=None)
@given(st.lists(_POOL, max_size=40).map("".join), st.sampled_from(["qwen2", "qwen35"]))
def test_bpe_split_matches_llama_cpp_port(text, pre):
    # the tokenizers-library regex pre-split must equal llama.cpp's hand-written splitter (ported in bpe_reference)
    tok = _tiny_tokenizers()[pre]
    got = [w for w, _ in tok._hf.pre_tokenizer.pre_tokenize_str(text)]
    want = ["".join(_B2U[b] for b in w.encode("utf-8")) for w in ref.qwen_split(text, qwen35=pre == "qwen35")]
    assert got == want
    tokens, types, merges = _tiny_tokenizers()["vocab"]
    assert tok.encode(text) == ref.encode(text, tokens, types, merges, qwen35=pre == "qwen35")


_TINY: dict = {}


def _tiny_tokenizers():
    if not _TINY:
        tokens, types, merges = _TINY["vocab"] = tiny_vocab()
        for pre in ("qwen2", "qwen35"):
            _TINY[pre] = Tokenizer({
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"), "tokenizer.ggml.add_bos_token": False,
            })
    return _TINY


# ----------------------------------------------------------------------------------------------- Gemma 4 BPE
@pytest.fixture(scope="module")
def tiny_gemma4(tmp_path_factory):
    path = gemma4_tiny.write_tiny_gemma4_gguf(tmp_path_factory.mktemp("tok") / "tiny_gemma4.gguf")
    return path, Tokenizer.from_gguf(path)


def test_tiny_gemma4_matches_llama_cpp(tiny_gemma4):
    _, tok = tiny_gemma4
    assert tok.model == "gemma4" and tok.add_bos is True
    _check_cases(tok, FIXTURE["models"]["tiny_gemma4"]["cases"])


def test_tiny_gemma4_eog_round_trip_stream(tiny_gemma4):
    _, tok = tiny_gemma4
    # llama.cpp -v: EOG = <eos>, <turn|>, <|tool_response>; "</s>" is "a normal token here, removing it from EOG"
    assert tok.eog_ids == frozenset(tok.token_to_id(t) for t in ("<eos>", "<turn|>", "<|tool_response>"))
    assert tok.token_type(tok.token_to_id("</s>")) == 1
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == "<bos>" + text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
        sd = tok.stream_decoder()
        assert "".join(sd.push(i) for i in ids) + sd.flush() == tok.decode(ids)


def test_gemma4_chat_template(tiny_gemma4):
    _, tok = tiny_gemma4
    msgs = [{"role": "system", "content": " S "}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Yes"}, {"role": "user", "content": "Q"}]
    # spec §6 / gemma4.jinja: [<|turn>system\n…<turn|>\n]<|turn>user\n{content}<turn|>\n<|turn>model\n, plus the
    # empty thought channel when thinking is disabled
    assert tok.apply_chat_template(msgs) == (
        "<|turn>system\nS<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nYes<turn|>\n<|turn>user\nQ<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>")
    assert tok.apply_chat_template(msgs[1:2], enable_thinking=True) == (
        "<|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    ids = tok.encode(tok.apply_chat_template(msgs[1:2]))
    assert ids[:2] == [tok.bos_id, tok.token_to_id("<|turn>")]


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_tokenizer_model_is_a_clear_error():
    with pytest.raises(GGUFError, match="unsupported tokenizer model 'bert'"):
        Tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(GGUFError, match="unsupported BPE pre-tokenizer 'llama-bpe'"):
        Tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(GGUFError, match="tokenizer.ggml.model"):
        Tokenizer({"tokenizer.ggml.tokens": ["a"]})


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(GGUFError, match="not a GGUF"):
        Tokenizer.from_gguf(str(p))


# ----------------------------------------------------------------------------------------------- chat templates
def test_gemma3_chat_template(gemma):
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  Hi there\n"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    s = gemma.apply_chat_template(msgs)
    # spec §6: {{bos}}<start_of_turn>user\n{system+"\n\n"}{content|trim}<end_of_turn>\n ... <start_of_turn>model\n
    # (BOS comes from encode(), not the string)
    assert s == ("<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
                 "<start_of_turn>model\nHello!<end_of_turn>\n"
                 "<start_of_turn>user\n2+2?<end_of_turn>\n"
                 "<start_of_turn>model\n")
    ids = gemma.encode(s)
    assert ids[0] == gemma.bos_id and ids[1] == 105 and ids.count(gemma.bos_id) == 1
    assert ids[-3:] == gemma.encode("<start_of_turn>model\n", add_bos=False)
    assert not gemma.apply_chat_template(msgs, add_generation_prompt=False).endswith("<start_of_turn>model\n")


def test_qwen_chat_template(tiny_qwen):
    pre, _, tok = tiny_qwen
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    base = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs) == base + "<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(msgs, enable_thinking=True) == base + ("<think>\n" if pre == "qwen35" else "")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == base[: -len("<|im_start|>assistant\n")]
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert ids[0] == tok.token_to_id("<|im_start|>")  # no BOS for Qwen


# ----------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.tokenize", *args], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip())


def test_cli_matches_encode(gemma, gemma3_path):
    text = "<start_of_turn>user\nHéllo 👨‍👩‍👧 world<end_of_turn>\n"
    assert _cli("-m", gemma3_path, text) == gemma.encode(text)
    assert _cli("-m", gemma3_path, "--no-bos", "--no-parse-special", text) == gemma.encode(
        text, add_bos=False, parse_special=False)
    assert _cli(text) == gemma.encode(text)  # default model: the packaged Gemma 3 270M


def test_cli_tiny_qwen(tiny_qwen):
    _, path, tok = tiny_qwen
    assert _cli("-m", path, CORPUS[13]) == tok.encode(CORPUS[13])


def test_cli_bad_file(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(3))
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.tokenize", "-m", str(p), "x"], capture_output=True,
                       text=True, cwd=REPO, timeout=120, check=False)
    assert r.returncode != 0 and "truncated" in r.stderr and "Traceback" not in r.stderr
