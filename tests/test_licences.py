"""The runtime holds no GPL or AGPL code, and NOTICE lists what it depends on.

dicom-router is Apache-2.0. A GPL or AGPL library in the process would bind
every deployment to its terms, so no runtime dependency of ``dicom-router``,
direct or transitive, may be under either. The requirements are walked from
the installed distributions' metadata (``Requires-Dist``, markers evaluated
here, extras followed where a requirement asks for them; the ``test`` extra
is not runtime), and each distribution's licence is read: its
``License-Expression`` where it has one (PEP 639 makes it the authority,
and an SPDX ``OR`` lets the user pick any alternative), else its ``License``
text and ``License ::`` classifiers together. Any of them naming the GPL or
AGPL fails.

LGPL is flagged too, and allowed only for a distribution listed in
:data:`LGPL_DECIDED` with the reason: its terms depend on how the library
is combined (linked, unmodified, replaceable), which is a decision for a
person, not for this test. None is listed: no runtime dependency is LGPL.

Reading installed metadata is pure logic: no peer is involved.
"""

from __future__ import annotations

import re
from email.message import Message
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# LGPL distributions accepted at run time, each with why (none today).
LGPL_DECIDED: dict[str, str] = {}

_LESSER = re.compile(r"\bLGPL|GNU (Lesser|Library)", re.IGNORECASE)
_COPYLEFT = re.compile(r"\b(A|L)?GPL|GNU (Affero |Lesser |Library )?(General Public|GPL)", re.IGNORECASE)


def _runtime_distributions(root: str = "dicom-router") -> dict[str, metadata.Distribution]:
    """Every installed distribution ``root`` needs at run time, itself included, by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while pending:
        name, extras = pending.pop()
        if canonicalize_name(name) in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise AssertionError(f"{name} is required but not installed: its licence cannot be read") from exc
        found[canonicalize_name(name)] = dist
        for line in dist.requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                 for extra in extras or {""}):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def _licences(meta: Message) -> list[str]:
    """What a distribution's metadata says of its licence: the SPDX expression, else free text and classifiers."""
    if (meta.get("License-Expression") or "").strip():
        return [meta["License-Expression"]]
    said = [meta.get("License") or ""] + [c for c in meta.get_all("Classifier") or () if c.startswith("License ::")]
    return [text for text in said if text.strip()]


def _copyleft(licences: list[str]) -> str | None:
    """'GPL' when a licence names the GPL or AGPL, 'LGPL' when only the LGPL, else None.

    Of SPDX alternatives (``MIT OR GPL-2.0-only``) one may be chosen: only
    when every one is copyleft is the licence.
    """
    kinds = set()
    for text in licences:
        alternatives = re.split(r"\s+OR\s+", text)
        named = [alternative for alternative in alternatives if _COPYLEFT.search(alternative)]
        if named and len(named) == len(alternatives):
            kinds.add("LGPL" if all(_LESSER.search(alternative) for alternative in named) else "GPL")
    return "GPL" if "GPL" in kinds else "LGPL" if kinds else None


def test_no_runtime_dependency_is_gpl_or_agpl():
    """No distribution dicom-router needs at run time, direct or transitive, is under the GPL or
    AGPL, and an LGPL one only with a decision in LGPL_DECIDED."""
    problems = []
    for name, dist in sorted(_runtime_distributions().items()):
        licences = _licences(dist.metadata)
        kind = _copyleft(licences)
        if kind == "GPL" or (kind == "LGPL" and name not in LGPL_DECIDED):
            problems.append(f"{name} {dist.version}: {kind}: {licences}")
    assert not problems, problems


def test_every_runtime_dependency_states_a_licence():
    """Each runtime distribution says what its licence is, so the check above has something to read."""
    silent = [name for name, dist in _runtime_distributions().items() if not _licences(dist.metadata)]
    assert not silent, silent


def test_copyleft_is_recognised_in_each_field():
    """GPL and AGPL are found in an SPDX expression, a free-text License or a classifier (pylibjpeg-libjpeg's
    own words); LGPL is told apart; a permissive alternative or text passes. Sample texts: the rule is the subject."""
    assert _copyleft(["GPL V3.0", "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]) == "GPL"
    assert _copyleft(["AGPL-3.0-only"]) == "GPL"
    assert _copyleft(["License :: OSI Approved :: GNU Affero General Public License v3"]) == "GPL"
    assert _copyleft(["MIT OR GPL-2.0-or-later"]) is None
    assert _copyleft(["GPL-2.0-only OR LGPL-2.1-only"]) == "GPL"
    assert _copyleft(["LGPL-2.1-or-later"]) == "LGPL"
    assert _copyleft(["License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)"]) == "LGPL"
    assert _copyleft(["BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", "MPL-2.0 AND MIT"]) is None
    assert _copyleft(["License :: OSI Approved :: Apache Software License"]) is None


def test_dicom_router_declares_apache_2_with_its_licence_files():
    """dicom-router itself: License-Expression Apache-2.0 (PEP 639), LICENSE and NOTICE among its licence files."""
    meta = metadata.distribution("dicom-router").metadata
    assert meta.get("License-Expression") == "Apache-2.0"
    assert {Path(f).name for f in meta.get_all("License-File") or ()} >= {"LICENSE", "NOTICE"}
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_notice_names_every_direct_runtime_dependency_and_its_licence():
    """NOTICE lists each package dicom-router requires directly, with what its metadata says of its licence."""
    notice = (ROOT / "NOTICE").read_text()
    listed = {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^\s*([A-Za-z0-9._-]+)\s{2,}(\S.*)$", notice, re.M)}
    missing = []
    for line in metadata.requires("dicom-router") or ():
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in listed:
            missing.append(name)
    assert not missing, f"NOTICE lacks {missing}"
