"""What the router accepts as a UID, in one place.

Every UID that enters the router is checked here: the C-STORE command's
Affected SOP Class and Instance UIDs, the dataset's own (compared with the
command's), and the references and Transaction UID of storage commitment
messages. A UID the router accepted with an instance must also be accepted
when a modality asks for its commitment, so there is one check.

PS3.5 §9.1 asks for digits and dots, but real archives hold UIDs that are
not (64 hex characters, components with leading zeros, empty components),
and DCMTK's storescp and Orthanc store them. A router that refused what
every archive takes would lose the instance, so only what cannot be handled
safely is refused (:func:`uid_problem`); the rest passes with a warning
(:func:`uid_oddity`) and leaves unchanged.
"""

from __future__ import annotations

UID_MAX = 64
"""Characters a UID may have (PS3.5 §9.1; the UI value representation, PS3.5 Table 6.2-1)."""

_STANDARD_CHARACTERS = frozenset("0123456789.")
_PATH_SEPARATORS = frozenset("/\\")


def uid_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot be handled as the UID ``name``, or None.

    Refused: no value, more than 64 characters (no UI value is longer, and a
    peer's buffer may not be), a path separator (a UID may become a file
    name), NUL or another control character, or a character beyond ASCII.
    Everything else is accepted, PS3.5 §9.1 or not (see the module's docstring).
    """
    if not value:
        return f"no {name}"
    if len(value) > UID_MAX:
        return f"{name} of {len(value)} characters (at most {UID_MAX})"
    if value.isascii() and value.isprintable() and "/" not in value and "\\" not in value:
        return None  # every UID of every instance: the loop below only says what is wrong
    for character in value:
        if character in _PATH_SEPARATORS:
            return f"{name} {value!r} holds a path separator"
        if not " " <= character <= "~":
            return f"{name} {value!r} holds a control or non-ASCII character"
    return None


def uid_oddity(value: str) -> str | None:
    """How an accepted ``value`` departs from PS3.5 §9.1, for a warning; None when it does not.

    Leading zeros in a component are not reported: they are common in real
    archives and every peer takes them without comment.
    """
    if (value.isascii() and value.replace(".", "").isdigit()
            and not (value.startswith(".") or value.endswith(".") or ".." in value)):
        return None  # the common case, without building a set (an ASCII isdigit() is 0-9 only)
    if not set(value) <= _STANDARD_CHARACTERS:
        return "holds characters other than digits and dots (PS3.5 §9.1)"
    if "" in value.split("."):
        return "has an empty component (PS3.5 §9.1)"
    return None
