"""GPU forwards, one file per architecture (installed as ``sparkinfer_cute.models``).

Each reads like its numpy reference in ``sparkinfer_cute.reference`` and like the model spec (models.md), op by op,
and enqueues one decode step on a stream so the engine can capture it once in a CUDA graph and replay it per token.
``GPU_FORWARDS`` maps a GGUF ``general.architecture`` to its forward, as ``reference._BY_ARCH`` does for the CPU
references.
"""

from __future__ import annotations

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.models.base import GPUDecoder
from sparkinfer_cute.models.gemma3 import Gemma3GPU
from sparkinfer_cute.models.gemma4 import Gemma4GPU
from sparkinfer_cute.models.qwen3_moe import Qwen3MoeGPU

GPU_FORWARDS: dict[str, type[GPUDecoder]] = {
    "gemma3": Gemma3GPU,
    "gemma4": Gemma4GPU,
    "qwen3moe": Qwen3MoeGPU,
}


def load_gpu_model(g, cfg, *, max_context: int | None = None, progress: bool = True, tuned=None) -> GPUDecoder:
    """The GPU forward of ``cfg.arch`` (weights uploaded). ``tuned``: the per-GPU launch configs to apply (the
    engine's ``autotune.load_tuned(device)``; None: today's heuristics everywhere)."""
    cls = GPU_FORWARDS.get(cfg.arch)
    if cls is None:
        raise GGUFError(g.path, f"architecture {cfg.arch!r} has no GPU forward yet (GPU: {', '.join(GPU_FORWARDS)}); "
                                "use --backend cpu where a reference exists")
    return cls(g, cfg, max_context=max_context, progress=progress, tuned=tuned)


__all__ = ["GPU_FORWARDS", "GPUDecoder", "Gemma3GPU", "Gemma4GPU", "Qwen3MoeGPU", "load_gpu_model"]
