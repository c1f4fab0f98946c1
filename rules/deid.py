"""De-identification with the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

What to do with each attribute is not written here: it is Table E.1-1 of
PS3.15 as shipped by two installed packages (:mod:`rules.annex_e` says which
and which editions), the Basic Profile action and the action of each option
column. This module only says how each action is carried out:

- ``X`` remove; ``Z`` make zero-length; ``K`` keep;
- ``D`` a dummy value: a keyed hash of the original for strings (so the same
  Patient ID becomes the same pseudonym in every instance), a fixed value for
  dates, times and numbers; for a sequence, its items are de-identified;
- ``U`` a UID replaced by its HMAC ``2.25.`` form (:mod:`rules.pseudonyms`),
  consistent across a study and across workers, references included;
- ``C`` clean: dates under *retain longitudinal modified dates* are shifted
  per patient; text under *clean descriptors* keeps its words minus every
  identifier found in the instance (names, IDs, birth date, accession
  number…); a sequence under *clean structured content/graphics* has its
  items de-identified. A ``C`` that cannot be done faithfully (overlay or
  curve pixels) falls back to the Basic Profile action.

The standard leaves the compound actions to IOD conformance, which a router
cannot know for every IOD; for attributes present in the instance we take
the choice that always conforms: ``X/Z`` -> ``Z``, ``X/D``, ``Z/D`` and
``X/Z/D`` -> ``D``, ``X/Z/U*`` -> the sequence is kept and its UIDs remapped.

Attributes the table does not list are kept, as the profile allows; private
attributes are removed (the safe-private list of E.3.10 is not shipped: with
``retain-safe-private``, list the safe private attributes under ``keep``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList
from pydicom.sequence import Sequence

from rules.annex_e import Row, profile_table
from rules.context import MorphContext
from rules.ops import AnonymizeSpec
from rules.pseudonyms import day_offset, hash_text, remap_uid, shift_da, shift_dt
from rules.values import FLOAT_VRS, INT_VRS, element_text, patient_key, vr_of

log = logging.getLogger(__name__)

# CID 7050 "De-identification Method" (PS3.16), recorded in the output (PS3.15 E.1.1 item 6).
METHOD_CODES: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean-graphics": ("113103", "Clean Graphics Option"),
    "clean-structured-content": ("113104", "Clean Structured Content Option"),
    "clean-descriptors": ("113105", "Clean Descriptors Option"),
    "retain-longitudinal-full-dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain-longitudinal-modified-dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain-patient-characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain-device-identity": ("113109", "Retain Device Identity Option"),
    "retain-uids": ("113110", "Retain UIDs Option"),
    "retain-safe-private": ("113111", "Retain Safe Private Option"),
    "retain-institution-identity": ("113112", "Retain Institution Identity Option"),
}
COMPOUND = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}
DUMMY_FIXED = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D", "IS": "0", "DS": "0"}
# Values whose text may recur inside free-text descriptors (E.3.5 Clean Descriptors).
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "MedicalRecordLocator",
)


def resolve(row: Row, options: Iterable[str]) -> str:
    """The single action for a row under the chosen options.

    An option only ever keeps (K) or cleans (C) more than the basic action;
    when several options speak about one attribute, keeping wins over
    cleaning, because each option is a promise to keep that information.
    """
    chosen = {row.options[o] for o in options if o in row.options}
    if "K" in chosen:
        return "K"
    if "C" in chosen:
        return "C"
    return COMPOUND.get(row.basic, row.basic)


class _Run:
    """One de-identification of one dataset: the options, the secret, what to scrub."""

    def __init__(self, ds: Dataset, spec: AnonymizeSpec, ctx: MorphContext):
        self.table = profile_table()
        self.options = tuple(spec.options)
        self.secret = ctx.require_secret("anonymize")
        self.days = day_offset(self.secret, patient_key(ds), spec.max_days)
        self.keep = {
            (id(container), tag)
            for path in spec.keep
            for container in path.containers(ds)
            if (tag := path.leaf.resolve(container)) is not None
        }
        self.scrub = _identifiers(ds) if "clean-descriptors" in self.options else None
        self.actions: dict[int, str | None] = {}

    def action(self, tag: int) -> str | None:
        if tag not in self.actions:
            row = self.table.row(tag)
            self.actions[tag] = None if row is None else resolve(row, self.options)
        return self.actions[tag]

    def dataset(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            if (id(ds), tag) in self.keep:
                continue
            action = self.action(int(tag))
            if action is None or action == "K":
                # Identifying attributes hide inside kept sequences too; other
                # elements are left undecoded (most of a header needs no work).
                if vr_of(ds, tag) == "SQ":
                    self.items(ds[tag])
                continue
            if action == "X":
                del ds[tag]
                continue
            self.element(ds, ds[tag], action)

    def items(self, elem: DataElement) -> None:
        if isinstance(elem.value, ConstrainedList):
            for item in elem.value:
                self.dataset(item)

    def element(self, ds: Dataset, elem: DataElement, action: str) -> None:
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = Sequence([]) if elem.VR == "SQ" else _empty(elem.VR)
        elif elem.VR == "SQ":
            # D, U*, C on a sequence: keep its structure, de-identify its items.
            self.items(elem)
        elif action == "D":
            elem.value = self.dummy(elem)
        elif action in ("U", "U*"):
            _map(elem, lambda v: remap_uid(self.secret, v))
        elif action == "C":
            self.clean(ds, elem)
        else:
            raise ValueError(f"unknown action {action!r} in Table E.1-1")

    def dummy(self, elem: DataElement) -> object:
        vr = elem.VR
        if vr in DUMMY_FIXED:
            return DUMMY_FIXED[vr]
        if vr in INT_VRS or vr in FLOAT_VRS:
            return 0
        if vr == "UI":
            return remap_uid(self.secret, element_text(elem)) if elem.value else None
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN", "AT"):
            return None
        # A keyed hash: the same identifier gets the same dummy in every instance.
        return hash_text(self.secret, element_text(elem))

    def clean(self, ds: Dataset, elem: DataElement) -> None:
        if elem.VR in ("DA", "DT"):
            if "retain-longitudinal-modified-dates" in self.options:
                shift = shift_da if elem.VR == "DA" else shift_dt
                _map(elem, lambda v: shift(v, self.days) or "")
                return
        elif elem.VR == "TM":
            return  # whole-day shifts keep the time of day
        elif self.scrub is not None and elem.VR in ("LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS"):
            _map(elem, lambda v: _scrub(v, self.scrub or ()))
            return
        row = self.table.row(int(elem.tag))
        basic = COMPOUND.get(row.basic, row.basic) if row else "X"
        self.element(ds, elem, basic if basic != "C" else "X")


def _empty(vr: str) -> object:
    """A zero-length value: "" for text, None for binary and numbers (pydicom writes both empty)."""
    return None if vr in INT_VRS or vr in FLOAT_VRS or vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN", "AT") else ""


def _map(elem: DataElement, change) -> None:  # noqa: ANN001 - a str -> str function
    if isinstance(elem.value, ConstrainedList):
        elem.value = [change(str(v)) for v in elem.value]
    elif elem.value not in (None, ""):
        elem.value = change(str(elem.value))


def _identifiers(ds: Dataset) -> tuple[str, ...]:
    """Identifying strings of this instance, longest first, for scrubbing free text."""
    found: set[str] = set()
    for keyword in IDENTIFYING:
        elem = ds[keyword] if keyword in ds else None
        if elem is None or not elem.value:
            continue
        for value in element_text(elem).split("\\"):
            found.add(value.strip())
            found.update(part.strip() for part in re.split(r"[\^=]", value))
    return tuple(sorted((f for f in found if len(f) >= 2), key=len, reverse=True))


def _scrub(text: str, identifiers: tuple[str, ...]) -> str:
    for ident in identifiers:
        text = re.sub(re.escape(ident), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()


def anonymize(ds: Dataset, spec: AnonymizeSpec, ctx: MorphContext) -> None:
    """De-identify ``ds`` in place (callers hand it a copy: see :func:`rules.morph.apply`).

    Raises:
        rules.context.SecretMissing: no secret for U and D actions.
    """
    run = _Run(ds, spec, ctx)
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        # The Basic Profile does not touch pixels (that is the Clean Pixel Data Option).
        log.warning("anonymize %s: BurnedInAnnotation is YES; pixel data is not cleaned", ds.get("SOPInstanceUID", "?"))
    run.dataset(ds)
    _record(ds, spec, run.table.edition)


def _record(ds: Dataset, spec: AnonymizeSpec, edition: str) -> None:
    """Say what was done, in the attributes PS3.15 E.1.1 and PS3.3 C.7.1.1 define for it."""
    ds.PatientIdentityRemoved = "YES"
    # LO is at most 64 characters but may have several values: one per profile and option.
    ds.DeidentificationMethod = [f"{edition} Basic Profile"[:64], *(o[:64] for o in spec.options)]
    items = []
    for key in ("basic", *spec.options):
        code, meaning = METHOD_CODES[key]
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    if "retain-longitudinal-full-dates" in spec.options:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif "retain-longitudinal-modified-dates" in spec.options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
