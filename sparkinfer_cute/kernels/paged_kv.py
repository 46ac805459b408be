"""Paged fp16 KV cache: layout, host-side allocation, and numpy helpers for tests.

Layout (what :mod:`attention_decode` reads and :mod:`kv_cache_append` writes), per layer:

* ``k_pool``, ``v_pool``: float16 ``[n_pages, page_size, n_kv_head, head_dim]``, C-contiguous. Token-major inside
  a page: the K rows of all kv heads of one token are one contiguous ``n_kv_head * head_dim`` run (the append
  writes one 16-byte-aligned run per token; attention reads one ``head_dim`` row of one head per key).
* ``page_table``: int32 ``[batch, pages_per_seq]``, **shared by all layers** (a token sits at the same page/slot in
  every layer). Token ``t`` of sequence ``b`` lives at pool page ``page_table[b, t // page_size]``, slot
  ``t % page_size``.
* ``pos``: int32 ``[batch]`` in device memory: the position of the token being decoded. The decode step appends
  the token's K/V at ``pos`` and then attends to keys ``0..pos``. Kernels read it on the device, so a CUDA graph
  captured once is replayed for every token after the host (or a device kernel) updates ``pos``.

How model code uses it::

    cache = PagedKVCache(n_layers, n_kv_head, head_dim, page_size=64, max_context=8192)   # allocates on the GPU
    # per decode step: cache.set_pos(p) (or let a captured kernel bump cache.pos), then for each layer l:
    kv_cache_append(k_rope, v, cache.k[l], cache.v[l], cache.page_table, cache.pos, stream=s)
    attention_decode(q, cache.k[l], cache.v[l], cache.page_table, cache.pos, scale=..., window=..., out=o, ...)

Prefill with the same kernels: T prompt tokens of one sequence at positions ``p0 .. p0+T-1`` are a batch of T
queries of that sequence. Append all T (``kv_cache_append`` with B = T, ``pos = p0 + arange(T)`` and a page table
of T copies of the sequence's row), then ``attention_decode`` with the same ``pos``/page table attends query i to
keys ``0 .. p0+i`` (causal). Use a small ``num_splits`` there (1-2): the batch already fills the GPU and the split
workspace grows as ``T * n_head * num_splits * head_dim``.

``n_kv_head`` / ``head_dim`` may be per-layer sequences (Gemma 4 mixes 8x256 sliding and 2x512 full layers).
The page table maps pages identically (sequence b owns pool pages ``b*pages_per_seq ...``); a scheduler that
shares or recycles pages only rewrites the page table. Pools are zero-filled at allocation.

Int32 offsets: a pool must hold fewer than 2^31 elements per layer (4 GiB of fp16); the constructor checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _per_layer(x, n_layers: int, name: str) -> list[int]:
    if isinstance(x, (int, np.integer)):
        return [int(x)] * n_layers
    x = [int(v) for v in x]
    if len(x) != n_layers:
        raise ValueError(f"{name} has {len(x)} entries for {n_layers} layers")
    return x


class PagedKVCache:
    """Per-layer fp16 K/V page pools + one shared page table + the device-side position (see module docstring).

    Attributes: ``k[l]``, ``v[l]`` (DeviceArray f16 [n_pages, page_size, n_kv_head_l, head_dim_l]),
    ``page_table`` (DeviceArray int32 [batch, pages_per_seq]), ``pos`` (DeviceArray int32 [batch]),
    ``page_size``, ``pages_per_seq``, ``n_pages``, ``max_context``.
    """

    def __init__(self, n_layers: int, n_kv_head: int | Sequence[int], head_dim: int | Sequence[int],
                 page_size: int = 64, max_context: int = 4096, batch: int = 1, stream=None):
        from ..runtime import DeviceArray

        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.n_layers = n_layers
        self.n_kv_head = _per_layer(n_kv_head, n_layers, "n_kv_head")
        self.head_dim = _per_layer(head_dim, n_layers, "head_dim")
        self.page_size = page_size
        self.batch = batch
        self.pages_per_seq = -(-max_context // page_size)
        self.max_context = self.pages_per_seq * page_size
        self.n_pages = batch * self.pages_per_seq
        for kv, d in zip(self.n_kv_head, self.head_dim):
            if self.n_pages * page_size * kv * d >= 2**31:
                raise ValueError("KV pool of >= 2^31 elements in one layer: reduce max_context or batch")
        self.k = [DeviceArray.zeros((self.n_pages, page_size, kv, d), np.float16, stream)
                  for kv, d in zip(self.n_kv_head, self.head_dim)]
        self.v = [DeviceArray.zeros((self.n_pages, page_size, kv, d), np.float16, stream)
                  for kv, d in zip(self.n_kv_head, self.head_dim)]
        table = np.arange(self.n_pages, dtype=np.int32).reshape(batch, self.pages_per_seq)
        self.page_table = DeviceArray.from_numpy(table, stream)
        self.pos = DeviceArray.zeros((batch,), np.int32, stream)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def k_ptr(self, layer: int) -> int:
        return self.k[layer].ptr

    def v_ptr(self, layer: int) -> int:
        return self.v[layer].ptr

    def set_pos(self, pos, stream=None) -> None:
        """Write the decode position(s) (int or [batch]) into the device-side ``pos`` buffer."""
        arr = np.broadcast_to(np.asarray(pos, dtype=np.int32), (self.batch,))
        if int(arr.max()) >= self.max_context or int(arr.min()) < 0:
            raise ValueError(f"position {arr} outside [0, {self.max_context})")
        self.pos.copy_from_numpy(np.ascontiguousarray(arr), stream)

    def dense(self, layer: int, n_tokens: int, seq: int = 0, stream=None) -> tuple[np.ndarray, np.ndarray]:
        """(k, v) numpy f16 [n_tokens, n_kv_head, head_dim] of one sequence, gathered through the page table."""
        table = self.page_table.to_numpy(stream)[seq]
        return (gather_dense(self.k[layer].to_numpy(stream), table, n_tokens),
                gather_dense(self.v[layer].to_numpy(stream), table, n_tokens))


# ---------------------------------------------------------------------------------------------- numpy helpers
def gather_dense(pool: np.ndarray, table_row: np.ndarray, n_tokens: int) -> np.ndarray:
    """Pool [n_pages, P, KV, D] + one sequence's page-table row -> dense [n_tokens, KV, D]."""
    P = pool.shape[1]
    t = np.arange(n_tokens)
    return pool[np.asarray(table_row)[t // P], t % P]


def scatter_dense(dense: np.ndarray, pool: np.ndarray, table_row: np.ndarray) -> None:
    """Inverse of :func:`gather_dense`: write dense [n_tokens, KV, D] into ``pool`` in place."""
    P = pool.shape[1]
    t = np.arange(dense.shape[0])
    pool[np.asarray(table_row)[t // P], t % P] = dense
