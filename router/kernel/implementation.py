"""Who the router says it is on the wire and in the files it writes.

The Implementation Class UID and Version Name travel in every A-ASSOCIATE
(PS3.7 §D.3.3.2, D.3.3.3) and in every spool file's meta (PS3.10 §7.1); PACS
logs and conformance statements identify a peer by them, so the router uses
its own, not its libraries'. The UID is under the UUID-derived root 2.25
(PS3.5 §B.2): unique without a registered organisation root.
"""

from __future__ import annotations

from importlib import metadata

IMPLEMENTATION_CLASS_UID = "2.25.309875728166613989754355261501766440254"


def _version_name() -> str:
    try:
        version = metadata.version("dicom-router")
    except metadata.PackageNotFoundError:
        version = "0"
    # SH, at most 16 characters (PS3.7 §D.3.3.3.2).
    return f"DICOMROUTER_{version.replace('.', '')}"[:16]


IMPLEMENTATION_VERSION_NAME = _version_name()
