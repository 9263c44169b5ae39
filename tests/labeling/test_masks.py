"""Masks cross to Label Studio's brush code and back bit for bit, and a bad one is refused in a line."""

import tracemalloc

import numpy as np
import pytest

from sam3_engine.labeling.masks import MaskError, bitmap_to_brush, bitmap_to_coco, brush_to_bitmap, coco_to_bitmap
from tests.helpers import rows


def test_the_quickstarts_masks_survive_the_brush_code_bit_for_bit(quickstart):
    run_dir, _ = quickstart
    masks = rows(run_dir, "SELECT height, width, rle_counts FROM masks ORDER BY mask_id LIMIT 12")
    assert masks
    for mask in masks:
        bitmap = coco_to_bitmap(mask["rle_counts"], mask["height"], mask["width"])
        brush = bitmap_to_brush(bitmap)
        assert brush != list(mask["rle_counts"].encode())  # a different code, not the COCO string
        back = brush_to_bitmap(brush, mask["height"], mask["width"])
        assert np.array_equal(back, bitmap) and bitmap_to_coco(back) == mask["rle_counts"]


def test_odd_shapes_round_trip_and_bad_masks_are_refused():
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (3, 500), (97, 13)):
        bitmap = rng.random((height, width)) < 0.3
        bitmap[0, 0] = True
        assert np.array_equal(brush_to_bitmap(bitmap_to_brush(bitmap), height, width), bitmap)
    brush = bitmap_to_brush(np.ones((4, 5), bool))
    with pytest.raises(MaskError, match="20 pixels on an image of 5 x 5 = 25"):
        brush_to_bitmap(brush, 5, 5)
    with pytest.raises(MaskError, match="empty"):
        brush_to_bitmap(bitmap_to_brush(np.zeros((4, 5), bool)), 4, 5)
    with pytest.raises(MaskError, match="undecodable"):
        brush_to_bitmap([255, 255, 255], 4, 5)


def test_a_brush_code_declaring_a_huge_mask_is_refused_before_it_is_decoded():
    brush = bitmap_to_brush(np.ones((4, 5), bool))
    huge = [0x40, 0, 0, 0, *brush[4:]]  # the header's count of values: 2**30, a GiB to decode
    tracemalloc.start()
    try:
        with pytest.raises(MaskError, match="mask not the image's size .268435456 pixels"):
            brush_to_bitmap(huge, 4, 5)
        assert tracemalloc.get_traced_memory()[1] < 10 * 2**20  # refused on its header: nothing of its size was allocated
    finally:
        tracemalloc.stop()
