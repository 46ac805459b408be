"""Gemma 4 numpy reference forward (llama.cpp ``src/models/gemma4.cpp`` + ``build_moe_ffn`` / ``build_ffn`` of
``src/llama-graph.cpp``; spec: shared/spec/models.md §3, corrected below where llama.cpp 0c1e570 differs).

Per layer l (geometry from :class:`~sparkinfer_cute.gguf.config.Gemma4Config`: sliding layers hd 256 / 8 KV heads /
window / base 1e4, full layers hd 512 / 2 KV heads / base 1e6 with ``rope_freqs``, for 26B-A4B)::

    h  = rmsnorm(x, attn_norm)
    q  = rmsnorm_per_head(Wq h, attn_q_norm)
    kr = Wk h;  vr = Wv h, or kr when the layer has no attn_v (K = V: V is the *raw* K projection)
    k  = rmsnorm_per_head(kr, attn_k_norm);  v = rmsnorm_per_head(vr, no weight)
    q, k = rope_neox(q, k, n_rot_l, base_l, freq_factors = rope_freqs on full layers)
    o  = attention(q, k, v, scale 1.0, causal + window on sliding layers)      # K/V stored fp16 (F16 cache)
    x1 = x + rmsnorm(Wo o, post_attention_norm)
    MoE layer:  m = rmsnorm(GeGLU_dense(rmsnorm(x1, ffn_norm)), post_ffw_norm_1)
                r = rmsnorm(x1, no weight) * (1/sqrt(n_embd)) * ffn_gate_inp.scale
                p = softmax(W_gate_inp r); top-k; w = p_top / max(sum p_top, 2^-14)
                e_in = rmsnorm(x1, pre_ffw_norm_2)
                y = Σ_j w_j * down_scale[e_j] * Wdown_e( gelu(Wgate_e e_in) * Wup_e e_in )
                f = m + rmsnorm(y, post_ffw_norm_2)
    dense layer: f = GeGLU_dense(rmsnorm(x1, ffn_norm))
    x  = (x1 + rmsnorm(f, post_ffw_norm)) * layer_output_scale   (the scale only if the file has it)

Input ``token_embd[tok] * sqrtf(n_embd)``; logits ``softcap * tanh(W_out rmsnorm(x, output_norm) / softcap)`` with W_out
= token_embd when there is no ``output.weight``. GeGLU is the tanh GELU (``ggml_geglu_split``). Norm weights are
used as stored (Gemma 4 has no +1).

Spec errors found against llama.cpp 0c1e570 (src/models/gemma4.cpp, src/llama-model.cpp, src/llama-hparams.h):

* ``final_logit_softcapping`` is optional but defaults to **30** when absent (llama_hparams default, which gemma4 does
  not reset as gemma3 does); only an explicit 0 disables the cap. The spec lists the key without its default.
* ``rope_freqs.weight`` has {n_embd_head/2} elements of the full layers' head (256 for hd 512), not n_rot/2, and it is
  *required* as soon as one full layer exists (created with flag 0 at the first full layer).
* ``attention.sliding_window_pattern`` and ``attention.sliding_window`` are required keys, and at least one layer
  must be sliding (the iSWA KV cache asserts it); ``rope.dimension_count_swa`` defaults to the *full* layers' n_rot,
  not to key_length_swa; ``attention.value_length`` defaults to n_embd/n_head and must equal key_length.
* ``ffn_down_exps.scale`` and ``layer_output_scale.weight`` are optional per layer (the spec's tensor list shows the
  per-expert scale without saying so).
* Q4_K_M types (§3 "Derived Q4_K_M consequence"): attn_v's use_more_bits counts the attn_v tensors (25 in 26B-A4B,
  the K = V layers have none), not the layers, so its Q6_K attn_v are those of layers 0-2, 6, 9, 13, 16, 20, 24-28
  (src/llama-quant.cpp i_attention_wv / n_attention_wv); ffn_down(_exps) do go by layer (n_expert > 1).
* The spec's "Q/K norms ... rope" order and K = V semantics are right: V takes the K projection before attn_k_norm
  and before RoPE, and is RMS-normed without a weight.

Notes for the GPU forward: the top-k renormalisation is invisible in Gemma 4 (post_ffw_norm_2 RMS-normalises
the weighted expert sum, so a per-token factor cancels, up to the eps in the norm), but the per-expert down
scale is not (it weights experts against each other); the router reads x1 itself, not the pre_ffw_norm_2
output the experts multiply.

Experts are dequantized lazily, one (layer, kind, expert) matrix at a time from ``GGUFFile.raw`` slices, and kept in
an LRU cache, as in qwen3_moe.py. ``emulate_cpu`` (llama.cpp CPU-backend numerics) is not implemented for Gemma 4:
asking for it warns and runs the exact float math. Per-layer embeddings and KV sharing (E2B/E4B) are refused.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import GGUFError
from ..gguf.config import Gemma4Config, validate_tensors
from ..gguf.quants import dequantize
from . import ops
from .base import LRUCache, ReferenceModel, _KVCache


class Gemma4Reference(ReferenceModel):
    arch = "gemma4"

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
        if not isinstance(c, Gemma4Config):
            raise TypeError(f"Gemma4Reference needs a Gemma4Config, got {type(c).__name__}")
        validate_tensors(self.g, c)
        if c.n_embd_per_layer or c.shared_kv_layers:
            raise GGUFError(
                self.g.path,
                "Gemma 4 per-layer embeddings / KV sharing (E2B, E4B) are not implemented in the reference forward",
            )
        if self.emulate_cpu:
            warnings.warn(
                "llama.cpp CPU numerics emulation is not implemented for gemma4: using exact float math",
                RuntimeWarning,
                stacklevel=2,
            )
            self.emulate_cpu = False
        self.n_expert = int(c.n_expert)
        self.n_expert_used = int(c.n_expert_used)
        self.softcap = c.final_logit_softcap
        self.out_name = "output.weight" if self.has("output.weight") else "token_embd.weight"
        self.experts = LRUCache(expert_cache_size)

    def reset(self) -> None:
        """Empty the KV cache (per-layer K/V shapes: sliding and full layers differ)."""
        c, L = self.cfg, self.n_layer
        self.pos = 0
        self.kv = _KVCache(
            L,
            [c.n_head_kv_for(l) for l in range(L)],
            [c.head_dim_for(l) for l in range(L)],
            [c.head_dim_v_for(l) for l in range(L)],
        )

    # ------------------------------------------------------------------ experts
    def expert(self, l: int, kind: str, e: int) -> np.ndarray:
        """Expert ``e``'s matrix of ``kind`` ("gate", "up", "down") in layer l, (n_out, n_in) in ``dtype``."""
        return self.experts.get((l, kind, e), lambda: self._dequant_expert(l, kind, e))

    def _dequant_expert(self, l: int, kind: str, e: int) -> np.ndarray:
        p = f"blk.{l}."
        fused = kind in ("gate", "up") and self.cfg.fused_gate_up_exps
        name = p + ("ffn_gate_up_exps.weight" if fused else f"ffn_{kind}_exps.weight")
        ti = self.g.check_supported(name)
        w = dequantize(np.asarray(self.g.raw(name)[e]), ti.ggml_type).reshape(ti.shape[1], ti.shape[0])
        if fused:  # {n_embd, 2*n_ff_exp, n_expert}: gate rows first, then up (build_moe_ffn's two views)
            half = ti.shape[1] // 2
            w = w[:half] if kind == "gate" else w[half:]
        return np.ascontiguousarray(w, dtype=self.dtype)

    def route(self, x1: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Router of layer l on the attention output ``x1`` (n, n_embd), the residual itself, not a normed copy:
        returns (selected experts (n, k) in top-k order, their renormalised weights (n, k), router logits
        (n, n_expert))."""
        p = f"blk.{l}."
        dt = self.dtype.type
        r = ops.rmsnorm(x1, None, self.eps) * dt(self.cfg.router_input_scale)
        r = r * self.weight(p + "ffn_gate_inp.scale")
        logits = self.linear(r, p + "ffn_gate_inp.weight")
        probs = ops.softmax(logits, axis=-1)
        sel = ops.topk_desc(probs, self.n_expert_used)
        w = np.take_along_axis(probs, sel, axis=-1)
        s = np.maximum(w.sum(axis=-1, keepdims=True), dt(ops.ROUTER_WEIGHT_SUM_MIN))
        return sel, w / s, logits

    def moe(self, e_in: np.ndarray, x1: np.ndarray, l: int, capture: dict | None = None) -> np.ndarray:
        """Routed experts of layer l: ``e_in`` = rmsnorm(x1, pre_ffw_norm_2) is what the experts multiply, ``x1``
        what the router reads. Weighted outputs summed in top-k order, as llama.cpp adds them."""
        sel, w, logits = self.route(x1, l)
        n, k = sel.shape
        scale_name = f"blk.{l}.ffn_down_exps.scale"
        down_scale = self.weight(scale_name) if self.cfg.has_down_exps_scale(l) else None
        p = f"blk.{l}."
        gate_name = p + ("ffn_gate_up_exps.weight" if self.cfg.fused_gate_up_exps else "ffn_gate_exps.weight")
        out_k = np.zeros((n, k, self.n_embd), dtype=self.dtype)
        for e in np.unique(sel):
            e = int(e)
            tok, slot = np.nonzero(sel == e)
            # act_for: the activation rounding of an int8 GPU build (act_q8_1; gate and up share one input)
            he = self.act_for(e_in[tok], gate_name)
            a = ops.gelu_tanh(he @ self.expert(l, "gate", e).T) * (he @ self.expert(l, "up", e).T)
            y = self.act_for(a, p + "ffn_down_exps.weight") @ self.expert(l, "down", e).T
            if down_scale is not None:  # build_lora_mm_id's w_s: the down product times scale[e], then the weight
                y = y * down_scale[e]
            out_k[tok, slot] = y * w[tok, slot][:, None]
        if capture is not None:
            capture[f"moe_logits.{l}"] = logits
            capture[f"moe_sel.{l}"] = sel
            capture[f"moe_w.{l}"] = w
        out = out_k[:, 0].copy()
        for j in range(1, k):
            out += out_k[:, j]
        return out

    def dense_mlp(self, h: np.ndarray, l: int) -> np.ndarray:
        """``build_ffn(..., LLM_FFN_GELU, LLM_FFN_PAR)``: Wdown(gelu(Wgate h) * Wup h)."""
        p = f"blk.{l}."
        f = ops.gelu_tanh(self.linear(h, p + "ffn_gate.weight")) * self.linear(h, p + "ffn_up.weight")
        return self.linear(f, p + "ffn_down.weight")

    # ------------------------------------------------------------------ layer
    def _qkv(self, h: np.ndarray, l: int):
        """The raw projections q (n, H*d), k (n, nkv*d) and v (K = V: the k projection itself)."""
        c, p = self.cfg, f"blk.{l}."
        if c.fused_qkv:
            d, nkv = c.head_dim_for(l), c.n_head_kv_for(l)
            qkv = self.linear(h, p + "attn_qkv.weight")
            nq, nk = self.n_head * d, nkv * d
            return qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
        q = self.linear(h, p + "attn_q.weight")
        k = self.linear(h, p + "attn_k.weight")
        v = self.linear(h, p + "attn_v.weight") if c.has_v(l) else k
        return q, k, v

    def _layer(self, l, x, positions, capture):
        c, p = self.cfg, f"blk.{l}."
        n = x.shape[0]
        H, Hkv, D = self.n_head, c.n_head_kv_for(l), c.head_dim_for(l)
        h = self.norm(x, p + "attn_norm.weight")
        q, k, v = self._qkv(h, l)
        q = self.norm(q.reshape(n, H, D), p + "attn_q_norm.weight")
        k = self.norm(k.reshape(n, Hkv, D), p + "attn_k_norm.weight")
        v = ops.rmsnorm(v.reshape(n, Hkv, c.head_dim_v_for(l)), None, self.eps)
        ff = self.weight("rope_freqs.weight") if c.uses_rope_freqs(l) else None
        rope_args = (positions, c.n_rot_for(l), float(c.rope_base_for(l)))
        fs = float(c.rope_freq_scale_for(l))
        q = ops.rope_neox(q, *rope_args, freq_factors=ff, freq_scale=fs)
        k = ops.rope_neox(k, *rope_args, freq_factors=ff, freq_scale=fs)
        K, V = self.kv.store(l, self.pos, k, v)
        o = self.attend(
            q, K.astype(self.dtype), V.astype(self.dtype), q_pos=positions, scale=c.attn_scale, window=c.window_for(l)
        )
        a = self.norm(self.linear(o.reshape(n, -1), p + "attn_output.weight"), p + "post_attention_norm.weight")
        x1 = x + a
        if c.is_moe(l):
            m = self.norm(self.dense_mlp(self.norm(x1, p + "ffn_norm.weight"), l), p + "post_ffw_norm_1.weight")
            y = self.moe(self.norm(x1, p + "pre_ffw_norm_2.weight"), x1, l, capture)
            y = self.norm(y, p + "post_ffw_norm_2.weight")
            f = m + y
        else:
            m = y = None
            f = self.dense_mlp(self.norm(x1, p + "ffn_norm.weight"), l)
        f = self.norm(f, p + "post_ffw_norm.weight")
        out = x1 + f
        if c.has_out_scale(l):
            out = out * self.weight(p + "layer_output_scale.weight")
        if capture is not None:
            capture[f"q.{l}"] = q
            capture[f"k.{l}"] = k
            capture[f"v.{l}"] = v
            capture[f"attn_o.{l}"] = o
            capture[f"attn_out.{l}"] = a
            if m is not None:
                capture[f"ffn_mlp.{l}"] = m
                capture[f"ffn_moe.{l}"] = y
            capture[f"ffn_out.{l}"] = f
        return out

    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.embed_rows(tokens) * self.dtype.type(self.cfg.embd_scale)

    def _output(self, x, capture):
        h = self.norm(x, "output_norm.weight")
        if capture is not None:
            capture["output_norm"] = h
        logits = self.linear(h, self.out_name, float_order=False)
        if self.softcap:
            # ggml_scale(1/c) -> ggml_tanh -> ggml_scale(c), each in f32
            dt = self.dtype.type
            logits = np.tanh(logits * dt(np.float32(1.0) / np.float32(self.softcap))) * dt(self.softcap)
        return logits
