"""The mask gallery: per concept, a bounded sample of images with their masks drawn over them.

Accepted masks on one picture and the others (rejected, uncertain, unverified) on the next, one
colour per instance, filled and outlined; thumbnails are small JPEGs embedded as data URIs, each
opening a larger view. An image that can no longer be read shows a placeholder.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy import ndimage

from sam3_engine.engine.config import StorageConfig
from sam3_engine.io.inputs import load_image

THUMBNAIL_SIDE = 256
FULL_SIDE = 640
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60))


@dataclass(frozen=True)
class Tile:
    phrase: str
    pair_id: str
    label: str
    """What the picture shows: "accepted" or "others"."""
    masks: tuple[dict[str, Any], ...]
    thumbnail: str | None
    """A data URI, or None when the image could not be read."""
    full: str | None


SMALLEST_SHOWN = 64
"""A picture's longest side is enlarged (in whole pixels, kept sharp) to at least this, and its shortest side padded to
an eighth of it: a 1 x 1 or 10000 x 10 image would otherwise be a dot or a line in the gallery."""


def jpeg(image: Image.Image, side: int) -> bytes:
    """The image scaled to fit a ``side`` square (small ones enlarged, thin ones padded), as a small JPEG."""
    copy = image.convert("RGB")
    copy.thumbnail((side, side))
    smallest = min(side, SMALLEST_SHOWN)
    if max(copy.size) < smallest:
        factor = -(-smallest // max(copy.size))
        copy = copy.resize((copy.width * factor, copy.height * factor), Image.Resampling.NEAREST)
    least = max(1, smallest // 8)
    if min(copy.size) < least:
        padded = Image.new("RGB", (max(copy.width, least), max(copy.height, least)), (238, 238, 238))
        padded.paste(copy, ((padded.width - copy.width) // 2, (padded.height - copy.height) // 2))
        copy = padded
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def _data_uri(image: Image.Image, side: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg(image, side)).decode("ascii")


def placeholder(side: int) -> Image.Image:
    """What a gallery shows for an image that can no longer be read."""
    image = Image.new("RGB", (side, side * 5 // 8), (238, 238, 238))
    ImageDraw.Draw(image).text((side // 3, side * 5 // 16 - 6), "image missing", fill=(119, 119, 119))
    return image


def verdict_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """A pair's masks as the gallery shows them: the accepted on one picture, the others (rejected, uncertain, unverified) on the next."""
    groups = (("accepted", [r for r in rows if r["verdict"] == "accept"]), ("others", [r for r in rows if r["verdict"] != "accept"]))
    return [(label, chosen) for label, chosen in groups if chosen]


def read_image(uri: str, storage_config: StorageConfig | None = None) -> Image.Image | None:
    """The image, or None when it is gone or broken: a gallery shows a placeholder and goes on."""
    try:
        return load_image(uri, storage_config or StorageConfig())
    except Exception:  # noqa: BLE001 - whatever broke it, the picture is a placeholder, not a failed page
        return None


def draw_masks(image: Image.Image, masks: list[dict[str, Any]]) -> Image.Image:
    """The image with each mask filled (translucent) and outlined, one colour per instance."""
    canvas = image.convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    for index, mask_row in enumerate(masks):
        encoded = {"size": [mask_row["height"], mask_row["width"]], "counts": mask_row["rle_counts"].encode("ascii")}
        mask = mask_utils.decode(encoded).astype(bool)
        if mask.shape != (canvas.height, canvas.width):
            continue
        colour = COLOURS[index % len(COLOURS)]
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(canvas.size) // 200))
        layer = np.zeros((canvas.height, canvas.width, 4), np.uint8)
        layer[mask] = (*colour, 90)
        layer[edge] = (*colour, 255)
        overlay = Image.alpha_composite(overlay, Image.fromarray(layer, "RGBA"))
    return Image.alpha_composite(canvas, overlay).convert("RGB")


def build_tiles(sample: list[dict[str, Any]], storage_config: StorageConfig | None = None) -> list[Tile]:
    """Two tiles per sampled pair (accepted masks; the others), in the sample's order."""
    by_pair: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sample:
        by_pair[row["pair_id"]].append(row)
    tiles = []
    for pair_id, rows in by_pair.items():
        image = read_image(rows[0]["uri"], storage_config)
        for label, chosen in verdict_groups(rows):
            drawn = draw_masks(image, chosen) if image is not None else None
            tiles.append(
                Tile(
                    rows[0]["phrase"],
                    pair_id,
                    label,
                    tuple(chosen),
                    _data_uri(drawn, THUMBNAIL_SIDE) if drawn else None,
                    _data_uri(drawn, FULL_SIDE) if drawn else None,
                )
            )
    return tiles


def render_gallery(tiles: list[Tile]) -> str:
    """The gallery section: a row of tiles per concept; clicking a tile opens the larger view."""
    by_phrase: dict[str, list[Tile]] = defaultdict(list)
    for tile in tiles:
        by_phrase[tile.phrase].append(tile)
    rows = []
    for phrase, phrase_tiles in by_phrase.items():
        cells = []
        for tile in phrase_tiles:
            verdicts = ", ".join(f"{m['verdict']} {m['score']:.2f}" for m in tile.masks)
            caption = f"{tile.label}: {len(tile.masks)} mask(s) ({verdicts})"
            picture = (
                f'<a href="{tile.full}" target="_blank"><img src="{tile.thumbnail}" alt="{html.escape(phrase)}"></a>'
                if tile.thumbnail
                else '<div class="placeholder">image missing</div>'
            )
            cells.append(
                f'<figure class="tile" data-verdict="{tile.label}">{picture}<figcaption>{html.escape(caption)}</figcaption></figure>'
            )
        rows.append(f'<div class="gallery-row"><h3>{html.escape(phrase)}</h3>{"".join(cells)}</div>')
    return f'<section id="gallery"><h2>Mask gallery</h2>{"".join(rows)}</section>' if rows else ""
