"""tools/attention_share.py: the attention share of a decode token per layer geometry, from a bench row and
microbench attention rows (CPU; the inputs are drawn, the arithmetic is checked)."""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("attention_share", os.path.join(ROOT, "tools", "attention_share.py"))
attention_share = importlib.util.module_from_spec(spec)
spec.loader.exec_module(attention_share)


def test_share_per_geometry(rng):
    # the Gemma 4 26B-A4B layout: 30 layers, every 6th global (16 heads: 2 KV of 512), the rest sliding (8 KV of 256)
    glob = {5, 11, 17, 23, 29}
    cfg = SimpleNamespace(n_layer=30, n_head=16, n_head_kv_for=lambda l: 2 if l in glob else 8,
                          head_dim_for=lambda l: 512 if l in glob else 256)
    configs = {"full": dict(n_head=16, n_kv_head=2, head_dim=512), "swa": dict(n_head=16, n_kv_head=8, head_dim=256),
               "other": dict(n_head=32, n_kv_head=4, head_dim=128)}
    us_full, us_swa, us_plain, tps = (float(v) for v in rng.uniform([5, 3, 2, 100], [40, 20, 10, 400]))
    rows = [dict(config="full", n_ctx=4096, us=us_plain, prologue=False),   # the prologue row wins
            dict(config="full", n_ctx=4096, us=us_full, prologue=True),
            dict(config="swa", n_ctx=1024, us=us_swa, prologue=True),
            dict(config="other", n_ctx=4096, us=1.0, prologue=True)]     # not a geometry of this model
    out = {r["config"]: r for r in attention_share.attention_share(cfg, tps, rows, configs)}
    assert set(out) == {"full", "swa"}
    assert out["full"]["layers"] == 5 and out["swa"]["layers"] == 25 and out["full"]["us"] == us_full
    assert out["full"]["share"] == pytest.approx(5 * us_full * 1e-6 * tps, abs=1e-4)
    assert out["swa"]["ms_per_token"] == pytest.approx(25 * us_swa / 1e3, abs=1e-4)
