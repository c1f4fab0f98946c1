"""STOW-RS toward a DICOMweb destination (workers/stow.py): the body, the answer, the
batching, against Orthanc with its DICOMweb plugin (the whole router: tests/test_dicomweb_e2e.py)."""

from __future__ import annotations

import email.parser
import email.policy
import json
import shutil
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from router.kernel.errors import DestinationUnavailable, PermanentSendError, TransientSendError
from router.kernel.settings import Destination
from tests import data
from tests.peers import LOOPBACK, Orthanc
from workers.sender import Sent, read_info
from workers.stow import Body, Part, StowSender, _retry_after, parse_answer, part10

NAMES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "emri_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm",
         "JPEG-LL.dcm", "ExplVR_BigEnd.dcm"]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc-web"), plugins=True) as server:
        yield server


@pytest.fixture
def files(tmp_path) -> list[Path]:
    """Real files of several syntaxes, with UIDs of their own (Orthanc keeps what earlier tests sent)."""
    return data.fresh_copies([Path(pydicom.data.get_testdata_file(n)) for n in NAMES], tmp_path)


def _parts(files: list[Path]) -> list[Part]:
    parts = []
    for path in files:
        with open(path, "rb") as fp:
            info = read_info(fp, path)
        parts.append(Part(path, info, None))
    return parts


def _sender(orthanc: Orthanc, **dicomweb) -> StowSender:
    url = f"http://{LOOPBACK}:{orthanc.http_port}/dicom-web"
    return StowSender("web", Destination(dicomweb={"url": url, **dicomweb}))


def test_the_body_is_multipart_related_with_each_file_whole_and_its_announced_length(files):
    """Parsed back by the standard library's MIME parser: one application/dicom part per
    file, each the file's bytes exactly, and as long as announced; made twice, the same."""
    body = Body(_parts(files))
    raw = b"".join(body.chunks())
    assert len(raw) == body.length
    assert raw == b"".join(body.chunks()), "a body made again from the files must be the same"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + raw)
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * len(files)
    assert [p.get_payload(decode=True) for p in parts] == [f.read_bytes() for f in files]


def test_a_transcoded_part_is_a_whole_file_saying_its_new_syntax(files):
    path = files[1]  # MR_small, explicit VR little endian
    with open(path, "rb") as fp:
        info = read_info(fp, path)
    made = part10(path, info, "1.2.840.10008.1.2")
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(made))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert ds.SOPInstanceUID == info.sop_instance
    assert ds.PixelData == pydicom.dcmread(path).PixelData


def test_the_answer_is_read_for_failed_and_stored_instances():
    answer = {
        "00081198": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [0xA700]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.4"]}, "00081197": {"vr": "US", "Value": [0xC000]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.6"]}}]},
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.5"]}}]},
    }
    said = parse_answer(json.dumps(answer).encode())
    assert said.failed == {"1.2.3": 0xA700, "1.2.4": 0xC000, "1.2.6": 0x0110}
    assert said.stored == {"1.2.5"} and said.listed
    empty = parse_answer(json.dumps({"00081199": {"vr": "SQ"}}).encode())
    assert empty == ({}, set(), True), "an empty list still says: nothing stored"
    assert parse_answer(b"") == ({}, set(), False)
    assert parse_answer(b"<NativeDicomModel/>") == ({}, set(), False)
    assert parse_answer(b"[]") == ({}, set(), False)


def test_retry_after_in_seconds_or_as_a_date():
    assert _retry_after({"Retry-After": "7"}) == 7.0
    assert 0 <= _retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert _retry_after({}) is None and _retry_after({"Retry-After": "soon"}) is None


@pytest.mark.parametrize(("limits", "requests"), [({"max_instances": 2}, 4), ({"max_bytes": 1024}, 7),
                                                  ({}, 1)], ids=["by-count", "by-bytes", "one-request"])
def test_a_batch_goes_in_requests_bounded_by_count_and_bytes(orthanc, files, limits, requests):
    """Seven files: two per request makes four requests, a 1 KiB bound one per file, the
    defaults one; every file stored each time, with its UID."""
    sender = _sender(orthanc, **limits)
    outcomes = list(sender.send_all(files))
    assert all(isinstance(o, Sent) for o in outcomes), outcomes
    assert [o.sop_instance_uid for o in outcomes] == [data.sop_instance_uid(f) for f in files]
    assert sender.requests_made == requests
    assert {data.sop_instance_uid(f) for f in files} <= set(orthanc.sop_instance_uids())


def test_a_part_the_service_skips_is_never_taken_for_stored(orthanc, files, tmp_path):
    """A file whose meta names another instance than its data set: Orthanc stores the data
    set's UID and answers 200 without the meta's; that instance is tried again, the others delivered."""
    odd = tmp_path / "odd.dcm"
    shutil.copy(pydicom.data.get_testdata_file("rtplan.dcm"), odd)  # meta and data set UIDs differ
    outcomes = list(_sender(orthanc).send_all([files[0], odd, files[1]]))
    assert isinstance(outcomes[0], Sent) and isinstance(outcomes[2], Sent)
    assert isinstance(outcomes[1], TransientSendError) and not isinstance(outcomes[1], DestinationUnavailable)
    assert "without naming this instance stored" in str(outcomes[1])


def test_a_service_that_is_not_there_holds_the_destination(files):
    """No connection: the first instance's outcome is DestinationUnavailable (the loop holds
    the destination and gives back the rest)."""
    from tests.peers import free_port

    sender = StowSender("web", Destination(dicomweb={"url": f"http://{LOOPBACK}:{free_port()}/dicom-web"}))
    outcomes = list(sender.send_all(files))
    assert len(outcomes) == 1 and isinstance(outcomes[0], DestinationUnavailable)
    assert outcomes[0].sop_instance_uid == data.sop_instance_uid(files[0])


def test_a_wrong_path_holds_the_destination_and_says_why(orthanc, files):
    url = f"http://{LOOPBACK}:{orthanc.http_port}/not-dicom-web"
    outcomes = list(StowSender("web", Destination(dicomweb={"url": url})).send_all(files[:2]))
    assert len(outcomes) == 1 and isinstance(outcomes[0], DestinationUnavailable)
    assert "is it a STOW-RS service?" in str(outcomes[0])


def test_no_preference_it_can_be_had_in_is_a_dead_letter(orthanc, files, tmp_path):
    """A JPEG 2000 image whose codestream is broken, asked for in explicit VR little endian
    only: it cannot be decoded, so it is a permanent error naming the attempt, and the
    instance beside it in the batch is delivered."""
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(files[2])  # JPEG2000.dcm
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[:40]])  # the main header, no tile
    ds.save_as(broken, enforce_file_format=True)
    sender = StowSender("web", Destination(dicomweb={"url": f"http://{LOOPBACK}:{orthanc.http_port}/dicom-web"},
                                           transfer_syntaxes=["explicit-le"]))
    outcomes = list(sender.send_all([broken, files[0]]))
    assert isinstance(outcomes[0], PermanentSendError) and "cannot transcode" in str(outcomes[0]), outcomes
    assert isinstance(outcomes[1], Sent)


def test_a_file_that_changes_while_its_request_is_made_fails_alone(orthanc, files):
    """A spool file rewritten between reading its meta and sending it (never in the
    router: spool files are written once) fails the request it is in; the request is made
    again one instance at a time, so that the others are delivered and it alone is tried again."""
    sender = _sender(orthanc)
    parts = _parts(files[:3])
    files[1].write_bytes(files[1].read_bytes() + b"\x00\x00")  # its size and time no longer what was read
    outcomes = list(sender._request_all(parts))
    assert [type(o).__name__ for o in outcomes] == ["Sent", "TransientSendError", "Sent"], outcomes
    assert "changed while it was being sent" in str(outcomes[1])
    assert outcomes[1].sop_instance_uid == data.sop_instance_uid(files[1])
