"""Tunable ops ``gemv`` (f32 activations) and ``gemv_q8`` (q8_1 activations, dp4a): the decode GEMV of one
activation row over raw GGUF weights (``kernels/gemv.py``: :class:`Gemv`, float or dp4a by its static ``q8`` flag;
``kernels/gemv_chunk.py``: :class:`GemvChunk`, the same).

Shape: ``qtype`` (the type on the GPU: Q6_K tensors are uploaded as Q6_K_P), ``n_in``, ``n_out``.

Configs (the tuning arguments of the kernels' compile functions):

- ``{"mapping": "chunk", "rows_per_warp": 1|2|4}``: :class:`GemvChunk` (Q4_K / Q6_K / Q6_K_P, n_in % 1024 == 0),
  ``rows_per_warp`` output rows per warp sharing the activation loads (``compile_gemv_chunk``);
- ``{"mapping": "slice", "warps_per_row": 1|2|4}``: the coalesced slice mapping of :class:`Gemv`, ``warps_per_row``
  warps per output row (``compile_gemv``), on both paths (the merged class takes it with ``q8=True`` too).

Default: what ``gemv()`` picks today (chunk with ``choose_rows_per_warp`` where it applies, else slice with
``choose_warps_per_row`` on the f32 path and one warp per row on the dp4a path). Reference: gguf-py's float64
dequantization on sampled rows times the activations (dp4a: the q8_1-dequantized activations), within
``gemv_error_bound`` (``reference/kernel_refs.py``; the tight check ``tests/kernels/test_gemv.py`` asserts on both
paths).

Applied by the engine (``models/ops.py gemv``): ``gemv(..., **config)`` (the config's keys are ``gemv()``'s keyword
arguments). The fused q/k/v launch (``gemv_qkv`` / ``gemv_qk``: :class:`GemvMulti`, chunk mapping only) takes each
matrix's tuned ``rows_per_warp``; a tuned slice mapping for one of its matrices is not applied there (reported as
"not applicable"). The prefill LM-head fallback over up to 8 rows (``gemv_rows``) keeps its default.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from ..measure import (
    KernelRunner,
    bound_violation,
    copies_for_cold_l2,
    nonfinite,
    ptr,
    sample_rows,
    x_pointers,
)
from ..registry import TunableOp, int_in, register, unknown_keys_reason

ROWS_PER_WARP = (1, 2, 4)
WARPS_PER_ROW = (1, 2, 4)
VERIFY_ROWS = 256


@functools.cache
def _bind() -> SimpleNamespace:
    """Every kernel-package name this adapter uses (the one place to fix after kernels/ moves)."""
    from sparkinfer_cute.kernels import gemv as g
    from sparkinfer_cute.kernels import gemv_chunk as gc
    from sparkinfer_cute.kernels.norm_chain import no_tail_args
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.quant_decode import INT_QTYPES, Tiling, spec
    from sparkinfer_cute.kernels.quant_dot import CHUNK_QTYPES
    from sparkinfer_cute.reference import kernel_refs as r

    return SimpleNamespace(
        chunk_ok=gc.chunk_ok, choose_rows_per_warp=gc.choose_rows_per_warp,
        choose_warps_per_row=g.choose_warps_per_row, compile_gemv=g.compile_gemv,
        compile_gemv_chunk=gc.compile_gemv_chunk, INT_QTYPES=INT_QTYPES, CHUNK_QTYPES=CHUNK_QTYPES, Tiling=Tiling,
        spec=spec, random_quant_bytes=r.random_quant_bytes, quantize_q8_1=quantize_q8_1, gemv_ref=r.gemv_ref,
        gemv_error_bound=r.gemv_error_bound, no_tail_args=no_tail_args,
        q8_round_trip=lambda x: r.dequantize_q8_1(*r.quantize_q8_1_ref(x)[:2]))


def _slice_steps(q: str, n_in: int) -> int:
    b = _bind()
    return n_in // b.spec(q).block_elems * b.Tiling(q, "slice").per_block


def _space(shape, ctx, q8: bool):
    b = _bind()
    q, n_in, n_out = shape["qtype"], shape["n_in"], shape["n_out"]
    out = []
    if b.chunk_ok(q, n_in):
        out += [dict(mapping="chunk", rows_per_warp=r) for r in ROWS_PER_WARP if n_out % r == 0]
    # every one of a row's warps_per_row warps gets at least one step per lane (else warps idle)
    out += [dict(mapping="slice", warps_per_row=w) for w in WARPS_PER_ROW if _slice_steps(q, n_in) >= 32 * w]
    return out


def _default(shape, ctx, q8: bool):
    b = _bind()
    q, n_in, n_out = shape["qtype"], shape["n_in"], shape["n_out"]
    if b.chunk_ok(q, n_in):
        return dict(mapping="chunk", rows_per_warp=b.choose_rows_per_warp(n_out, ctx.sm_count))
    if q8:  # gemv.py _launch: the dp4a slice GEMV runs one warp per row unless told otherwise
        return dict(mapping="slice", warps_per_row=1)
    return dict(mapping="slice", warps_per_row=b.choose_warps_per_row(n_out, _slice_steps(q, n_in), ctx.sm_count))


def _why_invalid(config, shape, ctx, q8: bool):
    b = _bind()
    q, n_in, n_out = shape["qtype"], shape["n_in"], shape["n_out"]
    if q8 and q not in b.INT_QTYPES:
        return f"the dp4a GEMV does not take {q} weights (supported: {', '.join(b.INT_QTYPES)})"
    try:
        blk = b.spec(q).block_elems
    except ValueError as e:
        return str(e)
    if n_in % blk:
        return f"n_in {n_in} is not a multiple of the {q} block ({blk})"
    mapping = config.get("mapping")
    if mapping == "chunk":
        if not b.chunk_ok(q, n_in):
            return f"the chunk mapping needs {'/'.join(b.CHUNK_QTYPES)} and n_in % 1024 == 0 (got {q}, {n_in})"
        why = (unknown_keys_reason(config, {"mapping", "rows_per_warp"})
               or int_in(config, "rows_per_warp", ROWS_PER_WARP))
        if why:
            return why
        if n_out % config["rows_per_warp"]:
            return f"n_out {n_out} is not a multiple of rows_per_warp {config['rows_per_warp']}"
        return None
    if mapping == "slice":
        return (unknown_keys_reason(config, {"mapping", "warps_per_row"})
                or int_in(config, "warps_per_row", WARPS_PER_ROW))
    return f"unknown mapping {mapping!r} (chunk or slice)"


def _compile(config, shape, q8: bool):
    b = _bind()
    q, n_in = shape["qtype"], shape["n_in"]
    if config["mapping"] == "chunk":
        return b.compile_gemv_chunk(q, n_in, rows_per_warp=config["rows_per_warp"], experts=False, x_per_slot=False,
                                    accumulate=False, q8=q8)
    return b.compile_gemv(q, n_in, rows=1, experts=False, x_per_slot=False, mapping="slice",
                          warps_per_row=config["warps_per_row"], accumulate=False, q8=q8)


class GemvProblem:
    """Host side: random weights of the shape, one random activation row, the float64 reference and its bound on
    sampled output rows (numpy only: the CPU tests check it against an independent computation).

    dp4a path: the reference multiplies the q8_1-dequantized activations (the GPU quantizer equals the numpy one bit
    for bit), within the f32 GEMV bound: the integer dots are exact, so this is the tight check of
    ``tests/kernels/test_gemv.py`` (a bound against the f32 activations would have to admit the quantization error,
    several % of the output, and could not tell a slightly wrong config)."""

    def __init__(self, shape, q8: bool, rng):
        b = _bind()
        q, n_in, n_out = shape["qtype"], shape["n_in"], shape["n_out"]
        self.w = b.random_quant_bytes(q, n_out * n_in // b.spec(q).block_elems, rng).reshape(n_out, -1)
        self.x = rng.standard_normal(n_in).astype(np.float32)
        self.rows = sample_rows(n_out, VERIFY_ROWS, rng)
        wsub, x = self.w[self.rows], (b.q8_round_trip(self.x) if q8 else self.x)
        self.ref = b.gemv_ref(wsub, q, x)
        self.bound = b.gemv_error_bound(wsub, q, x[None])[0]

    def check(self, out) -> str | None:
        return nonfinite(out, "y") or bound_violation(out[self.rows], self.ref, self.bound, "y")


class GemvRunner(KernelRunner):
    def __init__(self, shape, ctx, q8: bool):
        super().__init__(shape, ctx)
        from sparkinfer_cute.runtime import DeviceArray

        self.q8 = q8
        self.problem = p = GemvProblem(shape, q8, self.rng)
        self.n_sets = copies_for_cold_l2(p.w.nbytes, ctx.l2_bytes)
        self.ws = [DeviceArray.from_numpy(p.w.reshape(-1), self.stream) for _ in range(self.n_sets)]
        self.x = DeviceArray.from_numpy(p.x, self.stream)
        self.xq = _bind().quantize_q8_1(self.x, stream=self.stream) if q8 else None
        self.y = DeviceArray.empty((shape["n_out"],), np.float32)
        self.outputs = [self.y]

    def launcher(self, config, i):
        from cutlass import Float32, Int32, Uint8

        fn = _compile(config, self.shape, self.q8)
        n_out, cs = Int32(self.shape["n_out"]), self.stream.cu
        pw, py = ptr(Uint8, self.ws[i].ptr), ptr(Float32, self.y.ptr)
        ids = ptr(Int32, self.x.ptr, 4)  # unused without experts
        tail = _bind().no_tail_args(self.y)  # the engine's post-attention tail is not part of the tuned shape
        px, pxq, pxd, pxs = x_pointers(self.x, self.xq)
        if config["mapping"] == "chunk":
            args = (pw, px, pxq, pxd, py, ids, n_out, Int32(1), *tail, cs)
        else:
            args = (pw, px, pxq, pxd, pxs, py, ids, n_out, Int32(1), pw, *tail, cs)  # pW2: no second matrix
        return lambda: fn(*args)

    def check(self, config, out):
        return self.problem.check(out)


def _op(name: str, q8: bool) -> TunableOp:
    path = "q8_1 activations, dp4a" if q8 else "f32 activations"
    return TunableOp(
        name=name,
        summary=f"decode GEMV, {path}: chunk rows per warp / slice warps per row",
        shape_keys=("qtype", "n_in", "n_out"),
        space=lambda s, c: _space(s, c, q8),
        default=lambda s, c: _default(s, c, q8),
        why_invalid=lambda cfg, s, c: _why_invalid(cfg, s, c, q8),
        compile=lambda cfg, s: _compile(cfg, s, q8),
        build=lambda s, c: GemvRunner(s, c, q8),
        compile_shape_keys=("qtype", "n_in"),  # n_out is a runtime argument
    )


GEMV = register(_op("gemv", False), __name__)
GEMV_Q8 = register(_op("gemv_q8", True), __name__)
