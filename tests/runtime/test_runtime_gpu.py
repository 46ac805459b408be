"""Runtime on a real GPU: memory, copies, poison, views, streams/events, graphs, interop, OOM."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from sparkinfer_cute import runtime as rt
from sparkinfer_cute.errors import DeviceError, DeviceOutOfMemoryError

pytestmark = pytest.mark.gpu


def test_device_properties():
    d = rt.get_device()
    assert d.capability[0] >= 9 and d.sm_count > 0 and d.total_memory > 2**30
    assert d.target in ("sm_90a", "sm_120a", "sm_121a")
    assert d.smem_per_block_optin >= 99 * 1024
    assert 0 < d.free_memory() <= d.total_memory
    assert rt.current_device_capability() == d.capability


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.uint8])
def test_roundtrip_sync_and_async(dtype, rng):
    x = (rng.standard_normal((37, 11)) * 50).astype(dtype)
    a = rt.DeviceArray.from_numpy(x)
    assert a.shape == x.shape and a.dtype == x.dtype and a.nbytes == x.nbytes and a.ptr % 256 == 0
    np.testing.assert_array_equal(a.to_numpy(), x)
    s = rt.Stream()
    b = rt.DeviceArray.empty(x.shape, dtype)
    b.copy_from_numpy(x, stream=s)
    np.testing.assert_array_equal(b.to_numpy(stream=s), x)
    c = rt.DeviceArray.empty(x.shape, dtype).copy_from(a, stream=s)
    s.synchronize()
    np.testing.assert_array_equal(c.to_numpy(), x)


def test_poison_zeros_views_and_rows():
    a = rt.DeviceArray.empty((4, 8), np.float32).fill_bytes(0xFF)
    assert np.isnan(a.to_numpy()).all()
    assert (a.view(np.int32).to_numpy() == -1).all()
    z = rt.DeviceArray.zeros((5,), np.int32)
    assert (z.to_numpy() == 0).all()
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    a.copy_from_numpy(x)
    np.testing.assert_array_equal(a[2].to_numpy(), x[2])
    np.testing.assert_array_equal(a[1:3].to_numpy(), x[1:3])
    assert a[1].ptr == a.ptr + 32
    np.testing.assert_array_equal(a.reshape(8, 4).to_numpy(), x.reshape(8, 4))
    np.testing.assert_array_equal(a.view(np.uint8).to_numpy(), x.view(np.uint8).ravel())


def test_memory_is_freed_on_gc():
    d = rt.get_device()
    gc.collect()
    rt.synchronize()
    n = 512 * 2**20
    free0 = d.free_memory()
    a = rt.DeviceArray.empty((n,), np.uint8)
    assert d.free_memory() <= free0 - n + 2**21
    del a
    gc.collect()
    assert d.free_memory() >= free0 - 2**21


def test_oom_is_clear():
    total = rt.get_device().total_memory
    with pytest.raises(DeviceOutOfMemoryError, match="free device memory"):
        rt.DeviceArray.empty((total + 2**30,), np.uint8)


def test_events_time_work():
    s = rt.Stream()
    a = rt.DeviceArray.empty((64 * 2**20,), np.uint8)
    e0, e1 = rt.Event(), rt.Event()
    e0.record(s)
    for _ in range(10):
        a.fill_bytes(3, stream=s)
    e1.record(s)
    ms = rt.elapsed_ms(e0, e1)
    assert ms > 0.0 and e1.query()


def test_graph_capture_replay():
    s = rt.Stream()
    a = rt.DeviceArray.empty((1000,), np.uint8)
    b = rt.DeviceArray.empty((1000,), np.uint8)
    a.fill_bytes(0, stream=s)
    s.synchronize()
    with rt.CudaGraph.capture(s) as g:
        a.fill_bytes(7, stream=s)
        b.copy_from(a, stream=s)
    g.keep(a, b)
    b.fill_bytes(0)
    g.replay(s)
    s.synchronize()
    assert (b.to_numpy() == 7).all()
    a.fill_bytes(1, stream=s)
    g.replay()
    assert (a.to_numpy(stream=s) == 7).all()


def test_graph_rejects_null_stream():
    with pytest.raises(DeviceError):
        with rt.CudaGraph.capture(rt.Stream.wrap(0)):
            pass


def test_workspace_reuses_by_size_and_tag():
    ws = rt.Workspace()
    a = ws.get((100,), np.float32, tag="x")
    b = ws.get((90,), np.float32, tag="x")  # same 512 B size class
    c = ws.get((100,), np.float32, tag="y")
    d = ws.get((1000,), np.float32, tag="x")
    assert a.ptr == b.ptr and a.ptr != c.ptr and d.ptr != a.ptr
    assert len(ws) == 3 and ws.nbytes == 512 + 512 + 4096


def test_as_device(rng):
    x = rng.standard_normal(10)
    a, was = rt.as_device(x, dtype=np.float32)
    assert was and a.dtype == np.float32
    np.testing.assert_array_equal(a.to_numpy(), x.astype(np.float32))
    b, was2 = rt.as_device(a)
    assert b is a and not was2
    with pytest.raises(TypeError):
        rt.as_device(a, dtype=np.int32)


def test_cuda_array_interface():
    a = rt.DeviceArray.empty((3, 4), np.float16)
    cai = a.__cuda_array_interface__
    assert cai["shape"] == (3, 4) and cai["typestr"] == "<f2" and cai["data"] == (a.ptr, False)


def test_dlpack_with_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((6, 5)).astype(np.float32)
    a = rt.DeviceArray.from_numpy(x)
    t = torch.from_dlpack(a)
    assert t.is_cuda and tuple(t.shape) == (6, 5) and t.data_ptr() == a.ptr
    np.testing.assert_array_equal(t.cpu().numpy(), x)
    t.mul_(2)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(a.to_numpy(), 2 * x)


def test_dlpack_with_cupy():
    cp = pytest.importorskip("cupy")
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    a = rt.DeviceArray.from_numpy(x)
    np.testing.assert_array_equal(cp.asnumpy(cp.from_dlpack(a)), x)
    np.testing.assert_array_equal(cp.asnumpy(cp.asarray(a)), x)  # via __cuda_array_interface__
