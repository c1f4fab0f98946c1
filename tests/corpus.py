"""The wide real-file corpus: every real DICOM file this machine has, sendable as stored.

Nothing is downloaded.  The sources:

* ``pydicom``: every file of ``pydicom.data.get_testdata_files()`` inside the
  pydicom wheel;
* ``pydicom-data``: the rest of that list, from the ``pydicom-data`` package;
* ``deid-data``: every ``data/**/*.dcm`` of the ``deid-data`` package and the
  DICOM file inside each of its ``.zip`` files;
* ``dcmtk``: files DCMTK's own converters make from a few uncompressed real
  files (``CONVERSIONS``): JPEG baseline/extended/lossless (process 14 and
  SV1), JPEG-LS lossless and near-lossless, RLE, big endian, deflate,
  implicit VR.

A file is kept when storescu can send it as stored; the rules, in order, and
why each excluded category is excluded (``Exclusion.category``):

``NO_FILE_META``
    pydicom finds no File Meta Information (PS3.10 7.1): raw data sets,
    ACR-NEMA files, JSON, dumps, ICC profiles.  storescu proposes a
    transfer syntax from the meta; without it the file is not "as stored".
``NO_TRANSFER_SYNTAX``
    file meta without (0002,0010) Transfer Syntax UID: nothing says how the
    data set is encoded.
``NO_SOP_UIDS``
    no SOP Class UID or SOP Instance UID in the data set (DICOMDIRs, data
    set fragments): not a storable instance, a C-STORE needs both.
``UNREADABLE``
    pydicom cannot read the file to give it fresh UIDs (e.g. truncated).
``CONVERTER_FAILED``
    a DCMTK converter refused one of ``CONVERSIONS`` (recorded, so a change
    of DCMTK shows).
``STORESCU_REFUSED``
    storescu itself will not send it to an SCP that accepts every (SOP
    class, transfer syntax) of the corpus: found by trying, against a
    ``storescp -xf`` profile built from the corpus, with storescu's own
    words as the detail ("Bad DICOM file", "No SOP Class or Instance UID
    in file"...).  Tried on the file as it is, before any rewrite: pydicom
    repairs some broken files when it writes them (a truncated element
    comes out whole), which would hide what storescu thinks of the original.
``UNREADABLE`` (again)
    pydicom cannot rewrite the file with fresh UIDs.
``COPY_REFUSED``
    storescu refuses the rewritten copy (tried again, since that copy is
    what tests send).

Every kept file is a copy with new Study/Series/SOP Instance UIDs
(``data.fresh_copy``; several source files share SOP Instance UIDs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom
import pydicom.data

from tests import data, peers

PYDICOM = "pydicom"
PYDICOM_DATA = "pydicom-data"
DEID_DATA = "deid-data"
DCMTK = "dcmtk"
SOURCES = (PYDICOM, PYDICOM_DATA, DEID_DATA, DCMTK)

NO_FILE_META = "no file meta"
NO_TRANSFER_SYNTAX = "file meta without Transfer Syntax UID"
NO_SOP_UIDS = "no SOP Class UID or SOP Instance UID"
UNREADABLE = "pydicom cannot read it"
CONVERTER_FAILED = "DCMTK converter failed"
STORESCU_REFUSED = "storescu refuses to send it"
COPY_REFUSED = "storescu refuses the copy with fresh UIDs"

# (source file from pydicom's test data, converter, options): a few real,
# uncompressed images of different kinds, each made into the transfer
# syntaxes DCMTK can write.  CT_small: 16-bit signed CT; 693_UNCR: 512x512
# CT with 14 bits stored; vlut_04: 8-bit grey; US1_UNCR: 8-bit RGB
# ultrasound.  Baseline JPEG needs 8 bits, so only the 8-bit ones get it.
CONVERSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("CT_small.dcm", "dcmcjpeg", ("+e1",)),   # JPEG Lossless SV1 (.70)
    ("CT_small.dcm", "dcmcjpeg", ("+el",)),   # JPEG Lossless process 14 (.57)
    ("CT_small.dcm", "dcmcjpls", ()),         # JPEG-LS lossless (.80)
    ("CT_small.dcm", "dcmcrle", ()),          # RLE lossless (.5)
    ("CT_small.dcm", "dcmconv", ("+tb",)),    # explicit VR big endian (.2.2)
    ("CT_small.dcm", "dcmconv", ("+td",)),    # deflated explicit VR LE (.1.99)
    ("CT_small.dcm", "dcmconv", ("+ti",)),    # implicit VR LE (.2)
    ("693_UNCR.dcm", "dcmcjpeg", ("+e1",)),
    ("693_UNCR.dcm", "dcmcjpls", ()),
    ("693_UNCR.dcm", "dcmcrle", ()),
    ("693_UNCR.dcm", "dcmconv", ("+tb",)),
    ("vlut_04.dcm", "dcmcjpeg", ("+eb",)),    # JPEG baseline (.50), lossy
    ("vlut_04.dcm", "dcmcjpeg", ("+ee",)),    # JPEG extended (.51), lossy
    ("vlut_04.dcm", "dcmcjpls", ("+en",)),    # JPEG-LS near-lossless (.81)
    ("US1_UNCR.dcm", "dcmcjpeg", ("+eb",)),   # RGB -> YBR_FULL_422 baseline
    ("US1_UNCR.dcm", "dcmcjpeg", ("+e1",)),
    ("US1_UNCR.dcm", "dcmcjpls", ()),
    ("US1_UNCR.dcm", "dcmcrle", ()),
    ("US1_UNCR.dcm", "dcmconv", ("+tb",)),
)


@dataclass(frozen=True)
class Entry:
    """One corpus file, ready to send.

    Attributes:
        path: the fresh copy that is sent.
        source: one of ``SOURCES``.
        origin: where it came from (package-relative path, zip member, or
            the DCMTK command that made it).
        sop_class, sop_instance, transfer_syntax: from its file meta.
        has_pixels: it has (7FE0,0010) Pixel Data.
    """

    path: Path
    source: str
    origin: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    has_pixels: bool


@dataclass(frozen=True)
class Exclusion:
    """A candidate left out, with the rule and storescu's or pydicom's words."""

    source: str
    origin: str
    category: str
    detail: str = ""


@dataclass
class Corpus:
    """The kept entries and the exclusions, with the counts a report quotes."""

    entries: list[Entry]
    excluded: list[Exclusion] = field(default_factory=list)

    def by_uid(self) -> dict[str, Entry]:
        """SOP Instance UID -> entry (unique: every copy has a fresh UID)."""
        return {e.sop_instance: e for e in self.entries}

    def paths(self) -> list[Path]:
        """The files to send, in corpus order."""
        return [e.path for e in self.entries]

    def counts(self) -> dict[str, object]:
        """Kept per source, excluded per source and per category."""
        return {
            "kept": dict(Counter(e.source for e in self.entries)),
            "excluded_by_source": dict(Counter(x.source for x in self.excluded)),
            "excluded_by_category": dict(Counter(x.category for x in self.excluded)),
        }

    def to_json(self) -> str:
        """Counts, entries and exclusions, for ``corpus.json`` and reports."""
        return json.dumps({
            "counts": self.counts(),
            "entries": [{**asdict(e), "path": str(e.path)} for e in self.entries],
            "excluded": [asdict(x) for x in self.excluded],
        }, indent=2)


@dataclass(frozen=True)
class _Candidate:
    source: str
    origin: str
    path: Path


def _pydicom_candidates() -> list[_Candidate]:
    """Every file of pydicom's test data list, wheel and pydicom-data apart."""
    out = []
    for name in sorted(pydicom.data.get_testdata_files()):
        path = Path(name)
        if not path.is_file():  # the list holds a few directories
            continue
        if path.is_relative_to(data.WHEEL_DATA):
            out.append(_Candidate(PYDICOM, str(path.relative_to(data.WHEEL_DATA)), path))
        else:
            out.append(_Candidate(PYDICOM_DATA, path.name, path))
    return out


def _deid_candidates(workdir: Path) -> list[_Candidate]:
    """deid-data's ``data/**/*.dcm`` and the members of its ``.zip`` files."""
    import deid_data

    root = Path(deid_data.__file__).parent / "data"
    out = [_Candidate(DEID_DATA, str(p.relative_to(root)), p) for p in sorted(root.rglob("*.dcm"))]
    unzipped = workdir / "deid-zip"
    for archive in sorted(root.rglob("*.zip")):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.endswith("/"):
                    continue
                target = unzipped / archive.stem / Path(member).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
                out.append(_Candidate(DEID_DATA, f"{archive.relative_to(root)}!{member}", target))
    return out


def _dcmtk_candidates(workdir: Path) -> tuple[list[_Candidate], list[Exclusion]]:
    """Run ``CONVERSIONS``; a converter that fails is an exclusion, not an error."""
    out_dir = workdir / "dcmtk"
    out_dir.mkdir(parents=True, exist_ok=True)
    made, failed = [], []
    for i, (name, tool, options) in enumerate(CONVERSIONS):
        src = pydicom.data.get_testdata_file(name)
        origin = f"{tool} {' '.join(options)} {name}".replace("  ", " ")
        if src is None:
            failed.append(Exclusion(DCMTK, origin, CONVERTER_FAILED, f"{name} not in pydicom's data"))
            continue
        target = out_dir / f"{i:02d}_{Path(name).stem}_{tool}{''.join(options).replace('+', '_')}.dcm"
        run = subprocess.run([tool, *options, str(src), str(target)], capture_output=True, text=True,
                             env=peers.peer_env(), timeout=120)
        if run.returncode != 0 or not target.is_file():
            failed.append(Exclusion(DCMTK, origin, CONVERTER_FAILED, (run.stderr or run.stdout).strip()[-300:]))
            continue
        made.append(_Candidate(DCMTK, origin, target))
    return made, failed


def _screen(candidate: _Candidate) -> Exclusion | None:
    """The structural rules (see the module docstring); None when the file passes."""
    def excluded(category: str, detail: str = "") -> Exclusion:
        return Exclusion(candidate.source, candidate.origin, category, detail)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            meta = pydicom.filereader.read_file_meta_info(candidate.path)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is "no meta"
            return excluded(NO_FILE_META, f"{type(exc).__name__}: {exc}"[:200])
        if len(meta) == 0:
            return excluded(NO_FILE_META)
        if not meta.get("TransferSyntaxUID"):
            return excluded(NO_TRANSFER_SYNTAX)
        try:
            ds = pydicom.dcmread(candidate.path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types
            return excluded(UNREADABLE, f"{type(exc).__name__}: {exc}"[:200])
    if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
        return excluded(NO_SOP_UIDS)
    return None


def _permissive_scp_profile(files: list[Path], path: Path) -> tuple[Path, str]:
    """A ``storescp -xf`` profile accepting every (SOP class, syntax) of ``files``.

    An SCP profile lists each SOP class once, with every transfer syntax it
    takes (DCMTK's rule for acceptor profiles), so one context per class.
    """
    pairs = peers._file_contexts(files)
    classes = sorted({sop for sop, _ in pairs})
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]", "[Corpus]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(syntaxes, 1)]
    lines += ["[[PresentationContexts]]", "[Corpus]"]
    lines += [f"PresentationContext{i} = {sop}\\Corpus" for i, sop in enumerate(classes, 1)]
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path.write_text("\n".join(lines) + "\n")
    return path, "Corpus"


class _Trial:
    """A storescp that takes every (SOP class, syntax) of the candidates and stores nothing."""

    def __init__(self, files: list[Path], workdir: Path):
        profile, name = _permissive_scp_profile(files, workdir / "accept-corpus.cfg")
        self.scp = peers.StoreSCP(workdir / "trial-out", ae_title="TRIAL", accept="default",
                                  bit_preserving=False, track_completion=False,
                                  extra_args=["-xf", str(profile), name, "--ignore"])
        self.log = workdir / "trial-storescu.log"

    def __enter__(self) -> _Trial:
        self.scp.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.scp.stop()

    def send(self, files: list[Path]) -> dict[str, peers.StoreOutcome]:
        """storescu's outcome for each file, sent as stored."""
        if not files:
            return {}
        outcomes, runs = peers.storescu_groups(peers.LOOPBACK, self.scp.port, files, called_ae="TRIAL")
        with open(self.log, "a") as log:
            log.write("\n".join(r.stdout for r in runs))
        return outcomes


def build(workdir: str | Path) -> Corpus:
    """Build the corpus under ``workdir`` (see the module docstring).

    Args:
        workdir: an empty folder; the sendable copies go to ``workdir/send``,
            DCMTK's conversions to ``workdir/dcmtk``, ``corpus.json``
            records entries and exclusions.

    Returns:
        The Corpus.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Real files are full of values pydicom warns about; they are the point.
        warnings.simplefilter("ignore")
        corpus = _build(workdir)
    (workdir / "corpus.json").write_text(corpus.to_json())
    return corpus


def _build(workdir: Path) -> Corpus:
    made, excluded = _dcmtk_candidates(workdir)
    candidates = []
    for candidate in _pydicom_candidates() + _deid_candidates(workdir) + made:
        problem = _screen(candidate)
        if problem is None:
            candidates.append(candidate)
        else:
            excluded.append(problem)
    with _Trial([c.path for c in candidates], workdir) as trial:
        # First the file as it is: a file storescu will not send as stored
        # leaves the corpus, whatever a rewrite by pydicom would make of it.
        outcomes = trial.send([c.path for c in candidates])
        sendable = []
        for candidate in candidates:
            outcome = outcomes[str(candidate.path)]
            if outcome.stored:
                sendable.append(candidate)
            else:
                excluded.append(Exclusion(candidate.source, candidate.origin, STORESCU_REFUSED, outcome.reason))
        copies: dict[Path, _Candidate] = {}
        uid_map: dict[str, str] = {}
        for i, candidate in enumerate(sendable):
            target = workdir / "send" / candidate.source / f"{i:04d}_{candidate.path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                data.fresh_copy(candidate.path, target, uid_map, missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types
                target.unlink(missing_ok=True)
                excluded.append(Exclusion(candidate.source, candidate.origin, UNREADABLE,
                                          f"{type(exc).__name__}: {exc}"[:200]))
                continue
            copies[target] = candidate
        # Then the copy that tests send: it must still go as stored.
        outcomes = trial.send(list(copies))
    entries = []
    for path, candidate in copies.items():
        outcome = outcomes[str(path)]
        if not outcome.stored:
            excluded.append(Exclusion(candidate.source, candidate.origin, COPY_REFUSED, outcome.reason))
            continue
        meta = pydicom.filereader.read_file_meta_info(path)
        has_pixels = "PixelData" in pydicom.dcmread(path, defer_size=64)
        entries.append(Entry(path, candidate.source, candidate.origin, str(meta.MediaStorageSOPClassUID),
                             str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), has_pixels))
    return Corpus(entries, excluded)


def main() -> None:
    """``python -m tests.corpus DIR``: build the corpus into DIR and print its counts."""
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    if target.exists():
        shutil.rmtree(target)
    corpus = build(target)
    print(json.dumps(corpus.counts(), indent=2))
    for x in corpus.excluded:
        print(f"{x.source:13s} {x.category:40s} {x.origin}  {x.detail[:120]}")


if __name__ == "__main__":
    main()
