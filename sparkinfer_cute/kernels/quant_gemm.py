"""Grouped GEMM over raw GGUF-quantized weights with int8 (q8_1) activations, for batched prefill.

    Y[row, o] (+)= sum_i W[e(row), o, i] * deq(Xq)[xrow(row), i]        (plain / residual-accumulate epilogue)
    Y[row, o]    = act(Wg[e] x)[o] * (Wu[e] x)[o]                        (gated epilogue: SwiGLU / GeGLU)

One kernel family serves the dense projections of a prompt chunk (one group: QKV, O, dense FFN) and the MoE expert
FFN (a group per expert, token rows sorted by expert on the device: see ``tiles`` below). (Over 600 lines: one kernel
whose producer, consumers, six per-type A-fragment decoders and epilogues share the tile geometry.)

**Roles (warp-specialized, SM120 feature set: no WGMMA/TMEM/multicast, <= 99 KB smem).** A CTA is 4 consumer warps
and 1 producer warp. The producer streams K-tiles (256 elements: one K-quant superblock, or 8 blocks of a 32-block
type) of the weight rows and of the activation rows into a ring of ``stages`` shared-memory buffers with per-thread
asynchronous copies (``cp.async``, 16 bytes where the source is 16-byte aligned), each completing on the stage's
"full" mbarrier (``cp.async.mbarrier.arrive.noinc``); consumers release a stage through its "empty" mbarrier.
Why cp.async and not TMA: GGUF blocks are 144/176/212/34/22/18 bytes, so many (type, n_in) pairs give row strides
that are not multiples of 16 bytes (TMA needs that), and MoE activation rows are gathered by token id (TMA gather4
is SM100-only). Rows whose K-tile does not start 16-byte aligned are copied as the covering aligned 16-byte span
(the consumer adds the start offset), with the copy's source size clipped to the needed bytes, so nothing outside
the needed bytes past the tile is ever read.

**Math (llama.cpp MMQ style).** Weight quants are unpacked from shared memory into int8 ``mma.sync`` A fragments
(nibbles masked in place, 4 per 32-bit register); activations are the q8_1 int8 values (B fragments) of
:mod:`sparkinfer_cute.kernels.q8_1`. Each ``mma.sync.m16n8k32.s8`` (``m16n8k16`` for Q6_K, whose scales cover 16
elements) yields the exact integer dot of one scale group, which is scaled into the f32 accumulator:

    acc += (d_w * sc) * d_x * dot(q_w, q_x) - (dmin_w * m) * s_x

with ``s_x = d_x * sum(q_x)`` of the q8_1 block (the K-quant min term; for Q4_0/Q5_0 the zero point 8/16 is folded
into the same form with ``m = 8/16`` and ``dmin = d``; Q6_K's zero point 32 is subtracted from the quants in the
registers). The result equals a float64 GEMM of the dequantized weights against the dequantized int8 activations
up to f32 rounding of the scale products and of the accumulation (tests derive the bound).

**Tiles.** A CTA computes ``tile_rows`` weight rows x ``tile_tokens`` activation rows; 2x2 consumer warps. Gated:
the CTA's weight rows are ``tile_rows/2`` gate rows and the matching up rows, arranged so that each thread holds the
gate and up accumulators of the same (output, token) pairs: the GLU is applied in registers and only the
[rows, n_out] activation product reaches memory. Grid: (n_out / out_rows_per_cta, token tiles). Dense: token tile y
covers rows [y*tile_tokens, ...). Grouped (``experts``): ``tiles`` (int32 [max_tiles, 4]: expert, first sorted row,
valid rows, unused) and ``n_tiles`` (int32 [1]) are written on the device by the batched router, so there is no host
sync; CTAs past ``n_tiles`` exit and experts with no tokens have no tile. ``gather``: activation row of sorted row
``r`` is ``row_index[r]`` (the token id), else ``r``.
"""

from __future__ import annotations

import math

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, Int64, Uint8, Uint16, Uint32, const_expr, cute
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from .arch import pdl_enabled, smem_budget
from .common import aligned, cp_async, fake_ptr, gptr, mma_s8_m16n8k32, pdl_prologue
from .compile import compile_options, kernel_cache
from .quant_decode import check_weight_bytes, half_hi_to_f32, half_lo_to_f32, spec

K_TILE = 256  # elements of K per pipeline stage
CONSUMER_WARPS = 4
THREADS = 32 * (CONSUMER_WARPS + 1)
X_STRIDE = K_TILE + 16  # bytes per activation row in smem: 68 words = 4 mod 32, conflict-free B-fragment loads
SUPPORTED_QTYPES = ("Q4_K", "Q5_K", "Q6_K_P", "Q8_0", "Q5_0", "Q4_0")
GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.79788456080286535587989211986876


# ---------------------------------------------------------------------------------------------- PTX helpers
@dsl_user_op
def mma_s8_m16n8k16(a0, a1, b0, *, loc=None, ip=None):
    """D = A(16x16 s8, row) * B(16x8 s8, col), int32, from a zero accumulator: 4 Int32 per thread."""
    args = [Uint32(v).ir_value(loc=loc, ip=ip) for v in (a0, a1, b0)]
    zero = Int32(0).ir_value(loc=loc, ip=ip)
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32(), T.i32(), T.i32()]), args + [zero] * 4,
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {$0, $1, $2, $3}, {$4, $5}, {$6}, {$7, $8, $9, $10};",
        "=r,=r,=r,=r,r,r,r,r,r,r,r", loc=loc, ip=ip)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


def _spread4(b):
    """4 bits (Uint32 0..15) -> bit 4 of each byte: bit k -> bit 8k+4."""
    return ((b & 1) << 4) | ((b & 2) << 11) | ((b & 4) << 18) | ((b & 8) << 25)


def _sub32_bytes(q):
    """Packed bytes 0..63 -> packed signed int8 q - 32 (no carries between bytes)."""
    return (q & 0x1F1F1F1F) | (((q ^ 0xFFFFFFFF) & 0x20202020) * 7)


def _sext8(b):
    b = Int32(b)
    return b - ((b & 0x80) << 1)


# ---------------------------------------------------------------------------------------------- the kernel
class QuantGemm:
    """Static config: weight ``qtype``, ``n_in`` (K), tile sizes, ``stages``, ``gated`` + ``act`` ("silu" |
    "gelu_tanh"), ``experts`` (grouped), ``gather`` (sorted row -> activation row through ``row_index``),
    ``accumulate`` (Y += result; residual add), ``fused_gate_up`` (one [E, 2F, K] tensor: the up rows of expert e
    start F rows after its gate rows). ``n_out`` (weight rows per group; gated: per gate/up matrix) is a launch
    argument: a multiple of :attr:`out_rows`."""

    def __init__(self, qtype: str, n_in: int, *, tile_rows: int = 64, tile_tokens: int = 64,
                 stages: int = 0, gated: bool = False, act: str = "silu", experts: bool = False,
                 gather: bool = False, accumulate: bool = False, fused_gate_up: bool = False):
        if qtype not in SUPPORTED_QTYPES:
            raise ValueError(f"quant_gemm: unsupported weight type {qtype} (supported: {SUPPORTED_QTYPES})")
        self.pdl = pdl_enabled()
        self.qtype, self.sp = qtype, spec(qtype)
        self.k_quant = self.sp.block_elems == 256
        if n_in % 32 or (self.k_quant and n_in % 256):
            raise ValueError(f"quant_gemm: n_in {n_in} is not a multiple of the {qtype} block")
        assert tile_rows in (32, 64, 128) and tile_tokens in (16, 32, 64, 128)
        assert act in ("silu", "gelu_tanh")
        assert not (gated and accumulate)
        self.n_in = n_in
        # weight rows between consecutive groups (experts): n_out, or 2 * n_out for a fused [E, 2F, K] gate+up tensor
        # whose up rows start F rows after the gate rows (the caller passes that offset pointer as the up weights)
        self.stride_factor = 2 if fused_gate_up else 1
        self.tile_rows, self.tile_tokens = tile_rows, tile_tokens
        self.gated, self.act, self.experts, self.gather, self.accumulate = gated, act, experts, gather, accumulate
        # outputs per CTA along n_out: gated CTAs hold tile_rows/2 gate rows + the matching up rows
        self.out_rows = tile_rows // 2 if gated else tile_rows
        # 2x2 consumer warps; a warp owns m_tiles m16 tiles and n_tiles n8 tiles
        self.m_tiles = tile_rows // 32
        self.n_tiles = tile_tokens // 16
        assert self.m_tiles >= 1 and self.n_tiles >= 1 and (not gated or self.m_tiles % 2 == 0)
        self.n_ktiles = -(-n_in // K_TILE)
        # bytes of one row's K-tile in global memory (a full tile; the last may be shorter) and in smem
        self.tile_bytes = K_TILE // self.sp.block_elems * self.sp.block_bytes
        self.row_bytes = self.sp.row_bytes(n_in)
        # whether every row's K-tile starts 16-byte aligned (then the smem row offset is statically 0)
        self.w_aligned = self.row_bytes % 16 == 0 and self.tile_bytes % 16 == 0
        # 32-bit loads of the row's fields need every row's tile to start 4-byte aligned (an odd number of 32-element
        # blocks of 18/22/34 bytes leaves rows 2-byte aligned: then every A-fragment word is two 16-bit loads)
        self.w_align4 = self.row_bytes % 4 == 0 and self.tile_bytes % 4 == 0
        w_span = self.tile_bytes + (0 if self.w_aligned else 16)
        self.w_chunks = -(-w_span // 16)  # 16-byte copies per row per stage
        stride = self.w_chunks * 16
        while (stride // 4) % 8 != 4:  # 32-bit words per row = 4 mod 8: conflict-free A-fragment loads
            stride += 16
        self.w_stride = stride
        self.n_scale = n_in // 32  # q8_1 blocks per activation row
        self.scale_cp = math.gcd(self.n_scale * 4, 16)  # copy width of the activation scales (row stride alignment)
        self.stage_bytes = tile_rows * self.w_stride + tile_tokens * X_STRIDE + 2 * tile_tokens * 8 * 4
        if not stages:
            stages = 4
            while stages > 2 and stages * self.stage_bytes + 1024 > smem_budget():
                stages -= 1
        self.stages = stages
        if self.smem_bytes() > smem_budget():
            raise ValueError(f"quant_gemm config needs {self.smem_bytes()} B smem > budget {smem_budget()} B")

    def smem_bytes(self) -> int:
        return self.stages * self.stage_bytes + 2 * self.stages * 8 + 64

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, pW: cute.Pointer, pW2: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
                 pXs: cute.Pointer, pY: cute.Pointer, pRowIndex: cute.Pointer, pTiles: cute.Pointer,
                 pNTiles: cute.Pointer, n_rows: Int32, n_out: Int32, grid_y: Int32, stream: cuda.CUstream):
        self.kernel(pW, pW2, pXq, pXd, pXs, pY, pRowIndex, pTiles, pNTiles, n_rows, n_out).launch(
            grid=[n_out // self.out_rows, grid_y, 1], block=[THREADS, 1, 1], smem=self.smem_bytes(),
            stream=stream, use_pdl=self.pdl)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(self, pW: cute.Pointer, pW2: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer,
               pY: cute.Pointer, pRowIndex: cute.Pointer, pTiles: cute.Pointer, pNTiles: cute.Pointer,
               n_rows: Int32, n_out: Int32):
        pdl_prologue(self.pdl)
        S, BM, BN = self.stages, self.tile_rows, self.tile_tokens
        tid = cute.arch.thread_idx()[0]
        bx, by, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tid % 32

        # ---- which (group, rows) this CTA owns ----
        expert = Int32(0)
        row0 = by * BN
        n_valid = cutlass.min(Int32(BN), n_rows - row0)
        live = row0 < n_rows
        if const_expr(self.experts):
            mTiles = cute.make_tensor(pTiles, cute.make_layout((by + 1) * 4))
            mNT = cute.make_tensor(pNTiles, cute.make_layout(1))
            live = by < mNT[0]
            if live:
                expert = mTiles[by * 4]
                row0 = mTiles[by * 4 + 1]
                n_valid = mTiles[by * 4 + 2]

        # ---- shared memory: the stage ring + its mbarriers ----
        smem = cutlass.memory.SmemAllocator()
        sW = smem.allocate_tensor(Uint8, cute.make_layout(S * BM * self.w_stride), byte_alignment=128)
        sX = smem.allocate_tensor(Uint8, cute.make_layout(S * BN * X_STRIDE), byte_alignment=128)
        sXd = smem.allocate_tensor(Float32, cute.make_layout(S * BN * 8), byte_alignment=16)
        sXs = smem.allocate_tensor(Float32, cute.make_layout(S * BN * 8), byte_alignment=16)
        bars = smem.allocate_tensor(Int64, cute.make_layout(2 * S), byte_alignment=8)
        full = bars.iterator
        empty = bars.iterator + S
        if tid == 0:
            for s in cutlass.range_constexpr(S):
                cute.arch.mbarrier_init(full + s, 32)  # the producer warp's lanes (cp.async arrive.noinc)
                cute.arch.mbarrier_init(empty + s, 32 * CONSUMER_WARPS)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        if live:
            if warp == CONSUMER_WARPS:
                self.producer(lane, pW, pW2, pXq, pXd, pXs, pRowIndex, expert, row0, n_valid, bx, n_out, sW, sX,
                              sXd, sXs, full, empty)
            else:
                self.consumer(warp, lane, pY, expert, row0, n_valid, bx, n_out, sW, sX, sXd, sXs, full, empty)

    # ------------------------------------------------------------------ producer warp
    @cute.jit
    def producer(self, lane: Int32, pW: cute.Pointer, pW2: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
                 pXs: cute.Pointer, pRowIndex: cute.Pointer, expert: Int32, row0: Int32, n_valid: Int32, bx: Int32,
                 n_out: Int32, sW: cute.Tensor, sX: cute.Tensor, sXd: cute.Tensor, sXs: cute.Tensor,
                 full: cute.Pointer, empty: cute.Pointer):
        S, BM, BN = self.stages, self.tile_rows, self.tile_tokens
        K = self.n_in
        half = BM // 2
        o0 = bx * self.out_rows
        gbase = expert * (self.stride_factor * n_out) + o0  # first weight row of this CTA in its group
        mRowIndex = cute.make_tensor(pRowIndex, cute.make_layout(row0 + BN))
        for kt in cutlass.range(self.n_ktiles, unroll=1):
            st = kt % S
            cute.arch.mbarrier_wait(empty + st, ((kt // S) & 1) ^ 1)
            wbase = sW.iterator + st * (BM * self.w_stride)
            # weights: BM rows x w_chunks 16-byte copies, covering bytes [start, start + TB) of each row
            for c in cutlass.range(lane, BM * self.w_chunks, 32, unroll=1):
                r = c // self.w_chunks
                ch = c - r * self.w_chunks
                dst = wbase + (r * self.w_stride + ch * 16)
                if const_expr(self.gated):
                    if r < half:
                        self.copy_weight_chunk(dst, pW, gbase + r, kt, ch)
                    else:
                        self.copy_weight_chunk(dst, pW2, gbase + r - half, kt, ch)
                else:
                    self.copy_weight_chunk(dst, pW, gbase + r, kt, ch)
            # activations: BN rows x 16 copies of 16 bytes (int8 quants), zero-filled past the valid rows / K
            xbase = sX.iterator + st * (BN * X_STRIDE)
            for c in cutlass.range(lane, BN * 16, 32, unroll=1):
                i = c // 16
                ch = c - i * 16
                xrow = row0 + i
                if const_expr(self.gather):
                    xrow = mRowIndex[row0 + cutlass.min(i, n_valid - 1)]
                k0 = kt * K_TILE + ch * 16
                nbytes = Int32(16)
                if i >= n_valid:
                    nbytes = Int32(0)
                    xrow = Int32(0)
                if k0 >= K:
                    nbytes = Int32(0)
                    k0 = Int32(0)
                cp_async(xbase + (i * X_STRIDE + ch * 16), pXq + (Int64(xrow) * K + k0), 16, nbytes)
            # activation scales d and s: BN rows x 8 floats each
            per = self.scale_cp // 4  # floats per copy
            n_sc = 8 // per
            dbase = sXd.iterator + st * (BN * 8)
            sbase = sXs.iterator + st * (BN * 8)
            for c in cutlass.range(lane, BN * n_sc, 32, unroll=1):
                i = c // n_sc
                ch = c - i * n_sc
                xrow = row0 + i
                if const_expr(self.gather):
                    xrow = mRowIndex[row0 + cutlass.min(i, n_valid - 1)]
                b0 = kt * 8 + ch * per
                nbytes = cutlass.max(Int32(0), cutlass.min(Int32(self.scale_cp), (self.n_scale - b0) * 4))
                if i >= n_valid:
                    nbytes = Int32(0)
                    xrow = Int32(0)
                b0 = cutlass.min(b0, self.n_scale - per)  # keep the (unread) source address in bounds
                off = Int64(xrow) * self.n_scale + b0
                cp_async(dbase + (i * 8 + ch * per), pXd + off, self.scale_cp, nbytes)
                cp_async(sbase + (i * 8 + ch * per), pXs + off, self.scale_cp, nbytes)
            cute.arch.cp_async_mbarrier_arrive_noinc(full + st)

    def copy_weight_chunk(self, dst, src: cute.Pointer, grow, kt, ch):
        """16-byte chunk ``ch`` of the aligned span covering K-tile ``kt`` of global weight row ``grow``; the source
        size is clipped to the tile's bytes (zero fill past them), so no byte past the tile is read."""
        TB, RB = self.tile_bytes, self.row_bytes
        start = Int64(grow) * RB + Int64(kt * TB)
        tile_end = cutlass.min(start + Int64(TB), Int64(grow) * RB + Int64(RB))
        pos = start - (start & Int64(15)) + Int64(ch * 16)
        nbytes = cutlass.max(Int64(0), cutlass.min(Int64(16), tile_end - pos))
        pos = cutlass.select_(nbytes == Int64(0), Int64(0), pos)  # zero fill: an in-bounds (unread) source address
        cp_async(dst, src + pos, 16, Int32(nbytes))

    # ------------------------------------------------------------------ consumer warps
    @cute.jit
    def consumer(self, warp: Int32, lane: Int32, pY: cute.Pointer, expert: Int32, row0: Int32, n_valid: Int32,
                 bx: Int32, n_out: Int32, sW: cute.Tensor, sX: cute.Tensor, sXd: cute.Tensor, sXs: cute.Tensor,
                 full: cute.Pointer, empty: cute.Pointer):
        S, BM, BN = self.stages, self.tile_rows, self.tile_tokens
        MT, NT = self.m_tiles, self.n_tiles
        g = lane // 4
        tig = lane % 4
        wm = warp // 2
        wn = warp % 2
        o0 = bx * self.out_rows
        gbase = expert * (self.stride_factor * n_out) + o0
        # this thread's A-fragment rows, m tile i, half h (row g or g+8): (smem row, output row offset in the CTA)
        rows = []
        for i in cutlass.range_constexpr(MT):
            if const_expr(self.gated):
                # tiles 0..MT/2-1: gate rows of this warp's outputs; MT/2..: the same outputs' up rows
                part = i // (MT // 2)
                out_base = wm * (BM // 4) + (i % (MT // 2)) * 16
                smem_base = part * (BM // 2) + out_base
            else:
                out_base = wm * (BM // 2) + i * 16
                smem_base = out_base
            rows.append(((smem_base + g, out_base + g), (smem_base + g + 8, out_base + g + 8)))
        toks = [wn * (BN // 2) + j * 8 for j in range(NT)]
        acc = cute.make_rmem_tensor((MT, NT, 4), Float32)
        acc.fill(0.0)
        for kt in cutlass.range(self.n_ktiles, unroll=1):
            st = kt % S
            cute.arch.mbarrier_wait(full + st, (kt // S) & 1)
            w8 = sW.iterator + st * (BM * self.w_stride)
            x8 = sX.iterator + st * (BN * X_STRIDE)
            xd = sXd.iterator + st * (BN * 8)
            xs = sXs.iterator + st * (BN * 8)
            # per-row byte offset of the tile inside its smem row (0 when rows are 16-byte aligned)
            roff = []
            for i in cutlass.range_constexpr(MT):
                pair = []
                for h in cutlass.range_constexpr(2):
                    r, ro = rows[i][h]
                    off = Int32(0)
                    if const_expr(not self.w_aligned):
                        grow = Int64(gbase + ro)
                        off = Int32((grow * self.row_bytes + Int64(kt * self.tile_bytes)) & Int64(15))
                    pair.append(w8 + (r * self.w_stride + off))
                roff.append(pair)
            self.tile_math(roff, x8, xd, xs, toks, g, tig, acc)
            cute.arch.mbarrier_arrive(empty + st)
        self.epilogue(pY, acc, rows, toks, g, tig, wm, row0, n_valid, o0, n_out)

    @cute.jit
    def tile_math(self, rowp, x8: cute.Pointer, xd: cute.Pointer, xs: cute.Pointer, toks, g: Int32, tig: Int32,
                  acc: cute.Tensor):
        """All scale groups of one K-tile: unpack A, mma against each n8 tile, scale into acc."""
        MT, NT = self.m_tiles, self.n_tiles
        q = self.qtype
        x32 = cute.recast_ptr(x8, dtype=Uint32)
        mX = cute.make_tensor(x32, cute.make_layout(self.tile_tokens * X_STRIDE // 4))
        mXd = cute.make_tensor(xd, cute.make_layout(self.tile_tokens * 8))
        mXs = cute.make_tensor(xs, cute.make_layout(self.tile_tokens * 8))
        n_groups = 16 if q == "Q6_K_P" else 8  # scale groups per K-tile (k16 steps for Q6_K, k32 otherwise)
        if const_expr(not self.k_quant):
            n_groups = min(8, self.n_in // 32)  # (a partial last tile is zero-filled: its groups add 0)
        # per-row header values of the K-quant superblock (shared by all groups of the tile)
        hdr = [[self.row_header(rowp[i][h]) for h in range(2)] for i in range(MT)]
        for grp in cutlass.range_constexpr(n_groups):
            k32 = grp // 2 if q == "Q6_K_P" else grp
            # B fragments and token scales
            bfr = []
            dx = []
            sx = []
            for j in cutlass.range_constexpr(NT):
                t = toks[j] + g
                if const_expr(q == "Q6_K_P"):
                    kb = grp * 16 + tig * 4
                    bfr.append((mX[(t * X_STRIDE + kb) // 4],))
                else:
                    kb = k32 * 32 + tig * 4
                    bfr.append((mX[(t * X_STRIDE + kb) // 4], mX[(t * X_STRIDE + kb + 16) // 4]))
                tc = toks[j] + tig * 2
                dx.append((mXd[tc * 8 + k32], mXd[(tc + 1) * 8 + k32]))
                sx.append((mXs[tc * 8 + k32], mXs[(tc + 1) * 8 + k32]))
            for i in cutlass.range_constexpr(MT):
                afr, scale, minc = [], [], []
                for h in cutlass.range_constexpr(2):
                    a, sc, mn = self.a_fragment(rowp[i][h], hdr[i][h], grp, tig)
                    afr.append(a)
                    scale.append(sc)
                    minc.append(mn)
                for j in cutlass.range_constexpr(NT):
                    if const_expr(q == "Q6_K_P"):
                        c = mma_s8_m16n8k16(afr[0][0], afr[1][0], bfr[j][0])
                    else:
                        c = mma_s8_m16n8k32(afr[0][0], afr[1][0], afr[0][1], afr[1][1], bfr[j][0], bfr[j][1],
                                            0, 0, 0, 0)  # from a zero accumulator
                    # c0: (row g, tok 2tig), c1: (g, 2tig+1), c2: (g+8, 2tig), c3: (g+8, 2tig+1)
                    for e in cutlass.range_constexpr(4):
                        h = e // 2
                        tcol = e % 2
                        v = acc[i, j, e] + (scale[h] * dx[j][tcol]) * Float32(c[e])
                        if const_expr(minc[h] is not None):
                            v = v - minc[h] * sx[j][tcol]
                        acc[i, j, e] = v

    def _w32(self, p):
        return cute.make_tensor(cute.recast_ptr(p, dtype=Uint32), cute.make_layout(self.w_stride // 4))

    def _w16(self, p):
        return cute.make_tensor(cute.recast_ptr(p, dtype=Uint16), cute.make_layout(self.w_stride // 2))

    def _u32_at(self, p, byte_off: int):
        """32-bit little-endian word at a static byte offset of a row (2-byte aligned offsets use two u16 loads)."""
        if byte_off % 4 == 0 and self.w_align4:
            return Uint32(self._w32(p)[byte_off // 4])
        w16 = self._w16(p)
        return Uint32(w16[byte_off // 2]) | (Uint32(w16[byte_off // 2 + 1]) << 16)

    def row_header(self, p):
        """Per-row values shared by the tile's groups: K-quants (d, dmin, 3 scale words); Q6_K_P d."""
        q = self.qtype
        if q in ("Q4_K", "Q5_K"):
            w = self._w32(p)
            h0 = Uint32(w[0])
            return (half_lo_to_f32(h0), half_hi_to_f32(h0), Uint32(w[1]), Uint32(w[2]), Uint32(w[3]))
        if q == "Q6_K_P":
            return (half_lo_to_f32(Uint32(self._w32(p)[52])),)
        return ()

    def a_fragment(self, p, hdr, grp: int, tig: Int32):
        """(A-fragment registers (k lo[, k hi]), weight scale, min coefficient or None) of scale group ``grp``
        (static) for the row at smem pointer ``p``."""
        q = self.qtype
        if q in ("Q4_K", "Q5_K"):
            d, dmin, A, B, C = hdr
            j = grp
            # get_scale_min_k4(j) on the 12 scale bytes [A | B | C]
            if j < 4:
                sc = (A >> (8 * j)) & 63
                m = (B >> (8 * j)) & 63
            else:
                cc = (C >> (8 * (j - 4))) & 0xFF
                sc = (cc & 0xF) | (((A >> (8 * (j - 4))) >> 6 & 3) << 4)
                m = (cc >> 4) | (((B >> (8 * (j - 4))) >> 6 & 3) << 4)
            pair, nib = grp // 2, grp % 2
            qs0 = 16 if q == "Q4_K" else 48
            w = self._w32(p)
            lo = Uint32(w[(qs0 + 32 * pair) // 4 + tig])
            hi = Uint32(w[(qs0 + 32 * pair + 16) // 4 + tig])
            a_lo = (lo >> (4 * nib)) & 0x0F0F0F0F
            a_hi = (hi >> (4 * nib)) & 0x0F0F0F0F
            if const_expr(q == "Q5_K"):
                qh_lo = Uint32(w[16 // 4 + tig])
                qh_hi = Uint32(w[(16 + 16) // 4 + tig])
                a_lo = a_lo | (((qh_lo >> grp) & 0x01010101) << 4)
                a_hi = a_hi | (((qh_hi >> grp) & 0x01010101) << 4)
            return (a_lo, a_hi), d * Float32(Int32(sc)), dmin * Float32(Int32(m))
        if q == "Q6_K_P":
            (d,) = hdr
            u = grp  # 16-element group: e = 16u + l, l < 16
            n, qq, l0 = u // 8, (u // 2) % 4, 16 * (u % 2)
            w = self._w32(p)
            ql = Uint32(w[(64 * n + 32 * (qq % 2) + l0) // 4 + tig])
            qh = Uint32(w[(128 + 32 * n + l0) // 4 + tig])
            qv = ((ql >> (4 * (qq // 2))) & 0x0F0F0F0F) | (((qh >> (2 * qq)) & 0x03030303) << 4)
            sbyte_off = 192 + 8 * n + 2 * qq + (u % 2)
            sword = Uint32(w[sbyte_off // 4])
            sc = _sext8((sword >> (8 * (sbyte_off % 4))) & 0xFF)
            return (_sub32_bytes(qv),), d * Float32(sc), None
        # 32-element blocks: block ``grp`` of the tile
        bb = self.sp.block_bytes
        base = grp * bb
        d = half_lo_to_f32(Uint32(self._w16(p)[base // 2]))
        if q == "Q8_0":
            lo = self._u32_at_rt(p, base + 2, tig)
            hi = self._u32_at_rt(p, base + 2 + 16, tig)
            return (lo, hi), d, None
        if q == "Q5_0":
            qh = self._u32_at(p, base + 2)
            qs = self._u32_at_rt(p, base + 6, tig)
            sh = Uint32(tig) * 4
            a_lo = (qs & 0x0F0F0F0F) | _spread4((qh >> sh) & 0xF)
            a_hi = ((qs >> 4) & 0x0F0F0F0F) | _spread4((qh >> (sh + 16)) & 0xF)
            return (a_lo, a_hi), d, d * Float32(16.0)
        # Q4_0
        qs = self._u32_at_rt(p, base + 2, tig)
        return (qs & 0x0F0F0F0F, (qs >> 4) & 0x0F0F0F0F), d, d * Float32(8.0)

    def _u32_at_rt(self, p, byte_off: int, tig):
        """Word at static byte offset + 4*tig (runtime lane part)."""
        if byte_off % 4 == 0 and self.w_align4:
            return Uint32(self._w32(p)[byte_off // 4 + tig])
        w16 = self._w16(p)
        i = byte_off // 2 + tig * 2
        return Uint32(w16[i]) | (Uint32(w16[i + 1]) << 16)

    @cute.jit
    def epilogue(self, pY: cute.Pointer, acc: cute.Tensor, rows, toks, g: Int32, tig: Int32, wm: Int32,
                 row0: Int32, n_valid: Int32, o0: Int32, n_out: Int32):
        MT, NT = self.m_tiles, self.n_tiles
        mY = cute.make_tensor(pY, cute.make_layout((row0 + self.tile_tokens) * n_out))
        if const_expr(self.gated):
            half = MT // 2
            for i in cutlass.range_constexpr(half):
                for j in cutlass.range_constexpr(NT):
                    for e in cutlass.range_constexpr(4):
                        t = toks[j] + tig * 2 + e % 2
                        o = o0 + wm * (self.tile_rows // 4) + i * 16 + g + 8 * (e // 2)
                        gv = acc[i, j, e]
                        uv = acc[i + half, j, e]
                        a = Float32(0.0)
                        if const_expr(self.act == "silu"):
                            a = gv / (Float32(1.0) + cute.math.exp(-gv))
                        else:
                            inner = Float32(SQRT_2_OVER_PI) * gv * (Float32(1.0) + Float32(GELU_COEF_A) * gv * gv)
                            a = Float32(0.5) * gv * (Float32(1.0) + cute.math.tanh(inner))
                        if t < n_valid:
                            mY[(row0 + t) * n_out + o] = a * uv
        else:
            for i in cutlass.range_constexpr(MT):
                for j in cutlass.range_constexpr(NT):
                    for e in cutlass.range_constexpr(4):
                        t = toks[j] + tig * 2 + e % 2
                        o = o0 + rows[i][e // 2][1]
                        if t < n_valid:
                            yi = (row0 + t) * n_out + o
                            if const_expr(self.accumulate):
                                mY[yi] = mY[yi] + acc[i, j, e]
                            else:
                                mY[yi] = acc[i, j, e]


@kernel_cache
def compile_quant_gemm(qtype: str, n_in: int, tile_rows: int = 64, tile_tokens: int = 64, stages: int = 0,
                       gated: bool = False, act: str = "silu", experts: bool = False, gather: bool = False,
                       accumulate: bool = False, fused_gate_up: bool = False):
    k = QuantGemm(qtype, n_in, tile_rows=tile_rows, tile_tokens=tile_tokens, stages=stages, gated=gated,
                  act=act, experts=experts, gather=gather, accumulate=accumulate, fused_gate_up=fused_gate_up)
    return cute.compile(k, fake_ptr(Uint8), fake_ptr(Uint8), fake_ptr(Int8), fake_ptr(Float32), fake_ptr(Float32),
                        fake_ptr(Float32), fake_ptr(Int32, 4), fake_ptr(Int32, 4), fake_ptr(Int32, 4), Int32(1), Int32(64), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


# ---------------------------------------------------------------------------------------------- host side
def max_grouped_tiles(n_assignments: int, n_expert: int, tile_tokens: int) -> int:
    """Upper bound of the tile count of a grouped GEMM (the launch's grid.y; surplus CTAs exit)."""
    return -(-n_assignments // tile_tokens) + min(n_expert, n_assignments)


def quant_gemm(w, qtype: str, xq, n_out: int, *, out=None, w_up=None, act: str = "silu", accumulate: bool = False,
               tiles=None, n_tiles=None, max_tiles: int | None = None, row_index=None, n_rows: int | None = None,
               tile_rows: int = 64, tile_tokens: int = 64, stages: int = 0, fused_gate_up: bool = False,
               stream=None):
    """Launch :class:`QuantGemm`. ``w``: raw GGUF weight bytes on the device ([groups * n_out, row_bytes]);
    ``xq``: a q8_1 ``Q8Act`` ([rows, n_in]). ``w_up`` given: gated (``out = act(W x) * (W_up x)``).

    Dense (``tiles`` None): ``out[r, :] (+)= W xq[r]`` for the ``n_rows`` (default all) rows of ``xq``.
    Grouped: ``tiles``/``n_tiles`` device int32 tables (``reference.kernel_refs.grouped_tiles_host`` layout, written by the router on
    the device), ``max_tiles`` the launch bound; ``row_index`` (sorted row -> activation row) gathers the activation
    rows, else sorted row r reads row r. ``out`` rows are sorted rows. Returns ``out``.

    Launch knobs (the autotuner's ``quant_gemm`` configs): ``tile_rows``, ``tile_tokens`` and ``stages`` (0: the
    most that fit the shared-memory budget). A grouped launch's ``tile_tokens`` must be the tile its routing tables
    were built for (``moe_route.moe_align``)."""
    from ..runtime import DeviceArray, default_stream

    st = stream if stream is not None else default_stream()
    q = qtype.upper()
    n_in = xq.n
    grouped = tiles is not None
    rows = xq.rows if n_rows is None else n_rows
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds into `out`: pass it")
        out_rows = xq.rows if not grouped or row_index is None else int(np.prod(row_index.shape))
        out = DeviceArray.empty((out_rows, n_out), np.float32)
    if fused_gate_up:
        if (n_out * spec(q).row_bytes(n_in)) % 16:
            raise ValueError(f"fused gate+up {q}: the up rows must start 16-byte aligned (n_out {n_out}, n_in {n_in})")
        w_up = w.view(np.uint8, offset_bytes=n_out * spec(q).row_bytes(n_in))
    out_rows = tile_rows // 2 if w_up is not None else tile_rows
    # n_in is the q8_1 input's width: an input wider than the weight's rows (a per-layer width mixed up) would walk
    # past the allocation instead of failing
    check_weight_bytes(w, q, n_out * (2 if fused_gate_up else 1), n_in, groups_any=grouped)
    if w_up is not None and not fused_gate_up:
        check_weight_bytes(w_up, q, n_out, n_in, groups_any=grouped)
    if n_out % out_rows:
        raise ValueError(f"quant_gemm: n_out {n_out} is not a multiple of {out_rows} rows per CTA")
    fn = compile_quant_gemm(q, n_in, tile_rows, tile_tokens, stages, w_up is not None, act, grouped,
                            row_index is not None, accumulate, fused_gate_up)
    grid_y = int(max_tiles) if grouped else -(-rows // tile_tokens)
    if grid_y == 0:
        return out
    if grid_y > 65535:
        raise ValueError(f"quant_gemm: {grid_y} token tiles exceed the grid's 65535 rows (fewer rows per launch)")
    if int(np.prod(out.shape)) >= 2**31:  # output offsets are 32-bit in the kernel
        raise ValueError(f"quant_gemm: an output of {int(np.prod(out.shape))} values needs 64-bit offsets "
                         "(a smaller chunk: e.g. the all-positions LM head over a large vocabulary)")
    dummy = xq.d
    # compiled with 16-byte pointer alignment (128-bit loads): a misaligned view would fault, so refuse it here
    for a, what in ((w, "w"), (w_up, "w_up"), (xq.qs, "xq.qs"), (xq.d, "xq.d"), (xq.s, "xq.s"), (out, "out")):
        if a is not None:
            aligned(a, f"quant_gemm {what}")
    p = lambda dt, a, align=16: cute.runtime.make_ptr(dt, a.ptr, cute.AddressSpace.gmem, assumed_align=align)  # noqa
    fn(p(Uint8, w), p(Uint8, w_up if w_up is not None else w), p(Int8, xq.qs), p(Float32, xq.d), p(Float32, xq.s),
       p(Float32, out), p(Int32, row_index if row_index is not None else dummy, 4),
       p(Int32, tiles if grouped else dummy, 4), p(Int32, n_tiles if grouped else dummy, 4), Int32(rows),
       Int32(n_out), Int32(grid_y), cuda.CUstream(st.handle))
    return out


# ---------------------------------------------------------------------------------------------- compile gate
def registered_configs():
    """The model shapes (n_out is a launch argument): Qwen3-30B-A3B Q4_K_M (q/k/v/o, experts gate+up SwiGLU and
    down, Q4_K or Q6_K_P), Gemma 3 270M Q4_K_M (q/k/v and gate+up GeGLU Q5_0/Q8_0 at n_in 640, o and down Q4_K /
    Q6_K_P), Gemma 4 26B-A4B (n_in 2816: attention and fused expert gate+up GeGLU; experts down Q5_0/Q8_0 at 704,
    dense down at 2112), and the synthetic tiny shapes of gguf/synth.py."""
    dense = [("Q4_K", 2048), ("Q6_K_P", 2048), ("Q4_K", 4096), ("Q5_0", 640), ("Q8_0", 640), ("Q4_K", 1024),
             ("Q4_K", 2816), ("Q6_K_P", 2816), ("Q4_K", 4096), ("Q5_0", 2112), ("Q8_0", 2112), ("Q4_K", 256),
             ("Q4_K", 512), ("Q4_K", 768), ("Q6_K_P", 256)]
    c = [dict(qtype=q, n_in=n) for q, n in sorted(set(dense))]
    c += [dict(qtype="Q4_K", n_in=n, accumulate=True) for n in (512, 4096)]
    c += [dict(qtype=q, n_in=640, gated=True, act="gelu_tanh") for q in ("Q5_0", "Q8_0")]
    c += [dict(qtype="Q4_K", n_in=2816, gated=True, act="gelu_tanh")]
    c += [dict(qtype="Q4_K", n_in=n, gated=True, experts=True, gather=True, tile_tokens=32) for n in (256, 2048)]
    c += [dict(qtype="Q4_K", n_in=2816, gated=True, act="gelu_tanh", experts=True, gather=True, tile_tokens=32,
               fused_gate_up=True)]
    c += [dict(qtype=q, n_in=n, experts=True, tile_tokens=32) for q, n in
          (("Q4_K", 768), ("Q6_K_P", 768), ("Q4_K", 256), ("Q5_0", 704), ("Q8_0", 704))]
    return [dict(dict(tile_rows=64, tile_tokens=64), **x) for x in c]


def _register():
    from .registry import register

    register("quant_gemm", compile_quant_gemm, registered_configs())


_register()
