"""Gemma 3 GPU forward (spec: models.md §4; reference: sparkinfer_cute/reference/gemma3.py).

Per layer: Q/K/V GEMVs of h → per-head Q/K RMSNorm → NEOX RoPE (base 1e4 on sliding-window layers, rope.freq_base on
global ones, theta / rope.scaling.factor there with linear scaling: 4B and larger) → KV append (fp16) →
flash-decoding attention (window on SWA layers; the reference's q·(1/sqrt(head_dim)) with scale 1 is folded into the
attention scale) → Wo → post-attention RMSNorm + residual + ffn_norm (one launch) →
gate/up GEMVs with GeGLU (tanh GELU) → down GEMV → post-FFW RMSNorm + residual + the next attn_norm (one launch).
Input embedding × sqrt(n_embd); tied output (token_embd) when there is no output.weight.
"""

from __future__ import annotations

import math

import numpy as np

from sparkinfer_cute.models import ops
from sparkinfer_cute.models.base import GPUDecoder
from sparkinfer_cute.runtime import DeviceArray


class Gemma3GPU(GPUDecoder):
    # f32 activations for the LM head by default: the 270M's greedy text has near-ties (0.013 nats at token 16 of the
    # README prompt, tests/reference) that int8 activations could flip; SPARKINFER_DP4A=all opts in.
    LM_HEAD_DP4A_AUTO = False
    LINEAR_ROPE_SCALING = True  # 4B and larger: the global layers' RoPE divided by rope.scaling.factor (8)
    LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q_norm.weight",
                     "attn_k_norm.weight", "attn_output.weight", "post_attention_norm.weight", "ffn_norm.weight",
                     "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight")

    def alloc_buffers(self) -> None:
        c = self.cfg
        E, H, D = c.n_embd, c.n_head, c.head_dim
        f32 = np.float32
        self.alloc_block_buffers()                   # x (residual stream), h (normed block input), q, k, v, attn, delta
        self.o = DeviceArray.empty((E,), f32)        # attention output projection, before its post-norm
        self.gate = DeviceArray.empty((c.n_ff,), f32)
        self.up = DeviceArray.empty((c.n_ff,), f32)
        self.act = DeviceArray.empty((c.n_ff,), f32)
        self.dense_ids = ops.dense_expert_ids()       # the dense GLU as expert 0 of the MoE gate/up kernel
        self.one = DeviceArray.from_numpy(np.ones(1, f32))  # the post-FFN chain's residual scale (Gemma 3 has none)
        # q/k/v rows packed into one weight per layer: one GEMV where the chunk kernel's multi-matrix launch does not
        # apply (the 270M: n_embd 640, Q8_0)
        self.qkv_w = {}
        for l in range(c.n_layer):
            names = [f"blk.{l}.attn_{t}.weight" for t in "qkv"]
            if ops.packs_rows([self.w[n] for n in names]):
                # all three, else q and k when v's type differs (Q4_K_M's Q6_K attn_v layers)
                self.qkv_w[l] = (self.fuse_rows(names, f"blk.{l}.attn_qkv(packed)")
                                 or self.fuse_rows(names[:2], f"blk.{l}.attn_qk(packed)"))
        self.f = DeviceArray.empty((E,), f32)
        # 27B rule (gemma3.cpp): 1/sqrt(n_embd/n_head) for 62 layers, else 1/sqrt(head_dim)
        self.q_scale = 1.0 / math.sqrt(E // H) if c.n_layer == 62 else 1.0 / math.sqrt(D)
        self.out_w = self.w["token_embd.weight"] if c.tied_output else self.w["output.weight"]
        self.rope_ff = self.linear_rope_factors()  # {global layer: factor vector} with linear RoPE scaling, else {}

    def enqueue_step(self, stream, n_layers: int | None = None) -> None:
        c, w = self.cfg, self.w
        E, eps = c.n_embd, c.rms_eps
        ops.embedding(w["token_embd.weight"], self.tok, self.x, scale=math.sqrt(E), stream=stream)
        last = (c.n_layer if n_layers is None else n_layers) - 1
        # h = rmsnorm(x, attn_norm): here for layer 0 (x: the embedding), then by the previous layer's post-FFN chain
        ops.rmsnorm(self.x, w["blk.0.attn_norm.weight"], self.h, eps, stream=stream)
        for l in range(last + 1):
            p = f"blk.{l}."
            a = self.attn_layers[l]
            q, k, v, qkv = self.packed_qkv(l)
            packed = None if self.qkv_w.get(l) is None else (self.qkv_w[l], qkv)
            ops.gemv_qkv(w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"], self.h, q, k, v,
                         stream=stream, packed=packed)
            ops.self_attention(self.kv, l, a, q, k, v, w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"],
                               self.pos_buf, self.attn, self.attn_ws, eps=eps, q_scale=self.q_scale, scale=1.0,
                               stream=stream, freq_factors=self.rope_ff.get(l))
            # then x += rmsnorm(o, post_attention_norm); h = rmsnorm(x, ffn_norm): the O projection's tail
            ops.gemv(w[p + "attn_output.weight"], self.attn, self.o, stream=stream,
                     after=ops.AfterAttention(self.x, w[p + "post_attention_norm.weight"],
                                              [(w[p + "ffn_norm.weight"], self.h)], eps, self.tail_counter,
                                              self.delta))
            ops.dense_glu(w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], self.h, self.gate, self.up, self.act,
                          act="gelu_tanh", ids0=self.dense_ids, stream=stream)
            # then x += rmsnorm(f, post_ffw_norm); h = the next layer's attn_norm of x, or after the last layer the
            # final output_norm (+ the int8 LM head's q8_1 input under SPARKINFER_DP4A=all): the down projection's tail
            if l < last:
                nxt = (w[f"blk.{l + 1}.attn_norm.weight"], self.h, None)
            else:
                nxt = (w["output_norm.weight"], self.h, self.lm_head_q8()) if n_layers is None else None
            post = (None, None, None, w[p + "post_ffw_norm.weight"], self.one, None, None, self.delta)
            ops.gemv(w[p + "ffn_down.weight"], self.act, self.f, stream=stream,
                     after=ops.AfterFfn(self.x, eps, self.tail_counter, nxt, post=post))
        if n_layers is not None:
            self.delta.fill_bytes(0, stream)  # hidden_after_layers reads x + delta: x is the whole residual here
            return
        self.enqueue_logits(stream, self.lm_head_q8())  # h (and its q8_1 copy): the last post-FFN norm chain

    # ------------------------------------------------------------------ batched prefill (same math, T rows)
    def alloc_prefill(self, chunk: int):
        c = self.cfg
        return ops.PrefillBuffers(c, chunk, self.kv, n_q=self.q.size, n_kv=self.k.size,
                                  n_ff=c.n_ff)

    def enqueue_prefill(self, s, T: int, all_logits=None, n_layers: int | None = None) -> None:
        """Prompt chunk of T tokens through every layer with int8-activation GEMMs (GeGLU in the gate/up GEMM's
        epilogue); the residual convention of :meth:`enqueue_step` (x plus the pending block output ``delta``).
        ``n_layers``: stop after that many layers with the pending add done (``pf.x`` the residual stream)."""
        c, w, pf = self.cfg, self.w, self._pf
        E, H, eps = c.n_embd, c.n_head, c.rms_eps
        ops.embedding_rows(w["token_embd.weight"], pf.tok, pf.x, T, scale=math.sqrt(E), stream=s)
        for l in range(c.n_layer if n_layers is None else n_layers):
            p = f"blk.{l}."
            swa = c.sliding_window > 0 and c.is_swa(l)
            ops.rmsnorm_rows(pf.x, w[p + "attn_norm.weight"], pf.h, T, eps, residual=pf.delta if l else None,
                             xq=pf.hq, stream=s)
            ops.gemm(w[p + "attn_q.weight"], pf.hq, pf.q, T, stream=s)
            ops.gemm(w[p + "attn_k.weight"], pf.hq, pf.k, T, stream=s)
            ops.gemm(w[p + "attn_v.weight"], pf.hq, pf.v, T, stream=s)
            ops.qk_norm_rope_kv_rows(self.kv, l, pf, T, w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"],
                                     n_head=H, n_rot=c.n_rot, base=float(c.rope_base_for(l)), eps=eps,
                                     q_scale=self.q_scale, stream=s, freq_factors=self.rope_ff.get(l))
            ops.attention_rows(self.kv, l, pf, T, n_head=H, scale=1.0, window=c.sliding_window if swa else 0,
                               stream=s)
            ops.quantize_rows(pf.attn, pf.attnq, T, stream=s)
            ops.gemm(w[p + "attn_output.weight"], pf.attnq, pf.o, T, stream=s)
            ops.rmsnorm_rows(pf.o, w[p + "post_attention_norm.weight"], pf.delta, T, eps, stream=s)
            ops.rmsnorm_rows(pf.x, w[p + "ffn_norm.weight"], pf.h, T, eps, residual=pf.delta, xq=pf.hq, stream=s)
            ops.gemm(w[p + "ffn_gate.weight"], pf.hq, pf.act, T, w_up=w[p + "ffn_up.weight"], act="gelu_tanh",
                     stream=s)
            ops.quantize_rows(pf.act, pf.actq, T, stream=s)
            ops.gemm(w[p + "ffn_down.weight"], pf.actq, pf.f, T, stream=s)
            ops.rmsnorm_rows(pf.f, w[p + "post_ffw_norm.weight"], pf.delta, T, eps, stream=s)
        if n_layers is not None:  # the pending add (x += delta) through the output norm; h is not used
            ops.rmsnorm_rows(pf.x, w["output_norm.weight"], pf.h, T, eps, residual=pf.delta if n_layers else None,
                             stream=s)
            return
        if all_logits is not None:
            ops.rmsnorm_rows(pf.x, w["output_norm.weight"], pf.h, T, eps, residual=pf.delta, xq=pf.hq, stream=s)
            self.enqueue_all_logits(s, T, all_logits)
            return
        hq = self.lm_head_q8()
        ops.rmsnorm(ops.row(pf.x, T - 1), w["output_norm.weight"], self.h, eps, residual=ops.row(pf.delta, T - 1),
                    stream=s, xq=hq)
        self.enqueue_logits(s, hq)
