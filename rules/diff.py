"""Tag-by-tag differences between an instance and a morphed copy, for dry runs.

``dicom-router test`` shows a rule author exactly what each destination
would receive; this module computes that list, walking into sequences so a
remapped ``ReferencedSOPInstanceUID`` three levels down is shown too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList

MAX_SHOWN = 80  # characters of a value shown; long text and binary values are summarised


@dataclass(frozen=True)
class Change:
    """One attribute that differs; ``before``/``after`` are None when it is absent."""

    path: str
    tag: str
    keyword: str
    before: str | None
    after: str | None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def show(elem: DataElement) -> str:
    """A short, printable rendering of a value."""
    value = elem.value
    if elem.VR == "SQ":
        return f"<{len(value or [])} item(s)>"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if value is None or value == "":
        return "''"
    if isinstance(value, ConstrainedList):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = repr(text)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def diff(before: Dataset, after: Dataset, prefix: str = "") -> Iterator[Change]:
    """Every difference between two datasets, in tag order, sequences item by item."""
    tags = sorted(set(before.keys()) | set(after.keys()))
    for tag in tags:
        old = before[tag] if tag in before else None
        new = after[tag] if tag in after else None
        ref = old if old is not None else new
        assert ref is not None
        name = ref.keyword or _tag(tag)
        path = f"{prefix}{name}"
        if old is None or new is None:
            yield Change(path, _tag(tag), ref.keyword, show(old) if old else None, show(new) if new else None)
            continue
        if old.VR == "SQ" and new.VR == "SQ":
            old_items, new_items = list(old.value or []), list(new.value or [])
            if len(old_items) != len(new_items):
                yield Change(path, _tag(tag), ref.keyword, show(old), show(new))
            for i, (a, b) in enumerate(zip(old_items, new_items)):
                yield from diff(a, b, f"{path}[{i}].")
            continue
        if old.VR != new.VR or (old.value != new.value and (old.value or new.value)):
            yield Change(path, _tag(tag), ref.keyword, show(old), show(new))
