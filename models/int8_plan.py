"""Which matmuls a GPU forward runs on int8 (q8_1) activations, read from the forward's own code without a GPU.

The int8 end-to-end gate (tests/models/test_gpu_decode.py, tests/models/test_gpu_prefill.py) compares a GPU build
with the CPU reference run with the same activation rounding (``load_reference(..., act_q8_1=names)``), so it needs
the exact set of tensors whose matmul input the build quantizes. That set follows from ``SPARKINFER_DP4A``
(:func:`ops.dp4a_for`, :func:`ops.prefer_dp4a`), the tensor types and each model's choices (Gemma keeps f32
activations in decode, every batched prefill GEMM is int8, ...). Rather than restate those rules, this module *runs*
the model's ``alloc_buffers`` and ``enqueue_step`` / ``enqueue_prefill`` with every op of ``models/ops.py`` replaced
by a recorder and the device buffers by inert stand-ins (a dry run: nothing is allocated or launched), and reads
the int8 activations off the recorded calls:

* ``gemv`` / ``gemv_qkv`` with ``xq``, ``moe_gate_up`` with ``hq``, ``moe_down`` with ``actq``: int8;
* ``gemm`` (the prefill grouped GEMM): always int8 (its input is a q8_1 buffer), ``w_up`` included;
* ``moe_rows``: the expert gate/up/down GEMMs int8, the router (its first weight) f32;
* the ops in :data:`F32_WEIGHT_OPS` read weights with f32 activations (or are no matmul);
* any other op handed a matrix is refused (:class:`UnknownWeightOp`): a new op must be classified here first.

On a GPU the tests also record the same calls during the real warm-up step and assert the two sets agree.
"""

from __future__ import annotations

import contextlib
import os

from sparkinfer_cute.runtime.weights import QWeight

F32_WEIGHT_OPS = frozenset({
    "embedding", "embedding_rows",                    # a row gather, no matmul
    "rmsnorm", "rmsnorm_rows", "rmsnorm_heads",       # vector weights
    "qk_prologue", "qk_norm_rope_kv", "qk_norm_rope_kv_rows",
    "router_gemv", "router",                          # the F32 router: f32 activations
    "gemv_rows",                                      # the f32 decode GEMV over prefill rows (LM head fallback)
    "expert_scale",                                   # a per-expert scale vector
})
INT8_OPS = {  # op -> (is the call int8?, which weights take the int8 input)
    "gemv": (lambda kw: kw.get("xq") is not None, slice(None)),
    "gemv_qkv": (lambda kw: kw.get("xq") is not None, slice(None)),
    "gemv_qk": (lambda kw: kw.get("xq") is not None, slice(None)),
    "moe_gate_up": (lambda kw: kw.get("hq") is not None, slice(None)),
    "moe_down": (lambda kw: kw.get("actq") is not None, slice(None)),
    "gemm": (lambda kw: True, slice(None)),
    "moe_rows": (lambda kw: True, slice(1, None)),  # (router, gate, up, down): the router stays f32
}
PATHS = ("decode", "prefill", "prefill_all_logits")
# models/ops.py names that keep their real meaning in a dry run (pure functions of the config / environment)
_REAL = frozenset({"enabled", "dp4a_for", "prefer_dp4a", "attention_geometry", "AttentionGeometry", "gemm_supports",
                   "rows", "row", "tuned_configs", "tuned"})


class UnknownWeightOp(RuntimeError):
    """A forward handed a weight matrix to an op this module has not classified as int8 or f32."""


class _Inert:
    """Stands in for device buffers, workspaces and op results: every attribute, call, index and arithmetic gives
    another stand-in (``shape`` and ``size`` are small numbers so that sizes can still be computed)."""

    shape = (1,)
    size = 1
    ptr = 0

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __call__(self, *a, **k):
        return _Inert()

    def __getitem__(self, i):
        return _Inert()

    def __mul__(self, o):
        return self

    __rmul__ = __truediv__ = __rtruediv__ = __add__ = __radd__ = __mul__


def _weights(args, kwargs) -> list[QWeight]:
    return [a for a in list(args) + list(kwargs.values()) if isinstance(a, QWeight)]


@contextlib.contextmanager
def _dry_run(calls: list):
    """Replace every op and buffer class of models/ops.py, and DeviceArray in the model modules, by recorders and
    stand-ins; restore them on exit."""
    import sparkinfer_cute.models as models_pkg
    from sparkinfer_cute.models import base as base_mod
    from sparkinfer_cute.models import ops

    saved = []

    def patch(mod, name, value):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    def recorder(name):
        def rec(*args, **kwargs):
            calls.append((name, args, kwargs))
            return 1.0 if name == "qk_prologue" else _Inert()  # qk_prologue returns the scale attention applies
        return rec

    try:
        for name, obj in list(vars(ops).items()):
            if name.startswith("_") or name in _REAL or not callable(obj):
                continue
            if getattr(obj, "__module__", None) != ops.__name__:
                continue
            patch(ops, name, recorder(name) if not isinstance(obj, type) else _Inert())
        patch(ops, "launch_counter", _Inert())
        for mod in {base_mod, *(__import__(c.__module__, fromlist=["_"]) for c in models_pkg.GPU_FORWARDS.values())}:
            if hasattr(mod, "DeviceArray"):
                patch(mod, "DeviceArray", _Inert())
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def _dry_model(cls, g, cfg, repack: bool):
    """An instance of the GPU forward ``cls`` with weight handles (real names, types and shapes; no data) and
    stand-in buffers, built without ``__init__`` (which would upload weights)."""
    from sparkinfer_cute.models import ops

    m = cls.__new__(cls)
    m.g, m.cfg = g, cfg
    m.max_context = 64
    m.attn_layers = ops.attention_geometry(cfg)
    repack_names = m.repack_names() if repack else set()
    m.w = {}
    for n in m.weight_names():
        t = g.tensor(n)
        qtype = t.ggml_type.name
        if qtype == "Q6_K" and n in repack_names:
            qtype = "Q6_K_P"  # as WeightStore uploads it
        m.w[n] = QWeight(n, qtype, tuple(int(v) for v in t.shape), _Inert(), 0)
    m.tok = m.pos_buf = m.logits = m.kv = _Inert()
    m.stream = _Inert()
    return m


def _int8_names(op: str, args, kwargs) -> list[str]:
    ws = _weights(args, kwargs)
    if op in INT8_OPS:
        is_int8, which = INT8_OPS[op]
        # matrices only: a vector handed along (a per-expert scale) is no matmul input
        return [w.name for w in ws[which] if len(w.shape) > 1] if is_int8(kwargs) else []
    if op not in F32_WEIGHT_OPS and any(len(w.shape) > 1 for w in ws):
        raise UnknownWeightOp(f"models/ops.py {op}() takes a weight matrix ({ws[0].name}): classify it in "
                              "models/int8_plan.py (INT8_OPS or F32_WEIGHT_OPS)")
    return []


@contextlib.contextmanager
def recording(names: set):
    """The live counterpart of the dry run (GPU tests): while active, the int8-capable ops of models/ops.py
    (:data:`INT8_OPS`) run as usual and add the weights each call feeds with q8_1 activations to ``names``. Wrap the
    build's warm-up (its first step runs every op eagerly before the graph capture)."""
    from sparkinfer_cute.models import ops

    saved = {op: getattr(ops, op) for op in INT8_OPS}

    def wrap(op, fn):
        def rec(*args, **kwargs):
            names.update(_int8_names(op, args, kwargs))
            return fn(*args, **kwargs)
        return rec

    try:
        for op, fn in saved.items():
            setattr(ops, op, wrap(op, fn))
        yield names
    finally:
        for op, fn in saved.items():
            setattr(ops, op, fn)


def int8_activation_tensors(g, cfg=None, *, path: str = "decode") -> frozenset[str]:
    """Names of the tensors whose matmuls the GPU forward of ``g``'s architecture runs on q8_1 activations, under
    the current ``SPARKINFER_DP4A`` / ``SPARKINFER_REPACK_Q6K`` settings (``models.ops.DP4A`` as patched by tests).

    ``path``: ``"decode"`` (one decode step: the CUDA graph every generated token replays), ``"prefill"`` (a batched
    prompt chunk, the last position's logits) or ``"prefill_all_logits"`` (a batched chunk with every position's
    logits: the accuracy harness' path). A MoE layer's gate and up share one quantized input; both names are listed.
    ``g``: a GGUFFile or path; ``cfg``: its config (default: loaded from ``g``)."""
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.models import GPU_FORWARDS

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    g = g if isinstance(g, GGUFFile) else GGUFFile(g)
    cfg = cfg if cfg is not None else load_config(g)
    cls = GPU_FORWARDS[cfg.arch]
    repack = os.environ.get("SPARKINFER_REPACK_Q6K", "1") not in ("0", "no", "false")
    calls: list = []
    with _dry_run(calls):
        m = _dry_model(cls, g, cfg, repack)
        m.alloc_buffers()
        if path == "decode":
            m.enqueue_step(_Inert())
        else:
            m._pf = m.alloc_prefill(4)
            m.enqueue_prefill(_Inert(), 2, all_logits=_Inert() if path == "prefill_all_logits" else None)
    names: set[str] = set()
    for op, args, kwargs in calls:
        names.update(_int8_names(op, args, kwargs))
    return frozenset(names)


__all__ = ["F32_WEIGHT_OPS", "INT8_OPS", "PATHS", "UnknownWeightOp", "int8_activation_tensors", "recording"]
