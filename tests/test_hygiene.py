"""Rules every test file follows, read statically (ast; no test is run):

* **reproducible randomness**: no unseeded ``np.random.default_rng()`` and no legacy global ``np.random.*`` draw
  anywhere in tests/. Hypothesis tests draw their seed with hypothesis (printed on failure); other tests take the
  ``rng`` fixture of tests/conftest.py (its seed is printed on failure, ``SPARKINFER_TEST_SEED`` replays it) or a
  fixed seed.
* **names say what is asserted**: a test named ``*bit_identical*`` compares bits (``assert_array_equal``).
* **no compile-only duplicates of the compile gate**: a test that only calls ``compile_*.uncached`` on registered
  configs repeats tests/kernels/test_compile_gate.py; compile-only tests must carry ``off_registry`` or ``probe`` in
  their name (configs or kernels the registry does not hold).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LEGACY = {"rand", "randn", "randint", "random", "choice", "normal", "uniform", "permutation", "shuffle", "seed",
          "standard_normal", "integers", "random_sample"}


def _test_files():
    return sorted(p for p in TESTS.rglob("*.py") if p.name != "test_hygiene.py")


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_unseeded_randomness():
    bad = []
    for path in _test_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{path.relative_to(TESTS.parent)}:{node.lineno}"
            if name.endswith("random.default_rng") and not node.args and not node.keywords:
                if path.name == "conftest.py":
                    continue  # (the rng fixture passes its seed as an argument; nothing here is unseeded)
                bad.append(f"{where}: unseeded {name}()")
            elif name.startswith(("np.random.", "numpy.random.")) and name.rsplit(".", 1)[-1] in LEGACY:
                bad.append(f"{where}: legacy global {name}()")
    assert not bad, "unreproducible randomness (use a hypothesis-drawn seed or the rng fixture):\n" + "\n".join(bad)


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_bit_identical_tests_compare_bits():
    bad = []
    for path in _test_files():
        for fn in _functions(ast.parse(path.read_text(), str(path))):
            if fn.name.startswith("test_") and "bit_identical" in fn.name:
                calls = {_dotted(n.func).rsplit(".", 1)[-1] for n in ast.walk(fn) if isinstance(n, ast.Call)}
                if "assert_array_equal" not in calls:
                    bad.append(f"{path.relative_to(TESTS.parent)}::{fn.name}")
    assert not bad, "tests named bit_identical without a bitwise comparison:\n" + "\n".join(bad)


def test_no_compile_only_duplicates_of_the_gate():
    bad = []
    for path in _test_files():
        if path.name == "test_compile_gate.py":
            continue
        for fn in _functions(ast.parse(path.read_text(), str(path))):
            if not fn.name.startswith("test_") or "off_registry" in fn.name or "probe" in fn.name:
                continue
            calls = [_dotted(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)]
            if any(c.endswith(".uncached") for c in calls) and not any(
                    c.rsplit(".", 1)[-1].startswith(("assert_", "check_")) for c in calls):
                bad.append(f"{path.relative_to(TESTS.parent)}::{fn.name}")
    assert not bad, ("compile-only tests that repeat the compile gate (register the config instead, or name the "
                     "test *off_registry* / *probe*):\n" + "\n".join(bad))
