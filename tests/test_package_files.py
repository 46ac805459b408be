"""Rules every package file follows, read statically (no import, no GPU):

* a file over 600 lines says why at its top: its module docstring holds "over 600 lines" or "~600 lines" and the
  reason (issue 10: one kernel family per file, no grab-bag modules);
* docstrings and comments name repo-relative paths only, never a machine's absolute path (``/work/...``,
  ``/home/...``, ``/root/...``, ``/tmp/...``), which means nothing on a user's machine.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("sparkinfer_cute", "models", "autotune")
MAX_LINES = 600
REASON = re.compile(r"(over|~)\s*600 lines", re.IGNORECASE)
ABSOLUTE = re.compile(r"(?<![\w.~])/(work|home|root|tmp)/\w")


def _package_files():
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_the_rules_see_the_package():
    files = _package_files()
    assert len(files) > 50, "the package directories moved: update PACKAGE_DIRS"
    assert (ROOT / "models" / "ops.py") in files


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_long_files_say_why(path):
    text = path.read_text()
    n = text.count("\n")
    if n <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert REASON.search(doc), (f"{path.relative_to(ROOT)} has {n} lines: split it, or say at its top why it is "
                                f"over 600 lines (\"(Over 600 lines: ...)\" in the module docstring)")


def test_no_absolute_machine_paths():
    bad = []
    for path in _package_files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            # only text (docstrings, comments): code may build /tmp paths on purpose (none does today)
            if ABSOLUTE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, "absolute machine paths in the package:\n" + "\n".join(bad)


def test_the_path_rule_catches_a_machine_path():
    assert ABSOLUTE.search("read at /work/llama/llama.cpp")
    assert ABSOLUTE.search("(/tmp/gpuhost/site)")
    assert not ABSOLUTE.search("models/ops.py and ../shared/peers/llama.cpp and ~/.cache/x")
