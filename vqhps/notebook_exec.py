"""Run a notebook's code cells in this process, with papermill-style parameters: for machines that
have the library but no Jupyter kernel (the figures and tables are the same; no outputs are stored)."""
from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path


def _display_fallback() -> None:
    """Without IPython (no Jupyter here), ``from IPython.display import Markdown, display`` in a
    notebook cell still works: objects print as text."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("IPython") is not None:
        return
    package, module = types.ModuleType("IPython"), types.ModuleType("IPython.display")

    class Markdown(str):
        def __new__(cls, data: str = "") -> "Markdown":
            return super().__new__(cls, data)

    module.Markdown = Markdown
    module.display = lambda *objects, **_: print(*objects)
    package.display = module
    package.get_ipython = lambda: None  # what libraries that probe for a notebook (tqdm.auto) see outside one
    package.version_info = (0, 0, 0)
    sys.modules.setdefault("IPython", package)
    sys.modules.setdefault("IPython.display", module)


class _Tee(io.TextIOBase):
    """Text written to it goes to every stream in ``streams`` (the captured copy and the console)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _run_cell(source: str, name: str, namespace: dict, count: int) -> list[dict]:
    """Run one cell as a notebook front end does and return its outputs (nbformat 4): what it printed,
    the value of a final expression (text, and HTML for tables) and the figures it left open (PNG)."""
    import matplotlib.pyplot as plt

    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    printed = io.StringIO()
    with contextlib.redirect_stdout(_Tee(printed, sys.stdout)):
        exec(compile(tree, name, "exec"), namespace)  # noqa: S102 - the project's own notebooks
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace) if last else None  # noqa: S307
    outputs: list[dict] = []
    if printed.getvalue():
        outputs.append({"output_type": "stream", "name": "stdout", "text": printed.getvalue()})
    if value is not None:
        data = {"text/plain": repr(value)}
        html = value._repr_html_() if callable(getattr(value, "_repr_html_", None)) else None
        if html:
            data["text/html"] = html
        outputs.append({"output_type": "execute_result", "data": data, "metadata": {}, "execution_count": count})
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png", bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii")}})
    plt.close("all")
    return outputs


def execute_inline(path: Path, parameters: dict, output: Path | None = None) -> float:
    """Execute ``path``'s code cells in order in a fresh namespace; returns the wall time in seconds.

    The cell tagged "parameters" runs first as written, then ``parameters`` override its values (shown,
    as papermill shows them, in a cell tagged "injected-parameters"). With ``output``, the executed
    notebook (each cell's printed text, final value and open figures; after a failure, the cells up to
    the failing one and its error) is written there atomically."""
    import matplotlib

    from .checkpoint import atomic_write

    matplotlib.use("Agg")
    notebook = json.loads(Path(path).read_text())
    cells: list[dict] = []
    namespace: dict = {"__name__": "__main__"}
    count = 0
    start = time.perf_counter()
    try:
        for i, cell in enumerate(notebook["cells"]):
            cells.append(cell)
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            if "IPython" in source:  # only then: libraries that probe for IPython must not find a stand-in
                _display_fallback()
            count += 1
            cell.update(outputs=[], execution_count=count)
            try:
                cell["outputs"] = _run_cell("\n".join(lines), f"{Path(path).name}[cell {i}]", namespace, count)
            except Exception as err:  # recorded in the executed copy (as papermill does), then raised
                cell["outputs"] = [{"output_type": "error", "ename": type(err).__name__, "evalue": str(err),
                                    "traceback": traceback.format_exception(err)}]
                raise
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                namespace.update(parameters)
                count += 1
                cells.append({"cell_type": "code", "execution_count": count, "id": f"injected-{i}", "outputs": [],
                              "metadata": {"tags": ["injected-parameters"]},
                              "source": "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())})
    finally:
        if output is not None:  # also after a failure: the cells up to the failing one, with its error
            taken = sum(1 for c in cells if "injected-parameters" not in c.get("metadata", {}).get("tags", []))
            executed = {**notebook, "cells": cells + notebook["cells"][taken:]}
            atomic_write(Path(output), lambda f: f.write(json.dumps(executed, indent=1).encode()))
    return time.perf_counter() - start
