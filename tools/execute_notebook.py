"""Execute a Jupyter notebook's code cells in order, in one namespace, and store what each printed as its outputs.

    python tools/execute_notebook.py examples/quickstart.ipynb

No Jupyter needed (nbclient/ipykernel are not dependencies): each code cell is compiled and exec'd in the same
globals, its stdout and stderr captured and written back as "stream" outputs with an execution count, so the
committed notebook shows real outputs. Rich outputs (images, a cell's last-expression value) are not produced: the
notebook prints what it shows. Stops at the first cell that raises, and writes nothing then.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def execute(nb: dict, name: str = "notebook") -> dict:
    """Run ``nb``'s code cells; return the notebook with their outputs and execution counts filled in."""
    ns: dict = {"__name__": "__main__"}
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        src = "".join(cell["source"])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(src, f"<{name} cell {count}>", "exec"), ns)
            except Exception:
                sys.__stderr__.write(out.getvalue() + err.getvalue())
                traceback.print_exc(file=sys.__stderr__)
                raise SystemExit(f"cell {count} raised; nothing written") from None
        cell["execution_count"] = count
        cell["outputs"] = [{"output_type": "stream", "name": s, "text": _lines(buf.getvalue())}
                           for s, buf in (("stdout", out), ("stderr", err)) if buf.getvalue()]
    return nb


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tools/execute_notebook.py NOTEBOOK.ipynb", file=sys.stderr)
        return 2
    path = argv[0]
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    nb = execute(nb, path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{path}: executed {sum(c['cell_type'] == 'code' for c in nb['cells'])} code cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
