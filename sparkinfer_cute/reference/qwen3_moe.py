"""Qwen3-MoE numpy reference forward (llama.cpp ``src/models/qwen3moe.cpp`` + ``build_moe_ffn``; spec:
shared/spec/models.md §1).

Per layer: RMSNorm → Q/K/V → per-head Q/K RMSNorm → NEOX RoPE → attention (scale 1/sqrt(head_dim), GQA) → Wo →
residual; RMSNorm → router (softmax over all experts, top-k by ``ggml_argsort_top_k``, weights renormalised by
``max(sum, 2**-14)``) → SwiGLU experts → weighted outputs summed in top-k order → residual. No embedding scale;
``output.weight`` (or token_embd when absent).

Experts are dequantized lazily, only those a token routes to, one (layer, tensor, expert) matrix at a time from
``GGUFFile.raw`` slices, and kept in an LRU cache: a Qwen3-30B-A3B file never has all of its experts dequantized.
"""

from __future__ import annotations

import math

import numpy as np

from ..gguf.quants import dequantize
from . import ops
from .base import LRUCache, ReferenceModel, _cfg


class Qwen3MoeReference(ReferenceModel):
    arch = "qwen3moe"

    def __init__(
        self,
        g,
        cfg=None,
        dtype=np.float32,
        max_context=None,
        emulate_cpu: bool = False,
        expert_cache_size: int = 384,
    ):
        super().__init__(g, cfg, dtype, max_context, emulate_cpu)
        c = self.cfg
        self.n_expert = int(c.n_expert)
        self.n_expert_used = int(c.n_expert_used)
        self.n_ff_exp = int(_cfg(c, "n_ff_exp", 0) or 0)
        self.kq_scale = 1.0 / math.sqrt(float(self.head_dim))
        self.out_name = "output.weight" if self.has("output.weight") else "token_embd.weight"
        self.experts = LRUCache(expert_cache_size)

    # ------------------------------------------------------------------ experts
    def expert(self, l: int, kind: str, e: int) -> np.ndarray:
        """Expert ``e``'s matrix of ``kind`` ("gate", "up", "down") in layer l, (n_out, n_in) in ``dtype``."""
        return self.experts.get((l, kind, e), lambda: self._dequant_expert(l, kind, e))

    def _dequant_expert(self, l: int, kind: str, e: int) -> np.ndarray:
        p = f"blk.{l}."
        if kind in ("gate", "up") and not self.has(p + f"ffn_{kind}_exps.weight"):
            # fused ffn_gate_up_exps {n_embd, 2*n_ff_exp, n_expert}: gate rows first, then up.
            name = p + "ffn_gate_up_exps.weight"
            ti = self.g.check_supported(name)
            w = dequantize(np.asarray(self.g.raw(name)[e]), ti.ggml_type).reshape(ti.shape[1], ti.shape[0])
            half = ti.shape[1] // 2
            w = w[:half] if kind == "gate" else w[half:]
        else:
            name = p + f"ffn_{kind}_exps.weight"
            ti = self.g.check_supported(name)
            w = dequantize(np.asarray(self.g.raw(name)[e]), ti.ggml_type).reshape(ti.shape[1], ti.shape[0])
        return np.ascontiguousarray(w, dtype=self.dtype)

    def route(self, h: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray]:
        """Router of layer l for normed activations h (n, n_embd): (selected experts (n, k) in top-k order,
        their renormalised weights (n, k))."""
        logits = self.linear(h, f"blk.{l}.ffn_gate_inp.weight")  # (n, n_expert); router is F32 in the file
        probs = ops.softmax(logits, axis=-1)
        sel = ops.topk_desc(probs, self.n_expert_used)
        w = np.take_along_axis(probs, sel, axis=-1)
        s = np.maximum(w.sum(axis=-1, keepdims=True), self.dtype.type(ops.ROUTER_WEIGHT_SUM_MIN))
        return sel, w / s

    def moe(self, h: np.ndarray, l: int) -> np.ndarray:
        sel, w = self.route(h, l)
        n, k = sel.shape
        out_k = np.zeros((n, k, self.n_embd), dtype=self.dtype)
        for e in np.unique(sel):
            tok, slot = np.nonzero(sel == e)
            he = h[tok]
            gu_name = f"blk.{l}.ffn_gate_exps.weight"
            if not self.has(gu_name):
                gu_name = f"blk.{l}.ffn_gate_up_exps.weight"
            he_q = self.act_for(he, gu_name)
            g = he_q @ self.expert(l, "gate", int(e)).T
            u = he_q @ self.expert(l, "up", int(e)).T
            a = self.act_for(ops.silu(g) * u, f"blk.{l}.ffn_down_exps.weight")
            y = a @ self.expert(l, "down", int(e)).T
            out_k[tok, slot] = y * w[tok, slot][:, None]
        # llama.cpp adds the k weighted expert outputs one after the other, in top-k order.
        out = out_k[:, 0].copy()
        for j in range(1, k):
            out += out_k[:, j]
        return out

    # ------------------------------------------------------------------ layer
    def _qkv(self, h: np.ndarray, p: str):
        if self.has(p + "attn_qkv.weight"):
            qkv = self.linear(h, p + "attn_qkv.weight")
            nq, nk = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
            return qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
        return (
            self.linear(h, p + "attn_q.weight"),
            self.linear(h, p + "attn_k.weight"),
            self.linear(h, p + "attn_v.weight"),
        )

    def _layer(self, l, x, positions, capture):
        p = f"blk.{l}."
        n = x.shape[0]
        H, Hkv, D = self.n_head, self.n_head_kv, self.head_dim
        h = ops.rmsnorm(x, self.weight(p + "attn_norm.weight"), self.eps)
        q, k, v = self._qkv(h, p)
        q = ops.rmsnorm_per_head(q.reshape(n, H, D), self.weight(p + "attn_q_norm.weight"), self.eps)
        k = ops.rmsnorm_per_head(k.reshape(n, Hkv, D), self.weight(p + "attn_k_norm.weight"), self.eps)
        v = v.reshape(n, Hkv, D)
        base = float(self.cfg.rope_base)
        q = ops.rope_neox(q, positions, self.n_rot, base)
        k = ops.rope_neox(k, positions, self.n_rot, base)
        K, V = self.kv.store(l, self.pos, k, v)
        o = self.attend(q, K.astype(self.dtype), V.astype(self.dtype), q_pos=positions, scale=self.kq_scale)
        a = self.linear(o.reshape(n, H * D), p + "attn_output.weight")
        x = x + a
        h = ops.rmsnorm(x, self.weight(p + "ffn_norm.weight"), self.eps)
        f = self.moe(h, l)
        if capture is not None:
            capture[f"attn_out.{l}"] = a
            capture[f"ffn_out.{l}"] = f
        return x + f

    def _output(self, x, capture):
        h = ops.rmsnorm(x, self.weight("output_norm.weight"), self.eps)
        if capture is not None:
            capture["output_norm"] = h
        return self.linear(h, self.out_name)
