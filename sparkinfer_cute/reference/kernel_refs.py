"""float64 references, error bounds and test inputs of the GPU kernels (``sparkinfer_cute/kernels``).

One function per kernel wrapper, named ``<wrapper>_ref``: numpy in, float64 numpy out, the same arguments as the
wrapper. Quantized weights are dequantized by gguf-py (the independent reference) from the original GGUF bytes, so
a kernel's decode is checked against an implementation it shares no code with. The error bounds state how far an f32
kernel may be from its float64 reference (derivations next to each bound); the kernel tests assert them.

This module sits in the reference layer: numpy, gguf-py and ``reference.ops`` only, never the kernels (which may
import from here: ``theta_scale_f32`` is the host constant both must agree on).
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
    x = np.asarray(x, dtype=np.float32)
    xb = x.reshape(*x.shape[:-1], -1, QK8_1)
    amax = np.abs(xb).max(-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[..., None] > 0, np.rint(xb / d[..., None]), 0).astype(np.int8)
    s = (d * q.astype(np.float32).sum(-1)).astype(np.float32)
    return q.reshape(x.shape), d, s


def dequantize_q8_1(qs, d) -> np.ndarray:
    qs = np.asarray(qs, dtype=np.float64)
    return (qs.reshape(*qs.shape[:-1], -1, QK8_1) * np.asarray(d, np.float64)[..., None]).reshape(qs.shape)


# ---------------------------------------------------------------------------------------------- MoE FFN
def moe_gate_up_ref(w_gate, w_up, qtype, h, ids, n_ff: int):
    """act[j] = silu(Wgate[e_j] h) * (Wup[e_j] h); dequantizes only the selected experts. ``w_up=None``: the fused
    [E, 2*n_ff, n_in] tensor in ``w_gate`` (gate rows, then up rows)."""
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
            out.append(g / (1.0 + np.exp(-g)) * u)
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


__all__ = [
    "QK8_1", "U", "argmax_ref", "attention_decode_ref", "block_shape", "dequant_rows_f64", "dequantize_q8_1",
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
