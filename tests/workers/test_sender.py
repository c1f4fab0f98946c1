"""The sender's own DICOM upper layer against real peers (DCMTK storescp, Orthanc)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from router.kernel.errors import (
    DestinationTimeout,
    DestinationUnavailable,
    PermanentSendError,
    TransientSendError,
)
from router.kernel.settings import Destination
from router.kernel.status import Status
from tests import data
from tests.peers import LOOPBACK, free_port
from workers.sender import Sender

pytestmark = pytest.mark.e2e


def _sender(peer, **settings) -> Sender:
    destination = Destination(ae_title=peer.ae_title, host=LOOPBACK, port=peer.port, **settings)
    return Sender("dest", destination, "ROUTER")


@pytest.fixture
def senders():
    """Senders made by a test, closed at teardown."""
    made: list[Sender] = []
    yield made
    for sender in made:
        sender.close()


def _decodable_compressed(files: list[Path]) -> list[Path]:
    """One real file per compressed transfer syntax that pydicom can decode here."""
    chosen: dict[str, Path] = {}
    for path in files:
        ts = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID
        if not ts.is_compressed or ts in chosen:
            continue
        try:
            pydicom.dcmread(path).pixel_array
        except Exception:  # a codec this environment lacks: not this test's subject
            continue
        chosen[ts] = path
    return list(chosen.values())


def test_burst_travels_over_one_association_byte_identical(storescp_factory, ct_series, senders):
    """Many instances go over one association and arrive byte for byte."""
    scp = storescp_factory()
    files = ct_series(40, size_kib=64)
    sender = _sender(scp)
    senders.append(sender)
    sender.prepare(files)
    for path in files:
        assert sender.send(path).status == Status.SUCCESS
        assert sender.ready_for(files)
    sender.close()
    scp.wait_for_files(len(files))
    assert sender.associations_opened == 1
    assert scp.association_count() == 1, scp.log_tail()
    assert data.byte_mismatches(files, scp.received()) == []


def test_real_files_reach_orthanc_in_their_own_syntaxes(orthanc_factory, real_files, senders):
    """Every real test file, in a dozen syntaxes, reaches Orthanc unchanged."""
    orthanc = orthanc_factory()
    sender = _sender(orthanc)
    senders.append(sender)
    sender.prepare(real_files)
    for path in real_files:
        assert sender.send(path).status == Status.SUCCESS
    orthanc.wait_for_instances(len(real_files))
    stored = {uid: orthanc.instance_file(iid) for uid, iid in orthanc.sop_instance_uids().items()}
    assert data.byte_mismatches(real_files, stored) == []


def test_compressed_file_arrives_decompressed_at_implicit_only_peer(storescp_factory, real_files, senders):
    """A compressed instance sent to an implicit-only peer arrives decoded, pixel for pixel."""
    scp = storescp_factory(accept="implicit-only")
    files = _decodable_compressed(real_files)
    assert len(files) >= 3
    sender = _sender(scp)
    senders.append(sender)
    for path in files:
        assert sender.send(path).status == Status.SUCCESS
    scp.wait_for_files(len(files))
    received = scp.received()
    for path in files:
        got = pydicom.dcmread(received[data.sop_instance_uid(path)])
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, pydicom.dcmread(path).pixel_array), path.name


def test_refused_association_raises_destination_unavailable(storescp_factory, ct_series, senders):
    """An A-ASSOCIATE-RJ is the destination's fault, not the instance's."""
    scp = storescp_factory(extra_args=["--refuse"])
    sender = _sender(scp)
    senders.append(sender)
    with pytest.raises(DestinationUnavailable, match="rejected"):
        sender.send(ct_series(1, size_kib=8)[0])


def test_nobody_listening_raises_destination_unavailable(ct_series, senders):
    """A refused TCP connection is DestinationUnavailable."""
    destination = Destination(ae_title="NOBODY", host=LOOPBACK, port=free_port(), connect_timeout=2)
    sender = Sender("dest", destination, "ROUTER")
    senders.append(sender)
    with pytest.raises(DestinationUnavailable, match="cannot connect"):
        sender.send(ct_series(1, size_kib=8)[0])


def test_abort_after_receipt_is_transient_and_next_send_reconnects(storescp_factory, ct_series, senders):
    """A peer aborting instead of answering is transient; the next send opens a new association."""
    scp = storescp_factory(extra_args=["--abort-after"])
    files = ct_series(2, size_kib=64)
    sender = _sender(scp)
    senders.append(sender)
    for path in files:
        with pytest.raises(TransientSendError, match="association lost") as caught:
            sender.send(path)
        assert not isinstance(caught.value, DestinationUnavailable)
    assert sender.associations_opened == 2
    assert scp.association_count() == 2, scp.log_tail()


def test_no_response_within_store_timeout_is_transient(storescp_factory, ct_series, senders):
    """A peer slower than store_timeout: the association is aborted (a late answer
    can never be taken for another request's); the next send reconnects."""
    scp = storescp_factory(extra_args=["--sleep-during", "3"])
    files = ct_series(2, size_kib=8)
    sender = _sender(scp, store_timeout=1)
    senders.append(sender)
    started = time.monotonic()
    with pytest.raises(DestinationTimeout, match="no answer within 1 s; association aborted"):
        sender.send(files[0])
    assert time.monotonic() - started < 2.8  # 1 s, not the peer's 3 s
    with pytest.raises(TransientSendError):
        sender.send(files[1])
    assert sender.associations_opened == 2


def test_small_peer_pdu_splits_dataset(storescp_factory, ct_series, senders):
    """A peer taking 4 KiB PDUs gets many fragments that reassemble byte for byte."""
    scp = storescp_factory(extra_args=["-pdu", "4096"])
    files = ct_series(3, size_kib=512)
    sender = _sender(scp)
    senders.append(sender)
    for path in files:
        assert sender.send(path).status == Status.SUCCESS
    assert sender._assoc is not None and sender._assoc.max_pdu == 4096
    scp.wait_for_files(len(files))
    assert data.byte_mismatches(files, scp.received()) == []


def test_message_ids_increase_on_one_association(storescp_factory, ct_series, senders):
    """Each C-STORE-RQ carries the next Message ID (PS3.7 §E.1)."""
    scp = storescp_factory(extra_args=["-d"])
    files = ct_series(5, size_kib=8)
    sender = _sender(scp)
    senders.append(sender)
    for path in files:
        sender.send(path)
    scp.wait_for_files(len(files))
    ids = [int(n) for n in re.findall(r"Message ID\s*:\s*(\d+)", scp.log_text())]
    assert ids == [1, 2, 3, 4, 5]


def test_idle_association_is_released(storescp_factory, ct_series, senders):
    """close_if_idle releases (A-RELEASE-RQ/RP) an association unused for idle_timeout."""
    scp = storescp_factory()
    # 2 s: the first look comes right after the send, however loaded the machine.
    sender = _sender(scp, idle_timeout=2.0)
    senders.append(sender)
    sender.send(ct_series(1, size_kib=8)[0])
    sender.close_if_idle()
    assert sender._assoc is not None  # not idle yet
    time.sleep(2.1)
    sender.close_if_idle()
    assert sender._assoc is None
    deadline = time.monotonic() + 5
    while "Association Release" not in scp.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Association Release" in scp.log_text(), scp.log_tail()
    assert "Abort" not in scp.log_text()


def test_peer_restart_between_sends_reconnects(storescp_factory, ct_series, senders):
    """An association the peer dropped while idle is replaced, not used (no failed send)."""
    scp = storescp_factory()
    files = ct_series(2, size_kib=8)
    sender = _sender(scp)
    senders.append(sender)
    assert sender.send(files[0]).status == Status.SUCCESS
    scp.stop()
    scp.start()
    deadline = time.monotonic() + 5
    while sender.ready_for(files[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.send(files[1]).status == Status.SUCCESS
    assert sender.associations_opened == 2


def _accepting_only(path: Path, sop_class: str, syntaxes: list[str]) -> list[str]:
    """storescp options accepting ``sop_class`` in exactly ``syntaxes``."""
    lines = ["[[TransferSyntaxes]]", "[These]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(syntaxes, 1)]
    lines += ["[[PresentationContexts]]", "[Contexts]", f"PresentationContext1 = {sop_class}\\These",
              "[[Profiles]]", "[Only]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "Only"]


def test_refused_encoding_falls_back_to_the_next_accepted_preference(storescp_factory, tmp_path, senders):
    """32-bit RT Dose is outside RLE's table: with [rle, as-received] accepted, it goes as it is."""
    path = data.fresh_copies([pydicom.data.get_testdata_file("rtdose.dcm")], tmp_path / "in")[0]
    peer = storescp_factory(ae_title="PACS", accept="all")
    sender = _sender(peer, transfer_syntaxes=["rle", "as-received"])
    senders.append(sender)
    assert sender.send(path).status == Status.SUCCESS
    got = peer.wait_for_files(1)[0]
    assert pydicom.filereader.read_file_meta_info(got).TransferSyntaxUID == data.transfer_syntax(path)


def test_every_refused_encoding_is_named_in_the_dead_letter(storescp_factory, tmp_path, senders):
    """A peer taking only RLE and JPEG-LS gets no 32-bit image: the reason names both attempts."""
    path = data.fresh_copies([pydicom.data.get_testdata_file("rtdose.dcm")], tmp_path / "in")[0]
    sop_class = str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPClassUID)
    rle, jpeg_ls = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"
    peer = storescp_factory(ae_title="PACS", accept="default",
                            extra_args=_accepting_only(tmp_path / "only.cfg", sop_class, [rle, jpeg_ls]))
    sender = _sender(peer, transfer_syntaxes=["jpeg-ls-lossless", "rle"])
    senders.append(sender)
    with pytest.raises(PermanentSendError) as dead:
        sender.send(path)
    reason = str(dead.value)
    assert "to JPEG-LS Lossless Image Compression:" in reason and "to RLE Lossless:" in reason
    assert reason.count("Bits Stored: 32") == 2
    assert peer.files() == []
