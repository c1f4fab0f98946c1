"""Lossless encoders pydicom's own plugins lack, as pydicom encoding plugins (imagecodecs).

JPEG Lossless, Process 14, Selection Value 1 (1.2.840.10008.1.2.4.70):
pydicom 3.0 decodes it (with :mod:`workers.decoders`) but neither pydicom,
pylibjpeg nor pyjpegls encodes it. imagecodecs wraps libjpeg-turbo 3, whose lossless
mode (``jpeg_enable_lossless``) writes a SOF3 frame with the predictor
(Selection Value) and point transform asked for: predictor 1 and point
transform 0 is the bitstream PS3.5 §8.2.1 names for .70 (ITU-T T.81 Annex H).

JPEG 2000 lossless (.4.90): pylibjpeg-openjpeg always asks OpenJPEG for six
resolution levels, which an image under 32 pixels a side does not have
(``opj_start_compress`` fails); imagecodecs' OpenJPEG takes the number of
levels, so it encodes those, after pylibjpeg, with the same reversible 5-3
wavelet and no colour transform.

This module follows pydicom's plugin protocol (``is_available``,
``ENCODER_DEPENDENCIES``, one function per frame), so pydicom's
:class:`Encoder` checks each image against PS3.5 §8.2's tables and cuts the
frames as for its own encoders. Every result is still decoded by pydicom and
compared with the source (workers/transcode.py) before it is sent.
"""

from __future__ import annotations

import math
from importlib.util import find_spec

import numpy as np
from pydicom.pixels.encoders.base import Encoder, EncodeRunner
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

PREDICTOR = 1  # Selection Value 1: the pixel to the left (T.81 Table H.1)
MIN_PRECISION = 2  # T.81 §H.4.1.2.1: lossless sample precision is 2 to 16 bits
MAX_RESOLUTIONS = 6  # what pylibjpeg-openjpeg uses

ENCODER_DEPENDENCIES = {
    JPEGLosslessSV1: ("numpy", "imagecodecs>=2024.1.1"),
    JPEG2000Lossless: ("numpy", "imagecodecs>=2024.1.1"),
}


def is_available(uid: str) -> bool:
    """Whether imagecodecs, with the codec for ``uid``, is installed."""
    if uid not in ENCODER_DEPENDENCIES or find_spec("imagecodecs") is None:
        return False
    import imagecodecs

    codec = imagecodecs.JPEG8 if uid == JPEGLosslessSV1 else imagecodecs.JPEG2K
    return bool(codec.available)


def _frame(src: bytes, runner: EncodeRunner, signed: bool) -> np.ndarray:
    """One frame's bytes (interleaved samples, smallest container for Bits Stored) as an array."""
    if runner.samples_per_pixel > 1 and runner.planar_configuration != 0:
        raise ValueError("expected interleaved samples (Planar Configuration 0)")
    size = 1 if runner.bits_stored <= 8 else 2
    dtype = np.dtype(f"<{'i' if signed else 'u'}{size}")
    shape = (runner.rows, runner.columns) + ((runner.samples_per_pixel,) if runner.samples_per_pixel > 1 else ())
    return np.frombuffer(src, dtype=dtype).reshape(shape)


def _encode_jpeg_lossless(src: bytes, runner: EncodeRunner) -> bytes:
    """One frame as a SOF3 (Process 14, SV1) codestream.

    Signed samples are written as their Bits Stored low bits (two's
    complement, as the decoders read them back).

    Raises:
        ValueError: a precision the encoder cannot take.
    """
    import imagecodecs

    bits = runner.bits_stored
    if bits < MIN_PRECISION:
        raise ValueError(f"lossless JPEG needs at least {MIN_PRECISION} bits stored, not {bits}")
    arr = _frame(src, runner, signed=False)
    if runner.pixel_representation:
        arr = arr & np.asarray((1 << bits) - 1, dtype=arr.dtype)
    # No colour conversion: libjpeg's default would turn three samples into
    # YCbCr; the components are encoded as they are.
    space = "RGB" if runner.samples_per_pixel == 3 else None
    return bytes(imagecodecs.jpeg8_encode(arr, lossless=True, predictor=PREDICTOR, bitspersample=bits,
                                          colorspace=space, outcolorspace=space))


def _encode_small_j2k(src: bytes, runner: EncodeRunner) -> bytes:
    """One frame as a reversible JPEG 2000 codestream with as many resolution levels as it has sides for."""
    import imagecodecs

    if runner.bits_stored > 16:
        raise ValueError(f"{runner.bits_stored} bits stored: at most 16 here")
    side = min(runner.rows, runner.columns)
    levels = max(1, min(MAX_RESOLUTIONS, int(math.log2(side)) + 1))
    arr = _frame(src, runner, signed=bool(runner.pixel_representation))
    return bytes(imagecodecs.jpeg2k_encode(arr, level=0, codecformat="J2K", reversible=True, mct=False,
                                           resolutions=levels, bitspersample=runner.bits_stored))


JPEGLosslessSV1Encoder = Encoder(JPEGLosslessSV1)
JPEGLosslessSV1Encoder.add_plugin("imagecodecs", ("workers.encoders", "_encode_jpeg_lossless"))

# pydicom's own plugin first, then imagecodecs for what it cannot take. A
# separate Encoder: pydicom's module-level one is left as pydicom made it.
JPEG2000LosslessEncoder = Encoder(JPEG2000Lossless)
JPEG2000LosslessEncoder.add_plugins([
    ("pylibjpeg", ("pydicom.pixels.encoders.pylibjpeg", "_encode_frame")),
    ("imagecodecs", ("workers.encoders", "_encode_small_j2k")),
])

ENCODERS = {JPEGLosslessSV1: JPEGLosslessSV1Encoder, JPEG2000Lossless: JPEG2000LosslessEncoder}
"""The encoders to use instead of pydicom's ``get_encoder`` for these syntaxes."""
