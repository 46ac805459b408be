"""The shared machinery of the numpy reference forwards: weight cache, fp16 KV cache, positions, logits.

A :class:`ReferenceModel` keeps state like an inference engine does: ``forward(tokens)`` appends the tokens at the
current position (a prefill when several, a decode step when one), stores their K/V rounded to fp16 (llama.cpp's
default F16 cache) and returns their logits. Subclasses (one per architecture) implement ``_layer`` and say how
the embedding and the output are formed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from ..errors import ContextOverflowError, GGUFError
from ..gguf.reader import GGUFFile
from ..lru import LRUCache
from . import ops

# bytes per 32-weight block of the types llama.cpp's x86 CPU backend multiplies with Q8_0 activations through
# tinyBLAS_Q0_AVX / ggml_vec_dot_*_q8_0 (fp16 scale first)
_Q0_BLOCK_BYTES = {"Q4_0": 18, "Q5_0": 22, "Q8_0": 34}


def _fallback_config(g: GGUFFile) -> SimpleNamespace:
    """The config fields the reference uses, read straight from the metadata (used only if
    ``sparkinfer_cute.gguf.config.load_config`` is unavailable)."""
    a = g.architecture

    def k(name, default=None):
        return g.get(f"{a}.{name}", default)

    n_head = int(k("attention.head_count"))
    n_embd = int(k("embedding_length"))
    head_dim = int(k("attention.key_length", n_embd // n_head))
    n_layer = int(k("block_count"))
    sliding_window = int(k("attention.sliding_window", 0) or 0)
    pattern = int(k("attention.sliding_window_pattern", 6) or 6)
    rope_base = float(k("rope.freq_base", 10000.0))
    rope_base_swa = float(k("rope.freq_base_swa", 10000.0))
    n_expert = int(k("expert_count", 0) or 0)
    n_expert_used = int(k("expert_used_count", 0) or 0)
    n_ff = int(k("feed_forward_length", 0) or 0)
    te = g.tensor("token_embd.weight")

    def is_swa(l: int) -> bool:
        return sliding_window > 0 and (l % pattern) < pattern - 1

    return SimpleNamespace(
        arch=a,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=int(k("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_rot=int(k("rope.dimension_count", head_dim)),
        rope_base=rope_base,
        rms_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
        vocab_size=int(te.shape[1]),
        n_ff=n_ff,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=int(k("expert_feed_forward_length", (n_ff // n_expert_used) if n_expert_used else 0) or 0),
        sliding_window=sliding_window,
        is_swa=is_swa,
        rope_base_for=lambda l: rope_base_swa if is_swa(l) else rope_base,
        final_logit_softcap=float(k("final_logit_softcapping", 0.0) or 0.0) or None,
        tied_output="output.weight" not in g.tensors,
        context_length=int(k("context_length", 4096)),
    )


def load_model_config(g: GGUFFile):
    """``sparkinfer_cute.gguf.config.load_config(g)`` when that module exists, else the fallback above."""
    try:
        from ..gguf.config import load_config  # type: ignore[attr-defined]
    except ImportError:
        return _fallback_config(g)
    return load_config(g)


def _cfg(cfg, name, default=None):
    v = getattr(cfg, name, default)
    return default if v is None else v


class _KVCache:
    """Per-layer K and V, stored as float16 (rounded exactly as llama.cpp's F16 cache stores them), growing by
    doubling so a large ``max_context`` costs nothing until used. ``n_head_kv``, ``head_dim`` and ``head_dim_v``
    are the same for every layer, or (Gemma 4) sequences of one value per layer."""

    def __init__(self, n_layer: int, n_head_kv, head_dim, head_dim_v):
        def per_layer(v) -> list[int]:
            return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n_layer

        self.shapes_k = list(zip(per_layer(n_head_kv), per_layer(head_dim)))
        self.shapes_v = list(zip(per_layer(n_head_kv), per_layer(head_dim_v)))
        self.k: list[np.ndarray | None] = [None] * n_layer
        self.v: list[np.ndarray | None] = [None] * n_layer

    def store(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k/v (n, n_head_kv, d) at positions pos..pos+n-1; return all of the layer's cache up to pos+n
        (float16 views)."""
        n = k.shape[0]
        end = pos + n
        K, V = self.k[layer], self.v[layer]
        if K is None or K.shape[0] < end:
            cap = max(end, 2 * (0 if K is None else K.shape[0]), 64)
            K2 = np.zeros((cap, *self.shapes_k[layer]), np.float16)
            V2 = np.zeros((cap, *self.shapes_v[layer]), np.float16)
            if K is not None:
                K2[: K.shape[0]] = K
                V2[: V.shape[0]] = V
            self.k[layer], self.v[layer] = K, V = K2, V2
        K[pos:end] = k.astype(np.float16)
        V[pos:end] = v.astype(np.float16)
        return K[:end], V[:end]


class ReferenceModel:
    """Base class of the numpy reference forwards (see module docstring).

    ``g``: a :class:`GGUFFile` or a path. ``cfg``: a typed config (default: ``load_config(g)``). ``dtype``: float32
    (default) or float64: weights are dequantized (exactly, float32) and then held and multiplied in this dtype.
    ``max_context``: positions the KV cache may hold (default: the model's trained context length); ``forward``
    raises :class:`ContextOverflowError` beyond it.
    ``emulate_cpu``: follow llama.cpp's CPU backend (x86 AVX512 build, ggml 0.25.3, default flash attention and
    CPU_REPACK) numerically, op by op: activations quantized to Q8_0/Q8_K before each quantized matmul, each matmul
    kernel's float accumulation order (:meth:`linear`), RMSNorm's rounding, RoPE with libm cos/sin and GCC's fma
    contraction, flash attention's tiled (>= 64 rows) and fp16-accumulator (< 64 rows) paths, the GELU fp16 table.
    For Gemma 3 (gemma3.py) this reproduces llama.cpp's residual stream bit for bit (prefill and decode, measured
    on the 270M Q4_K_M file, tests/reference/test_gemma3_real.py); the batch split matters, because llama.cpp picks
    kernels by batch size. For Qwen3-MoE (qwen3_moe.py) the same, plus the F32 router product, ggml_soft_max,
    the weight renormalisation, ``ggml_mul_mat_id`` per expert (repacked Q4_K gemv per routed row; Q6_K through the
    tiled kernel when >= 8 rows go to the expert, vec_dot below) and ``ggml_swiglu``: bit-identical residual stream
    on the synthetic Q4_K_M qwen3moe file (prefill 9/129 tokens and decode; tests/reference/test_models.py). Off by
    default: the default is exact float math on the dequantized weights (what the GPU path is gated against).

    ``act_q8_1`` (attribute, default empty; ``load_reference(..., act_q8_1=names)``): the names of the tensors whose
    matmuls see their activations rounded as the GPU's int8-activation kernels round them (q8_1: blocks of 32,
    ``d = amax/127``, ``q = rint(x/d)``; :func:`ops.quantize_activation_q8_1`), the rest of the math staying exact.
    With the set of matmuls a GPU build runs on int8 activations this is the reference that build is gated against
    with a tight KL (tests/models/test_gpu_decode.py). A MoE layer's gate and up share one quantized input, named by
    the gate (or fused gate_up) tensor. Not combinable with ``emulate_cpu`` (llama.cpp's own activation rounding).
    ``attn_f16_tiles`` ({head_dim: key tile}, ``load_reference(..., attn_f16_tiles=)``): attentions of those head
    sizes round q and the softmax weights to f16 per key tile as the GPU's flash prefill kernel does
    (:func:`ops.attention_f16_tiles`); with ``act_q8_1``, the batched prefill's same-rounding reference
    (models/int8_plan.py ``rounding_plan``).
    """

    arch: str = ""

    def __init__(
        self,
        g: GGUFFile | str | os.PathLike,
        cfg=None,
        dtype=np.float32,
        max_context: int | None = None,
        emulate_cpu: bool = False,
    ):
        if not isinstance(g, GGUFFile):
            g = GGUFFile(g)
        self.g = g
        self.cfg = cfg if cfg is not None else load_model_config(g)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        c = self.cfg
        self.n_layer = int(c.n_layer)
        self.n_embd = int(c.n_embd)
        self.n_head = int(c.n_head)
        self.n_head_kv = int(c.n_head_kv)
        self.head_dim = int(c.head_dim)
        self.head_dim_v = int(_cfg(c, "head_dim_v", self.head_dim))
        self.n_rot = int(_cfg(c, "n_rot", self.head_dim))
        self.eps = float(c.rms_eps)
        self.vocab_size = int(g.tensor("token_embd.weight").shape[1])
        ctx_train = _cfg(c, "context_length", None) or _cfg(c, "n_ctx_train", None)
        self.max_context = int(max_context if max_context is not None else (ctx_train or 4096))
        self.emulate_cpu = bool(emulate_cpu)
        self.act_q8_1: frozenset[str] = frozenset()
        self.attn_f16_tiles: dict[int, int] = {}  # head_dim -> key tile (load_reference(..., attn_f16_tiles=))
        self._weights: dict[str, np.ndarray] = {}
        self.reset()

    # ------------------------------------------------------------------ weights
    def weight(self, name: str) -> np.ndarray:
        """A dense weight, dequantized once (numpy order: (n_out, n_in) for matrices) and cached in ``dtype``."""
        w = self._weights.get(name)
        if w is None:
            w = self.g.dequant(name)
            w = np.ascontiguousarray(w, dtype=self.dtype)
            self._weights[name] = w
        return w

    def _dense_names(self) -> list[str]:
        """The tensors the forward multiplies whole (every one but the MoE expert stacks, which subclasses keep in
        an LRU cache of single experts)."""
        return [n for n in self.g.tensors if "_exps." not in n]

    def dense_weight_bytes(self) -> int:
        """Bytes :meth:`preload_weights` would hold (every dense tensor in ``dtype``)."""
        return sum(int(np.prod(self.g.tensor(n).shape)) for n in self._dense_names()) * self.dtype.itemsize

    def preload_weights(self) -> int:
        """Dequantize every dense weight into the cache now (as :meth:`weight` would on first use), so that the
        first forward costs what every later one does; returns the bytes held."""
        for n in self._dense_names():
            self.weight(n)
        return sum(w.nbytes for k, w in self._weights.items() if isinstance(w, np.ndarray))

    def has(self, name: str) -> bool:
        return name in self.g.tensors

    def embed_rows(self, tokens: np.ndarray) -> np.ndarray:
        """Rows of token_embd for ``tokens`` (``ggml_get_rows``: exact dequantization of just those rows)."""
        if "token_embd.weight" in self._weights:
            return self._weights["token_embd.weight"][tokens]
        from ..gguf.quants import dequantize

        ti = self.g.check_supported("token_embd.weight")
        raw = np.asarray(self.g.raw("token_embd.weight")[tokens])
        return dequantize(raw, ti.ggml_type).reshape(len(tokens), ti.shape[0]).astype(self.dtype)

    def linear(self, x: np.ndarray, name: str, float_order: bool = True) -> np.ndarray:
        """``ggml_mul_mat(W, x)``: x (n, n_in) -> (n, n_out).

        With ``emulate_cpu`` the activations are rounded as llama.cpp's CPU backend rounds them (:meth:`act_for`),
        and, unless ``float_order`` is False, the float accumulation follows llama.cpp's too: bit for bit for the
        32-block weights (:func:`ops.matmul_q0_llama_cpu`), and exact-then-rounded-to-f32 (float64) for K-quants.
        That matters because every later activation rounding (Q8_0/Q8_K, fp16 K/V) turns a last-bit difference into
        a 1/127 step, and these steps compound over the layers (measured, Gemma 3 270M: with per-op differences of
        ~1e-7 relative the logits still drift by ~0.1 nat). ``float_order=False`` (used for the LM head, whose
        output feeds no later rounding) keeps the fast float32 product.
        """
        if self.emulate_cpu and float_order:
            t = self.g.tensor(name).ggml_type.name
            if t in _Q0_BLOCK_BYTES:
                qa, da = ops.quantize_q8_0_blocks(x)
                qw, dw = self._q0_blocks(name)
                return ops.matmul_q0_llama_cpu(qa, da, qw, dw).astype(self.dtype)
            if t == "Q4_K" and self.g.tensor(name).shape[1] % 8 == 0:
                # CPU_REPACK: rows in groups of 4 through the gemm kernel, the rest through the gemv kernel
                qa, da = ops.quantize_q8_K_blocks(x)
                blk = self._q4k_blocks(name)
                n4 = x.shape[0] - x.shape[0] % 4
                parts = []
                if n4:
                    parts.append(ops.matmul_q4_K_llama_cpu(qa[:n4], da[:n4], *blk))
                if n4 < x.shape[0]:
                    parts.append(ops.matmul_q4_K_llama_cpu(qa[n4:], da[n4:], *blk, gemv=True))
                return np.concatenate(parts).astype(self.dtype)
            if t == "Q6_K":
                # ggml-cpu/tiled kernel for batches of >= 8 rows, ggml_vec_dot_q6_K_q8_K below that
                qa, da = ops.quantize_q8_K_blocks(x)
                out = ops.matmul_q6_K_llama_cpu(qa, da, *self._q6k_blocks(name), vec_dot=x.shape[0] < 8)
                return out.astype(self.dtype)
            if t.endswith("_K"):
                xa = ops.quantize_activation_q8_K(x).astype(np.float64)
                return (xa @ self.weight(name).astype(np.float64).T).astype(np.float32).astype(self.dtype)
        return self.act_for(x, name) @ self.weight(name).T

    def _q0_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A 32-block weight as integer blocks float32, in :func:`ops.q0_weight_tiles` layout (nb, 8, 4, n_out), and
        scales (n_out, nb) float32 (cached)."""
        key = "q0:" + name
        blk = self._weights.get(key)
        if blk is None:
            t = self.g.tensor(name).ggml_type.name
            w = np.asarray(self.g.dequant(name), dtype=np.float32)
            n_out, n_in = w.shape
            raw = (
                np.ascontiguousarray(np.asarray(self.g.raw(name)))
                .view(np.uint8)
                .reshape(n_out, n_in // 32, -1)
            )
            assert raw.shape[-1] == _Q0_BLOCK_BYTES[t], (name, raw.shape)
            d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(d[..., None] != 0, w.reshape(n_out, n_in // 32, 32) / d[..., None], 0.0)
            q = q.astype(np.float32)
            assert np.array_equal(q, np.rint(q)), name
            blk = (ops.q0_weight_tiles(q), d)  # cached in the layout the product uses (the transpose is costly)
            self._weights[key] = blk
        return blk

    def _q4k_blocks(self, name: str):
        key = "q4k:" + name
        blk = self._weights.get(key)
        if blk is None:
            n_in, n_out = (int(v) for v in self.g.tensor(name).shape[:2])
            blk = ops.q4_K_blocks(np.asarray(self.g.raw(name)), n_out, n_in)
            self._weights[key] = blk
        return blk

    def _q6k_blocks(self, name: str):
        key = "q6k:" + name
        blk = self._weights.get(key)
        if blk is None:
            n_in, n_out = (int(v) for v in self.g.tensor(name).shape[:2])
            blk = ops.q6_K_blocks(np.asarray(self.g.raw(name)), n_out, n_in)
            self._weights[key] = blk
        return blk

    def norm(self, x: np.ndarray, weight_name: str) -> np.ndarray:
        """RMSNorm with the named weight: :func:`ops.rmsnorm`, or with ``emulate_cpu`` its llama.cpp rounding."""
        fn = ops.rmsnorm_llama_cpu if self.emulate_cpu else ops.rmsnorm
        return fn(x, self.weight(weight_name), self.eps)

    def act_for(self, x: np.ndarray, name: str) -> np.ndarray:
        """x as the matmul with tensor ``name`` sees it: unchanged, or with ``emulate_cpu`` rounded to the weight
        type's ``vec_dot_type`` (Q8_K for K-quants, Q8_0 for the 32-blocks, fp16 for F16, unchanged for F32); or, for
        a tensor named in ``act_q8_1``, rounded to q8_1 as the GPU's int8-activation kernels round it."""
        if name in self.act_q8_1:
            return ops.quantize_activation_q8_1(x).astype(self.dtype, copy=False)
        if not self.emulate_cpu:
            return x
        t = self.g.tensor(name).ggml_type.name
        if t.endswith("_K"):
            return ops.quantize_activation_q8_K(x)
        if t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"):
            return ops.quantize_activation_q8_0(x)
        if t in ("F16", "BF16"):
            return ops.round_fp16(x)
        return x

    def attend(self, q, k, v, q_pos, k_pos=None, scale: float = 1.0, window: int | None = None) -> np.ndarray:
        """Attention over the cache: :func:`ops.attention` (exact math), or with ``emulate_cpu`` llama.cpp's CPU
        flash-attention numerics (:func:`ops.attention_llama_cpu`: f32 for batches of >= 64 rows, fp16 Q and fp16
        V accumulator below)."""
        block_n = self.attn_f16_tiles.get(int(q.shape[-1]))
        if block_n:  # the GPU flash prefill's f16 q and P (load_reference(..., attn_f16_tiles=))
            return ops.attention_f16_tiles(q, k, v, q_pos, block_n, k_pos=k_pos, scale=scale, window=window)
        fn = ops.attention_llama_cpu if self.emulate_cpu else ops.attention
        return fn(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=scale, window=window)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the KV cache; the next forward starts at position 0."""
        self.pos = 0
        self.kv = _KVCache(self.n_layer, self.n_head_kv, self.head_dim, self.head_dim_v)

    # ------------------------------------------------------------------ forward
    def forward(
        self, tokens: Sequence[int], all_logits: bool = True, capture: dict | None = None
    ) -> np.ndarray:
        """Append ``tokens`` at the current position and return their logits, (len(tokens), vocab) in ``dtype``
        (or (1, vocab) for the last token when ``all_logits`` is False).

        ``capture``: if a dict is given it receives per-layer activations of these tokens: ``"embd"`` (the scaled
        input embedding), ``"resid.{l}"`` (the residual stream after layer l), ``"attn_out.{l}"``, ``"ffn_out.{l}"``
        (each branch's contribution added to the residual) and ``"output_norm"``.
        """
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if n == 0:
            raise ValueError("forward needs at least one token")
        if toks.min() < 0 or toks.max() >= self.vocab_size:
            bad = int(toks[(toks < 0) | (toks >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if self.pos + n > self.max_context:
            raise ContextOverflowError(
                f"{self.pos} cached + {n} new tokens exceed the context of {self.max_context} positions"
            )
        positions = np.arange(self.pos, self.pos + n, dtype=np.int64)
        # llama.cpp drops the rows whose logits are not wanted after the last layer's attention (inp_out_ids); the
        # emulation does the same, since the row count picks llama.cpp's matmul kernels
        self._last_layer_rows_all = bool(all_logits)
        x = self._embed(toks)
        if capture is not None:
            capture["embd"] = x.copy()
        for l in range(self.n_layer):
            x = self._layer(l, x, positions, capture)
            if capture is not None:
                capture[f"resid.{l}"] = x.copy()
        self.pos += n
        if not all_logits:
            x = x[-1:]
        return self._output(x, capture)

    def hidden_states(self, tokens: Sequence[int]) -> np.ndarray:
        """Run ``forward(tokens)`` and return the residual stream, (n_layer + 1, len(tokens), n_embd): index 0 is the
        input embedding, index l+1 the stream after layer l (for layer-by-layer GPU-vs-reference checks)."""
        cap: dict = {}
        self.forward(tokens, all_logits=False, capture=cap)
        return np.stack([cap["embd"]] + [cap[f"resid.{l}"] for l in range(self.n_layer)])

    # ------------------------------------------------------------------ per-architecture parts
    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.embed_rows(tokens)

    def _layer(self, l: int, x: np.ndarray, positions: np.ndarray, capture: dict | None) -> np.ndarray:
        raise NotImplementedError

    def _output(self, x: np.ndarray, capture: dict | None) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.g.path!r}, dtype={self.dtype.name}, pos={self.pos})"


def inv_sqrt(x: float) -> float:
    return 1.0 / math.sqrt(x)


__all__ = ["GGUFError", "LRUCache", "ReferenceModel", "load_model_config"]
