"""Engine and CLI behaviour on the CPU reference backend (runs anywhere) + the same checks on the GPU backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparkinfer_cute.errors import ContextOverflowError, GGUFError
from sparkinfer_cute.gguf.synth import write_synthetic
from sparkinfer_cute.sampling import Sampler, SamplerConfig


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("m") / "qwen_tiny.gguf"
    write_synthetic(str(p), arch="qwen3moe", preset="tiny", seed=11)
    return str(p)


def _llama_fixture(name: str) -> dict:
    with open(os.path.join(os.path.dirname(__file__), "..", "reference", "fixtures", name)) as fh:
        return json.load(fh)


def _engine(path, backend="cpu", ctx=64, numerics="exact"):
    from sparkinfer_cute.engine import Engine

    return Engine(path, backend_name=backend, max_context=ctx, progress=False, cpu_numerics=numerics)


def test_greedy_generate_matches_reference_argmax(qwen_tiny):
    """Greedy generate() == argmax of the reference forward fed its own outputs (independent loop)."""
    from sparkinfer_cute.reference import load_reference

    eng = _engine(qwen_tiny)
    prompt = [5, 17, 300, 42]
    got = list(eng.generate(prompt, 8, stop_at_eog=False))
    ref = load_reference(qwen_tiny, max_context=64)
    seq = list(prompt)
    logits = ref.forward(seq, all_logits=False)[-1]
    want = []
    for _ in range(8):
        t = int(np.argmax(logits))
        want.append(t)
        logits = ref.forward([t], all_logits=False)[-1]
    assert got == want
    assert eng.stats.gen_tokens == 8 and eng.stats.prompt_tokens == 4


def test_context_overflow_is_a_clear_error(qwen_tiny):
    eng = _engine(qwen_tiny, ctx=16)
    with pytest.raises(ContextOverflowError, match="exceeds the context"):
        list(eng.generate(list(range(1, 12)), 8))
    with pytest.raises(ValueError, match="empty prompt"):
        list(eng.generate([], 4))
    with pytest.raises(ValueError, match="out of range"):
        list(eng.generate([eng.cfg.vocab_size + 5], 1))


def test_sampler_greedy_and_seeded(rng):
    logits = rng.standard_normal(1000)
    assert Sampler(SamplerConfig())(logits) == int(np.argmax(logits))
    a = [Sampler(SamplerConfig(0.8, 40, 0.9, seed=3))(logits) for _ in range(3)]
    b = [Sampler(SamplerConfig(0.8, 40, 0.9, seed=3))(logits) for _ in range(3)]
    assert a == b
    top40 = set(np.argsort(-logits)[:40].tolist())
    s = Sampler(SamplerConfig(1.0, 40, 1.0, seed=1))
    assert all(s(logits) in top40 for _ in range(50))
    with pytest.raises(ValueError):
        Sampler(SamplerConfig(temperature=-1))


def test_cli_cpu_backend_streams_and_reports(qwen_tiny):
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.run", qwen_tiny, "-p", "hello world", "-n", "6",
                        "--backend", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello world")
    assert "decode 6 tok" in r.stderr and "tok/s" in r.stderr and "backend cpu-reference" in r.stderr


@pytest.mark.parametrize("content,why", [(b"not a gguf at all", "not a GGUF"), (b"GGUF\x03\x00\x00\x00", "")])
def test_cli_bad_file_is_a_clear_error(tmp_path, content, why):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.run", str(p), "-n", "2"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr and why in r.stderr


def test_cli_prompt_too_long(qwen_tiny):
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.run", qwen_tiny, "-p", "word " * 40, "-n", "8",
                        "-c", "16", "--backend", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exceeds the context" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == ""  # the prompt is echoed only once the request is accepted


def test_unknown_architecture_is_a_clear_error(tmp_path):
    import gguf

    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from sparkinfer_cute.engine import Engine

    with pytest.raises(GGUFError, match="llama"):
        Engine(str(p), backend_name="cpu", progress=False)


def test_cli_greedy_matches_llamacpp(gemma3_path):
    """The README command on a CPU machine with llama.cpp's CPU numerics (`run -p PROMPT -n 16 --cpu-numerics llama`)
    prints llama.cpp's greedy continuation (fixture made by llama-completion --temp 0,
    tests/reference/fixtures/gemma3_270m_greedy.json)."""
    fx = _llama_fixture("gemma3_270m_greedy.json")
    r = subprocess.run([sys.executable, "-m", "sparkinfer_cute.run", gemma3_path, "-p", fx["prompt"], "-n", "16",
                        "--backend", "cpu", "--cpu-numerics", "llama"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.tokenizer import Tokenizer

    want = Tokenizer.from_gguf(GGUFFile(gemma3_path)).decode(fx["generated_ids"])
    assert r.stdout.rstrip("\n") == (fx["prompt"] + want).rstrip("\n")


def test_chat_matches_llamacpp(gemma3_path):
    """--chat on Gemma 3: the prompt ids are llama.cpp's for the same turn markers (BOS once, then
    <start_of_turn>user...; llama.cpp adds BOS to a template that carries none) and the greedy continuation with
    llama.cpp's CPU numerics (numerics="llama") is llama-completion's (fixture gemma3_270m_chat_greedy.json,
    make_llama_fixtures.py 2c). The 270M file is a base model, so the "answer" is an echo; what matters is that it is llama.cpp's echo."""
    fx = _llama_fixture("gemma3_270m_chat_greedy.json")
    eng = _engine(gemma3_path, ctx=64, numerics="llama")
    assert eng.encode_prompt(fx["user"], chat=True) == fx["prompt_ids"]
    ids, _ = eng.complete(fx["user"], len(fx["generated_ids"]), chat=True)
    assert ids == fx["generated_ids"]
