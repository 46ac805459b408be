"""models/int8_plan.py: the dry run of a GPU forward (no GPU) names exactly the matmuls that run on q8_1
activations under each SPARKINFER_DP4A setting and path (the GPU test test_gpu_decode.py also checks it against the
calls the live build makes)."""

from __future__ import annotations

import pytest

from sparkinfer_cute.models import ops
from sparkinfer_cute.models.int8_plan import UnknownWeightOp, int8_activation_tensors

QWEN_LAYER = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
GEMMA_LAYER = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def _layers(names, n_layer, kinds):
    return {f"blk.{l}.{k}.weight" for l in range(n_layer) for k in kinds}


def test_qwen_default_build(tiny_files, monkeypatch):
    monkeypatch.setattr(ops, "DP4A", "auto")
    dec = int8_activation_tensors(tiny_files["qwen3moe"], path="decode")
    assert dec == _layers(dec, 4, QWEN_LAYER)  # the router (F32) and the LM head (vocab 1536 < 65536) stay f32
    assert int8_activation_tensors(tiny_files["qwen3moe"], path="prefill") == dec
    assert int8_activation_tensors(tiny_files["qwen3moe"], path="prefill_all_logits") == dec | {"output.weight"}


def test_dp4a_settings(tiny_files, monkeypatch):
    monkeypatch.setattr(ops, "DP4A", "none")
    assert int8_activation_tensors(tiny_files["qwen3moe"], path="decode") == frozenset()
    # the batched prefill's grouped GEMM always takes int8 activations
    assert int8_activation_tensors(tiny_files["qwen3moe"], path="prefill") == _layers(None, 4, QWEN_LAYER)
    monkeypatch.setattr(ops, "DP4A", "all")
    assert int8_activation_tensors(tiny_files["qwen3moe"], path="decode") == _layers(None, 4, QWEN_LAYER) | {
        "output.weight"}
    # Gemma's decode keeps f32 activations except the LM head, which SPARKINFER_DP4A=all opts in
    assert int8_activation_tensors(tiny_files["gemma3"], path="decode") == {"token_embd.weight"}


def test_gemma_default_build(tiny_files, monkeypatch):
    monkeypatch.setattr(ops, "DP4A", "auto")
    assert int8_activation_tensors(tiny_files["gemma3"], path="decode") == frozenset()
    pre = int8_activation_tensors(tiny_files["gemma3"], path="prefill")
    assert pre == _layers(None, 6, GEMMA_LAYER)
    assert int8_activation_tensors(tiny_files["gemma3"], path="prefill_all_logits") == pre | {"token_embd.weight"}


def test_unclassified_op_on_a_matrix_is_refused(tiny_files, monkeypatch):
    from sparkinfer_cute.models.qwen3_moe import Qwen3MoeGPU

    @ops.launches(1)
    def new_matmul(w, x, y, *, stream):
        pass

    new_matmul.__module__ = ops.__name__
    monkeypatch.setattr(ops, "new_matmul", new_matmul, raising=False)
    orig = Qwen3MoeGPU.enqueue_step

    def step(self, stream, n_layers=None):
        ops.new_matmul(self.w["blk.0.attn_q.weight"], self.h, self.q, stream=stream)
        orig(self, stream, n_layers)

    monkeypatch.setattr(Qwen3MoeGPU, "enqueue_step", step)
    with pytest.raises(UnknownWeightOp, match="new_matmul"):
        int8_activation_tensors(tiny_files["qwen3moe"], path="decode")
    with pytest.raises(ValueError):
        int8_activation_tensors(tiny_files["qwen3moe"], path="train")


def test_gemma4_default_build(tiny_files, monkeypatch):
    """Gemma 4 under SPARKINFER_DP4A=auto: decode quantizes the attention projections (q, k, v where the layer has
    one, o) and the experts (gate+up fused, down), not the dense MLP nor the tied Q6_K LM head; the batched prefill
    quantizes every projection and expert matrix, and its all-position LM head stays f32 (Q6_K: the decode GEMV)."""
    from sparkinfer_cute.gguf import GGUFFile
    from sparkinfer_cute.gguf.config import load_config

    monkeypatch.setattr(ops, "DP4A", "auto")
    cfg = load_config(GGUFFile(tiny_files["gemma4"]))
    attn = {f"blk.{l}.{k}.weight" for l in range(cfg.n_layer)
            for k in ("attn_q", "attn_k", "attn_output") + (("attn_v",) if cfg.has_v(l) else ())}
    experts = {f"blk.{l}.{k}.weight" for l in range(cfg.n_layer) if cfg.is_moe(l)
               for k in ("ffn_gate_up_exps", "ffn_down_exps")}
    dense = {f"blk.{l}.{k}.weight" for l in range(cfg.n_layer) for k in ("ffn_gate", "ffn_up", "ffn_down")}
    assert int8_activation_tensors(tiny_files["gemma4"], path="decode") == attn | experts
    pre = int8_activation_tensors(tiny_files["gemma4"], path="prefill")
    assert pre == attn | experts | dense
    assert int8_activation_tensors(tiny_files["gemma4"], path="prefill_all_logits") == pre
