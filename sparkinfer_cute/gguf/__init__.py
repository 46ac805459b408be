"""GGUF files: memory-mapped reader with validation, typed model configs, numpy dequantization, synthetic writer."""

from .reader import GGUFFile, TensorInfo, open_gguf

__all__ = ["GGUFFile", "TensorInfo", "open_gguf"]
