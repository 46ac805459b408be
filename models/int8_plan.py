"""Which matmuls a GPU forward runs on int8 (q8_1) activations, read from the forward's own code without a GPU.

The int8 end-to-end gate (tests/models/test_gpu_decode.py, tests/models/test_gpu_prefill.py) compares a GPU build
with the CPU reference run with the same activation rounding (``load_reference(..., act_q8_1=names)``), so it needs
the exact set of tensors whose matmul input the build quantizes. That set follows from ``SPARKINFER_DP4A``
(:func:`ops.dp4a_for`, :func:`ops.prefer_dp4a`), the tensor types and each model's choices (Gemma 3 keeps f32
activations in decode, every batched prefill GEMM is int8, ...). Rather than restate those rules, this module *runs*
the model's ``alloc_buffers`` and ``enqueue_step`` / ``enqueue_prefill`` without a GPU (models/dry_run.py: every op
of ``models/ops.py`` replaced by a recorder, the device buffers by stand-ins; nothing is allocated or launched), and
reads the int8 activations off the recorded calls:

* ``gemv`` / ``gemv_qkv`` with ``xq``, ``moe_gate_up`` with ``hq``, ``moe_down`` with ``actq``: int8 (the down
  projection a ``moe_gate_up`` runs as its ``down``: as ``moe_down``);
* ``gemm`` (the prefill grouped GEMM): always int8 (its input is a q8_1 buffer), ``w_up`` included;
* ``moe_rows``: the expert gate/up/down GEMMs int8, the router (its first weight) f32;
* the ops in :data:`F32_WEIGHT_OPS` read weights with f32 activations (or are no matmul);
* any other op handed a matrix is refused (:class:`UnknownWeightOp`): a new op must be classified here first.

On a GPU the tests also record the same calls during the real warm-up step and assert the two sets agree.
"""

from __future__ import annotations

import contextlib

from sparkinfer_cute.models.dry_run import PATHS, record
from sparkinfer_cute.runtime.weights import QWeight

F32_WEIGHT_OPS = frozenset({
    "embedding", "embedding_rows",                    # a row gather, no matmul
    "rmsnorm", "rmsnorm_rows", "rmsnorm_heads",       # vector weights
    "post_attention_norms", "post_ffn_norms",
    "qk_prologue", "qk_norm_rope_kv", "qk_norm_rope_kv_rows", "self_attention",
    "router_gemv", "router",                          # the F32 router: f32 activations
    "gemv_rows",                                      # the f32 decode GEMV over prefill rows (LM head fallback)
    "dense_glu",                                      # a dense GLU's gate+up (f32 activations: no xq argument)
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


class UnknownWeightOp(RuntimeError):
    """A forward handed a weight matrix to an op this module has not classified as int8 or f32."""


def _weights(args, kwargs) -> list[QWeight]:
    return [a for a in list(args) + list(kwargs.values()) if isinstance(a, QWeight)]


def _int8_names(op: str, args, kwargs) -> list[str]:
    ws = _weights(args, kwargs)
    down = kwargs.get("down") if op == "moe_gate_up" else None
    if down is not None:  # the experts' down projection run by the gate/up op (models/ops.py ExpertsDown)
        return _int8_names(op, args, {k: v for k, v in kwargs.items() if k != "down"}) + _int8_names(
            "moe_down", (down.w_down,), {"actq": kwargs.get("actq")})
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
    _, calls = record(g, cfg, path=path)
    return _int8_from(calls)


def _int8_from(calls) -> frozenset[str]:
    names: set[str] = set()
    for c in calls:
        names.update(_int8_names(c.op, c.args, c.kwargs))
    return frozenset(names)


def _tiles_from(m, calls) -> dict[int, int]:
    from sparkinfer_cute.models import ops

    tiles = {}
    for c in calls:
        if c.op == "attention_rows":
            layer = c.args[1] if len(c.args) > 1 else c.kwargs["layer"]
            d = m.attn_layers[layer].head_dim
            block_n = ops.prefill_flash_block_n(d)
            if block_n is not None:
                tiles[d] = block_n
    return tiles


def flash_attention_tiles(g, cfg=None, *, path: str = "prefill_all_logits") -> dict[int, int]:
    """{head_dim: key tile} of the layers whose attention the GPU ``path`` runs on the flash prefill kernel (f16 q
    and P; ``ops.prefill_flash_block_n``), read off the forward's ``attention_rows`` calls: the
    ``load_reference(..., attn_f16_tiles=)`` of the same-rounding reference. Empty for ``"decode"`` (the decode
    kernel keeps q in f32)."""
    return _tiles_from(*record(g, cfg, path=path))


def rounding_plan(g, cfg=None, *, path: str = "decode") -> dict:
    """The GPU ``path``'s deliberate roundings as ``load_reference`` keyword arguments: ``act_q8_1`` (the int8
    matmuls) and ``attn_f16_tiles`` (the flash prefill attentions), both read off one dry run.
    ``load_reference(p, **rounding_plan(p, path=...))`` is the same-rounding reference the int8 gates compare that
    path with."""
    m, calls = record(g, cfg, path=path)
    return {"act_q8_1": _int8_from(calls), "attn_f16_tiles": _tiles_from(m, calls)}


__all__ = ["F32_WEIGHT_OPS", "INT8_OPS", "PATHS", "UnknownWeightOp", "flash_attention_tiles",
           "int8_activation_tensors", "recording", "rounding_plan"]
