"""Synthetic GGUF models: random but well-scaled weights with real tensor names, shapes and Q4_K_M type mix.

``write_synthetic(path, "qwen3moe", "30b-a3b")`` writes a file with the exact tensor list, shapes and
per-tensor quant types of a llama.cpp Q4_K_M quantization of Qwen3-30B-A3B (17.28 GiB, 30.53 B parameters), so
speed measured on it is speed on the real model (likewise gemma3/270m: its plan equals the real gemma-3-270m
Q4_K_M file's tensor list, types and shapes, checked in the tests; gemma4/26b-a4b has Gemma 4 26B-A4B's
tensors, 25.23 B parameters, 15.63 GiB). The small presets are for tests: they load in llama.cpp and decode
varied token sequences.

How the weights are made (no float weights are ever quantized; blocks are generated directly):

* Quantized tensors are random bytes (``Generator.integers`` over uint64, ~3 GiB/s per core, measured on the
  dev box) whose per-block header fields are then overwritten in vectorized numpy: an f16 super-scale ``d``
  jittered in [0.75, 1.25]·base (random sign where the format is symmetric), and 6-/8-bit sub-block scales
  drawn from the random bytes themselves. ``base`` is solved in closed form so the dequantized RMS equals the
  target (``_QuantGen.rms_per_unit_d``). The quant values stay uniform, so every bit of every field is
  exercised.
* Targets: projections RMS 1/sqrt(n_in) (unit-RMS inputs give unit-RMS outputs); qwen token_embd RMS 1;
  gemma3's tied token_embd RMS 0.5/sqrt(n_embd) (the graph multiplies by sqrt(n_embd); as the output matrix it
  gives logits of std ~0.5); router (F32) std 1/sqrt(n_embd) so router logits have std ~1 and top-k weights
  are not degenerate; all norms uniform in [0.9, 1.1] (gemma3 norms carry the +1 baked in, so ~1 is right for
  both archs). gemma3 deviates where a tied embedding needs it (GEMMA3_EMBD_RMS_SQRT_N, GEMMA3_POST_NORM_GAIN:
  see their comment); gemma4 likewise, plus Q/K norm gains for its scale-1.0 attention, an F32 router weight
  of std 1 (its input is divided by sqrt(n_embd)), wide per-expert down scales and layer output scales, and
  the deterministic rope_freqs (GEMMA4_* constants and their comment).
* K-quant sub-block mins are chosen to cancel the sub-block mean (dmin·m ≈ d·sc·mean(q)), so rows are
  zero-mean.
* Deterministic per seed: each tensor is cut into fixed-size chunks and chunk k of tensor NAME draws from
  ``SeedSequence(seed, spawn_key=(crc32(NAME), k))``, independent of thread count and tensor order.
* Streaming: tensor infos are written first (sizes are known from the plan), then chunks are generated on a
  thread pool (numpy releases the GIL) with a bounded look-ahead window and written in order, so memory stays
  ~ a few hundred MiB whatever the file size.

Quant type rules are those of ``src/llama-quant.cpp`` (llama_tensor_get_type_impl + tensor_type_fallback) for
``LLAMA_FTYPE_MOSTLY_Q4_K_M`` as summarized in shared/spec/models.md §1/§4, including: use_more_bits for
attn_v and ffn_down(_exps) -> Q6_K; output (and gemma3's tied token_embd) -> Q6_K, or Q8_0 directly when ne0 %
256 != 0; ne0 % 256 != 0 fallbacks Q4_K->Q5_0, Q6_K->Q8_0, Q5_K->Q5_1 (refused: unsupported here); the
n_expert == 8 rules (attn_v/attn_k -> Q8_0, attn_output -> Q5_K); 1-D tensors and ffn_gate_inp kept F32;
attn_v's use_more_bits counts attn_v tensors (gemma4's K = V layers have none), ffn_down's counts layers.

llama.cpp (0c1e570, CPU build) loads and runs every preset: llama-bench and llama-perplexity on the tiny
files, llama-bench on a 1-block real-shape slice of 30b-a3b, llama-completion --temp 0 giving varied sequences,
and the whole gemma4 26b-a4b file; the runs are listed in RESULTS.md and tests/gguf/test_synth.py's docstring.

(Over 600 lines: the presets, the per-architecture tensor tables and llama.cpp's Q4_K_M type rules live beside the
block generator and the streaming writer because one plan drives all of them, and the tests check a written file's
tensor list, types and bytes against that plan.)

CLI: ``python -m sparkinfer_cute.gguf.synth --arch qwen3moe --preset 30b-a3b -o FILE`` (``--arch gemma4
--preset 26b-a4b``, ``--set KEY=VALUE`` to override a preset value). Usage errors (unknown preset or key,
inconsistent shapes) print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.gguf.reader import GGUFHeader, TensorInfo

Q = GGMLQuantizationType

# llama_ftype ids written to general.file_type (llama.h)
FTYPE_IDS = {"Q4_K_M": 15}

# -----------------------------------------------------------------------------------------------------------
# presets Keys are the model hyper-parameters (names follow llama.cpp's hparams). Values for the real-shape
# presets are the HF configs quoted in shared/spec/models.md §1 (Qwen3-30B-A3B) and §4 (gemma-3-270m).
PRESETS: dict[tuple[str, str], dict] = {
    # every matrix row length (256, 512) is a multiple of 256: all K-quants, no fallbacks
    ("qwen3moe", "tiny"): {
        "n_vocab": 1536,
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 8,
        "n_head_kv": 2,
        "head_dim": 64,
        "n_ff": 1024,
        "n_expert": 16,
        "n_expert_used": 4,
        "n_ff_exp": 256,
        "n_ctx": 512,
        "rope_base": 1e6,
        "rms_eps": 1e-6,
    },
    # n_embd 384 and n_ff_exp 384 are not multiples of 256: token_embd/attn_q/k/v/ffn_*_exps fall back to Q5_0
    # (or Q8_0 where Q6_K was wanted), output -> Q8_0; attn_output (ne0 512) stays Q4_K.
    ("qwen3moe", "tiny-fallback"): {
        "n_vocab": 1536,
        "n_embd": 384,
        "n_layer": 4,
        "n_head": 8,
        "n_head_kv": 2,
        "head_dim": 64,
        "n_ff": 1536,
        "n_expert": 16,
        "n_expert_used": 4,
        "n_ff_exp": 384,
        "n_ctx": 512,
        "rope_base": 1e6,
        "rms_eps": 1e-6,
    },
    # real head_dim (128) and GQA group (8), real top-k (8); 8 layers give a mixed use_more_bits pattern
    # (0,3,6,7)
    ("qwen3moe", "small"): {
        "n_vocab": 4096,
        "n_embd": 512,
        "n_layer": 8,
        "n_head": 16,
        "n_head_kv": 2,
        "head_dim": 128,
        "n_ff": 2048,
        "n_expert": 32,
        "n_expert_used": 8,
        "n_ff_exp": 256,
        "n_ctx": 4096,
        "rope_base": 1e6,
        "rms_eps": 1e-6,
    },
    ("qwen3moe", "30b-a3b"): {
        "n_vocab": 151936,
        "n_embd": 2048,
        "n_layer": 48,
        "n_head": 32,
        "n_head_kv": 4,
        "head_dim": 128,
        "n_ff": 6144,
        "n_expert": 128,
        "n_expert_used": 8,
        "n_ff_exp": 768,
        "n_ctx": 40960,
        "rope_base": 1e6,
        "rms_eps": 1e-6,
    },
    # like 270m: n_embd 384 is not a multiple of 256 (as 640 is), so the same type mix (F32, Q4_K, Q5_0, Q6_K,
    # Q8_0); 6 layers = one full SWA period (layer 5 global); window 32 so that a 64-token context exercises
    # it
    ("gemma3", "tiny"): {
        "n_vocab": 2048,
        "n_embd": 384,
        "n_layer": 6,
        "n_head": 4,
        "n_head_kv": 1,
        "head_dim": 256,
        "n_ff": 768,
        "n_ctx": 512,
        "rope_base": 1e6,
        "rope_base_swa": None,
        "sliding_window": 32,
        "rms_eps": 1e-6,
        "rope_scaling_factor": None,  # linear RoPE scaling of the global layers (Gemma 3 4B+: 8)
    },
    ("gemma3", "270m"): {
        "n_vocab": 262144,
        "n_embd": 640,
        "n_layer": 18,
        "n_head": 4,
        "n_head_kv": 1,
        "head_dim": 256,
        "n_ff": 2048,
        "n_ctx": 32768,
        "rope_base": 1e6,
        "rope_base_swa": None,
        "sliding_window": 512,
        "rms_eps": 1e-6,
        "rope_scaling_factor": None,  # linear RoPE scaling of the global layers (Gemma 3 4B+: 8)
    },
    # Gemma 3 4B (google/gemma-3-4b-it text config): 34 layers (5 global: 5, 11, ..., 29), 8 heads / 4 KV of 256,
    # window 1024, the global layers' RoPE linearly scaled by 8 (rope_scaling {type linear, factor 8}); ~2.5 GB
    ("gemma3", "4b"): {
        "n_vocab": 262208,
        "n_embd": 2560,
        "n_layer": 34,
        "n_head": 8,
        "n_head_kv": 4,
        "head_dim": 256,
        "n_ff": 10240,
        "n_ctx": 131072,
        "rope_base": 1e6,
        "rope_base_swa": None,
        "sliding_window": 1024,
        "rms_eps": 1e-6,
        "rope_scaling_factor": 8.0,
    },
    # Gemma 4 (shared/spec/models.md §3). Layer l is sliding iff l % swa_period < swa_period - 1 (26B-A4B: 5
    # sliding : 1 full, the last layer full). Sliding layers: head_dim / n_head_kv, rotary over the whole
    # head, base rope_base_swa, attn_v. Full layers: head_dim_full / n_head_kv_full, rotary over the first
    # partial_rotary_full of each half-head (rope_freqs: 1 then 1e30, as conversion/gemma.py writes it), base
    # rope_base, no attn_v when k_eq_v (V = the K projection). Every layer: dense GeGLU MLP (n_ff) + routed
    # experts. tiny: the real type mix (F32, Q4_K, Q5_0, Q6_K, Q8_0: n_ff 320 and n_ff_exp 160 are not
    # multiples of 256, as 2112 and 704 are not), two full layers (2 and 5) with K = V, window 32 so that a
    # 258-token test crosses it, and a final softcap of 2 (real: 30) so that the cap bends these random
    # models' logits (std ~0.5) visibly.
    ("gemma4", "tiny"): {
        "n_vocab": 1024,
        "n_embd": 256,
        "n_layer": 6,
        "swa_period": 3,
        "n_head": 4,
        "n_head_kv": 2,
        "head_dim": 64,
        "n_head_kv_full": 1,
        "head_dim_full": 128,
        "partial_rotary_full": 0.25,
        "k_eq_v": True,
        "sliding_window": 32,
        "n_ff": 320,
        "n_expert": 16,
        "n_expert_used": 4,
        "n_ff_exp": 160,
        "layer_output_scale": True,
        "n_ctx": 512,
        "rope_base": 1e6,
        "rope_base_swa": 1e4,
        "final_logit_softcap": 2.0,
        "rms_eps": 1e-6,
    },
    # the real per-layer attention geometry (16 heads; hd 256 / 8 KV heads sliding, hd 512 / 2 KV heads full,
    # K = V), the real expert and dense-MLP widths and top-8 routing; narrower model (n_embd 512), fewer
    # experts and layers (full at 5 and 11), window 128
    ("gemma4", "small"): {
        "n_vocab": 4096,
        "n_embd": 512,
        "n_layer": 12,
        "swa_period": 6,
        "n_head": 16,
        "n_head_kv": 8,
        "head_dim": 256,
        "n_head_kv_full": 2,
        "head_dim_full": 512,
        "partial_rotary_full": 0.25,
        "k_eq_v": True,
        "sliding_window": 128,
        "n_ff": 2112,
        "n_expert": 32,
        "n_expert_used": 8,
        "n_ff_exp": 704,
        "layer_output_scale": True,
        "n_ctx": 4096,
        "rope_base": 1e6,
        "rope_base_swa": 1e4,
        "final_logit_softcap": 30.0,
        "rms_eps": 1e-6,
    },
    # Gemma 4 26B-A4B (models.md §3 config table): 25.2 B parameters
    ("gemma4", "26b-a4b"): {
        "n_vocab": 262144,
        "n_embd": 2816,
        "n_layer": 30,
        "swa_period": 6,
        "n_head": 16,
        "n_head_kv": 8,
        "head_dim": 256,
        "n_head_kv_full": 2,
        "head_dim_full": 512,
        "partial_rotary_full": 0.25,
        "k_eq_v": True,
        "sliding_window": 1024,
        "n_ff": 2112,
        "n_expert": 128,
        "n_expert_used": 8,
        "n_ff_exp": 704,
        "layer_output_scale": True,
        "n_ctx": 262144,
        "rope_base": 1e6,
        "rope_base_swa": 1e4,
        "final_logit_softcap": 30.0,
        "rms_eps": 1e-6,
    },
}

ARCHS = ("qwen3moe", "gemma3", "gemma4")

# Target scales (see module docstring).
NORM_RANGE = (0.9, 1.1)
ROUTER_LOGIT_STD = 1.0
# gemma3 ties token_embd to the output, so the current token's embedding in the residual votes for itself
# (logit ~ rms_embd*sqrt(n_embd)^2/rms(x) sigmas), and post-normed attention outputs (context averages
# rescaled to RMS 1) make the state drift slowly: with all gains 1 and embedding RMS 1/sqrt(n_embd),
# llama-completion greedy on gemma3/tiny repeated one token forever ("xxxx…", " is is is …"). Halving the
# embedding, weighting the per-position FFN output (post_ffw_norm ~2) over the context-averaged attention
# output (post_attention_norm ~0.5) gave varied sequences (llama-completion --temp 0, two prompts; see tests
# docstring). Residual RMS stays < ~10 at 18 layers.
GEMMA3_EMBD_RMS_SQRT_N = 0.5  # token_embd RMS = this / sqrt(n_embd): x0 = embd*sqrt(n_embd) has RMS 0.5
GEMMA3_POST_NORM_GAIN = {"post_attention_norm": 0.5, "post_ffw_norm": 2.0}
# Gemma 4 (tied embedding too): the same embedding / post-norm balance as gemma3 (see above), applied to the
# norms that end each branch. Gemma 4's attention scale is 1.0 on RMS-normed Q and K, so with unit norm gains
# the scores would have std sqrt(head_dim) (16 to 23 at real sizes: one-hot attention); attn_q_norm and
# attn_k_norm get gains g with g^2 = GEMMA4_SCORE_STD / sqrt(head_dim), giving scores of std
# ~GEMMA4_SCORE_STD. The router weight is F32 with std ROUTER_LOGIT_STD: its input
# rmsnorm(x)/sqrt(n_embd)*ffn_gate_inp.scale has RMS ~1/sqrt(n_embd), so router logits have std ~1. The
# per-expert down scales and the layer output scales are drawn from wide ranges so that a forward ignoring
# them is visibly wrong (both are otherwise partly hidden by the RMSNorms that follow).
GEMMA4_EMBD_RMS_SQRT_N = GEMMA3_EMBD_RMS_SQRT_N
GEMMA4_NORM_GAIN = {"post_attention_norm.weight": 0.5, "post_ffw_norm.weight": 2.0}
GEMMA4_SCORE_STD = 1.5
GEMMA4_UNIFORM = {"ffn_down_exps.scale": (0.5, 1.5), "layer_output_scale.weight": (0.7, 1.3)}


class PlannedTensor(NamedTuple):
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: ne0 (the contiguous input dimension) first


def synthetic_config(arch: str, preset: str, overrides: dict | None = None) -> dict:
    """The preset's hyper-parameters with ``overrides`` applied (unknown keys are refused)."""
    if (arch, preset) not in PRESETS:
        known = ", ".join(f"{a}/{p}" for a, p in PRESETS)
        raise ValueError(f"unknown synthetic preset {arch}/{preset} (known: {known})")
    cfg = dict(PRESETS[(arch, preset)])
    for k, v in (overrides or {}).items():
        if k not in cfg:
            raise ValueError(f"unknown override {k!r} for {arch} (keys: {', '.join(cfg)})")
        cfg[k] = v
    for kv in ("n_head_kv", "n_head_kv_full"):
        if kv in cfg and (not isinstance(cfg[kv], int) or cfg[kv] < 1 or cfg["n_head"] % cfg[kv]):
            raise ValueError(f"n_head {cfg['n_head']} is not a multiple of {kv} {cfg[kv]}")
    if arch == "gemma4":
        if cfg["swa_period"] < 2:
            raise ValueError("swa_period must be >= 2 (gemma4 needs a sliding-window layer)")
        if cfg["n_expert_used"] > cfg["n_expert"]:
            raise ValueError(f"n_expert_used {cfg['n_expert_used']} > n_expert {cfg['n_expert']}")
        n_rot_pairs = cfg["head_dim_full"] * cfg["partial_rotary_full"] / 2
        if not (0 < n_rot_pairs <= cfg["head_dim_full"] // 2) or n_rot_pairs != int(n_rot_pairs):
            raise ValueError(
                f"partial_rotary_full {cfg['partial_rotary_full']} does not give a whole number of pairs"
            )
    return cfg


def gemma4_is_swa(cfg: dict, layer: int) -> bool:
    """Sliding-window layers of a gemma4 preset: all but every swa_period-th (26B-A4B: full at 5, 11, ...,
    29)."""
    return layer % cfg["swa_period"] < cfg["swa_period"] - 1


# ------------------------------------------------------------------------------------------------- Q4_K_M
# type rules
def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quant.cpp: layers that get more bits in *_M mixes (first/last eighth, every third in between)."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0, Q.Q5_K: Q.Q5_1}


def _fallback(qtype: GGMLQuantizationType, ne0: int, name: str) -> GGMLQuantizationType:
    """tensor_type_fallback: a 256-block type on a row that is not a multiple of 256 demotes to 32-block."""
    if ne0 % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    if qtype == Q.Q5_1:
        raise ValueError(
            f"{name}: ne0 {ne0} makes Q5_K fall back to Q5_1, which sparkinfer_cute does not support"
        )
    if ne0 % GGML_QUANT_SIZES[qtype][0]:
        raise ValueError(
            f"{name}: ne0 {ne0} is not a multiple of 32 (llama.cpp would store F16); choose other shapes"
        )
    return qtype


def q4_k_m_type(
    name: str,
    shape: tuple[int, ...],
    *,
    n_layer: int,
    n_expert: int,
    tied_embeddings: bool,
    attn_v_counter: tuple[int, int] | None = None,
):
    """The type ``llama-quantize … Q4_K_M`` gives tensor ``name`` (llama_tensor_get_type for MOSTLY_Q4_K_M).

    attn_v: llama.cpp's rule is ``use_more_bits(i_attention_wv, n_attention_wv)``, counters over the attn_v
    tensors in file order; ``attn_v_counter`` = (this tensor's rank among them, their number), by default
    (layer, n_layer), which is right when every layer has one (gemma4's K = V layers have none). ffn_down:
    with n_expert > 1 llama.cpp parses the layer from the name (layer_info), else it counts ffn_down tensors,
    which is the same for one ffn_down per layer.
    """
    if len(shape) < 2 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return Q.F32
    ne0 = shape[0]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        # no fallback step: a non-256 row goes straight to Q8_0
        return Q.Q6_K if ne0 % 256 == 0 else Q.Q8_0
    t = Q.Q4_K
    if name.endswith("attn_v.weight"):
        if use_more_bits(*(attn_v_counter or (layer, n_layer))):
            t = Q.Q6_K
        if n_expert == 8:
            t = Q.Q8_0
    elif name.endswith("attn_k.weight"):
        if n_expert == 8:
            t = Q.Q8_0
    elif "ffn_down" in name:
        if use_more_bits(layer, n_layer):
            t = Q.Q6_K
    elif name.endswith("attn_output.weight") and n_expert == 8:
        t = Q.Q5_K
    return _fallback(t, ne0, name)


# ----------------------------------------------------------------------------------------------------------
# planning
def _attn_shapes(b: str, c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The attention block both architectures share (norm, q/k/v/o, per-head q/k norms), in file order."""
    E, D = c["n_embd"], c["head_dim"]
    nq, nkv = c["n_head"] * D, c["n_head_kv"] * D
    return [
        (b + "attn_norm.weight", (E,)),
        (b + "attn_q.weight", (E, nq)),
        (b + "attn_k.weight", (E, nkv)),
        (b + "attn_v.weight", (E, nkv)),
        (b + "attn_output.weight", (nq, E)),
        (b + "attn_q_norm.weight", (D,)),
        (b + "attn_k_norm.weight", (D,)),
    ]


def _qwen3moe_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    E, V, L = c["n_embd"], c["n_vocab"], c["n_layer"]
    X, F = c["n_expert"], c["n_ff_exp"]
    out = [("token_embd.weight", (E, V))]
    for i in range(L):
        b = f"blk.{i}."
        out += [
            *_attn_shapes(b, c),
            (b + "ffn_norm.weight", (E,)),
            (b + "ffn_gate_inp.weight", (E, X)),
            (b + "ffn_gate_exps.weight", (E, F, X)),
            (b + "ffn_up_exps.weight", (E, F, X)),
            (b + "ffn_down_exps.weight", (F, E, X)),
        ]
    out += [("output_norm.weight", (E,)), ("output.weight", (E, V))]
    return out


def _gemma3_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    E, V, L, FF = c["n_embd"], c["n_vocab"], c["n_layer"], c["n_ff"]
    out = [("token_embd.weight", (E, V))]
    for i in range(L):
        b = f"blk.{i}."
        out += [
            *_attn_shapes(b, c),
            (b + "post_attention_norm.weight", (E,)),
            (b + "ffn_norm.weight", (E,)),
            (b + "ffn_gate.weight", (E, FF)),
            (b + "ffn_up.weight", (E, FF)),
            (b + "ffn_down.weight", (FF, E)),
            (b + "post_ffw_norm.weight", (E,)),
        ]
    out += [("output_norm.weight", (E,))]  # no output.weight: tied to token_embd
    return out


def _gemma4_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a gemma4 preset, in the order llama.cpp's loader lists them
    (src/models/gemma4.cpp load_arch_tensors), fused ffn_gate_up_exps as conversion/gemma.py writes it."""
    E, V, L, H = c["n_embd"], c["n_vocab"], c["n_layer"], c["n_head"]
    FF, X, F = c["n_ff"], c["n_expert"], c["n_ff_exp"]
    out = [("token_embd.weight", (E, V))]
    if not all(gemma4_is_swa(c, i) for i in range(L)):  # llama.cpp loads rope_freqs only with a full layer
        out.append(("rope_freqs.weight", (c["head_dim_full"] // 2,)))
    for i in range(L):
        b = f"blk.{i}."
        swa = gemma4_is_swa(c, i)
        d, kv = (c["head_dim"], c["n_head_kv"]) if swa else (c["head_dim_full"], c["n_head_kv_full"])
        out += [
            (b + "attn_norm.weight", (E,)),
            (b + "attn_q.weight", (E, H * d)),
            (b + "attn_k.weight", (E, kv * d)),
        ]
        if swa or not c["k_eq_v"]:
            out.append((b + "attn_v.weight", (E, kv * d)))
        out += [
            (b + "attn_output.weight", (H * d, E)),
            (b + "attn_q_norm.weight", (d,)),
            (b + "attn_k_norm.weight", (d,)),
            (b + "post_attention_norm.weight", (E,)),
        ]
        if c["layer_output_scale"]:
            out.append((b + "layer_output_scale.weight", (1,)))
        out += [
            (b + "ffn_norm.weight", (E,)),
            (b + "ffn_gate.weight", (E, FF)),
            (b + "ffn_up.weight", (E, FF)),
            (b + "ffn_down.weight", (FF, E)),
            (b + "post_ffw_norm.weight", (E,)),
            (b + "ffn_gate_inp.weight", (E, X)),
            (b + "ffn_gate_inp.scale", (E,)),
            (b + "pre_ffw_norm_2.weight", (E,)),
            (b + "post_ffw_norm_1.weight", (E,)),
            (b + "post_ffw_norm_2.weight", (E,)),
            (b + "ffn_gate_up_exps.weight", (E, 2 * F, X)),
            (b + "ffn_down_exps.weight", (F, E, X)),
            (b + "ffn_down_exps.scale", (X,)),
        ]
    out += [("output_norm.weight", (E,))]  # no output.weight: tied to token_embd
    return out


_SHAPES = {"qwen3moe": _qwen3moe_shapes, "gemma3": _gemma3_shapes, "gemma4": _gemma4_shapes}


def plan_synthetic(
    arch: str = "qwen3moe", preset: str = "tiny", *, overrides: dict | None = None, ftype: str = "Q4_K_M"
) -> list[PlannedTensor]:
    """The tensors ``write_synthetic`` would write, in file order, without generating any data."""
    if ftype not in FTYPE_IDS:
        raise ValueError(f"unsupported ftype {ftype!r} (supported: {', '.join(FTYPE_IDS)})")
    c = synthetic_config(arch, preset, overrides)
    shapes = _SHAPES[arch](c)
    tied = arch in ("gemma3", "gemma4")
    n_expert = c.get("n_expert", 0)
    attn_v = [n for n, _ in shapes if n.endswith("attn_v.weight")]
    rank = {n: (i, len(attn_v)) for i, n in enumerate(attn_v)}
    return [
        PlannedTensor(
            n,
            q4_k_m_type(
                n,
                s,
                n_layer=c["n_layer"],
                n_expert=n_expert,
                tied_embeddings=tied,
                attn_v_counter=rank.get(n),
            ),
            s,
        )
        for n, s in shapes
    ]


def tensor_nbytes(t: PlannedTensor) -> int:
    bs, ts = GGML_QUANT_SIZES[t.ggml_type]
    return math.prod(t.shape) // bs * ts


def plan_summary(plan: list[PlannedTensor]) -> dict:
    """Total parameters, bytes and a per-type histogram (tensor count, bytes) of a plan."""
    hist: dict[str, list[int]] = {}
    for t in plan:
        h = hist.setdefault(t.ggml_type.name, [0, 0])
        h[0] += 1
        h[1] += tensor_nbytes(t)
    return {
        "n_params": sum(math.prod(t.shape) for t in plan),
        "n_bytes": sum(tensor_nbytes(t) for t in plan),
        "types": {k: tuple(v) for k, v in sorted(hist.items())},
    }


def target_scale(arch: str, cfg: dict, name: str, shape: tuple[int, ...]) -> tuple[str, float | tuple]:
    """How tensor ``name`` is initialized: ("norm", g) uniform g*NORM_RANGE, ("uniform", (lo, hi)),
    ("rope_freqs", n) (n ones then 1e30), ("normal", std) for F32 matrices, or ("rms", r) for quantized
    matrices (dequantized RMS r)."""
    if arch == "gemma4":
        return _gemma4_target_scale(cfg, name, shape)
    if len(shape) == 1:
        if arch == "gemma3":
            for key, gain in GEMMA3_POST_NORM_GAIN.items():
                if key in name:
                    return ("norm", gain)
        return ("norm", 1.0)
    if "ffn_gate_inp" in name:
        return ("normal", ROUTER_LOGIT_STD / math.sqrt(cfg["n_embd"]))
    if name == "token_embd.weight":
        return ("rms", 1.0 if arch == "qwen3moe" else GEMMA3_EMBD_RMS_SQRT_N / math.sqrt(cfg["n_embd"]))
    return ("rms", 1.0 / math.sqrt(shape[0]))


def _gemma4_target_scale(cfg: dict, name: str, shape: tuple[int, ...]) -> tuple[str, float | tuple]:
    suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if name == "rope_freqs.weight":
        return ("rope_freqs", round(cfg["head_dim_full"] * cfg["partial_rotary_full"] / 2))
    if suffix in GEMMA4_UNIFORM:
        return ("uniform", GEMMA4_UNIFORM[suffix])
    if suffix in ("attn_q_norm.weight", "attn_k_norm.weight"):
        return ("norm", (GEMMA4_SCORE_STD / math.sqrt(shape[0])) ** 0.5)
    if len(shape) == 1:  # norms, ffn_gate_inp.scale
        return ("norm", GEMMA4_NORM_GAIN.get(suffix, 1.0))
    if suffix == "ffn_gate_inp.weight":
        return ("normal", ROUTER_LOGIT_STD)
    if name == "token_embd.weight":
        return ("rms", GEMMA4_EMBD_RMS_SQRT_N / math.sqrt(cfg["n_embd"]))
    return ("rms", 1.0 / math.sqrt(shape[0]))


# ------------------------------------------------------------------------------------------ random block
# generation
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _jitter(u16: np.ndarray) -> np.ndarray:
    """uint16 -> uniform factor in [0.75, 1.25); E[j^2] = 0.75^2 + 0.75*0.5 + 0.5^2/3 = 49/48."""
    return 0.75 + 0.5 * (u16.astype(np.float32) / 65536.0)


_JITTER_MS = 49.0 / 48.0  # E[jitter^2]


class _QuantGen:
    """Fills blocks of one quant type in place from uniform random bytes, given base d."""

    # K-quant sub-block scales sc are drawn from [24, 63] (bit 5 set or not, so the packing's high bits vary)
    # and the mins m = round(0.8*sc), with dmin = d*mean(q)/0.8 so that dmin*m ~= d*sc*mean(q): zero-mean
    # sub-blocks.
    SC_LO, SC_SPAN, M_RATIO = 24, 40, 0.8

    @staticmethod
    def rms_per_unit_d(qtype) -> float:
        """Dequantized RMS when base d = 1 (exact expectation over the generator's distributions)."""
        if qtype in (Q.Q4_K, Q.Q5_K):
            nq = 16 if qtype == Q.Q4_K else 32
            qmean, qvar = (nq - 1) / 2, (nq * nq - 1) / 12
            k = qmean / _QuantGen.M_RATIO
            # sc = SC_LO + byte % SC_SPAN over uniform bytes: enumerate all 256 bytes (the residues are not
            # uniform)
            sc = _QuantGen.SC_LO + np.arange(256, dtype=np.float64) % _QuantGen.SC_SPAN
            m = np.round(_QuantGen.M_RATIO * sc)
            ms = np.mean(sc * sc * qvar + (qmean * sc - k * m) ** 2)
            return math.sqrt(_JITTER_MS * ms)
        if qtype == Q.Q6_K:  # |S| in [64, 127], q-32 uniform on [-32, 31]
            s = np.arange(64, 128, dtype=np.float64)
            return math.sqrt(_JITTER_MS * np.mean(s * s) * ((64 * 64 - 1) / 12 + 0.25))
        if qtype == Q.Q5_0:  # q-16 uniform on [-16, 15]
            return math.sqrt(_JITTER_MS * ((32 * 32 - 1) / 12 + 0.25))
        if qtype == Q.Q8_0:  # int8 uniform with -128 clipped to -127
            k = np.arange(-128, 128, dtype=np.float64)
            k[0] = -127
            return math.sqrt(_JITTER_MS * np.mean(k * k))
        raise ValueError(f"no synthetic generator for {qtype.name}")

    @staticmethod
    def fill(blk: np.ndarray, qtype, d_base: float) -> None:
        """blk: (n_blocks, type_size) uint8 of random bytes; rewrites scale fields in place."""
        if qtype in (Q.Q4_K, Q.Q5_K):
            nq = 16 if qtype == Q.Q4_K else 32
            k = ((nq - 1) / 2) / _QuantGen.M_RATIO
            d = d_base * _jitter(blk[:, 0:2].view(np.uint16)[:, 0])
            sc = (_QuantGen.SC_LO + blk[:, 4:12] % _QuantGen.SC_SPAN).astype(np.uint8)  # (nb, 8)
            m = np.round(_QuantGen.M_RATIO * sc).astype(np.uint8)
            s = blk[:, 4:16]
            # inverse of get_scale_min_k4 (ggml-quants.c)
            s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
            s[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
            s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
            blk[:, 0:2] = _f16_bytes(d)
            blk[:, 2:4] = _f16_bytes(d * k)
        elif qtype == Q.Q6_K:  # ql[128] qh[64] scales int8[16] d
            raw = blk[:, 192:208]
            mag = (64 + (raw & 63)).astype(np.int16)
            sgn = np.where(raw & 128, -1, 1).astype(np.int16)
            d = d_base * _jitter(blk[:, 208:210].view(np.uint16)[:, 0])
            blk[:, 192:208] = (mag * sgn).astype(np.int8).view(np.uint8)
            blk[:, 208:210] = _f16_bytes(d)
        elif qtype in (Q.Q5_0, Q.Q8_0):  # d first; symmetric formats get a random sign
            u = blk[:, 0:2].view(np.uint16)[:, 0]
            d = d_base * _jitter(u << 1) * np.where(u & 0x8000, -1.0, 1.0).astype(np.float32)
            blk[:, 0:2] = _f16_bytes(d)
            if qtype == Q.Q8_0:
                qs = blk[:, 2:34].view(np.int8)
                np.maximum(qs, -127, out=qs)
        else:
            raise ValueError(f"no synthetic generator for {qtype.name}")


CHUNK_BYTES = 16 << 20  # generation unit; fixed so output does not depend on the thread count


class _TensorSource:
    """Chunked, deterministic generator for one planned tensor."""

    def __init__(self, t: PlannedTensor, kind: str, scale: float, seed: int):
        self.t, self.kind, self.scale, self.seed = t, kind, scale, seed
        self.key = zlib.crc32(t.name.encode())
        bs, ts = GGML_QUANT_SIZES[t.ggml_type]
        self.block_bytes = ts
        self.n_blocks = math.prod(t.shape) // bs
        self.blocks_per_chunk = max(1, CHUNK_BYTES // ts)
        self.n_chunks = -(-self.n_blocks // self.blocks_per_chunk)
        if kind == "rms":
            self.d_base = scale / _QuantGen.rms_per_unit_d(t.ggml_type)

    def chunk(self, k: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(self.key, k))))
        lo = k * self.blocks_per_chunk
        nb = min(self.blocks_per_chunk, self.n_blocks - lo)
        qt = self.t.ggml_type
        if qt in (Q.F32, Q.F16):
            dt = np.float32 if qt == Q.F32 else np.float16
            if self.kind == "norm":
                x = rng.uniform(*NORM_RANGE, size=nb) * self.scale
            elif self.kind == "uniform":
                x = rng.uniform(*self.scale, size=nb)
            elif self.kind == "rope_freqs":  # conversion/gemma.py: 1.0 for rotated pairs, 1e30 for the others
                x = np.where(np.arange(lo, lo + nb) < self.scale, 1.0, 1e30)
            else:
                x = rng.standard_normal(nb) * self.scale
            return x.astype(dt)
        nbytes = nb * self.block_bytes
        words = rng.integers(0, 2**64, size=-(-nbytes // 8), dtype=np.uint64, endpoint=False)
        blk = words.view(np.uint8)[:nbytes].reshape(nb, self.block_bytes)
        _QuantGen.fill(blk, qt, self.d_base)
        return blk


# ----------------------------------------------------------------------------------------------------
# tokenizers
def _bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's byte -> printable unicode map, in GPT-2 vocabulary order (printable bytes first)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTERS = _LETTERS + _LETTERS.upper()


def _letter_combos():
    """(prefix, suffix) pairs building longer letter strings: 2-letter, then 3-letter (frequent first)."""
    pairs = sorted(
        ((a, b) for a in range(len(_LETTERS)) for b in range(len(_LETTERS))), key=lambda p: (p[0] + p[1], p)
    )
    two = [_LETTERS[a] + _LETTERS[b] for a, b in pairs]
    for s in two:
        yield s[0], s[1]
    for s in two:
        for c in _LETTERS:
            yield s, c


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen_vocab(n_vocab: int):
    """Byte-level BPE vocabulary of exactly n_vocab tokens, laid out like Qwen's.

    ids [0, 256): the GPT-2 byte tokens; then tokens built by merges (" x" as "Ġx", letter pairs, "Ġ"+pair,
    letter triples, "Ġ"+triple — each merge joins two existing tokens, so every one is reachable); then
    <|endoftext|>, <|im_start|>, <|im_end|> (CONTROL) at n_regular.. (151643.. for the real vocab size), then
    [PADn] (UNUSED) rows.
    Returns (tokens, token_types, merges, special_ids).
    """
    n_regular = 151643 if n_vocab == 151936 else n_vocab - len(QWEN_SPECIALS) - 5
    if n_regular < 256 + 1:
        raise ValueError(f"n_vocab {n_vocab} too small for a byte-level BPE vocab")
    b2u = dict(_bytes_to_unicode())
    sp = b2u[ord(" ")]  # 'Ġ'
    tokens = [c for _, c in _bytes_to_unicode()]
    merges: list[str] = []

    def gen():
        for c in _LETTERS:
            yield sp, c
        for a, b in _letter_combos():
            yield a, b
            yield sp + a, b  # "Ġa" + "b", "Ġab" + "c"

    seen = set(tokens)
    for a, b in gen():
        if len(tokens) >= n_regular:
            break
        if a + b in seen or a not in seen or b not in seen:
            continue
        tokens.append(a + b)
        seen.add(a + b)
        merges.append(f"{a} {b}")
    if len(tokens) < n_regular:
        raise ValueError(f"n_vocab {n_vocab} larger than the synthetic BPE generator supports")
    types = [1] * len(tokens)
    special = {s: len(tokens) + i for i, s in enumerate(QWEN_SPECIALS)}
    tokens += list(QWEN_SPECIALS)
    types += [3] * len(QWEN_SPECIALS)
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    return tokens, types, merges, special


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
_SPM_SINGLES = "▁" + _LETTERS + "0123456789.,;:!?'\"-()[]{}/\\@#$%&*+=<>_|~`^"


def gemma_vocab(n_vocab: int):
    """SPM vocabulary of exactly n_vocab pieces with scores, Gemma-3-style special ids.

    ids 0..5 <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn> (CONTROL, score -1000, as in the real
    file), then the 256 <0xXX> BYTE tokens, then NORMAL pieces: single characters incl. '▁', '▁'+letter,
    letter pairs, '▁'+pair, triples, '▁'+triple. Scores decrease with id (shorter = more frequent), as in a
    trained SPM model.
    Returns (tokens, scores, token_types, special_ids).
    """
    tokens = list(GEMMA_SPECIALS)
    types = [3] * len(GEMMA_SPECIALS)  # the real gemma-3-270m file types <unk> CONTROL too (checked)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256

    def gen():
        yield from _SPM_SINGLES
        for c in _LETTERS:
            yield "▁" + c
        for a, b in _letter_combos():
            yield a + b
            yield "▁" + a + b

    seen = set(tokens)
    for p in gen():
        if len(tokens) >= n_vocab:
            break
        if p not in seen:
            tokens.append(p)
            seen.add(p)
            types.append(1)
    if len(tokens) < n_vocab:
        raise ValueError(f"n_vocab {n_vocab} larger than the synthetic SPM generator supports")
    n_fixed = len(GEMMA_SPECIALS) + 256
    scores = [-1000.0] * len(GEMMA_SPECIALS) + [0.0] * 256 + [-float(i) for i in range(len(tokens) - n_fixed)]
    return tokens, scores, types, {s: i for i, s in enumerate(GEMMA_SPECIALS)}


# id: (text, llama.cpp token type); ids as models.md §6 gives them (<|turn> 105, <turn|> 106)
GEMMA4_SPECIALS = {
    0: ("<pad>", 3),
    1: ("<eos>", 3),
    2: ("<bos>", 3),
    3: ("<unk>", 2),
    105: ("<|turn>", 3),
    106: ("<turn|>", 3),
    107: ("<|channel>", 4),  # USER_DEFINED, as conversion/gemma.py marks the "visible" tokens
    108: ("<channel|>", 4),
    109: ("<|think|>", 3),
    110: ("<|tool_response>", 3),
}
GEMMA4_MAX_NEWLINES = 8


def gemma4_vocab(n_vocab: int):
    """A Gemma-4-style vocabulary (``tokenizer.ggml.model = gemma4``: BPE over raw UTF-8 with ' ' -> '▁',
    newline runs as tokens, ``<0xXX>`` byte fallback) of exactly n_vocab tokens, with merges.

    ids: the specials of GEMMA4_SPECIALS (the other ids below 111 are ``<unusedN>``, UNUSED), then the 256
    BYTE tokens, newline runs (1 to 8 newlines), single characters (incl. '▁'), then merged tokens built as in
    :func:`qwen_vocab` ('▁'+letter, letter pairs, '▁'+pair, triples, '▁'+triple; each merge joins two existing
    tokens). Returns (tokens, token_types, merges, special_ids by text).
    """
    n_fixed = max(GEMMA4_SPECIALS) + 1
    tokens = [GEMMA4_SPECIALS.get(i, (f"<unused{i}>", 5))[0] for i in range(n_fixed)]
    types = [GEMMA4_SPECIALS.get(i, ("", 5))[1] for i in range(n_fixed)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    for k in range(1, GEMMA4_MAX_NEWLINES + 1):
        tokens.append("\n" * k)
        types.append(1)
    seen = set(tokens)
    for ch in _SPM_SINGLES:
        if ch not in seen:
            tokens.append(ch)
            seen.add(ch)
            types.append(1)
    if len(tokens) > n_vocab:
        raise ValueError(
            f"n_vocab {n_vocab} too small for the synthetic gemma4 vocabulary (>= {len(tokens)})"
        )
    sp = "▁"
    merges: list[str] = []

    def gen():
        for c in _LETTERS:
            yield sp, c
        for a, b in _letter_combos():
            yield a, b
            yield sp + a, b

    for a, b in gen():
        if len(tokens) >= n_vocab:
            break
        if a + b in seen or a not in seen or b not in seen:
            continue
        tokens.append(a + b)
        seen.add(a + b)
        types.append(1)
        merges.append(f"{a} {b}")
    if len(tokens) < n_vocab:
        raise ValueError(f"n_vocab {n_vocab} larger than the synthetic gemma4 vocabulary generator supports")
    return tokens, types, merges, {t: i for i, (t, _) in GEMMA4_SPECIALS.items()}


# --------------------------------------------------------------------------------------------------------
# metadata
def _add_metadata(w: GGUFWriter, arch: str, preset: str, c: dict, ftype: str, seed: int) -> None:
    a = arch
    w.add_string("general.type", "model")
    w.add_string("general.name", f"synthetic {arch} {preset} seed {seed}")
    w.add_string(
        "general.description", "random weights generated by sparkinfer_cute.gguf.synth; not a trained model"
    )
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", FTYPE_IDS[ftype])
    w.add_uint32(f"{a}.context_length", c["n_ctx"])
    w.add_uint32(f"{a}.embedding_length", c["n_embd"])
    w.add_uint32(f"{a}.block_count", c["n_layer"])
    if arch == "gemma4":
        _add_gemma4_metadata(w, c)
        return
    w.add_uint32(f"{a}.feed_forward_length", c["n_ff"])
    w.add_uint32(f"{a}.attention.head_count", c["n_head"])
    w.add_uint32(f"{a}.attention.head_count_kv", c["n_head_kv"])
    w.add_uint32(f"{a}.attention.key_length", c["head_dim"])
    w.add_uint32(f"{a}.attention.value_length", c["head_dim"])
    w.add_float32(f"{a}.rope.freq_base", float(c["rope_base"]))
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(c["rms_eps"]))
    if arch == "qwen3moe":
        w.add_uint32(f"{a}.expert_count", c["n_expert"])
        w.add_uint32(f"{a}.expert_used_count", c["n_expert_used"])
        w.add_uint32(f"{a}.expert_feed_forward_length", c["n_ff_exp"])
        tokens, types, merges, sp = qwen_vocab(c["n_vocab"])
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "qwen2")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.eos_token_id", sp["<|im_end|>"])
        w.add_uint32("tokenizer.ggml.padding_token_id", sp["<|endoftext|>"])
        w.add_uint32("tokenizer.ggml.bos_token_id", sp["<|endoftext|>"])
        w.add_bool("tokenizer.ggml.add_bos_token", False)
        w.add_string("tokenizer.chat_template", QWEN_CHAT_TEMPLATE)
    else:
        w.add_uint32(f"{a}.attention.sliding_window", c["sliding_window"])
        if c.get("rope_base_swa") is not None:
            w.add_float32(f"{a}.rope.freq_base_swa", float(c["rope_base_swa"]))
        if c.get("rope_scaling_factor") is not None:  # what convert_hf_to_gguf writes for Gemma 3 4B and larger
            w.add_string(f"{a}.rope.scaling.type", "linear")
            w.add_float32(f"{a}.rope.scaling.factor", float(c["rope_scaling_factor"]))
        tokens, scores, types, sp = gemma_vocab(c["n_vocab"])
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_uint32("tokenizer.ggml.bos_token_id", sp["<bos>"])
        w.add_uint32("tokenizer.ggml.eos_token_id", sp["<eos>"])
        w.add_uint32("tokenizer.ggml.unknown_token_id", sp["<unk>"])
        w.add_uint32("tokenizer.ggml.padding_token_id", sp["<pad>"])
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)


def _add_gemma4_metadata(w: GGUFWriter, c: dict) -> None:
    """The keys conversion/gemma.py (Gemma4Model.set_gguf_parameters) writes. llama.cpp requires
    attention.key_length (else n_embd/n_head), the *_swa head sizes, sliding_window(_pattern),
    embedding_length_per_layer_input and (in practice) feed_forward_length."""
    a = "gemma4"
    L = c["n_layer"]
    swa = [gemma4_is_swa(c, i) for i in range(L)]
    hd, hd_full = c["head_dim"], c["head_dim_full"]
    w.add_uint32(f"{a}.feed_forward_length", c["n_ff"])
    w.add_uint32(f"{a}.attention.head_count", c["n_head"])
    w.add_array(f"{a}.attention.head_count_kv", [c["n_head_kv"] if s else c["n_head_kv_full"] for s in swa])
    w.add_uint32(f"{a}.attention.key_length", hd_full)
    w.add_uint32(f"{a}.attention.value_length", hd_full)
    w.add_uint32(f"{a}.attention.key_length_swa", hd)
    w.add_uint32(f"{a}.attention.value_length_swa", hd)
    w.add_uint32(f"{a}.rope.dimension_count", hd_full)  # full layers: partial rotary through rope_freqs
    w.add_uint32(f"{a}.rope.dimension_count_swa", hd)
    w.add_float32(f"{a}.rope.freq_base", float(c["rope_base"]))
    w.add_float32(f"{a}.rope.freq_base_swa", float(c["rope_base_swa"]))
    w.add_uint32(f"{a}.attention.sliding_window", c["sliding_window"])
    w.add_array(f"{a}.attention.sliding_window_pattern", swa)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(c["rms_eps"]))
    w.add_uint32(f"{a}.expert_count", c["n_expert"])
    w.add_uint32(f"{a}.expert_used_count", c["n_expert_used"])
    w.add_uint32(f"{a}.expert_feed_forward_length", c["n_ff_exp"])
    w.add_float32(f"{a}.final_logit_softcapping", float(c["final_logit_softcap"]))
    w.add_uint32(f"{a}.attention.shared_kv_layers", 0)
    w.add_uint32(f"{a}.embedding_length_per_layer_input", 0)
    tokens, types, merges, sp = gemma4_vocab(c["n_vocab"])
    w.add_string("tokenizer.ggml.model", "gemma4")
    w.add_string("tokenizer.ggml.pre", "gemma4")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", sp["<bos>"])
    w.add_uint32("tokenizer.ggml.eos_token_id", sp["<eos>"])
    w.add_uint32("tokenizer.ggml.unknown_token_id", sp["<unk>"])
    w.add_uint32("tokenizer.ggml.padding_token_id", sp["<pad>"])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)


# ----------------------------------------------------------------------------------------------------------
# writer
def write_synthetic(
    path,
    arch: str = "qwen3moe",
    preset: str = "tiny",
    seed: int = 0,
    *,
    overrides: dict | None = None,
    progress: bool = False,
    ftype: str = "Q4_K_M",
    n_threads: int | None = None,
    max_layers: int | None = None,
) -> str:
    """Write a synthetic ``arch``/``preset`` model to ``path`` (streamed; memory does not grow with the file).

    ``max_layers`` keeps only the first blocks of a preset while leaving every type rule computed for the full
    depth (a real-shape 1-2 layer slice of 30b-a3b); block_count in the file is then max_layers. ``n_threads``
    (default: all cores) does not change the output. Returns ``str(path)``.
    """
    path = os.fspath(path)
    cfg = synthetic_config(arch, preset, overrides)
    plan = plan_synthetic(arch, preset, overrides=overrides, ftype=ftype)
    if max_layers is not None:
        plan = [t for t in plan if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < max_layers]
        cfg["n_layer"] = min(cfg["n_layer"], max_layers)
        if arch == "gemma4" and all(gemma4_is_swa(cfg, i) for i in range(cfg["n_layer"])):
            plan = [t for t in plan if t.name != "rope_freqs.weight"]  # no full layer left to read it
    sources = [_TensorSource(t, *target_scale(arch, cfg, t.name, t.shape), seed) for t in plan]

    w = GGUFWriter(path, arch)
    _add_metadata(w, arch, preset, cfg, ftype, seed)
    for t in plan:
        dt = np.float32 if t.ggml_type == Q.F32 else np.float16 if t.ggml_type == Q.F16 else np.uint8
        w.add_tensor_info(
            t.name,
            tuple(reversed(t.shape)),
            np.dtype(np.float32) if dt is np.uint8 else np.dtype(dt),
            tensor_nbytes(t),
            raw_dtype=t.ggml_type if dt is np.uint8 else None,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    align = w.data_alignment

    def pad():
        n = (-f.tell()) % align
        if n:
            f.write(b"\0" * n)

    total = sum(tensor_nbytes(t) for t in plan)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(path))
    jobs = [(s, k) for s in sources for k in range(s.n_chunks)]
    n_threads = n_threads or os.cpu_count() or 1
    window = 2 * n_threads + 2  # chunks generated ahead of the writer: bounds memory to ~window*16 MiB
    try:
        with ThreadPoolExecutor(n_threads) as ex:
            pending: deque = deque()
            it = iter(jobs)
            for job in it:
                pending.append((job, ex.submit(job[0].chunk, job[1])))
                if len(pending) >= window:
                    break
            while pending:
                (_, k), fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, ex.submit(nxt[0].chunk, nxt[1])))
                if k == 0:
                    pad()  # each tensor starts aligned (the writer's offsets assume ggml_pad(nbytes, align))
                data = fut.result()
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                if bar is not None:
                    bar.update(data.nbytes)
        pad()
    finally:
        if bar is not None:
            bar.close()
        w.close()
    return path


# ---------------------------------------------------------------------------------------------------------
# header only
class _MetadataRecorder:
    """Takes the ``add_*`` calls of :func:`_add_metadata` the way GGUFWriter does, keeping the values in a dict."""

    def __init__(self, arch: str):
        self.metadata: dict = {"general.architecture": arch}

    def _put(self, key, value, *_):
        self.metadata[key] = list(value) if isinstance(value, (list, tuple)) else value

    def add_float32(self, key, value):
        self._put(key, float(np.float32(value)))  # as the file stores it

    add_string = add_uint32 = add_bool = add_array = _put


class SyntheticHeader(GGUFHeader):
    """What :class:`sparkinfer_cute.gguf.reader.GGUFFile` would show of ``write_synthetic(arch, preset)``'s file,
    without writing it or generating a byte of tensor data: the metadata (``metadata``), the tensor list with
    names, types, shapes and byte sizes (``tensors``; offsets are 0), ``architecture``, ``get``, ``require`` and
    ``tensor``. ``load_config`` and ``required_tensors`` take it like a file; reading tensor data
    (``raw``/``dequant``) is refused. A real-shape preset (30b-a3b: 17 GiB) is described in well under a second."""

    def __init__(self, arch: str, preset: str, *, overrides: dict | None = None, ftype: str = "Q4_K_M"):
        cfg = synthetic_config(arch, preset, overrides)
        plan = plan_synthetic(arch, preset, overrides=overrides, ftype=ftype)
        rec = _MetadataRecorder(arch)
        _add_metadata(rec, arch, preset, cfg, ftype, seed=0)
        self.path = f"synthetic:{arch}/{preset}"
        self.metadata = rec.metadata
        self.tensors = {t.name: TensorInfo(t.name, t.ggml_type, t.shape, 0, tensor_nbytes(t)) for t in plan}

    def raw(self, name: str):
        raise GGUFError(self.path, "a synthetic header has no tensor data", name)

    dequant = raw


def synthetic_header(arch: str, preset: str, overrides: dict | None = None) -> SyntheticHeader:
    """The header (metadata + tensor list, no data) of the synthetic ``arch``/``preset`` model."""
    return SyntheticHeader(arch, preset, overrides=overrides)


# -------------------------------------------------------------------------------------------------------- CLI
def _parse_override(s: str):
    k, eq, v = s.partition("=")
    if not eq or not k:
        raise ValueError(f"--set expects KEY=VALUE, got {s!r}")
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, {"None": None, "True": True, "False": False}.get(v, v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sparkinfer_cute.gguf.synth", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--arch", default="qwen3moe", choices=ARCHS)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("-o", "--output", help="output .gguf path (required unless --dry-run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset value")
    ap.add_argument("--max-layers", type=int, default=None, help="write only the first N blocks")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the plan summary, write nothing")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        overrides = dict(_parse_override(s) for s in args.set) or None
        plan = plan_synthetic(args.arch, args.preset, overrides=overrides)
    except ValueError as e:  # unknown preset or override, inconsistent shapes: a usage error, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = plan_summary(plan)
    print(
        f"{args.arch}/{args.preset}: {len(plan)} tensors, {s['n_params'] / 1e9:.3f} B params, "
        f"{s['n_bytes'] / 2**30:.3f} GiB",
        file=sys.stderr,
    )
    for k, (n, b) in s["types"].items():
        print(f"  {k:6s} {n:5d} tensors {b / 2**20:12.1f} MiB", file=sys.stderr)
    if args.dry_run:
        return 0
    if not args.output:
        ap.error("-o/--output is required")
    try:
        write_synthetic(
            args.output,
            args.arch,
            args.preset,
            args.seed,
            overrides=overrides,
            progress=not args.no_progress,
            n_threads=args.threads,
            max_layers=args.max_layers,
        )
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
