"""Destinations that accept only one compressed transfer syntax get every lossless source in it.

A DCMTK ``storescp`` is limited, by an association config (``-xf FILE
PROFILE``), to exactly one transfer syntax for the SOP classes sent: its
``+x`` options only *prefer* a syntax and still accept the uncompressed ones.
The router proposes each instance's own syntax and the destination's
preferences; the peer accepts only the target, so each instance arrives in
it: transcoded (decoded, encoded losslessly, verified) or, when it already
is in that syntax, as it is. What storescp wrote is checked: its file meta
says the target syntax, its UIDs are the source's, and its pixels decode
(pydicom) to exactly the source's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from tests import data
from tests.peers import LOOPBACK, storescu
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config
from workers import decoders  # noqa: F401 - pydicom decodes JPEG here as the router does (workers/decoders.py)

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::UserWarning:pydicom")]

# Lossless sources in every syntax the suite has them in: explicit and
# implicit little endian, big endian, deflate, RLE, JPEG Lossless SV1,
# JPEG-LS lossless, JPEG 2000 lossless; grey 8 and 16 bit, signed, and RGB.
SOURCES = [
    "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "SC_rgb.dcm",
    "SC_rgb_16bit.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
]
TARGETS = {"rle": RLELossless, "jpeg-lossless": JPEGLosslessSV1, "jpeg-ls-lossless": JPEGLSLossless,
           "jpeg-2000-lossless": JPEG2000Lossless}


def _only(syntax: str, files: list[Path], path: Path) -> list[str]:
    """storescp options accepting exactly ``syntax`` for the SOP classes of ``files``, nothing else."""
    classes = sorted({str(pydicom.filereader.read_file_meta_info(f).MediaStorageSOPClassUID) for f in files})
    lines = ["[[TransferSyntaxes]]", "[Only]", f"TransferSyntax1 = {syntax}",
             "[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{i} = {sop}\\Only" for i, sop in enumerate(classes, 1)]
    lines += ["[[Profiles]]", "[OnlyOne]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "OnlyOne"]


@pytest.mark.parametrize("choice", list(TARGETS))
def test_destination_taking_one_compressed_syntax_gets_every_lossless_source_in_it(
    choice, tmp_path, redis_url, storescp_factory
):
    """Every lossless source reaches a storescp that accepts only ``choice``, in that syntax,
    with its UIDs, decoding to exactly the source's pixels."""
    target = TARGETS[choice]
    sources = [Path(pydicom.data.get_testdata_file(name)) for name in SOURCES]
    files = data.fresh_copies(sources, tmp_path / "in")
    peer = storescp_factory(ae_title="ONLYONE", accept="default",
                            extra_args=_only(target, files, tmp_path / "only.cfg"))
    config = router_config(tmp_path / "router", {
        "only": destination(peer.port, "ONLYONE", transfer_syntaxes=["as-received", choice]),
    }, redis_url=redis_url)
    (tmp_path / "router").mkdir()
    with RouterProcess(tmp_path / "router", config) as router:
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == len(files), sent.stdout[-3000:]
        peer.wait_for_files(len(files), timeout=60)
    received = peer.received()
    for source, copy in zip(sources, files, strict=True):
        uid = data.sop_instance_uid(copy)
        assert uid in received, f"{source.name} did not arrive"
        got = pydicom.dcmread(received[uid])
        assert got.file_meta.TransferSyntaxUID == target, source.name
        original = pydicom.dcmread(copy)
        assert got.SOPInstanceUID == original.SOPInstanceUID and got.StudyInstanceUID == original.StudyInstanceUID
        assert np.array_equal(pixel_array(got, raw=True), pixel_array(original, raw=True)), source.name
