"""cgF1, IL_MCC and pmF1: SAM 3's concept-segmentation metrics, computed as the SA-Co evaluation does.

An "image" of an SA-Co file is an (image, phrase) pair. Per evaluated pair (instance-exhaustive in
the first ground-truth file and not non-exhaustive in any other), predictions with score >= 0.5 are
matched one-to-one to the non-crowd ground truth by IoU (Hungarian, ``linear_sum_assignment``); at
each IoU threshold 0.50:0.05:0.95, matches at or above it are true positives. Image-level: does the
pair have any prediction, any ground truth. With several ground-truth files, each pair keeps the
file whose local F1 (mean over thresholds) is strictly best, or one where it is a true negative.

Agreement with the official implementation (``sam3/eval/cgf1_eval.py``, built on pycocotools'
COCOeval) is exact to float rounding: the same orders (annotations grouped by sorted category id,
then in file order), the same smoothing constants, the same selection and accumulation rules.
``tests/metrics`` compare the two on random inputs.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
"""As pycocotools' COCOeval builds them (so 0.5 and 0.75 are exact members)."""
SCORE_THRESHOLD = 0.5
F1_EPS = 1e-4
IL_EPS = 1e-6
IOU_TYPES = ("segm", "bbox")
RLE_MAX_GROUPS = 7
"""Characters one run of a compressed RLE may take (35 bits)."""
RLE_CHUNK = 1 << 20
"""Characters of RLE counts read at once."""
BOX_SLACK = 1e-6
"""How far past 1 a normalised box may end (x / width + w / width rounds)."""


class EvaluationError(ValueError):
    """Inputs the evaluation cannot use, with a message naming the file and field."""


@dataclass(frozen=True)
class PairOutcome:
    gt: int
    dt: int
    tps: np.ndarray | None
    """True positives per IoU threshold; None for a true negative (no ground truth, no prediction)."""

    @property
    def fps(self) -> np.ndarray:
        return self.dt - self.tps

    @property
    def fns(self) -> np.ndarray:
        return self.gt - self.tps

    @property
    def local_f1(self) -> np.ndarray | None:
        if self.tps is None:
            return None
        if self.dt == 0:
            return np.zeros(len(IOU_THRESHOLDS))
        return _f1(self.tps, self.fps, self.fns)


def _f1(tps: np.ndarray, fps: np.ndarray, fns: np.ndarray) -> np.ndarray:
    precision = tps / (tps + fps + F1_EPS)
    recall = tps / (tps + fns + F1_EPS)
    return 2 * precision * recall / (precision + recall + F1_EPS)


MISMATCHES = {
    "predictions_unknown_pair": "prediction(s) with an image_id that no ground-truth file has",
    "predictions_unknown_category": "prediction(s) with a category_id that no ground-truth file has",
    "annotations_unknown_pair": "annotation(s) with an image_id that is not an image of the file",
    "rle_undecodable": "RLE mask(s) whose counts do not decode to height x width pixels",
    "rle_wrong_size": "RLE mask(s) whose size is not their image's [height, width]",
}
"""Kinds of bad reference, as counted under ``mismatches``."""


class Mismatches:
    """Bad references in the inputs, counted per kind and file with a few examples, so that none is scored silently."""

    EXAMPLES = 3

    def __init__(self) -> None:
        self.found: dict[tuple[str, str], list] = {}
        """(kind, file) -> [count, examples]."""

    def add(self, kind: str, name: str, example: str) -> None:
        entry = self.found.setdefault((kind, name), [0, []])
        entry[0] += 1
        if len(entry[1]) < self.EXAMPLES:
            entry[1].append(example)

    def counts(self) -> dict[str, int]:
        return {kind: sum(n for (k, _), (n, _) in self.found.items() if k == kind) for kind in MISMATCHES}

    def message(self) -> str:
        return "; ".join(
            f"{name}: {n} {MISMATCHES[kind]} ({', '.join(examples)}{', ...' if n > len(examples) else ''})"
            for (kind, name), (n, examples) in self.found.items()
        )


class GroundTruth:
    """One ground-truth file: its pairs' regions (RLE or boxes) in COCOeval's order, crowd excluded.

    Its boxes are normalised (fractions of the image, as SA-Co writes them) when every one ends within [0, 1], else in pixels (COCO);
    a prediction's box taken from its mask, or drawn as a mask, is read in the same units.
    """

    def __init__(self, data: dict[str, Any], name: str, iou_type: str, mismatches: Mismatches):
        if not isinstance(data, dict):
            raise EvaluationError(f"{name}: expected an SA-Co ground-truth object, got {_kind(data)}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise EvaluationError(f"{name}: no `{key}` list")
        segm = iou_type == "segm"
        image_keys = ("id", "is_instance_exhaustive", *(("height", "width") if segm else ()))
        first_index: dict[Any, int] = {}
        for index, image in enumerate(data["images"]):
            where = f"{name}: images[{index}]"
            _require(image, image_keys, where)
            _require_ids(image, ("id",), where)
            for key in image_keys[2:]:  # masks are drawn at this size
                if not (isinstance(image[key], int) and not isinstance(image[key], bool) and image[key] > 0):
                    raise EvaluationError(f"{where}: `{key}` must be a positive integer, not {json.dumps(image[key])[:40]}")
            if first_index.setdefault(image["id"], index) != index:  # a repeated pair would be evaluated twice
                raise EvaluationError(f"{where}: `id` {image['id']!r} repeats images[{first_index[image['id']]}] (one entry per pair)")
        for index, category in enumerate(data["categories"]):
            _require(category, ("id",), f"{name}: categories[{index}]")
            _require_ids(category, ("id",), f"{name}: categories[{index}]")
        images = {image["id"]: image for image in data["images"]}
        masks = []
        for index, annotation in enumerate(data["annotations"]):
            where = f"{name}: annotations[{index}]"
            _require(annotation, ("id", "image_id", "category_id", "segmentation" if segm else "bbox"), where)
            _require_ids(annotation, ("id", "image_id", "category_id"), where)
            image = images.get(annotation["image_id"])
            if image is None:
                mismatches.add("annotations_unknown_pair", name, f"id {annotation['id']!r} names image {annotation['image_id']!r}")
            elif segm:
                masks.append(MaskRef(annotation, annotation["segmentation"], image, where, f"annotation id {annotation['id']!r}"))
        boxes = [annotation["bbox"] for annotation in data["annotations"] if "bbox" in annotation]
        self.normalised = bool(boxes) and max(max(x + w, y + h) for x, y, w, h in boxes) <= 1 + BOX_SLACK
        """Whether the file's boxes are fractions of the image."""
        self.undecodable = _undecodable(masks, name, mismatches)
        """id() of the annotations whose RLE does not decode: they match nothing (pycocotools must never see them)."""
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.name = name
        self.iou_type = iou_type
        self.images = images
        self.category_ids = sorted(self.coco.getCatIds(), key=lambda c: (isinstance(c, str), c))  # numbers, then strings

    def not_exhaustive(self) -> set[Any]:
        return {image["id"] for image in self.coco.dataset["images"] if not image["is_instance_exhaustive"]}

    def regions(self, pair: Any) -> list:
        """Non-crowd ground truth of ``pair``: grouped by sorted category id, then in file order; None for an undecodable mask."""
        annotations = self.coco.imgToAnns.get(pair, [])
        ordered = [a for category in self.category_ids for a in annotations if a["category_id"] == category]
        return [None if id(a) in self.undecodable else self._region(a) for a in ordered if not a.get("iscrowd")]

    def predicted(self, predictions: list[dict[str, Any]], undecodable: set[int]) -> list:
        """Regions of one pair's predictions scoring >= 0.5, in COCOeval's order (None for an undecodable mask); categories unknown to
        this file are dropped."""
        kept = [p for category in self.category_ids for p in predictions if p["category_id"] == category]
        return [None if id(p) in undecodable else self._predicted_region(p) for p in kept if p["score"] >= SCORE_THRESHOLD]

    def _region(self, annotation: dict[str, Any]):
        if self.iou_type == "bbox":
            return annotation["bbox"]
        return self.coco.annToRLE(annotation)

    def _predicted_region(self, prediction: dict[str, Any]):
        """As pycocotools' loadRes reads a prediction (a missing box comes from the mask; a box alone is drawn as a polygon), but in
        this file's box units: a mask's box is in pixels, SA-Co's boxes are fractions of the image."""
        if self.iou_type == "bbox":
            return prediction["bbox"] if "bbox" in prediction else self._mask_box(prediction["segmentation"])
        if "segmentation" in prediction:
            return self.coco.annToRLE(prediction)
        x, y, w, h = prediction["bbox"]
        if self.normalised:
            image = self.images[prediction["image_id"]]
            x, y, w, h = x * image["width"], y * image["height"], w * image["width"], h * image["height"]
        return self.coco.annToRLE({**prediction, "segmentation": [[x, y, x, y + h, x + w, y + h, x + w, y]]})

    def _mask_box(self, rle: dict[str, Any]) -> list[float]:
        """The box of an RLE (compressed, or uncompressed: counts a list of runs) in this file's units."""
        height, width = rle["size"]
        box = mask_utils.toBbox(mask_utils.frPyObjects(rle, height, width) if isinstance(rle["counts"], list) else rle)
        return (box / [width, height, width, height] if self.normalised else box).tolist()


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _require(item: Any, keys: tuple[str, ...], where: str) -> None:
    """An EvaluationError naming ``where`` and the first of ``keys`` missing from ``item``, which must be a JSON object."""
    if not isinstance(item, dict):
        raise EvaluationError(f"{where} is {_kind(item)}, not an object")
    for key in keys:
        if key not in item:
            raise EvaluationError(f"{where} has no `{key}`")
    if "bbox" in item and not (isinstance(item["bbox"], list) and len(item["bbox"]) == 4 and all(map(_is_number, item["bbox"]))):
        raise EvaluationError(f"{where}: `bbox` must be [x, y, width, height], not {json.dumps(item['bbox'])[:60]}")


def _require_ids(item: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Ids are looked up as keys: a list or an object is an error naming it, not a TypeError (unhashable) further on."""
    for key in keys:
        if not (_is_number(item[key]) or isinstance(item[key], str)):
            raise EvaluationError(f"{where}: `{key}` must be a number or a string, not {json.dumps(item[key])[:40]}")


def _check_polygons(polygons: list, where: str) -> None:
    """pycocotools reads a polygon of 4 numbers as a box and fails on any other short, empty or non-numeric one."""
    if not polygons:
        raise EvaluationError(f"{where}: `segmentation` is an empty list of polygons")
    for index, polygon in enumerate(polygons):
        if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0 and all(map(_is_number, polygon))):
            raise EvaluationError(
                f"{where}: `segmentation` polygon {index} must be x, y numbers of 3 points or more, not {json.dumps(polygon)[:60]}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class MaskRef(NamedTuple):
    owner: dict[str, Any]
    """The annotation or prediction."""
    segmentation: Any
    image: dict[str, Any]
    where: str
    """Where it is, for an error: ``FILE: annotations[3]``."""
    example: str
    """How a mismatch names it."""


def _undecodable(masks: list[MaskRef], name: str, mismatches: Mismatches) -> set[int]:
    """The id() of the owners whose RLE does not decode; those and RLEs of another size than their image's are recorded.

    An RLE of another size is kept: pycocotools scores it as the official evaluator does (IoU -1, it matches nothing); its size is
    checked where the image has one. Polygons are drawn at their image's size: usable once well formed.
    """
    rles = []
    for mask in masks:
        if isinstance(mask.segmentation, list):
            _check_polygons(mask.segmentation, mask.where)
            continue
        size = mask.segmentation.get("size") if isinstance(mask.segmentation, dict) else None
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size) and "counts" in mask.segmentation):
            raise EvaluationError(f'{mask.where}: `segmentation` must be polygons or an RLE {{"size": [height, width], "counts": ...}}')
        rles.append((mask, size))
    undecodable = set()
    for (mask, size), pixels in zip(rles, _rle_pixels([mask.segmentation["counts"] for mask, _ in rles]), strict=True):
        expected = [mask.image.get("height"), mask.image.get("width")]
        if pixels != size[0] * size[1]:
            mismatches.add("rle_undecodable", name, f"{mask.example}: size {size}")
            undecodable.add(id(mask.owner))
        elif None not in expected and size != expected:
            mismatches.add("rle_wrong_size", name, f"{mask.example}: size {size}, image {expected}")
    return undecodable


def _rle_pixels(all_counts: list[Any]) -> list[int | None]:
    """The pixels each COCO RLE's runs add up to, or None where its counts do not decode.

    Read here because pycocotools' C decoder trusts its input: malformed counts overrun its buffer or keep it busy for minutes.
    Uncompressed counts are a list of runs; compressed ones a string, read by ``_string_pixels``.
    """
    pixels: list[int | None] = [None] * len(all_counts)
    for index, counts in enumerate(all_counts):
        if isinstance(counts, list):
            pixels[index] = sum(counts) if all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) else None
    strings = [
        (index, counts if counts.isascii() else "\x00")  # \x00: a character no RLE has
        for index, counts in enumerate(all_counts)
        if isinstance(counts, str)
    ]
    chunk_of = np.cumsum([len(text) + 1 for _, text in strings]) // RLE_CHUNK
    for _, chunk in itertools.groupby(zip(chunk_of, strings, strict=True), key=lambda item: item[0]):
        entries = [entry for _, entry in chunk]
        for (index, _), total in zip(entries, _string_pixels([text for _, text in entries]), strict=True):
            pixels[index] = total
    return pixels


def _string_pixels(strings: list[str]) -> list[int | None]:
    """Compressed RLE counts (``rleFrString`` in pycocotools' maskApi.c), all strings at once: a mask of a large image has thousands
    of runs, and a file has thousands of masks.

    Each run is a group of characters from '0', 5 bits each, low bits first (0x20: more characters follow; 0x10 in the last: the
    value is negative); each run after the third adds the run two before it.
    """
    count = len(strings)
    lengths = np.array([len(text) for text in strings], np.int64)
    chars = np.frombuffer("".join(strings).encode(), np.uint8).astype(np.int64) - 48
    owner = np.repeat(np.arange(count), lengths)
    bad = np.bincount(owner, weights=(chars < 0) | (chars >= 64), minlength=count) > 0
    run_end = chars & 0x20 == 0
    finals = (np.cumsum(lengths) - 1)[lengths > 0]
    bad[lengths > 0] |= ~run_end[finals]  # the last run of a string continues past its end
    run_end[finals] = True
    ends = np.flatnonzero(run_end)
    starts = np.concatenate(([0], ends + 1))[:-1]
    run_owner = owner[ends]
    bad |= np.bincount(run_owner, weights=ends - starts >= RLE_MAX_GROUPS, minlength=count) > 0
    position = np.minimum(np.arange(len(chars)) - np.repeat(starts, ends - starts + 1), RLE_MAX_GROUPS)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts) if len(ends) else np.zeros(0, np.int64)
    values -= (chars[ends] & 0x10 != 0) << (5 * (position[ends] + 1))
    index = np.arange(len(ends)) - np.searchsorted(run_owner, np.arange(count))[run_owner]
    runs = values.copy()
    for parity in (index % 2 == 1, (index % 2 == 0) & (index > 0)):  # running sums per string: odd runs, and even ones after the first
        summed = np.cumsum(np.where(parity, values, 0))
        before = np.concatenate(([0], summed))[np.searchsorted(run_owner, np.arange(count))]
        runs = np.where(parity, summed - before[run_owner], runs)
    bad |= np.bincount(run_owner, weights=runs < 0, minlength=count) > 0
    totals = np.bincount(run_owner, weights=runs, minlength=count)
    return [None if wrong else int(total) for wrong, total in zip(bad, totals, strict=True)]


def match(predicted: list, truth: list, iou_type: str) -> PairOutcome:
    """One pair against one ground truth: Hungarian matching by IoU, true positives per threshold.

    A None region (an undecodable mask) has IoU -1 with everything, as pycocotools gives a mask of another size.
    """
    if not truth and not predicted:
        return PairOutcome(0, 0, None)
    if not predicted:
        return PairOutcome(len(truth), 0, np.zeros(len(IOU_THRESHOLDS), np.int64))
    if not truth:
        return PairOutcome(0, len(predicted), np.zeros(len(IOU_THRESHOLDS), np.int64))
    ious = np.full((len(predicted), len(truth)), -1.0)
    rows = [i for i, region in enumerate(predicted) if region is not None]
    cols = [j for j, region in enumerate(truth) if region is not None]
    if rows and cols:
        computed = mask_utils.iou([predicted[i] for i in rows], [truth[j] for j in cols], [0] * len(cols))
        ious[np.ix_(rows, cols)] = np.asarray(computed, dtype=float).reshape(len(rows), len(cols))
    rows, cols = linear_sum_assignment(-ious)
    matched = ious[rows, cols]
    tps = (matched[None, :] >= IOU_THRESHOLDS[:, None]).sum(axis=1).astype(np.int64)
    return PairOutcome(len(truth), len(predicted), tps)


def _best(outcomes: list[PairOutcome]) -> PairOutcome:
    """The oracle over several ground truths: a strictly better mean local F1, or a true negative, wins."""
    best = outcomes[0]
    for current in outcomes[1:]:
        if best.local_f1 is not None and current.local_f1 is not None:
            if current.local_f1.mean() > best.local_f1.mean():
                best = current
        elif current.local_f1 is None:
            best = current
    return best


def evaluate(
    predictions: list[dict[str, Any]],
    truths: list[dict[str, Any]],
    iou_type: str = "segm",
    names: list[str] | None = None,
    prediction_name: str = "predictions",
    allow_mismatch: bool = False,
) -> dict[str, Any]:
    """The SA-Co metrics of ``predictions`` (a COCO results list) against one or more ground-truth files.

    Bad references (see ``Mismatches``) are an EvaluationError unless ``allow_mismatch``; then they score as the official evaluator
    scores them (a prediction of an unknown pair or category counts nowhere; a mask of the wrong size, or undecodable, matches
    nothing) and their counts are under ``mismatches``.
    """
    if iou_type not in IOU_TYPES:
        raise EvaluationError(f"iou type must be one of {IOU_TYPES}, not {iou_type!r}")
    if not truths:
        raise EvaluationError("at least one ground-truth file is needed")
    names = names or [f"ground truth {i + 1}" for i in range(len(truths))]
    mismatches = Mismatches()
    files = [GroundTruth(data, name, iou_type, mismatches) for data, name in zip(truths, names, strict=True)]
    by_pair, undecodable = _predictions_by_pair(predictions, prediction_name, files, iou_type, mismatches)
    if mismatches.found and not allow_mismatch:
        raise EvaluationError(f"{mismatches.message()}; --allow-mismatch evaluates anyway, counting them under `mismatches`")
    excluded = set().union(*(f.not_exhaustive() for f in files[1:])) if len(files) > 1 else set()
    first = files[0]
    pairs = [image["id"] for image in first.coco.dataset["images"] if image["is_instance_exhaustive"] and image["id"] not in excluded]
    outcomes = [  # a file without the pair has no ground truth for it: only the files that have it compete
        _best([match(f.predicted(by_pair.get(pair, []), undecodable), f.regions(pair), iou_type) for f in files if pair in f.images])
        for pair in pairs
    ]
    return {**summarize(outcomes, iou_type), "mismatches": mismatches.counts()}


def _predictions_by_pair(
    predictions: Any, name: str, files: list[GroundTruth], iou_type: str, mismatches: Mismatches
) -> tuple[dict[Any, list], set[int]]:
    """The predictions grouped by pair, and the id() of those whose mask does not decode; bad references are recorded."""
    if not isinstance(predictions, list):
        raise EvaluationError(f"{name}: expected a list of predictions (a COCO results file), got {_kind(predictions)}")
    segm = iou_type == "segm"
    images = {pair: image for f in reversed(files) for pair, image in f.images.items()}  # a pair's size from the first file that has it
    categories = {c for f in files for c in f.category_ids}
    by_pair: dict[Any, list[dict[str, Any]]] = {}
    masks = []
    for index, prediction in enumerate(predictions):
        where = f"{name}[{index}]"
        _require(prediction, ("image_id", "category_id", "score"), where)
        if not _is_number(prediction["score"]):
            raise EvaluationError(f"{where}: `score` must be a number, not {json.dumps(prediction['score'])[:40]}")
        _require_ids(prediction, ("image_id", "category_id"), where)
        if segm and "segmentation" not in prediction and "bbox" not in prediction:
            raise EvaluationError(f"{where} has neither `segmentation` nor `bbox`")
        if not segm and "bbox" not in prediction and not isinstance(prediction.get("segmentation"), dict):
            raise EvaluationError(f"{where} has no `bbox` (nor an RLE `segmentation` to take it from)")
        image = images.get(prediction["image_id"])
        if image is None:
            mismatches.add("predictions_unknown_pair", name, f"[{index}] image_id {prediction['image_id']!r}")
            continue
        if prediction["category_id"] not in categories:
            mismatches.add("predictions_unknown_category", name, f"[{index}] category_id {prediction['category_id']!r}")
        if "segmentation" in prediction and (segm or "bbox" not in prediction):  # read before pycocotools: see _undecodable
            masks.append(MaskRef(prediction, prediction["segmentation"], image, where, f"[{index}]"))
        by_pair.setdefault(prediction["image_id"], []).append(prediction)
    return by_pair, _undecodable(masks, name, mismatches)


def summarize(outcomes: list[PairOutcome], iou_type: str = "segm") -> dict[str, Any]:
    """Micro sums over the pairs, the image-level confusion, and the metrics as SAM 3 reports them."""
    thresholds = len(IOU_THRESHOLDS)
    tps, fps, fns, positive_fps = (np.zeros(thresholds, np.int64) for _ in range(4))
    positive_f1_sum, positive_pairs = np.zeros(thresholds), 0
    confusion = {"IL_TP": 0, "IL_FP": 0, "IL_TN": 0, "IL_FN": 0}
    for outcome in outcomes:
        has_gt, has_dt = outcome.gt > 0, outcome.dt > 0
        confusion["IL_TP" if has_gt and has_dt else "IL_FP" if has_dt else "IL_FN" if has_gt else "IL_TN"] += 1
        if outcome.tps is None:
            continue
        tps, fps, fns = tps + outcome.tps, fps + outcome.fps, fns + outcome.fns
        if has_gt:  # pairs with ground truth: their false positives count in pmF1; their F1 in the macro average
            positive_fps = positive_fps + outcome.fps
            positive_f1_sum = positive_f1_sum + outcome.local_f1
            positive_pairs += has_dt
    precision = tps / (tps + fps + F1_EPS)
    positive_precision = tps / (tps + positive_fps + F1_EPS)
    recall = tps / (tps + fns + F1_EPS)
    f1 = 2 * precision * recall / (precision + recall + F1_EPS)
    positive_f1 = 2 * positive_precision * recall / (positive_precision + recall + F1_EPS)
    with np.errstate(invalid="ignore", divide="ignore"):
        positive_macro = positive_f1_sum / positive_pairs
    tp, fp, tn, fn = (confusion[k] for k in ("IL_TP", "IL_FP", "IL_TN", "IL_FN"))
    il_recall = tp / (tp + fn + IL_EPS)
    il_precision = tp / (tp + fp + IL_EPS)
    il_f1 = 2 * il_precision * il_recall / (il_precision + il_recall + IL_EPS)
    il_fpr = fp / (fp + tn + IL_EPS)
    il_mcc = float(tp * tn - fp * fn) / ((float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)) ** 0.5 + IL_EPS)
    per_threshold = {
        "cgF1": positive_f1 * il_mcc,
        "precision": precision,
        "recall": recall,
        "F1": f1,
        "positive_macro_F1": positive_macro,
        "positive_micro_F1": positive_f1,
        "positive_micro_precision": positive_precision,
    }
    image_level = {"IL_precision": il_precision, "IL_recall": il_recall, "IL_F1": il_f1, "IL_FPR": il_fpr, "IL_MCC": il_mcc}
    official = {}
    for name, values in per_threshold.items():
        official[f"cgF1_eval_{iou_type}_{name}"] = _mean(values)
        if name == "cgF1":
            official.update({f"cgF1_eval_{iou_type}_{n}": float(v) for n, v in image_level.items()})
    for threshold in (0.5, 0.75):
        index = np.where(threshold == IOU_THRESHOLDS)[0]
        official.update({f"cgF1_eval_{iou_type}_{name}@{threshold}": _mean(values[index]) for name, values in per_threshold.items()})
    prefix = f"cgF1_eval_{iou_type}_"
    return {
        "iou_type": iou_type,
        "pairs": len(outcomes),
        "cgF1": 100 * official[prefix + "cgF1"],
        "IL_MCC": official[prefix + "IL_MCC"],
        "pmF1": 100 * official[prefix + "positive_micro_F1"],
        "cgF1@0.5": 100 * official[prefix + "cgF1@0.5"],
        "pmF1@0.5": 100 * official[prefix + "positive_micro_F1@0.5"],
        "cgF1@0.75": 100 * official[prefix + "cgF1@0.75"],
        "pmF1@0.75": 100 * official[prefix + "positive_micro_F1@0.75"],
        "precision": official[prefix + "precision"],
        "recall": official[prefix + "recall"],
        "image_level": {**confusion, **{k: float(v) for k, v in image_level.items()}},
        "official": official,
    }


def _mean(values: np.ndarray) -> float:
    """COCO's summary: the mean of the entries above -1, or -1 when there are none."""
    values = np.asarray(values, dtype=float)
    kept = values[values > -1]
    return float(np.mean(kept)) if len(kept) else -1.0


def load_json(path: str, read_text) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:  # a Parquet or image file given for a JSON one
        raise EvaluationError(f"{path}: not valid JSON (not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start})") from exc
