"""Turn an input URL into a list of inputs: files of a folder or glob, rows of a manifest, or a COCO file's images.

Listing never fails on one bad record: a manifest row without a usable URI or a CSV row that is
not one record, a broken symbolic link or a pipe becomes an input with a ``problem``, which ingest
rejects with a reason, so every record is accounted for.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

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
    reason: str = "bad_manifest_row"
    """The reject reason of ``problem``."""
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
    if fs.isdir(path):
        return _file_entries(fs, fs.find(path, detail=True), path, descend=True)
    if fs.exists(path):
        return _file_entries(fs, {path: fs.info(path)}, posixpath.dirname(path), descend=False)
    if is_glob(path):
        return _file_entries(fs, fs.glob(path, detail=True), path.split("*", 1)[0].rsplit("/", 1)[0], descend=False)
    raise InputError(f"input {url!r} does not exist")


def is_glob(path: str) -> bool:
    """A pattern, unless a file or folder of that very name exists (``photos [draft]/`` is a folder): callers ask that first."""
    return any(ch in path for ch in "*?[")


def _file_entries(fs, found: dict, root: str, descend: bool) -> list[InputEntry]:
    """Listed files as inputs, hidden ones skipped; what is not a plain file is followed or becomes an input with a problem.

    fsspec lists a symbolic link as `other` and does not descend into it: a link to a file is that
    file, a link to a folder is listed too (``descend``) unless it leads back into a folder that holds
    it, and a dangling link is `missing`. Pipes, sockets and devices are `unreadable`.
    """
    entries = []
    for name, info in found.items():
        relative = posixpath.relpath(name, root) if root else name
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        uri = _qualified(fs, name)
        if info.get("islink") and info.get("type") == "other":
            try:
                info = fs.info(name)  # follows the link
            except FileNotFoundError:
                entries.append(
                    InputEntry(
                        uri=uri, problem=f"{uri}: a symbolic link to {info.get('destination')!r}, which does not exist", reason="missing"
                    )
                )
                continue
            except OSError as exc:
                reason = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
                entries.append(InputEntry(uri=uri, problem=f"{uri}: cannot follow the symbolic link: {exc.strerror}", reason=reason))
                continue
            if info["type"] == "directory" and descend:
                if _leads_back(name, root):
                    problem = f"{uri}: a symbolic link to {os.path.realpath(name)}, a folder that holds it"
                    entries.append(InputEntry(uri=uri, problem=problem, reason="symlink_loop"))
                else:
                    entries += _file_entries(fs, fs.find(name, detail=True), root, descend)
                continue
        if info.get("type") == "file":
            stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
            entries.append(InputEntry(uri=uri, version=f"{info.get('size')}:{stamp}"))
        elif info.get("type") == "other":
            entries.append(InputEntry(uri=uri, problem=f"{uri}: not a regular file (a pipe, socket or device)", reason="unreadable"))
    return entries


def _leads_back(link: str, root: str) -> bool:
    """Whether a link to a folder leads to one that holds the link: the real folder of ``link``, or of a folder above it up to ``root``."""
    target, folder = os.path.realpath(link), posixpath.dirname(link)
    while True:
        real = os.path.realpath(folder)
        if os.path.commonpath([real, target]) == target:
            return True
        if len(folder) <= len(root):
            return False
        folder = posixpath.dirname(folder)


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
    """Every phrase given, each item of a list or text split at ";"; blank ones are kept for mine to reject as empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    values = value if isinstance(value, list | tuple) else [value]
    return tuple(phrase.strip() for v in values if v is not None for phrase in str(v).split(";"))


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
    try:
        data = storage.read_bytes(url, storage_config)
    except FileNotFoundError:
        raise InputError(f"manifest {url!r} does not exist") from None
    lower = url.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(storage.arrow_buffer(data)))
        if "uri" not in table.column_names:
            raise InputError(f"manifest {url!r} has no `uri` column (columns: {table.column_names})")
        return [_entry(url, row, f"{url}#row={i + 1}") for i, row in enumerate(table.to_pylist())]
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()
    if lower.endswith(".csv"):
        return _read_csv(url, text)
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


def _read_csv(url: str, text: str) -> list[InputEntry]:
    """A CSV manifest's rows; a record that is not one clean row is a ``bad_manifest_row``, and the rows after it are still read.

    A quote left open makes the csv module read on, swallowing the next lines into one field. A record
    whose quoting is broken (strict parsing fails), or whose field runs on into a line that reads as a
    row of its own (a URI in the `uri` column), is rejected, and reading starts again on its next line.
    """
    lines = io.StringIO(text).readlines()
    reader = csv.reader(lines, strict=True)
    try:
        fieldnames = next(reader, [])
    except csv.Error as exc:
        raise InputError(f"manifest {url!r}: the header line does not parse as CSV ({exc})") from exc
    if "uri" not in fieldnames:
        raise InputError(f"manifest {url!r} has no `uri` column (columns: {fieldnames})")
    entries, start, uri_column = [], reader.line_num, fieldnames.index("uri")
    while start < len(lines):
        first = start  # the index of the line the next record starts on
        reader = csv.reader((lines[i] for i in range(start, len(lines))), strict=True)
        try:
            for record in reader:
                where, end = f"{url}#line={first + 1}", start + reader.line_num  # the record's lines: first .. end - 1
                runs_into = next((i for i in range(first + 1, end) if _reads_as_row(lines[i], uri_column)), None)
                if runs_into is not None:
                    raise csv.Error(f"a quoted field runs on into line {runs_into + 1}, which reads as a row of its own")
                if len(record) > len(fieldnames):
                    entries.append(InputEntry(uri=where, problem=f"{where}: {len(record)} fields, the header has {len(fieldnames)}"))
                elif record:
                    entries.append(_entry(url, dict(zip(fieldnames, record, strict=False)), where))
                first = end
            break
        except csv.Error as exc:
            where = f"{url}#line={first + 1}"
            entries.append(InputEntry(uri=where, problem=f"{where}: not one CSV record ({exc})"))
            start = first + 1
    return entries


def _reads_as_row(line: str, uri_column: int) -> bool:
    """A line whose `uri` column holds something like a URI or file name (no spaces, a slash or a suffix)."""
    fields = next(csv.reader([line]), [])
    uri = fields[uri_column].strip() if len(fields) > uri_column else ""
    return bool(uri) and not re.search(r"\s", uri) and bool(re.search(r"/|\.[A-Za-z0-9]{2,5}$", uri))


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
        try:
            image = Image.open(f)
        except UnidentifiedImageError:  # Pillow names the file object ("<...LocalFileOpener object at 0x7f...>"), not the file
            raise UnidentifiedImageError(f"cannot identify image file {uri}") from None
        image.load()
    return ImageOps.exif_transpose(image).convert("RGB")
