"""CI runs every example anywhere: each examples/*.py as a script, and examples/quickstart.ipynb cell by cell.

Without a GPU each example must say so and still print its three-line result (on the CPU stand-in); with one, the
same scripts run the kernels. The notebook is executed in order, in one namespace, by tools/execute_notebook.py on
a copy (no Jupyter needed), and the committed notebook must carry the outputs of such a run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "examples", "*.py")))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")


def _gpu_usable() -> bool:
    from sparkinfer_cute.engine import gpu_usable

    return gpu_usable()[0]


def test_there_are_examples():
    assert len(SCRIPTS) >= 2 and os.path.exists(NOTEBOOK)


@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.basename(s) for s in SCRIPTS])
def test_example_script_runs(script, gemma3_path):
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "rel err" in r.stdout, r.stdout
    if not _gpu_usable():
        assert "instead of the GPU kernel" in r.stdout.splitlines()[0], r.stdout


def test_committed_notebook_is_executed():
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 5
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert all(c["outputs"] for c in code), "every code cell prints something: run tools/execute_notebook.py"


def test_notebook_runs(tmp_path, gemma3_path):
    nb_copy = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, nb_copy)
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "execute_notebook.py"), str(nb_copy)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(nb_copy, encoding="utf-8") as f:
        nb = json.load(f)
    text = "".join("".join(o["text"]) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    assert "relative error vs float64" in text and "The capital of France is" in text
    assert ("no GPU:" in text) != _gpu_usable()
