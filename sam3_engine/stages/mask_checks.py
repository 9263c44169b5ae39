"""Model-free checks on one image's masks: geometry, overlaps, and the masked crop CLIP scores.

Pure functions over COCO RLE and numpy, shared by the verify stage and its tests. Geometry runs on
the mask's own box, not the whole image, so its cost follows the mask, not the photo.
"""

from __future__ import annotations

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


def geometry(mask: np.ndarray) -> Geometry:
    """Area share, connected pieces, the largest piece's share, and the share of the image's frame covered."""
    height, width = mask.shape
    area = int(mask.sum())
    frame = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]]) if height > 1 else mask[0]
    border = float(frame.mean()) if frame.size else 0.0
    box = box_slices(mask)
    if box is None:
        return Geometry(0.0, 0, 0.0, border)
    labels, pieces = ndimage.label(mask[box], structure=EIGHT_CONNECTED)
    largest = int(np.bincount(labels.ravel())[1:].max())
    return Geometry(area / (height * width), int(pieces), largest / area, border)


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


def masked_crop(image: np.ndarray, mask: np.ndarray, padding: float) -> Image.Image | None:
    """The mask's box (plus ``padding`` of its size) with everything outside the mask filled, padded to a square.

    Square so that CLIP's centre crop keeps all of it; None for an empty mask.
    """
    box = box_slices(mask)
    if box is None:
        return None
    height, width = mask.shape
    rows, cols = box
    pad = int(round(padding * max(rows.stop - rows.start, cols.stop - cols.start)))
    rows = slice(max(0, rows.start - pad), min(height, rows.stop + pad))
    cols = slice(max(0, cols.start - pad), min(width, cols.stop + pad))
    region = image[rows, cols].copy()
    region[~mask[rows, cols]] = CROP_FILL
    side = max(region.shape[:2])
    square = np.empty((side, side, 3), np.uint8)
    square[:] = CROP_FILL
    top, left = (side - region.shape[0]) // 2, (side - region.shape[1]) // 2
    square[top : top + region.shape[0], left : left + region.shape[1]] = region
    return Image.fromarray(square)
