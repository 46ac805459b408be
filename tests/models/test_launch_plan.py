"""models/launch_plan.py (no GPU): the decode launch plan counts exactly the kernels the forward enqueues (a hand
count written out below, and a forward changed in the test changes it), its bytes never fall below a minimum
computed here from the config and the synthetic plan's tensor sizes, and a synthetic header stands in for a file.
tests/models/test_gpu_decode.py holds the same counts against the CUDA graph's kernel nodes on a GPU."""

from __future__ import annotations

import math

import pytest
from gguf import GGML_QUANT_SIZES

from sparkinfer_cute.gguf.config import load_config
from sparkinfer_cute.gguf.synth import plan_synthetic, synthetic_config, synthetic_header, write_synthetic
from sparkinfer_cute.models import ops
from sparkinfer_cute.models.dry_run import UndeclaredLaunches
from sparkinfer_cute.models.launch_plan import launch_plan


@pytest.fixture
def auto_build(monkeypatch):
    """The default build: SPARKINFER_DP4A=auto, every speed pass on."""
    monkeypatch.setattr(ops, "DP4A", "auto")
    monkeypatch.setattr(ops, "DISABLED", frozenset())


def _hand_count_qwen(n_layer: int, n_embd: int, vocab: int, *, dp4a: bool = True, attn_q8: bool = True,
                     act_q8: bool = True, head_q8: bool = True, router_norm: bool = True, qk_attn: bool = True,
                     ffn_tail: bool = True, route_gate_up: bool = True, experts_down: bool = True) -> int:
    """Kernels per decode token of the Qwen3-MoE forward, counted from models/qwen3_moe.py by hand:
    embedding 1; per layer: RMSNorm (+q8_1 in the same launch) 1, Q/K/V GEMVs 1 when the chunk kernel takes
    n_embd (a multiple of 1024) else 3, [fused Q/K-norm + RoPE + KV append 1, unless attention runs it
    (``qk_attn``: pass fused_qk_attention)], attention with the fused combine 1,
    [q8_1 of the attention output 1, unless attention writes it itself (``attn_q8``: pass fused_attn_q8)], O GEMV 1,
    [RMSNorm 1, unless the fused router forms it (``router_norm``: pass fused_router_norm)], fused F32 router 1,
    expert gate+up 1, [q8_1 of the activations 1, unless gate+up writes it itself
    (``act_q8``: pass fused_moe_act_q8) +] expert down 1; tail: final RMSNorm 1, [q8_1 of h 1 when the LM head has
    >= 65536 rows, unless the final norm writes it (``head_q8``: pass fused_head_q8)], LM head GEMV 1, argmax 2
    (partials + reduce). ``ffn_tail`` (pass fused_ffn_tail): the expert down launch also runs the RMSNorm after
    it (the next layer's, or the final one), so only layer 0's RMSNorm is a launch of its own. ``route_gate_up`` (pass
    fused_route_gate_up): the router runs in the expert gate+up launch (its CTAs first), not in a launch of its
    own; ``experts_down`` (with it, pass fused_experts_down): so does the expert down projection (its CTAs last)."""
    qkv = 1 if n_embd % 1024 == 0 else 3
    norms = 1 if ffn_tail else n_layer + 1  # layer 0's, or every layer's and the final one
    per_layer = (qkv + (0 if qk_attn else 1) + 1 + (1 if dp4a and not attn_q8 else 0) + 1
                 + (0 if router_norm else 1) + (0 if route_gate_up else 1) + 1
                 + (1 if dp4a and not act_q8 else 0) + (0 if route_gate_up and experts_down else 1))
    tail = (1 if dp4a and vocab >= 65536 and not head_q8 else 0) + 1 + 2
    return 1 + norms + n_layer * per_layer + tail


def test_hand_count_tiny_and_30b(auto_build, monkeypatch):
    tiny = launch_plan(synthetic_header("qwen3moe", "tiny"))
    assert tiny.kernels_per_token == _hand_count_qwen(4, 256, 1536) == 29
    big = launch_plan(synthetic_header("qwen3moe", "30b-a3b"))
    assert big.kernels_per_token == _hand_count_qwen(48, 2048, 151936) == 197
    no_down = launch_plan(synthetic_header("qwen3moe", "30b-a3b"), disabled={"fused_experts_down"})
    assert no_down.kernels_per_token == _hand_count_qwen(48, 2048, 151936, experts_down=False) == 245
    unrouted = launch_plan(synthetic_header("qwen3moe", "30b-a3b"), disabled={"fused_route_gate_up"})
    assert unrouted.kernels_per_token == _hand_count_qwen(48, 2048, 151936, route_gate_up=False) == 293
    before_tail = launch_plan(synthetic_header("qwen3moe", "30b-a3b"), disabled={"fused_ffn_tail",
                                                                                  "fused_route_gate_up"})
    assert before_tail.kernels_per_token == _hand_count_qwen(48, 2048, 151936, ffn_tail=False,
                                                             route_gate_up=False) == 341
    # 4 per layer, + layer 0's RMSNorm (the later ones, and the final norm, are tails of the experts' launch)
    assert big.by_layer_kind()["full moe"]["kernels_per_layer"] == pytest.approx((4 * 48 + 1) / 48)
    before = launch_plan(synthetic_header("qwen3moe", "30b-a3b"),
                         disabled={"fused_qk_attention", "fused_ffn_tail", "fused_route_gate_up"})
    assert before.kernels_per_token == _hand_count_qwen(48, 2048, 151936, qk_attn=False, ffn_tail=False,
                                                        route_gate_up=False) == 389
    # issue 15's 534 kernels per token: the build the H100 measured (results/bench.jsonl), before attention and the
    # expert gate/up kernel wrote the q8_1 inputs of the O and down projections themselves
    old = launch_plan(synthetic_header("qwen3moe", "30b-a3b"),
                      disabled={"fused_attn_q8", "fused_moe_act_q8", "fused_head_q8", "fused_router_norm",
                                "fused_qk_attention", "fused_ffn_tail", "fused_route_gate_up"})
    assert old.kernels_per_token == _hand_count_qwen(48, 2048, 151936, attn_q8=False, act_q8=False,
                                                     head_q8=False, router_norm=False, qk_attn=False,
                                                     ffn_tail=False, route_gate_up=False) == 534
    monkeypatch.setattr(ops, "DP4A", "none")
    assert launch_plan(synthetic_header("qwen3moe", "tiny")).kernels_per_token == _hand_count_qwen(
        4, 256, 1536, dp4a=False)


def test_disabled_passes_change_the_count(auto_build, monkeypatch):
    base = launch_plan(synthetic_header("qwen3moe", "30b-a3b")).kernels_per_token
    # 2 head norms + 2 ropes + KV append outside attention: +5/layer
    monkeypatch.setattr(ops, "DISABLED", frozenset({"fused_qk"}))
    assert launch_plan(synthetic_header("qwen3moe", "30b-a3b")).kernels_per_token == base + 5 * 48
    # the prologue outside attention (+1), the combine (+1), the q/k/v GEMVs (+2) per layer
    monkeypatch.setattr(ops, "DISABLED", frozenset({"fused_combine", "fused_qkv"}))
    assert launch_plan(synthetic_header("qwen3moe", "30b-a3b")).kernels_per_token == base + 4 * 48
    monkeypatch.setattr(ops, "DISABLED", frozenset({"fused_qk_attention"}))  # the prologue's own launch: +1/layer
    assert launch_plan(synthetic_header("qwen3moe", "30b-a3b")).kernels_per_token == base + 48
    monkeypatch.setattr(ops, "DISABLED", frozenset())
    # Gemma 3: the dense GLU as one launch (fused_dense_glu) instead of gate GEMV + up GEMV + GLU
    g = launch_plan(synthetic_header("gemma3", "270m"))
    assert launch_plan(synthetic_header("gemma3", "270m"), disabled={"fused_dense_glu"}).kernels_per_token == \
        g.kernels_per_token + 2 * 18
    assert ops.DISABLED == frozenset()  # launch_plan restores the switches it set


@pytest.mark.parametrize("arch,preset", [("gemma4", "26b-a4b"), ("gemma4", "tiny"), ("gemma3", "270m"),
                                         ("gemma3", "tiny"), ("qwen3moe", "30b-a3b")])
def test_each_tail_pass_saves_one_launch_where_it_applies(auto_build, arch, preset):
    """The sixth session's passes, counted from the file's config and tensor types, not from the forward:
    fused_ffn_tail saves the norm launch after every MoE down projection (Qwen: every layer's RMSNorm but layer 0's,
    and the final norm; Gemma 4: the post-FFN chain of every MoE layer) and after Gemma 3's dense down GEMV;
    fused_o_tail saves Gemma's post-attention chain on every layer; fused_qkv_mixed saves v's own GEMV on the
    layers whose v type differs from q/k's."""
    c = synthetic_config(arch, preset)
    n_layer = c["n_layer"]
    types = {t.name: t.ggml_type for t in plan_synthetic(arch, preset)}
    base = launch_plan(synthetic_header(arch, preset)).kernels_per_token

    def delta(p):
        return launch_plan(synthetic_header(arch, preset), disabled={p}).kernels_per_token - base

    # every layer of these presets is an MoE layer (qwen3moe, gemma4) or dense (gemma3): one chain per layer
    assert delta("fused_ffn_tail") == n_layer
    assert delta("fused_o_tail") == (n_layer if arch != "qwen3moe" else 0)
    mixed = sum(1 for l in range(n_layer) if f"blk.{l}.attn_v.weight" in types
                and types[f"blk.{l}.attn_v.weight"] != types[f"blk.{l}.attn_k.weight"])
    assert delta("fused_qkv_mixed") == (mixed if arch != "qwen3moe" else 0)


def test_changing_the_forward_changes_the_plan(auto_build, monkeypatch):
    from sparkinfer_cute.models.qwen3_moe import Qwen3MoeGPU

    before = launch_plan(synthetic_header("qwen3moe", "tiny"))
    orig = Qwen3MoeGPU.enqueue_logits

    def with_softcap(self, stream, hq=None):
        ops.softcap(self.logits, 30.0, stream=stream)  # one more launch, reading and writing the logits
        orig(self, stream, hq)

    monkeypatch.setattr(Qwen3MoeGPU, "enqueue_logits", with_softcap)
    after = launch_plan(synthetic_header("qwen3moe", "tiny"))
    assert after.kernels_per_token == before.kernels_per_token + 1
    assert after.bytes_per_token == before.bytes_per_token + 2 * 1536 * 4
    assert after.minimum_bytes == before.minimum_bytes  # the minimum does not follow the forward's choices


def test_undeclared_op_is_refused(auto_build, monkeypatch):
    from sparkinfer_cute.models.qwen3_moe import Qwen3MoeGPU

    def new_op(x, *, stream):
        pass

    new_op.__module__ = ops.__name__
    monkeypatch.setattr(ops, "new_op", new_op, raising=False)
    orig = Qwen3MoeGPU.enqueue_logits
    monkeypatch.setattr(Qwen3MoeGPU, "enqueue_logits",
                        lambda self, stream, hq=None: (ops.new_op(self.logits, stream=stream), orig(self, stream, hq)))
    with pytest.raises(UndeclaredLaunches, match="new_op"):
        launch_plan(synthetic_header("qwen3moe", "tiny"))


def _gguf_bytes(t) -> int:
    bs, ts = GGML_QUANT_SIZES[t.ggml_type]
    return math.prod(t.shape) // bs * ts


def _minimum_from_config(arch: str, preset: str, depth: int) -> int:
    """Routed experts (k of E), every other weight once (token_embd: one row unless it is the tied LM head), the KV
    cache read over the attended positions and the current position's K/V written: from the preset's config and
    tensor list, not from the launch plan."""
    c = synthetic_config(arch, preset)
    cfg = load_config(synthetic_header(arch, preset))
    total = 0
    for t in plan_synthetic(arch, preset):
        if "_exps." in t.name:
            total += _gguf_bytes(t) * c["n_expert_used"] // c["n_expert"]
        elif t.name == "token_embd.weight" and arch == "qwen3moe":  # untied: the gather reads one row
            bs, ts = GGML_QUANT_SIZES[t.ggml_type]
            total += t.shape[0] // bs * ts
        else:
            total += _gguf_bytes(t)
    for l in range(c["n_layer"]):
        n_kv, hd = cfg.n_head_kv_for(l), cfg.head_dim_for(l)
        seen = depth + 1
        if cfg.is_swa(l):
            seen = min(seen, c["sliding_window"])
        total += 2 * n_kv * hd * 2 * (seen + 1)
    return total


@pytest.mark.parametrize("arch,preset,depth", [("qwen3moe", "30b-a3b", 100), ("gemma3", "270m", 1000),
                                               ("gemma4", "26b-a4b", 2000), ("qwen3moe", "tiny", 0)])
def test_minimum_from_config_and_ratio(auto_build, arch, preset, depth):
    p = launch_plan(synthetic_header(arch, preset), depth=depth)
    assert p.minimum_bytes == _minimum_from_config(arch, preset, depth)
    assert p.bytes_per_token >= p.minimum_bytes and p.ratio >= 1.0
    # every kind of planned traffic covers its minimum (weights as uploaded are never smaller than the GGUF's)
    kinds = p.bytes_by_kind()
    assert kinds["routed"] >= p.minimum["routed"] and kinds["dense"] >= p.minimum["dense"]
    assert kinds["kv_read"] + kinds["kv_write"] == p.minimum["kv"]
    for kind, r in p.by_layer_kind().items():
        if r["ratio"] is not None:
            assert r["ratio"] >= 1.0, kind


def test_depth_adds_kv_reads_only(auto_build):
    h = synthetic_header("qwen3moe", "30b-a3b")
    a, b = launch_plan(h, depth=0), launch_plan(h, depth=4096)
    entry = 48 * 2 * 4 * 128 * 2  # K and V of one position, every layer, fp16
    assert b.bytes_by_kind()["kv_read"] - a.bytes_by_kind()["kv_read"] == 4096 * entry
    assert a.kernels_per_token == b.kernels_per_token


def test_header_plan_equals_file_plan(auto_build, tmp_path):
    """A SyntheticHeader gives the plan of the file write_synthetic writes (same tensors, types, metadata)."""
    for arch in ("gemma3", "gemma4"):
        path = write_synthetic(str(tmp_path / f"{arch}.gguf"), arch=arch, preset="tiny", seed=2)
        a = launch_plan(path, depth=40).to_dict()
        b = launch_plan(synthetic_header(arch, "tiny"), depth=40).to_dict()
        a.pop("model"), b.pop("model")
        assert a == b


def test_live_counter_counts_the_outermost_declaration(monkeypatch):
    """An op built from other ops (moe_down with int8 activations calls quantize) adds its own declared count once,
    not its parts' too: the live counter and the dry run read the same number."""
    monkeypatch.setattr(ops, "launch_counter", ops._Counter())

    @ops.launches(1)
    def inner():
        pass

    @ops.launches(lambda n: n + 1)
    def outer(n):
        for _ in range(n):
            inner()

    outer(3)
    inner()
    assert ops.launch_counter.count() == 4 + 1 and outer.launches(3) == 4
    assert ops.launch_counter.depth == 0


def test_every_kernel_calling_op_declares_its_launches():
    """Static check of models/ops.py: a public module-level function that calls into a kernel module (the ``_name``
    aliases of sparkinfer_cute.kernels imports) carries ``@launches``, so no launch escapes the count (the dry run
    also refuses an undeclared op when a forward calls it: test_undeclared_op_is_refused)."""
    import ast
    from pathlib import Path

    src = Path(ops.__file__).read_text()
    tree = ast.parse(src)
    kernel_aliases = {a.asname for n in tree.body if isinstance(n, ast.ImportFrom)
                      and (n.module or "").startswith("sparkinfer_cute.kernels") for a in n.names if a.asname}
    assert {"_gemv", "_attn", "_moe", "_q8"} <= kernel_aliases
    missing = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        calls_kernel = any(isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name)
                           and x.value.id in kernel_aliases for x in ast.walk(fn))
        declared = any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "launches"
                       for d in fn.decorator_list)
        helper = fn.name.startswith("_") or fn.name in ("new_q8", "attention_splits", "gemm_supports",
                                                        "gate_up_writes_act_q8", "packs_rows",
                                                        "fused_qk_attention", "prefill_flash_block_n")
        if calls_kernel and not declared and not helper:  # helpers query kernels, or are called by a declared op
            missing.append(fn.name)
    assert not missing, f"models/ops.py functions launching kernels without @launches: {missing}"
    assert src.count("launch_counter.add(") == 1  # only the decorator adds
