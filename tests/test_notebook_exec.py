"""The inline notebook runner used on machines without a Jupyter kernel: parameters, cell order,
and notebooks that display markdown when IPython is absent."""
import importlib.util
import json
import sys

from vqhps.notebook_exec import execute_inline


def _notebook(path, cells):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": tags}, "source": src, "outputs": [],
                     "execution_count": None} for src, tags in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def test_parameters_override_the_parameters_cell_and_cells_run_in_order(tmp_path):
    out = tmp_path / "out.txt"
    nb = _notebook(tmp_path / "nb.ipynb", [
        (f"profile = 'smoke'\ntarget = {str(out)!r}", ["parameters"]),
        ("%matplotlib inline\nsteps = [profile]", []),
        ("steps.append('second')\nopen(target, 'w').write(','.join(steps))", []),
    ])
    assert execute_inline(nb, {"profile": "full"}) >= 0
    assert out.read_text() == "full,second"


def test_markdown_cells_run_without_ipython(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "IPython" else real_find_spec(name, *a, **k))
    for name in [m for m in sys.modules if m == "IPython" or m.startswith("IPython.")]:
        monkeypatch.delitem(sys.modules, name)
    nb = _notebook(tmp_path / "nb.ipynb", [
        ("from IPython.display import Markdown, display\ndisplay(Markdown('**the analysis**'))", []),
        # progress bars probe for a notebook front end; outside one they fall back to text
        ("import IPython\nassert IPython.get_ipython() is None\nfrom tqdm.auto import tqdm\nlist(tqdm(range(2)))", []),
    ])
    try:
        execute_inline(nb, {})
    finally:  # the text-only stand-ins must not outlive this test
        for name in ("IPython.display", "IPython"):
            module = sys.modules.get(name)
            if module is not None and getattr(module, "__file__", None) is None:
                del sys.modules[name]
    assert "**the analysis**" in capsys.readouterr().out
    assert "IPython" not in sys.modules or getattr(sys.modules["IPython"], "__file__", None)
