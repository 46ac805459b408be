"""Tunable ops of the fused selected-expert MoE FFN for decode (``kernels/moe_ffn.py``: the slice kernels
:class:`MoeGateUp` / :class:`MoeDown`, float or dp4a by their static ``q8`` flag; ``kernels/moe_ffn_chunk.py``: the
chunk kernels, the same):

- ``moe_gate_up`` / ``moe_gate_up_q8``: gate + up GEMVs of the k routed experts with SwiGLU in registers.
  Shape: ``qtype``, ``n_in`` (n_embd), ``n_ff`` (n_ff_exp), ``n_expert``, ``k`` (experts used), ``fused``
  (``ffn_gate_up_exps`` layout). Configs: ``{"mapping": "chunk", "rows_per_warp": 1|2}`` (+ ``"x_loads_first"`` on
  the dp4a path: activation loads issued before the weights) or ``{"mapping": "slice"}``.
- ``moe_down`` / ``moe_down_q8``: the down GEMVs weighted by the router and summed. Shape: ``qtype`` (Q6_K is
  uploaded as Q6_K_P), ``n_ff``, ``n_out`` (n_embd), ``n_expert``, ``k``. Configs: ``{"mapping": "chunk",
  "rows_per_warp": 1|2}`` (+ ``"x_loads_first"`` on dp4a) or ``{"mapping": "slice", "warps_per_row": 1|2|4}``.

``x_loads_first`` only changes the dp4a chunk kernels (``gemv_chunk.chunk_rows_partial`` and
``MoeDownChunk.partial_dots`` read it only with ``q8``), so the f32 ops do not search it.

Defaults: what ``moe_gate_up`` / ``moe_down`` pick today (chunk with ``gate_up_rows_per_warp`` /
``down_rows_per_warp`` where it applies, else slice; the slice down kernel's compile default ``warps_per_row=2``).
Reference: ``moe_gate_up_ref`` / ``moe_down_ref`` (``reference/kernel_refs.py``, float64) on sampled output rows of
the routed experts (dp4a: of the q8_1-dequantized activations, which the integer dots multiply exactly), within the
f32 bounds ``tests/kernels/test_moe_ffn.py`` asserts (built from ``gemv_error_bound``). ``n_expert`` only sizes the
weight tensors (what the cold-L2 rotation streams); the kernels do not depend on it.

Applied by the engine (``models/ops.py moe_gate_up`` / ``moe_down``): ``moe_gate_up(..., **config)`` /
``moe_down(..., **config)`` (``mapping``, ``rows_per_warp``, ``x_loads_first``, ``warps_per_row``: the wrappers'
keyword arguments). The shape has no GLU activation: Gemma 4's GeGLU experts take the entry of their shape, which
was timed with SiLU (the same loads; the activation is a few instructions per row).
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

ROWS_PER_WARP = (1, 2)
WARPS_PER_ROW = (1, 2, 4)
VERIFY_ROWS = 64
U = 2.0**-24


@functools.cache
def _bind() -> SimpleNamespace:
    """Every kernel-package name this adapter uses (the one place to fix after kernels/ moves)."""
    from sparkinfer_cute.kernels import moe_ffn as m
    from sparkinfer_cute.kernels import moe_ffn_chunk as mc
    from sparkinfer_cute.kernels.gemv_chunk import chunk_ok
    from sparkinfer_cute.kernels.norm_chain import no_tail_args
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.kernels.quant_decode import INT_QTYPES, spec
    from sparkinfer_cute.reference import kernel_refs as r

    return SimpleNamespace(
        chunk_ok=chunk_ok, down_chunk_ok=mc.down_chunk_ok, gate_up_rows_per_warp=mc.gate_up_rows_per_warp,
        down_rows_per_warp=mc.down_rows_per_warp, compile_moe_gate_up=m.compile_moe_gate_up,
        compile_moe_gate_up_chunk=mc.compile_moe_gate_up_chunk, compile_moe_down=m.compile_moe_down,
        compile_moe_down_chunk=mc.compile_moe_down_chunk, moe_gate_up_ref=r.moe_gate_up_ref, no_tail_args=no_tail_args,
        moe_down_ref=r.moe_down_ref, gemv_experts_ref=r.gemv_experts_ref, gemv_error_bound=r.gemv_error_bound,
        INT_QTYPES=INT_QTYPES, spec=spec, random_quant_bytes=r.random_quant_bytes, quantize_q8_1=quantize_q8_1,
        q8_round_trip=lambda x: r.dequantize_q8_1(*r.quantize_q8_1_ref(x)[:2]))


def _type_reason(q: str, n_in: int, q8: bool) -> str | None:
    b = _bind()
    if q8 and q not in b.INT_QTYPES:
        return f"the dp4a MoE kernels do not take {q} weights (supported: {', '.join(b.INT_QTYPES)})"
    try:
        blk = b.spec(q).block_elems
    except ValueError as e:
        return str(e)
    return f"row length {n_in} is not a multiple of the {q} block ({blk})" if n_in % blk else None


def _chunk_reason(config: dict, q8: bool, n_rows: int) -> str | None:
    allowed = {"mapping", "rows_per_warp", "x_loads_first"} if q8 else {"mapping", "rows_per_warp"}
    why = unknown_keys_reason(config, allowed) or int_in(config, "rows_per_warp", ROWS_PER_WARP)
    if why:
        return why
    if q8 and not isinstance(config.get("x_loads_first", False), bool):
        return f"x_loads_first={config['x_loads_first']!r} is not a bool"
    if n_rows % config["rows_per_warp"]:
        return f"{n_rows} rows are not a multiple of rows_per_warp {config['rows_per_warp']}"
    return None


def _chunk_configs(q8: bool, n_rows: int) -> list[dict]:
    return [dict(mapping="chunk", rows_per_warp=r, **({"x_loads_first": xf} if q8 else {}))
            for r in ROWS_PER_WARP if n_rows % r == 0 for xf in ((False, True) if q8 else (False,))]


# ---------------------------------------------------------------------------------------------- gate + up
def _gu_space(shape, ctx, q8):
    out = _chunk_configs(q8, shape["n_ff"]) if _bind().chunk_ok(shape["qtype"], shape["n_in"]) else []
    return out + [dict(mapping="slice")]


def _gu_default(shape, ctx, q8):
    b = _bind()
    if b.chunk_ok(shape["qtype"], shape["n_in"]):
        return dict(mapping="chunk", rows_per_warp=b.gate_up_rows_per_warp(q8),
                    **({"x_loads_first": False} if q8 else {}))
    return dict(mapping="slice")


def _gu_why_invalid(config, shape, ctx, q8):
    q = shape["qtype"]
    why = _type_reason(q, shape["n_in"], q8)
    if why:
        return why
    if config.get("mapping") == "chunk":
        if not _bind().chunk_ok(q, shape["n_in"]):
            return f"the chunk mapping needs Q4_K/Q6_K/Q6_K_P and n_in % 1024 == 0 (got {q}, {shape['n_in']})"
        return _chunk_reason(config, q8, shape["n_ff"])
    if config.get("mapping") == "slice":
        return unknown_keys_reason(config, {"mapping"})
    return f"unknown mapping {config.get('mapping')!r} (chunk or slice)"


def _gu_compile(config, shape, q8):
    b = _bind()
    q, n_in, n_ff, fused = shape["qtype"], shape["n_in"], shape["n_ff"], shape["fused"]
    if config["mapping"] == "chunk":
        return b.compile_moe_gate_up_chunk(q, n_in, n_ff, fused=fused, q8=q8, rows_per_warp=config["rows_per_warp"],
                                           x_loads_first=config.get("x_loads_first", False))
    return b.compile_moe_gate_up(q, n_in, n_ff, fused=fused, q8=q8)


def _silu(g):
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g))


def _random_ids(n_expert: int, k: int, rng) -> np.ndarray:
    return rng.choice(n_expert, k, replace=False).astype(np.int32)


def _random_experts(q: str, n_expert: int, n_rows: int, n_in: int, rng) -> np.ndarray:
    """Random raw bytes of an [n_expert, n_rows, row_bytes] expert tensor."""
    b = _bind()
    n_blocks = n_expert * n_rows * n_in // b.spec(q).block_elems
    return b.random_quant_bytes(q, n_blocks, rng).reshape(n_expert, n_rows, -1)


class GateUpProblem:
    """Host side: expert tensor(s), one activation row, expert-id set 0, and the float64 reference with its bound on
    sampled rows of the routed experts (as an expert tensor of k experts x R rows, ids 0..k-1)."""

    def __init__(self, shape, q8: bool, rng):
        b, s = _bind(), shape
        q, n_in, n_ff, E, k, fused = s["qtype"], s["n_in"], s["n_ff"], s["n_expert"], s["k"], s["fused"]
        self.mats = ([_random_experts(q, E, 2 * n_ff, n_in, rng)] if fused
                     else [_random_experts(q, E, n_ff, n_in, rng) for _ in range(2)])
        self.h = rng.standard_normal(n_in).astype(np.float32)
        self.ids = _random_ids(E, k, rng)
        self.rows = sample_rows(n_ff, VERIFY_ROWS, rng)
        sel = self.mats[0][self.ids]
        if fused:  # gate rows, then up rows, per expert
            g, u = sel[:, self.rows], sel[:, n_ff + self.rows]
        else:
            g, u = sel[:, self.rows], self.mats[1][self.ids][:, self.rows]
        ids, R = np.arange(k), len(self.rows)
        h = b.q8_round_trip(self.h) if q8 else self.h  # dp4a: exact against the q8_1-dequantized activations
        self.ref = b.moe_gate_up_ref(g, u, q, h, ids, R)
        gr, ur = b.gemv_experts_ref(g, q, h[None], ids, R), b.gemv_experts_ref(u, q, h[None], ids, R)
        bg = b.gemv_error_bound(g, q, h[None], ids=ids, n_out=R)
        bu = b.gemv_error_bound(u, q, h[None], ids=ids, n_out=R)
        # tests/kernels/test_moe_ffn.py test_gate_up: both dots within the GEMV bound, SwiGLU's fast exp
        self.bound = 2 * (1.1 * bg * np.abs(ur) + np.abs(_silu(gr)) * bu) + 1e-6 * np.abs(self.ref) + 1e-30

    def check(self, out) -> str | None:
        return nonfinite(out, "act") or bound_violation(out[:, self.rows], self.ref, self.bound, "act")


class _ExpertRunner(KernelRunner):
    """Shared by gate/up and down: the expert tensor(s) (copies for the cold-L2 rotation when the whole tensor is
    smaller than 2x L2) and one expert-id set per input set (set 0: the problem's, which the reference covers)."""

    def _upload_experts(self, mats, rows_read_per_expert: int, ids0):
        from sparkinfer_cute.runtime import DeviceArray

        s = self.shape
        rb = mats[0].shape[-1]
        n_copies = copies_for_cold_l2(sum(m.nbytes for m in mats), self.ctx.l2_bytes)
        self.n_sets = max(n_copies, copies_for_cold_l2(s["k"] * rows_read_per_expert * rb, self.ctx.l2_bytes))
        self.dev_mats = [[DeviceArray.from_numpy(m.reshape(-1), self.stream) for m in mats] for _ in range(n_copies)]
        id_sets = [ids0] + [_random_ids(s["n_expert"], s["k"], self.rng) for _ in range(self.n_sets - 1)]
        self.dev_ids = [DeviceArray.from_numpy(i, self.stream) for i in id_sets]

    def _mats(self, i: int):
        return self.dev_mats[i % len(self.dev_mats)]


class GateUpRunner(_ExpertRunner):
    def __init__(self, shape, ctx, q8: bool):
        super().__init__(shape, ctx)
        from sparkinfer_cute.runtime import DeviceArray

        self.q8 = q8
        self.problem = p = GateUpProblem(shape, q8, self.rng)
        self._upload_experts(p.mats, 2 * shape["n_ff"], p.ids)
        self.h = DeviceArray.from_numpy(p.h, self.stream)
        self.hq = _bind().quantize_q8_1(self.h, stream=self.stream) if q8 else None
        self.act = DeviceArray.empty((shape["k"], shape["n_ff"]), np.float32)
        self.outputs = [self.act]

    def launcher(self, config, i):
        from cutlass import Float32, Int8, Int32, Uint8

        fn = _gu_compile(config, self.shape, self.q8)
        mats = self._mats(i)
        pg = ptr(Uint8, mats[0].ptr)
        pu = ptr(Uint8, mats[-1].ptr)  # fused: the same tensor (gate rows, then up rows, per expert)
        pids, pact = ptr(Int32, self.dev_ids[i].ptr, 4), ptr(Float32, self.act.ptr)
        k, cs = Int32(self.shape["k"]), self.stream.cu
        x = x_pointers(self.h, self.hq)  # (x, xq, xd, xs): the chunk kernel takes no xs
        if config["mapping"] == "chunk":
            x = x[:3]
        # the q8_1 output (quantize_out) is not tuned here: never written, any valid pointers do
        no_q8_out = (ptr(Int8, self.act.ptr, 4), ptr(Float32, self.act.ptr, 4), ptr(Float32, self.act.ptr, 4),
                     ptr(Int32, self.act.ptr, 4))
        args = (pg, pu, *x, pids, pact, *no_q8_out, k, cs)
        return lambda: fn(*args)

    def check(self, config, out):
        return self.problem.check(out)


# ---------------------------------------------------------------------------------------------- down
def _down_space(shape, ctx, q8):
    b = _bind()
    out = _chunk_configs(q8, shape["n_out"]) if b.down_chunk_ok(shape["qtype"], shape["n_ff"], shape["k"]) else []
    return out + [dict(mapping="slice", warps_per_row=w) for w in WARPS_PER_ROW]


def _down_default(shape, ctx, q8):
    b = _bind()
    if b.down_chunk_ok(shape["qtype"], shape["n_ff"], shape["k"]):
        return dict(mapping="chunk", rows_per_warp=b.down_rows_per_warp(shape["qtype"], q8),
                    **({"x_loads_first": False} if q8 else {}))
    return dict(mapping="slice", warps_per_row=2)  # compile_moe_down's default, what moe_down() launches


def _down_why_invalid(config, shape, ctx, q8):
    q = shape["qtype"]
    why = _type_reason(q, shape["n_ff"], q8)
    if why:
        return why
    if config.get("mapping") == "chunk":
        if not _bind().down_chunk_ok(q, shape["n_ff"], shape["k"]):
            return (f"the chunk mapping needs Q4_K/Q6_K/Q6_K_P and whole warps of chunks over the k experts "
                    f"(got {q}, n_ff {shape['n_ff']}, k {shape['k']})")
        return _chunk_reason(config, q8, shape["n_out"])
    if config.get("mapping") == "slice":
        return (unknown_keys_reason(config, {"mapping", "warps_per_row"})
                or int_in(config, "warps_per_row", WARPS_PER_ROW))
    return f"unknown mapping {config.get('mapping')!r} (chunk or slice)"


def _down_compile(config, shape, q8):
    b = _bind()
    q, n_ff, n_out = shape["qtype"], shape["n_ff"], shape["n_out"]
    if config["mapping"] == "chunk":
        return b.compile_moe_down_chunk(q, n_ff, n_out, shape["k"], add_residual=False, q8=q8,
                                        rows_per_warp=config["rows_per_warp"],
                                        x_loads_first=config.get("x_loads_first", False))
    return b.compile_moe_down(q, n_ff, n_out, add_residual=False, warps_per_row=config["warps_per_row"], q8=q8)


class DownProblem:
    """Host side: the down expert tensor, k activation rows, router weights, expert-id set 0, and the float64
    reference with its bound on sampled output rows."""

    def __init__(self, shape, q8: bool, rng):
        b, s = _bind(), shape
        q, n_ff, n_out, E, k = s["qtype"], s["n_ff"], s["n_out"], s["n_expert"], s["k"]
        self.mats = [_random_experts(q, E, n_out, n_ff, rng)]
        self.act = rng.standard_normal((k, n_ff)).astype(np.float32)
        w = rng.random(k).astype(np.float32)
        self.w = (w / w.sum()).astype(np.float32)
        self.ids = _random_ids(E, k, rng)
        self.rows = sample_rows(n_out, VERIFY_ROWS, rng)
        dsub = self.mats[0][self.ids][:, self.rows]
        ids, R = np.arange(k), len(self.rows)
        act = b.q8_round_trip(self.act) if q8 else self.act  # dp4a: exact against the q8_1-dequantized rows
        self.ref = b.moe_down_ref(dsub, q, act, ids, self.w, R)
        per = np.abs(b.gemv_experts_ref(dsub, q, act, ids, R, x_per_slot=True))
        aw = np.abs(self.w.astype(np.float64))[:, None]
        bj = b.gemv_error_bound(dsub, q, act, ids=ids, n_out=R, x_per_slot=True)
        # tests/kernels/test_moe_ffn.py test_down: a router-weighted sum of k GEMV rows
        self.bound = (aw * bj).sum(0) + (k + 2) * U * (aw * per).sum(0)

    def check(self, out) -> str | None:
        return nonfinite(out, "y") or bound_violation(out[self.rows], self.ref, self.bound, "y")


class DownRunner(_ExpertRunner):
    def __init__(self, shape, ctx, q8: bool):
        super().__init__(shape, ctx)
        from sparkinfer_cute.runtime import DeviceArray

        self.q8 = q8
        self.problem = p = DownProblem(shape, q8, self.rng)
        self._upload_experts(p.mats, shape["n_out"], p.ids)
        self.act = DeviceArray.from_numpy(p.act, self.stream)
        self.actq = _bind().quantize_q8_1(self.act, stream=self.stream) if q8 else None
        self.wts = DeviceArray.from_numpy(p.w, self.stream)
        self.y = DeviceArray.empty((shape["n_out"],), np.float32)
        self.outputs = [self.y]

    def launcher(self, config, i):
        from cutlass import Float32, Int32, Uint8

        fn = _down_compile(config, self.shape, self.q8)
        pw = ptr(Uint8, self._mats(i)[0].ptr)
        pids, pwts, py = ptr(Int32, self.dev_ids[i].ptr, 4), ptr(Float32, self.wts.ptr, 4), ptr(Float32, self.y.ptr)
        cs = self.stream.cu
        a = x_pointers(self.act, self.actq)  # (act, aq, ad, as)
        tail = _bind().no_tail_args(self.y)  # the engine's post-FFN tail is not part of the tuned shape
        if config["mapping"] == "chunk":  # k is static in the chunk kernel; it takes no as
            args = (pw, *a[:3], pids, pwts, py, py, *tail, cs)  # no residual: the resid pointer is never read
        else:
            args = (pw, *a, pids, pwts, py, py, Int32(self.shape["k"]), *tail, cs)
        return lambda: fn(*args)

    def check(self, config, out):
        return self.problem.check(out)


# ---------------------------------------------------------------------------------------------- registration
def _gate_up_op(name: str, q8: bool) -> TunableOp:
    return TunableOp(
        name=name,
        summary="MoE gate+up+SwiGLU of the routed experts (decode), " + ("dp4a" if q8 else "f32 activations"),
        shape_keys=("qtype", "n_in", "n_ff", "n_expert", "k", "fused"),
        space=lambda s, c: _gu_space(s, c, q8),
        default=lambda s, c: _gu_default(s, c, q8),
        why_invalid=lambda cfg, s, c: _gu_why_invalid(cfg, s, c, q8),
        compile=lambda cfg, s: _gu_compile(cfg, s, q8),
        build=lambda s, c: GateUpRunner(s, c, q8),
        compile_shape_keys=("qtype", "n_in", "n_ff", "fused"),
    )


def _down_op(name: str, q8: bool) -> TunableOp:
    return TunableOp(
        name=name,
        summary="MoE down projection, router-weighted sum over the routed experts (decode), "
                + ("dp4a" if q8 else "f32 activations"),
        shape_keys=("qtype", "n_ff", "n_out", "n_expert", "k"),
        space=lambda s, c: _down_space(s, c, q8),
        default=lambda s, c: _down_default(s, c, q8),
        why_invalid=lambda cfg, s, c: _down_why_invalid(cfg, s, c, q8),
        compile=lambda cfg, s: _down_compile(cfg, s, q8),
        build=lambda s, c: DownRunner(s, c, q8),
        compile_shape_keys=("qtype", "n_ff", "n_out", "k"),
    )


MOE_GATE_UP = register(_gate_up_op("moe_gate_up", False), __name__)
MOE_GATE_UP_Q8 = register(_gate_up_op("moe_gate_up_q8", True), __name__)
MOE_DOWN = register(_down_op("moe_down", False), __name__)
MOE_DOWN_Q8 = register(_down_op("moe_down_q8", True), __name__)
