"""Typed configs: values read from the real Gemma 3 file (checked against the spec's gguf-dump of that file),
per-layer rules of every architecture, tensor inventories checked against lists written here by hand from
shared/spec/models.md (and against the synthetic writer's own lists), and GGUFError for every bad input."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.gguf.config import (
    SUPPORTED_ARCHITECTURES,
    Gemma3Config,
    Gemma4Config,
    Qwen3MoeConfig,
    Qwen35MoeConfig,
    load_config,
    validate_tensors,
)

Q = GGMLQuantizationType


# ----------------------------------------------------------------------------------------------- file builder
def write_gguf(path, arch: str, meta: dict, tensors: dict[str, tuple[int, ...]], types: dict | None = None):
    """A GGUF with ``meta`` (keys without the arch prefix get ``{arch}.``) and zero tensors of the given ggml
    shapes (F32 unless ``types`` says otherwise; quantized ones get random bytes)."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        key = k if k.startswith(("general.", "tokenizer.")) else f"{arch}.{k}"
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            if 0 <= v < 2**32:
                w.add_uint32(key, v)
            elif 0 <= v:
                w.add_uint64(key, v)
            else:
                w.add_int64(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        else:
            w.add_array(key, list(v))
    types = types or {}
    rng = np.random.default_rng(0)  # quantized bytes only fill the file: their values are never read
    for name, shape in tensors.items():
        qt = types.get(name, Q.F32)
        np_shape = tuple(reversed(shape))
        if qt == Q.F32:
            w.add_tensor(name, np.zeros(np_shape, np.float32))
        else:
            be, bb = gguf.GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 256, (*np_shape[:-1], np_shape[-1] // be * bb), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def tokens(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


# ---------------------------------------------------------------------------- hand-written inventories (spec)
def spec_qwen3moe(E, L, H, KV, D, NE, FE, V, tied=False):
    t = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    if not tied:
        t["output.weight"] = (E, V)
    for i in range(L):
        b = f"blk.{i}."
        t |= {
            b + "attn_norm.weight": (E,),
            b + "attn_q.weight": (E, H * D),
            b + "attn_k.weight": (E, KV * D),
            b + "attn_v.weight": (E, KV * D),
            b + "attn_output.weight": (H * D, E),
            b + "attn_q_norm.weight": (D,),
            b + "attn_k_norm.weight": (D,),
            b + "ffn_norm.weight": (E,),
            b + "ffn_gate_inp.weight": (E, NE),
            b + "ffn_gate_exps.weight": (E, FE, NE),
            b + "ffn_up_exps.weight": (E, FE, NE),
            b + "ffn_down_exps.weight": (FE, E, NE),
        }
    return t


def spec_gemma3(E, L, H, KV, D, F, V):
    t = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    for i in range(L):
        b = f"blk.{i}."
        t |= {
            b + "attn_norm.weight": (E,),
            b + "attn_q.weight": (E, H * D),
            b + "attn_k.weight": (E, KV * D),
            b + "attn_v.weight": (E, KV * D),
            b + "attn_output.weight": (H * D, E),
            b + "attn_q_norm.weight": (D,),
            b + "attn_k_norm.weight": (D,),
            b + "post_attention_norm.weight": (E,),
            b + "ffn_norm.weight": (E,),
            b + "ffn_gate.weight": (E, F),
            b + "ffn_up.weight": (E, F),
            b + "ffn_down.weight": (F, E),
            b + "post_ffw_norm.weight": (E,),
        }
    return t


def spec_gemma4(E, swa, H, kv_swa, kv_full, d_swa, d_full, F, NE, FE, V):
    """26B-A4B layout: full layers have no attn_v (K = V); rope_freqs; every layer has dense MLP + MoE."""
    t = {"token_embd.weight": (E, V), "output_norm.weight": (E,), "rope_freqs.weight": (d_full // 2,)}
    for i, sw in enumerate(swa):
        b = f"blk.{i}."
        d, kv = (d_swa, kv_swa) if sw else (d_full, kv_full)
        t |= {
            b + "attn_norm.weight": (E,),
            b + "attn_q.weight": (E, H * d),
            b + "attn_k.weight": (E, kv * d),
            b + "attn_output.weight": (H * d, E),
            b + "attn_q_norm.weight": (d,),
            b + "attn_k_norm.weight": (d,),
            b + "post_attention_norm.weight": (E,),
            b + "layer_output_scale.weight": (1,),
            b + "ffn_norm.weight": (E,),
            b + "ffn_gate.weight": (E, F),
            b + "ffn_up.weight": (E, F),
            b + "ffn_down.weight": (F, E),
            b + "post_ffw_norm.weight": (E,),
            b + "ffn_gate_inp.weight": (E, NE),
            b + "ffn_gate_inp.scale": (E,),
            b + "pre_ffw_norm_2.weight": (E,),
            b + "post_ffw_norm_1.weight": (E,),
            b + "post_ffw_norm_2.weight": (E,),
            b + "ffn_gate_up_exps.weight": (E, 2 * FE, NE),
            b + "ffn_down_exps.weight": (FE, E, NE),
            b + "ffn_down_exps.scale": (NE,),
        }
        if sw:
            t[b + "attn_v.weight"] = (E, kv * d)
    return t


def spec_qwen35moe(E, rec, H, KV, D, NE, FE, FS, V, nk, nv, dk, dv, K):
    key_dim, val_dim = nk * dk, nv * dv
    conv = 2 * key_dim + val_dim
    t = {"token_embd.weight": (E, V), "output_norm.weight": (E,), "output.weight": (E, V)}
    for i, r in enumerate(rec):
        b = f"blk.{i}."
        t |= {b + "attn_norm.weight": (E,), b + "post_attention_norm.weight": (E,)}
        if r:
            t |= {
                b + "attn_qkv.weight": (E, conv),
                b + "attn_gate.weight": (E, val_dim),
                b + "ssm_conv1d.weight": (K, conv),
                b + "ssm_dt.bias": (nv,),
                b + "ssm_a": (nv,),
                b + "ssm_beta.weight": (E, nv),
                b + "ssm_alpha.weight": (E, nv),
                b + "ssm_norm.weight": (dv,),
                b + "ssm_out.weight": (val_dim, E),
            }
        else:
            t |= {
                b + "attn_q.weight": (E, H * D * 2),
                b + "attn_k.weight": (E, KV * D),
                b + "attn_v.weight": (E, KV * D),
                b + "attn_output.weight": (H * D, E),
                b + "attn_q_norm.weight": (D,),
                b + "attn_k_norm.weight": (D,),
            }
        t |= {
            b + "ffn_gate_inp.weight": (E, NE),
            b + "ffn_gate_exps.weight": (E, FE, NE),
            b + "ffn_up_exps.weight": (E, FE, NE),
            b + "ffn_down_exps.weight": (FE, E, NE),
            b + "ffn_gate_inp_shexp.weight": (E,),
            b + "ffn_gate_shexp.weight": (E, FS),
            b + "ffn_up_shexp.weight": (E, FS),
            b + "ffn_down_shexp.weight": (FS, E),
        }
    return t


# ----------------------------------------------------------------------------------------------- real Gemma 3
def test_real_gemma3(gemma3_path):
    g = GGUFFile(gemma3_path)
    cfg = load_config(g)
    assert isinstance(cfg, Gemma3Config)
    # Expected values: shared/spec/models.md "Checked against the real Gemma 3 270M file" (gguf-dump), and the
    # metadata dict (the parser itself is checked against gguf.GGUFReader in test_reader.py).
    ref = g.metadata

    assert cfg.arch == "gemma3"
    assert cfg.n_embd == ref["gemma3.embedding_length"] == 640
    assert cfg.n_layer == ref["gemma3.block_count"] == 18
    assert (cfg.n_head, cfg.n_head_kv) == (4, 1)
    assert cfg.head_dim == cfg.head_dim_v == cfg.n_rot == 256
    assert cfg.n_ff == ref["gemma3.feed_forward_length"] == 2048
    assert cfg.rope_base == ref["gemma3.rope.freq_base"] == 1e6
    assert cfg.rope_base_swa == 10000.0  # key absent in this file: llama.cpp default
    assert cfg.rms_eps == ref["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert cfg.context_length == 32768
    assert cfg.vocab_size == len(ref["tokenizer.ggml.tokens"]) == 262144
    assert cfg.tied_output and cfg.final_logit_softcap is None
    assert cfg.sliding_window == 512 and cfg.swa_period == 6
    assert cfg.attn_scale == pytest.approx(1 / 16)
    # HF layer_types: (i+1) % 6 == 0 -> full attention (global base 1e6), else sliding (base 1e4)
    for i in range(18):
        assert cfg.is_swa(i) == ((i + 1) % 6 != 0)
        assert cfg.rope_base_for(i) == (1e4 if (i + 1) % 6 else 1e6)
    req = validate_tensors(g, cfg)
    assert req == spec_gemma3(640, 18, 4, 1, 256, 2048, 262144)
    assert set(req) == set(g.tensors)  # the forward reads every tensor of the file


def test_config_is_frozen(tmp_path):
    g = write_gguf(tmp_path / "g.gguf", "gemma3", _gemma3_meta(), spec_gemma3(32, 2, 2, 1, 16, 64, 50))
    cfg = load_config(g)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        cfg.n_embd = 3  # type: ignore[misc]
    assert hash(cfg) == hash(load_config(g))


# -------------------------------------------------------------------------------------------- gemma3 variants
def _gemma3_meta(**kw):
    m = {
        "context_length": 128,
        "embedding_length": 32,
        "block_count": 2,
        "feed_forward_length": 64,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.key_length": 16,
        "attention.value_length": 16,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 1e6,
        "attention.sliding_window": 8,
        "tokenizer.ggml.tokens": tokens(50),
    }
    m.update(kw)
    return {k: v for k, v in m.items() if v is not None}


def test_gemma3_optional_keys(tmp_path):
    g = write_gguf(
        tmp_path / "a.gguf",
        "gemma3",
        _gemma3_meta(**{"rope.freq_base_swa": 5000.0, "final_logit_softcapping": 30.0, "block_count": 7}),
        spec_gemma3(32, 7, 2, 1, 16, 64, 50),
    )
    c = load_config(g)
    assert c.rope_base_swa == 5000.0 and c.final_logit_softcap == 30.0
    assert [c.is_swa(i) for i in range(7)] == [True] * 5 + [False, True]
    g = write_gguf(
        tmp_path / "b.gguf",
        "gemma3",
        _gemma3_meta(**{"attention.sliding_window": None}),
        spec_gemma3(32, 2, 2, 1, 16, 64, 50),
    )
    c = load_config(g)
    assert c.sliding_window == 0 and not any(c.is_swa(i) for i in range(2))
    assert c.rope_base_for(0) == c.rope_base_for(1) == 1e6


def test_gemma3_27b_attention_scale(tmp_path):
    """llama.cpp: 27B (62 layers) scales q by 1/sqrt(n_embd/n_head) = 1/sqrt(168), not 1/sqrt(head_dim =
    128)."""
    meta = _gemma3_meta(
        **{
            "block_count": 62,
            "embedding_length": 5376,
            "attention.head_count": 32,
            "attention.head_count_kv": 16,
            "attention.key_length": 128,
            "attention.value_length": 128,
        }
    )
    c = load_config(write_gguf(tmp_path / "a.gguf", "gemma3", meta, {}))
    assert c.attn_scale == pytest.approx(1 / math.sqrt(168))
    meta["block_count"] = 34
    c = load_config(write_gguf(tmp_path / "b.gguf", "gemma3", meta, {}))
    assert c.attn_scale == pytest.approx(1 / math.sqrt(128))


# ------------------------------------------------------------------------------------------------ qwen3moe
def _qwen3_meta(E, L, H, KV, D, NE, NU, FE, V, **kw):
    m = {
        "context_length": 256,
        "embedding_length": E,
        "block_count": L,
        "feed_forward_length": 3 * E,
        "attention.head_count": H,
        "attention.head_count_kv": KV,
        "attention.key_length": D,
        "attention.value_length": D,
        "rope.freq_base": 1e6,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": NE,
        "expert_used_count": NU,
        "expert_feed_forward_length": FE,
        "tokenizer.ggml.tokens": tokens(V),
    }
    m.update(kw)
    return {k: v for k, v in m.items() if v is not None}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    E=st.sampled_from([32, 64]),
    L=st.integers(1, 3),
    KV=st.integers(1, 2),
    grp=st.integers(1, 3),
    D=st.sampled_from([8, 16]),
    NE=st.integers(2, 6),
    FE=st.sampled_from([32, 64]),
    V=st.integers(10, 40),
    tied=st.booleans(),
)
def test_qwen3moe_random_shapes(tmp_path_factory, E, L, KV, grp, D, NE, FE, V, tied):
    H, NU = KV * grp, min(2, NE)
    path = tmp_path_factory.mktemp("q") / "q.gguf"
    g = write_gguf(
        path,
        "qwen3moe",
        _qwen3_meta(E, L, H, KV, D, NE, NU, FE, V),
        spec_qwen3moe(E, L, H, KV, D, NE, FE, V, tied),
    )
    c = load_config(g)
    assert isinstance(c, Qwen3MoeConfig)
    assert (c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.n_rot) == (E, L, H, KV, D, D)
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.vocab_size, c.tied_output) == (NE, NU, FE, V, tied)
    assert c.norm_topk and c.gqa_group == grp and c.attn_scale == pytest.approx(D**-0.5)
    assert not any(c.is_swa(i) for i in range(L)) and c.rope_base_for(L - 1) == 1e6
    assert validate_tensors(g, c) == spec_qwen3moe(E, L, H, KV, D, NE, FE, V, tied)


def test_qwen3moe_fallbacks_and_fused(tmp_path):
    meta = _qwen3_meta(32, 1, 4, 2, 8, 4, 2, None, 20)  # no expert_feed_forward_length: n_ff / n_expert_used
    t = spec_qwen3moe(32, 1, 4, 2, 8, 4, 48, 20)
    for n in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"):
        del t[n]
    t["blk.0.ffn_gate_up_exps.weight"] = (32, 96, 4)
    for n in ("attn_q", "attn_k", "attn_v"):
        del t[f"blk.0.{n}.weight"]
    t["blk.0.attn_qkv.weight"] = (32, 32 + 16 + 16)
    g = write_gguf(tmp_path / "a.gguf", "qwen3moe", meta, t)
    c = load_config(g)
    assert c.n_ff_exp == 96 // 2 and c.fused_gate_up_exps and c.fused_qkv
    assert validate_tensors(g, c) == t


# ------------------------------------------------------------------------------------------------ gemma4
# Expected values below come from llama.cpp 0c1e570's loader, read by hand (src/models/gemma4.cpp
# load_arch_hparams / load_arch_tensors, src/llama-model.cpp load_hparams and the generic ".scale" pass,
# src/llama-hparams.h defaults), not from sparkinfer_cute.gguf.config.
def _gemma4_meta(swa, **kw):
    meta = {
        "context_length": 256,
        "embedding_length": 64,
        "block_count": len(swa),
        "feed_forward_length": 48,
        "attention.head_count": 4,
        "attention.head_count_kv": [4 if s else 2 for s in swa],
        "attention.key_length": 32,
        "attention.value_length": 32,
        "attention.key_length_swa": 16,
        "attention.value_length_swa": 16,
        "rope.dimension_count": 32,
        "rope.dimension_count_swa": 16,
        "rope.freq_base": 1e6,
        "rope.freq_base_swa": 1e4,
        "attention.sliding_window": 8,
        "attention.sliding_window_pattern": list(swa),
        "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": 4,
        "expert_used_count": 2,
        "expert_feed_forward_length": 24,
        "final_logit_softcapping": 30.0,
        "attention.shared_kv_layers": 0,
        "embedding_length_per_layer_input": 0,
        "tokenizer.ggml.tokens": tokens(30),
    }
    meta.update(kw)
    return {k: v for k, v in meta.items() if v is not None}


G4_SWA = [True, True, False, True, False]


def _g4(tmp_path, name="g4.gguf", swa=G4_SWA, tensors=None, **meta):
    t = spec_gemma4(64, swa, 4, 4, 2, 16, 32, 48, 4, 24, 30) if tensors is None else tensors
    return write_gguf(tmp_path / name, "gemma4", _gemma4_meta(swa, **meta), t), t


def test_gemma4_per_layer_geometry(tmp_path):
    g, t = _g4(tmp_path)
    c = load_config(g)
    assert isinstance(c, Gemma4Config)
    assert c.final_logit_softcap == 30.0 and c.tied_output and c.attn_scale == 1.0 and c.has_rope_freqs
    for i, sw in enumerate(G4_SWA):
        assert c.is_swa(i) == sw
        assert c.window_for(i) == (8 if sw else None)
        assert c.head_dim_for(i) == (16 if sw else 32) == c.head_dim_v_for(i)
        assert c.n_head_kv_for(i) == (4 if sw else 2)
        assert c.n_rot_for(i) == (16 if sw else 32)
        assert c.rope_base_for(i) == (1e4 if sw else 1e6) and c.rope_freq_scale_for(i) == 1.0
        assert c.uses_rope_freqs(i) == (not sw)
        assert c.has_v(i) == sw and c.k_eq_v(i) == (not sw)  # spec_gemma4: no attn_v on full layers
        assert c.is_moe(i) and c.has_kv(i) and c.kv_source_layer(i) == i
        assert c.has_out_scale(i) and c.has_down_exps_scale(i) and c.n_ff_for(i) == 48
    assert c.n_ff == (48,) * 5 and c.n_expert == 4 and c.n_expert_used == 2 and c.n_ff_exp == 24
    assert c.fused_gate_up_exps and not c.fused_qkv and c.has_layer_output_scale
    assert c.router_input_scale == pytest.approx(1 / 8) and c.embd_scale == pytest.approx(8.0)
    assert validate_tensors(g, c) == t


def test_gemma4_llama_cpp_defaults(tmp_path):
    # final_logit_softcapping: llama_hparams default 30 (gemma4 does not reset it, unlike gemma3); 0 disables
    # it
    assert load_config(_g4(tmp_path, "a.gguf", final_logit_softcapping=None)[0]).final_logit_softcap == 30.0
    assert load_config(_g4(tmp_path, "b.gguf", final_logit_softcapping=0.0)[0]).final_logit_softcap is None
    # head_count_kv defaults to head_count; a scalar applies to every layer
    t = spec_gemma4(64, G4_SWA, 4, 4, 4, 16, 32, 48, 4, 24, 30)
    c = load_config(_g4(tmp_path, "c.gguf", tensors=t, **{"attention.head_count_kv": None})[0])
    assert [c.n_head_kv_for(i) for i in range(5)] == [4] * 5
    # rope.dimension_count_swa defaults to the full layers' n_rot (here 32 > the SWA head 16: refused)
    with pytest.raises(GGUFError, match="dimension_count_swa"):
        load_config(_g4(tmp_path, "d.gguf", **{"rope.dimension_count_swa": None})[0])
    c = load_config(
        _g4(tmp_path, "e.gguf", **{"rope.dimension_count_swa": None, "rope.dimension_count": 16})[0]
    )
    assert c.n_rot_swa == 16 and c.n_rot_for(2) == 16
    # expert_feed_forward_length as an array: llama.cpp sizes every layer by the first entry
    c = load_config(_g4(tmp_path, "f.gguf", expert_feed_forward_length=[24] * 5)[0])
    assert c.n_ff_exp == 24
    # linear rope scaling applies to the full layers only
    c = load_config(_g4(tmp_path, "g.gguf", **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})[0])
    assert [c.rope_freq_scale_for(i) for i in range(5)] == [1.0, 1.0, 0.25, 1.0, 0.25]


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"attention.value_length": 16}, "key_length == value_length"),
        ({"attention.value_length": None}, "key_length == value_length"),  # default n_embd/n_head = 16
        ({"attention.value_length_swa": 8}, "key_length_swa == value_length_swa"),
        ({"attention.key_length_swa": None}, "key_length_swa"),
        ({"attention.sliding_window": None}, "sliding_window"),
        ({"attention.sliding_window_pattern": None}, "sliding_window_pattern"),
        ({"attention.sliding_window_pattern": [False] * 5}, "at least one sliding-window layer"),
        ({"embedding_length_per_layer_input": None}, "embedding_length_per_layer_input"),
        ({"feed_forward_length": None}, "feed_forward_length"),
        ({"attention.shared_kv_layers": 4}, "2 KV layers"),
        ({"expert_count": None}, "expert_count"),
        ({"expert_used_count": None}, "expert_used_count is 0"),
        ({"expert_used_count": [2, 2, 1, 2, 2]}, "per-layer expert_used_count"),
        ({"attention.head_count": [4] * 5}, "per-layer"),
        ({"rope.scaling.type": "yarn"}, "rope scaling"),
    ],
)
def test_gemma4_bad_metadata(tmp_path, edit, match):
    g, _ = _g4(tmp_path, **edit)
    with pytest.raises(GGUFError, match=match):
        load_config(g)


def test_gemma4_tensor_rules(tmp_path):
    full = spec_gemma4(64, G4_SWA, 4, 4, 2, 16, 32, 48, 4, 24, 30)

    def check(name, tensors, match, bad=None, **meta):
        g, _ = _g4(tmp_path, name, tensors=tensors, **meta)
        with pytest.raises(GGUFError, match=match) as ei:
            validate_tensors(g, load_config(g))
        assert ei.value.tensor == bad
        assert "\n" not in str(ei.value)  # one line

    # a tensor llama.cpp's loader does not create (here the generic NVFP4 per-tensor scale): it refuses the file
    check("a.gguf", {**full, "blk.1.attn_q.scale": (1,)}, "unexpected tensor", "blk.1.attn_q.scale")
    # rope_freqs: required when a full layer exists, {head_dim_full/2} even when rope.dimension_count is
    # smaller
    t = dict(full)
    del t["rope_freqs.weight"]
    check("b.gguf", t, "missing required tensor", "rope_freqs.weight")
    check(
        "c.gguf",
        {**full, "rope_freqs.weight": (8,)},
        "does not match",
        "rope_freqs.weight",
        **{"rope.dimension_count": 16},
    )
    g, _ = _g4(tmp_path, "d.gguf", tensors=full, **{"rope.dimension_count": 16})
    assert validate_tensors(g, load_config(g))["rope_freqs.weight"] == (16,)
    # attn_v on a full layer: K != V there
    g, _ = _g4(tmp_path, "e.gguf", tensors={**full, "blk.2.attn_v.weight": (64, 64)})
    c = load_config(g)
    assert c.has_v(2) and not c.k_eq_v(2) and c.k_eq_v(4)
    validate_tensors(g, c)
    check("f.gguf", {**full, "blk.2.attn_v.weight": (64, 32)}, "does not match", "blk.2.attn_v.weight")


def test_gemma4_optional_and_variant_tensors(tmp_path):
    full = spec_gemma4(64, G4_SWA, 4, 4, 2, 16, 32, 48, 4, 24, 30)
    # per-layer optional: ffn_down_exps.scale (generic loader pass) and layer_output_scale
    t = {
        k: v
        for k, v in full.items()
        if k not in ("blk.1.ffn_down_exps.scale", "blk.3.layer_output_scale.weight")
    }
    g, _ = _g4(tmp_path, "a.gguf", tensors=t)
    c = load_config(g)
    assert [c.has_down_exps_scale(i) for i in range(5)] == [True, False, True, True, True]
    assert [c.has_out_scale(i) for i in range(5)] == [True, True, True, False, True]
    assert validate_tensors(g, c) == t
    # a dense layer (no router): no MoE tensors; separate gate/up experts; untied output
    t = {
        k: v
        for k, v in full.items()
        if not (
            k.startswith("blk.0.")
            and k.split(".", 2)[2]
            in (
                "ffn_gate_inp.weight",
                "ffn_gate_inp.scale",
                "pre_ffw_norm_2.weight",
                "post_ffw_norm_1.weight",
                "post_ffw_norm_2.weight",
                "ffn_gate_up_exps.weight",
                "ffn_down_exps.weight",
                "ffn_down_exps.scale",
            )
        )
    }
    for i in range(1, 5):
        del t[f"blk.{i}.ffn_gate_up_exps.weight"]
        t[f"blk.{i}.ffn_gate_exps.weight"] = t[f"blk.{i}.ffn_up_exps.weight"] = (64, 24, 4)
    t["output.weight"] = (64, 30)
    g, _ = _g4(tmp_path, "b.gguf", tensors=t)
    c = load_config(g)
    assert not c.is_moe(0) and c.is_moe(1) and not c.fused_gate_up_exps and not c.tied_output
    assert validate_tensors(g, c) == t
    # a router without its input scale is refused, as llama.cpp requires ffn_gate_inp.scale on MoE layers
    t2 = dict(full)
    del t2["blk.3.ffn_gate_inp.scale"]
    g, _ = _g4(tmp_path, "c.gguf", tensors=t2)
    with pytest.raises(GGUFError, match="missing required tensor") as ei:
        validate_tensors(g, load_config(g))
    assert ei.value.tensor == "blk.3.ffn_gate_inp.scale"
    # fused attn_qkv {n_embd, H*d + 2*nkv*d}, V rows included even where K = V would apply
    t3 = {
        k: v
        for k, v in full.items()
        if k.split(".", 2)[-1] not in ("attn_q.weight", "attn_k.weight", "attn_v.weight")
    }
    for i, sw in enumerate(G4_SWA):
        d, kv = (16, 4) if sw else (32, 2)
        t3[f"blk.{i}.attn_qkv.weight"] = (64, 4 * d + 2 * kv * d)
    g, _ = _g4(tmp_path, "d.gguf", tensors=t3)
    c = load_config(g)
    assert c.fused_qkv and all(c.has_v(i) for i in range(5))
    assert validate_tensors(g, c) == t3


def test_gemma4_kv_sharing_rule():
    """llama-model.cpp: a KV-shared layer reads layer n_kv_start-2 if sliding, else n_kv_start-1."""
    swa = (True, True, True, False, True, True, True, False)
    c = Gemma4Config(
        arch="gemma4",
        n_embd=8,
        n_layer=8,
        n_head=2,
        n_head_kv=1,
        head_dim=8,
        head_dim_v=8,
        n_rot=8,
        rope_base=1e6,
        rms_eps=1e-6,
        context_length=16,
        vocab_size=4,
        tied_output=True,
        swa_layers=swa,
        shared_kv_layers=3,
    )
    assert [c.has_kv(i) for i in range(8)] == [True] * 5 + [False] * 3
    assert [c.kv_source_layer(i) for i in range(8)] == [0, 1, 2, 3, 4, 3, 3, 4]


# ------------------------------------------------------------------------------------------------ qwen35moe
def _qwen35_meta(L, **kw):
    m = {
        "context_length": 256,
        "embedding_length": 32,
        "block_count": L,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.key_length": 16,
        "attention.value_length": 16,
        "rope.dimension_count": 4,
        "rope.dimension_sections": [1, 1, 0, 0],
        "rope.freq_base": 1e7,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": 4,
        "expert_used_count": 2,
        "expert_feed_forward_length": 16,
        "expert_shared_feed_forward_length": 24,
        "ssm.conv_kernel": 4,
        "ssm.state_size": 8,
        "ssm.group_count": 2,
        "ssm.time_step_rank": 4,
        "ssm.inner_size": 4 * 8,
        "full_attention_interval": 4,
        "tokenizer.ggml.tokens": tokens(20),
    }
    m.update(kw)
    return {k: v for k, v in m.items() if v is not None}


def test_qwen35moe_hybrid(tmp_path):
    # block_count 9 with one MTP block: the main pass runs 8 layers; full attention at 3 and 7
    rec = [(i + 1) % 4 != 0 for i in range(8)]
    t = spec_qwen35moe(32, rec, 2, 1, 16, 4, 16, 24, 20, nk=2, nv=4, dk=8, dv=8, K=4)
    g = write_gguf(tmp_path / "q.gguf", "qwen35moe", _qwen35_meta(9, nextn_predict_layers=1), t)
    c = load_config(g)
    assert isinstance(c, Qwen35MoeConfig)
    assert c.n_layer == 8 and c.n_block == 9 and c.nextn_predict_layers == 1
    assert [c.is_recurrent(i) for i in range(8)] == rec
    assert c.n_rot == 4 and c.rope_sections == (1, 1, 0, 0) and c.rope_base == 1e7
    assert (c.n_ff_exp, c.n_ff_shexp, c.ssm_head_v_dim, c.ssm_key_dim, c.ssm_conv_dim) == (
        16,
        24,
        8,
        16,
        2 * 16 + 32,
    )
    assert not c.tied_output and c.attn_scale == pytest.approx(0.25)
    assert validate_tensors(g, c) == t


def test_qwen35moe_explicit_recurrent_layers(tmp_path):
    rec = [True, False, True]
    t = spec_qwen35moe(32, rec, 2, 1, 16, 4, 16, 24, 20, nk=2, nv=4, dk=8, dv=8, K=4)
    g = write_gguf(
        tmp_path / "q.gguf", "qwen35moe", _qwen35_meta(3, **{"attention.recurrent_layers": rec}), t
    )
    c = load_config(g)
    assert list(c.recurrent_layers) == rec
    validate_tensors(g, c)
    g = write_gguf(tmp_path / "r.gguf", "qwen35moe", _qwen35_meta(3, **{"rope.dimension_sections": None}), t)
    with pytest.raises(GGUFError, match="dimension_sections"):
        load_config(g)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_architecture(tmp_path):
    g = write_gguf(tmp_path / "a.gguf", "llama", {"embedding_length": 8}, {})
    with pytest.raises(GGUFError, match="unsupported architecture 'llama'") as ei:
        load_config(g)
    for a in SUPPORTED_ARCHITECTURES:
        assert a in str(ei.value)


def test_missing_and_ill_typed_keys(tmp_path):
    t = spec_gemma3(32, 2, 2, 1, 16, 64, 50)
    g = write_gguf(tmp_path / "a.gguf", "gemma3", _gemma3_meta(**{"embedding_length": None}), t)
    with pytest.raises(GGUFError, match="gemma3.embedding_length"):
        load_config(g)
    g = write_gguf(tmp_path / "b.gguf", "gemma3", _gemma3_meta(**{"block_count": "two"}), t)
    with pytest.raises(GGUFError, match="block_count.*integer"):
        load_config(g)
    g = write_gguf(tmp_path / "c.gguf", "gemma3", _gemma3_meta(**{"attention.head_count_kv": 3}), t)
    with pytest.raises(GGUFError, match="not a multiple"):
        load_config(g)
    g = write_gguf(tmp_path / "e.gguf", "gemma3", _gemma3_meta(**{"block_count": 2**40}), t)
    with pytest.raises(GGUFError, match="exceeds"):
        load_config(g)
    g = write_gguf(tmp_path / "f.gguf", "gemma3", _gemma3_meta(**{"rope.dimension_count": 17}), t)
    with pytest.raises(GGUFError, match="dimension_count"):
        load_config(g)
    meta = _gemma3_meta(**{"tokenizer.ggml.tokens": None})
    g = write_gguf(tmp_path / "d.gguf", "gemma3", meta, {"output_norm.weight": (32,)})
    with pytest.raises(GGUFError, match="vocabulary size"):
        load_config(g)


def test_validate_tensors_errors(tmp_path):
    good = spec_gemma3(32, 2, 2, 1, 16, 64, 50)
    meta = _gemma3_meta()

    missing = dict(good)
    del missing["blk.1.ffn_up.weight"]
    g = write_gguf(tmp_path / "a.gguf", "gemma3", meta, missing)
    with pytest.raises(GGUFError, match="missing required tensor") as ei:
        validate_tensors(g, load_config(g))
    assert ei.value.tensor == "blk.1.ffn_up.weight"

    bad = dict(good)
    bad["blk.0.attn_k.weight"] = (32, 32)
    g = write_gguf(tmp_path / "b.gguf", "gemma3", meta, bad)
    with pytest.raises(GGUFError, match="does not match") as ei:
        validate_tensors(g, load_config(g))
    assert ei.value.tensor == "blk.0.attn_k.weight"

    # vocab from the tokenizer (50) disagrees with token_embd's ne1
    bad = dict(good)
    bad["token_embd.weight"] = (32, 51)
    g = write_gguf(tmp_path / "c.gguf", "gemma3", meta, bad)
    with pytest.raises(GGUFError, match="does not match") as ei:
        validate_tensors(g, load_config(g))
    assert ei.value.tensor == "token_embd.weight"

    big = spec_gemma3(256, 1, 2, 1, 16, 256, 50)
    g = write_gguf(
        tmp_path / "d.gguf",
        "gemma3",
        {**meta, "embedding_length": 256, "feed_forward_length": 256, "block_count": 1},
        big,
        types={"blk.0.ffn_gate.weight": Q.Q2_K},
    )
    with pytest.raises(GGUFError, match="unsupported quant type Q2_K") as ei:
        validate_tensors(g, load_config(g))
    assert ei.value.tensor == "blk.0.ffn_gate.weight"


# -------------------------------------------------------------------------------------------- vs synth writer
@pytest.mark.parametrize(
    "arch,preset", [("qwen3moe", "tiny"), ("qwen3moe", "tiny-fallback"), ("gemma3", "tiny")]
)
def test_synthetic_presets_validate(tmp_path, arch, preset):
    """The synthetic writer builds its tensor lists independently (sparkinfer_cute/gguf/synth.py); the
    config's
    inventory must be exactly the file's tensors, and the config must echo the preset."""
    synth = pytest.importorskip("sparkinfer_cute.gguf.synth")
    p = synth.write_synthetic(tmp_path / "s.gguf", arch, preset)
    g = GGUFFile(p)
    c = load_config(g)
    req = validate_tensors(g, c)
    assert set(req) == set(g.tensors)
    want = synth.synthetic_config(arch, preset)
    assert (c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim) == (
        want["n_embd"],
        want["n_layer"],
        want["n_head"],
        want["n_head_kv"],
        want["head_dim"],
    )
    assert c.vocab_size == want["n_vocab"]


# ------------------------------------------------------------------------------------------------ fuzz
def _fuzz_cases():
    """(arch, valid metadata, valid tensors) for each architecture."""
    swa = [True, False]
    g4 = {
        "context_length": 64,
        "embedding_length": 32,
        "block_count": 2,
        "feed_forward_length": 16,
        "attention.head_count": 2,
        "attention.head_count_kv": [2, 1],
        "attention.key_length": 16,
        "attention.value_length": 16,
        "attention.key_length_swa": 8,
        "attention.value_length_swa": 8,
        "rope.dimension_count": 16,
        "rope.dimension_count_swa": 8,
        "rope.freq_base": 1e6,
        "attention.sliding_window": 8,
        "attention.sliding_window_pattern": swa,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": 2,
        "expert_used_count": 1,
        "expert_feed_forward_length": 8,
        "embedding_length_per_layer_input": 0,
        "tokenizer.ggml.tokens": tokens(10),
    }
    rec = [True, False]
    return [
        ("gemma3", _gemma3_meta(), spec_gemma3(32, 2, 2, 1, 16, 64, 50)),
        ("qwen3moe", _qwen3_meta(32, 2, 4, 2, 8, 4, 2, 16, 20), spec_qwen3moe(32, 2, 4, 2, 8, 4, 16, 20)),
        ("gemma4", g4, spec_gemma4(32, swa, 2, 2, 1, 8, 16, 16, 2, 8, 10)),
        (
            "qwen35moe",
            _qwen35_meta(2, **{"attention.recurrent_layers": rec}),
            spec_qwen35moe(32, rec, 2, 1, 16, 4, 16, 24, 20, nk=2, nv=4, dk=8, dv=8, K=4),
        ),
    ]


_FUZZ_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 62, 513, 2**31, 2**40, 2**63, -1, -(2**40)]),
    st.sampled_from([0.0, -1.0, 1e-6, 1e30, float("nan"), float("inf")]),
    st.sampled_from(["", "linear", "yarn", "x" * 50]),
    st.lists(st.integers(0, 40), max_size=6),
    st.lists(st.booleans(), max_size=6),
    st.none(),  # delete the key
)


@settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.integers(0, 3),
    edits=st.lists(st.tuples(st.integers(0, 10**6), _FUZZ_VALUES), min_size=1, max_size=3),
)
def test_fuzz_metadata_only_gguferror(tmp_path_factory, case, edits):
    """Corrupted config values (wrong type, zero, huge, NaN, deleted) make load_config / validate_tensors
    raise
    GGUFError or succeed; never another exception and never a hang (e.g. block_count 2**40)."""
    arch, meta, tensors = _fuzz_cases()[case]
    meta = dict(meta)
    keys = sorted(meta) + ["rope.scaling.type", "rope.scaling.factor", "nextn_predict_layers"]
    for i, v in edits:
        meta[keys[i % len(keys)]] = v
    meta = {k: v for k, v in meta.items() if v is not None}
    g = write_gguf(tmp_path_factory.mktemp("m") / "m.gguf", arch, meta, tensors)
    try:
        validate_tensors(g, load_config(g))
    except GGUFError:
        pass
