"""Reading element values as the rules see them: shared by morphing and de-identification.

Both :mod:`rules.morph` and :mod:`rules.deid` read values this way; keeping
it here lets de-identification use it without importing the morph engine
that calls it (which would be an import cycle).
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList

INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"FL", "FD"})


def vr_of(ds: Dataset, tag: int) -> str | None:
    """The VR of an element without decoding its value (implicit VR: the dictionary's)."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if raw.VR is not None:
        return raw.VR
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ds[tag].VR


def element_text(elem: DataElement) -> str:
    """The DICOM string form of a value (multiple values joined by ``\\``)."""
    value = elem.value
    if value is None or elem.VR == "SQ":
        return ""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("ascii", "replace")
    if isinstance(value, ConstrainedList):
        return "\\".join(str(v) for v in value)
    return str(value)


def patient_key(ds: Dataset) -> str:
    """Who the dates belong to: Patient ID qualified by its issuer."""
    return f"{ds.get('PatientID', '')}\\{ds.get('IssuerOfPatientID', '')}"
