"""Teacher-forced comparison of two models' next-token distributions (our forward vs llama.cpp, GPU vs reference).

Both sides see the same token sequence; at each scored position we compare the predicted distribution of the next
token. The reference side ("b") may be full logits or a compact top-K record (what the committed llama.cpp fixtures
hold): per position the K most likely token ids and their log-probabilities (log-softmax over the whole vocabulary),
plus optionally the log-probability of the actual next token.

KL on a top-K support: with S the reference's top-K ids at a position, P = softmax-restricted-to-S of the reference
(its log-probs over S, renormalised to sum to 1) and Q likewise for model "a" over the same ids,
``KL = Σ_{i∈S} P_i (log P_i − log Q_i)`` (nats). It is the KL between the two distributions conditioned on the
reference's top-K set, so it is defined from a compact fixture; with K=32 it misses only the tail mass.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .ops import log_softmax


def topk_record(logits: np.ndarray, targets: np.ndarray | None = None, k: int = 32) -> dict:
    """Compact top-K record of full logits (n, vocab): ``topk_ids`` (n, k) int32 sorted by decreasing probability,
    ``topk_logprobs`` (n, k) float32 (log-softmax over the whole vocabulary), and ``target_logprob`` (n,) if
    ``targets`` is given."""
    ls = log_softmax(logits)
    ids = np.argsort(-ls, axis=-1, kind="stable")[:, :k]
    rec = {
        "topk_ids": ids.astype(np.int32),
        "topk_logprobs": np.take_along_axis(ls, ids, -1).astype(np.float32),
    }
    if targets is not None:
        rec["target_logprob"] = ls[np.arange(ls.shape[0]), np.asarray(targets)].astype(np.float32)
    return rec


def _log_renorm(lp: np.ndarray) -> np.ndarray:
    m = lp.max(axis=-1, keepdims=True)
    return lp - m - np.log(np.exp(lp - m).sum(axis=-1, keepdims=True))


def teacher_forced_compare(
    logits_a: np.ndarray,
    ref_b: np.ndarray | Mapping,
    tokens: np.ndarray,
    k: int = 32,
    tie_tol: float = 0.05,
) -> dict:
    """Compare model a's logits (n, vocab) with reference b (full logits (n, vocab) or a top-K record, see
    :func:`topk_record`) at n positions whose actual next tokens are ``tokens`` (n,).

    Returns a JSON-serialisable dict (floats, ints, lists):
      ``n``: positions compared;
      ``top1_agreement``: fraction of positions where a's argmax equals b's top-1;
      ``top1_agreement_tol``: the same, also counting positions where b itself nearly ties: b's log-prob of a's
      argmax is within ``tie_tol`` nats of b's top-1 (a's argmax must be in b's top-K);
      ``disagree_margins_b``: list, at each disagreement b's top-1 minus top-2 log-prob (how near a tie it was);
      ``mean_kl`` / ``max_kl``: KL(b‖a) on b's top-K support, renormalised (module docstring), nats;
      ``disagree_positions``: list of the indices where the argmaxes differ;
      ``ppl_a``: exp(mean NLL of ``tokens``) under a; ``ppl_b``: the same under b (needs b's ``target_logprob``
      or full logits; else NaN); ``ppl_rel_diff``: ``|ppl_a − ppl_b| / ppl_b``;
      ``mean_abs_target_logprob_diff``: mean |log p_a(tok) − log p_b(tok)|.
    """
    la = log_softmax(np.asarray(logits_a))
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n = la.shape[0]
    if tokens.shape[0] != n:
        raise ValueError(f"{n} logit rows but {tokens.shape[0]} target tokens")
    if isinstance(ref_b, Mapping):
        ids = np.asarray(ref_b["topk_ids"], dtype=np.int64)[:, :k]
        lpb = np.asarray(ref_b["topk_logprobs"], dtype=np.float64)[:, :k]
        tgt_b = ref_b.get("target_logprob")
        tgt_b = None if tgt_b is None else np.asarray(tgt_b, dtype=np.float64).reshape(-1)
    else:
        rb = topk_record(np.asarray(ref_b), tokens, k)
        ids, lpb, tgt_b = (
            rb["topk_ids"].astype(np.int64),
            rb["topk_logprobs"].astype(np.float64),
            rb["target_logprob"],
        )
    if ids.shape[0] != n:
        raise ValueError(f"{n} logit rows but the reference has {ids.shape[0]} positions")
    rows = np.arange(n)
    top1_a = la.argmax(axis=-1)
    top1_agreement = float(np.mean(top1_a == ids[:, 0]))
    disagree = np.nonzero(top1_a != ids[:, 0])[0]
    in_b = ids == top1_a[:, None]
    lp_b_of_a = np.where(in_b.any(-1), np.where(in_b, lpb, -np.inf).max(-1), -np.inf)
    top1_agreement_tol = float(np.mean((top1_a == ids[:, 0]) | (lp_b_of_a >= lpb[:, 0] - tie_tol)))
    log_p = _log_renorm(lpb)
    log_q = _log_renorm(np.take_along_axis(la, ids, -1))
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    nll_a = -la[rows, tokens]
    ppl_a = float(np.exp(nll_a.mean()))
    if tgt_b is not None:
        nll_b = -np.asarray(tgt_b, dtype=np.float64)
        ppl_b = float(np.exp(nll_b.mean()))
        tgt_diff = float(np.mean(np.abs(nll_a - nll_b)))
    else:
        ppl_b, tgt_diff = float("nan"), float("nan")
    return {
        "n": int(n),
        "top1_agreement": top1_agreement,
        "top1_agreement_tol": top1_agreement_tol,
        "disagree_positions": [int(i) for i in disagree],
        "disagree_margins_b": [
            float(lpb[i, 0] - lpb[i, 1]) if lpb.shape[1] > 1 else float("inf") for i in disagree
        ],
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "ppl_a": ppl_a,
        "ppl_b": ppl_b,
        "ppl_rel_diff": abs(ppl_a - ppl_b) / ppl_b if tgt_b is not None else float("nan"),
        "mean_abs_target_logprob_diff": tgt_diff,
    }


def centered_logprob_rel_rms(logits_a: np.ndarray, logits_b: np.ndarray) -> np.ndarray:
    """Per position: ``RMS(c(a) − c(b)) / RMS(c(b))`` where ``c(x)`` is the log-softmax of x minus its mean over the
    vocabulary (centering removes the per-row constant that log-softmax and raw logits differ by). (n,) array."""
    a = log_softmax(np.asarray(logits_a))
    b = log_softmax(np.asarray(logits_b))
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return np.sqrt(np.mean((a - b) ** 2, axis=-1)) / np.sqrt(np.mean(b**2, axis=-1))
