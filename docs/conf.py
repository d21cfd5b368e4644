"""Sphinx configuration of the moe_jax documentation site.

Pages are MyST Markdown (myst-parser), the notebooks of notebooks/ are rendered by myst-nb from
the outputs stored in them (nothing is executed), the API reference is generated from the
docstrings (autodoc + autosummary, Google style through napoleon), and the theme is
sphinx-book-theme: the set-up of the JAX, Flax and Optax sites.

Build: `pip install -e ".[docs]"`, then `sphinx-build -W --keep-going -b html docs docs/_build`.
"""

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))  # notebook_link, markdown_docstrings

project = "moe_jax"
author = "moe_jax authors"
copyright = "the moe_jax authors"

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks (it loads myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "markdown_docstrings",  # docstrings are Markdown: rendered by MyST
]

exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints", "README.md"]

# -- MyST ------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist", "fieldlist"]
# `[text](page.md#a-heading)` links need heading anchors; three levels cover every page.
myst_heading_anchors = 3

# -- Notebooks -------------------------------------------------------------------------------
# The .ipynb files stay in notebooks/ (written by notebooks/build.py with their outputs);
# docs/notebooks/<name>.nblink names one, and notebook_link.read reads it from there.
nb_custom_formats = {".nblink": "notebook_link.read"}
nb_execution_mode = "off"
nb_merge_streams = True

# -- API reference ---------------------------------------------------------------------------
# autosummary writes one page per module into api/generated/ (not committed); it is written anew
# by every build, so that a module that no longer exists leaves no page behind.
shutil.rmtree(DOCS / "api" / "generated", ignore_errors=True)
autosummary_generate = True
# Each object is documented where it is defined: a package face's re-exports (`moe_jax.MoeConfig`)
# are not documented again, so cross-references have one target (the module template).
autodoc_default_options = {"members": True, "show-inheritance": True}
templates_path = ["_templates"]  # autosummary/module.rst: automodule with :ignore-module-all:
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# A reference to a moe_jax object that does not exist is an error (with -W); references to other
# libraries' objects (jax.Array in signatures) have no target here and are left as text.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!moe_jax\.).*")]
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- HTML ------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "moe_jax"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    # The sidebar shows the path to the current page only: rendering the whole tree (every API
    # module) on each of the ~100 pages was a third of the build time.
    "collapse_navbar": True,
    "max_navbar_depth": 3,
}
