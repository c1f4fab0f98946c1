"""PS3.15 Table E.1-1 kept as data (rules/data/table_e_1_1.json) and the tool that extracts it.

The extraction is pure logic over an HTML page: a small page in NEMA's
layout (DocBook's anchor before the table) stands in for the standard here.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from rules.annex_e import BASIC_COLUMN, OPTION_COLUMNS, OPTIONS_FILE, profile_table
from tools.annex_e_table import SOURCE, extract, render

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html><body>
<h2 class="subtitle">DICOM PS3.15 2031a - Security and System Management Profiles</h2>
<table><tr><td>a table before the anchor</td></tr></table>
<div class="table"><a id="table_E.1-1" shape="rect"></a>
<table frame="box" rules="all"><thead><tr valign="top">
<th rowspan="1" colspan="1"><p><strong>Attribute Name</strong></p></th>
<th rowspan="1" colspan="1"><p><strong>Tag</strong></p></th>
<th rowspan="1" colspan="1"><p><strong>Basic Prof.</strong></p></th>
</tr></thead><tbody>
<tr><td><p>Patient&#8217;s
   Name</p></td><td><p>(0010,0010)</p></td><td><p>Z</p></td></tr>
<tr><td><p>Curve Data</p></td><td><p>(50xx,xxxx)</p></td><td><p>X</p></td></tr>
</tbody></table></div>
<table><tr><td>a table after it</td></tr></table>
</body></html>"""


def test_option_table_records_its_source_and_edition():
    """The data file names the page it came from, its edition and SHA-256, and holds every column the code reads."""
    table = json.loads(resources.files("rules").joinpath(OPTIONS_FILE).read_text(encoding="utf-8"))
    assert table["edition"] == "2020b" and table["source"] == SOURCE.format(edition="2020b")
    assert len(table["source_sha256"]) == 64 and table["by"] == "tools/annex_e_table.py"
    assert {BASIC_COLUMN, *OPTION_COLUMNS.values()} <= set(table["columns"])
    assert len(table["rows"]) == 432 and all(len(row) == len(table["columns"]) for row in table["rows"])
    assert profile_table().options_edition == "DICOM PS3.15 2020b"


def test_extraction_reads_the_table_after_its_anchor_cell_by_cell():
    """Only the table after the anchor is read; each cell's text with its whitespace folded."""
    columns, rows = extract(PAGE.encode(), "2031a")
    assert columns == ["Attribute Name", "Tag", "Basic Prof."]
    assert rows == [["Patient\u2019s Name", "(0010,0010)", "Z"], ["Curve Data", "(50xx,xxxx)", "X"]]


def test_extraction_refuses_another_edition_and_a_layout_it_does_not_follow():
    """A page of another edition, or a cell spanning two columns, is an error, not a wrong table."""
    with pytest.raises(ValueError, match="names edition 2031a, not 2026c"):
        extract(PAGE.encode(), "2026c")
    with pytest.raises(ValueError, match="spans rows or columns"):
        extract(PAGE.replace('<th rowspan="1" colspan="1"><p><strong>Tag', '<th colspan="2"><p><strong>Tag')
                .encode(), "2031a")


def test_rendered_file_is_json_with_one_row_per_line():
    """What the tool writes parses back to the table and its provenance; a saved copy's origin is kept."""
    columns, rows = extract(PAGE.encode(), "2031a")
    text = render("2031a", SOURCE.format(edition="2031a"), PAGE.encode(), columns, rows, "a saved copy")
    table = json.loads(text)
    assert table["rows"] == rows and table["columns"] == columns and table["copy"] == "a saved copy"
    assert text.count("\n  [") == len(rows)
