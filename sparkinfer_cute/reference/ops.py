"""Generic numpy numerics of the forward passes, written to follow llama.cpp's CPU ops (ggml-cpu/ops.cpp).

These are the reference implementations the model forwards (gemma3.py, qwen3_moe.py) are built from, and the
float32/float64 references the GPU kernel tests compare against. Every function takes and returns numpy arrays and
computes in the dtype of its (floating) input unless said otherwise; pass float64 arrays for a float64 reference.

Shapes follow the model code: activations are (n_tokens, …) with the feature dimension last; heads are
``(n_tokens, n_heads, head_dim)``.

Where llama.cpp does something numerically specific, the function does the same and the docstring says where it is
from (file names are relative to llama.cpp's source tree, 0c1e570).

(Over 600 lines: one numpy op per GPU op, decode and prefill, each beside the llama.cpp detail it copies; splitting
them would separate ops the model references compose together.)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ROUTER_WEIGHT_SUM_MIN",
    "attention",
    "causal_window_mask",
    "gelu_tanh",
    "log_softmax",
    "rmsnorm",
    "rmsnorm_per_head",
    "rope_cos_sin",
    "rope_neox",
    "round_fp16",
    "silu",
    "softmax",
    "topk_desc",
]

# build_moe_ffn clamps the sum of the selected routing weights from below before renormalising (llama-graph.cpp:
# ggml_clamp(weights_sum, 6.103515625e-5, INFINITY)); 6.103515625e-5 is 2**-14, the smallest normal fp16.
ROUTER_WEIGHT_SUM_MIN = 6.103515625e-5

# gelu tanh-form constants, ggml-cpu/vec.h (GELU_COEF_A, SQRT_2_OVER_PI).
_GELU_COEF_A = 0.044715
_SQRT_2_OVER_PI = 0.79788456080286535587989211986876


def _float_dtype(x: np.ndarray) -> np.dtype:
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)


def round_fp16(x: np.ndarray) -> np.ndarray:
    """Round to IEEE half and back, keeping the dtype: what storing K/V in llama.cpp's default F16 cache does."""
    return x.astype(np.float16).astype(x.dtype)


def rmsnorm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps) * weight`` over the last axis.

    As ``ggml_compute_forward_rms_norm_f32``: the sum of squares is accumulated in double, ``mean`` and
    ``scale = 1/sqrtf(mean + eps)`` are then rounded to the working precision (float for f32 inputs).
    """
    dt = _float_dtype(x)
    x = np.asarray(x, dtype=dt)
    ss = np.einsum("...i,...i->...", x.astype(np.float64), x.astype(np.float64))
    mean = (ss / x.shape[-1]).astype(dt)
    scale = (dt.type(1.0) / np.sqrt(mean + dt.type(eps))).astype(dt)
    y = x * scale[..., None]
    if weight is not None:
        y = y * np.asarray(weight, dtype=dt)
    return y


def rmsnorm_per_head(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMSNorm of each head vector: ``x`` is (…, n_heads, head_dim), ``weight`` is (head_dim,) shared by all heads."""
    return rmsnorm(x, weight, eps)


def rope_cos_sin(
    positions: np.ndarray,
    n_rot: int,
    base: float,
    freq_factors: np.ndarray | None = None,
    dtype=np.float32,
    freq_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables, shape (len(positions), n_rot // 2), as ``ggml_rope_cache_init`` builds them.

    llama.cpp starts from ``theta = (float) pos`` and multiplies by ``theta_scale = powf(base, -2/n_rot)`` once per
    pair, in float32 (so for large positions theta drifts from ``pos * base**(-2i/n_rot)`` by float32 rounding; we
    reproduce the drift). Each theta is divided by ``freq_factors[i]`` when given (``rope_freqs`` tensor), then
    cos/sin are taken (in float32 for float32 output, float64 otherwise, of the same float32 theta).
    ``freq_scale`` is linear RoPE scaling (``theta_interp = freq_scale * theta``, 1/rope.scaling.factor; Gemma 3
    4B+ global layers). No YaRN (ext_factor = 0, mscale = 1: what all our models use).
    """
    pos = np.asarray(positions, dtype=np.float32).reshape(-1)
    half = n_rot // 2
    theta_scale = np.float32(
        np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot), dtype=np.float32)
    )
    theta = np.empty((pos.shape[0], half), dtype=np.float32)
    t = pos.copy()
    for i in range(half):
        theta[:, i] = t
        t = (t * theta_scale).astype(np.float32)
    if freq_factors is not None:
        theta = (theta / np.asarray(freq_factors, dtype=np.float32)[:half]).astype(np.float32)
    if freq_scale != 1.0:
        theta = (np.float32(freq_scale) * theta).astype(np.float32)
    th = theta.astype(dtype)
    return np.cos(th).astype(dtype), np.sin(th).astype(dtype)


def rope_neox(
    x: np.ndarray,
    positions: np.ndarray,
    n_rot: int,
    base: float,
    freq_factors: np.ndarray | None = None,
    freq_scale: float = 1.0,
) -> np.ndarray:
    """NEOX rotary embedding of ``x`` (n_tokens, n_heads, head_dim) at ``positions`` (n_tokens,).

    For i < n_rot/2: ``(x[i], x[i+n_rot/2]) <- (x[i]cos - x[i+n_rot/2]sin, x[i]sin + x[i+n_rot/2]cos)``
    (``rotate_pairs(n_dims, n_dims/2, …)`` in ops.cpp). Dimensions >= n_rot pass through unchanged.
    """
    dt = _float_dtype(x)
    x = np.asarray(x, dtype=dt)
    half = n_rot // 2
    cos, sin = rope_cos_sin(positions, n_rot, base, freq_factors, dtype=dt, freq_scale=freq_scale)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    x0 = x[..., :half]
    x1 = x[..., half:n_rot]
    out = x.copy()
    out[..., :half] = x0 * cos - x1 * sin
    out[..., half:n_rot] = x0 * sin + x1 * cos
    return out


def causal_window_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None = None) -> np.ndarray:
    """Boolean (n_q, n_k) mask, True where key position p0 is visible to query position p1.

    Causal: ``p0 <= p1``; with a sliding window also ``p1 - p0 < window`` (``llama_hparams::is_masked_swa``,
    STANDARD type: window 512 = the current token and the 511 before it).
    """
    p1 = np.asarray(q_pos)[:, None]
    p0 = np.asarray(k_pos)[None, :]
    vis = p0 <= p1
    if window is not None and window > 0:
        vis &= (p1 - p0) < window
    return vis


def _gqa_operands(q, k, v, dtype):
    """q (n_q, n_head, d), k (n_k, n_head_kv, d), v (n_k, n_head_kv, d_v) as ``dtype`` arrays laid out for batched
    GQA matmuls: q (kv, g, n_q, d), k (kv, d, n_k), v (kv, n_k, d_v); query head h reads KV head h // g."""
    n_q, n_head, d = q.shape
    n_head_kv = k.shape[1]
    if n_head % n_head_kv:
        raise ValueError(f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    qg = np.asarray(q, dtype=dtype).reshape(n_q, n_head_kv, n_head // n_head_kv, d).transpose(1, 2, 0, 3)
    return qg, np.asarray(k, dtype=dtype).transpose(1, 2, 0), np.asarray(v, dtype=dtype).transpose(1, 0, 2)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray | None = None,
    scale: float = 1.0,
    window: int | None = None,
    softcap: float | None = None,
) -> np.ndarray:
    """Masked multi-head attention with GQA: ``softmax(scale·QKᵀ + mask)·V`` per head.

    q: (n_q, n_head, d); k: (n_k, n_head_kv, d); v: (n_k, n_head_kv, d_v). Query head h reads KV head
    ``h // (n_head // n_head_kv)`` (ggml broadcast ``i02 = i12/r2``). ``q_pos`` / ``k_pos`` are the absolute
    positions (k_pos defaults to 0..n_k-1) for the causal / sliding-window mask (see :func:`causal_window_mask`).
    ``softcap`` applies ``softcap·tanh(s/softcap)`` to the scaled scores before masking (Gemma 2/4 style).
    Rows with no visible key (cannot happen for causal attention including the diagonal) would give NaN.
    Returns (n_q, n_head, d_v).
    """
    dt = _float_dtype(q)
    n_q, n_head, _ = q.shape
    qg, kk, vv = _gqa_operands(q, k, v, dt)
    if k_pos is None:
        k_pos = np.arange(k.shape[0])
    vis = causal_window_mask(q_pos, k_pos, window)  # (n_q, n_k)
    s = np.matmul(qg, kk[:, None]) * dt.type(scale)  # (kv, g, n_q, n_k)
    if softcap:
        s = dt.type(softcap) * np.tanh(s / dt.type(softcap))
    s = np.where(vis, s, -np.inf)
    p = softmax(s, axis=-1)
    o = np.matmul(p, vv[:, None])  # (kv, g, n_q, d_v)
    return o.transpose(2, 0, 1, 3).reshape(n_q, n_head, -1).astype(dt, copy=False)


def attention_f16_tiles(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    block_n: int,
    k_pos: np.ndarray | None = None,
    scale: float = 1.0,
    window: int | None = None,
    softcap: float | None = None,
) -> np.ndarray:
    """:func:`attention` with the roundings of a tensor-core flash-attention kernel (the GPU prefill's,
    sparkinfer_cute/kernels/attention_prefill.py): q rounded to f16; keys walked in tiles of ``block_n`` (tile j
    holds keys j*block_n .. j*block_n + block_n - 1) with an online softmax in base 2, each tile's probabilities
    ``p = 2^(s - m)`` relative to the running row max ``m`` rounded to f16 before ``p·V``, the normalizer summed
    from the unrounded ``p``. Computed in float64 (the kernel accumulates in f32; its ``ex2.approx`` is 2^-22), so
    it rounds the same values to f16 as the kernel up to those last f32 bits. Same arguments and result as
    :func:`attention`."""
    dt = _float_dtype(q)
    n_q, n_head, _ = q.shape
    f64 = np.float64
    qg, kk, vv = _gqa_operands(np.asarray(q, np.float32).astype(np.float16), k, v, f64)  # q rounded to f16
    if k_pos is None:
        k_pos = np.arange(k.shape[0])
    vis = causal_window_mask(q_pos, k_pos, window)
    s = np.matmul(qg, kk[:, None]) * float(scale)  # (kv, g, n_q, n_k)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = np.where(vis, s * np.log2(np.e), -np.inf)
    m = np.full(s.shape[:-1], -np.inf)
    l = np.zeros(s.shape[:-1])
    o = np.zeros(s.shape[:-1] + (vv.shape[-1],))
    tile = np.asarray(k_pos) // block_n
    for j in np.unique(tile):
        cols = np.nonzero(tile == j)[0]
        st = s[..., cols]
        m_new = np.maximum(m, st.max(axis=-1))
        m_use = np.where(m_new == -np.inf, 0.0, m_new)
        alpha = np.exp2(m - m_use)
        pt = np.exp2(st - m_use[..., None])
        l = l * alpha + pt.sum(axis=-1)
        # p is an f32 in the kernel, rounded to f16: via f32 here too (a direct float64 -> f16 rounding differs
        # where the f32 value lands on an f16 tie)
        o = o * alpha[..., None] + np.matmul(pt.astype(np.float32).astype(np.float16).astype(f64), vv[:, None, cols])
        m = m_new
    o = o / l[..., None]
    return o.transpose(2, 0, 1, 3).reshape(n_q, n_head, -1).astype(dt, copy=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh form: ``0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`` (``ggml_gelu``; Gemma's hidden_act).

    Computed exactly in the input precision, as the CUDA backend does in f32. (The CPU backend instead rounds x to
    fp16 and reads a table of fp16 results, GGML_GELU_FP16 in vec.h: :func:`gelu_tanh_fp16_table` emulates that.)
    """
    dt = _float_dtype(x)
    x = np.asarray(x, dtype=dt)
    inner = dt.type(_SQRT_2_OVER_PI) * x * (dt.type(1.0) + dt.type(_GELU_COEF_A) * x * x)
    return dt.type(0.5) * x * (dt.type(1.0) + np.tanh(inner))


def silu(x: np.ndarray) -> np.ndarray:
    """``x / (1 + exp(-x))``."""
    dt = _float_dtype(x)
    x = np.asarray(x, dtype=dt)
    with np.errstate(over="ignore"):
        return x / (dt.type(1.0) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (max subtracted; -inf entries give 0)."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x - logsumexp(x)``, computed in float64 whatever the input (it feeds metrics, not the forward)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def topk_desc(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis, largest first: ``ggml_argsort_top_k`` (an argsort in
    descending order, then the first k). ggml uses std::sort, whose tie order is unspecified; we break ties by the
    lower index (a stable sort), which is what any tie-free input (all real router outputs) gives anyway."""
    order = np.argsort(-np.asarray(x), axis=-1, kind="stable")
    return order[..., :k]


# ---------------------------------------------------------------------------------------------------------------
# Emulation of llama.cpp CPU-backend rounding (optional; ``ReferenceModel(..., emulate_cpu=True)``).
# The exact-math functions above are the references; these reproduce the extra roundings llama.cpp's CPU backend
# applies, to tell model bugs apart from backend noise when comparing against llama.cpp CPU outputs.


_GELU_TABLE: np.ndarray | None = None


def _gelu_fp16_table() -> np.ndarray:
    """``ggml_table_gelu_f16`` (ggml-cpu.c, ggml_cpu_init): for every fp16 value, ``ggml_gelu_f32`` of it in float32
    rounded to fp16. ggml_gelu_f32 is ``0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x)))``, which
    GCC's default fp-contraction compiles with ``1 + A·x·x`` as ``fma(A·x, x, 1)``; tanhf is glibc's. This variant
    reproduced all 1,474,560 ffn_geglu outputs of 5 Gemma 3 270M layers (288 tokens) that llama.cpp computed;
    plain float32 math misses 167 of them, numpy's float32 tanh 3782."""
    global _GELU_TABLE
    if _GELU_TABLE is None:
        f32 = np.float32
        xs = np.arange(65536, dtype=np.uint16).view(np.float16).astype(f32)
        xs = np.where(np.isfinite(xs), xs, f32(0.0)).astype(f32)
        with np.errstate(all="ignore"):
            inner = _fma((f32(_GELU_COEF_A) * xs).astype(f32), xs, f32(1.0))
            arg = (f32(_SQRT_2_OVER_PI) * xs * inner).astype(f32)
            th = tanhf_libm(arg)
            y = (f32(0.5) * xs * (f32(1.0) + th).astype(f32)).astype(f32)
        _GELU_TABLE = y.astype(np.float16).astype(f32)
    return _GELU_TABLE


def gelu_tanh_fp16_table(x: np.ndarray) -> np.ndarray:
    """``ggml_vec_gelu_f32`` / the GELU of ``ggml_vec_geglu_f32`` with GGML_GELU_FP16 (ggml-cpu/vec.h): 0 for
    x <= -10, x for x >= 10, else the ``ggml_table_gelu_f16`` entry of fp16(x) (:func:`_gelu_fp16_table`)."""
    x32 = np.asarray(x, dtype=np.float32)
    idx = x32.astype(np.float16).view(np.uint16)
    y = _gelu_fp16_table()[idx]
    y = np.where(x32 <= -10.0, np.float32(0.0), np.where(x32 >= 10.0, x32, y))
    return y.astype(np.asarray(x).dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float32)


def quantize_activation_q8_0(x: np.ndarray) -> np.ndarray:
    """Round activations as ``quantize_row_q8_0`` does before a dot with Q4_0/Q5_0/Q8_0 weights: blocks of 32 along
    the last axis, ``d = amax/127`` stored as fp16, ``q = round(x·127/amax)`` (x86 AVX path: round-half-even),
    returned dequantized (``q·fp16(d)``) in the input dtype."""
    dt = _float_dtype(x)
    x32 = np.asarray(x, dtype=np.float32)
    shp = x32.shape
    b = x32.reshape(*shp[:-1], shp[-1] // 32, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        idv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(b * idv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(shp).astype(dt)


def quantize_q8_0_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same Q8_0 rounding as :func:`quantize_activation_q8_0`, returned as blocks: ``q`` (…, n/32, 32) float32
    integers in [-127, 127] and ``d`` (…, n/32) float32 holding the fp16 block scale."""
    x32 = np.asarray(x, dtype=np.float32)
    b = x32.reshape(*x32.shape[:-1], x32.shape[-1] // 32, 32)
    amax = np.abs(b).max(axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        idv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint((b * idv[..., None]).astype(np.float32)).astype(np.float32)
    return q, d.astype(np.float16).astype(np.float32)


def quantize_q8_1_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The GPU's q8_1 activation quantizer (``sparkinfer_cute/kernels/q8_1.py``; not a llama.cpp CPU rounding):
    blocks of 32 along the last axis, in f32 arithmetic like the kernel, ``d = amax / 127``, ``q = rint(x / d)``
    (round half to even), ``q = 0`` for an all-zero block. Returns ``q`` (same shape as x, int8) and ``d``
    (…, n/32) float32."""
    x32 = np.asarray(x, dtype=np.float32)
    b = x32.reshape(*x32.shape[:-1], -1, 32)
    amax = np.abs(b).max(-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[..., None] > 0, np.rint(b / d[..., None]), 0).astype(np.int8)
    return q.reshape(x32.shape), d


def quantize_activation_q8_1(x: np.ndarray) -> np.ndarray:
    """Activations as the GPU's int8 (dp4a / int8 mma) kernels see them: :func:`quantize_q8_1_blocks`, returned
    dequantized (``d·q``, exact in float64) in the input dtype. The reference forwards use it for the matmuls named
    in ``ReferenceModel.act_q8_1`` (the GPU build's int8-activation matmuls)."""
    dt = _float_dtype(x)
    q, d = quantize_q8_1_blocks(x)
    qb = q.astype(np.float64).reshape(*q.shape[:-1], -1, 32)
    return (qb * d.astype(np.float64)[..., None]).reshape(q.shape).astype(dt)


def rmsnorm_llama_cpu(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """:func:`rmsnorm` as ``ggml_compute_forward_rms_norm_f32`` rounds it: each square ``x·x`` is a float product
    (rounded to f32) before it is added to the double sum; then ``mean`` (f32), ``1/sqrtf(mean + eps)``, ``x·scale``
    and (a separate ggml_mul) ``·weight``, each rounded to f32."""
    x = np.asarray(x, dtype=np.float32)
    ss = np.sum((x * x).astype(np.float32).astype(np.float64), axis=-1)
    mean = (ss / x.shape[-1]).astype(np.float32)
    scale = (np.float32(1.0) / np.sqrt(mean + np.float32(eps))).astype(np.float32)
    y = (x * scale[..., None]).astype(np.float32)
    if weight is not None:
        y = (y * np.asarray(weight, dtype=np.float32)).astype(np.float32)
    return y


def _hsum8_f32(acc: np.ndarray) -> np.ndarray:
    """``hsum(__m256)`` of llamafile/sgemm.cpp and ``hsum_float_8`` of arch/x86/quants.c on 8 float lanes (last
    axis): ``r_i = x_{i+4} + x_i``, then ``(r_0 + r_2) + (r_1 + r_3)``, every add in f32."""
    r = (acc[..., 4:] + acc[..., :4]).astype(np.float32)
    return ((r[..., 0] + r[..., 2]).astype(np.float32) + (r[..., 1] + r[..., 3]).astype(np.float32)).astype(
        np.float32
    )


def q0_weight_tiles(qw: np.ndarray) -> np.ndarray:
    """32-block weight integers (o, nb, 32) in the (nb, 8, 4, o) layout :func:`matmul_q0_llama_cpu` multiplies
    (cache it: the transpose costs more than the product for a decode row)."""
    o, nb = qw.shape[:2]
    return np.ascontiguousarray(qw.reshape(o, nb, 8, 4).transpose(1, 2, 3, 0))


def matmul_q0_llama_cpu(qa: np.ndarray, da: np.ndarray, qw: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """``ggml_mul_mat`` of a 32-block weight (Q4_0/Q5_0/Q8_0) and Q8_0 activations on llama.cpp's x86 CPU path,
    in its float order. Both the llamafile ``tinyBLAS_Q0_AVX`` kernels (batches of >= 2 rows, every tile shape) and
    ``ggml_vec_dot_q{5,8}_0_q8_0`` (one row) keep 8 f32 lanes per output; at block b lane j gets
    ``fma(f32(d_w·d_a), Σ_{k<4} q_w[4j+k]·q_a[4j+k], lane_j)`` (an exact int32 partial sum; dpbusd / maddubs+madd
    both group 4 consecutive bytes), and the lanes are reduced by :func:`_hsum8_f32`.

    qa (t, nb, 32), da (t, nb): activation blocks (:func:`quantize_q8_0_blocks`); qw (o, nb, 32), dw (o, nb): weight
    blocks as integers and f32 scales (qw may also be :func:`q0_weight_tiles` of it). Returns (t, o) float32. (The fma is emulated as a float64 multiply-add
    rounded to f32: a*b is exact in float64, so this differs from a true fma only on double-rounding ties.)
    """
    t, nb = da.shape
    o = dw.shape[0]
    a = np.ascontiguousarray(qa.reshape(t, nb, 8, 4).transpose(1, 2, 0, 3))  # (nb, 8, t, 4)
    w = qw if qw.ndim == 4 else q0_weight_tiles(qw)  # (nb, 8, 4, o)
    acc = np.zeros((t, o, 8), np.float32)
    for b in range(nb):
        isum = np.matmul(a[b], w[b]).transpose(1, 2, 0)  # (t, o, 8): exact integers in f32
        dd = (dw[None, :, b] * da[:, b, None]).astype(np.float32)
        acc = (acc.astype(np.float64) + dd[..., None].astype(np.float64) * isum).astype(np.float32)
    return _hsum8_f32(acc)


def quantize_activation_q8_K(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q8_K_ref`` (activations for K-quant dots): blocks of 256, ``iscale = -127/max`` where max is
    the signed value of largest magnitude, ``q = min(127, nearest_int(iscale·x))``, ``d = 1/iscale`` (float32);
    returned dequantized (``q·d``) in the input dtype."""
    dt = _float_dtype(x)
    x32 = np.asarray(x, dtype=np.float32)
    shp = x32.shape
    b = x32.reshape(*shp[:-1], shp[-1] // 256, 256)
    idx = np.abs(b).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(b, idx, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.rint(iscale * b), 127)
    return (q * d).reshape(shp).astype(dt)


# ggml-cpu/common.h GGML_FA_TILE_Q: ggml_compute_forward_flash_attn_ext_f16 takes its tiled path (f32 Q, f32 GEMMs,
# f32 accumulator) when a batch has at least this many query rows, else the per-row ``one_chunk`` path below.
FA_TILE_Q = 64


def dot_f16_llama_cpu(qh: np.ndarray, kh: np.ndarray) -> np.ndarray:
    """Scores ``ggml_vec_dot_f16(q_h, k)`` for every (query, head, key): qh (n_q, H, d), kh (n_k, H, d) holding
    fp16 values (as float64), d a multiple of 64. AVX512 build without AVX512-FP16: 4 accumulators of 16 f32 lanes,
    element e going to accumulator (e % 64) // 16, lane e % 16, added in order of e // 64 by fma (the products of
    two fp16 are exact in f32, so each fma is one f32 rounding of the sum); then acc0+acc2, acc1+acc3, their sum,
    and ``_mm512_reduce_add_ps``. Returns (n_q, H, n_k) float32."""
    n_q, n_head, d = qh.shape
    n_k = kh.shape[0]
    prod = qh[:, :, None, :] * kh.transpose(1, 0, 2)[None]  # (n_q, H, n_k, d): exact
    prod = prod.reshape(n_q, n_head, n_k, d // 64, 4, 16)
    acc = np.zeros((n_q, n_head, n_k, 4, 16), np.float32)
    for i in range(d // 64):
        acc = (acc.astype(np.float64) + prod[..., i, :, :]).astype(np.float32)
    x0 = (acc[..., 0, :] + acc[..., 2, :]).astype(np.float32)
    x1 = (acc[..., 1, :] + acc[..., 3, :]).astype(np.float32)
    return _reduce_add_16((x0 + x1).astype(np.float32))


def attention_llama_cpu(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray | None = None,
    scale: float = 1.0,
    window: int | None = None,
) -> np.ndarray:
    """:func:`attention` with the numerics of llama.cpp's CPU flash attention over an F16 KV cache
    (``ggml_compute_forward_flash_attn_ext_f16``, ggml-cpu/ops.cpp), the path ``-fa auto`` picks on CPU.

    * ``n_q >= FA_TILE_Q`` (prefill batches): the tiled path converts K/V to f32 and does everything in f32:
      :func:`attention_llama_cpu_tiled` follows its order bit for bit (measured on Gemma 3 270M layers 0 and 5,
      288 rows, from llama.cpp's own Q/K/V: 100 % of outputs identical; :func:`attention`: 17 %, max rel. 7e-7).
    * fewer rows (decode, short prompts): ``one_chunk``: Q rounded to fp16, scores ``ggml_vec_dot_f16``
      (:func:`dot_f16_llama_cpu`), then an
      online softmax over the keys in order whose V accumulator ``VKQ16`` is **fp16**: on a new maximum
      ``VKQ16 = fp16(VKQ16·expf(M_old - M))``, then ``VKQ16 = fp16(fma(v, expf(s - M), VKQ16))``; the f32 sum S
      likewise; the output is ``f32(VKQ16) · (1/S)``. The fp16 accumulator is the largest rounding in llama.cpp's
      decode path (~5e-4 relative per step), so it is reproduced step by step here.
    """
    n_q = q.shape[0]
    if n_q >= FA_TILE_Q:
        return attention_llama_cpu_tiled(q, k, v, q_pos, k_pos, scale=scale, window=window)
    f32, f16 = np.float32, np.float16
    n_head = q.shape[1]
    n_k, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    if k_pos is None:
        k_pos = np.arange(n_k)
    vis = causal_window_mask(q_pos, k_pos, window)  # (n_q, n_k)
    kv_of_head = np.arange(n_head) // group
    qh = np.asarray(q, f32).astype(f16).astype(np.float64)
    kh = np.asarray(k, f32).astype(f16).astype(np.float64)[:, kv_of_head]  # (n_k, H, d)
    vh = np.asarray(v, f32).astype(f16).astype(np.float64)[:, kv_of_head]  # (n_k, H, d_v)
    s = (dot_f16_llama_cpu(qh, kh) * f32(scale)).astype(f32)
    M = np.full((n_q, n_head), -np.inf, f32)
    S = np.zeros((n_q, n_head), f32)
    acc = np.zeros((n_q, n_head, vh.shape[-1]), f16)
    with np.errstate(invalid="ignore", over="ignore"):
        for ic in range(n_k):
            act = vis[:, ic]
            if not act.any():
                continue
            sc = s[:, :, ic]
            new = (sc > M) & act[:, None]
            ms = np.where(new, expf_libm(np.where(new, M - sc, 0).astype(f32)), f32(1.0)).astype(f32)
            vs = np.where(
                new | ~act[:, None], f32(1.0), expf_libm(np.where(new, 0, sc - M).astype(f32))
            ).astype(f32)
            scaled = (acc.astype(f32) * ms[..., None]).astype(f16)
            acc = np.where(new[..., None], scaled, acc)
            upd = (
                (acc.astype(np.float64) + vh[ic][None] * vs[..., None].astype(np.float64))
                .astype(f32)
                .astype(f16)
            )
            acc = np.where(act[:, None, None], upd, acc)
            S = np.where(act[:, None], (S.astype(np.float64) * ms + vs).astype(f32), S)
            M = np.where(new, sc, M)
    s_inv = np.where(S == 0, f32(0.0), f32(1.0) / S).astype(f32)
    return (acc.astype(f32) * s_inv[..., None]).astype(f32).astype(_float_dtype(q), copy=False)


def _libm_f32(name: str):
    """glibc's float ``cosf``/``sinf`` (what ggml_rope_cache_init calls), through ctypes; None where unavailable."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        f = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return np.frompyfunc(lambda v: f(float(v)), 1, 1)


_COSF, _SINF, _EXPF, _TANHF = (_libm_f32(f) for f in ("cosf", "sinf", "expf", "tanhf"))


def tanhf_libm(x: np.ndarray) -> np.ndarray:
    """Scalar ``tanhf`` (glibc through ctypes; numpy's float32 tanh otherwise)."""
    x = np.asarray(x, np.float32)
    if _TANHF is None:
        return np.tanh(x)
    return np.asarray(_TANHF(x), dtype=np.float32).reshape(x.shape)


def expf_libm(x: np.ndarray) -> np.ndarray:
    """Scalar ``expf`` as llama.cpp's C code calls it (glibc through ctypes; numpy's float32 exp otherwise)."""
    x = np.asarray(x, np.float32)
    if _EXPF is None:
        return np.exp(x)
    return np.asarray(_EXPF(x), dtype=np.float32).reshape(x.shape)


def rope_neox_llama_cpu(
    x: np.ndarray,
    positions: np.ndarray,
    n_rot: int,
    base: float,
    freq_factors: np.ndarray | None = None,
    freq_scale: float = 1.0,
) -> np.ndarray:
    """:func:`rope_neox` bit for bit as llama.cpp's CPU ``rotate_pairs`` computes it (float32 in and out): the same
    float32 thetas, cos/sin from libm ``cosf``/``sinf`` (glibc, not correctly rounded: they differ from the
    correctly rounded values in ~1 % of entries), and GCC's default fp-contraction of
    ``x0*cos - x1*sin`` to ``fma(x0, cos, -(x1*sin))`` (and ``fma(x0, sin, x1*cos)``). Measured on Gemma 3 270M
    layer 0 (288 positions x 4 heads): 100 % of Q elements identical to llama.cpp's; plain float32 math: 70 %.
    """
    f32, f64 = np.float32, np.float64
    x = np.asarray(x, dtype=f32)
    half = n_rot // 2
    # thetas exactly as rope_cos_sin builds them (its float32 path), then libm cos/sin of those float32 values
    pos = np.asarray(positions, dtype=f32).reshape(-1)
    theta_scale = f32(np.power(f32(base), f32(-2.0) / f32(n_rot), dtype=f32))
    theta = np.empty((pos.shape[0], half), dtype=f32)
    t = pos.copy()
    for i in range(half):
        theta[:, i] = t
        t = (t * theta_scale).astype(f32)
    if freq_factors is not None:
        theta = (theta / np.asarray(freq_factors, dtype=f32)[:half]).astype(f32)
    if freq_scale != 1.0:
        theta = (f32(freq_scale) * theta).astype(f32)
    if _COSF is not None:
        cos = _COSF(theta).astype(f32)
        sin = _SINF(theta).astype(f32)
    else:  # correctly rounded: differs from glibc in ~1 % of entries
        cos, sin = np.cos(theta.astype(f64)).astype(f32), np.sin(theta.astype(f64)).astype(f32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., :half], x[..., half:n_rot]
    out = x.copy()
    out[..., :half] = _fma(x0, cos, -(x1 * sin).astype(f32))
    out[..., half:n_rot] = _fma(x0, sin, (x1 * cos).astype(f32))
    return out


def _f32(a):
    return np.asarray(a, dtype=np.float64).astype(np.float32)


def _fma(a, b, c):
    """float32 fused multiply-add emulated in float64 (a·b exact there; differs from a true fma only on
    double-rounding ties)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(
        np.float32
    )


def expf_ggml_avx512(x: np.ndarray) -> np.ndarray:
    """``ggml_v_expf(__m512)`` (ggml-cpu/vec.h), the vectorised expf of ``ggml_vec_soft_max_f32`` on AVX512: a
    range reduction ``n = round(x·log2 e)`` and a degree-5 polynomial in fused multiply-adds, scaled by 2**n;
    returns 0 / inf where |n| > 192 (x = -inf gives 0)."""
    f32 = np.float32
    x = np.asarray(x, f32)
    with np.errstate(invalid="ignore", over="ignore"):
        r = f32(float.fromhex("0x1.8p23"))
        z = _fma(x, f32(float.fromhex("0x1.715476p0")), r)
        n = (z - r).astype(f32)
        b = _fma(-n, f32(float.fromhex("0x1.7F7D1Cp-20")), _fma(-n, f32(float.fromhex("0x1.62E4p-1")), x))
        u = (b * b).astype(f32)
        j = _fma(
            _fma(
                _fma(f32(float.fromhex("0x1.0E4020p-7")), b, f32(float.fromhex("0x1.573E2Ep-5"))),
                u,
                _fma(f32(float.fromhex("0x1.555E66p-3")), b, f32(float.fromhex("0x1.FFFDB6p-2"))),
            ),
            u,
            _fma(f32(float.fromhex("0x1.FFFFECp-1")), b, f32(1.0)),
        )
        big = np.abs(n) > 192
        nn = np.where(big, 0, n).astype(np.int32)
        res = np.ldexp(j, nn).astype(f32)
        return np.where(big, np.where(n <= 0, f32(0.0), f32(np.inf)), res).astype(f32)


def _reduce_add_16(v: np.ndarray) -> np.ndarray:
    """``_mm512_reduce_add_ps`` over the last axis (16 lanes), GCC's order: halves, quarters, then pairs."""
    t3 = _f32(v[..., 8:] + v[..., :8])
    t6 = _f32(t3[..., 4:] + t3[..., :4])
    return _f32(_f32(t6[..., 0] + t6[..., 2]) + _f32(t6[..., 1] + t6[..., 3]))


def attention_llama_cpu_tiled(q, k, v, q_pos, k_pos=None, scale: float = 1.0, window: int | None = None):
    """The tiled path of ``ggml_compute_forward_flash_attn_ext_f16`` (batches of >= FA_TILE_Q rows, AVX512 build),
    in its float order: KV tiles of 64 keys; ``KQ = simd_gemm(Q, K)`` (each score a sequential fma over the head
    dim, from 0), ``·scale``, mask; per tile ``M_new = max(M, tile max)``, on a new max ``VKQ·=expf(M-M_new)``,
    ``S·=`` the same; ``S += Σ ggml_v_expf(KQ - M_new)`` (16-lane reduce_add, summed in double per 16 keys); then
    ``VKQ = simd_gemm(P, V)`` continuing the sequential fma over the tile's keys; finally ``VKQ·(1/S)``."""
    f32 = np.float32
    n_q, n_head, d = q.shape
    n_k, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    if k_pos is None:
        k_pos = np.arange(n_k)
    vis = causal_window_mask(q_pos, k_pos, window)  # (n_q, n_k)
    kvh = np.arange(n_head) // group
    qf = np.asarray(q, f32).transpose(1, 0, 2)  # (H, n_q, d)
    kf = np.asarray(k, f32)[:, kvh].transpose(1, 0, 2)  # (H, n_k, d)
    vf = np.asarray(v, f32)[:, kvh].transpose(1, 0, 2)  # (H, n_k, dv)
    T = 64
    n_tiles = -(-n_k // T)
    M = np.full((n_head, n_q), -np.inf, f32)
    S = np.zeros((n_head, n_q), f32)
    acc = np.zeros((n_head, n_q, vf.shape[-1]), f32)
    with np.errstate(invalid="ignore", over="ignore"):
        for ti in range(n_tiles):
            k0, k1 = ti * T, min(n_k, (ti + 1) * T)
            vis_t = vis[:, k0:k1]
            rows = vis_t.any(axis=1)
            if not rows.any():
                continue
            kq = np.zeros((n_head, n_q, k1 - k0), f32)
            for dd in range(d):
                kq = _fma(qf[:, :, dd, None], kf[None, :, k0:k1, dd].reshape(n_head, 1, -1), kq)
            kq = (kq * f32(scale)).astype(f32)
            kq = np.where(vis_t[None], kq, -np.inf).astype(f32)
            if k1 - k0 < T:  # padded keys: -inf
                kq = np.concatenate([kq, np.full((n_head, n_q, T - (k1 - k0)), -np.inf, f32)], axis=-1)
            tmax = kq.max(axis=-1)
            Mnew = np.maximum(M, tmax)
            upd = rows[None] & (Mnew > M)
            ms = np.where(upd, expf_libm(np.where(upd, M - Mnew, 0).astype(f32)), f32(1.0)).astype(f32)
            acc = np.where(upd[..., None], (acc * ms[..., None]).astype(f32), acc)
            S = np.where(upd, (S * ms).astype(f32), S)
            M = np.where(rows[None], Mnew, M)
            p = expf_ggml_avx512((kq - M[..., None]).astype(f32))
            p = np.where(rows[None, :, None], p, f32(0.0))
            tot = np.zeros(S.shape, np.float64)
            for c in range(0, T, 16):
                tot += _reduce_add_16(p[..., c : c + 16]).astype(np.float64)
            S = np.where(rows[None], (S.astype(np.float64) + tot).astype(f32), S)
            for j in range(k1 - k0):
                acc = _fma(p[:, :, j, None], vf[:, None, k0 + j], acc)
    s_inv = np.where(S == 0, f32(0.0), f32(1.0) / S).astype(f32)
    return (acc * s_inv[..., None]).astype(f32).transpose(1, 0, 2)


def quantize_q8_K_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q8_K_ref`` (what x86 ``quantize_row_q8_K`` calls) as blocks: ``q`` (…, n/256, 256) float64
    integers (``min(127, nearest_int(-127/max · x))``, max the signed value of largest magnitude) and ``d``
    (…, n/256) float32 ``= 1/iscale``."""
    x32 = np.asarray(x, dtype=np.float32)
    b = x32.reshape(*x32.shape[:-1], x32.shape[-1] // 256, 256)
    idx = np.abs(b).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(b, idx, axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.rint((iscale[..., None] * b).astype(np.float32)), 127).astype(np.float64)
    return q, d


def q4_K_blocks(raw: np.ndarray, n_out: int, n_in: int):
    """Decode Q4_K rows (raw bytes, (n_out, n_in/256·144)) into ``q`` (n_out, nb, 256) 4-bit values in element
    order, per-element sub-block scale ``sc`` and min ``m`` (n_out, nb, 256) (6-bit integers, as float64), and
    ``d``, ``dmin`` (n_out, nb) float32 (``dequantize_row_q4_K``: ``y = d·sc·q - dmin·m``)."""
    nb = n_in // 256
    r = np.ascontiguousarray(raw).view(np.uint8).reshape(n_out, nb, 144)
    d = r[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = r[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = r[..., 4:16].astype(np.int64)
    qs = r[..., 16:144].astype(np.int64)
    sc = np.empty((n_out, nb, 8), np.int64)
    mn = np.empty((n_out, nb, 8), np.int64)
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            sc[..., j], mn[..., j] = s[..., j] & 63, s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    q = np.empty((n_out, nb, 256), np.float64)
    for j in range(4):
        q[..., 64 * j : 64 * j + 32] = qs[..., 32 * j : 32 * j + 32] & 0xF
        q[..., 64 * j + 32 : 64 * j + 64] = qs[..., 32 * j : 32 * j + 32] >> 4
    return q, np.repeat(sc, 32, -1).astype(np.float64), np.repeat(mn, 32, -1).astype(np.float64), d, dmin


def matmul_q4_K_llama_cpu(qa, da, q, sc, mn, d, dmin, gemv: bool = False) -> np.ndarray:
    """``ggml_gemm_q4_K_8x8_q8_K`` (x86 AVX512/AVX2, the CPU_REPACK kernel llama.cpp uses for Q4_K weights with a
    multiple of 8 rows) in its float order: two f32 accumulators per output; for every 64 elements (two 32-element
    sub-blocks j, j+1) ``acc = fma(f32(sc_j·Σq·q8 + sc_{j+1}·Σq·q8), f32(d_w·d_a), acc)`` and
    ``acc_min = fma(f32(m_j·bsum_j + m_{j+1}·bsum_{j+1}), f32(dmin_w·d_a), acc_min)``; result ``acc - acc_min``.
    qa (t, nb, 256), da (t, nb) from :func:`quantize_q8_K_blocks`; the rest from :func:`q4_K_blocks`.

    ``gemv=True``: ``ggml_gemv_q4_K_8x8_q8_K`` (the rows left over when the batch is not a multiple of 4, and
    decode): the same, but one fma per 256-element block (integer sums over all 8 sub-blocks)."""
    t, nb = da.shape
    o = d.shape[0]
    wsc = q * sc
    acc = np.zeros((t, o), np.float32)
    acc_min = np.zeros((t, o), np.float32)
    for b in range(nb):
        dd = (d[None, :, b] * da[:, b, None]).astype(np.float32)
        dm = (dmin[None, :, b] * da[:, b, None]).astype(np.float32)
        for sb in range(1 if gemv else 4):
            e = slice(0, 256) if gemv else slice(64 * sb, 64 * sb + 64)
            isum = (qa[:, b, e] @ wsc[:, b, e].T).astype(np.float32)
            imin = (qa[:, b, e] @ mn[:, b, e].T).astype(np.float32)
            acc = _fma(isum, dd, acc)
            acc_min = _fma(imin, dm, acc_min)
    return (acc - acc_min).astype(np.float32)


def q6_K_blocks(raw: np.ndarray, n_out: int, n_in: int):
    """Decode Q6_K rows (raw bytes, (n_out, n_in/256·210)) into ``q`` (n_out, nb, 256) unsigned 6-bit values
    0..63 in element order, the per-element scale ``sc`` (n_out, nb, 256) (int8 scales of 16-element groups, as
    float64) and ``d`` (n_out, nb) float32 (``dequantize_row_q6_K``: ``y = d·sc·(q - 32)``)."""
    nb = n_in // 256
    r = np.ascontiguousarray(raw).view(np.uint8).reshape(n_out, nb, 210)
    ql, qh = r[..., :128].astype(np.int64), r[..., 128:192].astype(np.int64)
    sc = r[..., 192:208].copy().view(np.int8).astype(np.float64)
    d = r[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.empty((n_out, nb, 256), np.float64)
    for h in range(2):
        L, H = ql[..., 64 * h : 64 * h + 64], qh[..., 32 * h : 32 * h + 32]
        o = 128 * h
        q[..., o : o + 32] = (L[..., :32] & 0xF) | ((H & 3) << 4)
        q[..., o + 32 : o + 64] = (L[..., 32:] & 0xF) | (((H >> 2) & 3) << 4)
        q[..., o + 64 : o + 96] = (L[..., :32] >> 4) | (((H >> 4) & 3) << 4)
        q[..., o + 96 : o + 128] = (L[..., 32:] >> 4) | (((H >> 6) & 3) << 4)
    return q, np.repeat(sc, 16, axis=-1), d


# ggml_vec_dot_q6_K_q8_K (x86 AVX2 code, also in AVX512 builds) keeps 8 int32 lanes per block: the products
# sc·q6·q8 go to lane (e % 32) // 4 (maddubs + madd over 4 consecutive bytes of each 32-element chunk), the
# offset term 32·sc·bsum to lane e // 32 (madd over pairs of 16-element bsums)
_Q6K_LANE_PRODUCT = [np.array([32 * c + 4 * j + k for c in range(8) for k in range(4)]) for j in range(8)]
_Q6K_LANE_OFFSET = [np.arange(32 * j, 32 * j + 32) for j in range(8)]
_Q6K_MASK_PRODUCT = np.zeros((8, 256))
_Q6K_MASK_OFFSET = np.zeros((8, 256))
for _j in range(8):
    _Q6K_MASK_PRODUCT[_j, _Q6K_LANE_PRODUCT[_j]] = 1.0
    _Q6K_MASK_OFFSET[_j, _Q6K_LANE_OFFSET[_j]] = 1.0


def matmul_q6_K_llama_cpu(qa, da, q, sc, d, vec_dot: bool = False) -> np.ndarray:
    """``ggml_mul_mat`` of Q6_K weights and Q8_K activations on llama.cpp's x86 CPU backend, in its float order.

    * batches of >= 8 rows (default): the ``tiled`` K-quant kernel (ggml-cpu/tiled, AVX512-VNNI microkernel): per
      256-element block the exact integer ``s = Σ sc·(q6 - 32)·q8``, ``r = f32(s)·d_w``, then
      ``buf = fma(r, d_a, buf)``, blocks in order (the kernel's mul + add, contracted by GCC; the unfused
      variant matches only 52 % of llama.cpp's outputs, this one 100 %, Gemma 3 270M layer 0 ffn_down);
    * ``vec_dot=True`` (fewer rows, decode): ``ggml_vec_dot_q6_K_q8_K``: 8 int32 lanes per block (see the lane
      tables above), ``acc = fma(f32(d_a·d_w), f32(lane), acc)``, then :func:`_hsum8_f32`.

    qa (t, nb, 256), da (t, nb) from :func:`quantize_q8_K_blocks`; q, sc, d from :func:`q6_K_blocks`.
    """
    t, nb = da.shape
    o = d.shape[0]
    if not vec_dot:
        w = (q - 32.0) * sc
        buf = np.zeros((t, o), np.float32)
        for b in range(nb):
            s = (qa[:, b] @ w[:, b].T).astype(np.float32)
            r = (s * d[None, :, b]).astype(np.float32)
            buf = _fma(r, da[:, b, None], buf)  # GCC contracts the kernel's mul + add into an fma
        return buf
    # every lane sum is an exact integer in float64 (|sc·q6·q8| < 2^21, 32 terms), so the order of the products
    # is free: per block, lane j of all rows is one BLAS product with the activations masked to lane j's elements
    qa = np.asarray(qa, np.float64)
    wsc = q * sc
    acc = np.zeros((t, o, 8), np.float32)
    for b in range(nb):
        ap = (qa[:, b, None, :] * _Q6K_MASK_PRODUCT).reshape(t * 8, 256)
        ao = (qa[:, b, None, :] * _Q6K_MASK_OFFSET).reshape(t * 8, 256)
        lanes = (ap @ wsc[:, b].T - 32.0 * (ao @ sc[:, b].T)).reshape(t, 8, o).transpose(0, 2, 1)
        dd = (da[:, b, None] * d[None, :, b]).astype(np.float32)
        acc = _fma(dd[..., None], lanes.astype(np.float32), acc)
    return _hsum8_f32(acc)


def matmul_f32_llama_cpu(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``ggml_mul_mat`` of an F32 weight w (n_out, n_in) and F32 activations x (n, n_in) on llama.cpp's x86 AVX512
    CPU backend, in its float order (the MoE router ``ffn_gate_inp``, F32 in GGUF files):

    * n >= 2 rows: llamafile ``tinyBLAS<16, __m512>`` (n_in a multiple of 16): per output 16 lanes, lane j an fma
      chain over the inputs j, j+16, … from 0, then ``_mm512_reduce_add_ps`` (:func:`_reduce_add_16`);
    * n == 1 (llamafile_sgemm declines ``n < 2``): ``ggml_vec_dot_f32`` (GGML_F32_STEP 64): four 16-lane fma
      accumulators over 64-element steps, reduced ``(a0 + a2) + (a1 + a3)`` then ``_mm512_reduce_add_ps``; the
      ``n_in % 64`` leftovers added one by one (``sumf += x·y``, contracted to an fma).
    """
    f32 = np.float32
    x = np.asarray(x, f32)
    w = np.asarray(w, f32)
    n_in = x.shape[-1]
    if x.shape[0] < 2:
        acc = np.zeros((x.shape[0], w.shape[0], 4, 16), f32)
        np64 = n_in - n_in % 64
        for c in range(0, np64, 64):
            xa = x[:, None, c : c + 64].reshape(x.shape[0], 1, 4, 16)
            wa = w[None, :, c : c + 64].reshape(1, w.shape[0], 4, 16)
            acc = _fma(xa, wa, acc)
        a02 = _f32(acc[..., 0, :] + acc[..., 2, :])
        a13 = _f32(acc[..., 1, :] + acc[..., 3, :])
        out = _reduce_add_16(_f32(a02 + a13))
        for i in range(np64, n_in):
            out = _fma(x[:, None, i], w[None, :, i], out)
        return out
    if n_in % 16:
        raise ValueError(f"n_in {n_in} is not a multiple of 16")
    acc = np.zeros((x.shape[0], w.shape[0], 16), f32)
    for c in range(0, n_in, 16):
        acc = _fma(x[:, None, c : c + 16], w[None, :, c : c + 16], acc)
    return _reduce_add_16(acc)


def softmax_llama_cpu(x: np.ndarray) -> np.ndarray:
    """``ggml_soft_max`` (scale 1, no mask) over the last axis as ``ggml_compute_forward_soft_max_f32`` computes
    it on AVX512: ``e = ggml_v_expf(x - max)`` per 16 lanes (:func:`expf_ggml_avx512`; the scalar tail uses
    ``expf``), ``sum`` in double (each 16-lane chunk reduced in f32 first), then ``e·(float)(1.0/sum)`` in f32."""
    f32 = np.float32
    x = np.asarray(x, f32)
    n = x.shape[-1]
    mx = x.max(axis=-1, keepdims=True)
    d = (x - mx).astype(f32)
    n16 = n - n % 16
    e = np.empty_like(d)
    e[..., :n16] = expf_ggml_avx512(d[..., :n16])
    e[..., n16:] = expf_libm(d[..., n16:])
    s = np.zeros(x.shape[:-1], np.float64)
    for c in range(0, n16, 16):
        s += _reduce_add_16(e[..., c : c + 16]).astype(np.float64)
    for c in range(n16, n):
        s += e[..., c].astype(np.float64)
    inv = (1.0 / s).astype(f32)
    return (e * inv[..., None]).astype(f32)


def swiglu_llama_cpu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``ggml_swiglu`` (ggml_vec_swiglu_f32, AVX512): ``(g / (1 + ggml_v_expf(-g)))·u`` in f32 per 16 lanes; the
    scalar tail (length not a multiple of 16) uses ``ggml_silu_f32`` = ``x/(1 + expf(-x))``."""
    f32 = np.float32
    g = np.asarray(g, f32)
    u = np.asarray(u, f32)
    n = g.shape[-1]
    n16 = n - n % 16
    ex = np.empty_like(g)
    with np.errstate(over="ignore"):
        ex[..., :n16] = expf_ggml_avx512((-g[..., :n16]).astype(f32))
        ex[..., n16:] = expf_libm((-g[..., n16:]).astype(f32))
        silu_g = (g / (f32(1.0) + ex).astype(f32)).astype(f32)
    return (silu_g * u).astype(f32)
