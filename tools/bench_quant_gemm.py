"""GPU benchmark of the prefill GEMM (kernels/quant_gemm.py) at the Qwen3-30B-A3B and Gemma 3 270M shapes.

    python tools/bench_quant_gemm.py [--tokens 512] [--reps 20] [--json out.json]

Per case: median µs of one launch captured in a CUDA graph (CUDA events, 3 warm-up replays first) and TFLOP/s
(2 * rows * n_out * n_in; for the grouped GEMMs rows = routed (token, expert) pairs). Random weights and int8
activations; the 128-expert tensors exceed L2, the dense ones may not (warm L2: an upper bound on the dense rate).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from sparkinfer_cute.reference.kernel_refs import random_quant_bytes
    from sparkinfer_cute.kernels.q8_1 import Q8Act
    from sparkinfer_cute.kernels.quant_decode import spec
    from sparkinfer_cute.kernels.quant_gemm import max_grouped_tiles, quant_gemm
    from sparkinfer_cute.reference.kernel_refs import grouped_tiles_host
    from sparkinfer_cute.runtime import DeviceArray, Stream

    rng = np.random.default_rng(0)
    st = Stream()
    T = args.tokens

    def weights(q, rows, n_in):
        sp = spec(q)
        return DeviceArray.from_numpy(random_quant_bytes(q, rows * n_in // sp.block_elems, rng)
                                      .reshape(rows, sp.row_bytes(n_in)))

    def act(rows, n):
        a = Q8Act(rows, n)
        a.qs.copy_from_numpy(rng.integers(-127, 128, (rows, n), dtype=np.int8))
        a.d.copy_from_numpy(rng.uniform(0.001, 0.01, (rows, n // 32)).astype(np.float32))
        a.s.copy_from_numpy(rng.uniform(-0.1, 0.1, (rows, n // 32)).astype(np.float32))
        return a

    results = []

    from sparkinfer_cute.kernels.microbench import _time_graph

    def case(name, flops, fn):
        us, _ = _time_graph([fn], st, args.reps)
        results.append(dict(case=name, us=us, tflops=flops / us / 1e6))
        print(f"{name:58s} {us:9.1f} us  {flops / us / 1e6:7.2f} TFLOP/s", flush=True)

    # dense: Qwen3-30B-A3B q (2048->4096), k/v (->512), o (4096->2048, residual add); Gemma 3 270M q (640->1024)
    for q, n_in, n_out, accumulate in (("Q4_K", 2048, 4096, False), ("Q4_K", 2048, 512, False),
                                       ("Q6_K_P", 2048, 512, False), ("Q4_K", 4096, 2048, True),
                                       ("Q5_0", 640, 1024, False), ("Q8_0", 640, 256, False)):
        for tt in (64, 32):
            w = weights(q, n_out, n_in)
            x = act(T, n_in)
            y = DeviceArray.zeros((T, n_out), np.float32)
            case(f"dense {q} {n_in}->{n_out} T={T} tile_tokens={tt}{' +=' if accumulate else ''}",
                 2.0 * T * n_in * n_out,
                 lambda w=w, x=x, y=y, q=q, n_out=n_out, a=accumulate, tt=tt: quant_gemm(
                     w, q, x, n_out, out=y, accumulate=a, tile_tokens=tt, stream=st))
    # grouped: Qwen3-30B-A3B experts (128, top 8): gate+up SwiGLU 2048->768 (gathered), down 768->2048
    E, k, F, D = 128, 8, 768, 2048
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    for tt in (32, 64, 16):
        tiles, tok, pos = grouped_tiles_host(ids, E, tt)
        mt = max_grouped_tiles(T * k, E, tt)
        dt = DeviceArray.from_numpy(np.concatenate([tiles, np.zeros((mt - len(tiles) + 1, 4), np.int32)]))
        dn = DeviceArray.from_numpy(np.array([len(tiles)], np.int32))
        dtok = DeviceArray.from_numpy(tok)
        wg, wu, wd = weights("Q4_K", E * F, D), weights("Q4_K", E * F, D), weights("Q4_K", E * D, F)
        x = act(T, D)
        a = DeviceArray.zeros((T * k, F), np.float32)
        aq = act(T * k, F)
        y = DeviceArray.zeros((T * k, D), np.float32)
        case(f"grouped gate+up SwiGLU Q4_K {D}->{F}x2 T={T} k={k} tile_tokens={tt}", 2.0 * T * k * D * 2 * F,
             lambda: quant_gemm(wg, "Q4_K", x, F, out=a, w_up=wu, tiles=dt, n_tiles=dn, max_tiles=mt,
                                row_index=dtok, tile_tokens=tt, stream=st))
        case(f"grouped down Q4_K {F}->{D} T={T} k={k} tile_tokens={tt}", 2.0 * T * k * F * D,
             lambda: quant_gemm(wd, "Q4_K", aq, D, out=y, tiles=dt, n_tiles=dn, max_tiles=mt, tile_tokens=tt,
                                stream=st))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=T, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
