"""Association acceptance for the ingest SCP: A-ASSOCIATE-RQ in,
A-ASSOCIATE-AC or -RJ out (PS3.8 §7.1, PS3.7 Annex D.3.3).

Pure functions over bytes and settings, so the decisions are testable apart
from the socket. pynetdicom does what it does well here: the PDU codecs and
presentation context negotiation (``negotiate_unrestricted`` accepts every
storage SOP class, private ones included). The router narrows what it is
offered to the transfer syntaxes DICOM defines (``router/kernel/syntaxes.py``) —
every one of them, since it routes on the header and never decodes pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import sop_class
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from router.kernel import syntaxes
from router.kernel.dimse import APPLICATION_CONTEXT, user_information
from router.kernel.settings import AcceptSettings

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 §9.3.4.
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
REJECT_NETWORK = REJECT_NO_REASON  # a caller outside router.accept.networks
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # ... application context name not supported
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # ... calling AE title not recognized
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent, ACSE provider, protocol version
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, presentation provider, local limit exceeded


class UndecodableRequest(ValueError):
    """The A-ASSOCIATE-RQ's bytes do not decode (the caller aborts)."""


@dataclass(frozen=True)
class AssociateRequest:
    """What the peer asked for, decoded."""

    primitive: A_ASSOCIATE
    protocol_version: int
    application_context: str

    @property
    def calling_ae_title(self) -> str:
        return str(self.primitive.calling_ae_title).strip()

    @property
    def called_ae_title(self) -> str:
        return str(self.primitive.called_ae_title).strip()


@dataclass(frozen=True)
class Accepted:
    """An accepted association: the A-ASSOCIATE-AC to send and what it agreed."""

    pdu: bytes
    contexts: dict[int, str]
    """Accepted presentation context id -> its transfer syntax."""
    abstract_syntaxes: dict[int, str]
    """Accepted presentation context id -> its abstract syntax (SOP class)."""
    peer_max_pdu: int
    """The largest PDU the peer receives; 0 means no limit."""
    caller_scp_classes: frozenset[str] = frozenset()
    """SOP classes for which the peer proposed, and was granted, the SCP role
    (SCP/SCU Role Selection, PS3.7 §D.3.3.4): it takes C-STOREs of them on
    this association (a C-GET's sub-operations)."""


def decode(body: bytes) -> AssociateRequest:
    """Decode the body of an A-ASSOCIATE-RQ PDU (everything after its 6-byte header).

    Raises:
        UndecodableRequest: pynetdicom's decoders raise anything on garbage.
    """
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(b"\x01\x00" + len(body).to_bytes(4, "big") + body)
        primitive = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - see above
        raise UndecodableRequest(f"undecodable A-ASSOCIATE-RQ: {exc}") from exc
    return AssociateRequest(primitive, int(pdu.protocol_version), str(pdu.application_context_name))


def refusal(request: AssociateRequest, accept: AcceptSettings, peer_ip: str,
            identities: frozenset[str] | None = None) -> tuple[tuple[int, int, int], str] | None:
    """Why this request must be rejected — (result, source, diagnostic) and a reason — or None.

    Capacity is the caller's to check last (``REJECT_BUSY``): only a request
    that would otherwise be accepted takes a slot.

    Args:
        identities: what the caller's verified TLS certificate names
            (``router/kernel/tls.py``), or None on the plain port.
    """
    if not request.protocol_version & 0x0001:
        return REJECT_PROTOCOL_VERSION, f"protocol version {request.protocol_version:#06x}"
    if request.application_context != APPLICATION_CONTEXT:
        return REJECT_APPLICATION_CONTEXT, f"application context {request.application_context}"
    if not accept.allows_address(peer_ip):
        return REJECT_NETWORK, "address not in router.accept.networks"
    if accept.calling_ae_titles:
        caller = accept.caller(request.calling_ae_title)
        if caller is None:
            return REJECT_CALLING_AE, "calling AE title not in router.accept.calling_ae_titles"
        if caller.tls_identity is not None and caller.tls_identity not in (identities or ()):
            presented = f"a certificate for {sorted(identities)}" if identities else "no TLS certificate"
            return REJECT_CALLING_AE, (f"calling AE title {caller.ae_title} must present a TLS certificate for "
                                       f"{caller.tls_identity}, it presented {presented}")
    if not request.primitive.presentation_context_definition_list:
        # PS3.8 §7.1.1.13: nothing to agree on; say so rather than accept an
        # association on which no message can travel.
        return REJECT_NO_REASON, "no presentation context proposed"
    return None


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """An encoded A-ASSOCIATE-RJ."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def storage_contexts() -> list[PresentationContext]:
    """Contexts for the storage SOP classes pynetdicom files under other services.

    ``negotiate_unrestricted`` treats a SOP class as storage when pynetdicom
    lists it among its Storage Service Class, or does not know it; Color
    Palette, Hanging Protocol, Implant Template, Protocol and Inventory
    Storage are stored by C-STORE too (PS3.4 Annexes GG, T, HH, II, KK), so
    they are offered here with every transfer syntax.
    """
    every = sorted(syntaxes.TRANSFER_SYNTAXES)
    contexts = []
    for uid in sorted(syntaxes.STORAGE_SOP_CLASSES):
        if uid_to_service_class(uid) is StorageServiceClass or not hasattr(sop_class, UID(uid).keyword):
            continue  # negotiate_unrestricted takes these already
        context = PresentationContext()
        context.abstract_syntax = uid
        context.transfer_syntax = every
        contexts.append(context)
    return contexts


def defined_syntaxes_only(proposed: list[PresentationContext]) -> list[PresentationContext]:
    """The proposed contexts with only the transfer syntaxes DICOM defines, in the peer's order.

    A context left with none is still passed on (with its first syntax) for
    negotiation to reject it; for storage, that rejection is done by
    :func:`accept` (result 0x04, transfer syntaxes not supported).
    """
    narrowed = []
    for context in proposed:
        known = [ts for ts in context.transfer_syntax if str(ts) in syntaxes.TRANSFER_SYNTAXES]
        copy = PresentationContext()
        copy.context_id = context.context_id
        copy.abstract_syntax = context.abstract_syntax
        copy.transfer_syntax = known or list(context.transfer_syntax[:1])
        narrowed.append(copy)
    return narrowed


def accept(request: AssociateRequest, supported: list[PresentationContext], max_pdu: int) -> Accepted:
    """Accept every storage SOP class (private ones too) and what ``supported`` lists,
    each in the first transfer syntax DICOM defines that the peer proposed.

    Args:
        request: the decoded request.
        supported: the other contexts this SCP serves (Verification, and the
            storage classes of :func:`storage_contexts`).
        max_pdu: the largest PDU we receive; 0 means no limit.
    """
    roles = {}
    peer_max_pdu = 0
    for item in request.primitive.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        elif isinstance(item, MaximumLengthNotification):
            peer_max_pdu = int(item.maximum_length_received or 0)
    results, role_replies = negotiate_unrestricted(
        defined_syntaxes_only(request.primitive.presentation_context_definition_list), supported, roles
    )
    for context in results:
        if context.result == 0x00 and str(context.transfer_syntax[0]) not in syntaxes.TRANSFER_SYNTAXES:
            context.result = 0x04  # transfer syntaxes not supported (PS3.8 §9.3.3.2)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = request.primitive.calling_ae_title
    primitive.called_ae_title = request.primitive.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = [*user_information(max_pdu), *role_replies]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return Accepted(
        pdu=pdu.encode(),
        contexts={int(cx.context_id): str(cx.transfer_syntax[0]) for cx in results if cx.result == 0x00},
        abstract_syntaxes={int(cx.context_id): str(cx.abstract_syntax) for cx in results if cx.result == 0x00},
        peer_max_pdu=peer_max_pdu,
        caller_scp_classes=frozenset(str(reply.sop_class_uid) for reply in role_replies if reply.scp_role),
    )
