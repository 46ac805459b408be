"""numpy emulations of the int8-activation (dp4a) kernels' arithmetic, with hooks to break them on purpose.

The dp4a GEMV and MoE kernels (sparkinfer_cute/kernels/quant_dot.py, gemv.py, moe_ffn*.py) quantize the activation
to q8_1 (sparkinfer_cute/kernels/q8_1.py: blocks of 32, ``d = amax/127``, ``q = rint(x/d)``, ``s = d * sum(q)``),
dot the weight quants with the int8 activations *exactly* (integer dp4a), and scale each group in f32::

    Q4_K (group = one 32-element sub-block = one q8_1 block):  f32(f32(d*sc) * d_x) * dot(q_w, q_x) - f32(dmin*m) * s_x
    Q6_K (group = one 16-element sub-block, half a q8_1 block): f32(f32(d*sc) * d_x) * dot(q_w - 32, q_x)

then sum the groups in f32. :func:`dp4a_gemv` does exactly that in numpy (integers exact, every f32 rounding
applied, groups summed sequentially), so it stands in for the kernel on a machine without a GPU. The mutation
hooks model plausible kernel bugs: an activation block read as zeros (a skipped load), one input in ``drop_every``
ignored (a lane's element missed), the Q6_K sub-block scale of an odd sub-block taken from its even neighbour (a
lane owning 32 weights applying one scale). The checks the GPU tests apply
(``sparkinfer_cute.reference.kernel_refs.check_gemv_q8`` etc.) judge these outputs in tests/mutation/.
"""

from __future__ import annotations

import numpy as np

from sparkinfer_cute.reference import ops
from sparkinfer_cute.reference.kernel_refs import quantize_q8_1_ref, row_bytes

f32 = np.float32


def _weights(w_raw, qtype: str, n_in: int):
    """(q_w - offset [n_out, n_in] float64 ints, scale per element f32, min per element f32 or None)."""
    raw = np.asarray(w_raw, np.uint8).reshape(-1, row_bytes(qtype, n_in))
    n_out = raw.shape[0]
    if qtype == "Q4_K":
        q, sc, mn, d, dmin = ops.q4_K_blocks(raw, n_out, n_in)
        dd = np.repeat(d, 256, axis=-1).reshape(n_out, -1, 256)
        dm = np.repeat(dmin, 256, axis=-1).reshape(n_out, -1, 256)
        scale = (dd * sc.astype(f32)).astype(f32)  # gguf-py rounds d*sc and dmin*m in f32 as well
        mins = (dm * mn.astype(f32)).astype(f32)
        return q.reshape(n_out, n_in), scale.reshape(n_out, n_in), mins.reshape(n_out, n_in)
    if qtype == "Q6_K":
        q, sc, d = ops.q6_K_blocks(raw, n_out, n_in)
        dd = np.repeat(d, 256, axis=-1).reshape(n_out, -1, 256)
        return (q - 32).reshape(n_out, n_in), (dd * sc.astype(f32)).astype(f32).reshape(n_out, n_in), None
    raise NotImplementedError(f"dp4a emulation of {qtype}")


def dp4a_gemv(w_raw, qtype: str, x, *, zero_block: int | None = None, drop_every: int | None = None,
              q6k_scale_from_even: bool = False) -> np.ndarray:
    """``y [rows, n_out]`` as the dp4a GEMV computes ``W x`` for ``x [rows, n_in]`` (see the module docstring).

    ``zero_block``: q8_1 block index read as zeros (its quants and sum). ``drop_every``: every ``drop_every``-th
    input (the last of each run) left out of the integer dots. ``q6k_scale_from_even``: Q6_K sub-blocks 2j+1 scaled
    with sub-block 2j's scale."""
    x = np.asarray(x, f32).reshape(-1, np.shape(x)[-1])
    rows, n_in = x.shape
    qx, dx, sx = quantize_q8_1_ref(x)
    qx = qx.astype(np.float64)
    if zero_block is not None:
        qx[:, 32 * zero_block:32 * zero_block + 32] = 0
        sx = sx.copy()
        sx[:, zero_block] = 0
    if drop_every is not None:
        qx[:, drop_every - 1::drop_every] = 0
    qw, scale, mins = _weights(w_raw, qtype, n_in)
    n_out = qw.shape[0]
    g = 32 if qtype == "Q4_K" else 16
    G = n_in // g
    if q6k_scale_from_even:
        s16 = scale.reshape(n_out, G, g)
        s16[:, 1::2] = s16[:, 0::2]
        scale = s16.reshape(n_out, n_in)
    dot = np.einsum("ogk,rgk->rog", qw.reshape(n_out, G, g), qx.reshape(rows, G, g))  # exact integers
    sc_g = scale.reshape(n_out, G, g)[..., 0]  # one scale per group
    dx_g = np.repeat(dx, 32 // g, axis=-1)  # the q8_1 block's d for each group
    grp = ((sc_g[None] * dx_g[:, None, :]).astype(f32) * dot.astype(f32)).astype(f32)
    if mins is not None:
        mn_g = mins.reshape(n_out, G, g)[..., 0]
        grp = (grp - (mn_g[None] * sx[:, None, :]).astype(f32)).astype(f32)
    acc = np.zeros((rows, n_out), f32)
    for j in range(G):
        acc = (acc + grp[..., j]).astype(f32)
    return acc


def expert_rows(w, e: int) -> np.ndarray:
    """Expert ``e``'s rows of an [E, rows, row_bytes] raw tensor."""
    return np.asarray(w, np.uint8)[int(e)]


def dp4a_moe_gate_up(w_gate, w_up, qtype: str, h, ids, **bug) -> np.ndarray:
    """``act [k, n_ff]``: per routed slot, ``silu(g) * u`` in f32 of the two dp4a GEMV rows (``bug``: the
    :func:`dp4a_gemv` hooks, applied to both)."""
    out = []
    for e in np.asarray(ids).reshape(-1):
        g = dp4a_gemv(expert_rows(w_gate, e), qtype, h, **bug)[0]
        u = dp4a_gemv(expert_rows(w_up, e), qtype, h, **bug)[0]
        with np.errstate(over="ignore"):
            out.append((g / (f32(1) + np.exp(-g)) * u).astype(f32))
    return np.stack(out)


def dp4a_moe_down(w_down, qtype: str, act, ids, weights, resid=None, **bug) -> np.ndarray:
    """``y [n_out] = [resid +] sum_j w_j * Wdown[ids[j]] q8_1(act[j])`` summed in f32 in slot order."""
    act = np.asarray(act, f32)
    y = None if resid is None else np.asarray(resid, f32).copy()
    for j, e in enumerate(np.asarray(ids).reshape(-1)):
        t = (f32(weights[j]) * dp4a_gemv(expert_rows(w_down, e), qtype, act[j], **bug)[0]).astype(f32)
        y = t if y is None else (y + t).astype(f32)
    return y
