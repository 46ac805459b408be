"""Batched MoE routing kernels for prefill (kernels/moe_route.py) vs float64 numpy / the host tile builder.

RouterLogits: an f32 dot of length K with a butterfly: ``|err| <= (K + 8) 2^-24 sum|w x|``. MoeAlign: the tile
table equals ``grouped_tiles_host``'s exactly (it depends only on the counts); the permutation may order rows inside
an expert differently (shared-memory atomics), so it is checked for what the GEMM and the combine rely on: a
bijection, each expert's rows inside its tile range, and ``sorted_token[sorted_pos[a]] == a // k``. MoeCombine: k
f32 fmas per element: ``|err| <= (k + 2) 2^-24 (|base| + sum_j |w_j y_j|)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

U = 2.0**-24


@pytest.mark.gpu
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_tok=st.integers(1, 70), n_expert=st.sampled_from([8, 64, 128]),
       n_in=st.sampled_from([256, 2048, 2816]))
def test_router_logits(seed, n_tok, n_expert, n_in):
    from sparkinfer_cute.kernels.moe_route import router_logits
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_expert, n_in)).astype(np.float32) * 0.05
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    out = poisoned((n_tok, n_expert))
    router_logits(DeviceArray.from_numpy(w), DeviceArray.from_numpy(x), n_tok, out)
    y = out.to_numpy()
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    bound = (n_in + 8) * U * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
    assert np.isfinite(y).all()
    assert (np.abs(y - ref) <= bound).all(), np.max(np.abs(y - ref) - bound)


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_tok=st.integers(1, 600), n_expert=st.sampled_from([4, 16, 128]),
       k=st.integers(1, 8), tile_tokens=st.sampled_from([16, 32, 64]), skew=st.booleans())
def test_moe_align(seed, n_tok, n_expert, k, tile_tokens, skew):
    from sparkinfer_cute.kernels.moe_route import moe_align
    from sparkinfer_cute.kernels.quant_gemm import max_grouped_tiles
    from sparkinfer_cute.reference.kernel_refs import grouped_tiles_host
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    k = min(k, n_expert)
    p = rng.dirichlet(np.full(n_expert, 0.2 if skew else 5.0)) + 1e-6  # skew: a few hot experts, many idle
    p /= p.sum()
    ids = np.stack([rng.choice(n_expert, k, replace=False, p=p) for _ in range(n_tok)]).astype(np.int32)
    mt = max_grouped_tiles(n_tok * k, n_expert, tile_tokens)
    tiles, n_tiles = poisoned((mt + 1, 4), np.int32), poisoned((1,), np.int32)
    stok, spos = poisoned((n_tok * k,), np.int32), poisoned((n_tok * k,), np.int32)
    moe_align(DeviceArray.from_numpy(ids), n_tok, n_expert, tile_tokens, tiles, n_tiles, stok, spos)
    ref_tiles, _, _ = grouped_tiles_host(ids, n_expert, tile_tokens)
    nt = int(n_tiles.to_numpy()[0])
    assert nt == len(ref_tiles) <= mt
    np.testing.assert_array_equal(tiles.to_numpy()[:nt], ref_tiles)
    pos, tok = spos.to_numpy(), stok.to_numpy()
    assert sorted(pos.tolist()) == list(range(n_tok * k))
    np.testing.assert_array_equal(tok[pos], np.arange(n_tok * k) // k)
    counts = np.bincount(ids.reshape(-1), minlength=n_expert)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    e = ids.reshape(-1)
    assert ((pos >= starts[e]) & (pos < starts[e] + counts[e])).all()


@pytest.mark.gpu
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_tok=st.integers(1, 40), k=st.integers(1, 8),
       n_embd=st.sampled_from([64, 2048, 2816]), accumulate=st.booleans(), scaled=st.booleans())
def test_moe_combine(seed, n_tok, k, n_embd, accumulate, scaled):
    from sparkinfer_cute.kernels.moe_route import moe_combine
    from sparkinfer_cute.reference.kernel_refs import moe_combine_ref
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    E = 16
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(n_tok)]).astype(np.int32)
    w = rng.random((n_tok, k)).astype(np.float32)
    pos = rng.permutation(n_tok * k).astype(np.int32)
    y = rng.standard_normal((n_tok * k, n_embd)).astype(np.float32)
    scale = rng.uniform(0.5, 2, E).astype(np.float32) if scaled else None
    base = rng.standard_normal((n_tok, n_embd)).astype(np.float32) if accumulate else None
    out = DeviceArray.from_numpy(base) if accumulate else poisoned((n_tok, n_embd))
    moe_combine(DeviceArray.from_numpy(y), DeviceArray.from_numpy(pos), DeviceArray.from_numpy(w),
                DeviceArray.from_numpy(ids), out, n_tok, accumulate=accumulate,
                expert_scale=DeviceArray.from_numpy(scale) if scaled else None)
    got = out.to_numpy()
    ref = moe_combine_ref(y, pos, w, ids, base, scale)
    ws = np.abs(w.astype(np.float64)) * (np.asarray(scale, np.float64)[ids] if scaled else 1.0)
    mag = np.einsum("tk,tkn->tn", ws, np.abs(y.astype(np.float64))[pos.reshape(n_tok, k)])
    bound = (k + 2) * U * (mag + (np.abs(base) if accumulate else 0)) * (2 if scaled else 1)
    assert np.isfinite(got).all()
    assert (np.abs(got - ref) <= bound + 1e-30).all(), np.max(np.abs(got - ref) - bound)
