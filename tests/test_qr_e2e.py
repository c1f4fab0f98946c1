"""Query/Retrieve and Modality Worklist through the router, as a real process, against
real peers: Orthanc 1.10 (the Q/R source, loaded through its REST API; it knows the
router but not the destination), DCMTK's findscu, movescu and getscu (the callers),
storescp (the Move Destination, which Orthanc cannot reach), wlmscpfs with DCMTK's
own example worklist files (the worklist source).

Answers through the router are compared with the answers of the source asked
directly, element by element.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests import data
from tests.peers import LOOPBACK, Orthanc, RedisServer, StoreSCP, _Server, free_port, peer_env, stop_all, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

WORKLIST_EXAMPLES = Path("/usr/share/doc/dcmtk/examples")
TIMEOUT = 120


class Wlmscpfs(_Server):
    """DCMTK's worklist SCP over a folder of worklist files (``-dfp``), as AE ``OFFIS``."""

    name = "wlmscpfs"

    def __init__(self, workdir: Path, database: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.database = database
        self.fixed_port = port
        self.port = port

    def _choose_ports(self) -> None:
        self.port = self.fixed_port or free_port()

    def _command(self) -> list[str]:
        return ["wlmscpfs", "-v", "-dfp", str(self.database), str(self.port)]

    def _env(self) -> dict[str, str]:
        return peer_env()

    def _wait_ready(self) -> None:
        from tests.peers import wait_for_listen

        wait_for_listen(self.proc, self.port, timeout=30)


def _dump2dcm(dump: Path, target: Path) -> None:
    subprocess.run(["dump2dcm", str(dump), str(target)], check=True, capture_output=True, timeout=60)


@dataclass
class Site:
    redis: RedisServer
    orthanc: Orthanc
    second: Orthanc
    viewer: StoreSCP
    viewer_jls: StoreSCP
    pacs: StoreSCP
    worklist: Wlmscpfs
    router: RouterProcess
    studies: dict[str, list[Path]]
    """StudyInstanceUID -> the files of that study Orthanc holds (the generated ones)."""
    shared_study: str
    """A study both Orthancs hold (the merge's case)."""
    real: list[Path]
    queries: list[Path]
    workdir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory, real_files) -> Site:
    """One Orthanc loaded with generated studies and every real file it takes, a second
    Orthanc holding one of those studies and one of its own, storescp as the Move
    Destination, storescp as a PACS the rules forward to, wlmscpfs with DCMTK's
    example worklists, and the router asking both Orthancs and relaying worklists."""
    work = tmp_path_factory.mktemp("qr")
    router_port = free_port()
    started: list[_Server] = []
    try:
        redis = RedisServer(work / "redis").start()
        started.append(redis)
        known = {"router": [ROUTER_AE, LOOPBACK, router_port]}  # the router, never the viewer
        orthanc = Orthanc(work / "orthanc", modalities=known).start()
        started.append(orthanc)
        second = Orthanc(work / "orthanc2", ae_title="ORTHANC2", modalities=known).start()
        started.append(second)
        viewer = StoreSCP(work / "viewer", ae_title="VIEWER").start()
        started.append(viewer)
        viewer_jls = StoreSCP(work / "viewer_jls", ae_title="VIEWER_JLS").start()
        started.append(viewer_jls)
        pacs = StoreSCP(work / "pacs", ae_title="PACS").start()
        started.append(pacs)
        database = work / "wlist"
        (database / "OFFIS").mkdir(parents=True)
        (database / "OFFIS" / "lockfile").touch()
        for dump in sorted((WORKLIST_EXAMPLES / "wlistdb" / "OFFIS").glob("*.dump")):
            _dump2dcm(dump, database / "OFFIS" / f"{dump.stem}.wl")
        queries = []
        for dump in sorted((WORKLIST_EXAMPLES / "wlistqry").glob("*.dump")):
            _dump2dcm(dump, work / f"{dump.stem}.dcm")
            queries.append(work / f"{dump.stem}.dcm")
        worklist = Wlmscpfs(work / "wlmscpfs", database).start()
        started.append(worklist)

        studies: dict[str, list[Path]] = {}
        for i, (n, patient) in enumerate(((5, "QR001"), (3, "QR001"), (4, "QR002"))):
            files = data.small_series(work / f"study{i}", n, tags={"PatientID": patient,
                                                                   "PatientName": f"QR^{patient}",
                                                                   "StudyDescription": f"study {i}"})
            studies[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = files
        second_series = data.small_series(work / "study0b", 2, study_uid=next(iter(studies)),
                                          tags={"PatientID": "QR001", "PatientName": "QR^QR001"})
        next(iter(studies.values())).extend(second_series)
        for files in studies.values():
            for path in files:
                orthanc.post("/instances", path.read_bytes())
        real = []
        for path in real_files:
            try:
                orthanc.post("/instances", path.read_bytes())
                real.append(path)
            except Exception:  # noqa: BLE001 - what Orthanc refuses is simply not asked for
                pass
        shared = next(iter(studies))
        for path in studies[shared]:
            second.post("/instances", path.read_bytes())
        own = data.small_series(work / "second-only", 2, tags={"PatientID": "QR003", "PatientName": "QR^QR003"})
        for path in own:
            second.post("/instances", path.read_bytes())

        config = router_config(
            work,
            {"archive": destination(orthanc.port, ae_title="ORTHANC"),
             "archive2": destination(second.port, ae_title="ORTHANC2"),
             "pacs": destination(pacs.port, ae_title="PACS"),
             "ris": destination(worklist.port, ae_title="OFFIS")},
            rules=[{"name": "everything to the pacs", "when": {}, "forward": ["pacs"]}],
            redis_url=redis.url, port=router_port)
        config["query_retrieve"] = {"sources": ["archive", "archive2"]}
        config["worklist"] = {"source": "ris"}
        config["modalities"] = {"VIEWER": {"host": LOOPBACK, "port": viewer.port},
                                "VIEWER_JLS": {"host": LOOPBACK, "port": viewer_jls.port,
                                               "transfer_syntaxes": ["jpeg-ls-lossless"]},
                                "NOBODY": {"host": LOOPBACK, "port": free_port()}}
        router = RouterProcess(work, config, log_level="INFO").start()
        started.append(router)
        yield Site(redis, orthanc, second, viewer, viewer_jls, pacs, worklist, router, studies, shared, real, queries,
                   work)
    finally:
        stop_all(reversed(started))


# -- DCMTK callers ---------------------------------------------------------------------

def _run(args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=peer_env(), timeout=TIMEOUT, cwd=cwd)


def findscu(port: int, called: str, keys: Sequence[str], out: Path, model: str = "-S",
            query_file: Path | None = None) -> list[Dataset]:
    """``findscu`` with ``-X``: its answers, as the data sets it wrote."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = ["findscu", model, "-aec", called, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    args += [LOOPBACK, str(port)]
    if query_file is not None:
        args.append(str(query_file))
    run = _run(args)
    assert run.returncode == 0, run.stderr[-2000:]
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _comparable(answers: list[Dataset], retrieve_from: str | None = None) -> list[str]:
    """Answers as sorted text: every element of each, order of answers aside.

    Args:
        retrieve_from: the Retrieve AE Title a source's answers are compared with:
            the router names itself there (the caller retrieves through it).
    """
    for ds in answers:
        if retrieve_from is not None and "RetrieveAETitle" in ds:
            ds.RetrieveAETitle = retrieve_from
    return sorted(str(sorted((str(e.tag), e.VR, str(e.value)) for e in ds.iterall())) for ds in answers)


def _status_lines(output: str) -> list[tuple[int, int | None, int, int, int]]:
    """Every C-MOVE-RSP or C-GET-RSP in DCMTK's ``-d`` output: (status, remaining,
    completed, failed, warning)."""
    found = []
    for block in output.split("INCOMING DIMSE MESSAGE")[1:]:
        if "C-MOVE RSP" not in block and "C-GET RSP" not in block:
            continue
        fields = dict(re.findall(r"D: (Remaining|Completed|Failed|Warning) Suboperations\s*: (\S+)", block))
        status = re.search(r"DIMSE Status\s*: 0x([0-9a-f]{4})", block)
        assert status is not None, block
        found.append((int(status.group(1), 16),
                      None if fields["Remaining"] == "none" else int(fields["Remaining"]),
                      int(fields["Completed"]), int(fields["Failed"]), int(fields["Warning"])))
    return found


def movescu(port: int, called: str, move_to: str, keys: Sequence[str]) -> subprocess.CompletedProcess:
    args = ["movescu", "-d", "-S", "-aec", called, "-aem", move_to]
    for key in keys:
        args += ["-k", key]
    return _run([*args, LOOPBACK, str(port)])


def _uids(paths: Sequence[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# -- C-FIND ------------------------------------------------------------------------------

LEVEL_QUERIES = {
    "patient": ("-P", ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName", "PatientBirthDate"]),
    "study": ("-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "StudyDate",
                     "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]),
    "study by patient": ("-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID=QR001"]),
}


@pytest.mark.parametrize("query", sorted(LEVEL_QUERIES))
def test_findscu_through_the_router_answers_as_orthanc_does(site, query):
    """Asked of the router, at each level, findscu gets exactly the answers Orthanc gives
    when asked directly (and the second Orthanc's own entities besides, once each)."""
    model, keys = LEVEL_QUERIES[query]
    direct = findscu(site.orthanc.port, "ORTHANC", keys, site.workdir / "find-direct", model)
    second = findscu(site.second.port, "ORTHANC2", keys, site.workdir / "find-second", model)
    routed = findscu(site.router.port, ROUTER_AE, keys, site.workdir / "find-router", model)
    assert direct, "Orthanc answered nothing: the data did not load"
    level = keys[0].split("=")[1]
    key = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID"}[level]
    direct_keys = {str(ds.get(key)) for ds in direct}
    only_second = [ds for ds in second if str(ds.get(key)) not in direct_keys]
    assert _comparable(routed) == _comparable(direct + only_second, ROUTER_AE)
    assert len({str(ds.get(key)) for ds in routed}) == len(routed), "an entity answered twice"


def test_series_and_image_levels_answer_as_orthanc_does(site):
    """Below the study: every series of each generated study, every image of each of
    its series, as Orthanc answers them."""
    for study, files in site.studies.items():
        keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID", "Modality",
                "NumberOfSeriesRelatedInstances"]
        direct = findscu(site.orthanc.port, "ORTHANC", keys, site.workdir / "s-direct")
        routed = findscu(site.router.port, ROUTER_AE, keys, site.workdir / "s-router")
        assert _comparable(routed) == _comparable(direct, ROUTER_AE) and direct
        for series in {str(ds.SeriesInstanceUID) for ds in direct}:
            keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}",
                    "SOPInstanceUID", "InstanceNumber", "SOPClassUID"]
            direct_images = findscu(site.orthanc.port, "ORTHANC", keys, site.workdir / "i-direct")
            routed_images = findscu(site.router.port, ROUTER_AE, keys, site.workdir / "i-router")
            assert _comparable(routed_images) == _comparable(direct_images, ROUTER_AE) and direct_images
        assert {str(ds.SOPInstanceUID) for ds in findscu(
            site.router.port, ROUTER_AE, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                                          "SOPInstanceUID"], site.workdir / "i-all")} == _uids(files)


def test_every_real_file_is_found_by_its_uid(site):
    """Every real file Orthanc took is found through the router at IMAGE level by its
    SOP Instance UID, with the SOP class Orthanc reports for it."""
    assert len(site.real) > 50
    for path in site.real:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ds.StudyInstanceUID}",
                f"SeriesInstanceUID={ds.SeriesInstanceUID}", f"SOPInstanceUID={ds.SOPInstanceUID}", "SOPClassUID"]
        routed = findscu(site.router.port, ROUTER_AE, keys, site.workdir / "real")
        assert [(str(a.SOPInstanceUID), str(a.SOPClassUID)) for a in routed] == \
            [(str(ds.SOPInstanceUID), str(ds.SOPClassUID))], path.name


def test_a_source_that_is_down_leaves_the_others_answers(site, tmp_path):
    """With one of two sources down, the router answers from the other; with only a
    source that is down, the caller gets a failure with the reason, at once."""
    config = dict(site.router.config)
    config = {**config, "router": {**config["router"], "port": 0, "spool_dir": str(tmp_path / "spool")},
              "destinations": {**config["destinations"], "gone": destination(free_port(), ae_title="GONE")},
              "query_retrieve": {"sources": ["gone", "archive"]}}
    with RouterProcess(tmp_path, config, command="ingest", log_level="INFO", name="half") as router:
        keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]
        routed = findscu(router.port, ROUTER_AE, keys, tmp_path / "half")
        direct = findscu(site.orthanc.port, "ORTHANC", keys, tmp_path / "direct")
        assert _comparable(routed) == _comparable(direct, ROUTER_AE)
    config["query_retrieve"] = {"sources": ["gone"]}
    with RouterProcess(tmp_path, config, command="ingest", log_level="INFO", name="none") as router:
        out = tmp_path / "none"
        out.mkdir()
        run = _run(["findscu", "-v", "-S", "-aec", ROUTER_AE, "-X", "-od", str(out), "-k",
                    "QueryRetrieveLevel=STUDY", LOOPBACK, str(router.port)])
        assert not list(out.glob("rsp*")), run.stderr
        assert re.search(r"Received Final Find Response \((Failed|Error|Unable)", run.stderr + run.stdout, re.I) \
            or "Unable to process" in run.stderr + run.stdout, run.stderr[-2000:]
        assert "cannot connect" in router.log_text()


class StallingSource:
    """A pynetdicom Q/R SCP whose C-FIND answers once, then holds its second answer until
    the test lets it go (``go``): so the router is still relaying when its caller's
    C-CANCEL comes, whatever the machine's speed. ``cancelled`` is set when a C-CANCEL-RQ
    reaches it."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.go = threading.Event()
        self.ae = AE(ae_title="STALLER")
        self.ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
        self.port = free_port()
        self.server = self.ae.start_server((LOOPBACK, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_FIND, self._find),
                                                         (evt.EVT_DIMSE_RECV, self._received)])

    def _received(self, event) -> None:
        if type(event.message).__name__ == "C_CANCEL_RQ":
            self.cancelled.set()

    def _find(self, event):
        for patient in ("STALL1", "STALL2"):
            answer = Dataset()
            answer.QueryRetrieveLevel = "PATIENT"
            answer.PatientID = patient
            yield 0xFF00, answer
            self.go.wait(60)

    def stop(self) -> None:
        self.go.set()
        self.server.shutdown()


def test_c_cancel_of_a_find_reaches_the_source_and_answers_cancel(site, tmp_path):
    """A source still answering: the caller's C-CANCEL after the first answer gets it
    Cancel (0xFE00) at once, the router passes the cancel on to the source, and the
    association stays usable for the next query."""
    source = StallingSource()
    try:
        config = dict(site.router.config)
        config = {**config, "router": {**config["router"], "port": 0, "spool_dir": str(tmp_path / "spool")},
                  "destinations": {**config["destinations"],
                                   "staller": destination(source.port, ae_title="STALLER")},
                  "query_retrieve": {"sources": ["staller"]}}
        with RouterProcess(tmp_path, config, command="ingest", log_level="INFO", name="cancel") as router:
            ae = AE(ae_title="CANCELLER")
            ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
            assoc = ae.associate(LOOPBACK, router.port, ae_title=ROUTER_AE)
            assert assoc.is_established
            try:
                query = Dataset()
                query.QueryRetrieveLevel = "PATIENT"
                query.PatientID = ""
                statuses = []
                for status, _ in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind, msg_id=7):
                    statuses.append(status.Status)
                    if len(statuses) == 1:
                        assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
                assert statuses == [0xFF00, 0xFE00], [hex(s) for s in statuses]
                source.go.set()  # the source may finish now; the router passes on nothing more
                assert source.cancelled.wait(60), "the cancel did not reach the source"
                again = [status.Status for status, _ in assoc.send_c_find(
                    query, PatientRootQueryRetrieveInformationModelFind, msg_id=8)]
                assert again == [0xFF00, 0xFF00, 0x0000], [hex(s) for s in again]
            finally:
                assoc.abort()
    finally:
        source.stop()


# -- C-MOVE ------------------------------------------------------------------------------

def test_movescu_to_a_destination_orthanc_cannot_reach_gets_every_instance(site):
    """Orthanc does not know VIEWER (asked directly: 0xA801); through the router every
    instance of the study reaches it, with counts that add up in every response, and
    nothing retrieved is routed by the rules (the PACS gets nothing)."""
    study, files = next((s, f) for s, f in site.studies.items() if s == site.shared_study)
    direct = movescu(site.orthanc.port, "ORTHANC", "VIEWER", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    assert _status_lines(direct.stdout + direct.stderr)[-1][0] & 0xF000 in (0xA000, 0xC000)  # a failure
    before = set(site.viewer.received())
    run = movescu(site.router.port, ROUTER_AE, "VIEWER", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    assert run.returncode == 0, run.stderr[-2000:]
    responses = _status_lines(run.stdout + run.stderr)
    final = responses[-1]
    assert final[0] == 0x0000 and final[2:] == (len(files), 0, 0), responses
    pending = responses[:-1]
    assert pending and all(status == 0xFF00 for status, *_ in pending)
    assert [sum(counts) for _, *counts in pending] == [len(files)] * len(pending), pending
    completed = [c for _, _, c, _, _ in pending]
    assert completed == sorted(set(completed)) and completed[-1] <= len(files)
    received = wait_until(lambda: set(site.viewer.received()) - before if
                          len(set(site.viewer.received()) - before) >= len(files) else None, 60, "the instances")
    assert received == _uids(files)
    assert not site.pacs.received(), "a retrieved instance was routed"
    assert not any((site.router.spool / "retrieved").rglob("*.dcm"))


def test_move_sends_in_the_move_destination_s_transfer_syntax(site):
    """VIEWER_JLS takes JPEG-LS lossless first (its transfer_syntaxes under modalities:):
    the instances arrive in it, with their UIDs and pixels, whatever Orthanc sent."""
    study, files = sorted(site.studies.items())[0]
    run = movescu(site.router.port, ROUTER_AE, "VIEWER_JLS", ["QueryRetrieveLevel=STUDY",
                                                              f"StudyInstanceUID={study}"])
    assert _status_lines(run.stdout + run.stderr)[-1][:1] == (0x0000,), run.stderr[-2000:]
    new = site.viewer_jls.wait_for_files(len(files), timeout=60)
    assert {data.transfer_syntax(p) for p in new} == {"1.2.840.10008.1.2.4.80"}
    assert _uids(new) == _uids(files)
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
    for path in new:
        ds = pydicom.dcmread(path)
        assert (ds.pixel_array == pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)]).pixel_array).all()


def test_an_unknown_move_destination_is_0xA801(site):
    study = next(iter(site.studies))
    run = movescu(site.router.port, ROUTER_AE, "STRANGER", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    assert _status_lines(run.stdout + run.stderr) == [(0xA801, None, 0, 0, 0)]


def test_a_move_destination_that_is_down_gets_failure_with_true_counts(site):
    """NOBODY listens: every sub-operation fails, the final status is 0xA702 with the
    failed count, and the source's instances do not stay in the spool."""
    study, files = sorted(site.studies.items())[-1]
    run = movescu(site.router.port, ROUTER_AE, "NOBODY", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    final = _status_lines(run.stdout + run.stderr)[-1]
    assert final == (0xA702, None, 0, len(files), 0)
    assert not any((site.router.spool / "retrieved").rglob("*.dcm"))


def test_a_move_at_series_and_image_level_moves_only_those(site):
    study, files = next((s, f) for s, f in site.studies.items() if s == site.shared_study)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    in_series = [p for p in files if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                 == first.SeriesInstanceUID]
    assert 0 < len(in_series) < len(files)
    run = movescu(site.router.port, ROUTER_AE, "VIEWER", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                                                          f"SeriesInstanceUID={first.SeriesInstanceUID}"])
    assert _status_lines(run.stdout + run.stderr)[-1] == (0, None, len(in_series), 0, 0)
    run = movescu(site.router.port, ROUTER_AE, "VIEWER", [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={first.SeriesInstanceUID}",
        f"SOPInstanceUID={first.SOPInstanceUID}"])
    assert _status_lines(run.stdout + run.stderr)[-1] == (0, None, 1, 0, 0)


def test_c_cancel_of_a_move_answers_cancel_with_the_counts_so_far(site, storescp_factory):
    """A slow Move Destination (storescp answers each store a second after writing it) and a
    caller that cancels after the first pending response: the final response is Cancel, at
    least one but fewer than all were sent, none failed, and the counts add up to the study.

    The Orthancs send their sub-operations to this router (its own spool): sent to the
    site's router, with another spool, each would be a file this one cannot find, failed
    at once, and the cancel would race the whole study's failures."""
    slow = storescp_factory(ae_title="SLOW", answer_delay=1)
    config = dict(site.router.config)
    study, files = next((s, f) for s, f in site.studies.items() if s == site.shared_study)
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    config = {**config, "modalities": {**config["modalities"], "SLOW": {"host": LOOPBACK, "port": slow.port}}}
    work = site.workdir / "cancel"
    work.mkdir(exist_ok=True)
    port = free_port()
    config["router"] = {**config["router"], "port": port, "spool_dir": str(work / "spool")}
    for orthanc in (site.orthanc, site.second):
        _point_orthanc_at(orthanc, port)
    try:
        with RouterProcess(work, config, command="ingest", log_level="INFO", name="cancel") as router:
            assoc = ae.associate(LOOPBACK, router.port, ae_title=ROUTER_AE)
            assert assoc.is_established
            try:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = study
                responses = []
                for status, _ in assoc.send_c_move(query, "SLOW", StudyRootQueryRetrieveInformationModelMove,
                                                   msg_id=3):
                    responses.append(status)
                    if len(responses) == 1:
                        assoc.send_c_cancel(3, assoc.accepted_contexts[0].context_id)
            finally:
                assoc.release()
    finally:
        for orthanc in (site.orthanc, site.second):
            _point_orthanc_at(orthanc, site.router.port)
    final = responses[-1]
    assert final.Status == 0xFE00, [hex(r.Status) for r in responses]
    assert final.NumberOfFailedSuboperations == 0
    assert 1 <= final.NumberOfCompletedSuboperations < len(files)
    assert final.NumberOfCompletedSuboperations + final.NumberOfRemainingSuboperations == len(files)


def _point_orthanc_at(orthanc: Orthanc, port: int) -> None:
    """Change where Orthanc's modality "router" is (its REST API: PUT /modalities/ID)."""
    body = json.dumps({"AET": ROUTER_AE, "Host": LOOPBACK, "Port": port}).encode()
    orthanc._request("PUT", "/modalities/router", body)


def test_sub_operations_may_arrive_at_another_host(site, tmp_path):
    """Two ingests share Redis and the spool; Orthanc knows only host B as the router.
    A C-MOVE asked of host A is answered by A with every instance, which Orthanc sent to
    B: the correlation lives in Redis, not in one process."""
    shared = dict(site.router.config)
    b_port = free_port()
    orthanc = site.orthanc
    _point_orthanc_at(orthanc, b_port)
    try:
        base = {**shared, "router": {**shared["router"], "spool_dir": str(tmp_path / "spool"),
                                     "redis_url": site.redis.url}}
        config_a = {**base, "router": {**base["router"], "port": 0}}
        config_b = {**base, "router": {**base["router"], "port": b_port}}
        with RouterProcess(tmp_path / "a", config_a, command="ingest", name="host-a", log_level="INFO") as a, \
                RouterProcess(tmp_path / "b", config_b, command="ingest", name="host-b", log_level="INFO") as b:
            study, files = sorted(site.studies.items())[1]
            before = site.viewer.store_request_count()
            run = movescu(a.port, ROUTER_AE, "VIEWER", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
            assert _status_lines(run.stdout + run.stderr)[-1] == (0, None, len(files), 0, 0), run.stderr[-2000:]
            assert f"{len(files)} instance(s) accepted" in b.log_text()
            assert "instance(s) accepted" not in a.log_text().replace("0 instance(s) accepted", "")
            wait_until(lambda: site.viewer.store_request_count() - before >= len(files), 60, "the instances")
    finally:
        _point_orthanc_at(orthanc, site.router.port)


def test_a_host_whose_spool_is_not_shared_fails_the_sub_operations_and_says_why(site, tmp_path):
    """A second ingest on the same Redis but with a spool of its own (a misconfigured
    host): Orthanc sends the sub-operations to the site's router, which keeps them in
    its spool; the host that was asked cannot find them. Every one is a failed
    sub-operation (0xA702, none completed), and its log names the cause once."""
    study, files = sorted(site.studies.items())[1]
    config = dict(site.router.config)
    config = {**config, "router": {**config["router"], "port": 0, "spool_dir": str(tmp_path / "spool")}}
    with RouterProcess(tmp_path, config, command="ingest", name="unshared", log_level="INFO") as host:
        run = movescu(host.port, ROUTER_AE, "VIEWER", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
        assert _status_lines(run.stdout + run.stderr)[-1] == (0xA702, None, 0, len(files), 0), run.stderr[-2000:]
        log = host.log_text()
    assert log.count("is not in this spool") == 1, log
    assert "every host on one Redis must share router.spool_dir" in log


# -- C-GET -------------------------------------------------------------------------------

def test_getscu_receives_on_its_own_association(site, tmp_path):
    """getscu (which listens nowhere) receives every instance of the study on the
    association it opened, byte for byte the data sets Orthanc holds."""
    study, files = next((s, f) for s, f in site.studies.items() if s == site.shared_study)
    out = tmp_path / "get"
    out.mkdir()
    run = _run(["getscu", "-d", "-S", "-aec", ROUTER_AE, "-k", "QueryRetrieveLevel=STUDY", "-k",
                f"StudyInstanceUID={study}", "-od", str(out), LOOPBACK, str(site.router.port)])
    assert run.returncode == 0, run.stderr[-2000:]
    final = _status_lines(run.stdout + run.stderr)[-1]
    assert final == (0, None, len(files), 0, 0)
    got = sorted(out.iterdir())
    assert _uids(got) == _uids(files)
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
    for path in got:
        ds = pydicom.dcmread(path)
        assert ds.PixelData == pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)]).PixelData


LOSSLESS = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90")


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_c_get_transcodes_to_a_syntax_the_caller_takes(site, syntax):
    """A pynetdicom C-GET caller that takes the class only in Explicit VR Little Endian
    gets a real file stored losslessly compressed in Orthanc (RLE, JPEG lossless,
    JPEG-LS, JPEG 2000) decompressed to it, pixels intact."""
    real = next((p for p in site.real if data.transfer_syntax(p) == syntax
                 and "PixelData" in pydicom.dcmread(p, stop_before_pixels=False)), None)
    if real is None:
        pytest.fail(f"no real file in {syntax} was taken by Orthanc")
    ds = pydicom.dcmread(real)
    sop_class = str(ds.SOPClassUID)
    received: list[Dataset] = []

    def on_store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(pydicom.uid.UID("1.2.840.10008.5.1.4.1.2.2.3"))  # Study Root Get
    ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate(LOOPBACK, site.router.port, ae_title=ROUTER_AE,
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = ds.StudyInstanceUID
        query.SeriesInstanceUID = ds.SeriesInstanceUID
        query.SOPInstanceUID = ds.SOPInstanceUID
        statuses = list(assoc.send_c_get(query, "1.2.840.10008.5.1.4.1.2.2.3"))
    finally:
        assoc.release()
    final = statuses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 1
    assert len(received) == 1 and str(received[0].SOPInstanceUID) == str(ds.SOPInstanceUID)
    assert (received[0].pixel_array == ds.pixel_array).all()


def test_c_get_of_a_class_the_caller_took_no_context_for_fails_that_sub_operation(site):
    """A caller that took no storage context (with the SCP role) for the instances' class:
    each is a failed sub-operation and the final status says so, at once."""
    study, files = sorted(site.studies.items())[-1]
    ae = AE(ae_title="GETTER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.3")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture, never sent
    assoc = ae.associate(LOOPBACK, site.router.port, ae_title=ROUTER_AE,
                         ext_neg=[build_role("1.2.840.10008.5.1.4.1.1.7", scp_role=True)])
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        final = list(assoc.send_c_get(query, "1.2.840.10008.5.1.4.1.2.2.3"))[-1][0]
    finally:
        assoc.release()
    assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == len(files)
    assert final.NumberOfCompletedSuboperations == 0


# -- Modality Worklist --------------------------------------------------------------------

def test_findscu_worklist_answers_as_wlmscpfs_does(site):
    """Each of DCMTK's example worklist queries (wlistqry*.dump), asked with findscu -W of
    the router, gets exactly what wlmscpfs answers when asked directly."""
    assert len(site.queries) >= 10
    answered = 0
    for query in site.queries:
        direct = findscu(site.worklist.port, "OFFIS", [], site.workdir / "w-direct", "-W", query)
        routed = findscu(site.router.port, ROUTER_AE, [], site.workdir / "w-router", "-W", query)
        assert _comparable(routed) == _comparable(direct), query.name
        answered += bool(direct)
    assert answered >= 5


def test_a_worklist_source_that_is_down_fails_at_once(site, tmp_path):
    """The worklist source stopped: the caller gets a failure status, not a hang, and
    gets answers again once it is back."""
    site.worklist.stop()
    try:
        out = tmp_path / "w"
        out.mkdir()
        run = _run(["findscu", "-v", "-W", "-aec", ROUTER_AE, "-X", "-od", str(out), "-k", "PatientName",
                    LOOPBACK, str(site.router.port)])
        text = run.stdout + run.stderr
        assert "Received Final Find Response" in text and "Success" not in text.split("Final Find Response")[1][:80]
        assert not list(out.glob("rsp*"))
    finally:
        site.worklist.start()
    query = site.queries[0]
    routed = findscu(site.router.port, ROUTER_AE, [], site.workdir / "w-back", "-W", query)
    direct = findscu(site.worklist.port, "OFFIS", [], site.workdir / "w-d", "-W", query)
    assert _comparable(routed) == _comparable(direct)
