"""Causal flash-attention prefill (tensor cores) over the paged fp16 KV cache.

CPU tests: the float64 prefill reference against the decode reference (query i of a chunk is a decode query at
position p0 + i), the kernel's tile plan (which key tiles each M tile visits, which it masks) against the
visibility rule, and a float64 numpy emulation of the kernel's algorithm (GQA-packed rows, the tile plan, zero-filled
keys outside the CTA range, base-2 online softmax, q and P rounded to f16) against the reference within the error
bound the GPU test uses (so the bound is known to admit the kernel's own roundings).

GPU tests (``@pytest.mark.gpu``; not yet run: the kernel has only been compiled): hypothesis over the chunk length
T (1..4096), the cached prefix p0, heads/GQA, head_dim 64/128/256/512, page size (16 puts several pages in one key
tile), window and softcap. Pool pages are a random permutation; every pool slot no query of the chunk may see (keys
before the first query's window, keys after the last query, spare pages) holds NaN, so a read outside the visible
range poisons the output; the output is poisoned with 0xFF (NaN) before the launch, so an unwritten element shows.

Tolerances: (1) random q/K/V: per element, :func:`attention_prefill_bound` (derived there: f16 P before PV, f32
mma accumulation and online softmax) against the float64 reference computed on the kernel's own inputs (q rounded
to f16, the stored fp16 K/V). (2) q = 0 with small-integer V: every visible key has weight exactly 1 and every sum is
exact in f32, so the output is the mean of the visible V rows to 2^-20 relative; a skipped, doubled or misplaced
key is a ~|v|/count change, orders of magnitude above that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.attention_prefill import (
    MODEL_CONFIGS,
    AttentionPrefill,
    HostInts,
    key_visible,
    logit_multipliers,
    row_query,
    softcapped_logit_base2,
    tile_config,
    tile_plan,
)
from sparkinfer_cute.kernels.paged_kv import scatter_dense
from sparkinfer_cute.reference.kernel_refs import (
    ATTENTION_REL_TOL,
    attention_decode_ref,
    attention_prefill_bound,
    attention_prefill_ref,
    check_attention_prefill,
    check_attention_prefill_counts,
    check_rel,
    f16_rounded,
)

LOG2_E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------- numpy model
def flash_prefill_emulation(q, k, v, p0, scale, window, softcap, round_f16: bool = True):
    """float64 model of the kernel: GQA-packed M tiles of BM rows (row m = token m // G, head kvh*G + m % G), key
    tiles from :func:`tile_plan` (keys outside the CTA's [k_lo, k_hi] zero-filled, the mask applied only where the
    plan says), logits in base 2, online softmax, q and P rounded to f16 (``round_f16``), l summed from the
    unrounded P."""
    rnd = f16_rounded if round_f16 else (lambda x: np.asarray(x, np.float64))
    q16 = rnd(q)
    k = np.nan_to_num(np.asarray(k, np.float64))
    v = np.nan_to_num(np.asarray(v, np.float64))
    T, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    cfg = tile_config(D)
    BM, BN = cfg["block_m"], cfg["block_n"]
    out = np.full((T, H, D), np.nan)
    for kvh in range(KV):
        for mt, (k_lo, k_hi, tiles) in enumerate(tile_plan(T, p0, G, BM, BN, window)):
            rows = np.arange(mt * BM, mt * BM + BM)
            tok, hq, qpos, qlo = (np.array(x) for x in zip(*(row_query(int(m), T, G, p0, window, HostInts)
                                                                for m in rows)))
            heads = kvh * G + hq
            qm = q16[tok, heads]  # [BM, D]
            m = np.full(BM, -np.inf)
            l = np.zeros(BM)
            o = np.zeros((BM, D))
            for j, needs_mask in tiles:
                keys = np.arange(j * BN, j * BN + BN)
                inside = (keys >= k_lo) & (keys <= k_hi)
                kt = np.where(inside[:, None], k[np.clip(keys, 0, len(k) - 1), kvh], 0.0)
                vt = np.where(inside[:, None], v[np.clip(keys, 0, len(v) - 1), kvh], 0.0)
                s = qm @ kt.T
                s_mul, cap2 = logit_multipliers(scale, softcap, bool(softcap))
                s = softcapped_logit_base2(s, s_mul, cap2, np.exp2, np.reciprocal) if softcap else s * s_mul
                if needs_mask:
                    vis = key_visible(keys[None, :], qlo[:, None], qpos[:, None])
                    s = np.where(vis, s, -np.inf)
                m_new = np.maximum(m, s.max(axis=1))
                m_use = np.where(m_new == -np.inf, 0.0, m_new)
                alpha = np.exp2(m - m_use)
                p = np.exp2(s - m_use[:, None])
                l = l * alpha + p.sum(axis=1)
                o = o * alpha[:, None] + rnd(p) @ vt
                m = m_new
            valid = rows // G < T
            out[tok[valid], heads[valid]] = o[valid] / l[valid, None]
    return out


def make_paged_prefill_case(rng, T, p0, n_kv_head, head_dim, page_size, window, spare_pages=3, int_v=False):
    """fp16 K/V of keys 0 .. p0+T-1 scattered through a shuffled page table (one sequence); every slot no query of
    the chunk may see is NaN. Returns (k_pool, v_pool, table_row, k_dense, v_dense)."""
    n_keys = p0 + T
    pages = -(-n_keys // page_size) + 1  # one page more than needed: its slots stay NaN
    n_pages = pages + spare_pages
    table = rng.permutation(n_pages)[:pages].astype(np.int32)
    shape = (n_pages, page_size, n_kv_head, head_dim)
    k_pool = np.full(shape, np.nan, np.float16)
    v_pool = np.full(shape, np.nan, np.float16)
    k = rng.standard_normal((n_keys, n_kv_head, head_dim)).astype(np.float16)
    if int_v:
        v = rng.integers(-8, 9, (n_keys, n_kv_head, head_dim)).astype(np.float16)
    else:
        v = rng.standard_normal((n_keys, n_kv_head, head_dim)).astype(np.float16)
    lo = 0 if window == 0 else max(0, p0 - window + 1)  # first key the first query sees
    k[:lo] = np.nan
    v[:lo] = np.nan
    scatter_dense(k, k_pool, table[: -(-n_keys // page_size)])
    scatter_dense(v, v_pool, table[: -(-n_keys // page_size)])
    return k_pool, v_pool, table, k, v


# ---------------------------------------------------------------------------------------------- CPU tests
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 70), p0=st.integers(0, 90), heads=st.sampled_from([(4, 1), (8, 2), (6, 3), (4, 4)]),
       window=st.sampled_from([0, 1, 2, 17, 64]), softcap=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 2**31))
def test_prefill_reference_matches_decode_reference(T, p0, heads, window, softcap, seed):
    rng = np.random.default_rng(seed)
    H, KV = heads
    D = 16
    extra = int(rng.integers(0, 5))  # rows after the chunk (future tokens) must be ignored
    q = rng.standard_normal((T, H, D))
    k = rng.standard_normal((p0 + T + extra, KV, D)).astype(np.float16)
    v = rng.standard_normal((p0 + T + extra, KV, D)).astype(np.float16)
    k[p0 + T:] = np.nan
    v[p0 + T:] = np.nan
    ref = attention_prefill_ref(q, k, v, p0, 0.3, window, softcap)
    for i in range(T):
        dec = attention_decode_ref(q[i], np.nan_to_num(k), np.nan_to_num(v), p0 + i, 0.3, window, softcap)
        np.testing.assert_allclose(ref[i], dec, rtol=1e-12, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(T=st.integers(1, 400), p0=st.integers(0, 500), G=st.sampled_from([1, 2, 3, 4, 8]),
       D=st.sampled_from([64, 128, 256, 512]), window=st.sampled_from([0, 1, 2, 7, 64, 100, 512]))
def test_tile_plan_covers_exactly_the_visible_keys(T, p0, G, D, window):
    """Per M tile: (1) every key a valid row sees is in a visited tile and in [k_lo, k_hi]; (2) every key in
    [k_lo, k_hi] is seen by some row of the tile (so the keys the kernel loads are keys the chunk's queries see:
    never an unwritten slot); (3) a tile visited without the mask holds only keys every row of the tile sees;
    (4) the first and last visited tiles hold a key some row sees (no fully masked tile is visited)."""
    cfg = tile_config(D)
    BM, BN = cfg["block_m"], cfg["block_n"]
    plan = tile_plan(T, p0, G, BM, BN, window)
    assert len(plan) == -(-T * G // BM)
    keys = np.arange(p0 + T + BN)
    for mt, (k_lo, k_hi, tiles) in enumerate(plan):
        toks = np.unique(np.minimum(np.arange(mt * BM, mt * BM + BM) // G, T - 1))
        qp = (p0 + toks)[:, None]
        vis = (keys[None, :] <= qp) & ((window == 0) | (qp - keys[None, :] < window))  # [rows, keys]
        visited = [j for j, _ in tiles]
        assert visited == list(range(visited[0], visited[-1] + 1))  # consecutive, ascending
        seen = vis.any(axis=0)
        in_range = (keys >= k_lo) & (keys <= k_hi)
        assert np.array_equal(seen, in_range)  # (1) and (2)
        assert np.all(np.isin(keys[seen] // BN, visited))
        for j, needs_mask in tiles:
            if not needs_mask:
                assert vis[:, j * BN:(j + 1) * BN].all()  # (3)
        for j in (visited[0], visited[-1]):
            assert vis[:, j * BN:(j + 1) * BN].any()  # (4)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 150), p0=st.one_of(st.integers(0, 200), st.sampled_from([14, 30, 31, 62, 63, 64, 126])),
       heads=st.sampled_from([(4, 1), (8, 2), (2, 2), (16, 2)]),
       D=st.sampled_from([64, 128, 256, 512]), window=st.sampled_from([0, 1, 5, 40, 100]),
       softcap=st.sampled_from([0.0, 0.0, 5.0]), seed=st.integers(0, 2**31))
def test_kernel_emulation_within_the_gpu_bound(T, p0, heads, D, window, softcap, seed):
    """The kernel's algorithm (float64 model with its f16 roundings) passes the GPU test's check, and the float64
    model without roundings equals the reference (so the tiling, packing and masking are exact)."""
    rng = np.random.default_rng(seed)
    H, KV = heads
    n_keys = p0 + T
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((n_keys, KV, D)).astype(np.float16)
    v = rng.standard_normal((n_keys, KV, D)).astype(np.float16)
    lo = 0 if window == 0 else max(0, p0 - window + 1)
    k[:lo] = np.nan  # never visible: the emulation must not let them in
    v[:lo] = np.nan
    scale = 2.0 / math.sqrt(D)
    out = flash_prefill_emulation(q, k, v, p0, scale, window, softcap)
    check_attention_prefill(out, q, k, v, p0, scale, window, softcap)
    _, bound = attention_prefill_bound(f16_rounded(q), k, v, p0, scale, window, softcap)
    assert np.all(bound < 0.05 * np.abs(v[lo:].astype(np.float64)).max())  # the bound is not vacuous
    exact = flash_prefill_emulation(q, k, v, p0, scale, window, softcap, round_f16=False)
    np.testing.assert_allclose(exact, attention_prefill_ref(q, k, v, p0, scale, window, softcap), rtol=1e-10,
                               atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 130), p0=st.one_of(st.integers(0, 150), st.sampled_from([31, 63, 64, 127])),
       heads=st.sampled_from([(4, 1), (8, 2), (2, 2)]), D=st.sampled_from([64, 128, 256, 512]),
       window=st.sampled_from([0, 1, 5, 40, 100]), seed=st.integers(0, 2**31))
def test_reference_f16_tiles_is_the_kernel_emulation(T, p0, heads, D, window, seed):
    """The same-rounding reference's attention (reference ``ops.attention_f16_tiles`` with the kernel's key tile,
    what ``load_reference(..., attn_f16_tiles=)`` runs for the int8 prefill gate) rounds what this file's model of
    the kernel rounds: equal to float64 precision but for rare f16 ties, and the f16 roundings themselves are
    visible (it differs from the unrounded attention by far more)."""
    from sparkinfer_cute.reference.ops import attention, attention_f16_tiles

    rng = np.random.default_rng(seed)
    H, KV = heads
    n_keys = p0 + T
    q = (rng.standard_normal((T, H, D)) * 2).astype(np.float32)
    k = rng.standard_normal((n_keys, KV, D)).astype(np.float16)
    v = rng.standard_normal((n_keys, KV, D)).astype(np.float16)
    scale = 2.0 / math.sqrt(D)
    emu = flash_prefill_emulation(q, k, v, p0, scale, window, 0.0)
    qpos = p0 + np.arange(T)
    got = attention_f16_tiles(q.astype(np.float64), k, v, qpos, tile_config(D)["block_n"], scale=scale,
                              window=window)
    exact = attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), qpos, scale=scale,
                      window=window)
    err = np.abs(got - emu).max()
    assert err <= 1e-9 * np.abs(v.astype(np.float64)).max() or np.mean(np.abs(got - emu) > 1e-9) < 1e-3, err
    if min(n_keys, window or n_keys) >= 8:  # (the last query sees >= 8 keys; with one, every rounding cancels)
        assert np.abs(exact - emu).max() > 100 * max(err, 1e-15)


def test_q_zero_count_check_rejects_a_skipped_key():
    """The q = 0 check catches one missing key in a 3000-key mean (integer V) and passes the exact mean."""
    rng = np.random.default_rng(7)
    T, p0, KV, D = 5, 2995, 1, 8
    v = rng.integers(-8, 9, (p0 + T, KV, D)).astype(np.float16)
    exact = np.stack([v[: p0 + i + 1].astype(np.float64).mean(axis=0) for i in range(T)])  # [T, KV, D]
    check_attention_prefill_counts(exact.astype(np.float32), v, p0, 0, KV)
    skipped = exact.copy()
    skipped[2] = v[1: p0 + 3].astype(np.float64).mean(axis=0)  # key 0 dropped for query 2
    with pytest.raises(AssertionError):
        check_attention_prefill_counts(skipped.astype(np.float32), v, p0, 0, KV)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_configs_fit_smem_and_thread_budget(name):
    c = MODEL_CONFIGS[name]
    k = AttentionPrefill(c["head_dim"], False)
    assert k.smem_bytes() <= 101376
    assert k.num_threads <= 256 and k.d_slice * k.d_split == c["head_dim"]
    assert k.block_m == 16 * k.row_groups and k.num_warps == k.row_groups * k.d_split


# ---------------------------------------------------------------------------------------------- GPU tests
HEADS = [(8, 2), (32, 4), (4, 1), (16, 8), (16, 2), (2, 2)]
REF_BUDGET = 4e9  # T * keys * n_head * D of one example: keeps the float64 reference and bound to seconds


def _draw_case(data):
    """(T, p0, D, H, KV, page_size, window, rng): T in 1..4096 (half the draws <= 300), heads and head size among
    those whose float64 reference fits :data:`REF_BUDGET` (the cheapest pair when none does)."""
    T = data.draw(st.one_of(st.integers(1, 300), st.integers(1, 4096)), label="T")
    p0 = data.draw(st.sampled_from([0, 0, 1, 63, 64, 200, 1000, 1500]), label="p0")
    combos = [(hk, d) for hk in HEADS for d in (64, 128, 256, 512) if T * (p0 + T) * hk[0] * d <= REF_BUDGET]
    (H, KV), D = data.draw(st.sampled_from(combos or [((2, 2), 64)]), label="heads, head_dim")
    P = data.draw(st.sampled_from([16, 64, 128]), label="page_size")
    window = data.draw(st.sampled_from([0, 0, 1, 100, 512, 1024]), label="window")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    return T, p0, D, H, KV, P, window, rng


def _run_gpu(q, k_pool, v_pool, table, p0, scale, window, softcap):
    from sparkinfer_cute.kernels.attention_prefill import attention_prefill
    from sparkinfer_cute.runtime import DeviceArray

    T, H, D = q.shape
    out = DeviceArray.empty((T, H, D), np.float32).fill_bytes(0xFF)
    pos = np.arange(p0, p0 + T, dtype=np.int32)
    attention_prefill(DeviceArray.from_numpy(q), DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool),
                      DeviceArray.from_numpy(table), DeviceArray.from_numpy(pos), scale=scale, window=window,
                      softcap=softcap, out=out)
    return out.to_numpy()


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_attention_prefill_gpu_matches_reference(data):
    T, p0, D, H, KV, P, window, rng = _draw_case(data)
    softcap = data.draw(st.sampled_from([0.0, 0.0, 5.0, 30.0]), label="softcap")
    k_pool, v_pool, table, k, v = make_paged_prefill_case(rng, T, p0, KV, D, P, window)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    scale = 2.0 / math.sqrt(D)  # sharper than 1/sqrt(D) so the softmax is far from uniform
    out = _run_gpu(q, k_pool, v_pool, table, p0, scale, window, softcap)
    check_attention_prefill(out, q, k, v, p0, scale, window, softcap)


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_attention_prefill_gpu_q_zero_counts_every_visible_key(data):
    T, p0, D, H, KV, P, window, rng = _draw_case(data)
    k_pool, v_pool, table, _, v = make_paged_prefill_case(rng, T, p0, KV, D, P, window, int_v=True)
    q = np.zeros((T, H, D), np.float32)
    out = _run_gpu(q, k_pool, v_pool, table, p0, 1.0, window, 0.0)
    check_attention_prefill_counts(out, v, p0, window, H)


@pytest.mark.gpu
def test_attention_prefill_gpu_matches_decode_kernel_path(rng):
    """The model's default prefill attention (this kernel) against the decode kernel run as a batch of T queries
    (``SPARKINFER_DISABLE=flash_prefill``) on one Gemma 3 270M-shaped chunk: both within the float64 bound."""
    from sparkinfer_cute.kernels.attention_decode import attention_decode
    from sparkinfer_cute.runtime import DeviceArray

    T, p0, H, KV, D, P, window = 300, 130, 4, 1, 256, 64, 512
    k_pool, v_pool, table, k, v = make_paged_prefill_case(rng, T, p0, KV, D, P, window)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    scale = 1.0 / math.sqrt(D)
    out = _run_gpu(q, k_pool, v_pool, table, p0, scale, window, 0.0)
    check_attention_prefill(out, q, k, v, p0, scale, window)
    pos = np.arange(p0, p0 + T, dtype=np.int32)
    dec = attention_decode(q, DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool),
                           DeviceArray.from_numpy(np.repeat(table[None], T, axis=0)), DeviceArray.from_numpy(pos),
                           scale=scale, window=window, num_splits=1)
    # the decode kernel keeps q in f32: the decode test's relative tolerance against the unrounded reference
    check_rel(dec, attention_prefill_ref(q, k, v, p0, scale, window), ATTENTION_REL_TOL, "decode kernel as a batch")


# ---------------------------------------------------------------------------------------------- lane-level model
# ldmatrix / mma.sync as the PTX ISA defines their fragments (independent of the kernel), driven by the kernel's own
# index functions: a wrong row, chunk, swizzle or register order in the kernel shows up as a wrong product here.
def _ldmatrix_x4(smem, addrs, transpose):
    """Registers [32 lanes, 4, 2 halves] of ``ldmatrix.sync.aligned.m8n8.x4[.trans].b16``: lane 8i + r gives the
    element offset of row r of matrix i; register i of lane l holds row l // 4, elements 2(l%4), 2(l%4)+1 of matrix i
    (.trans: rows 2(l%4), 2(l%4)+1 of column l // 4)."""
    out = np.zeros((32, 4, 2))
    for i in range(4):
        m = np.array([smem[addrs[8 * i + r]: addrs[8 * i + r] + 8] for r in range(8)])
        for lane in range(32):
            g, t = lane // 4, lane % 4
            out[lane, i] = m[2 * t:2 * t + 2, g] if transpose else m[g, 2 * t:2 * t + 2]
    return out


def _mma_m16n8k16(a, b, c):
    """``mma.sync.aligned.m16n8k16.row.col`` on per-lane fragments: a [32, 4, 2], b [32, 2, 2], c [32, 4] -> d."""
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, 2 * (lane % 4)
        A[g, t:t + 2], A[g + 8, t:t + 2], A[g, t + 8:t + 10], A[g + 8, t + 8:t + 10] = a[lane]
        B[t:t + 2, g], B[t + 8:t + 10, g] = b[lane]
        C[g, t:t + 2], C[g + 8, t:t + 2] = c[lane, :2], c[lane, 2:]
    D = A @ B + C
    return np.array([np.concatenate([D[lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2],
                                     D[lane // 4 + 8, 2 * (lane % 4):2 * (lane % 4) + 2]]) for lane in range(32)])


def _from_c_layout(acc, n_tiles):
    """[32, n_tiles*4] per-lane accumulators -> the 16 x (8 n_tiles) matrix (c0, c1: row g; c2, c3: row g + 8)."""
    out = np.zeros((16, 8 * n_tiles))
    for lane in range(32):
        g, t = lane // 4, 2 * (lane % 4)
        for nt in range(n_tiles):
            out[g, nt * 8 + t:nt * 8 + t + 2] = acc[lane, nt * 4:nt * 4 + 2]
            out[g + 8, nt * 8 + t:nt * 8 + t + 2] = acc[lane, nt * 4 + 2:nt * 4 + 4]
    return out


@pytest.mark.parametrize("D", [64, 128, 256, 512])
def test_fragment_index_math_lane_model(D):
    """One row group of the kernel, lane by lane: the tile loader fills every swizzled smem slot once; S = Q K^T
    from the Q fragments and ldmatrix'd K equals the matrix product per head-dim slice; the exchange buffer sums the
    slices; O = P V from the S-register P fragments and ldmatrix.trans'd V equals P @ V; every ldmatrix and
    exchange access is bank-conflict-free."""
    from sparkinfer_cute.kernels.attention_prefill import (
        exchange_offset,
        k_fragment_row_chunk,
        loader_chunk,
        q_fragment_col,
        swizzled_offset,
        v_fragment_row_chunk,
    )

    rng = np.random.default_rng(D)
    cfg = tile_config(D)
    DS, DC, BN, NT = cfg["d_slice"], cfg["d_split"], cfg["block_n"], 32 * cfg["warps"]
    CPR, KS, NS, NO = D // 8, DS // 16, BN // 8, DS // 8
    K = rng.integers(-4, 5, (BN, D)).astype(np.float64)  # small integers: every product and sum is exact
    V = rng.integers(-4, 5, (BN, D)).astype(np.float64)
    Q = rng.integers(-4, 5, (16, D)).astype(np.float64)
    sK, sV = np.full(BN * D, np.nan), np.full(BN * D, np.nan)
    for tidx in range(NT):
        for it in range(BN * CPR // NT):
            row, ch = loader_chunk(tidx, it, NT, CPR)
            off = swizzled_offset(row, ch, D)
            assert np.isnan(sK[off:off + 8]).all()  # each slot written once
            sK[off:off + 8], sV[off:off + 8] = K[row, ch * 8:ch * 8 + 8], V[row, ch * 8:ch * 8 + 8]
    assert not np.isnan(sK).any() and not np.isnan(sV).any()

    def conflict_free(addrs):
        for i in range(4):  # the 8 row addresses of each matrix: 8 different 16-byte bank groups
            assert len({(a * 2 // 16) % 8 for a in addrs[8 * i:8 * i + 8]}) == 8

    sX = np.full(cfg["warps"] * 16 * BN, np.nan)
    partial = []
    for dc in range(DC):  # warp dc of row group 0
        d0 = dc * DS
        qf = np.zeros((32, KS, 4, 2))
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for ks in range(KS):
                for half in range(2):
                    for r in range(2):
                        col = q_fragment_col(d0, ks, half, t)
                        qf[lane, ks, half * 2 + r] = Q[g + 8 * r, col:col + 2]
        acc_s = np.zeros((32, NS * 4))
        for ks in range(KS):
            for npair in range(NS // 2):
                addrs = [swizzled_offset(*k_fragment_row_chunk(lane, npair, ks, d0), D) for lane in range(32)]
                conflict_free(addrs)
                b = _ldmatrix_x4(sK, addrs, transpose=False)
                for sub in range(2):
                    nt = npair * 2 + sub
                    acc_s[:, nt * 4:nt * 4 + 4] = _mma_m16n8k16(qf[:, ks], b[:, 2 * sub:2 * sub + 2],
                                                                acc_s[:, nt * 4:nt * 4 + 4])
        np.testing.assert_array_equal(_from_c_layout(acc_s, NS), Q[:, d0:d0 + DS] @ K[:, d0:d0 + DS].T)
        partial.append(acc_s)
        for lane in range(32):  # exchange writes, 8 bytes per (row, pair)
            g, t = lane // 4, lane % 4
            for nt in range(NS):
                for r in range(2):
                    base = exchange_offset(dc, g + 8 * r, nt, t, BN)
                    assert np.isnan(sX[base:base + 2]).all()
                    sX[base:base + 2] = acc_s[lane, nt * 4 + 2 * r:nt * 4 + 2 * r + 2]
        for nt in range(NS):  # a half warp's 8-byte accesses (rows g = 0..3) cover 32 different banks
            for r in range(2):
                for lanes in (range(16), range(16, 32)):
                    banks = {(exchange_offset(dc, lane // 4 + 8 * r, nt, lane % 4, BN) + w) % 32
                             for lane in lanes for w in range(2)}
                    assert len(banks) == 32
    summed = np.zeros((32, NS * 4))
    for dc in range(DC):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for nt in range(NS):
                for r in range(2):
                    base = exchange_offset(dc, g + 8 * r, nt, t, BN)
                    summed[lane, nt * 4 + 2 * r:nt * 4 + 2 * r + 2] += sX[base:base + 2]
    np.testing.assert_array_equal(_from_c_layout(summed, NS), Q @ K.T)

    P = rng.integers(0, 3, (32, NS * 4)).astype(np.float64)  # P in the S accumulator layout
    for dc in range(DC):
        d0 = dc * DS
        acc_o = np.zeros((32, NO * 4))
        for kk in range(BN // 16):
            a = np.stack([P[:, (2 * kk) * 4:(2 * kk) * 4 + 2], P[:, (2 * kk) * 4 + 2:(2 * kk) * 4 + 4],
                          P[:, (2 * kk + 1) * 4:(2 * kk + 1) * 4 + 2],
                          P[:, (2 * kk + 1) * 4 + 2:(2 * kk + 1) * 4 + 4]], axis=1)
            for dpair in range(NO // 2):
                addrs = [swizzled_offset(*v_fragment_row_chunk(lane, kk, dpair, d0), D) for lane in range(32)]
                conflict_free(addrs)
                b = _ldmatrix_x4(sV, addrs, transpose=True)
                for sub in range(2):
                    nt = dpair * 2 + sub
                    acc_o[:, nt * 4:nt * 4 + 4] = _mma_m16n8k16(a, b[:, 2 * sub:2 * sub + 2],
                                                                acc_o[:, nt * 4:nt * 4 + 4])
        np.testing.assert_array_equal(_from_c_layout(acc_o, NO), _from_c_layout(P, NS) @ V[:, d0:d0 + DS])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 31, 33, 63, 64, 65, 129])
@pytest.mark.parametrize("heads,D,p0,window", [((8, 2), 128, 0, 0), ((8, 2), 128, 63, 7), ((4, 1), 256, 64, 0),
                                               ((16, 2), 512, 5, 40), ((2, 2), 64, 127, 1)])
def test_attention_prefill_gpu_ragged_tile_edges(T, heads, D, p0, window, rng):
    """Chunk lengths around the M-tile edge (T * G = BM +- 1 for G = 4, BM = 64, ...) and T = 1, every head size,
    prefixes around a key-tile edge; random inputs against the float64 bound, with a 16-slot page size so key tiles
    span pages."""
    H, KV = heads
    k_pool, v_pool, table, k, v = make_paged_prefill_case(rng, T, p0, KV, D, 16, window)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    scale = 2.0 / math.sqrt(D)
    out = _run_gpu(q, k_pool, v_pool, table, p0, scale, window, 0.0)
    check_attention_prefill(out, q, k, v, p0, scale, window)


@pytest.mark.parametrize("page_size", [16, 64, 128])
def test_loader_gathers_the_paged_rows(page_size):
    """The kernel's K/V tile loader (chunk assignment, page lookup, pool offset, swizzle) on a shuffled page table
    fills the smem tile with exactly the dense rows of keys [k_lo, k_hi] and zeros elsewhere (what its zero-filled
    cp.async leaves)."""
    from sparkinfer_cute.kernels.attention_prefill import loader_chunk, pool_offset, swizzled_offset

    rng = np.random.default_rng(page_size)
    D, KV, kvh, n_keys = 128, 3, 2, 300
    cfg = tile_config(D)
    BN, NT, CPR = cfg["block_n"], 32 * cfg["warps"], D // 8
    shift = page_size.bit_length() - 1
    pages = -(-n_keys // page_size)
    table = rng.permutation(pages + 2)[:pages].astype(np.int32)
    pool = np.full((pages + 2, page_size, KV, D), np.nan)
    dense = rng.standard_normal((n_keys, KV, D))
    scatter_dense(dense, pool, table)
    flat = pool.reshape(-1)
    k_lo, k_hi = 37, 250
    for j in range(k_lo // BN, k_hi // BN + 1):
        tile = np.full(BN * D, np.nan)
        for tidx in range(NT):
            for it in range(BN * CPR // NT):
                row, ch = loader_chunk(tidx, it, NT, CPR)
                key = j * BN + row
                valid = k_lo <= key <= k_hi
                key_c = key if valid else k_lo
                off = pool_offset(int(table[key_c >> shift]), key_c, ch, kvh, KV, D, shift)
                dst = swizzled_offset(row, ch, D)
                tile[dst:dst + 8] = flat[off:off + 8] if valid else 0.0
        for row in range(BN):
            key = j * BN + row
            want = dense[key, kvh] if k_lo <= key <= k_hi else np.zeros(D)
            got = np.concatenate([tile[swizzled_offset(row, ch, D):swizzled_offset(row, ch, D) + 8]
                                  for ch in range(CPR)])
            np.testing.assert_array_equal(got, want)
