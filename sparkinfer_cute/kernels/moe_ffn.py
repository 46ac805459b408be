"""Fused selected-expert MoE FFN for decode (one token), over raw GGUF expert weights.

    y = [resid +] sum_j w_j * Wdown[e_j] · (silu(Wgate[e_j] · h) * (Wup[e_j] · h)),   j = 0..k-1

Two launches, both reading the selected expert ids (and router weights) from device memory (CUDA-graph safe, no host
sync):

- **MoeGateUp** (kernel A): grid (ceil(n_ff / WARPS), k). A warp owns one row o of one selected expert and
  computes *both* the gate row and the up row with the same activation loads (lanes over quant_decode.py slices),
  then applies SwiGLU in registers and writes ``act[j, o]``. Only the [k, n_ff] activations reach memory (no
  [tokens, 2*n_ff] intermediate). Supports separate ``ffn_gate_exps``/``ffn_up_exps`` tensors and the fused
  ``ffn_gate_up_exps`` layout ([E, 2*n_ff, n_in]: gate rows first, then up rows, per expert).
- **MoeDown** (kernel B): grid ceil(n_out / rows per CTA). A warp owns output row o (or a share of it) and sweeps the
  (slot, slice) pairs of all k experts with its 32 lanes (coalesced 4-byte weight and 16-byte activation loads);
  each lane adds ``w_j * (slice dot)`` to its private accumulator in a fixed order, then one butterfly reduction:
  deterministic, no atomics. Optionally adds the residual.

Both take ``q8``: the activations are q8_1 int8 (q8_1.py: h, shared with the other consumers of the same norm output,
and the [k, n_ff] SwiGLU output, quantized by one more launch) and the slice dots are dp4a (quant_dot.py); else f32.
The wrappers pick the chunk kernels of moe_ffn_chunk.py where they apply (Q4_K / Q6_K / Q6_K_P), these otherwise.

Shapes: Qwen3-30B-A3B: k=8 of 128 experts, n_embd 2048, n_ff_exp 768 (gate/up Q4_K, down Q4_K or Q6_K).
Error: every dot is a GEMV row (bounds: reference/kernel_refs.py); SwiGLU uses the fast exp (ex2.approx, rel err
~2^-22).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import numpy as np
from cutlass import Float32, Int8, Int32, Uint8, cute

from .common import WarpRowKernel, aligned, as_device_bytes, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .gemv_chunk import chunk_ok
from .norm_chain import FfnTail, FfnTailArgs, tail_fake_args, tail_launch
from .moe_ffn_chunk import (
    check_quantize_out,
    compile_moe_down_chunk,
    compile_moe_gate_up_chunk,
    down_chunk_ok,
    down_rows_per_warp,
    gate_up_rows_per_warp,
    glu_act,
    q8_out_fake_ptrs,
)
from .q8_1 import Q8Act, as_q8, quantize_block_when_complete, x_pointers
from .quant_decode import INT_QTYPES, QK8_1, Tiling, qtype_name, spec
from .quant_dot import decode_int_slice, dot_values, group_dot, load_x_runs
from .registry import register

WARPS = WarpRowKernel.WARPS


class MoeGateUp(WarpRowKernel):
    """``act[slot, o] = glu_act(Wgate[e] . x) * (Wup[e] . x)``, e = ids[slot], slice mapping (``act``: "silu" or
    "gelu_tanh"); ``fused``: one [E, 2*n_ff, n_in] tensor, gate rows first. ``q8``: int8 activations (pXq, pXd, pXs)
    and dp4a, else f32 (pX). ``quantize_out``: also the q8_1 copy of ``act`` (as moe_ffn_chunk.py
    :class:`MoeGateUpChunk`)."""

    def __init__(self, qtype: str, n_in: int, n_ff: int, fused: bool = False, q8: bool = False, act: str = "silu",
                 quantize_out: bool = False):
        super().__init__()
        self.act = act
        self.quantize_out = quantize_out
        if quantize_out:
            check_quantize_out(n_ff, WARPS)
        assert not q8 or qtype in INT_QTYPES, f"the dp4a path supports {INT_QTYPES}"
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, "slice")
        assert n_in % self.sp.block_elems == 0
        self.n_in, self.n_ff, self.fused, self.q8 = n_in, n_ff, fused, q8
        # rows per expert in the weight tensor(s), and where the up rows start inside an expert
        self.expert_rows = 2 * n_ff if fused else n_ff
        self.up_row0 = n_ff if fused else 0
        self.rows_per_cta = WARPS

    @cute.jit
    def __call__(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer,
                 pXd: cute.Pointer, pXs: cute.Pointer, pIds: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer,
                 pAd: cute.Pointer, pAs: cute.Pointer, pCnt: cute.Pointer, n_slots: Int32, stream: cuda.CUstream):
        self.launch_rows(self.kernel(pWg, pWu, pX, pXq, pXd, pXs, pIds, pAct, pAq, pAd, pAs, pCnt), self.n_ff, WARPS,
                         n_slots, stream)

    @cute.kernel
    def kernel(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
               pXs: cute.Pointer, pIds: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer,
               pAs: cute.Pointer, pCnt: cute.Pointer):
        pdl_prologue(self.pdl)
        _, bx, slot, warp, lane = self.thread_coords()
        self.rows(bx, slot, warp, lane, pWg, pWu, pX, pXq, pXd, pXs, pIds, pAct, pAq, pAd, pAs, pCnt)

    @cute.jit
    def rows(self, bx: Int32, slot: Int32, warp: Int32, lane: Int32, pWg: cute.Pointer, pWu: cute.Pointer,
             pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer, pIds: cute.Pointer,
             pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer, pCnt: cute.Pointer):
        """What CTA (``bx``, ``slot``) of the launch grid does (the whole kernel but the PDL prologue; every thread
        calls it): routed_experts.py runs it on CTAs of a grid that routes first."""
        sp = self.sp
        o = bx * WARPS + warp
        nbpr = self.n_in // sp.block_elems
        upb = self.tiling.per_block
        if o < self.n_ff:
            e = self.expert_id(pIds, slot)
            g_blk0 = (e * self.expert_rows + o) * nbpr
            u_blk0 = (e * self.expert_rows + self.up_row0 + o) * nbpr
            acc_g = Float32(0.0)
            acc_u = Float32(0.0)
            wg = self.tiling.buffer()  # the f32 path's decoded steps
            wu = self.tiling.buffer()
            for U in cutlass.range(lane, nbpr * upb, 32, unroll=2):
                kb = U // upb
                u = U - kb * upb
                if cutlass.const_expr(self.q8):
                    xb = kb * sp.block_elems + self.tiling.base(u)
                    for g in decode_int_slice(self.qtype, pWg, g_blk0 + kb, u):
                        acc_g = acc_g + group_dot(g, pXq, pXd, pXs, 0, xb, 0)
                    for g in decode_int_slice(self.qtype, pWu, u_blk0 + kb, u):
                        acc_u = acc_u + group_dot(g, pXq, pXd, pXs, 0, xb, 0)
                else:
                    self.tiling.decode(pWg, g_blk0 + kb, u, wg, exact=False)
                    self.tiling.decode(pWu, u_blk0 + kb, u, wu, exact=False)
                    # one activation load shared by the gate and up rows
                    xr = load_x_runs(self.tiling, pX, kb * sp.block_elems + self.tiling.base(u))
                    acc_g = acc_g + dot_values(wg, xr, self.tiling.elems)
                    acc_u = acc_u + dot_values(wu, xr, self.tiling.elems)
            g = warp_reduce_sum(acc_g)
            up = warp_reduce_sum(acc_u)
            if lane == 0:
                act = cute.make_tensor(pAct, cute.make_layout((slot + 1) * self.n_ff))
                act[slot * self.n_ff + o] = glu_act(g, self.act) * up
        if cutlass.const_expr(self.quantize_out):
            quantize_block_when_complete(pAct, pAq, pAd, pAs, pCnt, slot * (self.n_ff // QK8_1) + bx * WARPS // QK8_1,
                                         QK8_1 // WARPS, warp, lane)


class MoeDown(WarpRowKernel):
    """``y[o] = [resid[o] +] sum_j w_j * Wdown[ids[j], o] . act[j]``, slice mapping; ``q8`` as :class:`MoeGateUp`.

    ``warps_per_row`` (1/2/4): the row's (slot, slice) steps are split over that many warps and their partial sums
    added in a fixed order through shared memory (2048 rows alone give only ~16 warps per SM). ``tail``: as
    moe_ffn_chunk.py :class:`MoeDownChunk`."""

    def __init__(self, qtype: str, n_ff: int, n_out: int, add_residual: bool = False, warps_per_row: int = 2,
                 q8: bool = False, tail: FfnTail | None = None):
        super().__init__()
        assert not q8 or qtype in INT_QTYPES, f"the dp4a path supports {INT_QTYPES}"
        assert warps_per_row in (1, 2, 4)
        assert tail is None or tail.row_len == n_out, (tail, n_out)
        self.tail = tail.chain(WARPS * 32) if tail is not None else None
        self.qtype, self.sp = qtype, spec(qtype)
        self.tiling = Tiling(qtype, "slice")
        assert n_ff % self.sp.block_elems == 0
        self.n_ff, self.n_out, self.add_residual, self.warps_per_row, self.q8 = n_ff, n_out, add_residual, \
            warps_per_row, q8
        self.rows_per_cta = WARPS // warps_per_row

    @cute.jit
    def __call__(self, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer,
                 pAs: cute.Pointer, pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer,
                 pY: cute.Pointer, n_slots: Int32, tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer,
                 t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer,
                 t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer,
                 eps: Float32, stream: cuda.CUstream):
        self.launch_rows(self.kernel(pW, pAct, pAq, pAd, pAs, pIds, pWeights, pResid, pY, n_slots, tCnt, t0, t1, t2,
                                     t3, t4, t5, t6, t7, t8, t9, t10, t11, eps),
                         self.n_out, self.rows_per_cta, 1, stream)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer,
               pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer, n_slots: Int32,
               tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer,
               t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer,
               t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer, eps: Float32):
        pdl_prologue(self.pdl)
        _, bx, _, warp, lane = self.thread_coords()
        self.rows(bx, warp, lane, pW, pAct, pAq, pAd, pAs, pIds, pWeights, pResid, pY, n_slots, tCnt, t0, t1, t2, t3,
                  t4, t5, t6, t7, t8, t9, t10, t11, eps)

    @cute.jit
    def rows(self, bx: Int32, warp: Int32, lane: Int32, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer,
             pAd: cute.Pointer, pAs: cute.Pointer, pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer,
             pY: cute.Pointer, n_slots: Int32, tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer,
             t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer,
             t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer,
             eps: Float32, arrivals: cutlass.Constexpr[int] = 0):
        """What CTA ``bx`` of the launch grid does (the whole kernel but the PDL prologue; every thread calls it):
        routed_experts.py runs it on CTAs of a grid that routes and runs the gate/up first (``arrivals``: the CTAs
        of this phase, for the tail)."""
        sp = self.sp
        wpr = self.warps_per_row
        tid = warp * 32 + lane
        kpart = warp % wpr
        o = bx * self.rows_per_cta + warp // wpr
        nbpr = self.n_ff // sp.block_elems
        upb = self.tiling.per_block
        upr = nbpr * upb
        acc = Float32(0.0)
        if o < self.n_out:
            ids = cute.make_tensor(pIds, cute.make_layout(n_slots))
            wts = cute.make_tensor(pWeights, cute.make_layout(n_slots))
            w = self.tiling.buffer()  # the f32 path's decoded step
            for V in cutlass.range(lane + 32 * kpart, n_slots * upr, 32 * wpr, unroll=2):
                j = V // upr
                U = V - j * upr
                kb = U // upb
                u = U - kb * upb
                blk0 = (ids[j] * self.n_out + o) * nbpr
                if cutlass.const_expr(self.q8):
                    xb = kb * sp.block_elems + self.tiling.base(u)
                    dot = Float32(0.0)
                    for g in decode_int_slice(self.qtype, pW, blk0 + kb, u):
                        dot = dot + group_dot(g, pAq, pAd, pAs, j * self.n_ff, xb, 0)
                    acc = acc + wts[j] * dot
                else:
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
        if cutlass.const_expr(self.tail is not None):
            self.tail.tail(tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, eps, arrivals)


@kernel_cache
def compile_moe_gate_up(qtype: str, n_in: int, n_ff: int, fused: bool = False, q8: bool = False, act: str = "silu",
                        quantize_out: bool = False):
    """Runtime args: (Wg, Wu u8, x f32, xq i8, xd f32, xs f32, ids i32 (align 4), act f32, aq i8, ad f32, as f32,
    counters i32 (these four align 4; used only with ``quantize_out``) pointers, n_slots, stream); q8_1.x_pointers
    gives the four x pointers."""
    return cute.compile(MoeGateUp(qtype, n_in, n_ff, fused, q8, act, quantize_out), gptr(Uint8, 0), gptr(Uint8, 0),
                        gptr(Float32, 0),
                        gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0), gptr(Int32, 0, 4), gptr(Float32, 0),
                        *q8_out_fake_ptrs(), Int32(1), cute.runtime.make_fake_stream(), options=compile_options())


@kernel_cache
def compile_moe_down(qtype: str, n_ff: int, n_out: int, add_residual: bool = False, warps_per_row: int = 2,
                     q8: bool = False, tail: FfnTail | None = None):
    """Runtime args: (W u8, act f32, aq i8, ad f32, as f32, ids i32 (align 4), weights f32 (align 4), resid f32,
    y f32 pointers, n_slots, the tail's arguments (norm_chain.py ``FfnTailArgs.launch_args``, or ``no_tail_args``),
    stream)."""
    return cute.compile(MoeDown(qtype, n_ff, n_out, add_residual, warps_per_row, q8, tail), gptr(Uint8, 0),
                        gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Float32, 0), gptr(Int32, 0, 4),
                        gptr(Float32, 0, 4), gptr(Float32, 0), gptr(Float32, 0), Int32(1), *tail_fake_args(),
                        cute.runtime.make_fake_stream(), options=compile_options())


# ---------------------------------------------------------------------------------------------------------------
# Host side


def _activation(x, st):
    """(device activation, was numpy, row length, int8?): a :class:`Q8Act` as is (the dp4a kernels), else f32."""
    from ..runtime import as_device

    if isinstance(x, Q8Act):
        return x, False, x.n, True
    dx, x_np = as_device(x, st, np.float32)
    return dx, x_np, int(dx.shape[-1]), False


def _mapping(mapping: str, chunk_applies: bool, what: str) -> str:
    """"auto": the chunk kernel where it applies, else slice; an explicit "chunk" where it does not is an error."""
    if mapping == "auto":
        return "chunk" if chunk_applies else "slice"
    if mapping not in ("chunk", "slice"):
        raise ValueError(f"{what}: mapping must be auto, chunk or slice (got {mapping!r})")
    if mapping == "chunk" and not chunk_applies:
        raise ValueError(f"{what}: the chunk mapping does not apply here (Q4_K/Q6_K/Q6_K_P, whole warps of chunks)")
    return mapping


def dense_glu_supported(qtype, n_in: int) -> bool:
    """Whether :func:`moe_gate_up` runs a dense GLU (gate and up weights of one type, [n_ff, n_in] each) as one
    expert: the quantized types its kernels decode, whole blocks per row. (The float types stay on the GEMV + GLU
    path: the MoE kernels are neither gated nor tested on float weights.)"""
    q = qtype_name(qtype)
    return q in INT_QTYPES and n_in % spec(q).block_elems == 0


def moe_gate_up(w_gate, w_up, qtype, h, ids, n_ff: int, out=None, stream=None, mapping: str = "auto",
                rows_per_warp: int | None = None, act: str = "silu", x_loads_first: bool = False,
                out_q8: Q8Act | None = None, counters=None, plan_only: bool = False):
    """act[j] = act(Wgate[ids[j]] · h) * (Wup[ids[j]] · h) -> [k, n_ff] f32 (``act``: "silu", or "gelu_tanh" for
    Gemma's GeGLU experts).

    ``w_gate``/``w_up``: [E, n_ff, row_bytes] raw bytes; pass ``w_up=None`` and the fused ``ffn_gate_up_exps``
    tensor ([E, 2*n_ff, row_bytes]) as ``w_gate``. ``h``: f32 [n_in] (numpy or DeviceArray) or a :class:`Q8Act`
    of one row (then the dp4a path). numpy in -> numpy out. Launch knobs (the autotuner's ``moe_gate_up`` /
    ``moe_gate_up_q8`` configs): ``mapping`` (auto | chunk | slice), the chunk kernel's ``rows_per_warp`` (None:
    the faster one measured for the path) and ``x_loads_first`` (dp4a: activation loads before the weights).

    ``out_q8`` (a :class:`Q8Act` of >= k rows of ``n_ff``) with ``counters`` (int32 DeviceArray of >= k*n_ff/32,
    zero before the first launch; every launch leaves it zero): the same launch also writes the q8_1 copy of
    ``act``, bit-identical to ``quantize_q8_1(act)`` (the dp4a down projection's input: no quantize launch).

    ``plan_only``: no launch; return (the mapping, its compile keywords, the runtime arguments up to the counters
    with the activation's x, xq, xd, xs pointers all given, k, the device buffers they point into: uploads made here
    must outlive the launch) for routed_experts.py, which runs the kernel after the routing in one launch."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    dh, h_np, n_in, q8 = _activation(h, st)
    di, _ = as_device(ids, st, np.int32)
    k = int(np.prod(di.shape))
    dg = as_device_bytes(w_gate, st)
    fused = w_up is None
    du = dg if fused else as_device_bytes(w_up, st)
    rb = spec(q).row_bytes(n_in)
    for a in (dg, du):
        if a.nbytes % ((2 if fused else 1) * n_ff * rb):
            raise ValueError(f"expert weight of {a.nbytes} bytes is not whole experts of {n_ff} x {n_in} {q}")
    act_out = out if out is not None else DeviceArray.empty((k, n_ff), np.float32)
    px, pxq, pxd, pxs = x_pointers(dh)
    pwg, pwu = gptr(Uint8, aligned(dg, "w_gate").ptr), gptr(Uint8, aligned(du, "w_up").ptr)
    pids, pact = gptr(Int32, di.ptr, 4), gptr(Float32, aligned(act_out, "act").ptr)
    flags = {}
    if out_q8 is not None:
        if out_q8.n != n_ff or out_q8.rows < k:
            raise ValueError(f"out_q8 holds {out_q8.rows} rows of {out_q8.n}; the kernel writes {k} rows of {n_ff}")
        if counters is None or counters.nbytes < 4 * (k * n_ff // QK8_1):
            raise ValueError(f"out_q8 needs counters: >= {k * n_ff // QK8_1} zeroed int32")
        flags["quantize_out"] = True
        q8_out = (gptr(Int8, out_q8.qs.ptr, 4), gptr(Float32, out_q8.d.ptr, 4), gptr(Float32, out_q8.s.ptr, 4),
                  gptr(Int32, counters.ptr, 4))
    else:  # never touched without quantize_out: any valid pointers do
        q8_out = (gptr(Int8, act_out.ptr, 4), gptr(Float32, act_out.ptr, 4), gptr(Float32, act_out.ptr, 4),
                  gptr(Int32, act_out.ptr, 4))
    if _mapping(mapping, chunk_ok(q, n_in), "moe_gate_up") == "chunk":
        cfg = dict(qtype=q, n_in=n_in, n_ff=n_ff, fused=fused, q8=q8,
                   rows_per_warp=rows_per_warp or gate_up_rows_per_warp(q8), x_loads_first=bool(x_loads_first),
                   act=act, **flags)
        if plan_only:
            return "chunk", cfg, (pwg, pwu, px, pxq, pxd, pxs, pids, pact, *q8_out), k, (dg, du, dh, di, act_out)
        compile_moe_gate_up_chunk(**cfg)(pwg, pwu, px, pxq, pxd, pids, pact, *q8_out, Int32(k),
                                         cuda.CUstream(st.handle))
    else:
        cfg = dict(qtype=q, n_in=n_in, n_ff=n_ff, fused=fused, q8=q8, act=act, **flags)
        if plan_only:
            return "slice", cfg, (pwg, pwu, px, pxq, pxd, pxs, pids, pact, *q8_out), k, (dg, du, dh, di, act_out)
        compile_moe_gate_up(**cfg)(pwg, pwu, px, pxq, pxd, pxs, pids, pact, *q8_out, Int32(k),
                                   cuda.CUstream(st.handle))
    return act_out.to_numpy(stream=st) if h_np else act_out


def moe_down(w_down, qtype, act, ids, weights, n_out: int, resid=None, out=None, stream=None,
             mapping: str = "auto", rows_per_warp: int | None = None, warps_per_row: int | None = None,
             x_loads_first: bool = False, tail: FfnTailArgs | None = None, plan_only: bool = False):
    """y = [resid +] sum_j weights[j] * Wdown[ids[j]] · act[j] -> [n_out] f32 (fixed summation order).

    ``w_down``: [E, n_out, row_bytes(n_ff)] raw bytes; ``act``: f32 [k, n_ff] or a :class:`Q8Act` of k rows (then
    the dp4a path). ``out`` may alias ``resid`` (in-place residual add). numpy in -> numpy out. Launch knobs (the
    autotuner's ``moe_down`` / ``moe_down_q8`` configs): ``mapping`` (auto | chunk | slice), the chunk kernel's
    ``rows_per_warp`` and ``x_loads_first`` (dp4a), the slice kernel's ``warps_per_row``; None = the default.
    ``tail`` (norm_chain.py :class:`FfnTailArgs`, its ``f`` or ``y`` being ``out``): the same launch then runs that
    post-FFN norm chain (the last CTA to finish). ``plan_only``: as :func:`moe_gate_up`'s (the runtime arguments
    are the slice kernel's, up to ``eps``, for both mappings)."""
    from ..runtime import DeviceArray, as_device, default_stream

    q = qtype_name(qtype)
    st = stream if stream is not None else default_stream()
    da, a_np, n_ff, q8 = _activation(act, st)
    di, _ = as_device(ids, st, np.int32)
    dwt, _ = as_device(weights, st, np.float32)
    k = int(np.prod(di.shape))
    dw = as_device_bytes(w_down, st)
    if dw.nbytes % (n_out * spec(q).row_bytes(n_ff)):
        raise ValueError(f"down weight of {dw.nbytes} bytes is not whole experts of {n_out} x {n_ff} {q}")
    dr = as_device(resid, st, np.float32)[0] if resid is not None else None
    y = out if out is not None else DeviceArray.empty((n_out,), np.float32)
    pa, paq, pad, pas = x_pointers(da)
    pw, pids, pwts = gptr(Uint8, aligned(dw, "w_down").ptr), gptr(Int32, di.ptr, 4), gptr(Float32, dwt.ptr, 4)
    presid, py = gptr(Float32, (dr if dr is not None else y).ptr), gptr(Float32, y.ptr)
    tkw, targs = tail_launch(tail, n_out, y)
    keep = (da, di, dwt, dw, dr, y)
    if _mapping(mapping, down_chunk_ok(q, n_ff, k), "moe_down") == "chunk":
        cfg = dict(qtype=q, n_ff=n_ff, n_out=n_out, k=k, add_residual=dr is not None, q8=q8,
                   rows_per_warp=rows_per_warp or down_rows_per_warp(q, q8), x_loads_first=bool(x_loads_first), **tkw)
        if plan_only:
            return "chunk", cfg, (pw, pa, paq, pad, pas, pids, pwts, presid, py, Int32(k), *targs), keep
        compile_moe_down_chunk(**cfg)(pw, pa, paq, pad, pids, pwts, presid, py, *targs, cuda.CUstream(st.handle))
    else:
        # warps_per_row None: the compile function's default (2), as the compile gate registers it
        cfg = dict(qtype=q, n_ff=n_ff, n_out=n_out, add_residual=dr is not None, q8=q8,
                   **({"warps_per_row": warps_per_row} if warps_per_row is not None else {}), **tkw)
        if plan_only:
            return "slice", cfg, (pw, pa, paq, pad, pas, pids, pwts, presid, py, Int32(k), *targs), keep
        compile_moe_down(**cfg)(pw, pa, paq, pad, pas, pids, pwts, presid, py, Int32(k), *targs,
                                cuda.CUstream(st.handle))
    return y.to_numpy(stream=st) if a_np else y


def moe_gate_up_q8(w_gate, w_up, qtype, h, ids, n_ff: int, out=None, stream=None, mapping: str = "auto",
                   rows_per_warp: int | None = None, x_loads_first: bool = False):
    """:func:`moe_gate_up` through int8 activations: ``h`` f32 (quantized here) or a :class:`Q8Act` of one row."""
    from ..runtime import default_stream

    st = stream if stream is not None else default_stream()
    hq, h_np = as_q8(h, st)
    act = moe_gate_up(w_gate, w_up, qtype, hq, ids, n_ff, out=out, stream=st, mapping=mapping,
                      rows_per_warp=rows_per_warp, x_loads_first=x_loads_first)
    return act.to_numpy(stream=st) if h_np else act


def moe_down_q8(w_down, qtype, act, ids, weights, n_out: int, resid=None, out=None, stream=None,
                mapping: str = "auto", rows_per_warp: int | None = None, warps_per_row: int | None = None,
                x_loads_first: bool = False):
    """:func:`moe_down` through int8 activations: ``act`` f32 [k, n_ff] (quantized here) or a :class:`Q8Act`."""
    from ..runtime import default_stream

    st = stream if stream is not None else default_stream()
    aq, a_np = as_q8(act, st)
    y = moe_down(w_down, qtype, aq, ids, weights, n_out, resid=resid, out=out, stream=st, mapping=mapping,
                 rows_per_warp=rows_per_warp, warps_per_row=warps_per_row, x_loads_first=x_loads_first)
    return y.to_numpy(stream=st) if a_np else y


def moe_ffn(w_gate, w_up, w_down, qtype_gate_up, qtype_down, h, ids, weights, n_ff: int, resid=None, stream=None):
    """Both kernels: y = [resid +] sum_j w_j Wdown[e_j] (silu(Wgate[e_j] h) * (Wup[e_j] h)). numpy in -> numpy out."""
    n_out = int(np.shape(h)[-1]) if not hasattr(h, "ptr") else int(h.shape[-1])
    act = moe_gate_up(w_gate, w_up, qtype_gate_up, h, ids, n_ff, stream=stream)
    return moe_down(w_down, qtype_down, act, ids, weights, n_out, resid=resid, stream=stream)


# ---------------------------------------------------------------------------------------------------------------
# Registered configurations: Qwen3-30B-A3B (2048 / 768, gate+up Q4_K, down Q4_K or Q6_K) + the synthetic qwen3moe
# configs of gguf/synth.py (n_embd 256/512 with n_ff_exp 256; tiny-fallback 384/384 with Q5_0 gate/up, Q8_0 or
# Q5_0 down); each for the f32 and the dp4a path.

GATE_UP_CONFIGS = [dict(qtype="Q4_K", n_in=2048, n_ff=768), dict(qtype="Q4_K", n_in=2048, n_ff=768, fused=True),
                   dict(qtype="Q4_K", n_in=256, n_ff=256), dict(qtype="Q4_K", n_in=512, n_ff=256),
                   dict(qtype="Q5_0", n_in=384, n_ff=384),
                   # Gemma 4: fused ffn_gate_up_exps, GeGLU experts (26B-A4B 2816 / 704, synthetic tiny 256 / 160)
                   dict(qtype="Q4_K", n_in=2816, n_ff=704, fused=True, act="gelu_tanh"),
                   dict(qtype="Q4_K", n_in=256, n_ff=160, fused=True, act="gelu_tanh"),
                   # dense GeGLU MLPs run as one expert (models/ops.py dense_glu): Gemma 3 270M (Q8_0 640 / 2048),
                   # Gemma 4 26B-A4B (Q4_K 2816 / 2112), f32 activations
                   dict(qtype="Q8_0", n_in=640, n_ff=2048, act="gelu_tanh"),
                   dict(qtype="Q4_K", n_in=2816, n_ff=2112, act="gelu_tanh")]
# the int8 decode's gate/up writing the q8_1 copy of its output (Gemma 4 26B-A4B experts: the slice kernel)
GATE_UP_Q8_OUT_CONFIGS = [dict(qtype="Q4_K", n_in=2816, n_ff=704, fused=True, act="gelu_tanh", quantize_out=True),
                          dict(qtype="Q4_K", n_in=256, n_ff=256, quantize_out=True)]
DOWN_CONFIGS = [dict(qtype=q, n_ff=768, n_out=2048, add_residual=r) for q in ("Q4_K", "Q6_K", "Q6_K_P")
                for r in (False, True)]
DOWN_CONFIGS += [dict(qtype=q, n_ff=256, n_out=n, add_residual=r) for q in ("Q4_K", "Q6_K") for n in (256, 512)
                 for r in (False, True)]
DOWN_CONFIGS += [dict(qtype=q, n_ff=384, n_out=384, add_residual=r) for q in ("Q5_0", "Q8_0") for r in (False, True)]
# Gemma 4 26B-A4B experts down (704 % 256 != 0: Q5_0 / Q8_0) and the synthetic tiny one (160)
DOWN_CONFIGS += [dict(qtype=q, n_ff=n_ff, n_out=n_out) for q in ("Q5_0", "Q8_0")
                 for n_ff, n_out in ((704, 2816), (160, 256))]

register("moe_gate_up", compile_moe_gate_up, [dict(c, q8=q8) for q8 in (False, True) for c in GATE_UP_CONFIGS]
         + [dict(c, q8=True) for c in GATE_UP_Q8_OUT_CONFIGS])
# Gemma 4 26B-A4B's (and the synthetic tiny file's) experts down with the post-FFN norm chain as its tail
# (models/ops.py AfterFfn; + the next attn_norm's q8_1 copy in the int8 build)
DOWN_TAIL_CONFIGS = [dict(qtype=q, n_ff=n_ff, n_out=n_out, q8=q8,
                          tail=FfnTail(n_out, has_experts=True, next_q8=q8))
                     for q in ("Q5_0", "Q8_0") for q8 in (False, True) for n_ff, n_out in ((704, 2816), (160, 256))]
register("moe_down", compile_moe_down, [dict(c, q8=q8) for q8 in (False, True) for c in DOWN_CONFIGS]
         + DOWN_TAIL_CONFIGS)
