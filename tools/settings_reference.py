"""The settings table as markdown, for the manual.

    python -m tools.settings_reference               prints the table
    python -m tools.settings_reference docs/usage.md rewrites the table between the file's
                                                     settings markers
"""

from __future__ import annotations

import argparse
import sys

from crckd_jax.settings import SETTINGS

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def markdown() -> str:
    """key | default | expected | help, one row per key of `SETTINGS`."""
    cell = lambda text: text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    rows = ["| key | default | expected | help |", "|---|---|---|---|"]
    rows += [f"| `{s.key}` | `{s.default!r}` | {cell(s.rule.expected)} | {cell(s.help)} |"
             for s in SETTINGS]
    return "\n".join(rows) + "\n"


def with_table(text: str) -> str:
    """`text` (a markdown file's) with `markdown()` between its settings markers."""
    start = text.index(BEGIN) + len(BEGIN)
    return f"{text[:start]}\n{markdown()}{text[text.index(END):]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.settings_reference",
                                     description="The settings table as markdown.")
    parser.add_argument("file", nargs="?",
                        help="write the table between the settings markers of this file")
    args = parser.parse_args(argv)
    if not args.file:
        sys.stdout.write(markdown())
        return
    with open(args.file) as f:
        text = f.read()
    with open(args.file, "w") as f:
        f.write(with_table(text))


if __name__ == "__main__":
    main()
