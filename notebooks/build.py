"""Writes the Colab notebooks of notebooks/ from their paired sources, and executes them.

    python notebooks/build.py                                  # write every .ipynb from its .py
    python notebooks/build.py --execute scaling_results        # ... and run one, saving outputs
    MOE_JAX_FAST=1 python notebooks/build.py --execute         # all four, in fast mode
    python notebooks/build.py --check                          # only check that the pairs agree

Each notebook is a Python file in jupytext's percent format (`# %%` code cells, `# %% [markdown]`
cells), e.g. quickstart.py, paired with the committed quickstart.ipynb. Edit the .py files, never
the .ipynb (a test checks that their cells agree). Writing keeps the outputs of every code cell
whose source did not change; `--execute` runs the named notebooks top to bottom in a fresh
kernel with the notebooks directory as working directory (the same function the test suite uses)
and saves them with their outputs. Each notebook's backend cell prints the mode that produced its
outputs.

Publishing: set `GITHUB_REPO` ("owner/name" on GitHub) and run this script once; it rewrites the
Colab badge and clone URL in every .py source, then their notebooks (cells without outputs, so no
rerun is needed), and the Notebooks section of the top-level README.md.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import jupytext
import nbformat
from absl import flags

from moe_jax.utils import cli

GITHUB_REPO = "OWNER/moe_jax"  # set at publication: the GitHub "owner/name" of the repository
BRANCH = "main"

NOTEBOOKS_DIR = Path(__file__).resolve().parent
README = NOTEBOOKS_DIR.parent / "README.md"
README_BEGIN = "<!-- notebooks: written by notebooks/build.py -->"
README_END = "<!-- end notebooks -->"
FAST_ENV = "MOE_JAX_FAST"
FORMAT = "py:percent"

# The notebooks, in README order, with their line of the README table.
TITLES = {
    "quickstart": "one MoE layer's routing, then a tiny dense vs Switch model trained side by "
                  "side",
    "routing_explorer": "a trained top-2 router: expert use by domain and byte class, entropy "
                        "per layer, drops vs capacity factor",
    "scaling_results": "the committed experiment results: dense vs sparse figures, claims, "
                       "paper-scale FLOP tables",
    "expert_parallelism": "8 simulated devices: where experts live, the all-to-all in the HLO, "
                          "the two expert-parallel forms",
}
NOTEBOOKS = tuple(TITLES)


def colab_url(name: str) -> str:
    return (f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/notebooks/"
            f"{name}.ipynb")


def badge(name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(name)})")


def repo_url_line() -> str:
    """The line of every install cell that names the repository to clone."""
    return f'REPO_URL = "https://github.com/{GITHUB_REPO}"'


def source_of(name: str) -> Path:
    return NOTEBOOKS_DIR / f"{name}.py"


def path_of(name: str) -> Path:
    return NOTEBOOKS_DIR / f"{name}.ipynb"


# --- publishing: the repository named in the sources --------------------------------------------

def set_repository(name: str) -> bool:
    """Rewrites the Colab URL and the clone URL of `name`.py to GITHUB_REPO and BRANCH; True when
    the file changed."""
    path = source_of(name)
    text = path.read_text()
    colab = re.compile(r"https://colab\.research\.google\.com/github/[^/\s]+/[^/\s]+/blob/\S+?"
                       rf"/notebooks/{re.escape(name)}\.ipynb")
    clone = re.compile(r'^REPO_URL = "https://github\.com/[^"]*"$', re.MULTILINE)
    for pattern, what in ((colab, "Colab badge URL"), (clone, "REPO_URL line of the install cell")):
        if not pattern.search(text):
            raise ValueError(f"{path} lacks its {what} ({pattern.pattern})")
    new = clone.sub(repo_url_line(), colab.sub(colab_url(name), text))
    if new != text:
        path.write_text(new)
    return new != text


# --- the notebook of a source -------------------------------------------------------------------

def notebook(name: str) -> nbformat.NotebookNode:
    """The notebook of `name`.py, without outputs."""
    nb = jupytext.read(source_of(name), fmt=FORMAT)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:12]}-{i:02d}"
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "name": f"{name}.ipynb"},
        "jupytext": {"formats": "ipynb,py:percent"},
    }
    return nb


def sources(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def with_old_outputs(new: nbformat.NotebookNode, path: Path) -> nbformat.NotebookNode:
    """`new` with the outputs of the cells of the notebook at `path` whose source is unchanged."""
    if not path.exists():
        return new
    old = nbformat.read(path, as_version=4)
    unused = [c for c in old.cells if c.cell_type == "code"]
    for cell in new.cells:
        match = next((c for c in unused if c.source == cell.source), None)
        if cell.cell_type == "code" and match is not None:
            cell.outputs, cell.execution_count = match.outputs, match.execution_count
            unused.remove(match)
    return new


def execute(nb: nbformat.NotebookNode, cwd: Path = NOTEBOOKS_DIR,
            timeout: int = 1800) -> nbformat.NotebookNode:
    """Runs every cell in a fresh python3 kernel whose working directory is `cwd`; raises
    nbclient's CellExecutionError at the first failing cell. The kernel inherits os.environ.
    Widget state (interactive views, which static pages cannot show anyway) is not kept."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    nb = client.execute()
    nb.metadata.pop("widgets", None)
    return nb


def readme_block() -> str:
    table = cli.markdown_table(["notebook", "what"], [
        [f"{badge(name)} `notebooks/{name}.ipynb`", TITLES[name]] for name in NOTEBOOKS])
    return "\n".join([README_BEGIN, "", table, "", README_END])


def write_readme(path: Path = README) -> None:
    """Replaces the block between the markers in README.md by `readme_block()`."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} lacks the markers {README_BEGIN!r} and {README_END!r} of the "
                         "Notebooks section; put them back where the badges belong and rerun.")
    head, rest = text.split(README_BEGIN, 1)
    path.write_text(head + readme_block() + rest.split(README_END, 1)[1])


def check() -> list[str]:
    """The notebooks whose committed .ipynb cells differ from their .py source."""
    return [name for name in NOTEBOOKS if not path_of(name).exists()
            or sources(nbformat.read(path_of(name), as_version=4)) != sources(notebook(name))]


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_bool("execute", False, "execute the notebooks named after the flags (none "
                      f"named: all of {list(NOTEBOOKS)})", flag_values=values)
    flags.DEFINE_bool("check", False, "write nothing; exit 1 when a .ipynb differs from its .py "
                      "source", flag_values=values)


def main(argv: Sequence[str] | None = None) -> int:
    args, names = cli.parse_flags(define_flags, argv, __doc__, positional="[NAME ...]")
    if names and not args.execute:
        cli.usage_error(f"notebook names {names} need --execute")
    if args.check:
        stale = check()
        for name in stale:
            print(f"notebooks/{name}.ipynb differs from notebooks/{name}.py: run "
                  "`python notebooks/build.py`")
        return 1 if stale else 0
    to_run = (names or list(NOTEBOOKS)) if args.execute else []
    unknown = [n for n in to_run if n not in NOTEBOOKS]
    if unknown:
        cli.usage_error(f"unknown notebook {unknown[0]!r}; use names from {list(NOTEBOOKS)}")
    for name in NOTEBOOKS:
        if set_repository(name):
            print(f"set the repository of {source_of(name).name} to {GITHUB_REPO} ({BRANCH})")
        nb = notebook(name)
        if name in to_run:
            mode = "fast" if os.environ.get(FAST_ENV) == "1" else "full"
            print(f"executing {name} ({mode} mode) ...", flush=True)
            nb = execute(nb)
            # The generated metadata only: no kernel versions or widget state to churn in diffs.
            nb.metadata = notebook(name).metadata
        else:
            nb = with_old_outputs(nb, path_of(name))
        nbformat.validate(nb)
        nbformat.write(nb, path_of(name))
        size = path_of(name).stat().st_size
        print(f"wrote {path_of(name).relative_to(NOTEBOOKS_DIR.parent)} ({size / 1e3:.0f} kB)")
    write_readme()
    print(f"wrote the Notebooks section of {README.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
