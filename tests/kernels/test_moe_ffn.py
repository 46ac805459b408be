"""Fused selected-expert MoE FFN (gate/up + SwiGLU kernel, down + weighted-sum kernel) vs float64 numpy.

Tolerances. Kernel A: g and u are GEMV rows, each within the GEMV bound B (reference/kernel_refs.py), so
|silu(g)u - silu(g*)u*| <= |silu'| B_g |u| + |silu(g)| B_u + (exp approx, ~2^-22 relative) with |silu'| <= 1.1;
we assert that bound (x2 slack for the second-order terms) and the spec's 1e-3 relative error. Kernel B: a weighted
sum of k GEMV rows: bound sum_j |w_j| B_j + k * 2^-24 * sum_j |w_j d_j|. End to end: 1e-3 relative to max|y|.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparkinfer_cute.kernels import arch
from sparkinfer_cute.kernels.moe_ffn import (
    DOWN_CONFIGS,
    GATE_UP_CONFIGS,
    compile_moe_down,
    compile_moe_gate_up,
    moe_down,
    moe_down_q8,
    moe_ffn,
    moe_gate_up,
    moe_gate_up_q8,
)
from sparkinfer_cute.kernels.quant_decode import spec
from sparkinfer_cute.reference.kernel_refs import (
    gemv_error_bound,
    gemv_experts_ref,
    gemv_q8_error_bound,
    moe_down_ref,
    moe_ffn_ref,
    moe_gate_up_ref,
    random_quant_bytes,
)


def experts(q, n_expert, n_rows, n_in, rng):
    sp = spec(q)
    raw = random_quant_bytes(q, n_expert * n_rows * n_in // sp.block_elems, rng)
    return raw.reshape(n_expert, n_rows, sp.row_bytes(n_in))


def route(n_expert, k, rng):
    ids = rng.choice(n_expert, size=k, replace=False).astype(np.int32)
    w = rng.random(k).astype(np.float32)
    return ids, (w / w.sum()).astype(np.float32)


def test_reference_fused_equals_separate():
    """The fused gate_up layout reference (gate rows then up rows per expert) equals the separate-tensor one."""
    rng = np.random.default_rng()
    E, n_ff, n_in = 4, 32, 256
    g, u = experts("Q4_K", E, n_ff, n_in, rng), experts("Q4_K", E, n_ff, n_in, rng)
    fused = np.concatenate([g, u], axis=1)
    h = rng.standard_normal(n_in)
    ids = np.array([3, 1], np.int32)
    np.testing.assert_array_equal(moe_gate_up_ref(fused, None, "Q4_K", h, ids, n_ff),
                                  moe_gate_up_ref(g, u, "Q4_K", h, ids, n_ff))


@pytest.mark.parametrize("target", arch.SUPPORTED_TARGETS)
def test_registered_configs_compile(target):
    with arch.target(target):
        for cfg in GATE_UP_CONFIGS:
            assert compile_moe_gate_up.uncached(**cfg) is not None
        for cfg in DOWN_CONFIGS:
            assert compile_moe_down.uncached(**cfg) is not None


def _silu(g):
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g))


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_in,n_ff,E,k,fused", [("Q4_K", 2048, 768, 128, 8, False), ("Q4_K", 2048, 768, 128, 8, True),
                                                   ("Q4_K", 256, 256, 16, 4, False), ("Q5_0", 384, 384, 16, 4, False)])
def test_gate_up(q, n_in, n_ff, E, k, fused):
    rng = np.random.default_rng()
    g, u = experts(q, E, n_ff, n_in, rng), experts(q, E, n_ff, n_in, rng)
    h = rng.standard_normal(n_in).astype(np.float32)
    ids, _ = route(E, k, rng)
    from sparkinfer_cute.runtime import DeviceArray

    act = DeviceArray.empty((k, n_ff), np.float32)
    act.fill_bytes(0xFF)
    if fused:
        moe_gate_up(np.concatenate([g, u], axis=1), None, q, DeviceArray.from_numpy(h), ids, n_ff, out=act)
    else:
        moe_gate_up(g, u, q, DeviceArray.from_numpy(h), ids, n_ff, out=act)
    a = act.to_numpy().astype(np.float64)
    assert not np.isnan(a).any()
    ref = moe_gate_up_ref(g, u, q, h, ids, n_ff)
    gr = gemv_experts_ref(g, q, h[None], ids, n_ff)
    ur = gemv_experts_ref(u, q, h[None], ids, n_ff)
    bg = gemv_error_bound(g, q, h[None], ids=ids, n_out=n_ff)
    bu = gemv_error_bound(u, q, h[None], ids=ids, n_out=n_ff)
    bound = 2 * (1.1 * bg * np.abs(ur) + np.abs(_silu(gr)) * bu) + 1e-6 * np.abs(ref) + 1e-30
    err = np.abs(a - ref)
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"
    assert err.max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_ff,n_out,E,k,resid", [("Q6_K", 768, 2048, 128, 8, True), ("Q4_K", 768, 2048, 128, 8, False),
                                                    ("Q6_K", 256, 256, 16, 4, False), ("Q8_0", 384, 384, 16, 4, True)])
def test_down(q, n_ff, n_out, E, k, resid):
    rng = np.random.default_rng()
    d = experts(q, E, n_out, n_ff, rng)
    act = rng.standard_normal((k, n_ff)).astype(np.float32)
    ids, w = route(E, k, rng)
    r = rng.standard_normal(n_out).astype(np.float32) if resid else None
    y = moe_down(d, q, act, ids, w, n_out, resid=r)
    ref = moe_down_ref(d, q, act, ids, w, n_out, r)
    per = gemv_experts_ref(d, q, act, ids, n_out, x_per_slot=True)
    bj = gemv_error_bound(d, q, act, ids=ids, n_out=n_out, x_per_slot=True)
    bound = (np.abs(w)[:, None] * bj).sum(0) + (k + 2) * 2.0**-24 * (
        (np.abs(w)[:, None] * np.abs(per)).sum(0) + (np.abs(r) if resid else 0))
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"


@pytest.mark.gpu
def test_moe_ffn_qwen3_shape_end_to_end():
    rng = np.random.default_rng()
    E, k, n_embd, n_ff = 128, 8, 2048, 768
    g, u = experts("Q4_K", E, n_ff, n_embd, rng), experts("Q4_K", E, n_ff, n_embd, rng)
    d = experts("Q6_K", E, n_embd, n_ff, rng)
    h = rng.standard_normal(n_embd).astype(np.float32)
    resid = rng.standard_normal(n_embd).astype(np.float32)
    ids, w = route(E, k, rng)
    y = moe_ffn(g, u, d, "Q4_K", "Q6_K", h, ids, w, n_ff, resid=resid)
    ref = moe_ffn_ref(g, u, d, "Q4_K", "Q6_K", h, ids, w, n_ff, resid=resid)
    assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()
    # deterministic: same inputs, same bits
    y2 = moe_ffn(g, u, d, "Q4_K", "Q6_K", h, ids, w, n_ff, resid=resid)
    np.testing.assert_array_equal(y.view(np.uint32), y2.view(np.uint32))


# ---------------------------------------------------------------------------------------------------------------
# dp4a (int8 activation) variants: bounds from gemv_q8_error_bound (q8_1 quantization of h / of the activations)



@pytest.mark.parametrize("target", arch.SUPPORTED_TARGETS)
def test_q8_registered_configs_compile(target):
    with arch.target(target):
        for cfg in GATE_UP_CONFIGS:
            assert compile_moe_gate_up.uncached(**cfg, q8=True) is not None
        for cfg in DOWN_CONFIGS:
            assert compile_moe_down.uncached(**cfg, q8=True) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_in,n_ff,E,k,fused", [("Q4_K", 2048, 768, 128, 8, False), ("Q4_K", 2048, 768, 128, 8, True),
                                                   ("Q5_0", 384, 384, 16, 4, False)])
def test_gate_up_q8(q, n_in, n_ff, E, k, fused):
    rng = np.random.default_rng()
    g, u = experts(q, E, n_ff, n_in, rng), experts(q, E, n_ff, n_in, rng)
    h = rng.standard_normal(n_in).astype(np.float32)
    ids, _ = route(E, k, rng)
    a = moe_gate_up_q8(np.concatenate([g, u], axis=1) if fused else g, None if fused else u, q, h, ids, n_ff)
    assert a.shape == (k, n_ff) and not np.isnan(a).any()
    ref = moe_gate_up_ref(g, u, q, h, ids, n_ff)
    ur = gemv_experts_ref(u, q, h[None], ids, n_ff)
    gr = gemv_experts_ref(g, q, h[None], ids, n_ff)
    bg = gemv_q8_error_bound(g, q, h[None], ids=ids, n_out=n_ff)
    bu = gemv_q8_error_bound(u, q, h[None], ids=ids, n_out=n_ff)
    bound = 2 * (1.1 * bg * (np.abs(ur) + bu) + (np.abs(_silu(gr)) + 1.1 * bg) * bu) + 1e-6 * np.abs(ref) + 1e-30
    err = np.abs(a - ref)
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"


@pytest.mark.gpu
@pytest.mark.parametrize("q,n_ff,n_out,E,k,resid", [("Q6_K", 768, 2048, 128, 8, True), ("Q6_K_P", 768, 2048, 128, 8, False),
                                                    ("Q4_K", 768, 2048, 128, 8, True), ("Q8_0", 384, 384, 16, 4, False)])
def test_down_q8(q, n_ff, n_out, E, k, resid):
    rng = np.random.default_rng()
    d = experts(q, E, n_out, n_ff, rng)
    act = rng.standard_normal((k, n_ff)).astype(np.float32)
    ids, w = route(E, k, rng)
    r = rng.standard_normal(n_out).astype(np.float32) if resid else None
    y = moe_down_q8(d, q, act, ids, w, n_out, resid=r)
    ref = moe_down_ref(d, q, act, ids, w, n_out, r)
    per = gemv_experts_ref(d, q, act, ids, n_out, x_per_slot=True)
    bj = gemv_q8_error_bound(d, q, act, ids=ids, n_out=n_out, x_per_slot=True)
    bound = (np.abs(w)[:, None] * bj).sum(0) + (k + 2) * 2.0**-24 * (
        (np.abs(w)[:, None] * (np.abs(per) + bj)).sum(0) + (np.abs(r) if resid else 0))
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["float", "dp4a"])
@pytest.mark.parametrize("q_down", ["Q6_K_P", "Q4_K"])
@pytest.mark.parametrize("rows_per_warp", [1, 2])
def test_moe_chunk_rows_per_warp(path, q_down, rows_per_warp):
    """The chunk-mapping MoE kernels with 1 and 2 rows per warp (Qwen3 shape) against the float64 reference."""
    rng = np.random.default_rng()
    E, k, n_embd, n_ff = 32, 8, 2048, 768
    g, u = experts("Q4_K", E, n_ff, n_embd, rng), experts("Q4_K", E, n_ff, n_embd, rng)
    d = experts(q_down, E, n_embd, n_ff, rng)
    h = rng.standard_normal(n_embd).astype(np.float32)
    resid = rng.standard_normal(n_embd).astype(np.float32)
    ids, w = route(E, k, rng)
    gate_up = moe_gate_up if path == "float" else moe_gate_up_q8
    down = moe_down if path == "float" else moe_down_q8
    act = gate_up(g, u, "Q4_K", h, ids, n_ff, rows_per_warp=rows_per_warp)
    aref = moe_gate_up_ref(g, u, "Q4_K", h, ids, n_ff)
    # 1e-3 relative (f32 GEMV rows; dp4a adds the q8_1 quantization of h, ~0.4% per element worst case, far less
    # on average over 2048-element dots)
    assert np.abs(act - aref).max() <= (1e-3 if path == "float" else 2e-2) * np.abs(aref).max()
    y = down(d, q_down, act, ids, w, n_embd, resid=resid, rows_per_warp=rows_per_warp)
    ref = moe_down_ref(d, q_down, act, ids, w, n_embd, resid)
    assert not np.isnan(y).any()
    assert np.abs(y - ref).max() <= (1e-5 if path == "float" else 2e-2) * np.abs(ref).max()
