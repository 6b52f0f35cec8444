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


def test_executed_copy_holds_outputs_values_figures_and_parameters(tmp_path):
    import pandas as pd

    nb = _notebook(tmp_path / "nb.ipynb", [
        ("profile = 'smoke'", ["parameters"]),
        ("print('profile is', profile)\nimport pandas as pd\npd.DataFrame({'PVE': [1.5]})", []),
        ("import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(1, 1))\nx = 1", []),
        ("x + 1", []),
    ])
    out = tmp_path / "executed" / "nb.ipynb"
    out.parent.mkdir()
    execute_inline(nb, {"profile": "full"}, output=out)
    cells = json.loads(out.read_text())["cells"]
    assert [c["metadata"].get("tags", []) for c in cells[:2]] == [["parameters"], ["injected-parameters"]]
    assert "profile = 'full'" in cells[1]["source"]
    printed, table = cells[2]["outputs"]
    assert printed["text"] == "profile is full\n"
    assert table["output_type"] == "execute_result" and "<table" in table["data"]["text/html"]
    assert table["data"]["text/plain"] == repr(pd.DataFrame({"PVE": [1.5]}))
    (figure,) = cells[3]["outputs"]
    assert figure["output_type"] == "display_data" and figure["data"]["image/png"].startswith("iVBOR")
    assert cells[4]["outputs"][0]["data"]["text/plain"] == "2"
    assert [c["execution_count"] for c in cells] == [1, 2, 3, 4, 5]


def test_a_failing_cell_leaves_an_executed_copy_with_its_error(tmp_path):
    import pytest

    nb = _notebook(tmp_path / "nb.ipynb", [("x = 1", []), ("raise ValueError('no data here')", []), ("y = 2", [])])
    out = tmp_path / "nb.out.ipynb"
    with pytest.raises(ValueError, match="no data here"):
        execute_inline(nb, {}, output=out)
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 3 and cells[2]["outputs"] == [] and cells[2]["execution_count"] is None
    (error,) = cells[1]["outputs"]
    assert error["output_type"] == "error" and error["ename"] == "ValueError" and error["evalue"] == "no data here"
