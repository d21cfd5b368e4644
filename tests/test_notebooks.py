"""The Colab notebooks of notebooks/: each one runs top to bottom in fast mode (MOE_JAX_FAST=1)
in a fresh kernel, and each committed .ipynb has the cells of its jupytext source (the paired
notebooks/<name>.py, from which notebooks/build.py writes it).

A failing cell fails its test (nbclient raises CellExecutionError naming the cell). The
notebooks train on the tiny embedded corpus of the session `data_dir` fixture.
"""

import re
import shutil

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from notebooks import build

NAMES = tuple(build.NOTEBOOKS)
MAX_BYTES = 1_000_000
# Paths of this machine that must not appear in a committed notebook (sources or outputs).
LOCAL_PATH = re.compile(r"(/work/|/home/|/root/|/tmp/|/private/var/|[A-Z]:\\\\)")


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(build.path_of(name), as_version=4)


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name, data_dir, monkeypatch):
    monkeypatch.setenv(build.FAST_ENV, "1")
    monkeypatch.setenv("MOE_JAX_DATA_DIR", data_dir)  # the kernel inherits the environment
    # raises at the first failing cell, or at one still running after 5 min (fast-mode cells
    # take seconds): a lost kernel message fails the test instead of hanging it
    executed = build.execute(committed(name), timeout=300)
    produced = outputs(executed)
    assert any("mode: fast" in "".join(o.get("text", "")) for o in produced)
    assert any("image/png" in o.get("data", {}) for o in produced), f"{name} drew no figure"


def test_a_failing_cell_fails_the_run():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('boom')")])
    with pytest.raises(CellExecutionError, match="boom"):
        build.execute(nb)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name):
    assert build.sources(committed(name)) == build.sources(build.notebook(name)), (
        f"notebooks/{name}.ipynb differs from its source notebooks/{name}.py: edit the .py, then "
        "run `python notebooks/build.py` (and --execute to refresh outputs).")


def test_every_source_is_a_listed_notebook():
    found = {p.stem for p in build.NOTEBOOKS_DIR.glob("*.py")} - {"build"}
    assert found == set(NAMES), "list each notebooks/<name>.py in build.TITLES (README order)"
    assert all(build.path_of(name).exists() for name in NAMES)


def test_publishing_sets_the_repository_everywhere(tmp_path, monkeypatch):
    shutil.copy(build.source_of("quickstart"), tmp_path / "quickstart.py")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{build.readme_block()}\n\nrest\n")
    monkeypatch.setattr(build, "NOTEBOOKS_DIR", tmp_path)
    monkeypatch.setattr(build, "GITHUB_REPO", "someone/moe-fork")
    monkeypatch.setattr(build, "BRANCH", "release/1.0")
    assert build.set_repository("quickstart")
    assert not build.set_repository("quickstart")  # idempotent
    nb = build.notebook("quickstart")
    url = "https://colab.research.google.com/github/someone/moe-fork/blob/release/1.0/notebooks/"
    assert url + "quickstart.ipynb" in nb.cells[0].source
    assert 'REPO_URL = "https://github.com/someone/moe-fork"\n' in nb.cells[1].source
    assert "OWNER" not in (tmp_path / "quickstart.py").read_text()
    build.write_readme(readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n")
    assert text.count(url) == len(NAMES) and "OWNER" not in text


@pytest.mark.parametrize("name", NAMES)
def test_conventions(name):
    nb = committed(name)
    assert nb.cells[0].cell_type == "markdown" and build.colab_url(name) in nb.cells[0].source
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert 'find_spec("moe_jax") is None' in first_code.source and "pip" in first_code.source
    assert build.repo_url_line() in first_code.source.splitlines()
    assert build.path_of(name).stat().st_size < MAX_BYTES
    assert not LOCAL_PATH.search(build.path_of(name).read_text()), "a local path is committed"
    assert outputs(nb), f"{name} is committed without outputs: run build.py --execute {name}"
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert images and not [o for o in outputs(nb) if {"image/jpeg", "image/svg+xml"}
                           & set(o.get("data", {}))]


def test_readme_lists_every_notebook():
    with open(build.README) as f:
        assert build.readme_block() in f.read()
