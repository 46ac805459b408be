"""Token sampling on the host (numpy). Greedy decode on the GPU never comes here: it takes the device argmax and only
the id crosses to the host. Temperature / top-k / top-p sampling downloads the last logits row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 40  # 0 = no limit
    top_p: float = 0.95
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Sampler:
    def __init__(self, cfg: SamplerConfig):
        if not cfg.temperature >= 0:  # also refuses NaN
            raise ValueError("temperature must be >= 0")
        if cfg.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = no limit)")
        if cfg.seed is not None and cfg.seed < 0:
            raise ValueError("seed must be >= 0")
        if not (0.0 < cfg.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.cfg.greedy:
            return int(np.argmax(logits))  # ties -> lowest id, as the device argmax kernel
        z = logits / self.cfg.temperature
        order = np.argsort(-z, kind="stable")
        if self.cfg.top_k > 0:
            order = order[: self.cfg.top_k]
        zz = z[order] - z[order[0]]
        p = np.exp(zz)
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.cfg.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])
