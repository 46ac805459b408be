"""The norm-chain tails' launch arguments, on the CPU (kernels/norm_chain.py ``FfnTailArgs`` / ``AttnTailArgs``).

A tail reaches its chain through 12 generic pointer parameters (``t0`` .. ``t11`` of the host kernel's ``__call__``,
``p0`` .. ``p11`` of ``RowNormChain.tail``), each meaning what the chain's ``body`` names it. A pointer in the wrong
place would only show on the GPU. Here device memory is faked (DeviceArrays over fake allocations),
``cute.compile`` records the kernel and its compile-time arguments, and the kernel wrappers' launches with a tail are
checked: the same count, pointer dtypes and assumed alignments as compiled, the stream last, and every tail argument
landing on the chain-body parameter that reads it (the matmul's own output on ``o`` / ``f`` / ``y``); the compiled
chain's static flags are the ones the arguments ask for. The slice GEMV's second matrix (``pW2``) likewise."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

from sparkinfer_cute.kernels.quant_decode import spec


class FakeAlloc:
    _addr = itertools.count(1 << 20, 1 << 12)  # 4 KiB-aligned fake addresses

    def __init__(self, nbytes):
        self.nbytes, self.ptr = nbytes, next(self._addr)


def fdev(shape, dtype=np.float32):
    from sparkinfer_cute.runtime import DeviceArray

    shape = (shape,) if isinstance(shape, int) else shape
    return DeviceArray(shape, dtype, _alloc=FakeAlloc(int(np.prod(shape)) * np.dtype(dtype).itemsize))


def fq8(n):
    from sparkinfer_cute.kernels.q8_1 import Q8Act

    q = Q8Act.__new__(Q8Act)
    q.rows, q.n = 1, n
    q.qs, q.d, q.s = fdev((1, n), np.int8), fdev((1, n // 32)), fdev((1, n // 32))
    return q


class FakeStream:
    handle = 0


class Recorder:
    calls: list = []

    def __init__(self, kernel, compile_args):
        self.kernel, self.compile_args = kernel, compile_args
        self.params = [p for p in inspect.signature(type(kernel).__call__).parameters if p != "self"]
        assert len(self.params) == len(compile_args)

    def __call__(self, *args):
        from cutlass import cute

        assert len(args) == len(self.compile_args)
        for i, (got, want) in enumerate(zip(args, self.compile_args)):
            if isinstance(want, cute.runtime._Pointer):
                assert isinstance(got, cute.runtime._Pointer), (i, got)
                assert (got.dtype, got._assumed_align) == (want.dtype, want._assumed_align), (self.params[i], got, want)
            elif type(want).__name__ != "_FakeStream":
                assert type(got) is type(want), (self.params[i], got, want)
        assert self.params[-1] == "stream"
        Recorder.calls.append((self.kernel, dict(zip(self.params, args))))


@pytest.fixture
def fake_compile(monkeypatch):
    import cutlass.cute as cute

    from sparkinfer_cute.kernels import gemv, moe_ffn

    monkeypatch.setattr(cute, "compile", lambda kernel, *args, options=None: Recorder(kernel, args))
    for mod, names in ((moe_ffn, ("compile_moe_down_chunk", "compile_moe_down")),
                       (gemv, ("compile_gemv_chunk", "compile_gemv"))):
        for name in names:  # bypass the memo and the disk cache: a recorder must not be cached
            monkeypatch.setattr(mod, name, getattr(mod, name).uncached)
    Recorder.calls = []
    return Recorder


def _addr(a):
    from cutlass import cute

    return a._pointer if isinstance(a, cute.runtime._Pointer) else a.value


def _recorded_tail(fake_compile):
    """(the compiled chain, {chain body parameter: launch value}, {host kernel parameter: launch argument}) of the
    one recorded launch, its tail arguments named by the chain body's parameters (+ counter, eps)."""
    (kernel, named), = fake_compile.calls
    body = [p for p in inspect.signature(type(kernel.tail).body).parameters if p != "self"][:12]
    got = {name: _addr(named[f"t{i}"]) for i, name in enumerate(body)}
    got["counter"], got["eps"] = _addr(named["tCnt"]), _addr(named["eps"])
    return kernel.tail, got, named


def _experts(q, E, n_out, n_ff):
    return fdev((E * n_out * spec(q).row_bytes(n_ff),), np.uint8)


@pytest.mark.parametrize("q,n_ff,n_out,k,q8", [("Q4_K", 768, 2048, 8, True), ("Q4_K", 256, 256, 4, False),
                                              ("Q8_0", 160, 256, 4, True)])
def test_moe_down_residual_tail_arguments(fake_compile, q, n_ff, n_out, k, q8):
    """Qwen's form: x += y; h = rmsnorm(x) * w_next (+ q8_1): the chain reads the kernel's own output as f."""
    from sparkinfer_cute.kernels.moe_ffn import moe_down
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs

    y, x, h, w_next, counter = fdev(n_out), fdev(n_out), fdev(n_out), fdev(n_out), fdev(1, np.int32)
    xq = fq8(n_out) if q8 else None
    act = fq8(n_ff) if q8 else fdev((k, n_ff))
    if q8:
        act.rows, act.qs, act.d, act.s = k, fdev((k, n_ff), np.int8), fdev((k, n_ff // 32)), fdev((k, n_ff // 32))
    tail = FfnTailArgs(y, None, None, None, None, x, None, 1e-6, counter, (w_next, h, xq), post_norm=False)
    moe_down(_experts(q, 16, n_out, n_ff), q, act, fdev(k, np.int32), fdev(k), n_out, out=y, stream=FakeStream(),
             tail=tail)
    chain, got, named = _recorded_tail(fake_compile)
    assert (chain.has_experts, chain.next_norm, chain.next_q8, chain.post_norm) == (False, True, q8, False)
    assert chain.N == n_out and chain.threads == 128 and chain.in_tail
    assert got["pF"] == y.ptr == _addr(named["pY"])  # the chain's input is the kernel's own output
    assert (got["pX"], got["pWn"], got["pH"], got["counter"]) == (x.ptr, w_next.ptr, h.ptr, counter.ptr)
    if q8:
        assert (got["pQ"], got["pD"], got["pS"]) == (xq.qs.ptr, xq.d.ptr, xq.s.ptr)
    assert got["eps"] == pytest.approx(1e-6)


@pytest.mark.parametrize("q,n_ff,n_out,k", [("Q8_0", 704, 2816, 8), ("Q4_K", 768, 2048, 8)])
def test_moe_down_post_ffn_tail_arguments(fake_compile, q, n_ff, n_out, k):
    """Gemma 4's form: the post-FFN chain on f (the dense MLP's output) and y (the kernel's own output)."""
    from sparkinfer_cute.kernels.moe_ffn import moe_down
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs

    f, y, w1, w2, w, x, h, w_next = (fdev(n_out) for _ in range(8))
    scale, counter, xq = fdev(1), fdev(1, np.int32), fq8(n_out)
    act = fdev((k, n_ff))
    tail = FfnTailArgs(f, y, w1, w2, w, x, scale, 1e-5, counter, (w_next, h, xq))
    moe_down(_experts(q, 16, n_out, n_ff), q, act, fdev(k, np.int32), fdev(k), n_out, out=y, stream=FakeStream(),
             tail=tail)
    chain, got, named = _recorded_tail(fake_compile)
    assert (chain.has_experts, chain.next_norm, chain.next_q8, chain.post_norm) == (True, True, True, True)
    assert got["pY"] == y.ptr == _addr(named["pY"])
    want = dict(pF=f, pW1=w1, pW2=w2, pW=w, pX=x, pScale=scale, pWn=w_next, pH=h, pQ=xq.qs, pD=xq.d, pS=xq.s)
    assert {k_: got[k_] for k_ in want} == {k_: a.ptr for k_, a in want.items()}
    assert got["counter"] == counter.ptr


@pytest.mark.parametrize("q,n_in,n_out,n_outs,q8,mapping", [("Q4_K", 4096, 2816, 3, True, "chunk"),
                                                            ("Q4_K", 1024, 640, 1, False, "chunk"),
                                                            ("Q4_K", 256, 256, 3, True, "slice")])
def test_gemv_post_attention_tail_arguments(fake_compile, q, n_in, n_out, n_outs, q8, mapping):
    """Gemma's O projection: post_attention_norms on o (the kernel's own output), 1 or 3 outputs."""
    from sparkinfer_cute.kernels.gemv import gemv
    from sparkinfer_cute.kernels.norm_chain import AttnTailArgs

    o, x, w_post, counter = fdev(n_out), fdev(n_out), fdev(n_out), fdev(1, np.int32)
    ws, outs = [fdev(n_out) for _ in range(n_outs)], [fdev(n_out) for _ in range(n_outs)]
    xq = fq8(n_out) if q8 else None
    a = fq8(n_in) if q8 else fdev(n_in)
    tail = AttnTailArgs(o, x, w_post, list(zip(ws, outs)), 1e-6, counter, xq)
    gemv(fdev((n_out * spec(q).row_bytes(n_in),), np.uint8), q, a, n_out=n_out, out=o, stream=FakeStream(),
         mapping=mapping, rows_per_warp=1 if mapping == "chunk" else None, warps_per_row=None if q8 else 1,
         tail=tail)
    chain, got, named = _recorded_tail(fake_compile)
    assert (chain.N, chain.n_out, chain.q8_last, chain.in_tail) == (n_out, n_outs, q8, True)
    assert got["pO"] == o.ptr == _addr(named["pY"])
    assert (got["pX"], got["pWpost"], got["counter"]) == (x.ptr, w_post.ptr, counter.ptr)
    for i in range(n_outs):
        assert (got[f"pW{i}"], got[f"pOut{i}"]) == (ws[i].ptr, outs[i].ptr)
    if q8:
        assert (got["pQ"], got["pD"], got["pS"]) == (xq.qs.ptr, xq.d.ptr, xq.s.ptr)


def test_a_tail_must_read_the_kernels_own_output(fake_compile):
    from sparkinfer_cute.kernels.gemv import gemv
    from sparkinfer_cute.kernels.norm_chain import AttnTailArgs

    o, other = fdev(640), fdev(640)
    tail = AttnTailArgs(other, fdev(640), fdev(640), [(fdev(640), fdev(640))], 1e-6, fdev(1, np.int32))
    with pytest.raises(ValueError, match="output of the kernel that runs it"):
        gemv(fdev((640 * spec("Q4_K").row_bytes(1024),), np.uint8), "Q4_K", fdev(1024), n_out=640, out=o,
             stream=FakeStream(), rows_per_warp=1, tail=tail)


@pytest.mark.parametrize("q1,n1,q2,n2,n_in,q8", [("Q4_K", 6144, "Q6_K_P", 2048, 2816, True),
                                                 ("Q5_0", 1280, "Q8_0", 256, 640, False)])
def test_gemv_second_matrix_arguments(fake_compile, q1, n1, q2, n2, n_in, q8):
    """The two-matrix slice launch (Gemv ``second``, models/ops.py fused_qkv_mixed): the second weight on ``pW2``,
    the output rows of both on ``n_out``, the split and the second type static; a second matrix of the wrong size
    is refused."""
    from sparkinfer_cute.kernels.gemv import gemv

    d1 = fdev((n1 * spec(q1).row_bytes(n_in),), np.uint8)
    d2 = fdev((n2 * spec(q2).row_bytes(n_in),), np.uint8)
    y = fdev(n1 + n2)
    gemv(d1, q1, fq8(n_in) if q8 else fdev(n_in), n_out=n1, out=y, stream=FakeStream(), warps_per_row=1,
         second=(d2, q2, n2))
    (kernel, named), = fake_compile.calls
    assert (kernel.second, kernel.split, kernel.mapping, kernel.q8) == (q2, n1, "slice", q8)
    assert (_addr(named["pW"]), _addr(named["pW2"]), _addr(named["pY"])) == (d1.ptr, d2.ptr, y.ptr)
    assert _addr(named["n_out"]) == n1 + n2
    short = fdev(((n2 - 32) * spec(q2).row_bytes(n_in),), np.uint8)  # a second weight of the wrong size
    with pytest.raises(ValueError, match="bytes"):
        gemv(d1, q1, fq8(n_in) if q8 else fdev(n_in), n_out=n1, out=y, stream=FakeStream(), warps_per_row=1,
             second=(short, q2, n2))


@pytest.mark.parametrize("q,n_in,n_out,mapping", [("Q4_K", 2048, 640, "chunk"), ("Q4_K", 768, 384, "slice")])
def test_gemv_post_ffn_tail_arguments(fake_compile, q, n_in, n_out, mapping):
    """Gemma 3's dense down projection: the post-FFN chain with the GEMV's own output as f, no experts."""
    from sparkinfer_cute.kernels.gemv import gemv
    from sparkinfer_cute.kernels.norm_chain import FfnTailArgs

    f, w, x, h, w_next, scale, counter = fdev(n_out), fdev(n_out), fdev(n_out), fdev(n_out), fdev(n_out), fdev(1), \
        fdev(1, np.int32)
    tail = FfnTailArgs(f, None, None, None, w, x, scale, 1e-6, counter, (w_next, h, None))
    gemv(fdev((n_out * spec(q).row_bytes(n_in),), np.uint8), q, fdev(n_in), n_out=n_out, out=f, stream=FakeStream(),
         mapping=mapping, rows_per_warp=1 if mapping == "chunk" else None, warps_per_row=1, tail=tail)
    chain, got, named = _recorded_tail(fake_compile)
    assert (chain.N, chain.has_experts, chain.next_norm, chain.next_q8, chain.post_norm) == (n_out, False, True,
                                                                                              False, True)
    assert got["pF"] == f.ptr == _addr(named["pY"])
    want = dict(pW=w, pX=x, pScale=scale, pWn=w_next, pH=h)
    assert {k: got[k] for k in want} == {k: a.ptr for k, a in want.items()}


def test_gemv_second_matrix_needs_room_for_both(fake_compile):
    from sparkinfer_cute.kernels.gemv import gemv

    d1 = fdev((1280 * spec("Q5_0").row_bytes(640),), np.uint8)
    d2 = fdev((256 * spec("Q8_0").row_bytes(640),), np.uint8)
    with pytest.raises(ValueError, match="1536 rows into a buffer of 1280"):
        gemv(d1, "Q5_0", fdev(640), n_out=1280, out=fdev(1280), stream=FakeStream(), warps_per_row=1,
             second=(d2, "Q8_0", 256))
