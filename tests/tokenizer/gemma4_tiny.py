"""A tiny, deterministic Gemma-4-style vocabulary (``tokenizer.ggml.model = gemma4``) in a vocab-only GGUF.

Gemma 4's tokenizer is BPE over raw UTF-8 characters with ' ' -> '▁', split only into newline / non-newline runs,
with ``<0xXX>`` byte fallback (llama.cpp LLAMA_VOCAB_PRE_TYPE_GEMMA4). Vocabulary here: Gemma-like control tokens,
the 256 byte tokens, newline-run tokens, the characters of ``TRAINING_TEXT`` and ``N_MERGES`` merges learned on it;
characters outside it (CJK, emoji) exercise the byte fallback. ``general.architecture = gemma3`` (the tokenizer does
not depend on it; gemma3's minimal hparams are enough for llama-tokenize's vocab-only load).
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise

N_MERGES = 300

TRAINING_TEXT = """
The tokenizer merges the most frequent pairs of characters into new tokens. Hello world! Hello there, world.
def f(x):
    return x * 2  # spaces and indentation
Привет, мир! café naïve résumé. The the the of of and and in in is is it it's.
<|turn>user
What is the answer?<turn|>
<|turn>model
"""

SPECIALS = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<|turn>", 3), ("<turn|>", 3),
            ("<|channel>", 3), ("<channel|>", 3), ("<|tool_response>", 3), ("</s>", 1), ("<|think|>", 3)]


def train_merges(text: str = TRAINING_TEXT, n_merges: int = N_MERGES) -> list[tuple[str, str]]:
    words = Counter(w for w in re.findall(r"[^\n]+|\n+", text.replace(" ", "\u2581")) if w[0] != "\n")
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in pairwise(s):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        a, b = best
        for w in words:
            s, i, out = seqs[w], 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = [t for t, _ in SPECIALS]
    types = [ty for _, ty in SPECIALS]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    for nl in ("\n", "\n\n", "\n\n\n\n"):  # newline runs: whole-word lookup (the gemma 4 "\n" fix)
        tokens.append(nl)
        types.append(1)
    seen = set(tokens)
    for ch in sorted(set(TRAINING_TEXT.replace(" ", "\u2581")) - {"\n"}):
        if ch not in seen:
            seen.add(ch)
            tokens.append(ch)
            types.append(1)
    merges = train_merges()
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(1)
    return tokens, types, [f"{a} {b}" for a, b in merges]


def write_tiny_gemma4_gguf(path) -> str:
    import gguf

    tokens, types, merges = tiny_vocab()
    arch = "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", 4096)
    w.add_uint32(f"{arch}.embedding_length", 64)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.feed_forward_length", 128)
    w.add_uint32(f"{arch}.attention.head_count", 2)
    w.add_uint32(f"{arch}.attention.head_count_kv", 1)
    w.add_uint32(f"{arch}.attention.key_length", 32)
    w.add_uint32(f"{arch}.attention.value_length", 32)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_uint32(f"{arch}.attention.sliding_window", 512)
    w.add_tokenizer_model("gemma4")
    w.add_tokenizer_pre("gemma4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<bos>"))
    w.add_eos_token_id(tokens.index("<eos>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_pad_token_id(tokens.index("<pad>"))
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
