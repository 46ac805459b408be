"""KV-cache append: f32 K/V rows -> f16 at (page_table[pos // P], pos % P) of each sequence, bit-exact vs numpy's
round-to-nearest-even ``astype(np.float16)``, and nothing else in the pool changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.kv_cache_append import MODEL_CONFIGS, kv_cache_append
from sparkinfer_cute.reference.kernel_refs import kv_cache_append_ref


def test_reference_writes_only_the_target_slot():
    rng = np.random.default_rng(0)
    pool_k = np.zeros((5, 4, 2, 8), np.float16)
    pool_v = np.zeros_like(pool_k)
    table = np.array([[3, 0, 4]], np.int32)
    k = rng.standard_normal((1, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 8)).astype(np.float32)
    kv_cache_append_ref(k, v, pool_k, pool_v, table, np.array([9]))  # logical page 2 -> pool page 4, slot 1
    np.testing.assert_array_equal(pool_k[4, 1], k[0].astype(np.float16))
    np.testing.assert_array_equal(pool_v[4, 1], v[0].astype(np.float16))
    pool_k[4, 1] = 0
    pool_v[4, 1] = 0
    assert not pool_k.any() and not pool_v.any()


def _hard_values(rng, shape):
    """Normal values plus f16 edge cases: ties at half an ulp, the largest finite f16, overflow, subnormals."""
    x = rng.standard_normal(shape).astype(np.float32) * rng.choice([1e-6, 1.0, 300.0], size=shape)
    flat = x.reshape(-1)
    specials = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504.0, 65520.0, 7e4, -7e4, 2.0**-24, 3 * 2.0**-25,
                         -0.0, 1e-8], np.float32)
    idx = rng.choice(flat.size, size=min(flat.size, specials.size), replace=False)
    flat[idx] = specials[: idx.size]
    return x


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(cfg=st.sampled_from(sorted(MODEL_CONFIGS)), page_size=st.sampled_from([16, 64, 128]),
       batch=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_kv_cache_append_gpu_bit_exact(cfg, page_size, batch, seed):
    from sparkinfer_cute.runtime import DeviceArray

    rng = np.random.default_rng(seed)
    KV, D = MODEL_CONFIGS[cfg]["n_kv_head"], MODEL_CONFIGS[cfg]["head_dim"]
    pages_per_seq = int(rng.integers(1, 6))
    n_pages = batch * pages_per_seq + 2
    table = rng.permutation(n_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq).astype(np.int32)
    pos = rng.integers(0, pages_per_seq * page_size, size=batch).astype(np.int32)
    # pre-existing cache contents: a random pattern that must survive untouched
    k_pool = rng.standard_normal((n_pages, page_size, KV, D)).astype(np.float16)
    v_pool = rng.standard_normal((n_pages, page_size, KV, D)).astype(np.float16)
    k = _hard_values(rng, (batch, KV, D))
    v = _hard_values(rng, (batch, KV, D))
    dk_pool, dv_pool = DeviceArray.from_numpy(k_pool), DeviceArray.from_numpy(v_pool)
    kv_cache_append(k, v, dk_pool, dv_pool, table, pos)
    kv_cache_append_ref(k, v, k_pool, v_pool, table, pos)
    np.testing.assert_array_equal(dk_pool.to_numpy().view(np.uint16), k_pool.view(np.uint16))
    np.testing.assert_array_equal(dv_pool.to_numpy().view(np.uint16), v_pool.view(np.uint16))


@pytest.mark.gpu
def test_paged_kv_cache_mixed_layers_append_and_gather():
    """PagedKVCache with Gemma-4-like per-layer shapes (8 x 256 sliding, 2 x 512 full): appending tokens one by one
    through the device-side ``pos`` reproduces the dense history of every layer, across page boundaries."""
    from sparkinfer_cute.kernels.paged_kv import PagedKVCache

    rng = np.random.default_rng(11)
    kv_heads, dims = [8, 2, 8], [256, 512, 256]
    cache = PagedKVCache(3, kv_heads, dims, page_size=16, max_context=40)
    assert cache.pages_per_seq == 3 and cache.max_context == 48
    hist = [(np.zeros((37, kv, d), np.float16), np.zeros((37, kv, d), np.float16)) for kv, d in zip(kv_heads, dims)]
    for pos in range(37):
        cache.set_pos(pos)
        for layer, (kv, d) in enumerate(zip(kv_heads, dims)):
            k = rng.standard_normal((kv, d)).astype(np.float32)
            v = rng.standard_normal((kv, d)).astype(np.float32)
            kv_cache_append(k, v, cache.k[layer], cache.v[layer], cache.page_table, cache.pos)
            hist[layer][0][pos], hist[layer][1][pos] = k.astype(np.float16), v.astype(np.float16)
    for layer in range(3):
        k_dense, v_dense = cache.dense(layer, 37)
        np.testing.assert_array_equal(k_dense, hist[layer][0])
        np.testing.assert_array_equal(v_dense, hist[layer][1])
    with pytest.raises(ValueError):
        cache.set_pos(48)
