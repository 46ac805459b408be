"""GGUF files: memory-mapped reader with validation, typed model configs, numpy dequantization, synthetic
writer."""

from .config import (
    SUPPORTED_ARCHITECTURES,
    Gemma3Config,
    Gemma4Config,
    ModelConfig,
    Qwen3MoeConfig,
    Qwen35MoeConfig,
    load_config,
    required_tensors,
    validate_tensors,
)
from .quants import dequantize, dequantize_rows
from .reader import SUPPORTED_TYPES, GGUFFile, TensorInfo, open_gguf

__all__ = [
    "GGUFFile",
    "TensorInfo",
    "open_gguf",
    "SUPPORTED_TYPES",
    "ModelConfig",
    "Qwen3MoeConfig",
    "Gemma3Config",
    "Gemma4Config",
    "Qwen35MoeConfig",
    "SUPPORTED_ARCHITECTURES",
    "load_config",
    "required_tensors",
    "validate_tensors",
    "dequantize",
    "dequantize_rows",
]
