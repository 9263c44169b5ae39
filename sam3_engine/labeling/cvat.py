"""The round trip through CVAT, as files: CVAT runs only under Docker, so the engine writes what it imports and reads its export.

``write_bundle``: a folder with the selection's images (named by image id, so a name maps back to the
engine), ``annotations.xml`` in "CVAT for images 1.1" with one label per phrase (masks or polygons), an ``absent`` tag
label (attribute ``phrase``), a ``reviewed`` tag label and the engine's masks as pre-annotations (source
``auto``), and ``labels.json`` for creating the task. An image counts as answered once a person touched
it: a shape or tag that is not ``auto`` and is read (one skipped, say of an unknown label, is no touch);
``reviewed`` accepts the pre-annotations as they are, a phrase without a mask then being absent.

``read_export``: CVAT's "CVAT for images 1.1" export (the zip, or its annotations.xml), each mask decoded
from CVAT's box-relative RLE (``cvat_sdk.masks``) and each polygon rasterised, then stored as ``labeling pull``
stores any tool's answers. Masks cross as bitmaps, bit for bit.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
import zipfile
import zlib
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask

from sam3_engine.engine import storage
from sam3_engine.engine.store import TableStore
from sam3_engine.labeling.answers import Answer, LabelingError, PullResult, selection_rows, store_answers
from sam3_engine.labeling.masks import MaskError, coco_to_bitmap, polygon_to_bitmap

TOOL = "cvat"
ABSENT_LABEL = "absent"
"""A tag label with a ``phrase`` attribute: the annotator tags the phrases the image does not show."""
REVIEWED_LABEL = "reviewed"
"""A tag label: the annotator tags an image whose pre-annotations they accept exactly as they are."""
PHRASE_LABEL_TYPE = "any"
"""A phrase's label takes any shape: people paint masks or draw polygons (CVAT's SAM tool gives either); others are skipped."""
PARTIAL_ANNOTATIONS = "annotations.xml.partial"
"""The annotations of a bundle being written: renamed ``annotations.xml`` once every image and label is in place."""
BUNDLE_PREFIX = "sam3-engine "
"""The bundle's task name is this and the selection: a later push knows its own bundle by it."""


def write_bundle(store: TableStore, selection: str, out_dir: str) -> dict[str, int]:
    """Write the selection as a CVAT task bundle in ``out_dir``; returns the images and masks written.

    ``out_dir`` is new, empty, or an earlier bundle of this selection, whose images not in this bundle are removed (the
    folder then holds exactly what ``annotations.xml`` lists); any other folder is refused, nothing written. The
    annotations are written under a partial name first and take their own name last, so a push that fails part-way
    (an image gone) leaves no ``annotations.xml`` for CVAT to import beside missing images; pushing again finishes it.
    """
    rows = selection_rows(store, selection)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LabelingError(f"--out {out_dir} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and _bundle_of(out) != selection:
        raise LabelingError(f"--out {out_dir} is not empty and not a bundle of selection {selection!r}: give a new or empty folder")
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_image[row["image_id"]].append(row)
    phrases = sorted({row["phrase"] for row in rows})
    if {ABSENT_LABEL, REVIEWED_LABEL} & set(phrases):
        raise LabelingError(f"a phrase is named {ABSENT_LABEL!r} or {REVIEWED_LABEL!r}, the bundle's tag labels: rename it for CVAT")
    root = ElementTree.Element("annotations")
    ElementTree.SubElement(root, "version").text = "1.1"
    meta = ElementTree.SubElement(ElementTree.SubElement(root, "meta"), "task")
    ElementTree.SubElement(meta, "name").text = f"{BUNDLE_PREFIX}{selection}"
    labels = ElementTree.SubElement(meta, "labels")
    for phrase in phrases:
        _label(labels, phrase, PHRASE_LABEL_TYPE)
    absent = _label(labels, ABSENT_LABEL, "tag")
    attribute = ElementTree.SubElement(ElementTree.SubElement(absent, "attributes"), "attribute")
    for key, value in (("name", "phrase"), ("mutable", "False"), ("input_type", "select"), ("values", "\n".join(phrases))):
        ElementTree.SubElement(attribute, key).text = value
    _label(labels, REVIEWED_LABEL, "tag")
    masks, images = 0, {}
    for index, (image_id, image_rows) in enumerate(by_image.items()):
        first = image_rows[0]
        name = f"{image_id}{os.path.splitext(first['uri'])[1].lower() or '.jpg'}"
        images[name] = first["uri"]
        image = ElementTree.SubElement(
            root, "image", id=str(index), name=name, width=str(first["image_width"]), height=str(first["image_height"])
        )
        for row in image_rows:
            if row["mask_id"] is None:
                continue
            bitmap = coco_to_bitmap(row["rle_counts"], row["height"], row["width"])
            if not bitmap.any():
                continue
            ElementTree.SubElement(image, "mask", label=row["phrase"], source="auto", occluded="0", z_order="0", **_cvat_rle(bitmap))
            masks += 1
    attribute_spec = {"name": "phrase", "mutable": False, "input_type": "select", "values": phrases}
    spec = [{"name": phrase, "type": PHRASE_LABEL_TYPE} for phrase in phrases]
    spec.append({"name": ABSENT_LABEL, "type": "tag", "attributes": [attribute_spec]})
    spec.append({"name": REVIEWED_LABEL, "type": "tag"})
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        partial = out / PARTIAL_ANNOTATIONS
        ElementTree.ElementTree(root).write(partial, encoding="utf-8", xml_declaration=True)  # first: the folder is ours
        (out / "annotations.xml").unlink(missing_ok=True)
        for stale in set(os.listdir(out / "images")) - set(images):
            (out / "images" / stale).unlink()
        for name, uri in images.items():  # one image in memory at a time, whatever the selection's size
            (out / "images" / name).write_bytes(_image_bytes(store, uri, out_dir))
        (out / "labels.json").write_text(json.dumps(spec, indent=1, ensure_ascii=False))
        partial.replace(out / "annotations.xml")
    except OSError as exc:
        raise LabelingError(f"--out {out_dir}: {exc.strerror or exc}: {exc.filename or out_dir}") from None
    return {"images": len(by_image), "masks": masks}


def _image_bytes(store: TableStore, uri: str, out_dir: str) -> bytes:
    fs, path = storage.filesystem(uri, store.storage_config)
    try:
        return fs.cat_file(path)
    except OSError as exc:
        raise LabelingError(f"cannot read image {uri}: {exc}; the bundle in {out_dir} is unfinished (no annotations.xml)") from None


def _bundle_of(folder: Path) -> str | None:
    """The selection whose bundle ``folder`` holds, finished or not, or None when it holds none."""
    for file_name in ("annotations.xml", PARTIAL_ANNOTATIONS):
        try:
            name = ElementTree.parse(folder / file_name).getroot().findtext("meta/task/name") or ""
        except (OSError, ElementTree.ParseError):
            continue
        return name.removeprefix(BUNDLE_PREFIX) if name.startswith(BUNDLE_PREFIX) else None
    return None


def _label(parent: ElementTree.Element, name: str, kind: str) -> ElementTree.Element:
    label = ElementTree.SubElement(parent, "label")
    ElementTree.SubElement(label, "name").text = name
    ElementTree.SubElement(label, "type").text = kind
    return label


def _cvat_rle(bitmap: np.ndarray) -> dict[str, str]:
    """CVAT 1.1's mask attributes: the run lengths inside the mask's box (background first), and the box."""
    encoded = encode_mask(bitmap)
    left, top, right, bottom = (int(v) for v in encoded[-4:])
    runs = ", ".join(str(int(v)) for v in encoded[:-4])
    return {"rle": runs, "left": str(left), "top": str(top), "width": str(right - left + 1), "height": str(bottom - top + 1)}


def read_export(store: TableStore, selection: str, export_path: str) -> PullResult:
    """Store the answers in CVAT's export (a "CVAT for images 1.1" zip or annotations.xml) for the selection's pairs."""
    rows = selection_rows(store, selection)
    root = _annotations(export_path)
    sizes = {row["image_id"]: (row["image_height"], row["image_width"]) for row in rows}
    phrases: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        phrases[row["image_id"]].add(row["phrase"])
    listed = Counter(_image_id(image) for image in root.iter("image"))
    twice = sorted(image_id for image_id, n in listed.items() if n > 1)
    if twice:
        raise LabelingError(f"{export_path} lists image {twice[0]!r} {listed[twice[0]]} times: export the task again")
    when = datetime.fromtimestamp(os.path.getmtime(export_path), UTC)
    answers, skipped = {}, defaultdict(int)
    in_tool: dict[str, set[str]] = defaultdict(set)
    for image in root.iter("image"):
        image_id = _image_id(image)
        if image_id not in sizes:
            skipped["image not in the selection"] += 1
            continue
        try:
            size = (int(image.get("height", "")), int(image.get("width", "")))
        except ValueError:
            skipped[f"image size not a number: {image.get('name')}"] += 1
            continue
        if size != sizes[image_id]:
            skipped["image not the engine's size"] += 1
            continue
        in_tool[image_id].add(image.get("id", ""))
        answer = _answer(image, size, phrases[image_id], skipped)
        if answer is None:
            continue  # nobody touched it: the engine's own pre-annotations, not an answer (a person tags "reviewed" to accept them)
        answers[image_id] = Answer(
            task_id=image.get("id", ""),
            annotation_id=f"{Path(export_path).name}#{image.get('id', '')}",
            annotator="",
            labelled_at=when,
            lead_time_s=None,
            absent=answer[0],
            painted=answer[1],
        )
    return store_answers(store, selection, TOOL, Path(export_path).name, rows, answers, skipped, in_tool)


def _image_id(image: ElementTree.Element) -> str:
    """The engine's image id of an <image>: its file name without folder or extension (CVAT may keep the upload's folder)."""
    return os.path.splitext(image.get("name", "").replace("\\", "/").rsplit("/", 1)[-1])[0]


def _answer(
    image: ElementTree.Element, size: tuple[int, int], phrases: set[str], skipped
) -> tuple[set[str], dict[str, list[np.ndarray]]] | None:
    """The image's answer (phrases tagged absent, bitmaps per phrase), or None when no person touched it.

    Only what is read counts as a touch: a shape skipped (unknown label, bad mask, unsupported type) does not make the
    engine's masks the person's answer. ``reviewed`` accepts the pre-annotations: a phrase without a mask is absent.
    """
    painted: dict[str, list[np.ndarray]] = defaultdict(list)
    absent: set[str] = set()
    touched = reviewed = False
    for shape in image:
        manual = shape.get("source") != "auto"
        label = shape.get("label", "")
        if shape.tag == "tag" and label == REVIEWED_LABEL:
            touched = reviewed = True
        elif shape.tag == "tag" and label == ABSENT_LABEL:
            said = {attribute.text or "" for attribute in shape.iter("attribute") if attribute.get("name") == "phrase"}
            skipped["unknown phrase"] += len(said - phrases)
            absent |= said & phrases
            touched |= manual and bool(said & phrases)
        elif shape.tag in ("mask", "polygon") and label in phrases:
            try:
                painted[label].append(_decode(shape, size) if shape.tag == "mask" else _polygon(shape, size))
            except MaskError as exc:
                skipped[exc.reason] += 1
                continue
            touched |= manual
        elif shape.tag in ("mask", "polygon", "tag"):
            skipped["unknown phrase"] += 1
        else:
            skipped[f"shape type not supported: {shape.tag}"] += 1
    if not touched:
        return None
    if reviewed:
        absent |= phrases - set(painted)
    return absent, dict(painted)


def _annotations(export_path: str) -> ElementTree.Element:
    try:
        if zipfile.is_zipfile(export_path):
            with zipfile.ZipFile(export_path) as archive:
                return ElementTree.fromstring(archive.read("annotations.xml"))
        return ElementTree.parse(export_path).getroot()
    except KeyError:
        raise LabelingError(f"{export_path} has no annotations.xml: export the task as 'CVAT for images 1.1'") from None
    except (OSError, ElementTree.ParseError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise LabelingError(f"cannot read {export_path}: {exc}") from None
    except (RuntimeError, NotImplementedError) as exc:  # an encrypted member, a compression zipfile does not know
        raise LabelingError(f"cannot read {export_path}: {exc}: export it again from CVAT, without a password") from None


def _decode(mask: ElementTree.Element, size: tuple[int, int]) -> np.ndarray:
    """A CVAT 1.1 mask element as an image-sized bitmap; a MaskError when its box leaves the image or its runs do not fill it."""
    height, width = size
    try:
        left, top, box_width, box_height = (int(float(mask.get(k, ""))) for k in ("left", "top", "width", "height"))
        runs = [int(v) for v in mask.get("rle", "").split(",") if v.strip()]
    except ValueError:
        raise MaskError("undecodable mask", "rle, left, top, width and height must be integers") from None
    if any(run < 0 for run in runs):
        raise MaskError("undecodable mask", "a negative run length")
    if left < 0 or top < 0 or box_width <= 0 or box_height <= 0 or left + box_width > width or top + box_height > height:
        raise MaskError("mask not the image's size", f"box {left},{top} {box_width}x{box_height} on {width}x{height}")
    if sum(runs) != box_width * box_height:
        raise MaskError("undecodable mask", f"runs cover {sum(runs)} pixels of a {box_width}x{box_height} box")
    bitmap = decode_mask([*runs, left, top, left + box_width - 1, top + box_height - 1], image_width=width, image_height=height)
    if not bitmap.any():
        raise MaskError("empty mask")
    return bitmap


def _polygon(polygon: ElementTree.Element, size: tuple[int, int]) -> np.ndarray:
    """A CVAT 1.1 polygon element (``points="x1,y1;x2,y2;..."``, in pixels) as an image-sized bitmap."""
    try:
        points = [tuple(float(v) for v in point.split(",")) for point in polygon.get("points", "").split(";") if point.strip()]
    except ValueError:
        raise MaskError("undecodable polygon", "points must be x,y pairs of numbers separated by ';'") from None
    return polygon_to_bitmap(points, *size)
