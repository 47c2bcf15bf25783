"""Print (or --write into docs/trl.md) the table of where each entclip key goes on engine trl.

    python scripts/trl_table.py           # print it
    python scripts/trl_table.py --write   # replace the table between the markers in docs/trl.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from entclip.training.trl_engine import mapping_table

START, END = "<!-- trl-table:start -->\n", "<!-- trl-table:end -->"


def main() -> None:
    table = mapping_table()
    if "--write" not in sys.argv:
        print(table, end="")
        return
    doc = Path(__file__).resolve().parents[1] / "docs" / "trl.md"
    text = doc.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + START + table + END + tail)


if __name__ == "__main__":
    main()
