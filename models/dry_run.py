"""A GPU forward run without a GPU: every op call of one decode step (or prefill chunk), in order, with its
arguments and the kernels it launches, read off the forward's own code.

The model's ``alloc_buffers`` and ``enqueue_step`` / ``enqueue_prefill`` run with every op of ``models/ops.py``
replaced by a recorder, the device buffers by stand-ins that know their shape, dtype and byte size
(:class:`DryArray`) and the weights by handles with the real names, types, shapes and byte sizes but no data. Nothing
is allocated, compiled or launched, and no tensor data is read, so a header is enough
(:class:`sparkinfer_cute.gguf.synth.SyntheticHeader` describes the 17 GiB 30B shape without writing it).

Two readers share this one mechanism: models/int8_plan.py (which matmuls take q8_1 activations) and
models/launch_plan.py (kernels and bytes per decode token). Each recorded call carries the kernel count the op
declares with ``@ops.launches``: the same declaration the live ``launch_counter`` adds up, so the dry run and the
benchmark's kernels per token cannot disagree. A call to an op that declares no count (and is not a known
allocation helper) is refused (:class:`UndeclaredLaunches`): a new op must say what it launches.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import numpy as np

from sparkinfer_cute.gguf.quants import Q6_K_P_BLOCK_BYTES
from sparkinfer_cute.runtime.weights import QWeight, WeightStore

PATHS = ("decode", "prefill", "prefill_all_logits")
# models/ops.py names that keep their real meaning in a dry run (pure functions of the config / environment)
REAL = frozenset({"enabled", "dp4a_for", "prefer_dp4a", "attention_geometry", "AttentionGeometry", "gemm_supports",
                  "rows", "row", "launches", "attention_splits", "gate_up_writes_act_q8", "tuned_configs", "tuned",
                  "packs_rows", "fused_qk_attention", "prefill_flash_block_n", "AfterFfn", "AfterAttention",
                  "RouteFirst", "ExpertsDown"})
# models/ops.py classes built for real in a dry run, over stand-in buffers: the prefill chunk's buffers, so that the
# widths a prefill passes its matrix ops are checked (WIDTH_CHECKS) as the decode step's are
DRY_BUILT = frozenset({"PrefillBuffers"})
# ops that allocate and launch nothing (their recorder returns a sized stand-in buffer)
NO_LAUNCH = frozenset({"new_q8", "dense_expert_ids"})
Q8_1_BYTES_PER_VALUE = 1.25  # int8 value + f32 scale and f32 sum per block of 32 (kernels/q8_1.py Q8Act)


class UndeclaredLaunches(RuntimeError):
    """A forward called an op of models/ops.py that declares no kernel count with ``@launches``."""


class OpCall(NamedTuple):
    op: str        # the models/ops.py function called
    args: tuple
    kwargs: dict
    kernels: int   # kernels the call launches (the op's @launches declaration)


class Inert:
    """Stands in for workspaces, KV caches and op results: every attribute, call, index and arithmetic gives
    another stand-in (``shape`` and ``size`` are small numbers so that sizes can still be computed)."""

    shape = (1,)
    size = 1
    ptr = 0

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert()

    def __call__(self, *a, **k):
        return Inert()

    def __getitem__(self, i):
        return Inert()

    def __mul__(self, o):
        return self

    __rmul__ = __truediv__ = __rtruediv__ = __add__ = __radd__ = __mul__


class DryArray(Inert):
    """A device buffer that is never allocated: ``shape``, ``dtype`` (a numpy dtype, or ``"q8_1"`` for a
    quantized activation of ``shape[-1]`` values per row) and ``nbytes``; ``view`` gives another one."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(v) for v in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        self.dtype = dtype if dtype == "q8_1" else np.dtype(dtype)
        self.size = math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        per = Q8_1_BYTES_PER_VALUE if self.dtype == "q8_1" else self.dtype.itemsize
        return int(self.size * per)

    def view(self, dtype, shape, offset_bytes: int = 0):
        return DryArray(shape, dtype)

    def to_numpy(self):
        return np.zeros(self.shape, np.float32 if self.dtype == "q8_1" else self.dtype)

    def narrow(self, n: int):
        """``Q8Act.narrow``: the q8_1 buffer at width ``n`` (rows kept)."""
        assert self.dtype == "q8_1" and n <= self.shape[-1], (self.shape, n)
        return DryArray((*self.shape[:-1], n), "q8_1")


class _DryKV(Inert):
    """The paged KV cache of a dry model: its page table has a shape (the prefill buffers copy one row of it)."""

    page_table = DryArray((1, 1), np.int32)


class _DryDeviceArray:
    """Takes the place of the ``DeviceArray`` class in the model modules."""

    @staticmethod
    def empty(shape, dtype=np.float32, *a, **k):
        return DryArray(shape, dtype)

    zeros = empty

    @staticmethod
    def from_numpy(arr, *a, **k):
        return DryArray(np.shape(arr), np.asarray(arr).dtype)


class _ShapesOnly:
    """A GGUF file or header as the dry run reads it: metadata and tensor infos as they are; ``dequant`` gives
    zeros of the tensor's shape (a forward dequantizes small vectors at allocation, e.g. Gemma 4's router norm;
    the dry run needs their shapes, not their values, and so reads no tensor data)."""

    def __init__(self, g):
        self._g = g

    def __getattr__(self, name):
        return getattr(self._g, name)

    def dequant(self, name: str) -> np.ndarray:
        return np.zeros(self._g.tensor(name).np_shape, np.float32)


# matrix ops whose input width must be the weights' n_in: op -> (weight argument positions, input position, the
# keyword of its q8_1 copy). The kernels check this at launch (gemv) or trust it (the grouped GEMM walks the weight at
# the input's row size), so the dry run checks it for every layer of every preset without a GPU.
WIDTH_CHECKS = {"gemv": ((0,), 1, "xq"), "gemm": ((0,), 1, None), "gemv_rows": ((0,), 1, None),
                "gemv_qkv": ((0, 1, 2), 3, "xq"), "gemv_qk": ((0, 1), 2, "xq"), "dense_glu": ((0, 1), 2, None),
                "moe_gate_up": ((0, 1), 2, "hq")}


class WidthMismatch(ValueError):
    """A forward fed a matrix op an input whose width is not the weight's n_in."""


def check_widths(name: str, args, kwargs) -> None:
    if name not in WIDTH_CHECKS:
        return
    w_at, x_at, q8_kw = WIDTH_CHECKS[name]
    inputs = [("input", args[x_at] if len(args) > x_at else None), (q8_kw, kwargs.get(q8_kw) if q8_kw else None)]
    for i in w_at:
        w = args[i] if len(args) > i else None
        if w is None or not hasattr(w, "n_in"):
            continue
        for what, x in inputs:
            if isinstance(x, DryArray) and x.shape[-1] != w.n_in:
                raise WidthMismatch(f"{name}({w.name}): {what} width {x.shape[-1]} != the weight's n_in {w.n_in}")


def _recorder(name: str, op, calls: list):
    count = getattr(op, "launches", None)
    if count is None and name not in NO_LAUNCH:
        def refuse(*args, **kwargs):
            raise UndeclaredLaunches(f"models/ops.py {name}() declares no kernel count: decorate it with "
                                     "@launches(...) (or list it in models/dry_run.py NO_LAUNCH)")
        return refuse

    def rec(*args, **kwargs):
        if name == "new_q8":  # allocations: recorded as the buffer they return, not as calls
            n, rows = args[0], (args[1] if len(args) > 1 else kwargs.get("rows", 1))
            return DryArray((rows, n), "q8_1")
        if name == "dense_expert_ids":
            return DryArray((1,), np.int32)
        check_widths(name, args, kwargs)
        calls.append(OpCall(name, args, kwargs, int(count(*args, **kwargs))))
        return 1.0 if name == "qk_prologue" else Inert()  # qk_prologue returns the scale attention applies
    return rec


@contextlib.contextmanager
def dry_run(calls: list):
    """Replace every op and buffer class of models/ops.py, and DeviceArray in the model modules, by recorders and
    stand-ins (each op call appends an :class:`OpCall` to ``calls``); restore them on exit."""
    import sparkinfer_cute.models as models_pkg
    from sparkinfer_cute.models import base as base_mod
    from sparkinfer_cute.models import ops

    saved = []

    def patch(mod, name, value):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    try:
        for name, obj in list(vars(ops).items()):
            if name.startswith("_") or name in REAL or name in DRY_BUILT or not callable(obj):
                continue
            if getattr(obj, "__module__", None) != ops.__name__:
                continue
            patch(ops, name, Inert() if isinstance(obj, type) else _recorder(name, obj, calls))
        patch(ops, "launch_counter", Inert())
        patch(ops, "DeviceArray", _DryDeviceArray)  # DRY_BUILT classes allocate through it
        for mod in {base_mod, *(__import__(c.__module__, fromlist=["_"]) for c in models_pkg.GPU_FORWARDS.values())}:
            if hasattr(mod, "DeviceArray"):
                patch(mod, "DeviceArray", _DryDeviceArray)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def repack_q6k() -> bool:
    """Whether Q6_K GEMV/MoE weights are uploaded padded (``SPARKINFER_REPACK_Q6K``, as models/base.py reads it)."""
    return os.environ.get("SPARKINFER_REPACK_Q6K", "1") not in ("0", "no", "false")


def dry_model(cls, g, cfg, *, repack: bool | None = None, max_context: int = 64):
    """An instance of the GPU forward ``cls`` with weight handles (real names, types, shapes and uploaded byte sizes;
    no data) and stand-in buffers, built without ``__init__`` (which would upload weights). Call inside
    :func:`dry_run`."""
    from sparkinfer_cute.models import ops

    repack = repack_q6k() if repack is None else repack
    m = cls.__new__(cls)
    m.g, m.cfg = _ShapesOnly(g), cfg
    m.max_context = max_context
    m.attn_layers = ops.attention_geometry(cfg)
    repack_names = m.repack_names() if repack else set()
    handles = {}
    for n in m.weight_names():
        t = g.tensor(n)
        qtype, row_bytes = t.ggml_type.name, t.row_bytes
        if qtype == "Q6_K" and n in repack_names:  # as WeightStore uploads it (runtime/weights.py)
            qtype, row_bytes = "Q6_K_P", t.shape[0] // 256 * Q6_K_P_BLOCK_BYTES
        shape = tuple(int(v) for v in t.shape)
        handles[n] = QWeight(n, qtype, shape, DryArray((row_bytes * math.prod(shape[1:]),), np.uint8), row_bytes)
    m.w = WeightStore.of(handles)  # the real store's interface (a dict hid a missing items() until a GPU ran)
    m.tok = DryArray((1,), np.int32)
    m.pos_buf = DryArray((1,), np.int32)
    m.logits = DryArray((cfg.vocab_size,), np.float32)
    m.kv = _DryKV()
    m.stream = Inert()
    return m


def record(g, cfg=None, *, path: str = "decode", max_context: int = 64):
    """Dry-run one ``path`` step (``"decode"``: the CUDA graph every generated token replays; ``"prefill"``: a
    batched prompt chunk of 2 tokens; ``"prefill_all_logits"``: the same with every position's logits) of the GPU
    forward of ``g``'s architecture. ``g``: a GGUFFile, a path, or a SyntheticHeader; ``cfg``: its config (default:
    loaded from ``g``). Returns ``(model, calls)``: the dry model (its ``attn_layers``, ``w``, ...) and the
    :class:`OpCall` list."""
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config
    from sparkinfer_cute.models import GPU_FORWARDS

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    g = g if hasattr(g, "tensors") else GGUFFile(g)
    cfg = cfg if cfg is not None else load_config(g)
    cls = GPU_FORWARDS[cfg.arch]
    calls: list[OpCall] = []
    with dry_run(calls):
        m = dry_model(cls, g, cfg, max_context=max_context)
        m.alloc_buffers()
        if path == "decode":
            m.enqueue_step(Inert())
        else:
            m._pf = m.alloc_prefill(4)
            m.enqueue_prefill(Inert(), 2, all_logits=Inert() if path == "prefill_all_logits" else None)
    return m, calls


__all__ = [
    "NO_LAUNCH",
    "PATHS",
    "REAL",
    "DryArray",
    "Inert",
    "OpCall",
    "UndeclaredLaunches",
    "dry_model",
    "dry_run",
    "record",
    "repack_q6k",
]
