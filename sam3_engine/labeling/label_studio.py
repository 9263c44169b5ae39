"""The round trip through Label Studio: a selection goes out as tasks with the engine's masks, answers come back.

``push``: one project per (run, selection), one task per image with its selected phrases as brush labels
(taken from the task's data, so a phrase never reaches the labelling config's XML) and the engine's masks
as a prediction; the engine's ids ride in the task's data. Tasks already in the project are not made twice.
``pull``: the project's JSON export, each task's latest annotation decoded bit for bit, written to
``human_labels`` and ``human_masks`` (replacing this tool's rows of the selection: pulling again changes
nothing, an edited annotation is updated), then stored as the ``label-studio`` verifier's verdicts so that ``splits``
and ``calibrate`` see them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np

from sam3_engine.engine import storage
from sam3_engine.engine.store import TableStore
from sam3_engine.labeling.answers import Answer, LabelingError, PullResult, selection_rows, store_answers
from sam3_engine.labeling.masks import MaskError, bitmap_to_brush, brush_to_bitmap, coco_to_bitmap, polygon_to_bitmap

TOOL = "label-studio"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
"""The API token is read from this environment variable only: never a flag, never a file in the repository."""

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Header value="Paint or outline every instance of each phrase (keep, fix or delete the engine's masks); tick the phrases not shown."/>
  <BrushLabels name="mask" toName="image" value="$phrase_labels"/>
  <PolygonLabels name="outline" toName="image" value="$phrase_labels"/>
  <Choices name="absent" toName="image" choice="multiple" showInline="true" value="$phrase_labels"/>
</View>"""
"""Labels and choices come from each task's ``phrase_labels``: the config is the same for every selection and no
phrase is ever written into XML. People paint masks (brush) or outline instances (polygon); a polygon becomes a mask when pulled."""


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
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - a port that is not a number raises here, not in the middle of a call
    except ValueError:
        valid = False
    if not valid:
        raise LabelingError(f"--url {url!r} is not an address like http://127.0.0.1:8080")
    connection = LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=60)
    not_label_studio = f"{url} does not look like Label Studio: give the server's address, e.g. http://127.0.0.1:8080"
    try:
        connection.users.whoami()
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise LabelingError(f"Label Studio at {url} answered {exc.status_code}: check {TOKEN_ENV}") from None
        raise LabelingError(f"{not_label_studio} (it answered {exc.status_code})") from None
    except ValueError:  # JSON that is not a user: some other server
        raise LabelingError(not_label_studio) from None
    except httpx.HTTPError as exc:
        raise LabelingError(f"cannot reach Label Studio at {url}: {type(exc).__name__}: {exc}") from None
    return connection


@contextmanager
def _answers_of(url: str):
    """Label Studio's refusals and odd answers after the token check, as a LabelingError of one line naming what it said."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as exc:
        said = exc.body if isinstance(exc.body, str) else json.dumps(exc.body, ensure_ascii=False)
        raise LabelingError(f"Label Studio at {url} answered {exc.status_code}: {' '.join(said.split())[:300]}") from None
    except httpx.HTTPError as exc:
        raise LabelingError(f"cannot reach Label Studio at {url}: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # JSON the SDK cannot read
        raise LabelingError(f"Label Studio at {url} answered something unreadable: {' '.join(str(exc).split())[:300]}") from None


def project_title(store: TableStore, selection: str) -> str:
    """Label Studio's titles are at most 50 characters: the selection's start, readable, and a hash of the run and the whole
    selection name, so that selections sharing their first 36 characters get projects of their own."""
    key = hashlib.sha256(f"{store.run_url}\n{selection}".encode()).hexdigest()[:8]
    return f"{selection[:36]} ({key})"


def _description(store: TableStore, selection: str) -> str:
    return f"sam3-engine selection {selection} of {store.run_url}"


def _find_project(connection, store: TableStore, selection: str):
    """The selection's project; one pushed before titles hashed the selection is known by its old title and description."""
    title = project_title(store, selection)
    legacy = f"{selection[:36]} ({hashlib.sha256(store.run_url.encode()).hexdigest()[:8]})"
    for project in connection.projects.list():
        if project.title == title or (project.title == legacy and project.description == _description(store, selection)):
            return project
    return None


def push(store: TableStore, selection: str, url: str, files_root: str | None = None) -> PushResult:
    """Send ``selection`` to Label Studio at ``url``; tasks of images already in its project are left as they are.

    Everything is checked before a project is made, and a project this push made is deleted again when the push fails:
    a failed push leaves nothing on the server for a pull to mistake for a pushed selection.
    """
    rows = selection_rows(store, selection)
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_image[row["image_id"]].append(row)
    locate, folder = _image_locator(store, [images[0]["uri"] for images in by_image.values()], files_root)
    connection = client(url)
    with _answers_of(url):
        project, created = _find_project(connection, store, selection), False
        if project is None:
            title, description = project_title(store, selection), _description(store, selection)
            project, created = connection.projects.create(title=title, description=description, label_config=LABEL_CONFIG), True
        try:
            present = {task.data.get("engine_image_id") for task in connection.tasks.list(project=project.id, fields="all")}
            missing = [image_id for image_id in by_image if image_id not in present]
            if missing:
                if folder is not None:
                    connection.import_storage.local.create(project=project.id, path=folder, title="sam3-engine images", use_blob_urls=False)
                tasks = [_task(selection, by_image[image_id], locate) for image_id in missing]
                connection.projects.import_tasks(project.id, request=tasks, return_task_ids=True)
        except BaseException:
            if created:
                connection.projects.delete(project.id)
            raise
    return PushResult(project.id, len(missing), len(by_image) - len(missing))


def _image_locator(store: TableStore, uris: list[str], files_root: str | None):
    """How the tool reaches the images, and the folder its local-files storage must serve (None for s3://, presigned URLs)."""
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

        def locate(uri: str) -> str:
            return "/data/local-files/?" + urlencode({"d": os.path.relpath(os.path.realpath(uri.removeprefix("file://")), root)})

        return locate, folder
    fs, _ = storage.filesystem(uris[0], store.storage_config)
    return (lambda uri: fs.sign(uri, expiration=7 * 24 * 3600)), None


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
    rows = selection_rows(store, selection)
    connection = client(url)
    with _answers_of(url):
        project = _find_project(connection, store, selection)
        if project is None:
            raise LabelingError(f"no Label Studio project for selection {selection!r} of this run at {url}: push it first")
        exported = json.loads(b"".join(connection.projects.exports.download_sync(project.id, export_type="JSON", download_all_tasks=True)))
    if not isinstance(exported, list) or not exported:
        raise LabelingError(f"Label Studio project {project.id} has no tasks for selection {selection!r}: push it first")
    sizes = {row["image_id"]: (row["image_height"], row["image_width"]) for row in rows}
    answers, skipped = {}, defaultdict(int)
    in_tool: dict[str, set[str]] = defaultdict(set)
    for task in exported:
        data = task.get("data") if isinstance(task, dict) else None
        image_id = data.get("engine_image_id") if isinstance(data, dict) else None
        if image_id not in sizes:
            continue
        in_tool[image_id].add(str(task.get("id")))
        annotations = task.get("annotations") or []
        done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            continue
        try:
            latest = max(done, key=lambda a: a["updated_at"])
            labelled_at = datetime.fromisoformat(latest["updated_at"].replace("Z", "+00:00"))
            results = latest.get("result") or []
            if not isinstance(results, list):
                raise TypeError
        except (KeyError, TypeError, AttributeError, ValueError):
            skipped["malformed annotation"] += 1
            continue
        absent, painted = _read_results(results, sizes[image_id], skipped)
        answers[image_id] = Answer(
            task_id=str(task["id"]),
            annotation_id=str(latest.get("id")),
            annotator=str(latest.get("completed_by")),
            labelled_at=labelled_at,
            lead_time_s=latest.get("lead_time") if isinstance(latest.get("lead_time"), int | float) else None,
            absent=absent,
            painted=painted,
        )
    return store_answers(store, selection, TOOL, str(project.id), rows, answers, skipped, in_tool)


def _read_results(results: list[Any], size: tuple[int, int], skipped) -> tuple[set[str], dict[str, list[np.ndarray]]]:
    """The phrases ticked absent and, per phrase, the brush masks decoded; anything else is skipped and counted by reason."""
    absent: set[str] = set()
    painted: dict[str, list[np.ndarray]] = defaultdict(list)
    for result in results:
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, dict):
            skipped["malformed result"] += 1
            continue
        kind = result.get("type")
        if kind == "choices" and result.get("from_name") == "absent":
            choices = value.get("choices")
            choices = [choices] if isinstance(choices, str) else choices  # one choice, not one per letter
            if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
                skipped["malformed result"] += 1
                continue
            absent |= set(choices)
        elif kind in ("brushlabels", "polygonlabels"):
            labels = value.get(kind)
            labels = [labels] if isinstance(labels, str) else labels
            phrase = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
            if (result.get("original_height"), result.get("original_width")) != size:
                skipped["mask not the image's size"] += 1
                continue
            try:
                bitmap = brush_to_bitmap(value.get("rle") or [], *size) if kind == "brushlabels" else _polygon(value, size)
            except MaskError as exc:
                skipped[exc.reason] += 1
                continue
            painted[phrase].append(bitmap)
        else:
            skipped[f"result type not supported: {kind}"] += 1
    return absent, dict(painted)


def _polygon(value: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """A polygon result's points (percent of the image's width and height) as an image-sized bitmap."""
    height, width = size
    points = value.get("points")
    if not isinstance(points, list) or not all(isinstance(point, list | tuple) and len(point) == 2 for point in points):
        raise MaskError("undecodable polygon", "points must be [x, y] pairs")
    try:
        return polygon_to_bitmap([(float(x) * width / 100, float(y) * height / 100) for x, y in points], height, width)
    except (TypeError, ValueError):
        raise MaskError("undecodable polygon", "points must be numbers") from None
