"""GPU diagnostic for the fused QK-norm + RoPE + KV-append kernel (kernels/qk_norm_rope_kv.py).

Prints one row per case: the fused kernel against the float64 reference and against the unfused kernels
(rmsnorm_per_head + rope_neox + kv_cache_append) on the same inputs; then, with a Gemma 3 GGUF, layer 0 of the real
model run both ways (q after the prologue, the cached k/v slot) and the residual stream after L layers, fused vs
unfused. Usage (GPU host): python3 tools/qk_fused_diag.py [GEMMA.gguf]
"""

from __future__ import annotations

import itertools
import sys

import numpy as np


def f16_dist(a, b):
    def o(x):
        u = np.asarray(x, np.float16).view(np.uint16).astype(np.int64)
        return np.where(u & 0x8000, -(u & 0x7FFF), u)
    return int(np.abs(o(a) - o(b)).max()) if np.size(a) else 0


def kernel_cases():
    from sparkinfer_cute.kernels.common import rel_err
    from sparkinfer_cute.kernels.kv_cache_append import kv_cache_append
    from sparkinfer_cute.kernels.qk_norm_rope_kv import qk_norm_rope_kv, qk_norm_rope_kv_ref
    from sparkinfer_cute.kernels.rmsnorm import rmsnorm_per_head
    from sparkinfer_cute.kernels.rope import rope_neox
    from sparkinfer_cute.runtime import DeviceArray

    print(f"{'case':58s} {'q_rel_ref':>10s} {'q_rel_unf':>10s} {'k_ulp':>6s} {'k_ulp_unf':>9s} {'v_ulp':>6s} "
          f"{'stray':>6s}")
    rng = np.random.default_rng(1234)
    cases = [(4, 1, 256, 256, 64, 1, 5, True, False, False, 0.0625),   # gemma3-270m
             (32, 4, 128, 128, 64, 1, 100, True, False, False, 1.0),   # qwen3 30b
             (8, 2, 64, 64, 64, 1, 3, True, False, False, 1.0)]        # qwen tiny
    for H, KV, D, rot, P, B, mp, nrm, vn in itertools.product([2, 8], [1, 2], [64, 128, 256], [1.0, 0.5],
                                                              [16, 64], [1, 3], [0, 100, 40959], [True, False],
                                                              [True, False]):
        if rng.random() < 0.06:
            cases.append((H * KV, KV, D, int(D * rot), P, B, mp, nrm, False, vn, 1.0))
    n_bad = 0
    for (H, KV, D, n_rot, P, B, max_pos, has_norm, use_ff, v_norm, q_scale) in cases:
        q = rng.standard_normal((B, H, D)).astype(np.float32)
        k = rng.standard_normal((B, KV, D)).astype(np.float32)
        v = rng.standard_normal((B, KV, D)).astype(np.float32)
        pos = rng.integers(0, max_pos + 1, B).astype(np.int32)
        pps = int(pos.max()) // P + 1
        table = np.full((B, pps), B, np.int32)
        pages = rng.permutation(B).astype(np.int32)
        table[np.arange(B), pos // P] = pages
        qn = rng.uniform(0.5, 1.5, D).astype(np.float32) if has_norm else None
        kn = rng.uniform(0.5, 1.5, D).astype(np.float32) if has_norm else None
        kp = DeviceArray.empty((B + 1, P, KV, D), np.float16).fill_bytes(0xFF)
        vp = DeviceArray.empty((B + 1, P, KV, D), np.float16).fill_bytes(0xFF)
        qd = DeviceArray.from_numpy(q)
        qk_norm_rope_kv(qd, DeviceArray.from_numpy(k), DeviceArray.from_numpy(v), qn, kn, kp, vp,
                        DeviceArray.from_numpy(table), DeviceArray.from_numpy(pos), n_rot=n_rot, base=1e4, eps=1e-6,
                        q_scale=q_scale, v_norm=v_norm)
        y = qd.to_numpy()
        qr, kr, vr = qk_norm_rope_kv_ref(q, k, v, qn, kn, pos, n_rot=n_rot, base=1e4, eps=1e-6, q_scale=q_scale,
                                         v_norm=v_norm)
        q_rel = max(rel_err(y[b], qr[b]) for b in range(B))
        kpn, vpn = kp.to_numpy(), vp.to_numpy()
        mask = np.zeros(kpn.shape[:2], bool)
        k_ulp = v_ulp = 0
        for b in range(B):
            mask[pages[b], pos[b] % P] = True
            k_ulp = max(k_ulp, f16_dist(kpn[pages[b], pos[b] % P], kr[b]))
            v_ulp = max(v_ulp, f16_dist(vpn[pages[b], pos[b] % P], vr[b]))
        stray = int((kpn.view(np.uint16)[~mask] != 0xFFFF).sum() + (vpn.view(np.uint16)[~mask] != 0xFFFF).sum())
        # unfused kernels on the same inputs (no q_scale there: compare q * q_scale)
        qu = q if not has_norm else rmsnorm_per_head(q, qn, 1e-6)
        ku = k if not has_norm else rmsnorm_per_head(k, kn, 1e-6)
        qu = rope_neox(qu, pos, n_rot=n_rot, base=1e4) * np.float32(q_scale)
        ku = rope_neox(ku, pos, n_rot=n_rot, base=1e4)
        kp2 = DeviceArray.zeros((B + 1, P, KV, D), np.float16)
        vp2 = DeviceArray.zeros((B + 1, P, KV, D), np.float16)
        kv_cache_append(ku, v, kp2, vp2, table, pos)
        k2 = kp2.to_numpy()
        q_rel_u = max(rel_err(y[b], qu[b]) for b in range(B))
        k_ulp_u = max(f16_dist(kpn[pages[b], pos[b] % P], k2[pages[b], pos[b] % P]) for b in range(B))
        bad = q_rel > 1e-5 or k_ulp > 2 or (v_ulp > 1) or stray
        n_bad += bool(bad)
        name = (f"H{H} KV{KV} D{D} rot{n_rot} P{P} B{B} pos{list(pos)} norm{int(has_norm)} vn{int(v_norm)} "
                f"qs{q_scale}")
        print(f"{name[:58]:58s} {q_rel:10.2e} {q_rel_u:10.2e} {k_ulp:6d} {k_ulp_u:9d} {v_ulp:6d} {stray:6d}"
              f"{'  BAD' if bad else ''}")
        if bad:
            for b in range(B):
                e = np.abs(y[b] - qr[b]).max(axis=-1)
                print("    q max abs err per head:", np.array2string(e, precision=3), "max|q|",
                      float(np.abs(qr[b]).max()))
    print(f"kernel cases: {len(cases)}, bad: {n_bad}")
    return n_bad


def gemma_layer0(path):
    from sparkinfer_cute.models import ops

    from sparkinfer_cute.engine import Engine

    eng = Engine(path, backend_name="gpu", max_context=64, progress=False)
    m = eng.backend
    c, w, s = m.cfg, m.w, m.stream
    tokens = [2, 818, 5279, 529, 7001, 563]
    out = {}
    for mode in ("unfused", "fused"):
        ops.ENABLED = frozenset({"fused_qk"}) if mode == "fused" else frozenset()
        out[mode] = m.hidden_after_layers(tokens, c.n_layer)
    ops.ENABLED = frozenset()
    a, b = out["unfused"], out["fused"]
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    print("gemma3 residual after all layers, fused vs unfused, rel per position:", np.array2string(rel, precision=2))
    for L in (1, 2, 6):
        r = {}
        for mode in ("unfused", "fused"):
            ops.ENABLED = frozenset({"fused_qk"}) if mode == "fused" else frozenset()
            r[mode] = m.hidden_after_layers(tokens, L)
        ops.ENABLED = frozenset()
        rel = np.linalg.norm(r["unfused"] - r["fused"], axis=-1) / np.linalg.norm(r["unfused"], axis=-1)
        print(f"  after {L} layers: rel per position", np.array2string(rel, precision=2))
    # layer 0 prologue by hand, both ways, at position 3
    E, H, Hkv, D, eps = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.rms_eps
    p = "blk.0."
    res = {}
    for mode in ("unfused", "fused"):
        m.kv.k[0].fill_bytes(0)
        m.kv.v[0].fill_bytes(0)
        m._write_i32(m.tok, 5279)
        m._write_i32(m.pos_buf, 3)
        import math

        ops.embedding(w["token_embd.weight"], m.tok, m.x, scale=math.sqrt(E), stream=s)
        ops.rmsnorm(m.x, w[p + "attn_norm.weight"], m.h, eps, stream=s)
        ops.gemv_qkv(w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"], m.h, m.q, m.k, m.v,
                     stream=s)
        raw = (m.q.to_numpy(s).copy(), m.k.to_numpy(s).copy(), m.v.to_numpy(s).copy())
        if mode == "fused":
            ops.qk_norm_rope_kv(m.kv, 0, m.q, m.k, m.v, w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"],
                                m.pos_buf, n_head=H, n_rot=c.n_rot, base=float(c.rope_base_for(0)), eps=eps,
                                q_scale=1.0, stream=s)
        else:
            ops.rmsnorm_heads(m.q, w[p + "attn_q_norm.weight"], H, D, eps, stream=s)
            ops.rmsnorm_heads(m.k, w[p + "attn_k_norm.weight"], Hkv, D, eps, stream=s)
            ops.rope(m.q, H, D, c.n_rot, float(c.rope_base_for(0)), m.pos_buf, stream=s)
            ops.rope(m.k, Hkv, D, c.n_rot, float(c.rope_base_for(0)), m.pos_buf, stream=s)
            ops.kv_append(m.kv, 0, m.k, m.v, m.pos_buf, stream=s)
        kk = m.kv.k[0].to_numpy(s)[0, 3].copy()
        vv = m.kv.v[0].to_numpy(s)[0, 3].copy()
        res[mode] = (m.q.to_numpy(s).copy(), kk, vv, raw)
    qa, ka, va, ra = res["unfused"]
    qb, kb, vb, rb = res["fused"]
    print("layer 0 pos 3: raw q/k/v identical:", all(np.array_equal(x, y) for x, y in zip(ra, rb)))
    print("  q rel diff", float(np.abs(qa - qb).max() / np.abs(qa).max()), "k f16 ulp", f16_dist(ka, kb),
          "v f16 ulp", f16_dist(va, vb))
    print("  q unfused[:6]", qa[:6], "\n  q fused[:6]  ", qb[:6])
    print("  k unfused[0,:6]", ka.reshape(-1)[:6], "\n  k fused[0,:6]  ", kb.reshape(-1)[:6])


if __name__ == "__main__":
    bad = kernel_cases()
    if len(sys.argv) > 1:
        gemma_layer0(sys.argv[1])
    sys.exit(1 if bad else 0)
