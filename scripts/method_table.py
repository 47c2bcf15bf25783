"""README's method table, generated from the method registry (entclip/core/registry.py).

    python scripts/method_table.py           # print the table
    python scripts/method_table.py --write   # replace the table in README.md's "## Entropy control"

tests/test_registry.py holds README.md to the generated table, so the two cannot drift: change a
method's declaration, then run this with --write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from entclip.core.registry import TABLE_HEADER, method_table

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Entropy control"


def table_span(text: str) -> tuple[int, int]:
    """(start, end) character offsets of the method table in README's "Entropy control" section:
    from the header row (its first cells) to the end of its last row."""
    section = text.index(SECTION + "\n")
    start = text.index(TABLE_HEADER.split(" | place")[0], section)
    end = text.find("\n\n", start)
    return start, len(text) if end < 0 else end


def readme_table(text: str) -> str:
    start, end = table_span(text)
    return text[start:end]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = ap.parse_args()
    table = method_table()
    if not args.write:
        print(table)
        return 0
    text = README.read_text()
    start, end = table_span(text)
    README.write_text(text[:start] + table + text[end:])
    print(f"wrote the method table ({table.count(chr(10)) - 1} rows) into {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
