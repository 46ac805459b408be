"""reference/metrics.py's end-to-end gates: statistic over limit for every part, the int8 limit from the float64
twin's noise floor, and ``median_kl`` in teacher_forced_compare."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkinfer_cute.reference.metrics import E2E_GATES, e2e_gate, teacher_forced_compare


def _m(median, mean, top1):
    return {"median_kl": median, "mean_kl": mean, "top1_agreement_tol": top1}


def test_f32_gate_parts():
    g = E2E_GATES["f32"]
    assert e2e_gate(_m(g["median_kl"] / 2, g["mean_kl"] / 2, 1.0), "f32")["passed"]
    v = e2e_gate(_m(g["median_kl"] * 4, 0.0, 1.0), "f32")
    assert not v["passed"] and v["ratio"] == pytest.approx(4) and v["ratios"]["median_kl"] == pytest.approx(4)
    v = e2e_gate(_m(0.0, 0.0, 0.97), "f32")  # 3% disagreement where 1% is allowed
    assert not v["passed"] and v["ratios"]["top1_tol"] == pytest.approx(3)


def test_int8_limit_follows_the_noise_floor():
    g = E2E_GATES["int8"]
    with pytest.raises(ValueError):
        e2e_gate(_m(0, 0, 1), "int8")
    low = e2e_gate(_m(0, 0, 1), "int8", noise=_m(1e-9, 0, 1))
    assert low["limits"]["median_kl"] == g["median_kl_floor"]
    high = e2e_gate(_m(0, 0, 1), "int8", noise=_m(1e-3, 0, 1))
    assert high["limits"]["median_kl"] == pytest.approx(g["median_kl_noise_factor"] * 1e-3)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_median_kl_reported(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((9, 50))
    b = a + 0.1 * rng.standard_normal((9, 50))
    m = teacher_forced_compare(a, b, rng.integers(0, 50, 9))
    assert m["median_kl"] <= m["max_kl"] and m["median_kl"] > 0
    same = teacher_forced_compare(b, b, rng.integers(0, 50, 9))
    assert same["median_kl"] == pytest.approx(0, abs=1e-12)
