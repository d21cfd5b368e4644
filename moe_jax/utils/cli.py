"""What the command-line programs share: absl flags parsed in-process, and Markdown tables.

A program defines its flags in a function of a `flags.FlagValues` and parses each call's
arguments into fresh values, so that `main(argv)` runs in-process (tests, notebooks) exactly as
`python -m <program> ...` runs it:

    def define_flags(flag_values: flags.FlagValues) -> None:
        flags.DEFINE_string("workdir", None, "A run directory.", flag_values=flag_values)

    def main(argv: Sequence[str] | None = None) -> None:
        values, _ = cli.parse_flags(define_flags, argv, __doc__)

    if __name__ == "__main__":
        main()
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def usage_error(message: str) -> NoReturn:
    """Exits with status 2 after printing `message` to stderr, as for a bad flag."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_flags(define: Callable[[flags.FlagValues], None], argv: Sequence[str] | None = None,
                doc: str = "", *, positional: str | None = None
                ) -> tuple[flags.FlagValues, list[str]]:
    """Parses `argv` (the arguments after the program name; None: sys.argv[1:]) into new flag
    values that `define` declares. Returns (values, the non-flag arguments).

    --help prints `doc` and the flags, then exits with status 0; an unknown flag, a bad value or
    a missing required flag is a `usage_error`. Non-flag arguments are refused unless
    `positional` names them (for the help text, e.g. "RUN_DIR ...").
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    values = flags.FlagValues()
    define(values)
    if any(arg in HELP for arg in argv):
        usage = f"arguments: [flags] {positional}" if positional else "arguments: [flags]"
        print("\n\n".join(part for part in (doc.strip(), usage, values.get_help()) if part))
        raise SystemExit(0)
    try:
        rest = values(["program", *argv])[1:]
    except flags.Error as err:
        usage_error(str(err))
    if rest and positional is None:
        usage_error(f"unexpected arguments {rest}; this program takes flags only (--help).")
    return values, rest


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], *,
                   aligned: bool = False) -> str:
    """A Markdown table of `header` and `rows` (cells as `str`, "|" escaped). `aligned` pads
    every column to its widest cell, for reading as plain text."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    if not aligned:
        lines = [cells[0], ["---"] * len(header), *cells[1:]]
        return "\n".join("| " + " | ".join(row) + " |" for row in lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
