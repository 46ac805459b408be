"""The llama.cpp-CPU emulation ops of ops.py (``emulate_cpu=True``) against independent float64 references.

Their bit-exactness against llama.cpp itself is asserted end to end by test_gemma3_real.py (fixture-based); here
each op is checked to compute the right quantity (fresh random inputs, float64 closed forms), within the rounding
its float order allows, and the integer decoders against the GGUF dequantizer.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.reference import ops

F32_EPS = float(np.finfo(np.float32).eps)


def _rng(seed):
    return np.random.default_rng(seed)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_expf_ggml_avx512_close_to_exp(seed):
    x = _rng(seed).uniform(-87, 0, 4096).astype(np.float32)
    got = ops.expf_ggml_avx512(x)
    want = np.exp(x.astype(np.float64))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=3 * F32_EPS, atol=0)
    assert ops.expf_ggml_avx512(np.array([-np.inf, 0.0], np.float32)).tolist() == [0.0, 1.0]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 9), nb=st.integers(1, 6), o=st.integers(1, 17))
def test_matmul_q0_equals_exact_dot_up_to_f32_rounding(seed, t, nb, o):
    r = _rng(seed)
    x = (r.standard_normal((t, nb * 32)) * r.uniform(0.1, 10)).astype(np.float32)
    qa, da = ops.quantize_q8_0_blocks(x)
    np.testing.assert_array_equal(qa * da[..., None], ops.quantize_activation_q8_0(x).reshape(t, nb, 32))
    qw = r.integers(-16, 16, (o, nb, 32)).astype(np.float32)
    dw = r.uniform(1e-3, 1e-1, (o, nb)).astype(np.float16).astype(np.float32)
    got = ops.matmul_q0_llama_cpu(qa, da, qw, dw)
    # float64 of the very same terms: f32(d_w·d_a)·Σq·q per block
    dd = (da[:, None, :] * dw[None]).astype(np.float32).astype(np.float64)
    lanes = np.einsum(  # the 8 exact int32 lane sums per block (4 consecutive elements each)
        "tbjk,objk->tobj",
        qa.reshape(t, nb, 8, 4).astype(np.float64),
        qw.reshape(o, nb, 8, 4).astype(np.float64),
    )
    want = (dd[..., None] * lanes).sum((-1, -2))
    # each lane is rounded once per block (fma) and once per hsum level: error <= (nb + 3)·eps·Σ|terms|
    bound = 2 * (nb + 3) * F32_EPS * (np.abs(dd[..., None] * lanes).sum((-1, -2)) + 1e-30)
    assert np.all(np.abs(got - want) <= bound)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_q=st.integers(1, 5),
    n_k=st.integers(1, 20),
    d=st.sampled_from([64, 256]),
)
def test_dot_f16_close_to_float64(seed, n_q, n_k, d):
    r = _rng(seed)
    q = r.standard_normal((n_q, 2, d)).astype(np.float16).astype(np.float64)
    k = r.standard_normal((n_k, 2, d)).astype(np.float16).astype(np.float64)
    got = ops.dot_f16_llama_cpu(q, k)
    want = np.einsum("qhd,khd->qhk", q, k)
    bound = (d // 64 + 6) * F32_EPS * np.einsum("qhd,khd->qhk", np.abs(q), np.abs(k))
    assert np.all(np.abs(got - want) <= bound)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_q=st.sampled_from([1, 3, 64, 70]),
    past=st.integers(0, 80),
    window=st.sampled_from([None, 16]),
)
def test_attention_llama_cpu_close_to_exact(seed, n_q, past, window):
    """Both paths (tiled for >= 64 rows, fp16-accumulator one_chunk below) compute the same attention as
    :func:`ops.attention` in float64, within f32 (tiled) or fp16 (one_chunk) rounding."""
    r = _rng(seed)
    n_k = past + n_q
    q = (r.standard_normal((n_q, 4, 64)) * 0.5).astype(np.float32)
    k = r.standard_normal((n_k, 2, 64)).astype(np.float16).astype(np.float32)
    v = r.standard_normal((n_k, 2, 64)).astype(np.float16).astype(np.float32)
    pos = np.arange(past, n_k)
    got = ops.attention_llama_cpu(q, k, v, pos, window=window)
    qq = q.astype(np.float16).astype(np.float64) if n_q < ops.FA_TILE_Q else q.astype(np.float64)
    want = ops.attention(qq, k.astype(np.float64), v.astype(np.float64), pos, window=window)
    tol = 1e-5 if n_q >= ops.FA_TILE_Q else 4e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(v).max())


def test_attention_tiled_matches_reference_loop_order_independent_of_split():
    """The tiled path's result for a row depends only on that row (Q tiles are independent): computing rows in two
    batches gives bit-identical output, as llama.cpp's tiling assumes."""
    r = _rng(0)
    q = r.standard_normal((130, 2, 64)).astype(np.float32)
    k = r.standard_normal((130, 1, 64)).astype(np.float16).astype(np.float32)
    v = r.standard_normal((130, 1, 64)).astype(np.float16).astype(np.float32)
    pos = np.arange(130)
    full = ops.attention_llama_cpu_tiled(q, k, v, pos)
    part = ops.attention_llama_cpu_tiled(q[66:], k, v, pos[66:])
    np.testing.assert_array_equal(full[66:], part)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gelu_fp16_table_is_rounded_gelu(seed):
    x = (_rng(seed).standard_normal(2000) * 4).astype(np.float32)
    got = ops.gelu_tanh_fp16_table(x)
    xh = x.astype(np.float16).astype(np.float64)
    want = 0.5 * xh * (1 + np.tanh(np.sqrt(2 / np.pi) * (xh + 0.044715 * xh**3)))
    inside = np.abs(x) < 10
    # one fp16 rounding of a float32 evaluation: within 1 fp16 ulp
    ulp16 = np.spacing(np.abs(want[inside]).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(got[inside] - want[inside]) <= ulp16 + 1e-7)
    np.testing.assert_array_equal(got[x >= 10], x[x >= 10])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), base=st.sampled_from([1e4, 1e6]))
def test_rope_llama_cpu_close_to_rope(seed, base):
    r = _rng(seed)
    x = r.standard_normal((7, 3, 128)).astype(np.float32)
    pos = r.integers(0, 4000, 7)
    got = ops.rope_neox_llama_cpu(x, pos, 128, base)
    want = ops.rope_neox(x, pos, 128, base)  # same float32 thetas, float32 math
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * F32_EPS * np.abs(x).max())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([64, 640, 1024]))
def test_rmsnorm_llama_cpu_close_to_float64(seed, n):
    r = _rng(seed)
    x = (r.standard_normal((5, n)) * r.uniform(0.01, 100)).astype(np.float32)
    w = r.uniform(0.5, 1.5, n).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(ops.rmsnorm_llama_cpu(x, w, 1e-6), want, rtol=4 * F32_EPS)


def test_q8_K_blocks_match_activation_quantizer():
    x = _rng(1).standard_normal((3, 512)).astype(np.float32)
    q, d = ops.quantize_q8_K_blocks(x)
    assert np.all(np.abs(q) <= 127) and np.array_equal(q, np.rint(q))
    np.testing.assert_array_equal(
        (q * d[..., None]).astype(np.float32).reshape(3, 512), ops.quantize_activation_q8_K(x)
    )


@pytest.fixture(scope="module")
def gguf(gemma3_path):
    from sparkinfer_cute.gguf.reader import GGUFFile

    return GGUFFile(gemma3_path)


def _first_of_type(g, type_name):
    for name, t in g.tensors.items():
        if t.ggml_type.name == type_name and len(t.shape) == 2:
            return name, t
    pytest.skip(f"no {type_name} matrix in the file")


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_k_quant_decoders_and_matmuls_on_real_weights(gguf, type_name):
    """The integer decoders reproduce the GGUF dequantizer exactly, and the emulated matmuls equal the float64
    product of the dequantized weights and the Q8_K-rounded activations up to f32 accumulation."""
    name, t = _first_of_type(gguf, type_name)
    n_in, n_out = (int(v) for v in t.shape[:2])
    raw = np.asarray(gguf.raw(name))
    w = np.asarray(gguf.dequant(name), np.float64)
    x = _rng(2).standard_normal((9, n_in)).astype(np.float32)
    qa, da = ops.quantize_q8_K_blocks(x)
    xa = (qa * da[..., None]).reshape(9, n_in)
    want = xa @ w.T
    scale = np.abs(xa) @ np.abs(w).T
    if type_name == "Q4_K":
        q, sc, mn, d, dmin = ops.q4_K_blocks(raw, n_out, n_in)
        deq = (d[..., None] * sc * q - dmin[..., None] * mn).astype(np.float32)
        np.testing.assert_allclose(deq.reshape(n_out, n_in), w, rtol=2 * F32_EPS, atol=1e-30)
        outs = [ops.matmul_q4_K_llama_cpu(qa, da, q, sc, mn, d, dmin, gemv=g) for g in (False, True)]
    else:
        q, sc, d = ops.q6_K_blocks(raw, n_out, n_in)
        deq = (d[..., None] * sc * (q - 32)).astype(np.float32)
        np.testing.assert_allclose(deq.reshape(n_out, n_in), w, rtol=2 * F32_EPS, atol=1e-30)
        outs = [ops.matmul_q6_K_llama_cpu(qa, da, q, sc, d, vec_dot=v) for v in (False, True)]
    for got in outs:
        assert np.all(np.abs(got - want) <= 64 * F32_EPS * scale + 1e-30)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5), n64=st.integers(1, 6), o=st.integers(1, 17))
def test_matmul_f32_llama_cpu_close_to_float64(seed, t, n64, o):
    """Both float orders (tinyBLAS for >= 2 rows, ggml_vec_dot_f32 for 1) compute x·wᵀ to within their f32
    summation error; the two orders are genuinely different (not the same code path)."""
    r = _rng(seed)
    n_in = 64 * n64
    x = r.standard_normal((t, n_in)).astype(np.float32)
    w = r.standard_normal((o, n_in)).astype(np.float32)
    got = ops.matmul_f32_llama_cpu(x, w)
    assert got.dtype == np.float32 and got.shape == (t, o)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    # longest chain: n_in/16 fmas per lane + 4 reduction levels
    bound = (n_in // 16 + 6) * F32_EPS * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)
    assert np.all(np.abs(got - want) <= bound)
    one = np.stack([ops.matmul_f32_llama_cpu(x[i : i + 1], w)[0] for i in range(t)])
    assert np.all(np.abs(one - want) <= bound)


def test_matmul_f32_llama_cpu_orders_differ():
    r = _rng(None)
    x = r.standard_normal((2, 1024)).astype(np.float32)
    w = r.standard_normal((64, 1024)).astype(np.float32)
    batched = ops.matmul_f32_llama_cpu(x, w)
    single = np.concatenate([ops.matmul_f32_llama_cpu(x[i : i + 1], w) for i in range(2)])
    assert not np.array_equal(batched, single)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40))
def test_softmax_llama_cpu_close_to_exact(seed, n):
    x = (_rng(seed).standard_normal((7, n)) * 4).astype(np.float32)
    got = ops.softmax_llama_cpu(x)
    x64 = x.astype(np.float64)
    want = np.exp(x64 - x64.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert got.dtype == np.float32
    # x - max is rounded to f32 first: exp's relative error grows with |x - max| (measured 9.7e-7 at 0.2 eps·|x-max|)
    tol = (8 + np.abs(x64 - x64.max(-1, keepdims=True))) * F32_EPS * want
    assert np.all(np.abs(got - want) <= tol)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 70))
def test_swiglu_llama_cpu_close_to_exact(seed, n):
    r = _rng(seed)
    g = (r.standard_normal((5, n)) * 5).astype(np.float32)
    u = r.standard_normal((5, n)).astype(np.float32)
    got = ops.swiglu_llama_cpu(g, u)
    g64 = g.astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * u
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=8 * F32_EPS, atol=1e-30)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 3), nb=st.integers(1, 3), o=st.integers(1, 9))
def test_q6_K_vec_dot_lanes_match_a_plain_loop(seed, t, nb, o):
    """The vectorized ggml_vec_dot_q6_K_q8_K emulation (lane sums as masked BLAS products) equals, bit for bit, a
    loop written straight from the lane assignment: lane j of block b sums sc·q6·q8 over 4 consecutive bytes of
    each 32-element chunk (e % 32 // 4 == j) minus 32·sc·q8 over elements 32j..32j+31, then the f32 fma chain."""
    rng = _rng(seed)
    n_in = 256 * nb
    raw = rng.integers(0, 256, size=(o, nb * 210), dtype=np.uint8)
    r = raw.reshape(o, nb, 210)
    r[..., 208:210] = np.frombuffer(np.float16(rng.uniform(-0.02, 0.02, (o, nb))).tobytes(), np.uint8).reshape(o, nb, 2)
    q, sc, d = ops.q6_K_blocks(raw, o, n_in)
    qa, da = ops.quantize_q8_K_blocks(rng.standard_normal((t, n_in)).astype(np.float32))
    got = ops.matmul_q6_K_llama_cpu(qa, da, q, sc, d, vec_dot=True)
    e = np.arange(256)
    want = np.zeros((t, o), np.float32)
    for i in range(t):
        for k in range(o):
            acc = np.zeros(8, np.float32)
            for b in range(nb):
                lanes = np.array([sum(int(sc[k, b, x]) * int(q[k, b, x]) * int(qa[i, b, x]) for x in e[(e % 32) // 4 == j])
                                  - 32 * sum(int(sc[k, b, x]) * int(qa[i, b, x]) for x in range(32 * j, 32 * j + 32))
                                  for j in range(8)], np.float64)
                dd = np.float32(np.float32(da[i, b]) * np.float32(d[k, b]))
                acc = (np.float64(dd) * lanes.astype(np.float32).astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
            want[i, k] = ops._hsum8_f32(acc[None])[0]
    np.testing.assert_array_equal(got, want)
