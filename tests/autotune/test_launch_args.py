"""The GPU runners' launches against the kernels' compile signatures, on the CPU.

A launch passes its arguments positionally to the compiled function, so a swapped pointer or a wrong dtype or
alignment would only show on the GPU (as a wrong result, a fault, or a rejected call). Here device memory is faked
(host arrays with fake addresses), ``cute.compile`` is replaced by a recorder of the arguments each kernel's own
``compile_*`` function compiles with, and every candidate's launch of every op is checked position by position
against them: same count, pointer dtype and assumed alignment, scalar types, and the stream last. The launch's
arguments are also named by the kernel's ``__call__`` parameters, so the runner's buffers and sizes can be checked
where they land (the output, the weights, the activations, n_out / n_slots / n_rows): two pointers of one dtype or
two Int32 scalars swapped pass the signature check but not this one."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from sparkinfer_cute.autotune.registry import TuneContext, get_op
from sparkinfer_cute.runtime.testing import HostDeviceArray

CTX = TuneContext(sm_count=132, smem_budget=101376, l2_bytes=1 << 20)
STREAM = object()


FakeDeviceArray = HostDeviceArray  # host memory at fake 4 KiB-aligned addresses


class FakeStream:
    cu = STREAM

    def synchronize(self):
        pass


class Recorder:
    """What ``cute.compile`` returns here: checks each launch against the compile-time arguments."""

    launches: list = []
    named: list = []  # per launch: {parameter of the kernel's __call__: launch argument}

    def __init__(self, kernel, compile_args):
        self.kernel, self.compile_args = kernel, compile_args
        self.params = [p for p in inspect.signature(type(kernel).__call__).parameters if p != "self"]
        assert len(self.params) == len(compile_args), f"{type(kernel).__name__}: compiled with " \
                                                       f"{len(compile_args)} args for {len(self.params)} parameters"

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
        Recorder.named.append(dict(zip(self.params, args)))


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
    Recorder.named = []
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
    ("attention_decode", dict(n_head=8, n_kv_head=2, head_dim=64, qk_rot=0, ctx=256)),
    ("attention_decode", dict(n_head=8, n_kv_head=2, head_dim=128, qk_rot=128, ctx=256)),  # the Q/K prologue inside
    ("attention_decode", dict(n_head=16, n_kv_head=2, head_dim=512, qk_rot=128, ctx=128)),  # partial rotary, hd 512
    # Gemma 4's global layers: V norm and theta divisors compiled in, the divisors read from the runner's buffer
    ("attention_decode", dict(n_head=16, n_kv_head=2, head_dim=512, qk_rot=128, ctx=128, v_norm=True,
                              qk_freq_factors=True)),
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


def _value(a):
    """A launch argument as a plain int/float: a pointer's address, an Int32/Float32's value."""
    from cutlass import cute

    if isinstance(a, cute.runtime._Pointer):
        return a._pointer
    return a.value


def _expected(name, shape, r) -> dict:
    """{kernel parameter: the values the runner ``r`` may pass there} (addresses of its fake device buffers)."""

    def ptrs(arrays):
        return {a.ptr for a in arrays}

    if name.startswith("gemv"):
        e = dict(pW=ptrs(r.ws), pY={r.y.ptr}, n_out={shape["n_out"]}, n_slots={1})
        if r.q8:
            e.update(pXq={r.xq.qs.ptr}, pXd={r.xq.d.ptr}, pXs={r.xq.s.ptr})
        else:
            e.update(pX={r.x.ptr})
        return e
    if name.startswith("moe_gate_up"):
        e = dict(pWg=ptrs(m[0] for m in r.dev_mats), pWu=ptrs(m[-1] for m in r.dev_mats), pIds=ptrs(r.dev_ids),
                 pAct={r.act.ptr}, n_slots={shape["k"]})
        e.update(dict(pXq={r.hq.qs.ptr}, pXd={r.hq.d.ptr}, pXs={r.hq.s.ptr}) if r.q8 else dict(pX={r.h.ptr}))
        return e
    if name.startswith("moe_down"):
        e = dict(pW=ptrs(m[0] for m in r.dev_mats), pIds=ptrs(r.dev_ids), pWeights={r.wts.ptr}, pY={r.y.ptr},
                 n_slots={shape["k"]})
        e.update(dict(pAq={r.actq.qs.ptr}, pAd={r.actq.d.ptr}, pAs={r.actq.s.ptr}) if r.q8 else
                 dict(pAct={r.act.ptr}))
        return e
    if name == "attention_decode":
        e = dict(pQ={r.q.ptr}, pK={r.k.ptr}, pV={r.v.ptr}, pPageTable=ptrs(r.tables), pPos={r.pos.ptr},
                 pOut={r.out.ptr}, pCounters={r.counters.ptr}, batch={1}, pages_per_seq={r.problem.pages},
                 n_pages={r.problem.pages * r.n_sets})
        if shape["qk_rot"]:  # the prologue reads this token's k/v and the norm weights from the runner's buffers
            e.update({n: {a.ptr} for n, a in zip(("pKNew", "pVNew", "pQNorm", "pKNorm"), r.prologue)})
        if shape.get("qk_freq_factors"):  # ... and the theta divisors
            assert r.freq_factors is not r.counters
            e.update(pFF={r.freq_factors.ptr})
        return e
    assert name == "quant_gemm"
    e = dict(pW=ptrs(m[0] for m in r.dev_mats), pW2=ptrs(m[-1] for m in r.dev_mats), pXq={r.xq.qs.ptr},
             pXd={r.xq.d.ptr}, pXs={r.xq.s.ptr}, pY={r.y.ptr}, n_rows={r.n_rows}, n_out={shape["n_out"]})
    if r.row_index is not None:
        e.update(pRowIndex={r.row_index.ptr})
    return e


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_launch_arguments_land_on_the_right_parameters(fake_gpu, name, shape):
    op = get_op(name)
    _, cands, _ = op.candidates(shape, CTX)
    runner = op.build(shape, CTX)
    want = _expected(name, shape, runner)
    for c in cands:
        fake_gpu.named = []
        runner.launcher(c, runner.n_sets - 1)()
        (got,) = fake_gpu.named
        for param, allowed in want.items():
            if param in got:  # a parameter of one mapping only (pXs: slice kernels; n_slots: not the chunk down)
                assert _value(got[param]) in allowed, f"{name} {c}: {param} = {_value(got[param])}, " \
                                                      f"expected one of {sorted(allowed)}"
        # the parameters every kernel of the op takes
        core = {"gemv": {"pW", "pY", "n_out"}, "moe_gate_up": {"pWg", "pAct", "n_slots"}, "moe_down": {"pW", "pY"},
                "attention_decode": {"pQ", "pOut"}, "quant_gemm": {"pW", "pY", "n_rows", "n_out"}}
        assert core[name.removesuffix("_q8")] <= set(got), sorted(got)
