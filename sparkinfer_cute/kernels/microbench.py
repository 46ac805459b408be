"""GPU microbenchmark of the decode GEMV / MoE kernels at the real Qwen3-30B-A3B shapes (and, with --attention /
--router / --prefill-attention / --prefill-gemm / --mma-peak / --tails / --routed, of the split-KV decode attention,
the fused router, the flash prefill attention, the prefill GEMM, this GPU's mma.sync rate (the prefill kernels' % of
peak), the norm-chain tails and the routed experts' one launch). Every kernel's benchmark lives here, none in the kernel files.

    python -m sparkinfer_cute.kernels.microbench [--json out.json] [--reps 50] [--only gemv]
    python -m sparkinfer_cute.kernels.microbench --attention [--ctx 512 4096 32768] [--splits N] [--fused] [--prologue]
    python -m sparkinfer_cute.kernels.microbench --router
    python -m sparkinfer_cute.kernels.microbench --tails [--json out.json]
    python -m sparkinfer_cute.kernels.microbench --routed [--json out.json]
    python -m sparkinfer_cute.kernels.microbench --prefill-attention [--chunk 512] [--prefix 0 3584] [--config NAME]
    python -m sparkinfer_cute.kernels.microbench --prefill-gemm [--tokens 512] [--json out.json]
    python -m sparkinfer_cute.kernels.microbench --mma-peak

For each case: median µs per kernel, achieved GB/s (bytes of weights read + activations read + outputs written) and
the percentage of the device-to-device copy bandwidth measured in the same run (``cuMemcpyDtoDAsync`` of 1 GiB,
counting bytes read + written).

(Over 600 lines: every kernel's benchmark lives here, none in the kernel files, sharing one timing harness.)

Method. Host-side argument marshalling of a CuTe DSL launch (~5-8 µs, cute-dsl.md §2.1) is longer than most of these
kernels, so timing individual launches with events would measure the host. Instead ``G`` launches are captured into
one CUDA graph (as the model's decode step is) and each replay is timed with a pair of CUDA events; the reported time
is the median over ``--reps`` replays (after 3 warm-up replays) of replay time / G. Where a case's weights fit in
L2 (x2), the launches rotate over enough copies of the weights (dense) or over different random expert-id sets
(experts, whose full [128, ...] tensors exceed L2) that every launch reads from DRAM.
"""

from __future__ import annotations

import json
import math
import statistics
import sys

import numpy as np

from ..cli_args import ArgumentParser, int_at_least, require_gpu, writable_path
from .common import gptr

GIB = 1 << 30


def _time_graph(launch_fns, stream, reps: int) -> tuple[float, float]:
    """(median, min) µs per launch of a graph running ``launch_fns`` in order."""
    from ..runtime import CudaGraph, Event, elapsed_ms

    launch_fns[0]()  # first launch outside the capture (module load)
    stream.synchronize()
    with CudaGraph.capture(stream) as g:
        for fn in launch_fns:
            fn()
    for _ in range(3):
        g.replay(stream)
    stream.synchronize()
    times = []
    for _ in range(reps):
        a, b = Event(), Event()
        a.record(stream)
        g.replay(stream)
        b.record(stream)
        times.append(elapsed_ms(a, b) * 1e3 / len(launch_fns))
    return statistics.median(times), min(times)


def _graph_call_us(fn, stream, iters: int) -> float:
    """µs per call of ``fn`` (host function enqueueing on ``stream``): ``iters`` calls captured in one CUDA graph, one
    warm-up replay, then one timed replay / iters (the attention and router benchmarks' method)."""
    from ..runtime import CudaGraph, Event, elapsed_ms

    fn()
    with CudaGraph.capture(stream) as g:
        for _ in range(iters):
            fn()
    g.replay(stream)
    t0, t1 = Event(), Event()
    t0.record(stream)
    g.replay(stream)
    t1.record(stream)
    t1.synchronize()
    return elapsed_ms(t0, t1) * 1e3 / iters


def measure_copy_bandwidth(stream, nbytes: int = GIB, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    from ..runtime import DeviceArray, Event, elapsed_ms

    src = DeviceArray.empty((nbytes,), np.uint8)
    dst = DeviceArray.empty((nbytes,), np.uint8)
    src.fill_bytes(1, stream)
    for _ in range(2):
        dst.copy_from(src, stream)
    times = []
    for _ in range(reps):
        a, b = Event(), Event()
        a.record(stream)
        dst.copy_from(src, stream)
        b.record(stream)
        times.append(elapsed_ms(a, b))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def _rand_weights(q, n_rows, n_in, rng):
    from ..reference.kernel_refs import random_quant_bytes
    from .quant_decode import spec

    sp = spec(q)
    return random_quant_bytes(q, n_rows * n_in // sp.block_elems, rng)


def _n_copies(nbytes: int, l2: int, cap_bytes: int = 2 * GIB) -> int:
    return max(1, min(math.ceil(2 * l2 / max(nbytes, 1)), cap_bytes // max(nbytes, 1)))


def bench_dense(q, n_in, n_out, path, stream, l2, reps, rng, mapping="slice", rpw=None):
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int32, Uint8

    from ..runtime import DeviceArray
    from .gemv import _warps_per_row, compile_gemv
    from .gemv_chunk import choose_rows_per_warp, compile_gemv_chunk
    from .norm_chain import no_tail_args
    from .q8_1 import quantize_q8_1, x_pointers
    from .quant_decode import spec

    w_host = _rand_weights(q, n_out, n_in, rng)
    wbytes = w_host.nbytes
    ncopy = _n_copies(wbytes, l2)
    ws = [DeviceArray.from_numpy(w_host, stream) for _ in range(ncopy)]
    x = DeviceArray.from_numpy(rng.standard_normal((1, n_in)).astype(np.float32), stream)
    y = DeviceArray.empty((n_out,), np.float32)
    cs = cuda.CUstream(stream.handle)
    q8 = path == "dp4a"
    xa = quantize_q8_1(x, stream=stream) if q8 else x  # the activation the kernel reads
    px, pxq, pxd, pxs = x_pointers(xa)
    xbytes = n_in + n_in // 32 * 8 if q8 else n_in * 4
    if mapping == "chunk":
        wpr = rpw if rpw is not None else choose_rows_per_warp(n_out, 132)  # rows per warp here
        fn = compile_gemv_chunk(q, n_in, wpr, False, False, False, q8)
        args = [(gptr(Uint8, w.ptr), px, pxq, pxd, gptr(Float32, y.ptr), gptr(Int32, x.ptr, 4), Int32(n_out),
                 Int32(1), *no_tail_args(y), cs) for w in ws]
    else:
        wpr = 1 if q8 else _warps_per_row(q, n_in, n_out, mapping)
        fn = compile_gemv(q, n_in, 1, False, False, mapping, wpr, q8=q8)
        args = [(gptr(Uint8, w.ptr), px, pxq, pxd, pxs, gptr(Float32, y.ptr), gptr(Int32, x.ptr, 4),
                 Int32(n_out), Int32(1), gptr(Uint8, w.ptr), *no_tail_args(y), cs) for w in ws]
    G = max(20, ncopy)
    launches = [(lambda a=args[i % ncopy]: fn(*a)) for i in range(G)]
    med, mn = _time_graph(launches, stream, reps)
    nbytes = wbytes + xbytes + n_out * 4
    assert spec(q).row_bytes(n_in) * n_out == wbytes
    tag = "" if mapping == "slice" else f" [{mapping}{'' if mapping != 'chunk' else f' rpw{wpr}'}]"
    return dict(case=f"gemv {q} {n_in}->{n_out}{tag}", path=path, us=med, us_min=mn, bytes=nbytes, copies=ncopy,
                wpr=wpr)


def bench_experts(q, n_in, n_out, path, stream, reps, rng, n_expert=128, k=8, x_per_slot=False, mapping="slice"):
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int32, Uint8

    from ..runtime import DeviceArray
    from .gemv import compile_gemv
    from .gemv_chunk import choose_rows_per_warp, compile_gemv_chunk
    from .norm_chain import no_tail_args
    from .q8_1 import quantize_q8_1, x_pointers
    from .quant_decode import spec

    w = DeviceArray.from_numpy(_rand_weights(q, n_expert * n_out, n_in, rng), stream)
    nsets = 16
    ids = [DeviceArray.from_numpy(rng.choice(n_expert, k, replace=False).astype(np.int32), stream)
           for _ in range(nsets)]
    xrows = k if x_per_slot else 1
    x = DeviceArray.from_numpy(rng.standard_normal((xrows, n_in)).astype(np.float32), stream)
    y = DeviceArray.empty((k, n_out), np.float32)
    cs = cuda.CUstream(stream.handle)
    q8 = path == "dp4a"
    xa = quantize_q8_1(x, stream=stream) if q8 else x
    px, pxq, pxd, pxs = x_pointers(xa)
    xbytes = xrows * (n_in + n_in // 32 * 8 if q8 else n_in * 4)
    if mapping == "chunk":
        fn = compile_gemv_chunk(q, n_in, choose_rows_per_warp(k * n_out, 132), True, x_per_slot, False, q8)
        args = [(gptr(Uint8, w.ptr), px, pxq, pxd, gptr(Float32, y.ptr), gptr(Int32, i.ptr, 4), Int32(n_out),
                 Int32(k), *no_tail_args(y), cs) for i in ids]
    else:
        fn = compile_gemv(q, n_in, 1, True, x_per_slot, q8=q8)
        args = [(gptr(Uint8, w.ptr), px, pxq, pxd, pxs, gptr(Float32, y.ptr), gptr(Int32, i.ptr, 4), Int32(n_out),
                 Int32(k), gptr(Uint8, w.ptr), *no_tail_args(y), cs) for i in ids]
    launches = [(lambda a=args[i % nsets]: fn(*a)) for i in range(32)]
    med, mn = _time_graph(launches, stream, reps)
    nbytes = k * n_out * spec(q).row_bytes(n_in) + xbytes + k * n_out * 4
    return dict(case=f"experts {k}x {q} {n_in}->{n_out}" + (" [chunk]" if mapping == "chunk" else ""), path=path, us=med, us_min=mn, bytes=nbytes, copies=nsets)


def bench_moe(stream, reps, rng, n_expert=128, k=8, n_embd=2048, n_ff=768, q_gu="Q4_K", q_down="Q6_K",
              path="float", mapping="slice", rpw_gu=1, rpw_down=1, x_loads_first=False):
    """The fused MoE FFN kernels: gate+up+SwiGLU, then down + weighted sum + residual (dp4a: plus the q8_1
    quantization of the [k, n_ff] activations, timed as its own row)."""
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int8, Int32, Uint8

    from ..runtime import DeviceArray
    from .moe_ffn import compile_moe_down, compile_moe_gate_up
    from .moe_ffn_chunk import compile_moe_down_chunk, compile_moe_gate_up_chunk
    from .norm_chain import no_tail_args
    from .q8_1 import Q8Act, compile_quantize_q8_1, quantize_q8_1, x_pointers
    from .quant_decode import spec

    wg = DeviceArray.from_numpy(_rand_weights(q_gu, n_expert * n_ff, n_embd, rng), stream)
    wu = DeviceArray.from_numpy(_rand_weights(q_gu, n_expert * n_ff, n_embd, rng), stream)
    wd = DeviceArray.from_numpy(_rand_weights(q_down, n_expert * n_embd, n_ff, rng), stream)
    nsets = 16
    ids = [DeviceArray.from_numpy(rng.choice(n_expert, k, replace=False).astype(np.int32), stream)
           for _ in range(nsets)]
    wts = DeviceArray.from_numpy(np.full(k, 1.0 / k, np.float32), stream)
    h = DeviceArray.from_numpy(rng.standard_normal((1, n_embd)).astype(np.float32), stream)
    act = DeviceArray.empty((k, n_ff), np.float32)
    y = DeviceArray.from_numpy(np.zeros(n_embd, np.float32), stream)
    cs = cuda.CUstream(stream.handle)
    gu_bytes = 2 * k * n_ff * spec(q_gu).row_bytes(n_embd) + k * n_ff * 4
    d_bytes = k * n_embd * spec(q_down).row_bytes(n_ff) + 2 * n_embd * 4
    q8 = path == "dp4a"
    hq, aq = quantize_q8_1(h, stream=stream), Q8Act(k, n_ff)
    ph, phq, phd, phs = x_pointers(hq if q8 else h)
    pa, paq, pad, pas = x_pointers(aq if q8 else act)
    pact, py, pwts = gptr(Float32, act.ptr), gptr(Float32, y.ptr), gptr(Float32, wts.ptr, 4)
    # the gate/up kernels' q8_1 output (quantize_out) is not measured here: never written, any valid pointers do
    no_q8_out = (gptr(Int8, act.ptr, 4), gptr(Float32, act.ptr, 4), gptr(Float32, act.ptr, 4), gptr(Int32, act.ptr, 4))
    xb = n_embd + n_embd // 32 * 8 if q8 else n_embd * 4
    ab = k * (n_ff + n_ff // 32 * 8) if q8 else k * n_ff * 4
    if mapping == "chunk":
        fa = compile_moe_gate_up_chunk(q_gu, n_embd, n_ff, False, q8, rpw_gu, x_loads_first)
        fb = compile_moe_down_chunk(q_down, n_ff, n_embd, k, True, q8, rpw_down, x_loads_first)
        a_args = [(gptr(Uint8, wg.ptr), gptr(Uint8, wu.ptr), ph, phq, phd, gptr(Int32, i.ptr, 4), pact, *no_q8_out,
                   Int32(k), cs) for i in ids]
        b_args = [(gptr(Uint8, wd.ptr), pa, paq, pad, gptr(Int32, i.ptr, 4), pwts, py, py, *no_tail_args(y), cs)
                  for i in ids]
        xf = " x-loads-first" if x_loads_first else ""
        cases = [(f"moe gate+up+swiglu [chunk rpw{rpw_gu}{xf}]", fa, a_args, gu_bytes + xb),
                 (f"moe down+wsum+resid [chunk rpw{rpw_down}{xf}]", fb, b_args, d_bytes + ab)]
    else:
        fa = compile_moe_gate_up(q_gu, n_embd, n_ff, False, q8)
        fb = compile_moe_down(q_down, n_ff, n_embd, True, q8=q8)
        a_args = [(gptr(Uint8, wg.ptr), gptr(Uint8, wu.ptr), ph, phq, phd, phs, gptr(Int32, i.ptr, 4), pact,
                   *no_q8_out, Int32(k), cs) for i in ids]
        b_args = [(gptr(Uint8, wd.ptr), pa, paq, pad, pas, gptr(Int32, i.ptr, 4), pwts, py, py, Int32(k),
                   *no_tail_args(y), cs) for i in ids]
        cases = [("moe gate+up+swiglu", fa, a_args, gu_bytes + xb)]
        if q8:  # the dp4a down reads the q8_1 copy of the activations: one more launch
            q_args = [(gptr(Float32, act.ptr, 4), paq, pad, pas, Int32(k), cs)]
            cases.append(("moe quantize act", compile_quantize_q8_1(n_ff), q_args,
                          k * n_ff * (4 + 1) + k * n_ff // 32 * 8))
        cases.append(("moe down+wsum+resid", fb, b_args, d_bytes + ab))
    res = []
    for name, fn, args, nbytes in cases:
        launches = [(lambda a=args[i % len(args)], f=fn: f(*a)) for i in range(32)]
        med, mn = _time_graph(launches, stream, reps)
        res.append(dict(case=f"{name} {k}x{n_embd}/{n_ff} {q_gu}/{q_down}", path=path, us=med, us_min=mn,
                        bytes=nbytes, copies=len(args)))
    return res


def bench_quantize(stream, reps, n=2048):
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int8, Int32

    from ..runtime import DeviceArray
    from .q8_1 import Q8Act, compile_quantize_q8_1

    x = DeviceArray.from_numpy(np.random.default_rng().standard_normal(n).astype(np.float32), stream)
    xq = Q8Act(1, n)
    fn = compile_quantize_q8_1(n)
    a = (gptr(Float32, x.ptr, 4), gptr(Int8, xq.qs.ptr), gptr(Float32, xq.d.ptr), gptr(Float32, xq.s.ptr), Int32(1),
         cuda.CUstream(stream.handle))
    med, mn = _time_graph([lambda: fn(*a)] * 32, stream, reps)
    return dict(case=f"quantize_q8_1 {n}", path="dp4a", us=med, us_min=mn, bytes=n * 4 + n + n // 32 * 8, copies=1)


# Q6_K_P: the same Q6_K weights after the optional upload-time repack (gguf.quants.repack_q6_k_padded)
DENSE_CASES = [("Q4_K", 2048, 4096), ("Q4_K", 4096, 2048), ("Q4_K", 2048, 512), ("Q6_K", 2048, 512),
               ("Q6_K", 2048, 151936), ("Q6_K_P", 2048, 512), ("Q6_K_P", 2048, 151936)]
EXPERT_CASES = [("Q4_K", 2048, 768, False), ("Q6_K", 768, 2048, True), ("Q4_K", 768, 2048, True),
                ("Q6_K_P", 768, 2048, True)]


def bench_multi(stream, l2, reps, rng, path, mats=(("Q4_K", 4096), ("Q4_K", 512), ("Q6_K_P", 512)), n_in=2048):
    """q/k/v in one GemvMulti launch vs three GemvChunk launches (same weights, rotated copies beyond L2)."""
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int32, Uint8

    from ..runtime import DeviceArray
    from .common import sm_count
    from .gemv_chunk import choose_rows_per_warp, compile_gemv_chunk, compile_gemv_multi
    from .norm_chain import no_tail_args
    from .q8_1 import quantize_q8_1, x_pointers
    from .quant_decode import spec

    q8 = path == "dp4a"
    hosts = [_rand_weights(q, n, n_in, rng) for q, n in mats]
    wbytes = sum(h.nbytes for h in hosts)
    ncopy = _n_copies(wbytes, l2)
    ws = [[DeviceArray.from_numpy(h, stream) for h in hosts] for _ in range(ncopy)]
    x = DeviceArray.from_numpy(rng.standard_normal((1, n_in)).astype(np.float32), stream)
    px, pxq, pxd, _ = x_pointers(quantize_q8_1(x, stream=stream) if q8 else x)
    ys = [DeviceArray.empty((n,), np.float32) for _, n in mats]
    cs = cuda.CUstream(stream.handle)
    fm = compile_gemv_multi(tuple(mats), n_in, q8, sm_count())
    m_args = [(gptr(Uint8, w[0].ptr), gptr(Uint8, w[1].ptr), gptr(Uint8, w[2].ptr), px, pxq, pxd,
               gptr(Float32, ys[0].ptr), gptr(Float32, ys[1].ptr), gptr(Float32, ys[2].ptr), cs) for w in ws]
    fs = [compile_gemv_chunk(q, n_in, choose_rows_per_warp(n, sm_count()), False, False, False, q8) for q, n in mats]
    G = max(20, ncopy)
    med_m, mn_m = _time_graph([(lambda a=m_args[i % ncopy]: fm(*a)) for i in range(G)], stream, reps)
    seq = []
    for i in range(G):
        w = ws[i % ncopy]
        for m, (f, y) in enumerate(zip(fs, ys)):
            a = (gptr(Uint8, w[m].ptr), px, pxq, pxd, gptr(Float32, y.ptr), gptr(Int32, x.ptr, 4), Int32(mats[m][1]),
                 Int32(1), *no_tail_args(y), cs)
            seq.append(lambda f=f, a=a: f(*a))
    med_s, mn_s = _time_graph(seq, stream, reps)
    xb = n_in * 4 if not q8 else n_in + n_in // 32 * 8
    nbytes = wbytes + xb + sum(n for _, n in mats) * 4
    assert wbytes == sum(spec(q).row_bytes(n_in) * n for q, n in mats)
    name = "+".join(f"{q}->{n}" for q, n in mats)
    return [dict(case=f"gemv_multi {name}", path=path, us=med_m, us_min=mn_m, bytes=nbytes, copies=ncopy),
            dict(case=f"3x gemv chunk {name}", path=path, us=med_s * len(mats), us_min=mn_s * len(mats),
                 bytes=nbytes, copies=ncopy)]


def bench_norm_q8(stream, reps, N=2048):
    """Fused rmsnorm_residual -> q8_1 vs rmsnorm_residual + quantize_q8_1 (two launches)."""
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int8, Int32

    from ..runtime import DeviceArray
    from .q8_1 import Q8Act, compile_quantize_q8_1, compile_rmsnorm_q8_1
    from .rmsnorm import compile_rmsnorm

    rng = np.random.default_rng(1)
    x = DeviceArray.from_numpy(rng.standard_normal(N).astype(np.float32), stream)
    r = DeviceArray.from_numpy(rng.standard_normal(N).astype(np.float32), stream)
    w = DeviceArray.from_numpy(rng.standard_normal(N).astype(np.float32), stream)
    h = DeviceArray.empty((N,), np.float32)
    xq = Q8Act(1, N)
    cs = cuda.CUstream(stream.handle)
    ff = compile_rmsnorm_q8_1(N, True, True)
    fa = (gptr(Float32, x.ptr), gptr(Float32, r.ptr), gptr(Float32, r.ptr), gptr(Float32, w.ptr), gptr(Float32, h.ptr),
          gptr(Int8, xq.qs.ptr), gptr(Float32, xq.d.ptr), gptr(Float32, xq.s.ptr), Int32(1), Float32(1e-6), cs)
    med_f, mn_f = _time_graph([lambda: ff(*fa)] * 32, stream, reps)
    fr = compile_rmsnorm(N, True, True)
    fq = compile_quantize_q8_1(N)
    ra = (gptr(Float32, x.ptr), gptr(Float32, r.ptr), gptr(Float32, r.ptr), gptr(Float32, w.ptr), gptr(Float32, h.ptr),
          Int32(1), Float32(1e-6), cs)
    qa = (gptr(Float32, h.ptr, 4), gptr(Int8, xq.qs.ptr), gptr(Float32, xq.d.ptr), gptr(Float32, xq.s.ptr), Int32(1), cs)
    med_s, mn_s = _time_graph([lambda: fr(*ra), lambda: fq(*qa)] * 16, stream, reps)
    nb = N * 4 * 4 + N + N // 32 * 8
    return [dict(case=f"rmsnorm_residual->q8_1 fused {N}", path="dp4a", us=med_f, us_min=mn_f, bytes=nb, copies=1),
            dict(case=f"rmsnorm_residual + quantize {N}", path="dp4a", us=2 * med_s, us_min=2 * mn_s, bytes=nb,
                 copies=1)]


def run_chunk(stream, dev, reps, rng, rows):
    """The chunk-mapping kernels (gemv_chunk.py GemvChunk, moe_ffn_chunk.py Moe*Chunk) at the Qwen3-30B-A3B shapes."""
    for path in ("float", "dp4a"):
        for q, n_in, n_out in DENSE_CASES:
            for rpw in (1, 2):
                rows.append(bench_dense(q, n_in, n_out, path, stream, dev.l2_bytes, reps, rng, "chunk", rpw))
        for q, n_in, n_out, per in EXPERT_CASES[:1]:
            rows.append(bench_experts(q, n_in, n_out, path, stream, reps, rng, x_per_slot=per, mapping="chunk"))
        for q_down in ("Q6_K", "Q4_K", "Q6_K_P"):
            for rpw in (1, 2):
                rows += bench_moe(stream, reps, rng, q_down=q_down, path=path, mapping="chunk", rpw_gu=rpw,
                                  rpw_down=rpw)


def run(reps: int = 50, only: str | None = None) -> dict:
    from ..runtime import Stream, get_device

    dev = get_device()
    stream = Stream(non_blocking=True)
    rng = np.random.default_rng(0)
    copy_gbs = measure_copy_bandwidth(stream)
    rows = []
    for path in ("float", "dp4a"):
        if only in (None, "gemv"):
            for q, n_in, n_out in DENSE_CASES:
                rows.append(bench_dense(q, n_in, n_out, path, stream, dev.l2_bytes, reps, rng))
            # the first-version per-lane-unit mapping, for comparison
            for q, n_in, n_out in DENSE_CASES[:1]:
                rows.append(bench_dense(q, n_in, n_out, path, stream, dev.l2_bytes, reps, rng, mapping="unit"))
        if only in (None, "experts"):
            for q, n_in, n_out, per in EXPERT_CASES:
                rows.append(bench_experts(q, n_in, n_out, path, stream, reps, rng, x_per_slot=per))
    if only in (None, "chunk"):
        run_chunk(stream, dev, reps, rng, rows)
    if only == "chunkdense":  # dense chunk GEMVs (default rows per warp) + q/k/v multi, both paths
        from .gemv_chunk import choose_rows_per_warp

        for path in ("float", "dp4a"):
            for q, n_in, n_out in DENSE_CASES:
                rows.append(bench_dense(q, n_in, n_out, path, stream, dev.l2_bytes, reps, rng, "chunk",
                                        choose_rows_per_warp(n_out, dev.sm_count)))
            rows += bench_multi(stream, dev.l2_bytes, reps, rng, path)
    if only == "xfirst":  # dp4a chunk MoE with the activation loads issued before the weight loads, A/B
        for _ in range(2):
            for q_down in ("Q6_K_P", "Q4_K"):
                for xf in (False, True):
                    rows += bench_moe(stream, reps, rng, q_down=q_down, path="dp4a", mapping="chunk",
                                      x_loads_first=xf)
    if only == "moechunk":
        for path in ("float", "dp4a"):
            for q_down in ("Q6_K_P", "Q4_K", "Q6_K"):
                for rpw in (1, 2):
                    rows += bench_moe(stream, reps, rng, q_down=q_down, path=path, mapping="chunk", rpw_gu=rpw,
                                      rpw_down=rpw)
    if only in (None, "chunk", "fused"):
        for path in ("float", "dp4a"):
            rows += bench_multi(stream, dev.l2_bytes, reps, rng, path)
        rows += bench_norm_q8(stream, reps)
    if only in (None, "moe"):
        for path in ("float", "dp4a"):
            for q_down in ("Q6_K", "Q4_K", "Q6_K_P"):
                rows += bench_moe(stream, reps, rng, q_down=q_down, path=path)
    if only in (None, "gemv"):
        rows.append(bench_quantize(stream, reps))
    for r in rows:
        r["GBps"] = r["bytes"] / (r["us"] * 1e-6) / 1e9
        r["pct_copy"] = 100.0 * r["GBps"] / copy_gbs
    return dict(device=dev.name, target=dev.target, sm_count=dev.sm_count, l2_bytes=dev.l2_bytes,
                copy_GBps=copy_gbs, reps=reps, method="CUDA-graph replays of G launches, median of replay/G",
                results=rows)


# ---------------------------------------------------------------------------------------------------------------
# Attention and router (their own tables: python -m sparkinfer_cute.kernels.microbench --attention / --router)


def bench_attention(config: str, n_ctx: int, num_splits: int | None = None, iters: int = 50, fused_combine: bool = False,
              prologue: bool = False, **tuning) -> dict:
    """GPU time of split-KV + combine (or the fused-combine single kernel) for one model config at context ``n_ctx``
    (graph of ``iters`` launches, replayed; reports µs per call and the K/V bytes read per second). ``prologue``
    (fused-combine only): the kernel with the Q/K norm + RoPE + KV append inside (attention_decode.py
    ``PROLOGUE_CONFIGS``), against which the fused-combine kernel alone plus the standalone qk_norm_rope_kv.py
    launch is the comparison."""
    from cutlass import Float16, Float32, Int8, Int32

    from ..runtime import DeviceArray, Stream, get_device
    from .attention_decode import MODEL_CONFIGS, PROLOGUE_CONFIGS, compile_attention_combine, \
        compile_attention_decode, fused_counter_count
    from .common import cu_stream
    from ..reference.kernel_refs import theta_scale_f32
    from .qk_norm_rope_kv import qk_norm_rope_kv

    c = dict(MODEL_CONFIGS[config])
    if num_splits:
        c["num_splits"] = num_splits
    H, KV, D, P, S = c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"], c["num_splits"]
    pages = -(-n_ctx // P)
    rng = np.random.default_rng(0)
    k_pool = DeviceArray.from_numpy(rng.standard_normal((pages, P, KV, D)).astype(np.float16))
    v_pool = DeviceArray.from_numpy(rng.standard_normal((pages, P, KV, D)).astype(np.float16))
    table = DeviceArray.from_numpy(rng.permutation(pages).astype(np.int32).reshape(1, pages))
    pos = DeviceArray.from_numpy(np.array([n_ctx - 1], np.int32))
    q = DeviceArray.from_numpy(rng.standard_normal((1, H, D)).astype(np.float32))
    out = DeviceArray.empty((1, H, D), np.float32)
    o_part = DeviceArray.empty((1, H, S, D), np.float32)
    lse_part = DeviceArray.empty((1, H, S), np.float32)
    counters = DeviceArray.zeros((fused_counter_count(H, KV, D, heads_per_cta=tuning.get("heads_per_cta", 0)),),
                                 np.int32)
    if prologue and not fused_combine:
        raise ValueError("the prologue runs in the fused-combine kernel only")
    pro = dict(PROLOGUE_CONFIGS[config]) if prologue else {}
    f_attn = compile_attention_decode(H, KV, D, P, S, False, fused_combine=fused_combine, **pro, **tuning)
    # the prologue's inputs: this token's k/v and unit norm weights (read only with the prologue)
    kv_new = DeviceArray.from_numpy(rng.standard_normal((1, KV, D)).astype(np.float32))
    ones = DeviceArray.from_numpy(np.ones(max(D, 1), np.float32))
    pro_ptrs = (gptr(Float32, kv_new.ptr, align=4),) * 2 + (gptr(Float32, ones.ptr, align=4),) * 3
    ts = float(theta_scale_f32(1e6, pro.get("qk_rot", D)))
    # no quantize_out here: the q8_1 output pointers are never written, any valid ones do
    unused_q8 = (gptr(Int8, counters.ptr, align=4), gptr(Float32, counters.ptr, align=4),
                 gptr(Float32, counters.ptr, align=4))
    f_comb = compile_attention_combine(n_head=H, head_dim=D, num_splits=S)
    stream = Stream()
    cus = cu_stream(stream)
    args = (gptr(Float32, q.ptr), gptr(Float16, k_pool.ptr), gptr(Float16, v_pool.ptr),
            gptr(Int32, table.ptr, align=4), gptr(Int32, pos.ptr, align=4), gptr(Float32, o_part.ptr),
            gptr(Float32, lse_part.ptr, align=4), gptr(Float32, out.ptr, align=4), gptr(Int32, counters.ptr, align=4),
            *unused_q8, *pro_ptrs, Int32(1), Int32(pages), Int32(pages), Float32(0.1), Int32(0), Float32(1.0),
            Float32(ts), Float32(1e-6), Float32(1.0), cus)
    comb_args = (gptr(Float32, o_part.ptr), gptr(Float32, lse_part.ptr, align=4), gptr(Float32, out.ptr), *unused_q8,
                 Int32(1), cus)

    def one():
        f_attn(*args)
        if not fused_combine:
            f_comb(*comb_args)

    us = _graph_call_us(one, stream, iters)
    extra = {}
    if prologue:  # the same work as two launches: the standalone prologue kernel, then attention without it
        f_plain = compile_attention_decode(H, KV, D, P, S, False, fused_combine=True, **tuning)
        n_rot = pro["qk_rot"]
        ff = ones.view(np.float32, (n_rot // 2,)) if pro.get("qk_freq_factors") else None
        w = ones.view(np.float32, (D,))

        def two():
            qk_norm_rope_kv(q, kv_new, kv_new, w, w, k_pool, v_pool, table, pos, n_rot=n_rot, base=1e6, eps=1e-6,
                            freq_factors=ff, v_norm=pro.get("v_norm", False), stream=stream)
            f_plain(*args)

        extra["us_two_launches"] = round(_graph_call_us(two, stream, iters), 2)
    kv_bytes = 2 * n_ctx * KV * D * 2
    return dict(config=config, n_ctx=n_ctx, num_splits=S, fused_combine=fused_combine, prologue=prologue, **extra,
                us=round(us, 2),
                gbps=round(kv_bytes / us / 1e3, 1), device=get_device().name, **tuning)


def bench_prefill_attention(config: str, n_tokens: int, prefix: int, window: int = 0, iters: int = 10) -> dict:
    """µs per prefill-attention call of a chunk of ``n_tokens`` queries after ``prefix`` cached keys, for one
    :data:`attention_prefill.MODEL_CONFIGS` entry: the tensor-core flash kernel vs the decode kernel run as a batch of
    T queries (the ``SPARKINFER_DISABLE=flash_prefill`` path), both through their public wrappers in a CUDA graph;
    TFLOP/s counts 4 * D flops per visible (query head, key) pair."""
    from ..runtime import DeviceArray, Stream, get_device
    from .attention_decode import attention_decode
    from .attention_prefill import MODEL_CONFIGS, attention_prefill

    c = MODEL_CONFIGS[config]
    H, KV, D, P = c["n_head"], c["n_kv_head"], c["head_dim"], c["page_size"]
    T, n_keys = n_tokens, prefix + n_tokens
    pages = -(-n_keys // P)
    rng = np.random.default_rng(0)
    k_pool = DeviceArray.from_numpy(rng.standard_normal((pages, P, KV, D)).astype(np.float16))
    v_pool = DeviceArray.from_numpy(rng.standard_normal((pages, P, KV, D)).astype(np.float16))
    row = rng.permutation(pages).astype(np.int32)
    table = DeviceArray.from_numpy(row)
    table_rows = DeviceArray.from_numpy(np.repeat(row[None], T, axis=0))
    pos = DeviceArray.from_numpy(np.arange(prefix, n_keys, dtype=np.int32))
    q = DeviceArray.from_numpy(rng.standard_normal((T, H, D)).astype(np.float32))
    out = DeviceArray.empty((T, H, D), np.float32)
    o_part, lse_part = DeviceArray.empty((T, H, 1, D), np.float32), DeviceArray.empty((T, H, 1), np.float32)
    counters = DeviceArray.zeros((T * H,), np.int32)
    stream = Stream()
    scale = 1.0 / math.sqrt(D)

    def flash():
        attention_prefill(q, k_pool, v_pool, table, pos, scale=scale, window=window, out=out, stream=stream)

    def decode_batch():
        attention_decode(q, k_pool, v_pool, table_rows, pos, scale=scale, window=window, num_splits=1, out=out,
                         o_partial=o_part, lse_partial=lse_part, fused_combine=True, counters=counters,
                         stream=stream)

    qpos = prefix + np.arange(T)
    visible = int(np.sum(np.minimum(qpos + 1, window) if window else qpos + 1))
    flops = 4.0 * D * H * visible
    res = {"config": config, "n_tokens": T, "prefix": prefix, "window": window, "device": get_device().name}
    for name, fn in (("flash", flash), ("decode_batch", decode_batch)):
        us = _graph_call_us(fn, stream, iters)
        res[f"{name}_us"] = round(us, 1)
        res[f"{name}_tflops"] = round(flops / us / 1e6, 2)
    return res


def bench_router(n_expert: int = 128, n_embd: int = 2048, k: int = 8, iters: int = 200) -> dict:
    """µs per router call, CUDA graph of ``iters`` calls: the two-launch path (F32 ``gemv`` + ``route``) vs the
    fused :func:`route_gemv`; also checks the fused ids equal the two-launch ids on the benchmark data."""
    from ..runtime import DeviceArray, Stream, get_device
    from .gemv import gemv
    from .router import route
    from .router_gemv import route_gemv

    rng = np.random.default_rng(0)
    w_np = (rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    w = DeviceArray.from_numpy(w_np)
    h = DeviceArray.from_numpy(rng.standard_normal((1, n_embd)).astype(np.float32))
    logits = DeviceArray.empty((1, n_expert), np.float32)
    counter = DeviceArray.zeros((1,), np.int32)
    ids = [DeviceArray.empty((1, k), np.int32) for _ in range(2)]
    p = [DeviceArray.empty((1, k), np.float32) for _ in range(2)]
    stream = Stream()
    w_bytes = w.view(np.uint8, (n_expert, 4 * n_embd))

    def two_launch():
        gemv(w_bytes, "F32", h, n_out=n_expert, out=logits, stream=stream)
        route(logits, k, ids_out=ids[0], weights_out=p[0], stream=stream)

    def fused():
        route_gemv(w, h, k, ids_out=ids[1], weights_out=p[1], scratch=logits, counter=counter, stream=stream)

    out = dict(n_expert=n_expert, n_embd=n_embd, k=k, device=get_device().name)
    for name, fn in (("two_launch_us", two_launch), ("fused_us", fused)):
        out[name] = round(_graph_call_us(fn, stream, iters), 2)
    out["same_ids"] = bool((ids[0].to_numpy(stream) == ids[1].to_numpy(stream)).all())
    return out


def bench_tails(iters: int = 200) -> list[dict]:
    """What a norm-chain tail (kernels/norm_chain.py ``RowNormChain.tail``) costs and saves, at the basket models'
    decode shapes: µs per call (CUDA graph of ``iters`` calls) of the matmul alone, the matmul then the norm launch
    it replaces, and the matmul with the chain as its tail. ``tail_cost_us`` = tail - alone (the serial time the
    last CTA adds: models the perf model's ``TAIL_SECONDS``), ``saved_us`` = separate - tail (the pass's gain)."""
    from ..runtime import DeviceArray, Stream, get_device
    from .gemv import gemv
    from .moe_ffn import moe_down
    from .norm_chain import AttnTailArgs, FfnTailArgs, post_attention_norms, post_ffn_norms
    from .q8_1 import Q8Act, quantize_q8_1, rmsnorm_q8_1

    rng = np.random.default_rng(0)
    stream = Stream()
    f32 = np.float32

    def vec(n, scale=1.0):
        return DeviceArray.from_numpy((scale * rng.standard_normal(n)).astype(f32), stream)

    def norm_w(n):
        return DeviceArray.from_numpy((1 + 0.1 * rng.standard_normal(n)).astype(f32), stream)

    counter = DeviceArray.zeros((1,), np.int32)
    out = []

    def case(name, alone, separate, tailed):
        r = dict(case=name, device=get_device().name)
        for key, fn in (("alone_us", alone), ("separate_us", separate), ("tail_us", tailed)):
            r[key] = round(_graph_call_us(fn, stream, iters), 2)
        r["tail_cost_us"] = round(r["tail_us"] - r["alone_us"], 2)
        r["saved_us"] = round(r["separate_us"] - r["tail_us"], 2)
        out.append(r)

    def experts_down(q, E, k, n_ff, N):
        wd = DeviceArray.from_numpy(_rand_weights(q, E * N, n_ff, rng), stream)
        act = quantize_q8_1(DeviceArray.from_numpy(rng.standard_normal((k, n_ff)).astype(f32), stream), stream=stream)
        ids = DeviceArray.from_numpy(rng.choice(E, k, replace=False).astype(np.int32), stream)
        wts = DeviceArray.from_numpy(np.full(k, 1.0 / k, f32), stream)
        y = DeviceArray.empty((N,), f32)
        return (lambda tail=None: moe_down(wd, q, act, ids, wts, N, out=y, stream=stream, tail=tail)), y

    # Qwen3-30B-A3B: experts down (Q4_K 768 -> 2048, 8 of 128, dp4a), then x += y; h = attn_norm (+ q8_1)
    down, y = experts_down("Q4_K", 128, 8, 768, 2048)
    x, h, wn, hq = vec(2048), DeviceArray.empty((2048,), f32), norm_w(2048), Q8Act(1, 2048)
    case("qwen3 30B experts down + residual/attn_norm", down,
         lambda: (down(), rmsnorm_q8_1(y, wn, 1e-6, residual=x, residual_out=x, out=h, xq=hq, stream=stream)),
         lambda: down(FfnTailArgs(y, None, None, None, None, x, None, 1e-6, counter, (wn, h, hq),
                                  post_norm=False)))
    # Gemma 4 26B-A4B: experts down (Q8_0 704 -> 2816, 8 of 128, dp4a), then the post-FFN chain + next attn_norm
    down, y = experts_down("Q8_0", 128, 8, 704, 2816)
    N = 2816
    f, x, h, hq, scale = vec(N), vec(N), DeviceArray.empty((N,), f32), Q8Act(1, N), vec(1)
    w1, w2, w, wn = (norm_w(N) for _ in range(4))
    case("gemma4 26B experts down + post-FFN chain", down,
         lambda: (down(), post_ffn_norms(f, y, w1, w2, w, x, scale, 1e-6, next_norm=(wn, h, hq), stream=stream)),
         lambda: down(FfnTailArgs(f, y, w1, w2, w, x, scale, 1e-6, counter, (wn, h, hq))))
    # Gemma 4 26B-A4B sliding O projection (Q4_K 4096 -> 2816, dp4a), then the post-attention chain (3 outputs)
    wo = DeviceArray.from_numpy(_rand_weights("Q4_K", N, 4096, rng), stream)
    aq = quantize_q8_1(vec(4096), stream=stream)
    o, x, wp = DeviceArray.empty((N,), f32), vec(N), norm_w(N)
    outs = [(norm_w(N), DeviceArray.empty((N,), f32)) for _ in range(3)]
    eq = Q8Act(1, N)

    def o_proj(tail=None):
        gemv(wo, "Q4_K", aq, n_out=N, out=o, stream=stream, tail=tail)

    case("gemma4 26B O projection + post-attention chain", o_proj,
         lambda: (o_proj(), post_attention_norms(o, x, wp, outs, 1e-6, xq=eq, stream=stream)),
         lambda: o_proj(AttnTailArgs(o, x, wp, outs, 1e-6, counter, eq)))
    return out


def bench_routed(iters: int = 200) -> list[dict]:
    """What one launch of the router, the experts' gate/up and their down projection (kernels/routed_experts.py)
    saves against their separate launches, at the basket models' decode shapes (int8 activations, the down
    projection's norm-chain tail included): µs per MoE step (CUDA graph of ``iters`` steps) as three launches
    (``separate_us``), router + gate/up in one launch then the down (``two_phase_us``), all in one
    (``three_phase_us``); ``saved_per_boundary_us`` = (separate - three-phase) / 2, the figure the perf model's
    ``PHASE_SECONDS`` stands in for (a kernel boundary's cost less a phase hand-off's). The router sees the same
    input every step, so the same 8 experts stay in L2 in every variant alike. Also checks the three variants give
    bit-identical outputs on the benchmark data."""
    from ..runtime import DeviceArray, Stream, get_device
    from .moe_ffn import moe_down, moe_gate_up
    from .norm_chain import FfnTailArgs
    from .q8_1 import Q8Act, quantize_q8_1
    from .routed_experts import new_chain_state, routed_experts
    from .router_gemv import route_gemv

    rng = np.random.default_rng(0)
    stream = Stream()
    f32 = np.float32
    out = []

    def vec(n, scale=1.0):
        return DeviceArray.from_numpy((scale * rng.standard_normal(n)).astype(f32), stream)

    def case(name, E, n, f, k, q_gu, q_down, fused, glu, qwen):
        w_router = DeviceArray.from_numpy((rng.standard_normal((E, n)) / np.sqrt(n)).astype(f32), stream)
        wg = DeviceArray.from_numpy(_rand_weights(q_gu, E * f * (2 if fused else 1), n, rng), stream)
        wu = None if fused else DeviceArray.from_numpy(_rand_weights(q_gu, E * f, n, rng), stream)
        wd = DeviceArray.from_numpy(_rand_weights(q_down, E * n, f, rng), stream)
        scale = None if qwen else DeviceArray.from_numpy(rng.uniform(0.5, 2, E).astype(f32), stream)
        h, x, delta, wn = DeviceArray.empty((1, n), f32), vec(n), vec(n, 0.1), vec(n)
        hq = Q8Act(1, n)
        e_inq = quantize_q8_1(vec(n), stream=stream)
        ids, p = DeviceArray.empty((1, k), np.int32), DeviceArray.empty((1, k), f32)
        logits, rcnt = DeviceArray.empty((1, E), f32), DeviceArray.zeros((1,), np.int32)
        act, actq, gcnt = DeviceArray.empty((k, f), f32), Q8Act(k, f), DeviceArray.zeros((k * f // 32,), np.int32)
        y, h2, hq2, tcnt, chain = DeviceArray.empty((n,), f32), DeviceArray.empty((n,), f32), Q8Act(1, n), \
            DeviceArray.zeros((1,), np.int32), new_chain_state()
        if qwen:  # the router forms h (+ q8_1) from x + delta; x += y and the next attn_norm after the down
            r_in, pre, gate_in = h, (x, DeviceArray.from_numpy(np.zeros(n, f32), stream), wn, 1e-6, hq), hq
            tail = FfnTailArgs(y, None, None, None, None, x, None, 1e-6, tcnt, (wn, h2, hq2), post_norm=False)
        else:  # the router and the experts read the O tail's outputs; the post-FFN chain after the down
            r_in, pre, gate_in = vec(n).view(f32, (1, n)), None, e_inq
            w1, w2, w = vec(n), vec(n), vec(n)
            tail = FfnTailArgs(vec(n), y, w1, w2, w, x, vec(1), 1e-6, tcnt, (wn, h2, hq2))
        route = dict(w_router=w_router, h=r_in, k=k, ids_out=ids, weights_out=p, scratch=logits, counter=rcnt,
                     n_expert=E, expert_scale=scale, prenorm=pre, stream=stream)
        gate_up = dict(w_gate=wg, w_up=wu, qtype=q_gu, h=gate_in, ids=ids, n_ff=f, out=act, act=glu, out_q8=actq,
                       counters=gcnt)
        down = dict(w_down=wd, qtype=q_down, act=actq, ids=ids, weights=p, n_out=n, out=y, tail=tail)

        def separate():
            route_gemv(**route)
            moe_gate_up(**gate_up, stream=stream)
            moe_down(**down, stream=stream)

        def two_phase():  # (routed_experts drops the route's own stream: its launch takes ``stream``)
            routed_experts(route, gate_up, chain, stream=stream)
            moe_down(**down, stream=stream)

        def three_phase():
            routed_experts(route, gate_up, chain, down=down, stream=stream)

        r = dict(case=name, device=get_device().name)
        outputs = []
        for key, fn in (("separate_us", separate), ("two_phase_us", two_phase), ("three_phase_us", three_phase)):
            r[key] = round(_graph_call_us(fn, stream, iters), 2)
            outputs.append([a.to_numpy(stream).tobytes() for a in (ids, p, act, y)])
        r["saved_per_boundary_us"] = round((r["separate_us"] - r["three_phase_us"]) / 2, 2)
        r["same_outputs"] = None if qwen else outputs[0] == outputs[1] == outputs[2]  # (Qwen: x moves every call)
        out.append(r)

    case("qwen3 30B router + experts (Q4_K, chunk kernels)", 128, 2048, 768, 8, "Q4_K", "Q4_K", False, "silu", True)
    case("gemma4 26B router + experts (Q4_K / Q8_0, slice kernels)", 128, 2816, 704, 8, "Q4_K", "Q8_0", True,
         "gelu_tanh", False)
    return out


def bench_mma_peak(reps: int = 20, iters: int = 4096) -> list[dict]:
    """The ``mma.sync`` rate of this GPU (kernels/mma_peak.py): int8 m16n8k32 and f16 m16n8k16 (f32 accumulate) in
    register-only chains, at 1-16 waves of CTAs per SM; the best row of a kind is its peak (``peak: True``), the
    denominator of the prefill GEMM's and the flash prefill attention's "% of mma.sync peak"."""
    from ..runtime import DeviceArray, Stream, get_device
    from . import mma_peak as mp

    dev = get_device()
    stream = Stream()
    rows = []
    for kind in mp.KINDS:
        kind_rows = []
        for per_sm in (1, 2, 4, 8, 16):
            n_ctas = dev.sm_count * per_sm
            out = DeviceArray.empty((n_ctas * mp.THREADS,), np.float32)
            us, _ = _time_graph([lambda n=n_ctas, o=out, k=kind: mp.mma_peak(k, n, iters, out=o, stream=stream)],
                                stream, reps)
            kind_rows.append(dict(case=f"mma_peak {kind}", kind=kind, ctas_per_sm=per_sm, iters=iters,
                                  us=round(us, 1), tflops=round(mp.launch_flops(kind, n_ctas, iters) / us / 1e6, 1),
                                  device=dev.name))
        best = max(kind_rows, key=lambda r: r["tflops"])
        for r in kind_rows:
            r["peak"] = r is best
        rows += kind_rows
    return rows


def peak_tflops(rows: list[dict], kind: str) -> float:
    return next(r["tflops"] for r in rows if r["kind"] == kind and r["peak"])


def bench_prefill_gemm(tokens: int = 512, reps: int = 20, int8_peak: float | None = None) -> list[dict]:
    """The prefill GEMM (kernels/quant_gemm.py) at the Qwen3-30B-A3B and Gemma 3 270M shapes: dense q/k/v/o and the
    30B experts' grouped gate+up SwiGLU (gathered rows) and down, per tile size. µs per launch (one launch per graph
    node, median of ``reps`` replays) and TFLOP/s (2 * rows * n_out * n_in; grouped: rows = routed (token, expert)
    pairs), with ``int8_peak``: the % of the measured int8 ``mma.sync`` peak. Random weights and int8 activations;
    the 128-expert tensors exceed L2, the dense ones may not (warm L2: an upper bound on the dense rate)."""
    from ..reference.kernel_refs import grouped_tiles_host
    from ..runtime import DeviceArray, Stream, get_device
    from .q8_1 import Q8Act
    from .quant_gemm import max_grouped_tiles, quant_gemm

    rng = np.random.default_rng(0)
    st = Stream()
    T = tokens
    dev = get_device().name

    def weights(q, rows, n_in):
        return DeviceArray.from_numpy(_rand_weights(q, rows, n_in, rng))

    def act(rows, n):
        a = Q8Act(rows, n)
        a.qs.copy_from_numpy(rng.integers(-127, 128, (rows, n), dtype=np.int8))
        a.d.copy_from_numpy(rng.uniform(0.001, 0.01, (rows, n // 32)).astype(np.float32))
        a.s.copy_from_numpy(rng.uniform(-0.1, 0.1, (rows, n // 32)).astype(np.float32))
        return a

    results = []

    def case(name, flops, fn):
        us, _ = _time_graph([fn], st, reps)
        r = dict(case=name, tokens=T, us=round(us, 1), tflops=round(flops / us / 1e6, 2), device=dev)
        if int8_peak:
            r["pct_of_mma_peak"] = round(100 * flops / us / 1e6 / int8_peak, 1)
        results.append(r)
        print(r, flush=True)

    # dense: Qwen3-30B-A3B q (2048->4096), k/v (->512), o (4096->2048, residual add); Gemma 3 270M q (640->1024)
    for q, n_in, n_out, accumulate in (("Q4_K", 2048, 4096, False), ("Q4_K", 2048, 512, False),
                                       ("Q6_K_P", 2048, 512, False), ("Q4_K", 4096, 2048, True),
                                       ("Q5_0", 640, 1024, False), ("Q8_0", 640, 256, False)):
        w, x, y = weights(q, n_out, n_in), act(T, n_in), DeviceArray.zeros((T, n_out), np.float32)
        for tt in (64, 32):
            case(f"dense {q} {n_in}->{n_out} tile_tokens={tt}{' +=' if accumulate else ''}", 2.0 * T * n_in * n_out,
                 lambda w=w, x=x, y=y, q=q, n_out=n_out, a=accumulate, tt=tt: quant_gemm(
                     w, q, x, n_out, out=y, accumulate=a, tile_tokens=tt, stream=st))
    # grouped: Qwen3-30B-A3B experts (128, top 8): gate+up SwiGLU 2048->768 (gathered), down 768->2048
    E, k, F, D = 128, 8, 768, 2048
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    wg, wu, wd = weights("Q4_K", E * F, D), weights("Q4_K", E * F, D), weights("Q4_K", E * D, F)
    x = act(T, D)
    a = DeviceArray.zeros((T * k, F), np.float32)
    aq = act(T * k, F)
    y = DeviceArray.zeros((T * k, D), np.float32)
    for tt in (32, 64, 16):
        tiles, tok, _ = grouped_tiles_host(ids, E, tt)
        mt = max_grouped_tiles(T * k, E, tt)
        dt = DeviceArray.from_numpy(np.concatenate([tiles, np.zeros((mt - len(tiles) + 1, 4), np.int32)]))
        dn = DeviceArray.from_numpy(np.array([len(tiles)], np.int32))
        dtok = DeviceArray.from_numpy(tok)
        case(f"grouped gate+up SwiGLU Q4_K {D}->{F}x2 k={k} tile_tokens={tt}", 2.0 * T * k * D * 2 * F,
             lambda dt=dt, dn=dn, mt=mt, dtok=dtok, tt=tt: quant_gemm(
                 wg, "Q4_K", x, F, out=a, w_up=wu, tiles=dt, n_tiles=dn, max_tiles=mt, row_index=dtok,
                 tile_tokens=tt, stream=st))
        case(f"grouped down Q4_K {F}->{D} k={k} tile_tokens={tt}", 2.0 * T * k * F * D,
             lambda dt=dt, dn=dn, mt=mt, tt=tt: quant_gemm(wd, "Q4_K", aq, D, out=y, tiles=dt, n_tiles=dn,
                                                           max_tiles=mt, tile_tokens=tt, stream=st))
    return results


def _emit_rows(key: str, rows: list[dict], path: str | None) -> None:
    """Print a benchmark's rows, and with ``--json`` write them as ``{key: rows}``."""
    for r in rows:
        print(r)
    if path:
        with open(path, "w") as f:
            json.dump({key: rows}, f, indent=1)


def format_table(report: dict) -> str:
    lines = [f"{report['device']} ({report['target']}, {report['sm_count']} SMs); D2D copy "
             f"{report['copy_GBps']:.0f} GB/s (read+write); median of {report['reps']} graph replays",
             f"{'case':44s} {'path':6s} {'us':>9s} {'us_min':>9s} {'MB':>9s} {'GB/s':>8s} {'%copy':>6s}"]
    for r in report["results"]:
        lines.append(f"{r['case']:44s} {r['path']:6s} {r['us']:9.2f} {r['us_min']:9.2f} {r['bytes'] / 1e6:9.3f} "
                     f"{r['GBps']:8.0f} {r['pct_copy']:6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m sparkinfer_cute.kernels.microbench", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=writable_path, help="write the results as JSON to this path")
    ap.add_argument("--reps", type=int_at_least(50), default=50, help="timed graph replays per case (>= 50)")
    ap.add_argument("--only", choices=("gemv", "experts", "moe", "chunk", "fused", "moechunk", "xfirst", "chunkdense"),
                    help="run one group of cases")
    ap.add_argument("--attention", action="store_true",
                    help="split-KV decode attention instead: µs and K/V GB/s per model config and context")
    ap.add_argument("--ctx", type=int_at_least(1), nargs="+", default=[512, 4096, 32768],
                    help="contexts for --attention")
    ap.add_argument("--splits", type=int_at_least(0), default=0, help="--attention: split count (0: the model config's)")
    ap.add_argument("--fused", action="store_true", help="--attention: also time the fused-combine kernel")
    ap.add_argument("--prologue", action="store_true",
                    help="--attention: also time the fused-combine kernel with the Q/K prologue inside")
    ap.add_argument("--config", action="append", default=None, help="--attention: only these model configs")
    ap.add_argument("--heads-per-cta", type=int_at_least(0), default=0, help="--attention tuning knob (0: automatic)")
    ap.add_argument("--keys-per-iter", type=int_at_least(0), default=0, help="--attention tuning knob (0: automatic)")
    ap.add_argument("--router", action="store_true", help="fused router GEMV + top-k vs gemv + route instead")
    ap.add_argument("--tails", action="store_true",
                    help="norm-chain tails: each matmul alone, then its norm launch, and with the chain as its tail")
    ap.add_argument("--routed", action="store_true",
                    help="router + experts' gate/up + down: three launches, two, or one (kernels/routed_experts.py)")
    ap.add_argument("--prefill-attention", action="store_true",
                    help="flash prefill attention vs the decode kernel over the chunk: µs and TFLOP/s per model "
                         "config, chunk length (--chunk) and cached prefix (--prefix)")
    ap.add_argument("--chunk", type=int_at_least(1), nargs="+", default=[512], help="--prefill-attention chunk lengths")
    ap.add_argument("--mma-peak", action="store_true",
                    help="the int8 and f16 mma.sync rate of this GPU (kernels/mma_peak.py): the denominator of the "
                         "prefill kernels' %% of peak")
    ap.add_argument("--prefill-gemm", action="store_true",
                    help="the prefill GEMM (kernels/quant_gemm.py) at the basket shapes: µs, TFLOP/s and %% of the "
                         "int8 mma.sync peak measured in the same run")
    ap.add_argument("--tokens", type=int_at_least(1), default=512, help="--prefill-gemm: prompt tokens")
    ap.add_argument("--prefix", type=int_at_least(0), nargs="+", default=[0, 3584],
                    help="--prefill-attention cached prefix lengths")
    a = ap.parse_args(argv)
    require_gpu(ap.prog, "the micro-benchmark")
    if a.attention:
        from .attention_decode import MODEL_CONFIGS, PROLOGUE_CONFIGS

        rows = []
        for cfg in a.config or sorted(MODEL_CONFIGS):
            for n in a.ctx:
                modes = [(False, False)] + ([(True, False)] if a.fused or a.prologue else [])
                modes += [(True, True)] if a.prologue and cfg in PROLOGUE_CONFIGS else []
                for fused, pro in modes:
                    rows.append(bench_attention(cfg, n, a.splits or None, fused_combine=fused, prologue=pro,
                                                heads_per_cta=a.heads_per_cta, keys_per_iter=a.keys_per_iter))
        _emit_rows("attention", rows, a.json)  # the JSON tools/attention_share.py reads
        return 0
    if a.prefill_attention or a.prefill_gemm or a.mma_peak:
        # the prefill kernels against the mma.sync rate measured in the same run: {"mma_peak": [...], ...} with --json
        from .attention_prefill import MODEL_CONFIGS

        peak_rows = bench_mma_peak()
        out = {"mma_peak": peak_rows}
        for r in peak_rows:
            print(r)
        if a.prefill_attention:
            f16 = peak_tflops(peak_rows, "f16")
            out["prefill_attention"] = []
            for cfg in a.config or sorted(MODEL_CONFIGS):
                for T in a.chunk:
                    for p0 in a.prefix:
                        r = bench_prefill_attention(cfg, T, p0)
                        r["flash_pct_of_mma_peak"] = round(100 * r["flash_tflops"] / f16, 1)
                        out["prefill_attention"].append(r)
                        print(r)
        if a.prefill_gemm:
            out["prefill_gemm"] = bench_prefill_gemm(a.tokens, int8_peak=peak_tflops(peak_rows, "s8"))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    if a.router:
        for n_expert, n_embd, k in ((128, 2048, 8), (256, 2048, 8)):
            print(bench_router(n_expert, n_embd, k))
        return 0
    for key, wanted, bench in (("routed", a.routed, bench_routed), ("tails", a.tails, bench_tails)):
        if wanted:  # (the --tails JSON is what perf_model --tails reads)
            _emit_rows(key, bench(), a.json)
            return 0
    report = run(a.reps, a.only)
    print(format_table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
