"""moe_jax's docstrings are Markdown (backticks, `-` lists, hanging indents): render them so.

`autodoc-process-docstring` (after napoleon, which turns a Google `Args:` section into field
lists, which MyST's `fieldlist` extension reads) wraps each docstring in the `md-docstring`
directive, which parses its content with MyST into the page. Summaries that autosummary takes
for its tables are read by the reStructuredText parser instead, so for those (autosummary asks
without autodoc's `members` option) the first paragraph is made into plain reStructuredText:
inline code in double backticks, other markup characters escaped.
"""

import re

from docutils import nodes
from docutils.utils import new_document
from myst_parser.parsers.sphinx_ import MystParser
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

DIRECTIVE = "md-docstring"
_CODE = re.compile(r"`([^`]+)`")
_MARKUP = re.compile(r"([*|_`\\])")


class MarkdownDocstring(SphinxDirective):
    """The directive's content, parsed as MyST Markdown."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        document = new_document(self.get_source_info()[0], self.state.document.settings)
        MystParser().parse("\n".join(self.content), document)
        return list(document.children)


def rst_summary(lines: list[str]) -> list[str]:
    """The first paragraph of a Markdown docstring as safe reStructuredText."""
    first = []
    for line in lines:
        if not line.strip():
            if first:
                break
            continue
        first.append(line.strip())
    parts = _CODE.split(" ".join(first))  # odd indices: the text inside backticks
    return ["".join(f"\\ ``{p}``\\ " if i % 2 else _MARKUP.sub(r"\\\1", p)
                    for i, p in enumerate(parts))]


def process(app: Sphinx, what: str, name: str, obj: object, options, lines: list[str]) -> None:
    if not any(line.strip() for line in lines):
        return
    if not getattr(options, "members", None):
        lines[:] = rst_summary(lines)
        return
    lines[:] = [f".. {DIRECTIVE}::", ""] + [f"   {line}" if line else "" for line in lines]


def setup(app: Sphinx) -> dict:
    app.add_directive(DIRECTIVE, MarkdownDocstring)
    app.connect("autodoc-process-docstring", process, priority=600)  # after napoleon (500)
    return {"parallel_read_safe": True}
