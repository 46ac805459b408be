"""Dot products of decoded weight steps with the activations, shared by the GEMV and MoE kernels.

Three kinds of step, all plain Python helpers unrolled while a kernel is traced (quant_decode.py decodes the bytes):

* **f32 activations, slice/unit steps** (:func:`step_dot`): the step's weights decoded to f32 (``Tiling.decode``),
  the matching activations loaded with 128-bit loads (:func:`load_x_runs`), a dot in up to 4 interleaved chains.
* **int8 activations (q8_1.py), slice/unit steps** (:func:`decode_int_slice` / :func:`decode_int_unit`, then
  :func:`group_dot`): the weight quants are repacked in registers into bytes (4 per 32-bit word) and dotted with the
  int8 activations 4 at a time with ``dp4a`` (inline PTX; the DSL has no int8 dot atom, cute-dsl.md §3). Integer
  dots are exact; each group of 8-32 elements is then scaled in f32::

      group = scale_w * d_x * (dot(q_w, q_x) - off * sum(q_x)) - min_w * s_x

  with ``off`` the type's zero point (Q4_0: 8, Q5_0: 16, Q6_K: 32; sum(q_x) from a dp4a against 0x01010101) and the
  K-quant min term (Q4_K/Q5_K: ``dmin*m``) times the sum of the group's activations: the block sum ``s = d*sum(q)``
  stored by the quantizer when a group covers a whole 32-block (unit mapping), else ``d_x * sum(q_x)`` of the group
  (slice mapping: 4 elements per group). So the result is the exact GEMV against the dequantized int8 activations,
  up to f32 rounding (bound: ``reference.kernel_refs.gemv_q8_error_bound``).
* **chunks** (Q4_K / Q6_K / Q6_K_P, below): a lane owns 32 weights of a block per step; f32 or int8 activations.
"""

from __future__ import annotations

from cutlass import Float32, Int32, Uint16, Uint32, cute
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from .quant_decode import (
    QK8_1,
    Tiling,
    _kquant_scale_min,
    half_hi_to_f32,
    half_lo_to_f32,
    load_words,
    q6k_load,
    q6k_scale_bytes,
)


# ---------------------------------------------------------------------------------------------------------------
# f32 activations


def load_x_runs(t: Tiling, gptr, gbase):
    """Activations at a step's element positions (``gbase`` = row offset + step base), in the step's value order."""
    xr = cute.make_rmem_tensor((t.elems,), Float32)
    for start, off, n in t.runs:
        src = cute.make_tensor(gptr + cute.assume(gbase + off, divby=t.divby), cute.make_layout(n))
        tmp = cute.make_rmem_tensor((n,), Float32)
        cute.autovec_copy(src, tmp)
        for i in range(n):
            xr[start + i] = tmp[i]
    return xr


def dot_values(w, xr, n: int):
    """sum_i w[i] * xr[i] in up to 4 interleaved chains."""
    c = min(4, n)
    part = [w[i] * xr[i] for i in range(c)]
    for i in range(c, n):
        part[i % c] = part[i % c] + w[i] * xr[i]
    while len(part) > 1:
        part = [part[i] + part[i + 1] for i in range(0, len(part) - 1, 2)] + ([part[-1]] if len(part) % 2 else [])
    return part[0]


def step_dot(t: Tiling, w, pX, xoff):
    """sum over one decoded step: w[i] * x[xoff + step positions]."""
    return dot_values(w, load_x_runs(t, pX, xoff), t.elems)


# ---------------------------------------------------------------------------------------------------------------
# int8 activations (dp4a)


@dsl_user_op
def dp4a(a, b, c, signed_a: bool = False, *, loc=None, ip=None) -> Int32:
    """c + sum_k a.byte[k] * b.byte[k], b signed int8 bytes; a unsigned (or signed with ``signed_a``)."""
    at = "s32" if signed_a else "u32"
    return Int32(llvm.inline_asm(
        Int32.mlir_type, [Int32(a).ir_value(loc=loc, ip=ip), Int32(b).ir_value(loc=loc, ip=ip),
                          Int32(c).ir_value(loc=loc, ip=ip)],
        f"dp4a.{at}.s32 $0, $1, $2, $3;", "=r,r,r,r", loc=loc, ip=ip))


def _u16_pairs(h, n_words):
    return [Uint32(h[2 * i]) | (Uint32(h[2 * i + 1]) << 16) for i in range(n_words)]


def _spread4(b):
    """4 bits (Uint32 0..15) -> bit 4 of each byte: bit k -> bit 8k+4."""
    return ((b & 1) << 4) | ((b & 2) << 11) | ((b & 4) << 18) | ((b & 8) << 25)


M4 = 0x0F0F0F0F


class Group:
    """A run of 4*len(words) weight quants (packed bytes) at step-relative element offset ``xoff``.

    value = scale * d_x * (dot(q, q_x) - off * sum(q_x)) - minc * S, where S = the stored block sum ``s`` when the
    group covers a whole 32-block (``minc_block_sum``), else d_x * sum(q_x) over the group (dp4a against ones)."""

    def __init__(self, words, xoff, scale, off=0, signed=False, minc=None, minc_block_sum=True):
        self.words, self.xoff, self.scale, self.off, self.signed, self.minc = words, xoff, scale, off, signed, minc
        self.minc_block_sum = minc_block_sum


def _q6k_groups(L0, L1, H, S, d, th, nw):
    """The 4 output groups k of a Q6_K step (positions 32k + ...): 6-bit quants packed into bytes, zero point 32."""
    groups = []
    for k, sc in enumerate(q6k_scale_bytes(S, th)):
        Lk = L0 if k % 2 == 0 else L1
        shl = 0 if k < 2 else 4
        words = [((Lk[m] >> shl) & M4) | (((H[m] >> (2 * k)) & 0x03030303) << 4) for m in range(nw)]
        groups.append(Group(words, 32 * k, d * Float32(sc), 32))
    return groups


def decode_int_slice(qtype: str, pW, blk, s):
    """Integer decode of slice ``s`` of block ``blk`` (quant_decode.py slice table): a list of :class:`Group`."""
    w16 = cute.recast_ptr(pW, dtype=Uint16)
    if qtype in ("Q4_0", "Q5_0"):
        if qtype == "Q4_0":
            base = blk * 9
            d = half_lo_to_f32(Uint32(w16[base]))
            qw = _u16_pairs(load_words(w16, base + 1 + s * 2, 2, 1, Uint16), 1)[0]
            return [Group([qw & M4], 0, d, 8), Group([(qw >> 4) & M4], 16, d, 8)]
        base = blk * 11
        hdr = load_words(w16, base, 3, 1, Uint16)
        d = half_lo_to_f32(Uint32(hdr[0]))
        qh = Uint32(hdr[1]) | (Uint32(hdr[2]) << 16)
        qw = _u16_pairs(load_words(w16, base + 3 + s * 2, 2, 1, Uint16), 1)[0]
        sh = Uint32(s) * 4
        lo = (qw & M4) | _spread4((qh >> sh) & 0xF)
        hi = ((qw >> 4) & M4) | _spread4((qh >> (sh + 16)) & 0xF)
        return [Group([lo], 0, d, 16), Group([hi], 16, d, 16)]
    if qtype == "Q8_0":
        base = blk * 17
        d = half_lo_to_f32(Uint32(w16[base]))
        qw = _u16_pairs(load_words(w16, base + 1 + s * 4, 4, 1, Uint16), 2)
        return [Group(qw, 0, d, 0, signed=True)]
    if qtype in ("Q4_K", "Q5_K"):
        has_qh = qtype == "Q5_K"
        w32 = cute.recast_ptr(pW, dtype=Uint32)
        base = blk * (44 if has_qh else 36)
        c, i = s >> 3, s & 7
        hdr = load_words(w32, base, 4, 4)
        d, dmin = half_lo_to_f32(hdr[0]), half_hi_to_f32(hdr[0])
        (sc1, m1), (sc2, m2) = _kquant_scale_min(hdr, c)
        w32t = cute.make_tensor(w32, cute.make_layout(base + 44))
        qs = Uint32(w32t[base + (12 if has_qh else 4) + s])
        lo, hi = qs & M4, (qs >> 4) & M4
        if has_qh:
            qh = Uint32(w32t[base + 4 + i])
            sh = Uint32(c) * 2
            lo = lo | (((qh >> sh) & 0x01010101) << 4)
            hi = hi | (((qh >> (sh + 1)) & 0x01010101) << 4)
        return [Group([lo], 0, d * sc1, minc=dmin * m1, minc_block_sum=False),
                Group([hi], 32, d * sc2, minc=dmin * m2, minc_block_sum=False)]
    if qtype in ("Q6_K", "Q6_K_P"):
        n, i = s >> 3, s & 7
        L0, L1, H, S, d = q6k_load(pW, blk, n, i, 1, qtype == "Q6_K_P")
        return _q6k_groups(L0, L1, H, S, d, Uint32(i >> 2) * 8, 1)
    raise ValueError(f"int8 decode: unsupported type {qtype}")


def decode_int_unit(qtype: str, pW, blk, u):
    """Integer decode of unit ``u`` of block ``blk``: a list of :class:`Group`."""
    if qtype in ("Q4_0", "Q5_0", "Q8_0"):
        w16 = cute.recast_ptr(pW, dtype=Uint16)
        if qtype == "Q4_0":
            base = blk * 9
            d = half_lo_to_f32(Uint32(w16[base]))
            qw = _u16_pairs(load_words(w16, base + 1, 8, 1, Uint16), 4)
            return [Group([w & M4 for w in qw], 0, d, 8), Group([(w >> 4) & M4 for w in qw], 16, d, 8)]
        if qtype == "Q5_0":
            base = blk * 11
            hdr = load_words(w16, base, 3, 1, Uint16)
            d = half_lo_to_f32(Uint32(hdr[0]))
            qh = Uint32(hdr[1]) | (Uint32(hdr[2]) << 16)
            qw = _u16_pairs(load_words(w16, base + 3, 8, 1, Uint16), 4)
            lo = [(w & M4) | _spread4((qh >> (4 * i)) & 0xF) for i, w in enumerate(qw)]
            hi = [((w >> 4) & M4) | _spread4((qh >> (16 + 4 * i)) & 0xF) for i, w in enumerate(qw)]
            return [Group(lo, 0, d, 16), Group(hi, 16, d, 16)]
        base = blk * 17  # Q8_0
        d = half_lo_to_f32(Uint32(w16[base]))
        qw = _u16_pairs(load_words(w16, base + 1, 16, 1, Uint16), 8)
        return [Group(qw, 0, d, 0, signed=True)]
    if qtype in ("Q4_K", "Q5_K"):
        has_qh = qtype == "Q5_K"
        w32 = cute.recast_ptr(pW, dtype=Uint32)
        base = blk * (44 if has_qh else 36)
        hdr = load_words(w32, base, 4, 4)
        d, dmin = half_lo_to_f32(hdr[0]), half_hi_to_f32(hdr[0])
        (sc1, m1), (sc2, m2) = _kquant_scale_min(hdr, u)
        qs = load_words(w32, base + (12 if has_qh else 4) + u * 8, 8, 4)
        lo = [Uint32(qs[i]) & M4 for i in range(8)]
        hi = [(Uint32(qs[i]) >> 4) & M4 for i in range(8)]
        if has_qh:
            qh = load_words(w32, base + 4, 8, 4)
            sh = Uint32(u) * 2
            lo = [lo[i] | (((Uint32(qh[i]) >> sh) & 0x01010101) << 4) for i in range(8)]
            hi = [hi[i] | (((Uint32(qh[i]) >> (sh + 1)) & 0x01010101) << 4) for i in range(8)]
        return [Group(lo, 0, d * sc1, minc=dmin * m1), Group(hi, 32, d * sc2, minc=dmin * m2)]
    if qtype in ("Q6_K", "Q6_K_P"):
        n, t = u >> 2, u & 3
        L0, L1, H, S, d = q6k_load(pW, blk, n, t * 2, 2, qtype == "Q6_K_P")
        return _q6k_groups(L0, L1, H, S, d, Uint32(t >> 1) * 8, 2)
    raise ValueError(f"int8 decode: unsupported type {qtype}")


def group_dot(g: Group, pXq, pXd, pXs, row_elem0, xb, n_blocks_row):
    """The f32 value of one group against activation row starting at element ``row_elem0`` (unit base ``xb``)."""
    nw = len(g.words)
    e0 = row_elem0 + xb + g.xoff  # first element; divisible by 4*nw (groups are aligned to their length)
    xq32 = cute.recast_ptr(pXq, dtype=Int32)
    xw = load_words(xq32, e0 // 4, nw, nw, Int32)
    acc = Int32(0)
    for i in range(nw):
        acc = dp4a(g.words[i], xw[i], acc, signed_a=g.signed)
    if g.off:
        sx = Int32(0)
        for i in range(nw):
            sx = dp4a(0x01010101, xw[i], sx)
        acc = acc - sx * g.off
    xblk = e0 // QK8_1
    xd = cute.make_tensor(pXd, cute.make_layout(xblk + 1))
    val = g.scale * (xd[xblk] * Float32(acc))
    if g.minc is not None:
        if g.minc_block_sum:
            xs = cute.make_tensor(pXs, cute.make_layout(xblk + 1))
            val = val - g.minc * xs[xblk]
        else:
            sx = Int32(0)
            for i in range(nw):
                sx = dp4a(0x01010101, xw[i], sx)
            val = val - g.minc * (xd[xblk] * Float32(sx))
    return val


# ---------------------------------------------------------------------------------------------------------------
# Chunks: the wide GEMV work split (``mapping="chunk"``, Q4_K / Q6_K / Q6_K_P). A lane owns 32 weights of one block
# per step -- Q4_K: one 16-byte qs vector (quants 16h..16h+15 of sub-block pair c, chunk s = 2c + h); Q6_K: 8 bytes of
# each of ql_lo, ql_hi, qh (chunk s = 4n + i: positions 128n + 8i + {0..7} + 32k, k = 0..3) -- so every block has 8
# chunks and lane L of a warp always has chunk s = L % 8: the per-chunk header work (scale selection) is the same in
# every step of a lane. Kernels issue *all* of a lane's weight loads first (the steps are unrolled at trace time),
# then the activation loads and the math: one DRAM round trip per warp instead of one per step (the slice kernels
# ran at 20-30% of copy bandwidth at the Qwen3 decode shapes, mostly serial round trips: RESULTS.md, "Chunk GEMV").
#
# Float math avoids int->float conversion instructions (quarter rate): a quant byte b becomes f32 through
# prmt (b into the mantissa of 2^23) and one subtraction of 2^23 (exact), and the affine parts are factored out:
# Q4_K  sum_l (d1 q_l - dm1) x_l = d1 * sum q_l x_l - dm1 * sum x_l;  Q6_K  d sc_k * (sum q x - 32 sum x).

CHUNK_QTYPES = ("Q4_K", "Q6_K", "Q6_K_P")
CHUNKS_PER_BLOCK = 8


@dsl_user_op
def byte_f32(w, j: int, *, loc=None, ip=None) -> Float32:
    """Byte ``j`` (static) of a 32-bit word as an exact f32, without a conversion instruction."""
    sel = 0x7540 | j  # result bytes: [w.byte_j, 0, 0, 0x4B] -> bits of 2^23 + b
    return Float32(llvm.inline_asm(
        Float32.mlir_type, [Uint32(w).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 t, m;\n\t.reg .f32 f;\n\tmov.b32 m, 0x4B000000;\n\t"
        f"prmt.b32 t, $1, m, {sel:#x};\n\tmov.b32 f, t;\n\tsub.f32 $0, f, 0f4B000000;\n\t}}",
        "=f,r", loc=loc, ip=ip))


def chunk_supported(qtype: str) -> bool:
    return qtype in CHUNK_QTYPES


def chunk_load(qtype: str, pW, blk, s):
    """Raw weight words of chunk ``s`` (runtime, 0..7) of global block ``blk`` (loads only; decode in chunk_dot_*)."""
    if qtype == "Q4_K":
        w32 = cute.recast_ptr(pW, dtype=Uint32)
        base = blk * 36
        hdr = load_words(w32, base, 4, 4)
        qs = load_words(w32, base + 4 + s * 4, 4, 4)
        return (hdr, qs)
    n, i = s >> 2, s & 3
    return q6k_load(pW, blk, n, i * 2, 2, qtype == "Q6_K_P")


def _q4k_chunk_scales(hdr, s):
    d, dmin = half_lo_to_f32(hdr[0]), half_hi_to_f32(hdr[0])
    (sc1, m1), (sc2, m2) = _kquant_scale_min(hdr, s >> 1)
    return d * sc1, dmin * m1, d * sc2, dmin * m2


def _q6k_chunk_words(raw):
    """Q6_K chunk -> 4 groups k of 2 words of packed 6-bit quants (bytes 0..63, zero point 32)."""
    L0, L1, H, _, _ = raw
    out = []
    for k in range(4):
        Lk = L0 if k % 2 == 0 else L1
        shl = 0 if k < 2 else 4
        out.append([((Lk[m] >> shl) & 0x0F0F0F0F) | (((H[m] >> (2 * k)) & 0x03030303) << 4) for m in range(2)])
    return out


def _q6k_chunk_dscales(raw, s):
    S, d = raw[3], raw[4]
    return [d * Float32(sc) for sc in q6k_scale_bytes(S, Uint32((s & 3) >> 1) * 8)]


def _load_f32(ptr, idx, n, divby):
    return load_words(ptr, idx, n, divby, Float32)


def chunk_x_f32(qtype: str, pX, xbase, s):
    """The f32 activations of chunk ``s`` of the block whose first element is ``xbase`` (a multiple of 256):
    Q4_K [lo 16, hi 16]; Q6_K 4 groups of 8. Returned as a list of rmem tensors (16-byte loads)."""
    if qtype == "Q4_K":
        e = xbase + (s >> 1) * 64 + (s & 1) * 16
        return [_load_f32(pX, e, 16, 16), _load_f32(pX, e + 32, 16, 16)]
    e = xbase + (s >> 2) * 128 + (s & 3) * 8
    return [_load_f32(pX, e + 32 * k, 8, 8) for k in range(4)]


def x_sums_f32(qtype: str, xv):
    """Per-group sums of the chunk activations (shared by every row that uses the same x)."""
    n = 16 if qtype == "Q4_K" else 8
    out = []
    for t in xv:
        parts = [t[i] for i in range(4)]
        for i in range(4, n):
            parts[i % 4] = parts[i % 4] + t[i]
        out.append((parts[0] + parts[1]) + (parts[2] + parts[3]))
    return out


def _dot_bytes(words, xt):
    """sum_j byte_j(words) * xt[j] in 4 interleaved chains."""
    parts = [None] * 4
    for m, w in enumerate(words):
        for j in range(4):
            p = byte_f32(w, j) * xt[4 * m + j]
            parts[j] = p if parts[j] is None else parts[j] + p
    return (parts[0] + parts[1]) + (parts[2] + parts[3])


def chunk_dot_f32(qtype: str, raw, s, xv, xs):
    """f32 partial dot of one chunk with its activations ``xv`` (chunk_x_f32) and group sums ``xs`` (x_sums_f32)."""
    if qtype == "Q4_K":
        hdr, qs = raw
        d1, dm1, d2, dm2 = _q4k_chunk_scales(hdr, s)
        lo = [Uint32(qs[m]) & 0x0F0F0F0F for m in range(4)]
        hi = [(Uint32(qs[m]) >> 4) & 0x0F0F0F0F for m in range(4)]
        return (d1 * _dot_bytes(lo, xv[0]) - dm1 * xs[0]) + (d2 * _dot_bytes(hi, xv[1]) - dm2 * xs[1])
    words = _q6k_chunk_words(raw)
    ds = _q6k_chunk_dscales(raw, s)
    val = None
    for k in range(4):
        t = ds[k] * (_dot_bytes(words[k], xv[k]) - Float32(32.0) * xs[k])
        val = t if val is None else val + t
    return val


def chunk_x_q8(qtype: str, pXq, pXd, xbase, s):
    """int8 activations (q8_1.py layout) of chunk ``s``: (list of word groups, list of block scales d_x)."""
    xq32 = cute.recast_ptr(pXq, dtype=Int32)
    if qtype == "Q4_K":
        e = xbase + (s >> 1) * 64 + (s & 1) * 16
        words = [load_words(xq32, e // 4, 4, 4, Int32), load_words(xq32, (e + 32) // 4, 4, 4, Int32)]
        b0 = (xbase + (s >> 1) * 64) // 32
        xd = cute.make_tensor(pXd, cute.make_layout(b0 + 2))
        return words, [xd[b0], xd[b0 + 1]]
    e = xbase + (s >> 2) * 128 + (s & 3) * 8
    words = [load_words(xq32, (e + 32 * k) // 4, 2, 2, Int32) for k in range(4)]
    b0 = (xbase + (s >> 2) * 128) // 32
    xd = cute.make_tensor(pXd, cute.make_layout(b0 + 4))
    return words, [xd[b0 + k] for k in range(4)]


def chunk_dot_q8(qtype: str, raw, s, xq):
    """dp4a partial dot of one chunk with int8 activations ``xq`` (chunk_x_q8): exact integer dots, f32 scaling."""
    xw, xd = xq
    if qtype == "Q4_K":
        hdr, qs = raw
        d1, dm1, d2, dm2 = _q4k_chunk_scales(hdr, s)
        val = None
        for h, (dd, dm) in enumerate(((d1, dm1), (d2, dm2))):
            dot = Int32(0)
            sx = Int32(0)
            for m in range(4):
                w = ((Uint32(qs[m]) >> 4) & 0x0F0F0F0F) if h else (Uint32(qs[m]) & 0x0F0F0F0F)
                dot = dp4a(w, xw[h][m], dot)
                sx = dp4a(0x01010101, xw[h][m], sx)
            t = xd[h] * (dd * Float32(dot) - dm * Float32(sx))
            val = t if val is None else val + t
        return val
    words = _q6k_chunk_words(raw)
    ds = _q6k_chunk_dscales(raw, s)
    val = None
    for k in range(4):
        dot = Int32(0)
        sx = Int32(0)
        for m in range(2):
            dot = dp4a(words[k][m], xw[k][m], dot)
            sx = dp4a(0x01010101, xw[k][m], sx)
        t = (ds[k] * xd[k]) * Float32(dot - sx * 32)
        val = t if val is None else val + t
    return val
