"""Masks cross to Label Studio's brush code and back bit for bit, and a bad one is refused in a line."""

import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sam3_engine.labeling.masks import MaskError, bitmap_to_brush, bitmap_to_coco, brush_to_bitmap, coco_to_bitmap, polygon_to_bitmap
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


def test_a_polygon_becomes_the_pixels_it_encloses_clipped_to_the_image():
    square = polygon_to_bitmap([(2, 3), (6, 3), (6, 7), (2, 7)], 10, 12)
    expected = np.zeros((10, 12), bool)
    expected[3:7, 2:6] = True
    assert np.array_equal(square, expected)
    star = [(60, 5), (72, 40), (110, 40), (80, 62), (92, 98), (60, 76), (28, 98), (40, 62), (10, 40), (48, 40)]
    drawn = Image.new("1", (120, 100))
    ImageDraw.Draw(drawn).polygon(star, fill=1)  # an independent rasteriser: the two differ only in pixels on the outline
    bitmap, reference = polygon_to_bitmap(star, 100, 120), np.asarray(drawn, bool)
    perimeter = sum(np.hypot(x1 - x0, y1 - y0) for (x0, y0), (x1, y1) in zip(star, star[1:] + star[:1], strict=True))
    assert bitmap.sum() > 2000 and (bitmap ^ reference).sum() < perimeter
    beyond = polygon_to_bitmap([(-5, -5), (50, -5), (50, 50), (-5, 50)], 10, 12)
    assert beyond.all()


@pytest.mark.parametrize(
    ("points", "reason"),
    [
        ([(1, 1), (5, 5)], "undecodable polygon"),
        ([(1, 1), (5, 5), (1, float("nan"))], "undecodable polygon"),
        ([(1, 1), (5, "x"), (1, 5)], "undecodable polygon"),
        ([(1, 1, 2), (5, 5), (1, 5)], "undecodable polygon"),
        ([(50, 50), (60, 50), (60, 60)], "empty mask"),
        ([(1, 1), (5, 5), (9, 9)], "empty mask"),
    ],
)
def test_what_is_not_a_polygon_on_the_image_is_refused_by_reason(points, reason):
    with pytest.raises(MaskError) as refused:
        polygon_to_bitmap(points, 10, 12)
    assert refused.value.reason == reason
