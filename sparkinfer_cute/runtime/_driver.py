"""Lazy access to the CUDA driver API (``cuda.bindings.driver``) and CUresult checking.

Importing this package never touches ``libcuda``: the bindings load the driver library on the first call, so every
call goes through :func:`driver` / :func:`check` only when a GPU is actually used. On a machine without a driver
(the CI box) ``cuInit`` raises ``DynamicLibNotFoundError``; :func:`init_driver` turns that into :class:`DeviceError`.
"""

from __future__ import annotations

import threading

from ..errors import DeviceError, DeviceOutOfMemoryError

_init_lock = threading.Lock()
_init_state: dict = {"done": False, "error": None}


def driver():
    """The ``cuda.bindings.driver`` module (import is cheap and does not load libcuda)."""
    from cuda.bindings import driver as cu

    return cu


def error_name(err) -> str:
    cu = driver()
    try:
        rc, name = cu.cuGetErrorName(err)
        if rc == cu.CUresult.CUDA_SUCCESS and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    return getattr(err, "name", str(err))


def error_string(err) -> str:
    cu = driver()
    try:
        rc, s = cu.cuGetErrorString(err)
        if rc == cu.CUresult.CUDA_SUCCESS and s:
            return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:
        pass
    return ""


def check(result, what: str = "CUDA driver call"):
    """Unpack a cuda-python result ``(CUresult, *values)`` (or a bare ``CUresult``).

    Returns None / the single value / a tuple of values; raises :class:`DeviceError` (or
    :class:`DeviceOutOfMemoryError` for ``CUDA_ERROR_OUT_OF_MEMORY``) carrying the error name, e.g.
    ``cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY (out of memory)``.
    """
    cu = driver()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cu.CUresult.CUDA_SUCCESS:
        name, desc = error_name(err), error_string(err)
        msg = f"{what}: {name}" + (f" ({desc})" if desc else "")
        if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise DeviceOutOfMemoryError(msg)
        raise DeviceError(msg)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def init_driver() -> None:
    """``cuInit(0)`` once per process; raises DeviceError (remembered) when there is no usable driver."""
    if _init_state["done"]:
        if _init_state["error"] is not None:
            raise DeviceError(_init_state["error"])
        return
    with _init_lock:
        if not _init_state["done"]:
            try:
                check(driver().cuInit(0), "cuInit")
            except DeviceError as e:
                _init_state["error"] = str(e)
            except Exception as e:  # DynamicLibNotFoundError (no libcuda), ImportError, ...
                _init_state["error"] = f"no CUDA driver: {type(e).__name__}: {e}"
            _init_state["done"] = True
    if _init_state["error"] is not None:
        raise DeviceError(_init_state["error"])
