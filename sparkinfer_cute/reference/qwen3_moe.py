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
        name = f"blk.{l}.ffn_gate_inp.weight"
        if self.emulate_cpu:
            return self._route_llama_cpu(h, name)
        logits = self.linear(h, name)  # (n, n_expert); router is F32 in the file
        probs = ops.softmax(logits, axis=-1)
        sel = ops.topk_desc(probs, self.n_expert_used)
        w = np.take_along_axis(probs, sel, axis=-1)
        s = np.maximum(w.sum(axis=-1, keepdims=True), self.dtype.type(ops.ROUTER_WEIGHT_SUM_MIN))
        return sel, w / s

    def _route_llama_cpu(self, h: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`route` in llama.cpp's CPU float order (build_moe_ffn): the router product (F32 weight, so
        llamafile's F32 tinyBLAS or ggml_vec_dot_f32: :func:`ops.matmul_f32_llama_cpu`), ggml_soft_max
        (:func:`ops.softmax_llama_cpu`), top-k, ``ggml_sum_rows`` (a double sum rounded to f32), the clamp and
        ``ggml_div`` in f32."""
        f32 = np.float32
        t = self.g.tensor(name).ggml_type.name
        if t == "F32":
            logits = ops.matmul_f32_llama_cpu(np.asarray(h, f32), np.asarray(self.weight(name), f32))
        else:
            logits = np.asarray(self.linear(h, name), f32)
        probs = ops.softmax_llama_cpu(logits)
        sel = ops.topk_desc(probs, self.n_expert_used)
        w = np.take_along_axis(probs, sel, axis=-1)
        s = w.astype(np.float64).sum(axis=-1, keepdims=True).astype(f32)
        s = np.maximum(s, f32(ops.ROUTER_WEIGHT_SUM_MIN))
        return sel, (w / s).astype(f32)

    def _expert_matmul(self, x: np.ndarray, l: int, kind: str, e: int) -> np.ndarray:
        """x (n, n_in) times expert e's ``kind`` matrix. With ``emulate_cpu``, as llama.cpp's CPU backend runs
        ``ggml_mul_mat_id``: for Q4_K experts (CPU_REPACK) one gemv per routed row
        (:func:`ops.matmul_q4_K_llama_cpu` with ``gemv=True``), for Q6_K ones :func:`ops.matmul_q6_K_llama_cpu`,
        on Q8_K activations; other types: the activation rounding of :meth:`act_for` and an f64-exact product."""
        if kind in ("gate", "up") and not self.has(f"blk.{l}.ffn_{kind}_exps.weight"):
            name = f"blk.{l}.ffn_gate_up_exps.weight"
        else:
            name = f"blk.{l}.ffn_{kind}_exps.weight"
        if not self.emulate_cpu:
            return x @ self.expert(l, kind, e).T
        ti = self.g.tensor(name)
        if ti.ggml_type.name == "Q4_K" and "gate_up" not in name and int(ti.shape[1]) % 8 == 0:
            blk = self.experts.get(
                (l, kind, e, "q4k"),
                lambda: ops.q4_K_blocks(np.asarray(self.g.raw(name)[e]), int(ti.shape[1]), int(ti.shape[0])),
            )
            qa, da = ops.quantize_q8_K_blocks(x)
            return ops.matmul_q4_K_llama_cpu(qa, da, *blk, gemv=True).astype(self.dtype)
        if ti.ggml_type.name == "Q6_K" and "gate_up" not in name:
            # not repacked on x86: ggml-cpu/tiled's kernel when >= 8 rows go to this expert
            # (ggml_compute_forward_mul_mat_id_tiled, per-expert batch floor), ggml_vec_dot_q6_K_q8_K below
            blk = self.experts.get(
                (l, kind, e, "q6k"),
                lambda: ops.q6_K_blocks(np.asarray(self.g.raw(name)[e]), int(ti.shape[1]), int(ti.shape[0])),
            )
            qa, da = ops.quantize_q8_K_blocks(x)
            return ops.matmul_q6_K_llama_cpu(qa, da, *blk, vec_dot=x.shape[0] < 8).astype(self.dtype)
        xa = self.act_for(x, name).astype(np.float64)
        w = self.expert(l, kind, e).astype(np.float64)
        return (xa @ w.T).astype(np.float32).astype(self.dtype)

    def moe(self, h: np.ndarray, l: int, capture: dict | None = None) -> np.ndarray:
        sel, w = self.route(h, l)
        n, k = sel.shape
        out_k = np.zeros((n, k, self.n_embd), dtype=self.dtype)
        for e in np.unique(sel):
            tok, slot = np.nonzero(sel == e)
            he = h[tok]
            if self.emulate_cpu:
                g = self._expert_matmul(he, l, "gate", int(e))
                u = self._expert_matmul(he, l, "up", int(e))
                a = ops.swiglu_llama_cpu(g, u)
                y = self._expert_matmul(a, l, "down", int(e))
                out_k[tok, slot] = (y * w[tok, slot][:, None]).astype(self.dtype)
                if capture is not None:
                    for key, val in (("gate", g), ("up", u), ("swiglu", a), ("down", y)):
                        capture.setdefault(f"moe_{key}.{l}", np.zeros((n, k, val.shape[-1]), np.float32))
                        capture[f"moe_{key}.{l}"][tok, slot] = val
                continue
            gu_name = f"blk.{l}.ffn_gate_exps.weight"
            if not self.has(gu_name):
                gu_name = f"blk.{l}.ffn_gate_up_exps.weight"
            he_q = self.act_for(he, gu_name)
            g = he_q @ self.expert(l, "gate", int(e)).T
            u = he_q @ self.expert(l, "up", int(e)).T
            a = self.act_for(ops.silu(g) * u, f"blk.{l}.ffn_down_exps.weight")
            y = a @ self.expert(l, "down", int(e)).T
            out_k[tok, slot] = y * w[tok, slot][:, None]
        if capture is not None:
            capture[f"moe_sel.{l}"] = sel
            capture[f"moe_w.{l}"] = w
            capture[f"moe_weighted.{l}"] = out_k
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
        # self.norm: ops.rmsnorm (per head for Q/K), or with emulate_cpu its llama.cpp rounding
        h = self.norm(x, p + "attn_norm.weight")
        q, k, v = self._qkv(h, p)
        q = self.norm(q.reshape(n, H, D), p + "attn_q_norm.weight")
        k = self.norm(k.reshape(n, Hkv, D), p + "attn_k_norm.weight")
        v = v.reshape(n, Hkv, D)
        base = float(self.cfg.rope_base)
        rope = ops.rope_neox_llama_cpu if self.emulate_cpu else ops.rope_neox
        q = rope(q, positions, self.n_rot, base)
        k = rope(k, positions, self.n_rot, base)
        K, V = self.kv.store(l, self.pos, k, v)
        o = self.attend(q, K.astype(self.dtype), V.astype(self.dtype), q_pos=positions, scale=self.kq_scale)
        a = self.linear(o.reshape(n, H * D), p + "attn_output.weight")
        if self.emulate_cpu and l == self.n_layer - 1 and not getattr(self, "_last_layer_rows_all", True):
            a, x = a[-1:], x[-1:]  # llama.cpp's inp_out_ids: only the output row goes on through the FFN
        x = x + a
        h = self.norm(x, p + "ffn_norm.weight")
        f = self.moe(h, l, capture if self.emulate_cpu else None)
        if capture is not None:
            capture[f"q.{l}"] = q
            capture[f"k.{l}"] = k
            capture[f"attn_o.{l}"] = o
            capture[f"ffn_in_norm.{l}"] = h
            capture[f"attn_out.{l}"] = a
            capture[f"ffn_out.{l}"] = f
        return x + f

    def _output(self, x, capture):
        h = self.norm(x, "output_norm.weight")
        if capture is not None:
            capture["output_norm"] = h
        # the LM head feeds no later rounding: its float order is not emulated (float_order=False)
        return self.linear(h, self.out_name, float_order=False)
