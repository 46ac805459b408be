"""The shapes a model runs each tunable op at, read from its GGUF file (tensor types and shapes + the typed config).

Weights are read as the GPU holds them: Q6_K matrices become Q6_K_P (the upload repack of ``models/base.py``
``repack_names``: every GEMV/MoE weight, never the embedding table; ``SPARKINFER_REPACK_Q6K=0`` keeps Q6_K). A tied
LM head is ``token_embd.weight`` itself, so it stays Q6_K. Every task counts how often the shape runs per decode
step (or per prefill chunk): the table's per-token estimate weights each op's gain by it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# GEMV / GEMM roles of the dense 2-D weights, in forward order
DENSE_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight$")

DEFAULT_CTXS = (512, 4096, 32768)
DEFAULT_PREFILL_TOKENS = 512


@dataclass
class Task:
    """One (op, shape) to tune, and where the model runs it."""

    op: str
    shape: dict
    count: int = 0  # launches per decode step (per prefill chunk for quant_gemm)
    uses: dict = field(default_factory=dict)  # role -> launches

    @property
    def where(self) -> str:
        return ", ".join(f"{r} x{n}" for r, n in self.uses.items())


def gpu_qtype(name: str, ggml_type: str) -> str:
    """The weight type the GPU kernels see (models/base.py repack_names: Q6_K -> Q6_K_P except the embedding)."""
    repack = os.environ.get("SPARKINFER_REPACK_Q6K", "1") not in ("0", "no", "false")
    if ggml_type == "Q6_K" and repack and name != "token_embd.weight":
        return "Q6_K_P"
    return ggml_type


class _Tasks:
    def __init__(self, ops):
        self.ops = set(ops)
        self.by_key: dict[tuple, Task] = {}

    def add(self, op: str, shape: dict, role: str, n: int = 1) -> None:
        if op not in self.ops:
            return
        key = (op, tuple(shape.items()))
        t = self.by_key.setdefault(key, Task(op, dict(shape)))
        t.count += n
        t.uses[role] = t.uses.get(role, 0) + n


def _act_of(arch: str) -> str:
    return "gelu_tanh" if arch.startswith("gemma") else "silu"


def collect_tasks(g, cfg, ops, *, ctxs=DEFAULT_CTXS, prefill_tokens: int = DEFAULT_PREFILL_TOKENS
                  ) -> tuple[list[Task], list[str]]:
    """(tasks of the ``ops`` named, notes on what was skipped) for GGUF file ``g`` with config ``cfg``."""
    from .ops.attention import ctx_bucket, prologue_rot
    from .ops.quant_gemm import token_bucket

    tasks, notes = _Tasks(ops), []
    tinfo = g.tensors
    k = getattr(cfg, "n_expert_used", 0)
    act = _act_of(cfg.arch)
    T = token_bucket(prefill_tokens) if prefill_tokens > 0 else 0

    def typ(name):
        return gpu_qtype(name, tinfo[name].ggml_type.name)

    # ---- dense GEMVs (decode) and dense prefill GEMMs
    lm = "output.weight" if "output.weight" in tinfo else "token_embd.weight"
    if lm in tinfo and len(tinfo[lm].shape) == 2:
        n_in, n_out = tinfo[lm].shape
        q = gpu_qtype("output.weight", tinfo[lm].ggml_type.name) if lm == "output.weight" else typ(lm)
        for op in ("gemv", "gemv_q8"):
            tasks.add(op, dict(qtype=q, n_in=n_in, n_out=n_out), "lm_head")
    layers: dict[int, dict[str, str]] = {}
    for name in tinfo:
        m = _LAYER_TENSOR.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
    for _, lt in sorted(layers.items()):
        for role in DENSE_ROLES:
            name = lt.get(role)
            if name is None or len(tinfo[name].shape) != 2:
                continue
            n_in, n_out = tinfo[name].shape
            q = typ(name)
            for op in ("gemv", "gemv_q8"):
                tasks.add(op, dict(qtype=q, n_in=n_in, n_out=n_out), role)
            if T and role not in ("ffn_gate", "ffn_up"):
                tasks.add("quant_gemm", dict(qtype=q, n_in=n_in, n_out=n_out, tokens=T, n_expert=0, k=0, act="none"),
                          role)
        if T and "ffn_gate" in lt and "ffn_up" in lt:
            gn, un = lt["ffn_gate"], lt["ffn_up"]
            (n_in, n_ff), qg, qu = tinfo[gn].shape, typ(gn), typ(un)
            if qg == qu:
                tasks.add("quant_gemm", dict(qtype=qg, n_in=n_in, n_out=n_ff, tokens=T, n_expert=0, k=0, act=act),
                          "ffn_gate+up")
            else:
                for name, q in ((gn, qg), (un, qu)):
                    tasks.add("quant_gemm", dict(qtype=q, n_in=n_in, n_out=n_ff, tokens=T, n_expert=0, k=0,
                                                 act="none"), name.split(".")[2])
        # ---- routed experts
        if k and "ffn_down_exps" in lt:
            dn = lt["ffn_down_exps"]
            n_ff, n_embd, E = tinfo[dn].shape
            for op in ("moe_down", "moe_down_q8"):
                tasks.add(op, dict(qtype=typ(dn), n_ff=n_ff, n_out=n_embd, n_expert=E, k=k), "ffn_down_exps")
            if T:
                tasks.add("quant_gemm", dict(qtype=typ(dn), n_in=n_ff, n_out=n_embd, tokens=T, n_expert=E, k=k,
                                             act="none"), "ffn_down_exps")
        if k and "ffn_gate_up_exps" in lt:
            gu = lt["ffn_gate_up_exps"]
            n_in, n_ff2, E = tinfo[gu].shape
            for op in ("moe_gate_up", "moe_gate_up_q8"):
                tasks.add(op, dict(qtype=typ(gu), n_in=n_in, n_ff=n_ff2 // 2, n_expert=E, k=k, fused=True),
                          "ffn_gate_up_exps")
            if T and "quant_gemm" in tasks.ops:
                notes.append(f"{gu}: quant_gemm's fused gate+up layout (fused_gate_up) is not in its tuned space")
        elif k and "ffn_gate_exps" in lt and "ffn_up_exps" in lt:
            gn, un = lt["ffn_gate_exps"], lt["ffn_up_exps"]
            n_in, n_ff, E = tinfo[gn].shape
            if typ(gn) != typ(un):
                notes.append(f"{gn}/{un}: gate and up types differ ({typ(gn)}/{typ(un)}); the MoE kernels take one")
                continue
            for op in ("moe_gate_up", "moe_gate_up_q8"):
                tasks.add(op, dict(qtype=typ(gn), n_in=n_in, n_ff=n_ff, n_expert=E, k=k, fused=False),
                          "ffn_gate_up_exps")
            if T:
                tasks.add("quant_gemm", dict(qtype=typ(gn), n_in=n_in, n_out=n_ff, tokens=T, n_expert=E, k=k,
                                             act=act), "ffn_gate_up_exps")

    # ---- decode attention, per context bucket (a layer kind whose live keys are capped by its window is one shape
    # for every context at or past the window)
    kinds: dict[tuple, int] = {}
    for layer in range(cfg.n_layer):
        if getattr(cfg, "is_recurrent", None) and cfg.is_recurrent(layer):
            continue
        D, Dv = cfg.head_dim_for(layer), cfg.head_dim_v_for(layer)
        if D != Dv:
            notes.append(f"layer {layer}: head_dim {D} != value head_dim {Dv}; the attention kernel takes one")
            continue
        window = getattr(cfg, "sliding_window", 0) if cfg.is_swa(layer) else 0
        n_rot = cfg.n_rot_for(layer)
        # the rotary dims of the Q/K prologue the default build runs inside this layer's attention (0: none), and
        # the prologue's V norm and theta divisors where the layer has them
        rot = prologue_rot(cfg.n_head, cfg.n_head_kv_for(layer), D, n_rot)
        kind = (cfg.n_head, cfg.n_head_kv_for(layer), D, rot, window, bool(rot) and cfg.v_norm_for(layer),
                bool(rot) and cfg.rope_divided_for(layer))
        kinds[kind] = kinds.get(kind, 0) + 1
    for ctx in ctxs:
        if ctx > cfg.context_length:
            notes.append(f"context {ctx} > the model's {cfg.context_length}: not tuned")
    for (H, KV, D, rot, window, v_norm, qk_freq_factors), n in kinds.items():
        # the optional shape fields: only when set
        extra = {k: True for k, v in (("v_norm", v_norm), ("qk_freq_factors", qk_freq_factors)) if v}
        for live in sorted({ctx_bucket(min(c, window) if window else c) for c in ctxs if c <= cfg.context_length}):
            tasks.add("attention_decode", dict(n_head=H, n_kv_head=KV, head_dim=D, qk_rot=rot, ctx=live, **extra),
                      f"swa{window}" if window else "full", n)
    return list(tasks.by_key.values()), sorted(set(notes))


def load_model_tasks(path: str, ops, **kw) -> tuple[str, list[Task], list[str]]:
    """(architecture, tasks, notes) of the GGUF file at ``path`` (GGUFError for a bad file)."""
    from sparkinfer_cute.gguf import load_config, open_gguf

    g = open_gguf(path)
    cfg = load_config(g)
    tasks, notes = collect_tasks(g, cfg, ops, **kw)
    return cfg.arch, tasks, notes
