"""GPU diagnostic for the fused QK-norm + RoPE + KV-append kernel (kernels/qk_norm_rope_kv.py).

Prints one row per case: the fused kernel against the float64 reference and against the unfused kernels
(rmsnorm_per_head + rope_neox + kv_cache_append) on the same inputs; then, with a Gemma 3 GGUF, the real model's
residual stream after L layers with the fused and the unfused prologue. Usage (GPU host): python3 tools/qk_fused_diag.py [GEMMA.gguf]
"""

from __future__ import annotations

import itertools
import sys

import numpy as np


def f16_dist(a, b) -> int:
    from sparkinfer_cute.reference.kernel_refs import f16_ulp_distance

    return int(f16_ulp_distance(a, b).max()) if np.size(a) else 0


def kernel_cases():
    from sparkinfer_cute.reference.kernel_refs import rel_err
    from sparkinfer_cute.kernels.kv_cache_append import kv_cache_append
    from sparkinfer_cute.kernels.qk_norm_rope_kv import qk_norm_rope_kv
    from sparkinfer_cute.reference.kernel_refs import qk_norm_rope_kv_ref
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


def gemma_fused_vs_unfused(path):
    """Residual stream of the real model after L layers, fused vs unfused prologue (models/ops.py qk_prologue)."""
    from sparkinfer_cute.engine import Engine
    from sparkinfer_cute.models import ops

    m = Engine(path, backend_name="gpu", max_context=64, progress=False).backend
    tokens = [2, 818, 5279, 529, 7001, 563]
    for L in (1, 2, 6, m.cfg.n_layer):
        r = {}
        saved = ops.DISABLED
        for mode, disabled in (("unfused", saved | {"fused_qk"}), ("fused", saved - {"fused_qk"})):
            ops.DISABLED = disabled
            r[mode] = m.hidden_after_layers(tokens, L)
        ops.DISABLED = saved
        rel = np.linalg.norm(r["unfused"] - r["fused"], axis=-1) / np.linalg.norm(r["unfused"], axis=-1)
        print(f"gemma3 residual after {L} layers, fused vs unfused: rel per position", np.array2string(rel, precision=2))


if __name__ == "__main__":
    bad = kernel_cases()
    if len(sys.argv) > 1:
        gemma_fused_vs_unfused(sys.argv[1])
    sys.exit(1 if bad else 0)
