"""The package's import graph has no cycle and no import that goes up a layer (architecture.md):

    entry points (run, tokenize, accuracy, bench, perf_model)
      -> engine (engine, sampling)
      -> models | autotune                    (peers: the autotuner binds kernels, never a model forward)
      -> kernels
      -> cli_args                             (argument checks shared by every CLI, kernels' own included)
      -> runtime | reference | tokenizer      (peers: none imports another)
      -> gguf
      -> errors, blas_threads                 (importable by all)

Every ``import`` / ``from ... import`` of every module is read statically (ast, function-level imports included, no
module is executed), relative imports resolved, ``models/`` taken as ``sparkinfer_cute.models`` (pyproject
package-dir). An import between two groups must go to a lower rank; imports inside a group are free but must not
form a cycle between modules. A new top-level module must be given a group here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"sparkinfer_cute": ROOT / "sparkinfer_cute", "sparkinfer_cute.models": ROOT / "models",
                "sparkinfer_cute.autotune": ROOT / "autotune"}

# group -> rank; a module belongs to the group of its longest matching prefix in GROUP_OF
RANK = {"errors": 0, "util": 0, "gguf": 1, "runtime": 2, "reference": 2, "tokenizer": 2, "cli": 2.5, "kernels": 3,
        "models": 4, "autotune": 4, "engine": 5, "entry": 6}
GROUP_OF = {
    "sparkinfer_cute.errors": "errors",
    "sparkinfer_cute.blas_threads": "util",
    "sparkinfer_cute.lru": "util",
    "sparkinfer_cute.cli_args": "cli",
    "sparkinfer_cute.autotune": "autotune",
    "sparkinfer_cute.gguf": "gguf",
    "sparkinfer_cute.runtime": "runtime",
    "sparkinfer_cute.reference": "reference",
    "sparkinfer_cute.tokenizer": "tokenizer",
    "sparkinfer_cute.kernels": "kernels",
    "sparkinfer_cute.models": "models",
    "sparkinfer_cute.engine": "engine",
    "sparkinfer_cute.sampling": "engine",
    "sparkinfer_cute.run": "entry",
    "sparkinfer_cute.tokenize": "entry",
    "sparkinfer_cute.accuracy": "entry",
    "sparkinfer_cute.bench": "entry",
    "sparkinfer_cute.perf_model": "entry",
}


def discover_modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[0] in ("models", "autotune") and pkg == "sparkinfer_cute":
                continue  # a stray sparkinfer_cute/models (autotune) link would shadow the top-level package
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in ``path`` (module ``name``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import a.b.c` of a non-module attribute path: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def group(module: str) -> str | None:
    best = max((p for p in GROUP_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    return GROUP_OF[best] if best else None


def graph() -> dict[str, set[str]]:
    modules = discover_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    missing = [m for m in graph() if m != "sparkinfer_cute" and group(m) is None]
    assert not missing, f"give these modules a group in tests/test_layers.py GROUP_OF: {missing}"


def test_package_root_imports_nothing():
    assert graph()["sparkinfer_cute"] == set(), "sparkinfer_cute/__init__.py must stay import-free (every layer runs it)"


def test_no_upward_or_sideways_import():
    bad = []
    for src, targets in graph().items():
        gs = group(src)
        if gs is None:
            continue
        for dst in targets:
            gd = group(dst)
            if gd is None or gd == gs:
                continue
            if RANK[gd] >= RANK[gs]:
                kind = "up" if RANK[gd] > RANK[gs] else "sideways"
                bad.append(f"{src} ({gs}) -> {dst} ({gd}): {kind}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    cycles = _cycles(graph())
    assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("edges,expect", [({"a": {"b"}, "b": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": set()}, [])])
def test_cycle_finder(edges, expect):
    assert _cycles(edges) == expect


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from ..runtime import device\n    from . import arch\n")
    mods = {"sparkinfer_cute.kernels.m": p, "sparkinfer_cute.runtime.device": p, "sparkinfer_cute.runtime": p,
            "sparkinfer_cute.kernels.arch": p, "sparkinfer_cute.kernels": p}
    assert imports_of("sparkinfer_cute.kernels.m", p, mods) == {"sparkinfer_cute.runtime.device",
                                                               "sparkinfer_cute.kernels.arch"}
