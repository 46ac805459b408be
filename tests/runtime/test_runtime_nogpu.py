"""Runtime behaviour that must hold on any machine (CI has no GPU and no libcuda)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sparkinfer_cute import runtime as rt
from sparkinfer_cute.errors import DeviceError, DeviceOutOfMemoryError
from sparkinfer_cute.runtime import dlpack as dl


def test_import_without_touching_the_driver():
    # A fresh interpreter: importing the runtime must not load libcuda or cutlass.
    code = ("import sys; import sparkinfer_cute.runtime as r; "
            "assert 'cutlass' not in sys.modules; print(type(r.device_available()).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "bool"


def test_capability_never_raises():
    cap = rt.current_device_capability()
    assert cap is None or (isinstance(cap, tuple) and len(cap) == 2)
    assert (cap is None) == (not rt.device_available())


@pytest.mark.skipif(rt.device_available(), reason="checks the no-GPU error path")
def test_get_device_without_gpu_raises_device_error():
    with pytest.raises(DeviceError):
        rt.get_device()
    with pytest.raises(DeviceError):
        rt.DeviceArray.empty((4,), np.float32)


def test_check_maps_cuda_errors():
    from cuda.bindings import driver as cu

    assert rt.check((cu.CUresult.CUDA_SUCCESS, 7)) == 7
    assert rt.check((cu.CUresult.CUDA_SUCCESS, 1, 2)) == (1, 2)
    assert rt.check(cu.CUresult.CUDA_SUCCESS) is None
    with pytest.raises(DeviceError, match="CUDA_ERROR_INVALID_VALUE"):
        rt.check((cu.CUresult.CUDA_ERROR_INVALID_VALUE, None), "cuFoo")
    with pytest.raises(DeviceOutOfMemoryError, match="cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY"):
        rt.check((cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc")


class _HostExporter:
    """Exports a numpy buffer through our DLPack capsule code with device_type kDLCPU, so numpy (an independent
    consumer) validates the struct layout, dtype codes, shape and strides without a GPU."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack__(self, **kwargs):
        return dl.make_capsule(self.arr.ctypes.data, self.arr.shape, self.arr.dtype, dl.KDL_CPU, 0, self.arr)

    def __dlpack_device__(self):
        return (dl.KDL_CPU, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.uint8, np.int64, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), ()])
def test_dlpack_capsule_roundtrip_through_numpy(dtype, shape, rng):
    src = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    before = dl.live_count()
    got = np.from_dlpack(_HostExporter(src))
    assert got.shape == src.shape and got.dtype == src.dtype
    np.testing.assert_array_equal(got, src)
    assert got.ctypes.data == src.ctypes.data  # zero-copy
    del got
    import gc

    gc.collect()
    assert dl.live_count() == before  # the consumer called our deleter


def test_unconsumed_capsule_is_released():
    arr = np.arange(6, dtype=np.float32)
    before = dl.live_count()
    cap = dl.make_capsule(arr.ctypes.data, arr.shape, arr.dtype, dl.KDL_CPU, 0, arr)
    assert dl.live_count() == before + 1
    assert type(cap).__name__ == "PyCapsule"
    del cap
    assert dl.live_count() == before


def test_dlpack_rejects_unknown_dtype():
    with pytest.raises(BufferError):
        dl.dl_dtype(np.dtype("U3"))

