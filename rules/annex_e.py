"""PS3.15 Annex E Table E.1-1, read at run time: the Basic Profile from a package, the options from rules/data/.

- **Basic Profile actions** from ``dicom-anonymizer`` (Kitware): its module
  ``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c`` lists,
  per action (D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*), every attribute of
  Table E.1-1 of **PS3.15 2026c**, repeating groups (``50xx``/``60xx``) as
  ``(group, element, group_mask, element_mask)``.
- **Option columns** (Retain UIDs, Retain Device Identity, ... Clean Graphics)
  from ``rules/data/table_e_1_1.json``: the whole table as NEMA's web edition
  of **PS3.15 2020b** prints it, extracted by ``tools/annex_e_table.py``,
  which records the page's address, edition and SHA-256 in the file and
  regenerates it from any later edition. The row for private attributes
  ("(gggg,eeee) where gggg is odd": X, safe-private C) also comes from it;
  dicom-anonymizer handles private tags in code.

That edition lists 432 rows; the table has grown since (about 190 rows more
by 2024b). For an attribute it does not list, two option columns
follow from the standard's own wording and are derived: Retain UIDs (E.3.9)
keeps every attribute whose basic action is U, and the two Retain
Longitudinal Temporal Information options (E.3.6) keep (K) or modify (C)
every DA, DT and TM attribute. Checked against the 2024b table, that gives
its cells for all of those rows but two, where it removes instead of keeping
(Annotation Group UID, Certified Timestamp). The other options (device,
institution, patient characteristics, clean descriptors, structured content,
graphics) do not apply to such attributes: they get the Basic Profile
action. Both err on the side of removing, since an option only ever keeps
(K) or cleans (C) more than the basic action.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from pydicom.datadict import dictionary_VR

from rules.ops import AnonymizeOption

BASIC_DATABASE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
BASIC_EDITION = "DICOM PS3.15 2026c"
OPTIONS_FILE = "data/table_e_1_1.json"  # inside the rules package (pyproject package-data)
TAG_COLUMN, BASIC_COLUMN = "Tag", "Basic Prof."  # the table's own headings
# dicom-anonymizer's list name -> the action Table E.1-1 writes.
ACTION_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# Our option names -> the table's column headings, in the standard's column order.
OPTION_COLUMNS: dict[AnonymizeOption, str] = {
    "retain-safe-private": "Rtn. Safe Priv. Opt.",
    "retain-uids": "Rtn. UIDs Opt.",
    "retain-device-identity": "Rtn. Dev. Id. Opt.",
    "retain-institution-identity": "Rtn. Inst. Id. Opt.",
    "retain-patient-characteristics": "Rtn. Pat. Chars. Opt.",
    "retain-longitudinal-full-dates": "Rtn. Long. Full Dates Opt.",
    "retain-longitudinal-modified-dates": "Rtn. Long. Modif. Dates Opt.",
    "clean-descriptors": "Clean Desc. Opt.",
    "clean-structured-content": "Clean Struct. Cont. Opt.",
    "clean-graphics": "Clean Graph. Opt.",
}
_TAG = re.compile(r"^\(([0-9A-Fa-fXx]{4}),([0-9A-Fa-fXx]{4})\)$")

# A key for one row: an exact tag, a (mask, value) pair for a repeating group, or "private".
Key = int | tuple[int, int] | str


class ProfileDataMissing(RuntimeError):
    """The package or the data file does not hold the table data we expect (wrong version?)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One attribute of Table E.1-1: its Basic Profile action and each option's action."""

    tag: str
    basic: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileTable:
    """Table E.1-1, indexed for lookups by tag number."""

    edition: str
    options_edition: str
    exact: dict[int, Row]
    masks: tuple[tuple[int, int, Row], ...]
    private: Row

    def row(self, tag: int) -> Row | None:
        """The row that governs ``tag``, or None when the table does not list it."""
        found = self.exact.get(tag)
        if found is not None:
            return found
        if (tag >> 16) % 2:
            return self.private
        for mask, value, row in self.masks:
            if tag & mask == value:
                return row
        return None


def _basic_actions() -> dict[Key, str]:
    try:
        database = importlib.import_module(BASIC_DATABASE)
    except ImportError as exc:
        raise ProfileDataMissing(f"{BASIC_DATABASE} not installed (dicom-anonymizer>=2.1)") from exc
    actions: dict[Key, str] = {}
    for name, action in ACTION_LISTS.items():
        for entry in getattr(database, name):
            if len(entry) == 2:
                key: Key = (entry[0] << 16) | entry[1]
            else:  # (group, element, group_mask, element_mask)
                group, element, group_mask, element_mask = entry
                key = ((group_mask << 16) | element_mask, (group << 16) | element)
            if actions.setdefault(key, action) != action:
                raise ProfileDataMissing(f"{BASIC_DATABASE}: {entry} listed under two actions")
    return actions


def _key(tag: str) -> Key | None:
    m = _TAG.match(tag)
    if m is None:
        return "private" if "ODD" in tag.upper() else None
    digits = (m[1] + m[2]).lower()
    if "x" not in digits:
        return int(digits, 16)
    return int("".join("0" if c == "x" else "f" for c in digits), 16), int(digits.replace("x", "0"), 16)


def _option_rows() -> tuple[str, dict[Key, dict[str, str]]]:
    """The data file's edition, and each row's cells by column heading, keyed by tag."""
    try:
        table = json.loads(resources.files("rules").joinpath(OPTIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileDataMissing(f"rules/{OPTIONS_FILE}: {exc}") from exc
    missing = {TAG_COLUMN, BASIC_COLUMN, *OPTION_COLUMNS.values()} - set(table["columns"])
    if missing:
        raise ProfileDataMissing(f"rules/{OPTIONS_FILE} has no column {sorted(missing)}")
    rows = (dict(zip(table["columns"], cells)) for cells in table["rows"])
    return f"DICOM PS3.15 {table['edition']}", {key: row for row in rows if (key := _key(row[TAG_COLUMN])) is not None}


def _tag_text(key: Key) -> str:
    if isinstance(key, int):
        return f"({key >> 16:04X},{key & 0xFFFF:04X})"
    if isinstance(key, tuple):
        mask, value = key
        digits = f"{value:08X}"
        return "({},{})".format(*(
            "".join("x" if (mask >> (28 - 4 * i)) & 0xF == 0 else digits[i] for i in range(j, j + 4))
            for j in (0, 4)
        ))
    return "(gggg,eeee) where gggg is odd"


def _derived_options(key: Key, action: str) -> dict[str, str]:
    """Option cells for an attribute newer than the option extraction (see the module docstring)."""
    options: dict[str, str] = {}
    if action == "U":
        options["retain-uids"] = "K"
    try:
        vr = dictionary_VR(key) if isinstance(key, int) else None
    except KeyError:
        vr = None
    if vr in ("DA", "DT", "TM"):
        options["retain-longitudinal-full-dates"] = "K"
        options["retain-longitudinal-modified-dates"] = "C"
    return options


@lru_cache(maxsize=1)
def profile_table() -> ProfileTable:
    """Build the table from dicom-anonymizer and the data file, once per process.

    Raises:
        ProfileDataMissing: the package or the data file is not what this version expects.
    """
    basic = _basic_actions()
    options_edition, option_rows = _option_rows()
    if "private" not in option_rows:
        raise ProfileDataMissing(f"rules/{OPTIONS_FILE} has no row for private attributes")

    def row(key: Key, action: str) -> Row:
        rec = option_rows.get(key)
        if rec is None:
            return Row(_tag_text(key), action, _derived_options(key, action))
        return Row(_tag_text(key), action, {o: rec[c] for o, c in OPTION_COLUMNS.items() if rec[c]})

    exact = {key: row(key, action) for key, action in basic.items() if isinstance(key, int)}
    masks = tuple((*key, row(key, action)) for key, action in basic.items() if isinstance(key, tuple))
    private = row("private", option_rows["private"][BASIC_COLUMN])
    return ProfileTable(BASIC_EDITION, options_edition, exact, masks, private)
