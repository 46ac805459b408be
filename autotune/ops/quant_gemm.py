"""Tunable op ``quant_gemm``: the grouped/dense GEMM over GGUF weights with q8_1 activations for batched prefill
(``kernels/quant_gemm.py``).

Shape: ``qtype`` (Q6_K as Q6_K_P), ``n_in``, ``n_out`` (weight rows per group; gated: per gate/up matrix),
``tokens`` (prompt tokens of a chunk, bucketed up to a power of two >= 16), ``n_expert`` / ``k`` (0 / 0: one dense
group; else the MoE expert FFN with k routed experts per token: tokens * k rows sorted by expert), ``act``
(``"none"``: plain epilogue; ``"silu"`` / ``"gelu_tanh"``: gated gate+up epilogue). Grouped gated GEMMs gather the
token rows (``row_index``); the grouped down GEMM reads the sorted rows.

Configs (``compile_quant_gemm``'s tuning arguments): ``tile_rows`` 32/64/128 (weight rows per CTA), ``tile_tokens``
16/32/64/128 (activation rows per CTA), ``stages`` 2..4 (depth of the cp.async ring). Validity: the kernel's own
constructor (``QuantGemm``: shared memory = ``QuantGemm.smem_bytes()`` within the family budget, gated tiles of
>= 64 rows), and n_out a multiple of the CTA's output rows (``QuantGemm.out_rows``: n_out is a launch argument, so
the constructor cannot check it; ``quant_gemm()`` does, at launch).

Default: what the models launch (``models/ops.py``: tile_rows 64 (``quant_gemm()``'s), tile_tokens
``PREFILL_TILE_TOKENS`` = 64 dense / ``MOE_TILE_TOKENS`` = 32 grouped, the most stages that fit). Reference: float64
GEMM of the gguf-py-dequantized weights (sampled output columns) and the dequantized q8_1 activations, within
``(2G + 8) 2^-24 sum_i A_i |x_i|`` (G scale groups per row; the bound ``tests/kernels/test_quant_gemm.py`` asserts,
with its gated-epilogue extension).

Applied by the engine (``models/ops.py gemm`` / ``moe_rows``): ``quant_gemm(..., tile_rows=..., tile_tokens=...,
stages=...)``; a prefill graph is captured per chunk length, so each takes the entry of its token bucket. A grouped
``tile_tokens`` is also the tile of the routing tables (``moe_route.moe_align``, ``PrefillBuffers.max_tiles``),
built with ``MOE_TILE_TOKENS`` (32) for both grouped GEMMs of a layer: a grouped entry with another tile is not
applied (reported as "not applicable"), and the fused gate+up layout (Gemma 4) is not in the searched space. The
all-position LM-head GEMM of the accuracy path is not among the searched shapes (its lookups find nothing).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from ..measure import KernelRunner, bound_violation, copies_for_cold_l2, nonfinite, ptr, sample_rows
from ..registry import TunableOp, int_in, pow2_bucket, register, unknown_keys_reason

TILE_ROWS = (32, 64, 128)
TILE_TOKENS = (16, 32, 64, 128)
STAGES = (2, 3, 4)
ACTS = ("none", "silu", "gelu_tanh")
MIN_TOKEN_BUCKET = 16
DEFAULT_TILE_TOKENS = 64  # models/ops.py PREFILL_TILE_TOKENS: the dense prefill GEMMs
DEFAULT_MOE_TILE_TOKENS = 32  # models/ops.py MOE_TILE_TOKENS: the grouped expert GEMMs and their routing tables
U = 2.0**-24


@functools.cache
def _bind() -> SimpleNamespace:
    """Every kernel-package name this adapter uses (the one place to fix after kernels/ moves)."""
    from sparkinfer_cute.kernels import quant_gemm as g
    from sparkinfer_cute.kernels.q8_1 import Q8Act
    from sparkinfer_cute.kernels.quant_decode import spec
    from sparkinfer_cute.reference import kernel_refs as r

    return SimpleNamespace(
        QuantGemm=g.QuantGemm, compile_quant_gemm=g.compile_quant_gemm, SUPPORTED_QTYPES=g.SUPPORTED_QTYPES,
        grouped_tiles_host=r.grouped_tiles_host, max_grouped_tiles=g.max_grouped_tiles, spec=spec,
        random_quant_bytes=r.random_quant_bytes, dequant_rows_f64=r.dequant_rows_f64,
        weight_magnitude_f64=r.weight_magnitude_f64, Q8Act=Q8Act, quantize_q8_1_ref=r.quantize_q8_1_ref)


def token_bucket(tokens: int) -> int:
    """Prompt tokens rounded up to a power of two (at least 16): the key the cache stores GEMM configs under."""
    return pow2_bucket(tokens, MIN_TOKEN_BUCKET)


def _bucket(shape):
    return dict(shape, tokens=token_bucket(shape["tokens"]))


def _gated(shape) -> bool:
    return shape["act"] != "none"


def _space(shape, ctx):
    return [dict(tile_rows=r, tile_tokens=t, stages=s) for r in TILE_ROWS for t in TILE_TOKENS for s in STAGES]


def _default(shape, ctx):
    # models/ops.py (a peer layer: not imported): PREFILL_TILE_TOKENS dense, MOE_TILE_TOKENS grouped
    tokens = DEFAULT_MOE_TILE_TOKENS if shape["n_expert"] > 0 else DEFAULT_TILE_TOKENS
    return dict(tile_rows=64, tile_tokens=tokens, stages=0)


def _kernel(config, shape):
    """The kernel object for ``config`` (its constructor checks the tile sizes and the smem budget); n_out is not
    part of it (a launch argument): :func:`_why_invalid` checks it against ``out_rows``."""
    s = shape
    return _bind().QuantGemm(
        s["qtype"], s["n_in"], tile_rows=config["tile_rows"], tile_tokens=config["tile_tokens"],
        stages=config["stages"], gated=_gated(s), act="silu" if s["act"] == "none" else s["act"],
        experts=s["n_expert"] > 0, gather=s["n_expert"] > 0 and _gated(s))


def _canonical(config, shape, ctx):
    """stages 0 ("the most that fit") -> the kernel's choice."""
    if config.get("stages") == 0:
        try:
            config = dict(config, stages=_kernel(config, shape).stages)
        except (ValueError, AssertionError, KeyError):
            pass  # invalid either way: why_invalid says why
    return config


def _why_invalid(config, shape, ctx):
    b = _bind()
    if shape["qtype"] not in b.SUPPORTED_QTYPES:
        return f"quant_gemm does not take {shape['qtype']} weights (supported: {', '.join(b.SUPPORTED_QTYPES)})"
    if shape["act"] not in ACTS:
        return f"act={shape['act']!r} is not one of {', '.join(ACTS)}"
    why = (unknown_keys_reason(config, {"tile_rows", "tile_tokens", "stages"})
           or int_in(config, "tile_rows", TILE_ROWS) or int_in(config, "tile_tokens", TILE_TOKENS)
           or int_in(config, "stages", (0, *STAGES)))
    if why:
        return why
    if _gated(shape) and config["tile_rows"] < 64:
        return "gated tiles need tile_rows >= 64 (gate and up halves of whole m16 tiles per warp)"
    try:
        k = _kernel(config, shape)
    except ValueError as e:  # smem over the budget, n_in not whole blocks
        return str(e)
    if shape["n_out"] % k.out_rows:
        return (f"n_out {shape['n_out']} is not a multiple of {k.out_rows} (the output rows of a "
                f"{'gated ' if k.gated else ''}{config['tile_rows']}-row tile)")
    return None


def _compile(config, shape):
    s = shape
    return _bind().compile_quant_gemm(
        s["qtype"], s["n_in"], tile_rows=config["tile_rows"], tile_tokens=config["tile_tokens"],
        stages=config["stages"], gated=_gated(s), act="silu" if s["act"] == "none" else s["act"],
        experts=s["n_expert"] > 0, gather=s["n_expert"] > 0 and _gated(s), accumulate=False, fused_gate_up=False)


def _act(g, act):
    with np.errstate(over="ignore"):
        if act == "silu":
            return g / (1.0 + np.exp(-g))
        return 0.5 * g * (1.0 + np.tanh(0.7978845608028654 * g * (1.0 + 0.044715 * g * g)))


def _magnitude(raw, q, n_in):
    """A_i: the magnitude of what the kernel multiplies per weight (tests/kernels/test_quant_gemm.py
    magnitude_f64): |d sc q| + |dmin m| for K-quants, |d q| + z |d| for Q4_0/Q5_0 (zero point z), else |w|."""
    b = _bind()
    if q not in ("Q4_0", "Q5_0"):
        return b.weight_magnitude_f64(raw, q, n_in)
    z = 8 if q == "Q4_0" else 16
    w = b.dequant_rows_f64(raw, q, n_in)
    d = np.asarray(raw, np.uint8).reshape(-1, b.spec(q).block_bytes)[:, :2].copy().view(np.float16)
    d = np.repeat(d.astype(np.float64).reshape(w.shape[0], -1), 32, axis=1)
    return np.abs(w + z * d) + z * np.abs(d)


class QuantGemmProblem:
    """Host side: random weights (one matrix, two when gated), random activations quantized to q8_1 as the kernel
    consumes them, random top-k routing (grouped), and the float64 reference with its bound on sampled output
    columns. ``e_of_row`` / ``x_of_row``: the group and the activation row of every output row (grouped: rows
    sorted by expert, then token, as the device-side sort orders them)."""

    VERIFY_COLS = 32

    def __init__(self, shape, rng):
        b, s = _bind(), shape
        q, n_in, n_out, T, E, k = s["qtype"], s["n_in"], s["n_out"], s["tokens"], s["n_expert"], s["k"]
        self.gated, grouped = _gated(s), E > 0
        groups = max(E, 1)
        sp = b.spec(q)
        self.mats = [b.random_quant_bytes(q, groups * n_out * n_in // sp.block_elems, rng).reshape(groups * n_out, -1)
                     for _ in range(2 if self.gated else 1)]
        self.n_rows = T * k if grouped else T
        x_rows = T if (not grouped or self.gated) else T * k  # gated grouped: gathered token rows; down: sorted rows
        self.qs, self.d, self.s = b.quantize_q8_1_ref(rng.standard_normal((x_rows, n_in)).astype(np.float32))
        xdeq = (self.qs.astype(np.float64).reshape(x_rows, -1, 32) * self.d[..., None]).reshape(x_rows, n_in)
        self.ids = self.sorted_token = None
        if grouped:
            self.ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
            _, self.sorted_token, sorted_pos = b.grouped_tiles_host(self.ids, E, 16)  # the order is the tile's too
            self.e_of_row = np.empty(self.n_rows, np.int64)
            self.e_of_row[sorted_pos] = self.ids.reshape(-1)
            self.x_of_row = self.sorted_token if self.gated else np.arange(self.n_rows)
        else:
            self.e_of_row, self.x_of_row = np.zeros(self.n_rows, np.int64), np.arange(self.n_rows)
        self.cols = sample_rows(n_out, self.VERIFY_COLS, rng)
        G = (2 * (n_in // 16 if q == "Q6_K_P" else n_in // 32) + 8) * U
        xr = xdeq[self.x_of_row]
        dots, bounds = [], []
        for m in self.mats:
            sub = m.reshape(groups, n_out, -1)[:, self.cols].reshape(groups * len(self.cols), -1)
            W = b.dequant_rows_f64(sub, q, n_in).reshape(groups, len(self.cols), n_in)
            A = _magnitude(sub, q, n_in).reshape(groups, len(self.cols), n_in)
            dot, bnd = np.empty((self.n_rows, len(self.cols))), np.empty((self.n_rows, len(self.cols)))
            for e in range(groups):
                r = np.flatnonzero(self.e_of_row == e)
                dot[r] = xr[r] @ W[e].T
                bnd[r] = G * (np.abs(xr[r]) @ A[e].T)
            dots.append(dot)
            bounds.append(bnd)
        if self.gated:
            (g, u), (bg, bu) = dots, bounds
            a = _act(g, s["act"])
            self.ref = a * u
            # |act'| <= 1.13 for silu and gelu_tanh; the f32 activation itself ~4 ulp (test_grouped_gated_and_down)
            self.bound = 1.13 * bg * (np.abs(u) + bu) + np.abs(a) * bu + 8 * U * np.abs(self.ref) + 1e-30
        else:
            self.ref, self.bound = dots[0], bounds[0]

    def check(self, out) -> str | None:
        return nonfinite(out, "y") or bound_violation(out[:, self.cols], self.ref, self.bound, "y")


class QuantGemmRunner(KernelRunner):
    def __init__(self, shape, ctx):
        super().__init__(shape, ctx)
        from sparkinfer_cute.runtime import DeviceArray

        self.problem = p = QuantGemmProblem(shape, self.rng)
        self.n_rows = p.n_rows
        self.n_sets = copies_for_cold_l2(sum(m.nbytes for m in p.mats), ctx.l2_bytes)
        self.dev_mats = [[DeviceArray.from_numpy(m, self.stream) for m in p.mats] for _ in range(self.n_sets)]
        self.xq = _bind().Q8Act(p.qs.shape[0], shape["n_in"])
        for dev, host in ((self.xq.qs, p.qs), (self.xq.d, p.d), (self.xq.s, p.s)):
            dev.copy_from_numpy(host, self.stream)
        self.row_index = None
        if p.sorted_token is not None:  # gathered (gated grouped) rows; the down GEMM ignores it
            self.row_index = DeviceArray.from_numpy(np.concatenate([p.sorted_token, np.zeros(1, np.int32)]),
                                                    self.stream)
        self.y = DeviceArray.empty((p.n_rows, shape["n_out"]), np.float32)
        self.outputs = [self.y]
        self.tables: dict[int, tuple] = {}

    def _grid(self, tile_tokens: int):
        """(tiles, n_tiles, launch grid.y) for a token tile size (grouped: the host twin of the device sort)."""
        from sparkinfer_cute.runtime import DeviceArray

        if tile_tokens not in self.tables:
            if self.shape["n_expert"]:
                b, E = _bind(), self.shape["n_expert"]
                tiles, _, _ = b.grouped_tiles_host(self.problem.ids, E, tile_tokens)
                self.tables[tile_tokens] = (
                    DeviceArray.from_numpy(np.concatenate([tiles, np.zeros((1, 4), np.int32)]), self.stream),
                    DeviceArray.from_numpy(np.array([len(tiles)], np.int32), self.stream),
                    b.max_grouped_tiles(self.n_rows, E, tile_tokens))
            else:
                self.tables[tile_tokens] = (None, None, -(-self.n_rows // tile_tokens))
        return self.tables[tile_tokens]

    def launcher(self, config, i):
        from cutlass import Float32, Int8, Int32, Uint8

        fn = _compile(config, self.shape)
        tiles, n_tiles, grid_y = self._grid(config["tile_tokens"])
        mats = self.dev_mats[i]
        dummy = self.xq.d
        p32 = lambda a: ptr(Int32, (a if a is not None else dummy).ptr, 4)  # noqa: E731
        args = (ptr(Uint8, mats[0].ptr), ptr(Uint8, mats[-1].ptr), ptr(Int8, self.xq.qs.ptr),
                ptr(Float32, self.xq.d.ptr), ptr(Float32, self.xq.s.ptr), ptr(Float32, self.y.ptr),
                p32(self.row_index), p32(tiles), p32(n_tiles),
                Int32(self.n_rows), Int32(self.shape["n_out"]), Int32(grid_y), self.stream.cu)
        return lambda: fn(*args)

    def check(self, config, out):
        return self.problem.check(out)


QUANT_GEMM = register(TunableOp(
    name="quant_gemm",
    summary="prefill GEMM over GGUF weights (q8_1 activations; dense or grouped MoE): tile rows/tokens, stages",
    shape_keys=("qtype", "n_in", "n_out", "tokens", "n_expert", "k", "act"),
    space=_space,
    default=_default,
    why_invalid=_why_invalid,
    compile=_compile,
    build=QuantGemmRunner,
    bucket=_bucket,
    canonical=_canonical,
    compile_shape_keys=("qtype", "n_in", "n_expert", "act"),  # n_out, token count and routing are runtime
), __name__)
