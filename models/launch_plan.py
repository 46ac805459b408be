"""The launch plan of one decode token: every kernel launch of the GPU forward's decode step, and the bytes each
reads and writes, without a GPU (models/dry_run.py runs the forward's own ``enqueue_step`` with recorders).

Per op call (:class:`Launch`): the kernels it launches (the op's ``@launches`` declaration, which the live
``launch_counter`` adds up too), which layer it belongs to, and its traffic split by kind:

* ``routed``: expert weights, ``n_expert_used`` of ``n_expert`` experts (row bytes x rows x k);
* ``dense``: every other weight as uploaded (Q6_K GEMV weights padded to Q6_K_P: +0.95%), the embedding gather
  one row of ``token_embd``;
* ``kv_read`` / ``kv_write``: the fp16 KV cache: attention over the positions a layer sees at ``depth`` (the
  current one included; ``window`` on sliding layers), the append of this position's K and V;
* ``act_read`` / ``act_write``: activations (f32, or q8_1 at 1.25 B/value), split-KV partials, router scratch.

The *minimum* a decode token must move is computed separately from the GGUF tensor sizes, not from the calls:
every weight the forward names read once in its file format (expert tensors k/E; ``token_embd`` whole when it is
also the LM head, else one row), plus the KV read and written at ``depth``. ``bytes / minimum`` (>= 1) is what
fusion can remove: activation round trips, re-quantizations, padding.

Activations are counted as if they went to DRAM; between two kernels of one step they mostly stay in L2, which is
for the performance model (sparkinfer_cute/perf_model.py) to price, not for this inventory.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

from sparkinfer_cute.models import ops
from sparkinfer_cute.models.dry_run import DryArray, OpCall, record
from sparkinfer_cute.runtime.weights import QWeight

F32 = 4
F16 = 2
Q8 = 1.25  # bytes per value of a q8_1 activation
KINDS = ("routed", "dense", "kv_read", "kv_write", "act_read", "act_write")
_BLK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class Launch:
    """One op call of the decode step: ``kernels`` launches moving ``bytes[kind]`` bytes."""

    op: str
    kernels: int
    segment: str          # "embed", "layer", "output"
    layer: int | None
    bytes: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    weights: tuple = ()   # names of the weights it reads
    int8: bool = False    # its matmul input is a q8_1 activation (xq / hq / actq given)
    parts: tuple = ()     # ((kernel, count), ...): what the launches are, for ops built from several kernels
    tails: int = 0        # norm chains its last CTA runs after the rest of the grid (models/ops.py AfterFfn, ...)
    phases: int = 0       # hand-offs between ticket-ordered phases inside it (kernels/routed_experts.py)

    @property
    def total(self) -> int:
        return int(sum(self.bytes.values()))


@dataclass
class LaunchPlan:
    """Kernels and bytes of one decode token of a model at KV depth ``depth`` (see the module docstring)."""

    model: str
    arch: str
    depth: int
    launches: list
    minimum: dict          # "routed", "dense", "kv": the minimum bytes per token, by kind
    layer_kind: dict       # layer -> kind name ("full moe", "swa dense", ...)
    layer_minimum: dict    # layer -> minimum bytes of that layer (its weights + its KV)

    @property
    def kernels_per_token(self) -> int:
        return sum(x.kernels for x in self.launches)

    @property
    def bytes_per_token(self) -> int:
        return sum(x.total for x in self.launches)

    @property
    def minimum_bytes(self) -> int:
        return int(sum(self.minimum.values()))

    @property
    def ratio(self) -> float:
        return self.bytes_per_token / self.minimum_bytes

    def bytes_by_kind(self) -> dict:
        out = dict.fromkeys(KINDS, 0)
        for x in self.launches:
            for k, v in x.bytes.items():
                out[k] += v
        return {k: int(v) for k, v in out.items()}

    def by_layer_kind(self) -> OrderedDict[str, dict]:
        """Per layer kind (plus ``embed``/``output`` for the ops outside the layers): layers, kernels per layer,
        bytes per layer, minimum per layer and their ratio, and the kernels per op of one such layer."""
        out: OrderedDict[str, dict] = OrderedDict()
        out["embed"] = self._summary([x for x in self.launches if x.segment == "embed"], 1, None)
        for kind in dict.fromkeys(self.layer_kind.values()):
            layers = [l for l, k in self.layer_kind.items() if k == kind]
            calls = [x for x in self.launches if x.segment == "layer" and x.layer in layers]
            out[kind] = self._summary(calls, len(layers), sum(self.layer_minimum[l] for l in layers))
        out["output"] = self._summary([x for x in self.launches if x.segment == "output"], 1, None)
        return out

    def _summary(self, calls, n: int, minimum) -> dict:
        by_op: OrderedDict[str, int] = OrderedDict()
        for x in calls:
            if x.layer is None or x.layer == calls[0].layer:  # one layer of the kind
                by_op[x.op] = by_op.get(x.op, 0) + x.kernels
        b = sum(x.total for x in calls)
        return {"layers": n, "kernels_per_layer": sum(x.kernels for x in calls) / n, "bytes_per_layer": b / n,
                "minimum_per_layer": None if minimum is None else minimum / n,
                "ratio": None if not minimum else b / minimum, "ops": dict(by_op)}

    def to_dict(self) -> dict:
        return {"model": self.model, "arch": self.arch, "depth": self.depth,
                "kernels_per_token": self.kernels_per_token, "bytes_per_token": self.bytes_per_token,
                "minimum_bytes_per_token": self.minimum_bytes, "bytes_over_minimum": self.ratio,
                "bytes_by_kind": self.bytes_by_kind(), "minimum_by_kind": dict(self.minimum),
                "by_layer_kind": self.by_layer_kind()}


# ---------------------------------------------------------------------------------------------- per-op traffic
def _nbytes(buf) -> int:
    return buf.nbytes if isinstance(buf, DryArray) else 0


def _vec(buf, n: int) -> float:
    """Bytes of an n-value activation read from ``buf`` (f32, or q8_1 when ``buf`` is a q8_1 buffer)."""
    return n * (Q8 if isinstance(buf, DryArray) and buf.dtype == "q8_1" else F32)


def _routed(w: QWeight, k: int) -> int:
    """Bytes of k experts' slices of an expert tensor (``[n_in, n_out, n_expert]``: n_out rows per expert)."""
    return w.row_bytes * w.n_out * k


def _kv_entry(g) -> int:
    """Bytes of one position's K and V of a layer of geometry ``g`` (fp16)."""
    return 2 * g.n_head_kv * g.head_dim * F16


def attended_positions(g, depth: int) -> int:
    """Positions attention reads at decode position ``depth`` (0-based, the current one included)."""
    return min(depth + 1, g.window) if g.window else depth + 1


def _self_attention_parts(c: OpCall) -> tuple[OpCall, OpCall]:
    """The unfused form of a ``self_attention`` call: its :func:`ops.qk_prologue` and :func:`ops.attention` calls."""
    kv, layer, g, q, k, v, q_norm, k_norm, pos, out, ws = c.args
    kw = c.kwargs
    qk = OpCall("qk_prologue", (kv, layer, q, k, v, q_norm, k_norm, pos),
                dict(n_head=g.n_head, n_rot=g.n_rot, base=g.rope_base, eps=kw["eps"], q_scale=kw["q_scale"],
                     freq_factors=kw.get("freq_factors"), v_norm=kw.get("v_norm", False)),
                1 if ops.enabled("fused_qk") else 5)
    at = OpCall("attention", (kv, layer, q, out, pos, ws),
                dict(n_head=g.n_head, scale=kw["scale"], window=g.window, xq=kw.get("xq")),
                ops._attention_launches(xq=kw.get("xq")))
    return qk, at


def _tails(c: OpCall) -> int:
    """Norm chains the call's last CTA runs after the rest of its grid: an ``after`` run as a tail
    (models/ops.py AfterFfn / AfterAttention), or the fused router forming its own input (``prenorm``: its last CTA
    writes x, h and the q8_1 copy), in its own launch or in the gate/up launch it routes for."""
    after = c.kwargs.get("after")
    if after is not None and after.fused():
        return 1
    if c.op == "moe_gate_up" and c.kwargs.get("route") is not None:
        return sum(_tails(p) for p in _route_parts(c))
    return int(c.op == "router_gemv" and c.kwargs.get("prenorm") is not None and ops.enabled("fused_router_norm"))


def _phases(c: OpCall) -> int:
    """Phase hand-offs inside the call's launch: the routed gate/up waits for the router (``route.fused()``), the
    down projection for the gate/up (``down.fused()``)."""
    r = c.kwargs.get("route") if c.op == "moe_gate_up" else None
    if r is None or not r.fused():
        return 0
    d = c.kwargs.get("down")
    return 1 + int(d is not None and d.fused(r, c.kwargs.get("actq")))


def _route_parts(c: OpCall) -> tuple[OpCall, ...]:
    """A moe_gate_up call with a ``route`` (models/ops.py RouteFirst) and maybe a ``down`` (ExpertsDown) as its
    parts: the router_gemv call it runs first, the gate/up alone, and the moe_down call after it (with
    ``route.fused()`` / ``down.fused()`` one launch runs them: their kernel counts less the shared launch)."""
    r, d = c.kwargs["route"], c.kwargs.get("down")
    rkw = dict(down_scale=r.down_scale, prenorm=r.prenorm)
    rargs = (r.w, r.h, c.args[3], r.weights, r.k, r.state)
    parts = [OpCall("router_gemv", rargs, rkw, ops._router_launches(*rargs, **rkw)),
             OpCall(c.op, c.args, {k: v for k, v in c.kwargs.items() if k not in ("route", "down")}, 1)]
    if d is not None:
        dargs, dkw = (d.w_down, c.args[4], c.args[3], r.weights, d.out), dict(actq=c.kwargs.get("actq"),
                                                                               after=d.after)
        parts.append(OpCall("moe_down", dargs, dkw, ops._moe_down_launches(*dargs, **dkw)))
    return tuple(parts)


def _tail_parts(c: OpCall) -> tuple[OpCall, OpCall | None]:
    """A moe_down or gemv call with an ``after`` (models/ops.py AfterFfn / AfterAttention) as its two parts: the
    matmul alone and the norm op that follows it, run as its tail (``after.fused()``: no launch of its own) or as
    its own launch(es)."""
    after = c.kwargs.get("after")
    kw = {k: v for k, v in c.kwargs.items() if k != "after"}
    count = ops._moe_down_launches if c.op == "moe_down" else ops._gemv_launches
    base = OpCall(c.op, c.args, kw, count(*c.args, **kw))
    if after is None:
        return base, None
    out = c.args[4] if c.op == "moe_down" else c.args[2]
    if isinstance(after, ops.AfterAttention):
        nxt = OpCall("post_attention_norms", (out, after.x, after.w_post, after.outs, after.eps),
                     dict(delta=after.delta, xq=after.xq), after.separate_launches(out))
    elif after.post is None:
        w_next, h, xq = after.next_norm
        nxt = OpCall("rmsnorm", (after.x, w_next, h, after.eps), dict(residual=out, xq=xq), 1)
    else:
        _, w1, w2, w, scale, m, y2, fn = after.post
        f, y = after._f_y(out)
        nxt = OpCall("post_ffn_norms", (f, y, w1, w2, w, after.x, scale, after.eps),
                     dict(m=m, y2=y2, fn=fn, next_norm=after.next_norm), after.separate_launches(out))
    return base, nxt


def _traffic(c: OpCall, m, depth: int, splits) -> dict:
    """Bytes by kind of one decode op call (the rules in the module docstring)."""
    if c.op == "moe_gate_up" and c.kwargs.get("route") is not None:  # the router's bytes and the gate/up's, in one
        parts = _route_parts(c)                                        # launch or two
        return {k: sum(_traffic(p, m, depth, splits)[k] for p in parts) for k in KINDS}
    if c.op in ("moe_down", "gemv") and c.kwargs.get("after") is not None:  # + the norms after it (a tail: the same
        parts = [p for p in _tail_parts(c) if p is not None]               # bytes, its input read back from L2)
        return {k: sum(_traffic(p, m, depth, splits)[k] for p in parts) for k in KINDS}
    if c.op == "self_attention":  # its two parts; fused: q is not written by a prologue and read back by attention
        qk, at = _self_attention_parts(c)
        b = {k: _traffic(qk, m, depth, splits)[k] + _traffic(at, m, depth, splits)[k] for k in KINDS}
        if ops.fused_qk_attention(c.args[2]):
            nq = c.args[2].q_width
            b["act_write"] -= nq * F32
            b["act_read"] -= nq * F32
        return b
    cfg, a, kw = m.cfg, c.args, c.kwargs
    k_used = getattr(cfg, "n_expert_used", 0)
    b = dict.fromkeys(KINDS, 0.0)
    op = c.op
    if op == "embedding":
        w = a[0]
        b["dense"] += w.row_bytes
        b["act_write"] += w.n_in * F32
    elif op == "rmsnorm":
        w = a[1]
        n = w.n_in
        b["dense"] += w.nbytes
        b["act_read"] += n * F32 * (2 if kw.get("residual") is not None else 1)
        b["act_write"] += n * F32 * (2 if kw.get("residual") is not None else 1)
        if kw.get("xq") is not None:
            b["act_write"] += n * Q8
    elif op == "post_attention_norms":  # fused: o and x read, x written, each output written once
        w_post, outs = a[2], a[3]
        n = w_post.n_in
        b["dense"] += w_post.nbytes + sum(w.nbytes for w, _ in outs)
        fused = ops.enabled("fused_norms")  # else: delta written and read back, x read again per norm
        b["act_read"] += n * F32 * (2 if fused else 2 + len(outs))
        b["act_write"] += n * F32 * ((1 + len(outs)) if fused else (2 + len(outs)))
        if kw.get("xq") is not None:
            b["act_write"] += n * Q8
    elif op == "post_ffn_norms":  # fused: f [, y], x read, x written
        y, w = a[1], a[4]
        n = w.n_in
        b["dense"] += w.nbytes + (a[2].nbytes + a[3].nbytes if y is not None else 0)
        fused = ops.enabled("fused_norms")  # else: m, y2, fn written and read back
        b["act_read"] += n * F32 * ((3 if y is not None else 2) if fused else (6 if y is not None else 3))
        b["act_write"] += n * F32 * (1 if fused else (4 if y is not None else 2))
        nxt = kw.get("next_norm")
        if nxt is not None:  # + h = rmsnorm(x) * w_next [+ q8_1] (unfused: x read once more)
            b["dense"] += nxt[0].nbytes
            b["act_read"] += 0 if fused else n * F32
            b["act_write"] += n * F32 + (n * Q8 if nxt[2] is not None else 0)
    elif op == "rmsnorm_heads":
        w, n = a[1], a[2] * a[3]
        b["dense"] += w.nbytes
        b["act_read"] += n * F32
        b["act_write"] += n * F32
    elif op == "quantize":
        b["act_read"] += _nbytes(a[0])
        b["act_write"] += _nbytes(a[1])
    elif op in ("gemv", "gemv_qkv", "gemv_qk"):
        n_w = {"gemv": 1, "gemv_qkv": 3, "gemv_qk": 2}[op]
        ws = a[:n_w]
        xq = kw.get("xq")
        b["dense"] += sum(w.nbytes for w in ws)
        x_bytes = _vec(xq, ws[0].n_in) if xq is not None else ws[0].n_in * F32
        b["act_read"] += x_bytes * c.kernels  # one GEMV per matrix (unfused) reads the input once each
        b["act_write"] += sum(w.n_out for w in ws) * F32
    elif op == "dense_glu":
        wg, wu = a[0], a[1]
        n_ff = wg.n_out
        b["dense"] += wg.nbytes + wu.nbytes
        b["act_read"] += wg.n_in * F32
        b["act_write"] += n_ff * F32
        if c.kernels > 1:  # unfused: gate and up written, read back by the GLU kernel
            b["act_write"] += 2 * n_ff * F32
            b["act_read"] += 2 * n_ff * F32
    elif op == "glu":
        b["act_read"] += _nbytes(a[0]) + _nbytes(a[1])
        b["act_write"] += _nbytes(a[2])
    elif op == "rope":
        n = a[1] * a[2]
        b["act_read"] += n * F32
        b["act_write"] += n * F32
    elif op == "kv_append":
        g = m.attn_layers[a[1]]
        b["act_read"] += 2 * g.n_head_kv * g.head_dim * F32
        b["kv_write"] += _kv_entry(g)
    elif op in ("qk_prologue", "qk_norm_rope_kv"):
        layer, q_norm, k_norm = a[1], a[5], a[6]
        g = m.attn_layers[layer]
        nq, nkv = kw["n_head"] * g.head_dim, g.n_head_kv * g.head_dim
        ff = kw.get("freq_factors")
        b["dense"] += q_norm.nbytes + k_norm.nbytes + (ff.nbytes if ff is not None else 0)
        b["act_read"] += (nq + nkv * (1 if a[4] is a[3] else 2)) * F32  # K = V layers read k once
        b["act_write"] += nq * F32
        b["kv_write"] += _kv_entry(g)
        if c.kernels > 1:  # unfused: head norms and ropes each read and write q and k, the append reads k and v
            b["act_read"] += (2 * nq + 2 * nkv) * F32
            b["act_write"] += (nq + 2 * nkv) * F32
    elif op == "attention":
        layer = a[1]
        g = m.attn_layers[layer]
        nq = kw["n_head"] * g.head_dim
        S = splits[layer]
        b["kv_read"] += _kv_entry(g) * attended_positions(g, depth)
        b["act_read"] += nq * F32
        b["act_write"] += nq * F32
        if kw.get("xq") is not None:  # the q8_1 copy for the int8 O projection
            b["act_write"] += nq * Q8
            if not ops.enabled("fused_attn_q8"):  # written by a quantize kernel that reads the output back
                b["act_read"] += nq * F32
        if S > 1:  # split partials (o, lse) written by every split and read back by the combine
            part = (nq * S + kw["n_head"] * S) * F32
            b["act_write"] += part
            b["act_read"] += part
    elif op == "router_gemv":
        w, k = a[0], a[4]
        b["dense"] += w.nbytes
        b["act_read"] += w.n_in * F32 + w.n_out * F32      # input, logits scratch re-read by the last CTA
        b["act_write"] += w.n_out * F32 + 2 * k * F32     # logits scratch, ids + weights
        if kw.get("down_scale") is not None:                # k entries of the per-expert down scale
            b["routed"] += k * F32
            if not ops.enabled("fused_expert_scale"):       # in expert_scale's own launch: weights re-read
                b["act_read"] += 2 * k * F32
                b["act_write"] += k * F32
        pre = kw.get("prenorm")
        if pre is not None:                                 # + the pre-FFN norm: x, delta and its weight read,
            n = w.n_in                                      # x and h (+ q8_1) written (unfused: h re-read too)
            b["dense"] += pre[2].nbytes
            b["act_read"] += 2 * n * F32 + (0 if ops.enabled("fused_router_norm") else n * F32)
            b["act_write"] += 2 * n * F32 + (n * Q8 if pre[4] is not None else 0)
    elif op == "router":
        k = a[3]
        b["act_read"] += _nbytes(a[0])
        b["act_write"] += 2 * k * F32
    elif op == "moe_gate_up":
        wg, wu = a[0], a[1]
        hq = kw.get("hq")
        b["routed"] += _routed(wg, k_used) + (_routed(wu, k_used) if wu is not None else 0)
        b["act_read"] += (_vec(hq, wg.n_in) if hq is not None else wg.n_in * F32) + k_used * F32
        n_ff = wg.n_out if wu is not None else wg.n_out // 2
        b["act_write"] += k_used * n_ff * F32
        if kw.get("actq") is not None and ops.gate_up_writes_act_q8(n_ff):  # + its q8_1 copy (the last CTA of a
            b["act_read"] += k_used * n_ff * F32                          # block re-reads it from L2)
            b["act_write"] += k_used * n_ff * Q8
    elif op == "moe_down":
        wd = a[0]
        actq = kw.get("actq")
        n_act = k_used * wd.n_in
        if actq is not None and not ops.gate_up_writes_act_q8(wd.n_in):  # the q8_1 quantization of act (one more
            b["act_read"] += n_act * F32                                  # kernel), then the int8 down GEMV
            b["act_write"] += n_act * Q8
        b["routed"] += _routed(wd, k_used)
        b["act_read"] += n_act * (Q8 if actq is not None else F32) + 2 * k_used * F32
        b["act_write"] += wd.n_out * F32
    elif op == "residual_scale":
        b["act_read"] += _nbytes(a[0]) + _nbytes(a[1]) + F32
        b["act_write"] += _nbytes(a[0])
    elif op == "softcap":
        b["act_read"] += _nbytes(a[0])
        b["act_write"] += _nbytes(a[0])
    elif op == "expert_scale":
        b["routed"] += k_used * F32   # k entries of the per-expert scale vector
        b["act_read"] += 2 * k_used * F32
        b["act_write"] += k_used * F32
    elif op == "argmax":
        b["act_read"] += _nbytes(a[0])
        b["act_write"] += F32
    else:
        raise ValueError(f"models/launch_plan.py has no byte rule for the decode op {op}(): add one to _traffic")
    return {k: round(v) for k, v in b.items()}


def kernel_parts(c: OpCall) -> tuple:
    """The kernels behind one op call, as ((name, count), ...) named after the models/ops.py op each one is (the
    performance model prices a kernel by its class). Checked against the op's declared count."""
    kw = c.kwargs
    if c.op == "moe_gate_up" and kw.get("route") is not None:
        router, gate_up, *down = _route_parts(c)
        rparts = kernel_parts(router)
        if kw["route"].fused():  # the router's kernel is the gate/up launch's first phase (priced as the gate/up)
            rparts = tuple(p for p in rparts if p[0] != "router_gemv")
        parts = rparts + kernel_parts(gate_up)
        if down:
            dparts = kernel_parts(down[0])
            if kw["down"].fused(kw["route"], kw.get("actq")):  # ... and the down kernel its last phase
                dparts = tuple(p for p in dparts if p[0] != "moe_down")
            parts += dparts
    elif c.op == "router_gemv" and c.kernels > 1:  # the norm / the down scale in launches of their own
        parts = (("router_gemv", 1),)
        if kw.get("prenorm") is not None and not ops.enabled("fused_router_norm"):
            parts += (("rmsnorm", 1),)
        if kw.get("down_scale") is not None and not ops.enabled("fused_expert_scale"):
            parts += (("expert_scale", 1),)
    elif c.op in ("moe_down", "gemv") and kw.get("after") is not None:
        base, nxt = _tail_parts(c)
        parts = kernel_parts(base) + (kernel_parts(nxt) if not kw["after"].fused() else ())
    elif c.op == "moe_down" and c.kernels == 2:  # an actq the gate/up kernel did not write
        parts = (("quantize", 1), ("moe_down", 1))
    elif c.op == "attention" and kw.get("xq") is not None and not ops.enabled("fused_attn_q8"):
        parts = (("attention", c.kernels - 1), ("quantize", 1))
    elif c.op == "self_attention" and not ops.fused_qk_attention(c.args[2]):
        parts = sum((kernel_parts(p) for p in _self_attention_parts(c)), ())
    elif c.op == "self_attention" and c.kernels > 1:  # the kernel does not quantize its output (fused_attn_q8 off)
        parts = (("attention", 1), ("quantize", 1))
    elif c.op == "self_attention":
        parts = (("attention", 1),)  # the attention kernel with the Q/K prologue inside
    elif c.op == "qk_prologue" and not ops.enabled("fused_qk"):
        parts = (("rmsnorm_heads", 2), ("rope", 2), ("kv_append", 1))
    elif c.op == "qk_prologue":
        parts = (("qk_norm_rope_kv", 1),)
    elif c.op in ("gemv_qkv", "gemv_qk") and c.kernels > 1:
        parts = (("gemv", c.kernels),)
    elif c.op == "dense_glu" and c.kernels > 1:
        parts = (("gemv", 2), ("glu", 1))
    elif c.op == "dense_glu":
        parts = (("moe_gate_up", 1),)  # the MoE gate/up kernel with the dense weights as its one expert
    elif c.op == "post_attention_norms" and c.kernels > 1:
        parts = (("rmsnorm", c.kernels),)
    elif c.op == "post_ffn_norms" and c.kernels > 1:
        parts = (("rmsnorm", c.kernels - 1), ("residual_scale", 1))
    elif c.op in ("post_attention_norms", "post_ffn_norms"):
        parts = (("rmsnorm", 1),)  # priced as one RMSNorm launch (kernels/norm_chain.py: one CTA, one row)
    else:
        parts = ((c.op, c.kernels),)
    if sum(n for _, n in parts) != c.kernels:
        raise ValueError(f"{c.op}(): parts {parts} do not add up to its declared {c.kernels} launches")
    return parts


def _weights_of(c: OpCall) -> list[QWeight]:
    if c.op == "moe_gate_up" and c.kwargs.get("route") is not None:
        return sum((_weights_of(p) for p in _route_parts(c)), [])
    return [x for x in list(c.args) + list(c.kwargs.values()) if isinstance(x, QWeight)]


def layer_kind(cfg, layer: int) -> str:
    """``"swa"``/``"full"`` attention and ``"moe"``/``"dense"`` FFN of one layer: what the per-type figures group."""
    moe = cfg.is_moe(layer) if hasattr(cfg, "is_moe") else getattr(cfg, "n_expert", 0) > 0
    return f"{'swa' if cfg.is_swa(layer) else 'full'} {'moe' if moe else 'dense'}"


def minimum_bytes(g, cfg, weight_names, attn_layers, depth: int) -> tuple[dict, dict]:
    """(by kind, by layer) the least a decode token moves: every weight the forward names, once, in its GGUF bytes
    (expert tensors k of E; ``token_embd`` whole when it is the LM head, else one row) and the KV cache read and
    written at ``depth``."""
    k_used, n_expert = getattr(cfg, "n_expert_used", 0), getattr(cfg, "n_expert", 0)
    total = {"routed": 0, "dense": 0, "kv": 0}
    per_layer = dict.fromkeys(range(cfg.n_layer), 0)
    for n in weight_names:
        t = g.tensor(n)
        if "_exps." in n:
            kind, nb = "routed", t.nbytes * k_used // n_expert
        elif n == "token_embd.weight" and not cfg.tied_output:
            kind, nb = "dense", t.row_bytes
        else:
            kind, nb = "dense", t.nbytes
        total[kind] += nb
        mt = _BLK.match(n)
        if mt:
            per_layer[int(mt.group(1))] += nb
    for l, geo in enumerate(attn_layers):
        kv = _kv_entry(geo) * (attended_positions(geo, depth) + 1)  # read the attended positions, write this one
        total["kv"] += kv
        per_layer[l] += kv
    return total, per_layer


def launch_plan(g, cfg=None, *, depth: int = 0, sm_count: int = 132, max_context: int | None = None,
                disabled=frozenset(), name: str | None = None) -> LaunchPlan:
    """The decode launch plan of ``g`` (a GGUFFile, a path or a SyntheticHeader) at KV depth ``depth`` (the token
    is decoded at position ``depth``). ``sm_count`` and ``max_context`` (default ``max(64, depth + 1)``) set the
    split-KV counts as the GPU build chooses them (models/ops.py attention_splits; only activation bytes depend on
    them: H100 132 SMs by default). ``disabled``: speed passes switched off on top of ``SPARKINFER_DISABLE`` (the
    plan of an older build, e.g. the one a benchmark measured)."""
    saved = ops.DISABLED
    ops.DISABLED = saved | frozenset(disabled)
    try:
        return _launch_plan(g, cfg, depth, sm_count, max_context, name)
    finally:
        ops.DISABLED = saved


def _launch_plan(g, cfg, depth: int, sm_count: int, max_context: int | None, name: str | None) -> LaunchPlan:
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.models.ops import attention_splits

    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if not hasattr(g, "tensors"):
        from sparkinfer_cute.gguf import GGUFFile

        g = GGUFFile(g)
    cfg = cfg if cfg is not None else load_config(g)
    max_context = max(64, depth + 1) if max_context is None else max_context
    if max_context <= depth:
        raise ValueError(f"max_context {max_context} leaves no room for position {depth}")
    m, calls = record(g, cfg, path="decode", max_context=max_context)
    splits = [attention_splits(geo, max_context, sm_count) for geo in m.attn_layers]
    launches, current, seg = [], None, "embed"
    for c in calls:
        ws = _weights_of(c)
        layers = {int(mt.group(1)) for w in ws for mt in [_BLK.match(w.name)] if mt}
        if c.op in ("attention", "kv_append", "qk_prologue", "qk_norm_rope_kv", "self_attention"):
            layers.add(c.args[1])
        if len(layers) > 1:
            raise ValueError(f"{c.op}() reads weights of layers {sorted(layers)}: one call, one layer")
        if layers:
            current, seg = layers.pop(), "layer"
        elif ws and c.op != "embedding":
            current, seg = None, "output"  # output_norm / the LM head: the step's tail
        int8 = any(c.kwargs.get(q) is not None for q in ("xq", "hq", "actq"))
        launches.append(Launch(c.op, c.kernels, seg, current if seg == "layer" else None,
                               _traffic(c, m, depth, splits), tuple(w.name for w in ws), int8, kernel_parts(c),
                               _tails(c), _phases(c)))
    minimum, per_layer = minimum_bytes(g, cfg, [n for n in m.weight_names()], m.attn_layers, depth)
    kinds = {l: layer_kind(cfg, l) for l in range(cfg.n_layer)}
    return LaunchPlan(name or getattr(g, "path", "?"), cfg.arch, depth, launches, minimum, kinds, per_layer)


def layer_kernels_what_if(plan: LaunchPlan, per_layer: int) -> int:
    """Kernels per token if every layer took ``per_layer`` launches and the embedding / output tail stayed as
    planned (the fusion target of issue 15: <= 4 per layer)."""
    tail = sum(x.kernels for x in plan.launches if x.segment != "layer")
    return per_layer * len(plan.layer_kind) + tail


__all__ = [
    "KINDS",
    "Launch",
    "LaunchPlan",
    "attended_positions",
    "launch_plan",
    "layer_kernels_what_if",
    "layer_kind",
    "minimum_bytes",
]
