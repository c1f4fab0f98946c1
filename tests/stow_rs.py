"""STOW-RS request and response bodies for the tests (PS3.18 10.5).

A request is ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2,
RFC 2387), one PS3.10 file per part; the answer is a DICOM JSON data set with a
ReferencedSOPSequence and a FailedSOPSequence (PS3.18 10.5.3, JSON as in PS3.18 Annex F).  The
proxy of ``tests/dicomweb_servers.py`` parses and rebuilds requests with these,
and the tests build theirs and read the answers with them.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pydicom

DICOM_JSON = "application/dicom+json"

# Attributes of a STOW-RS response (PS3.18 10.5.3), as DICOM JSON keys.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


class MultipartError(ValueError):
    """A body is not the multipart/related a STOW-RS request must be."""


@dataclass(frozen=True)
class RelatedPart:
    """One body part: its header lines as sent, and its bytes."""

    headers: tuple[tuple[str, str], ...]
    content: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


def content_type_params(content_type: str) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of a Content-Type value; quotes removed, names lower-cased."""
    message = Message()
    message["Content-Type"] = content_type
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def parse_related(body: bytes, content_type: str) -> list[RelatedPart]:
    """Split a multipart/related body into its parts, bytes untouched.

    The boundary comes from ``content_type`` (it may be quoted).  A delimiter is
    CRLF "--" boundary at the start of a line; the body may start with the first
    delimiter or with a preamble; "--" boundary "--" closes it (RFC 2046 5.1.1).

    Raises:
        MultipartError: not multipart/related, no boundary, no closing delimiter,
            or a part without a header/content separator.
    """
    media_type, params = content_type_params(content_type)
    if media_type != "multipart/related":
        raise MultipartError(f"Content-Type is {media_type}, not multipart/related")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("no boundary parameter")
    # With a CRLF in front, the first delimiter looks like every other one.
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("ascii"))
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            return parts
        line_end = piece.find(b"\r\n")  # transport padding may follow the boundary
        if line_end < 0 or piece[:line_end].strip(b" \t"):
            raise MultipartError("garbage after a boundary delimiter")
        rest = piece[line_end + 2:]
        if rest.startswith(b"\r\n"):
            header_blob, content = b"", rest[2:]
        else:
            header_blob, separator, content = rest.partition(b"\r\n\r\n")
            if not separator:
                raise MultipartError("a part has no blank line after its headers")
        headers = []
        for line in header_blob.decode("latin-1").split("\r\n"):
            if line:
                name, colon, value = line.partition(":")
                if not colon:
                    raise MultipartError(f"bad part header line {line!r}")
                headers.append((name.strip(), value.strip()))
        parts.append(RelatedPart(tuple(headers), content))
    raise MultipartError("no closing boundary delimiter")


def build_related(parts: Iterable[RelatedPart], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts, and its Content-Type."""
    boundary = boundary or f"dicomweb-peer-{secrets.token_hex(12)}"
    out = io.BytesIO()
    for part in parts:
        out.write(b"--" + boundary.encode("ascii") + b"\r\n")
        for name, value in part.headers:
            out.write(f"{name}: {value}\r\n".encode("latin-1"))
        out.write(b"\r\n" + part.content + b"\r\n")
    out.write(b"--" + boundary.encode("ascii") + b"--\r\n")
    return out.getvalue(), f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def stow_body(files: Iterable[str | Path], boundary: str | None = None,
              transfer_syntax_param: bool = False) -> tuple[bytes, str]:
    """A STOW-RS request body carrying ``files`` (DICOM Part 10) as they are on disk.

    Args:
        files: DICOM files with file meta.
        boundary: the boundary (default: a random one).
        transfer_syntax_param: add ``transfer-syntax=`` (the file's) to each
            part's Content-Type, as PS3.18 allows for application/dicom.

    Returns:
        (body, Content-Type header value).
    """
    parts = []
    for f in files:
        media = "application/dicom"
        if transfer_syntax_param:
            meta = pydicom.filereader.read_file_meta_info(f)
            media += f"; transfer-syntax={meta.TransferSyntaxUID}"
        parts.append(RelatedPart((("Content-Type", media),), Path(f).read_bytes()))
    return build_related(parts, boundary)


def sop_uids(content: bytes) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) of a Part 10 file, or Nones if unreadable."""
    try:
        ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception:  # pydicom raises many types on garbage; None marks "unreadable"
        return None, None
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    sop_instance = ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else None)
    return (str(sop_class) if sop_class else None, str(sop_instance) if sop_instance else None)


def failed_sop_item(sop_class: str | None, sop_instance: str, reason: int) -> dict:
    """One FailedSOPSequence item in DICOM JSON (PS3.18 10.5.3, Annex F)."""
    return {
        REFERENCED_SOP_CLASS_UID: {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
        REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [sop_instance]},
        FAILURE_REASON: {"vr": "US", "Value": [reason]},
    }


def sequence_uids(answer: dict, sequence: str) -> list[str]:
    """The ReferencedSOPInstanceUIDs of the items of ``sequence`` in a STOW-RS answer."""
    items = answer.get(sequence, {}).get("Value", [])
    return [item[REFERENCED_SOP_INSTANCE_UID]["Value"][0] for item in items]
