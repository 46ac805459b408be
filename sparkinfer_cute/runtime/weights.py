"""Upload GGUF tensors to the GPU, still quantized: the raw GGUF bytes, one device buffer per tensor.

Models get :class:`QWeight` handles (type, ggml shape, device bytes) and never look at GGUF files themselves. The total
is checked against the GPU's free memory *before* any upload, so a model too large for the GPU fails with a clear
:class:`DeviceOutOfMemoryError` instead of a half-loaded state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ..errors import DeviceOutOfMemoryError
from ..gguf.quants import Q6_K_P_BLOCK_BYTES, repack_q6_k_padded


@dataclass
class QWeight:
    name: str
    qtype: str  # ggml type name: "Q4_K", "Q6_K", "Q8_0", "Q5_0", "F32", ...
    shape: tuple[int, ...]  # ggml order: (n_in, n_out[, n_expert])
    data: object  # DeviceArray (uint8 bytes)
    row_bytes: int

    @property
    def n_in(self) -> int:
        return self.shape[0]

    @property
    def n_out(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    @property
    def n_expert(self) -> int:
        return self.shape[2] if len(self.shape) > 2 else 1

    @property
    def ptr(self) -> int:
        return self.data.ptr

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class WeightStore:
    """Device copies of a model's tensors. ``resident_bytes`` is what the weights occupy on the GPU."""

    # Headroom kept free for activations, KV cache, workspaces and the CUDA context.
    HEADROOM = 512 << 20

    def __init__(self, g, names, *, extra_bytes: int = 0, progress: bool = True, stream=None,
                 repack_q6k: frozenset[str] | set[str] = frozenset()):
        """``repack_q6k``: names of Q6_K tensors to upload as ``Q6_K_P`` (each 210-byte block padded to 212 bytes so
        every field is 4-byte aligned for 32-bit loads; value-exact, +0.95% bytes; gguf/quants.py). Only for
        tensors read by the GEMV/MoE kernels, not by the embedding gather."""
        from . import DeviceArray, get_device

        dev = get_device()
        infos = [g.check_supported(n) for n in names]
        total = sum(t.nbytes for t in infos)
        free = dev.free_memory()
        if total + extra_bytes + self.HEADROOM > free:
            raise DeviceOutOfMemoryError(
                f"{g.path}: the model needs {total / 2**30:.2f} GiB of weights + {extra_bytes / 2**30:.2f} GiB of KV "
                f"cache/activations, but {dev.name} has {free / 2**30:.2f} GiB free "
                f"(keeping {self.HEADROOM >> 20} MiB headroom); nothing was uploaded"
            )
        self.weights: dict[str, QWeight] = {}
        it = infos
        bar = None
        if progress and total > (256 << 20):
            try:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload weights", file=sys.stderr)
            except ImportError:
                bar = None
        for t in it:
            raw = g.raw(t.name)
            qtype, row_bytes = t.ggml_type.name, t.row_bytes
            if qtype == "Q6_K" and t.name in repack_q6k:
                raw = repack_q6_k_padded(raw)
                qtype, row_bytes = "Q6_K_P", t.shape[0] // 256 * Q6_K_P_BLOCK_BYTES
                total += raw.nbytes - t.nbytes
            buf = DeviceArray.from_numpy(np.ascontiguousarray(raw).reshape(-1), stream)
            self.weights[t.name] = QWeight(t.name, qtype, t.shape, buf, row_bytes)
            if bar is not None:
                bar.update(t.nbytes)
        if bar is not None:
            bar.close()
        self.resident_bytes = total

    @classmethod
    def of(cls, handles: dict[str, QWeight]) -> "WeightStore":
        """A store over ready handles, nothing uploaded (models/dry_run.py: the dry models get the real interface, so
        a forward that uses a method the store lacks fails on the CPU, not first on a GPU)."""
        store = cls.__new__(cls)
        store.weights = dict(handles)
        store.resident_bytes = sum(int(w.data.nbytes) for w in store.weights.values())
        return store

    def __getitem__(self, name: str) -> QWeight:
        return self.weights[name]

    def __setitem__(self, name: str, w: QWeight) -> None:
        """Replace a handle (models/base.py ``fuse_rows`` points the parts of a fused weight into its buffer)."""
        self.weights[name] = w

    def get(self, name: str):
        return self.weights.get(name)

    def items(self):
        """(name, handle) of every loaded weight (models/base.py ``prefill_unsupported_weights`` walks them)."""
        return self.weights.items()
