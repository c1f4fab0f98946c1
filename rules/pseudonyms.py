"""Keyed, deterministic replacements: UIDs, per-patient date offsets, hashed identifiers.

Every value here is an HMAC-SHA256 of the original under the site's secret,
so the same input gives the same output in every worker, on every host, in
every run — the instances of one study stay one study after remapping, and a
patient's follow-up months later lands next to the first visit — while
nobody without the secret can go back from the output to the input.
Rotating the secret starts a new, unlinkable pseudonym space.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

from pydicom._uid_dict import UID_dictionary

UUID_ROOT = "2.25."  # PS3.5 B.2: a UID from a 128-bit UUID as one decimal integer


def _digest(secret: bytes, purpose: str, value: str) -> bytes:
    # The purpose label keeps the three pseudonym spaces apart under one secret.
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()


def is_registered_uid(uid: str) -> bool:
    """Standard UIDs (SOP classes, transfer syntaxes, coding schemes) identify nothing: keep them."""
    return uid in UID_dictionary


def remap_uid(secret: bytes, uid: str) -> str:
    """The ``2.25.`` UID standing for ``uid`` under ``secret``; registered UIDs pass through."""
    uid = uid.strip().rstrip("\0")
    if not uid or is_registered_uid(uid):
        return uid
    return UUID_ROOT + str(int.from_bytes(_digest(secret, "uid", uid)[:16], "big"))


def day_offset(secret: bytes, patient: str, max_days: int) -> int:
    """Days to move a patient's dates: between -max_days and -1, fixed per patient.

    Always backwards, so no shifted date lies in the future; never zero, so
    no date survives unchanged.
    """
    n = int.from_bytes(_digest(secret, "date", patient)[:8], "big")
    return -(1 + n % max_days)


def hash_text(secret: bytes, text: str, length: int = 16) -> str:
    """A stable pseudonym for an identifier (uppercase hex, fits SH/LO)."""
    return _digest(secret, "text", text).hex()[:length].upper()


def shift_da(value: str, days: int) -> str | None:
    """Shift a DA value (or a DA range) by ``days``; None when it is not a date."""
    if "-" in value:
        parts = [shift_da(p, days) if p else "" for p in value.split("-", 1)]
        return None if None in parts else "-".join(parts)  # type: ignore[arg-type]
    try:
        day = dt.datetime.strptime(value.strip(), "%Y%m%d").date()
    except ValueError:
        return None
    shifted = day + dt.timedelta(days=days)
    return shifted.strftime("%Y%m%d") if shifted.year >= 1 else None


def shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of a DT value, keeping its time, precision and offset."""
    text = value.strip()
    if len(text) < 8:
        # DT with year or year-month precision: shifting by days is meaningless; coarsen instead.
        return text[:4] if len(text) >= 4 and text[:4].isdigit() else None
    date = shift_da(text[:8], days)
    return None if date is None else date + text[8:]
