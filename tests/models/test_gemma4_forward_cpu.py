"""The Gemma 4 GPU forward's CPU-checkable contract (its numerics are GPU tests in tests/models/test_gpu_decode.py
and test_gpu_prefill.py): it reads every tensor of a Gemma 4 file and nothing else (llama.cpp refuses a file with
an unused tensor, so a forward that skipped one would be computing another model), for the synthetic presets'
variations (K = V full layers, per-layer output and down-exps scales)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.gguf.config import load_config
from sparkinfer_cute.gguf.synth import write_synthetic
from sparkinfer_cute.models.gemma4 import Gemma4GPU


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_reads_every_tensor_once(tmp_path, preset):
    p = str(tmp_path / f"g4_{preset}.gguf")
    write_synthetic(p, arch="gemma4", preset=preset, seed=3)
    g = GGUFFile(p)
    cfg = load_config(g)
    names = Gemma4GPU.weight_names(SimpleNamespace(cfg=cfg))
    assert len(names) == len(set(names))
    assert set(names) == set(g.tensors)
    assert any(not cfg.has_v(l) for l in range(cfg.n_layer))  # the preset exercises K = V layers
