"""Chains of RMSNorms on one row, one launch: the norm-heavy seams of a Gemma decode layer (models.md §Gemma 3/4).

A Gemma 4 layer runs eight RMSNorms of the same n_embd row between its matmuls (Gemma 3: four), each a launch of a
few microseconds for ~11 KB of data (the launch plan, models/launch_plan.py: 8 of the 21 launches of a Gemma 4
sliding layer). The two seams where they bunch up are one kernel each (Gemma 3 uses the one-output / no-experts
forms, with scale 1):

- :class:`PostAttentionNorms` (after the O projection ``o``)::

      x   = x + rmsnorm(o) * w_post          (post_attention_norm, residual add; x written back)
      out_i = rmsnorm(x) * w_i               for i < n_out (ffn_norm -> the dense MLP input, and on MoE layers the
                                              router input and pre_ffw_norm_2 -> the experts' input)
      [q8_1 copy of the last out]             (the int8 experts' input)

- :class:`PostFfnNorms` (after the dense MLP's down projection ``f`` and, on MoE layers, the experts' sum ``y``)::

      s  = rmsnorm(f) * w1 + rmsnorm(y) * w2  (post_ffw_norm_1 / _2; without y: s = f)
      x  = (x + rmsnorm(s) * w) * scale       (post_ffw_norm, residual add, layer_output_scale: one f32 on the device)
      [h = rmsnorm(x) * w_next [+ q8_1 copy]] (the next layer's attn_norm, or the final output_norm)

Every norm is ``(v * rsqrt(mean(v^2) + eps)) * w`` (ggml order) in f32, the sum of squares reduced as in
q8_1.py :class:`RmsNormQ8_1` (8 consecutive elements per thread, warp butterfly, fixed-order sum of the warp
partials): same math as the separate launches, the sums in another order than rmsnorm.py's (f32 rounding, ~1e-7
relative). One CTA per row; the row stays in registers between the steps, so nothing but the outputs is written.

**Tails.** A chain can also end the matmul that writes its input, without a launch of its own
(:meth:`RowNormChain.tail`, models/ops.py ``AfterFfn`` / ``AfterAttention``): the last CTA of that grid to finish
(an int32 arrival counter) runs the chain on the row the grid wrote, spread over its 128 threads in passes. The
host kernels (kernels/moe_ffn.py, moe_ffn_chunk.py, gemv.py, gemv_chunk.py) take the tail's static shape
(:class:`FfnTail` / :class:`AttnTail`) and 13 generic runtime arguments (:class:`FfnTailArgs` /
:class:`AttnTailArgs` ``launch_args``, or :func:`no_tail_args`). Qwen3-MoE's residual add + next attn_norm is the
post-FFN chain without its norms (``post_norm`` False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cuda.bindings.driver as cuda
import cutlass
from cutlass import cute
from cutlass import Float32, Int8, Int32

from .arch import pdl_enabled
from .common import fake_ptr, gptr, pdl_prologue, warp_reduce_sum
from .compile import compile_options, kernel_cache
from .q8_1 import QK8_1, store_q8_1_of_eight
from .registry import register

EPT = 8  # f32 elements per thread (two 16-byte vectors)


class RowNormChain:
    """Shared set-up of the chain kernels: a row of ``N`` (multiple of 32) in groups of 8 consecutive elements, group
    ``g`` held by thread ``g % threads`` in its register slot ``g // threads`` (a "pass"); device helpers to load,
    normalize and store the thread's groups. ``threads`` 0: one group per thread (``N / 8`` threads rounded up to a
    warp), the standalone one-CTA kernels; a fixed count (a multiple of 32): the chain run by a CTA of another kernel
    (:meth:`tail`), several passes per thread; the chain's inputs written by that kernel are then read through L2.

    A chain's :meth:`body` takes 12 pointers and eps (each chain's own meaning), so :meth:`tail` and the host
    kernels' argument lists are the same for every chain."""

    def __init__(self, N: int, threads: int = 0):
        self.pdl = pdl_enabled()
        self.in_tail = threads > 0
        if N % QK8_1:
            raise ValueError(f"norm chain rows must be a multiple of {QK8_1}, got {N}")
        self.N = N
        self.active = N // EPT
        self.threads = threads or -(-self.active // 32) * 32
        if self.threads % 32 or self.threads > 1024:
            raise ValueError(f"a norm chain runs on a multiple of 32 threads <= 1024, got {self.threads} (N {N})")
        self.passes = -(-self.active // self.threads)
        self.warps = self.threads // 32

    def regs(self):
        """This thread's groups: a (passes, 8) f32 register tensor (device side)."""
        return cute.make_rmem_tensor(cute.make_layout((self.passes, EPT), stride=(EPT, 1)), Float32)

    @cute.jit
    def load(self, p: cute.Pointer, v: cute.Tensor, tid: Int32, coherent: cutlass.Constexpr[bool] = False):
        """``coherent``: through L2 (``ld.global.cg``), for a row other CTAs of the same grid wrote."""
        for j in cutlass.range_constexpr(self.passes):
            g = tid + j * self.threads
            if g < self.active:
                if cutlass.const_expr(coherent):
                    for i in cutlass.range_constexpr(EPT):
                        v[j, i] = cute.arch.load((p + (g * EPT + i)).llvm_ptr, Float32, cop="cg")
                else:
                    cute.autovec_copy(cute.make_tensor(p + cute.assume(g * EPT, divby=EPT), cute.make_layout(EPT)),
                                      v[j, None])

    @cute.jit
    def store(self, v: cute.Tensor, p: cute.Pointer, tid: Int32):
        for j in cutlass.range_constexpr(self.passes):
            g = tid + j * self.threads
            if g < self.active:
                cute.autovec_copy(v[j, None], cute.make_tensor(p + cute.assume(g * EPT, divby=EPT),
                                                               cute.make_layout(EPT)))

    @cute.jit
    def rstd(self, v: cute.Tensor, red: cute.Tensor, tid: Int32, eps: Float32) -> Float32:
        """``rsqrt(mean(v^2) + eps)`` of the row (every thread gets the same bits). Called several times per
        kernel: the first barrier keeps a warp from overwriting ``red`` while another still reads the last sum."""
        ss = Float32(0.0)
        for j in cutlass.range_constexpr(self.passes):
            if tid + j * self.threads < self.active:
                for i in cutlass.range_constexpr(EPT):
                    ss = ss + v[j, i] * v[j, i]
        ss = warp_reduce_sum(ss, small_offsets_first=True)
        cute.arch.barrier()
        if tid % 32 == 0:
            red[tid // 32] = ss
        cute.arch.barrier()
        tot = Float32(0.0)
        for i in cutlass.range_constexpr(self.warps):
            tot = tot + red[i]
        return cute.math.rsqrt(tot / Float32(self.N) + eps)

    @cute.jit
    def normed(self, v: cute.Tensor, rstd: Float32, pW: cute.Pointer, out: cute.Tensor, tid: Int32):
        """``out = (v * rstd) * w`` for this thread's elements (ggml order)."""
        w = cute.make_rmem_tensor((EPT,), Float32)
        for j in cutlass.range_constexpr(self.passes):
            g = tid + j * self.threads
            if g < self.active:
                cute.autovec_copy(cute.make_tensor(pW + cute.assume(g * EPT, divby=EPT), cute.make_layout(EPT)), w)
                for i in cutlass.range_constexpr(EPT):
                    out[j, i] = (v[j, i] * rstd) * w[i]

    @cute.jit
    def store_q8(self, h: cute.Tensor, tid: Int32, pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer):
        """The q8_1 copy of the row ``h`` (q8_1.py ``store_q8_1_of_eight``: a block of 32 is 4 neighbouring lanes,
        which holds in every pass as ``threads`` is a multiple of 32)."""
        for j in cutlass.range_constexpr(self.passes):
            g = tid + j * self.threads
            store_q8_1_of_eight(h[j, None], g < self.active, g, g * EPT, pQ, pD, pS)

    def smem_red(self):
        smem = cutlass.memory.SmemAllocator()
        return smem.allocate_tensor(Float32, cute.make_layout(self.warps), byte_alignment=16)

    @cute.jit
    def tail(self, pCnt: cute.Pointer, p0: cute.Pointer, p1: cute.Pointer, p2: cute.Pointer, p3: cute.Pointer,
             p4: cute.Pointer, p5: cute.Pointer, p6: cute.Pointer, p7: cute.Pointer, p8: cute.Pointer,
             p9: cute.Pointer, p10: cute.Pointer, p11: cute.Pointer, eps: Float32,
             arrivals: cutlass.Constexpr[int] = 0):
        """The chain as the end of another kernel: every thread of every CTA calls it after its CTA's last store
        of the chain's input; the last CTA of the grid to arrive (int32 counter ``pCnt[0]``, zero before the
        launch, reset by that CTA for the next launch / graph replay) runs :meth:`body`. Release / acquire as in
        q8_1.py ``quantize_block_when_complete``: the barrier orders the CTA's stores before thread 0's GPU-scope
        fence + acq_rel atomic; the last CTA fences again before it reads the row. No CTA waits for another.
        ``arrivals``: the CTAs that write the row, where they are not the whole grid (a phase of a chained launch,
        routed_experts.py); 0: every CTA of the grid. Measured on an H100 with PDL, the tail adds 3.5-7.8 µs of
        serial time to its kernel, more than the norm kernel's own launch (RESULTS.md, 2026-12-08): models/ops.py
        keeps the tail passes off by default."""
        smem = cutlass.memory.SmemAllocator()
        flag = smem.allocate_tensor(Int32, cute.make_layout(1), byte_alignment=16)
        red = self.smem_red()
        tid = cute.arch.thread_idx()[0]
        if cutlass.const_expr(arrivals > 0):
            n = Int32(arrivals)
        else:
            gx, gy, gz = cute.arch.grid_dim()
            n = gx * gy * gz
        cute.arch.sync_threads()
        if tid == 0:
            cute.arch.fence_acq_rel_gpu()
            flag[0] = cute.arch.atomic_add(pCnt.llvm_ptr, Int32(1), sem="acq_rel", scope="gpu")
        cute.arch.sync_threads()
        if flag[0] == n - 1:
            cute.arch.fence_acq_rel_gpu()
            self.body(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, eps, red)
            if tid == 0:
                cute.make_tensor(pCnt, cute.make_layout(1))[0] = Int32(0)


class PostAttentionNorms(RowNormChain):
    """``x += rmsnorm(o) * w_post``; ``out_i = rmsnorm(x) * w_i`` for ``i < n_out`` (1..3); ``q8_last``: also the
    q8_1 copy of the last output. Unused output / weight pointers of a smaller ``n_out`` may be any valid ones.
    ``tail_threads``: run as the tail of the O projection that writes ``o`` (:meth:`RowNormChain.tail`)."""

    def __init__(self, N: int, n_out: int, q8_last: bool = False, tail_threads: int = 0):
        super().__init__(N, tail_threads)
        if not 1 <= n_out <= 3:
            raise ValueError(f"n_out must be 1..3, got {n_out}")
        self.n_out, self.q8_last = n_out, q8_last

    @cute.jit
    def __call__(self, pO: cute.Pointer, pX: cute.Pointer, pWpost: cute.Pointer, pW0: cute.Pointer,
                 pW1: cute.Pointer, pW2: cute.Pointer, pOut0: cute.Pointer, pOut1: cute.Pointer, pOut2: cute.Pointer,
                 pQ: cute.Pointer, pD: cute.Pointer, pS: cute.Pointer, eps: Float32, stream: cuda.CUstream):
        self.kernel(pO, pX, pWpost, pW0, pW1, pW2, pOut0, pOut1, pOut2, pQ, pD, pS, eps).launch(
            grid=[1, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pO: cute.Pointer, pX: cute.Pointer, pWpost: cute.Pointer, pW0: cute.Pointer, pW1: cute.Pointer,
               pW2: cute.Pointer, pOut0: cute.Pointer, pOut1: cute.Pointer, pOut2: cute.Pointer, pQ: cute.Pointer,
               pD: cute.Pointer, pS: cute.Pointer, eps: Float32):
        pdl_prologue(self.pdl)
        self.body(pO, pX, pWpost, pW0, pW1, pW2, pOut0, pOut1, pOut2, pQ, pD, pS, eps, self.smem_red())

    @cute.jit
    def body(self, pO: cute.Pointer, pX: cute.Pointer, pWpost: cute.Pointer, pW0: cute.Pointer, pW1: cute.Pointer,
             pW2: cute.Pointer, pOut0: cute.Pointer, pOut1: cute.Pointer, pOut2: cute.Pointer, pQ: cute.Pointer,
             pD: cute.Pointer, pS: cute.Pointer, eps: Float32, red: cute.Tensor):
        tid = cute.arch.thread_idx()[0]
        v, x, h = self.regs(), self.regs(), self.regs()
        self.load(pO, v, tid, self.in_tail)
        self.normed(v, self.rstd(v, red, tid, eps), pWpost, h, tid)
        self.load(pX, x, tid)
        for j in cutlass.range_constexpr(self.passes):
            for i in cutlass.range_constexpr(EPT):
                x[j, i] = x[j, i] + h[j, i]
        self.store(x, pX, tid)
        r = self.rstd(x, red, tid, eps)
        weights, outs = (pW0, pW1, pW2), (pOut0, pOut1, pOut2)
        for k in cutlass.range_constexpr(self.n_out):
            self.normed(x, r, weights[k], h, tid)
            self.store(h, outs[k], tid)
        if cutlass.const_expr(self.q8_last):
            self.store_q8(h, tid, pQ, pD, pS)


class PostFfnNorms(RowNormChain):
    """``s = rmsnorm(f) * w1 + rmsnorm(y) * w2`` (``has_experts``; else ``s = f``), then
    ``x = (x + rmsnorm(s) * w) * scale[0]``; ``next_norm``: also ``h = rmsnorm(x) * w_next`` (the next norm of the
    residual stream), ``next_q8`` with its q8_1 copy. ``post_norm`` False: ``x = x + f`` instead (no post_ffw_norm,
    no scale; Qwen3-MoE's residual add before the next attn_norm). Pointers a flag leaves unused may be any valid
    ones.

    ``tail_threads`` (a multiple of 32): the chain is not a kernel of its own but the end of another one
    (:meth:`RowNormChain.tail`, run by the last CTA of that grid to finish, e.g. the MoE down projection that writes
    ``y`` or ``f``): the row is spread over that CTA's threads, and ``f``/``y`` are read through L2."""

    def __init__(self, N: int, has_experts: bool, next_norm: bool = False, next_q8: bool = False,
                 post_norm: bool = True, tail_threads: int = 0):
        super().__init__(N, tail_threads)
        if next_q8 and not next_norm:
            raise ValueError("next_q8 needs next_norm")
        if has_experts and not post_norm:
            raise ValueError("the experts' post_ffw_norm_2 needs post_norm")
        self.has_experts, self.next_norm, self.next_q8, self.post_norm = has_experts, next_norm, next_q8, post_norm

    @cute.jit
    def __call__(self, pF: cute.Pointer, pY: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pW: cute.Pointer,
                 pX: cute.Pointer, pScale: cute.Pointer, pWn: cute.Pointer, pH: cute.Pointer, pQ: cute.Pointer,
                 pD: cute.Pointer, pS: cute.Pointer, eps: Float32, stream: cuda.CUstream):
        self.kernel(pF, pY, pW1, pW2, pW, pX, pScale, pWn, pH, pQ, pD, pS, eps).launch(
            grid=[1, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, pF: cute.Pointer, pY: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pW: cute.Pointer,
               pX: cute.Pointer, pScale: cute.Pointer, pWn: cute.Pointer, pH: cute.Pointer, pQ: cute.Pointer,
               pD: cute.Pointer, pS: cute.Pointer, eps: Float32):
        pdl_prologue(self.pdl)
        self.body(pF, pY, pW1, pW2, pW, pX, pScale, pWn, pH, pQ, pD, pS, eps, self.smem_red())

    @cute.jit
    def body(self, pF: cute.Pointer, pY: cute.Pointer, pW1: cute.Pointer, pW2: cute.Pointer, pW: cute.Pointer,
             pX: cute.Pointer, pScale: cute.Pointer, pWn: cute.Pointer, pH: cute.Pointer, pQ: cute.Pointer,
             pD: cute.Pointer, pS: cute.Pointer, eps: Float32, red: cute.Tensor):
        tid = cute.arch.thread_idx()[0]
        s, v, h = self.regs(), self.regs(), self.regs()
        self.load(pF, v, tid, self.in_tail)
        if cutlass.const_expr(self.has_experts):
            self.normed(v, self.rstd(v, red, tid, eps), pW1, s, tid)
            self.load(pY, v, tid, self.in_tail)
            self.normed(v, self.rstd(v, red, tid, eps), pW2, h, tid)
            for j in cutlass.range_constexpr(self.passes):
                for i in cutlass.range_constexpr(EPT):
                    s[j, i] = h[j, i] + s[j, i]  # the separate launches' order: rmsnorm(y2 as x, m as residual)
        else:
            for j in cutlass.range_constexpr(self.passes):
                for i in cutlass.range_constexpr(EPT):
                    s[j, i] = v[j, i]
        if cutlass.const_expr(self.post_norm):
            self.normed(s, self.rstd(s, red, tid, eps), pW, h, tid)
            self.load(pX, v, tid)
            scale = cute.make_tensor(pScale, cute.make_layout(1))[0]
            for j in cutlass.range_constexpr(self.passes):
                for i in cutlass.range_constexpr(EPT):
                    v[j, i] = (v[j, i] + h[j, i]) * scale
        else:
            self.load(pX, v, tid)
            for j in cutlass.range_constexpr(self.passes):
                for i in cutlass.range_constexpr(EPT):
                    v[j, i] = v[j, i] + s[j, i]  # rmsnorm.py's residual order: x + r
        self.store(v, pX, tid)
        if cutlass.const_expr(self.next_norm):
            self.normed(v, self.rstd(v, red, tid, eps), pWn, h, tid)
            self.store(h, pH, tid)
            if cutlass.const_expr(self.next_q8):
                self.store_q8(h, tid, pQ, pD, pS)


@kernel_cache
def compile_post_attention_norms(N: int, n_out: int, q8_last: bool = False):
    """Runtime args: (o, x, w_post, w0, w1, w2, out0, out1, out2 f32; q (int8), d, s (f32) pointers, eps, stream)."""
    return cute.compile(PostAttentionNorms(N, n_out, q8_last), *_typed((0,) * 12, _STANDALONE_ATTN_SLOTS),
                        Float32(1e-6), cute.runtime.make_fake_stream(), options=compile_options())


@kernel_cache
def compile_post_ffn_norms(N: int, has_experts: bool, next_norm: bool = False, next_q8: bool = False):
    """Runtime args: (f, y, w1, w2, w, x, scale (align 4), w_next, h f32; q (int8), d, s (f32) pointers, eps,
    stream)."""
    return cute.compile(PostFfnNorms(N, has_experts, next_norm, next_q8), *_typed((0,) * 12), Float32(1e-6),
                        cute.runtime.make_fake_stream(), options=compile_options())


# ------------------------------------------------------------------------------------------------ wrappers
def post_attention_norms(o, x, w_post, outs, eps: float, *, xq=None, stream=None):
    """``x += rmsnorm(o) * w_post`` (in place), then ``out = rmsnorm(x) * w`` for each ``(w, out)`` of ``outs``
    (1..3 pairs; f32 DeviceArrays of one row of N); ``xq`` (a q8_1.py ``Q8Act`` of N): also the q8_1 copy of the
    last output. One launch."""
    from ..runtime import resolve_stream

    N = int(o.size)
    args = AttnTailArgs(o, x, w_post, outs, eps, None, xq)
    args.check(N)
    fn = compile_post_attention_norms(N, len(outs), xq is not None)
    fn(*_typed(args.addrs(), _STANDALONE_ATTN_SLOTS), Float32(eps), resolve_stream(stream).cu)


def post_ffn_norms(f, y, w1, w2, w, x, scale, eps: float, *, next_norm=None, stream=None):
    """``x = (x + rmsnorm(rmsnorm(f) * w1 + rmsnorm(y) * w2) * w) * scale`` in place (``y`` None: the inner sum is
    ``f``; ``w1``/``w2`` unused); ``scale``: one f32 on the device. ``next_norm`` = ``(w_next, h, xq)``: also
    ``h = rmsnorm(x) * w_next`` and (``xq`` not None) its q8_1 copy. One launch."""
    from ..runtime import resolve_stream

    N = int(f.size)
    args = FfnTailArgs(f, y, w1, w2, w, x, scale, eps, None, next_norm)
    fn = compile_post_ffn_norms(N, y is not None, **({"next_norm": True} if next_norm is not None else {}),
                                **({"next_q8": True} if args.spec.next_q8 else {}))
    fn(*_typed(args.addrs()), Float32(eps), resolve_stream(stream).cu)


# The 12 pointer slots every chain body takes (PostFfnNorms.body / PostAttentionNorms.body): (dtype, assumed
# alignment). The 7th is 4-byte aligned (PostFfnNorms' scale, one f32 that may sit anywhere in a weight buffer), the
# 10th is the q8_1 copy's int8 values. One table for the tails' compile stand-ins and launches.
TAIL_SLOTS = ((Float32, 16),) * 6 + ((Float32, 4),) + ((Float32, 16),) * 2 + ((Int8, 16),) + ((Float32, 16),) * 2
# the standalone post-attention kernel keeps its first output (slot 7) 16-byte aligned: 128-bit stores
_STANDALONE_ATTN_SLOTS = ((Float32, 16),) * 9 + ((Int8, 16),) + ((Float32, 16),) * 2


def _typed(addrs, slots=TAIL_SLOTS) -> tuple:
    """The pointers of 12 chain-body addresses, typed by ``slots``."""
    return tuple(gptr(t, a, align) for (t, align), a in zip(slots, addrs, strict=True))


class FfnTail(NamedTuple):
    """The static shape of a post-FFN chain run as the tail of the kernel that writes its input: the row length
    and the :class:`PostFfnNorms` flags."""

    row_len: int
    has_experts: bool = False
    next_norm: bool = True
    next_q8: bool = False
    post_norm: bool = True

    def chain(self, threads: int) -> PostFfnNorms:
        return PostFfnNorms(self.row_len, self.has_experts, self.next_norm, self.next_q8, self.post_norm,
                            tail_threads=threads)


class _ChainArgs:
    """What a chain reads and writes, for its standalone launch or as a tail (subclasses: the buffers as fields,
    ``counter`` and ``eps`` among them). ``inputs()``: the buffers the host kernel of a tail may write (the chain's
    input), ``rows()``: the buffers that hold a row, ``addrs()``: the 12 chain-body addresses (unused ones any valid
    address), ``what``: the chain's name in errors."""

    what = "chain"

    def check(self, N: int, writer=None) -> None:
        """The buffers hold a row of ``N``; as a tail (``writer``: the host kernel's output), the chain reads
        ``writer`` and has an int32 counter."""
        if writer is not None:
            if writer.ptr not in tuple(a.ptr for a in self.inputs()):
                raise ValueError(f"a {self.what} tail must read the output of the kernel that runs it")
            if self.counter is None or self.counter.nbytes < 4:
                raise ValueError(f"a {self.what} tail needs an int32 counter")
        for a in self.rows():
            if int(a.size) < N:
                raise ValueError(f"{self.what}: a buffer of {a.size} elements for a row of {N}")

    def launch_args(self) -> tuple:
        """The runtime arguments of :meth:`RowNormChain.tail` (the counter, the 12 body pointers, eps)."""
        return (gptr(Int32, self.counter.ptr, 4), *_typed(self.addrs()), Float32(self.eps))


@dataclass
class FfnTailArgs(_ChainArgs):
    """What a post-FFN chain reads and writes (f32 DeviceArrays of one row of N unless said): the chain of
    :func:`post_ffn_norms` with ``f``, ``y`` (None: no experts), ``w1``, ``w2``, ``w`` (unused without
    ``post_norm``), the residual stream ``x``, ``scale`` (one f32 on the device; unused without ``post_norm``),
    ``next_norm`` = ``(w_next, h, xq)`` or None, and as a tail ``counter``: one int32, zero before the first launch
    (the tail leaves it zero; one counter serves every layer of a stream). The kernel that runs the tail writes
    ``f`` or ``y``."""

    f: object
    y: object
    w1: object
    w2: object
    w: object
    x: object
    scale: object
    eps: float
    counter: object
    next_norm: tuple | None = None
    post_norm: bool = True
    what = "post-FFN"

    @property
    def spec(self) -> FfnTail:
        return FfnTail(int(self.x.size), self.y is not None, self.next_norm is not None,
                       self.next_norm is not None and self.next_norm[2] is not None, self.post_norm)

    def inputs(self) -> tuple:
        return (self.f,) + ((self.y,) if self.y is not None else ())

    def rows(self) -> tuple:
        return self.inputs() + (self.x,) + ((self.next_norm[1],) if self.next_norm is not None else ())

    def addrs(self) -> tuple:
        """f, y, w1, w2, w, x, scale, w_next, h, q, d, s (:meth:`PostFfnNorms.body`)."""
        f, w = self.f, self.w if self.w is not None else self.f
        y = self.y if self.y is not None else f
        w1 = self.w1 if self.y is not None else w
        w2 = self.w2 if self.y is not None else w
        scale = self.scale if self.scale is not None else f
        w_next, h, xq = self.next_norm if self.next_norm is not None else (w, self.x, None)
        q = (xq.qs.ptr, xq.d.ptr, xq.s.ptr) if xq is not None else (f.ptr,) * 3
        return (f.ptr, y.ptr, w1.ptr, w2.ptr, w.ptr, self.x.ptr, scale.ptr, w_next.ptr, h.ptr, *q)


class AttnTail(NamedTuple):
    """The static shape of a post-attention chain run as the tail of the O projection (:class:`PostAttentionNorms`
    flags and the row length, the projection's n_out: a GEMV's output length is a runtime argument)."""

    row_len: int
    n_out: int = 1
    q8_last: bool = False

    def chain(self, threads: int) -> PostAttentionNorms:
        return PostAttentionNorms(self.row_len, self.n_out, self.q8_last, tail_threads=threads)


@dataclass
class AttnTailArgs(_ChainArgs):
    """What a post-attention chain reads and writes: :func:`post_attention_norms` on ``o`` (the output of the
    kernel that runs the tail), ``x``, ``w_post``, ``outs`` (1..3 ``(w, out)``), ``xq``; ``counter`` as
    :class:`FfnTailArgs`."""

    o: object
    x: object
    w_post: object
    outs: list
    eps: float
    counter: object
    xq: object = None
    what = "post-attention"

    @property
    def spec(self) -> AttnTail:
        return AttnTail(int(self.o.size), len(self.outs), self.xq is not None)

    def check(self, N: int, writer=None) -> None:
        if not 1 <= len(self.outs) <= 3:
            raise ValueError(f"a post-attention chain takes 1..3 outputs, got {len(self.outs)}")
        super().check(N, writer)

    def inputs(self) -> tuple:
        return (self.o,)

    def rows(self) -> tuple:
        return (self.o, self.x, self.w_post, *(t for pair in self.outs for t in pair))

    def addrs(self) -> tuple:
        """o, x, w_post, w0..w2, out0..out2, q, d, s (:meth:`PostAttentionNorms.body`)."""
        ws = [w for w, _ in self.outs] + [self.outs[0][0]] * (3 - len(self.outs))
        os_ = [out for _, out in self.outs] + [self.outs[0][1]] * (3 - len(self.outs))
        xq = self.xq
        q = (xq.qs.ptr, xq.d.ptr, xq.s.ptr) if xq is not None else (self.o.ptr,) * 3
        return (self.o.ptr, self.x.ptr, self.w_post.ptr, *(w.ptr for w in ws), *(o.ptr for o in os_), *q)


def tail_fake_args() -> tuple:
    """Compile-time stand-ins of the tail arguments (:meth:`_ChainArgs.launch_args`)."""
    return (fake_ptr(Int32, 4), *_typed((0,) * 12), Float32(1e-6))


def no_tail_args(any_f32) -> tuple:
    """The tail arguments of a launch without a tail (every pointer ``any_f32``'s: never dereferenced)."""
    return (gptr(Int32, any_f32.ptr, 4), *_typed((any_f32.ptr,) * 12), Float32(0.0))


def tail_launch(tail, n_out: int, writer) -> tuple[dict, tuple]:
    """(compile keywords, runtime arguments) of a host kernel's tail: ``tail`` (:class:`FfnTailArgs` /
    :class:`AttnTailArgs`) checked against the host's output ``writer`` of ``n_out`` values; None, no tail: no
    keyword (the registered tail-less config key) and :func:`no_tail_args`."""
    if tail is None:
        return {}, no_tail_args(writer)
    tail.check(n_out, writer)
    return {"tail": tail.spec}, tail.launch_args()


# Gemma 4 26B-A4B (n_embd 2816) and the synthetic tiny presets (256), Gemma 3 270M (640): the MoE layers' three
# outputs with the experts' q8_1 input, a dense layer's one; the post-FFN forms with and without the next norm
_SIZES = (2816, 256, 640)  # + Gemma 3 270M
register("post_attention_norms", compile_post_attention_norms,
         [dict(N=n, n_out=3, q8_last=True) for n in _SIZES] + [dict(N=n, n_out=3) for n in _SIZES]
         + [dict(N=n, n_out=1) for n in _SIZES])
register("post_ffn_norms", compile_post_ffn_norms, [dict(N=n, has_experts=e) for n in _SIZES for e in (True, False)]
         + [dict(N=n, has_experts=e, next_norm=True, next_q8=q) for n in _SIZES for e in (True, False)
            for q in (True, False)])
