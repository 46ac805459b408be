"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from sparkinfer_cute.gguf.synth import write_synthetic


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """The synthetic ``tiny`` file of each GPU-forward architecture (arch -> path), written once per session; for
    tests that read headers and dry-run the forwards (values do not matter to them, only names, types and shapes)."""
    d = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for arch in ("qwen3moe", "gemma3", "gemma4"):
        out[arch] = str(d / f"{arch}.gguf")
        write_synthetic(out[arch], arch=arch, preset="tiny", seed=1)
    return out
