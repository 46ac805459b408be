"""The ops a GPU forward is written in, bound to the CuTe DSL kernels (``sparkinfer_cute.kernels``).

Every function enqueues on ``stream`` and works on device buffers (``DeviceArray``) and weight handles (``QWeight``):
nothing here synchronizes or reads device memory on the host, so a whole decode step can be captured in one CUDA
graph. ``launch_counter`` counts kernel launches (kernels per token in the benchmarks).

(Over 600 lines: this is the one binding layer between the models and the kernels, decode and batched-prefill ops,
each with its ``@launches`` declaration and tuned-config lookup; models/dry_run.py replaces every op of this one
module to plan a step without a GPU.)
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sparkinfer_cute.errors import ConfigError
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
from sparkinfer_cute.kernels import norm_chain as _norms
from sparkinfer_cute.kernels import q8_1 as _q8
from sparkinfer_cute.kernels import qk_norm_rope_kv as _qknrk
from sparkinfer_cute.kernels import quant_gemm as _qgemm
from sparkinfer_cute.kernels import rmsnorm as _rms
from sparkinfer_cute.kernels import rope as _rope
from sparkinfer_cute.kernels import routed_experts as _routed
from sparkinfer_cute.kernels import router as _router
from sparkinfer_cute.kernels import router_gemv as _router_gemv
from sparkinfer_cute.kernels.paged_kv import PagedKVCache
from sparkinfer_cute.kernels.quant_decode import INT_QTYPES
from sparkinfer_cute.runtime import DeviceArray, Workspace, get_device

PAGE_SIZE = 64


# Passes that are correct (their GPU tests pass) but measured slower than the launches they replace, on an H100
# with PDL (RESULTS.md, 2026-12-08): off unless SPARKINFER_ENABLE names them (for A/B runs and other GPUs).
# - fused_ffn_tail, fused_router_norm: the 30B shape decodes 374.2 tok/s with them, 414.4 / 421.2 without (tg64,
#   same file and run); a norm chain run by one CTA after its grid costs more (3.5-7.8 us) than the launch it saves.
# - fused_o_tail: the same tail on Gemma 4's O projection, 9.20 us vs 5.99 us as two launches (microbench --tails).
# - fused_route_gate_up, fused_experts_down: one launch in ticket-ordered phases, 31.5 / 36.9 us vs 27.1 us as three
#   launches (30B), 52.3 / 54.8 vs 49.9 us (26B) (microbench --routed); 321.0 tok/s end to end.
OFF_BY_DEFAULT = frozenset({"fused_ffn_tail", "fused_router_norm", "fused_o_tail", "fused_route_gate_up",
                            "fused_experts_down"})


# Every pass SPARKINFER_DISABLE can switch off (README "Environment knobs"): the one list perf_model, the A/B scripts
# and enabled() check names against.
PASSES = frozenset({
    "fused_qk",          # per-head Q/K RMSNorm + RoPE + KV append in one launch
    "fused_qkv",         # the q/k/v GEMVs of one input in one launch (chunk mapping)
    "fused_router",      # router GEMV + softmax/top-k in one launch
    "fused_combine",     # split-KV attention and its LSE combine in one launch
    "fused_attn_q8",     # attention writes the q8_1 input of the int8 O projection
    "fused_moe_act_q8",  # the expert gate/up kernel writes the q8_1 input of the int8 down projection
    "fused_head_q8",     # the final norm writes the q8_1 input of the int8 LM head
    "fused_dense_glu",   # a dense GLU's gate+up+activation as one launch of the expert gate/up kernel
    "fused_expert_scale",  # the fused router also multiplies the routed weights by the per-expert down scale
    "fused_router_norm",   # the fused router forms its input: the pre-FFN norm + residual add (+ the experts' q8_1)
    "fused_norms",       # Gemma 4's RMSNorm chains after the O projection and after the FFNs (kernels/norm_chain.py)
    "flash_prefill",     # the batched prefill's tensor-core flash attention
    "fused_qk_attention",  # decode attention runs the Q/K norm + RoPE + KV append itself (no prologue launch)
    "fused_ffn_tail",    # the MoE down projection's last CTA runs the norms after it (next attn_norm / post-FFN chain)
    "fused_o_tail",      # the O projection's last CTA runs Gemma's post-attention norm chain
    "fused_qkv_mixed",   # packed q|k rows and a v of another type in one GEMV launch (slice mapping)
    "fused_route_gate_up",  # the router and the experts' gate/up in one launch, CTAs in ticket order
    "fused_experts_down",   # ... and the experts' down projection (+ its norm tail) as the same launch's last phase
})


def _env_passes(var: str, environ=os.environ) -> frozenset:
    """The comma-separated pass names of ``var``; a name that is not in PASSES raises ConfigError (one line, with the
    nearest pass named), so a typo cannot leave a pass switched the way it was."""
    names = frozenset(x.strip() for x in environ.get(var, "").split(",") if x.strip())
    for name in sorted(names - PASSES):
        near = difflib.get_close_matches(name, PASSES, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"{var}: {name!r} is not a speed pass; {hint}the passes are listed in README.md "
                          f"(Environment knobs) and models/ops.py PASSES")
    return names


# Speed passes can be switched off one by one (SPARKINFER_DISABLE=fused_qk,...) so the accuracy harness and the
# benchmark can compare a pass against the build without it, in the same run.
DISABLED = _env_passes("SPARKINFER_DISABLE") | (OFF_BY_DEFAULT - _env_passes("SPARKINFER_ENABLE"))


def enabled(name: str) -> bool:
    if name not in PASSES:
        raise KeyError(f"{name!r} is not a pass of models/ops.py PASSES")
    return name not in DISABLED


class _Counter:
    """Kernel launches enqueued since the last reset. Only :func:`launches` adds to it, with the count the op
    declares, and only for the outermost op of a nested call (an op built from other ops declares their launches
    in its own count)."""

    def __init__(self):
        self.n = 0
        self.depth = 0

    def reset(self):
        self.n = 0

    def add(self, k: int = 1):
        self.n += k

    def count(self) -> int:
        return self.n


launch_counter = _Counter()


def launches(count):
    """Declare how many kernels one call of the decorated op enqueues: an int, or a function of the op's own
    arguments. This declaration is the one source of truth for kernel counts: the real ``launch_counter`` (the
    benchmark's kernels per token) and the dry-run launch plan (models/launch_plan.py) both read it, so they cannot
    disagree; the GPU test test_gpu_decode.py holds both against the kernel nodes of the captured CUDA graph."""
    count_of = count if callable(count) else (lambda *args, **kwargs: count)

    def decorate(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            launch_counter.depth += 1
            try:
                result = fn(*args, **kwargs)
            finally:
                launch_counter.depth -= 1
            if launch_counter.depth == 0:
                launch_counter.add(count_of(*args, **kwargs))
            return result

        op.launches = count_of
        return op

    return decorate


# ---------------------------------------------------------------------------------------------- tuned launch configs
# The per-GPU launch configs the autotuner found (autotune/, a peer layer: never imported here). The engine loads them
# once (``autotune.load_tuned``) and hands them to the GPU forward, which makes them current around every enqueue
# (:func:`tuned_configs`); each call site below asks :func:`tuned` with its op and shape (the fields of the op's
# ``shape_keys``; the lookup buckets them as the search did) and passes the config's knobs to the kernel wrapper. The
# keys of a config are the wrapper's keyword arguments. None / nothing cached / a refused config: today's heuristic,
# per call site. A decode step is captured once, so the knobs are fixed at capture time.
class _NoTuning:
    def get(self, op, shape, **kw):
        return None


_tuning = _NoTuning()


@contextlib.contextmanager
def tuned_configs(tuning):
    """Inside the block, :func:`tuned` answers from ``tuning`` (an ``autotune.TunedConfigs``, or anything with its
    ``get(op, shape, *, where, applicable)``; None: nothing tuned, every call site takes its default)."""
    global _tuning
    prev, _tuning = _tuning, (tuning if tuning is not None else _NoTuning())
    try:
        yield
    finally:
        _tuning = prev


def tuned(op: str, shape: dict, *, where: str, applicable=None) -> dict:
    """The tuned launch knobs of ``op`` at ``shape`` for call site ``where`` (a weight or layer name), as keyword
    arguments of the kernel wrapper; {} = the wrapper's defaults (today's heuristic)."""
    return _tuning.get(op, shape, where=where, applicable=applicable) or {}


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
    # the Q/K/V prologue's extra terms (the models pass the tensors; here for the tuned-config lookup, whose kernel
    # is compiled with them): V RMS-normed without a weight, theta divided per pair (rope_freqs / linear scaling)
    v_norm: bool = False
    rope_divided: bool = False

    @property
    def q_width(self) -> int:
        """Values of one token's q (and attention output) row: ``n_head * head_dim``."""
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        """Values of one token's k (or v) row: ``n_head_kv * head_dim``."""
        return self.n_head_kv * self.head_dim


def attention_geometry(cfg) -> list[AttentionGeometry]:
    """One :class:`AttentionGeometry` per layer, from the config's per-layer views (``head_dim_for(l)``, ...)."""
    out = []
    for l in range(cfg.n_layer):
        if cfg.head_dim_v_for(l) != cfg.head_dim_for(l):
            raise ValueError(f"layer {l}: K head size {cfg.head_dim_for(l)} != V head size {cfg.head_dim_v_for(l)}; "
                             "the paged KV cache stores both with one head size")
        out.append(AttentionGeometry(n_head=cfg.n_head, n_head_kv=cfg.n_head_kv_for(l), head_dim=cfg.head_dim_for(l),
                                     n_rot=cfg.n_rot_for(l), rope_base=float(cfg.rope_base_for(l)),
                                     window=cfg.sliding_window if cfg.is_swa(l) else 0, v_norm=cfg.v_norm_for(l),
                                     rope_divided=cfg.rope_divided_for(l)))
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


def attention_config(g: AttentionGeometry, max_context: int, *, where: str = "attention",
                     sm_count: int | None = None) -> dict:
    """Launch knobs of one layer's decode attention (``num_splits``, ``heads_per_cta``, ``keys_per_iter``; 0 = the
    kernel's automatic choice). The decode graph is captured once for every position up to ``max_context``, so one
    config serves them all: the tuned config of the context bucket of the layer's most live keys (``max_context``,
    or the window of a sliding-window layer) when one is cached, else :func:`attention_splits` and automatic. The
    shape's ``qk_rot`` says whether the kernel runs the Q/K prologue (:func:`fused_qk_attention`): tuned with it,
    and with its V norm and theta divisors (``v_norm``, ``qk_freq_factors``) where the layer has them."""
    live = min(max_context, g.window) if g.window else max_context
    pro = fused_qk_attention(g)
    shape = {"n_head": g.n_head, "n_kv_head": g.n_head_kv, "head_dim": g.head_dim, "qk_rot": g.n_rot if pro else 0,
             "ctx": live, "v_norm": pro and g.v_norm, "qk_freq_factors": pro and g.rope_divided}
    return tuned("attention_decode", shape, where=where) or {
        "num_splits": attention_splits(g, max_context, sm_count), "heads_per_cta": 0, "keys_per_iter": 0}


class AttentionWorkspace:
    """Split-KV partials, shared by all layers (static shapes: the graph is captured once). Each layer has its own
    split count (``num_splits[l]``; with its other launch knobs in ``configs[l]``: :func:`attention_config`); the
    buffers are sized for the largest layer and each layer reads a view."""

    def __init__(self, layers: Sequence[AttentionGeometry], max_context: int):
        self.layers = list(layers)
        self.configs = [attention_config(g, max_context, where=f"blk.{l}.attention")
                        for l, g in enumerate(self.layers)]
        self.num_splits = [c["num_splits"] for c in self.configs]
        n_head = max(g.n_head for g in self.layers)
        # arrival counters of the fused combine (the last split CTA of a head group combines; left at zero):
        # at most n_head per sequence for every layer type (attention_decode.fused_counter_count)
        self.counters = DeviceArray.zeros((n_head,), np.int32)
        self.o_partial = DeviceArray.empty(
            (max(g.q_width * s for g, s in zip(self.layers, self.num_splits)),), np.float32)
        self.lse_partial = DeviceArray.empty(
            (max(g.n_head * s for g, s in zip(self.layers, self.num_splits)),), np.float32)

    def knobs(self, layer: int) -> dict:
        """The layer's launch knobs other than the split count (``heads_per_cta``, ``keys_per_iter``) that are not
        left to the kernel (0)."""
        return {k: v for k, v in self.configs[layer].items() if k != "num_splits" and v}

    def partials(self, layer: int) -> tuple[int, DeviceArray, DeviceArray]:
        """(num_splits, o_partial [1, H, S, D], lse_partial [1, H, S]) of one layer."""
        g, S = self.layers[layer], self.num_splits[layer]
        return (S, self.o_partial.view(np.float32, (1, g.n_head, S, g.head_dim)),
                self.lse_partial.view(np.float32, (1, g.n_head, S)))


# ---------------------------------------------------------------------------------------------- ops
@launches(1)
def embedding(w, tok, out, *, scale: float, stream):
    _emb.embedding(w.data, tok, out, qtype=w.qtype, n_embd=w.n_in, scale=scale, stream=stream)


@launches(1)
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


def _row(w):
    return w.data.view(np.float32, (w.n_in,))


def _post_attention_norms_launches(o, x, w_post, outs, *a, **k) -> int:
    return 1 if enabled("fused_norms") else 1 + len(outs)


@launches(_post_attention_norms_launches)
def post_attention_norms(o, x, w_post, outs, eps: float, *, delta, stream, xq=None):
    """``x += rmsnorm(o) * w_post`` (in place), then ``out = rmsnorm(x) * w`` for each ``(w, out)`` of ``outs``
    (1..3; Gemma 4: ffn_norm -> the dense MLP input, then the router input and pre_ffw_norm_2 -> the experts'
    input); ``xq``: also the q8_1 copy of the last output. One launch (kernels/norm_chain.py) unless ``fused_norms``
    is disabled: then one RMSNorm launch per norm, ``rmsnorm(o) * w_post`` through ``delta``."""
    if enabled("fused_norms"):
        _norms.post_attention_norms(o, x, _row(w_post), [(_row(w), out) for w, out in outs], eps, xq=xq,
                                    stream=stream)
        return
    rmsnorm(o, w_post, delta, eps, stream=stream)
    for i, (w, out) in enumerate(outs):
        rmsnorm(x, w, out, eps, residual=delta if i == 0 else None, stream=stream,
                xq=xq if i == len(outs) - 1 else None)


def _post_ffn_norms_launches(f, y, *a, next_norm=None, **k) -> int:
    return 1 if enabled("fused_norms") else (4 if y is not None else 2) + (next_norm is not None)


@launches(_post_ffn_norms_launches)
def post_ffn_norms(f, y, w1, w2, w, x, scale, eps: float, *, m, y2, fn, stream, next_norm=None):
    """``x = (x + rmsnorm(s) * w) * scale`` with ``s = rmsnorm(f) * w1 + rmsnorm(y) * w2`` (``y`` None: ``s = f``;
    ``scale`` one f32 on the device): Gemma 4's post_ffw_norm_1 / _2, post_ffw_norm, residual add and
    layer_output_scale; ``next_norm`` = ``(w_next, h, xq)``: then ``h = rmsnorm(x) * w_next`` (+ its q8_1 copy
    when ``xq``), the next layer's attn_norm or the final norm. One launch (kernels/norm_chain.py) unless
    ``fused_norms`` is disabled: then the RMSNorm and residual-scale launches through the scratch rows ``m``,
    ``y2``, ``fn``."""
    if enabled("fused_norms"):
        nxt = None if next_norm is None else (_row(next_norm[0]), next_norm[1], next_norm[2])
        _norms.post_ffn_norms(f, y, None if y is None else _row(w1), None if y is None else _row(w2), _row(w), x,
                              scale, eps, next_norm=nxt, stream=stream)
        return
    if y is not None:
        rmsnorm(f, w1, m, eps, stream=stream)
        rmsnorm(y, w2, y2, eps, stream=stream)
        rmsnorm(m, w, fn, eps, residual=y2, stream=stream)  # m += y2; fn = rmsnorm(m) * w
    else:
        rmsnorm(f, w, fn, eps, stream=stream)
    residual_scale(x, fn, scale, stream=stream)
    if next_norm is not None:
        rmsnorm(x, next_norm[0], next_norm[1], eps, stream=stream, xq=next_norm[2])


@launches(1)
def rmsnorm_heads(x, w, n_heads: int, head_dim: int, eps: float, *, stream):
    xv = x.view(np.float32, (n_heads, head_dim))
    _rms.rmsnorm(xv, w.data.view(np.float32, (head_dim,)), eps, out=xv, stream=stream)


# Which GEMVs run on int8 activations (q8_1 blocks of 32, dp4a) instead of f32: SPARKINFER_DP4A=auto|all|none.
# auto = where the H100 micro-benchmark measured dp4a faster (RESULTS.md, "int8 activations by default"), for models
# that opt in (Qwen3-MoE and Gemma 4; Gemma 3 keeps exact f32 activations): the LM head and DP4A_AUTO_PARTS.
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


def _multi_launches(ws, packed=None) -> int:
    """Launches of :func:`gemv_qkv` / :func:`gemv_qk`: one where ``fused_qkv`` is enabled and the chunk mapping
    applies to every matrix (kernels/gemv_chunk.py GemvMulti) or their rows are packed, else one GEMV each."""
    if not enabled("fused_qkv"):
        return len(ws)
    if all(_gemv_chunk.chunk_ok(w.qtype, w.n_in) for w in ws):
        return 1
    if packed is None:
        return len(ws)
    rest = len(ws) - _packed_count(ws, packed)
    return 1 if rest == 1 and enabled("fused_qkv_mixed") else 1 + rest


def new_q8(n: int, rows: int = 1):
    """Preallocated q8_1 activation buffers (graph capture must not allocate)."""
    return _q8.Q8Act(rows, n)


@launches(1)
def quantize(x, xq, *, stream):
    _q8.quantize_q8_1(x, out=xq, stream=stream)


def _gemv_op(xq) -> str:
    return "gemv_q8" if xq is not None else "gemv"


def _gemv_shape(w) -> dict:
    return {"qtype": w.qtype, "n_in": w.n_in, "n_out": w.n_out}


class _AfterMatmul:
    """What follows a matmul on the residual stream (:class:`AfterAttention`, :class:`AfterFfn`): run as the
    matmul's tail where ``fused()``, else as launches of its own after it."""

    def tail_for(self, out):
        """The tail's arguments for the matmul writing ``out``, or None where the chain runs separately."""
        return self.tail_args(out) if self.fused() else None

    def own_launches(self, out) -> int:
        """Launches the chain adds to the matmul's (0 as its tail)."""
        return 0 if self.fused() else self.separate_launches(out)


@dataclass
class AfterAttention(_AfterMatmul):
    """The norm chain after the O projection (:func:`post_attention_norms` with the projection's output as ``o``,
    Gemma 3/4), for the projection's launch to run as its last CTA's tail (pass ``fused_o_tail``,
    kernels/norm_chain.py ``RowNormChain.tail``) instead of a launch of its own; ``counter`` as :class:`AfterFfn`."""

    x: DeviceArray
    w_post: object
    outs: list
    eps: float
    counter: DeviceArray
    delta: DeviceArray
    xq: object = None

    def fused(self) -> bool:
        return enabled("fused_o_tail") and enabled("fused_norms")

    def separate_launches(self, out) -> int:
        return _post_attention_norms_launches(out, self.x, self.w_post, self.outs)

    def run_separately(self, out, stream) -> None:
        post_attention_norms(out, self.x, self.w_post, self.outs, self.eps, delta=self.delta, xq=self.xq,
                             stream=stream)

    def tail_args(self, out) -> _norms.AttnTailArgs:
        return _norms.AttnTailArgs(out, self.x, _row(self.w_post), [(_row(w), o) for w, o in self.outs], self.eps,
                                   self.counter, self.xq)


def _gemv_launches(w, x, y, *a, after=None, **k) -> int:
    return 1 + (after.own_launches(y) if after is not None else 0)


@launches(_gemv_launches)
def gemv(w, x, y, *, stream, xq=None, after: AfterAttention | AfterFfn | None = None, second=None):
    """y = W x over the raw quantized rows of W. With ``xq`` (the q8_1 copy of x, already quantized this step: the
    caller decided with :func:`prefer_dp4a`) the int8 path runs instead. ``after``: the norm chain that follows
    (:class:`AfterAttention` after an O projection, :class:`AfterFfn` after a dense down projection), in this
    launch where it can be. ``second``: a weight of another type (same n_in)
    whose rows continue ``y`` after W's (the slice kernel's two-matrix launch; :func:`gemv_qkv`)."""
    cfg = tuned(_gemv_op(xq), _gemv_shape(w), where=w.name)
    tail = after.tail_for(y) if after is not None else None
    sec = None if second is None else (second.data, second.qtype, second.n_out)
    _gemv.gemv(w.data, w.qtype, xq if xq is not None else x, n_out=w.n_out, out=y, stream=stream, tail=tail,
               second=sec, **cfg)
    if after is not None and tail is None:
        after.run_separately(y, stream)


def _chunk_only(cfg: dict) -> str | None:
    if cfg.get("mapping") != "chunk":
        return "the fused q/k/v launch runs the chunk mapping only"
    return None


def _gemv_fused(ws, ys, x, *, stream, xq=None):
    """The projections ``ws`` of one normed input in one launch (kernels/gemv_chunk.py GemvMulti) where the chunk
    mapping applies to every matrix, with each matrix's tuned rows per warp (a tuned slice mapping cannot run in
    the fused launch: not applied); else one :func:`gemv` each. (Counted by the calling op's declaration.)"""
    if not all(_gemv_chunk.chunk_ok(w.qtype, w.n_in) for w in ws):
        for w, y in zip(ws, ys):
            gemv(w, x, y, stream=stream, xq=xq)
        return
    rpw = tuple(tuned(_gemv_op(xq), _gemv_shape(w), where=w.name, applicable=_chunk_only).get("rows_per_warp")
                for w in ws)
    _gemv.gemv_multi([(w.data, w.qtype, y) for w, y in zip(ws, ys)], xq if xq is not None else x, stream=stream,
                     rows_per_warp=rpw if any(r is not None for r in rpw) else None)


def packs_rows(ws) -> bool:
    """Whether the projections ``ws`` of one input should be packed into one weight (models/base.py ``fuse_rows``)
    for :func:`gemv_qkv` / :func:`gemv_qk`: ``fused_qkv`` is on and the chunk kernel's multi-matrix launch does not
    take them (Gemma: n_embd 640 / 2816, or Q8_0 / Q5_0 weights)."""
    return enabled("fused_qkv") and not all(_gemv_chunk.chunk_ok(w.qtype, w.n_in) for w in ws)


def _packed_count(ws, packed) -> int:
    """How many leading matrices of ``ws`` the packed weight holds (all, or q and k when v's type differs)."""
    rows, n = 0, 0
    for w in ws:
        if rows >= packed[0].n_out:
            break
        rows, n = rows + w.n_out, n + 1
    return n


def _projections(ws, ys, x, *, stream, xq, packed):
    if not enabled("fused_qkv"):
        for w, y in zip(ws, ys):
            gemv(w, x, y, stream=stream, xq=xq)
    elif packed is not None and packs_rows(ws):
        rest = list(zip(ws, ys))[_packed_count(ws, packed):]  # matrices of another type (v)
        if len(rest) == 1 and enabled("fused_qkv_mixed"):
            # the packed rows and v's rows in one launch: v's output follows the packed ones in the packed q|k|v
            gemv(packed[0], x, packed[1], stream=stream, xq=xq, second=rest[0][0])
            return
        gemv(packed[0], x, packed[1], stream=stream, xq=xq)  # one GEMV over the packed rows into the packed q|k|v
        for w, y in rest:  # a matrix of another type: its own GEMV
            gemv(w, x, y, stream=stream, xq=xq)
    else:
        _gemv_fused(ws, ys, x, stream=stream, xq=xq)


@launches(lambda wq, wk, wv, *a, packed=None, **k: _multi_launches((wq, wk, wv), packed))
def gemv_qkv(wq, wk, wv, x, q, k, v, *, stream, xq=None, packed=None):
    """q, k, v projections of one normed input: one launch unless ``fused_qkv`` is disabled: the chunk kernel's
    multi-matrix launch (kernels/gemv_chunk.py GemvMulti) where it applies, else, with ``packed`` = (W, out), one
    GEMV of the rows of all three (W: models/base.py ``fuse_rows``) into q|k|v packed in ``out``
    (``packed_qkv``); W may hold q and k only (v of another type: a second GEMV)."""
    _projections((wq, wk, wv), (q, k, v), x, stream=stream, xq=xq, packed=packed)


@launches(lambda wq, wk, *a, packed=None, **k: _multi_launches((wq, wk), packed))
def gemv_qk(wq, wk, x, q, k, *, stream, xq=None, packed=None):
    """q and k projections of one normed input (K = V layers have no V projection): as :func:`gemv_qkv`."""
    _projections((wq, wk), (q, k), x, stream=stream, xq=xq, packed=packed)


@launches(1)
def glu(gate, up, out, *, act: str, stream):
    _glu.glu(gate, up, out, act=act, stream=stream)


def dense_expert_ids():
    """The expert-id buffer of :func:`dense_glu` (one int32 0; allocate with the model's buffers, not in a capture)."""
    return DeviceArray.zeros((1,), np.int32)


def _dense_glu_fused(w_gate, w_up) -> bool:
    """Whether :func:`dense_glu` runs as one launch of the MoE gate/up kernel."""
    return (enabled("fused_dense_glu") and w_gate.qtype == w_up.qtype and w_gate.n_in == w_up.n_in
            and w_gate.n_out == w_up.n_out and _moe.dense_glu_supported(w_gate.qtype, w_gate.n_in))


# one fused launch, else the gate GEMV, the up GEMV and the GLU kernel
@launches(lambda w_gate, w_up, *a, **k: 1 if _dense_glu_fused(w_gate, w_up) else 3)
def dense_glu(w_gate, w_up, x, gate, up, out, *, act: str, ids0, stream):
    """``out = act(W_gate x) * (W_up x)`` (a dense GLU MLP's first half). One launch where it applies: the MoE gate/up
    kernel (kernels/moe_ffn.py) with the dense weights as the only expert (``ids0``: :func:`dense_expert_ids`),
    the activation applied in registers, ``gate``/``up`` never written; else (``fused_dense_glu`` disabled, float
    weights, mixed types) two GEMVs into ``gate``/``up`` and the GLU kernel."""
    if _dense_glu_fused(w_gate, w_up):
        _moe.moe_gate_up(w_gate.data, w_up.data, w_gate.qtype, x, ids0, w_gate.n_out, out=out, stream=stream, act=act)
        return
    gemv(w_gate, x, gate, stream=stream)
    gemv(w_up, x, up, stream=stream)
    glu(gate, up, out, act=act, stream=stream)


@launches(1)
def rope(x, n_heads: int, head_dim: int, n_rot: int, base: float, pos, *, stream, freq_factors=None):
    _rope.rope_neox(x.view(np.float32, (n_heads, head_dim)), pos, n_rot=n_rot, base=base,
                    freq_factors=None if freq_factors is None else freq_factors.data.view(np.float32, (n_rot // 2,)),
                    stream=stream)


@launches(1)
def kv_append(kv: PagedKV, layer: int, k, v, pos, *, stream):
    D = kv.head_dim[layer]
    KV = kv.n_kv_head[layer]
    _kva.kv_cache_append(k.view(np.float32, (KV, D)), v.view(np.float32, (KV, D)), kv.k[layer], kv.v[layer],
                         kv.page_table, pos, stream=stream)


def _attention_launches(*args, xq=None, **kwargs) -> int:
    """Split-KV + LSE combine in one launch (two with ``fused_combine`` disabled), plus the q8_1 quantization of the
    output when ``xq`` is asked for and the kernel does not write it itself (``fused_attn_q8`` disabled)."""
    return (1 if enabled("fused_combine") else 2) + (1 if xq is not None and not enabled("fused_attn_q8") else 0)


@launches(_attention_launches)
def attention(kv: PagedKV, layer: int, q, out, pos, ws: AttentionWorkspace, *, n_head: int, scale: float,
              window: int, stream, softcap: float = 0.0, xq=None, prologue=None):
    """``xq`` (a Q8Act of ``out``'s size): also its q8_1 copy for the int8 O projection, written by the attention
    kernel itself (the combining CTA quantizes what it writes: no quantize launch) unless ``fused_attn_q8`` is
    disabled. ``prologue`` (a kernels/qk_norm_rope_kv.py ``QKPrologue``; with ``fused_combine`` only): ``q`` is raw
    and the kernel runs the Q/K prologue itself (:func:`self_attention`)."""
    D = kv.head_dim[layer]
    fused = enabled("fused_combine")  # split-KV + LSE combine in one launch (last CTA of a head group combines)
    fused_q8 = xq is not None and enabled("fused_attn_q8")
    num_splits, o_partial, lse_partial = ws.partials(layer)
    knobs = ws.knobs(layer)
    if prologue is not None and not _attn.prologue_supported(n_head, kv.n_kv_head[layer], D, num_splits,
                                                             knobs.get("heads_per_cta", 0), PAGE_SIZE):
        knobs.pop("heads_per_cta", None)  # a tuned head tile too big for the prologue's smem: the automatic one
    _attn.attention_decode(q.view(np.float32, (n_head, D)), kv.k[layer], kv.v[layer], kv.page_table, pos,
                           scale=scale, window=window, softcap=softcap, num_splits=num_splits,
                           out=out.view(np.float32, (1, n_head, D)), o_partial=o_partial,
                           lse_partial=lse_partial, fused_combine=fused, counters=ws.counters, stream=stream,
                           out_q8=xq if fused_q8 else None, prologue=prologue, **knobs)
    if xq is not None and not fused_q8:
        quantize(out, xq, stream=stream)


@launches(1)
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


# one fused launch, or two per-head norms + two ropes + the KV append
@launches(lambda *a, **k: 1 if enabled("fused_qk") else 5)
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


def fused_qk_attention(g: AttentionGeometry) -> bool:
    """Whether :func:`self_attention` is one launch for layers of geometry ``g``: the passes are on and the
    fused-combine attention kernel can hold the Q/K prologue (kernels/attention_decode.py ``prologue_supported``,
    checked at the largest split count, so it holds at every context length)."""
    return (enabled("fused_qk_attention") and enabled("fused_qk") and enabled("fused_combine")
            and _attn.prologue_supported(g.n_head, g.n_head_kv, g.head_dim, 256))


def _self_attention_launches(kv, layer, g, *args, xq=None, **kwargs) -> int:
    if fused_qk_attention(g):
        return 1 + (1 if xq is not None and not enabled("fused_attn_q8") else 0)
    return (1 if enabled("fused_qk") else 5) + _attention_launches(xq=xq)


@launches(_self_attention_launches)
def self_attention(kv: PagedKV, layer: int, g: AttentionGeometry, q, k, v, q_norm, k_norm, pos, out,
                   ws: AttentionWorkspace, *, eps: float, q_scale: float, scale: float, stream, freq_factors=None,
                   v_norm: bool = False, softcap: float = 0.0, xq=None):
    """Everything between the Q/K/V projections and the O projection of one decode step: per-head Q/K RMSNorm,
    NEOX RoPE over ``g.n_rot`` dims (base ``g.rope_base``, ``freq_factors`` dividing theta), q times ``q_scale``,
    fp16 KV append (``v`` may be ``k``: K = V; ``v_norm``: V RMS-normed without a weight), then attention over the
    cache (``scale`` on q·k, ``g.window``, ``softcap``) into ``out`` (``xq``: with its q8_1 copy).

    One launch (``fused_qk_attention``: the attention kernel runs the prologue, :func:`fused_qk_attention`), else
    :func:`qk_prologue` then :func:`attention`. Both give the same bits."""
    if not fused_qk_attention(g):
        f = qk_prologue(kv, layer, q, k, v, q_norm, k_norm, pos, n_head=g.n_head, n_rot=g.n_rot, base=g.rope_base,
                        eps=eps, q_scale=q_scale, stream=stream, freq_factors=freq_factors, v_norm=v_norm)
        attention(kv, layer, q, out, pos, ws, n_head=g.n_head, scale=scale * f, window=g.window, stream=stream,
                  softcap=softcap, xq=xq)
        return
    D = kv.head_dim[layer]
    KV = kv.n_kv_head[layer]
    kd = k.view(np.float32, (KV, D))
    vd = kd if v is k else v.view(np.float32, (KV, D))  # K = V: one buffer
    ff = None if freq_factors is None else freq_factors.data.view(np.float32, (g.n_rot // 2,))
    pro = _qknrk.QKPrologue(kd, vd, q_norm.data.view(np.float32, (D,)), k_norm.data.view(np.float32, (D,)),
                            n_rot=g.n_rot, base=g.rope_base, eps=eps, q_scale=q_scale, freq_factors=ff, v_norm=v_norm)
    attention(kv, layer, q, out, pos, ws, n_head=g.n_head, scale=scale, window=g.window, stream=stream,
              softcap=softcap, xq=xq, prologue=pro)


class RouterState:
    """Graph-stable buffers of the fused router: logits scratch + the last-CTA arrival counter, and the ticket / ready
    state of the launch that routes and runs the experts' gate/up (kernels/routed_experts.py) (shared by layers: each
    launch leaves them at zero)."""

    def __init__(self, n_expert: int):
        self.logits = DeviceArray.empty((n_expert,), np.float32)
        self.counter = DeviceArray.zeros((1,), np.int32)
        self.chain = DeviceArray.zeros((_routed.CHAIN_INTS,), np.int32)


def _router_launches(*a, down_scale=None, prenorm=None, **k) -> int:
    """The fused router, plus the norm and the scale launches it does not fold (their passes disabled)."""
    return (1 + (down_scale is not None and not enabled("fused_expert_scale"))
            + (prenorm is not None and not enabled("fused_router_norm")))


@launches(_router_launches)
def router_gemv(w, h, ids, weights, k: int, st: RouterState, *, stream, down_scale=None, prenorm=None):
    """F32 router GEMV + softmax + top-k + renormalize in one launch (kernels/router_gemv.py RouterGemvTopK);
    ``down_scale`` (a per-expert vector weight: Gemma 4's ``ffn_down_exps.scale``): the routed weights times
    ``down_scale[id]`` too, in the same launch (``fused_expert_scale`` disabled: :func:`expert_scale`'s launch).
    ``prenorm`` = ``(x, delta, w_norm, eps, hq)``: the router's input ``h`` is formed by the same launch, the
    pre-FFN norm with its residual add: ``x += delta``, ``h = rmsnorm(x) * w_norm`` and, with ``hq``, its q8_1 copy
    for the experts (``fused_router_norm`` disabled: :func:`rmsnorm`'s launch first)."""
    RouteFirst(w, h, weights, k, st, down_scale, prenorm).run(ids, stream,
                                                              lambda route: _router_gemv.route_gemv(**route))


@dataclass
class RouteFirst:
    """A :func:`router_gemv` call (its arguments but the expert ids, which are the gate/up's) for :func:`moe_gate_up`
    to run first: in the same launch where ``fused_route_gate_up`` is on (kernels/routed_experts.py: the router's
    CTAs, then the experts' gate/up CTAs in ticket order; one kernel boundary fewer per MoE layer), else as the
    router's own launch(es) before the gate/up launch."""
    w: object
    h: object
    weights: object
    k: int
    state: RouterState
    down_scale: object = None
    prenorm: tuple | None = None

    def fused(self) -> bool:
        return enabled("fused_route_gate_up") and self.w.qtype == "F32"

    def launches(self) -> int:
        """Launches of the routing itself beside the gate/up launch (its norm and scale launches, where their passes
        are off; the router's own launch where it does not share the gate/up's)."""
        return _router_launches(down_scale=self.down_scale, prenorm=self.prenorm) - self.fused()

    def run(self, ids, stream, launch) -> None:
        """The router call's launches, with the fused router's own launch ``launch(route_gemv keywords)``."""
        fold = self.down_scale is not None and enabled("fused_expert_scale")
        pre = None
        if self.prenorm is not None:
            x, delta, w_norm, eps, hq = self.prenorm
            if enabled("fused_router_norm"):
                pre = (x, delta, _row(w_norm), eps, hq)
            else:
                rmsnorm(x, w_norm, self.h, eps, residual=delta, stream=stream, xq=hq)
        launch(dict(w_router=self.w.data, h=self.h, k=self.k, norm_topk=True, ids_out=ids, weights_out=self.weights,
                    scratch=self.state.logits, counter=self.state.counter, n_expert=self.w.n_out, stream=stream,
                    expert_scale=_row(self.down_scale) if fold else None, prenorm=pre))
        if self.down_scale is not None and not fold:
            expert_scale(self.weights, ids, self.down_scale, stream=stream)


@launches(1)
def router(logits, ids, weights, k: int, *, stream):
    _router.route(logits, k, norm_topk=True, ids_out=ids, weights_out=weights, stream=stream)


class MoeActQ8:
    """The q8_1 copy of the routed experts' activations [k, n_ff] (the dp4a down projection's input) and the
    arrival counters the gate/up kernel needs to write it itself."""

    def __init__(self, k: int, n_ff: int):
        self.q8 = new_q8(n_ff, rows=k)
        self.counters = DeviceArray.zeros((k * n_ff // _q8.QK8_1,), np.int32)


def gate_up_writes_act_q8(n_ff: int) -> bool:
    """Whether :func:`moe_gate_up` given an ``actq`` writes it itself (else :func:`moe_down` quantizes: one more
    launch). A pure function of the shape and ``SPARKINFER_DISABLE``, so both ops (and the dry-run launch plan)
    decide alike."""
    return enabled("fused_moe_act_q8") and n_ff % _q8.QK8_1 == 0


@dataclass
class ExpertsDown:
    """The experts' down projection after a routed gate/up (:func:`moe_down`'s arguments but the activations, ids
    and weights, which come from the gate/up and the router): for :func:`moe_gate_up` to run in its own launch as
    the last phase where ``fused()`` (pass ``fused_experts_down``; kernels/routed_experts.py), else as
    :func:`moe_down`'s launch(es) after it."""
    w_down: object
    out: object
    after: AfterFfn | None = None

    def fused(self, route: RouteFirst | None, actq) -> bool:
        """In the routed launch: the routing is (``route.fused()``) and nothing runs between the gate/up and the
        down (no q8_1 quantize launch of the activations)."""
        return (route is not None and route.fused() and enabled("fused_experts_down")
                and (actq is None or gate_up_writes_act_q8(self.w_down.n_in)))

    def launches(self, route, act, ids, actq) -> int:
        """Launches of the down projection beside the gate/up launch."""
        if self.fused(route, actq):
            return self.after.own_launches(self.out) if self.after is not None else 0
        return _moe_down_launches(self.w_down, act, ids, route.weights if route is not None else None, self.out,
                                  actq=actq, after=self.after)


def _moe_gate_up_launches(w_gate, w_up, h, ids, act, *a, route: RouteFirst | None = None,
                          down: ExpertsDown | None = None, actq=None, **k) -> int:
    return (1 + (route.launches() if route is not None else 0)
            + (down.launches(route, act, ids, actq) if down is not None else 0))


@launches(_moe_gate_up_launches)
def moe_gate_up(w_gate, w_up, h, ids, act, *, stream, hq=None, glu: str = "silu", actq: MoeActQ8 | None = None,
                route: RouteFirst | None = None, down: ExpertsDown | None = None):
    """``hq`` (the q8_1 copy of h, already quantized this step): the dp4a kernel instead of the f32 one. ``w_up``
    None: ``w_gate`` is a fused [E, 2F, n_in] gate+up tensor (Gemma 4). ``glu``: the gate activation. ``actq``: the
    same launch also writes the q8_1 copy of ``act`` for :func:`moe_down` (each 32-row block quantized by the
    last CTA to write it) where :func:`gate_up_writes_act_q8`. ``route``: the router call that writes ``ids``, run
    first (:class:`RouteFirst`: in the same launch where it can). ``down``: the experts' down projection on ``act``
    (with the router's weights), run after (:class:`ExpertsDown`: in the same launch where it can)."""
    n_ff = w_gate.n_out if w_up is not None else w_gate.n_out // 2
    fuse_q8 = actq is not None and gate_up_writes_act_q8(n_ff)
    shape = {"qtype": w_gate.qtype, "n_in": w_gate.n_in, "n_ff": n_ff, "n_expert": w_gate.n_expert, "k": _slots(ids),
             "fused": w_up is None}
    cfg = tuned("moe_gate_up_q8" if hq is not None else "moe_gate_up", shape, where=w_gate.name,
                applicable=(lambda c: _act_q8_blocks(n_ff, c)) if fuse_q8 else None)
    args = (w_gate.data, None if w_up is None else w_up.data, w_gate.qtype, hq if hq is not None else h, ids, n_ff)
    kw = dict(out=act, act=glu, out_q8=actq.q8 if fuse_q8 else None, counters=actq.counters if fuse_q8 else None,
              **cfg)
    if down is not None and route is None:
        raise ValueError("moe_gate_up: a down phase needs the routing (route) that gives its weights")
    if route is not None and route.fused():
        gate_up = dict(zip(("w_gate", "w_up", "qtype", "h", "ids", "n_ff"), args), **kw)
        down_kw = None
        if down is not None and down.fused(route, actq):
            down_kw = _moe_down_call(down.w_down, act, ids, route.weights, down.out, actq, down.after)
        route.run(ids, stream, lambda r: _routed.routed_experts(r, gate_up, route.state.chain, down=down_kw,
                                                                 stream=stream))
        if down_kw is not None:
            if down.after is not None and down_kw["tail"] is None:
                down.after.run_separately(down.out, stream)
            return
    else:
        if route is not None:
            route.run(ids, stream, lambda r: _router_gemv.route_gemv(**r))
        _moe.moe_gate_up(*args, stream=stream, **kw)
    if down is not None:
        moe_down(down.w_down, act, ids, route.weights, down.out, stream=stream, actq=actq, after=down.after)


def _act_q8_blocks(n_ff: int, cfg: dict) -> str | None:
    """Why a tuned gate/up config cannot write the q8_1 copy itself (None: it can): the kernel's own check that its
    CTAs' rows tile the blocks of 32 it quantizes; the call site then keeps its default."""
    try:
        _moe.check_quantize_out(n_ff, _moe.WARPS * int(cfg.get("rows_per_warp", 1)))
    except ValueError as e:
        return str(e)
    return None


def _slots(ids) -> int:
    """Routed experts per token: the size of the expert-id buffer (what the kernel wrappers read k from)."""
    return int(np.prod(ids.shape))


@dataclass
class AfterFfn(_AfterMatmul):
    """What follows an FFN's last matmul on the residual stream, for that matmul's launch to run itself as its last
    CTA's tail (pass ``fused_ffn_tail``; kernels/norm_chain.py ``RowNormChain.tail``) instead of a launch of its
    own:

    - ``post`` given (Gemma): :func:`post_ffn_norms`, ``post`` = ``(f, w1, w2, w, scale, m, y2, fn)`` as that op
      takes them; with ``f`` given the matmul's output is the experts' ``y`` (Gemma 4 MoE layers), with ``f`` None
      it is ``f`` itself and there are no experts (Gemma 3's dense down projection);
    - ``post`` None (Qwen3-MoE): ``x += out; h = rmsnorm(x) * w_next`` (+ q8_1), the next layer's attn_norm or the
      final norm (:func:`rmsnorm` with its residual).

    ``next_norm`` = ``(w_next, h, xq)``; ``counter``: one int32, zero (models/base.py ``tail_counter``)."""

    x: DeviceArray
    eps: float
    counter: DeviceArray
    next_norm: tuple | None
    post: tuple | None = None

    def fused(self) -> bool:
        return enabled("fused_ffn_tail") and (self.post is None or enabled("fused_norms"))

    def _f_y(self, out):
        """(f, y) of the post-FFN chain, given the matmul's output."""
        return (out, None) if self.post[0] is None else (self.post[0], out)

    def separate_launches(self, out) -> int:
        if self.post is None:
            return 1
        return _post_ffn_norms_launches(*self._f_y(out), next_norm=self.next_norm)

    def run_separately(self, out, stream) -> None:
        if self.post is None:
            w_next, h, xq = self.next_norm
            rmsnorm(self.x, w_next, h, self.eps, residual=out, stream=stream, xq=xq)
            return
        _, w1, w2, w, scale, m, y2, fn = self.post
        f, y = self._f_y(out)
        post_ffn_norms(f, y, w1, w2, w, self.x, scale, self.eps, m=m, y2=y2, fn=fn, next_norm=self.next_norm,
                       stream=stream)

    def tail_args(self, out) -> _norms.FfnTailArgs:
        nxt = None if self.next_norm is None else (_row(self.next_norm[0]), *self.next_norm[1:])
        if self.post is None:
            return _norms.FfnTailArgs(out, None, None, None, None, self.x, None, self.eps, self.counter, nxt,
                                      post_norm=False)
        _, w1, w2, w, scale, *_ = self.post
        f, y = self._f_y(out)
        return _norms.FfnTailArgs(f, y, None if y is None else _row(w1), None if y is None else _row(w2), _row(w),
                                  self.x, scale, self.eps, self.counter, nxt)


def _moe_down_launches(w_down, *a, actq=None, after=None, **k) -> int:
    # with an actq the gate/up kernel did not write: the q8_1 quantization of act, then the down GEMV
    n = 2 if actq is not None and not gate_up_writes_act_q8(w_down.n_in) else 1
    out = a[3] if len(a) > 3 else k.get("out")
    return n + (after.own_launches(out) if after is not None else 0)


@launches(_moe_down_launches)
def moe_down(w_down, act, ids, weights, out, *, stream, actq: MoeActQ8 | None = None, after: AfterFfn | None = None):
    """``actq`` (the one given to :func:`moe_gate_up` for this ``act``): the dp4a kernel on the q8_1 copy of
    ``act``, quantized here unless the gate/up kernel wrote it. ``after``: what follows on the residual stream
    (:class:`AfterFfn`), in this launch where it can be."""
    if actq is not None and not gate_up_writes_act_q8(w_down.n_in):
        quantize(act, actq.q8, stream=stream)
    kw = _moe_down_call(w_down, act, ids, weights, out, actq, after)
    args = tuple(kw.pop(k) for k in ("w_down", "qtype", "act", "ids", "weights", "n_out"))
    _moe.moe_down(*args, stream=stream, **kw)
    if after is not None and kw["tail"] is None:
        after.run_separately(out, stream)


def _moe_down_call(w_down, act, ids, weights, out, actq, after) -> dict:
    """The keywords of kernels/moe_ffn.py ``moe_down`` for :func:`moe_down`'s call (tuned config, tail)."""
    shape = {"qtype": w_down.qtype, "n_ff": w_down.n_in, "n_out": w_down.n_out, "n_expert": w_down.n_expert,
             "k": _slots(ids)}
    cfg = tuned("moe_down_q8" if actq is not None else "moe_down", shape, where=w_down.name)
    return dict(w_down=w_down.data, qtype=w_down.qtype, act=actq.q8 if actq is not None else act, ids=ids,
                weights=weights, n_out=w_down.n_out, out=out, tail=after.tail_for(out) if after is not None else None,
                **cfg)


@launches(1)
def residual_scale(x, f, s, *, stream):
    """``x = (x + f) * s`` (``s``: one f32 on the device: Gemma 4's layer_output_scale, or 1)."""
    _elem.residual_scale(x, f, s, stream=stream)


@launches(1)
def softcap(x, cap: float, *, stream):
    """``x = cap * tanh(x / cap)`` in place (final logit softcapping)."""
    _elem.softcap(x, cap, stream=stream)


@launches(1)
def expert_scale(weights, ids, scale, *, stream):
    """``weights[j] *= scale[ids[j]]``: a per-expert down scale folded into the routing weights."""
    _elem.gather_scale(weights, ids, scale.data.view(np.float32, (scale.n_in,)), stream=stream)


_argmax_ws = None


@launches(2)  # chunk partials + final reduce
def argmax(logits, out_id, *, stream):
    global _argmax_ws
    if _argmax_ws is None:
        _argmax_ws = Workspace()  # partials allocated at warm-up, reused (graph-stable) afterwards
    _am.argmax(logits, out=out_id, workspace=_argmax_ws, stream=stream)


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


@launches(1)
def embedding_rows(w, tok, out, T: int, *, scale: float, stream):
    _emb.embedding(w.data, tok, out, qtype=w.qtype, n_embd=w.n_in, scale=scale, n_tokens=T, stream=stream)


@launches(1)
def rmsnorm_rows(x, w, out, T: int, eps: float, *, residual=None, xq=None, stream):
    """:func:`rmsnorm` over the first T rows (``xq``: also the q8_1 copy for the GEMMs)."""
    rmsnorm(rows(x, T), w, rows(out, T), eps, residual=None if residual is None else rows(residual, T), stream=stream,
            xq=xq)


@launches(1)
def quantize_rows(x, xq, T: int, *, stream):
    """The first T rows of ``x`` at ``xq``'s width (``xq.n``, a layer's own width: see ``Q8Act.narrow``)."""
    _q8.quantize_q8_1(rows(x, T, xq.n), out=xq, stream=stream)


@launches(1)
def gemm(w, xq, out, T: int, *, stream, accumulate: bool = False, w_up=None, act: str = "silu"):
    """``out[:T] (+)= W xq[:T]`` (or ``act(W xq) * (W_up xq)`` with ``w_up``) through the grouped GEMM. A prefill
    graph is captured per chunk length T, so the tuned config of T's token bucket applies to it."""
    shape = {"qtype": w.qtype, "n_in": w.n_in, "n_out": w.n_out, "tokens": T, "n_expert": 0, "k": 0,
             "act": "none" if w_up is None else act}
    cfg = {"tile_tokens": PREFILL_TILE_TOKENS, **tuned("quant_gemm", shape, where=w.name)}
    _qgemm.quant_gemm(w.data, w.qtype, xq, w.n_out, out=out, w_up=None if w_up is None else w_up.data, act=act,
                      accumulate=accumulate, n_rows=T, stream=stream, **cfg)


@launches(lambda w, h, out, T, **k: -(-T // 8))  # groups of <= 8 rows
def gemv_rows(w, h, out, T: int, *, stream):
    """``out[:T] = h[:T] W^T`` with f32 activations through the decode GEMV, in groups of <= 8 rows (for a weight
    type the grouped GEMM does not take, e.g. a tied Q6_K embedding as the all-position LM head)."""
    n = w.n_in
    for r0 in range(0, T, 8):
        r = min(8, T - r0)
        _gemv.gemv(w.data, w.qtype, h.view(np.float32, (r, n), offset_bytes=r0 * n * 4), n_out=w.n_out,
                   out=out.view(np.float32, (r, w.n_out), offset_bytes=r0 * w.n_out * 4), stream=stream)


def gemm_supports(w) -> bool:
    """Whether the grouped GEMM (int8 activations) takes this weight type."""
    return w.qtype in _qgemm.SUPPORTED_QTYPES


@launches(1)
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


def prefill_flash_block_n(head_dim: int) -> int | None:
    """The key tile of the tensor-core flash prefill kernel where :func:`attention_rows` runs it for this head size
    (its f16 q and P are part of the build's rounding: models/int8_plan.py ``rounding_plan``), None where it runs
    the decode kernel (f32 q, exact softmax weights)."""
    if enabled("flash_prefill") and head_dim in _fattn.SUPPORTED_HEAD_DIMS:
        return _fattn.tile_config(head_dim)["block_n"]
    return None


@launches(1)
def attention_rows(kv: PagedKV, layer: int, pf: PrefillBuffers, T: int, *, n_head: int, scale: float, window: int,
                   stream, softcap: float = 0.0):
    """Causal attention of the chunk's T queries (positions ``pf.pos``, their K/V already appended) over the cache:
    the tensor-core flash-attention prefill kernel (one launch; ``kernels/attention_prefill.py``), or with
    ``SPARKINFER_DISABLE=flash_prefill`` the decode kernel run as a batch of T queries (one launch, fused combine;
    every query re-reads its whole prefix; also the path of a head size the flash kernel does not take)."""
    D = kv.head_dim[layer]
    if prefill_flash_block_n(D) is not None:
        _fattn.attention_prefill(pf.q.view(np.float32, (T, n_head, D)), kv.k[layer], kv.v[layer],
                                 pf.page_table.view(np.int32, (pf.page_table.shape[1],)),
                                 pf.pos.view(np.int32, (T,)), scale=scale, window=window, softcap=softcap,
                                 out=pf.attn.view(np.float32, (T, n_head, D)), stream=stream)
        return
    ws = pf.attn_ws
    _attn.attention_decode(pf.q.view(np.float32, (T, n_head, D)), kv.k[layer], kv.v[layer],
                           pf.page_table.view(np.int32, (T, pf.page_table.shape[1])), pf.pos.view(np.int32, (T,)),
                           scale=scale, window=window, softcap=softcap, num_splits=1,
                           out=pf.attn.view(np.float32, (T, n_head, D)),
                           o_partial=ws.o_partial.view(np.float32, (T, n_head, 1, D)),
                           lse_partial=ws.lse_partial.view(np.float32, (T, n_head, 1)), fused_combine=True,
                           counters=ws.counters, stream=stream)


def _routing_tile(cfg: dict) -> str | None:
    """A grouped GEMM's token tile is the tile of the layer's routing tables (one per layer for both grouped GEMMs,
    built with MOE_TILE_TOKENS): a tuned config with another tile cannot be applied alone."""
    if cfg.get("tile_tokens") != MOE_TILE_TOKENS:
        return (f"the routing tables are built for {MOE_TILE_TOKENS}-token tiles, "
                f"the config has {cfg.get('tile_tokens')}")
    return None


# router logits, top-k, align, gate+up GEMM, q8_1, down GEMM, combine: the 7 kernel calls below, one launch each (the
# count added here before the declarations existed was 8: one too many per MoE layer of a prefill chunk)
@launches(7)
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
    E = w_down.n_expert
    # the fused gate+up layout is not in the searched space (autotune/shapes.py): always the default
    gu = {} if fused else tuned("quant_gemm", {"qtype": w_gate.qtype, "n_in": w_gate.n_in, "n_out": n_ff,
                                               "tokens": T, "n_expert": E, "k": k, "act": act},
                                where=w_gate.name, applicable=_routing_tile)
    dn = tuned("quant_gemm", {"qtype": w_down.qtype, "n_in": w_down.n_in, "n_out": w_down.n_out, "tokens": T,
                              "n_expert": E, "k": k, "act": "none"}, where=w_down.name, applicable=_routing_tile)
    _qgemm.quant_gemm(w_gate.data, w_gate.qtype, e_in, n_ff, out=pf.moe_act, w_up=None if fused else w_up.data,
                      act=act, tiles=pf.tiles, n_tiles=pf.n_tiles, max_tiles=pf.max_tiles, row_index=pf.sorted_token,
                      fused_gate_up=fused, stream=stream, **{"tile_tokens": MOE_TILE_TOKENS, **gu})
    _q8.quantize_q8_1(rows(pf.moe_act, T * k), out=pf.moe_actq, stream=stream)
    _qgemm.quant_gemm(w_down.data, w_down.qtype, pf.moe_actq, w_down.n_out, out=pf.moe_y, tiles=pf.tiles,
                      n_tiles=pf.n_tiles, max_tiles=pf.max_tiles, stream=stream,
                      **{"tile_tokens": MOE_TILE_TOKENS, **dn})
    target = accumulate_into if accumulate_into is not None else pf.f
    _moe_route.moe_combine(pf.moe_y, pf.sorted_pos, pf.wts.view(np.float32, (T, k)), pf.ids.view(np.int32, (T, k)),
                           rows(target, T), T, accumulate=accumulate_into is not None,
                           expert_scale=None if expert_scale is None else expert_scale.data, stream=stream)
