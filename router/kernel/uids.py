"""What the router accepts as a UID, in one place (PS3.5 §9.1).

The ingest checks an instance's own UIDs with it, and the commitment codec the
UIDs of N-ACTION and N-EVENT-REPORT messages: a UID the router accepted with
an instance must also be accepted when a modality asks for its commitment.
"""

from __future__ import annotations

UID_MAX = 64
"""Characters a UID may have (PS3.5 §9.1)."""

_UID_CHARACTERS = frozenset("0123456789.")


def uid_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot serve as the UID ``name``, or None.

    Digits and dots, components separated by single dots, at most 64
    characters. Leading zeros in a component are tolerated (real archives
    hold such UIDs and pass them on); anything else is refused, which also
    keeps a UID that becomes a file name from ever being a path.
    """
    if not value:
        return f"no {name}"
    if len(value) > UID_MAX:
        return f"{name} of {len(value)} characters (at most {UID_MAX})"
    if not set(value) <= _UID_CHARACTERS or "" in value.split("."):
        return f"{name} {value[:UID_MAX]!r} is not a UID"
    return None
