"""Every command line refuses a bad argument in one line, before any model loads, with exit status 2 and no traceback.

Each case runs the real entry point in a subprocess (as a user would): the exit status must be 2, stderr exactly one
line starting ``error:`` that contains the expected words, and stdout empty (nothing was echoed or computed). GPU-only
commands are run with ``SPARKINFER_NO_GPU=1`` (and, on a machine without a GPU, also without it): they must say in one
line that they need a GPU. The gguf.synth CLI belongs to tests/gguf/test_synth.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparkinfer_cute.gguf.synth import write_synthetic



def _gpu_present() -> bool:
    try:
        from sparkinfer_cute.runtime import device_available

        return device_available()
    except Exception:
        return False


GPU = _gpu_present()

RUN = "sparkinfer_cute.run"
TOKENIZE = "sparkinfer_cute.tokenize"
ACCURACY = "sparkinfer_cute.accuracy"
BENCH = "sparkinfer_cute.bench"
KERNELS = "sparkinfer_cute.kernels"
MICROBENCH = "sparkinfer_cute.kernels.microbench"
PERF_MODEL = "sparkinfer_cute.perf_model"

NO_GPU = {"SPARKINFER_NO_GPU": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases refer to: a real tiny GGUF, a directory, a missing path, a file that is not a GGUF, a file
    that is not UTF-8, a file that is not JSON, a valid microbench/bench JSON pair."""
    d = tmp_path_factory.mktemp("cli")
    gguf = d / "tiny.gguf"
    write_synthetic(str(gguf), arch="gemma3", preset="tiny", seed=5)
    (d / "notgguf.gguf").write_bytes(b"this is not a GGUF file at all")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "text.txt").write_text("hello world\n")
    (d / "notjson.json").write_text("{not json")
    (d / "bench.json").write_text(json.dumps({"arch": "gemma3"}))
    return {"GGUF": str(gguf), "DIR": str(d), "MISSING": str(d / "missing.gguf"), "NOTGGUF": str(d / "notgguf.gguf"),
            "LATIN1": str(d / "latin1.txt"), "TEXT": str(d / "text.txt"), "NOTJSON": str(d / "notjson.json"),
            "BENCH": str(d / "bench.json")}


# (module, argv, words the one error line must contain, extra environment); argv entries in braces are files[...]
CASES = [
    # run: every sampling / length / context argument, the prompt, the model path
    (RUN, ["{GGUF}", "-n", "-1"], ["-n/--n-predict", ">= 0", "'-1'"], {}),
    (RUN, ["{GGUF}", "-n", "ten"], ["-n/--n-predict", "integer"], {}),
    (RUN, ["{GGUF}", "--top-p", "2"], ["--top-p", "(0, 1]"], {}),
    (RUN, ["{GGUF}", "--top-p", "0"], ["--top-p", "(0, 1]"], {}),
    (RUN, ["{GGUF}", "--top-p", "nan"], ["--top-p"], {}),
    (RUN, ["{GGUF}", "--temp", "-1"], ["--temp", "a number >= 0"], {}),
    (RUN, ["{GGUF}", "--temp", "nan"], ["--temp"], {}),
    (RUN, ["{GGUF}", "--temp", "inf"], ["--temp"], {}),
    (RUN, ["{GGUF}", "--seed", "-3"], ["--seed", ">= 0"], {}),
    (RUN, ["{GGUF}", "--top-k", "-5"], ["--top-k", ">= 0"], {}),
    (RUN, ["{GGUF}", "-p", ""], ["-p/--prompt", "empty"], {}),
    (RUN, ["{GGUF}", "-c", "0"], ["-c/--ctx-size", ">= 1"], {}),
    (RUN, ["{GGUF}", "-c", "-5"], ["-c/--ctx-size", ">= 1"], {}),
    (RUN, ["{GGUF}", "-t", "0"], ["-t/--threads", ">= 1"], {}),
    (RUN, ["{GGUF}", "--backend", "tpu"], ["--backend", "invalid choice"], {}),
    (RUN, ["{GGUF}", "--cpu-numerics", "fast"], ["--cpu-numerics", "invalid choice"], {}),
    (RUN, ["{GGUF}", "--bogus"], ["unrecognized arguments", "--bogus"], {}),
    (RUN, ["{DIR}"], ["is a directory"], {}),
    (RUN, ["{MISSING}"], ["no such file"], {}),
    (RUN, ["{NOTGGUF}"], ["not a GGUF"], {}),
    (RUN, ["{GGUF}", "-c", "4", "-p", "many words in this prompt", "--backend", "cpu"], ["exceeds the context"], {}),
    (RUN, ["{GGUF}", "--backend", "gpu"], ["needs a CUDA GPU"], NO_GPU),
    # tokenize
    (TOKENIZE, ["-m", "{GGUF}", "-f", "{MISSING}"], ["-f/--file", "no such file"], {}),
    (TOKENIZE, ["-m", "{GGUF}", "-f", "{DIR}"], ["-f/--file", "is a directory"], {}),
    (TOKENIZE, ["-m", "{GGUF}", "-f", "{LATIN1}"], ["not UTF-8"], {}),
    (TOKENIZE, ["-m", "{GGUF}", "-f", "{TEXT}", "hello"], ["not both"], {}),
    (TOKENIZE, ["-m", "{GGUF}"], ["give TEXT or -f FILE"], {}),
    (TOKENIZE, ["-m", "{MISSING}", "hello"], ["-m/--model", "no such file"], {}),
    (TOKENIZE, ["-m", "{NOTGGUF}", "hello"], ["not a GGUF"], {}),
    # accuracy
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "-n", "0"], ["-n/--positions", ">= 1"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--reference", "{MISSING}"], ["--reference", "no such file"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--reference", "{TEXT}"], ["--reference", "not a readable .npz"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--tokens", "1,x"], ["--tokens", "comma-separated"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--tokens", "1,-2"], ["--tokens", ">= 0"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--min-top1", "2"], ["--min-top1", "[0, 1]"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--max-kl", "-1"], ["--max-kl", ">= 0"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--text", "{MISSING}"], ["--text", "no such file"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--text", "{TEXT}", "--tokens", "1,2"], ["one token source"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--hidden-layers", "2"], ["--hidden-layers", "--backend gpu"], {}),
    (ACCURACY, ["{GGUF}", "--backend", "cpu", "--tokens", "1,99999999"], ["outside the vocabulary"], {}),
    (ACCURACY, ["{GGUF}"], ["needs a CUDA GPU", "--backend cpu"], NO_GPU),
    # bench (GPU only)
    (BENCH, ["{GGUF}", "--runs", "3"], ["--runs", ">= 5"], {}),
    (BENCH, ["{GGUF}", "--gen", "1"], ["--gen", ">= 2"], {}),
    (BENCH, ["{GGUF}", "--depth", "-1"], ["--depth", ">= 0"], {}),
    (BENCH, ["{MISSING}"], ["no such file"], {}),
    (BENCH, ["{GGUF}", "--prompt-len", "512,0"], ["--prompt-len", ">= 1"], {}),
    (BENCH, ["{GGUF}", "--prompt-len", "512,512"], ["--prompt-len", "repeated"], {}),
    (BENCH, ["{GGUF}"], ["needs a CUDA GPU"], NO_GPU),
    # kernels CLI and micro-benchmark
    (KERNELS, ["--compile-all", "--arch", "sm_75"], ["--arch", "unsupported compile target"], {}),
    (KERNELS, ["--compile-all", "--jobs", "0"], ["--jobs", ">= 1"], {}),
    (KERNELS, ["--launch-overhead", "-n", "0"], ["-n", ">= 1"], {}),
    (KERNELS, ["--compile-all", "--kernel", "no_such_kernel"], ["unknown kernel no_such_kernel"], {}),
    (KERNELS, ["--launch-overhead"], ["needs a CUDA GPU"], NO_GPU),
    (MICROBENCH, ["--reps", "10"], ["--reps", ">= 50"], {}),
    (MICROBENCH, [], ["needs a CUDA GPU"], NO_GPU),
    # perf_model
    (PERF_MODEL, ["--microbench", "{BENCH}"], ["--bench", "required"], {}),
    (PERF_MODEL, ["--bench", "{MISSING}", "--microbench", "{BENCH}"], ["--bench", "no such file"], {}),
    (PERF_MODEL, ["--bench", "{NOTJSON}", "--microbench", "{BENCH}"], ["JSON"], {}),
    (PERF_MODEL, ["--bench", "{BENCH}", "--microbench", "{BENCH}", "--arch", "qwen3moe"], ["no qwen3moe rows"], {}),
    (PERF_MODEL, ["--bench", "{BENCH}", "--microbench", "{BENCH}", "--arch", "gemma3"], ["not the files"], {}),
    (PERF_MODEL, ["--bench", "{BENCH}", "--microbench", "{BENCH}", "--arch", "gemma3", "--tails", "{NOTJSON}"],
     ["not a microbench --tails JSON"], {}),
    (PERF_MODEL, ["--bench", "{BENCH}", "--microbench", "{BENCH}", "--tails", "{MISSING}"], ["--tails", "no such file"],
     {}),
    (PERF_MODEL, ["--bench", "{BENCH}", "--microbench", "{BENCH}", "--synth", "qwen3moe"], ["--synth", "ARCH:PRESET"],
     {}),
    (PERF_MODEL, ["plan"], ["one of the arguments --model --synth is required"], {}),
    (PERF_MODEL, ["plan", "--synth", "qwen3moe:huge"], ["--synth", "ARCH:PRESET", "qwen3moe:30b-a3b"], {}),
    (PERF_MODEL, ["plan", "--model", "{MISSING}"], ["--model", "no such file"], {}),
    (PERF_MODEL, ["plan", "--model", "{DIR}"], ["--model"], {}),
    (PERF_MODEL, ["plan", "--model", "{NOTGGUF}"], ["not a GGUF"], {}),
    (PERF_MODEL, ["plan", "--synth", "gemma3:tiny", "--depth", "-1"], ["--depth", ">= 0"], {}),
    (PERF_MODEL, ["plan", "--model", "{GGUF}", "--synth", "gemma3:tiny"], ["not allowed with"], {}),
    (PERF_MODEL, ["plan", "--synth", "gemma3:tiny", "--disable", "fused_everything"], ["--disable", "unknown pass"],
     {}),
]

# On a machine without a GPU the GPU-only commands must say so without the environment switch too.
if not GPU:
    CASES += [
        (RUN, ["{GGUF}", "--backend", "gpu"], ["needs a CUDA GPU"], {}),
        (BENCH, ["{GGUF}"], ["needs a CUDA GPU"], {}),
        (KERNELS, ["--launch-overhead"], ["needs a CUDA GPU"], {}),
        (MICROBENCH, [], ["needs a CUDA GPU"], {}),
        (ACCURACY, ["{GGUF}"], ["needs a CUDA GPU"], {}),
    ]


def _id(case) -> str:
    mod, argv, _, env = case
    return f"{mod.rsplit('.', 1)[-1]} {' '.join(argv)}{' NO_GPU' if env else ''}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_argument_is_one_line_exit_2(case, files):
    mod, argv, words, env = case
    argv = [a.format(**files) for a in argv]
    r = subprocess.run([sys.executable, "-m", mod, *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), r.stderr
    for w in words:
        assert w in err, (w, err)
    assert r.stdout.strip() == "", r.stdout


def test_run_cli_defaults_match_engine():
    """run.py keeps its own copy of the CPU numerics choices (so --help and refusals need no numpy); they must be
    the engine's."""
    from sparkinfer_cute import engine, run

    assert run.CPU_NUMERICS == engine.CPU_NUMERICS and run.DEFAULT_CPU_NUMERICS == engine.DEFAULT_CPU_NUMERICS


@pytest.mark.parametrize("mod", [RUN, TOKENIZE, ACCURACY, BENCH, KERNELS, MICROBENCH, PERF_MODEL])
def test_help_describes_every_option(mod):
    """--help exits 0 and every option of the parser carries a description (argparse prints bare option names
    for the undescribed ones)."""
    r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    import importlib

    m = importlib.import_module(mod if mod != KERNELS else KERNELS + ".__main__")
    parser = _parser_of(m)
    undescribed = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
    assert not undescribed, undescribed


def _parser_of(module):
    """The ArgumentParser a module's main() builds: build_parser() when it has one, else main(['--help']) with
    parse_args intercepted."""
    import argparse

    if hasattr(module, "build_parser"):
        return module.build_parser()
    seen = {}
    orig = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        seen["p"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            module.main([])
    finally:
        argparse.ArgumentParser.parse_args = orig
    return seen["p"]


def test_run_help_shows_prompt_default():
    r = subprocess.run([sys.executable, "-m", RUN, "--help"], capture_output=True, text=True, timeout=120)
    assert "The capital of France is" in " ".join(r.stdout.split())
