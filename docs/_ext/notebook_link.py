"""Reads a notebook of notebooks/ for the docs, without a copy of it under docs/.

A `docs/notebooks/<name>.nblink` file holds the notebook's path relative to the repository root
(`notebooks/quickstart.ipynb`); `read` is myst-nb's reader for that suffix (`nb_custom_formats`
in docs/conf.py) and returns the notebook with its stored outputs.
"""

import pathlib

import nbformat

REPO = pathlib.Path(__file__).resolve().parents[2]


def read(text: str) -> nbformat.NotebookNode:
    """The notebook that `text` (a path relative to the repository root) names."""
    path = REPO / text.strip()
    if path.suffix != ".ipynb" or not path.is_file():
        raise FileNotFoundError(f"a .nblink file names {text.strip()!r}, which is not a notebook "
                                f"under {REPO}; write the path of an .ipynb file relative to "
                                "the repository root, e.g. notebooks/quickstart.ipynb")
    return nbformat.read(path, as_version=4)
