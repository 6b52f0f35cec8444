"""Run a notebook's code cells in this process, with papermill-style parameters: for machines that
have the library but no Jupyter kernel (the figures and tables are the same; no outputs are stored)."""
from __future__ import annotations

import json
import time
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


def execute_inline(path: Path, parameters: dict) -> float:
    """Execute ``path``'s code cells in order in a fresh namespace; returns the wall time in seconds.

    The cell tagged "parameters" runs first as written, then ``parameters`` override its values."""
    import matplotlib

    matplotlib.use("Agg")
    cells = json.loads(Path(path).read_text())["cells"]
    namespace: dict = {"__name__": "__main__"}
    start = time.perf_counter()
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        if "IPython" in source:  # only then: libraries that probe for IPython must not find a stand-in
            _display_fallback()
        code = compile("\n".join(lines), f"{Path(path).name}[cell {i}]", "exec")
        exec(code, namespace)  # noqa: S102 - the project's own notebooks
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            namespace.update(parameters)
    return time.perf_counter() - start
