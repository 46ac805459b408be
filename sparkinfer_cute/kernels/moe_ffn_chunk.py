"""Fused selected-expert MoE FFN, chunk mapping (Q4_K / Q6_K / Q6_K_P): the default in the moe_ffn.py wrappers
where it applies. The gemv_chunk.py mapping (a lane owns 32 weights of a block per step, every weight load of a
lane issued before the math: one DRAM round trip per warp), float or dp4a (``q8``) in the same kernel.

- :class:`MoeGateUpChunk`: a warp owns ``rows_per_warp`` rows o of one selected expert and computes their gate and
  up rows (2 * rows_per_warp weight rows sharing the activation loads), then SwiGLU.
- :class:`MoeDownChunk`: a warp owns ``rows_per_warp`` output rows; its lanes sweep the (slot, chunk) pairs of all
  ``k`` (static) experts, all weight loads first, w_j-weighted, then one butterfly per row (fixed order, no
  atomics). The rows of a warp share the expert-id, router-weight and activation loads.

Rows per warp: the faster of 1 and 2 on the H100 per path and type (RESULTS.md, "MoE chunk rows per warp"); the
chunk kernels are ~2.5x faster than the slice ones at the Qwen3 shapes (RESULTS.md, "Fused MoE FFN").
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
from cutlass import Float32, Int8, Int32, Uint8, cute

from .common import WarpRowKernel, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .gemv_chunk import chunk_ok, chunk_rows_partial
from .norm_chain import FfnTail, tail_fake_args
from .q8_1 import quantize_block_when_complete
from .quant_decode import QK8_1
from .quant_dot import CHUNKS_PER_BLOCK, chunk_dot_f32, chunk_dot_q8, chunk_load, chunk_supported, chunk_x_f32, \
    chunk_x_q8, x_sums_f32
from .registry import register

WARPS = WarpRowKernel.WARPS


def gate_up_rows_per_warp(q8: bool) -> int:
    return 1 if q8 else 2


def down_rows_per_warp(qtype: str, q8: bool) -> int:
    return 2 if (not q8 and qtype in ("Q4_K", "Q6_K_P")) else 1


def silu(g: Float32) -> Float32:
    return g / (Float32(1.0) + cute.math.exp(-g, fastmath=True))


GLU_ACTS = ("silu", "gelu_tanh")


def glu_act(g: Float32, act: str) -> Float32:
    """The gate activation of a GLU expert: SiLU (Qwen) or the tanh GELU (Gemma: ggml_gelu, kernels/glu.py's
    formula ``0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2)))``). ``act`` is static."""
    if act == "silu":
        return silu(g)
    inner = Float32(0.79788456080286535587989211986876) * g * (Float32(1.0) + Float32(0.044715) * g * g)
    return Float32(0.5) * g * (Float32(1.0) + cute.math.tanh(inner))


class MoeGateUpChunk(WarpRowKernel):
    """``act[slot, o] = glu_act(Wgate[e] . x) * (Wup[e] . x)``, e = ids[slot] (``act``: "silu" or "gelu_tanh");
    ``fused``: one [E, 2*n_ff, n_in] tensor, gate rows first (``pWu`` unused). ``quantize_out``: also the q8_1
    copy of ``act`` (the dp4a down projection's input) into (pAq, pAd, pAs), each block quantized by the last CTA
    that writes into it (q8_1.py ``quantize_block_when_complete``; ``pCnt``: k * n_ff / 32 zeroed int32)."""

    def __init__(self, qtype: str, n_in: int, n_ff: int, fused: bool = False, q8: bool = False,
                 rows_per_warp: int = 1, x_loads_first: bool = False, act: str = "silu", quantize_out: bool = False):
        super().__init__()
        self.quantize_out = quantize_out
        if quantize_out:
            check_quantize_out(n_ff, WARPS * rows_per_warp)
        assert act in GLU_ACTS, act
        self.act = act
        self.x_loads_first = x_loads_first
        assert chunk_ok(qtype, n_in) and n_ff % rows_per_warp == 0
        self.qtype, self.n_in, self.n_ff, self.fused, self.q8 = qtype, n_in, n_ff, fused, q8
        self.rows_per_warp = rows_per_warp
        self.rows_per_cta = WARPS * rows_per_warp
        self.expert_rows = 2 * n_ff if fused else n_ff
        self.up_row0 = n_ff if fused else 0
        self.chunks_per_lane = n_in // 256 * CHUNKS_PER_BLOCK // 32

    @cute.jit
    def __call__(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer,
                 pXd: cute.Pointer, pIds: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer,
                 pAs: cute.Pointer, pCnt: cute.Pointer, n_slots: Int32, stream: cuda.CUstream):
        self.launch_rows(self.kernel(pWg, pWu, pX, pXq, pXd, pIds, pAct, pAq, pAd, pAs, pCnt), self.n_ff,
                         WARPS * self.rows_per_warp, n_slots, stream)

    @cute.kernel
    def kernel(self, pWg: cute.Pointer, pWu: cute.Pointer, pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer,
               pIds: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer,
               pCnt: cute.Pointer):
        pdl_prologue(self.pdl)
        _, bx, slot, warp, lane = self.thread_coords()
        self.rows(bx, slot, warp, lane, pWg, pWu, pX, pXq, pXd, pXd, pIds, pAct, pAq, pAd, pAs, pCnt)

    @cute.jit
    def rows(self, bx: Int32, slot: Int32, warp: Int32, lane: Int32, pWg: cute.Pointer, pWu: cute.Pointer,
             pX: cute.Pointer, pXq: cute.Pointer, pXd: cute.Pointer, pXs: cute.Pointer, pIds: cute.Pointer,
             pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pAs: cute.Pointer, pCnt: cute.Pointer):
        """What CTA (``bx``, ``slot``) of the launch grid does (the whole kernel but the PDL prologue; every thread
        calls it): routed_experts.py runs it on CTAs of a grid that routes first. ``pXs`` is not read (the same
        arguments as moe_ffn.py :meth:`MoeGateUp.rows`)."""
        rpw = self.rows_per_warp
        o0 = (bx * WARPS + warp) * rpw
        nbpr = self.n_in // 256
        if o0 < self.n_ff:
            e = self.expert_id(pIds, slot)
            g0 = e * self.expert_rows + o0
            u0 = e * self.expert_rows + self.up_row0 + o0
            rows = [(pWg, (g0 + r) * nbpr) for r in range(rpw)] + [(pWu, (u0 + r) * nbpr) for r in range(rpw)]
            xargs = (pXq, pXd) if self.q8 else (pX,)
            acc = chunk_rows_partial(self.qtype, self.q8, rows, xargs, 0, lane, self.chunks_per_lane,
                                     self.x_loads_first)
            act = cute.make_tensor(pAct, cute.make_layout((slot + 1) * self.n_ff))
            for r in cutlass.range_constexpr(rpw):
                g = warp_reduce_sum(acc[r])
                up = warp_reduce_sum(acc[rpw + r])
                if lane == r:
                    act[slot * self.n_ff + o0 + r] = glu_act(g, self.act) * up
        if cutlass.const_expr(self.quantize_out):
            rows_per_cta = WARPS * rpw
            quantize_block_when_complete(pAct, pAq, pAd, pAs, pCnt,
                                         slot * (self.n_ff // QK8_1) + bx * rows_per_cta // QK8_1,
                                         QK8_1 // rows_per_cta, warp, lane)


def check_quantize_out(n_ff: int, rows_per_cta: int) -> None:
    """A gate/up kernel can quantize its own output when each q8_1 block of 32 rows is written by whole CTAs."""
    if n_ff % QK8_1 or QK8_1 % rows_per_cta:
        raise ValueError(f"quantize_out needs n_ff ({n_ff}) a multiple of {QK8_1} and CTAs of rows dividing it "
                         f"({rows_per_cta} rows per CTA)")


def down_chunk_ok(qtype: str, n_ff: int, k: int) -> bool:
    return chunk_supported(qtype) and n_ff % 256 == 0 and (k * (n_ff // 256) * CHUNKS_PER_BLOCK) % 32 == 0


class MoeDownChunk(WarpRowKernel):
    """``y[o] = [resid[o] +] sum_j w_j * Wdown[ids[j], o] . act[j]`` for the ``rows_per_warp`` rows o of a warp.
    ``tail`` (norm_chain.py :class:`FfnTail`): the last CTA to finish then runs the post-FFN norm chain on ``y``
    (the next norm of the residual stream without a launch of its own)."""

    def __init__(self, qtype: str, n_ff: int, n_out: int, k: int, add_residual: bool = False, q8: bool = False,
                 rows_per_warp: int = 1, x_loads_first: bool = False, tail: FfnTail | None = None):
        assert down_chunk_ok(qtype, n_ff, k) and n_out % rows_per_warp == 0
        self.x_loads_first = x_loads_first
        super().__init__()
        self.qtype, self.n_ff, self.n_out, self.k, self.add_residual, self.q8 = qtype, n_ff, n_out, k, add_residual, q8
        self.rows_per_warp = rows_per_warp
        self.rows_per_cta = WARPS * rows_per_warp
        self.chunks_per_row = n_ff // 256 * CHUNKS_PER_BLOCK
        self.chunks_per_lane = k * self.chunks_per_row // 32
        assert tail is None or tail.row_len == n_out, (tail, n_out)
        self.tail = tail.chain(WARPS * 32) if tail is not None else None

    @cute.jit
    def __call__(self, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer,
                 pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer,
                 tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer,
                 t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer,
                 t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer, eps: Float32, stream: cuda.CUstream):
        self.launch_rows(self.kernel(pW, pAct, pAq, pAd, pIds, pWeights, pResid, pY, tCnt, t0, t1, t2, t3, t4, t5,
                                     t6, t7, t8, t9, t10, t11, eps),
                         self.n_out, WARPS * self.rows_per_warp, 1, stream)

    @cute.kernel
    def kernel(self, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer, pAd: cute.Pointer, pIds: cute.Pointer,
               pWeights: cute.Pointer, pResid: cute.Pointer, pY: cute.Pointer, tCnt: cute.Pointer, t0: cute.Pointer,
               t1: cute.Pointer, t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer,
               t6: cute.Pointer, t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer,
               t11: cute.Pointer, eps: Float32):
        pdl_prologue(self.pdl)
        _, bx, _, warp, lane = self.thread_coords()
        self.rows(bx, warp, lane, pW, pAct, pAq, pAd, pAd, pIds, pWeights, pResid, pY, Int32(self.k), tCnt, t0, t1,
                  t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, eps)

    @cute.jit
    def rows(self, bx: Int32, warp: Int32, lane: Int32, pW: cute.Pointer, pAct: cute.Pointer, pAq: cute.Pointer,
             pAd: cute.Pointer, pAs: cute.Pointer, pIds: cute.Pointer, pWeights: cute.Pointer, pResid: cute.Pointer,
             pY: cute.Pointer, n_slots: Int32, tCnt: cute.Pointer, t0: cute.Pointer, t1: cute.Pointer,
             t2: cute.Pointer, t3: cute.Pointer, t4: cute.Pointer, t5: cute.Pointer, t6: cute.Pointer,
             t7: cute.Pointer, t8: cute.Pointer, t9: cute.Pointer, t10: cute.Pointer, t11: cute.Pointer,
             eps: Float32, arrivals: cutlass.Constexpr[int] = 0):
        """What CTA ``bx`` of the launch grid does (the whole kernel but the PDL prologue; every thread calls it):
        routed_experts.py runs it on CTAs of a grid that routes and runs the gate/up first (``arrivals``: the CTAs
        of this phase, for the tail). ``pAs`` and ``n_slots`` are not read (k is static here): the same arguments
        as moe_ffn.py :meth:`MoeDown.rows`."""
        o0 = (bx * WARPS + warp) * self.rows_per_warp
        if o0 < self.n_out:
            acc = self.partial_dots(pW, pAct, pAq, pAd, pIds, pWeights, o0, lane)
            mY = cute.make_tensor(pY, cute.make_layout(self.n_out))
            mR = cute.make_tensor(pResid, cute.make_layout(self.n_out))
            for r in cutlass.range_constexpr(self.rows_per_warp):
                total = warp_reduce_sum(acc[r])
                if lane == r:
                    if cutlass.const_expr(self.add_residual):
                        total = total + mR[o0 + r]
                    mY[o0 + r] = total
        if cutlass.const_expr(self.tail is not None):
            self.tail.tail(tCnt, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, eps, arrivals)

    def partial_dots(self, pW, pAct, pAq, pAd, pIds, pWeights, o0, lane):
        """Per-lane w_j-weighted partial dots of the warp's rows (traced inline into :meth:`kernel`)."""
        q, cpr, nbpr, rpw = self.qtype, self.chunks_per_row, self.n_ff // 256, self.rows_per_warp
        s = lane & (CHUNKS_PER_BLOCK - 1)
        ids = cute.make_tensor(pIds, cute.make_layout(self.k))
        wts = cute.make_tensor(pWeights, cute.make_layout(self.k))
        js, kbs, raws = [], [], []
        for t in range(self.chunks_per_lane):
            C = lane + 32 * t
            j = C // cpr
            js.append(j)
            kbs.append((C - j * cpr) >> 3)
        xqs = []
        if self.q8 and self.x_loads_first:  # activation loads (L2 hits, independent of the expert ids) first
            xqs = [chunk_x_q8(q, pAq, pAd, js[t] * self.n_ff + kbs[t] * 256, s) for t in range(self.chunks_per_lane)]
        for t in range(self.chunks_per_lane):
            row0 = ids[js[t]] * self.n_out + o0
            raws.append([chunk_load(q, pW, (row0 + r) * nbpr + kbs[t], s) for r in range(rpw)])
        acc = [None] * rpw
        for t in range(self.chunks_per_lane):
            xbase = js[t] * self.n_ff + kbs[t] * 256
            wj = wts[js[t]]
            if self.q8:
                xq = xqs[t] if xqs else chunk_x_q8(q, pAq, pAd, xbase, s)
                vals = [chunk_dot_q8(q, raw, s, xq) for raw in raws[t]]
            else:
                xv = chunk_x_f32(q, pAct, xbase, s)
                xs = x_sums_f32(q, xv)
                vals = [chunk_dot_f32(q, raw, s, xv, xs) for raw in raws[t]]
            acc = [wj * v if a is None else a + wj * v for a, v in zip(acc, vals)]
        return acc


@kernel_cache
def compile_moe_gate_up_chunk(qtype: str, n_in: int, n_ff: int, fused: bool = False, q8: bool = False,
                              rows_per_warp: int = 1, x_loads_first: bool = False, act: str = "silu",
                              quantize_out: bool = False):
    """Runtime args: (Wg, Wu u8, x f32, xq i8, xd f32, ids i32 (align 4), act f32, aq i8 (align 4), ad f32 (align
    4), as f32 (align 4), counters i32 (align 4) pointers, n_slots, stream); the last four are used only with
    ``quantize_out``."""
    return cute.compile(MoeGateUpChunk(qtype, n_in, n_ff, fused, q8, rows_per_warp, x_loads_first, act, quantize_out),
                        gptr(Uint8, 0), gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0),
                        gptr(Int32, 0, 4), gptr(Float32, 0), *q8_out_fake_ptrs(), Int32(1),
                        cute.runtime.make_fake_stream(), options=compile_options())


def q8_out_fake_ptrs() -> tuple:
    """Compile-time stand-ins of the (aq, ad, as, counters) pointers of a gate/up kernel's q8_1 output."""
    return gptr(Int8, 0, 4), gptr(Float32, 0, 4), gptr(Float32, 0, 4), gptr(Int32, 0, 4)


@kernel_cache
def compile_moe_down_chunk(qtype: str, n_ff: int, n_out: int, k: int, add_residual: bool = False, q8: bool = False,
                           rows_per_warp: int = 1, x_loads_first: bool = False, tail: FfnTail | None = None):
    """Runtime args: (W u8, act f32, aq i8, ad f32, ids i32 (align 4), weights f32 (align 4), resid f32, y f32
    pointers, the tail's arguments (norm_chain.py ``FfnTailArgs.launch_args``, or ``no_tail_args``), stream)."""
    return cute.compile(MoeDownChunk(qtype, n_ff, n_out, k, add_residual, q8, rows_per_warp, x_loads_first, tail),
                        gptr(Uint8, 0), gptr(Float32, 0), gptr(Int8, 0), gptr(Float32, 0), gptr(Int32, 0, 4),
                        gptr(Float32, 0, 4), gptr(Float32, 0), gptr(Float32, 0), *tail_fake_args(),
                        cute.runtime.make_fake_stream(), options=compile_options())


# Qwen3-30B-A3B (8 of 128 experts, 2048 / 768), the default rows per warp of each path
GATE_UP_CHUNK_CONFIGS = [dict(qtype="Q4_K", n_in=2048, n_ff=768, fused=f, q8=q8, rows_per_warp=gate_up_rows_per_warp(q8))
                         for f in (False, True) for q8 in (False, True)]
# ... writing the q8_1 copy of its output for the dp4a down projection (what the int8 MoE decode runs)
GATE_UP_CHUNK_CONFIGS += [dict(qtype="Q4_K", n_in=2048, n_ff=768, fused=f, q8=True, rows_per_warp=rpw,
                               quantize_out=True) for f in (False, True) for rpw in (1, 2)]
DOWN_CHUNK_CONFIGS = [dict(qtype=q, n_ff=768, n_out=2048, k=8, add_residual=r, q8=q8,
                           rows_per_warp=down_rows_per_warp(q, q8))
                      for q in ("Q4_K", "Q6_K", "Q6_K_P") for r in (False, True) for q8 in (False, True)]

# ... and with the norms after it as its tail (models/ops.py AfterFfn): Qwen3's residual add + next attn_norm with its
# q8_1 copy (the int8 build; f32 with SPARKINFER_DP4A=none), on the 30B shape and the synthetic tiny file
DOWN_CHUNK_CONFIGS += [dict(qtype=q, n_ff=n_ff, n_out=n_out, k=k, q8=q8, rows_per_warp=down_rows_per_warp(q, q8),
                            tail=FfnTail(n_out, next_q8=q8, post_norm=False)) for q in ("Q4_K", "Q6_K")
                       for q8 in (False, True)
                       for n_ff, n_out, k in ((768, 2048, 8), (256, 256, 4))]

register("moe_gate_up_chunk", compile_moe_gate_up_chunk, GATE_UP_CHUNK_CONFIGS)
register("moe_down_chunk", compile_moe_down_chunk, DOWN_CHUNK_CONFIGS)
