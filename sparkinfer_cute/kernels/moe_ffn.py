"""Fused selected-expert MoE FFN for decode (one token), over raw GGUF expert weights.

    y = [resid +] sum_j w_j * Wdown[e_j] · (silu(Wgate[e_j] · h) * (Wup[e_j] · h)),   j = 0..k-1

Two launches, both reading the selected expert ids (and router weights) from device memory (CUDA-graph safe, no host
sync):

- **MoeGateUp** (kernel A): grid (ceil(n_ff / WARPS), k). A warp owns one row o of one selected expert and
  computes *both* the gate row and the up row with the same activation loads (lanes over quant_decode.py slices), then applies SwiGLU in registers and
  writes ``act[j, o]``. Only the [k, n_ff] activations reach memory (no [tokens, 2*n_ff] intermediate). Supports
  separate ``ffn_gate_exps``/``ffn_up_exps`` tensors and the fused ``ffn_gate_up_exps`` layout ([E, 2*n_ff, n_in]:
  gate rows first, then up rows, per expert).
- **MoeDown** (kernel B): grid ceil(n_out / WARPS). A warp owns output row o and sweeps the (slot, slice) pairs of
  all k experts with its 32 lanes (quant_decode.py slices: coalesced 4-byte weight and 16-byte activation loads);
  each lane adds ``w_j * (unit dot)`` to its private accumulator in a
  fixed order, then one butterfly reduction: deterministic, no atomics. Optionally adds the residual.

Shapes: Qwen3-30B-A3B: k=8 of 128 experts, n_embd 2048, n_ff_exp 768 (gate/up Q4_K, down Q4_K or Q6_K).

Chunk variants (:class:`MoeGateUpChunk`, :class:`MoeDownChunk`; float or dp4a; the default in the wrappers for
Q4_K / Q6_K / Q6_K_P): the gemv.py chunk mapping, all weight loads of a lane in flight before the math. H100 (Qwen3
8x2048/768): gate+up+SwiGLU dp4a 7.8 µs (slice float 19.9), down Q6_K_P dp4a 6.3-6.4 µs (slice float 10.9).

Error: every dot is a GEMV row (see gemv.py for its bound); SwiGLU uses the fast exp (ex2.approx, rel err ~2^-22).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, Uint8, cute

from .arch import pdl_enabled
from .common import aligned, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .gemv import WARPS, as_device_bytes, chunk_ok, chunk_rows_partial
from .quant_decode import (
    INT_QTYPES,
    CHUNKS_PER_BLOCK,
    Tiling,
    chunk_dot_f32,
    chunk_dot_q8,
    chunk_load,
    chunk_supported,
    chunk_x_f32,
    chunk_x_q8,
    dot_values,
    load_x_runs,
    qtype_name,
    spec,
    x_sums_f32,
)

# Rows per warp of the chunk kernels, from the H100 microbench (2026-11-25, Qwen3 8x2048/768, µs rpw1 / rpw2):
# gate+up float 11.7 / 11.3, dp4a 7.8 / 9.0; down float Q4_K 9.1 / 7.6, Q6_K_P 11.1 / 8.9, Q6_K 9.0 / 10.7;
# down dp4a Q4_K 7.1 / 7.1, Q6_K_P 6.1 / 8.5, Q6_K 7.7 / 10.2. None (the default) picks the faster one.
GATE_UP_RPW = None
DOWN_RPW = None


def gate_up_rpw(q8: bool) -> int:
    return 1 if q8 else 2


def down_rpw(qtype: str, q8: bool) -> int:
    return 2 if (not q8 and qtype in ("Q4_K", "Q6_K_P")) else 1


def silu(g: Float32) -> Float32:
    return g / (Float32(1.0) + cute.math.exp(-g, fastmath=True))


class MoeGateUp:
    def __init__(self, qtype: str, n_in: int, n_ff: int, fused: bool = False):
        self.pdl = pdl_enabled()
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, "slice")
        assert n_in % self.sp.block_elems == 0
        self.n_in, self.n_ff, self.fused = n_in, n_ff, fused
        # rows per expert in the weight tensor(s), and where the up rows start inside an expert
        self.expert_rows = 2 * n_ff if fused else n_ff
        self.up_row0 = n_ff if fused else 0

    @cute.jit
    def __call__(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pIds: cute.Pointer,
                 pAct: cute.Pointer, n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pWg, pWu, pX, pIds, pAct).launch(
            grid=[cute.ceil_div(self.n_ff, WARPS), n_slots, 1], block=[WARPS * 32, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pIds: cute.Pointer,
               pAct: cute.Pointer):
        pdl_prologue(self.pdl)
        sp = self.sp
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        warp, lane = tid // 32, tid % 32
        o = bx * WARPS + warp
        nbpr = self.n_in // sp.block_elems
        upb = self.tiling.per_block
        if o < self.n_ff:
            ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
            e = ids[slot]
            g_blk0 = (e * self.expert_rows + o) * nbpr
            u_blk0 = (e * self.expert_rows + self.up_row0 + o) * nbpr
            acc_g = Float32(0.0)
            acc_u = Float32(0.0)
            wg = self.tiling.buffer()
            wu = self.tiling.buffer()
            for U in cutlass.range(lane, nbpr * upb, 32, unroll=2):
                kb = U // upb
                u = U - kb * upb
                self.tiling.decode(pWg, g_blk0 + kb, u, wg, exact=False)
                self.tiling.decode(pWu, u_blk0 + kb, u, wu, exact=False)
                xr = load_x_runs(self.tiling, pX, kb * sp.block_elems + self.tiling.base(u))  # shared by the gate and up rows
                acc_g = acc_g + dot_values(wg, xr, self.tiling.elems)
                acc_u = acc_u + dot_values(wu, xr, self.tiling.elems)
            g = warp_reduce_sum(acc_g)
            up = warp_reduce_sum(acc_u)
            if lane == 0:
                act = cute.make_tensor(pAct, cute.make_layout((slot + 1) * self.n_ff))
                act[slot * self.n_ff + o] = silu(g) * up


class MoeDown:
    """``wpr`` warps per output row (1/2/4): the row's (slot, slice) steps are split over ``wpr`` warps and their
    partial sums added in a fixed order through shared memory (2048 rows alone give only ~16 warps per SM)."""

    def __init__(self, qtype: str, n_ff: int, n_out: int, add_residual: bool = False, wpr: int = 2):
        self.pdl = pdl_enabled()
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, "slice")
        assert n_ff % self.sp.block_elems == 0
        assert wpr in (1, 2, 4)
        self.n_ff, self.n_out, self.add_residual, self.wpr = n_ff, n_out, add_residual, wpr
        self.rows_per_cta = WARPS // wpr

    @cute.jit
    def __call__(self, pW: cute.Pointer, pAct: cute.Pointer, pIds: cute.Pointer, pWeights: cute.Pointer,
                 pResid: cute.Pointer, pY: cute.Pointer, n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pW, pAct, pIds, pWeights, pResid, pY, n_slots).launch(
            grid=[cute.ceil_div(self.n_out, self.rows_per_cta), 1, 1], block=[WARPS * 32, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pAct: cute.Pointer, pIds: cute.Pointer, pWeights: cute.Pointer,
               pResid: cute.Pointer, pY: cute.Pointer, n_slots: Int32):
        pdl_prologue(self.pdl)
        sp = self.sp
        wpr = self.wpr
        tid = cute.arch.thread_idx()[0]
        bx = cute.arch.block_idx()[0]
        warp, lane = tid // 32, tid % 32
        kpart = warp % wpr
        o = bx * self.rows_per_cta + warp // wpr
        nbpr = self.n_ff // sp.block_elems
        upb = self.tiling.per_block
        upr = nbpr * upb
        acc = Float32(0.0)
        if o < self.n_out:
            ids = cute.make_tensor(pIds, cute.make_layout(n_slots))
            wts = cute.make_tensor(pWeights, cute.make_layout(n_slots))
            w = self.tiling.buffer()
            for V in cutlass.range(lane + 32 * kpart, n_slots * upr, 32 * wpr, unroll=2):
                j = V // upr
                U = V - j * upr
                kb = U // upb
                u = U - kb * upb
                blk0 = (ids[j] * self.n_out + o) * nbpr
                self.tiling.decode(pW, blk0 + kb, u, w, exact=False)
                xr = load_x_runs(self.tiling, pAct, j * self.n_ff + kb * sp.block_elems + self.tiling.base(u))
                acc = acc + wts[j] * dot_values(w, xr, self.tiling.elems)
        total = warp_reduce_sum(acc)
        smem = cutlass.memory.SmemAllocator()
        part = smem.allocate_tensor(Float32, cute.make_layout(WARPS), byte_alignment=16)
        if cutlass.const_expr(wpr > 1):
            if lane == 0:
                part[warp] = total
            cute.arch.barrier()
        if o < self.n_out:  # noqa: SIM102 (runtime conditions, kept as nested DSL ifs)
            if tid % (32 * wpr) == 0:  # lane 0 of the row's first warp: add the other warps' partials in order
                for k in cutlass.range_constexpr(1, wpr):
                    total = total + part[warp + k]
                mY = cute.make_tensor(pY, cute.make_layout(self.n_out))
                if cutlass.const_expr(self.add_residual):
                    mR = cute.make_tensor(pResid, cute.make_layout(self.n_out))
                    total = total + mR[o]
                mY[o] = total


@kernel_cache
def compile_moe_gate_up(qtype: str, n_in: int, n_ff: int, fused: bool = False):
    return cute.compile(MoeGateUp(qtype, n_in, n_ff, fused), gptr(Uint8, 0), gptr(Uint8, 0), gptr(Float32, 0),
                        gptr(Int32, 0, 4), gptr(Float32, 0), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


@kernel_cache
def compile_moe_down(qtype: str, n_ff: int, n_out: int, add_residual: bool = False, wpr: int = 2):
    return cute.compile(MoeDown(qtype, n_ff, n_out, add_residual, wpr), gptr(Uint8, 0), gptr(Float32, 0),
                        gptr(Int32, 0, 4), gptr(Float32, 0, 4), gptr(Float32, 0), gptr(Float32, 0), Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


def moe_gate_up(w_gate, w_up, qtype, h, ids, n_ff: int, out=None, stream=None, mapping: str = "auto",
                rpw: int | None = GATE_UP_RPW):
    """act[j] = silu(Wgate[ids[j]] · h) * (Wup[ids[j]] · h) -> [k, n_ff] f32.

    ``w_gate``/``w_up``: [E, n_ff, row_bytes] raw bytes; pass ``w_up=None`` and the fused ``ffn_gate_up_exps``
    tensor ([E, 2*n_ff, row_bytes]) as ``w_gate``. numpy in -> numpy out."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    dh, h_np = as_device(h, st, np.float32)
    di, _ = as_device(ids, st, np.int32)
    k = int(np.prod(di.shape))
    n_in = int(dh.shape[-1])
    dg = as_device_bytes(w_gate, st)
    fused = w_up is None
    du = dg if fused else as_device_bytes(w_up, st)
    rb = spec(q).row_bytes(n_in)
    for a in (dg, du):
        if a.nbytes % ((2 if fused else 1) * n_ff * rb):
            raise ValueError(f"expert weight of {a.nbytes} bytes is not whole experts of {n_ff} x {n_in} {q}")
    act = out if out is not None else DeviceArray.empty((k, n_ff), np.float32)
    if mapping == "auto" and chunk_ok(q, n_in):
        fn = compile_moe_gate_up_chunk(q, n_in, n_ff, fused, False, rpw or gate_up_rpw(False))
        fn(gptr(Uint8, aligned(dg, "w_gate").ptr), gptr(Uint8, aligned(du, "w_up").ptr),
           gptr(Float32, aligned(dh, "h").ptr), gptr(Int8, dh.ptr), gptr(Float32, dh.ptr), gptr(Int32, di.ptr, 4),
           gptr(Float32, aligned(act, "act").ptr), Int32(k), cuda.CUstream(st.handle))
        return act.to_numpy(stream=st) if h_np else act
    fn = compile_moe_gate_up(q, n_in, n_ff, fused)
    fn(gptr(Uint8, aligned(dg, "w_gate").ptr), gptr(Uint8, aligned(du, "w_up").ptr),
       gptr(Float32, aligned(dh, "h").ptr), gptr(Int32, di.ptr, 4), gptr(Float32, aligned(act, "act").ptr),
       Int32(k), cuda.CUstream(st.handle))
    return act.to_numpy(stream=st) if h_np else act


def moe_down(w_down, qtype, act, ids, weights, n_out: int, resid=None, out=None, stream=None,
             mapping: str = "auto", rpw: int | None = DOWN_RPW):
    """y = [resid +] sum_j weights[j] * Wdown[ids[j]] · act[j] -> [n_out] f32 (fixed summation order).

    ``w_down``: [E, n_out, row_bytes(n_ff)] raw bytes; ``act``: [k, n_ff]. ``out`` may alias ``resid``
    (in-place residual add)."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    da, a_np = as_device(act, st, np.float32)
    di, _ = as_device(ids, st, np.int32)
    dwt, _ = as_device(weights, st, np.float32)
    k, n_ff = int(np.prod(di.shape)), int(da.shape[-1])
    dw = as_device_bytes(w_down, st)
    if dw.nbytes % (n_out * spec(q).row_bytes(n_ff)):
        raise ValueError(f"down weight of {dw.nbytes} bytes is not whole experts of {n_out} x {n_ff} {q}")
    dr = None
    if resid is not None:
        dr, _ = as_device(resid, st, np.float32)
    y = out if out is not None else DeviceArray.empty((n_out,), np.float32)
    if mapping == "auto" and down_chunk_ok(q, n_ff, k):
        fn = compile_moe_down_chunk(q, n_ff, n_out, k, dr is not None, False, rpw or down_rpw(q, False))
        fn(gptr(Uint8, aligned(dw, "w_down").ptr), gptr(Float32, aligned(da, "act").ptr), gptr(Int8, da.ptr),
           gptr(Float32, da.ptr), gptr(Int32, di.ptr, 4), gptr(Float32, dwt.ptr, 4),
           gptr(Float32, (dr if dr is not None else y).ptr), gptr(Float32, y.ptr), cuda.CUstream(st.handle))
        return y.to_numpy(stream=st) if a_np else y
    fn = compile_moe_down(q, n_ff, n_out, dr is not None)
    fn(gptr(Uint8, aligned(dw, "w_down").ptr), gptr(Float32, aligned(da, "act").ptr), gptr(Int32, di.ptr, 4),
       gptr(Float32, dwt.ptr, 4), gptr(Float32, (dr if dr is not None else y).ptr), gptr(Float32, y.ptr),
       Int32(k), cuda.CUstream(st.handle))
    return y.to_numpy(stream=st) if a_np else y


def moe_ffn(w_gate, w_up, w_down, qtype_gate_up, qtype_down, h, ids, weights, n_ff: int, resid=None, stream=None):
    """Both kernels: y = [resid +] sum_j w_j Wdown[e_j] (silu(Wgate[e_j] h) * (Wup[e_j] h)). numpy in -> numpy out."""
    n_out = int(np.shape(h)[-1]) if not hasattr(h, "ptr") else int(h.shape[-1])
    act = moe_gate_up(w_gate, w_up, qtype_gate_up, h, ids, n_ff, stream=stream)
    return moe_down(w_down, qtype_down, act, ids, weights, n_out, resid=resid, stream=stream)


# ---------------------------------------------------------------------------------------------------------------
# int8-activation (dp4a) variants: h and the activations quantized to q8_1 (q8_1.py), weights dotted with dp4a
# (gemv_q8.py groups). Three launches: gate/up + SwiGLU (input: the q8_1 of h, shared with other consumers of the
# same norm output), quantize_q8_1(act), down + weighted sum. Same work split and fixed-order reductions as above.


class MoeGateUpQ8:
    def __init__(self, qtype: str, n_in: int, n_ff: int, fused: bool = False):
        self.pdl = pdl_enabled()
        assert qtype in INT_QTYPES
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, "slice")
        assert n_in % self.sp.block_elems == 0
        self.n_in, self.n_ff, self.fused = n_in, n_ff, fused
        self.expert_rows = 2 * n_ff if fused else n_ff
        self.up_row0 = n_ff if fused else 0

    @cute.jit
    def __call__(self, pWg: cute.Pointer, pWu: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
                 pXs: cute.Pointer, pIds: cute.Pointer, pAct: cute.Pointer, n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pWg, pWu, pXq, pXd, pXs, pIds, pAct).launch(
            grid=[cute.ceil_div(self.n_ff, WARPS), n_slots, 1], block=[WARPS * 32, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pWg: cute.Pointer, pWu: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer,
               pIds: cute.Pointer, pAct: cute.Pointer):
        pdl_prologue(self.pdl)
        from .gemv_q8 import decode_int_slice, group_dot

        sp = self.sp
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        warp, lane = tid // 32, tid % 32
        o = bx * WARPS + warp
        nbpr = self.n_in // sp.block_elems
        upb = self.tiling.per_block
        if o < self.n_ff:
            ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
            e = ids[slot]
            g_blk0 = (e * self.expert_rows + o) * nbpr
            u_blk0 = (e * self.expert_rows + self.up_row0 + o) * nbpr
            acc_g = Float32(0.0)
            acc_u = Float32(0.0)
            for U in cutlass.range(lane, nbpr * upb, 32, unroll=2):
                kb = U // upb
                u = U - kb * upb
                xb = kb * sp.block_elems + self.tiling.base(u)
                for g in decode_int_slice(self.qtype, pWg, g_blk0 + kb, u):
                    acc_g = acc_g + group_dot(g, pXq, pXd, pXs, 0, xb, 0)
                for g in decode_int_slice(self.qtype, pWu, u_blk0 + kb, u):
                    acc_u = acc_u + group_dot(g, pXq, pXd, pXs, 0, xb, 0)
            gs = warp_reduce_sum(acc_g)
            us = warp_reduce_sum(acc_u)
            if lane == 0:
                act = cute.make_tensor(pAct, cute.make_layout((slot + 1) * self.n_ff))
                act[slot * self.n_ff + o] = silu(gs) * us


class MoeDownQ8:
    def __init__(self, qtype: str, n_ff: int, n_out: int, add_residual: bool = False, wpr: int = 2):
        self.pdl = pdl_enabled()
        assert qtype in INT_QTYPES and wpr in (1, 2, 4)
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, "slice")
        assert n_ff % self.sp.block_elems == 0
        self.n_ff, self.n_out, self.add_residual, self.wpr = n_ff, n_out, add_residual, wpr
        self.rows_per_cta = WARPS // wpr

    @cute.jit
    def __call__(self, pW: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer,
                 pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer, n_slots: Int32,
                 stream: cuda.CUstream):
        self.kernel(pW, pAq, pAd, pAs, pIds, pWeights, pResid, pY, n_slots).launch(
            grid=[cute.ceil_div(self.n_out, self.rows_per_cta), 1, 1], block=[WARPS * 32, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer, pIds: cute.Pointer,
               pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer, n_slots: Int32):
        pdl_prologue(self.pdl)
        from .gemv_q8 import decode_int_slice, group_dot

        sp = self.sp
        wpr = self.wpr
        tid = cute.arch.thread_idx()[0]
        bx = cute.arch.block_idx()[0]
        warp, lane = tid // 32, tid % 32
        kpart = warp % wpr
        o = bx * self.rows_per_cta + warp // wpr
        nbpr = self.n_ff // sp.block_elems
        upb = self.tiling.per_block
        upr = nbpr * upb
        acc = Float32(0.0)
        if o < self.n_out:
            ids = cute.make_tensor(pIds, cute.make_layout(n_slots))
            wts = cute.make_tensor(pWeights, cute.make_layout(n_slots))
            for V in cutlass.range(lane + 32 * kpart, n_slots * upr, 32 * wpr, unroll=2):
                j = V // upr
                U = V - j * upr
                kb = U // upb
                u = U - kb * upb
                blk0 = (ids[j] * self.n_out + o) * nbpr
                xb = kb * sp.block_elems + self.tiling.base(u)
                part = Float32(0.0)
                for g in decode_int_slice(self.qtype, pW, blk0 + kb, u):
                    part = part + group_dot(g, pAq, pAd, pAs, j * self.n_ff, xb, 0)
                acc = acc + wts[j] * part
        total = warp_reduce_sum(acc)
        smem = cutlass.memory.SmemAllocator()
        parts = smem.allocate_tensor(Float32, cute.make_layout(WARPS), byte_alignment=16)
        if cutlass.const_expr(wpr > 1):
            if lane == 0:
                parts[warp] = total
            cute.arch.barrier()
        if o < self.n_out:  # noqa: SIM102 (runtime conditions, kept as nested DSL ifs)
            if tid % (32 * wpr) == 0:
                for k in cutlass.range_constexpr(1, wpr):
                    total = total + parts[warp + k]
                mY = cute.make_tensor(pY, cute.make_layout(self.n_out))
                if cutlass.const_expr(self.add_residual):
                    mR = cute.make_tensor(pResid, cute.make_layout(self.n_out))
                    total = total + mR[o]
                mY[o] = total


@kernel_cache
def compile_moe_gate_up_q8(qtype: str, n_in: int, n_ff: int, fused: bool = False):
    return cute.compile(MoeGateUpQ8(qtype, n_in, n_ff, fused), gptr(Uint8, 0), gptr(Uint8, 0), gptr(Int8, 0),
                        gptr(Float32, 0), gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0), Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


@kernel_cache
def compile_moe_down_q8(qtype: str, n_ff: int, n_out: int, add_residual: bool = False, wpr: int = 2):
    return cute.compile(MoeDownQ8(qtype, n_ff, n_out, add_residual, wpr), gptr(Uint8, 0), gptr(Int8, 0),
                        gptr(Float32, 0), gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0, 4),
                        gptr(Float32, 0), gptr(Float32, 0), Int32(1), cute.runtime.make_fake_stream(),
                        options=compile_options())


def _as_q8(x, st):
    from ..runtime import DeviceArray
    from .q8_1 import Q8Act, quantize_q8_1

    if isinstance(x, Q8Act):
        return x, False
    was_np = not isinstance(x, DeviceArray)
    dx = DeviceArray.from_numpy(np.ascontiguousarray(x, np.float32), st) if was_np else x
    return quantize_q8_1(dx, stream=st), was_np


def moe_gate_up_q8(w_gate, w_up, qtype, h, ids, n_ff: int, out=None, stream=None, mapping: str = "auto",
                   rpw: int | None = GATE_UP_RPW):
    """dp4a version of :func:`moe_gate_up`; ``h`` f32 (quantized here) or a :class:`q8_1.Q8Act` with one row."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    hq, h_np = _as_q8(h, st)
    di, _ = as_device(ids, st, np.int32)
    k = int(np.prod(di.shape))
    dg = as_device_bytes(w_gate, st)
    fused = w_up is None
    du = dg if fused else as_device_bytes(w_up, st)
    act = out if out is not None else DeviceArray.empty((k, n_ff), np.float32)
    if mapping == "auto" and chunk_ok(q, hq.n):
        fn = compile_moe_gate_up_chunk(q, hq.n, n_ff, fused, True, rpw or gate_up_rpw(True))
        fn(gptr(Uint8, aligned(dg, "w_gate").ptr), gptr(Uint8, aligned(du, "w_up").ptr), gptr(Float32, hq.d.ptr),
           gptr(Int8, hq.qs.ptr), gptr(Float32, hq.d.ptr), gptr(Int32, di.ptr, 4), gptr(Float32, act.ptr), Int32(k),
           cuda.CUstream(st.handle))
        return act.to_numpy(stream=st) if h_np else act
    fn = compile_moe_gate_up_q8(q, hq.n, n_ff, fused)
    fn(gptr(Uint8, aligned(dg, "w_gate").ptr), gptr(Uint8, aligned(du, "w_up").ptr), gptr(Int8, hq.qs.ptr),
       gptr(Float32, hq.d.ptr), gptr(Float32, hq.s.ptr), gptr(Int32, di.ptr, 4), gptr(Float32, act.ptr), Int32(k),
       cuda.CUstream(st.handle))
    return act.to_numpy(stream=st) if h_np else act


def moe_down_q8(w_down, qtype, act, ids, weights, n_out: int, resid=None, out=None, stream=None,
                mapping: str = "auto", rpw: int | None = DOWN_RPW):
    """dp4a version of :func:`moe_down`; ``act`` f32 [k, n_ff] (quantized here) or a :class:`q8_1.Q8Act`."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    aq, a_np = _as_q8(act, st)
    di, _ = as_device(ids, st, np.int32)
    dwt, _ = as_device(weights, st, np.float32)
    k = int(np.prod(di.shape))
    dw = as_device_bytes(w_down, st)
    dr = as_device(resid, st, np.float32)[0] if resid is not None else None
    y = out if out is not None else DeviceArray.empty((n_out,), np.float32)
    if mapping == "auto" and down_chunk_ok(q, aq.n, k):
        fn = compile_moe_down_chunk(q, aq.n, n_out, k, dr is not None, True, rpw or down_rpw(q, True))
        fn(gptr(Uint8, aligned(dw, "w_down").ptr), gptr(Float32, aq.d.ptr), gptr(Int8, aq.qs.ptr),
           gptr(Float32, aq.d.ptr), gptr(Int32, di.ptr, 4), gptr(Float32, dwt.ptr, 4),
           gptr(Float32, (dr if dr is not None else y).ptr), gptr(Float32, y.ptr), cuda.CUstream(st.handle))
        return y.to_numpy(stream=st) if a_np else y
    fn = compile_moe_down_q8(q, aq.n, n_out, dr is not None)
    fn(gptr(Uint8, aligned(dw, "w_down").ptr), gptr(Int8, aq.qs.ptr), gptr(Float32, aq.d.ptr),
       gptr(Float32, aq.s.ptr), gptr(Int32, di.ptr, 4), gptr(Float32, dwt.ptr, 4),
       gptr(Float32, (dr if dr is not None else y).ptr), gptr(Float32, y.ptr), Int32(k), cuda.CUstream(st.handle))
    return y.to_numpy(stream=st) if a_np else y


# ---------------------------------------------------------------------------------------------------------------
# Chunk-mapping variants (float or dp4a by ``q8``): the wide per-lane steps of quant_decode.py "Chunks", every
# weight load of a lane issued before the math (one DRAM round trip per warp). Q4_K / Q6_K / Q6_K_P only.


class MoeGateUpChunk:
    """Kernel A with the chunk mapping: a warp owns ``rpw`` rows o of one selected expert and computes their gate
    and up rows (2*rpw weight rows sharing the activation loads), then SwiGLU."""

    def __init__(self, qtype: str, n_in: int, n_ff: int, fused: bool = False, q8: bool = False, rpw: int = 1,
                 xfirst: bool = False):
        self.pdl = pdl_enabled()
        self.xfirst = xfirst
        assert chunk_ok(qtype, n_in) and n_ff % rpw == 0
        self.qtype, self.n_in, self.n_ff, self.fused, self.q8, self.rpw = qtype, n_in, n_ff, fused, q8, rpw
        self.expert_rows = 2 * n_ff if fused else n_ff
        self.up_row0 = n_ff if fused else 0
        self.cpl = n_in // 256 * CHUNKS_PER_BLOCK // 32

    @cute.jit
    def __call__(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer,
                 pXd: cute.Pointer, pIds: cute.Pointer, pAct: cute.Pointer, n_slots: Int32, stream: cuda.CUstream):
        self.kernel(pWg, pWu, pX, pXq, pXd, pIds, pAct).launch(
            grid=[cute.ceil_div(self.n_ff, WARPS * self.rpw), n_slots, 1], block=[WARPS * 32, 1, 1], stream=stream,
            use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
               pIds: cute.Pointer, pAct: cute.Pointer):
        pdl_prologue(self.pdl)
        tid = cute.arch.thread_idx()[0]
        bx, slot, _ = cute.arch.block_idx()
        warp, lane = tid // 32, tid % 32
        o0 = (bx * WARPS + warp) * self.rpw
        nbpr = self.n_in // 256
        if o0 < self.n_ff:
            ids = cute.make_tensor(pIds, cute.make_layout(slot + 1))
            e = ids[slot]
            g0 = e * self.expert_rows + o0
            u0 = e * self.expert_rows + self.up_row0 + o0
            rows = [(pWg, (g0 + r) * nbpr) for r in range(self.rpw)] + [(pWu, (u0 + r) * nbpr) for r in range(self.rpw)]
            xargs = (pXq, pXd) if self.q8 else (pX,)
            acc = chunk_rows_partial(self.qtype, self.q8, rows, xargs, 0, lane, self.cpl, self.xfirst)
            act = cute.make_tensor(pAct, cute.make_layout((slot + 1) * self.n_ff))
            for r in cutlass.range_constexpr(self.rpw):
                g = warp_reduce_sum(acc[r])
                up = warp_reduce_sum(acc[self.rpw + r])
                if lane == r:
                    act[slot * self.n_ff + o0 + r] = silu(g) * up


def down_chunk_ok(qtype: str, n_ff: int, k: int) -> bool:
    return chunk_supported(qtype) and n_ff % 256 == 0 and (k * (n_ff // 256) * CHUNKS_PER_BLOCK) % 32 == 0


class MoeDownChunk:
    """Kernel B with the chunk mapping: a warp owns ``rpw`` output rows; its lanes sweep the (slot, chunk) pairs of
    all ``k`` (static) experts, all weight loads first, w_j-weighted, then one butterfly per row (fixed order, no
    atomics). The rows of a warp share the expert-id, router-weight and activation loads."""

    def __init__(self, qtype: str, n_ff: int, n_out: int, k: int, add_residual: bool = False, q8: bool = False,
                 rpw: int = 1, xfirst: bool = False):
        assert down_chunk_ok(qtype, n_ff, k) and n_out % rpw == 0
        self.xfirst = xfirst
        self.pdl = pdl_enabled()
        self.qtype, self.n_ff, self.n_out, self.k, self.add_residual, self.q8 = qtype, n_ff, n_out, k, add_residual, q8
        self.rpw = rpw
        self.cpr = n_ff // 256 * CHUNKS_PER_BLOCK
        self.cpl = k * self.cpr // 32

    @cute.jit
    def __call__(self, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer,
                 pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer,
                 stream: cuda.CUstream):
        self.kernel(pW, pAct, pAq, pAd, pIds, pWeights, pResid, pY).launch(
            grid=[cute.ceil_div(self.n_out, WARPS * self.rpw), 1, 1], block=[WARPS * 32, 1, 1], stream=stream,
            use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pIds: cute.Pointer,
               pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer):
        pdl_prologue(self.pdl)
        tid = cute.arch.thread_idx()[0]
        bx = cute.arch.block_idx()[0]
        warp, lane = tid // 32, tid % 32
        o0 = (bx * WARPS + warp) * self.rpw
        if o0 < self.n_out:
            acc = _down_chunk_partial(self, pW, pAct, pAq, pAd, pIds, pWeights, o0, lane)
            mY = cute.make_tensor(pY, cute.make_layout(self.n_out))
            mR = cute.make_tensor(pResid, cute.make_layout(self.n_out))
            for r in cutlass.range_constexpr(self.rpw):
                total = warp_reduce_sum(acc[r])
                if lane == r:
                    if cutlass.const_expr(self.add_residual):
                        total = total + mR[o0 + r]
                    mY[o0 + r] = total


def _down_chunk_partial(kern: MoeDownChunk, pW, pAct, pAq, pAd, pIds, pWeights, o0, lane):
    q, cpr, nbpr, rpw = kern.qtype, kern.cpr, kern.n_ff // 256, kern.rpw
    s = lane & (CHUNKS_PER_BLOCK - 1)
    ids = cute.make_tensor(pIds, cute.make_layout(kern.k))
    wts = cute.make_tensor(pWeights, cute.make_layout(kern.k))
    js, kbs, raws = [], [], []
    for t in range(kern.cpl):
        C = lane + 32 * t
        j = C // cpr
        js.append(j)
        kbs.append((C - j * cpr) >> 3)
    xqs = []
    if kern.q8 and kern.xfirst:  # activation loads (L2 hits, independent of the expert ids) before the weights
        xqs = [chunk_x_q8(q, pAq, pAd, js[t] * kern.n_ff + kbs[t] * 256, s) for t in range(kern.cpl)]
    for t in range(kern.cpl):
        row0 = ids[js[t]] * kern.n_out + o0
        raws.append([chunk_load(q, pW, (row0 + r) * nbpr + kbs[t], s) for r in range(rpw)])
    acc = [None] * rpw
    for t in range(kern.cpl):
        xbase = js[t] * kern.n_ff + kbs[t] * 256
        wj = wts[js[t]]
        if kern.q8:
            xq = xqs[t] if xqs else chunk_x_q8(q, pAq, pAd, xbase, s)
            vals = [chunk_dot_q8(q, raw, s, xq) for raw in raws[t]]
        else:
            xv = chunk_x_f32(q, pAct, xbase, s)
            xs = x_sums_f32(q, xv)
            vals = [chunk_dot_f32(q, raw, s, xv, xs) for raw in raws[t]]
        acc = [wj * v if a is None else a + wj * v for a, v in zip(acc, vals)]
    return acc


@kernel_cache
def compile_moe_gate_up_chunk(qtype: str, n_in: int, n_ff: int, fused: bool = False, q8: bool = False, rpw: int = 1,
                              xfirst: bool = False):
    return cute.compile(MoeGateUpChunk(qtype, n_in, n_ff, fused, q8, rpw, xfirst), gptr(Uint8, 0), gptr(Uint8, 0),
                        gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0),
                        Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


@kernel_cache
def compile_moe_down_chunk(qtype: str, n_ff: int, n_out: int, k: int, add_residual: bool = False, q8: bool = False,
                           rpw: int = 1, xfirst: bool = False):
    return cute.compile(MoeDownChunk(qtype, n_ff, n_out, k, add_residual, q8, rpw, xfirst), gptr(Uint8, 0), gptr(Float32, 0),
                        gptr(Int8, 0), gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0, 4), gptr(Float32, 0),
                        gptr(Float32, 0), cute.runtime.make_fake_stream(), options=compile_options())


# ---------------------------------------------------------------------------------------------------------------
# Registered configurations: Qwen3-30B-A3B (2048 / 768, gate+up Q4_K, down Q4_K or Q6_K) + the synthetic qwen3moe
# configs of gguf/synth.py (n_embd 256/512 with n_ff_exp 256; tiny-fallback 384/384 with Q5_0 gate/up, Q8_0 or
# Q5_0 down).

GATE_UP_CONFIGS = [dict(qtype="Q4_K", n_in=2048, n_ff=768), dict(qtype="Q4_K", n_in=2048, n_ff=768, fused=True),
                   dict(qtype="Q4_K", n_in=256, n_ff=256), dict(qtype="Q4_K", n_in=512, n_ff=256),
                   dict(qtype="Q5_0", n_in=384, n_ff=384)]
DOWN_CONFIGS = [dict(qtype=q, n_ff=768, n_out=2048, add_residual=r) for q in ("Q4_K", "Q6_K", "Q6_K_P")
                for r in (False, True)]
DOWN_CONFIGS += [dict(qtype=q, n_ff=256, n_out=n, add_residual=r) for q in ("Q4_K", "Q6_K") for n in (256, 512)
                 for r in (False, True)]
DOWN_CONFIGS += [dict(qtype=q, n_ff=384, n_out=384, add_residual=r) for q in ("Q5_0", "Q8_0") for r in (False, True)]

# chunk kernels: Qwen3-30B-A3B (8 of 128 experts, 2048 / 768), default rows per warp of each path
GATE_UP_CHUNK_CONFIGS = [dict(qtype="Q4_K", n_in=2048, n_ff=768, fused=f, q8=q8, rpw=gate_up_rpw(q8))
                         for f in (False, True) for q8 in (False, True)]
DOWN_CHUNK_CONFIGS = [dict(qtype=q, n_ff=768, n_out=2048, k=8, add_residual=r, q8=q8, rpw=down_rpw(q, q8))
                      for q in ("Q4_K", "Q6_K", "Q6_K_P") for r in (False, True) for q8 in (False, True)]


def _register():
    try:
        from .registry import register
    except ImportError:
        return
    register("moe_gate_up", compile_moe_gate_up, GATE_UP_CONFIGS)
    register("moe_down", compile_moe_down, DOWN_CONFIGS)
    register("moe_gate_up_q8", compile_moe_gate_up_q8, GATE_UP_CONFIGS)
    register("moe_down_q8", compile_moe_down_q8, DOWN_CONFIGS)
    register("moe_gate_up_chunk", compile_moe_gate_up_chunk, GATE_UP_CHUNK_CONFIGS)
    register("moe_down_chunk", compile_moe_down_chunk, DOWN_CHUNK_CONFIGS)


_register()
