"""Embedding gather (kernels/embedding.py), one token and a batch of prompt tokens, vs gguf.quants dequantization.

The kernel dequantizes one element with at most two f32 roundings (``d*sc`` then ``*q``, ``- dmin*m`` possibly fused),
then multiplies by ``scale``: ``|out - scale*w| <= 4 * 2^-24 * scale * A`` with ``A = |d sc q| + |dmin m|``
(K-quants) or ``|w|``. Outputs are poisoned first; rows past ``n_tokens`` must stay untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

U = 2.0**-24


@pytest.mark.gpu
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), q=st.sampled_from(["F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"]),
       n_tokens=st.integers(1, 9), slot=st.integers(0, 3))
def test_embedding_rows(seed, q, n_tokens, slot):
    import gguf

    from sparkinfer_cute.reference.kernel_refs import random_quant_bytes
    from sparkinfer_cute.kernels.embedding import embedding
    from sparkinfer_cute.kernels.quant_decode import spec
    from sparkinfer_cute.runtime import DeviceArray
    from sparkinfer_cute.runtime.testing import poisoned

    rng = np.random.default_rng(seed)
    n_embd, vocab = 512, 37
    sp = spec(q)
    raw = random_quant_bytes(q, vocab * n_embd // sp.block_elems, rng).reshape(vocab, sp.row_bytes(n_embd))
    W = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, q)).astype(np.float64).reshape(vocab, n_embd)
    ids = rng.integers(0, vocab, size=slot + n_tokens).astype(np.int32)
    scale = float(rng.uniform(0.5, 30))
    out = poisoned((n_tokens + 1, n_embd))
    embedding(DeviceArray.from_numpy(raw), DeviceArray.from_numpy(ids), out, qtype=q, n_embd=n_embd, slot=slot,
              scale=scale, n_tokens=n_tokens)
    got = out.to_numpy()
    assert np.isnan(got[n_tokens]).all(), "a row past n_tokens was written"
    ref = scale * W[ids[slot:slot + n_tokens]]
    if q in ("Q4_K", "Q5_K"):
        b = raw.reshape(-1, sp.block_bytes)
        no_min, no_scale = b.copy(), b.copy()
        no_min[:, 2:4] = 0
        no_scale[:, 0:2] = 0
        t = getattr(gguf.GGMLQuantizationType, q)
        A = (np.abs(gguf.quants.dequantize(no_min.reshape(raw.shape), t)) +
             np.abs(gguf.quants.dequantize(no_scale.reshape(raw.shape), t))).reshape(vocab, n_embd)
    else:
        A = np.abs(W)
    bound = 4 * U * scale * A[ids[slot:slot + n_tokens]]
    assert (np.abs(got[:n_tokens] - ref) <= bound).all(), np.max(np.abs(got[:n_tokens] - ref) - bound)
