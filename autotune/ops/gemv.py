"""Tunable ops ``gemv`` (f32 activations) and ``gemv_q8`` (q8_1 activations, dp4a): the decode GEMV of one
activation row over raw GGUF weights (``kernels/gemv.py`` slice, ``kernels/gemv_chunk.py`` chunk; one kernel class
each, ``q8`` flag).

Shape: ``qtype`` (the type on the GPU: Q6_K tensors are uploaded as Q6_K_P), ``n_in``, ``n_out``.

Configs (the tuning arguments of the kernels' compile functions):

- ``{"mapping": "chunk", "rpw": 1|2|4}``: :class:`GemvChunk` (Q4_K / Q6_K / Q6_K_P, n_in % 1024 == 0), ``rpw`` output
  rows per warp sharing the activation loads (``compile_gemv_chunk``);
- ``{"mapping": "slice", "wpr": 1|2|4}`` (f32) / ``{"mapping": "slice"}`` (dp4a): the coalesced slice mapping,
  ``wpr`` warps per output row (``compile_gemv``; the dp4a path runs 1).

Default: what ``gemv()`` / ``gemv_q8()`` pick today (chunk with ``choose_rpw`` where it applies, else slice with
``choose_wpr``). Reference: gguf-py's float64 dequantization on sampled rows times the activations (dp4a: the
q8_1-dequantized activations), within ``gemv_error_bound`` (the tight check ``tests/kernels/test_gemv.py`` asserts
on both paths).

Applying a tuned config today: ``gemv(..., mapping=cfg["mapping"], warps_per_row=cfg.get("wpr"))`` covers slice; the
``rpw`` and the dp4a wrapper's choice need a ``rpw`` argument in the wrappers (they compute it with ``choose_rpw``).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from ..measure import KernelRunner, bound_violation, copies_for_cold_l2, nonfinite, ptr, sample_rows
from ..registry import TunableOp, int_in, register, unknown_keys_reason

RPW = (1, 2, 4)
WPR = (1, 2, 4)
VERIFY_ROWS = 256


@functools.cache
def _bind() -> SimpleNamespace:
    """Every kernel-package name this adapter uses (the one place to fix after kernels/ moves)."""
    from sparkinfer_cute.kernels import gemv as g
    from sparkinfer_cute.kernels import gemv_chunk as gc
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.quant_decode import INT_QTYPES, Tiling, spec
    from sparkinfer_cute.kernels.quant_dot import CHUNK_QTYPES
    from sparkinfer_cute.reference.kernel_refs import (dequantize_q8_1, gemv_error_bound, gemv_ref,
                                                       quantize_q8_1_ref, random_quant_bytes)

    return SimpleNamespace(
        chunk_ok=gc.chunk_ok, choose_rpw=gc.choose_rows_per_warp, choose_wpr=g.choose_warps_per_row,
        compile_gemv=g.compile_gemv, compile_gemv_chunk=gc.compile_gemv_chunk, INT_QTYPES=INT_QTYPES,
        CHUNK_QTYPES=CHUNK_QTYPES, Tiling=Tiling, spec=spec, random_quant_bytes=random_quant_bytes,
        quantize_q8_1=quantize_q8_1, gemv_ref=gemv_ref, gemv_error_bound=gemv_error_bound,
        q8_round_trip=lambda x: dequantize_q8_1(*quantize_q8_1_ref(x)[:2]))


def _slice_steps(q: str, n_in: int) -> int:
    b = _bind()
    return n_in // b.spec(q).block_elems * b.Tiling(q, "slice").per_block


def _space(shape, ctx, q8: bool):
    b = _bind()
    q, n_in, n_out = shape["qtype"], shape["n_in"], shape["n_out"]
    out = []
    if b.chunk_ok(q, n_in):
        out += [dict(mapping="chunk", rpw=r) for r in RPW if n_out % r == 0]
    if q8:
        out.append(dict(mapping="slice"))
    else:
        # every one of a row's wpr warps gets at least one step per lane (else warps idle)
        out += [dict(mapping="slice", wpr=w) for w in WPR if _slice_steps(q, n_in) >= 32 * w]
    return out


def _default(shape, ctx, q8: bool):
    b = _bind()
    q, n_in, n_out = shape["qtype"], shape["n_in"], shape["n_out"]
    if b.chunk_ok(q, n_in):
        return dict(mapping="chunk", rpw=b.choose_rpw(n_out, ctx.sm_count))
    if q8:
        return dict(mapping="slice")
    return dict(mapping="slice", wpr=b.choose_wpr(n_out, _slice_steps(q, n_in), ctx.sm_count))


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
        why = unknown_keys_reason(config, {"mapping", "rpw"}) or int_in(config, "rpw", RPW)
        if why:
            return why
        if n_out % config["rpw"]:
            return f"n_out {n_out} is not a multiple of rpw {config['rpw']} (rows per warp)"
        return None
    if mapping == "slice":
        if q8:
            return unknown_keys_reason(config, {"mapping"})
        return unknown_keys_reason(config, {"mapping", "wpr"}) or int_in(config, "wpr", WPR)
    return f"unknown mapping {mapping!r} (chunk or slice)"


def _compile(config, shape, q8: bool):
    b = _bind()
    q, n_in = shape["qtype"], shape["n_in"]
    if config["mapping"] == "chunk":
        return b.compile_gemv_chunk(q, n_in, config["rpw"], False, False, False, q8)
    if q8:
        return b.compile_gemv(q, n_in, 1, False, False, "slice", 1, False, True)
    return b.compile_gemv(q, n_in, 1, False, False, "slice", config["wpr"], False)


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
        from cutlass import Float32, Int8, Int32, Uint8

        fn = _compile(config, self.shape, self.q8)
        n_out, cs = Int32(self.shape["n_out"]), self.stream.cu
        pw, px, py = ptr(Uint8, self.ws[i].ptr), ptr(Float32, self.x.ptr), ptr(Float32, self.y.ptr)
        ids = ptr(Int32, self.x.ptr, 4)  # unused without experts
        xq = self.xq
        if config["mapping"] == "chunk":
            if self.q8:
                args = (pw, ptr(Float32, xq.d.ptr), ptr(Int8, xq.qs.ptr), ptr(Float32, xq.d.ptr), py, ids, n_out,
                        Int32(1), cs)
            else:
                args = (pw, px, ptr(Int8, self.x.ptr), px, py, ids, n_out, Int32(1), cs)
        else:  # the slice kernel takes (x f32, xq i8, xd f32, xs f32) and reads x or the q8_1 three (gemv.py Gemv)
            x = (ptr(Float32, xq.d.ptr), ptr(Int8, xq.qs.ptr), ptr(Float32, xq.d.ptr), ptr(Float32, xq.s.ptr)) \
                if self.q8 else (px, ptr(Int8, self.x.ptr), px, px)
            args = (pw, *x, py, ids, n_out, Int32(1), cs)
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
