"""The installed package carries every file it reads at run time, not only in an editable install.

A plain ``pip install .`` copies only what ``[tool.setuptools.package-data]`` names besides the .py files; a data file
missing there works from a source checkout and breaks for every user of a wheel (seen 2026-12-05:
``sparkinfer_cute/data/accuracy_text.txt``, the accuracy harness's default text, was not in the wheel). This builds the
wheel the way pip does and compares its file list with the package's tracked files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package_files() -> set[str]:
    """Files under sparkinfer_cute/, models/ and autotune/ (installed as sparkinfer_cute.models / .autotune) as wheel
    paths."""
    out = set()
    for src, dst in (("sparkinfer_cute", "sparkinfer_cute"), ("models", "sparkinfer_cute/models"),
                     ("autotune", "sparkinfer_cute/autotune")):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, src)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
            for f in filenames:
                if f.endswith((".pyc", ".pyo")):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, src))
                out.add(f"{dst}/{rel}".replace(os.sep, "/"))
    return out


def test_wheel_contains_every_package_file(tmp_path):
    # pip's default build isolation, as `pip install .` does (it fetches the build backend like the install did)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ROOT],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / whl) as z:
        in_wheel = {n for n in z.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
    missing = _package_files() - in_wheel
    assert not missing, f"not installed by a wheel: {sorted(missing)} (add them to package-data in pyproject.toml)"
    assert "sparkinfer_cute/data/accuracy_text.txt" in in_wheel
