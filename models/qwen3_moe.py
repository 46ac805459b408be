"""Qwen3-MoE GPU forward (spec: models.md §1; reference: sparkinfer_cute/reference/qwen3_moe.py).

Per layer: RMSNorm (fused with the previous block's residual add) → Q/K/V GEMVs → per-head Q/K RMSNorm → NEOX RoPE →
KV append (fp16) → flash-decoding attention (GQA, scale 1/sqrt(head_dim)) → Wo; RMSNorm (+residual) → router GEMV (F32)
→ softmax/top-k/renormalize on the device → fused selected-expert FFN: gate+up GEMVs with SwiGLU in registers for the
k routed experts, then the down projection weighted by the router and summed. Expert ids and weights stay on the GPU.
"""

from __future__ import annotations

import math

import numpy as np

from sparkinfer_cute.models import ops
from sparkinfer_cute.models.base import GPUDecoder
from sparkinfer_cute.runtime import DeviceArray


class Qwen3MoeGPU(GPUDecoder):
    LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q_norm.weight",
                     "attn_k_norm.weight", "attn_output.weight", "ffn_norm.weight", "ffn_gate_inp.weight",
                     "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")

    def alloc_buffers(self) -> None:
        c = self.cfg
        D, K = c.head_dim, c.n_expert_used
        f32 = np.float32
        self.alloc_block_buffers()                     # x, h, q, k, v, attn, delta, attn_ws, hq_out
        self.router_logits = DeviceArray.empty((c.n_expert,), f32)
        self.router_state = ops.RouterState(c.n_expert)
        self.expert_ids = DeviceArray.zeros((K,), np.int32)
        self.expert_w = DeviceArray.zeros((K,), f32)
        self.act = DeviceArray.empty((K, c.n_ff_exp), f32)
        self.scale = 1.0 / math.sqrt(D)
        self.out_w = self.w["token_embd.weight"] if c.tied_output else self.w["output.weight"]
        self.q8_attn = ops.dp4a_for("attn")
        self.q8_moe = ops.dp4a_for("moe")
        self.hq = ops.new_q8(c.n_embd)                 # q8_1 copy of the normed input (dp4a GEMVs)
        self.attnq = ops.new_q8(self.attn.size)        # q8_1 copy of the attention output (dp4a o-proj)
        self.actq = ops.MoeActQ8(K, c.n_ff_exp)       # q8_1 copy of the SwiGLU activations (dp4a down)

    def enqueue_step(self, stream, n_layers: int | None = None) -> None:
        c, w = self.cfg, self.w
        eps = c.rms_eps
        ops.embedding(w["token_embd.weight"], self.tok, self.x, scale=1.0, stream=stream)
        hq_attn = self.hq if self.q8_attn else None
        last = (c.n_layer if n_layers is None else n_layers) - 1
        # h = rmsnorm(x, attn_norm) [+ q8_1]: here for layer 0, then after each layer's experts (x += delta first)
        ops.rmsnorm(self.x, w["blk.0.attn_norm.weight"], self.h, eps, stream=stream, xq=hq_attn)
        for l in range(last + 1):
            p = f"blk.{l}."
            a = self.attn_layers[l]
            ops.gemv_qkv(w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"], self.h, self.q,
                         self.k, self.v, stream=stream, xq=hq_attn)
            # Q/K norm + RoPE + KV append + attention; q_scale 1: the scale stays on q·k (as before the fused Q/K
            # kernel existed); aq: the int8 O projection's input, quantized by attention
            aq = self.attnq if self.q8_attn else None
            ops.self_attention(self.kv, l, a, self.q, self.k, self.v, w[p + "attn_q_norm.weight"],
                               w[p + "attn_k_norm.weight"], self.pos_buf, self.attn, self.attn_ws, eps=eps, q_scale=1.0,
                               scale=self.scale, stream=stream, xq=aq)
            ops.gemv(w[p + "attn_output.weight"], self.attn, self.delta, stream=stream, xq=aq)
            hq = self.hq if self.q8_moe else None
            wr = w[p + "ffn_gate_inp.weight"]
            route = None
            if ops.enabled("fused_router") and wr.qtype == "F32":
                # x += delta; h = rmsnorm(x, ffn_norm) [+ q8_1]: formed by the router, which the experts' op runs
                # first (ops.RouteFirst; in the same launch with pass fused_route_gate_up)
                route = ops.RouteFirst(wr, self.h, self.expert_w, c.n_expert_used, self.router_state,
                                       prenorm=(self.x, self.delta, w[p + "ffn_norm.weight"], eps, hq))
            else:
                ops.rmsnorm(self.x, w[p + "ffn_norm.weight"], self.h, eps, residual=self.delta, stream=stream, xq=hq)
                ops.gemv(wr, self.h, self.router_logits, stream=stream)
                ops.router(self.router_logits, self.expert_ids, self.expert_w, c.n_expert_used, stream=stream)
            actq = self.actq if self.q8_moe else None
            # the experts' down projection, then x += delta and the next norm of x: the next layer's attn_norm, or
            # the final norm (+ the int8 LM head's q8_1 input); with n_layers, the last layer leaves x + delta
            # unadded (hidden_after_layers)
            if l < last:
                nxt = (w[f"blk.{l + 1}.attn_norm.weight"], self.h, hq_attn)
            else:
                nxt = (w["output_norm.weight"], self.h, self.lm_head_q8()) if n_layers is None else None
            down = ops.ExpertsDown(w[p + "ffn_down_exps.weight"], self.delta,
                                   ops.AfterFfn(self.x, eps, self.tail_counter, nxt) if nxt is not None else None)
            if route is not None:  # routing, gate/up and down (one launch with fused_route_gate_up, fused_experts_down)
                ops.moe_gate_up(w[p + "ffn_gate_exps.weight"], w[p + "ffn_up_exps.weight"], self.h, self.expert_ids,
                                self.act, stream=stream, hq=hq, actq=actq, route=route, down=down)
            else:
                ops.moe_gate_up(w[p + "ffn_gate_exps.weight"], w[p + "ffn_up_exps.weight"], self.h, self.expert_ids,
                                self.act, stream=stream, hq=hq, actq=actq)
                ops.moe_down(down.w_down, self.act, self.expert_ids, self.expert_w, down.out, stream=stream,
                             actq=actq, after=down.after)
        if n_layers is not None:
            return  # hidden state = x + delta (hidden_after_layers)
        self.enqueue_logits(stream, self.lm_head_q8())  # h (and its q8_1 copy): the last layer's tail

    # ------------------------------------------------------------------ batched prefill (same math, T rows)
    def alloc_prefill(self, chunk: int):
        c = self.cfg
        return ops.PrefillBuffers(c, chunk, self.kv, n_q=self.q.size, n_kv=self.k.size,
                                  moe=(c.n_expert, c.n_expert_used, c.n_ff_exp))

    def enqueue_prefill(self, s, T: int, all_logits=None, n_layers: int | None = None) -> None:
        """Prompt chunk of T tokens (ids in ``pf.tok``, positions in ``pf.pos``): every layer over the T rows with
        int8-activation GEMMs, K/V of all T appended to the cache; then the last row (or, with ``all_logits``, every
        row) through the final norm and the LM head, argmax into ``self.tok``. ``n_layers``: stop after that many
        layers, ``pf.x`` the residual stream (:meth:`prefill_hidden_after_layers`)."""
        c, w, pf = self.cfg, self.w, self._pf
        H, eps = c.n_head, c.rms_eps
        ops.embedding_rows(w["token_embd.weight"], pf.tok, pf.x, T, scale=1.0, stream=s)
        for l in range(c.n_layer if n_layers is None else n_layers):
            p = f"blk.{l}."
            ops.rmsnorm_rows(pf.x, w[p + "attn_norm.weight"], pf.h, T, eps, xq=pf.hq, stream=s)
            ops.gemm(w[p + "attn_q.weight"], pf.hq, pf.q, T, stream=s)
            ops.gemm(w[p + "attn_k.weight"], pf.hq, pf.k, T, stream=s)
            ops.gemm(w[p + "attn_v.weight"], pf.hq, pf.v, T, stream=s)
            ops.qk_norm_rope_kv_rows(self.kv, l, pf, T, w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"],
                                     n_head=H, n_rot=c.n_rot, base=c.rope_base, eps=eps, q_scale=1.0, stream=s)
            ops.attention_rows(self.kv, l, pf, T, n_head=H, scale=self.scale, window=0, stream=s)
            ops.quantize_rows(pf.attn, pf.attnq, T, stream=s)
            ops.gemm(w[p + "attn_output.weight"], pf.attnq, pf.x, T, accumulate=True, stream=s)  # x += Wo attn
            ops.rmsnorm_rows(pf.x, w[p + "ffn_norm.weight"], pf.h, T, eps, xq=pf.hq, stream=s)
            ops.moe_rows(w[p + "ffn_gate_inp.weight"], w[p + "ffn_gate_exps.weight"], w[p + "ffn_up_exps.weight"],
                         w[p + "ffn_down_exps.weight"], pf, T, act="silu", accumulate_into=pf.x, stream=s)
        if n_layers is None:
            self._prefill_output(s, T, all_logits)

    def _prefill_output(self, s, T: int, all_logits=None) -> None:
        c, w, pf = self.cfg, self.w, self._pf
        if all_logits is not None:
            ops.rmsnorm_rows(pf.x, w["output_norm.weight"], pf.h, T, c.rms_eps, xq=pf.hq, stream=s)
            self.enqueue_all_logits(s, T, all_logits)
            return
        hq = self.lm_head_q8()
        ops.rmsnorm(ops.row(pf.x, T - 1), w["output_norm.weight"], self.h, c.rms_eps, stream=s, xq=hq)
        self.enqueue_logits(s, hq)
