"""JPEG decoding (ISO/IEC 10918-1) for pydicom through imagecodecs, as a pydicom decoding plugin.

pydicom 3.0 decodes the four JPEG syntaxes (baseline .50, extended .51,
lossless .57 and .70) with GDCM, pylibjpeg-libjpeg or Pillow. libjpeg is
GPLv3, which an Apache-2.0 runtime does not take; Pillow decodes 8-bit DCT
images only (no 12-bit extended, no lossless); pydicom's GDCM plugin refuses
12-bit extended, and installing GDCM would also put it first for JPEG-LS
and JPEG 2000, whose decoders need no replacing. imagecodecs (BSD-3-Clause,
here already for encoding: workers/encoders.py) wraps libjpeg-turbo 3, which
decodes every process DICOM uses: 8- and 12-bit DCT, and lossless (T.81
Annex H) at 2 to 16 bits. JPEG-LS stays pyjpegls's and JPEG 2000
pylibjpeg-openjpeg's, through pydicom's own plugins.

The samples come out as coded, with no colour conversion, as from pydicom's
other plugins: pydicom converts YCbCr to RGB itself when asked, and
workers/transcode.py never asks. Importing this module adds the plugin to
pydicom's decoders, after pydicom's own (``Decoder.add_plugin``, pydicom's
way to add one), so every ``pixel_array`` in the process can use it.
"""

from __future__ import annotations

from importlib.util import find_spec

from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import JPEGTransferSyntaxes

DECODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs>=2024.1.1") for uid in JPEGTransferSyntaxes}


def is_available(uid: str) -> bool:
    """Whether imagecodecs, with its libjpeg-turbo codec, is installed for ``uid``."""
    if uid not in DECODER_DEPENDENCIES or find_spec("imagecodecs") is None:
        return False
    import imagecodecs

    return bool(imagecodecs.JPEG8.available)


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's samples, interleaved, each in the container Bits Allocated gives.

    Raises:
        ValueError: the codestream's precision does not fit Bits Allocated.
        imagecodecs.Jpeg8Error: libjpeg-turbo cannot decode the codestream.
    """
    import imagecodecs

    # The same colour space in and out is libjpeg's null conversion: a JFIF
    # or Adobe marker would otherwise have three components turned into RGB.
    space = "RGB" if runner.samples_per_pixel == 3 else None
    arr = imagecodecs.jpeg8_decode(src, colorspace=space, outcolorspace=space)
    size = runner.bits_allocated // 8
    if arr.dtype.itemsize > size:
        raise ValueError(f"{8 * arr.dtype.itemsize}-bit samples do not fit Bits Allocated {runner.bits_allocated}")
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)  # libjpeg interleaves the components
    return arr.astype(f"<u{size}", copy=False).tobytes()


for _syntax in JPEGTransferSyntaxes:
    get_decoder(_syntax).add_plugin("imagecodecs", ("workers.decoders", "_decode_frame"))
