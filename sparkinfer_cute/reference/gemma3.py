"""Gemma 3 numpy reference forward (llama.cpp ``src/models/gemma3.cpp``, spec: shared/spec/models.md §4).

Per layer: RMSNorm → Q/K/V → per-head Q/K RMSNorm (no V norm) → NEOX RoPE (base 1e4 on sliding-window layers,
rope.freq_base on global ones) → Q·(1/sqrt(head_dim)) → attention with scale 1 (window on SWA layers) → Wo →
post-attention RMSNorm → residual; RMSNorm → GEGLU (tanh GELU) → post-FFW RMSNorm → residual. The input embedding is
multiplied by sqrt(n_embd); the output matrix is token_embd when there is no output.weight. Norm weights already
contain Gemma's "+1" (the converter adds it), so they multiply directly.
"""

from __future__ import annotations

import math

import numpy as np

from . import ops
from .base import ReferenceModel, _cfg


class Gemma3Reference(ReferenceModel):
    arch = "gemma3"

    def __init__(self, g, cfg=None, dtype=np.float32, max_context=None, emulate_cpu: bool = False):
        super().__init__(g, cfg, dtype, max_context, emulate_cpu)
        c = self.cfg
        self.window = int(_cfg(c, "sliding_window", 0) or 0)
        # f_attention_scale (gemma3.cpp load_arch_hparams): 1/sqrt(n_embd/n_head) for the 27B (62 layers),
        # 1/sqrt(head_dim) otherwise (Gemma3Config.attn_scale carries the same rule).
        if _cfg(c, "attn_scale", 0.0):
            self.q_scale = float(c.attn_scale)
        elif self.n_layer == 62:
            self.q_scale = 1.0 / math.sqrt(float(self.n_embd // self.n_head))
        else:
            self.q_scale = 1.0 / math.sqrt(float(self.head_dim))
        self.softcap = _cfg(c, "final_logit_softcap", None) or None
        self.out_name = "output.weight" if self.has("output.weight") else "token_embd.weight"

    def _is_swa(self, l: int) -> bool:
        return self.window > 0 and bool(self.cfg.is_swa(l))

    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        # ggml_scale(inpL, sqrtf(n_embd)): a float32 scalar.
        return self.embed_rows(tokens) * self.dtype.type(np.float32(math.sqrt(self.n_embd)))

    def _layer(self, l, x, positions, capture):
        p = f"blk.{l}."
        n = x.shape[0]
        H, Hkv, D = self.n_head, self.n_head_kv, self.head_dim
        dt = self.dtype.type
        h = self.norm(x, p + "attn_norm.weight")
        q = self.linear(h, p + "attn_q.weight").reshape(n, H, D)
        k = self.linear(h, p + "attn_k.weight").reshape(n, Hkv, D)
        v = self.linear(h, p + "attn_v.weight").reshape(n, Hkv, D)
        q = self.norm(q, p + "attn_q_norm.weight")
        k = self.norm(k, p + "attn_k_norm.weight")
        base = float(self.cfg.rope_base_for(l))
        fs = float(self.cfg.rope_freq_scale_for(l))
        rope = ops.rope_neox_llama_cpu if self.emulate_cpu else ops.rope_neox
        q = rope(q, positions, self.n_rot, base, freq_scale=fs)
        k = rope(k, positions, self.n_rot, base, freq_scale=fs)
        q = q * dt(np.float32(self.q_scale))
        K, V = self.kv.store(l, self.pos, k, v)
        o = self.attend(
            q,
            K.astype(self.dtype),
            V.astype(self.dtype),
            q_pos=positions,
            scale=1.0,
            window=self.window if self._is_swa(l) else None,
        )
        a = self.linear(o.reshape(n, H * D), p + "attn_output.weight")
        if self.emulate_cpu and l == self.n_layer - 1 and not getattr(self, "_last_layer_rows_all", True):
            a, x = a[-1:], x[-1:]  # llama.cpp's inp_out_ids: only the output row goes on through the FFN
        a = self.norm(a, p + "post_attention_norm.weight")
        x = x + a
        h = self.norm(x, p + "ffn_norm.weight")
        gelu = ops.gelu_tanh_fp16_table if self.emulate_cpu else ops.gelu_tanh
        f = gelu(self.linear(h, p + "ffn_gate.weight")) * self.linear(h, p + "ffn_up.weight")
        f = self.linear(f, p + "ffn_down.weight")
        f = self.norm(f, p + "post_ffw_norm.weight")
        if capture is not None:
            capture[f"attn_out.{l}"] = a
            capture[f"ffn_out.{l}"] = f
        return x + f

    def _output(self, x, capture):
        h = self.norm(x, "output_norm.weight")
        if capture is not None:
            capture["output_norm"] = h
        logits = self.linear(h, self.out_name, float_order=False)
        if self.softcap:
            c = self.dtype.type(self.softcap)
            logits = c * np.tanh(logits / c)
        return logits
