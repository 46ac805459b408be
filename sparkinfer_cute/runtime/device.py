"""Device discovery and properties; the primary context is retained once and made current per thread.

``SPARKINFER_DEVICE`` (default 0) picks the ordinal used by :func:`get_device` when none is given.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ..errors import DeviceError
from ._driver import check, driver, init_driver

_devices: dict[int, "Device"] = {}
_devices_lock = threading.Lock()
_tls = threading.local()  # per-thread: ordinal whose context is current


def _default_ordinal() -> int:
    try:
        return int(os.environ.get("SPARKINFER_DEVICE", "0"))
    except ValueError:
        return 0


def device_count() -> int:
    """Number of CUDA devices (0 without a driver; never raises)."""
    try:
        init_driver()
        return int(check(driver().cuDeviceGetCount(), "cuDeviceGetCount"))
    except Exception:
        return 0


def device_available() -> bool:
    """True when a CUDA driver and at least one device are present (never raises)."""
    return device_count() > 0


def _attr(dev, name: str) -> int:
    cu = driver()
    return int(check(cu.cuDeviceGetAttribute(getattr(cu.CUdevice_attribute, name), dev), f"cuDeviceGetAttribute({name})"))


_capability_cache: dict[int, tuple[int, int] | None] = {}

# Compile targets of the GPUs this package runs on: the product (consumer Blackwell sm_120a / DGX Spark sm_121a) and
# the H100 test host (sm_90a, running the same SM120 kernel family).
SUPPORTED_TARGETS = ("sm_90a", "sm_120a", "sm_121a")
_TARGET_BY_CAPABILITY = {(9, 0): "sm_90a", (12, 0): "sm_120a", (12, 1): "sm_121a"}


def target_from_capability(major: int, minor: int) -> str:
    """PTX/cubin target of a GPU of compute capability ``major.minor``; DeviceError for an unsupported GPU."""
    try:
        return _TARGET_BY_CAPABILITY[(major, minor)]
    except KeyError:
        raise DeviceError(
            f"GPU compute capability {major}.{minor} is not supported (sparkinfer_cute targets sm_120a/sm_121a, "
            "and sm_90a for testing)"
        ) from None


def current_device_target() -> str | None:
    """Compile target of the selected device, or None without a GPU/driver (DeviceError for an unsupported GPU)."""
    cap = current_device_capability()
    return None if cap is None else target_from_capability(*cap)


def current_device_capability() -> tuple[int, int] | None:
    """(major, minor) of the selected device, or None without a GPU/driver. Never raises (used by arch.py on every
    kernel-cache lookup, hence memoized per ordinal)."""
    ordinal = _default_ordinal()
    if ordinal in _capability_cache:
        return _capability_cache[ordinal]
    try:
        init_driver()
        cu = driver()
        dev = check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        cap = (_attr(dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
               _attr(dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"))
    except Exception:
        cap = None
    _capability_cache[ordinal] = cap
    return cap


@dataclass
class Device:
    """One CUDA device with its retained primary context. Obtain with :func:`get_device`."""

    ordinal: int
    name: str
    capability: tuple[int, int]
    sm_count: int
    smem_per_block_optin: int
    l2_bytes: int
    total_memory: int
    cu_device: object = field(repr=False)
    context: object = field(repr=False)

    @property
    def target(self) -> str:
        """Compile target ('sm_90a' | 'sm_120a' | 'sm_121a'); DeviceError for other GPUs."""
        return target_from_capability(*self.capability)

    def make_current(self) -> None:
        if getattr(_tls, "ordinal", None) != self.ordinal:
            check(driver().cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
            _tls.ordinal = self.ordinal

    def free_memory(self) -> int:
        self.make_current()
        free, _total = check(driver().cuMemGetInfo(), "cuMemGetInfo")
        return int(free)

    def synchronize(self) -> None:
        self.make_current()
        check(driver().cuCtxSynchronize(), "cuCtxSynchronize")


def get_device(ordinal: int | None = None) -> Device:
    """Init the driver, retain the primary context of ``ordinal`` once, make it current in this thread.

    Raises :class:`DeviceError` when there is no driver or no such device.
    """
    if ordinal is None:
        ordinal = _default_ordinal()
    dev = _devices.get(ordinal)
    if dev is None:
        with _devices_lock:
            dev = _devices.get(ordinal)
            if dev is None:
                init_driver()
                cu = driver()
                n = int(check(cu.cuDeviceGetCount(), "cuDeviceGetCount"))
                if not 0 <= ordinal < n:
                    raise DeviceError(f"CUDA device {ordinal} requested but {n} device(s) present")
                cud = check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
                raw = check(cu.cuDeviceGetName(256, cud), "cuDeviceGetName")
                name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                ctx = check(cu.cuDevicePrimaryCtxRetain(cud), "cuDevicePrimaryCtxRetain")
                dev = Device(
                    ordinal=ordinal,
                    name=name,
                    capability=(_attr(cud, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
                                _attr(cud, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR")),
                    sm_count=_attr(cud, "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT"),
                    smem_per_block_optin=_attr(cud, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"),
                    l2_bytes=_attr(cud, "CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE"),
                    total_memory=int(check(cu.cuDeviceTotalMem(cud), "cuDeviceTotalMem")),
                    cu_device=cud,
                    context=ctx,
                )
                _devices[ordinal] = dev
    dev.make_current()
    return dev


def synchronize() -> None:
    """Wait for all work on the current device."""
    get_device().synchronize()
