"""Kernel family vs compile target.

Two independent knobs (as quack does with QUACK_ARCH):

* the **kernel family** picks which kernel classes and which shared-memory budget the models use. ``sm120`` (the
  product: consumer Blackwell, 99 KB smem, no WGMMA) is the default on *every* GPU, so the H100 test host exercises
  the Blackwell code path. ``sm90`` may select Hopper-only variants where one exists beside the SM120 one.
  Set with ``SPARKINFER_KERNEL_FAMILY=sm120|sm90`` or :func:`set_kernel_family`.
* the **compile target** is the PTX/cubin target: the physical GPU when there is one, else ``SPARKINFER_ARCH`` /
  ``CUTE_DSL_ARCH``, else ``sm_120a``. CI (no GPU) compiles every kernel for sm_120a and sm_121a (and sm_90a).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

from ..errors import DeviceError
from ..runtime.device import SUPPORTED_TARGETS, current_device_target

FAMILIES = ("sm120", "sm90")

# Shared memory per block (opt-in max), bytes. sm_120/121: 99 KB = 101376 (cutlass.memory.get_smem_capacity_in_bytes
# ("sm_120")); sm_90: 227 KB = 232448.
SMEM_CAPACITY = {"sm120": 101376, "sm90": 232448}

_family_override: str | None = None
_target_override: str | None = None


def kernel_family() -> str:
    return _normalize_family(_family_override or os.environ.get("SPARKINFER_KERNEL_FAMILY", "sm120"))


@functools.lru_cache(maxsize=None)
def _normalize_family(raw: str) -> str:
    fam = raw.lower().replace("_", "")
    if fam not in FAMILIES:
        raise DeviceError(f"unknown kernel family {fam!r}; choose one of {FAMILIES}")
    return fam


def set_kernel_family(family: str | None) -> None:
    """Select the kernel family for this process (None: back to the environment/default)."""
    global _family_override
    if family is not None and family.lower().replace("_", "") not in FAMILIES:
        raise DeviceError(f"unknown kernel family {family!r}; choose one of {FAMILIES}")
    _family_override = None if family is None else family.lower().replace("_", "")


def smem_budget() -> int:
    """Shared-memory bytes a kernel of the selected family may use per block."""
    return SMEM_CAPACITY[kernel_family()]


@functools.lru_cache(maxsize=None)
def normalize_target(arch: str) -> str:
    a = arch.strip().lower()
    if not a.startswith("sm_"):
        a = "sm_" + a.replace("sm", "")
    if a in ("sm_90", "sm_120", "sm_121"):
        a += "a"
    if a not in SUPPORTED_TARGETS:
        raise DeviceError(f"unsupported compile target {arch!r}; supported: {', '.join(SUPPORTED_TARGETS)}")
    return a


def compile_target() -> str:
    """The arch kernels are compiled for right now."""
    if _target_override:
        return _target_override
    env = os.environ.get("SPARKINFER_ARCH") or os.environ.get("CUTE_DSL_ARCH")
    if env:
        return normalize_target(env)
    return _physical_target()


@functools.lru_cache(maxsize=1)
def _physical_target() -> str:
    # Probed once per process: this runs on every kernel-cache lookup (a hot path), and the GPU cannot change.
    return current_device_target() or "sm_120a"


@contextmanager
def target(arch: str):
    """Compile for ``arch`` inside the block (used by the compile gate; kernels compiled here can't run elsewhere)."""
    global _target_override
    old = _target_override
    _target_override = normalize_target(arch)
    try:
        yield _target_override
    finally:
        _target_override = old


# Programmatic dependent launch (PDL): every kernel waits for its predecessor with ``griddepcontrol.wait`` at the
# top and immediately lets its dependents launch, so the next kernel's launch and block scheduling overlap this
# one's execution (a decode step is ~500-800 small kernels in one graph). Stream capture keeps the programmatic
# edges. ``SPARKINFER_PDL=0`` compiles and launches without it (for A/B runs); part of the compile-cache key.
_pdl_override: bool | None = None


def pdl_enabled() -> bool:
    if _pdl_override is not None:
        return _pdl_override
    return os.environ.get("SPARKINFER_PDL", "1") not in ("0", "false", "no")


def set_pdl(enabled: bool | None) -> None:
    global _pdl_override
    _pdl_override = enabled
