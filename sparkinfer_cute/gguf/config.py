"""Typed model configurations built from GGUF metadata, and the tensor inventory each architecture needs.

One frozen dataclass per architecture (``Qwen3MoeConfig``, ``Gemma3Config``, ``Gemma4Config``,
``Qwen35MoeConfig``), all deriving from :class:`ModelConfig`. :func:`load_config` dispatches on
``general.architecture``; :func:`required_tensors` lists every tensor the forward reads with its ggml shape
(ne0 first), which the synthetic writer, the GPU loader and :func:`validate_tensors` share. Key names,
defaults and the per-layer rules are those of llama.cpp (``src/llama-model.cpp``, ``src/models/*.cpp``) as
recorded in shared/spec/models.md.

A few facts come from *tensor presence* rather than metadata (llama.cpp does the same): tied output (no
``output.weight``), fused ``ffn_gate_up_exps``, fused ``attn_qkv`` (qwen3moe), Gemma 4 full layers without
``attn_v`` (K = V) and the optional ``layer_output_scale``. ``load_config`` therefore takes the whole
:class:`GGUFFile`, not just its metadata.

(Over 600 lines: one typed config and one tensor inventory per architecture, four architectures, sharing the
validation code; an architecture's config and inventory are read together.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GGUFError

if TYPE_CHECKING:
    from .reader import GGUFFile

Shape = tuple[int, ...]

# llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h): per-layer arrays are sized by it and larger block counts
# are refused. Bounding it here also keeps a corrupted block_count (say 2**40) from making required_tensors()
# loop.
MAX_LAYERS = 512


# -------------------------------------------------------------------------------------------- metadata access
class _Meta:
    """Typed, error-reporting access to ``{arch}.*`` metadata keys of one file."""

    _MISSING = object()

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch, self.path = g, arch, g.path

    def _raw(self, key: str, default):
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        if full in self.g.metadata:
            return full, self.g.metadata[full]
        if default is self._MISSING:
            raise GGUFError(self.path, f"missing required metadata key {full!r}")
        return full, default

    def int(self, key: str, default=_MISSING, *, min_value: int = 0):
        full, v = self._raw(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(self.path, f"metadata key {full!r} should be an integer, got {v!r:.80}")
        if v < min_value:
            raise GGUFError(self.path, f"metadata key {full!r} = {v} is out of range (minimum {min_value})")
        return v

    def float(self, key: str, default=_MISSING):
        full, v = self._raw(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GGUFError(self.path, f"metadata key {full!r} should be a finite number, got {v!r:.80}")
        return float(v)

    def int_or_list(
        self, key: str, n: int, default=_MISSING, *, min_value: int = 0
    ) -> tuple[int, ...] | None:
        """A key llama.cpp accepts either as a scalar (same for every layer) or as a per-layer array."""
        full, v = self._raw(key, default)
        if v is None:
            return None
        vals = v if isinstance(v, list) else [v] * n
        if len(vals) != n or any(
            isinstance(x, bool) or not isinstance(x, int) or x < min_value for x in vals
        ):
            raise GGUFError(
                self.path, f"metadata key {full!r} should be an integer or {n} integers, got {v!r:.80}"
            )
        return tuple(vals)

    def bool_list(self, key: str, n: int, default=_MISSING) -> tuple[bool, ...] | None:
        full, v = self._raw(key, default)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) < n or any(not isinstance(x, (bool, int)) for x in v[:n]):
            raise GGUFError(
                self.path, f"metadata key {full!r} should be an array of >= {n} booleans, got {v!r:.80}"
            )
        return tuple(bool(x) for x in v[:n])


def _vocab_size(g: GGUFFile) -> int:
    """Number of tokens: the tokenizer's (what llama.cpp sizes token_embd with), else token_embd's ne1."""
    toks = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(toks, list) and toks:
        return len(toks)
    if "token_embd.weight" in g.tensors and len(g.tensors["token_embd.weight"].shape) == 2:
        return g.tensors["token_embd.weight"].shape[1]
    raise GGUFError(
        g.path, "cannot determine the vocabulary size (no tokenizer.ggml.tokens and no 2-D token_embd)"
    )


# ------------------------------------------------------------------------------------------------ the configs
@dataclass(frozen=True)
class ModelConfig:
    """Fields every architecture has. Attention geometry here is that of the *full* (global) layers;
    architectures
    with per-layer geometry override the ``*_for(layer)`` methods."""

    arch: str
    n_embd: int
    n_layer: int  # layers the main forward runs (Qwen3.5: block_count - nextn_predict_layers)
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length
    head_dim_v: int  # attention.value_length
    n_rot: int  # rope.dimension_count (defaults to head_dim)
    rope_base: float
    rms_eps: float
    context_length: int
    vocab_size: int
    tied_output: bool  # no output.weight: logits use token_embd

    # per-layer views (uniform by default)
    def is_swa(self, layer: int) -> bool:
        return False

    def n_head_kv_for(self, layer: int) -> int:
        return self.n_head_kv

    def head_dim_for(self, layer: int) -> int:
        return self.head_dim

    def head_dim_v_for(self, layer: int) -> int:
        return self.head_dim_v

    def n_rot_for(self, layer: int) -> int:
        return self.n_rot

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base

    def rope_freq_scale_for(self, layer: int) -> float:
        """Linear RoPE scaling (1 / rope.scaling.factor); 1: none."""
        return 1.0

    def uses_rope_freqs(self, layer: int) -> bool:
        """Theta divided per pair by the ``rope_freqs`` tensor."""
        return False

    def rope_divided_for(self, layer: int) -> bool:
        """The layer's RoPE divides theta per pair (``rope_freqs``, or linear scaling: the GPU kernels take both as
        their ``freq_factors`` input)."""
        return self.uses_rope_freqs(layer) or self.rope_freq_scale_for(layer) != 1.0

    def v_norm_for(self, layer: int) -> bool:
        """V is RMS-normalized without a weight before it is cached (Gemma 4)."""
        return False

    @property
    def gqa_group(self) -> int:
        return self.n_head // self.n_head_kv


@dataclass(frozen=True)
class Qwen3MoeConfig(ModelConfig):
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    norm_topk: bool = True  # hard-coded true for qwen3moe in llama.cpp (build_moe_ffn norm_w)
    fused_qkv: bool = False  # blk.N.attn_qkv instead of attn_q/k/v
    fused_gate_up_exps: bool = False  # blk.N.ffn_gate_up_exps {n_embd, 2*n_ff_exp, n_expert}, gate first

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    n_ff: int = 0
    sliding_window: int = 0  # 0: no SWA layers (graph<false>)
    swa_period: int = 6  # layer l is SWA iff l % period < period - 1
    rope_base_swa: float = 10000.0
    rope_freq_scale: float = 1.0  # global layers only (1 / rope.scaling.factor for linear scaling)
    final_logit_softcap: float | None = None
    attn_scale: float = 0.0  # applied to q before QK^T; see load

    def is_swa(self, layer: int) -> bool:
        return self.sliding_window > 0 and layer % self.swa_period < self.swa_period - 1

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base_swa if self.is_swa(layer) else self.rope_base

    def rope_freq_scale_for(self, layer: int) -> float:
        return 1.0 if self.is_swa(layer) else self.rope_freq_scale


@dataclass(frozen=True)
class Gemma4Config(ModelConfig):
    """Gemma 4 (llama.cpp ``gemma4``: ``src/models/gemma4.cpp``), whose attention geometry varies per layer.

    The base fields ``head_dim`` / ``head_dim_v`` / ``n_rot`` / ``rope_base`` / ``n_head_kv`` describe the
    *full* (global) layers; use the per-layer accessors, which also cover the sliding (SWA) layers:

    - ``is_swa(l)``: sliding-window layer (``attention.sliding_window_pattern[l]``);
    - ``window_for(l)``: the window (keys ``p0`` with ``p1 - p0 < window`` are visible), None on full layers;
    - ``head_dim_for(l)``: head size of Q, K and V (256 / 512 for 26B-A4B; K and V sizes are always equal);
    - ``n_head_kv_for(l)``: KV heads (``attention.head_count_kv[l]``: 8 / 2 for 26B-A4B);
    - ``n_rot_for(l)``: rotary dims (NEOX pairs ``(i, i + n_rot/2)``);
    - ``rope_base_for(l)``: RoPE base (``rope.freq_base_swa`` / ``rope.freq_base``);
    - ``rope_freq_scale_for(l)``: linear RoPE scaling (1 / rope.scaling.factor, full layers only; 1 in real
      files);
    - ``uses_rope_freqs(l)``: full layers divide theta by ``rope_freqs.weight`` ({head_dim/2} F32): its 1e30
      entries leave a pair unrotated, the "partial rotary" of 26B-A4B (64 of 256 pairs rotate);
    - ``has_v(l)`` / ``k_eq_v(l)``: ``attn_v`` present, or absent (K = V: V is the raw K projection);
    - ``is_moe(l)``: routed experts beside the dense MLP (``ffn_gate_inp`` present); ``n_ff_for(l)``: dense
      MLP width;
    - ``has_out_scale(l)``: ``layer_output_scale.weight`` {1} multiplies the residual at the end of the layer;
    - ``has_down_exps_scale(l)``: ``ffn_down_exps.scale`` {n_expert} multiplies expert e's down projection;
    - ``has_kv(l)`` / ``kv_source_layer(l)``: KV sharing (E2B/E4B only; 26B-A4B: every layer has its own KV).

    Per layer (llama.cpp's graph): Q = rmsnorm_per_head(Wq h, attn_q_norm); K = rmsnorm_per_head(Wk h,
    attn_k_norm); V = rmsnorm_per_head(Wv h or, when K = V, Wk h, no weight); Q, K rotated; attention scale
    ``attn_scale`` = 1.0. Router input: ``rmsnorm(x, no weight) * router_input_scale * ffn_gate_inp.scale``.
    Logits: ``final_logit_softcap * tanh(logits / final_logit_softcap)`` (llama.cpp's default 30 when the key
    is absent; None when it is 0).
    """

    swa_layers: tuple[bool, ...] = ()
    sliding_window: int = 0
    head_dim_swa: int = 0
    head_dim_v_swa: int = 0
    n_rot_swa: int = 0
    rope_base_swa: float = 10000.0
    rope_freq_scale: float = 1.0  # full layers only (llama.cpp reads no SWA scaling for gemma4)
    n_head_kv_layers: tuple[int, ...] = ()
    n_ff: tuple[int, ...] = ()  # dense MLP width per layer
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    moe_layers: tuple[bool, ...] = ()  # ffn_gate_inp present
    attn_v_layers: tuple[bool, ...] = ()  # attn_v present (absent on 26B-A4B's full layers: K = V)
    fused_qkv: bool = (
        False  # blk.N.attn_qkv {n_embd, H*d + 2*nkv*d} instead of attn_q/k/v (llama.cpp accepts it)
    )
    fused_gate_up_exps: bool = True  # ffn_gate_up_exps {n_embd, 2*n_ff_exp, n_expert}, gate rows first
    has_rope_freqs: bool = (
        False  # rope_freqs.weight {head_dim/2}: required by llama.cpp iff a full layer exists
    )
    out_scale_layers: tuple[bool, ...] = ()  # layer_output_scale.weight present
    down_exps_scale_layers: tuple[bool, ...] = ()  # ffn_down_exps.scale present
    final_logit_softcap: float | None = 30.0
    shared_kv_layers: int = 0
    n_embd_per_layer: int = 0  # PLE width (E2B/E4B); 0 for 26B-A4B
    attn_scale: float = 1.0  # llama.cpp f_attention_scale = 1.0 for gemma4 (Q and K are RMS-normed)

    def _flag(self, flags: tuple[bool, ...], layer: int) -> bool:
        return bool(flags[layer]) if flags else False

    def is_swa(self, layer: int) -> bool:
        return self.swa_layers[layer]

    def window_for(self, layer: int) -> int | None:
        return self.sliding_window if self.is_swa(layer) else None

    def n_head_kv_for(self, layer: int) -> int:
        return self.n_head_kv_layers[layer] if self.n_head_kv_layers else self.n_head_kv

    def head_dim_for(self, layer: int) -> int:
        return self.head_dim_swa if self.is_swa(layer) else self.head_dim

    def head_dim_v_for(self, layer: int) -> int:
        return self.head_dim_v_swa if self.is_swa(layer) else self.head_dim_v

    def n_rot_for(self, layer: int) -> int:
        return self.n_rot_swa if self.is_swa(layer) else self.n_rot

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base_swa if self.is_swa(layer) else self.rope_base

    def rope_freq_scale_for(self, layer: int) -> float:
        return 1.0 if self.is_swa(layer) else self.rope_freq_scale

    def uses_rope_freqs(self, layer: int) -> bool:
        return self.has_rope_freqs and not self.is_swa(layer)

    def v_norm_for(self, layer: int) -> bool:
        return True

    def has_v(self, layer: int) -> bool:
        """A V projection of its own (attn_v, or the V rows of a fused attn_qkv)."""
        return self.fused_qkv or self._flag(self.attn_v_layers, layer)

    def k_eq_v(self, layer: int) -> bool:
        """No V projection: V is the raw K projection (before attn_k_norm and RoPE), RMS-normed without a
        weight."""
        return not self.has_v(layer)

    def is_moe(self, layer: int) -> bool:
        return self._flag(self.moe_layers, layer)

    def n_ff_for(self, layer: int) -> int:
        return self.n_ff[layer]

    def has_out_scale(self, layer: int) -> bool:
        return self._flag(self.out_scale_layers, layer)

    def has_down_exps_scale(self, layer: int) -> bool:
        return self._flag(self.down_exps_scale_layers, layer)

    @property
    def has_layer_output_scale(self) -> bool:
        return any(self.out_scale_layers)

    @property
    def router_input_scale(self) -> float:
        """The router input is ``rmsnorm(x) * (1/sqrt(n_embd)) * ffn_gate_inp.scale`` (the f32 constant
        ``1.0f/sqrtf(n_embd)``)."""
        return float(np.float32(1.0) / np.sqrt(np.float32(self.n_embd)))

    @property
    def embd_scale(self) -> float:
        """The input embedding is multiplied by ``sqrtf(n_embd)`` (f32, not rounded to bf16 as HF does)."""
        return float(np.sqrt(np.float32(self.n_embd)))

    def has_kv(self, layer: int) -> bool:
        """False for KV-shared layers (E2B/E4B), which reuse an earlier layer's cache."""
        return layer < self.n_layer - self.shared_kv_layers

    def kv_source_layer(self, layer: int) -> int:
        """Layer whose KV cache ``layer`` reads (itself unless KV-shared; llama-model.cpp reuse rule)."""
        if self.has_kv(layer):
            return layer
        n_kv_start = self.n_layer - self.shared_kv_layers
        return n_kv_start - 2 if self.is_swa(layer) else n_kv_start - 1


@dataclass(frozen=True)
class Qwen35MoeConfig(ModelConfig):
    n_block: int = 0  # block_count in the file (includes MTP blocks)
    nextn_predict_layers: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    rope_sections: tuple[int, ...] = (11, 11, 10, 0)
    full_attention_interval: int = 4
    recurrent_layers: tuple[bool, ...] = ()
    ssm_conv_kernel: int = 4
    ssm_state_size: int = 128  # key head dim of the linear attention
    ssm_group_count: int = 16  # number of key heads
    ssm_time_step_rank: int = 32  # number of value heads
    ssm_inner_size: int = 4096  # value heads * value head dim
    fused_gate_up_exps: bool = False
    norm_topk: bool = True

    def is_recurrent(self, layer: int) -> bool:
        return self.recurrent_layers[layer]

    @property
    def ssm_head_v_dim(self) -> int:
        return self.ssm_inner_size // self.ssm_time_step_rank

    @property
    def ssm_key_dim(self) -> int:
        return self.ssm_group_count * self.ssm_state_size

    @property
    def ssm_conv_dim(self) -> int:
        return 2 * self.ssm_key_dim + self.ssm_inner_size

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


SUPPORTED_ARCHITECTURES = ("qwen3moe", "qwen35moe", "gemma3", "gemma4")


# ---------------------------------------------------------------------------------------------------- loading
def _base_fields(g: GGUFFile, m: _Meta, *, n_layer: int | None = None, n_head_kv: int | None = None) -> dict:
    n_embd = m.int("embedding_length", min_value=1)
    n_head = m.int("attention.head_count", min_value=1)
    head_dim = m.int("attention.key_length", None, min_value=1)
    if head_dim is None:
        if n_embd % n_head:
            raise GGUFError(
                g.path, f"no attention.key_length and n_embd {n_embd} is not divisible by n_head {n_head}"
            )
        head_dim = n_embd // n_head
    if n_layer is None:
        n_layer = _n_layer(g, m)
    if n_head_kv is None:
        n_head_kv = m.int("attention.head_count_kv", n_head, min_value=1)
    if n_head % n_head_kv:
        raise GGUFError(g.path, f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    n_rot = m.int("rope.dimension_count", head_dim, min_value=0)
    if n_rot % 2 or n_rot > head_dim:
        raise GGUFError(g.path, f"rope.dimension_count {n_rot} must be even and <= the head size {head_dim}")
    return dict(
        arch=m.arch,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=m.int("attention.value_length", head_dim, min_value=1),
        n_rot=n_rot,
        rope_base=m.float("rope.freq_base", 10000.0),
        rms_eps=m.float("attention.layer_norm_rms_epsilon"),
        context_length=m.int("context_length", min_value=1),
        vocab_size=_vocab_size(g),
        tied_output="output.weight" not in g.tensors,
    )


def _n_layer(g: GGUFFile, m: _Meta) -> int:
    n = m.int("block_count", min_value=1)
    if n > MAX_LAYERS:
        raise GGUFError(g.path, f"block_count {n} exceeds llama.cpp's maximum of {MAX_LAYERS} layers")
    return n


def _load_qwen3moe(g: GGUFFile, m: _Meta) -> Qwen3MoeConfig:
    base = _base_fields(g, m)
    if base["n_rot"] != base["head_dim"]:  # qwen3moe.cpp asserts n_rot == n_embd_head
        raise GGUFError(g.path, f"qwen3moe needs rope.dimension_count == key_length, got {base['n_rot']}")
    n_expert = m.int("expert_count", min_value=1)
    n_expert_used = m.int("expert_used_count", min_value=1)
    if n_expert_used > n_expert:
        raise GGUFError(g.path, f"expert_used_count {n_expert_used} > expert_count {n_expert}")
    n_ff_exp = m.int("expert_feed_forward_length", None, min_value=1)
    if n_ff_exp is None:  # llama.cpp fallback
        n_ff_exp = m.int("feed_forward_length", min_value=1) // n_expert_used
    return Qwen3MoeConfig(
        **base,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        fused_qkv="blk.0.attn_qkv.weight" in g.tensors and "blk.0.attn_q.weight" not in g.tensors,
        fused_gate_up_exps="blk.0.ffn_gate_up_exps.weight" in g.tensors,
    )


def _load_gemma3(g: GGUFFile, m: _Meta) -> Gemma3Config:
    base = _base_fields(g, m)
    period = g.metadata.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        period = 6  # llama.cpp hard-codes set_swa_pattern(6) for gemma3
    scaling = g.metadata.get("gemma3.rope.scaling.type")
    factor = m.float("rope.scaling.factor", 1.0) if scaling in ("linear", None) else 1.0
    if scaling not in (None, "none", "linear"):
        raise GGUFError(
            g.path, f"unsupported rope scaling type {scaling!r} for gemma3 (supported: none, linear)"
        )
    # f_attention_scale: llama.cpp uses 1/sqrt(n_embd/n_head) for the 27B model (62 layers), else
    # 1/sqrt(head_dim).
    if base["n_layer"] == 62:
        if base["n_embd"] < base["n_head"]:
            raise GGUFError(g.path, f"n_embd {base['n_embd']} < n_head {base['n_head']}")
        attn_scale = 1.0 / math.sqrt(float(base["n_embd"] // base["n_head"]))
    else:
        attn_scale = 1.0 / math.sqrt(float(base["head_dim"]))
    return Gemma3Config(
        **base,
        n_ff=m.int("feed_forward_length", min_value=1),
        sliding_window=m.int("attention.sliding_window", 0),
        swa_period=period,
        rope_base_swa=m.float("rope.freq_base_swa", 10000.0),
        rope_freq_scale=1.0 / factor if factor > 0 else 1.0,
        final_logit_softcap=m.float("final_logit_softcapping", None),
        attn_scale=attn_scale,
    )


def _load_gemma4(g: GGUFFile, m: _Meta) -> Gemma4Config:
    """llama.cpp's rules: ``llama_model_base::load_hparams`` (generic keys and defaults, src/llama-model.cpp),
    ``llama_model_gemma4::load_arch_hparams`` / ``load_arch_tensors`` (src/models/gemma4.cpp)."""
    path = g.path
    n_layer = _n_layer(g, m)
    n_embd = m.int("embedding_length", min_value=1)
    if isinstance(g.metadata.get(f"{m.arch}.attention.head_count"), list):
        raise GGUFError(
            path, f"per-layer {m.arch}.attention.head_count is not supported (one head count expected)"
        )
    n_head = m.int("attention.head_count", min_value=1)
    kv = m.int_or_list("attention.head_count_kv", n_layer, n_head, min_value=1)  # llama.cpp default: n_head
    swa = m.bool_list("attention.sliding_window_pattern", n_layer)  # required (get_arr without default)
    if not any(swa):
        # gemma4 sets LLAMA_SWA_TYPE_STANDARD, and the KV cache then asserts is_swa_any()
        raise GGUFError(
            path, "gemma4 needs at least one sliding-window layer (attention.sliding_window_pattern)"
        )
    full = [i for i in range(n_layer) if not swa[i]]
    base = _base_fields(g, m, n_layer=n_layer, n_head_kv=kv[full[0]] if full else kv[0])
    for i, nkv in enumerate(kv):
        if n_head % nkv:
            raise GGUFError(path, f"layer {i}: n_head {n_head} is not a multiple of n_head_kv {nkv}")
    # value_length defaults to n_embd/n_head (not to key_length), and load_arch_tensors requires K and V head
    # sizes to be equal, for the full and the SWA layers alike
    hd_v = m.int("attention.value_length", None, min_value=1)
    if hd_v is None:
        hd_v = n_embd // n_head
    if hd_v != base["head_dim"]:
        raise GGUFError(
            path, f"Gemma 4 requires attention.key_length == value_length, got {base['head_dim']} and {hd_v}"
        )
    base["head_dim_v"] = hd_v
    hd_swa = m.int("attention.key_length_swa", min_value=1)
    hd_v_swa = m.int("attention.value_length_swa", min_value=1)
    if hd_swa != hd_v_swa:
        raise GGUFError(
            path,
            f"Gemma 4 requires attention.key_length_swa == value_length_swa, got {hd_swa} and {hd_v_swa}",
        )
    # rope.dimension_count_swa defaults to the full layers' n_rot (llama.cpp), which must still fit the SWA
    # head
    n_rot_swa = m.int("rope.dimension_count_swa", base["n_rot"], min_value=0)
    if n_rot_swa % 2 or n_rot_swa > hd_swa:
        raise GGUFError(
            path,
            f"rope.dimension_count_swa {n_rot_swa} must be even and <= the SWA head size {hd_swa} "
            "(when absent, llama.cpp uses rope.dimension_count)",
        )
    window = m.int("attention.sliding_window", min_value=1)  # required by load_arch_hparams
    scaling = g.metadata.get(f"{m.arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise GGUFError(
            path, f"unsupported rope scaling type {scaling!r} for gemma4 (supported: none, linear)"
        )
    factor = m.float("rope.scaling.factor", 0.0)
    n_ff = m.int_or_list("feed_forward_length", n_layer, min_value=1)  # ffn_gate/up/down are sized by it
    n_expert = m.int("expert_count", 0)
    used = m.int_or_list("expert_used_count", n_layer, 0)
    if len(set(used)) != 1:
        raise GGUFError(
            path, f"per-layer expert_used_count {list(used)} is not supported (one value expected)"
        )
    n_expert_used = used[0]
    # llama.cpp sizes every layer's expert tensors by n_ff_exp(0), the first entry when it is an array
    n_ff_exp = m.int_or_list("expert_feed_forward_length", n_layer, 0)[0]
    moe_layers = tuple(f"blk.{i}.ffn_gate_inp.weight" in g.tensors for i in range(n_layer))
    if n_expert_used > n_expert:
        raise GGUFError(path, f"expert_used_count {n_expert_used} > expert_count {n_expert}")
    if n_expert and not n_expert_used:
        raise GGUFError(
            path, "expert_count > 0 but expert_used_count is 0 (llama.cpp: no expert layers are used)"
        )
    if any(moe_layers) and (n_expert == 0 or n_ff_exp == 0):
        raise GGUFError(
            path,
            "ffn_gate_inp tensors present but gemma4.expert_count or expert_feed_forward_length is missing "
            "or 0",
        )
    shared = m.int("attention.shared_kv_layers", 0)
    if n_layer - shared < 2:
        # the KV-reuse callback of llama-model.cpp asserts n_layer_kv_from_start >= 2
        raise GGUFError(
            path,
            f"block_count {n_layer} - attention.shared_kv_layers {shared} < 2 (llama.cpp needs 2 KV layers)",
        )
    softcap = m.float("final_logit_softcapping", 30.0)  # hparams default 30, which gemma4 does not reset
    has = g.tensors.__contains__
    return Gemma4Config(
        **base,
        swa_layers=swa,
        sliding_window=window,
        head_dim_swa=hd_swa,
        head_dim_v_swa=hd_v_swa,
        n_rot_swa=n_rot_swa,
        rope_base_swa=m.float("rope.freq_base_swa", 10000.0),
        rope_freq_scale=1.0 / factor if factor > 0 else 1.0,
        n_head_kv_layers=kv,
        n_ff=n_ff,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        moe_layers=moe_layers,
        attn_v_layers=tuple(has(f"blk.{i}.attn_v.weight") for i in range(n_layer)),
        fused_qkv=has("blk.0.attn_qkv.weight"),
        fused_gate_up_exps=not any(has(f"blk.{i}.ffn_gate_exps.weight") for i in range(n_layer)),
        has_rope_freqs=bool(full),
        out_scale_layers=tuple(has(f"blk.{i}.layer_output_scale.weight") for i in range(n_layer)),
        down_exps_scale_layers=tuple(has(f"blk.{i}.ffn_down_exps.scale") for i in range(n_layer)),
        final_logit_softcap=softcap if softcap != 0.0 else None,
        shared_kv_layers=shared,
        n_embd_per_layer=m.int("embedding_length_per_layer_input"),
    )


def _load_qwen35moe(g: GGUFFile, m: _Meta) -> Qwen35MoeConfig:
    n_block = _n_layer(g, m)
    nextn = m.int("nextn_predict_layers", 0)
    if nextn >= n_block:
        raise GGUFError(g.path, f"nextn_predict_layers {nextn} >= block_count {n_block}")
    n_layer = n_block - nextn
    base = _base_fields(g, m, n_layer=n_layer)
    interval = m.int("full_attention_interval", 4, min_value=1)
    rec = m.bool_list("attention.recurrent_layers", n_layer, None)
    if rec is None:
        rec = tuple((i + 1) % interval != 0 for i in range(n_layer))
    sections = g.metadata.get(f"{m.arch}.rope.dimension_sections")
    if not (
        isinstance(sections, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in sections)
    ):
        raise GGUFError(
            g.path, f"missing or invalid metadata key '{m.arch}.rope.dimension_sections' (int array)"
        )
    n_expert = m.int("expert_count", min_value=1)
    cfg = Qwen35MoeConfig(
        **base,
        n_block=n_block,
        nextn_predict_layers=nextn,
        n_expert=n_expert,
        n_expert_used=m.int("expert_used_count", min_value=1),
        n_ff_exp=m.int("expert_feed_forward_length", min_value=1),
        n_ff_shexp=m.int("expert_shared_feed_forward_length", min_value=1),
        rope_sections=tuple(sections),
        full_attention_interval=interval,
        recurrent_layers=rec,
        ssm_conv_kernel=m.int("ssm.conv_kernel", min_value=1),
        ssm_state_size=m.int("ssm.state_size", min_value=1),
        ssm_group_count=m.int("ssm.group_count", min_value=1),
        ssm_time_step_rank=m.int("ssm.time_step_rank", min_value=1),
        ssm_inner_size=m.int("ssm.inner_size", min_value=1),
        fused_gate_up_exps="blk.0.ffn_gate_up_exps.weight" in g.tensors,
    )
    if cfg.ssm_inner_size % cfg.ssm_time_step_rank or cfg.ssm_time_step_rank % cfg.ssm_group_count:
        raise GGUFError(
            g.path,
            f"inconsistent ssm sizes: inner_size {cfg.ssm_inner_size}, "
            f"time_step_rank {cfg.ssm_time_step_rank}, "
            f"group_count {cfg.ssm_group_count}",
        )
    return cfg


_LOADERS = {
    "qwen3moe": _load_qwen3moe,
    "qwen35moe": _load_qwen35moe,
    "gemma3": _load_gemma3,
    "gemma4": _load_gemma4,
}


def load_config(g: GGUFFile) -> ModelConfig:
    """The typed config of ``g`` (dispatching on general.architecture). Raises GGUFError for an unknown
    architecture
    or a missing / ill-typed required key."""
    arch = g.architecture
    if arch not in _LOADERS:
        raise GGUFError(
            g.path, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return _LOADERS[arch](g, _Meta(g, arch))


# ------------------------------------------------------------------------------------------- tensor inventory
def _qwen3moe_tensors(c: Qwen3MoeConfig) -> dict[str, Shape]:
    E, H, V = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    Hv = c.n_head * c.head_dim_v
    t: dict[str, Shape] = {"token_embd.weight": (E, c.vocab_size), "output_norm.weight": (E,)}
    if not c.tied_output:
        t["output.weight"] = (E, c.vocab_size)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (E,)
        if c.fused_qkv:
            t[p + "attn_qkv.weight"] = (E, H + V + c.n_head_kv * c.head_dim_v)
        else:
            t[p + "attn_q.weight"] = (E, H)
            t[p + "attn_k.weight"] = (E, V)
            t[p + "attn_v.weight"] = (E, c.n_head_kv * c.head_dim_v)
        t[p + "attn_output.weight"] = (Hv, E)
        t[p + "attn_q_norm.weight"] = (c.head_dim,)
        t[p + "attn_k_norm.weight"] = (c.head_dim,)
        t[p + "ffn_norm.weight"] = (E,)
        t[p + "ffn_gate_inp.weight"] = (E, c.n_expert)
        _moe_experts(t, p, E, c.n_ff_exp, c.n_expert, c.fused_gate_up_exps)
    return t


def _moe_experts(t: dict, p: str, E: int, F: int, n_expert: int, fused: bool) -> None:
    if fused:
        t[p + "ffn_gate_up_exps.weight"] = (E, 2 * F, n_expert)
    else:
        t[p + "ffn_gate_exps.weight"] = (E, F, n_expert)
        t[p + "ffn_up_exps.weight"] = (E, F, n_expert)
    t[p + "ffn_down_exps.weight"] = (F, E, n_expert)


def _gemma3_tensors(c: Gemma3Config) -> dict[str, Shape]:
    E = c.n_embd
    t: dict[str, Shape] = {"token_embd.weight": (E, c.vocab_size), "output_norm.weight": (E,)}
    if not c.tied_output:
        t["output.weight"] = (E, c.vocab_size)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (E,)
        t[p + "attn_q.weight"] = (E, c.n_head * c.head_dim)
        t[p + "attn_k.weight"] = (E, c.n_head_kv * c.head_dim)
        t[p + "attn_v.weight"] = (E, c.n_head_kv * c.head_dim_v)
        t[p + "attn_output.weight"] = (c.n_head * c.head_dim_v, E)
        t[p + "attn_q_norm.weight"] = (c.head_dim,)
        t[p + "attn_k_norm.weight"] = (c.head_dim,)
        t[p + "post_attention_norm.weight"] = (E,)
        t[p + "ffn_norm.weight"] = (E,)
        t[p + "ffn_gate.weight"] = (E, c.n_ff)
        t[p + "ffn_up.weight"] = (E, c.n_ff)
        t[p + "ffn_down.weight"] = (c.n_ff, E)
        t[p + "post_ffw_norm.weight"] = (E,)
    return t


def _gemma4_tensors(c: Gemma4Config) -> dict[str, Shape]:
    """llama_model_gemma4::load_arch_tensors (src/models/gemma4.cpp) plus the generic optional
    ``ffn_down_exps.scale`` (src/llama-model.cpp), for the tensors this file has (see
    :func:`_gemma4_optional`)."""
    E, L, npl = c.n_embd, c.n_layer, c.n_embd_per_layer
    t: dict[str, Shape] = {"token_embd.weight": (E, c.vocab_size), "output_norm.weight": (E,)}
    if not c.tied_output:
        t["output.weight"] = (E, c.vocab_size)
    if c.has_rope_freqs:
        # created (required) at the first full layer with {n_embd_head/2} of that layer, i.e. of the full head
        t["rope_freqs.weight"] = (c.head_dim // 2,)
    if npl:
        t["per_layer_token_embd.weight"] = (npl * L, c.vocab_size)
        t["per_layer_model_proj.weight"] = (E, npl * L)
        t["per_layer_proj_norm.weight"] = (npl,)
    for i in range(L):
        p = f"blk.{i}."
        d, dv, nkv = c.head_dim_for(i), c.head_dim_v_for(i), c.n_head_kv_for(i)
        t[p + "attn_norm.weight"] = (E,)
        if c.fused_qkv:
            t[p + "attn_qkv.weight"] = (E, c.n_head * d + nkv * d + nkv * dv)
        else:
            t[p + "attn_q.weight"] = (E, c.n_head * d)
            if c.has_kv(i):
                t[p + "attn_k.weight"] = (E, nkv * d)
            if c.attn_v_layers[i]:
                t[p + "attn_v.weight"] = (E, nkv * dv)
        t[p + "attn_output.weight"] = (c.n_head * d, E)
        t[p + "attn_q_norm.weight"] = (d,)
        if c.has_kv(i):
            t[p + "attn_k_norm.weight"] = (d,)
        t[p + "post_attention_norm.weight"] = (E,)
        if c.has_out_scale(i):
            t[p + "layer_output_scale.weight"] = (1,)
        F = c.n_ff[i]
        t[p + "ffn_norm.weight"] = (E,)
        t[p + "ffn_gate.weight"] = (E, F)
        t[p + "ffn_up.weight"] = (E, F)
        t[p + "ffn_down.weight"] = (F, E)
        t[p + "post_ffw_norm.weight"] = (E,)
        if c.moe_layers[i]:
            t[p + "ffn_gate_inp.weight"] = (E, c.n_expert)
            t[p + "ffn_gate_inp.scale"] = (E,)
            t[p + "pre_ffw_norm_2.weight"] = (E,)
            t[p + "post_ffw_norm_1.weight"] = (E,)
            t[p + "post_ffw_norm_2.weight"] = (E,)
            _moe_experts(t, p, E, c.n_ff_exp, c.n_expert, c.fused_gate_up_exps)
            if c.has_down_exps_scale(i):
                t[p + "ffn_down_exps.scale"] = (c.n_expert,)
        if npl:
            t[p + "inp_gate.weight"] = (E, npl)
            t[p + "proj.weight"] = (npl, E)
            t[p + "post_norm.weight"] = (E,)
    return t


def _gemma4_optional(c: Gemma4Config) -> dict[str, Shape]:
    """Tensors llama.cpp loads if present but the forward does not read: K/V of KV-shared layers (E2B/E4B)."""
    t: dict[str, Shape] = {}
    for i in range(c.n_layer):
        if not c.has_kv(i) and not c.fused_qkv:
            p, d, nkv = f"blk.{i}.", c.head_dim_for(i), c.n_head_kv_for(i)
            t[p + "attn_k.weight"] = (c.n_embd, nkv * d)
            t[p + "attn_k_norm.weight"] = (d,)
    return t


def _qwen35moe_tensors(c: Qwen35MoeConfig) -> dict[str, Shape]:
    E = c.n_embd
    t: dict[str, Shape] = {"token_embd.weight": (E, c.vocab_size), "output_norm.weight": (E,)}
    if not c.tied_output:
        t["output.weight"] = (E, c.vocab_size)
    nv = c.ssm_time_step_rank
    for i in range(c.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (E,)
        t[p + "post_attention_norm.weight"] = (E,)
        if c.is_recurrent(i):
            t[p + "attn_qkv.weight"] = (E, c.ssm_conv_dim)
            t[p + "attn_gate.weight"] = (E, c.ssm_inner_size)
            t[p + "ssm_conv1d.weight"] = (c.ssm_conv_kernel, c.ssm_conv_dim)
            t[p + "ssm_dt.bias"] = (nv,)
            t[p + "ssm_a"] = (nv,)
            t[p + "ssm_beta.weight"] = (E, nv)
            t[p + "ssm_alpha.weight"] = (E, nv)
            t[p + "ssm_norm.weight"] = (c.ssm_head_v_dim,)
            t[p + "ssm_out.weight"] = (c.ssm_inner_size, E)
        else:
            t[p + "attn_q.weight"] = (E, c.n_head * c.head_dim * 2)  # per head [q | gate]
            t[p + "attn_k.weight"] = (E, c.n_head_kv * c.head_dim)
            t[p + "attn_v.weight"] = (E, c.n_head_kv * c.head_dim_v)
            t[p + "attn_output.weight"] = (c.n_head * c.head_dim_v, E)
            t[p + "attn_q_norm.weight"] = (c.head_dim,)
            t[p + "attn_k_norm.weight"] = (c.head_dim,)
        t[p + "ffn_gate_inp.weight"] = (E, c.n_expert)
        _moe_experts(t, p, E, c.n_ff_exp, c.n_expert, c.fused_gate_up_exps)
        t[p + "ffn_gate_inp_shexp.weight"] = (E,)
        t[p + "ffn_gate_shexp.weight"] = (E, c.n_ff_shexp)
        t[p + "ffn_up_shexp.weight"] = (E, c.n_ff_shexp)
        t[p + "ffn_down_shexp.weight"] = (c.n_ff_shexp, E)
    return t


_INVENTORIES = {
    Qwen3MoeConfig: _qwen3moe_tensors,
    Gemma3Config: _gemma3_tensors,
    Gemma4Config: _gemma4_tensors,
    Qwen35MoeConfig: _qwen35moe_tensors,
}


def required_tensors(cfg: ModelConfig) -> dict[str, Shape]:
    """Every tensor the forward of ``cfg`` reads, with its ggml shape (ne0 first). Insertion order: globals,
    then
    layer by layer."""
    try:
        return _INVENTORIES[type(cfg)](cfg)
    except KeyError:
        raise TypeError(f"no tensor inventory for {type(cfg).__name__}") from None


def validate_tensors(g: GGUFFile, cfg: ModelConfig) -> dict[str, Shape]:
    """Check that every tensor the forward needs exists with the expected ggml shape and a supported quant
    type; for gemma4 also that the file holds no tensor llama.cpp's loader would leave unused (it refuses such
    files). Returns :func:`required_tensors`. Raises GGUFError naming the first offending tensor."""
    req = required_tensors(cfg)
    for name, shape in req.items():
        ti = g.tensor(name)  # GGUFError "missing required tensor"
        if tuple(ti.shape) != tuple(shape):
            raise GGUFError(
                g.path, f"shape {tuple(ti.shape)} does not match the config's {tuple(shape)}", name
            )
        g.check_supported(name)
    if isinstance(cfg, Gemma4Config):
        # llama.cpp refuses a file with tensors its loader did not create ("wrong number of tensors"); name
        # the first one instead (the generic NVFP4 ".scale"/".input_scale" tensors are not supported here)
        optional = _gemma4_optional(cfg)
        for name, ti in g.tensors.items():
            if name in req:
                continue
            if name not in optional:
                raise GGUFError(
                    g.path,
                    "unexpected tensor: llama.cpp's gemma4 loader would not use it and refuses the file",
                    name,
                )
            if tuple(ti.shape) != tuple(optional[name]):
                raise GGUFError(
                    g.path,
                    f"shape {tuple(ti.shape)} does not match the config's {tuple(optional[name])}",
                    name,
                )
    return req


__all__ = [
    "ModelConfig",
    "Qwen3MoeConfig",
    "Gemma3Config",
    "Gemma4Config",
    "Qwen35MoeConfig",
    "SUPPORTED_ARCHITECTURES",
    "load_config",
    "required_tensors",
    "validate_tensors",
]
