"""The ops a GPU forward is written in, bound to the CuTe DSL kernels (``sparkinfer_cute.kernels``).

Every function enqueues on ``stream`` and works on device buffers (``DeviceArray``) and weight handles (``QWeight``):
nothing here synchronizes or reads device memory on the host, so a whole decode step can be captured in one CUDA
graph. ``launch_counter`` counts kernel launches (kernels per token in the benchmarks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sparkinfer_cute.kernels import argmax as _am
from sparkinfer_cute.kernels import attention_decode as _attn
from sparkinfer_cute.kernels import attention_prefill as _fattn
from sparkinfer_cute.kernels import elementwise as _elem
from sparkinfer_cute.kernels import embedding as _emb
from sparkinfer_cute.kernels import gemv as _gemv
from sparkinfer_cute.kernels import gemv_chunk as _gemv_chunk
from sparkinfer_cute.kernels import glu as _glu
from sparkinfer_cute.kernels import kv_cache_append as _kva
from sparkinfer_cute.kernels import moe_ffn as _moe
from sparkinfer_cute.kernels import moe_route as _moe_route
from sparkinfer_cute.kernels import q8_1 as _q8
from sparkinfer_cute.kernels import qk_norm_rope_kv as _qknrk
from sparkinfer_cute.kernels import quant_gemm as _qgemm
from sparkinfer_cute.kernels import rmsnorm as _rms
from sparkinfer_cute.kernels import rope as _rope
from sparkinfer_cute.kernels import router as _router
from sparkinfer_cute.kernels.paged_kv import PagedKVCache
from sparkinfer_cute.kernels.quant_decode import INT_QTYPES
from sparkinfer_cute.runtime import DeviceArray, Workspace, get_device

PAGE_SIZE = 64

# Speed passes can be switched off one by one (SPARKINFER_DISABLE=fused_qk,...) so the accuracy harness and the
# benchmark can compare a pass against the build without it, in the same run.
DISABLED = frozenset(x.strip() for x in os.environ.get("SPARKINFER_DISABLE", "").split(",") if x.strip())


def enabled(name: str) -> bool:
    return name not in DISABLED


class _Counter:
    def __init__(self):
        self.n = 0

    def reset(self):
        self.n = 0

    def add(self, k: int = 1):
        self.n += k

    def count(self) -> int:
        return self.n


launch_counter = _Counter()


# ---------------------------------------------------------------------------------------------- attention geometry
@dataclass(frozen=True)
class AttentionGeometry:
    """The attention shape of one layer. Per layer because architectures mix layer types (Gemma 4: head_dim 256 /
    8 KV heads on sliding-window layers, 512 / 2 on global ones, each with its own RoPE)."""

    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_base: float
    window: int  # 0: full causal attention, else keys with pos - p < window


def attention_geometry(cfg) -> list[AttentionGeometry]:
    """One :class:`AttentionGeometry` per layer, from the config's per-layer views (``head_dim_for(l)``, ...)."""
    out = []
    for l in range(cfg.n_layer):
        if cfg.head_dim_v_for(l) != cfg.head_dim_for(l):
            raise ValueError(f"layer {l}: K head size {cfg.head_dim_for(l)} != V head size {cfg.head_dim_v_for(l)}; "
                             "the paged KV cache stores both with one head size")
        out.append(AttentionGeometry(n_head=cfg.n_head, n_head_kv=cfg.n_head_kv_for(l), head_dim=cfg.head_dim_for(l),
                                     n_rot=cfg.n_rot_for(l), rope_base=float(cfg.rope_base_for(l)),
                                     window=cfg.sliding_window if cfg.is_swa(l) else 0))
    return out


# ---------------------------------------------------------------------------------------------- KV cache
class PagedKV(PagedKVCache):
    """The model's fp16 paged KV cache: pages of ``PAGE_SIZE`` tokens, each layer with its own KV heads and head
    size (kernels/paged_kv.py)."""

    @staticmethod
    def bytes_needed(layers: Sequence[AttentionGeometry], max_context: int) -> int:
        pages = -(-max_context // PAGE_SIZE)
        return sum(2 * pages * PAGE_SIZE * g.n_head_kv * g.head_dim * 2 for g in layers)

    def __init__(self, layers: Sequence[AttentionGeometry], max_context: int):
        super().__init__(len(layers), [g.n_head_kv for g in layers], [g.head_dim for g in layers],
                         page_size=PAGE_SIZE, max_context=max_context)


def attention_splits(g: AttentionGeometry, max_context: int, sm_count: int | None = None) -> int:
    """Static split count of one layer type: the compile-gated MODEL_CONFIGS entry when the layer matches one, else
    the heuristic (``sm_count``: the GPU's, asked only then)."""
    for c in _attn.MODEL_CONFIGS.values():
        if (c["n_head"], c["n_kv_head"], c["head_dim"]) == (g.n_head, g.n_head_kv, g.head_dim) \
                and c["page_size"] == PAGE_SIZE:
            return min(c["num_splits"], max(1, max_context // 64))
    if sm_count is None:
        sm_count = get_device().sm_count
    return _attn.default_num_splits(g.n_head_kv, max_context, sm_count)


class AttentionWorkspace:
    """Split-KV partials, shared by all layers (static shapes: the graph is captured once). Each layer has its own
    split count (``num_splits[l]``); the buffers are sized for the largest layer and each layer reads a view."""

    def __init__(self, layers: Sequence[AttentionGeometry], max_context: int):
        self.layers = list(layers)
        self.num_splits = [attention_splits(g, max_context) for g in self.layers]
        n_head = max(g.n_head for g in self.layers)
        # arrival counters of the fused combine (the last split CTA of a head group combines; left at zero):
        # at most n_head per sequence for every layer type (attention_decode.fused_counter_count)
        self.counters = DeviceArray.zeros((n_head,), np.int32)
        self.o_partial = DeviceArray.empty(
            (max(g.n_head * s * g.head_dim for g, s in zip(self.layers, self.num_splits)),), np.float32)
        self.lse_partial = DeviceArray.empty(
            (max(g.n_head * s for g, s in zip(self.layers, self.num_splits)),), np.float32)

    def partials(self, layer: int) -> tuple[int, DeviceArray, DeviceArray]:
        """(num_splits, o_partial [1, H, S, D], lse_partial [1, H, S]) of one layer."""
        g, S = self.layers[layer], self.num_splits[layer]
        return (S, self.o_partial.view(np.float32, (1, g.n_head, S, g.head_dim)),
                self.lse_partial.view(np.float32, (1, g.n_head, S)))


# ---------------------------------------------------------------------------------------------- ops
def embedding(w, tok, out, *, scale: float, stream):
    _emb.embedding(w.data, tok, out, qtype=w.qtype, n_embd=w.n_in, scale=scale, stream=stream)
    launch_counter.add()


def rmsnorm(x, w, out, eps: float, *, residual=None, stream, xq=None):
    """out = rmsnorm(x) * w; with ``residual``: x += residual first (x updated in place). With ``xq`` (a Q8Act) the
    same launch also writes q8_1(out) for the int8-activation GEMVs."""
    if xq is not None:
        wv = w.data.view(np.float32, (w.n_in,))
        if residual is None:
            _q8.rmsnorm_q8_1(x, wv, eps, out=out, xq=xq, stream=stream)
        else:
            _q8.rmsnorm_q8_1(residual, wv, eps, residual=x, residual_out=x, out=out, xq=xq, stream=stream)
    elif residual is None:
        _rms.rmsnorm(x, w.data.view(np.float32, (w.n_in,)), eps, out=out, stream=stream)
    else:
        _rms.rmsnorm_residual(residual, x, w.data.view(np.float32, (w.n_in,)), eps, out=out, residual_out=x,
                              stream=stream)
    launch_counter.add()


def rmsnorm_heads(x, w, n_heads: int, head_dim: int, eps: float, *, stream):
    xv = x.view(np.float32, (n_heads, head_dim))
    _rms.rmsnorm(xv, w.data.view(np.float32, (head_dim,)), eps, out=xv, stream=stream)
    launch_counter.add()


# Which GEMVs run on int8 activations (q8_1 blocks of 32, dp4a) instead of f32: SPARKINFER_DP4A=auto|all|none.
# auto = where the H100 micro-benchmark measured dp4a faster (RESULTS.md, "int8 activations by default"), for models
# that opt in (Qwen3-MoE; Gemma keeps exact f32 activations): the LM head and DP4A_AUTO_PARTS.
DP4A = os.environ.get("SPARKINFER_DP4A", "auto")


def dp4a_for(part: str, auto: bool = True) -> bool:
    """Model-level choice for a group of GEMVs: "attn" (q/k/v/o projections) or "moe" (expert FFN)."""
    if DP4A == "none":
        return False
    if DP4A == "all":
        return True
    return auto and part in DP4A_AUTO_PARTS


# Groups that use int8 activations under SPARKINFER_DP4A=auto: dp4a beats f32 at every Qwen3-30B-A3B shape
# (RESULTS.md, "int8 activations by default"); the f32 chunk path is bound by weight decode.
DP4A_AUTO_PARTS: frozenset[str] = frozenset({"attn", "moe"})


def prefer_dp4a(w, auto: bool = True) -> bool:
    """``auto``: the model's default under SPARKINFER_DP4A=auto (a model may keep exact f32 activations)."""
    if DP4A == "none" or w.qtype not in INT_QTYPES:
        return False
    if DP4A == "all":
        return True
    return auto and w.n_out >= 65536


def new_q8(n: int, rows: int = 1):
    """Preallocated q8_1 activation buffers (graph capture must not allocate)."""
    return _q8.Q8Act(rows, n)


def quantize(x, xq, *, stream):
    _q8.quantize_q8_1(x, out=xq, stream=stream)
    launch_counter.add()


def gemv(w, x, y, *, stream, xq=None):
    """y = W x over the raw quantized rows of W. With ``xq`` (the q8_1 copy of x, already quantized this step: the
    caller decided with :func:`prefer_dp4a`) the int8 path runs instead."""
    _gemv.gemv(w.data, w.qtype, xq if xq is not None else x, n_out=w.n_out, out=y, stream=stream)
    launch_counter.add()


def gemv_qkv(wq, wk, wv, x, q, k, v, *, stream, xq=None):
    """q, k, v projections of one normed input: one launch (kernels/gemv_chunk.py GemvMulti) unless disabled."""
    if enabled("fused_qkv"):
        _gemv.gemv_multi([(wq.data, wq.qtype, q), (wk.data, wk.qtype, k), (wv.data, wv.qtype, v)],
                         xq if xq is not None else x, stream=stream)
        # gemv_multi falls back to one launch per matrix where the chunk mapping does not apply
        launch_counter.add(1 if all(_gemv_chunk.chunk_ok(w.qtype, w.n_in) for w in (wq, wk, wv)) else 3)
    else:
        for w, y in ((wq, q), (wk, k), (wv, v)):
            gemv(w, x, y, stream=stream, xq=xq)


def gemv_qk(wq, wk, x, q, k, *, stream, xq=None):
    """q and k projections of one normed input (K = V layers have no V projection): one launch where it applies."""
    if enabled("fused_qkv"):
        _gemv.gemv_multi([(wq.data, wq.qtype, q), (wk.data, wk.qtype, k)], xq if xq is not None else x, stream=stream)
        launch_counter.add(1 if all(_gemv_chunk.chunk_ok(w.qtype, w.n_in) for w in (wq, wk)) else 2)
    else:
        for w, y in ((wq, q), (wk, k)):
            gemv(w, x, y, stream=stream, xq=xq)


def glu(gate, up, out, *, act: str, stream):
    _glu.glu(gate, up, out, act=act, stream=stream)
    launch_counter.add()


def rope(x, n_heads: int, head_dim: int, n_rot: int, base: float, pos, *, stream, freq_factors=None):
    _rope.rope_neox(x.view(np.float32, (n_heads, head_dim)), pos, n_rot=n_rot, base=base,
                    freq_factors=None if freq_factors is None else freq_factors.data.view(np.float32, (n_rot // 2,)),
                    stream=stream)
    launch_counter.add()


def kv_append(kv: PagedKV, layer: int, k, v, pos, *, stream):
    D = kv.head_dim[layer]
    KV = kv.n_kv_head[layer]
    _kva.kv_cache_append(k.view(np.float32, (KV, D)), v.view(np.float32, (KV, D)), kv.k[layer], kv.v[layer],
                         kv.page_table, pos, stream=stream)
    launch_counter.add()


def attention(kv: PagedKV, layer: int, q, out, pos, ws: AttentionWorkspace, *, n_head: int, scale: float,
              window: int, stream, softcap: float = 0.0):
    D = kv.head_dim[layer]
    fused = enabled("fused_combine")  # split-KV + LSE combine in one launch (last CTA of a head group combines)
    num_splits, o_partial, lse_partial = ws.partials(layer)
    _attn.attention_decode(q.view(np.float32, (n_head, D)), kv.k[layer], kv.v[layer], kv.page_table, pos,
                           scale=scale, window=window, softcap=softcap, num_splits=num_splits,
                           out=out.view(np.float32, (1, n_head, D)), o_partial=o_partial,
                           lse_partial=lse_partial, fused_combine=fused, counters=ws.counters, stream=stream)
    launch_counter.add(1 if fused else 2)


def qk_norm_rope_kv(kv: PagedKV, layer: int, q, k, v, q_norm, k_norm, pos, *, n_head: int, n_rot: int, base: float,
                    eps: float, q_scale: float = 1.0, freq_factors=None, v_norm: bool = False, stream):
    """Fused per-head Q/K RMSNorm + NEOX RoPE (+ q scale) + fp16 KV append: one launch instead of five.
    ``freq_factors``: an F32 weight dividing theta per pair (Gemma 4 ``rope_freqs``); ``v_norm``: V is RMS-normed
    without a weight before caching (Gemma 4; ``v`` may be ``k``: K = V layers)."""
    D = kv.head_dim[layer]
    KV = kv.n_kv_head[layer]
    _qknrk.qk_norm_rope_kv(q.view(np.float32, (n_head, D)), k.view(np.float32, (KV, D)), v.view(np.float32, (KV, D)),
                           q_norm.data.view(np.float32, (D,)), k_norm.data.view(np.float32, (D,)), kv.k[layer],
                           kv.v[layer], kv.page_table, pos, n_rot=n_rot, base=base, eps=eps, q_scale=q_scale,
                           freq_factors=None if freq_factors is None else freq_factors.data.view(np.float32,
                                                                                                 (n_rot // 2,)),
                           v_norm=v_norm, stream=stream)
    launch_counter.add()


def qk_prologue(kv: PagedKV, layer: int, q, k, v, q_norm, k_norm, pos, *, n_head: int, n_rot: int, base: float,
                eps: float, q_scale: float, stream, freq_factors=None, v_norm: bool = False) -> float:
    """Between the q/k/v projections and attention: per-head Q/K RMSNorm, NEOX RoPE, fp16 KV append. One fused launch
    (:func:`qk_norm_rope_kv`, which also multiplies q by ``q_scale``) unless ``fused_qk`` is disabled, else the
    unfused launches (q left unscaled). Returns the factor attention must still apply to q·k: 1.0 or ``q_scale``.
    ``v`` may be ``k`` (K = V: the fused kernel never writes k back); the unfused path (``fused_qk`` disabled) has
    neither K = V nor the V norm, so Gemma 4 runs the fused kernel only."""
    if enabled("fused_qk"):
        qk_norm_rope_kv(kv, layer, q, k, v, q_norm, k_norm, pos, n_head=n_head, n_rot=n_rot, base=base, eps=eps,
                        q_scale=q_scale, freq_factors=freq_factors, v_norm=v_norm, stream=stream)
        return 1.0
    if v is k or v_norm:
        raise ValueError("the unfused Q/K prologue has no K = V / V-norm path (Gemma 4): leave fused_qk enabled")
    D = kv.head_dim[layer]
    KV = kv.n_kv_head[layer]
    rmsnorm_heads(q, q_norm, n_head, D, eps, stream=stream)
    rmsnorm_heads(k, k_norm, KV, D, eps, stream=stream)
    rope(q, n_head, D, n_rot, base, pos, stream=stream, freq_factors=freq_factors)
    rope(k, KV, D, n_rot, base, pos, stream=stream, freq_factors=freq_factors)
    kv_append(kv, layer, k, v, pos, stream=stream)
    return q_scale


class RouterState:
    """Graph-stable buffers of the fused router: logits scratch + the last-CTA arrival counter (shared by layers:
    each launch leaves it at zero)."""

    def __init__(self, n_expert: int):
        self.logits = DeviceArray.empty((n_expert,), np.float32)
        self.counter = DeviceArray.zeros((1,), np.int32)


def router_gemv(w, h, ids, weights, k: int, st: RouterState, *, stream):
    """F32 router GEMV + softmax + top-k + renormalize in one launch (kernels/router.py RouterGemvTopK)."""
    _router.route_gemv(w.data, h, k, norm_topk=True, ids_out=ids, weights_out=weights, scratch=st.logits,
                       counter=st.counter, n_expert=w.n_out, stream=stream)
    launch_counter.add()


def router(logits, ids, weights, k: int, *, stream):
    _router.route(logits, k, norm_topk=True, ids_out=ids, weights_out=weights, stream=stream)
    launch_counter.add()


def moe_gate_up(w_gate, w_up, h, ids, act, *, stream, hq=None, glu: str = "silu"):
    """``hq`` (the q8_1 copy of h, already quantized this step): the dp4a kernel instead of the f32 one. ``w_up``
    None: ``w_gate`` is a fused [E, 2F, n_in] gate+up tensor (Gemma 4). ``glu``: the gate activation."""
    n_ff = w_gate.n_out if w_up is not None else w_gate.n_out // 2
    _moe.moe_gate_up(w_gate.data, None if w_up is None else w_up.data, w_gate.qtype, hq if hq is not None else h, ids,
                     n_ff, out=act, stream=stream, act=glu)
    launch_counter.add()


def moe_down(w_down, act, ids, weights, out, *, stream, actq=None):
    """``actq``: a preallocated Q8Act of k rows: act is quantized into it (one more launch) for the dp4a kernel."""
    if actq is not None:
        quantize(act, actq, stream=stream)
    _moe.moe_down(w_down.data, w_down.qtype, actq if actq is not None else act, ids, weights, w_down.n_out, out=out,
                  stream=stream)
    launch_counter.add()


def residual_scale(x, f, s, *, stream):
    """``x = (x + f) * s`` (``s``: one f32 on the device: Gemma 4's layer_output_scale, or 1)."""
    _elem.residual_scale(x, f, s, stream=stream)
    launch_counter.add()


def softcap(x, cap: float, *, stream):
    """``x = cap * tanh(x / cap)`` in place (final logit softcapping)."""
    _elem.softcap(x, cap, stream=stream)
    launch_counter.add()


def expert_scale(weights, ids, scale, *, stream):
    """``weights[j] *= scale[ids[j]]``: a per-expert down scale folded into the routing weights."""
    _elem.gather_scale(weights, ids, scale.data.view(np.float32, (scale.n_in,)), stream=stream)
    launch_counter.add()


_argmax_ws = None


def argmax(logits, out_id, *, stream):
    global _argmax_ws
    if _argmax_ws is None:
        _argmax_ws = Workspace()  # partials allocated at warm-up, reused (graph-stable) afterwards
    _am.argmax(logits, out=out_id, workspace=_argmax_ws, stream=stream)
    launch_counter.add(2)  # chunk partials + final reduce


# ---------------------------------------------------------------------------------------------- batched prefill
# A prompt chunk of T tokens runs through the same KV cache as decode: the projections and expert FFNs through the
# grouped GEMM (kernels/quant_gemm.py, int8 activations), Q/K-norm + RoPE + KV append and attention through the
# decode kernels with the chunk as a batch of T queries of one sequence (kernels/paged_kv.py "Prefill").
PREFILL_TILE_TOKENS = 64
MOE_TILE_TOKENS = 32


def rows(buf, T: int, n: int | None = None):
    """The first T rows of a [C, n] f32 device buffer as a [T, n] view."""
    n = buf.shape[-1] if n is None else n
    return buf.view(np.float32, (T, n))


def row(buf, t: int):
    """Row t of a [C, n] f32 device buffer as an [n] view."""
    n = buf.shape[-1]
    return buf.view(np.float32, (n,), offset_bytes=t * n * 4)


class PrefillBuffers:
    """Device buffers of one prompt chunk of up to ``chunk`` tokens (allocated once; a graph per chunk length)."""

    def __init__(self, cfg, chunk: int, kv: PagedKV, *, n_q: int, n_kv: int, n_ff: int = 0, moe=None):
        E = cfg.n_embd
        f32 = np.float32
        self.chunk = chunk
        self.tok = DeviceArray.zeros((chunk,), np.int32)
        self.pos = DeviceArray.zeros((chunk,), np.int32)
        table = kv.page_table.to_numpy()[:1]
        self.page_table = DeviceArray.from_numpy(np.repeat(table, chunk, axis=0))
        self.x = DeviceArray.zeros((chunk, E), f32)
        self.h = DeviceArray.empty((chunk, E), f32)
        self.hq = new_q8(E, rows=chunk)
        self.delta = DeviceArray.zeros((chunk, E), f32)
        self.o = DeviceArray.empty((chunk, E), f32)
        self.q = DeviceArray.empty((chunk, n_q), f32)
        self.k = DeviceArray.empty((chunk, n_kv), f32)
        self.v = DeviceArray.empty((chunk, n_kv), f32)
        self.attn = DeviceArray.empty((chunk, n_q), f32)
        self.attnq = new_q8(n_q, rows=chunk)
        H, D = cfg.n_head, n_q // cfg.n_head
        # split-KV partials for num_splits = 1 (the chunk's T queries already fill the GPU); the fused combine's
        # arrival counters (one per query and head bound the kernel's per (query, kv head, head tile) need)
        from types import SimpleNamespace

        self.attn_ws = SimpleNamespace(o_partial=DeviceArray.empty((chunk, H, 1, D), f32),
                                       lse_partial=DeviceArray.empty((chunk, H, 1), f32),
                                       counters=DeviceArray.zeros((chunk * H,), np.int32))
        if n_ff:
            self.act = DeviceArray.empty((chunk, n_ff), f32)
            self.actq = new_q8(n_ff, rows=chunk)
            self.f = DeviceArray.empty((chunk, E), f32)
        if moe is not None:
            n_expert, k, n_ff_exp = moe
            self.k_used = k
            self.router_logits = DeviceArray.empty((chunk, n_expert), f32)
            self.ids = DeviceArray.zeros((chunk, k), np.int32)
            self.wts = DeviceArray.zeros((chunk, k), f32)
            self.max_tiles = _qgemm.max_grouped_tiles(chunk * k, n_expert, MOE_TILE_TOKENS)
            self.tiles = DeviceArray.zeros((self.max_tiles + 1, 4), np.int32)
            self.n_tiles = DeviceArray.zeros((1,), np.int32)
            self.sorted_token = DeviceArray.zeros((chunk * k,), np.int32)
            self.sorted_pos = DeviceArray.zeros((chunk * k,), np.int32)
            self.moe_act = DeviceArray.empty((chunk * k, n_ff_exp), f32)
            self.moe_actq = new_q8(n_ff_exp, rows=chunk * k)
            self.moe_y = DeviceArray.empty((chunk * k, E), f32)


def embedding_rows(w, tok, out, T: int, *, scale: float, stream):
    _emb.embedding(w.data, tok, out, qtype=w.qtype, n_embd=w.n_in, scale=scale, n_tokens=T, stream=stream)
    launch_counter.add()


def rmsnorm_rows(x, w, out, T: int, eps: float, *, residual=None, xq=None, stream):
    """:func:`rmsnorm` over the first T rows (``xq``: also the q8_1 copy for the GEMMs)."""
    rmsnorm(rows(x, T), w, rows(out, T), eps, residual=None if residual is None else rows(residual, T), stream=stream,
            xq=xq)


def quantize_rows(x, xq, T: int, *, stream):
    _q8.quantize_q8_1(rows(x, T), out=xq, stream=stream)
    launch_counter.add()


def gemm(w, xq, out, T: int, *, stream, accumulate: bool = False, w_up=None, act: str = "silu"):
    """``out[:T] (+)= W xq[:T]`` (or ``act(W xq) * (W_up xq)`` with ``w_up``) through the grouped GEMM."""
    _qgemm.quant_gemm(w.data, w.qtype, xq, w.n_out, out=out, w_up=None if w_up is None else w_up.data, act=act,
               accumulate=accumulate, n_rows=T, tile_tokens=PREFILL_TILE_TOKENS, stream=stream)
    launch_counter.add()


def gemv_rows(w, h, out, T: int, *, stream):
    """``out[:T] = h[:T] W^T`` with f32 activations through the decode GEMV, in groups of <= 8 rows (for a weight
    type the grouped GEMM does not take, e.g. a tied Q6_K embedding as the all-position LM head)."""
    n = w.n_in
    for r0 in range(0, T, 8):
        r = min(8, T - r0)
        _gemv.gemv(w.data, w.qtype, h.view(np.float32, (r, n), offset_bytes=r0 * n * 4), n_out=w.n_out,
                   out=out.view(np.float32, (r, w.n_out), offset_bytes=r0 * w.n_out * 4), stream=stream)
        launch_counter.add()


def gemm_supports(w) -> bool:
    """Whether the grouped GEMM (int8 activations) takes this weight type."""
    return w.qtype in _qgemm.SUPPORTED_QTYPES


def qk_norm_rope_kv_rows(kv: PagedKV, layer: int, pf: PrefillBuffers, T: int, q_norm, k_norm, *, n_head: int,
                         n_rot: int, base: float, eps: float, q_scale: float, stream, freq_factors=None,
                         v_norm: bool = False, k_eq_v: bool = False):
    """:func:`qk_norm_rope_kv` for the T rows of a chunk (a batch of T queries of one sequence). ``k_eq_v``: V is
    the raw K projection (Gemma 4 full layers)."""
    D = kv.head_dim[layer]
    KV = kv.n_kv_head[layer]
    k = pf.k.view(np.float32, (T, KV, D))
    _qknrk.qk_norm_rope_kv(pf.q.view(np.float32, (T, n_head, D)), k, k if k_eq_v else pf.v.view(np.float32, (T, KV, D)),
                           q_norm.data.view(np.float32, (D,)), k_norm.data.view(np.float32, (D,)), kv.k[layer],
                           kv.v[layer], pf.page_table.view(np.int32, (T, pf.page_table.shape[1])),
                           pf.pos.view(np.int32, (T,)), n_rot=n_rot, base=base, eps=eps, q_scale=q_scale,
                           freq_factors=None if freq_factors is None else freq_factors.data.view(np.float32,
                                                                                                 (n_rot // 2,)),
                           v_norm=v_norm, stream=stream)
    launch_counter.add()


def attention_rows(kv: PagedKV, layer: int, pf: PrefillBuffers, T: int, *, n_head: int, scale: float, window: int,
                   stream, softcap: float = 0.0):
    """Causal attention of the chunk's T queries (positions ``pf.pos``, their K/V already appended) over the cache:
    the tensor-core flash-attention prefill kernel (one launch; ``kernels/attention_prefill.py``), or with
    ``SPARKINFER_DISABLE=flash_prefill`` the decode kernel run as a batch of T queries (one launch, fused combine;
    every query re-reads its whole prefix; also the path of a head size the flash kernel does not take)."""
    D = kv.head_dim[layer]
    if enabled("flash_prefill") and D in _fattn.SUPPORTED_HEAD_DIMS:
        _fattn.attention_prefill(pf.q.view(np.float32, (T, n_head, D)), kv.k[layer], kv.v[layer],
                                 pf.page_table.view(np.int32, (pf.page_table.shape[1],)),
                                 pf.pos.view(np.int32, (T,)), scale=scale, window=window, softcap=softcap,
                                 out=pf.attn.view(np.float32, (T, n_head, D)), stream=stream)
        launch_counter.add()
        return
    ws = pf.attn_ws
    _attn.attention_decode(pf.q.view(np.float32, (T, n_head, D)), kv.k[layer], kv.v[layer],
                           pf.page_table.view(np.int32, (T, pf.page_table.shape[1])), pf.pos.view(np.int32, (T,)),
                           scale=scale, window=window, softcap=softcap, num_splits=1,
                           out=pf.attn.view(np.float32, (T, n_head, D)),
                           o_partial=ws.o_partial.view(np.float32, (T, n_head, 1, D)),
                           lse_partial=ws.lse_partial.view(np.float32, (T, n_head, 1)), fused_combine=True,
                           counters=ws.counters, stream=stream)
    launch_counter.add()


def moe_rows(w_router, w_gate, w_up, w_down, pf: PrefillBuffers, T: int, *, act: str = "silu", stream,
             accumulate_into=None, expert_scale=None, router_in=None, expert_in=None):
    """The routed-expert FFN of T tokens: router logits of ``router_in`` (default ``pf.h``) -> softmax/top-k -> sort
    by expert -> grouped gate+up GLU of ``expert_in`` (a q8_1 copy, default ``pf.hq``; gathered rows) -> q8_1 ->
    grouped down -> weighted combine (times ``expert_scale[e]`` when given) into ``accumulate_into`` (added to it)
    or ``pf.f``. ``w_up`` None: ``w_gate`` is a fused [E, 2F, n_in] gate+up tensor."""
    k = pf.k_used
    r_in = pf.h if router_in is None else router_in
    e_in = pf.hq if expert_in is None else expert_in
    _moe_route.router_logits(w_router.data.view(np.float32, (w_router.n_out, w_router.n_in)), rows(r_in, T), T,
                             pf.router_logits, stream=stream)
    _router.route(pf.router_logits.view(np.float32, (T, w_router.n_out)), k, norm_topk=True,
                  ids_out=pf.ids.view(np.int32, (T, k)), weights_out=pf.wts.view(np.float32, (T, k)), stream=stream)
    _moe_route.moe_align(pf.ids.view(np.int32, (T, k)), T, w_router.n_out, MOE_TILE_TOKENS, pf.tiles, pf.n_tiles,
                         pf.sorted_token, pf.sorted_pos, stream=stream)
    fused = w_up is None
    n_ff = w_gate.n_out // 2 if fused else w_gate.n_out
    _qgemm.quant_gemm(w_gate.data, w_gate.qtype, e_in, n_ff, out=pf.moe_act, w_up=None if fused else w_up.data,
                      act=act, tiles=pf.tiles, n_tiles=pf.n_tiles, max_tiles=pf.max_tiles, row_index=pf.sorted_token,
                      tile_tokens=MOE_TILE_TOKENS, fused_gate_up=fused, stream=stream)
    _q8.quantize_q8_1(rows(pf.moe_act, T * k), out=pf.moe_actq, stream=stream)
    _qgemm.quant_gemm(w_down.data, w_down.qtype, pf.moe_actq, w_down.n_out, out=pf.moe_y, tiles=pf.tiles,
                      n_tiles=pf.n_tiles, max_tiles=pf.max_tiles, tile_tokens=MOE_TILE_TOKENS, stream=stream)
    target = accumulate_into if accumulate_into is not None else pf.f
    _moe_route.moe_combine(pf.moe_y, pf.sorted_pos, pf.wts.view(np.float32, (T, k)), pf.ids.view(np.int32, (T, k)),
                           rows(target, T), T, accumulate=accumulate_into is not None,
                           expert_scale=None if expert_scale is None else expert_scale.data, stream=stream)
    launch_counter.add(8)
