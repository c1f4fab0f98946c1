"""Decide where one instance goes: a pure function of rules, dataset and association.

No I/O, no clock, no globals: the routing worker, ``dicom-router test`` and
the benchmark call the same function and get the same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydicom.dataset import Dataset

from rules.conditions import Lookup
from rules.facts import AssociationFacts
from rules.models import Rule, UnroutedPolicy
from rules.ops import MorphOp


@dataclass(frozen=True)
class Decision:
    """Where an instance goes and what each destination's copy undergoes.

    Attributes:
        matched: names of the rules that matched, in rule order.
        deliveries: destination name -> morph operations for its copy (an
            empty tuple: send the instance as received).
        unrouted: "keep" or "drop" when no rule matched and that is the
            policy; None otherwise (a ``forward`` policy fills ``deliveries``).
    """

    matched: tuple[str, ...]
    deliveries: dict[str, tuple[MorphOp, ...]] = field(default_factory=dict)
    unrouted: Literal["keep", "drop"] | None = None


def decide(
    rules: Sequence[Rule], unrouted: UnroutedPolicy, ds: Dataset | Callable[[], Dataset], facts: AssociationFacts
) -> Decision:
    """Evaluate the rules in order against one instance.

    Every matching rule applies until one marked ``final`` matches. When
    several matching rules name the same destination, it still receives the
    instance once (a second copy with the same SOP Instance UID would collide
    in the archive), and the morph lists of those rules are concatenated in
    rule order, so a de-identifying rule is never undone by a rule that
    sends the same destination the instance untouched.

    Args:
        rules: the configured rules, in file order.
        unrouted: what to do when no rule matches.
        ds: the instance; its header suffices (``stop_before_pixels=True``). Or
            a function returning it, called only if a rule looks at the dataset
            (rules on the association alone never read it).
        facts: the association it arrived on.

    Returns:
        The decision; with no match, per the ``unrouted`` policy.
    """
    look = Lookup(ds, facts)
    matched: list[str] = []
    deliveries: dict[str, list[MorphOp]] = {}
    for rule in rules:
        if not rule.predicate(look):
            continue
        matched.append(rule.name)
        for destination in rule.forward:
            deliveries.setdefault(destination, []).extend(rule.morph)
        if rule.final:
            break
    if matched:
        return Decision(tuple(matched), {d: tuple(ops) for d, ops in deliveries.items()})
    if isinstance(unrouted, str):
        return Decision((), {}, unrouted)
    return Decision((), {d: () for d in unrouted.forward})
