"""Gemma 4 GPU forward (spec: models.md §3 with the corrections in sparkinfer_cute/reference/gemma4.py, its
reference; llama.cpp ``src/models/gemma4.cpp``).

Per layer l (geometry per layer: sliding layers head_dim 256 / 8 KV heads / window / RoPE base 1e4, full layers
head_dim 512 / 2 KV heads / base 1e6 with ``rope_freqs`` and K = V, for 26B-A4B)::

    h  = rmsnorm(x, attn_norm)
    q, k[, v] = W h                      (no attn_v: V is the raw K projection)
    q, k <- rope(rmsnorm_per_head(., q_norm / k_norm));  v <- rmsnorm_per_head(v, no weight);  K/V -> fp16 cache
    x1 = x + rmsnorm(Wo attention(q, K, V, scale 1, window on sliding layers), post_attention_norm)
    m  = GeGLU dense MLP of rmsnorm(x1, ffn_norm)
    MoE layer: m <- rmsnorm(m, post_ffw_norm_1) + rmsnorm(sum_j w_j s[e_j] Wdown_e GeGLU_e(rmsnorm(x1,
               pre_ffw_norm_2)), post_ffw_norm_2), routed on rmsnorm(x1) * ffn_gate_inp.scale / sqrt(n_embd)
    x  = (x1 + rmsnorm(m, post_ffw_norm)) * layer_output_scale
    logits = softcap(W_out rmsnorm(x, output_norm))

The residual stream ``x`` always holds the full value (the layer output scale multiplies it, so the next layer's norm
cannot fold a pending add the way the Gemma 3 / Qwen forwards do). ``SPARKINFER_DP4A``: int8 activations for the
attention projections and the experts under ``auto`` (as Qwen3-MoE), f32 with ``none``.
"""

from __future__ import annotations

import numpy as np

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.models import ops
from sparkinfer_cute.models.base import GPUDecoder
from sparkinfer_cute.runtime import DeviceArray
from sparkinfer_cute.runtime.weights import QWeight


def _f32_weight(name: str, values: np.ndarray) -> QWeight:
    """A small f32 vector as a weight handle (norm weights computed at load)."""
    v = np.ascontiguousarray(values, np.float32).reshape(-1)
    return QWeight(name, "F32", (v.size,), DeviceArray.from_numpy(v), v.size * 4)


class Gemma4GPU(GPUDecoder):
    def __init__(self, g, cfg, **kwargs):
        if cfg.fused_qkv or cfg.n_embd_per_layer or cfg.shared_kv_layers:
            raise GGUFError(g.path, "Gemma 4 with a fused attn_qkv, per-layer embeddings or KV sharing (E2B/E4B) has "
                                    "no GPU forward yet; use --backend cpu")
        if len({cfg.n_ff_for(l) for l in range(cfg.n_layer)}) > 1:  # the dense MLP buffers have one width
            raise GGUFError(g.path, "Gemma 4 with per-layer dense MLP widths has no GPU forward yet; use --backend cpu")
        super().__init__(g, cfg, **kwargs)

    def weight_names(self) -> list[str]:
        c = self.cfg
        names = ["token_embd.weight", "output_norm.weight"] + ([] if c.tied_output else ["output.weight"])
        names += ["rope_freqs.weight"] if c.has_rope_freqs else []
        for l in range(c.n_layer):
            t = ["attn_norm.weight", "attn_q.weight", "attn_k.weight"] + (["attn_v.weight"] if c.has_v(l) else [])
            t += ["attn_q_norm.weight", "attn_k_norm.weight", "attn_output.weight", "post_attention_norm.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"]
            if c.is_moe(l):
                t += ["ffn_gate_inp.weight", "ffn_gate_inp.scale", "pre_ffw_norm_2.weight", "post_ffw_norm_1.weight",
                      "post_ffw_norm_2.weight", "ffn_down_exps.weight"]
                t += (["ffn_gate_up_exps.weight"] if c.fused_gate_up_exps
                      else ["ffn_gate_exps.weight", "ffn_up_exps.weight"])
                t += ["ffn_down_exps.scale"] if c.has_down_exps_scale(l) else []
            t += ["layer_output_scale.weight"] if c.has_out_scale(l) else []
            names += [f"blk.{l}.{n}" for n in t]
        return names

    def alloc_buffers(self) -> None:
        c = self.cfg
        E, f32 = c.n_embd, np.float32
        self.alloc_block_buffers()                   # x, h, q, k, v, attn, delta, attn_ws, hq_out
        n_ff = max(c.n_ff_for(l) for l in range(c.n_layer))
        self.o = DeviceArray.empty((E,), f32)        # attention output projection, then (normed) the block's add
        self.gate = DeviceArray.empty((n_ff,), f32)
        self.up = DeviceArray.empty((n_ff,), f32)
        self.act = DeviceArray.empty((n_ff,), f32)
        self.dense_ids = ops.dense_expert_ids()      # the dense GLU as expert 0 of the MoE gate/up kernel
        # q/k(/v) rows packed into one weight per layer: one GEMV where the chunk kernel's multi-matrix launch does
        # not apply (26B-A4B: n_embd 2816)
        self.qkv_w = {}
        for l in range(c.n_layer):
            names = [f"blk.{l}.attn_{t}.weight" for t in ("qkv" if c.has_v(l) else "qk")]
            if ops.packs_rows([self.w[n] for n in names]):
                # all three, else q and k when v's type differs (Q4_K_M's Q6_K attn_v layers)
                self.qkv_w[l] = (self.fuse_rows(names, f"blk.{l}.attn_qkv(packed)")
                                 or self.fuse_rows(names[:2], f"blk.{l}.attn_qk(packed)"))
        self.f = DeviceArray.empty((E,), f32)        # dense MLP output
        self.m = DeviceArray.empty((E,), f32)        # the FFN sum before post_ffw_norm
        self.fn = DeviceArray.empty((E,), f32)       # rmsnorm(m, post_ffw_norm): added to x
        self.out_w = self.w["token_embd.weight"] if c.tied_output else self.w["output.weight"]
        self.rope_freqs = self.w["rope_freqs.weight"] if c.has_rope_freqs else None
        self.q8_attn = ops.dp4a_for("attn")
        self.q8_moe = ops.dp4a_for("moe")
        self.hq = ops.new_q8(E)
        self.attnq = ops.new_q8(self.attn.size)
        # layer output scale (1 where the file has none): one f32 on the device per layer
        one = DeviceArray.from_numpy(np.ones(1, f32))
        self.out_scale = [self.w[f"blk.{l}.layer_output_scale.weight"].data if c.has_out_scale(l) else one
                          for l in range(c.n_layer)]
        self.y = self.y2 = None  # (MoE layers only)
        if any(c.is_moe(l) for l in range(c.n_layer)):
            K = c.n_expert_used
            self.r_in = DeviceArray.empty((E,), f32)      # the router's input
            self.e_in = DeviceArray.empty((E,), f32)      # the experts' input
            self.y = DeviceArray.empty((E,), f32)         # routed experts' weighted sum
            self.y2 = DeviceArray.empty((E,), f32)
            self.router_state = ops.RouterState(c.n_expert)
            self.expert_ids = DeviceArray.zeros((K,), np.int32)
            self.expert_w = DeviceArray.zeros((K,), f32)
            self.moe_act = DeviceArray.empty((K, c.n_ff_exp), f32)
            self.e_inq = ops.new_q8(E)
            self.moe_actq = ops.MoeActQ8(K, c.n_ff_exp)
            # router input weight: rmsnorm(x1) * (1/sqrt(n_embd)) * ffn_gate_inp.scale, the two factors pre-multiplied
            # in f32 (llama.cpp multiplies them one after the other: <= 1 ulp apart)
            self.router_norm = {
                l: _f32_weight(f"blk.{l}.router_norm", self.g.dequant(f"blk.{l}.ffn_gate_inp.scale")
                               .astype(np.float32) * np.float32(c.router_input_scale))
                for l in range(c.n_layer) if c.is_moe(l)}

    def _experts(self, l: int):
        c, p = self.cfg, f"blk.{l}."
        if c.fused_gate_up_exps:
            return self.w[p + "ffn_gate_up_exps.weight"], None
        return self.w[p + "ffn_gate_exps.weight"], self.w[p + "ffn_up_exps.weight"]

    def enqueue_step(self, stream, n_layers: int | None = None) -> None:
        c, w = self.cfg, self.w
        eps = c.rms_eps
        ops.embedding(w["token_embd.weight"], self.tok, self.x, scale=c.embd_scale, stream=stream)
        hq = self.hq if self.q8_attn else None
        last = (c.n_layer if n_layers is None else n_layers) - 1
        # h = rmsnorm(x, attn_norm) [+ q8_1]: here for layer 0, then by the previous layer's post-FFN norm chain
        ops.rmsnorm(self.x, w["blk.0.attn_norm.weight"], self.h, eps, stream=stream, xq=hq)
        for l in range(last + 1):
            p = f"blk.{l}."
            a = self.attn_layers[l]
            q, k, v, qkv = self.packed_qkv(l)  # this layer's q|k|v packed (the packed GEMV's output layout)
            packed = None if self.qkv_w.get(l) is None else (self.qkv_w[l], qkv)
            if c.has_v(l):
                ops.gemv_qkv(w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"], self.h, q, k, v,
                             stream=stream, xq=hq, packed=packed)
            else:
                ops.gemv_qk(w[p + "attn_q.weight"], w[p + "attn_k.weight"], self.h, q, k, stream=stream, xq=hq,
                            packed=packed)
            # the O projection's input at this layer's width (16 x 256 sliding, 16 x 512 global), with its q8_1
            # copy for the int8 O projection, quantized by attention
            attn, aq = self.attention_output(l, self.attnq if self.q8_attn else None)
            ops.self_attention(self.kv, l, a, q, k, v if c.has_v(l) else k, w[p + "attn_q_norm.weight"],
                               w[p + "attn_k_norm.weight"], self.pos_buf, attn, self.attn_ws, eps=eps, q_scale=1.0,
                               scale=c.attn_scale, stream=stream, v_norm=True,
                               freq_factors=self.rope_freqs if c.uses_rope_freqs(l) else None, xq=aq)
            # then x1 = x + rmsnorm(o, post_attention_norm) (in place); from x1: h = rmsnorm(x1, ffn_norm), the dense
            # MLP's input, and on MoE layers the router's and the experts' inputs: the O projection's tail
            moe = c.is_moe(l)
            outs = [(w[p + "ffn_norm.weight"], self.h)]
            if moe:
                outs += [(self.router_norm[l], self.r_in), (w[p + "pre_ffw_norm_2.weight"], self.e_in)]
            ops.gemv(w[p + "attn_output.weight"], attn, self.o, stream=stream, xq=aq,
                     after=ops.AfterAttention(self.x, w[p + "post_attention_norm.weight"], outs, eps,
                                              self.tail_counter, self.delta,
                                              xq=self.e_inq if moe and self.q8_moe else None))
            ops.dense_glu(w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], self.h, self.gate, self.up, self.act,
                          act="gelu_tanh", ids0=self.dense_ids, stream=stream)
            ops.gemv(w[p + "ffn_down.weight"], self.act, self.f, stream=stream)
            # x = (x1 + rmsnorm(s, post_ffw_norm)) * layer_output_scale, s = rmsnorm(f, post_ffw_norm_1) +
            # rmsnorm(y, post_ffw_norm_2) on MoE layers, else f; then h = the next layer's attn_norm of x, or after
            # the last layer the final output_norm (+ the int8 LM head's q8_1 input). On MoE layers the experts'
            # down projection runs the chain as its tail where it can (ops.AfterFfn).
            if l < last:
                nxt = (w[f"blk.{l + 1}.attn_norm.weight"], self.h, hq)
            else:
                nxt = (w["output_norm.weight"], self.h, self.lm_head_q8()) if n_layers is None else None
            post = (self.f, w.get(p + "post_ffw_norm_1.weight"), w.get(p + "post_ffw_norm_2.weight"),
                    w[p + "post_ffw_norm.weight"], self.out_scale[l], self.m, self.y2, self.fn)
            if moe:
                self._moe_step(l, stream, after=ops.AfterFfn(self.x, eps, self.tail_counter, nxt, post=post))
            else:
                f, w1, w2, wp, scale, m, y2, fn = post
                ops.post_ffn_norms(f, None, w1, w2, wp, self.x, scale, eps, m=m, y2=y2, fn=fn, next_norm=nxt,
                                   stream=stream)
        if n_layers is not None:
            self.delta.fill_bytes(0, stream)  # hidden_after_layers reads x + delta: x is the whole residual here
            return
        self.enqueue_logits(stream, self.lm_head_q8())  # h (and its q8_1 copy): the last post-FFN norm chain

    def _moe_step(self, l: int, stream, after) -> None:
        """Routed experts of layer l (inputs r_in, e_in [+ e_inq] from post_attention_norms): their weighted sum y,
        then ``after`` (the post-FFN norm chain on f and y)."""
        c, w, p = self.cfg, self.w, f"blk.{l}."
        route = ops.RouteFirst(w[p + "ffn_gate_inp.weight"], self.r_in, self.expert_w, c.n_expert_used,
                               self.router_state,
                               down_scale=w[p + "ffn_down_exps.scale"] if c.has_down_exps_scale(l) else None)
        eq = self.e_inq if self.q8_moe else None
        wg, wu = self._experts(l)
        actq = self.moe_actq if self.q8_moe else None
        ops.moe_gate_up(wg, wu, self.e_in, self.expert_ids, self.moe_act, stream=stream, hq=eq, glu="gelu_tanh",
                        actq=actq, route=route, down=ops.ExpertsDown(w[p + "ffn_down_exps.weight"], self.y, after))

    # ------------------------------------------------------------------ batched prefill (same math, T rows)
    def alloc_prefill(self, chunk: int):
        c = self.cfg
        E, f32 = c.n_embd, np.float32
        moe = (c.n_expert, c.n_expert_used, c.n_ff_exp) if any(c.is_moe(l) for l in range(c.n_layer)) else None
        pf = ops.PrefillBuffers(c, chunk, self.kv, n_q=self.q.size, n_kv=self.k.size,
                                n_ff=max(c.n_ff_for(l) for l in range(c.n_layer)), moe=moe)
        pf.m = DeviceArray.empty((chunk, E), f32)
        pf.fn = DeviceArray.empty((chunk, E), f32)
        if moe is not None:
            pf.r_in = DeviceArray.empty((chunk, E), f32)
            pf.e_in = DeviceArray.empty((chunk, E), f32)
            pf.e_inq = ops.new_q8(E, rows=chunk)
            pf.y = DeviceArray.empty((chunk, E), f32)
            pf.y2 = DeviceArray.empty((chunk, E), f32)
        return pf

    def enqueue_prefill(self, stream, T: int, all_logits=None, n_layers: int | None = None) -> None:
        """Prompt chunk of T tokens through every layer with int8-activation GEMMs (GeGLU in the gate/up GEMMs'
        epilogue, the fused expert gate+up tensor read in place), then the last row's (or every row's) logits.
        ``n_layers``: stop after that many layers (``pf.x`` the residual stream)."""
        c, w, pf = self.cfg, self.w, self._pf
        eps = c.rms_eps
        s = stream
        ops.embedding_rows(w["token_embd.weight"], pf.tok, pf.x, T, scale=c.embd_scale, stream=s)
        for l in range(c.n_layer if n_layers is None else n_layers):
            p = f"blk.{l}."
            a = self.attn_layers[l]
            ops.rmsnorm_rows(pf.x, w[p + "attn_norm.weight"], pf.h, T, eps, xq=pf.hq, stream=s)
            ops.gemm(w[p + "attn_q.weight"], pf.hq, pf.q, T, stream=s)
            ops.gemm(w[p + "attn_k.weight"], pf.hq, pf.k, T, stream=s)
            if c.has_v(l):
                ops.gemm(w[p + "attn_v.weight"], pf.hq, pf.v, T, stream=s)
            ops.qk_norm_rope_kv_rows(self.kv, l, pf, T, w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"],
                                     n_head=a.n_head, n_rot=a.n_rot, base=a.rope_base, eps=eps, q_scale=1.0,
                                     stream=s, v_norm=True, k_eq_v=not c.has_v(l),
                                     freq_factors=self.rope_freqs if c.uses_rope_freqs(l) else None)
            ops.attention_rows(self.kv, l, pf, T, n_head=a.n_head, scale=c.attn_scale, window=a.window, stream=s)
            attnq = pf.attnq.narrow(a.n_head * a.head_dim)  # this layer's width: rows packed as attention wrote them
            ops.quantize_rows(pf.attn, attnq, T, stream=s)
            ops.gemm(w[p + "attn_output.weight"], attnq, pf.o, T, stream=s)
            ops.rmsnorm_rows(pf.o, w[p + "post_attention_norm.weight"], pf.delta, T, eps, stream=s)
            ops.rmsnorm_rows(pf.x, w[p + "ffn_norm.weight"], pf.h, T, eps, residual=pf.delta, xq=pf.hq, stream=s)
            ops.gemm(w[p + "ffn_gate.weight"], pf.hq, pf.act, T, w_up=w[p + "ffn_up.weight"], act="gelu_tanh",
                     stream=s)
            ops.quantize_rows(pf.act, pf.actq, T, stream=s)
            ops.gemm(w[p + "ffn_down.weight"], pf.actq, pf.f, T, stream=s)
            if c.is_moe(l):
                ops.rmsnorm_rows(pf.f, w[p + "post_ffw_norm_1.weight"], pf.m, T, eps, stream=s)
                ops.rmsnorm_rows(pf.x, self.router_norm[l], pf.r_in, T, eps, stream=s)
                ops.rmsnorm_rows(pf.x, w[p + "pre_ffw_norm_2.weight"], pf.e_in, T, eps, xq=pf.e_inq, stream=s)
                wg, wu = self._experts(l)
                ops.moe_rows(w[p + "ffn_gate_inp.weight"], wg, wu, w[p + "ffn_down_exps.weight"], pf, T,
                             act="gelu_tanh", router_in=pf.r_in, expert_in=pf.e_inq, accumulate_into=None,
                             expert_scale=w[p + "ffn_down_exps.scale"] if c.has_down_exps_scale(l) else None,
                             stream=s)
                ops.rmsnorm_rows(pf.f, w[p + "post_ffw_norm_2.weight"], pf.y2, T, eps, stream=s)  # pf.f: experts
                ops.rmsnorm_rows(pf.m, w[p + "post_ffw_norm.weight"], pf.fn, T, eps, residual=pf.y2, stream=s)
            else:
                ops.rmsnorm_rows(pf.f, w[p + "post_ffw_norm.weight"], pf.fn, T, eps, stream=s)
            ops.residual_scale(ops.rows(pf.x, T), ops.rows(pf.fn, T), self.out_scale[l], stream=s)
        if n_layers is not None:
            return
        if all_logits is not None:
            ops.rmsnorm_rows(pf.x, w["output_norm.weight"], pf.h, T, eps, xq=pf.hq, stream=s)
            self.enqueue_all_logits(s, T, all_logits)
            return
        hq = self.lm_head_q8()
        ops.rmsnorm(ops.row(pf.x, T - 1), w["output_norm.weight"], self.h, eps, stream=s, xq=hq)
        self.enqueue_logits(s, hq)
