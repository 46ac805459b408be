"""float64 references, error bounds and test inputs of the GPU kernels (``sparkinfer_cute/kernels``).

One function per kernel wrapper, named ``<wrapper>_ref``: numpy in, float64 numpy out, the same arguments as the
wrapper. Quantized weights are dequantized by gguf-py (the independent reference) from the original GGUF bytes, so
a kernel's decode is checked against an implementation it shares no code with. The error bounds state how far an f32
kernel may be from its float64 reference (derivations next to each bound); the kernel tests assert them.

This module sits in the reference layer: numpy, gguf-py and ``reference.ops`` only, never the kernels (which may
import from here: ``theta_scale_f32`` is the host constant both must agree on).

(Over 600 lines: one reference and one error bound per kernel wrapper, about thirty of them; the bounds share
derivations, so they stay in one file.)
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..gguf.quants import QUANT_BLOCK, Q6_K_P_BLOCK_BYTES, repack_q6_k_padded, unpack_q6_k_padded
from . import ops

U = 2.0**-24  # f32 unit roundoff
QK8_1 = 32  # q8_1 activation block (kernels/q8_1.py)


# ---------------------------------------------------------------------------------------------- comparisons
def rel_err(y, ref) -> float:
    """max|y - ref| / max(max|ref|, tiny), in float64 (the figure every kernel test reports)."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if y.shape != ref.shape:
        raise ValueError(f"shape mismatch {y.shape} vs {ref.shape}")
    if y.size == 0:
        return 0.0
    return float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def f16_ulp_distance(a, b):
    """Elementwise distance in fp16 ulps between ``a`` and ``b`` rounded to fp16 (int64 array): the bit patterns
    mapped to a monotonic integer line (-0 and +0 coincide), then subtracted."""

    def ordinal(x):
        u = np.asarray(x, np.float16).view(np.uint16).astype(np.int64)
        return np.where(u & 0x8000, -(u & 0x7FFF), u)

    return np.abs(ordinal(a) - ordinal(b))


# ---------------------------------------------------------------------------------------------- quant types
def qtype_name(qtype) -> str:
    """'Q4_K', a gguf.GGMLQuantizationType or its int value -> the type name ('Q6_K_P': the padded repack)."""
    if isinstance(qtype, str):
        return qtype.upper()
    return GGMLQuantizationType(int(qtype)).name


def block_shape(qtype) -> tuple[int, int]:
    """(elements, bytes) of one block; F32/F16/BF16 count 32-element pseudo-blocks, as the kernels do."""
    q = qtype_name(qtype)
    if q == "Q6_K_P":
        return 256, Q6_K_P_BLOCK_BYTES
    be, bb = QUANT_BLOCK[GGMLQuantizationType[q]]
    return (32, 32 * bb) if be == 1 else (be, bb)


def row_bytes(qtype, n_in: int) -> int:
    be, bb = block_shape(qtype)
    assert n_in % be == 0, f"{qtype_name(qtype)}: row length {n_in} not a multiple of {be}"
    return n_in // be * bb


def dequantize_ref(raw: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's numpy dequantizer on the original bytes (flat f32). Q6_K_P bytes are unpadded back to Q6_K."""
    from gguf.quants import dequantize as gguf_dequantize

    q = qtype_name(qtype)
    if q == "Q6_K_P":
        raw, q = unpack_q6_k_padded(np.asarray(raw, dtype=np.uint8).reshape(-1)), "Q6_K"
    return gguf_dequantize(np.asarray(raw, dtype=np.uint8).reshape(-1), GGMLQuantizationType[q]).astype(
        np.float32).reshape(-1)


def random_quant_bytes(qtype, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random blocks of ``qtype`` (uint8, shape (n_blocks, block_bytes)): random quant bits, finite f16 scales.

    The f16 scale fields get |N(0, scale)|-ish finite values (d may be negative: ggml never forbids it), so the
    decoded values are finite and span many exponents. Float types get random finite values."""
    q = qtype_name(qtype)
    _, block_bytes = block_shape(q)
    if q == "Q6_K_P":
        return repack_q6_k_padded(random_quant_bytes("Q6_K", n_blocks, rng, scale))
    if q in ("F16", "BF16", "F32"):
        v = (rng.standard_normal(n_blocks * 32) * scale).astype(np.float32)
        if q == "F16":
            b = v.astype(np.float16).view(np.uint8)
        elif q == "BF16":
            b = (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            b = v.view(np.uint8)
        return b.reshape(n_blocks, block_bytes).copy()
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)

    def halves(k):
        return (rng.standard_normal((n_blocks, k)) * scale * 0.05).astype(np.float16).view(np.uint8)

    if q == "Q6_K":
        raw[:, 208:210] = halves(1)
    elif q in ("Q4_K", "Q5_K"):
        raw[:, 0:4] = halves(2)
    else:
        raw[:, 0:2] = halves(1)
    return raw


# ---------------------------------------------------------------------------------------------- GEMV
def dequant_rows_f64(w_raw: np.ndarray, qtype, n_in: int) -> np.ndarray:
    rb = row_bytes(qtype, n_in)
    w2 = np.asarray(w_raw, dtype=np.uint8).reshape(-1, rb)
    return dequantize_ref(w2, qtype).astype(np.float64).reshape(w2.shape[0], n_in)


def gemv_ref(w_raw: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    W = dequant_rows_f64(w_raw, qtype, x.shape[-1])
    return x @ W.T


def expert_bytes(w_raw: np.ndarray, qtype, e: int, n_out: int, n_in: int) -> np.ndarray:
    """The raw bytes of expert ``e`` of an [n_expert, n_out, n_in] quantized tensor (only the selected experts are
    dequantized by the references: 128 Qwen3 experts would be 1.6 GB in float64)."""
    return np.asarray(w_raw, dtype=np.uint8).reshape(-1, n_out * row_bytes(qtype, n_in))[int(e)]


def _per_expert(fn, w_raw, qtype, ids, n_out, n_in):
    cache = {}
    for e in np.asarray(ids).reshape(-1):
        if int(e) not in cache:
            cache[int(e)] = fn(expert_bytes(w_raw, qtype, e, n_out, n_in), qtype, n_in)
    return cache


def gemv_experts_ref(w_raw: np.ndarray, qtype, x: np.ndarray, ids, n_out: int, x_per_slot: bool = False):
    x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    n_in = x.shape[-1]
    W = _per_expert(dequant_rows_f64, w_raw, qtype, ids, n_out, n_in)
    return np.stack([W[int(e)] @ x[j if x_per_slot else 0] for j, e in enumerate(np.asarray(ids).reshape(-1))])


def weight_magnitude_f64(w_raw: np.ndarray, qtype, n_in: int) -> np.ndarray:
    """Per-weight magnitude A >= |W| that bounds the decode rounding: for Q4_K/Q5_K (w = d*sc*q - dmin*m, where the
    subtraction may cancel) A = |d*sc*q| + |dmin*m|, computed by dequantizing copies with dmin = 0 and with d = 0;
    for the other types A = |W|."""
    q = qtype_name(qtype)
    if q not in ("Q4_K", "Q5_K"):
        return np.abs(dequant_rows_f64(w_raw, q, n_in))
    b = np.array(w_raw, dtype=np.uint8).reshape(-1, block_shape(q)[1])
    no_min, no_scale = b.copy(), b.copy()
    no_min[:, 2:4] = 0  # dmin = +0.0
    no_scale[:, 0:2] = 0  # d = +0.0
    return np.abs(dequant_rows_f64(no_min, q, n_in)) + np.abs(dequant_rows_f64(no_scale, q, n_in))


def gemv_error_bound(w_raw: np.ndarray, qtype, x: np.ndarray, ids=None, n_out=None, x_per_slot=False):
    """Elementwise bound on |y_gpu - y_ref| of the f32-activation GEMV: (n_in + 8) * 2^-24 * sum_i A_oi |x_i|.

    ``d*sc`` and ``dmin*m`` are rounded exactly as gguf-py rounds them; the remaining decode step (``*q``,
    ``- dmin*m``, possibly fused) differs from gguf-py's by at most 2u A_i, where A_i = |d*sc*q_i| + |dmin*m|
    (K-quants; = |W_i| otherwise: the subtraction may cancel; :func:`weight_magnitude_f64`); an f32 sum of n
    products adds at most ~n u sum |w x| (Higham's gamma_n)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    n_in = x.shape[-1]
    if ids is None:
        mag = x @ weight_magnitude_f64(w_raw, qtype, n_in).T
    else:
        A = _per_expert(weight_magnitude_f64, w_raw, qtype, ids, n_out, n_in)
        x2 = x.reshape(-1, n_in)
        mag = np.stack([A[int(e)] @ x2[j if x_per_slot else 0] for j, e in enumerate(np.asarray(ids).reshape(-1))])
    return (n_in + 8) * U * mag


def gemv_q8_error_bound(w_raw, qtype, x, ids=None, n_out=None, x_per_slot=False):
    """Bound of the int8-activation (dp4a) GEMV against the float64 W x: the integer dots are exact, so
    |y_dp4a - W x| <= sum_i A_i (d_b(i)/2 + 128 * 2^-24 d_b(i)) (q8_1 quantization of x, block b(i)) + the float
    GEMV bound evaluated at |x| + d/2."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
    _, d, _ = quantize_q8_1_ref(x)
    half = np.repeat(d.astype(np.float64), QK8_1, axis=-1) * (0.5 + 128 * U)
    n_in = x.shape[-1]
    if ids is None:
        quant = half @ weight_magnitude_f64(w_raw, qtype, n_in).T
    else:
        A = _per_expert(weight_magnitude_f64, w_raw, qtype, ids, n_out, n_in)
        quant = np.stack([A[int(e)] @ half[j if x_per_slot else 0]
                          for j, e in enumerate(np.asarray(ids).reshape(-1))])
    return quant + gemv_error_bound(w_raw, qtype, np.abs(x) + half, ids=ids, n_out=n_out, x_per_slot=x_per_slot)


# ---------------------------------------------------------------------------------------------- q8_1 activations
def quantize_q8_1_ref(x: np.ndarray):
    """The q8_1 quantizer in f32 arithmetic like the kernel: returns (qs int8, d f32, s f32) per block of 32:
    ``d = amax / 127``, ``q = rint(x / d)``, ``s = d * sum(q)``."""
    q, d = ops.quantize_q8_1_blocks(x)
    s = (d * q.reshape(*q.shape[:-1], -1, QK8_1).astype(np.float32).sum(-1)).astype(np.float32)
    return q, d, s


def dequantize_q8_1(qs, d) -> np.ndarray:
    qs = np.asarray(qs, dtype=np.float64)
    return (qs.reshape(*qs.shape[:-1], -1, QK8_1) * np.asarray(d, np.float64)[..., None]).reshape(qs.shape)


# ---------------------------------------------------------------------------------------------- MoE FFN
def moe_gate_up_ref(w_gate, w_up, qtype, h, ids, n_ff: int, act: str = "silu"):
    """act[j] = a(Wgate[e_j] h) * (Wup[e_j] h), ``a`` SiLU or (``act="gelu_tanh"``) the tanh GELU; dequantizes only
    the selected experts. ``w_up=None``: the fused [E, 2*n_ff, n_in] tensor in ``w_gate`` (gate rows, then up rows)."""
    h = np.asarray(h, dtype=np.float64).reshape(-1)
    n_in = h.shape[0]
    rb = row_bytes(qtype, n_in)
    out = []
    for e in np.asarray(ids).reshape(-1):
        if w_up is None:
            both = dequant_rows_f64(np.asarray(w_gate, np.uint8).reshape(-1, 2 * n_ff * rb)[e], qtype, n_in)
            G, Up = both[:n_ff], both[n_ff:]
        else:
            G = dequant_rows_f64(np.asarray(w_gate, np.uint8).reshape(-1, n_ff * rb)[e], qtype, n_in)
            Up = dequant_rows_f64(np.asarray(w_up, np.uint8).reshape(-1, n_ff * rb)[e], qtype, n_in)
        g, u = G @ h, Up @ h
        with np.errstate(over="ignore"):
            out.append((g / (1.0 + np.exp(-g)) if act == "silu" else ops.gelu_tanh(g)) * u)
    return np.stack(out)


def moe_down_ref(w_down, qtype, act, ids, weights, n_out: int, resid=None):
    act = np.asarray(act, dtype=np.float64)
    n_ff = act.shape[-1]
    rb = row_bytes(qtype, n_ff)
    y = np.zeros(n_out) if resid is None else np.asarray(resid, dtype=np.float64).copy()
    for j, e in enumerate(np.asarray(ids).reshape(-1)):
        D = dequant_rows_f64(np.asarray(w_down, np.uint8).reshape(-1, n_out * rb)[e], qtype, n_ff)
        y += float(weights[j]) * (D @ act[j])
    return y


def moe_ffn_ref(w_gate, w_up, w_down, qtype_gate_up, qtype_down, h, ids, weights, n_ff: int, resid=None):
    act = moe_gate_up_ref(w_gate, w_up, qtype_gate_up, h, ids, n_ff)
    return moe_down_ref(w_down, qtype_down, act, ids, weights, np.shape(h)[-1], resid)


# ---------------------------------------------------------------------------------------------- norms, GLU, embedding
def rmsnorm_ref(x, w=None, eps: float = 1e-6) -> np.ndarray:
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * np.asarray(w, np.float64)


def rmsnorm_residual_ref(x, residual, w=None, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    # The residual sum is rounded to f32 as the kernel (and ggml's f32 add) stores it; the norm is then exact.
    s = (np.asarray(x, np.float32) + np.asarray(residual, np.float32)).astype(np.float64)
    return rmsnorm_ref(s, w, eps), s


def post_attention_norms_ref(o, x, w_post, ws, eps: float = 1e-6):
    """kernels/norm_chain.py PostAttentionNorms in float64: ``x1 = x + rmsnorm(o) * w_post``, then
    ``rmsnorm(x1) * w`` for each ``w`` of ``ws``. Returns (x1, [outs])."""
    x1 = np.asarray(x, np.float64) + rmsnorm_ref(o, w_post, eps)
    return x1, [rmsnorm_ref(x1, w, eps) for w in ws]


def post_ffn_norms_ref(f, y, w1, w2, w, x, scale: float, eps: float = 1e-6) -> np.ndarray:
    """kernels/norm_chain.py PostFfnNorms in float64: ``(x + rmsnorm(s) * w) * scale`` with
    ``s = rmsnorm(f) * w1 + rmsnorm(y) * w2`` (``y`` None: ``s = f``)."""
    s = np.asarray(f, np.float64) if y is None else rmsnorm_ref(f, w1, eps) + rmsnorm_ref(y, w2, eps)
    return (np.asarray(x, np.float64) + rmsnorm_ref(s, w, eps)) * scale


def glu_ref(gate, up, act: str = "silu") -> np.ndarray:
    g = np.asarray(gate, np.float64)
    a = ops.silu(g) if act == "silu" else ops.gelu_tanh(g)
    return a * np.asarray(up, np.float64)


def embedding_ref(weight_rows: np.ndarray, qtype: str, tok: int, scale: float = 1.0) -> np.ndarray:
    """Row ``tok`` dequantized with gguf-py, times ``scale``."""
    return dequantize_ref(np.asarray(weight_rows)[tok], qtype).astype(np.float64).reshape(-1) * scale


def argmax_ref(logits) -> np.ndarray:
    return np.argmax(np.atleast_2d(np.asarray(logits, np.float64)), axis=-1).astype(np.int32)


def route_ref(logits, k: int, norm_topk: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T, k] int32 by stable descending order of the logits, weights [T, k] float64)."""
    lg = np.atleast_2d(np.asarray(logits, np.float64))
    p = np.exp(lg - lg.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    ids = np.argsort(-lg, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=-1)
    if norm_topk:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), ops.ROUTER_WEIGHT_SUM_MIN)
    return ids.astype(np.int32), w


# ---------------------------------------------------------------------------------------------- RoPE
def theta_scale_f32(base: float, n_rot: int) -> np.float32:
    """``powf(base, -2.0f / n_rot)`` in f32, as llama.cpp computes it on the host (the rope kernels take it)."""
    return np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot), dtype=np.float32)


def rope_neox_ref(x, pos, *, n_rot: int | None = None, base: float = 10000.0, freq_factors=None,
                  f32_theta: bool = False) -> np.ndarray:
    """NEOX RoPE of ``x`` (``[n_tokens, n_heads, head_dim]`` or ``[n_heads, head_dim]``).

    ``f32_theta=False``: exact theta = pos * base^(-2i/n_rot) / ff. ``f32_theta=True``: theta rounded the way the
    f32 kernel (and llama.cpp) builds it (f32 theta_scale, powf, product, quotient), so the remaining difference is
    only sin/cos/rotation rounding; used by the tests to get a tight tolerance at large positions."""
    x = np.asarray(x, np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    head_dim = x.shape[-1]
    n_rot = head_dim if n_rot is None else n_rot
    half = n_rot // 2
    pos = np.atleast_1d(np.asarray(pos)).astype(np.int64)[: x.shape[0]]
    i = np.arange(half)
    if f32_theta:
        ts = theta_scale_f32(base, n_rot)
        pw = np.power(ts, i.astype(np.float32), dtype=np.float32)
        theta = (pos.astype(np.float32)[:, None] * pw[None, :]).astype(np.float32)
        if freq_factors is not None:
            theta = (theta / np.asarray(freq_factors, np.float32)[None, :]).astype(np.float32)
        theta = theta.astype(np.float64)
    else:
        theta = pos[:, None].astype(np.float64) * np.power(float(base), -2.0 * i / n_rot)[None, :]
        if freq_factors is not None:
            theta = theta / np.asarray(freq_factors, np.float64)[None, :]
    y = _rope_with_theta(x, theta, n_rot)
    return y[0] if squeeze else y


def rope_theta_f32(pos, n_rot: int, base: float, freq_factors=None) -> np.ndarray:
    """The fused QK-norm/RoPE kernel's f32 theta ``[len(pos), n_rot/2]``, bit for bit (binary exponentiation of the
    f32 theta_scale over ``max(1, bit_length(n_rot/2 - 1))`` bits, f32 product with the position, IEEE f32 division
    by the frequency factors)."""
    half = n_rot // 2
    i = np.arange(half)
    p = np.ones(half, np.float32)
    sq = theta_scale_f32(base, n_rot)
    for bit in range(max(1, (half - 1).bit_length())):
        p = np.where((i >> bit) & 1 == 1, p * sq, p).astype(np.float32)
        sq = np.float32(sq * sq)
    theta = np.atleast_1d(np.asarray(pos)).astype(np.float32)[:, None] * p[None, :]
    if freq_factors is not None:
        theta = theta / np.asarray(freq_factors, np.float32)[None, :]
    return theta.astype(np.float32)


def _rope_with_theta(x: np.ndarray, theta: np.ndarray, n_rot: int) -> np.ndarray:
    """float64 NEOX rotation of ``x [B, heads, D]`` by ``theta [B, n_rot/2]`` (same pairing as ops.rope_neox)."""
    half = n_rot // 2
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    y = x.copy()
    x0, x1 = x[..., :half], x[..., half:n_rot]
    y[..., :half] = x0 * c - x1 * s
    y[..., half:n_rot] = x0 * s + x1 * c
    return y


def qk_norm_rope_kv_ref(q, k, v, q_norm, k_norm, pos, *, n_rot: int, base: float, eps: float,
                        q_scale: float = 1.0, freq_factors=None, v_norm: bool = False, theta: str = "kernel"):
    """Returns ``(q_new, k_cached, v_cached)`` as float64 arrays shaped like the inputs (``[B, heads, D]`` or
    ``[heads, D]``; a q with a longer last axis keeps its extra columns unchanged, as the kernel does with
    ``q_stride``); the cache holds ``k_cached``/``v_cached`` rounded to fp16.

    Built from :mod:`sparkinfer_cute.reference.ops` (``rmsnorm_per_head`` in float64, ``rope_neox``). ``theta``:
    ``"kernel"`` rotates by the kernel's exact f32 theta (:func:`rope_theta_f32`; the tight-tolerance test
    reference), ``"llama_cpu"`` uses ``ops.rope_neox`` (llama.cpp CPU: f32 ``theta *= theta_scale``), ``"exact"``
    uses float64 ``pos * base**(-2i/n_rot) / ff``."""
    squeeze = np.ndim(q) == 2
    q_full = np.asarray(q, np.float64).reshape((-1,) + np.shape(q)[-2:])
    D = np.shape(k)[-1]
    q = q_full[..., :D]
    k = np.asarray(k, np.float64).reshape((-1,) + np.shape(k)[-2:])
    v = np.asarray(v, np.float64).reshape((-1,) + np.shape(v)[-2:])
    pos = np.atleast_1d(np.asarray(pos)).astype(np.int64)[: q.shape[0]]
    if q_norm is not None:
        q = ops.rmsnorm_per_head(q, np.asarray(q_norm, np.float64), eps)
        k = ops.rmsnorm_per_head(k, np.asarray(k_norm, np.float64), eps)
    if v_norm:
        v = ops.rmsnorm_per_head(v, None, eps)
    if theta == "llama_cpu":
        ff = None if freq_factors is None else np.asarray(freq_factors, np.float32)
        q = ops.rope_neox(q, pos, n_rot, base, ff)
        k = ops.rope_neox(k, pos, n_rot, base, ff)
    else:
        if theta == "kernel":
            th = rope_theta_f32(pos, n_rot, base, freq_factors).astype(np.float64)
        elif theta == "exact":
            i = np.arange(n_rot // 2)
            th = pos[:, None].astype(np.float64) * np.power(float(base), -2.0 * i / n_rot)[None, :]
            if freq_factors is not None:
                th = th / np.asarray(freq_factors, np.float64)[None, :]
        else:
            raise ValueError(f"theta must be 'kernel', 'llama_cpu' or 'exact', got {theta!r}")
        q = _rope_with_theta(q, th, n_rot)
        k = _rope_with_theta(k, th, n_rot)
    q = q * float(q_scale)
    if q_full.shape[-1] != D:
        q = np.concatenate([q, q_full[..., D:]], axis=-1)
    if squeeze:
        return q[0], k[0], v[0]
    return q, k, v


# ---------------------------------------------------------------------------------------------- KV cache, attention
def kv_cache_append_ref(k, v, k_pool: np.ndarray, v_pool: np.ndarray, page_table, pos) -> None:
    """The same store as kernels/kv_cache_append.py, in place on host pools."""
    k = np.asarray(k, np.float32).reshape(-1, *k_pool.shape[2:])
    v = np.asarray(v, np.float32).reshape(-1, *v_pool.shape[2:])
    table = np.asarray(page_table).reshape(k.shape[0], -1)
    P = k_pool.shape[1]
    for b, p in enumerate(np.asarray(pos).reshape(-1)):
        k_pool[table[b, p // P], p % P] = k[b].astype(np.float16)
        v_pool[table[b, p // P], p % P] = v[b].astype(np.float16)


def attention_decode_ref(q, k_cache_dense, v_cache_dense, pos, scale: float, window: int = 0,
                         softcap: float = 0.0):
    """``q`` [n_head, D] (or [B, n_head, D]); ``k_cache_dense``/``v_cache_dense`` [n_ctx, n_kv_head, D] (or
    [B, n_ctx, n_kv_head, D]) holding the fp16 values actually stored, token t at row t; ``pos`` int (or [B]): the
    query position, keys 0..pos (with the window rule) are visible."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k_cache_dense, np.float64)
    v = np.asarray(v_cache_dense, np.float64)
    if q.ndim == 3:
        pos = np.broadcast_to(np.asarray(pos), (q.shape[0],))
        return np.stack([attention_decode_ref(q[i], k[i], v[i], int(pos[i]), scale, window, softcap)
                         for i in range(q.shape[0])])
    H, D = q.shape
    pos = int(np.asarray(pos).reshape(-1)[0])
    KV = k.shape[1]
    G = H // KV
    lo = 0 if window == 0 else max(0, pos - window + 1)
    keys = np.arange(lo, pos + 1)
    out = np.empty((H, D), np.float64)
    for h in range(H):
        kv = h // G
        s = scale * (k[keys, kv, :] @ q[h])
        if softcap:
            s = softcap * np.tanh(s / softcap)
        w = np.exp(s - s.max())
        out[h] = (w / w.sum()) @ v[keys, kv, :]
    return out


U16 = 2.0**-11  # f16 unit roundoff (round to nearest)


def _prefill_visible(T: int, p0: int, n_keys: int, window: int) -> np.ndarray:
    """bool [T, n_keys]: key p visible to the query at position p0 + i (models.md: p <= q, window 0 or q - p < w)."""
    qp = p0 + np.arange(T)[:, None]
    p = np.arange(n_keys)[None, :]
    return (p <= qp) & ((window == 0) | (qp - p < window))


def _prefill_blocks(q, k, v, p0, scale, window, softcap, block: int = 256):
    """Yield (i0, i1, kv head, q head, weights [i1-i0, n_keys], |q|.|k| [i1-i0, n_keys] or None) per query block and
    head, float64. Keys past p0 + T - 1 are never visible; NaN in invisible rows is ignored."""
    T, H, _ = q.shape
    n_keys = p0 + T
    G = H // k.shape[1]
    kk = np.nan_to_num(k[:n_keys])
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        vis = _prefill_visible(i1 - i0, p0 + i0, n_keys, window)
        for h in range(H):
            s = scale * (q[i0:i1, h] @ kk[:, h // G].T)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            s = np.where(vis, s, -np.inf)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            yield i0, i1, h // G, h, w, s


def attention_prefill_ref(q, k_cache_dense, v_cache_dense, p0: int, scale: float, window: int = 0,
                          softcap: float = 0.0):
    """Causal attention of a prefill chunk: ``q`` [T, n_head, D] at positions ``p0 .. p0+T-1``;
    ``k_cache_dense``/``v_cache_dense`` [n_ctx >= p0+T, n_kv_head, D] (the fp16 values stored, token t at row t; rows
    past p0+T-1 and invisible rows are ignored, NaN included). Query i is :func:`attention_decode_ref` at
    ``pos = p0 + i``. float64 [T, n_head, D]."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k_cache_dense, np.float64)
    v = np.asarray(v_cache_dense, np.float64)
    out = np.empty(q.shape, np.float64)
    vv = np.nan_to_num(v[:p0 + q.shape[0]])
    for i0, i1, kvh, h, w, _ in _prefill_blocks(q, k, v, p0, scale, window, softcap):
        out[i0:i1, h] = w @ vv[:, kvh]
    return out


def attention_prefill_bound(q, k_cache_dense, v_cache_dense, p0: int, scale: float, window: int = 0,
                            softcap: float = 0.0, block_n: int = 64):
    """(reference, per-element bound) for the flash prefill kernel, whose inputs are ``q`` rounded to f16 (pass that
    q: :func:`f16_rounded`) and the stored fp16 K/V.

    With ``w`` the exact softmax weights, ``A_d = sum_k w_k |v_kd|`` and ``o`` the output:

    * P rounded to f16 before the PV product (the row sum l stays f32): ``|do_d| <= U16 * A_d`` (subnormal P below
      2^-14: absolute 2^-25 per key, l >= 1, so ``n * 2^-25 * max|v|``).
    * logit errors ``|ds_k| <= E``: the softmax weights move by a factor within ``[e^-2E, e^2E]`` and sum to 1, so
      ``|do_d| = |sum_k (w'_k - w_k)(v_kd - o_d)| <= (e^2E - 1)(A_d + |o_d|)``. ``E`` (base e) covers the mma f32
      accumulation over D (<= (D/16 + 4) * 2^-22 * scale * sum_d |q_d k_d|, generous for k16 steps accumulated into
      an f32 C), the f32 scaling / base-2 conversion (8 * 2^-24 * |s|) and the kernel's softcap tanh, computed as
      ``1 - 2 / (2^(2y log2 e) + 1)`` with ex2.approx / rcp.approx (<= 2^-21 absolute on tanh: ``softcap * 2^-20``).
    * the online softmax in f32 (ex2.approx 2^-22 per weight, rescales and sums over the tiles and keys):
      ``(n_tiles + 64) * 2^-22 * A_d``.

    The sum of these, times 2. Returns float64 arrays [T, n_head, D]."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k_cache_dense, np.float64)
    v = np.asarray(v_cache_dense, np.float64)
    T, _, D = q.shape
    n_keys = p0 + T
    ref = np.empty(q.shape, np.float64)
    bound = np.empty(q.shape, np.float64)
    vv = np.nan_to_num(v[:n_keys])
    ka = np.abs(np.nan_to_num(k[:n_keys]))
    gamma = (D / 16 + 4) * 2.0**-22
    n_tiles = n_keys // block_n + 2
    for i0, i1, kvh, h, w, s in _prefill_blocks(q, k, v, p0, scale, window, softcap):
        o = w @ vv[:, kvh]
        a = w @ np.abs(vv[:, kvh])
        qk_abs = scale * (np.abs(q[i0:i1, h]) @ ka[:, kvh].T)
        vis_all = np.isfinite(s)
        e_cap = softcap * 2.0**-20 if softcap else 0.0
        e = np.where(vis_all, gamma * qk_abs + 8 * U * np.abs(np.where(vis_all, s, 0.0)) + e_cap, 0.0).max(axis=1)
        n_vis = vis_all.sum(axis=1)
        vmax = np.abs(vv[:, kvh]).max() if n_keys else 0.0
        b = np.expm1(2 * e)[:, None] * (a + np.abs(o)) + (U16 + (n_tiles + 64) * 2.0**-22) * a
        b += (n_vis * 2.0**-25 * vmax)[:, None]
        ref[i0:i1, h] = o
        bound[i0:i1, h] = 2 * b + 1e-30
    return ref, bound


def f16_rounded(x) -> np.ndarray:
    """``x`` rounded to the nearest f16, as float64 (what the prefill kernel's ``cvt.rn.f16x2.f32`` makes of q)."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


# ---------------------------------------------------------------------------------------------- checks
# The assertions the GPU kernel tests apply (tests/kernels/), as functions: the same check also judges numpy
# emulations of deliberately broken kernels in tests/mutation/, so a bug it lets through there would pass the GPU
# test too. Each raises AssertionError with the worst element and returns the worst ratio error / bound (<= 1).
RMSNORM_TOL = 1e-5  # relative to max|ref| (derivation in tests/kernels/test_rmsnorm.py)
ROUTE_TOL = 2e-5  # router weights, relative to max|ref| (derivation in tests/kernels/test_router.py)
ATTENTION_REL_TOL = 1e-3  # attention output, relative to max|ref| (tests/kernels/test_attention_decode.py)


class CheckFailed(AssertionError):
    """A kernel check failed; ``ratio`` is by how much (error over bound; ``inf`` for NaN / poison left);
    ``ratios``: every part of a two-part check (``tight`` / ``loose``), passed or not."""

    def __init__(self, msg: str, ratio: float, ratios: dict | None = None):
        super().__init__(msg)
        self.ratio = float(ratio)
        self.ratios = dict(ratios or {})


def _two_part(parts: dict) -> dict:
    """Run the named checks (zero-argument callables returning a ratio or raising :class:`CheckFailed`), all of
    them; raise the first failure with every part's ratio attached, else return ``{name: ratio}``."""
    ratios, first = {}, None
    for name, fn in parts.items():
        try:
            ratios[name] = fn()
        except CheckFailed as e:
            ratios[name] = e.ratio
            first = first or e
    if first is not None:
        raise CheckFailed(str(first), first.ratio, ratios)
    return ratios


def _no_nan(y, what):
    nan = np.isnan(y)
    if nan.any():
        raise CheckFailed(f"{what}: {int(nan.sum())} of {y.size} elements NaN (unwritten: poison left, or computed)",
                          np.inf)


def check_within(y, ref, bound, what: str = "output") -> float:
    """Assert that ``y`` holds no NaN (an element left at the 0xFF poison, or a NaN computed) and that
    ``|y - ref| <= bound`` elementwise; return ``max |y - ref| / bound`` (raise :class:`CheckFailed` if > 1)."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.broadcast_to(np.asarray(ref, dtype=np.float64), y.shape)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), y.shape)
    _no_nan(y, what)
    if y.size == 0:
        return 0.0
    err = np.abs(y - ref)
    ratio = err / np.maximum(bound, 1e-300)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    if ratio[worst] > 1.0:
        raise CheckFailed(f"{what}: error {err[worst]:.4g} > bound {bound[worst]:.4g} at {worst} "
                          f"({ratio[worst]:.3g}x the bound)", ratio[worst])
    return float(ratio[worst])


def q8_1_dequantized(x) -> np.ndarray:
    """``d*q`` of the q8_1 quantization of ``x`` (float64, exact): the activation a dp4a / int8-mma kernel
    multiplies exactly (its integer dots are exact)."""
    return ops.quantize_activation_q8_1(np.asarray(x, dtype=np.float32).astype(np.float64))


def _gemv_any_ref(w_raw, qtype, x, ids, n_out, x_per_slot):
    if ids is None:
        return gemv_ref(w_raw, qtype, x)
    return gemv_experts_ref(w_raw, qtype, x, ids, n_out, x_per_slot)


def check_gemv(y, w_raw, qtype, x, ids=None, n_out=None, x_per_slot=False, resid=None) -> float:
    """f32-activation GEMV (dense, or expert-indexed with ``ids``; ``resid``: ``out += W x`` in place) against the
    float64 reference within :func:`gemv_error_bound` (plus one rounding of the residual add), and the spec's 1e-3
    relative error."""
    x2 = np.asarray(x, dtype=np.float32)
    ref = _gemv_any_ref(w_raw, qtype, x2, ids, n_out, x_per_slot)
    bound = gemv_error_bound(w_raw, qtype, x2, ids=ids, n_out=n_out, x_per_slot=x_per_slot)
    if resid is not None:
        ref = ref + np.asarray(resid, np.float64)
        bound = bound + U * np.abs(ref)
    ref, bound = ref.reshape(np.shape(y)), bound.reshape(np.shape(y))
    r = check_within(y, ref, bound, "GEMV vs float64 W x")
    # the spec's 1e-3 relative error (implied by the bound unless every output is ~0 by cancellation, in which case
    # the bound is the meaningful check)
    err = float(np.max(np.abs(np.asarray(y, np.float64) - ref))) if np.size(y) else 0.0
    lim = max(1e-3 * float(np.abs(ref).max(initial=0.0)), float(bound.max(initial=0.0)))
    if err > lim:
        raise CheckFailed(f"GEMV: error {err:.4g} > 1e-3 max|ref| ({lim:.4g})", err / lim)
    return r


def check_gemv_q8(y, w_raw, qtype, x, ids=None, n_out=None, x_per_slot=False, resid=None) -> dict:
    """int8-activation (dp4a) GEMV, two checks:

    * **tight**: against the float64 GEMV of the *same* q8_1-quantized activations ``xhat = d*q`` within the f32
      GEMV bound evaluated at ``xhat``. Derivation: the kernel's integer dots ``sum q_w q_x`` are exact, so its result
      is ``W xhat`` up to the f32 roundings of the per-group scaling (``scale_w * d_x * dot - min_w * s_x``: <= 4
      roundings per group) and of the sum over the ``n_in/g`` groups (g = 4..32 elements), i.e. <= (n_in/g + 5) u
      sum_i A_i |xhat_i| <= (n_in + 8) u sum_i A_i |xhat_i| = :func:`gemv_error_bound` at ``xhat`` (A: the
      per-weight magnitude of :func:`weight_magnitude_f64`). ~2.5e-4 * sum|A xhat| for n_in = 2048: a zeroed
      32-element block or one dropped input in 64 moves most rows by ~sqrt(32) |w x|, far outside.
    * **loose**: against the float64 GEMV of the f32 ``x`` within :func:`gemv_q8_error_bound` (the activation
      quantization error, d/2 per element, plus the f32 bound): only says the quantization itself is right-sized.

    Returns ``{"tight": ratio, "loose": ratio}``."""
    x2 = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
    xhat = q8_1_dequantized(x2)
    shape = np.shape(y)
    add = 0.0 if resid is None else np.asarray(resid, np.float64)
    ref_t = (_gemv_any_ref(w_raw, qtype, xhat, ids, n_out, x_per_slot) + add).reshape(shape)
    b_t = gemv_error_bound(w_raw, qtype, xhat, ids=ids, n_out=n_out, x_per_slot=x_per_slot).reshape(shape)
    ref_l = (_gemv_any_ref(w_raw, qtype, x2, ids, n_out, x_per_slot) + add).reshape(shape)
    b_l = gemv_q8_error_bound(w_raw, qtype, x2, ids=ids, n_out=n_out, x_per_slot=x_per_slot).reshape(shape)
    if resid is not None:
        b_t, b_l = b_t + U * np.abs(ref_t), b_l + U * np.abs(ref_l)
    return _two_part({"tight": lambda: check_within(y, ref_t, b_t, "dp4a GEMV vs float64 W q8_1(x) (tight)"),
                      "loose": lambda: check_within(y, ref_l, b_l, "dp4a GEMV vs float64 W x (q8_1 bound)")})


def moe_gate_up_bound(w_gate, w_up, qtype, h, ids, n_ff: int, act: str = "silu"):
    """(reference, bound) of the f32 gate/up + SwiGLU kernel on activation ``h``: g and u are GEMV rows, each
    within the GEMV bound B, so |silu(g)u - silu(g*)u*| <= |silu'| B_g |u*| + |silu(g*)| B_u + second-order and
    the exp approximation (~2^-22 relative), |silu'| <= 1.1 (the tanh GELU: |gelu'| <= 1.13, its tanh ~2^-21
    relative); the bound is twice the first-order terms (slack for the rest) + 1e-6 relative."""
    h2 = np.asarray(h, np.float64).reshape(1, -1)
    ref = moe_gate_up_ref(w_gate, w_up, qtype, h2[0], ids, n_ff, act)
    gr = gemv_experts_ref(w_gate, qtype, h2, ids, n_ff)
    ur = gemv_experts_ref(w_up, qtype, h2, ids, n_ff)
    bg = gemv_error_bound(w_gate, qtype, h2, ids=ids, n_out=n_ff)
    bu = gemv_error_bound(w_up, qtype, h2, ids=ids, n_out=n_ff)
    slope, a = (1.1, ops.silu) if act == "silu" else (1.13, ops.gelu_tanh)
    bound = 2 * (slope * bg * (np.abs(ur) + bu) + np.abs(a(gr)) * bu) + 1e-6 * np.abs(ref) + 1e-30
    return ref, bound


def moe_down_bound(w_down, qtype, act, ids, weights, n_out: int, resid=None, row_bound=None):
    """(reference, bound) of the f32 down + weighted-sum kernel: a weighted sum of k GEMV rows, bound
    ``sum_j |w_j| B_j + (k + 2) u (sum_j |w_j| |d_j| + |resid|)``. ``row_bound``: the per-row GEMV bound B_j
    (default :func:`gemv_error_bound`; :func:`gemv_q8_error_bound` for the dp4a kernel on q8_1(act))."""
    act = np.asarray(act, np.float64)
    w = np.asarray(weights, np.float64).reshape(-1)
    k = w.shape[0]
    ref = moe_down_ref(w_down, qtype, act, ids, w, n_out, resid)
    per = gemv_experts_ref(w_down, qtype, act, ids, n_out, x_per_slot=True)
    bj = (row_bound or gemv_error_bound)(w_down, qtype, act, ids=ids, n_out=n_out, x_per_slot=True)
    bound = (np.abs(w)[:, None] * bj).sum(0) + (k + 2) * U * (
        (np.abs(w)[:, None] * (np.abs(per) + bj)).sum(0) + (0.0 if resid is None else np.abs(resid)))
    return ref, bound


def check_moe_gate_up(act, w_gate, w_up, qtype, h, ids, n_ff: int, q8: bool = False, glu: str = "silu"):
    """The MoE gate/up + SwiGLU kernel (``act`` [k, n_ff]; pass the separate gate and up tensors even when the
    kernel ran the fused layout). f32 path: :func:`moe_gate_up_bound` at ``h``, returns the ratio. ``q8``: tight =
    the same bound around the reference on ``q8_1(h)`` (the integer dots are exact: see :func:`check_gemv_q8`),
    loose = around the reference on ``h`` with the q8_1 GEMV bounds; returns ``{"tight", "loose"}``. ``glu``: the
    gate activation, "silu" or "gelu_tanh" (f32 path only)."""
    h = np.asarray(h, np.float32).reshape(-1)
    if not q8:
        ref, bound = moe_gate_up_bound(w_gate, w_up, qtype, h, ids, n_ff, glu)
        return check_within(act, ref, bound, "MoE gate/up vs float64")
    assert glu == "silu", "the dp4a bound is written for SiLU"
    ref_t, bound_t = moe_gate_up_bound(w_gate, w_up, qtype, q8_1_dequantized(h[None])[0], ids, n_ff)
    h2 = h[None]
    ref = moe_gate_up_ref(w_gate, w_up, qtype, h, ids, n_ff)
    gr = gemv_experts_ref(w_gate, qtype, h2, ids, n_ff)
    ur = gemv_experts_ref(w_up, qtype, h2, ids, n_ff)
    bg = gemv_q8_error_bound(w_gate, qtype, h2, ids=ids, n_out=n_ff)
    bu = gemv_q8_error_bound(w_up, qtype, h2, ids=ids, n_out=n_ff)
    bound = 2 * (1.1 * bg * (np.abs(ur) + bu) + (np.abs(ops.silu(gr)) + 1.1 * bg) * bu) + 1e-6 * np.abs(ref) + 1e-30
    return _two_part({
        "tight": lambda: check_within(act, ref_t, bound_t, "dp4a MoE gate/up vs float64 on q8_1(h) (tight)"),
        "loose": lambda: check_within(act, ref, bound, "dp4a MoE gate/up vs float64 on h (q8_1 bound)")})


def check_moe_down(y, w_down, qtype, act, ids, weights, n_out: int, resid=None, q8: bool = False):
    """The MoE down + weighted-sum kernel (``y`` [n_out]). f32 path: :func:`moe_down_bound`, returns the ratio.
    ``q8`` (each slot's activation row quantized to q8_1): tight = the same bound around the reference on the
    q8_1-dequantized rows, loose = around the reference on ``act`` with the q8_1 GEMV bounds; returns
    ``{"tight", "loose"}``."""
    act = np.asarray(act, np.float32)
    if not q8:
        ref, bound = moe_down_bound(w_down, qtype, act, ids, weights, n_out, resid)
        return check_within(y, ref, bound, "MoE down vs float64")
    ref_t, bound_t = moe_down_bound(w_down, qtype, q8_1_dequantized(act), ids, weights, n_out, resid)
    ref, bound = moe_down_bound(w_down, qtype, act, ids, weights, n_out, resid, row_bound=gemv_q8_error_bound)
    return _two_part({
        "tight": lambda: check_within(y, ref_t, bound_t, "dp4a MoE down vs float64 on q8_1(act) (tight)"),
        "loose": lambda: check_within(y, ref, bound, "dp4a MoE down vs float64 on act (q8_1 bound)")})


def check_rel(y, ref, tol: float, what: str = "output") -> float:
    """``max|y - ref| / max|ref| <= tol`` with no NaN in ``y``; returns the relative error over ``tol``."""
    y = np.asarray(y, np.float64)
    _no_nan(y, what)
    e = rel_err(y, ref)
    if e > tol:
        raise CheckFailed(f"{what}: relative error {e:.4g} > {tol:g} ({e / tol:.3g}x)", e / tol)
    return e / tol


def check_rmsnorm(y, x, w=None, eps: float = 1e-6, residual=None, s=None) -> float:
    """RMSNorm kernel output ``y`` within :data:`RMSNORM_TOL` of :func:`rmsnorm_ref`; with ``residual`` the norm
    is of ``x + residual`` and the kernel's stored sum ``s`` must equal the f32 sum bit for bit."""
    if residual is None:
        return check_rel(y, rmsnorm_ref(x, w, eps), RMSNORM_TOL, "RMSNorm")
    ref, sref = rmsnorm_residual_ref(x, residual, w, eps)
    if s is not None:
        s = np.asarray(s)
        _no_nan(s.astype(np.float64), "residual sum x + r")
        bad = s.view(np.uint32) != sref.astype(np.float32).view(np.uint32)
        if bad.any():
            raise CheckFailed(f"residual sum x + r: {int(bad.sum())} of {s.size} elements differ from the f32 sum",
                              np.inf)
    return check_rel(y, ref, RMSNORM_TOL, "RMSNorm of x + residual")


def rope_error_bound(x, pos, n_rot: int, base: float, freq_factors=None) -> np.ndarray:
    """Per-element bound of the RoPE kernels against :func:`rope_neox_ref` with ``f32_theta=True``: CUDA's powf is
    documented <= 4 ulp and numpy's (libm) <= 1 ulp, plus the product and the freq-factor quotient roundings, so
    theta may differ by <= 8 ulp(theta) -> |dy| <= (|x0| + |x1|) dtheta; precise sinf/cosf <= 2 ulp (<= 2.4e-7
    absolute) and the two-term rotation in f32 adds ~3 ulp of max|x|. Shape ``[..., n_rot]``."""
    x = np.asarray(x, np.float64)
    half = n_rot // 2
    ts = theta_scale_f32(base, n_rot)
    theta32 = np.asarray(pos).astype(np.float32)[:, None] * np.power(ts, np.arange(half, dtype=np.float32),
                                                                     dtype=np.float32)
    if freq_factors is not None:
        theta32 = theta32 / np.asarray(freq_factors, np.float32)[None, :]
    dtheta = 8 * np.spacing(np.abs(theta32).astype(np.float32)).astype(np.float64)
    amp = np.abs(x[..., :half]) + np.abs(x[..., half:n_rot])
    b = amp * (dtheta[:, None, :] + 5e-7) + 4e-7 * np.abs(x).max()
    return np.concatenate([b, b], axis=-1)


def check_rope(y, x, pos, n_rot: int, base: float, freq_factors=None) -> float:
    """NEOX RoPE kernel output (``[n_tokens, n_heads, head_dim]``): pass-through dims bit-identical, rotated dims
    within :func:`rope_error_bound` of the f32-theta float64 reference."""
    y, x = np.asarray(y), np.asarray(x)
    if not np.array_equal(y[..., n_rot:], x[..., n_rot:]):
        raise CheckFailed("RoPE pass-through dims changed", np.inf)
    ref = rope_neox_ref(x, pos, n_rot=n_rot, base=base, freq_factors=freq_factors, f32_theta=True)
    return check_within(y[..., :n_rot], ref[..., :n_rot], rope_error_bound(x, pos, n_rot, base, freq_factors),
                        "RoPE vs float64 (f32 theta)")


def check_route(ids, weights, logits, k: int, norm_topk: bool = True) -> float:
    """Router kernel (softmax -> top-k -> renormalize): ids equal to :func:`route_ref`'s (stable order on the exact
    f32 logits), weights within :data:`ROUTE_TOL` relative."""
    ids = np.asarray(ids)
    if (ids == -1).any():
        raise CheckFailed("router ids: poison left (-1)", np.inf)
    ref_ids, ref_w = route_ref(logits, k, norm_topk)
    if not np.array_equal(ids.reshape(ref_ids.shape), ref_ids):
        raise CheckFailed(f"router ids {ids.reshape(ref_ids.shape).tolist()} != {ref_ids.tolist()}", np.inf)
    return check_rel(np.asarray(weights).reshape(ref_w.shape), ref_w, ROUTE_TOL, "router weights")


def check_attention_counts(lse_part, out, v_dense, pos: int, window: int, ranges, n_head: int) -> None:
    """The q = 0 attention check: every visible key gets weight 1, so split ``s`` (key range ``ranges[s]``) has
    LSE ``log(#keys)`` (``-inf`` when empty) and the output is the mean of the visible V rows (GQA-repeated to
    ``n_head`` heads). A skipped, doubled or misplaced key changes a count by 1, i.e. the LSE by >= 1/#keys and the
    mean by ~|v|/#keys (>= 1e-3 up to thousands of keys: far above the 1e-5 / 1e-4 tolerances, which cover f32
    sums of ~1000 terms of |v| ~ 1)."""
    lse_part = np.asarray(lse_part, np.float64)  # [n_head, S]
    for s, (b, e) in enumerate(ranges):
        n = max(0, e - b)
        if n == 0:
            if not np.all(lse_part[:, s] == -np.inf):
                raise CheckFailed(f"split {s}: empty, LSE {lse_part[:, s]}", np.inf)
        else:
            err = float(np.max(np.abs(lse_part[:, s] - np.log(n))))
            if not err <= 1e-5:
                raise CheckFailed(f"split {s}: LSE off log({n} keys) by {err:.3g}", err / 1e-5)
    lo = 0 if window == 0 else max(0, pos - window + 1)
    v = np.asarray(v_dense, np.float64)[lo:pos + 1]
    mean_v = np.repeat(v.mean(axis=0), n_head // v.shape[1], axis=0)
    check_rel(out, mean_v, 1e-4, "attention with q = 0 (mean of the visible V rows)")


def check_attention_prefill(out, q, k_dense, v_dense, p0: int, scale: float, window: int = 0,
                            softcap: float = 0.0) -> float:
    """Prefill attention kernel output within :func:`attention_prefill_bound` of the float64 reference computed on
    the kernel's own inputs (q rounded to f16, the stored fp16 K/V); no NaN (poison left or computed)."""
    ref, bound = attention_prefill_bound(f16_rounded(q), k_dense, v_dense, p0, scale, window, softcap)
    return check_within(out, ref, bound, "flash prefill attention vs float64 (f16 q)")


def check_attention_prefill_counts(out, v_dense, p0: int, window: int, n_head: int) -> float:
    """The q = 0 prefill check: every visible key gets the same weight p = exp2(0) (S = 0; ex2.approx of 0 is 1
    to within 2^-22, and f16(p) = 1), so query i's output is the mean of the V rows it sees (GQA-repeated). With
    small-integer V (exact in f16; f32 sums below 2^24 are exact) the only roundings are p in the row sum l (<= 2^-22
    relative) and ``sum * (1/l)`` (2 * 2^-24): bound 2^-20 relative, 2x margin. A skipped, doubled or misplaced key
    changes the mean by ~|v - mean|/count (~1e-4 relative at thousands of keys), far above it."""
    v = np.nan_to_num(np.asarray(v_dense, np.float64))
    T = np.asarray(out).shape[0]
    vis = _prefill_visible(T, p0, p0 + T, window).astype(np.float64)
    mean = (vis @ v[:p0 + T].reshape(p0 + T, -1)) / vis.sum(axis=1, keepdims=True)
    mean = mean.reshape(T, v.shape[1], v.shape[2])
    ref = np.repeat(mean, n_head // v.shape[1], axis=1)
    return check_within(out, ref, 2.0**-20 * np.abs(ref) + 1e-30 + 2.0**-30 * np.abs(v).max(),
                        "flash prefill attention with q = 0 (mean of the visible V rows)")

__all__ = [
    "ATTENTION_REL_TOL", "CheckFailed", "QK8_1", "RMSNORM_TOL", "ROUTE_TOL", "U", "U16", "argmax_ref",
    "attention_prefill_bound", "attention_prefill_ref", "check_attention_counts", "check_attention_prefill",
    "check_attention_prefill_counts", "f16_rounded",
    "check_gemv", "check_gemv_q8", "check_moe_down", "check_moe_gate_up", "check_rel", "check_rmsnorm",
    "check_rope", "check_route", "check_within", "moe_down_bound", "moe_gate_up_bound", "q8_1_dequantized",
    "rope_error_bound", "attention_decode_ref", "block_shape", "dequant_rows_f64", "dequantize_q8_1",
    "dequantize_ref", "embedding_ref", "expert_bytes", "f16_ulp_distance", "gemv_error_bound", "gemv_experts_ref",
    "gemv_q8_error_bound", "gemv_ref", "glu_ref", "kv_cache_append_ref", "moe_down_ref", "moe_ffn_ref",
    "moe_gate_up_ref", "qk_norm_rope_kv_ref", "qtype_name", "quantize_q8_1_ref", "random_quant_bytes", "rel_err",
    "rmsnorm_ref", "rmsnorm_residual_ref", "rope_neox_ref", "rope_theta_f32", "route_ref", "row_bytes",
    "theta_scale_f32", "weight_magnitude_f64",
]


# ---------------------------------------------------------------------------------------------- grouped GEMM (prefill)
def grouped_tiles_host(ids: np.ndarray, n_expert: int, tile_tokens: int):
    """The routing tables of a grouped GEMM, on the host (the reference of the device-side sort in moe_route.py).

    ``ids`` int [T, k] expert of each (token, slot). Sorted rows group the assignments by expert (ascending), tokens
    ascending inside an expert. Returns ``(tiles [n_tiles, 4] int32, sorted_token [T*k] int32, sorted_pos [T*k]
    int32)``: tile = (expert, first sorted row, valid rows, 0); ``sorted_token[r]`` = token of sorted row r;
    ``sorted_pos[t*k + j]`` = sorted row of assignment (t, j)."""
    ids = np.asarray(ids, np.int64)
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")  # by expert, then assignment index (token-major)
    sorted_token = (order // k).astype(np.int32)
    sorted_pos = np.empty(T * k, np.int32)
    sorted_pos[order] = np.arange(T * k, dtype=np.int32)
    counts = np.bincount(flat, minlength=n_expert)
    tiles, start = [], 0
    for e in range(n_expert):
        for r in range(0, int(counts[e]), tile_tokens):
            tiles.append((e, start + r, min(tile_tokens, int(counts[e]) - r), 0))
        start += int(counts[e])
    return np.array(tiles, np.int32).reshape(-1, 4), sorted_token, sorted_pos


def moe_combine_ref(y, sorted_pos, weights, ids, base=None, expert_scale=None):
    """float64 reference of :class:`MoeCombine`."""
    T, k = np.shape(weights)
    w = np.asarray(weights, np.float64)
    if expert_scale is not None:
        w = w * np.asarray(expert_scale, np.float64)[np.asarray(ids)]
    yy = np.asarray(y, np.float64)[np.asarray(sorted_pos).reshape(T, k)]
    out = np.einsum("tk,tkn->tn", w, yy)
    return out if base is None else out + np.asarray(base, np.float64)
