"""Flash-decoding attention over the paged fp16 KV cache.

CPU tests: the float64 reference against an independent masked-matrix formulation, the split/LSE-combine algorithm
(as the kernel partitions the keys) against the reference, the split ranges, and compiling every registered config.

GPU tests (``@pytest.mark.gpu``): hypothesis over context length (1..3000, crossing page and split boundaries),
heads/GQA, head_dim, page size, split count, window and softcap. The pool pages are a random permutation and every
pool slot that the query must NOT see (future slots, keys before the window, spare pages) holds NaN, so any read
outside the visible range poisons the output. Outputs and the split workspace are poisoned with 0xFF (NaN) before
launch, so an element the kernel fails to write shows up as NaN.

Tolerance: K/V are the exact fp16 values the reference uses; the kernel's products and sums are f32 (24-bit
mantissa) and its only approximate functions are ex2.approx / lg2.approx (rel. error ~2^-22). A dot product of
D <= 512 terms and a softmax sum over <= 3000 keys in f32 keep the relative error around 1e-6 (worst case
(D + n) * 2^-24 ~ 2e-4), so ``max|out - ref| / max|ref| <= 1e-3`` is safe. A skipped or doubled key is a ~1/chunk
effect, which the per-split comparison (chunks of <= a few hundred keys) and the q = 0 counting test catch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels import arch
from sparkinfer_cute.kernels.attention_decode import (
    MODEL_CONFIGS,
    PROLOGUE_CONFIGS,
    AttentionDecodeSplitKV,
    attention_decode,
    fused_counter_count,
    split_kv_ranges,
)
from sparkinfer_cute.reference.kernel_refs import ATTENTION_REL_TOL, attention_decode_ref, check_attention_counts
from sparkinfer_cute.kernels.paged_kv import gather_dense, scatter_dense

REL_TOL = ATTENTION_REL_TOL
assert REL_TOL == 1e-3


def rel_err(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---------------------------------------------------------------------------------------------- numpy models
def masked_matrix_attention(q, k, v, pos, scale, window, softcap):
    """Independent float64 formulation: scores against *all* cached rows, an explicit visibility mask from the
    models.md rule, softmax with -inf. (``attention_decode_ref`` slices the visible range instead.)"""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    H = q.shape[0]
    n_ctx, KV, _ = k.shape
    rep = H // KV
    p = np.arange(n_ctx)
    visible = (p <= pos) & ((window == 0) | (pos - p < window))
    k_h = np.repeat(np.nan_to_num(k), rep, axis=1)  # [n_ctx, H, D]; q head h -> kv head h // rep
    v_h = np.repeat(np.nan_to_num(v), rep, axis=1)
    s = scale * np.einsum("hd,thd->ht", q, k_h)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = np.where(visible[None, :], s, -np.inf)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("ht,thd->hd", w, v_h)


def split_kv_emulation(q, k, v, pos, scale, window, softcap, num_splits):
    """float64 model of the kernel's algorithm: per-split normalized partial O and natural-log LSE over the ranges of
    :func:`split_kv_ranges` (O = 0, LSE = -inf for an empty split), then the LSE-weighted combine."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    H, D = q.shape
    rep = H // k.shape[1]
    o_part = np.zeros((H, num_splits, D))
    lse_part = np.full((H, num_splits), -np.inf)
    for s, (b, e) in enumerate(split_kv_ranges(pos, window, num_splits)):
        if b >= e:
            continue
        for h in range(H):
            sc = scale * (k[b:e, h // rep] @ q[h])
            if softcap:
                sc = softcap * np.tanh(sc / softcap)
            m = sc.max()
            w = np.exp(sc - m)
            o_part[h, s] = (w @ v[b:e, h // rep]) / w.sum()
            lse_part[h, s] = m + np.log(w.sum())
    m = lse_part.max(axis=1, keepdims=True)
    w = np.exp(lse_part - m)
    out = np.einsum("hs,hsd->hd", w, o_part) / w.sum(axis=1)[:, None]
    return o_part, lse_part, out


def make_paged_case(rng, n_kv_head, head_dim, page_size, positions, window, spare_pages=3):
    """Random fp16 K/V for each sequence scattered into pools through a shuffled page table; every slot the query at
    ``positions[b]`` must not see is NaN. Returns (k_pool, v_pool, page_table, dense k list, dense v list)."""
    B = len(positions)
    pages_per_seq = max(p for p in positions) // page_size + 1
    n_pages = B * pages_per_seq + spare_pages
    table = rng.permutation(n_pages)[: B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    shape = (n_pages, page_size, n_kv_head, head_dim)
    k_pool = np.full(shape, np.nan, np.float16)
    v_pool = np.full(shape, np.nan, np.float16)
    ks, vs = [], []
    for b, pos in enumerate(positions):
        n = pos + 1
        k = rng.standard_normal((n, n_kv_head, head_dim)).astype(np.float16)
        v = rng.standard_normal((n, n_kv_head, head_dim)).astype(np.float16)
        lo = 0 if window == 0 else max(0, pos - window + 1)
        k[:lo] = np.nan
        v[:lo] = np.nan
        scatter_dense(k, k_pool, table[b])
        scatter_dense(v, v_pool, table[b])
        ks.append(k)
        vs.append(v)
    return k_pool, v_pool, table, ks, vs


# ---------------------------------------------------------------------------------------------- CPU tests
@settings(max_examples=60, deadline=None)
@given(n_ctx=st.integers(1, 300), heads=st.sampled_from([(4, 1), (8, 2), (6, 3), (4, 4)]),
       window=st.sampled_from([0, 1, 2, 17, 64]), softcap=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 2**31))
def test_reference_matches_masked_matrix(n_ctx, heads, window, softcap, seed):
    rng = np.random.default_rng(seed)
    H, KV = heads
    D = 16
    extra = int(rng.integers(0, 5))  # rows after pos (future tokens) must be ignored
    q = rng.standard_normal((H, D))
    k = rng.standard_normal((n_ctx + extra, KV, D)).astype(np.float16)
    v = rng.standard_normal((n_ctx + extra, KV, D)).astype(np.float16)
    pos = n_ctx - 1
    ref = attention_decode_ref(q, k, v, pos, 0.3, window, softcap)
    alt = masked_matrix_attention(q, k, v, pos, 0.3, window, softcap)
    np.testing.assert_allclose(ref, alt, rtol=1e-12, atol=1e-12)


def test_reference_window_and_gqa_semantics():
    """Hand-checkable cases: window 1 sees only the current key; GQA head h reads kv head h // rep."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((10, 2, 8))
    v = rng.standard_normal((10, 2, 8))
    q = rng.standard_normal((4, 8))
    out = attention_decode_ref(q, k, v, 6, 1.0, window=1)
    np.testing.assert_allclose(out[:2], np.broadcast_to(v[6, 0], (2, 8)))
    np.testing.assert_allclose(out[2:], np.broadcast_to(v[6, 1], (2, 8)))
    # window 3 at pos 6 sees keys 4, 5, 6 only: changing key 3 or key 7 must not matter
    base = attention_decode_ref(q, k, v, 6, 1.0, window=3)
    k2 = k.copy()
    k2[3] += 5.0
    k2[7] += 5.0
    np.testing.assert_allclose(attention_decode_ref(q, k2, v, 6, 1.0, window=3), base)
    assert not np.allclose(attention_decode_ref(q, k2, v, 6, 1.0, window=4), base)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 5000), window=st.sampled_from([0, 1, 7, 512, 1024]), splits=st.integers(1, 128))
def test_split_ranges_partition_the_visible_keys(pos, window, splits):
    ranges = split_kv_ranges(pos, window, splits)
    assert len(ranges) == splits
    lo = 0 if window == 0 else max(0, pos - window + 1)
    covered = [t for b, e in ranges for t in range(b, e)]
    assert covered == list(range(lo, pos + 1))  # disjoint, in order, exactly the visible keys
    sizes = [max(0, e - b) for b, e in ranges]
    n_live = [s > 0 for s in sizes].count(True)
    assert all(sizes[:n_live]) and not any(sizes[n_live:])  # empty splits only at the end
    chunk = -(-(pos + 1 - lo) // splits)
    assert sizes[: n_live - 1] == [chunk] * (n_live - 1) and 0 < sizes[n_live - 1] <= chunk  # balanced


@settings(max_examples=40, deadline=None)
@given(n_ctx=st.integers(1, 400), splits=st.sampled_from([1, 3, 16, 64]), window=st.sampled_from([0, 5, 100]),
       softcap=st.sampled_from([0.0, 4.0]), seed=st.integers(0, 2**31))
def test_split_combine_algorithm_matches_reference(n_ctx, splits, window, softcap, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((8, 32)) * 2
    k = rng.standard_normal((n_ctx, 2, 32)).astype(np.float16)
    v = rng.standard_normal((n_ctx, 2, 32)).astype(np.float16)
    _, lse, out = split_kv_emulation(q, k, v, n_ctx - 1, 0.25, window, softcap, splits)
    ref = attention_decode_ref(q, k, v, n_ctx - 1, 0.25, window, softcap)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert np.isfinite(lse).any(axis=1).all()


def test_paged_gather_scatter_roundtrip():
    rng = np.random.default_rng(1)
    pool = np.zeros((7, 4, 2, 8), np.float16)
    table = rng.permutation(7)[:5]
    dense = rng.standard_normal((18, 2, 8)).astype(np.float16)
    scatter_dense(dense, pool, table)
    np.testing.assert_array_equal(gather_dense(pool, table, 18), dense)
    # token 9 is slot 1 of logical page 2
    np.testing.assert_array_equal(pool[table[2], 1], dense[9])


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_configs_fit_smem_budget(name):
    c = MODEL_CONFIGS[name]
    k = AttentionDecodeSplitKV(c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"], c["num_splits"], True)
    assert k.smem_bytes(k.num_warps) <= arch.SMEM_CAPACITY["sm120"]
    assert k.lanes_per_tok * k.vec == c["head_dim"] and k.vec * 2 % 16 == 0  # 16-byte K/V loads per lane


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_fused_combine_config(name):
    c = MODEL_CONFIGS[name]
    k = AttentionDecodeSplitKV(c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"], c["num_splits"], False,
                               fused_combine=True)
    assert k.smem_bytes(k.num_warps) <= arch.SMEM_CAPACITY["sm120"]
    # one counter per CTA column of the grid (kv head x head tile), per sequence
    assert k.n_counters_per_seq == c["n_kv_head"] * k.n_head_tiles
    assert fused_counter_count(c["n_head"], c["n_kv_head"], c["head_dim"], batch=3) == 3 * k.n_counters_per_seq
    assert k.n_head_tiles * k.heads_per_cta * c["n_kv_head"] == c["n_head"]
    assert fused_counter_count(c["n_head"], c["n_kv_head"], c["head_dim"]) <= c["n_head"]  # documented bound


# ---------------------------------------------------------------------------------------------- GPU tests
def _poisoned_q8(rows: int, n: int):
    """A q8_1 buffer (q8_1.py Q8Act) whose every byte is poison (qs 0x7F, d/sum NaN): an unwritten block shows."""
    from sparkinfer_cute.kernels.q8_1 import Q8Act

    xq = Q8Act(rows, n)
    xq.qs.fill_bytes(0x7F)
    xq.d.fill_bytes(0xFF)
    xq.s.fill_bytes(0xFF)
    return xq


HEADS = [(8, 2), (32, 4), (4, 1), (16, 8), (16, 2), (2, 2)]


def _run_gpu(rng, H, KV, D, P, S, positions, window, softcap, scale):
    from sparkinfer_cute.runtime import DeviceArray

    B = len(positions)
    k_pool, v_pool, table, ks, vs = make_paged_case(rng, KV, D, P, positions, window)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    out = DeviceArray.empty((B, H, D), np.float32).fill_bytes(0xFF)
    o_part = DeviceArray.empty((B, H, S, D), np.float32).fill_bytes(0xFF)
    lse_part = DeviceArray.empty((B, H, S), np.float32).fill_bytes(0xFF)
    attention_decode(q, DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool),
                     DeviceArray.from_numpy(table), DeviceArray.from_numpy(np.array(positions, np.int32)),
                     scale=scale, window=window, softcap=softcap, num_splits=S, out=out, o_partial=o_part,
                     lse_partial=lse_part)
    return q, ks, vs, out.to_numpy(), o_part.to_numpy(), lse_part.to_numpy()


@pytest.mark.gpu
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_attention_decode_gpu_matches_reference(data):
    H, KV = data.draw(st.sampled_from(HEADS), label="heads")
    D = data.draw(st.sampled_from([64, 128, 256, 512]), label="head_dim")
    P = data.draw(st.sampled_from([16, 64, 128]), label="page_size")
    S = data.draw(st.sampled_from([1, 5, 16, 64]), label="num_splits")
    n_ctx = data.draw(st.integers(1, 3000), label="n_ctx")
    window = data.draw(st.sampled_from([0, 0, 1, 100, 512, 1024]), label="window")
    softcap = data.draw(st.sampled_from([0.0, 0.0, 5.0, 30.0]), label="softcap")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    scale = 2.0 / math.sqrt(D)  # sharper than 1/sqrt(D) so the softmax is far from uniform
    pos = n_ctx - 1
    q, ks, vs, out, o_part, lse_part = _run_gpu(rng, H, KV, D, P, S, [pos], window, softcap, scale)
    assert not np.isnan(out).any(), "unwritten or poisoned output element"
    assert not np.isnan(o_part).any() and not np.isnan(lse_part).any(), "unwritten split workspace element"
    ref = attention_decode_ref(q[0], ks[0], vs[0], pos, scale, window, softcap)
    assert rel_err(out[0], ref) <= REL_TOL
    e_o, e_lse, _ = split_kv_emulation(q[0], ks[0], vs[0], pos, scale, window, softcap, S)
    live = np.isfinite(e_lse)
    np.testing.assert_array_equal(np.isfinite(lse_part[0]), live)  # empty splits -> -inf, others finite
    np.testing.assert_allclose(lse_part[0][live], e_lse[live], rtol=0, atol=1e-3)
    assert np.all(o_part[0][~live] == 0)
    assert rel_err(o_part[0][live], e_o[live]) <= REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256, 512])
def test_attention_decode_gpu_counts_every_key_once(D):
    """q = 0: every visible key gets weight 1, so each split's LSE is log(#keys in its range) and its O is the mean
    of its V rows: a skipped, doubled or misplaced key changes the count (kernel_refs.check_attention_counts; the
    random-q test's 1e-3 relative tolerance cannot see one key of small weight among thousands)."""
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(D)
    H, KV, P, S = 8, 2, 16, 7
    for pos, window in [(0, 0), (15, 0), (16, 0), (1000, 0), (1000, 100), (2047, 512), (5, 100)]:
        k_pool, v_pool, table, _, vs = make_paged_case(rng, KV, D, P, [pos], window)
        q = np.zeros((1, H, D), np.float32)
        o_part = DeviceArray.empty((1, H, S, D), np.float32).fill_bytes(0xFF)
        lse_part = DeviceArray.empty((1, H, S), np.float32).fill_bytes(0xFF)
        out = DeviceArray.empty((1, H, D), np.float32).fill_bytes(0xFF)
        attention_decode(q, DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool), table,
                         np.array([pos], np.int32), scale=1.0, window=window, num_splits=S,
                         o_partial=o_part, lse_partial=lse_part, out=out)
        # f32 sums of ~chunk values of |v| ~ 1 against a mean of size ~1/sqrt(n): ~1e-5 relative at worst; a missed
        # key moves the mean by ~|v|/n, i.e. >= 1e-2 relative here.
        check_attention_counts(lse_part.to_numpy()[0], out.to_numpy()[0], vs[0], pos, window,
                               split_kv_ranges(pos, window, S), H)


@pytest.mark.gpu
def test_attention_decode_gpu_batch_positions_differ():
    rng = np.random.default_rng(7)
    H, KV, D, P, S = 16, 2, 256, 64, 16
    positions = [0, 700, 63, 2999]
    q, ks, vs, out, _, _ = _run_gpu(rng, H, KV, D, P, S, positions, 0, 0.0, 1 / 16)
    for b, pos in enumerate(positions):
        assert rel_err(out[b], attention_decode_ref(q[b], ks[b], vs[b], pos, 1 / 16)) <= REL_TOL


@pytest.mark.gpu
def test_append_then_attend_in_cuda_graph():
    """Capture kv_cache_append + attention once, replay for successive positions with ``pos`` updated in device
    memory: the graph must follow the device-side position (the model's decode loop)."""
    from sparkinfer_cute.kernels.kv_cache_append import kv_cache_append
    from sparkinfer_cute.kernels.paged_kv import PagedKVCache
    from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Stream, Workspace

    rng = np.random.default_rng(3)
    H, KV, D, P, S, window = 4, 1, 256, 16, 8, 20
    cache = PagedKVCache(1, KV, D, page_size=P, max_context=64)
    stream = Stream()
    q_dev = DeviceArray.empty((1, H, D), np.float32)
    k_dev = DeviceArray.empty((1, KV, D), np.float32)
    v_dev = DeviceArray.empty((1, KV, D), np.float32)
    out = DeviceArray.empty((1, H, D), np.float32)
    ws = Workspace()
    # warm up (compile) outside the capture
    kv_cache_append(k_dev, v_dev, cache.k[0], cache.v[0], cache.page_table, cache.pos, stream=stream)
    attention_decode(q_dev, cache.k[0], cache.v[0], cache.page_table, cache.pos, scale=0.1, window=window,
                     num_splits=S, out=out, workspace=ws, stream=stream)
    with CudaGraph.capture(stream) as g:
        kv_cache_append(k_dev, v_dev, cache.k[0], cache.v[0], cache.page_table, cache.pos, stream=stream)
        attention_decode(q_dev, cache.k[0], cache.v[0], cache.page_table, cache.pos, scale=0.1, window=window,
                         num_splits=S, out=out, workspace=ws, stream=stream)
    k_hist = np.zeros((50, KV, D), np.float16)
    v_hist = np.zeros((50, KV, D), np.float16)
    for pos in range(50):
        q = rng.standard_normal((1, H, D)).astype(np.float32)
        k = rng.standard_normal((1, KV, D)).astype(np.float32) * 2
        v = rng.standard_normal((1, KV, D)).astype(np.float32)
        k_hist[pos], v_hist[pos] = k[0].astype(np.float16), v[0].astype(np.float16)
        for dev, arr in ((q_dev, q), (k_dev, k), (v_dev, v)):
            dev.copy_from_numpy(arr, stream)
        cache.set_pos(pos, stream)
        out.fill_bytes(0xFF, stream)
        g.replay(stream)
        got = out.to_numpy(stream)[0]
        ref = attention_decode_ref(q[0], k_hist[: pos + 1], v_hist[: pos + 1], pos, 0.1, window)
        assert rel_err(got, ref) <= REL_TOL, pos


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 4])
def test_prefill_as_batch_of_queries(S):
    """Prefill recipe of paged_kv's docstring: T tokens appended with one launch (B = T, pos = p0 + i, page-table
    rows repeated), then one attention launch: query i sees keys 0..p0+i (causal, window)."""
    from sparkinfer_cute.kernels.kv_cache_append import kv_cache_append
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(S)
    H, KV, D, P, window = 8, 2, 128, 16, 50
    p0, T = 90, 37
    n = p0 + T
    pages = -(-n // P)
    table_row = rng.permutation(pages + 2)[:pages].astype(np.int32)
    k_hist = rng.standard_normal((n, KV, D)).astype(np.float32)
    v_hist = rng.standard_normal((n, KV, D)).astype(np.float32)
    k_pool = np.zeros((pages + 2, P, KV, D), np.float16)
    v_pool = np.zeros_like(k_pool)
    scatter_dense(k_hist[:p0].astype(np.float16), k_pool, table_row)  # the cache before this prompt chunk
    scatter_dense(v_hist[:p0].astype(np.float16), v_pool, table_row)
    dk, dv = DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool)
    table = DeviceArray.from_numpy(np.repeat(table_row[None], T, axis=0))
    pos = DeviceArray.from_numpy((p0 + np.arange(T)).astype(np.int32))
    kv_cache_append(k_hist[p0:], v_hist[p0:], dk, dv, table, pos)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    out = DeviceArray.empty((T, H, D), np.float32).fill_bytes(0xFF)
    attention_decode(q, dk, dv, table, pos, scale=0.2, window=window, num_splits=S, out=out)
    got = out.to_numpy()
    k16, v16 = k_hist.astype(np.float16), v_hist.astype(np.float16)
    for i in range(T):
        ref = attention_decode_ref(q[i], k16, v16, p0 + i, 0.2, window)
        assert rel_err(got[i], ref) <= REL_TOL, i


# ---------------------------------------------------------------------------------------------- fused combine (GPU)
def _both_paths(rng, H, KV, D, P, S, positions, window, softcap, scale):
    """The same case through the two-kernel path and the fused-combine kernel, every output poisoned first."""
    from sparkinfer_cute.runtime import DeviceArray

    B = len(positions)
    k_pool, v_pool, table, ks, vs = make_paged_case(rng, KV, D, P, positions, window)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    dk, dv = DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool)
    dtable, dpos = DeviceArray.from_numpy(table), DeviceArray.from_numpy(np.array(positions, np.int32))
    dq = DeviceArray.from_numpy(q)
    res = {}
    for fused in (False, True):
        out = DeviceArray.empty((B, H, D), np.float32).fill_bytes(0xFF)
        o_part = DeviceArray.empty((B, H, S, D), np.float32).fill_bytes(0xFF)
        lse_part = DeviceArray.empty((B, H, S), np.float32).fill_bytes(0xFF)
        counters = DeviceArray.zeros((fused_counter_count(H, KV, D, B),), np.int32)
        attention_decode(dq, dk, dv, dtable, dpos, scale=scale, window=window, softcap=softcap, num_splits=S,
                         out=out, o_partial=o_part, lse_partial=lse_part, fused_combine=fused,
                         counters=counters if fused else None)
        res[fused] = (out.to_numpy(), o_part.to_numpy(), lse_part.to_numpy(), counters.to_numpy())
    return q, ks, vs, res


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fused_combine_bit_identical_to_two_kernels(data):
    H, KV = data.draw(st.sampled_from(HEADS), label="heads")
    D = data.draw(st.sampled_from([64, 128, 256, 512]), label="head_dim")
    P = data.draw(st.sampled_from([16, 64]), label="page_size")
    S = data.draw(st.sampled_from([1, 3, 16, 32, 64]), label="num_splits")
    positions = data.draw(st.lists(st.integers(0, 2000), min_size=1, max_size=3), label="positions")
    window = data.draw(st.sampled_from([0, 0, 1, 100, 512]), label="window")
    softcap = data.draw(st.sampled_from([0.0, 0.0, 20.0]), label="softcap")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    scale = 2.0 / math.sqrt(D)
    q, ks, vs, res = _both_paths(rng, H, KV, D, P, S, positions, window, softcap, scale)
    out2, o2, lse2, _ = res[False]
    out1, o1, lse1, cnt = res[True]
    assert not np.isnan(out1).any(), "fused: unwritten or poisoned output element"
    assert (cnt == 0).all(), "fused: arrival counters not reset"
    # same split code -> same partials; same combine code and order -> the same output bits
    np.testing.assert_array_equal(o1.view(np.uint32), o2.view(np.uint32))
    np.testing.assert_array_equal(lse1.view(np.uint32), lse2.view(np.uint32))
    np.testing.assert_array_equal(out1.view(np.uint32), out2.view(np.uint32))
    for b, pos in enumerate(positions):
        assert rel_err(out1[b], attention_decode_ref(q[b], ks[b], vs[b], pos, scale, window, softcap)) <= REL_TOL


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_quantized_output_equals_quantize_kernel(data):
    """``out_q8``: the kernel that writes ``out`` (the fused combine CTA, or the combine kernel) also writes its q8_1
    copy. It must hold exactly the bits the standalone quantize kernel gives for that ``out`` (same rounding code,
    q8_1.py ``quantize_block_warp``), for every block of every row, with ``out`` itself unchanged by the option.
    The q8_1 buffers start poisoned (qs 0x7F, d/sum NaN) so an unwritten block shows."""
    from sparkinfer_cute.kernels.q8_1 import quantize_q8_1
    from sparkinfer_cute.runtime import DeviceArray

    H, KV = data.draw(st.sampled_from(HEADS), label="heads")
    D = data.draw(st.sampled_from([64, 128, 256, 512]), label="head_dim")
    S = data.draw(st.sampled_from([1, 3, 32]), label="num_splits")
    positions = data.draw(st.lists(st.integers(0, 1500), min_size=1, max_size=3), label="positions")
    fused = data.draw(st.booleans(), label="fused_combine")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    B = len(positions)
    k_pool, v_pool, table, _, _ = make_paged_case(rng, KV, D, 64, positions, 0)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    args = [DeviceArray.from_numpy(a) for a in (q, k_pool, v_pool, table, np.array(positions, np.int32))]
    outs = {}
    for quantize in (False, True):
        out = DeviceArray.empty((B, H, D), np.float32).fill_bytes(0xFF)
        xq = _poisoned_q8(B, H * D)
        counters = DeviceArray.zeros((fused_counter_count(H, KV, D, B),), np.int32)
        attention_decode(*args, scale=1.0 / math.sqrt(D), num_splits=S, out=out, fused_combine=fused,
                         counters=counters if fused else None, out_q8=xq if quantize else None)
        outs[quantize] = (out.to_numpy(), xq.to_numpy())
    out_plain, out_q = outs[False][0], outs[True][0]
    np.testing.assert_array_equal(out_q.view(np.uint32), out_plain.view(np.uint32))
    qs, d, sm = outs[True][1]
    ref_qs, ref_d, ref_s = quantize_q8_1(out_plain.reshape(B, H * D))
    np.testing.assert_array_equal(qs, ref_qs.reshape(qs.shape))
    np.testing.assert_array_equal(d.view(np.uint32), ref_d.reshape(d.shape).view(np.uint32))
    np.testing.assert_array_equal(sm.view(np.uint32), ref_s.reshape(sm.shape).view(np.uint32))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3moe-30b-a3b", "tiny", "gemma3-270m"])
def test_fused_combine_graph_replay(name, rng):
    """Two attention 'layers' sharing one zeroed counter buffer, fused, captured once and replayed 20x with new q
    and a moving pos: each replay must equal (bitwise) the eager two-kernel path on the same inputs, so every launch
    left its counters at 0 for the next."""
    from sparkinfer_cute.runtime import CudaGraph, DeviceArray, Stream

    c = MODEL_CONFIGS[name]
    H, KV, D, P, S = c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"], c["num_splits"]
    n_ctx = 700
    stream = Stream()
    layers, layer_tables = [], []  # each layer: its own pools and its own shuffled page table
    for _ in range(2):
        k_pool, v_pool, table, ks, vs = make_paged_case(rng, KV, D, P, [n_ctx - 1], 0)
        layers.append((DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool), ks[0], vs[0]))
        layer_tables.append(DeviceArray.from_numpy(table))
    pos = DeviceArray.zeros((1,), np.int32, stream=stream)
    q = DeviceArray.empty((1, H, D), np.float32)
    outs = [DeviceArray.empty((1, H, D), np.float32) for _ in range(2)]
    o_part = DeviceArray.empty((1, H, S, D), np.float32)
    lse_part = DeviceArray.empty((1, H, S), np.float32)
    counters = DeviceArray.zeros((fused_counter_count(H, KV, D),), np.int32, stream=stream)

    def step(fused, out_bufs):
        for i in range(2):
            dk, dv, _, _ = layers[i]
            attention_decode(q, dk, dv, layer_tables[i], pos, scale=0.1, num_splits=S, out=out_bufs[i],
                             o_partial=o_part, lse_partial=lse_part, fused_combine=fused,
                             counters=counters if fused else None, stream=stream)

    q.copy_from_numpy(np.zeros((1, H, D), np.float32), stream)
    step(True, outs)  # compile outside the capture
    with CudaGraph.capture(stream) as g:
        step(True, outs)
    ref_outs = [DeviceArray.empty((1, H, D), np.float32) for _ in range(2)]
    for it in range(20):
        p = int(rng.integers(0, n_ctx)) if it else n_ctx - 1
        q_np = rng.standard_normal((1, H, D)).astype(np.float32)
        q.copy_from_numpy(q_np, stream)
        pos.copy_from_numpy(np.array([p], np.int32), stream)
        for o in outs:
            o.fill_bytes(0xFF, stream)
        g.replay(stream)
        got = [o.to_numpy(stream) for o in outs]
        step(False, ref_outs)  # eager two-kernel path, same inputs
        for i in range(2):
            want = ref_outs[i].to_numpy(stream)
            np.testing.assert_array_equal(got[i].view(np.uint32), want.view(np.uint32))
            ref = attention_decode_ref(q_np[0], layers[i][2], layers[i][3], p, 0.1)
            assert rel_err(got[i][0], ref) <= REL_TOL, (it, i, p)
        assert (counters.to_numpy(stream) == 0).all()


@pytest.mark.gpu
def test_fused_combine_workspace_counters(rng):
    """counters taken from a Workspace are zeroed when created there and stay zero across calls."""
    from sparkinfer_cute.runtime import DeviceArray, Workspace

    H, KV, D, P, S = 8, 2, 128, 16, 5
    ws = Workspace()
    for pos in (10, 300, 301):
        k_pool, v_pool, table, ks, vs = make_paged_case(rng, KV, D, P, [pos], 0)
        q = rng.standard_normal((1, H, D)).astype(np.float32)
        out = attention_decode(q, DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool), table,
                               np.array([pos], np.int32), scale=0.2, num_splits=S, workspace=ws, fused_combine=True)
        assert rel_err(out[0], attention_decode_ref(q[0], ks[0], vs[0], pos, 0.2)) <= REL_TOL
        cnt = ws.get((fused_counter_count(H, KV, D),), np.int32, tag="attention_decode.counters").to_numpy()
        assert (cnt == 0).all()


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_prologue_bit_identical_to_qk_kernel_then_attention(data):
    """``prologue=`` (the Q/K norm + RoPE + KV append inside the split kernel) against the standalone
    qk_norm_rope_kv.py kernel followed by the fused-combine attention on its output: the same output bits (and the
    same q8_1 copy), the same bits in every pool slot (the new row written, nothing else touched), the raw q left
    as it was, the counters back at zero. The new rows start as NaN in both pools, so a split that attends before
    the row is written, or a row never written, shows. Head tiles (32/4: two CTAs per kv head write the row), K = V,
    V-norm, partial rotary with frequency divisors, windows, softcap and batches are drawn."""
    from sparkinfer_cute.kernels.qk_norm_rope_kv import QKPrologue, qk_norm_rope_kv
    from sparkinfer_cute.runtime import DeviceArray

    H, KV = data.draw(st.sampled_from(HEADS), label="heads")
    D = data.draw(st.sampled_from([64, 128, 256, 512]), label="head_dim")
    P = data.draw(st.sampled_from([16, 64]), label="page_size")
    S = data.draw(st.sampled_from([1, 3, 16, 64]), label="num_splits")
    positions = data.draw(st.lists(st.integers(0, 1200), min_size=1, max_size=3), label="positions")
    window = data.draw(st.sampled_from([0, 0, 1, 100]), label="window")
    softcap = data.draw(st.sampled_from([0.0, 0.0, 20.0]), label="softcap")
    n_rot = data.draw(st.sampled_from([D, D, D // 4]), label="n_rot")
    qk_norm = data.draw(st.booleans(), label="qk_norm")
    use_ff = data.draw(st.booleans(), label="freq_factors")
    v_norm = data.draw(st.booleans(), label="v_norm")
    k_eq_v = data.draw(st.booleans(), label="k_eq_v")
    quantize = data.draw(st.booleans(), label="quantize_out")
    q_scale = data.draw(st.sampled_from([1.0, 1.0 / math.sqrt(D)]), label="q_scale")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    B = len(positions)
    k_pool, v_pool, table, _, _ = make_paged_case(rng, KV, D, P, positions, window)
    for b, pos in enumerate(positions):  # the new rows: written by the prologue
        k_pool[table[b, pos // P], pos % P] = np.nan
        v_pool[table[b, pos // P], pos % P] = np.nan
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    k = rng.standard_normal((B, KV, D)).astype(np.float32)
    v = k if k_eq_v else rng.standard_normal((B, KV, D)).astype(np.float32)
    qn = (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32) if qk_norm else None
    kn = (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32) if qk_norm else None
    ff = (1.0 + rng.random(n_rot // 2)).astype(np.float32) if use_ff else None
    scale, base, eps = 1.0 / math.sqrt(D), 1e6, 1e-6
    pos_d = DeviceArray.from_numpy(np.array(positions, np.int32))
    table_d = DeviceArray.from_numpy(table)
    res = {}
    for fused in (False, True):
        kp, vp = DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool)
        qd, kd = DeviceArray.from_numpy(q), DeviceArray.from_numpy(k)
        vd = kd if k_eq_v else DeviceArray.from_numpy(v)
        out = DeviceArray.empty((B, H, D), np.float32).fill_bytes(0xFF)
        xq = _poisoned_q8(B, H * D)
        counters = DeviceArray.zeros((fused_counter_count(H, KV, D, B),), np.int32)
        common = dict(scale=scale, window=window, softcap=softcap, num_splits=S, out=out, fused_combine=True,
                      counters=counters, out_q8=xq if quantize else None)
        if fused:
            pro = QKPrologue(kd, vd, qn, kn, n_rot=n_rot, base=base, eps=eps, q_scale=q_scale, freq_factors=ff,
                             v_norm=v_norm)
            attention_decode(qd, kp, vp, table_d, pos_d, prologue=pro, **common)
        else:
            qk_norm_rope_kv(qd, kd, vd, qn, kn, kp, vp, table_d, pos_d, n_rot=n_rot, base=base, eps=eps,
                            q_scale=q_scale, freq_factors=ff, v_norm=v_norm)
            attention_decode(qd, kp, vp, table_d, pos_d, **common)
        res[fused] = (out.to_numpy(), xq.to_numpy() if quantize else None, kp.to_numpy(), vp.to_numpy(),
                      qd.to_numpy(), counters.to_numpy())
    out0, q80, kp0, vp0, _, _ = res[False]
    out1, q81, kp1, vp1, q_after, cnt = res[True]
    assert not np.isnan(out1).any(), "unwritten output, or a split read the new row before it was written"
    np.testing.assert_array_equal(out1.view(np.uint32), out0.view(np.uint32))
    np.testing.assert_array_equal(kp1.view(np.uint16), kp0.view(np.uint16))
    np.testing.assert_array_equal(vp1.view(np.uint16), vp0.view(np.uint16))
    np.testing.assert_array_equal(q_after.view(np.uint32), q.view(np.uint32))  # the raw q is not written
    assert (cnt == 0).all(), "arrival counters not reset"
    if quantize:
        for a, b_ in zip(q81, q80):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b_).view(np.uint8))


@pytest.mark.parametrize("name", sorted(PROLOGUE_CONFIGS))
def test_prologue_configs_fit_and_are_supported(name):
    """Every layer type the models run with the prologue inside attention fits the SM120 smem budget with a CTA of
    at least the prologue's threads (so its bits are the standalone kernel's)."""
    from sparkinfer_cute.kernels.attention_decode import prologue_supported
    from sparkinfer_cute.kernels.qk_norm_rope_kv import HeadNormRope

    c = MODEL_CONFIGS[name]
    k = AttentionDecodeSplitKV(c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"], c["num_splits"], False,
                               fused_combine=True, quantize_out=True, **PROLOGUE_CONFIGS[name])
    assert k.smem_bytes(k.num_warps) <= arch.SMEM_CAPACITY["sm120"]
    assert k.num_threads >= HeadNormRope.threads(c["head_dim"])
    assert prologue_supported(c["n_head"], c["n_kv_head"], c["head_dim"], 256)
