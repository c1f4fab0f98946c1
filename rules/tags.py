"""Tag references as rule authors write them, parsed once at load time.

A rule names an attribute the way a PACS administrator reads a DICOM dump:

- by keyword: ``StudyDescription``;
- by number: ``(0008,1030)``, ``0008,1030`` or ``00081030``;
- inside sequences: ``ReferencedStudySequence[0].ReferencedSOPInstanceUID``,
  with ``[*]`` (or no index) meaning *any item*;
- a private attribute by its creator: ``(0019,"GEMS_ACQU_01",0C)`` — the
  element's low byte within the block that creator reserved (PS3.5 7.8.1),
  because the block number (``xx`` in ``(0019,xx0C)``) differs between files.

Parsing happens when the configuration is validated, so a typo is reported
with its line before an image is ever routed, and matching only walks
pre-parsed integers.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Literal

from pydantic import GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList

ANY_ITEM: Literal["*"] = "*"

_NUMBER = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_PRIVATE = re.compile(r'^\(\s*([0-9A-Fa-f]{4})\s*,\s*"([^"]+)"\s*,\s*([0-9A-Fa-f]{2})\s*\)$')
_STEP = re.compile(r"^(?P<ref>.+?)(?:\[(?P<index>\d+|\*)\])?$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


class TagError(ValueError):
    """A tag reference that cannot name a DICOM attribute; the message says why."""


@lru_cache(maxsize=1)
def _keywords_by_lower() -> dict[str, str]:
    return {k.lower(): k for k in keyword_dict}


def suggest_keyword(word: str) -> str | None:
    """The dictionary keyword closest to ``word``, for a "did you mean" hint."""
    exact = _keywords_by_lower().get(word.lower())
    if exact:
        return exact
    close = difflib.get_close_matches(word, keyword_dict.keys(), n=1, cutoff=0.75)
    return close[0] if close else None


def keyword_error(word: str, what: str = "DICOM keyword") -> str:
    """The message for an unknown keyword, with the near match when there is one."""
    hint = suggest_keyword(word)
    return f"unknown {what} {word!r}" + (f" (did you mean {hint!r}?)" if hint else "")


@dataclass(frozen=True, slots=True)
class TagRef:
    """One attribute: a public tag, or a private element by (group, creator, low byte)."""

    group: int
    element: int
    creator: str | None = None

    @property
    def tag(self) -> int | None:
        """The tag number when it does not depend on the dataset (public tags)."""
        return None if self.creator else (self.group << 16) | self.element

    def resolve(self, ds: Dataset) -> int | None:
        """The tag number in ``ds``; None when a private creator has no block there."""
        if self.creator is None:
            return (self.group << 16) | self.element
        try:
            return ds.private_block(self.group, self.creator).get_tag(self.element)
        except KeyError:
            return None

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) if self.tag is not None else ""

    @property
    def vr(self) -> str | None:
        """The dictionary VR, or None for private attributes and unknown tags."""
        if self.tag is None or self.group % 2:
            return None
        try:
            return dictionary_VR(self.tag)
        except KeyError:
            return None

    def __str__(self) -> str:
        if self.creator is not None:
            return f'({self.group:04X},"{self.creator}",{self.element:02X})'
        return self.keyword or f"({self.group:04X},{self.element:04X})"


def parse_ref(text: str) -> TagRef:
    """Parse one attribute reference (no sequence path).

    Raises:
        TagError: unknown keyword (with a suggestion) or malformed number.
    """
    text = text.strip()
    if m := _PRIVATE.match(text):
        group = int(m[1], 16)
        if group % 2 == 0:
            raise TagError(f"{text!r}: a private creator needs an odd group, {m[1]} is even")
        return TagRef(group, int(m[3], 16), m[2])
    if m := _NUMBER.match(text):
        return TagRef(int(m[1], 16), int(m[2], 16))
    if _KEYWORD.match(text):
        tag = keyword_dict.get(text)
        if tag is None:
            raise TagError(keyword_error(text))
        return TagRef(tag >> 16, tag & 0xFFFF)
    raise TagError(
        f"{text!r} is not a tag: write a keyword (StudyDescription), a number ((0008,1030)) "
        'or a private tag by creator ((0019,"GEMS_ACQU_01",0C))'
    )


@dataclass(frozen=True, slots=True)
class PathStep:
    """One step of a path; ``index`` selects sequence items (None: the element itself)."""

    ref: TagRef
    index: int | Literal["*"] | None = None


@dataclass(frozen=True, slots=True)
class TagPath:
    """A parsed attribute path, e.g. ``ReferencedStudySequence[*].ReferencedSOPInstanceUID``."""

    text: str
    steps: tuple[PathStep, ...]

    @classmethod
    def parse(cls, text: str) -> TagPath:
        """Parse a path; raises :class:`TagError` naming the faulty step."""
        if not isinstance(text, str) or not text.strip():
            raise TagError("an empty tag name")
        steps = []
        parts = _split_path(text.strip())
        for i, part in enumerate(parts):
            m = _STEP.match(part)
            if not m:
                raise TagError(f"{part!r} is not a path step")
            ref = parse_ref(m["ref"])
            index: int | Literal["*"] | None = None
            if m["index"] is not None:
                index = ANY_ITEM if m["index"] == ANY_ITEM else int(m["index"])
            last = i == len(parts) - 1
            if not last:
                if ref.vr not in (None, "SQ"):
                    raise TagError(f"{str(ref)!r} is not a sequence, so {part}.… cannot follow it")
                # Crossing a sequence without an index means "any item".
                index = ANY_ITEM if index is None else index
            elif index is not None and ref.vr not in (None, "SQ"):
                raise TagError(f"{str(ref)!r} is not a sequence; [..] only follows sequences")
            steps.append(PathStep(ref, index))
        return cls(text.strip(), tuple(steps))

    @property
    def leaf(self) -> TagRef:
        return self.steps[-1].ref

    @property
    def vr(self) -> str | None:
        return self.leaf.vr

    def containers(self, ds: Dataset) -> Iterator[Dataset]:
        """Every dataset (the top one or sequence items) that would hold the leaf."""
        current: list[Dataset] = [ds]
        for step in self.steps[:-1]:
            following: list[Dataset] = []
            for item in current:
                tag = step.ref.resolve(item)
                if tag is None or tag not in item:
                    continue
                seq = item[tag].value
                if not isinstance(seq, ConstrainedList):
                    continue
                if step.index == ANY_ITEM or step.index is None:
                    following.extend(seq)
                elif 0 <= step.index < len(seq):
                    following.append(seq[step.index])
            current = following
        yield from current

    def elements(self, ds: Dataset) -> Iterator[DataElement]:
        """Every element the path names in ``ds`` (several through ``[*]``)."""
        leaf = self.steps[-1]
        for container in self.containers(ds):
            tag = leaf.ref.resolve(container)
            if tag is not None and tag in container:
                elem = container[tag]
                if leaf.index is None or not isinstance(elem.value, ConstrainedList):
                    yield elem
                else:
                    yield from _item_elements(elem, leaf.index)

    def first(self, ds: Dataset) -> DataElement | None:
        return next(self.elements(ds), None)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_path, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )


def _item_elements(elem: DataElement, index: int | Literal["*"]) -> Iterator[DataElement]:
    # "Seq[0]" as a leaf names the item; matching it asks whether the item exists.
    items = elem.value if index == ANY_ITEM else elem.value[index : index + 1]
    if items:
        yield elem


def _split_path(text: str) -> list[str]:
    """Split on dots outside quotes and parentheses (creators may contain dots)."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        elif c == "." and not quoted and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> TagPath:
    return TagPath.parse(text)


def _validate_path(value: Any) -> TagPath:
    if isinstance(value, TagPath):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("dicom_tag", "expected a tag name, got {value!r}", {"value": value})
    try:
        return _parse_cached(value)
    except TagError as exc:
        raise PydanticCustomError("dicom_tag", "{reason}", {"reason": str(exc)}) from None


def element_values(elem: DataElement) -> tuple[str | int | float, ...]:
    """The values of an element for matching: one per value of a multi-valued element.

    Numbers stay numbers (IS, DS, US, FL…) so that ranges compare numerically;
    everything else (PN, DA, UI…) is its DICOM string form. Empty and
    sequence elements have no values.
    """
    value = elem.value
    if value is None or value == "" or elem.VR == "SQ" or isinstance(value, (bytes, bytearray)):
        return ()
    items = value if isinstance(value, (ConstrainedList, list, tuple)) else (value,)
    out: list[str | int | float] = []
    for item in items:
        if item is None or item == "":
            continue
        if isinstance(item, (int, float)):
            out.append(item)
        else:
            out.append(str(item).strip())
    return tuple(out)
