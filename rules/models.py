"""The rules part of a configuration: rules, the unrouted policy, de-identification secrets.

A rule reads: *when* the instance and its association look like this, *morph*
the copy like that and *forward* it to these destinations; *final* stops the
rules after it. Conditions live in :mod:`rules.conditions`, operations in
:mod:`rules.ops`; this module ties them into what ``router.kernel.settings.Config``
holds.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from rules.conditions import ALWAYS, Condition, Predicate, WhenError, from_yaml
from rules.ops import MorphOp

DEFAULT_SECRET_ENV = "DICOM_ROUTER_SECRET"


class _RulesModel(BaseModel):
    """Base of the rules' models: a typo in a key is an error, never a silently ignored field."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_destinations(names: list[str], info: ValidationInfo) -> list[str]:
    """Every name must be a configured destination (when the caller says which exist)."""
    known = (info.context or {}).get("destination_names")
    if known is None:
        return names
    for name in names:
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            listed = ", ".join(sorted(known)) or "none are configured"
            raise PydanticCustomError(
                "unknown_destination",
                "unknown destination {name}{hint}; destinations: {listed}",
                {"name": repr(name), "hint": f" (did you mean {hint[0]!r}?)" if hint else "", "listed": listed},
            )
    return names


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _distinct_known(names: list[str], info: ValidationInfo) -> list[str]:
    if len(set(names)) != len(names):
        raise PydanticCustomError("duplicate_destination", "a destination is listed twice", {})
    return check_destinations(names, info)


Destinations = Annotated[list[str], BeforeValidator(_one_or_many), AfterValidator(_distinct_known)]
"""A ``forward:`` list: one name or several, each a configured destination, none twice."""


class Rule(_RulesModel):
    """One routing rule."""

    name: str = Field(min_length=1)
    when: Condition = ALWAYS
    """Omitted or empty: the rule matches every instance."""
    morph: list[MorphOp] = Field(default_factory=list)
    """Applied, in order, to the copy sent to this rule's destinations; the original is never changed."""
    forward: Destinations
    """Destination names; ``[]`` together with ``final: true`` discards matching instances on purpose."""
    final: bool = False
    """Stop here: later rules are not evaluated for an instance this rule matched."""

    @cached_property
    def predicate(self) -> Predicate:
        """``when`` compiled once into plain closures over a :class:`rules.conditions.Lookup`.

        A cached property (kept in the instance, outside the fields) because
        the matcher reads it for every rule and every instance.
        """
        return self.when.compile()

    @field_validator("when", mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        # Canonical form (a model, or a dict with "op", e.g. from model_dump) passes through.
        if isinstance(value, BaseModel) or (isinstance(value, Mapping) and "op" in value):
            return value
        try:
            return from_yaml(value)
        except WhenError as exc:
            raise PydanticCustomError(
                "rule_when", "{summary}", {"summary": str(exc), "problems": exc.problems}
            ) from None



class ForwardUnrouted(_RulesModel):
    """``unrouted: {forward: [dest, ...]}``: what no rule matched goes there untouched."""

    forward: Destinations = Field(min_length=1)


def _policy_tag(value: Any) -> str:
    return "forward" if isinstance(value, (Mapping, ForwardUnrouted)) else "word"


UnroutedPolicy = Annotated[
    Union[Annotated[Literal["keep", "drop"], Tag("word")], Annotated[ForwardUnrouted, Tag("forward")]],
    Discriminator(_policy_tag),
]
"""``keep`` (quarantine, visible) | ``drop`` | ``{forward: [dest, ...]}``."""


class DeidSettings(_RulesModel):
    """Where the secret for ``uid_remap``, ``date_shift`` and ``anonymize`` comes from.

    The secret keys the HMAC that maps UIDs and patients; every worker must
    see the same one, and it must not sit in the rules file that is shared
    with the people who write rules.
    """

    secret_env: str = DEFAULT_SECRET_ENV
    secret_file: Path | None = None
    """Read first when set (e.g. a Kubernetes secret mounted as a file)."""
