"""Read a YAML configuration into pydantic models, with errors that name file, line and rule.

Rule authors are PACS administrators; the error for a typo must read
``router.yaml:14:7: rule 'CT to PACS': unknown DICOM keyword 'StudyDescripton'
(did you mean 'StudyDescription'?)`` and every problem in the file must be
reported at once, not one per attempt.

How it works: the YAML is *composed* (PyYAML keeps the start mark of every
node), turned into plain Python data while the position of each node is
remembered by its path, validated by pydantic, and each validation error's
``loc`` is walked back along those paths to the deepest node that exists.

Two YAML 1.1 habits are switched off on purpose: plain scalars stay the text
that was written (``PatientID: 0012345`` is not the octal number 5349,
``StudyTime: 08:00`` is not 480, ``Laterality: NO`` is not False). Pydantic
turns text into numbers and booleans where the schema asks for them.

Rules may be split over several files: a top-level ``include:`` lists files or
glob patterns (relative to the including file); each holds a list of rules
(or a mapping with one key, ``rules``). Included rules come after the rules of
the main file, in the order the patterns are listed, and files matched by one
pattern in name order, so ``10-ct.yaml`` runs before ``20-mr.yaml``.
"""

from __future__ import annotations

import difflib
import glob
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]

_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, where it is."""

    file: str
    line: int
    column: int
    message: str
    rule: str | None = None

    def __str__(self) -> str:
        rule = f"rule {self.rule!r}: " if self.rule else ""
        return f"{self.file}:{self.line}:{self.column}: {rule}{self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` lists every problem, one a line."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column))
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(map(str, self.problems))


@dataclass(frozen=True)
class _Mark:
    file: str
    line: int
    column: int


class _Located:
    """Plain data built from YAML nodes, remembering where every node started."""

    def __init__(self) -> None:
        self.marks: dict[Loc, _Mark] = {}
        self.key_marks: dict[Loc, _Mark] = {}
        self.problems: list[Problem] = []

    @staticmethod
    def mark(file: str, node: yaml.Node) -> _Mark:
        return _Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)

    def build(self, node: yaml.Node, file: str, path: Loc) -> Any:
        self.marks[path] = self.mark(file, node)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, file, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, file, path + (i,)) for i, item in enumerate(node.value)]
        return None if node.tag == _NULL else node.value

    def _mapping(self, node: yaml.MappingNode, file: str, path: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                # "<<: *defaults" — shared settings through anchors; explicit keys win.
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    built = self.build(src, file, path)
                    if isinstance(built, dict):
                        merged.update({k: v for k, v in built.items() if k not in merged})
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(self._problem(file, key_node, "a key must be a plain word or string"))
                continue
            key = key_node.value
            if key in out:
                first = self.key_marks[path + (key,)]
                self.problems.append(self._problem(file, key_node, f"duplicate key {key!r} (first at line {first.line})"))
                continue
            self.key_marks[path + (key,)] = self.mark(file, key_node)
            out[key] = self.build(value_node, file, path + (key,))
        for key, value in merged.items():
            out.setdefault(key, value)
        return out

    def _problem(self, file: str, node: yaml.Node, message: str) -> Problem:
        m = self.mark(file, node)
        return Problem(m.file, m.line, m.column, message)

    def where(self, loc: Loc, at_key: bool = False) -> _Mark:
        """The deepest known node along ``loc`` (union branch names in ``loc`` are skipped)."""
        path: Loc = ()
        for part in loc:
            if part == "[key]":
                at_key = True
                break
            if path + (part,) in self.marks:
                path = path + (part,)
        if at_key and path in self.key_marks:
            return self.key_marks[path]
        return self.marks.get(path) or self.marks[()]


def _compose(path: Path) -> yaml.Node | None:
    """Parse one file to a node tree; syntax errors become a ConfigError with the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), 0, 0, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        raise ConfigError([Problem(str(path), line, col, f"YAML syntax: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(str(path), 0, 0, f"YAML: {exc}")]) from None


def load_model(path: Path, model: type[M]) -> M:
    """Read, include, and validate a configuration file.

    Raises:
        ConfigError: every problem found, each with file, line, column and rule.
    """
    return load_with_sources(path, model)[0]


def load_with_sources(path: Path, model: type[M]) -> tuple[M, tuple[Path, ...]]:
    """Like :func:`load_model`, also returning every file read (to watch them for changes)."""
    loaded = load_located(path, model)
    return loaded.model, loaded.sources


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """A validated configuration that still knows where each of its values was written,
    for problems found after validation (a secret missing, a port taken)."""

    model: M
    sources: tuple[Path, ...]
    _located: _Located

    def problem(self, loc: Loc, message: str, rule: str | None = None) -> Problem:
        """A problem at the key ``loc`` (its deepest part that was written, else its parent)."""
        mark = self._located.where(loc, at_key=True)
        return Problem(mark.file, mark.line, mark.column, message, rule)


def load_located(path: Path, model: type[M]) -> Loaded[M]:
    """Like :func:`load_model`, keeping where every value was written.

    Raises:
        ConfigError: every problem found, each with file, line, column and rule.
    """
    path = Path(path)
    located = _Located()
    node = _compose(path)
    if node is None:
        data: Any = {}
        located.marks[()] = _Mark(str(path), 1, 1)
    else:
        data = located.build(node, str(path), ())
    sources = [path]
    if isinstance(data, dict) and "include" in data:
        sources += _include(data, path, located)
    if isinstance(data, dict):
        _unique_rule_names(data, located)
    destinations = data.get("destinations") if isinstance(data, dict) else None
    context = {"destination_names": set(destinations)} if isinstance(destinations, dict) else {}
    try:
        result = model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(located.problems + _problems(exc, data, located, model)) from None
    if located.problems:
        raise ConfigError(located.problems)
    return Loaded(result, tuple(sources), located)


def _include(data: dict[str, Any], path: Path, located: _Located) -> list[Path]:
    patterns = data.pop("include")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list):
        m = located.where(("include",))
        located.problems.append(Problem(m.file, m.line, m.column, "include: expected a file pattern or a list of them"))
        return []
    if "rules" not in data or data["rules"] is None:
        data["rules"] = []
        located.marks[("rules",)] = located.marks[()]
    rules = data["rules"]
    seen: set[Path] = {path.resolve()}
    read: list[Path] = []
    for i, pattern in enumerate(patterns):
        m = located.where(("include", i))
        full = Path(str(pattern)).expanduser()
        full = full if full.is_absolute() else path.parent / full
        matches = sorted(Path(p) for p in glob.glob(str(full)))
        if not matches:
            located.problems.append(Problem(m.file, m.line, m.column, f"include: no file matches {pattern!r}"))
            continue
        for file in matches:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            read.append(file)
            node = _compose(file)
            if node is None:
                continue
            if isinstance(node, yaml.MappingNode) and [k.value for k, _ in node.value] == ["rules"]:
                node = node.value[0][1]
            if not isinstance(node, yaml.SequenceNode) or not isinstance(rules, list):
                mark = located.mark(str(file), node)
                located.problems.append(
                    Problem(mark.file, mark.line, mark.column, "an included file holds a list of rules (or 'rules: [...]')")
                )
                continue
            for item in node.value:
                rules.append(located.build(item, str(file), ("rules", len(rules))))
    return read


def _unique_rule_names(data: dict[str, Any], located: _Located) -> None:
    """Rule names label hit counts and dry-run output, so two rules may not share one."""
    rules = data.get("rules")
    if not isinstance(rules, list):
        return
    first: dict[str, _Mark] = {}
    for i, rule in enumerate(rules):
        name = rule.get("name") if isinstance(rule, dict) else None
        if not isinstance(name, str):
            continue
        m = located.where(("rules", i, "name"))
        if name in first:
            other = first[name]
            located.problems.append(
                Problem(m.file, m.line, m.column, f"another rule has this name ({other.file}:{other.line})", name)
            )
        else:
            first[name] = m


def _rule_name(data: Any, loc: Loc) -> str | None:
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int) and isinstance(data, dict):
        rules = data.get("rules")
        if isinstance(rules, list) and 0 <= loc[1] < len(rules):
            rule = rules[loc[1]]
            name = rule.get("name") if isinstance(rule, dict) else None
            return name if isinstance(name, str) else f"#{loc[1] + 1}"
    return None


def _problems(exc: ValidationError, data: Any, located: _Located, model: type[BaseModel]) -> list[Problem]:
    vocabulary = _field_names(model)
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "rule_when":
            for sub, message in ctx["problems"]:
                m = located.where(loc + tuple(sub))
                problems.append(Problem(m.file, m.line, m.column, message, _rule_name(data, loc)))
            continue
        message, at_key = _message(err, vocabulary)
        m = located.where(loc, at_key)
        problems.append(Problem(m.file, m.line, m.column, message, _rule_name(data, loc)))
    return problems


def _message(err: Any, vocabulary: set[str]) -> tuple[str, bool]:
    kind, loc, msg = err["type"], err["loc"], err["msg"]
    last = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        if last in vocabulary:  # a real key, in the wrong place
            where = ".".join(str(part) for part in loc[:-1]) or "the top level"
            return f"key {last!r} does not belong under {where}", True
        hint = difflib.get_close_matches(str(last), sorted(vocabulary), n=1, cutoff=0.7)
        return f"unknown key {last!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""), True
    if loc and loc[0] == "unrouted" and kind in ("literal_error", "union_tag_invalid"):
        return f"unrouted: expected keep, drop or {{forward: [destination, ...]}}, got {err.get('input')!r}", False
    if kind == "missing":
        return f"missing key {last!r}", False
    msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    if kind not in ("dicom_tag", "unknown_destination", "template", "morph_unknown", "morph_shape") and isinstance(
        value, (str, int, float)
    ):
        msg = f"{msg} (got {value!r})"
    if isinstance(last, str) and last in vocabulary:
        msg = f"{last}: {msg}"
    return msg, False


def _field_names(model: type[BaseModel]) -> set[str]:
    """Every key any model reachable from ``model`` accepts, for "did you mean" on unknown keys."""
    names: set[str] = set()
    seen: set[type] = set()

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.add(tp)
            for name, field in tp.model_fields.items():
                names.add(field.alias or name)
                walk(field.annotation)
            return
        for arg in typing.get_args(tp):
            walk(arg)

    walk(model)
    return names
