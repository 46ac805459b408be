"""Decode GEMV with int8 activations (q8_1.py) and ``dp4a`` dot products against the integer weight quants.

Same work split as gemv.py (one warp per output row, lanes stride over the coalesced slices of quant_decode.py --
or the per-lane units with ``mapping="unit"`` --, butterfly reduce; expert-indexed variant over grid.y with ids
from device memory). Per step, the weight quants are repacked in registers into bytes
(4 per 32-bit word) and dotted with the int8 activations 4 at a time with ``dp4a`` (inline PTX; the DSL has no int8
dot atom, cute-dsl.md §3). Integer dots are exact; each group of 8-32 elements is then scaled in f32:

    group = scale_w * d_x * (dot(q_w, q_x) - off * sum(q_x)) - min_w * s_x

with ``off`` the type's zero point (Q4_0: 8, Q5_0: 16, Q6_K: 32; sum(q_x) from a dp4a against 0x01010101) and the
K-quant min term (Q4_K/Q5_K: ``dmin*m``) times the sum of the group's activations: the block sum ``s = d*sum(q)``
stored by the quantizer when a group covers a whole 32-block (unit mapping), else ``d_x * sum(q_x)`` of the group
(slice mapping: 4 elements per group).

So the result is the exact GEMV against the dequantized int8 activations, up to f32 rounding:
|y - W x| <= sum_i A_i d_b(i)/2 (quantization, q8_1.py) + the f32 rounding of the float GEMV (gemv.py).
Types: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K (float weights use gemv.py).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, Uint8, Uint16, Uint32, cute
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from .arch import pdl_enabled
from .common import gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .gemv import MAX_ROWS, WARPS, as_device_bytes, resolve_mapping
from .q8_1 import QK, Q8Act, quantize_q8_1
from .quant_decode import (
    INT_QTYPES,
    Tiling,
    _kquant_scale_min,
    half_hi_to_f32,
    half_lo_to_f32,
    load_words,
    q6k_load,
    q6k_scale_bytes,
    qtype_name,
    spec,
)

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
    raise ValueError(f"gemv_q8: unsupported type {qtype}")


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
    raise ValueError(f"gemv_q8: unsupported type {qtype}")


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
    xblk = e0 // QK
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


class GemvQ8:
    """dp4a GEMV; ``mapping`` "slice" (coalesced, default) or "unit" (first version, kept as a fallback)."""

    def __init__(self, qtype: str, n_in: int, rows: int = 1, experts: bool = False, x_per_slot: bool = False,
                 mapping: str = "slice", accumulate: bool = False):
        self.pdl = pdl_enabled()
        assert qtype in INT_QTYPES, f"gemv_q8 supports {INT_QTYPES}"
        self.accumulate = accumulate  # y += W x (in-place residual add)
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, mapping)
        self.mapping = mapping
        assert n_in % self.sp.block_elems == 0 and 1 <= rows <= MAX_ROWS
        assert not (experts and rows != 1)
        self.n_in, self.rows, self.experts, self.x_per_slot = n_in, rows, experts, x_per_slot

    @cute.jit
    def __call__(self, pW: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer, pY: cute.Pointer,
                 pIds: cute.Pointer, n_out: Int32, n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pW, pXq, pXd, pXs, pY, pIds, n_out).launch(
            grid=[cute.ceil_div(n_out, WARPS), n_slots, 1], block=[WARPS * 32, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer, pY: cute.Pointer,
               pIds: cute.Pointer, n_out: Int32):
        pdl_prologue(self.pdl)
        sp = self.sp
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        warp, lane = tid // 32, tid % 32
        o = bx * WARPS + warp
        nbpr = self.n_in // sp.block_elems
        upb = self.tiling.per_block
        if o < n_out:
            row = o
            xrow0 = 0
            if cutlass.const_expr(self.experts):
                ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
                row = ids[slot] * n_out + o
                if cutlass.const_expr(self.x_per_slot):
                    xrow0 = slot
            blk0 = row * nbpr
            acc = cute.make_rmem_tensor((self.rows,), Float32)
            acc.fill(0.0)
            for U in cutlass.range(lane, nbpr * upb, 32, unroll=2):
                kb = U // upb
                u = U - kb * upb
                if cutlass.const_expr(self.mapping == "slice"):
                    groups = decode_int_slice(self.qtype, pW, blk0 + kb, u)
                else:
                    groups = decode_int_unit(self.qtype, pW, blk0 + kb, u)
                xb = kb * sp.block_elems + self.tiling.base(u)
                for r in cutlass.range_constexpr(self.rows):
                    for g in groups:
                        acc[r] = acc[r] + group_dot(g, pXq, pXd, pXs, (xrow0 + r) * self.n_in, xb, 0)
            mY = cute.make_tensor(pY, cute.make_layout((n_out * self.rows) * (slot + 1)))
            for r in cutlass.range_constexpr(self.rows):
                t = warp_reduce_sum(acc[r])
                if lane == 0:
                    yi = (slot * self.rows + r) * n_out + o
                    if cutlass.const_expr(self.accumulate):
                        t = t + mY[yi]
                    mY[yi] = t


@kernel_cache
def compile_gemv_q8(qtype: str, n_in: int, rows: int = 1, experts: bool = False, x_per_slot: bool = False,
                    mapping: str = "slice", accumulate: bool = False):
    return cute.compile(GemvQ8(qtype, n_in, rows, experts, x_per_slot, mapping, accumulate),
                        gptr(Uint8, 0), gptr(Int8, 0),
                        gptr(Float32, 0), gptr(Float32, 0), gptr(Float32, 0), gptr(Int32, 0, 4), Int32(1), Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


def _launch(w, qtype, xq: Q8Act, ids, n_out, n_slots, experts, x_per_slot, out, st, mapping="auto",
            accumulate=False):
    from ..runtime import DeviceArray

    q = qtype_name(qtype)
    dw = as_device_bytes(w, st)
    rows = 1 if experts else xq.rows
    if dw.ptr % 16:
        raise ValueError("weights must be 16-byte aligned")
    y = out if out is not None else DeviceArray.empty((n_slots * rows, n_out) if rows > 1 or experts else (n_out,),
                                                      np.float32)
    di = ids if ids is not None else xq.d
    mapping = resolve_mapping(mapping, q, xq.n, rows)
    if mapping == "chunk":
        from .gemv import _sm_count, choose_rpw, compile_gemv_chunk

        rpw = choose_rpw(n_out * n_slots, _sm_count()) if n_out % 2 == 0 else 1
        fn = compile_gemv_chunk(q, xq.n, rpw, experts, x_per_slot, accumulate, True)
        fn(gptr(Uint8, dw.ptr), gptr(Float32, xq.d.ptr), gptr(Int8, xq.qs.ptr), gptr(Float32, xq.d.ptr),
           gptr(Float32, y.ptr), gptr(Int32, di.ptr, 4), Int32(n_out), Int32(n_slots), cuda.CUstream(st.handle))
        return y
    fn = compile_gemv_q8(q, xq.n, rows, experts, x_per_slot, mapping, accumulate)
    fn(gptr(Uint8, dw.ptr), gptr(Int8, xq.qs.ptr), gptr(Float32, xq.d.ptr), gptr(Float32, xq.s.ptr),
       gptr(Float32, y.ptr), gptr(Int32, di.ptr, 4), Int32(n_out), Int32(n_slots), cuda.CUstream(st.handle))
    return y


def gemv_q8(w, qtype, x, n_out: int | None = None, out=None, stream=None, mapping: str = "auto",
            accumulate: bool = False):
    """y = x @ W.T through int8 activations: ``x`` is f32 (numpy/DeviceArray, quantized here) or a :class:`Q8Act`.
    numpy in -> numpy out ([rows, n_out] or [n_out]). ``accumulate=True``: ``out += x @ W.T`` (out required)."""
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into `out`: pass the residual buffer as out")
    from ..runtime import DeviceArray, default_stream

    st = stream if stream is not None else default_stream()
    x_np = isinstance(x, np.ndarray)
    if isinstance(x, Q8Act):
        xq = x
    else:
        xq = quantize_q8_1(DeviceArray.from_numpy(np.ascontiguousarray(x, np.float32)) if x_np else x, stream=st)
    n_out = int(w.shape[0]) if n_out is None else n_out
    y = _launch(w, qtype, xq, None, n_out, 1, False, False, out, st, mapping, accumulate)
    if x_np:
        r = y.to_numpy(stream=st)
        return r.reshape(n_out) if np.ndim(x) == 1 else r.reshape(-1, n_out)
    return y


def gemv_q8_experts(w, qtype, x, ids, n_out: int, x_per_slot: bool = False, out=None, stream=None):
    """Expert-indexed dp4a GEMV: y[j] = W[ids[j]] @ x[j if x_per_slot else 0]; returns [n_slots, n_out]."""
    from ..runtime import DeviceArray, as_device, default_stream

    st = stream if stream is not None else default_stream()
    x_np = isinstance(x, np.ndarray)
    xq = x if isinstance(x, Q8Act) else quantize_q8_1(
        DeviceArray.from_numpy(np.ascontiguousarray(x, np.float32)) if x_np else x, stream=st)
    di, _ = as_device(ids, st, np.int32)
    y = _launch(w, qtype, xq, di, n_out, int(np.prod(di.shape)), True, x_per_slot, out, st)
    return y.to_numpy(stream=st) if x_np else y


def registered_configs():
    from .gemv import DENSE_CONFIGS, EXPERT_CONFIGS

    cfgs = [dict(qtype=q, n_in=n, rows=1) for q, n in DENSE_CONFIGS if q in INT_QTYPES]
    cfgs += [dict(qtype=q, n_in=n, rows=1, experts=True, x_per_slot=p) for q, n, p in EXPERT_CONFIGS]
    cfgs += [dict(qtype="Q4_K", n_in=2048, rows=r) for r in (2, 4, 8)]
    cfgs += [dict(qtype=q, n_in=2048, rows=1, mapping="unit") for q in ("Q4_K", "Q6_K")]
    cfgs += [dict(qtype="Q4_K", n_in=n, rows=1, accumulate=True) for n in (512, 1024, 2048, 4096)]
    return cfgs


def _register():
    try:
        from .registry import register
    except ImportError:
        return
    register("gemv_q8", compile_gemv_q8, registered_configs())


_register()
