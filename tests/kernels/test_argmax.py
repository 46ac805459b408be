"""Greedy arg-max kernel vs np.argmax (ties -> lowest index) on real vocabulary sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.kernels.argmax import ArgMax, argmax
from sparkinfer_cute.reference.kernel_refs import argmax_ref
from sparkinfer_cute.runtime.testing import assert_all_written, poisoned


def test_chunking_covers_vocab():
    for v in [4, 1536, 2048, 4096, 151936, 262144, 4100, 12]:
        k = ArgMax(v)
        assert k.n_chunks * k.chunk_vecs >= k.vecs > (k.n_chunks - 1) * k.chunk_vecs
        assert k.iters * 256 >= k.chunk_vecs


def _run(lg, workspace=None):
    from sparkinfer_cute.runtime import DeviceArray

    ids = poisoned((lg.shape[0],), np.int32)
    argmax(DeviceArray.from_numpy(lg), out=ids, workspace=workspace)
    y = ids.to_numpy()
    assert_all_written(y, "ids")
    return y


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(vocab=st.one_of(st.sampled_from([151936, 262144, 1536, 2048, 4096]),
                       st.integers(1, 20000).map(lambda n: 4 * n)),
       rows=st.integers(1, 8), ties=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_argmax(vocab, rows, ties, seed):
    rng = np.random.default_rng(seed)
    lg = (rng.standard_normal((rows, vocab)) * 5).astype(np.float32)
    if ties:  # plant the same maximum at 2-3 places per row; the lowest index must win
        for r in range(rows):
            pos = rng.choice(vocab, size=min(3, vocab), replace=False)
            lg[r, pos] = np.float32(100.0)
    np.testing.assert_array_equal(_run(lg), argmax_ref(lg))


@pytest.mark.gpu
def test_argmax_edge_rows_and_workspace(rng):
    from sparkinfer_cute.runtime import Workspace

    v = 151936
    lg = rng.standard_normal((4, v)).astype(np.float32)
    lg[0, :] = 1.0                 # all equal -> 0
    lg[1, -1] = 1e30               # last element
    lg[2, :] = -np.inf
    lg[2, 777] = -1e30             # the only finite value
    lg[3, 4096] = lg[3, 4095] = 50  # tie across a vector / chunk boundary
    ws = Workspace()
    got = _run(lg, ws)
    assert got.tolist() == [0, v - 1, 777, 4095]
    assert (got == argmax_ref(lg)).all()
    np.testing.assert_array_equal(_run(lg, ws), got)  # reused workspace


@pytest.mark.gpu
def test_argmax_numpy_path(rng):
    lg = rng.standard_normal(262144).astype(np.float32)
    assert argmax(lg, out=poisoned((1,), np.int32)).tolist() == [int(np.argmax(lg))]
