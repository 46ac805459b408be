"""Fused decode attention prologue: per-head Q/K RMSNorm + NEOX RoPE + q scale + paged fp16 KV-cache append.

One launch replaces four or five (``rmsnorm_per_head`` on q and on k, ``rope_neox`` on q and k, ``kv_cache_append``)
between the Q/K/V GEMVs and attention. For each sequence ``b`` of the batch (decode: one token each)::

    q_h <- rope(rmsnorm(q_h) * q_norm) * q_scale          written back as f32 (in place, or to ``q_out``)
    k_h <- rope(rmsnorm(k_h) * k_norm)                    stored as f16 at k_pool[page, slot, h, :]
    v_h <- v_h   (or rmsnorm(v_h) without weight: Gemma 4's V-norm, ``has_v_norm``)   stored as f16 in v_pool

with ``page = page_table[b, pos[b] // page_size]``, ``slot = pos[b] % page_size``; ``pos`` is int32 in DEVICE
memory, read by the kernel (a CUDA graph captured once replays for every decode step). The f32 k is not written
back (attention reads the cache), so ``v`` may alias ``k`` (Gemma 4 full layers use the raw K as V). q heads may
be strided (``q_stride``: Qwen3.5's gated Q projection holds (q, gate) per head; the gate is not touched).

Semantics (models.md "Conventions"):
- RMSNorm as ggml: ``scale = 1/sqrt(sum(x²)/D + eps)``, ``y = (x * scale) * w`` (f32 here; ggml sums in double).
  ``has_qk_norm=False`` skips the norm (plain RoPE).
- RoPE NEOX on dims ``[0, n_rot)``: pairs ``(i, i + n_rot/2)``, ``theta_i = pos * theta_scale**i [/ ff[i]]``
  with ``theta_scale = powf(base, -2/n_rot)`` rounded to f32 on the host (as llama.cpp); dims ``>= n_rot`` pass
  through (after the norm).
- ``theta_scale**i`` is computed by **binary exponentiation in f32**: ``p = prod_{bit b of i} s_b`` with
  ``s_0 = theta_scale``, ``s_{b+1} = s_b * s_b``, multiplied in increasing ``b``; then ``theta = f32(pos) * p``
  and ``theta / ff[i]`` (IEEE division). Every step is one correctly rounded f32 multiply/divide, so the result is
  bit-reproducible in numpy (``reference.kernel_refs.rope_theta_f32``) and the test compares against a float64 rotation of exactly
  the kernel's theta. Accuracy vs the exact ``pos * base^(-2i/n_rot)``: squaring doubles the relative error, so
  ``|dp/p| <= (i - 1 + popcount(i)) * 2^-24`` (about what llama.cpp's CPU loop ``theta *= theta_scale`` gives,
  ``<= i * 2^-24``), while ``p`` itself decays as ``theta_scale**i``; the absolute theta error
  ``pos * p * rel`` peaks at small i and stays ``<= ~2 * 2^-24 * pos * max_i(i theta_scale^i)`` (test bound).
  The standalone :mod:`rope` kernel uses ``powf`` (ggml-cuda's choice) instead: the two agree to a few ulp of
  theta, the same order as llama.cpp's CPU/GPU disagreement.
- sin/cos: one precise (non-approx) ``sincos`` (libdevice, shared full range reduction, <= 2 ulp each): the PTX
  has no ``sin.approx``/``cos.approx`` (checked in the dumped PTX; sincos instead of sin + cos cut it 847 -> 618
  lines for the D=512 config).
- f32 -> f16: ``cvt.rn.f16.f32`` (round to nearest even), as numpy ``astype(float16)`` and llama.cpp's F16 cache.

Mapping: grid ``(n_head + n_kv_head, batch)``: block ``h < n_head`` handles q head ``h``; the others handle kv
head ``h - n_head`` (its k, then its v). ``T`` threads (32..128): thread ``t`` owns RoPE pairs ``i = t + j*T``
(elements ``i`` and ``i + n_rot/2``, so the rotation needs no exchange between threads), pass-through elements
``n_rot + t + j*T``, and for v elements ``t + j*T``: every access is a coalesced 4-byte (f32) / 2-byte (f16)
warp-contiguous run. The head's sum of squares is a shuffle butterfly plus a fixed-order sum of per-warp partials
through smem (``block_reduce_sum``; no f32 ``redux`` on SM120). Each pair's sin/cos is computed once per block.
Shared memory: one f32 per warp (<= 16 B).
"""

from __future__ import annotations

from typing import NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import numpy as np
from cutlass import Float16, Float32, Int32, const_expr

from .common import block_reduce_sum, fake_ptr, gptr, pdl_prologue
from ..reference.kernel_refs import theta_scale_f32
from .arch import pdl_enabled
from .compile import compile_options, kernel_cache
from .registry import register

# Pointer alignments the kernel is compiled for (scalar accesses only): f32 4 B, f16 2 B, int32 4 B.
_A32, _A16 = 4, 2
_RN = cute.math.RoundingMode.NEAREST_EVEN


def _pow2_ceil(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _exp_bits(half: int) -> int:
    """Bits of the binary exponentiation of theta_scale (reference.kernel_refs.rope_theta_f32 mirrors it)."""
    return max(1, (half - 1).bit_length())


class QKPrologue(NamedTuple):
    """What the Q/K prologue needs besides q and the cache, for a kernel that runs it inside its own launch
    (attention_decode.py ``prologue=``): this token's f32 ``k``, ``v`` (``v`` may be ``k``: K = V), the norm
    weights (both None: no Q/K norm), RoPE's ``n_rot``, ``base`` and ``freq_factors``, ``eps``, ``q_scale`` and
    ``v_norm``, as :func:`qk_norm_rope_kv` takes them."""
    k: object
    v: object
    q_norm: object
    k_norm: object
    n_rot: int
    base: float
    eps: float
    q_scale: float = 1.0
    freq_factors: object = None
    v_norm: bool = False


class HeadNormRope:
    """The per-head device code of the prologue, shared by :class:`QKNormRopeKV` and the attention kernel that folds
    the prologue in (attention_decode.py ``prologue``). Static config: ``head_dim``, ``n_rot``, ``has_qk_norm``,
    ``has_freq_factors``, ``has_v_norm``, ``cta_threads`` (the CTA's thread count; all of them must call the methods:
    they contain barriers).

    The element-to-thread mapping (thread ``t`` owns pairs ``t + j*T``) and so the order of every sum use
    ``T = threads(head_dim)`` threads whatever the CTA has: threads ``>= T`` load nothing, add 0.0 to the block sums
    and store nothing, and adding 0.0 changes no bit (the block reduction's partials of the extra warps are exact
    zeros). So a CTA of more threads produces exactly the bits :class:`QKNormRopeKV` produces."""

    @staticmethod
    def threads(head_dim: int) -> int:
        return min(128, max(32, _pow2_ceil(head_dim // 2)))

    def __init__(self, head_dim: int, n_rot: int, has_qk_norm: bool = True, has_freq_factors: bool = False,
                 has_v_norm: bool = False, cta_threads: int = 0):
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be even and > 0, got {head_dim}")
        if n_rot % 2 or not 0 < n_rot <= head_dim:
            raise ValueError(f"bad n_rot {n_rot} for head_dim {head_dim}")
        self.head_dim, self.n_rot = head_dim, n_rot
        self.has_qk_norm, self.has_ff, self.has_v_norm = has_qk_norm, has_freq_factors, has_v_norm
        self.half = n_rot // 2
        self.n_tail = head_dim - n_rot
        T = self.threads(head_dim)
        cta_threads = cta_threads or T
        if cta_threads < T or cta_threads % 32:
            raise ValueError(f"the head prologue of head_dim {head_dim} needs a CTA of >= {T} threads (whole warps), "
                             f"got {cta_threads}")
        self.T = T
        self.cta_threads = cta_threads
        self.num_warps = cta_threads // 32         # the block reductions run over the whole CTA
        self.idle = cta_threads > T                # threads >= T take no elements
        self.n_pair = -(-self.half // T)           # RoPE pairs per thread
        self.n_tail_pt = -(-self.n_tail // T)      # pass-through elements per thread
        self.n_v = -(-head_dim // T)               # v elements per thread
        # no bounds checks needed (idle threads: always checked, their index is moved past the head)
        self.full_pair = self.half % T == 0 and not self.idle
        self.full_tail = self.n_tail % T == 0 and not self.idle
        self.full_v = head_dim % T == 0 and not self.idle
        self.exp_bits = _exp_bits(self.half)

    @cute.jit
    def owner_index(self) -> Int32:
        """This thread's index in the element mapping; threads ``>= T`` get one past the head, so every bounds
        check (always on for them) skips them."""
        tid, _, _ = cute.arch.thread_idx()
        if const_expr(self.idle):
            tid = cutlass.select_(tid < self.T, tid, tid + self.head_dim)
        return tid

    @cute.jit
    def rope_tables(self, cs: cute.Tensor, sn: cute.Tensor, posf: Float32, theta_scale: Float32, mFF: cute.Tensor):
        """Fill ``cs``/``sn`` (registers, ``n_pair`` f32 each) with the cos/sin of this thread's pairs at position
        ``posf`` (shared by every head of the CTA)."""
        T = self.T
        tid = self.owner_index()
        for j in cutlass.range_constexpr(self.n_pair):
            i = tid + j * T
            cs[j] = Float32(1.0)
            sn[j] = Float32(0.0)
            if const_expr(self.full_pair) or i < self.half:
                # theta_scale**i by binary exponentiation (see module docstring: bit-reproducible in numpy)
                # mul.rn (explicit rounding): ptxas may not contract these products into an FMA
                p = Float32(1.0)
                sq = theta_scale
                for bit in cutlass.range_constexpr(self.exp_bits):
                    if (i >> bit) & 1 != 0:
                        p = cute.math.mul(p, sq, rounding=_RN)
                    sq = cute.math.mul(sq, sq, rounding=_RN)
                theta = cute.math.mul(posf, p, rounding=_RN)
                if const_expr(self.has_ff):
                    theta = theta / mFF[i]
                sin_t, cos_t = cute.math.sincos(theta)
                cs[j] = cos_t
                sn[j] = sin_t

    @cute.jit
    def norm_rope_head(self, src: cute.Tensor, w: cute.Tensor, dst: cute.Tensor, cs: cute.Tensor, sn: cute.Tensor,
                       red: cute.Tensor, eps: Float32, scale: Float32, apply_scale: cutlass.Constexpr,
                       out_dtype: cutlass.Constexpr):
        """One head: load (registers), optional RMSNorm*w, rotate pairs, optional scale, store as ``out_dtype``."""
        T, half, n_rot = self.T, self.half, self.n_rot
        tid = self.owner_index()
        x0 = cute.make_rmem_tensor(cute.make_layout(self.n_pair), Float32)
        x1 = cute.make_rmem_tensor(cute.make_layout(self.n_pair), Float32)
        xt = cute.make_rmem_tensor(cute.make_layout(max(1, self.n_tail_pt)), Float32)
        ss = Float32(0.0)
        for j in cutlass.range_constexpr(self.n_pair):
            i = tid + j * T
            if const_expr(self.full_pair) or i < half:
                a = src[i]
                c = src[i + half]
                x0[j] = a
                x1[j] = c
                ss += a * a + c * c
        for j in cutlass.range_constexpr(self.n_tail_pt):
            e = n_rot + tid + j * T
            if const_expr(self.full_tail) or e < self.head_dim:
                t = src[e]
                xt[j] = t
                ss += t * t
        rstd = Float32(1.0)
        if const_expr(self.has_qk_norm):
            ss = block_reduce_sum(ss, red, self.num_warps)
            rstd = cute.math.rsqrt(ss / Float32(self.head_dim) + eps)
        for j in cutlass.range_constexpr(self.n_pair):
            i = tid + j * T
            if const_expr(self.full_pair) or i < half:
                a = x0[j]
                c = x1[j]
                if const_expr(self.has_qk_norm):
                    a = (a * rstd) * w[i]  # ggml order: (x * scale) * w
                    c = (c * rstd) * w[i + half]
                ya = a * cs[j] - c * sn[j]
                yc = a * sn[j] + c * cs[j]
                if const_expr(apply_scale):
                    ya = ya * scale
                    yc = yc * scale
                dst[i] = ya.to(out_dtype)
                dst[i + half] = yc.to(out_dtype)
        for j in cutlass.range_constexpr(self.n_tail_pt):
            e = n_rot + tid + j * T
            if const_expr(self.full_tail) or e < self.head_dim:
                t = xt[j]
                if const_expr(self.has_qk_norm):
                    t = (t * rstd) * w[e]
                if const_expr(apply_scale):
                    t = t * scale
                dst[e] = t.to(out_dtype)

    @cute.jit
    def store_v(self, src: cute.Tensor, dst: cute.Tensor, red: cute.Tensor, eps: Float32):
        """v as f16, optionally RMS-normalized without a weight (Gemma 4 V-norm)."""
        T = self.T
        tid = self.owner_index()
        xv = cute.make_rmem_tensor(cute.make_layout(self.n_v), Float32)
        ss = Float32(0.0)
        for j in cutlass.range_constexpr(self.n_v):
            e = tid + j * T
            if const_expr(self.full_v) or e < self.head_dim:
                t = src[e]
                xv[j] = t
                ss += t * t
        rstd = Float32(1.0)
        if const_expr(self.has_v_norm):
            ss = block_reduce_sum(ss, red, self.num_warps)
            rstd = cute.math.rsqrt(ss / Float32(self.head_dim) + eps)
        for j in cutlass.range_constexpr(self.n_v):
            e = tid + j * T
            if const_expr(self.full_v) or e < self.head_dim:
                t = xv[j]
                if const_expr(self.has_v_norm):
                    t = t * rstd
                dst[e] = t.to(Float16)


class QKNormRopeKV:
    """Static config: ``n_head``, ``n_kv_head``, ``head_dim`` (even), ``n_rot`` (even, <= head_dim),
    ``has_qk_norm``, ``has_freq_factors``, ``has_v_norm``, ``page_size`` (power of two), ``q_stride`` (elements
    between consecutive q heads, >= head_dim; default head_dim. Qwen3.5 gated attention: the Q projection is
    ``[n_head, 2*head_dim]`` = (q, gate) per head, so q_stride = 2*head_dim and the gate half is left alone)."""

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, n_rot: int, has_qk_norm: bool = True,
                 has_freq_factors: bool = False, has_v_norm: bool = False, page_size: int = 64,
                 q_stride: int | None = None):
        self.pdl = pdl_enabled()
        if n_head <= 0 or n_kv_head <= 0:
            raise ValueError(f"need n_head, n_kv_head > 0, got {n_head}, {n_kv_head}")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.heads = HeadNormRope(head_dim, n_rot, has_qk_norm, has_freq_factors, has_v_norm)
        self.n_head, self.n_kv_head, self.head_dim, self.n_rot = n_head, n_kv_head, head_dim, n_rot
        self.page_size = page_size
        self.q_stride = head_dim if q_stride is None else q_stride
        if self.q_stride < head_dim:
            raise ValueError(f"q_stride {q_stride} < head_dim {head_dim}")
        self.threads = self.heads.T
        self.num_warps = self.threads // 32

    @cute.jit
    def __call__(self, pQ: cute.Pointer, pK: cute.Pointer, pV: cute.Pointer, pQNorm: cute.Pointer,
                 pKNorm: cute.Pointer, pFF: cute.Pointer, pKPool: cute.Pointer, pVPool: cute.Pointer,
                 pPageTable: cute.Pointer, pPos: cute.Pointer, pQOut: cute.Pointer, batch: Int32, n_pages: Int32,
                 pages_per_seq: Int32, theta_scale: Float32, eps: Float32, q_scale: Float32,
                 stream: cuda.CUstream):
        H, KV, D, P = self.n_head, self.n_kv_head, self.head_dim, self.page_size
        QS = self.q_stride
        q_layout = cute.make_layout((batch, H, D), stride=(H * QS, QS, 1))
        kv_layout = cute.make_layout((batch, KV, D), stride=(KV * D, D, 1))
        pool_layout = cute.make_layout((n_pages, P, KV, D), stride=(P * KV * D, KV * D, D, 1))
        mQ = cute.make_tensor(pQ, q_layout)
        mQO = cute.make_tensor(pQOut, q_layout)
        mK = cute.make_tensor(pK, kv_layout)
        mV = cute.make_tensor(pV, kv_layout)
        mQN = cute.make_tensor(pQNorm, cute.make_layout(D))
        mKN = cute.make_tensor(pKNorm, cute.make_layout(D))
        mFF = cute.make_tensor(pFF, cute.make_layout(self.heads.half))
        mKPool = cute.make_tensor(pKPool, pool_layout)
        mVPool = cute.make_tensor(pVPool, pool_layout)
        mPT = cute.make_tensor(pPageTable, cute.make_layout((batch, pages_per_seq), stride=(pages_per_seq, 1)))
        mPos = cute.make_tensor(pPos, cute.make_layout(batch))
        self.kernel(mQ, mQO, mK, mV, mQN, mKN, mFF, mKPool, mVPool, mPT, mPos, theta_scale, eps, q_scale).launch(
            use_pdl=self.pdl, grid=[H + KV, batch, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mQO: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mQN: cute.Tensor,
               mKN: cute.Tensor, mFF: cute.Tensor, mKPool: cute.Tensor, mVPool: cute.Tensor, mPT: cute.Tensor,
               mPos: cute.Tensor, theta_scale: Float32, eps: Float32, q_scale: Float32):
        pdl_prologue(self.pdl)
        P = self.page_size
        hid, b, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        red = smem.allocate_tensor(Float32, cute.make_layout(self.num_warps), byte_alignment=16)

        pos = mPos[b]
        # cos/sin of this thread's pairs (shared by the q or k head of this block)
        cs = cute.make_rmem_tensor(cute.make_layout(self.heads.n_pair), Float32)
        sn = cute.make_rmem_tensor(cute.make_layout(self.heads.n_pair), Float32)
        self.heads.rope_tables(cs, sn, pos.to(Float32), theta_scale, mFF)
        if hid < self.n_head:
            self.heads.norm_rope_head(mQ[b, hid, None], mQN, mQO[b, hid, None], cs, sn, red, eps, q_scale, True,
                                      Float32)
        else:
            h = hid - self.n_head
            page = mPT[b, pos // P]
            slot = pos % P
            self.heads.norm_rope_head(mK[b, h, None], mKN, mKPool[page, slot, h, None], cs, sn, red, eps, q_scale,
                                      False, Float16)
            self.heads.store_v(mV[b, h, None], mVPool[page, slot, h, None], red, eps)


@kernel_cache
def compile_qk_norm_rope_kv(n_head: int, n_kv_head: int, head_dim: int, n_rot: int, has_qk_norm: bool = True,
                            has_freq_factors: bool = False, has_v_norm: bool = False, page_size: int = 64,
                            q_stride: int | None = None):
    """Runtime args: pointers (q, k, v, q_norm, k_norm, freq_factors f32; k_pool, v_pool f16; page_table, pos
    int32; q_out f32), batch, n_pages, pages_per_seq (Int32), theta_scale, eps, q_scale (Float32), stream."""
    kern = QKNormRopeKV(n_head, n_kv_head, head_dim, n_rot, has_qk_norm, has_freq_factors, has_v_norm, page_size,
                        q_stride)
    f32, f16, i32 = fake_ptr(Float32, _A32), fake_ptr(Float16, _A16), fake_ptr(Int32, _A32)
    return cute.compile(kern, f32, f32, f32, f32, f32, f32, f16, f16, i32, i32, f32, Int32(1), Int32(1), Int32(1),
                        Float32(1.0), Float32(1e-6), Float32(1.0), cute.runtime.make_fake_stream(),
                        options=compile_options())


# ------------------------------------------------------------------------------------------------ wrapper
def device_weights(q_norm, k_norm, freq_factors, D: int, n_rot: int, stream) -> tuple[list, object]:
    """The prologue's weights on the device, checked: ([q_norm, k_norm] or [] without Q/K norm, freq_factors or
    None). Shared by :func:`qk_norm_rope_kv` and the attention kernel that runs the prologue itself."""
    from ..runtime import as_device

    if (q_norm is None) != (k_norm is None):
        raise ValueError("pass both q_norm and k_norm, or neither")
    norms = []
    for w in (q_norm, k_norm):
        if w is not None:
            wd, _ = as_device(w, stream, np.float32)
            if wd.size != D:
                raise ValueError(f"norm weight has {wd.size} elements, head_dim is {D}")
            norms.append(wd)
    fd = None
    if freq_factors is not None:
        fd, _ = as_device(freq_factors, stream, np.float32)
        if fd.size != n_rot // 2:
            raise ValueError(f"freq_factors has {fd.size} entries, expected n_rot/2 = {n_rot // 2}")
    return norms, fd


def qk_norm_rope_kv(q, k, v, q_norm, k_norm, k_pool, v_pool, page_table, pos, *, n_rot: int, base: float,
                    eps: float, q_scale: float = 1.0, freq_factors=None, v_norm: bool = False, q_out=None,
                    stream=None):
    """Fused per-head Q/K RMSNorm + NEOX RoPE + q scale + fp16 paged KV append (see module docstring).

    ``q``: f32 ``[n_head, D]`` or ``[B, n_head, D]`` (or ``[..., n_head, S]`` with ``S > D``: only the first ``D``
    of each head row are q, the rest, e.g. Qwen3.5's gate, is neither read nor written); ``k``, ``v``: f32
    ``[n_kv_head, D]`` / ``[B, n_kv_head, D]`` (``v`` may be ``k``); ``q_norm``, ``k_norm``: f32 ``{D}`` or both
    ``None`` (no Q/K norm); ``k_pool``, ``v_pool``: f16 DeviceArrays ``[n_pages, page_size, n_kv_head, D]``
    (updated in place); ``page_table``: int32 ``[B, pages_per_seq]``; ``pos``: int32 ``[B]`` (a DeviceArray is
    read on the device: graph-safe; numpy/int is uploaded). ``freq_factors``: optional f32 ``{n_rot/2}`` theta
    divisors. ``v_norm``: weightless RMSNorm of v before caching (Gemma 4). ``q_scale`` multiplies q after RoPE
    (Gemma: ``1/sqrt(head_dim)``).

    numpy ``q`` -> returns the new q as numpy; DeviceArray ``q`` -> written in place (or into ``q_out``) and
    returned. Inputs other than the pools may be numpy or DeviceArrays.
    """
    from ..runtime import DeviceArray, as_device, resolve_stream

    if not isinstance(k_pool, DeviceArray) or not isinstance(v_pool, DeviceArray):
        raise TypeError("k_pool and v_pool must be DeviceArrays (the cache is updated in place)")
    if k_pool.dtype != np.float16 or v_pool.dtype != np.float16 or tuple(k_pool.shape) != tuple(v_pool.shape):
        raise TypeError("k_pool and v_pool must be f16 DeviceArrays of the same shape")
    s = resolve_stream(stream)
    n_pages, P, KV, D = (int(d) for d in k_pool.shape)
    q_shape = tuple(q.shape)
    if len(q_shape) not in (2, 3) or q_shape[-1] < D:
        raise ValueError(f"q {q_shape} must be [n_head, >={D}] or [B, n_head, >={D}]")
    q_stride = q_shape[-1]
    H = q_shape[-2]
    B = 1 if len(q_shape) == 2 else q_shape[0]
    if tuple(k.shape)[-2:] != (KV, D) or int(np.prod(k.shape)) != B * KV * D or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must be [{B}, {KV}, {D}]")
    pt_shape = tuple(page_table.shape)
    pages_per_seq = pt_shape[-1]
    if int(np.prod(pt_shape)) != B * pages_per_seq:
        raise ValueError(f"page_table {pt_shape} must be [{B}, pages_per_seq]")

    qd, q_np = as_device(q, s, np.float32)
    kd, _ = as_device(k, s, np.float32)
    vd = kd if v is k else as_device(v, s, np.float32)[0]
    norms, fd = device_weights(q_norm, k_norm, freq_factors, D, n_rot, s)
    dpt, _ = as_device(page_table, s, np.int32)
    if not isinstance(pos, DeviceArray):
        pos = np.atleast_1d(np.asarray(pos, np.int32))
    dpos, _ = as_device(pos, s, np.int32)
    if dpos.size < B:
        raise ValueError(f"{dpos.size} positions for batch {B}")
    qo = qd if q_out is None else q_out
    if qo is not qd and (not isinstance(qo, DeviceArray) or qo.dtype != np.float32 or qo.size != qd.size):
        raise TypeError("q_out must be an f32 DeviceArray shaped like q")

    fn = compile_qk_norm_rope_kv(H, KV, D, n_rot, bool(norms), fd is not None, bool(v_norm), P,
                                 None if q_stride == D else q_stride)
    qn_ptr = norms[0].ptr if norms else qd.ptr  # unused pointers get any valid address
    kn_ptr = norms[1].ptr if norms else qd.ptr
    fn(gptr(Float32, qd.ptr, _A32), gptr(Float32, kd.ptr, _A32), gptr(Float32, vd.ptr, _A32),
       gptr(Float32, qn_ptr, _A32), gptr(Float32, kn_ptr, _A32), gptr(Float32, (qd if fd is None else fd).ptr, _A32),
       gptr(Float16, k_pool.ptr, _A16), gptr(Float16, v_pool.ptr, _A16), gptr(Int32, dpt.ptr, _A32),
       gptr(Int32, dpos.ptr, _A32), gptr(Float32, qo.ptr, _A32), Int32(B), Int32(n_pages), Int32(pages_per_seq),
       Float32(float(theta_scale_f32(base, n_rot))), Float32(eps), Float32(q_scale), s.cu)
    return qo.to_numpy(s) if q_np else qo


# ------------------------------------------------------------------------------------------------ registration
def _launch_example(n_head: int, n_kv_head: int, head_dim: int, n_rot: int, has_qk_norm: bool = True,
                    has_freq_factors: bool = False, has_v_norm: bool = False, page_size: int = 64,
                    q_stride: int | None = None):
    from ..runtime import DeviceArray, default_stream

    q = DeviceArray.zeros((1, n_head, q_stride or head_dim), np.float32)
    kv = DeviceArray.zeros((1, n_kv_head, head_dim), np.float32)
    w = DeviceArray.zeros((head_dim,), np.float32)
    pool = DeviceArray.zeros((1, page_size, n_kv_head, head_dim), np.float16)
    i32 = DeviceArray.zeros((1,), np.int32)
    s = default_stream()
    fn = compile_qk_norm_rope_kv(n_head, n_kv_head, head_dim, n_rot, has_qk_norm, has_freq_factors, has_v_norm,
                                 page_size, q_stride)
    ts = Float32(float(theta_scale_f32(1e6, n_rot)))

    def launch():
        fn(gptr(Float32, q.ptr, _A32), gptr(Float32, kv.ptr, _A32), gptr(Float32, kv.ptr, _A32),
           gptr(Float32, w.ptr, _A32), gptr(Float32, w.ptr, _A32), gptr(Float32, w.ptr, _A32),
           gptr(Float16, pool.ptr, _A16), gptr(Float16, pool.ptr, _A16), gptr(Int32, i32.ptr, _A32),
           gptr(Int32, i32.ptr, _A32), gptr(Float32, q.ptr, _A32), Int32(1), Int32(1), Int32(1), ts,
           Float32(1e-6), Float32(1.0), s.cu)

    return launch


# (n_head, n_kv_head, head_dim, n_rot, flags) per model attention layer type; page_size 64 as PagedKVCache.
MODEL_CONFIGS = {
    "qwen3moe-30b-a3b": dict(n_head=32, n_kv_head=4, head_dim=128, n_rot=128),
    "gemma3-270m": dict(n_head=4, n_kv_head=1, head_dim=256, n_rot=256),  # also the gemma3 'tiny' preset
    "gemma4-26b-a4b-swa": dict(n_head=16, n_kv_head=8, head_dim=256, n_rot=256, has_v_norm=True),
    "gemma4-26b-a4b-full": dict(n_head=16, n_kv_head=2, head_dim=512, n_rot=512, has_freq_factors=True,
                                has_v_norm=True),
    "qwen3moe-tiny": dict(n_head=8, n_kv_head=2, head_dim=64, n_rot=64),
    "qwen3moe-small": dict(n_head=16, n_kv_head=2, head_dim=128, n_rot=128),
    # Qwen3.5-MoE full-attention layers: (q, gate) interleaved per head, partial rotary 64 of 256 (IMROPE == NEOX
    # for text, models.md section 2)
    "qwen35moe-full": dict(n_head=16, n_kv_head=2, head_dim=256, n_rot=64, q_stride=512),
    "partial-rope-no-norm": dict(n_head=8, n_kv_head=2, head_dim=256, n_rot=64, has_qk_norm=False),
}

register("qk_norm_rope_kv", compile_qk_norm_rope_kv, list(MODEL_CONFIGS.values()), launch_example=_launch_example)
