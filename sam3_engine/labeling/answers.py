"""Answers from any labelling tool, stored the same way: ``human_labels``, ``human_masks`` and the tool's verdicts.

A tool's reader (Label Studio's export, CVAT's annotation file) turns each task's latest answer into an
``Answer``: per phrase, the bitmaps painted and whether it was ticked absent. ``store_answers`` matches the
painted bitmaps with the engine's masks bit for bit (kept), takes the rest as drawn, replaces the tool's rows
of the selection (another tool's stay) in one commit per table, and stores every answer of the tool as its
verdicts through ``import-labels``: so pulling twice changes nothing, and an edit in the tool is updated by
the next pull.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.lock import RunLock
from sam3_engine.engine.store import TableStore
from sam3_engine.labeling.masks import bitmap_to_coco, box_of
from sam3_engine.schemas.tables import HUMAN_LABELS, HUMAN_MASKS


class LabelingError(RuntimeError):
    """A labelling round trip that cannot go on: the server is down or refuses, the selection is unknown."""


@dataclass
class Answer:
    """One task's latest answer, as any tool gives it."""

    task_id: str
    annotation_id: str
    annotator: str
    labelled_at: datetime
    lead_time_s: float | None
    absent: set[str]
    """Phrases ticked as not in the image."""
    painted: dict[str, list[np.ndarray]]
    """Per phrase, the bitmaps painted (the image's size, checked by the reader)."""


@dataclass
class PullResult:
    project: str
    pairs: int
    drawn_masks: int
    pending: int
    """Pairs of the selection with no answer yet."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Results that could not be read, by reason (a renamed phrase, a mask of the wrong size...)."""


def push_lock(store: TableStore, tool: str, selection: str) -> RunLock:
    """The lock a push of ``selection`` to ``tool`` holds: two pushes at once would each find no project and make one.

    A push only reads the run, so it does not take the run lock (a long run would block it); it takes this one, named
    in the run directory by a hash of the tool and selection.
    """
    key = hashlib.sha256(f"{tool}\n{selection}".encode()).hexdigest()[:16]
    command = f"labeling push --to {tool} --selection {selection}"
    return RunLock(store.run_url, store.storage_config, command=command, name=f"locks/push-{key}.lock")


def selection_rows(store: TableStore, selection: str) -> list[dict[str, Any]]:
    """The selection's pairs with their image and the engine's masks (``labeling_tasks.sql``); an error if there are none."""
    con = connect(store)
    try:
        rows = con.sql(named_query("labeling_tasks"), params={"selection": selection}).to_arrow_table().to_pylist()
    finally:
        con.close()
    if not rows:
        raise LabelingError(f"no selection {selection!r} in {store.run_url}: make one with sam3-engine select")
    return rows


def store_answers(
    store: TableStore,
    selection: str,
    tool: str,
    project: str,
    rows: list[dict[str, Any]],
    answers: dict[str, Answer],
    skipped,
    in_tool: dict[str, set[str]],
) -> PullResult:
    """Store ``answers`` (by image id) as the tool's rows for the selection's pairs; pairs with no answer stay pending.

    Only this tool's rows of the selection are replaced: another tool's answers to the same selection stay, and a pair
    both answered keeps the answer stored first (``human_labels`` holds one per pair), counted as skipped.
    ``in_tool``: the tool's tasks (ids) per image now. An image with no answer now whose earlier answer came from a task
    the tool no longer has (deleted there, perhaps pushed again as a new task) keeps that answer: nothing imported is
    lost to a deletion in the tool.
    """
    from sam3_engine.app.labels import import_labels

    engine_masks: dict[str, dict[str, Any]] = defaultdict(dict)
    pair_of: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        pair_of[(row["image_id"], row["phrase"])] = row
        if row["mask_id"] is not None:
            engine_masks[row["pair_id"]][row["mask_id"]] = row
    other_labels, other_masks = _stored(store, "selection = $selection AND tool <> $tool", {"selection": selection, "tool": tool})
    answered_elsewhere = {label["pair_id"] for label in other_labels}
    labels, drawn = [], []
    for image_id, answer in answers.items():
        for phrase in set(answer.painted) | answer.absent:
            pair = pair_of.get((image_id, phrase))
            if pair is None:
                skipped["unknown phrase"] += 1
                continue
            if phrase in answer.painted and phrase in answer.absent:
                skipped["phrase both painted and ticked absent"] += 1
                continue
            if pair["pair_id"] in answered_elsewhere:
                skipped["pair answered in another tool, that answer kept"] += 1
                continue
            bitmaps = answer.painted.get(phrase, [])
            kept, new = _match(bitmaps, engine_masks[pair["pair_id"]])
            provenance = {"tool": tool, "annotation_id": answer.annotation_id, "annotator": answer.annotator}
            labels.append(
                {
                    "selection": selection,
                    "pair_id": pair["pair_id"],
                    "image_id": image_id,
                    "concept_id": pair["concept_id"],
                    "phrase": phrase,
                    "present": bool(bitmaps),
                    "kept_mask_ids": kept,
                    "dropped_mask_ids": sorted(set(engine_masks[pair["pair_id"]]) - set(kept)),
                    "drawn_masks": len(new),
                    "project": project,
                    "task_id": answer.task_id,
                    "labelled_at": answer.labelled_at,
                    "lead_time_s": answer.lead_time_s,
                    **provenance,
                }
            )
            for bitmap in new:
                counts = bitmap_to_coco(bitmap)
                drawn.append(
                    {
                        "selection": selection,
                        "mask_id": hashlib.sha256(f"{tool}|{answer.annotation_id}|{pair['pair_id']}|{counts}".encode()).hexdigest()[:24],
                        "pair_id": pair["pair_id"],
                        "image_id": image_id,
                        "concept_id": pair["concept_id"],
                        "height": bitmap.shape[0],
                        "width": bitmap.shape[1],
                        "rle_counts": counts,
                        "bbox": box_of(counts, *bitmap.shape),
                        "area": int(bitmap.sum()),
                        **provenance,
                    }
                )
    labels = [{name: row[name] for name in HUMAN_LABELS.schema.names} for row in labels]
    drawn = [{name: row[name] for name in HUMAN_MASKS.schema.names} for row in drawn]
    unanswered = sorted({row["image_id"] for row in rows} - set(answers))
    params = {"selection": selection, "tool": tool, "images": unanswered}
    earlier_labels, earlier_masks = _stored(store, "selection = $selection AND tool = $tool AND list_contains($images, image_id)", params)
    gone = {label["image_id"] for label in earlier_labels if label["task_id"] not in in_tool.get(label["image_id"], set())}
    labels += [label for label in earlier_labels if label["image_id"] in gone]
    drawn += [mask for mask in earlier_masks if mask["image_id"] in gone]
    if gone:
        skipped["tasks gone from the tool, earlier answers kept"] += len(gone)
    store.replace(HUMAN_MASKS, selection, pa.Table.from_pylist(drawn + other_masks, HUMAN_MASKS.schema))
    store.replace(HUMAN_LABELS, selection, pa.Table.from_pylist(labels + other_labels, HUMAN_LABELS.schema))
    con = connect(store)
    try:  # every answer of the tool, all selections: the verifier's whole set of labels
        every_answer = con.sql(named_query("human_labels_as_labels"), params={"tool": tool}).to_arrow_table()
    finally:
        con.close()
    import_labels(store, every_answer, tool)
    pending = len({row["pair_id"] for row in rows} - {label["pair_id"] for label in labels + other_labels})
    return PullResult(project, len(labels), len(drawn), pending, dict(skipped))


def _match(bitmaps: list[np.ndarray], engine: dict[str, dict[str, Any]]) -> tuple[list[str], list[np.ndarray]]:
    """Which painted masks are the engine's own, unchanged (kept), and which are new or redrawn."""
    kept, new = [], []
    for bitmap in bitmaps:
        counts = bitmap_to_coco(bitmap)
        same = [mask_id for mask_id, row in engine.items() if row["rle_counts"] == counts and mask_id not in kept]
        if same:
            kept.append(same[0])
        else:
            new.append(bitmap)
    return sorted(kept), new


def _stored(store: TableStore, where: str, params: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``human_labels`` and ``human_masks`` rows an earlier pull stored that match ``where``."""
    con = connect(store)
    try:
        labels = con.sql(f"SELECT * FROM human_labels WHERE {where}", params=params).to_arrow_table().to_pylist()
        masks = con.sql(f"SELECT * FROM human_masks WHERE {where}", params=params).to_arrow_table().to_pylist()
    finally:
        con.close()
    return labels, masks
