"""The exception types users see. Each carries enough context to act on without a traceback."""

from __future__ import annotations


class SparkinferError(Exception):
    """Base class for every error this package raises on purpose."""


class GGUFError(SparkinferError, ValueError):
    """A GGUF file cannot be used: not a GGUF, bad version, truncated, unknown architecture, unsupported quant type,
    inconsistent shapes, missing tensor. ``path``, ``tensor`` (or None) and ``reason`` say which and why."""

    def __init__(self, path, reason: str, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        self.reason = reason
        where = f"{self.path}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {reason}")


class ContextOverflowError(SparkinferError, ValueError):
    """The prompt plus the requested generation does not fit in the model's (or the configured) context."""


class DeviceError(SparkinferError, RuntimeError):
    """No usable CUDA device, an unsupported architecture, or a failed CUDA call."""


class DeviceOutOfMemoryError(DeviceError, MemoryError):
    """A device allocation failed, or a model does not fit in the GPU's free memory."""


class ConfigError(SparkinferError, ValueError):
    """An environment knob names something that does not exist (a misspelt ``SPARKINFER_DISABLE`` pass, say): an
    error rather than a silent no-op, so an A/B run cannot measure the same build twice without knowing."""
