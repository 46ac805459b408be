"""The GPU runners' launches against the kernels' compile signatures, on the CPU.

A launch passes its arguments positionally to the compiled function, so a swapped pointer or a wrong dtype or
alignment would only show on the GPU (as a wrong result, a fault, or a rejected call). Here device memory is faked
(host arrays with fake addresses), ``cute.compile`` is replaced by a recorder of the arguments each kernel's own
``compile_*`` function compiles with, and every candidate's launch of every op is checked position by position
against them: same count, pointer dtype and assumed alignment, scalar types, and the stream last."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sparkinfer_cute.autotune.registry import TuneContext, get_op

CTX = TuneContext(sm_count=132, smem_budget=101376, l2_bytes=1 << 20)
STREAM = object()


class FakeDeviceArray:
    _addr = itertools.count(1 << 20, 1 << 12)  # 4 KiB-aligned fake addresses

    def __init__(self, shape, dtype=np.float32):
        self.host = np.zeros(shape, dtype)
        self.shape, self.dtype, self.nbytes = self.host.shape, self.host.dtype, self.host.nbytes
        self.ptr = next(self._addr)

    @classmethod
    def empty(cls, shape, dtype=np.float32):
        return cls(shape, dtype)

    @classmethod
    def zeros(cls, shape, dtype=np.float32, stream=None):
        return cls(shape, dtype)

    @classmethod
    def from_numpy(cls, arr, stream=None):
        a = cls(np.shape(arr), np.asarray(arr).dtype)
        a.host[...] = arr
        return a

    def copy_from_numpy(self, arr, stream=None):
        self.host[...] = np.asarray(arr).reshape(self.shape)

    def fill_bytes(self, value, stream=None):
        self.host.view(np.uint8)[...] = value
        return self

    def to_numpy(self, stream=None):
        return self.host.copy()


class FakeStream:
    cu = STREAM

    def synchronize(self):
        pass


class Recorder:
    """What ``cute.compile`` returns here: checks each launch against the compile-time arguments."""

    launches: list = []

    def __init__(self, kernel, compile_args):
        self.kernel, self.compile_args = kernel, compile_args

    def __call__(self, *args):
        from cutlass import cute

        name = type(self.kernel).__name__
        assert len(args) == len(self.compile_args), f"{name}: {len(args)} launch args, compiled with " \
                                                     f"{len(self.compile_args)}"
        for i, (got, want) in enumerate(zip(args, self.compile_args)):
            where = f"{name} argument {i}"
            if isinstance(want, cute.runtime._Pointer):
                assert isinstance(got, cute.runtime._Pointer), f"{where}: {got!r} is not a pointer"
                assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != compiled {want.dtype}"
                assert got._assumed_align == want._assumed_align, f"{where}: align {got._assumed_align} != " \
                                                                  f"{want._assumed_align}"
            elif type(want).__name__ == "_FakeStream":
                assert got is STREAM, f"{where}: {got!r} is not the runner's stream"
            else:
                assert type(got) is type(want), f"{where}: {type(got).__name__} != compiled {type(want).__name__}"
        Recorder.launches.append(name)


@pytest.fixture
def fake_gpu(monkeypatch):
    import cutlass.cute as cute

    import sparkinfer_cute.runtime as rt
    from sparkinfer_cute.autotune.ops import attention, gemv, moe_ffn, quant_gemm

    monkeypatch.setattr(rt, "DeviceArray", FakeDeviceArray)
    monkeypatch.setattr(rt, "Stream", FakeStream)
    monkeypatch.setattr(cute, "compile", lambda kernel, *args, options=None: Recorder(kernel, args))

    class FakeQ8:
        def __init__(self, x, stream=None):
            rows = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
            n = x.shape[-1]
            self.rows, self.n = rows, n
            self.qs = FakeDeviceArray((rows, n), np.int8)
            self.d = FakeDeviceArray((rows, n // 32), np.float32)
            self.s = FakeDeviceArray((rows, n // 32), np.float32)

    for mod in (gemv, moe_ffn, attention, quant_gemm):
        b = mod._bind()
        for name in list(vars(b)):
            if name.startswith("compile_"):  # bypass the in-process memo: nothing fake must stay cached
                monkeypatch.setattr(b, name, getattr(b, name).uncached)
        if hasattr(b, "quantize_q8_1"):
            monkeypatch.setattr(b, "quantize_q8_1", FakeQ8)
    Recorder.launches = []
    return Recorder


CASES = [
    ("gemv", dict(qtype="Q4_K", n_in=1024, n_out=512)),
    ("gemv", dict(qtype="Q5_0", n_in=640, n_out=256)),
    ("gemv_q8", dict(qtype="Q6_K_P", n_in=1024, n_out=640)),
    ("gemv_q8", dict(qtype="Q8_0", n_in=640, n_out=256)),
    ("moe_gate_up", dict(qtype="Q4_K", n_in=1024, n_ff=256, n_expert=8, k=4, fused=False)),
    ("moe_gate_up", dict(qtype="Q5_0", n_in=384, n_ff=128, n_expert=8, k=4, fused=True)),
    ("moe_gate_up_q8", dict(qtype="Q4_K", n_in=1024, n_ff=256, n_expert=8, k=4, fused=True)),
    ("moe_down", dict(qtype="Q6_K_P", n_ff=256, n_out=256, n_expert=8, k=4)),
    ("moe_down_q8", dict(qtype="Q4_K", n_ff=256, n_out=256, n_expert=8, k=4)),
    ("moe_down_q8", dict(qtype="Q8_0", n_ff=384, n_out=128, n_expert=8, k=4)),
    ("attention_decode", dict(n_head=8, n_kv_head=2, head_dim=64, ctx=256)),
    ("quant_gemm", dict(qtype="Q4_K", n_in=512, n_out=256, tokens=32, n_expert=0, k=0, act="none")),
    ("quant_gemm", dict(qtype="Q5_0", n_in=640, n_out=128, tokens=32, n_expert=0, k=0, act="gelu_tanh")),
    ("quant_gemm", dict(qtype="Q4_K", n_in=256, n_out=128, tokens=32, n_expert=8, k=2, act="silu")),
    ("quant_gemm", dict(qtype="Q6_K_P", n_in=256, n_out=128, tokens=32, n_expert=8, k=2, act="none")),
]


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_candidate_launches_with_its_compile_signature(fake_gpu, name, shape):
    op = get_op(name)
    _, cands, _ = op.candidates(shape, CTX)
    if name == "quant_gemm":
        cands = cands[:6]  # the tile grid repeats the same launch; a few cover stages and both tile axes
    runner = op.build(shape, CTX)
    assert runner.n_sets >= 1
    for c in cands:
        for i in {0, runner.n_sets - 1}:
            runner.launcher(c, i)()
        out = runner.run(c)  # poisons, launches set 0, reads the output back
        assert np.isnan(out).all()  # the fake launch wrote nothing: every element is still poisoned
        assert runner.check(c, out) is not None
    assert len(fake_gpu.launches) == len(cands) * (len({0, runner.n_sets - 1}) + 1)
