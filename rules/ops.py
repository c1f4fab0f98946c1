"""Morph operations as data: what a rule does to the copy it sends a destination.

Each operation is a one-key mapping in YAML (``- set: {...}``), and the key
picks the model (a pydantic discriminated union), so a misspelt operation or
option is an error with its line, not a silently ignored change. Operations
without options may be written bare (``- uid_remap``). The behaviour lives in
:mod:`rules.morph`; these models only say what was asked for.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)
from pydantic_core import PydanticCustomError, core_schema
from pydicom.valuerep import VR as VRS

from rules.tags import TagError, TagPath

_TEMPLATE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
TEMPLATE_FILTERS = ("hash", "upper", "lower")


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Placeholder:
    """``{PatientID}`` or ``{PatientID|hash}`` inside a ``set`` value."""

    path: TagPath
    filter: str | None


def parse_template(text: str) -> tuple[str | Placeholder, ...]:
    """Split a template into literal text and placeholders; ``{{``/``}}`` escape braces.

    Raises:
        TagError: a placeholder names no attribute or an unknown filter.
    """
    parts: list[str | Placeholder] = []
    pos = 0
    for m in _TEMPLATE.finditer(text):
        parts.append(text[pos : m.start()])
        pos = m.end()
        if m[0] in ("{{", "}}"):
            parts.append(m[0][0])
            continue
        name, _, flt = m[1].partition("|")
        flt = flt.strip() or None
        if flt is not None and flt not in TEMPLATE_FILTERS:
            raise TagError(f"unknown template filter {flt!r}; filters are {', '.join(TEMPLATE_FILTERS)}")
        parts.append(Placeholder(TagPath.parse(name), flt))
    parts.append(text[pos:])
    return tuple(p for p in parts if p != "")


class SetValue(BaseModel):
    """The long form of a ``set`` value, for attributes the dictionary has no VR for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: str
    vr: str | None = None

    @field_validator("vr")
    @classmethod
    def _known_vr(cls, vr: str | None) -> str | None:
        if vr is not None and vr not in VRS.__members__:
            raise PydanticCustomError("dicom_vr", "unknown VR {vr}", {"vr": repr(vr)})
        return vr

    @field_validator("value")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            parse_template(value)
        except TagError as exc:
            raise PydanticCustomError("template", "in template {t}: {reason}", {"t": repr(value), "reason": str(exc)}) from None
        return value

    @property
    def parts(self) -> tuple[str | Placeholder, ...]:
        return parse_template(self.value)


def _set_value(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return {"value": str(value)}
    if value is None:
        return {"value": ""}
    return value


TagKey = TagPath


class SetOp(_Op):
    """Give attributes a value, templated from the instance as received: ``"{PatientID|hash}"``."""

    set: dict[TagKey, Annotated[SetValue, BeforeValidator(_set_value)]]

    @field_validator("set")
    @classmethod
    def _private_needs_vr(cls, value: dict[TagPath, SetValue]) -> dict[TagPath, SetValue]:
        for path, spec in value.items():
            if path.vr is None and spec.vr is None:
                raise PydanticCustomError(
                    "dicom_vr", "{path}: a private or unknown attribute needs its VR: {{value: ..., vr: LO}}",
                    {"path": path.text},
                )
        return value


_WORDS = {"private", "curves", "overlays"}
_MASK = re.compile(r"^\(?\s*([0-9A-Fa-fXx]{4})\s*,\s*([0-9A-Fa-fXx]{4})\s*\)?$")


@dataclass(frozen=True, slots=True)
class TagMask:
    """A tag pattern with ``x`` wildcards, as the standard writes repeating groups: ``(60xx,3000)``."""

    text: str
    mask: int
    value: int

    def matches(self, tag: int) -> bool:
        return tag & self.mask == self.value


def _parse_mask(text: str) -> TagMask | None:
    m = _MASK.match(text)
    if not m or "x" not in (m[1] + m[2]).lower():
        return None
    digits = (m[1] + m[2]).lower()
    mask = int("".join("0" if c == "x" else "f" for c in digits), 16)
    value = int(digits.replace("x", "0"), 16)
    return TagMask(text, mask, value)


DeleteTarget = Union[TagPath, TagMask, Literal["private", "curves", "overlays"]]


def _delete_target(value: Any) -> DeleteTarget:
    if isinstance(value, (TagPath, TagMask)):
        return value
    text = str(value).strip()
    if text in _WORDS:
        return text  # type: ignore[return-value]
    mask = _parse_mask(text)
    if mask is not None:
        return mask
    try:
        return TagPath.parse(text)
    except TagError as exc:
        raise PydanticCustomError(
            "dicom_tag", "{reason} (delete also takes private, curves, overlays and masks like (0029,xxxx))",
            {"reason": str(exc)},
        ) from None


class _DeleteTargetType:
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _delete_target,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda t: t if isinstance(t, str) else t.text
            ),
        )


class DeleteOp(_Op):
    """Remove attributes: paths, masks like ``(0029,xxxx)``, or ``private``/``curves``/``overlays``."""

    delete: list[Annotated[DeleteTarget, _DeleteTargetType]]

    @field_validator("delete", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def _flag_or_mapping(value: Any) -> Any:
    """``remove_private: true`` or a bare ``- uid_remap`` mean "with default options"."""
    if value is None or str(value).strip().lower() in ("true", "yes", "on"):
        return {}
    return value


class RemovePrivateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keep_creators: list[str] = Field(default_factory=list)
    """Private blocks to keep, by creator (e.g. a vendor's dose data a research site needs)."""


class RemovePrivateOp(_Op):
    """Remove every private attribute, except blocks of the creators listed to keep."""

    remove_private: Annotated[RemovePrivateSpec, BeforeValidator(_flag_or_mapping)]


class CopySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    from_: TagPath = Field(alias="from")
    to: TagPath


class CopyOp(_Op):
    """Copy a value to another attribute (nothing happens when the source is absent)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    copy_: CopySpec = Field(alias="copy")  # "copy" would shadow BaseModel.copy


class RegexSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: TagPath
    pattern: str
    replace: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PydanticCustomError("regex", "invalid regular expression {p}: {e}", {"p": repr(pattern), "e": str(exc)}) from None
        return pattern


class RegexOp(_Op):
    """Replace every match of ``pattern`` in each value (``\\1`` refers to groups)."""

    regex: RegexSpec


class PrefixOp(_Op):
    """Put text before each value of the attributes (absent attributes stay absent)."""

    prefix: dict[TagKey, str]


class SuffixOp(_Op):
    """Put text after each value of the attributes (absent attributes stay absent)."""

    suffix: dict[TagKey, str]


class UidRemapSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tags: list[TagPath] | None = None
    """Only these attributes; omitted: every UID in the instance, sequences included."""


class UidRemapOp(_Op):
    """Replace UIDs by ``2.25.`` UIDs derived with HMAC from the secret: same input, same output, everywhere."""

    uid_remap: Annotated[UidRemapSpec, BeforeValidator(_flag_or_mapping)]


class DateShiftSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_days: int = Field(365, ge=1, le=36500)
    """Dates move back by 1 to ``max_days`` days, the same amount for every instance of a patient."""


class DateShiftOp(_Op):
    """Shift every DA and DT by a per-patient number of days derived from the secret."""

    date_shift: Annotated[DateShiftSpec, BeforeValidator(_flag_or_mapping)]


AnonymizeOption = Literal[
    "retain-safe-private",
    "retain-uids",
    "retain-device-identity",
    "retain-institution-identity",
    "retain-patient-characteristics",
    "retain-longitudinal-full-dates",
    "retain-longitudinal-modified-dates",
    "clean-descriptors",
    "clean-structured-content",
    "clean-graphics",
]
OPTION_ALIASES = {"retain-longitudinal-dates": "retain-longitudinal-full-dates"}


class AnonymizeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    profile: Literal["basic"] = "basic"
    options: list[AnonymizeOption] = Field(default_factory=list)
    keep: list[TagPath] = Field(default_factory=list)
    """Attributes to leave as they are although the profile would change them (say why in a comment)."""
    max_days: int = Field(365, ge=1, le=36500)
    """For retain-longitudinal-modified-dates: the per-patient shift, as in ``date_shift``."""

    @field_validator("options", mode="before")
    @classmethod
    def _aliases(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [OPTION_ALIASES.get(v, v) if isinstance(v, str) else v for v in value]
        return value


class AnonymizeOp(_Op):
    """De-identify with the PS3.15 Annex E Basic Application Level Confidentiality Profile."""

    anonymize: Annotated[AnonymizeSpec, BeforeValidator(_flag_or_mapping)]


_OPS: dict[str, type[_Op]] = {
    "set": SetOp,
    "delete": DeleteOp,
    "remove_private": RemovePrivateOp,
    "copy": CopyOp,
    "regex": RegexOp,
    "prefix": PrefixOp,
    "suffix": SuffixOp,
    "uid_remap": UidRemapOp,
    "date_shift": DateShiftOp,
    "anonymize": AnonymizeOp,
}
OP_NAMES = tuple(_OPS)


def _op_shape(value: Any) -> Any:
    """Accept a bare ``- uid_remap`` and explain a malformed item in the author's terms."""
    if isinstance(value, _Op):
        return value
    if isinstance(value, str):
        value = {value: None}
    if not isinstance(value, Mapping) or len(value) != 1:
        keys = ", ".join(map(str, value)) if isinstance(value, Mapping) else repr(value)
        raise PydanticCustomError(
            "morph_shape", "each morph item is one operation, like '- set: {{...}}'; got {keys}", {"keys": keys}
        )
    (name,) = value
    if name not in _OPS:
        hint = difflib.get_close_matches(str(name), OP_NAMES, n=1, cutoff=0.6)
        raise PydanticCustomError(
            "morph_unknown",
            "unknown morph operation {name}{hint}; operations are {names}",
            {"name": repr(name), "hint": f" (did you mean {hint[0]!r}?)" if hint else "", "names": ", ".join(OP_NAMES)},
        )
    return value


def _op_tag(value: Any) -> str | None:
    if isinstance(value, _Op):
        name, field = next(iter(type(value).model_fields.items()))
        return field.alias or name
    if isinstance(value, Mapping) and len(value) == 1:
        return str(next(iter(value)))
    return None


MorphOp = Annotated[
    Union[
        Annotated[SetOp, Tag("set")],
        Annotated[DeleteOp, Tag("delete")],
        Annotated[RemovePrivateOp, Tag("remove_private")],
        Annotated[CopyOp, Tag("copy")],
        Annotated[RegexOp, Tag("regex")],
        Annotated[PrefixOp, Tag("prefix")],
        Annotated[SuffixOp, Tag("suffix")],
        Annotated[UidRemapOp, Tag("uid_remap")],
        Annotated[DateShiftOp, Tag("date_shift")],
        Annotated[AnonymizeOp, Tag("anonymize")],
    ],
    Discriminator(_op_tag),
    BeforeValidator(_op_shape),
]
