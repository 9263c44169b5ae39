"""Model-free checks on one image's masks: geometry, overlaps, and the masked crop CLIP scores.

Pure functions over COCO RLE and numpy, shared by the verify stage and its tests. Geometry runs on
the mask's own box, not the whole image, so its cost follows the mask, not the photo.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

CROP_FILL = (124, 116, 104)
"""Colour outside the mask in its crop: CLIP's mean pixel, so the background carries no signal."""
EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Geometry:
    area_fraction: float
    fragments: int
    largest_fragment_fraction: float
    border_fraction: float


def rle(counts: str, height: int, width: int) -> dict:
    """A pycocotools RLE object from the counts string stored in the tables."""
    return {"size": [height, width], "counts": counts.encode("ascii")}


def box_slices(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns of the mask's tight box, or None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def geometry(mask: np.ndarray, box: tuple[float, float, float, float] | None = None) -> Geometry:
    """Area share, connected pieces, the largest piece's share, and the share of the image's frame covered.

    ``box`` ([x, y, w, h], as pycocotools' toBbox gives it) spares scanning the whole mask for it.
    """
    height, width = mask.shape
    frame = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]]) if height > 1 else mask[0]
    border = float(frame.mean()) if frame.size else 0.0
    if box is None:
        tight = box_slices(mask)
    else:
        x, y, w, h = (int(round(v)) for v in box)
        tight = (slice(y, y + h), slice(x, x + w)) if w > 0 and h > 0 else None
    if tight is None:
        return Geometry(0.0, 0, 0.0, border)
    labels, pieces = ndimage.label(mask[tight], structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel())[1:]
    area = int(sizes.sum())
    if area == 0:
        return Geometry(0.0, 0, 0.0, border)
    return Geometry(area / (height * width), int(pieces), int(sizes.max()) / area, border)


@dataclass(frozen=True)
class Overlap:
    iou: float
    other: str | None
    """The mask overlapped (its id), or None when there is no such mask."""


def overlaps(
    mask_ids: list[str], pair_ids: list[str], scores: list[float], rles: list[dict], unrelated: Callable[[str, str], bool]
) -> tuple[list[Overlap], list[Overlap]]:
    """Per mask, its largest IoU with a higher-ranked mask of the same pair (a duplicate) and of an unrelated pair (a conflict).

    Rank is by score, then mask id, so exactly one of two equal masks is the duplicate. Related
    pairs (a truck and its pickup truck) may claim the same region: ``unrelated(pair_a, pair_b)`` decides.
    """
    count = len(mask_ids)
    duplicates, conflicts = [Overlap(0.0, None)] * count, [Overlap(0.0, None)] * count
    if count < 2:
        return duplicates, conflicts
    ious = np.asarray(mask_utils.iou(rles, rles, [0] * count))
    rank = sorted(range(count), key=lambda i: (-scores[i], mask_ids[i]))
    for position, i in enumerate(rank):
        for j in rank[:position]:
            if ious[i, j] <= 0:
                continue
            if pair_ids[i] == pair_ids[j]:
                if ious[i, j] > duplicates[i].iou:
                    duplicates[i] = Overlap(float(ious[i, j]), mask_ids[j])
            elif unrelated(pair_ids[i], pair_ids[j]) and ious[i, j] > conflicts[i].iou:
                conflicts[i] = Overlap(float(ious[i, j]), mask_ids[j])
    return duplicates, conflicts


def masked_crop(
    image: Image.Image, mask: np.ndarray, box: tuple[float, float, float, float], padding: float, size: int
) -> Image.Image | None:
    """The mask's ``box`` ([x, y, w, h]) plus ``padding`` of its size, everything outside the mask filled, centred on a ``size`` square.

    Cropped and scaled in one resampling step (Pillow reads only the box), so a large mask on a
    large photo costs no more than a small one. Square so that CLIP's centre crop keeps all of it;
    None for an empty mask.
    """
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return None
    pad = padding * max(w, h)
    x0, y0 = max(0, math.floor(x - pad)), max(0, math.floor(y - pad))
    x1, y1 = min(image.width, math.ceil(x + w + pad)), min(image.height, math.ceil(y + h + pad))
    scale = size / max(x1 - x0, y1 - y0)
    out = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    region = image.resize(out, Image.Resampling.BICUBIC, box=(x0, y0, x1, y1))
    keep = Image.fromarray(mask[y0:y1, x0:x1]).resize(out, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size, size), CROP_FILL)
    canvas.paste(Image.composite(region, Image.new("RGB", out, CROP_FILL), keep), ((size - out[0]) // 2, (size - out[1]) // 2))
    return canvas
