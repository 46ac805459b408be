"""sparkinfer_cute/lru.py: the least-recently-used cache of the reference's experts and the prefill's chunk graphs."""

from __future__ import annotations

import gc
import weakref

import pytest

from sparkinfer_cute.lru import LRUCache


def test_keeps_the_most_recently_used_and_releases_the_evicted():
    class Graph:  # stands in for a CudaGraph (destroyed by its __del__ when the last reference goes)
        pass

    cache = LRUCache(3)
    graphs = {t: Graph() for t in (5, 17, 64, 100)}
    refs = {t: weakref.ref(g) for t, g in graphs.items()}
    for t in (5, 17, 64):
        assert cache.get(t, lambda t=t: graphs[t]) is graphs[t]
    assert cache.get(5, lambda: pytest.fail("5 is cached")) is graphs[5]  # 5 is now the most recent: 17 the oldest
    cache.get(100, lambda: graphs[100])
    assert 17 not in cache and len(cache) == 3 and all(t in cache for t in (5, 64, 100))
    assert cache[64] is graphs[64]
    assert (cache.hits, cache.misses) == (1, 4)
    fresh = Graph()
    assert cache.get(17, lambda: fresh) is fresh  # evicted: made again
    del graphs, fresh
    gc.collect()
    assert refs[17]() is None and refs[5]() is not None  # the evicted graph was released, the kept ones not
    with pytest.raises(ValueError):
        LRUCache(0)
