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
import json
from dataclasses import dataclass
from typing import Any

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


class GroundTruth:
    """One ground-truth file: its pairs' regions (RLE or boxes) in COCOeval's order, crowd excluded."""

    def __init__(self, data: dict[str, Any], name: str, iou_type: str):
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise EvaluationError(f"{name}: no `{key}` list")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.name = name
        self.iou_type = iou_type
        self.category_ids = sorted(self.coco.getCatIds())

    def pair_ids(self) -> list[Any]:
        return [image["id"] for image in self.coco.dataset["images"]]

    def not_exhaustive(self) -> set[Any]:
        return {image["id"] for image in self.coco.dataset["images"] if not _exhaustive(image, self.name)}

    def regions(self, pair: Any) -> list:
        """Non-crowd ground truth of ``pair``: grouped by sorted category id, then in file order."""
        annotations = self.coco.imgToAnns.get(pair, [])
        ordered = [a for category in self.category_ids for a in annotations if a["category_id"] == category]
        return [self._region(a) for a in ordered if not a.get("iscrowd")]

    def predicted(self, predictions: list[dict[str, Any]]) -> list:
        """Regions of one pair's predictions scoring >= 0.5, in COCOeval's order; categories unknown to this file are dropped."""
        kept = [p for category in self.category_ids for p in predictions if p.get("category_id") == category]
        return [self._region(_as_result(p)) for p in kept if p["score"] >= SCORE_THRESHOLD]

    def _region(self, annotation: dict[str, Any]):
        if self.iou_type == "bbox":
            return annotation["bbox"]
        return self.coco.annToRLE(annotation)


def _exhaustive(image: dict[str, Any], name: str) -> bool:
    if "is_instance_exhaustive" not in image:
        raise EvaluationError(f"{name}: image {image.get('id')!r} has no `is_instance_exhaustive` (an SA-Co file needs it on every pair)")
    return bool(image["is_instance_exhaustive"])


def _as_result(prediction: dict[str, Any]) -> dict[str, Any]:
    """A prediction as pycocotools' loadRes reads it: a box alone becomes a polygon; a missing box comes from the mask."""
    result = dict(prediction)
    if "segmentation" not in result and result.get("bbox"):
        x, y, w, h = result["bbox"]
        result["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
    if not result.get("bbox") and "segmentation" in result and isinstance(result["segmentation"], dict):
        result["bbox"] = mask_utils.toBbox(result["segmentation"]).tolist()
    return result


def match(predicted: list, truth: list, iou_type: str) -> PairOutcome:
    """One pair against one ground truth: Hungarian matching by IoU, true positives per threshold."""
    if not truth and not predicted:
        return PairOutcome(0, 0, None)
    if not predicted:
        return PairOutcome(len(truth), 0, np.zeros(len(IOU_THRESHOLDS), np.int64))
    if not truth:
        return PairOutcome(0, len(predicted), np.zeros(len(IOU_THRESHOLDS), np.int64))
    ious = np.asarray(mask_utils.iou(predicted, truth, [0] * len(truth)), dtype=float).reshape(len(predicted), len(truth))
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


def evaluate(predictions: list[dict[str, Any]], truths: list[dict[str, Any]], iou_type: str = "segm", names: list[str] | None = None) -> dict[str, Any]:
    """The SA-Co metrics of ``predictions`` (a COCO results list) against one or more ground-truth files."""
    if iou_type not in IOU_TYPES:
        raise EvaluationError(f"iou type must be one of {IOU_TYPES}, not {iou_type!r}")
    if not truths:
        raise EvaluationError("at least one ground-truth file is needed")
    names = names or [f"ground truth {i + 1}" for i in range(len(truths))]
    files = [GroundTruth(data, name, iou_type) for data, name in zip(truths, names)]
    excluded = set().union(*(f.not_exhaustive() for f in files[1:])) if len(files) > 1 else set()
    first = files[0]
    pairs = [image["id"] for image in first.coco.dataset["images"] if _exhaustive(image, first.name) and image["id"] not in excluded]
    by_pair: dict[Any, list[dict[str, Any]]] = {}
    for prediction in predictions:
        by_pair.setdefault(prediction["image_id"], []).append(prediction)
    outcomes = [_best([match(f.predicted(by_pair.get(pair, [])), f.regions(pair), iou_type) for f in files]) for pair in pairs]
    return summarize(outcomes, iou_type)


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
        "cgF1": positive_f1 * il_mcc, "precision": precision, "recall": recall, "F1": f1, "positive_macro_F1": positive_macro,
        "positive_micro_F1": positive_f1, "positive_micro_precision": positive_precision,
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
