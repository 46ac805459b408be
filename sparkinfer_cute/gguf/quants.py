"""numpy dequantization (TEMPORARY shim to gguf.quants; being replaced by the package's own vectorized code)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return _gguf_dequantize(np.asarray(raw), qtype).astype(np.float32, copy=False)
