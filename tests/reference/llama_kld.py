"""Read the per-position log-prob file ``llama-perplexity --kl-divergence-base FILE`` writes.

Format (tools/perplexity/perplexity.cpp, ``perplexity()`` and ``log_softmax(n_vocab, logits, uint16_t*, tok)``):
  char[8] "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk,
  int32 tokens[n_chunk * n_ctx]   (the tokenized text, BOS first)
  then per chunk, for the ``n_ctx - 1 - n_ctx/2`` scored rows (row i = logits at chunk position n_ctx/2 + i, which
  predict the token at position n_ctx/2 + i + 1), ``nv = 2*((n_vocab+1)/2) + 4`` uint16 each:
    float32 scale, float32 min_log_prob (the first 4 uint16), then q[n_vocab];
    log_prob[j] = min_log_prob + scale * q[j], where min is clamped at max_logit - 16 (q = 0 below it) and
    scale = (max_logit - min_logit) / 65535, so log-probs within 16 nats of the top are exact to ~1.2e-4.
llama-perplexity replaces each chunk's first token by BOS (when the vocab adds BOS) before decoding.
"""

from __future__ import annotations

import numpy as np


def read_kld_base(path: str) -> dict:
    """Returns ``n_ctx``, ``n_vocab``, ``tokens`` (n_chunk, n_ctx) int32 as decoded (first of each chunk set to the BOS the file
    starts with), ``first`` (= n_ctx // 2), and ``logprobs`` (n_chunk, n_ctx - 1 - first, n_vocab) float32."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != b"_logits_":
        raise ValueError(f"{path}: not a llama-perplexity logits file (magic {buf[:8]!r})")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(buf, np.int32, 3, 8))
    off = 20
    tokens = np.frombuffer(buf, np.int32, n_chunk * n_ctx, off).reshape(n_chunk, n_ctx).copy()
    off += 4 * n_chunk * n_ctx
    first = n_ctx // 2
    n_rows = n_ctx - 1 - first
    nv = 2 * ((n_vocab + 1) // 2) + 4
    expect = off + 2 * nv * n_rows * n_chunk
    if len(buf) != expect:
        raise ValueError(f"{path}: {len(buf)} bytes, expected {expect}")
    rows = np.frombuffer(buf, np.uint16, nv * n_rows * n_chunk, off).reshape(n_chunk, n_rows, nv)
    head = rows[..., :4].copy().view(np.float32)  # (n_chunk, n_rows, 2): scale, min_log_prob
    q = rows[..., 4 : 4 + n_vocab].astype(np.float32)
    logprobs = head[..., 1:2] + head[..., 0:1] * q
    tokens[:, 0] = tokens[0, 0]  # BOS
    return {"n_ctx": n_ctx, "n_vocab": n_vocab, "tokens": tokens, "first": first, "logprobs": logprobs}
