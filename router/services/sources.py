"""Associations to the peers a service asks (Q/R sources, the worklist SCP, MPPS
destinations): the router's own upper layer (``router/kernel/requestor.py``), with
each destination's address, AE titles, timeouts and TLS."""

from __future__ import annotations

from dataclasses import dataclass

from router.kernel.errors import PermanentSendError
from router.kernel.requestor import RequestedAssociation
from router.kernel.settings import Destination
from router.services.identifiers import SERVICE_SYNTAXES


@dataclass(frozen=True)
class Peer:
    """A destination a service talks to, by its name in the config."""

    name: str
    destination: Destination
    calling_ae_title: str
    """The AE title the router presents to it (its ``calling_ae_title``, else ``router.ae_title``)."""

    @classmethod
    def of(cls, name: str, destination: Destination, router_ae_title: str) -> Peer:
        return cls(name, destination, destination.calling_ae_title or router_ae_title)

    def associate(self, sop_class: str, timeout: float) -> tuple[RequestedAssociation, int, str]:
        """An association offering ``sop_class`` in the uncompressed syntaxes.

        Returns:
            The association, the accepted context's id and its transfer syntax.

        Raises:
            DestinationUnavailable: as for a C-STORE (unreachable, rejected, TLS).
            PermanentSendError: it took the association but not ``sop_class``.
        """
        dest = self.destination
        assoc = RequestedAssociation.negotiate(
            dest.host, dest.port, calling_ae_title=self.calling_ae_title, called_ae_title=dest.ae_title,
            contexts=[(sop_class, ts) for ts in SERVICE_SYNTAXES], max_pdu=dest.max_pdu,
            connect_timeout=dest.connect_timeout, dimse_timeout=timeout, label=self.name, tls=dest.tls)
        for ts in SERVICE_SYNTAXES:
            context_id = assoc.contexts.get((sop_class, ts))
            if context_id is not None:
                return assoc, context_id, ts
        assoc.release()
        raise PermanentSendError(f"{self.name}: {dest.ae_title} does not accept SOP class {sop_class}")
