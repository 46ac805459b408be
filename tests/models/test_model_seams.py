"""CPU checks of the model seams (no GPU): architecture registry, per-layer attention geometry and the KV sizing
built on it, and the prefill entry point."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sparkinfer_cute.errors import ContextOverflowError, GGUFError
from sparkinfer_cute.models import GPU_FORWARDS, Gemma3GPU, GPUDecoder, Qwen3MoeGPU, load_gpu_model, ops


@dataclasses.dataclass
class _Cfg:
    """A config with Gemma-4-like per-layer geometry: sliding layers hd 256 / 8 KV heads, global ones 512 / 2."""

    arch: str = "gemma4"
    n_layer: int = 6
    n_head: int = 16
    sliding_window: int = 1024
    final_logit_softcap: float | None = None

    def is_swa(self, l):
        return l % 6 != 5

    def n_head_kv_for(self, l):
        return 8 if self.is_swa(l) else 2

    def head_dim_for(self, l):
        return 256 if self.is_swa(l) else 512

    def head_dim_v_for(self, l):
        return self.head_dim_for(l)

    def n_rot_for(self, l):
        return self.head_dim_for(l)

    def rope_base_for(self, l):
        return 1e4 if self.is_swa(l) else 1e6

    def v_norm_for(self, l):
        return True

    def rope_divided_for(self, l):
        return not self.is_swa(l)


class _G:
    path = "model.gguf"


def test_registry_maps_architectures():
    from sparkinfer_cute.models import Gemma4GPU

    assert GPU_FORWARDS == {"gemma3": Gemma3GPU, "gemma4": Gemma4GPU, "qwen3moe": Qwen3MoeGPU}
    assert all(issubclass(cls, GPUDecoder) for cls in GPU_FORWARDS.values())
    with pytest.raises(GGUFError, match="'llama' has no GPU forward yet"):
        load_gpu_model(_G(), _Cfg(arch="llama"))


def test_per_layer_geometry_and_kv_sizing():
    cfg = _Cfg()
    layers = ops.attention_geometry(cfg)
    assert [(a.n_head_kv, a.head_dim, a.window, a.rope_base) for a in (layers[0], layers[5])] == \
        [(8, 256, 1024, 1e4), (2, 512, 0, 1e6)]
    ctx = 4096
    per_layer = [2 * ctx * a.n_head_kv * a.head_dim * 2 for a in layers]
    assert ops.PagedKV.bytes_needed(layers, ctx) == sum(per_layer)
    # uniform models keep their old figure: 2 (K, V) * layers * context * KV heads * head_dim * 2 bytes
    uniform = [dataclasses.replace(layers[0]) for _ in range(4)]
    assert ops.PagedKV.bytes_needed(uniform, 100) == 2 * 4 * 128 * 8 * 256 * 2
    # split counts per layer type: the compile-gated Gemma 4 entries of attention_decode.MODEL_CONFIGS
    assert ops.attention_splits(layers[0], ctx, sm_count=132) == 16
    assert ops.attention_splits(layers[5], ctx, sm_count=132) == 64


def test_geometry_rejects_unequal_k_and_v_heads():
    cfg = _Cfg()
    cfg.head_dim_v_for = lambda l: 128
    with pytest.raises(ValueError, match="one head size"):
        ops.attention_geometry(cfg)


class _FakeDecoder(GPUDecoder):
    """Only the host-side prefill logic (no GPU): records the chunks it is handed."""

    def __init__(self, max_context=16):
        self.pos, self.max_context, self.chunks = 0, max_context, []
        self.stream = None
        self.logits = type("L", (), {"to_numpy": lambda self_, stream=None: np.zeros(3, np.float32)})()

    def prefill_chunk(self, ids):
        self.chunks.append(list(ids))
        self.pos += len(ids)


@pytest.mark.parametrize("chunk,expect", [(None, [[1, 2, 3, 4, 5, 6, 7]]), (3, [[1, 2, 3], [4, 5, 6], [7]])])
def test_prefill_goes_through_prefill_chunk(chunk, expect):
    m = _FakeDecoder()
    m.PREFILL_CHUNK = chunk
    assert m.prefill([1, 2, 3, 4, 5, 6, 7]).shape == (3,)
    assert m.chunks == expect and m.pos == 7
    with pytest.raises(ContextOverflowError):
        m.prefill(list(range(10)))
