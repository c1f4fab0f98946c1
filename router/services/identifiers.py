"""Data sets of queries, retrieves and procedure steps: decoded from and encoded to
the bytes of a presentation context's transfer syntax.

They are small (an identifier, a worklist item, an MPPS), so pydicom reads
and writes them whole; the sources may have accepted another transfer syntax
than the caller, so each hop encodes for its own context.
"""

from __future__ import annotations

import zlib
from io import BytesIO

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

SERVICE_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
"""Explicit and Implicit VR Little Endian: what the router proposes and accepts for
queries, retrieves and procedure steps (every SCP takes one of them)."""


def decode(data: bytes, transfer_syntax: str) -> Dataset:
    """The data set in ``data``, encoded in ``transfer_syntax``.

    Raises:
        ValueError: the bytes are not a data set in that syntax.
    """
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise ValueError(f"not deflated data: {exc}") from exc
    try:
        return read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)
    except Exception as exc:  # pydicom raises several types for garbage
        raise ValueError(f"not a data set in {uid.name}: {exc}") from exc


def encode(dataset: Dataset, transfer_syntax: str) -> bytes:
    """``dataset`` encoded in ``transfer_syntax`` (no file meta, no preamble)."""
    uid = UID(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = uid.is_implicit_VR
    buffer.is_little_endian = uid.is_little_endian
    write_dataset(buffer, dataset)
    data = buffer.getvalue()
    if uid.is_deflated:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data
