"""A tiny, deterministic Qwen-style byte-level BPE vocabulary in a vocab-only GGUF (no real Qwen GGUF is at hand).

Vocabulary: the 256 GPT-2 byte characters, ``N_MERGES`` merges learned by plain BPE training (most frequent adjacent
pair, ties broken by the pair's text) on ``TRAINING_TEXT`` pre-split with llama.cpp's qwen2 splitter, then Qwen's
special tokens: CONTROL ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>``/``<|fim_pad|>``, USER_DEFINED
``<think>``/``</think>``, and one UNUSED ``[PAD300]`` row. ``general.architecture = qwen3`` with the minimal hparams
llama.cpp's loader reads, so ``llama-tokenize`` (which loads vocab-only) accepts the file.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from .bpe_reference import bytes_to_unicode, qwen_split

N_MERGES = 400

TRAINING_TEXT = """
The tokenizer splits text into words and merges the most frequent pairs of bytes into new tokens. This is the
standard byte pair encoding used by GPT-2, Qwen and many other models. It's simple; it's fast; and it's reversible.
def tokenize(text):
    for word in split(text):
        yield from merge(word)
Numbers like 123 and 4567 are split into single digits by the qwen2 pre-tokenizer. Hello world! Hello there.
日本語のテキストを分割します。中文文本也是一样的。한국어 텍스트도 있습니다.
Привет, мир! Это тестовый текст на русском языке. مرحبا بالعالم، هذا نص عربي.
Emoji 😀😀 and 👍 appear too. café naïve résumé. The the the of of of and and and in in in.
<think>reasoning</think> assistant user system
"""

SPECIALS = [
    ("<|endoftext|>", 3),
    ("<|im_start|>", 3),
    ("<|im_end|>", 3),
    ("<|fim_pad|>", 3),
    ("<think>", 4),
    ("</think>", 4),
    ("[PAD300]", 5),
]


def train_merges(text: str = TRAINING_TEXT, n_merges: int = N_MERGES) -> list[tuple[str, str]]:
    b2u = bytes_to_unicode()
    words = Counter("".join(b2u[b] for b in w.encode("utf-8")) for w in qwen_split(text))
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
            s = seqs[w]
            i, out = 0, []
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
    """(tokens, token_types, merges as "a b" strings)."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    seen = set(tokens)
    merges = train_merges()
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [1] * len(tokens)
    for text, ty in SPECIALS:
        tokens.append(text)
        types.append(ty)
    return tokens, types, [f"{a} {b}" for a, b in merges]


def write_tiny_qwen_gguf(path, pre: str = "qwen2") -> str:
    """Write the vocab-only GGUF to ``path`` and return it as a str."""
    import gguf

    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "qwen3")
    arch = "qwen3"
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
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
