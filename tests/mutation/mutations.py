"""The mutation table: deliberately injected bugs, each of which a test or gate must reject.

Every bug is injected twice, without touching the package's code (monkeypatching only, undone afterwards):

* **kernel level**: a numpy emulation of the GPU kernel with the bug (``kernel_emulation.py`` for the dp4a
  arithmetic; the float64 references, rounded to f32, for the rest) is judged by the *same check function* the GPU
  kernel test applies (``sparkinfer_cute.reference.kernel_refs.check_*``; tests/kernels/ call them on the GPU's
  output). The unbroken emulation must pass the check in the same run (the control), else the kill proves nothing.
* **model level**: the CPU reference forward with the bug, run teacher-forced on a synthetic model, is judged by the
  end-to-end gates the GPU decode/prefill tests apply (``sparkinfer_cute.reference.metrics.e2e_gate``): ``f32``
  against the clean f32 reference (the f32 GPU builds' gate) and ``int8`` against the clean reference with the GPU's
  q8_1 activation rounding (the default Qwen build's gate; its noise floor from the float64 twin).

A bug is killed when at least one of these checks fails on it. ``python tests/mutation/mutations.py`` prints the
table; tests/mutation/test_mutation_table.py asserts a 100% kill rate and prints the table in the test summary.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_emulation import dp4a_gemv, dp4a_moe_down, dp4a_moe_gate_up  # noqa: E402

from sparkinfer_cute.reference import kernel_refs as kr  # noqa: E402
from sparkinfer_cute.reference import ops  # noqa: E402

f32 = np.float32
INF = float("inf")


# ---------------------------------------------------------------------------------------------- kernel harnesses
def judge(check: Callable[[], object]) -> float:
    """Run a check; its worst ratio (error / bound), or the failure's ratio (> 1; inf for NaN / wrong ids)."""
    try:
        r = check()
    except kr.CheckFailed as e:
        return e.ratio if e.ratio > 1 else INF
    except AssertionError:
        return INF
    if isinstance(r, dict):
        return max(r.values())
    return float(r)


def _rand_weight(q, n_out, n_in, rng):
    return kr.random_quant_bytes(q, n_out * n_in // 256, rng).reshape(n_out, kr.row_bytes(q, n_in))


def _gemv_q8_case(q, n_in, n_out, bug):
    def run(rng):
        w = _rand_weight(q, n_out, n_in, rng)
        x = rng.standard_normal((1, n_in)).astype(f32)
        ctrl = judge(lambda: kr.check_gemv_q8(dp4a_gemv(w, q, x), w, q, x))
        kw = dict(bug(rng, n_in))
        y = dp4a_gemv(w, q, x, **kw)
        try:
            kr.check_gemv_q8(y, w, q, x)
            parts = {}
        except kr.CheckFailed as e:
            parts = e.ratios
        return ctrl, judge(lambda: kr.check_gemv_q8(y, w, q, x)), parts
    run.check = f"check_gemv_q8 ({q} {n_in}->{n_out})"
    return run


def _moe_gate_up_q8_zero_block(rng):
    E, k, n_in, n_ff = 16, 4, 2048, 256
    g = kr.random_quant_bytes("Q4_K", E * n_ff * n_in // 256, rng).reshape(E, n_ff, -1)
    u = kr.random_quant_bytes("Q4_K", E * n_ff * n_in // 256, rng).reshape(E, n_ff, -1)
    h = rng.standard_normal(n_in).astype(f32)
    ids = rng.choice(E, k, replace=False).astype(np.int32)
    ctrl = judge(lambda: kr.check_moe_gate_up(dp4a_moe_gate_up(g, u, "Q4_K", h, ids), g, u, "Q4_K", h, ids, n_ff,
                                              q8=True))
    a = dp4a_moe_gate_up(g, u, "Q4_K", h, ids, zero_block=int(rng.integers(n_in // 32)))
    return ctrl, judge(lambda: kr.check_moe_gate_up(a, g, u, "Q4_K", h, ids, n_ff, q8=True)), {}


_moe_gate_up_q8_zero_block.check = "check_moe_gate_up q8 (Q4_K 2048->256 x4)"


def _moe_down(bug: str):
    def run(rng):
        E, k, n_ff, n_out = 16, 4, 256, 512
        d = kr.random_quant_bytes("Q6_K", E * n_out * n_ff // 256, rng).reshape(E, n_out, -1)
        act = rng.standard_normal((k, n_ff)).astype(f32)
        ids = rng.choice(E, k, replace=False).astype(np.int32)
        w = rng.random(k).astype(f32)
        w /= w.sum()
        if bug == "one expert fewer":  # f32 path: the weighted sum runs over k - 1 slots
            ok = kr.moe_down_ref(d, "Q6_K", act, ids, w, n_out).astype(f32)
            ctrl = judge(lambda: kr.check_moe_down(ok, d, "Q6_K", act, ids, w, n_out))
            y = kr.moe_down_ref(d, "Q6_K", act[:-1], ids[:-1], w[:-1], n_out).astype(f32)
            return ctrl, judge(lambda: kr.check_moe_down(y, d, "Q6_K", act, ids, w, n_out)), {}
        ctrl = judge(lambda: kr.check_moe_down(dp4a_moe_down(d, "Q6_K", act, ids, w), d, "Q6_K", act, ids, w,
                                               n_out, q8=True))
        y = dp4a_moe_down(d, "Q6_K", act, ids, w, drop_every=64)
        return ctrl, judge(lambda: kr.check_moe_down(y, d, "Q6_K", act, ids, w, n_out, q8=True)), {}
    run.check = "check_moe_down" + (" q8" if bug != "one expert fewer" else "") + " (Q6_K 256->512 x4)"
    return run


def _gemv_f32_q6k_scale(rng):
    """f32 GEMV whose Q6_K decode scales odd 16-element sub-blocks with the even neighbour's scale."""
    n_in, n_out = 2048, 512
    w = _rand_weight("Q6_K", n_out, n_in, rng)
    x = rng.standard_normal(n_in).astype(f32)
    ctrl = judge(lambda: kr.check_gemv((kr.gemv_ref(w, "Q6_K", x)).astype(f32), w, "Q6_K", x))
    y = (q6k_dequant_bug(w.reshape(-1, 210)).reshape(n_out, n_in).astype(np.float64) @ x).astype(f32)
    return ctrl, judge(lambda: kr.check_gemv(y, w, "Q6_K", x)), {}


_gemv_f32_q6k_scale.check = "check_gemv (Q6_K 2048->512)"


def q6k_dequant_bug(blocks: np.ndarray) -> np.ndarray:
    """Q6_K blocks (n, 210) decoded with sub-block 2j+1 scaled by sub-block 2j's scale: (n, 256) f32."""
    q, sc, d = ops.q6_K_blocks(np.ascontiguousarray(blocks), blocks.shape[0], 256)
    sc = sc.reshape(blocks.shape[0], 1, 16, 16).copy()
    sc[:, :, 1::2] = sc[:, :, 0::2]
    w = d[..., None].astype(f32) * sc.reshape(blocks.shape[0], 1, 256).astype(f32)
    return (w.astype(f32) * (q - 32).astype(f32)).astype(f32).reshape(blocks.shape[0], 256)


def _rmsnorm(bug: str):
    def run(rng):
        M, N = 3, 2048
        x = (rng.standard_normal((M, N)) * 2).astype(f32)
        w = (1 + 0.3 * rng.standard_normal(N)).astype(f32)
        if bug == "scale":
            ctrl = judge(lambda: kr.check_rmsnorm(kr.rmsnorm_ref(x, w).astype(f32), x, w))
            y = (kr.rmsnorm_ref(x, w) * 1.01).astype(f32)
            return ctrl, judge(lambda: kr.check_rmsnorm(y, x, w)), {}
        r = (rng.standard_normal((M, N)) * 3).astype(f32)
        y0, s0 = kr.rmsnorm_residual_ref(x, r, w)
        ctrl = judge(lambda: kr.check_rmsnorm(y0.astype(f32), x, w, residual=r, s=s0.astype(f32)))
        # the fused kernel drops the residual: s = x, normed x
        y = kr.rmsnorm_ref(x, w).astype(f32)
        return ctrl, judge(lambda: kr.check_rmsnorm(y, x, w, residual=r, s=x.copy())), {}
    run.check = "check_rmsnorm" + (" (residual)" if bug != "scale" else "")
    return run


def _rope_scale(rng):
    T, H, D, base = 3, 8, 128, 1e6
    x = rng.standard_normal((T, H, D)).astype(f32)
    pos = rng.integers(0, 4097, T)
    ok = kr.rope_neox_ref(x, pos, n_rot=D, base=base, f32_theta=True).astype(f32)
    ctrl = judge(lambda: kr.check_rope(ok, x, pos, D, base))
    theta = kr.rope_theta_f32(pos, D, base).astype(np.float64) * 1.01
    y = kr._rope_with_theta(x.astype(np.float64), theta, D).astype(f32)
    return ctrl, judge(lambda: kr.check_rope(y, x, pos, D, base)), {}


_rope_scale.check = "check_rope (pos <= 4096)"


def _attention_scale(rng):
    H, KV, D, n = 8, 2, 128, 300
    q = rng.standard_normal((H, D)).astype(f32)
    k = rng.standard_normal((n, KV, D)).astype(np.float16)
    v = rng.standard_normal((n, KV, D)).astype(np.float16)
    scale = 2.0 / math.sqrt(D)
    ref = kr.attention_decode_ref(q, k, v, n - 1, scale)
    ctrl = judge(lambda: kr.check_rel(ref.astype(f32), ref, kr.ATTENTION_REL_TOL))
    y = kr.attention_decode_ref(q, k, v, n - 1, scale * 1.01).astype(f32)
    return ctrl, judge(lambda: kr.check_rel(y, ref, kr.ATTENTION_REL_TOL, "attention")), {}


_attention_scale.check = "check_rel attention (n_ctx 300)"


def _attention_counts(bug: str):
    """The q = 0 check of test_attention_decode_gpu_counts_every_key_once on the split-KV algorithm (per-split LSE
    and the LSE-weighted mean), emulated in f32 with the bug."""
    from sparkinfer_cute.kernels.attention_decode import split_kv_ranges

    def emulate(v, pos, window, S, skip=None):
        ranges = split_kv_ranges(pos, window, S)
        H = 8
        lse = np.full((H, S), -np.inf)
        keep = []
        for s, (b, e) in enumerate(ranges):
            keys = [t for t in range(b, e) if t != skip]
            if keys:
                lse[:, s] = np.log(f32(len(keys)))
                keep += keys
        mean = np.repeat(v[keep].astype(f32).mean(axis=0, dtype=f32), H // v.shape[1], axis=0)
        return lse, mean

    def run(rng):
        H, KV, D, S = 8, 2, 64, 7
        worst_ctrl, worst = 0.0, 0.0
        for pos, window in [(1000, 0), (1000, 100), (2047, 512)]:
            v = rng.standard_normal((pos + 1, KV, D)).astype(np.float16)
            ranges = split_kv_ranges(pos, window, S)
            lse, out = emulate(v, pos, window, S)
            worst_ctrl = max(worst_ctrl, judge(lambda: kr.check_attention_counts(lse, out, v, pos, window, ranges, H)
                                               or 0.0))
            if bug == "skip":  # the last key of the first split is never read
                lse, out = emulate(v, pos, window, S, skip=ranges[0][1] - 1)
            else:  # the window test is off by one: one key too many
                lse, out = emulate(v, pos, window + 1 if window else 0, S)
            worst = max(worst, judge(lambda: kr.check_attention_counts(lse, out, v, pos, window, ranges, H) or 0.0))
        return worst_ctrl, worst, {}
    run.check = "check_attention_counts (q = 0, n_ctx 1001-2048)"
    return run


def _prefill_counts(bug: str):
    """The q = 0 check of test_attention_prefill_gpu_q_zero_counts_every_visible_key (integer V: the kernel's sums
    and counts are exact), on the f32 mean each query's visible keys give, with the bug."""
    def run(rng):
        T, p0, KV, H, D = 300, 700, 2, 8, 32
        worst_ctrl, worst = 0.0, 0.0
        for window in (0, 100):
            v = rng.integers(-8, 9, (p0 + T, KV, D)).astype(np.float16)
            qp = p0 + np.arange(T)[:, None]
            keys = np.arange(p0 + T)[None, :]

            def mean(vis, v=v):
                m = (vis.astype(np.float64) @ v.reshape(p0 + T, -1).astype(np.float64)) / vis.sum(1, keepdims=True)
                return np.repeat(m.reshape(T, KV, D), H // KV, axis=1).astype(f32)

            vis = (keys <= qp) & ((window == 0) | (qp - keys < window))
            out = mean(vis)
            check = partial(kr.check_attention_prefill_counts, v_dense=v, p0=p0, window=window, n_head=H)
            worst_ctrl = max(worst_ctrl, judge(partial(check, out)))
            if bug == "skip":  # the first key of one 64-key tile is never loaded
                bad = vis & (keys != 64 * ((p0 + T // 2) // 64))
            elif bug == "window":  # the window test is off by one: one key too many
                bad = (keys <= qp) & ((window == 0) | (qp - keys < window + 1)) if window else vis
            else:  # "causal": the diagonal tile is not masked, so a query also sees the next key
                bad = vis | ((keys == qp + 1) & (keys < p0 + T))
            if bug == "window" and not window:
                continue
            out = mean(bad)
            worst = max(worst, judge(partial(check, out)))
        return worst_ctrl, worst, {}
    run.check = "check_attention_prefill_counts (q = 0, integer V, p0 700, T 300)"
    return run


def _route(bug: str):
    def run(rng):
        T, E, k = 3, 128, 8
        lg = rng.standard_normal((T, E)).astype(f32)
        ids, w = kr.route_ref(lg, k, True)
        ctrl = judge(lambda: kr.check_route(ids, w.astype(f32), lg, k, True))
        if bug == "unnormalized":
            p = np.exp(lg - lg.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            w2 = np.take_along_axis(p, ids, -1).astype(f32)
            return ctrl, judge(lambda: kr.check_route(ids, w2, lg, k, True)), {}
        ids2, w2 = kr.route_ref(lg, k - 1, True)  # k - 1 experts renormalized; the last slot left unwritten
        ids2 = np.concatenate([ids2, np.full((T, 1), -1, np.int32)], axis=1)
        w2 = np.concatenate([w2, np.full((T, 1), np.nan)], axis=1).astype(f32)
        return ctrl, judge(lambda: kr.check_route(ids2, w2, lg, k, True)), {}
    run.check = "check_route (128 experts, top-8)"
    return run


# ---------------------------------------------------------------------------------------------- model injections
@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def m_skip_key(r):
    orig = ops.causal_window_mask

    def mask(q_pos, k_pos, window=None):
        vis = orig(q_pos, k_pos, window)
        return vis & ~((np.asarray(k_pos)[None, :] == np.asarray(q_pos)[:, None] - 1))  # the previous token's key
    return patched(ops, "causal_window_mask", mask)


def m_window(r):
    orig = ops.causal_window_mask
    return patched(ops, "causal_window_mask", lambda q, k, window=None: orig(q, k, window + 1 if window else window))


def m_scale_attr(attr, factor):
    def inject(r):
        return patched(r, attr, getattr(r, attr) * factor)
    return inject


def m_one_expert_fewer(r):
    return patched(r, "n_expert_used", r.n_expert_used - 1)


def m_unnormalized(r):
    orig = r.route

    def route(h, l):
        sel, w = orig(h, l)
        probs = ops.softmax(r.linear(h, f"blk.{l}.ffn_gate_inp.weight"), axis=-1)
        return sel, np.take_along_axis(probs, sel, -1).astype(w.dtype)
    return patched(r, "route", route)


def m_rmsnorm(r):
    orig = ops.rmsnorm
    return patched(ops, "rmsnorm", lambda x, w, eps: (orig(x, w, eps) * 1.01).astype(orig(x, w, eps).dtype))


def m_rope(r):
    orig = ops.rope_neox

    def rope(x, positions, n_rot, base, freq_factors=None, freq_scale=1.0):
        return orig(x, positions, n_rot, base, freq_factors, freq_scale * 1.01)
    return patched(ops, "rope_neox", rope)


def m_rope_scaling_ignored(r):
    """Gemma 3 4B+'s linear RoPE scaling dropped: the global layers rotate by theta, not theta / 8 (what a GPU forward
    that does not hand its RoPE kernels models/base.py ``linear_rope_factors`` computes)."""
    orig = ops.rope_neox

    def rope(x, positions, n_rot, base, freq_factors=None, freq_scale=1.0):
        return orig(x, positions, n_rot, base, freq_factors, 1.0)
    return patched(ops, "rope_neox", rope)


def m_zero_block(r):
    orig = r.act_for

    def act_for(x, name):
        y = np.array(orig(x, name))
        y[..., -32:] = 0  # the last 32-element block of every matmul input read as zeros
        return y
    return patched(r, "act_for", act_for)


def m_q6k_scale(r):
    from gguf import GGMLQuantizationType

    from sparkinfer_cute.gguf import quants
    from sparkinfer_cute.reference import qwen3_moe

    orig = quants.dequantize

    def dequantize(raw, qtype):
        out = orig(raw, qtype)
        if GGMLQuantizationType(int(qtype)) == GGMLQuantizationType.Q6_K:
            blocks = np.ascontiguousarray(np.asarray(raw, np.uint8)).reshape(-1, 210)
            out = q6k_dequant_bug(blocks).reshape(out.shape)
        return out
    stack = contextlib.ExitStack()
    stack.enter_context(patched(quants, "dequantize", dequantize))
    stack.enter_context(patched(qwen3_moe, "dequantize", dequantize))
    return stack


def m_dropped_residual(r):
    orig = r._layer

    def layer(l, x, positions, capture):
        y = orig(l, x, positions, capture)
        return y - x if l == 1 else y  # layer 1 adds its branches to nothing: the skip connection is gone
    return patched(r, "_layer", layer)


def m_weight(transform):
    """A model-level injection that changes what the reference reads for some tensors: ``transform(name, read)``
    returns the array the forward gets for ``name`` (``read`` is the unbroken :meth:`weight`)."""
    def inject(r):
        read = r.weight
        return patched(r, "weight", lambda name: transform(name, read))
    return inject


def _ones_for(suffix: str):
    return m_weight(lambda name, read: np.ones_like(read(name)) if name.endswith(suffix) else read(name))


def _swap_norms(a: str, b: str):
    def transform(name, read):
        if name.endswith(a):
            return read(name[: -len(a)] + b)
        if name.endswith(b):
            return read(name[: -len(b)] + a)
        return read(name)
    return m_weight(transform)


def m_next_norm_off_by_one(r):
    """A tail's next norm with the wrong layer's weight: layer l > 0 normalizes its input with layer l-1's
    attn_norm (the ``w_next`` of models/ops.py AfterFfn taken from the layer that runs the tail)."""
    def transform(name, read):
        if name.startswith("blk.") and name.endswith(".attn_norm.weight"):
            l = int(name.split(".")[1])
            return read(f"blk.{l - 1}.attn_norm.weight") if l > 0 else read(name)
        return read(name)
    return m_weight(transform)(r)


def m_router_unscaled(r):
    """Gemma 4's router input without its 1/sqrt(n_embd) factor (folded into the per-channel scale here)."""
    k = np.float32(1.0 / r.cfg.router_input_scale)
    return m_weight(lambda name, read: read(name) * k if name.endswith("ffn_gate_inp.scale") else read(name))(r)


def m_v_not_normed(r):
    """Gemma 4's V rows (the raw K projection on K = V layers) cached without their weightless RMSNorm."""
    from sparkinfer_cute.reference import gemma4 as g4

    rmsnorm = g4.ops.rmsnorm

    def norm(x, w, eps):  # the per-head norms of q/k carry a weight, the router's input is 2-D: only V is 3-D
        return x if w is None and x.ndim == 3 else rmsnorm(x, w, eps)
    return patched(g4.ops, "rmsnorm", norm)


def m_stale_routing(r):
    """A routed launch (kernels/routed_experts.py) whose expert phases do not wait for the router phase: layer
    l > 0's experts run with the ids and weights still in the buffers, the ones layer l-1 routed."""
    orig = r.route
    seen = {}

    def route(h, l):
        seen[l] = orig(h, l)
        return seen.get(l - 1, seen[l])
    return patched(r, "route", route)


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Bug:
    name: str
    kernel: Callable | None  # rng -> (control ratio, mutant ratio, parts)
    model: Callable | None  # reference -> context manager injecting the bug
    arch: str = "qwen3moe"  # the synthetic model of the model-level injection


BUGS = [
    Bug("skipped KV key", _attention_counts("skip"), m_skip_key),
    Bug("sliding window off by one", _attention_counts("window"), m_window, arch="gemma3"),
    Bug("flash prefill: a tile's first key skipped", _prefill_counts("skip"), None),
    Bug("flash prefill: sliding window off by one", _prefill_counts("window"), None),
    Bug("flash prefill: diagonal tile unmasked (sees the next key)", _prefill_counts("causal"), None),
    Bug("one expert fewer", _moe_down("one expert fewer"), m_one_expert_fewer),
    Bug("top-k weights not renormalized", _route("unnormalized"), m_unnormalized),
    Bug("router: one expert fewer, slot unwritten", _route("fewer"), None),
    Bug("attention scale x1.01", _attention_scale, m_scale_attr("kq_scale", 1.01)),
    Bug("RMSNorm scale x1.01", _rmsnorm("scale"), m_rmsnorm),
    Bug("RoPE theta x1.01", _rope_scale, m_rope),
    Bug("Gemma 3 4B+: linear RoPE scaling ignored (global layers)", None, m_rope_scaling_ignored,
        arch="gemma3_rope8"),
    Bug("zeroed 32-element activation block (GEMV)",
        _gemv_q8_case("Q4_K", 4096, 256, lambda rng, n: {"zero_block": int(rng.integers(n // 32))}), m_zero_block),
    Bug("zeroed 32-element activation block (MoE gate/up)", _moe_gate_up_q8_zero_block, None),
    Bug("1 in 64 inputs dropped (GEMV)", _gemv_q8_case("Q4_K", 2048, 512, lambda rng, n: {"drop_every": 64}), None),
    Bug("1 in 64 inputs dropped (MoE down)", _moe_down("drop"), None),
    Bug("wrong Q6_K sub-block scale (dp4a)",
        _gemv_q8_case("Q6_K", 2048, 512, lambda rng, n: {"q6k_scale_from_even": True}), m_q6k_scale),
    Bug("wrong Q6_K sub-block scale (f32 GEMV)", _gemv_f32_q6k_scale, None),
    Bug("dropped residual", _rmsnorm("residual"), m_dropped_residual),
    Bug("attention scale x1.05 (issue 11's e2e case)", None, m_scale_attr("kq_scale", 1.05)),
    # Gemma 4 (the basket's second model): its own terms, each dropped or misplaced
    Bug("Gemma 4: per-expert down scale dropped", None, _ones_for("ffn_down_exps.scale"), arch="gemma4"),
    Bug("Gemma 4: layer output scale dropped", None, _ones_for("layer_output_scale.weight"), arch="gemma4"),
    Bug("Gemma 4: rope_freqs ignored (global layers)", None, _ones_for("rope_freqs.weight"), arch="gemma4"),
    Bug("Gemma 4: post-FFN norms 1 and 2 swapped", None,
        _swap_norms("post_ffw_norm_1.weight", "post_ffw_norm_2.weight"), arch="gemma4"),
    Bug("Gemma 4: router input not scaled by 1/sqrt(n_embd)", None, m_router_unscaled, arch="gemma4"),
    Bug("Gemma 4: V not RMS-normed", None, m_v_not_normed, arch="gemma4"),
    # the norm chains run as tails (models/ops.py AfterFfn / AfterAttention): a wrong layer's next norm, and the
    # post-attention chain's outputs in the wrong order (dense MLP input <-> experts' input)
    Bug("tail: next attn_norm from the layer before (Qwen)", None, m_next_norm_off_by_one),
    Bug("tail: next attn_norm from the layer before (Gemma 4)", None, m_next_norm_off_by_one, arch="gemma4"),
    Bug("Gemma 4 tail: dense-MLP and experts' input norms swapped", None,
        _swap_norms(".ffn_norm.weight", ".pre_ffw_norm_2.weight"), arch="gemma4"),
    # the routed launch's phases (kernels/routed_experts.py): experts that do not wait for this layer's routing
    Bug("routed launch: experts use the layer before's routing (Qwen)", None, m_stale_routing),
    Bug("routed launch: experts use the layer before's routing (Gemma 4)", None, m_stale_routing, arch="gemma4"),
]


class E2E:
    """Teacher-forced logits of the clean references of one synthetic model, and the gates' verdicts on a
    mutated forward. ``n``: positions scored (gemma3: enough that most cross the sliding window)."""

    def __init__(self, path: str, n: int, rng, int8: bool):
        from sparkinfer_cute.models.int8_plan import int8_activation_tensors
        from sparkinfer_cute.reference import load_reference
        from sparkinfer_cute.reference.metrics import teacher_forced_compare

        self.path, self.n = path, n
        self.names = int8_activation_tensors(path, path="decode") if int8 else frozenset()
        r = load_reference(path, max_context=n + 8)
        self.tokens = [2] + rng.integers(4, r.vocab_size, n).tolist()
        self.targets = np.asarray(self.tokens[1:])
        self.ref = r.forward(self.tokens[:-1])
        self.twin = self.forward(dtype=np.float64)
        self.noise = {"f32": teacher_forced_compare(self.twin, self.ref, self.targets)}
        if self.names:
            self.ref_q8 = self.forward(q8=True)
            twin_q8 = self.forward(q8=True, dtype=np.float64)
            self.noise["int8"] = teacher_forced_compare(twin_q8, self.ref_q8, self.targets)

    def forward(self, q8: bool = False, dtype=np.float32, inject=None):
        from sparkinfer_cute.reference import load_reference

        r = load_reference(self.path, max_context=self.n + 8, act_q8_1=self.names if q8 else (), dtype=dtype)
        with (inject(r) if inject else contextlib.nullcontext()):
            return r.forward(self.tokens[:-1])

    def gate(self, kind: str, logits) -> dict:
        from sparkinfer_cute.reference.metrics import e2e_gate, teacher_forced_compare

        ref = self.ref if kind == "f32" else self.ref_q8
        m = teacher_forced_compare(logits, ref, self.targets)
        v = e2e_gate(m, kind, self.noise.get("int8"))
        v["metrics"] = {k: m[k] for k in ("median_kl", "mean_kl", "top1_agreement_tol")}
        return v

    def judge(self, kind: str, inject=None) -> dict:
        return self.gate(kind, self.forward(q8=kind == "int8", inject=inject))


def synthetic_models(tmp_dir: str, rng) -> dict[str, E2E]:
    """The synthetic models of the model-level injections (fresh weights from ``rng``) with their clean runs;
    gemma3_rope8: Gemma 3 tiny with linear RoPE scaling 8 on its global layer."""
    from sparkinfer_cute.gguf.synth import write_synthetic

    out = {}
    for name, n, int8 in (("qwen3moe", 48, True), ("gemma3", 96, False), ("gemma3_rope8", 64, False),
                          ("gemma4", 128, True)):
        p = os.path.join(tmp_dir, f"mut_{name}.gguf")
        arch, overrides = ("gemma3", {"rope_scaling_factor": 8.0}) if name == "gemma3_rope8" else (name, None)
        write_synthetic(p, arch=arch, preset="tiny", seed=int(rng.integers(1 << 16)), overrides=overrides)
        out[name] = E2E(p, n, rng, int8)
    return out


def run_table(models: dict[str, E2E], rng) -> list[dict]:
    """Every bug of :data:`BUGS` through its checks; one row per bug."""
    rows = []
    for bug in BUGS:
        row = {"bug": bug.name, "killed_by": [], "kernel_check": None}
        if bug.kernel is not None:
            ctrl, ratio, parts = bug.kernel(np.random.default_rng(rng.integers(1 << 63)))
            row.update(kernel_check=bug.kernel.check, kernel_control=ctrl, kernel_ratio=ratio, kernel_parts=parts)
            if ratio > 1:
                row["killed_by"].append("kernel")
        if bug.model is not None:
            e2e = models[bug.arch]
            v = e2e.judge("f32", bug.model)
            row.update(f32_ratio=v["ratio"], f32_metrics=v["metrics"])
            if not v["passed"]:
                row["killed_by"].append("f32 gate")
            if e2e.names:
                v = e2e.judge("int8", bug.model)
                row.update(int8_ratio=v["ratio"], int8_metrics=v["metrics"])
                if not v["passed"]:
                    row["killed_by"].append("int8 gate")
        rows.append(row)
    return rows


def controls(models: dict[str, E2E]) -> dict:
    """The gates on the float64 twins (the stand-ins for a correct build): each must pass."""
    out = {}
    for arch, e2e in models.items():
        out[f"{arch} f32"] = e2e.gate("f32", e2e.twin)
        if e2e.names:
            out[f"{arch} int8"] = e2e.gate("int8", e2e.forward(q8=True, dtype=np.float64))
    return out


def format_table(rows: list[dict], ctrl: dict | None = None) -> str:
    def fmt(x):
        if x is None:
            return "-"
        return "inf" if x == INF else f"{x:.3g}"

    lines = [f"{'bug':50s} {'kernel check (control -> mutant, x bound)':58s} {'f32 gate':>9s} {'int8 gate':>9s}  "
             f"killed by"]
    for r in rows:
        k = "-" if r["kernel_check"] is None else (
            f"{r['kernel_check']}: {fmt(r['kernel_control'])} -> {fmt(r['kernel_ratio'])}")
        if r.get("kernel_parts"):
            k += " (" + ", ".join(f"{n} {fmt(v)}" for n, v in r["kernel_parts"].items()) + ")"
        lines.append(f"{r['bug']:50s} {k:58s} {fmt(r.get('f32_ratio')):>9s} {fmt(r.get('int8_ratio')):>9s}  "
                     f"{', '.join(r['killed_by']) or 'NOT KILLED'}")
    killed = sum(bool(r["killed_by"]) for r in rows)
    lines.append(f"kill rate: {killed}/{len(rows)} ({100.0 * killed / len(rows):.0f}%); ratios are statistic / limit "
                 "(> 1 fails; gates: the worst of median KL, mean KL, top-1)")
    if ctrl:
        lines.append("controls (float64 twins, must pass): " + ", ".join(
            f"{k} {fmt(v['ratio'])}" for k, v in ctrl.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    seed = int(os.environ.get("SPARKINFER_TEST_SEED") or np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        models = synthetic_models(d, rng)
        print(format_table(run_table(models, rng), controls(models)))
    print(f"seed {seed}")
