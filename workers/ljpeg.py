"""JPEG Lossless, Process 14, Selection Value 1 (1.2.840.10008.1.2.4.70): an encoder pydicom lacks.

pydicom 3.0 decodes this syntax (pylibjpeg-libjpeg) but ships no encoder for
it, and neither do pylibjpeg or pyjpegls. imagecodecs wraps libjpeg-turbo 3,
whose lossless mode (``jpeg_enable_lossless``) writes a SOF3 frame with the
predictor (Selection Value) and point transform asked for: predictor 1 and
point transform 0 is exactly the bitstream PS3.5 §8.2.1 names for .70
(ITU-T T.81 Annex H, Process 14). This module is a pydicom encoding plugin
(the ``is_available`` / ``ENCODER_DEPENDENCIES`` / encode-function protocol
of ``pydicom.pixels.encoders``), so pydicom's :class:`Encoder` checks the
image against PS3.5 Table 8.2.1-2 and cuts frames as for its own encoders.
Every result is still decoded by pydicom and compared with the source
(workers/transcode.py) before it is sent.
"""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
from pydicom.pixels.encoders.base import Encoder, EncodeRunner
from pydicom.uid import JPEGLosslessSV1

PREDICTOR = 1  # Selection Value 1: the pixel to the left (T.81 Table H.1)
MIN_PRECISION = 2  # T.81 §H.4.1.2.1: lossless sample precision is 2 to 16 bits

ENCODER_DEPENDENCIES = {JPEGLosslessSV1: ("numpy", "imagecodecs>=2024.1.1")}


def is_available(uid: str) -> bool:
    """Whether imagecodecs with a libjpeg-turbo able to encode lossless JPEG is installed."""
    if uid != JPEGLosslessSV1 or find_spec("imagecodecs") is None:
        return False
    import imagecodecs

    return bool(imagecodecs.JPEG8.available)


def _encode_frame(src: bytes, runner: EncodeRunner) -> bytes:
    """One frame (interleaved samples, in the smallest container for Bits Stored) as a SOF3 codestream.

    Signed samples are written as their Bits Stored low bits (two's
    complement, as PS3.5 §8.2.1 and the decoders read them back).

    Raises:
        ValueError: a precision or layout the encoder cannot take.
    """
    import imagecodecs

    bits = runner.bits_stored
    if bits < MIN_PRECISION:
        raise ValueError(f"lossless JPEG needs at least {MIN_PRECISION} bits stored, not {bits}")
    if runner.samples_per_pixel > 1 and runner.planar_configuration != 0:
        raise ValueError("lossless JPEG is encoded from interleaved samples (Planar Configuration 0)")
    dtype = np.uint8 if bits <= 8 else np.dtype("<u2")
    shape = (runner.rows, runner.columns) + ((runner.samples_per_pixel,) if runner.samples_per_pixel > 1 else ())
    arr = np.frombuffer(src, dtype=dtype).reshape(shape)
    if runner.pixel_representation:
        arr = arr & np.asarray((1 << bits) - 1, dtype=dtype)
    # No colour conversion: libjpeg's default would turn three samples into
    # YCbCr (PS3.5 §8.2.1: the components are encoded as they are).
    space = "RGB" if runner.samples_per_pixel == 3 else None
    return bytes(imagecodecs.jpeg8_encode(arr, lossless=True, predictor=PREDICTOR, bitspersample=bits,
                                          colorspace=space, outcolorspace=space))


JPEGLosslessSV1Encoder = Encoder(JPEGLosslessSV1)
JPEGLosslessSV1Encoder.add_plugin("imagecodecs", ("workers.ljpeg", "_encode_frame"))
