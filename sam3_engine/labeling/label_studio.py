"""The round trip through Label Studio: a selection goes out as tasks with the engine's masks, answers come back.

``push``: one project per (run, selection), one task per image with its selected phrases as brush labels
(taken from the task's data, so a phrase never reaches the labelling config's XML) and the engine's masks
as a prediction; the engine's ids ride in the task's data. Tasks already in the project are not made twice.
``pull``: the project's JSON export, each task's latest annotation decoded bit for bit, written to
``human_labels`` and ``human_masks`` (replacing the selection's rows: pulling again changes nothing, an
edited annotation is updated), then stored as the ``label-studio`` verifier's verdicts so that ``splits``
and ``calibrate`` see them.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import numpy as np

from sam3_engine.engine import storage
from sam3_engine.engine.store import TableStore
from sam3_engine.labeling.answers import Answer, LabelingError, PullResult, selection_rows, store_answers
from sam3_engine.labeling.masks import MaskError, bitmap_to_brush, brush_to_bitmap, coco_to_bitmap

TOOL = "label-studio"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
"""The API token is read from this environment variable only: never a flag, never a file in the repository."""

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Header value="Paint every instance of each phrase (keep, fix or delete the engine's masks); tick the phrases the image does not show."/>
  <BrushLabels name="mask" toName="image" value="$phrase_labels"/>
  <Choices name="absent" toName="image" choice="multiple" showInline="true" value="$phrase_labels"/>
</View>"""
"""Labels and choices come from each task's ``phrase_labels``: the config is the same for every selection and no
phrase is ever written into XML."""


@dataclass
class PushResult:
    project_id: int
    created: int
    already_there: int


def client(url: str):
    """A Label Studio client for ``url`` with the token of ``$LABEL_STUDIO_API_KEY``, checked with one call."""
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise LabelingError(f"set {TOKEN_ENV} to your Label Studio API token (Account & Settings > Access Token)")
    connection = LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=60)
    try:
        connection.users.whoami()
    except ApiError as exc:
        raise LabelingError(f"Label Studio at {url} answered {exc.status_code}: check {TOKEN_ENV}") from None
    except httpx.HTTPError as exc:
        raise LabelingError(f"cannot reach Label Studio at {url}: {type(exc).__name__}: {exc}") from None
    return connection


def project_title(store: TableStore, selection: str) -> str:
    """Label Studio's titles are at most 50 characters: the selection and a hash of the run keep them apart."""
    run = hashlib.sha256(store.run_url.encode()).hexdigest()[:8]
    return f"{selection[:36]} ({run})"


def _find_project(connection, store: TableStore, selection: str):
    title = project_title(store, selection)
    for project in connection.projects.list():
        if project.title == title:
            return project
    return None


def push(store: TableStore, selection: str, url: str, files_root: str | None = None) -> PushResult:
    """Send ``selection`` to Label Studio at ``url``; tasks of images already in its project are left as they are."""
    rows = selection_rows(store, selection)
    connection = client(url)
    project = _find_project(connection, store, selection)
    if project is None:
        description = f"sam3-engine selection {selection} of {store.run_url}"
        project = connection.projects.create(title=project_title(store, selection), description=description, label_config=LABEL_CONFIG)
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_image[row["image_id"]].append(row)
    present = {task.data.get("engine_image_id") for task in connection.tasks.list(project=project.id, fields="all")}
    missing = [image_id for image_id in by_image if image_id not in present]
    if missing:
        locate = _image_locator(connection, project.id, store, [by_image[i][0]["uri"] for i in missing], files_root)
        tasks = [_task(selection, by_image[image_id], locate) for image_id in missing]
        connection.projects.import_tasks(project.id, request=tasks, return_task_ids=True)
    return PushResult(project.id, len(missing), len(by_image) - len(missing))


def _image_locator(connection, project_id: int, store: TableStore, uris: list[str], files_root: str | None):
    """How the tool reaches the images: local files through its local-files storage, s3:// through presigned URLs."""
    if all(storage.protocol_of(uri) == "file" for uri in uris):
        if files_root is None:
            raise LabelingError("the images are local files: give --files-root, the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        root = os.path.realpath(files_root)
        paths = [os.path.realpath(uri.removeprefix("file://")) for uri in uris]
        outside = [path for path in paths if os.path.commonpath([root, path]) != root]
        if outside:
            raise LabelingError(f"{outside[0]} is not under --files-root {files_root}: Label Studio can serve only files below it")
        folder = os.path.commonpath([os.path.dirname(path) for path in paths])
        if folder == root:
            raise LabelingError(f"put the images in a folder below --files-root {files_root}: Label Studio serves subfolders only")
        connection.import_storage.local.create(project=project_id, path=folder, title="sam3-engine images", use_blob_urls=False)
        return lambda uri: "/data/local-files/?" + urlencode({"d": os.path.relpath(os.path.realpath(uri.removeprefix("file://")), root)})
    fs, _ = storage.filesystem(uris[0], store.storage_config)
    return lambda uri: fs.sign(uri, expiration=7 * 24 * 3600)


def _task(selection: str, rows: list[dict[str, Any]], locate) -> dict[str, Any]:
    """One image: its phrases as labels, its pairs' ids by phrase, the engine's masks as one prediction."""
    first = rows[0]
    pairs = {row["phrase"]: row["pair_id"] for row in rows}
    results = [
        {
            "id": row["mask_id"],
            "from_name": "mask",
            "to_name": "image",
            "type": "brushlabels",
            "original_width": row["width"],
            "original_height": row["height"],
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": bitmap_to_brush(coco_to_bitmap(row["rle_counts"], row["height"], row["width"])),
                "brushlabels": [row["phrase"]],
            },
        }
        for row in rows
        if row["mask_id"] is not None
    ]
    return {
        "data": {
            "image": locate(first["uri"]),
            "phrase_labels": [{"value": phrase} for phrase in pairs],
            "engine_image_id": first["image_id"],
            "engine_selection": selection,
            "engine_pairs": pairs,
        },
        "predictions": [{"model_version": "sam3-engine", "result": results}] if results else [],
    }


def pull(store: TableStore, selection: str, url: str) -> PullResult:
    """Read the project's answers into ``human_labels`` and ``human_masks`` and the ``label-studio`` verifier's verdicts."""
    import json

    rows = selection_rows(store, selection)
    connection = client(url)
    project = _find_project(connection, store, selection)
    if project is None:
        raise LabelingError(f"no Label Studio project for selection {selection!r} of this run at {url}: push it first")
    exported = json.loads(b"".join(connection.projects.exports.download_sync(project.id, export_type="JSON", download_all_tasks=True)))
    sizes = {row["image_id"]: (row["image_height"], row["image_width"]) for row in rows}
    answers, skipped = {}, defaultdict(int)
    for task in exported:
        done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        image_id = (task.get("data") or {}).get("engine_image_id")
        if not done or image_id not in sizes:
            continue
        latest = max(done, key=lambda a: a["updated_at"])
        absent, painted = _read_results(latest.get("result", []), sizes[image_id], skipped)
        answers[image_id] = Answer(
            task_id=str(task["id"]),
            annotation_id=str(latest["id"]),
            annotator=str(latest.get("completed_by")),
            labelled_at=datetime.fromisoformat(latest["updated_at"].replace("Z", "+00:00")),
            lead_time_s=latest.get("lead_time"),
            absent=absent,
            painted=painted,
        )
    in_tool = {(task.get("data") or {}).get("engine_image_id") for task in exported}
    return store_answers(store, selection, TOOL, str(project.id), rows, answers, skipped, in_tool)


def _read_results(results: list[dict[str, Any]], size: tuple[int, int], skipped) -> tuple[set[str], dict[str, list[np.ndarray]]]:
    """The phrases ticked absent and, per phrase, the brush masks decoded (a mask of another size is skipped)."""
    absent: set[str] = set()
    painted: dict[str, list[np.ndarray]] = defaultdict(list)
    for result in results:
        value = result.get("value") or {}
        if result.get("type") == "choices" and result.get("from_name") == "absent":
            absent |= set(value.get("choices", []))
        elif result.get("type") == "brushlabels":
            labels = value.get("brushlabels") or [None]
            if (result.get("original_height"), result.get("original_width")) != size:
                skipped["mask not the image's size"] += 1
                continue
            try:
                bitmap = brush_to_bitmap(value.get("rle", []), *size)
            except MaskError as exc:
                skipped[exc.reason] += 1
                continue
            painted[labels[0]].append(bitmap)
    return absent, dict(painted)
