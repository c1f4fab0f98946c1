"""Conditions: when a rule applies, as data.

Rule authors write a mapping that reads like the problem::

    when:
      Modality: CT                          # equality
      StudyDescription: {regex: "(?i)chest"}
      any:
        - PatientID: {glob: "RES*"}
        - "(0008,1030)": {contains: research}

:func:`from_yaml` turns that mapping into a tree of small frozen models, one
per operator, told apart by their ``op`` field (a pydantic discriminated
union), so each operator validates its own operands and matching is a method
call per node. All problems in one ``when`` are collected, each with the path
of the YAML node it concerns, so the loader can name the exact line.
"""

from __future__ import annotations

import datetime as dt
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator
from pydantic_core import PydanticCustomError
from pydicom.dataset import Dataset

from rules.facts import AssociationFacts, Fact, peer_address
from rules.tags import TagError, TagPath, element_values

Value = Union[str, int, float]
Path = tuple[Union[str, int], ...]

NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
RANGE_KINDS = {"DA": "date", "TM": "time", "DT": "datetime"}


def parse_subject(text: str) -> TagPath | Fact:
    """A condition's subject: an association fact or an attribute path."""
    for fact in Fact:
        if text == fact.value:
            return fact
    return TagPath.parse(text)


def _validate_subject(value: Any) -> TagPath | Fact:
    if isinstance(value, (TagPath, Fact)):
        return value
    try:
        return parse_subject(str(value))
    except TagError as exc:
        raise PydanticCustomError("dicom_tag", "{reason}", {"reason": str(exc)}) from None


Subject = Annotated[
    Union[TagPath, Fact],
    PlainValidator(_validate_subject),
    PlainSerializer(lambda s: s.value if isinstance(s, Fact) else s.text),
]


class Lookup:
    """One instance seen by the rules: values of each subject, looked up once per decision.

    A site's rules test the same few attributes (Modality, AE titles,
    descriptions) over and over; caching their values per instance is what
    keeps a hundred rules under a millisecond.
    """

    __slots__ = ("_ds", "facts", "_cache")

    def __init__(self, ds: Dataset | Callable[[], Dataset], facts: AssociationFacts):
        self._ds = ds
        self.facts = facts
        self._cache: dict[Any, tuple[Value, ...]] = {}

    @property
    def ds(self) -> Dataset:
        """The instance; given as a function (the ingest's header, built from the bytes
        it walked), it is called the first time a rule looks at the dataset, and only then."""
        if not isinstance(self._ds, Dataset):
            self._ds = self._ds()
        return self._ds

    def values(self, subject: TagPath | Fact) -> tuple[Value, ...]:
        """Every value the subject has: one per value of each element it names."""
        key = subject if isinstance(subject, Fact) else subject.text
        found = self._cache.get(key)
        if found is None:
            if isinstance(subject, Fact):
                value = self.facts.get(subject)
                found = (value,) if value else ()
            else:
                found = tuple(v for elem in subject.elements(self.ds) for v in element_values(elem))
            self._cache[key] = found
        return found

    def derived(self, subject: TagPath | Fact, how: str, convert: Callable[[Value], Any]) -> tuple[Any, ...]:
        """The subject's values converted once per instance (parsed addresses, range keys)."""
        key = (subject if isinstance(subject, Fact) else subject.text, how)
        found = self._cache.get(key)
        if found is None:
            found = tuple(convert(v) for v in self.values(subject))
            self._cache[key] = found
        return found


Predicate = Callable[[Lookup], bool]


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _equal(value: Value, operand: str, number: float | None) -> bool:
    # IS/DS/US… arrive as numbers: "3" and "3.0" both equal a SeriesNumber of 3.
    if isinstance(value, (int, float)):
        return number is not None and float(value) == number
    return value == operand


class _Condition(BaseModel):
    """A node of the condition tree; :meth:`compile` turns it into a plain function once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def compile(self) -> Predicate:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, ds: Dataset, facts: AssociationFacts) -> bool:
        """Whether the instance and its association satisfy this condition."""
        return self.compile()(Lookup(ds, facts))


class Equals(_Condition):
    """Any value equals the operand (an empty operand: no value at all)."""

    op: Literal["equals"] = "equals"
    subject: Subject
    value: str

    def compile(self) -> Predicate:
        subject, operand, number = self.subject, self.value, _as_number(self.value)
        if operand == "":
            return lambda look: not look.values(subject)
        return lambda look: any(_equal(v, operand, number) for v in look.values(subject))


class OneOf(_Condition):
    """Any value equals one of the operands."""

    op: Literal["in"] = "in"
    subject: Subject
    values: tuple[str, ...]

    def compile(self) -> Predicate:
        subject = self.subject
        texts = frozenset(self.values)
        numbers = frozenset(n for n in map(_as_number, self.values) if n is not None)

        def test(look: Lookup) -> bool:
            for v in look.values(subject):
                if v in texts if not isinstance(v, (int, float)) else float(v) in numbers:
                    return True
            return False

        return test


class Regex(_Condition):
    """Any value contains a match of the (Python) regular expression."""

    op: Literal["regex"] = "regex"
    subject: Subject
    pattern: str

    def compile(self) -> Predicate:
        subject, search = self.subject, re.compile(self.pattern).search
        return lambda look: any(search(str(v)) for v in look.values(subject))


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4): ``*`` any run, ``?`` one character."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL)


class Glob(_Condition):
    """Any whole value matches the DICOM wildcard pattern (case-sensitive)."""

    op: Literal["glob"] = "glob"
    subject: Subject
    pattern: str

    def compile(self) -> Predicate:
        subject, full = self.subject, glob_to_regex(self.pattern).fullmatch
        return lambda look: any(full(str(v)) for v in look.values(subject))


class Contains(_Condition):
    """Any value contains the text, ignoring case (descriptions are typed by people)."""

    op: Literal["contains"] = "contains"
    subject: Subject
    text: str

    def compile(self) -> Predicate:
        subject, needle = self.subject, self.text.casefold()
        return lambda look: any(needle in str(v).casefold() for v in look.values(subject))


def _exists(subject: TagPath | Fact) -> Predicate:
    if isinstance(subject, TagPath) and (subject.vr == "SQ" or subject.steps[-1].index is not None):
        # A sequence "has a value" when it has items.
        return lambda look: any(elem.value for elem in subject.elements(look.ds))
    return lambda look: bool(look.values(subject))


class Exists(_Condition):
    """The attribute is present with a value (a Type 2 element sent empty means "unknown")."""

    op: Literal["exists"] = "exists"
    subject: Subject

    def compile(self) -> Predicate:
        return _exists(self.subject)


class Absent(_Condition):
    """The attribute is missing or empty: the exact opposite of ``exists``."""

    op: Literal["absent"] = "absent"
    subject: Subject

    def compile(self) -> Predicate:
        exists = _exists(self.subject)
        return lambda look: not exists(look)


def range_key(kind: str, value: Any) -> Any:
    """The comparable form of a number, DA, TM or DT value; None when it is not one.

    Dates and times become fixed-width digit strings, so partial values
    ("2024", "08") compare as the start of the period they name.
    """
    if kind == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _as_number(str(value).strip())
    if isinstance(value, dt.datetime):
        value = value.strftime("%Y%m%d%H%M%S.%f")
    elif isinstance(value, dt.date):
        value = value.strftime("%Y%m%d")
    elif isinstance(value, dt.time):
        value = value.strftime("%H%M%S.%f")
    text = str(value).strip()
    if kind == "date":
        digits = text.replace("-", "").replace(".", "")  # ISO and the retired ACR-NEMA form
        if len(digits) != 8 or not digits.isdigit():
            return None
        try:
            dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            return None
        return digits
    if kind == "time":
        return _time_key(text.replace(":", ""))
    # DT: drop an ISO "T"/space and a UTC offset, then pad the missing parts.
    text = re.sub(r"[+-]\d{4}$", "", text.replace("-", "", 2).replace(":", "").replace("T", "").replace(" ", ""))
    m = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2,}(?:\.\d+)?)?", text)
    if not m:
        return None
    time = _time_key(m[4]) if m[4] else "000000.000000"
    return f"{m[1]}{m[2] or '01'}{m[3] or '01'}{time}" if time else None


def _time_key(text: str) -> str | None:
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if not m or int(m[1]) > 23 or int(m[2] or 0) > 59 or int(m[3] or 0) > 60:
        return None
    return f"{m[1]}{m[2] or '00'}{m[3] or '00'}.{(m[4] or '').ljust(6, '0')}"


class Range(_Condition):
    """Any value lies within the bounds (``gt``/``ge``/``lt``/``le``; ``between`` is ge+le)."""

    op: Literal["range"] = "range"
    subject: Subject
    kind: Literal["number", "date", "time", "datetime"]
    gt: str | None = None
    ge: str | None = None
    lt: str | None = None
    le: str | None = None

    def compile(self) -> Predicate:
        subject, kind = self.subject, self.kind
        gt, ge, lt, le = (None if b is None else range_key(kind, b) for b in (self.gt, self.ge, self.lt, self.le))

        def within(key: Any) -> bool:
            return key is not None and (
                (gt is None or key > gt) and (ge is None or key >= ge) and (lt is None or key < lt) and (le is None or key <= le)
            )

        def convert(value: Value) -> Any:
            return range_key(kind, value)

        return lambda look: any(within(k) for k in look.derived(subject, kind, convert))


class InNetwork(_Condition):
    """The source address lies in one of the networks (a bare address is a /32 or /128)."""

    op: Literal["network"] = "network"
    subject: Subject
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def compile(self) -> Predicate:
        subject, networks = self.subject, self.networks

        def test(look: Lookup) -> bool:
            return any(
                ip is not None and any(ip in net for net in networks) for ip in look.derived(subject, "ip", peer_address)
            )

        return test


class AllOf(_Condition):
    """Every condition holds (an empty list always holds: a catch-all rule)."""

    op: Literal["all"] = "all"
    of: tuple[Condition, ...]

    def compile(self) -> Predicate:
        parts = tuple(c.compile() for c in self.of)
        return lambda look: all(p(look) for p in parts)


class AnyOf(_Condition):
    """At least one condition holds."""

    op: Literal["any"] = "any"
    of: tuple[Condition, ...]

    def compile(self) -> Predicate:
        parts = tuple(c.compile() for c in self.of)
        return lambda look: any(p(look) for p in parts)


class Not(_Condition):
    """The condition does not hold."""

    op: Literal["not"] = "not"
    of: Condition

    def compile(self) -> Predicate:
        inner = self.of.compile()
        return lambda look: not inner(look)


Condition = Annotated[
    Union[Equals, OneOf, Regex, Glob, Contains, Exists, Absent, Range, InNetwork, AllOf, AnyOf, Not],
    Field(discriminator="op"),
]

for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()

ALWAYS = AllOf(of=())

OPERATORS = ("equals", "in", "regex", "glob", "contains", "exists", "absent", "gt", "ge", "lt", "le", "between", "not")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class WhenError(ValueError):
    """Problems in one ``when`` mapping, each with the path of its YAML node."""

    def __init__(self, problems: list[tuple[Path, str]]):
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


def from_yaml(raw: Any) -> _Condition:
    """Build the condition tree of a ``when`` mapping.

    Raises:
        WhenError: every problem found, not just the first.
    """
    problems: list[tuple[Path, str]] = []
    cond = _mapping(raw, (), problems)
    if problems:
        raise WhenError(problems)
    assert cond is not None
    return cond


def _mapping(raw: Any, path: Path, problems: list[tuple[Path, str]]) -> _Condition | None:
    if raw is None:
        return ALWAYS
    if not isinstance(raw, Mapping):
        problems.append((path, "expected a mapping of conditions, like 'Modality: CT'"))
        return None
    parts: list[_Condition] = []
    for key, value in raw.items():
        here = path + (key,)
        cond: _Condition | None
        if key in ("any", "all"):
            items = value if isinstance(value, list) else [value]
            subs = [_mapping(item, here + (i,), problems) for i, item in enumerate(items)]
            if not items:
                problems.append((here, f"'{key}' needs at least one condition"))
            good = tuple(s for s in subs if s is not None)
            cond = AnyOf(of=good) if key == "any" else AllOf(of=good)
        elif key == "not":
            sub = _mapping(value, here, problems)
            cond = Not(of=sub) if sub is not None else None
        else:
            cond = _attribute(str(key), value, here, problems)
        if cond is not None:
            parts.append(cond)
    return parts[0] if len(parts) == 1 else AllOf(of=tuple(parts))


def _attribute(key: str, value: Any, path: Path, problems: list[tuple[Path, str]]) -> _Condition | None:
    try:
        subject = parse_subject(key)
    except TagError as exc:
        problems.append((path + ("[key]",), str(exc)))
        return None
    if value is None:
        problems.append((path, f"{key}: has no value; write '{key}: VALUE' or an operator such as {{exists: true}}"))
        return None
    if isinstance(value, list):
        return _operator(subject, "in", value, path, problems)
    if isinstance(value, Mapping):
        if not value:
            problems.append((path, f"{key}: empty operator mapping"))
            return None
        ops = [_operator(subject, str(op), operand, path + (op,), problems) for op, operand in value.items()]
        good = [c for c in ops if c is not None]
        if len(good) != len(ops):
            return None
        return good[0] if len(good) == 1 else AllOf(of=tuple(good))
    return _operator(subject, "equals", value, path, problems)


def _operator(
    subject: TagPath | Fact, op: str, operand: Any, path: Path, problems: list[tuple[Path, str]]
) -> _Condition | None:
    name = subject.value if isinstance(subject, Fact) else subject.text
    vr = None if isinstance(subject, Fact) else subject.vr

    def fail(message: str) -> None:
        problems.append((path, f"{name}: {message}"))

    if op not in OPERATORS:
        hint = difflib.get_close_matches(op, OPERATORS, n=1, cutoff=0.6)
        fail(f"unknown operator {op!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
             + f"; operators are {', '.join(OPERATORS)}")
        return None
    if op == "not":
        if not isinstance(operand, Mapping):
            sub = _operator(subject, "in" if isinstance(operand, list) else "equals", operand, path, problems)
        else:
            sub = _attribute(name, operand, path, problems)
        return Not(of=sub) if sub is not None else None
    if op in ("exists", "absent"):
        flag = str(operand).strip().lower()
        if flag not in _TRUE | _FALSE:
            fail(f"'{op}' takes true or false, got {operand!r}")
            return None
        present = (flag in _TRUE) == (op == "exists")
        return Exists(subject=subject) if present else Absent(subject=subject)
    if op in ("equals", "in"):
        operands = operand if isinstance(operand, list) else [operand]
        if op == "in" and not isinstance(operand, list):
            fail(f"'in' takes a list, like [CT, MR]; got {operand!r}")
            return None
        if any(isinstance(o, (Mapping, list)) or o is None for o in operands):
            fail(f"'{op}' compares with plain values, got {operand!r}")
            return None
        if subject is Fact.SOURCE_IP:
            return _network(subject, operands, fail)
        texts = [_normalize_value(vr, o) for o in operands]
        return Equals(subject=subject, value=texts[0]) if op == "equals" else OneOf(subject=subject, values=tuple(texts))
    if isinstance(operand, (Mapping, list)) and op != "between" or operand is None:
        fail(f"'{op}' takes one value, got {operand!r}")
        return None
    if op in ("regex", "glob", "contains"):
        text = str(operand)
        if op == "regex":
            try:
                re.compile(text)
            except re.error as exc:
                fail(f"invalid regular expression {text!r}: {exc}")
                return None
            return Regex(subject=subject, pattern=text)
        return Glob(subject=subject, pattern=text) if op == "glob" else Contains(subject=subject, text=text)
    return _range(subject, vr, op, operand, fail)


def _normalize_value(vr: str | None, operand: Any) -> str:
    # A DA written the ISO way ("2024-01-31", what YAML authors type) equals the DICOM form.
    if vr == "DA":
        key = range_key("date", operand)
        if key is not None:
            return key
    if isinstance(operand, bool):
        return "YES" if operand else "NO"
    return str(operand).strip()


def _network(subject: Fact, operands: list[Any], fail: Any) -> _Condition | None:
    networks = []
    for o in operands:
        try:
            networks.append(ipaddress.ip_network(str(o).strip(), strict=False))
        except ValueError:
            fail(f"{o!r} is not an IP address or network (10.0.0.0/8)")
            return None
    return InNetwork(subject=subject, networks=tuple(networks))


def _range(subject: TagPath | Fact, vr: str | None, op: str, operand: Any, fail: Any) -> _Condition | None:
    if isinstance(subject, Fact):
        fail(f"'{op}' compares numbers, dates and times, not {subject.value}")
        return None
    if vr in NUMERIC_VRS or vr is None:
        kind = "number"
    elif vr in RANGE_KINDS:
        kind = RANGE_KINDS[vr]
    else:
        fail(f"'{op}' compares numbers, dates (DA), times (TM) and datetimes (DT); this attribute is {vr}")
        return None
    if op == "between":
        if not isinstance(operand, list) or len(operand) != 2:
            fail(f"'between' takes two values, like [20240101, 20241231]; got {operand!r}")
            return None
        bounds = {"ge": operand[0], "le": operand[1]}
    else:
        bounds = {op: operand}
    for bound in bounds.values():
        if range_key(kind, bound) is None:
            fail(f"{bound!r} is not a {_KIND_HELP[kind]}")
            return None
    return Range(subject=subject, kind=kind, **{k: str(v) for k, v in bounds.items()})


_KIND_HELP = {
    "number": "number",
    "date": "date (YYYYMMDD or YYYY-MM-DD)",
    "time": "time (HHMMSS or HH:MM:SS)",
    "datetime": "datetime (YYYYMMDDHHMMSS or YYYY-MM-DD HH:MM)",
}
