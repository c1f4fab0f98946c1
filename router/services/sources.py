"""Associations to the peers a service asks (Q/R sources, the worklist SCP, MPPS
destinations): the router's own upper layer (``router/kernel/requestor.py``), with
each destination's address, AE titles, timeouts and TLS."""

from __future__ import annotations

import threading
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


class Exchange:
    """A request in flight to a peer whose responses one thread reads (C-FIND, C-MOVE),
    which the operation's thread may ask to cancel at any moment.

    The C-CANCEL-RQ goes at once on a plain association; on a TLS one it goes from the
    reading thread after the next response (one SSL object, one thread at a time).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: tuple[RequestedAssociation, int, int] | None = None
        self._sent = False
        self.wanted = threading.Event()

    def started(self, assoc: RequestedAssociation, context_id: int, message_id: int) -> None:
        """The request is out (its first response came): from now on it can be cancelled."""
        with self._lock:
            self._target = (assoc, context_id, message_id)
        if self.wanted.is_set():
            self.answered()

    def cancel(self) -> None:
        """Cancel the request, now when the association allows it, else after its next response."""
        self.wanted.set()
        with self._lock:
            if self._target is not None and self._target[0].cancellable_from_anywhere:
                self._send()

    def answered(self) -> None:
        """A response came (the reading thread): send the cancel asked for meanwhile."""
        if self.wanted.is_set():
            with self._lock:
                if self._target is not None:
                    self._send()

    def finished(self) -> None:
        """The final response came (the reading thread): there is nothing left to cancel."""
        with self._lock:
            self._sent = True

    def _send(self) -> None:
        if self._sent or self._target is None:
            return
        self._sent = True
        assoc, context_id, message_id = self._target
        try:
            assoc.cancel(context_id, message_id)
        except OSError:
            pass  # the association is going: its end says the rest
