"""Apply morph operations to a copy of an instance.

:func:`apply` never touches its input: one instance may go untouched to the
PACS and de-identified to research, both from the same spooled file. Each
operation sees the result of the ones before it, in the order the rules
list them. Pixel data is carried over as the same bytes.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList

from rules import ops
from rules.context import MorphContext, MorphError
from rules.pseudonyms import day_offset, hash_text, remap_uid, shift_da, shift_dt
from rules.tags import TagPath, TagRef
from rules.values import FLOAT_VRS, INT_VRS, element_text, patient_key, vr_of

log = logging.getLogger(__name__)

BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
# Text VRs whose value is one string that may contain backslashes (PS3.5 6.2).
SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
CURVES = ops.TagMask("(50xx,xxxx)", 0xFF000000, 0x50000000)
OVERLAYS = ops.TagMask("(60xx,xxxx)", 0xFF000000, 0x60000000)


def apply(ds: Dataset, operations: Sequence[ops._Op], ctx: MorphContext) -> Dataset:
    """Return a new dataset with the operations applied in order.

    A changed SOP Instance UID or SOP Class UID is mirrored into the file
    meta information (PS3.10 7.1), so ``save_as(enforce_file_format=True)``
    writes a consistent file.

    Raises:
        MorphError: an operation cannot be done (a value that does not fit
            its VR, a missing secret); the delivery should fail for good.
    """
    out = clone(ds)
    for op in operations:
        _HANDLERS[type(op)](out, op, ctx)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        if "SOPClassUID" in out:
            meta.MediaStorageSOPClassUID = out.SOPClassUID
    return out


def clone(ds: Dataset) -> Dataset:
    """An independent copy of ``ds``, several times cheaper than ``copy.deepcopy``.

    Elements not yet decoded (pydicom's ``RawDataElement``: immutable tuples
    of the bytes read) are shared, so untouched attributes — Pixel Data
    above all — keep their exact bytes and cost nothing to copy. Decoded
    elements are copied; sequences deeply. The file meta is copied too.
    """
    out = copy.copy(ds)  # same class and file-level attributes (preamble, file_meta...)
    elements: dict[Any, Any] = {}
    for tag, elem in ds.items():
        if isinstance(elem, RawDataElement):
            elements[tag] = elem
        elif elem.VR == "SQ":
            elements[tag] = copy.deepcopy(elem)
        else:
            dup = copy.copy(elem)
            if isinstance(elem.value, ConstrainedList):
                dup._value = copy.copy(elem.value)
            elements[tag] = dup
    # Dataset keeps its elements in ``_dict``; a shallow copy would share it with the input.
    out._dict = elements
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = copy.deepcopy(meta)
    return out


def walk(ds: Dataset) -> Iterator[tuple[Dataset, DataElement]]:
    """Every (container, element) pair, depth first through sequence items.

    The tag list of each dataset is taken before yielding, so callers may
    delete the element they were given.
    """
    for tag in list(ds.keys()):
        if tag not in ds:
            continue
        elem = ds[tag]
        yield ds, elem
        if elem.VR == "SQ" and tag in ds and isinstance(elem.value, ConstrainedList):
            for item in elem.value:
                yield from walk(item)


def walk_vr(ds: Dataset, vrs: frozenset[str]) -> Iterator[tuple[Dataset, DataElement]]:
    """Like :func:`walk`, but only elements of the given VRs are decoded and yielded.

    Decoding every element of a header costs more than remapping its UIDs.
    """
    for tag in list(ds.keys()):
        vr = vr_of(ds, tag)
        if vr in vrs:
            yield ds, ds[tag]
        if vr == "SQ" and tag in ds:
            seq = ds[tag].value
            if isinstance(seq, ConstrainedList):
                for item in seq:
                    yield from walk_vr(item, vrs)


def coerce(vr: str, text: str) -> Any:
    """A value for an element of ``vr`` from its DICOM string form (``\\`` separates values)."""
    if vr == "SQ":
        raise MorphError("a sequence cannot be given a text value")
    if vr in BYTES_VRS:
        return text.encode()
    if vr in SINGLE_TEXT_VRS:
        return text
    if text == "":
        return None if vr in INT_VRS | FLOAT_VRS | {"AT"} else ""
    parts = text.split("\\")
    try:
        if vr in INT_VRS:
            values: list[Any] = [int(p) for p in parts]
        elif vr in FLOAT_VRS:
            values = [float(p) for p in parts]
        elif vr == "AT":
            values = [int(p.strip("()").replace(",", ""), 16) for p in parts]
        else:
            values = parts
    except ValueError:
        raise MorphError(f"{text!r} is not a valid {vr} value") from None
    return values[0] if len(values) == 1 else values


def write(container: Dataset, ref: TagRef, vr: str | None, text: str) -> None:
    """Set one attribute from text, creating it (and a private block) when absent."""
    if ref.creator is not None:
        tag = container.private_block(ref.group, ref.creator, create=True).get_tag(ref.element)
    else:
        tag = (ref.group << 16) | ref.element
    existing = container.get(tag)
    vr = vr or (existing.VR if existing is not None else None) or ref.vr
    if vr is None:
        raise MorphError(f"no VR known for {ref}")
    value = coerce(vr, text)
    if existing is not None and existing.VR == vr:
        existing.value = value
    else:
        container.add_new(tag, vr, value)


def _render(parts: Sequence[str | ops.Placeholder], ds: Dataset, ctx: MorphContext) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        elem = part.path.first(ds)
        text = element_text(elem) if elem is not None else ""
        if part.filter == "hash":
            text = hash_text(ctx.require_secret("the |hash template filter"), text)
        elif part.filter == "upper":
            text = text.upper()
        elif part.filter == "lower":
            text = text.lower()
        out.append(text)
    return "".join(out)


def _set(ds: Dataset, op: ops.SetOp, ctx: MorphContext) -> None:
    for path, spec in op.set.items():
        text = _render(spec.parts, ds, ctx)
        for container in list(path.containers(ds)):
            write(container, path.leaf, spec.vr, text)


def _delete_path(ds: Dataset, path: TagPath) -> None:
    leaf = path.steps[-1]
    for container in list(path.containers(ds)):
        tag = leaf.ref.resolve(container)
        if tag is None or tag not in container:
            continue
        if leaf.index is None or leaf.index == "*":
            del container[tag]
        elif isinstance(container[tag].value, ConstrainedList) and leaf.index < len(container[tag].value):
            del container[tag].value[leaf.index]


def _delete_mask(ds: Dataset, mask: ops.TagMask) -> None:
    for container, elem in list(walk(ds)):
        if mask.matches(int(elem.tag)) and elem.tag in container:
            del container[elem.tag]


def _delete(ds: Dataset, op: ops.DeleteOp, ctx: MorphContext) -> None:
    for target in op.delete:
        if isinstance(target, TagPath):
            _delete_path(ds, target)
        elif isinstance(target, ops.TagMask):
            _delete_mask(ds, target)
        elif target == "private":
            remove_private(ds, keep_creators=())
        else:
            _delete_mask(ds, CURVES if target == "curves" else OVERLAYS)


def remove_private(ds: Dataset, keep_creators: Sequence[str]) -> None:
    """Delete private attributes everywhere, except the blocks of the creators to keep."""
    keep = set(keep_creators)
    for container, elem in list(walk(ds)):
        tag = elem.tag
        if not tag.is_private or tag not in container:
            continue
        if keep:
            if tag.is_private_creator:
                creator = elem.value
            elif tag.element >= 0x1000:
                creator_tag = (tag.group << 16) | (tag.element >> 8)
                creator = container[creator_tag].value if creator_tag in container else None
            else:
                creator = None
            if isinstance(creator, str) and creator.strip() in keep:
                continue
        del container[tag]


def _remove_private(ds: Dataset, op: ops.RemovePrivateOp, ctx: MorphContext) -> None:
    remove_private(ds, op.remove_private.keep_creators)


def _copy(ds: Dataset, op: ops.CopyOp, ctx: MorphContext) -> None:
    source = op.copy_.from_.first(ds)
    if source is None:
        return
    for container in list(op.copy_.to.containers(ds)):
        vr = op.copy_.to.vr or source.VR
        if vr == "SQ" or source.VR == "SQ":
            raise MorphError("copy does not copy sequences")
        write(container, op.copy_.to.leaf, vr, element_text(source))


def _map_values(ds: Dataset, path: TagPath, change: Callable[[str], str]) -> None:
    """Rewrite each value of each element the path names, keeping multiplicity."""
    for elem in list(path.elements(ds)):
        if elem.VR in BYTES_VRS | INT_VRS | FLOAT_VRS | {"SQ", "AT"} or elem.value is None:
            continue
        if isinstance(elem.value, ConstrainedList):
            elem.value = [change(str(v)) for v in elem.value]
        else:
            elem.value = change(str(elem.value))


def _regex(ds: Dataset, op: ops.RegexOp, ctx: MorphContext) -> None:
    compiled = re.compile(op.regex.pattern)
    try:
        _map_values(ds, op.regex.tag, lambda v: compiled.sub(op.regex.replace, v))
    except (re.error, IndexError) as exc:
        raise MorphError(f"regex replacement {op.regex.replace!r}: {exc}") from None


def _prefix(ds: Dataset, op: ops.PrefixOp, ctx: MorphContext) -> None:
    for path, text in op.prefix.items():
        _map_values(ds, path, lambda v, t=text: t + v)


def _suffix(ds: Dataset, op: ops.SuffixOp, ctx: MorphContext) -> None:
    for path, text in op.suffix.items():
        _map_values(ds, path, lambda v, t=text: v + t)


def remap_uids(ds: Dataset, secret: bytes, only: Sequence[TagPath] | None = None) -> None:
    """Replace UIDs (every UI element, or only the paths given) by their HMAC ``2.25.`` form."""
    if only is None:
        elements = [elem for _, elem in walk_vr(ds, frozenset({"UI"}))]
    else:
        elements = [elem for path in only for elem in path.elements(ds) if elem.VR == "UI"]
    for elem in elements:
        if isinstance(elem.value, ConstrainedList):
            elem.value = [remap_uid(secret, str(v)) for v in elem.value]
        elif elem.value:
            elem.value = remap_uid(secret, str(elem.value))


def _uid_remap(ds: Dataset, op: ops.UidRemapOp, ctx: MorphContext) -> None:
    remap_uids(ds, ctx.require_secret("uid_remap"), op.uid_remap.tags)


def shift_dates(ds: Dataset, days: int) -> None:
    """Move every DA and DT value by ``days``; a value that is not a date is emptied, not leaked."""
    for _, elem in list(walk_vr(ds, frozenset({"DA", "DT"}))):
        if not elem.value:
            continue
        shift = shift_da if elem.VR == "DA" else shift_dt
        values = list(elem.value) if isinstance(elem.value, ConstrainedList) else [elem.value]
        shifted = [shift(str(v), days) for v in values]
        if None in shifted:
            log.warning("date_shift: %s (%s) is not a valid %s; emptied", elem.tag, elem.keyword, elem.VR)
            elem.value = ""
        else:
            elem.value = shifted if len(shifted) > 1 else shifted[0]


def _date_shift(ds: Dataset, op: ops.DateShiftOp, ctx: MorphContext) -> None:
    secret = ctx.require_secret("date_shift")
    shift_dates(ds, day_offset(secret, patient_key(ds), op.date_shift.max_days))


def _anonymize(ds: Dataset, op: ops.AnonymizeOp, ctx: MorphContext) -> None:
    from rules.deid import anonymize  # the profile table is loaded on first use

    anonymize(ds, op.anonymize, ctx)


_HANDLERS: dict[type, Callable[[Dataset, Any, MorphContext], None]] = {
    ops.SetOp: _set,
    ops.DeleteOp: _delete,
    ops.RemovePrivateOp: _remove_private,
    ops.CopyOp: _copy,
    ops.RegexOp: _regex,
    ops.PrefixOp: _prefix,
    ops.SuffixOp: _suffix,
    ops.UidRemapOp: _uid_remap,
    ops.DateShiftOp: _date_shift,
    ops.AnonymizeOp: _anonymize,
}
