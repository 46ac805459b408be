"""The SPARKINFER_DISABLE passes: one list (models/ops.py PASSES) that the code, the README and the A/B script agree
with, so a pass cannot be switched in code but missing from the knobs users and benchmarks can reach."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparkinfer_cute.models import ops

ROOT = Path(__file__).resolve().parents[2]


def test_every_pass_checked_in_code_is_listed_and_documented():
    used = set()
    for d in ("models", "sparkinfer_cute", "autotune"):
        for p in (ROOT / d).rglob("*.py"):
            used |= set(re.findall(r'enabled\("(\w+)"\)', p.read_text()))
    assert used == set(ops.PASSES), f"checked but not listed: {used - ops.PASSES}; listed, never checked: " \
                                     f"{set(ops.PASSES) - used}"
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `SPARKINFER_DISABLE="))
    assert set(re.search(r"SPARKINFER_DISABLE=([\w,]+)", row).group(1).split(",")) == set(ops.PASSES)
    # the A/B script's unoptimized build switches every pass off
    ab = re.search(r'SPARKINFER_DISABLE=([\w,]+)"', (ROOT / "tools" / "gpu_session.sh").read_text()).group(1)
    assert set(ab.split(",")) == set(ops.PASSES)


def test_an_unknown_pass_name_is_an_error():
    with pytest.raises(KeyError, match="not a pass"):
        ops.enabled("fused_typo")


def test_a_misspelt_pass_in_the_environment_is_a_one_line_error():
    from sparkinfer_cute.errors import ConfigError

    assert ops._env_passes("SPARKINFER_DISABLE", {"SPARKINFER_DISABLE": " fused_qk, flash_prefill ,"}) == \
        {"fused_qk", "flash_prefill"}
    assert ops._env_passes("SPARKINFER_ENABLE", {}) == frozenset()
    with pytest.raises(ConfigError) as e:
        ops._env_passes("SPARKINFER_ENABLE", {"SPARKINFER_ENABLE": "fused_route_gate_up,fused_expert_down"})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("SPARKINFER_ENABLE: 'fused_expert_down' is not a speed pass")
    assert "did you mean 'fused_experts_down'?" in msg
    with pytest.raises(ConfigError, match="'nonsense' is not a speed pass; the passes are listed"):
        ops._env_passes("SPARKINFER_DISABLE", {"SPARKINFER_DISABLE": "nonsense"})
