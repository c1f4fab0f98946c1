"""Extract PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes) into rules/data/.

    python tools/annex_e_table.py 2026c                     # fetch that edition's HTML from NEMA
    python tools/annex_e_table.py 2020b --html part15.html  # or read a saved copy of that page

The table is written as the standard prints it, one row per attribute, every
column, with where it came from: the page's address, the edition the page
itself names (checked against the one asked for), the SHA-256 of the bytes
read (so a saved copy can be checked against NEMA's page) and the date of
extraction. rules/annex_e.py reads it at run time. Only the standard library
is used: this runs wherever the router does.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

SOURCE = "https://dicom.nema.org/medical/dicom/{edition}/output/html/part15.html"
TABLE_ID = "table_E.1-1"
TITLE = "PS3.15 Table E.1-1. Application Level Confidentiality Profile Attributes"
OUTPUT = Path(__file__).resolve().parent.parent / "rules" / "data" / "table_e_1_1.json"
_EDITION = re.compile(r"DICOM PS3\.15 (\d{4}[a-z])\b")


class _TableReader(HTMLParser):
    """The cells' text of the table that follows the anchor ``TABLE_ID``, row by row."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._armed = False
        self._in_table = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "a" and attributes.get("id") == TABLE_ID:
            self._armed = True
        elif tag == "table" and self._in_table:
            raise ValueError(f"{TABLE_ID}: a table inside the table")
        elif tag == "table" and self._armed:
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            if attributes.get("rowspan", "1") != "1" or attributes.get("colspan", "1") != "1":
                raise ValueError(f"{TABLE_ID}: a cell spans rows or columns, which this reader does not follow")
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if not self._in_table:
            return
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._in_table = self._armed = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def extract(page: bytes, edition: str) -> tuple[list[str], list[list[str]]]:
    """The table's column headings and rows.

    Raises:
        ValueError: the page is of another edition, or has no such table, or
            a row whose cells do not match the headings.
    """
    text = page.decode("utf-8")
    found = _EDITION.search(text)
    if found is None or found[1] != edition:
        raise ValueError(f"the page names edition {found[1] if found else 'none'}, not {edition}")
    reader = _TableReader()
    reader.feed(text)
    if not reader.rows:
        raise ValueError(f"no table after the anchor {TABLE_ID}")
    columns, *rows = reader.rows
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"{TABLE_ID}: row {row[:2]} has {len(row)} cells for {len(columns)} columns")
    return columns, rows


def render(edition: str, source: str, page: bytes, columns: list[str], rows: list[list[str]],
           copy: str | None) -> str:
    """The data file: where the table came from, then one row per line (readable diffs)."""
    head = {
        "table": TITLE,
        "edition": edition,
        "source": source,
        **({"copy": copy} if copy else {}),
        "source_sha256": hashlib.sha256(page).hexdigest(),
        "extracted": datetime.date.today().isoformat(),
        "by": "tools/annex_e_table.py",
        "columns": columns,
    }
    lines = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in rows)
    return json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ',\n "rows": [\n' + lines + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    """Fetch (or read) the page, extract the table, write ``OUTPUT``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("edition", help="the PS3.15 edition, e.g. 2026c")
    parser.add_argument("--html", type=Path, help="a saved copy of the edition's part15.html, instead of fetching it")
    parser.add_argument("--copy", help="where the saved copy came from, recorded beside the source")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    source = SOURCE.format(edition=args.edition)
    if args.html:
        page = args.html.read_bytes()
    else:
        with urllib.request.urlopen(source, timeout=120) as answer:
            page = answer.read()
    try:
        columns, rows = extract(page, args.edition)
    except ValueError as exc:
        print(f"{source}: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(args.edition, source, page, columns, rows, args.copy), encoding="utf-8")
    print(f"{args.output}: {len(rows)} rows of {TITLE}, edition {args.edition}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
