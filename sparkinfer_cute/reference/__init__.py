"""numpy CPU reference forwards that follow llama.cpp's math (float32 by default, float64 on request).

``load_reference(path_or_gguf)`` returns the :class:`ReferenceModel` for the file's architecture; ``ops`` holds the
generic numerics (also the references of the GPU kernel tests); ``metrics`` compares logits teacher-forced.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import GGUFError
from ..gguf.reader import GGUFFile
from . import metrics, ops
from .base import ReferenceModel
from .gemma3 import Gemma3Reference
from .gemma4 import Gemma4Reference
from .qwen3_moe import Qwen3MoeReference

_BY_ARCH: dict[str, type[ReferenceModel]] = {
    "gemma3": Gemma3Reference,
    "gemma4": Gemma4Reference,
    "qwen3moe": Qwen3MoeReference,
}


def load_reference(
    path_or_gguf: GGUFFile | str | os.PathLike, dtype=np.float32, max_context: int | None = None, act_q8_1=(),
    attn_f16_tiles=None, **kwargs
) -> ReferenceModel:
    """Open (if given a path) a GGUF file and build the reference model of its architecture. ``act_q8_1``: tensor
    names whose matmuls round their activations to q8_1 like the GPU's int8 kernels; ``attn_f16_tiles``: {head_dim:
    key tile} of the attentions that round like the GPU's flash-attention prefill kernel (:class:`ReferenceModel`).
    Both: the GPU build's rounding plan, models/int8_plan.py."""
    g = path_or_gguf if isinstance(path_or_gguf, GGUFFile) else GGUFFile(path_or_gguf)
    cls = _BY_ARCH.get(g.architecture)
    if cls is None:
        raise GGUFError(
            g.path,
            f"no reference forward for architecture {g.architecture!r} "
            f"(supported: {', '.join(sorted(_BY_ARCH))})",
        )
    m = cls(g, dtype=dtype, max_context=max_context, **kwargs)
    names = frozenset(act_q8_1)
    if (names or attn_f16_tiles) and m.emulate_cpu:
        raise ValueError("act_q8_1 / attn_f16_tiles (the GPU's rounding) and emulate_cpu (llama.cpp's) exclude "
                         "each other")
    unknown = sorted(n for n in names if n not in g.tensors)
    if unknown:
        raise ValueError(f"act_q8_1 names tensors the file does not have: {', '.join(unknown[:4])}")
    m.act_q8_1 = names
    m.attn_f16_tiles = {int(d): int(b) for d, b in (attn_f16_tiles or {}).items()}
    return m


__all__ = ["Gemma3Reference", "Gemma4Reference", "Qwen3MoeReference", "ReferenceModel", "load_reference", "metrics", "ops"]
