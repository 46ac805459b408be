"""A small least-recently-used cache: the CPU reference's dequantized MoE experts (sparkinfer_cute/reference/), the
GPU prefill's captured chunk-length graphs (models/base.py)."""

from __future__ import annotations

from collections import OrderedDict


class LRUCache:
    """At most ``capacity`` values by key; :meth:`get` makes a missing one and evicts the least recently used. An
    evicted value is dropped (a CUDA graph is destroyed when its last reference goes)."""

    def __init__(self, capacity: int):
        if int(capacity) < 1:
            raise ValueError(f"LRUCache needs a capacity >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._d: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key, make):
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
            self.hits += 1
            return v
        self.misses += 1
        v = make()
        self._d[key] = v
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return v

    def __getitem__(self, key):
        return self._d[key]

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)


__all__ = ["LRUCache"]
