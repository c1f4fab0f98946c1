"""docs/guarantees.md names real tests: every ``file::test`` it cites is a test function in that file.

The faults' table says, row by row, which test makes each fault happen; a
renamed or deleted test would leave a promise that nothing shows. Static
reading of the test files: nothing runs, no peer is involved.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUARANTEES = ROOT / "docs" / "guarantees.md"
FAULTS_HEADING = "## The faults, and the test that shows each"
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FILE = re.compile(r"`(tests/[\w/]+\.py)`")
LINK = re.compile(r"\]\(#(g\d)\)")
NO_TEST = "no test yet"
PENDING = {("tests/test_hosts_e2e.py", "test_a_host_killed_whole_loses_nothing")}
"""Cited before its file is committed: allowed while the file does not exist, checked as any other once it does."""


def _faults_rows(text: str) -> list[list[str]]:
    """The faults' table, header first, each row split into its cells."""
    section = text.split(FAULTS_HEADING, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-")]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def _missing(citations: list[tuple[str, str]], pending: set[tuple[str, str]] = PENDING) -> list[str]:
    """The citations whose file or test function does not exist (a pending one only while its file is absent)."""
    missing = []
    for file, name in citations:
        path = ROOT / file
        if not path.exists():
            if (file, name) not in pending:
                missing.append(f"{file} (no such file)")
            continue
        if name not in _test_functions(path):
            missing.append(f"{file}::{name}")
    return missing


def test_every_test_the_faults_table_cites_exists():
    """Each row of the faults' table names at least one test, or says it has none, and every one it names exists."""
    header, *rows = _faults_rows(GUARANTEES.read_text())
    assert header == ["fault", "what is promised", "the test that shows it"]
    assert len(rows) >= 19
    citations = []
    for fault, _, tests in rows:
        cited = CITED.findall(tests)
        assert cited or NO_TEST in tests, f"{fault!r} names no test and does not say it has none"
        citations += cited
    assert _missing(citations) == []


def test_every_fault_links_a_guarantee_that_has_an_anchor():
    """The promise of each fault links its G-number, and that link lands on the guarantee."""
    text = GUARANTEES.read_text()
    _, *rows = _faults_rows(text)
    for fault, promised, _ in rows:
        links = LINK.findall(promised)
        assert links, f"{fault!r} links no guarantee"
        for anchor in links:
            assert f'<a id="{anchor}"></a>' in text, f"{fault!r} links #{anchor}, which is nowhere"


def test_every_test_file_and_test_the_document_names_elsewhere_exists():
    """Outside the faults' table too: every ``file::test`` and every test file docs/guarantees.md names exists."""
    text = GUARANTEES.read_text()
    assert _missing(CITED.findall(text)) == []
    assert [file for file in FILE.findall(text) if not (ROOT / file).exists()] == []


def test_the_check_finds_a_test_that_does_not_exist():
    """The check itself: a misspelt name and an unknown file are missing; a pending test
    passes while its file is absent, and is looked for once the file exists."""
    misspelt = ("tests/test_pipeline_e2e.py", "test_no_such_test")
    assert _missing([misspelt]) == ["tests/test_pipeline_e2e.py::test_no_such_test"]
    assert _missing([("tests/test_no_such_file.py", "test_x")]) == ["tests/test_no_such_file.py (no such file)"]
    assert _missing([("tests/test_docs_faults.py", "test_every_test_the_faults_table_cites_exists")]) == []
    pending = {("tests/test_not_yet.py", "test_x"), ("tests/test_docs_faults.py", "test_not_yet")}
    assert _missing([("tests/test_not_yet.py", "test_x")], pending) == []
    assert _missing([("tests/test_docs_faults.py", "test_not_yet")], pending) == [
        "tests/test_docs_faults.py::test_not_yet"]
