"""GPU forwards, one file per architecture (installed as ``sparkinfer_cute.models``).

Each reads like its numpy reference in ``sparkinfer_cute.reference`` and like ../shared/spec/models.md, op by op,
and enqueues one decode step on a stream so the engine can capture it once in a CUDA graph and replay it per token.
"""

from __future__ import annotations

from ..errors import GGUFError  # type: ignore[misc]  (resolved as sparkinfer_cute.errors once installed)


def load_gpu_model(g, cfg, *, max_context: int | None = None, progress: bool = True):
    arch = cfg.arch
    if arch == "gemma3":
        from .gemma3 import Gemma3GPU

        return Gemma3GPU(g, cfg, max_context=max_context, progress=progress)
    if arch == "qwen3moe":
        from .qwen3_moe import Qwen3MoeGPU

        return Qwen3MoeGPU(g, cfg, max_context=max_context, progress=progress)
    raise GGUFError(g.path, f"architecture {arch!r} has no GPU forward yet (GPU: gemma3, qwen3moe); "
                            "use --backend cpu where a reference exists")
