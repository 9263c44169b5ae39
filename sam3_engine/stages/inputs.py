"""Turn an input URL into a list of inputs: files of a folder or glob, rows of a manifest, or a COCO file's images.

Listing never fails on one bad record: a manifest row without a usable URI becomes an input with
a ``problem``, which ingest rejects with a reason, so every record is accounted for.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import pyarrow.parquet as pq
from PIL import Image, ImageOps

from sam3_engine.engine import storage
from sam3_engine.engine.config import StorageConfig

MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet")


class InputError(ValueError):
    """An input URL that cannot be listed at all (missing, or a manifest without a `uri` column)."""


@dataclass(frozen=True)
class InputEntry:
    uri: str
    captions: tuple[str, ...] = ()
    alt_text: str | None = None
    source: str | None = None
    phrases: tuple[str, ...] = ()
    """Phrases the user wants asked about this image (the manifest's `phrases`: a list, or text split at ";")."""
    version: str | None = field(default=None, compare=False)
    """Size and modification stamp from the listing, so a changed file is probed again."""
    problem: str | None = None
    input_id: str = ""


def list_inputs(url: str, input_format: str, storage_config: StorageConfig) -> list[InputEntry]:
    """All inputs under ``url``, sorted by URI, each with a stable ``input_id``."""
    kind = input_format if input_format != "auto" else _guess_format(url)
    if kind == "manifest":
        entries = _read_manifest(url, storage_config)
    elif kind == "coco":
        entries = _read_coco(url, storage_config)
    else:
        entries = _list_files(url, storage_config)
    return _with_ids(entries)


def _guess_format(url: str) -> str:
    lower = url.lower()
    if lower.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if lower.endswith(".json"):
        return "coco"
    return "files"


def _qualified(fs, path: str) -> str:
    return path if storage.protocol_of(fs.unstrip_protocol(path)) == "file" else fs.unstrip_protocol(path)


def _list_files(url: str, storage_config: StorageConfig) -> list[InputEntry]:
    fs, path = storage.filesystem(url, storage_config)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
        root = path.split("*", 1)[0].rsplit("/", 1)[0]
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
        root = path
    elif fs.exists(path):
        found = {path: fs.info(path)}
        root = posixpath.dirname(path)
    else:
        raise InputError(f"input {url!r} does not exist")
    entries = []
    for name, info in found.items():
        relative = posixpath.relpath(name, root) if root else name
        if info.get("type") != "file" or any(part.startswith(".") for part in relative.split("/")):
            continue
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        entries.append(InputEntry(uri=_qualified(fs, name), version=f"{info.get('size')}:{stamp}"))
    return entries


def _resolve(base_url: str, uri: str) -> str:
    """A manifest's relative URI is relative to the manifest's own folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return storage.join(base_url.rsplit("/", 1)[0], uri)


def _captions(value) -> tuple[str, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list | tuple) else [value]
    return tuple(str(v).strip() for v in values if v is not None and str(v).strip())


def _phrases(value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(";")
    return _captions(value)


def _text(value) -> str | None:
    return None if value is None or not str(value).strip() else str(value).strip()


def _entry(url: str, record: dict, where: str) -> InputEntry:
    uri = record.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        return InputEntry(uri=where, problem=f"{where}: no usable `uri` ({uri!r})")
    return InputEntry(
        uri=_resolve(url, uri.strip()),
        captions=_captions(record.get("caption", record.get("captions"))),
        alt_text=_text(record.get("alt_text")),
        source=_text(record.get("source")),
        phrases=_phrases(record.get("phrases")),
    )


def _read_manifest(url: str, storage_config: StorageConfig) -> list[InputEntry]:
    fs, path = storage.filesystem(url, storage_config)
    if not fs.exists(path):
        raise InputError(f"manifest {url!r} does not exist")
    lower = path.lower()
    if lower.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if "uri" not in table.column_names:
            raise InputError(f"manifest {url!r} has no `uri` column (columns: {table.column_names})")
        return [_entry(url, row, f"{url}#row={i + 1}") for i, row in enumerate(table.to_pylist())]
    with fs.open(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace").read()
    if lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if "uri" not in (reader.fieldnames or []):
            raise InputError(f"manifest {url!r} has no `uri` column (columns: {reader.fieldnames})")
        return [_entry(url, row, f"{url}#line={i + 2}") for i, row in enumerate(reader)]
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{url}#line={number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            entries.append(InputEntry(uri=where, problem=f"{where}: not valid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict):
            entries.append(InputEntry(uri=where, problem=f"{where}: expected a JSON object"))
            continue
        entries.append(_entry(url, record, where))
    return entries


def _read_coco(url: str, storage_config: StorageConfig) -> list[InputEntry]:
    fs, path = storage.filesystem(url, storage_config)
    if not fs.exists(path):
        raise InputError(f"COCO file {url!r} does not exist")
    with fs.open(path, "rb") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise InputError(f"COCO file {url!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"COCO file {url!r} has no `images` list")
    captions = defaultdict(list)
    for annotation in data.get("annotations") or []:
        if isinstance(annotation, dict) and "caption" in annotation:
            captions[annotation.get("image_id")].append(annotation["caption"])
    entries = []
    for i, image in enumerate(data["images"]):
        where = f"{url}#images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            entries.append(InputEntry(uri=where, problem=f"{where}: no `file_name`"))
            continue
        record = {"uri": image["file_name"], "captions": captions.get(image.get("id")), "source": image.get("source")}
        entries.append(_entry(url, record, where))
    return entries


def _with_ids(entries: list[InputEntry]) -> list[InputEntry]:
    """Sort by URI and give each input an id from its URI and its occurrence among equal URIs."""
    seen: Counter[str] = Counter()
    result = []
    for entry in sorted(entries, key=lambda e: e.uri):
        occurrence = seen[entry.uri]
        seen[entry.uri] += 1
        digest = hashlib.sha256(f"{entry.uri}\0{occurrence}".encode()).hexdigest()[:32]
        result.append(replace(entry, input_id=digest))
    return result


def load_image(uri: str, storage_config: StorageConfig) -> Image.Image:
    """An ingested image, decoded, turned upright by its EXIF orientation, as RGB: what the models see."""
    fs, path = storage.filesystem(uri, storage_config)
    with fs.open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return ImageOps.exif_transpose(image).convert("RGB")
