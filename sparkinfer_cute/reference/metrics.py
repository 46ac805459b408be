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
      ``mean_kl`` / ``median_kl`` / ``max_kl``: KL(b‖a) on b's top-K support, renormalised (module docstring),
      nats, over the positions;
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
        "median_kl": float(np.median(kl)),
        "max_kl": float(kl.max()),
        "ppl_a": ppl_a,
        "ppl_b": ppl_b,
        "ppl_rel_diff": abs(ppl_a - ppl_b) / ppl_b if tgt_b is not None else float("nan"),
        "mean_abs_target_logprob_diff": tgt_diff,
    }


# ------------------------------------------------------------------------------------------------ end-to-end gates
#: The end-to-end gates of the GPU builds (tests/models/test_gpu_decode.py, tests/models/test_gpu_prefill.py), judged
#: on :func:`teacher_forced_compare` of the build (a) against the CPU reference (b). Calibrated on the CPU with the
#: float64 twin of the reference standing in for a correct build (it differs from the f32 reference only by
#: rounding, as a GPU build does; tests/mutation/test_mutation_table.py prints the figures each run), and on the
#: H100 accuracy runs in results/:
#:
#: * ``f32`` (exact f32 activations vs the exact f32 reference): the float64 twin sits at a median KL of ~5e-10
#:   (synthetic tiny models), the H100 build further off (results/acc_*_h100.json, 128 positions: real Gemma 3 270M
#:   mean 7e-8; qwen3moe small mean 8.8e-6 with one position at 6.1e-4, so the other 127 average 2.2e-6 and, half
#:   of them being within twice that, the median is <= 4.4e-6). A 1% RMSNorm scale error sits at 1e-4..3e-4, a 1%
#:   attention-scale error at 1e-5..2e-5 (the attention kernel test rejects that one 10-20x over). Median <= 1e-5;
#:   mean <= 3e-4 leaves room for the rare routing flip of a near-tied expert (one position at ~6e-3 moves a
#:   64-position mean by 1e-4).
#: * ``int8`` (q8_1 activations vs the reference run with the same q8_1 rounding, ``act_q8_1``): a last-bit
#:   difference that flips one q8_1 rounding (a 1/127-of-amax step) propagates through the layers and the KV cache
#:   and flips others, so a correct build sits at a median KL of 2e-5..1.3e-4 (float64 twin, qwen3moe tiny/small,
#:   gemma3 tiny prefill), not far below the whole activation-quantization effect (vs the exact f32 reference:
#:   median 5e-5..2e-4, mean 3.0e-4..6.8e-4 on qwen3moe small, where the H100 default build measured a mean of
#:   3.2e-4 and 3.8e-4). The floor is measured per run: median <= max(3 x the float64 twin's median, 1e-4); a 5%
#:   attention-scale error is 10-30x the twin's median, one expert fewer 70-900x. Mean <= 2e-3 (the twin: <=
#:   5.5e-4).
E2E_GATES: dict[str, dict[str, float]] = {
    "f32": {"median_kl": 1e-5, "mean_kl": 3e-4, "top1_tol": 0.99},
    "int8": {"median_kl_noise_factor": 3.0, "median_kl_floor": 1e-4, "mean_kl": 2e-3, "top1_tol": 0.95},
}


def e2e_gate(m: Mapping, kind: str, noise: Mapping | None = None) -> dict:
    """Judge ``m`` (:func:`teacher_forced_compare` of a build against its reference) by :data:`E2E_GATES[kind]`.

    ``noise`` (the ``int8`` gate, required there): :func:`teacher_forced_compare` of the reference's float64 twin
    against the same reference, which sets the median limit. Returns ``passed``, ``limits`` (median_kl, mean_kl,
    top1_tol), ``ratios`` (each statistic over its limit; for top-1 the disagreements over those allowed: > 1 fails)
    and ``ratio`` (the largest: by how much the worst gate is missed, or how close it is)."""
    g = E2E_GATES[kind]
    if kind == "int8":
        if noise is None:
            raise ValueError("the int8 gate needs the float64 twin's comparison (noise=...)")
        med = max(g["median_kl_noise_factor"] * float(noise["median_kl"]), g["median_kl_floor"])
    else:
        med = g["median_kl"]
    limits = {"median_kl": med, "mean_kl": g["mean_kl"], "top1_tol": g["top1_tol"]}
    ratios = {"median_kl": float(m["median_kl"]) / med, "mean_kl": float(m["mean_kl"]) / g["mean_kl"],
              "top1_tol": (1.0 - float(m["top1_agreement_tol"])) / (1.0 - g["top1_tol"])}
    worst = max(ratios.values())
    return {"kind": kind, "passed": worst <= 1.0, "ratio": worst, "limits": limits, "ratios": ratios}


def centered_logprob_rel_rms(logits_a: np.ndarray, logits_b: np.ndarray) -> np.ndarray:
    """Per position: ``RMS(c(a) − c(b)) / RMS(c(b))`` where ``c(x)`` is the log-softmax of x minus its mean over the
    vocabulary (centering removes the per-row constant that log-softmax and raw logits differ by). (n,) array."""
    a = log_softmax(np.asarray(logits_a))
    b = log_softmax(np.asarray(logits_b))
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return np.sqrt(np.mean((a - b) ** 2, axis=-1)) / np.sqrt(np.mean(b**2, axis=-1))
