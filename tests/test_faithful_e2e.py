"""Faithful on real input (docs/guarantees.md: "Faithful", G2, G5), end to end.

The wide corpus (``tests/corpus.py``: every real DICOM file of pydicom,
pydicom-data and deid-data, plus DCMTK conversions) is sent by DCMTK's
storescu, as stored, to real peers:

* directly, to a storescp (``+xa``, bit preserving) and an Orthanc (every
  syntax): the baseline, what each peer stores and what storescu was told;
* through ``dicom-router run`` to peers of the same kinds: every instance a
  peer stored directly it must store through the router, under the same
  SOP Instance UID, and where nothing was transcoded its data set bytes
  must be those the peer stored directly;
* through the router to implicit-VR-only peers: every instance arrives with
  its UIDs and pixel values (pydicom's decode of the original), or is a
  visible dead letter with a reason; never missing, never a wrong image.

Each test prints a per-source table and writes it, with every instance's
fate, to ``faithful-*.json`` in its tmp folder (path printed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from router.kernel.spool import Spool
from router.kernel.uids import uid_oddity
from tests import corpus as corpus_mod
from tests import data, peers
from tests.peers import IMPLICIT_LE, LOOPBACK, StoreOutcome, storescu_groups
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config
from workers import decoders  # noqa: F401 - pydicom decodes JPEG here as the router does (workers/decoders.py)

pytestmark = pytest.mark.e2e

STORESCP, ORTHANC = "storescp", "orthanc"

# Syntaxes whose decoded values depend on the decoder (PS3.5 8.2): JPEG
# baseline/extended, JPEG-LS near-lossless, JPEG 2000 "lossless or lossy".
LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203",
})
# A lossy source decoded again by the same pydicom plugins should give the
# same values; a colour conversion done twice may round differently.  More
# than this mean absolute difference is a wrong image, not rounding.
LOSSY_MEAN_TOLERANCE = 1.0
# How long the router may take to deliver or bury everything.
SETTLE_TIMEOUT = 150.0


# -- what a peer holds ----------------------------------------------------------

@dataclass
class Delivery:
    """What one router destination ended up with."""

    stored: dict[str, Path] = field(default_factory=dict)      # SOP Instance UID -> file the peer holds
    dead: dict[str, str] = field(default_factory=dict)         # UID -> dead letter reason (router only)
    unknown: list[str] = field(default_factory=list)           # arrivals that are no corpus instance


def _storescp_holdings(scp: peers.StoreSCP, expected: int) -> dict[str, Path]:
    """What storescp wrote, once its completion log stops growing."""
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        count = len(scp.files())
        if count != last:
            last, stable_since = count, time.monotonic()
        if count >= expected or time.monotonic() - stable_since > 1.0:
            break
        time.sleep(0.1)
    return scp.received()


def _orthanc_holdings(orthanc: peers.Orthanc, into: Path) -> dict[str, Path]:
    """Every instance Orthanc stored, fetched to ``into/UID.dcm``."""
    into.mkdir(parents=True, exist_ok=True)
    held = {}
    for uid, instance_id in orthanc.sop_instance_uids().items():
        path = into / f"{uid}.dcm"
        path.write_bytes(orthanc.instance_file(instance_id))
        held[uid] = path
    return held


def _send(port: int, called_ae: str, entries) -> dict[str, StoreOutcome]:
    """storescu sends every entry as stored; SOP Instance UID -> its outcome."""
    outcomes, _ = storescu_groups(LOOPBACK, port, [e.path for e in entries],
                                  called_ae=called_ae, calling_ae="MODALITY")
    return {e.sop_instance: outcomes[str(e.path)] for e in entries}


# -- the baseline: storescu straight to the peers ----------------------------------

@dataclass
class Baseline:
    """The corpus sent straight to each kind of peer: what storescu heard, what the peer holds."""

    outcomes: dict[str, dict[str, StoreOutcome]]   # peer kind -> UID -> storescu's outcome
    held: dict[str, dict[str, Path]]               # peer kind -> UID -> stored file

    def accepts(self, kind: str, uid: str) -> bool:
        """The peer kind takes this instance's content: it stored it directly, or
        refused only its transfer syntax (accepted no presentation context for it,
        so storescu tried to convert, or the association had nothing to offer)."""
        if uid in self.held[kind]:
            return True
        outcome = self.outcomes[kind][uid]
        return outcome.conversion is not None or "No Acceptable Presentation Contexts" in outcome.reason


@pytest.fixture(scope="module")
def baseline(faithful_corpus, tmp_path_factory) -> Baseline:
    """The corpus sent directly to a storescp +xa (bit preserving) and an Orthanc (all syntaxes)."""
    workdir = tmp_path_factory.mktemp("baseline")
    scp = peers.StoreSCP(workdir / "storescp", ae_title="PACS", accept="all")
    orthanc = peers.Orthanc(workdir / "orthanc", ae_title="ORTHANC")
    try:
        scp.start()
        orthanc.start()
        with ThreadPoolExecutor(2) as pool:
            to_scp = pool.submit(_send, scp.port, "PACS", faithful_corpus.entries)
            to_orthanc = pool.submit(_send, orthanc.dicom_port, "ORTHANC", faithful_corpus.entries)
            outcomes = {STORESCP: to_scp.result(), ORTHANC: to_orthanc.result()}
        stored = sum(o.stored for o in outcomes[STORESCP].values())
        held = {STORESCP: _storescp_holdings(scp, stored),
                ORTHANC: _orthanc_holdings(orthanc, workdir / "orthanc-files")}
    finally:
        peers.stop_all([scp, orthanc])
    return Baseline(outcomes, held)


# -- through the router -------------------------------------------------------------

@dataclass
class Routed:
    """The corpus sent through ``dicom-router run``: ingest answers, deliveries, leftovers."""

    ingest: dict[str, StoreOutcome]                 # UID -> what storescu was told by the router
    deliveries: dict[str, Delivery]                 # destination name -> what it got
    quarantined: dict[str, str]                     # UID (or spool id) -> reason
    unsettled: list[str]                            # spool files still waiting when we stopped
    seconds: float


def _spool_uid(path: Path) -> str:
    try:
        return data.sop_instance_uid(path)
    except Exception:  # noqa: BLE001 - a quarantined file may be raw bytes without meta
        return path.stem


def _pending(spool: Path) -> list[Path]:
    return [p for state in ("incoming", "out") if (spool / state).is_dir()
            for p in (spool / state).rglob("*.dcm")]


def _route(tmp_path: Path, redis_url: str, faithful_corpus, peers_by_name: dict) -> Routed:
    """Run ``dicom-router run`` forwarding everything to ``peers_by_name``, send the
    corpus to it, wait until every instance is delivered or buried, collect."""
    destinations = {}
    for name, peer in peers_by_name.items():
        port = peer.dicom_port if isinstance(peer, peers.Orthanc) else peer.port
        destinations[name] = destination(port, peer.ae_title)
    config = router_config(tmp_path / "router", destinations, redis_url=redis_url)
    uids = faithful_corpus.by_uid()
    with RouterProcess(tmp_path / "router", config, log_level="INFO") as router:
        started = time.monotonic()
        ingest = _send(router.port, ROUTER_AE, faithful_corpus.entries)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while _pending(router.spool) and time.monotonic() < deadline and router.running():
            time.sleep(0.25)
        seconds = time.monotonic() - started
        unsettled = [str(p.relative_to(router.spool)) for p in _pending(router.spool)]
        spool = Spool(router.spool)
        deliveries = {}
        accepted = sum(o.stored for o in ingest.values())
        for name, peer in peers_by_name.items():
            delivery = Delivery()
            if isinstance(peer, peers.Orthanc):
                held = _orthanc_holdings(peer, tmp_path / f"{name}-files")
            else:
                held = _storescp_holdings(peer, accepted)
            delivery.unknown = sorted(set(held) - set(uids))
            delivery.stored = {u: p for u, p in held.items() if u in uids}
            delivery.dead = {_spool_uid(letter.path): letter.reason for letter in spool.dead_letters(name)}
            deliveries[name] = delivery
        quarantined = {}
        for reason_file in sorted((router.spool / "quarantine").glob("*.json")):
            dcm = reason_file.with_suffix(".dcm")
            key = _spool_uid(dcm) if dcm.exists() else reason_file.stem
            quarantined[key] = json.loads(reason_file.read_text()).get("reason", "?")
    return Routed(ingest, deliveries, quarantined, unsettled, seconds)


# -- pixels ------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Keep pydicom's warnings and decoder tracebacks about real files out of the
    output: the verdicts carry what matters."""
    logger = logging.getLogger("pydicom")
    was = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was


def _read(path: Path) -> pydicom.Dataset:
    with _quiet():
        return pydicom.dcmread(path)


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    with _quiet():
        return ds.pixel_array


@functools.lru_cache(maxsize=1)
def _original(path: Path) -> tuple[pydicom.Dataset, np.ndarray | None, Exception | None]:
    """An original, read and decoded once for all destinations: (dataset, pixels, decode error)."""
    ds = _read(path)
    if "PixelData" not in ds:
        return ds, None, None
    try:
        return ds, _pixels(ds), None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for codec trouble
        return ds, None, exc


def _is_lossy(entry) -> bool:
    return entry.transfer_syntax in LOSSY_SYNTAXES


def _transcodable(entry) -> tuple[bool, str]:
    """Can the original go out as implicit VR LE with its values? (and why not)."""
    if not entry.has_pixels or not UID(entry.transfer_syntax).is_compressed:
        return True, ""
    _, _, error = _original(entry.path)
    if error is None:
        return True, ""
    return False, f"pydicom cannot decode {entry.transfer_syntax}: {type(error).__name__}: {error}"[:200]


def _compare_pixels(entry, received: Path) -> tuple[str, str]:
    """Judge one arrival against the original: ("faithful" | "lossy-differs" |
    "wrong" | "unverifiable", detail).  "wrong" is a changed identity (UIDs) or
    changed pixel values; the detail names both checks."""
    original, copy = _original(entry.path)[0], _read(received)
    # storescp +B writes the command's UIDs into the file meta, whatever the
    # data set says: the data set's own UIDs are the instance's identity.
    changed = [f"{keyword} changed: {original.get(keyword)} -> {copy.get(keyword)}"
               for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
               if str(original.get(keyword, "")) != str(copy.get(keyword, ""))]
    verdict, detail = _pixel_verdict(entry, original, copy)
    if changed:
        return "wrong", "; ".join([*changed, f"pixels: {verdict} {detail}".rstrip()])
    return verdict, detail


def _pixel_verdict(entry, original: pydicom.Dataset, copy: pydicom.Dataset) -> tuple[str, str]:
    if "PixelData" not in original:
        return ("faithful", "") if "PixelData" not in copy else ("wrong", "pixel data appeared")
    if "PixelData" not in copy:
        return "wrong", "pixel data lost"
    _, expected, error = _original(entry.path)
    if error is not None:
        if entry.transfer_syntax in (IMPLICIT_LE, "1.2.840.10008.1.2.1"):
            # Little endian uncompressed either way: the values are the same bytes.
            same = bytes(original.PixelData) == bytes(copy.PixelData)
            return ("faithful", "raw bytes equal") if same else ("wrong", "raw pixel bytes differ")
        return "unverifiable", f"pydicom cannot decode the original: {type(error).__name__}"
    try:
        got = _pixels(copy)
    except Exception as exc:  # noqa: BLE001
        return "wrong", f"pydicom cannot decode what arrived: {type(exc).__name__}: {exc}"[:200]
    if got.shape != expected.shape:
        return "wrong", f"shape {got.shape} != {expected.shape}"
    if np.array_equal(got, expected):
        return "faithful", ""
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    detail = f"pixel values differ: max |diff| {diff.max():g}, mean {diff.mean():.4f}"
    if _is_lossy(entry) and diff.mean() <= LOSSY_MEAN_TOLERANCE:
        return "lossy-differs", detail
    return "wrong", detail


# -- reporting -----------------------------------------------------------------------

def _report(tmp_path: Path, name: str, header: list[str], rows: list[list], details: dict) -> None:
    """Print the per-source table and write it, with the details, to JSON."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    out = tmp_path / f"faithful-{name}.json"
    out.write_text(json.dumps({"table": {"header": header, "rows": rows}, **details}, indent=2, default=str))
    counts = details.get("corpus", {})
    print(f"\n== {name} ==\ncorpus: kept {counts.get('kept')}; excluded {counts.get('excluded_by_category')}")
    print("\n".join(lines))
    for key in ("problems", "dead_letters", "ingest_refused", "notes"):
        for line in details.get(key, []):
            print(f"  {key}: {line}")
    print(f"  written to {out}")


def _label(entry) -> str:
    return f"{entry.origin} ({entry.source}, {entry.transfer_syntax})"


def _short(reason: str) -> str:
    return " ".join(reason.split())[:400]


# -- the tests -----------------------------------------------------------------------

def test_storescu_outcomes_are_attributed_to_the_file_each_line_is_about():
    """The storescu log parser gives each file its own response, conversion and errors."""
    log = "\n".join([
        "I: checking input files ...",
        "I: Requesting Association",
        "I: Association Accepted (Max Send PDV: 16372)",
        "I: Sending file: /x/0001_a.dcm",
        "I: Converting transfer syntax: JPEG Baseline -> JPEG Baseline",
        "I: Sending Store Request (MsgID 1, SC)",
        "XMIT: .",
        "I: Received Store Response (Success)",
        "I: Sending file: /x/0002_b.dcm",
        "I: Converting transfer syntax: JPEG Lossless, Non-hierarchical, Process 14 -> Little Endian Explicit",
        "I: Sending Store Request (MsgID 2, CT)",
        "E: Store Failed, file: /x/0002_b.dcm:",
        "E: 0006:020e DIMSE Failed to send message",
        "I: Sending file: /x/0003_c.dcm",
        "E: No SOP Class or Instance UID in file: /x/0003_c.dcm",
        "I: Sending file: /x/0004_d.dcm",
        "I: Received Store Response (Refused: OutOfResources)",
        "I: Releasing Association",
    ])
    files = ["/x/0001_a.dcm", "/x/0002_b.dcm", "/x/0003_c.dcm", "/x/0004_d.dcm", "/x/0005_e.dcm"]
    got = peers.store_outcomes(log, files)
    assert got["/x/0001_a.dcm"].stored and got["/x/0001_a.dcm"].conversion is None
    assert not got["/x/0002_b.dcm"].stored
    assert got["/x/0002_b.dcm"].conversion.endswith("-> Little Endian Explicit")
    assert "DIMSE Failed to send message" in got["/x/0002_b.dcm"].reason
    assert "0002_b.dcm" in got["/x/0002_b.dcm"].reason and "/x/" not in got["/x/0002_b.dcm"].reason
    assert got["/x/0003_c.dcm"].status is None
    assert got["/x/0003_c.dcm"].messages == ("E: No SOP Class or Instance UID in file: /x/0003_c.dcm",)
    assert got["/x/0004_d.dcm"].reason == "C-STORE response: Refused: OutOfResources"
    assert got["/x/0005_e.dcm"].reason == "storescu neither sent it nor said why"


def test_every_instance_a_peer_stores_directly_it_stores_through_the_router_unchanged(
    tmp_path, redis_url, faithful_corpus, baseline, storescp_factory, orthanc_factory
):
    """What a storescp and an Orthanc store when sent the corpus directly they store
    through the router too, same SOP Instance UIDs, same data set bytes unless
    transcoded; the router refuses nothing a peer accepted."""
    routed = _route(tmp_path, redis_url, faithful_corpus, {
        "pacs": storescp_factory(ae_title="PACS", accept="all"),
        "orthanc": orthanc_factory(ae_title="ORTHANC"),
    })
    kinds = {"pacs": STORESCP, "orthanc": ORTHANC}
    entries = faithful_corpus.by_uid()
    problems, dead_lines, refused_lines, notes = [], [], [], []
    stats: dict[str, Counter] = defaultdict(Counter)
    for uid, entry in entries.items():
        s = stats[entry.source]
        s["sent"] += 1
        outcome = routed.ingest[uid]
        direct = {kind: uid in baseline.held[kind] for kind in (STORESCP, ORTHANC)}
        if not outcome.stored:
            s["refused at ingest"] += 1
            refused_lines.append(f"{_label(entry)}: {_short(outcome.reason)}")
            if any(direct.values()):
                peers_that_took = ", ".join(k for k, v in direct.items() if v)
                problems.append(f"router refused {_label(entry)} that {peers_that_took} stored directly: "
                                f"{_short(outcome.reason)}")
            continue
        s["ingested"] += 1
        for name, kind in kinds.items():
            delivery = routed.deliveries[name]
            got = delivery.stored.get(uid)
            if uid in baseline.held[kind]:
                s[f"{name}: stored directly"] += 1
            if got is None:
                if uid in delivery.dead:
                    s[f"{name}: dead letters"] += 1
                    dead_lines.append(f"{name}: {_label(entry)}: {_short(delivery.dead[uid])}")
                if uid in baseline.held[kind]:
                    why = (f"dead letter: {_short(delivery.dead[uid])}" if uid in delivery.dead
                           else f"quarantined: {routed.quarantined[uid]}" if uid in routed.quarantined
                           else "neither delivered nor a dead letter")
                    problems.append(f"{name} stored {_label(entry)} directly, not through the router: {why}")
                continue
            s[f"{name}: via router"] += 1
            direct_copy = baseline.held[kind].get(uid)
            if direct_copy is not None and data.transfer_syntax(got) == data.transfer_syntax(direct_copy):
                if data.dataset_bytes_after_meta(got) == data.dataset_bytes_after_meta(direct_copy):
                    s[f"{name}: byte-identical"] += 1
                else:
                    problems.append(f"{name}: {_label(entry)}: data set bytes differ from what {name} "
                                    f"stored when sent directly")
                continue
            # Transcoded (or delivered only through the router, which had to
            # transcode): not the same bytes, but the same instance and image.
            s[f"{name}: transcoded"] += 1
            verdict, detail = _compare_pixels(entry, got)
            how = "directly too" if direct_copy is not None else (
                f"not directly: {_short(baseline.outcomes[kind][uid].reason)}")
            line = f"{name}: {_label(entry)} arrived as {data.transfer_syntax(got)} ({how}): {verdict} {detail}"
            (problems if verdict == "wrong" else notes).append(line.rstrip())
    for name, delivery in routed.deliveries.items():
        for uid in delivery.unknown:
            problems.append(f"{name} received {uid}, which is no instance that was sent (identity changed?)")
    # UIDs outside PS3.5 §9.1 that archives take (pydicom-data's bad_sequence.dcm:
    # 64 hex characters) must stay in the corpus, or the check above proves nothing of them.
    odd = {uid: _label(entry) for uid, entry in entries.items() if uid_oddity(uid)}
    if not odd:
        problems.append("the corpus holds no instance whose UID is outside PS3.5 §9.1 (bad_sequence.dcm's kind)")
    notes += [f"UID outside PS3.5 §9.1: {label}: {uid}" for uid, label in odd.items()]
    _conclude(tmp_path, "baseline-vs-router", kinds,
              ["stored directly", "via router", "byte-identical", "transcoded", "dead letters"],
              stats, routed, faithful_corpus, problems, {
                  "ingest_refused": refused_lines, "dead_letters": dead_lines, "notes": notes})


def _conclude(tmp_path, title: str, kinds, per_destination: list[str], stats, routed, corpus,
              problems: list[str], details: dict) -> None:
    """Print and keep the per-source table of one test, then fail on any problem found."""
    if routed.unsettled:
        problems.append(f"after {SETTLE_TIMEOUT:.0f} s still in the spool: {routed.unsettled[:10]}")
    columns = ["sent", "ingested", "refused at ingest"]
    columns += [f"{name}: {what}" for name in kinds for what in per_destination]
    rows = [[source, *(stats[source][c] for c in columns)] for source in corpus_mod.SOURCES if source in stats]
    rows.append(["total", *(sum(stats[s][c] for s in stats) for c in columns)])
    _report(tmp_path, title, ["source", *columns], rows, {
        "corpus": corpus.counts(), "excluded": [vars(x) for x in corpus.excluded],
        "seconds_router": round(routed.seconds, 1), "problems": problems, **details,
        "quarantined": routed.quarantined,
    })
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


def test_implicit_only_destinations_get_every_instance_pixel_identical_or_a_dead_letter_with_its_reason(
    tmp_path, redis_url, faithful_corpus, baseline, storescp_factory, orthanc_factory
):
    """Through the router to a storescp +xi and an Orthanc taking implicit VR LE only:
    each instance arrives in implicit VR LE with its UIDs and pydicom's pixel values
    of the original, or is a dead letter under dead/<destination>/ with a reason."""
    routed = _route(tmp_path, redis_url, faithful_corpus, {
        "pacs_implicit": storescp_factory(ae_title="PACS_IMPLICIT", accept="implicit-only"),
        "orthanc_implicit": orthanc_factory(ae_title="ORTHANC_IMPLICIT", transfer_syntaxes=[IMPLICIT_LE]),
    })
    kinds = {"pacs_implicit": STORESCP, "orthanc_implicit": ORTHANC}
    entries = faithful_corpus.by_uid()
    problems, dead_lines, refused_lines, notes = [], [], [], []
    stats: dict[str, Counter] = defaultdict(Counter)
    for uid, entry in entries.items():
        s = stats[entry.source]
        s["sent"] += 1
        outcome = routed.ingest[uid]
        if not outcome.stored:
            s["refused at ingest"] += 1
            refused_lines.append(f"{_label(entry)}: {_short(outcome.reason)}")
            continue
        s["ingested"] += 1
        transcodable, why_not = _transcodable(entry)
        for name, kind in kinds.items():
            delivery = routed.deliveries[name]
            got = delivery.stored.get(uid)
            if got is None:
                if uid in delivery.dead:
                    reason = delivery.dead[uid]
                    s[f"{name}: dead letters"] += 1
                    dead_lines.append(f"{name}: {_label(entry)}: {_short(reason)}")
                    if not reason.strip() or reason == "unknown":
                        problems.append(f"{name}: dead letter for {_label(entry)} without a reason")
                    elif transcodable and baseline.accepts(kind, uid):
                        problems.append(f"{name}: {_label(entry)} is a dead letter although pydicom decodes it "
                                        f"and a {kind} takes it: {_short(reason)}")
                    elif not transcodable:
                        notes.append(f"{name}: {_label(entry)}: dead letter as expected ({why_not})")
                else:
                    why = (f"quarantined: {routed.quarantined[uid]}" if uid in routed.quarantined
                           else "neither delivered nor a dead letter")
                    s[f"{name}: missing"] += 1
                    problems.append(f"{name}: {_label(entry)} silently missing: {why}")
                continue
            arrived_as = data.transfer_syntax(got)
            if arrived_as != IMPLICIT_LE:
                problems.append(f"{name}: {_label(entry)} arrived as {arrived_as}, not implicit VR LE")
            verdict, detail = _compare_pixels(entry, got)
            s[f"{name}: {verdict}"] += 1
            if verdict == "wrong":
                problems.append(f"{name}: {_label(entry)}: wrong: {detail}")
            elif verdict != "faithful" or not transcodable:
                notes.append(f"{name}: {_label(entry)}: {verdict} {detail} {why_not}".rstrip())
    for name, delivery in routed.deliveries.items():
        for uid in delivery.unknown:
            problems.append(f"{name} received {uid}, which is no instance that was sent (identity changed?)")
    _conclude(tmp_path, "implicit-only", kinds,
              ["faithful", "lossy-differs", "wrong", "unverifiable", "dead letters", "missing"],
              stats, routed, faithful_corpus, problems, {
                  "ingest_refused": refused_lines, "dead_letters": dead_lines, "notes": notes})

