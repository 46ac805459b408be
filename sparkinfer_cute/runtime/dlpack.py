"""A minimal DLPack producer (legacy unversioned ``DLManagedTensor`` in a ``"dltensor"`` PyCapsule) via ctypes.

Protocol (dlpack.h v0.8 / array-API ``__dlpack__``): the capsule owns one ``DLManagedTensor``; a consumer renames the
capsule to ``"used_dltensor"`` and calls ``deleter`` when done; an unconsumed capsule calls ``deleter`` from its
destructor. The ``DLManagedTensor``, its shape/strides arrays and a reference to the owner (the DeviceArray, so the
device memory outlives every consumer) live in ``_LIVE`` until ``deleter`` runs.
"""

from __future__ import annotations

import ctypes

import numpy as np

KDL_CPU = 1
KDL_CUDA = 2

_c_int64_p = ctypes.POINTER(ctypes.c_int64)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", _c_int64_p),
        ("strides", _c_int64_p),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


_DELETER_T = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER_T)]

# DLDataTypeCode: kDLInt=0, kDLUInt=1, kDLFloat=2, kDLBfloat=4, kDLBool=6
_KIND_CODE = {"i": 0, "u": 1, "f": 2, "b": 6}

_LIVE: dict[int, tuple] = {}  # address of DLManagedTensor -> (struct, shape arr, strides arr, owner)


def dl_dtype(dtype) -> DLDataType:
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":  # ml_dtypes
        return DLDataType(4, 16, 1)
    if dt.kind not in _KIND_CODE:
        raise BufferError(f"dtype {dt} has no DLPack equivalent")
    return DLDataType(_KIND_CODE[dt.kind], dt.itemsize * 8, 1)


def _deleter(mt_ptr) -> None:
    _LIVE.pop(ctypes.addressof(mt_ptr.contents), None)


_DELETER = _DELETER_T(_deleter)

_CAPSULE_NAME = b"dltensor"
# A private handle: setting argtypes on ctypes.pythonapi's shared function objects would leak into other code.
_capi = ctypes.PyDLL(None)
_capi.PyCapsule_New.restype = ctypes.py_object
_capi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capi.PyCapsule_IsValid.restype = ctypes.c_int
_capi.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_capi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_capi.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


def _capsule_destructor(capsule) -> None:
    # Still named "dltensor" = never consumed: we must release it ourselves.
    if _capi.PyCapsule_IsValid(capsule, _CAPSULE_NAME):
        addr = _capi.PyCapsule_GetPointer(capsule, _CAPSULE_NAME)
        _LIVE.pop(addr, None)


_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_capsule_destructor)


def make_capsule(data_ptr: int, shape, dtype, device_type: int, device_id: int, owner):
    """A ``"dltensor"`` capsule describing a C-contiguous array at ``data_ptr`` (kept alive through ``owner``)."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    strides.reverse()
    shape_arr = (ctypes.c_int64 * max(ndim, 1))(*shape)
    strides_arr = (ctypes.c_int64 * max(ndim, 1))(*strides)
    mt = DLManagedTensor()
    mt.dl_tensor.data = data_ptr or None
    mt.dl_tensor.device = DLDevice(device_type, device_id)
    mt.dl_tensor.ndim = ndim
    mt.dl_tensor.dtype = dl_dtype(dtype)
    mt.dl_tensor.shape = ctypes.cast(shape_arr, _c_int64_p)
    mt.dl_tensor.strides = ctypes.cast(strides_arr, _c_int64_p)
    mt.dl_tensor.byte_offset = 0
    mt.manager_ctx = None
    mt.deleter = _DELETER
    addr = ctypes.addressof(mt)
    _LIVE[addr] = (mt, shape_arr, strides_arr, owner)
    return _capi.PyCapsule_New(addr, _CAPSULE_NAME, ctypes.cast(_CAPSULE_DESTRUCTOR, ctypes.c_void_p))


def live_count() -> int:
    """Number of exported, not yet released tensors (for leak tests)."""
    return len(_LIVE)
