"""README.md and docs/: size, the blocks CI and the report generator rely on, links, and the code
blocks marked runnable (each is executed from the repository root)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_BYTES = 15_000

TEST_COMMAND_BLOCK = "<!-- test-command -->\n```\nmake test\n```\n<!-- /test-command -->\n"
RESULTS_BEGIN = "<!-- results:begin (python -m vqhps report --profile full --readme) -->"
RESULTS_END = "<!-- results:end -->"
RUNNABLE = "<!-- runnable -->"
#: committed measurements: links into it must exist; the rest of results/ is what a run writes
COMMITTED_RESULTS = ROOT / "results" / "full" / "diagnostics"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```")


def test_readme_is_small():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size:,} bytes; move detail into docs/ (limit {MAX_README_BYTES:,})"


def test_readme_keeps_the_test_command_block():
    """.ci/run extracts the test command from exactly this block."""
    assert TEST_COMMAND_BLOCK in README.read_text()


def test_readme_has_the_results_markers_in_results_at_a_glance():
    lines = README.read_text().splitlines()
    assert lines.count(RESULTS_BEGIN) == 1 and lines.count(RESULTS_END) == 1
    begin, end = lines.index(RESULTS_BEGIN), lines.index(RESULTS_END)
    assert begin < end - 1, "the results block needs a line between its markers"
    headings = [line for line in lines[:begin] if line.startswith("## ")]
    assert headings and headings[-1] == "## Results at a glance"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _links(path: Path) -> list[str]:
    out, in_code = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            out += LINK.findall(line)
    return out


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(doc):
    """Every relative link resolves: to a file or folder in the repository (committed measurements
    included), or to a path under results/ that a run writes. Anchors into Markdown files exist."""
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            written_by_a_run = (path.is_relative_to(ROOT / "results") and not path.is_relative_to(COMMITTED_RESULTS))
            if not written_by_a_run:
                broken.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_readme_does_not_link_to_a_runs_tables_or_figures():
    """The results block is generated; the README itself types no results."""
    links = _links(README)
    assert not [t for t in links if re.match(r"^results/[^/]+/(tables|figures)/", t)], links


def _runnable_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block right after a ``<!-- runnable -->`` line."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != RUNNABLE:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        assert fence.startswith("```") and fence[3:].strip() in ("bash", "sh", "python"), \
            f"{path.name}:{i + 1}: {RUNNABLE} must precede a ```bash or ```python block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append((i + 2, fence[3:].strip(), "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


RUNNABLE_BLOCKS = [(doc, *block) for doc in (README, *DOCS) for block in _runnable_blocks(doc)]


def test_the_readme_has_runnable_blocks():
    assert any(doc == README for doc, *_ in RUNNABLE_BLOCKS)


@pytest.mark.parametrize("doc,line,language,code", RUNNABLE_BLOCKS,
                         ids=[f"{d.name}:{n}" for d, n, *_ in RUNNABLE_BLOCKS])
def test_runnable_block_runs(doc, line, language, code):
    """Runs from the repository root with this interpreter's environment (its bin/ first on PATH,
    so ``python`` in a shell block is the same Python)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    command = ["bash", "-euo", "pipefail", "-c", code] if language in ("bash", "sh") else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{doc.name}:{line} exited {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_the_package_docstring_maps_every_notebook_to_names_that_exist():
    """vqhps/__init__.py names, per notebook, the library functions it calls; each must resolve."""
    import importlib

    import vqhps

    doc = vqhps.__doc__ or ""
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    sections = re.split(r"^(\d\d_\w+\.ipynb)$", doc, flags=re.M)
    mapped = {name: text.strip().split("\n\n")[0] for name, text in zip(sections[1::2], sections[2::2])}
    assert sorted(mapped) == notebooks
    missing = []
    for notebook, text in mapped.items():
        pairs = re.findall(r"([\w.]+): ([^:;]+?)(?=;|\Z)", " ".join(text.split()))
        assert pairs, notebook
        for module, names in pairs:
            mod = importlib.import_module(f"vqhps.{module}")
            missing += [f"{notebook}: {module}.{n}" for n in re.split(r",\s*", names.strip()) if not hasattr(mod, n)]
    assert not missing, missing
