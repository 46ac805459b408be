"""The CPU backend as `run` uses it: exact float32 numerics by default, weights dequantized at load, long prompts in
chunks (same logits), honest speed lines (no "nan"), the chat prompt apart from the reply, the base-model warning."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from sparkinfer_cute.engine import DEFAULT_CPU_NUMERICS, Engine, ReferenceBackend
from sparkinfer_cute.gguf.synth import write_synthetic
from sparkinfer_cute.reference import load_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, module_rng):
    p = tmp_path_factory.mktemp("run") / "tiny_gemma3.gguf"
    write_synthetic(str(p), arch="gemma3", preset="tiny", seed=int(module_rng.integers(1 << 16)))
    return str(p)


def _run(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "sparkinfer_cute.run", *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_default_is_exact_and_preloaded(tiny):
    eng = Engine(tiny, backend_name="cpu", max_context=64, progress=False)
    b = eng.backend
    assert DEFAULT_CPU_NUMERICS == "exact" and isinstance(b, ReferenceBackend) and not b.model.emulate_cpu
    assert b.preloaded_bytes == b.model.dense_weight_bytes() > 0  # every dense weight held as float32
    assert "dequantized to float32 at load" in eng.backend_note


def test_chunked_prefill_matches_one_forward(tiny, rng):
    """A prompt longer than the chunk runs in pieces; the logits are those of one forward over the whole prompt, and
    the next decode step continues from the same cache. Not bit for bit: a different BLAS blocking changes float32
    last bits, which the fp16 KV cache can round to a whole fp16 step (measured: ~1e-4 of the logit range); a
    chunking bug (positions, mask, cache offsets) moves logits by O(1)."""
    eng = Engine(tiny, backend_name="cpu", max_context=128, progress=True)
    b = eng.backend
    b.chunk = int(rng.integers(3, 9))
    ids = rng.integers(0, eng.cfg.vocab_size, size=int(rng.integers(20, 60))).tolist()
    got = b.prefill(ids)
    nxt = int(rng.integers(eng.cfg.vocab_size))
    got2 = b.decode(nxt)
    assert b.pos == len(ids) + 1
    ref = load_reference(tiny, max_context=128)
    want = ref.forward(ids, all_logits=False)[-1]
    want2 = ref.forward([nxt], all_logits=False)[-1]
    scale = np.abs(want).max()
    for g, w in ((got, want), (got2, want2)):
        assert np.abs(g - w).max() < 2e-3 * scale and np.abs(g - w).mean() < 2e-4 * scale


def test_progress_bar_stays_off_pipes(tiny, capfd):
    """progress=True draws a bar on a terminal only: captured (not a TTY), stderr stays empty."""
    eng = Engine(tiny, backend_name="cpu", max_context=128, progress=True)
    eng.backend.chunk = 4
    eng.backend.prefill(list(range(5, 30)))
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("n", [0, 1, 5])
def test_speed_line_never_nan(tiny, n):
    r = _run(tiny, "-p", "hello world", "-n", str(n), "--backend", "cpu")
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stderr.lower() and "Traceback" not in r.stderr
    assert r.stdout.startswith("hello world")
    last = r.stderr.strip().splitlines()[-1]
    assert f"decode {n} tok" in last and "prompt " in last and "exclude warm-up" in last
    assert re.search(r"prompt \d+ tok, [\d.]+ tok/s", last), last
    if n >= 2:  # the first token comes from the prompt pass; n - 1 decode steps are timed
        assert re.search(rf"decode {n} tok, [\d.]+ tok/s", last), last


def test_chat_warns_and_separates_reply(tiny):
    """The synthetic Gemma file, like the packaged 270M, has no chat template: one warning line says so (and that
    it looks like a base model); the user's turn is echoed on its own line, the reply below it."""
    r = _run(tiny, "-p", "Name three colors.", "-n", "4", "--chat", "--backend", "cpu")
    assert r.returncode == 0, r.stderr
    warns = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warns) == 1 and "no chat template" in warns[0] and "base model" in warns[0], r.stderr
    assert r.stdout.startswith("> Name three colors.\n\n"), r.stdout
