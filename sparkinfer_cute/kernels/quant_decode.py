"""Device-side decoding of GGUF quant blocks, shared by dequant, GEMV and the MoE FFN kernels.

(~600 lines: the decoders of ten types in two step shapes, unit and slice, kept in one file so that a type's two
decoders and its table rows can be read side by side; the dot products are in quant_dot.py.)

Weights stay in their raw GGUF bytes on the GPU (rows of ``n_in`` elements, blocks along ``n_in``). Every type is
decoded in *units*: the piece of one block that one lane turns into f32 values in registers per step.

| type | block elems / bytes | unit elems | unit -> element positions (in the block)                         | loads |
|------|---------------------|------------|-------------------------------------------------------------------|-------|
| Q4_0 | 32 / 18             | 32         | the whole block                                                   | u16   |
| Q5_0 | 32 / 22             | 32         | the whole block                                                   | u16   |
| Q8_0 | 32 / 34             | 32         | the whole block                                                   | u16   |
| Q4_K | 256 / 144           | 64         | sub-block pair c: [64c, 64c+64) (shares the 32 qs bytes)          | v4.u32 (144 = 9*16) |
| Q5_K | 256 / 176           | 64         | sub-block pair c: [64c, 64c+64)                                   | v4.u32 (176 = 11*16) |
| Q6_K | 256 / 210           | 32         | half n, lane-slab t: 128n + 8t + {0..7} + 32k, k=0..3             | u16   |
| F16/BF16/F32 | 32-element pseudo-blocks | 32 | contiguous                                              | v4.u32 |

Q4_0/Q5_0/Q8_0/Q6_K blocks are only 2-byte aligned (18/22/34/210 bytes), so they are read with 16-bit loads (the
loads of a warp still coalesce). ``Q6_K_P`` is Q6_K after the optional upload-time repack
``gguf.quants.repack_q6_k_padded`` (2 zero bytes after each block: 212 = 53 words, every field 4-byte aligned, 32-bit
loads, +0.95% bytes); Q6_K tensors are the LM head and half of the down experts of Qwen3-30B-A3B Q4_K_M.

Units are what the bit-exact dequant kernel uses. The GEMV/MoE kernels use *slices* (4 quant bytes per lane, see
below) so that every warp load is coalesced; the unit mapping stays available as ``Tiling(qtype, "unit")``. The dot
products of decoded steps with the activations (f32 or int8, and the wide *chunk* mapping) are in quant_dot.py.

Numerics. With ``exact=True`` the decode reproduces ggml/gguf-py bit for bit: gguf-py evaluates, in f32,
``(d*sc)*q - dmin*m`` (K-quants) / ``(d*sc)*q`` (Q6_K) / ``d*q`` (legacy quants), each product rounded. ptxas fuses a
plain ``mul.f32`` followed by ``sub.f32`` into an ``fma`` (seen in the PTX of our first Q4_K kernel: ``mul.f32`` +
``sub.f32`` with no rounding modifier, which the PTX ISA allows to be contracted), which changes the last bit, so the
exact path uses ``mul.rn.f32`` / ``sub.rn.f32`` through inline asm (explicit rounding modifiers are never contracted).
The GEMV paths use ``exact=False`` (contraction allowed: at most 1 ulp per weight, far inside the GEMV tolerance).

The helpers here are plain Python functions called while a kernel is traced: they unroll into straight-line code
(no runtime control flow inside), and take runtime ``blk``/``u`` indices.
"""

from __future__ import annotations

from dataclasses import dataclass

from cutlass import Float32, Int32, Uint16, Uint32, cute
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op


# ggml type ids (ggml.h enum ggml_type)
GGML_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
                 "BF16": 30}


@dataclass(frozen=True)
class QuantSpec:
    name: str
    block_elems: int  # elements per (pseudo-)block along a row
    block_bytes: int
    unit_elems: int  # elements one lane decodes per step
    # contiguous runs of a unit: (index in the unit's value array, offset from the unit base, length)
    runs: tuple

    @property
    def units_per_block(self) -> int:
        return self.block_elems // self.unit_elems

    def row_bytes(self, n_in: int) -> int:
        assert n_in % self.block_elems == 0, f"{self.name}: row length {n_in} not a multiple of {self.block_elems}"
        return n_in // self.block_elems * self.block_bytes

    @property
    def ggml_type(self) -> int:
        return GGML_TYPE_IDS[self.name]


def _contig(n):
    return ((0, 0, n),)


SPECS = {
    "Q4_0": QuantSpec("Q4_0", 32, 18, 32, _contig(32)),
    "Q5_0": QuantSpec("Q5_0", 32, 22, 32, _contig(32)),
    "Q8_0": QuantSpec("Q8_0", 32, 34, 32, _contig(32)),
    "Q4_K": QuantSpec("Q4_K", 256, 144, 64, _contig(64)),
    "Q5_K": QuantSpec("Q5_K", 256, 176, 64, _contig(64)),
    "Q6_K": QuantSpec("Q6_K", 256, 210, 32, tuple((8 * k, 32 * k, 8) for k in range(4))),
    # Q6_K repacked at upload time: each block + 2 zero bytes (212 = 53 words; see repack_q6_k_padded)
    "Q6_K_P": QuantSpec("Q6_K_P", 256, 212, 32, tuple((8 * k, 32 * k, 8) for k in range(4))),
    "F16": QuantSpec("F16", 32, 64, 32, _contig(32)),
    "BF16": QuantSpec("BF16", 32, 64, 32, _contig(32)),
    "F32": QuantSpec("F32", 32, 128, 32, _contig(32)),
}
QTYPES = tuple(SPECS)
# Types with integer quants that the dp4a (int8-activation) paths decode; the float types use the f32 GEMV.
INT_QTYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q6_K_P")
QK8_1 = 32  # elements per block of the q8_1 int8 activations (q8_1.py)


def spec(qtype: str) -> QuantSpec:
    try:
        return SPECS[qtype]
    except KeyError:
        raise ValueError(f"unsupported quant type {qtype!r}; supported: {QTYPES}") from None


def check_weight_bytes(w, q, n_rows, n_in, *, groups_any: bool = False) -> None:
    """``w`` (anything with ``nbytes``) holds exactly ``n_rows`` rows of ``n_in`` values of type ``q`` (ValueError
    else): the kernels walk a weight at ``row_bytes(n_in)`` per row and trust its size. ``groups_any``: any positive
    whole number of such matrices (the grouped GEMM's experts, whose count the launch does not take)."""
    need = n_rows * spec(q).row_bytes(n_in)
    if w.nbytes == need or (groups_any and w.nbytes > 0 and w.nbytes % need == 0):
        return
    what = f"a whole number of {need}-byte matrices" if groups_any else str(need)
    raise ValueError(f"{q} weight has {w.nbytes} bytes, expected {what} ({n_rows} rows x {n_in})")


def qtype_name(qtype) -> str:
    """Accept 'Q4_K', a gguf.GGMLQuantizationType or its int value."""
    if isinstance(qtype, str):
        return spec(qtype.upper()).name
    val = int(qtype)
    for k, v in GGML_TYPE_IDS.items():
        if v == val:
            return k
    raise ValueError(f"unsupported ggml type id {val}")


def unit_base(sp: QuantSpec, u):
    """Element offset (inside the block) where unit ``u`` (runtime) starts."""
    if sp.name in ("Q6_K", "Q6_K_P"):
        return (u >> 2) * 128 + (u & 3) * 8
    return u * sp.unit_elems


# ---------------------------------------------------------------------------------------------------------------
# Scalar inline-asm helpers


@dsl_user_op
def mul_rn(a, b, *, loc=None, ip=None) -> Float32:
    """f32 multiply with an explicit rounding modifier: never contracted into an fma by ptxas."""
    return Float32(llvm.inline_asm(Float32.mlir_type, [Float32(a).ir_value(loc=loc, ip=ip),
                                                       Float32(b).ir_value(loc=loc, ip=ip)],
                                   "mul.rn.f32 $0, $1, $2;", "=f,f,f", loc=loc, ip=ip))


@dsl_user_op
def sub_rn(a, b, *, loc=None, ip=None) -> Float32:
    return Float32(llvm.inline_asm(Float32.mlir_type, [Float32(a).ir_value(loc=loc, ip=ip),
                                                       Float32(b).ir_value(loc=loc, ip=ip)],
                                   "sub.rn.f32 $0, $1, $2;", "=f,f,f", loc=loc, ip=ip))


@dsl_user_op
def half_lo_to_f32(w, *, loc=None, ip=None) -> Float32:
    """IEEE half in bits [0, 16) of a 32-bit word -> f32 (exact)."""
    return Float32(llvm.inline_asm(
        Float32.mlir_type, [Uint32(w).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, $1;\n\tcvt.f32.f16 $0, lo;\n\t}", "=f,r", loc=loc, ip=ip))


@dsl_user_op
def half_hi_to_f32(w, *, loc=None, ip=None) -> Float32:
    """IEEE half in bits [16, 32) of a 32-bit word -> f32 (exact)."""
    return Float32(llvm.inline_asm(
        Float32.mlir_type, [Uint32(w).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, $1;\n\tcvt.f32.f16 $0, hi;\n\t}", "=f,r", loc=loc, ip=ip))


@dsl_user_op
def bits_to_f32(w, *, loc=None, ip=None) -> Float32:
    """Reinterpret 32 bits as an f32."""
    return Float32(llvm.inline_asm(Float32.mlir_type, [Uint32(w).ir_value(loc=loc, ip=ip)],
                                   "mov.b32 $0, $1;", "=f,r", loc=loc, ip=ip))


# ---------------------------------------------------------------------------------------------------------------
# Loads


def load_words(ptr, idx, n: int, divby: int, dtype=Uint32):
    """Load ``n`` consecutive ``dtype`` elements at element index ``idx`` of ``ptr`` into registers.

    ``divby``: what ``idx`` is known to be divisible by (with a 16-byte aligned base this lets the copy use
    128-bit loads)."""
    if divby > 1:
        idx = cute.assume(idx, divby=divby)
    src = cute.make_tensor(ptr + idx, cute.make_layout(n))
    dst = cute.make_rmem_tensor((n,), dtype)
    cute.autovec_copy(src, dst)
    return dst


def _byte(words, i: int):
    """Byte i (static) of a little-endian array of u16 / u32 register words."""
    w = words.element_type.width // 8
    return (Uint32(words[i // w]) >> (8 * (i % w))) & 0xFF


def _sext8(b):
    """Unsigned byte value (Uint32 0..255) -> signed Int32."""
    b = Int32(b)
    return b - ((b & 0x80) << 1)


# ---------------------------------------------------------------------------------------------------------------
# Per-type unit decoders: fill ``out`` (an rmem f32 tensor of spec.unit_elems) with the unit's values in the order
# given by spec.runs. ``pW`` is a Uint8 global pointer to the tensor's first byte (16-byte aligned); ``blk`` the
# runtime global block index; ``u`` the runtime unit index inside the block.


def _mul(a, b, exact):
    return mul_rn(a, b) if exact else a * b


def _sub(a, b, exact):
    return sub_rn(a, b) if exact else a - b


def _decode_q4_0(pW, blk, u, out, exact):
    w16 = cute.recast_ptr(pW, dtype=Uint16)
    base = blk * 9
    d = half_lo_to_f32(Uint32(w16[base]))
    qs = load_words(w16, base + 1, 8, 1, Uint16)
    for j in range(16):
        b = _byte(qs, j)
        out[j] = _mul(d, Float32(Int32(b & 0xF) - 8), exact)
        out[j + 16] = _mul(d, Float32(Int32(b >> 4) - 8), exact)


def _decode_q5_0(pW, blk, u, out, exact):
    w16 = cute.recast_ptr(pW, dtype=Uint16)
    base = blk * 11
    hdr = load_words(w16, base, 3, 1, Uint16)
    d = half_lo_to_f32(Uint32(hdr[0]))
    qh = Uint32(hdr[1]) | (Uint32(hdr[2]) << 16)
    qs = load_words(w16, base + 3, 8, 1, Uint16)
    for j in range(16):
        b = _byte(qs, j)
        lo = (b & 0xF) | (((qh >> j) & 1) << 4)
        hi = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
        out[j] = _mul(d, Float32(Int32(lo) - 16), exact)
        out[j + 16] = _mul(d, Float32(Int32(hi) - 16), exact)


def _decode_q8_0(pW, blk, u, out, exact):
    w16 = cute.recast_ptr(pW, dtype=Uint16)
    base = blk * 17
    d = half_lo_to_f32(Uint32(w16[base]))
    qs = load_words(w16, base + 1, 16, 1, Uint16)
    for j in range(32):
        out[j] = _mul(d, Float32(_sext8(_byte(qs, j))), exact)


def _kquant_scale_min(hdr, c):
    """(sc, m) of sub-blocks 2c and 2c+1 from the 16-byte K-quant header words [d|dmin, s0..3, s4..7, s8..11].

    get_scale_min_k4(j): j < 4: sc = s[j] & 63, m = s[j+4] & 63;
                         j >= 4: sc = (s[j+4] & 15) | ((s[j-4] >> 6) << 4), m = (s[j+4] >> 4) | ((s[j] >> 6) << 4).
    ``c`` is runtime: both cases are computed and selected with a mask (no divergent branch)."""
    A, B, C = Uint32(hdr[1]), Uint32(hdr[2]), Uint32(hdr[3])
    res = []
    for h in range(2):
        j = Uint32(c) * 2 + h
        jl = j & 3  # j for j < 4, j - 4 otherwise
        sh = jl * 8
        a, b_, cc = (A >> sh) & 0xFF, (B >> sh) & 0xFF, (C >> sh) & 0xFF
        sc_lo, m_lo = a & 63, b_ & 63
        sc_hi = (cc & 0xF) | ((a >> 6) << 4)
        m_hi = (cc >> 4) | ((b_ >> 6) << 4)
        mask = Uint32(0) - (j >> 2)  # all ones if j >= 4
        nmask = mask ^ 0xFFFFFFFF
        sc = (sc_lo & nmask) | (sc_hi & mask)
        m = (m_lo & nmask) | (m_hi & mask)
        res.append((Float32(Int32(sc)), Float32(Int32(m))))
    return res


def _decode_q45_k(pW, blk, u, out, exact, has_qh: bool):
    w32 = cute.recast_ptr(pW, dtype=Uint32)
    words = 44 if has_qh else 36
    base = blk * words
    hdr = load_words(w32, base, 4, 4)
    d = half_lo_to_f32(hdr[0])
    dmin = half_hi_to_f32(hdr[0])
    (sc1, m1), (sc2, m2) = _kquant_scale_min(hdr, u)
    d1, d2 = _mul(d, sc1, exact), _mul(d, sc2, exact)
    dm1, dm2 = _mul(dmin, m1, exact), _mul(dmin, m2, exact)
    qs_off = 12 if has_qh else 4
    qs = load_words(w32, base + qs_off + u * 8, 8, 4)
    if has_qh:
        qh = load_words(w32, base + 4, 8, 4)
        sh1 = Uint32(u) * 2
    for l in range(32):
        b = _byte(qs, l)
        lo, hi = b & 0xF, b >> 4
        if has_qh:
            hb = _byte(qh, l)
            lo = lo | (((hb >> sh1) & 1) << 4)
            hi = hi | (((hb >> (sh1 + 1)) & 1) << 4)
        out[l] = _sub(_mul(d1, Float32(Int32(lo)), exact), dm1, exact)
        out[32 + l] = _sub(_mul(d2, Float32(Int32(hi)), exact), dm2, exact)


def q6k_load(pW, blk, n, lw, nw: int, padded: bool):
    """Raw words of a Q6_K block half ``n`` for quant-byte offset l = 4*lw (lw runtime, in 32-bit words):
    ``(L0, L1, H, (s_lo, s_hi), d)`` with L0 = ql[64n + l ..], L1 = ql[64n + 32 + l ..], H = qh[32n + l ..] as lists
    of ``nw`` little-endian 32-bit words, the 8 scales of the half as two words and d as f32.

    ``padded``: the Q6_K_P layout (each 210-byte block followed by 2 zero bytes, 212 = 53 words: every field is
    4-byte aligned, so 32-bit loads); otherwise the raw 2-byte-aligned GGUF layout (16-bit loads, paired)."""
    if padded:
        w32 = cute.recast_ptr(pW, dtype=Uint32)
        base = blk * 53
        L0 = load_words(w32, base + n * 16 + lw, nw, 1)
        L1 = load_words(w32, base + n * 16 + 8 + lw, nw, 1)
        H = load_words(w32, base + 32 + n * 8 + lw, nw, 1)
        S = load_words(w32, base + 48 + n * 2, 2, 1)
        w32t = cute.make_tensor(w32, cute.make_layout(base + 53))
        d = half_lo_to_f32(Uint32(w32t[base + 52]))
        return ([Uint32(L0[k]) for k in range(nw)], [Uint32(L1[k]) for k in range(nw)],
                [Uint32(H[k]) for k in range(nw)], (Uint32(S[0]), Uint32(S[1])), d)
    w16 = cute.recast_ptr(pW, dtype=Uint16)
    base = blk * 105
    L0 = load_words(w16, base + n * 32 + lw * 2, 2 * nw, 1, Uint16)
    L1 = load_words(w16, base + n * 32 + 16 + lw * 2, 2 * nw, 1, Uint16)
    H = load_words(w16, base + 64 + n * 16 + lw * 2, 2 * nw, 1, Uint16)
    S = load_words(w16, base + 96 + n * 4, 4, 1, Uint16)
    d = half_lo_to_f32(Uint32(w16[base + 104]))

    def pairs(h, m):
        return [Uint32(h[2 * k]) | (Uint32(h[2 * k + 1]) << 16) for k in range(m)]

    return pairs(L0, nw), pairs(L1, nw), pairs(H, nw), tuple(pairs(S, 2)), d


def _wbyte(words, i: int):
    return (words[i // 4] >> (8 * (i % 4))) & 0xFF


def q6k_scale_bytes(S, th):
    """Signed scales for outputs k = 0..3 of a step whose scale index inside the half is is0 + 2k (th = 8*is0)."""
    out = []
    for k in range(4):
        word = S[0] if k < 2 else S[1]
        out.append(_sext8((word >> (th + 16 * (k % 2))) & 0xFF))
    return out


def _decode_q6_k(pW, blk, u, out, exact, padded=False):
    n = u >> 2
    t = u & 3
    # unit (n, t): l = 8t + i, i < 8: 2 words of each of ql[64n + 8t..], ql[64n + 32 + 8t..], qh[32n + 8t..]
    L0, L1, H, S, d = q6k_load(pW, blk, n, t * 2, 2, padded)
    # scale index for output k (positions 32k + 8t + i): is = (8t+i)//16 + 2k = t//2 + 2k (byte of S)
    ds = [_mul(d, Float32(sc), exact) for sc in q6k_scale_bytes(S, Uint32(t >> 1) * 8)]
    for i in range(8):
        l0, l1, h = _wbyte(L0, i), _wbyte(L1, i), _wbyte(H, i)
        q = (
            (l0 & 0xF) | ((h & 3) << 4),
            (l1 & 0xF) | (((h >> 2) & 3) << 4),
            (l0 >> 4) | (((h >> 4) & 3) << 4),
            (l1 >> 4) | (((h >> 6) & 3) << 4),
        )
        for k in range(4):
            out[8 * k + i] = _mul(ds[k], Float32(Int32(q[k]) - 32), exact)


def _decode_f16(pW, blk, u, out, exact):
    w = load_words(cute.recast_ptr(pW, dtype=Uint32), blk * 16, 16, 16)
    for j in range(16):
        out[2 * j] = half_lo_to_f32(w[j])
        out[2 * j + 1] = half_hi_to_f32(w[j])


def _decode_bf16(pW, blk, u, out, exact):
    w = load_words(cute.recast_ptr(pW, dtype=Uint32), blk * 16, 16, 16)
    for j in range(16):
        out[2 * j] = bits_to_f32(Uint32(w[j]) << 16)
        out[2 * j + 1] = bits_to_f32(Uint32(w[j]) & 0xFFFF0000)


def _decode_f32(pW, blk, u, out, exact):
    w = load_words(cute.recast_ptr(pW, dtype=Float32), blk * 32, 32, 32, Float32)
    for j in range(32):
        out[j] = w[j]


def decode_unit(qtype: str, pW, blk, u, out, exact: bool = False):
    """Decode unit ``u`` of global block ``blk`` of the tensor at ``pW`` (Uint8 gmem pointer) into ``out``."""
    q = qtype
    if q == "Q4_0":
        _decode_q4_0(pW, blk, u, out, exact)
    elif q == "Q5_0":
        _decode_q5_0(pW, blk, u, out, exact)
    elif q == "Q8_0":
        _decode_q8_0(pW, blk, u, out, exact)
    elif q == "Q4_K":
        _decode_q45_k(pW, blk, u, out, exact, has_qh=False)
    elif q == "Q5_K":
        _decode_q45_k(pW, blk, u, out, exact, has_qh=True)
    elif q == "Q6_K":
        _decode_q6_k(pW, blk, u, out, exact)
    elif q == "Q6_K_P":
        _decode_q6_k(pW, blk, u, out, exact, padded=True)
    elif q == "F16":
        _decode_f16(pW, blk, u, out, exact)
    elif q == "BF16":
        _decode_bf16(pW, blk, u, out, exact)
    elif q == "F32":
        _decode_f32(pW, blk, u, out, exact)
    else:
        raise ValueError(f"unsupported quant type {qtype!r}")


def run_divisibility(sp: QuantSpec) -> int:
    """What every run start (block-relative element offset) is divisible by."""
    return 8 if sp.name in ("Q6_K", "Q6_K_P") else sp.unit_elems


def new_unit_buffer(qtype: str):
    return cute.make_rmem_tensor((spec(qtype).unit_elems,), Float32)


# ---------------------------------------------------------------------------------------------------------------
# Slices: the GEMV work split. A *unit* (above) gives each lane 32-64 contiguous elements, so in one warp load the
# lanes' activation addresses are 128-256 B apart (32 distinct cache lines per 128-bit load, ~8x the L1 wavefronts
# of a coalesced load) and the weight loads are block-strided too. A *slice* gives each lane 4 consecutive quant
# bytes (llama.cpp's mmvq split): neighbouring lanes read neighbouring weight bytes and neighbouring 16-byte groups
# of x, so every load of a warp is coalesced, and the per-block header (d, scales) is a broadcast.
#
# | type | slices/block | slice s -> elements (block-relative)                              | weight loads        |
# |------|--------------|-------------------------------------------------------------------|---------------------|
# | Q4_0 | 4            | 4s + {0..3}, 16 + 4s + {0..3}                                     | 2 x u16 (+ d)       |
# | Q5_0 | 4            | as Q4_0                                                           | 2 x u16 (+ d, qh)   |
# | Q8_0 | 4            | 8s + {0..7}                                                       | 4 x u16 (+ d)       |
# | Q4_K | 32           | c = s//8, i = s%8: 64c + 4i + {0..3}, 64c + 32 + 4i + {0..3}      | u32 + v4 header     |
# | Q5_K | 32           | as Q4_K                                                           | 2 x u32 + v4 header |
# | Q6_K | 16           | n = s//8, i = s%8: 128n + 4i + 32k + {0..3}, k = 0..3             | 6 x u16 (+ S, d)    |
# | F16/BF16 | 4 (per 32) | 8s + {0..7}                                                     | v4                  |
# | F32  | 8 (per 32)   | 4s + {0..3}                                                       | v4                  |


@dataclass(frozen=True)
class SliceSpec:
    elems: int
    per_block: int
    runs: tuple  # (value index, offset from the slice base, length)


SLICES = {
    "Q4_0": SliceSpec(8, 4, ((0, 0, 4), (4, 16, 4))),
    "Q5_0": SliceSpec(8, 4, ((0, 0, 4), (4, 16, 4))),
    "Q8_0": SliceSpec(8, 4, ((0, 0, 8),)),
    "Q4_K": SliceSpec(8, 32, ((0, 0, 4), (4, 32, 4))),
    "Q5_K": SliceSpec(8, 32, ((0, 0, 4), (4, 32, 4))),
    "Q6_K": SliceSpec(16, 16, tuple((4 * k, 32 * k, 4) for k in range(4))),
    "Q6_K_P": SliceSpec(16, 16, tuple((4 * k, 32 * k, 4) for k in range(4))),
    "F16": SliceSpec(8, 4, ((0, 0, 8),)),
    "BF16": SliceSpec(8, 4, ((0, 0, 8),)),
    "F32": SliceSpec(4, 8, ((0, 0, 4),)),
}


def slice_base(qtype: str, s):
    if qtype in ("Q4_0", "Q5_0"):
        return s * 4
    if qtype in ("Q4_K", "Q5_K"):
        return (s >> 3) * 64 + (s & 7) * 4
    if qtype in ("Q6_K", "Q6_K_P"):
        return (s >> 3) * 128 + (s & 7) * 4
    if qtype == "F32":
        return s * 4
    return s * 8  # Q8_0, F16, BF16


def _decode_slice(qtype, pW, blk, s, out, exact):
    q = qtype
    if q in ("Q4_0", "Q5_0"):
        w16 = cute.recast_ptr(pW, dtype=Uint16)
        if q == "Q4_0":
            base = blk * 9
            d = half_lo_to_f32(Uint32(w16[base]))
            qw = load_words(w16, base + 1 + s * 2, 2, 1, Uint16)
        else:
            base = blk * 11
            hdr = load_words(w16, base, 3, 1, Uint16)
            d = half_lo_to_f32(Uint32(hdr[0]))
            qh = Uint32(hdr[1]) | (Uint32(hdr[2]) << 16)
            qw = load_words(w16, base + 3 + s * 2, 2, 1, Uint16)
            sh = Uint32(s) * 4
        for j in range(4):
            b = _byte(qw, j)
            lo, hi = b & 0xF, b >> 4
            if q == "Q5_0":  # element 4s+j uses qh bit 4s+j; element 16+4s+j uses bit 16+4s+j
                lo = lo | (((qh >> (sh + j)) & 1) << 4)
                hi = hi | (((qh >> (sh + (16 + j))) & 1) << 4)
                out[j] = _mul(d, Float32(Int32(lo) - 16), exact)
                out[4 + j] = _mul(d, Float32(Int32(hi) - 16), exact)
            else:
                out[j] = _mul(d, Float32(Int32(lo) - 8), exact)
                out[4 + j] = _mul(d, Float32(Int32(hi) - 8), exact)
    elif q == "Q8_0":
        w16 = cute.recast_ptr(pW, dtype=Uint16)
        base = blk * 17
        d = half_lo_to_f32(Uint32(w16[base]))
        qw = load_words(w16, base + 1 + s * 4, 4, 1, Uint16)
        for j in range(8):
            out[j] = _mul(d, Float32(_sext8(_byte(qw, j))), exact)
    elif q in ("Q4_K", "Q5_K"):
        has_qh = q == "Q5_K"
        w32 = cute.recast_ptr(pW, dtype=Uint32)
        base = blk * (44 if has_qh else 36)
        c = s >> 3
        i = s & 7
        hdr = load_words(w32, base, 4, 4)
        d = half_lo_to_f32(hdr[0])
        dmin = half_hi_to_f32(hdr[0])
        (sc1, m1), (sc2, m2) = _kquant_scale_min(hdr, c)
        d1, d2 = _mul(d, sc1, exact), _mul(d, sc2, exact)
        dm1, dm2 = _mul(dmin, m1, exact), _mul(dmin, m2, exact)
        w32t = cute.make_tensor(w32, cute.make_layout(base + 44))
        qs = Uint32(w32t[base + (12 if has_qh else 4) + s])  # qs bytes 32c + 4i .. +3  (s = 8c + i)
        if has_qh:
            qh = Uint32(w32t[base + 4 + i])  # qh bytes 4i .. 4i+3 (bits 2c, 2c+1)
            sh = Uint32(c) * 2
        for j in range(4):
            b = (qs >> (8 * j)) & 0xFF
            lo, hi = b & 0xF, b >> 4
            if has_qh:
                hb = (qh >> (8 * j)) & 0xFF
                lo = lo | (((hb >> sh) & 1) << 4)
                hi = hi | (((hb >> (sh + 1)) & 1) << 4)
            out[j] = _sub(_mul(d1, Float32(Int32(lo)), exact), dm1, exact)
            out[4 + j] = _sub(_mul(d2, Float32(Int32(hi)), exact), dm2, exact)
    elif q in ("Q6_K", "Q6_K_P"):
        n = s >> 3
        i = s & 7
        # slice (n, i): l = 4i + j, j < 4: one word of each of ql[64n + 4i..], ql[64n + 32 + 4i..], qh[32n + 4i..]
        L0, L1, H, S, d = q6k_load(pW, blk, n, i, 1, q == "Q6_K_P")
        # output k (positions 32k + 4i + j) uses scale 8n + (4i)//16 + 2k = 8n + i//4 + 2k
        ds = [_mul(d, Float32(sc), exact) for sc in q6k_scale_bytes(S, Uint32(i >> 2) * 8)]
        for j in range(4):
            l0, l1, h = _wbyte(L0, j), _wbyte(L1, j), _wbyte(H, j)
            qv = ((l0 & 0xF) | ((h & 3) << 4), (l1 & 0xF) | (((h >> 2) & 3) << 4),
                  (l0 >> 4) | (((h >> 4) & 3) << 4), (l1 >> 4) | (((h >> 6) & 3) << 4))
            for k in range(4):
                out[4 * k + j] = _mul(ds[k], Float32(Int32(qv[k]) - 32), exact)
    elif q in ("F16", "BF16"):
        w = load_words(cute.recast_ptr(pW, dtype=Uint32), blk * 16 + s * 4, 4, 4)
        for j in range(4):
            if q == "F16":
                out[2 * j] = half_lo_to_f32(w[j])
                out[2 * j + 1] = half_hi_to_f32(w[j])
            else:
                out[2 * j] = bits_to_f32(Uint32(w[j]) << 16)
                out[2 * j + 1] = bits_to_f32(Uint32(w[j]) & 0xFFFF0000)
    elif q == "F32":
        w = load_words(cute.recast_ptr(pW, dtype=Float32), blk * 32 + s * 4, 4, 4, Float32)
        for j in range(4):
            out[j] = w[j]
    else:
        raise ValueError(f"unsupported quant type {qtype!r}")


class Tiling:
    """How a weight row is cut into per-lane steps: ``"slice"`` (coalesced, the GEMV default) or ``"unit"``.

    Kernels use: ``elems`` (values per step), ``per_block`` (steps per block), ``runs`` (contiguous activation runs
    of a step: value index, offset from the step base, length), ``divby`` (what every run start is divisible by),
    ``base(u)`` (block-relative element of step u), ``decode(pW, blk, u, out, exact)``, ``buffer()``."""

    def __init__(self, qtype: str, mode: str = "slice"):
        assert mode in ("slice", "unit"), mode
        self.qtype, self.mode, self.sp = qtype, mode, spec(qtype)
        if mode == "slice":
            sl = SLICES[qtype]
            self.elems, self.per_block, self.runs = sl.elems, sl.per_block, sl.runs
            self.divby = 4
        else:
            self.elems, self.per_block, self.runs = self.sp.unit_elems, self.sp.units_per_block, self.sp.runs
            self.divby = run_divisibility(self.sp)

    def base(self, u):
        return slice_base(self.qtype, u) if self.mode == "slice" else unit_base(self.sp, u)

    def decode(self, pW, blk, u, out, exact: bool = False):
        if self.mode == "slice":
            _decode_slice(self.qtype, pW, blk, u, out, exact)
        else:
            decode_unit(self.qtype, pW, blk, u, out, exact)

    def buffer(self):
        return cute.make_rmem_tensor((self.elems,), Float32)


__all__ = [
    "GGML_TYPE_IDS",
    "INT_QTYPES",
    "QK8_1",
    "QTYPES",
    "SLICES",
    "SPECS",
    "QuantSpec",
    "Tiling",
    "bits_to_f32",
    "decode_unit",
    "half_hi_to_f32",
    "half_lo_to_f32",
    "load_words",
    "mul_rn",
    "new_unit_buffer",
    "q6k_load",
    "q6k_scale_bytes",
    "qtype_name",
    "run_divisibility",
    "slice_base",
    "spec",
    "sub_rn",
    "unit_base",
]
