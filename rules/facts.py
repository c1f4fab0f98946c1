"""What the router knows about the association an instance arrived on.

These are not in the dataset: a modality's AE title and address come from the
A-ASSOCIATE request and the socket, so the ingest side records them with the
spooled instance and the matcher receives them alongside the dataset.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass


class Fact(str, enum.Enum):
    """Association facts a condition may test, spelled like DICOM keywords."""

    CALLING_AE_TITLE = "CallingAETitle"
    CALLED_AE_TITLE = "CalledAETitle"
    SOURCE_IP = "SourceIP"


@dataclass(frozen=True, slots=True)
class AssociationFacts:
    """The sender of one instance: who called, whom it called, from where."""

    calling_ae_title: str
    called_ae_title: str
    source_ip: str

    @classmethod
    def unknown(cls) -> AssociationFacts:
        """Facts for a file with no association (dry runs); conditions on them do not match."""
        return cls("", "", "")

    def get(self, fact: Fact) -> str:
        if fact is Fact.CALLING_AE_TITLE:
            return self.calling_ae_title
        if fact is Fact.CALLED_AE_TITLE:
            return self.called_ae_title
        return self.source_ip


def peer_address(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as the router compares it, or None when it is none.

    A dual-stack socket shows an IPv4 peer as ``::ffff:10.0.0.1``: that counts
    as the IPv4 address it carries, so ``10.0.0.0/8`` (an allow-list, a rule's
    SourceIP) matches it; a zone (``%eth0``) is ignored.
    """
    try:
        ip = ipaddress.ip_address(str(value).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip
