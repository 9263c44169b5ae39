"""Calibration: fit a verifier's thresholds to human labels at a target precision.

Labels are a table (Parquet, CSV or JSON lines, any fsspec URL) with any of: ``pair_id`` with
``present`` (is the phrase in the image) and/or ``exhaustive`` (do the accepted masks cover every
instance); ``mask_id`` with ``good`` (is the mask right for its phrase). Each signal's fitted
threshold is the one with the highest recall whose precision reaches the target; each verdict of
every verifier in the run is scored as it stands, so independent verifiers compare side by side.
Nothing is re-run: signals come from the run's tables. A verifier's family (``FAMILIES``: the CLIP
verifier of ``verify``, the VLM of ``verify_vlm``) says which signals it has and which config
section its thresholds belong to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import VERDICT_THRESHOLDS
from sam3_engine.engine.store import TableStore

LABEL_COLUMNS = {"pair_id": pa.string(), "present": pa.bool_(), "exhaustive": pa.bool_(), "mask_id": pa.string(), "good": pa.bool_()}


@dataclass(frozen=True)
class Signal:
    level: str
    """pair or mask."""
    name: str
    """Column of the calibration query."""
    label: str
    """The label the signal predicts."""
    config_key: str | None
    """The threshold it fits, if any."""
    at_least: bool
    """True when a higher score means the label holds; False when a lower score does."""
    positive: bool = True
    """Which label value the signal predicts (False: absence)."""
    macros: str = ""
    """Prefix of the verdict macros whose threshold it fits: "" (mask_verdicts, pair_verdicts) or "vlm_"."""

    def __post_init__(self) -> None:
        """A fit is written as ``<section>.<config_key>`` (``calibrate --write``): the key must be a threshold of its level's macro."""
        macro = f"{self.macros}{self.level}_verdicts"
        if self.config_key is not None and self.config_key not in VERDICT_THRESHOLDS[macro].model_fields:
            raise ValueError(f"{self.config_key!r} is not a threshold of {macro}")


@dataclass(frozen=True)
class Family:
    """What a kind of verifier stores: its signals, the queries that join them to labels, and its config section."""

    section: str
    pair_query: str
    mask_query: str
    signals: tuple[Signal, ...]
    score_table: str
    """Its pair scores table: a verifier with rows there is of this family."""


CLIP_SIGNALS = (
    Signal("pair", "presence_probability", "present", "present_threshold", True),
    Signal("pair", "presence_probability", "present", "absent_threshold", True, positive=False),
    Signal("pair", "sam_presence", "present", None, True),
    Signal("pair", "clip_z", "present", None, True),
    Signal("mask", "score", "good", None, True),
    Signal("mask", "stability_score", "good", "min_stability", True),
    Signal("mask", "reprompt_iou", "good", "min_reprompt_iou", True),
    Signal("mask", "clip_crop_margin", "good", "min_clip_margin", True),
    Signal("mask", "area_fraction", "good", "min_area_fraction", True),
    Signal("mask", "largest_fragment_fraction", "good", "min_largest_fragment", True),
    Signal("mask", "border_fraction", "good", "max_border_fraction", False),
    Signal("mask", "duplicate_iou", "good", "max_duplicate_iou", False),
    Signal("mask", "conflict_iou", "good", "max_conflict_iou", False),
)
VLM_SIGNALS = (
    Signal("pair", "presence_probability", "present", "present_threshold", True, macros="vlm_"),
    Signal("pair", "presence_probability", "present", "absent_threshold", True, positive=False, macros="vlm_"),
    Signal("pair", "exhaustive_yes", "exhaustive", "exhaustive_threshold", True, macros="vlm_"),
    Signal("pair", "exhaustive_yes", "exhaustive", "not_exhaustive_threshold", True, positive=False, macros="vlm_"),
    Signal("mask", "score", "good", None, True),
    Signal("mask", "whole_yes", "good", "accept_threshold", True, macros="vlm_"),
    Signal("mask", "whole_yes", "good", "reject_threshold", True, positive=False, macros="vlm_"),
)
FAMILIES = (
    Family("verify_vlm", "calibration_vlm_pairs", "calibration_vlm_masks", VLM_SIGNALS, "vlm_pair_scores"),
    Family("verify", "calibration_pairs", "calibration_masks", CLIP_SIGNALS, "pair_scores"),
)
VERDICTS = (
    ("pair", "presence", "present", "present", True),
    ("pair", "presence", "absent", "present", False),
    ("pair", "exhaustivity", "exhaustive", "exhaustive", True),
    ("mask", "verdict", "accept", "good", True),
    ("mask", "verdict", "reject", "good", False),
)


@dataclass(frozen=True)
class Fit:
    level: str
    signal: str
    predicts: str
    config_key: str | None
    threshold: float | None
    """None when no threshold reaches the target precision."""
    precision: float | None
    recall: float | None
    labelled: int
    """Labelled items that have this signal."""


def fit_threshold(scores: np.ndarray, truth: np.ndarray, target: float, at_least: bool) -> tuple[float, float, float] | None:
    """(threshold, precision, recall) of the rule ``score >= t`` (or ``<= t``) with the highest recall at precision >= target."""
    if not truth.any():
        return None
    key = scores if at_least else -scores
    order = np.argsort(-key, kind="stable")
    ranked, hits = key[order], truth[order]
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    last_of_value = np.r_[ranked[1:] != ranked[:-1], True]  # a threshold takes every item with an equal score
    allowed = np.flatnonzero(last_of_value & (precision >= target))
    if not len(allowed):
        return None
    best = allowed[-1]  # recall only grows down the ranking
    threshold = float(ranked[best] if at_least else -ranked[best])
    return threshold, float(precision[best]), float(true_positives[best] / truth.sum())


def normalised_labels(labels: pa.Table) -> pa.Table:
    """The label columns this engine reads (pair_id, present, exhaustive, mask_id, good), typed; yes/no text becomes booleans."""
    known = [c for c in labels.column_names if c in LABEL_COLUMNS]
    if not ({"pair_id", "mask_id"} & set(known)) or not ({"present", "exhaustive", "good"} & set(known)):
        raise ValueError(f"labels need pair_id with present and/or exhaustive, or mask_id with good; got columns {labels.column_names}")
    columns = {}
    for name, type_ in LABEL_COLUMNS.items():
        column = labels.column(name) if name in known else pa.nulls(labels.num_rows, type_)
        if type_ == pa.bool_() and column.type != pa.bool_():
            column = pa.array([_truth(v) for v in column.to_pylist()], pa.bool_())
        try:
            columns[name] = column.cast(type_)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise ValueError(f"labels column {name} holds {column.type}, not {type_}: ids are text") from None
    return pa.table(columns)


def label_counts(labels: pa.Table) -> dict[str, int]:
    """Pair labels (present or exhaustive given) and mask labels (good given) in normalised ``labels``, with or without an id.

    A label whose id is blank names nothing in the run: it counts as given, so that it shows as unmatched.
    """
    pair_labelled = pc.or_(pc.is_valid(labels["present"]), pc.is_valid(labels["exhaustive"]))
    return {"pairs": pc.sum(pair_labelled).as_py() or 0, "masks": pc.sum(pc.is_valid(labels["good"])).as_py() or 0}


def _truth(value: Any) -> bool | None:
    """A yes/no cell as a boolean. Numbers count too: pandas writes a 1/0 column with blank cells as floats (1.0, NaN)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if math.isnan(value):
            return None
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"label value {value!r} is not a yes/no")
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "t"):
        return True
    if text in ("0", "false", "no", "n", "f"):
        return False
    if text == "":
        return None
    raise ValueError(f"label value {value!r} is not a yes/no")


def family_of(con, verifier: str) -> Family:
    """The family whose scores table holds the verifier's rows (the CLIP verifier's when none does: verdicts imported
    from elsewhere have only the shared signals)."""
    for family in FAMILIES:
        ((found,),) = con.execute(f"SELECT count(*) FROM {family.score_table} WHERE verifier = $v", {"v": verifier}).fetchall()
        if found:
            return family
    return FAMILIES[-1]


def _labelled(con, verifier: str) -> dict[str, pa.Table]:
    family = family_of(con, verifier)
    return {
        "pair": con.sql(named_query(family.pair_query), params={"verifier": verifier}).to_arrow_table(),
        "mask": con.sql(named_query(family.mask_query), params={"verifier": verifier}).to_arrow_table(),
    }


def _fit(signal: Signal, table: pa.Table, target_precision: float) -> Fit:
    scores = np.array(table.column(signal.name).to_pylist(), dtype=float)
    labels = table.column(signal.label).to_pylist()
    truth = np.array([v is signal.positive for v in labels], bool)
    usable = np.array([v is not None for v in labels], bool) & ~np.isnan(scores)
    found = fit_threshold(scores[usable], truth[usable], target_precision, signal.at_least == signal.positive)
    predicts = signal.label if signal.positive else f"not {signal.label}"
    return Fit(signal.level, signal.name, predicts, signal.config_key, *(found or (None, None, None)), int(usable.sum()))


def _verdict_scores(verifier: str, rows: dict[str, pa.Table]) -> list[dict[str, Any]]:
    scored = []
    for level, column, value, label, positive in VERDICTS:
        table = rows[level]
        judged = [(v, t) for v, t in zip(table.column(column).to_pylist(), table.column(label).to_pylist(), strict=True) if t is not None]
        said = sum(v == value for v, _ in judged)
        right = sum(v == value and t is positive for v, t in judged)
        actual = sum(t is positive for _, t in judged)
        scored.append(
            {
                "verifier": verifier,
                "level": level,
                "verdict": f"{column}={value}",
                "label": label if positive else f"not {label}",
                "labelled": len(judged),
                "precision": right / said if said else None,
                "recall": right / actual if actual else None,
            }
        )
    return scored


def calibrate(store: TableStore, labels: pa.Table, verifier: str, target_precision: float) -> dict[str, Any]:
    """``verifier``'s thresholds fitted to the labels, and every verifier's verdicts scored against them."""
    labels = normalised_labels(labels)
    con = connect(store)
    try:
        con.register("labels", labels)
        verifiers = [
            v
            for (v,) in con.sql(
                "SELECT verifier FROM pair_verifications UNION SELECT verifier FROM mask_verifications ORDER BY 1"
            ).fetchall()
        ]
        if verifier not in verifiers:
            raise ValueError(f"no verdicts of verifier {verifier!r} in this run (verifiers: {verifiers or 'none: run the verify stage'})")
        labelled = {name: _labelled(con, name) for name in verifiers}
        family = family_of(con, verifier)
    finally:
        con.close()
    rows = labelled[verifier]
    fits = [_fit(signal, rows[signal.level], target_precision) for signal in family.signals]
    given = label_counts(labels)
    return {
        "verifier": verifier,
        "config_section": family.section,
        "target_precision": target_precision,
        "labels": {"given": given, "matched": {"pairs": rows["pair"].num_rows, "masks": rows["mask"].num_rows}},
        "signals": [asdict(f) for f in fits],
        "verdicts": [entry for name in verifiers for entry in _verdict_scores(name, labelled[name])],
        "thresholds": {f.config_key: f.threshold for f in fits if f.config_key and f.threshold is not None},
    }
