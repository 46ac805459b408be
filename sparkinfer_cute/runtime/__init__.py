"""Thin cuda-python runtime: device, streams/events, device arrays, workspaces, CUDA graphs.

Importable without a GPU or ``libcuda``: nothing touches the driver until a function needs it, and
:func:`device_available` simply returns False on such a machine.
"""

from ..errors import DeviceError, DeviceOutOfMemoryError
from ._driver import check
from .device import Device, current_device_capability, device_available, device_count, get_device, synchronize
from .graph import CudaGraph
from .memory import DeviceArray, Workspace, as_device
from .stream import Event, Stream, default_stream, elapsed_ms, resolve_stream

__all__ = [
    "CudaGraph",
    "Device",
    "DeviceArray",
    "DeviceError",
    "DeviceOutOfMemoryError",
    "Event",
    "Stream",
    "Workspace",
    "as_device",
    "check",
    "current_device_capability",
    "default_stream",
    "device_available",
    "device_count",
    "elapsed_ms",
    "get_device",
    "resolve_stream",
    "synchronize",
]
