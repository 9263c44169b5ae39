"""Masks between the engine and labelling tools, always through a bitmap so that nothing is lost.

The engine stores COCO RLE (column-major counts, ``pycocotools``). Label Studio's brush RLE is a
different code: a bit-packed run-length code over the row-major H x W x 4 RGBA array, which
``label_studio_sdk.converter.brush`` encodes and decodes. A mask crosses from one to the other as a
bitmap, and comes back bit for bit. A polygon a person draws becomes a bitmap the way COCO rasterises
polygons (``pycocotools``, as CVAT's and Label Studio's own mask exports do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


class MaskError(ValueError):
    """A mask from a tool that cannot be one of the image's: wrong size, empty, undecodable."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        """Short, for counting skips by reason."""


def coco_to_bitmap(counts: str, height: int, width: int) -> np.ndarray:
    """The engine's COCO RLE counts as an H x W bool array."""
    return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


def bitmap_to_coco(bitmap: np.ndarray) -> str:
    """An H x W bool array as COCO RLE counts, the engine's stored form."""
    return mask_utils.encode(np.asfortranarray(bitmap.astype(np.uint8)))["counts"].decode("ascii")


def bitmap_to_brush(bitmap: np.ndarray) -> list[int]:
    """An H x W bool array as Label Studio's brush RLE (the alpha channel carries the mask)."""
    from label_studio_sdk.converter.brush import mask2rle

    return [int(value) for value in mask2rle(bitmap.astype(np.uint8) * 255)]


def brush_to_bitmap(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio's brush RLE as an H x W bool array; a MaskError when it is not a mask of that size, or is empty."""
    from label_studio_sdk.converter.brush import InputStream, bytes2bit, decode_rle

    try:  # the header's count of values first: decoding allocates that many bytes, whatever the code's length
        declared = InputStream(bytes2bit(list(rle[:4]))).read(32) if len(rle) >= 4 else None
    except Exception as exc:  # noqa: BLE001 - the decoder raises whatever a malformed code makes it hit
        raise MaskError("undecodable mask", type(exc).__name__) from None
    if declared is None:
        raise MaskError("undecodable mask", "shorter than its header")
    if declared != height * width * 4:
        raise MaskError("mask not the image's size", f"{declared // 4} pixels on an image of {height} x {width} = {height * width}")
    try:
        flat = decode_rle(list(rle))
    except Exception as exc:  # noqa: BLE001 - the decoder raises whatever a malformed code makes it hit
        raise MaskError("undecodable mask", type(exc).__name__) from None
    bitmap = flat.reshape(height, width, 4)[:, :, 3] > 0
    if not bitmap.any():
        raise MaskError("empty mask")
    return bitmap


def polygon_to_bitmap(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """A polygon's (x, y) vertices in pixels as an H x W bool array, clipped to the image; a MaskError when it is not a
    polygon (fewer than 3 vertices, a coordinate that is not a finite number) or covers no pixel of the image."""
    try:
        flat = [float(value) for point in points for value in point]
        well_formed = all(len(point) == 2 for point in points)
    except (TypeError, ValueError):
        raise MaskError("undecodable polygon", "vertices must be pairs of numbers") from None
    if not well_formed or len(flat) < 6 or not all(math.isfinite(value) for value in flat):
        raise MaskError("undecodable polygon", f"{len(points)} vertices; a polygon needs at least 3 pairs of finite numbers")
    bitmap = mask_utils.decode(mask_utils.frPyObjects([flat], height, width))[:, :, 0].astype(bool)
    if not bitmap.any():
        raise MaskError("empty mask")
    return bitmap


def box_of(counts: str, height: int, width: int) -> list[float]:
    """The mask's box [x, y, w, h] in pixels, as the engine stores it for its own masks."""
    return [float(v) for v in mask_utils.toBbox({"size": [height, width], "counts": counts.encode("ascii")})]
