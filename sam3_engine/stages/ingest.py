"""Ingest: read every input's bytes, hash them, probe the image, and accept or reject it with a reason.

Entry point: ``IngestStage``. ``probe`` is the per-input work; it is a plain function so that a
worker process can run it and tests can call it directly.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from contextlib import contextmanager
from typing import Any, Literal

import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator

from sam3_engine.engine import storage
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import ConfigError, ConfigSection, StorageConfig
from sam3_engine.engine.stage import (
    BuildContext,
    Derivation,
    Stage,
    WorkUnit,
    fingerprint,
    plan_units,
    register_stage,
    reject_reasons,
    rows_table,
)
from sam3_engine.io.inputs import InputEntry, list_inputs
from sam3_engine.schemas.tables import IMAGES, REJECTS, SOURCES

VERSION = 2
"""Bump when a change to this module changes the rows it writes: every unit then re-runs."""


class IngestConfig(ConfigSection):
    input_format: Literal["auto", "files", "manifest", "coco"] = Field(
        "auto", description="How to read `input`: auto picks by suffix (.jsonl/.csv/.parquet manifest, .json COCO, else files)."
    )
    unit_size: int = Field(256, ge=1, description="Average inputs per work unit (one atomic commit).")
    workers: int | None = Field(None, ge=1, description="Decoding processes; default: the machine's CPU count.")
    max_pixels: int = Field(100_000_000, ge=1, description="Images with more pixels are rejected as too_large (decompression bombs).")
    max_bytes: int = Field(512 * 2**20, ge=1, description="Files with more bytes are rejected as file_too_large without being read whole.")
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"),
        description="Pillow formats accepted; others are rejected as unsupported_format.",
    )

    @field_validator("formats")
    @classmethod
    def _upper(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f.upper() for f in formats)


SWAPS_AXES = {5, 6, 7, 8}

# Magic bytes of image formats that Pillow cannot decode out of the box.
_KNOWN_UNDECODABLE = {
    b"ftypheic": "HEIC",
    b"ftypheix": "HEIC",
    b"ftypmif1": "HEIF",
    b"ftypavif": "AVIF",
    b"ftypcrx ": "CR3",
}


class Reject(Exception):
    def __init__(self, reason: str, detail: str, image_id: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.image_id = reason, detail, image_id


REASONS = {
    "bad_manifest_row": "A manifest or COCO record without a usable URI, or a CSV row that is not one record.",
    "missing": "No file at the URI (for HTTP: a 404 or 410 answer), or a symbolic link to nothing.",
    "unreadable": "The file exists but could not be read (permissions, I/O or network error, a server out of reach, not a regular file).",
    "symlink_loop": "A symbolic link that leads back to itself, or to a folder that holds it.",
    "empty_file": "Zero bytes.",
    "file_too_large": "More bytes than ingest.max_bytes.",
    "not_an_image": "Pillow does not recognise the bytes as an image.",
    "unsupported_format": "A recognised image format that the engine does not accept (see ingest.formats).",
    "too_large": "More pixels than ingest.max_pixels (a decompression-bomb guard).",
    "truncated": "The image data ends early.",
    "corrupt": "The image data (or a header that starts like an accepted format) is damaged and does not decode.",
    "worker_crashed": "Decoding this input killed its worker process twice.",
}


@contextmanager
def _pixel_limit_disabled():
    """Pillow's own bomb check is replaced by ingest.max_pixels, checked before decoding."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_bytes(uri: str, config: IngestConfig, storage_config: StorageConfig) -> bytes:
    try:
        fs, path = storage.filesystem(uri, storage_config)
        with fs.open(path, "rb") as f:
            data = f.read(config.max_bytes + 1)
    except FileNotFoundError as exc:
        cause = exc.__cause__  # fsspec's HTTP filesystem says "not found" for any failure: only a 404 or 410 answer is missing
        if storage.protocol_of(uri) in ("http", "https") and cause is not None and getattr(cause, "status", None) not in (404, 410):
            raise Reject("unreadable", f"cannot read {uri}: {type(cause).__name__}: {cause}") from exc
        raise Reject("missing", f"no file at {uri}") from exc
    except IsADirectoryError as exc:
        raise Reject("unreadable", f"{uri} is a directory") from exc
    except Exception as exc:  # noqa: BLE001 - any I/O failure is a reason, not a crash
        raise Reject("unreadable", f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    if not data:
        raise Reject("empty_file", f"{uri} has zero bytes")
    if len(data) > config.max_bytes:
        raise Reject("file_too_large", f"{uri} is larger than ingest.max_bytes = {config.max_bytes}")
    return data


def _decode_failure(exc: Exception, image_id: str, fmt: str) -> Reject:
    message = f"{type(exc).__name__}: {exc}"
    lowered = message.lower()
    if "truncated" in lowered or isinstance(exc, EOFError) or "end of file" in lowered:
        return Reject("truncated", f"{fmt} data ends early: {message}", image_id)
    return Reject("corrupt", f"{fmt} data does not decode: {message}", image_id)


def _damaged_header(data: bytes, image_id: str, formats: tuple[str, ...]) -> Reject | None:
    """The reason for bytes that start like an accepted format (a PNG signature, say) whose header does not parse.

    Pillow reports any header it cannot parse as an unidentified image; opening it with the format's
    own plugin gives the real error (a bad IHDR checksum, a header cut short).
    """
    for fmt in formats:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        claimed = accept(data[:16]) if accept is not None else False
        if claimed and not isinstance(claimed, str):
            try:
                factory(io.BytesIO(data), "")
            except Exception as exc:  # noqa: BLE001 - every header error is a reason code
                return _decode_failure(exc, image_id, f"{fmt} header")
    return None


def probe(entry: InputEntry, config: IngestConfig, storage_config: StorageConfig) -> dict[str, Any]:
    """One input's ``sources`` row; raises ``Reject`` with a reason code when it cannot be used."""
    if entry.problem:
        raise Reject(entry.reason, entry.problem)
    data = _read_bytes(entry.uri, config, storage_config)
    image_id = hashlib.sha256(data).hexdigest()
    with _pixel_limit_disabled():
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            damaged = _damaged_header(data, image_id, config.formats)
            if damaged is not None:
                raise damaged from exc
            head = data[4:12]
            if head in _KNOWN_UNDECODABLE:
                raise Reject("unsupported_format", f"{_KNOWN_UNDECODABLE[head]} is not supported", image_id) from exc
            if data.lstrip()[:5] in (b"<?xml", b"<svg ") or b"<svg" in data[:1024]:
                raise Reject("unsupported_format", "SVG (vector) images are not supported", image_id) from exc
            raise Reject("not_an_image", f"not a recognised image ({data[:8]!r}...)", image_id) from exc
        except Exception as exc:  # noqa: BLE001 - a header Pillow chokes on is a damaged file
            raise _decode_failure(exc, image_id, "image header") from exc
        fmt = image.format or "unknown"
        if fmt.upper() not in config.formats:
            raise Reject("unsupported_format", f"{fmt} is not in ingest.formats {list(config.formats)}", image_id)
        width, height = image.size
        if width * height > config.max_pixels:
            raise Reject(
                "too_large", f"{width}x{height} = {width * height} pixels exceeds ingest.max_pixels = {config.max_pixels}", image_id
            )
        try:
            orientation = int(image.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - an unreadable EXIF block leaves the pixels usable
            orientation = 1
        try:
            Image.open(io.BytesIO(data)).verify()  # checksums (PNG CRCs) that a plain decode ignores
            image.load()
        except Exception as exc:  # noqa: BLE001 - every decoder error is a reason code
            raise _decode_failure(exc, image_id, fmt) from exc
    orientation = orientation if 1 <= orientation <= 8 else 1
    if orientation in SWAPS_AXES:
        width, height = height, width
    return {
        "input_id": entry.input_id,
        "uri": entry.uri,
        "image_id": image_id,
        "width": width,
        "height": height,
        "format": fmt,
        "mode": image.mode,
        "num_bytes": len(data),
        "exif_orientation": orientation,
        "captions": list(entry.captions),
        "alt_text": entry.alt_text,
        "source": entry.source,
        "phrases": list(entry.phrases),
    }


def _reject_row(entry: InputEntry, reject: Reject) -> dict[str, Any]:
    return {
        "input_id": entry.input_id,
        "stage": IngestStage.name,
        "uri": entry.uri,
        "image_id": reject.image_id,
        "reason": reject.reason,
        "detail": reject.detail,
    }


@register_stage
class IngestStage(Stage):
    name = "ingest"
    order = 10
    config_model = IngestConfig
    reasons = REASONS
    outputs = (SOURCES, REJECTS)
    derived = (IMAGES,)

    @classmethod
    def build(cls, context: BuildContext) -> IngestStage:
        config = context.config
        if not config.input:
            raise ConfigError("the ingest stage needs an input: set `input:` in the config or pass --input")
        return cls(storage.absolute_url(config.input), config.ingest, config.storage)

    def __init__(self, input_url: str, config: IngestConfig, storage_config: StorageConfig):
        self.input_url = input_url
        self.config = config
        self.storage_config = storage_config

    def plan(self, store) -> list[WorkUnit]:
        entries = list_inputs(self.input_url, self.config.input_format, self.storage_config)
        settings = self.config.model_dump(mode="json", include={"max_pixels", "max_bytes", "formats"})
        described = lambda e: (e.input_id, e.uri, e.captions, e.alt_text, e.source, e.phrases, e.version, e.problem, e.reason)  # noqa: E731
        return plan_units(
            self.name,
            {"version": VERSION, "settings": settings},
            entries,
            lambda e: e.uri,
            self.config.unit_size,
            described,
            field="inputs",
        )

    def process(self, unit: WorkUnit, prepared: Any = None) -> dict[str, pa.Table]:
        accepted, rejected = [], []
        for entry in unit.items:
            try:
                accepted.append(probe(entry, self.config, self.storage_config))
            except Reject as reject:
                rejected.append(_reject_row(entry, reject))
        return {SOURCES.name: rows_table(SOURCES, accepted, unit.unit_id), REJECTS.name: rows_table(REJECTS, rejected, unit.unit_id)}

    def process_isolated(self, unit: WorkUnit, item: InputEntry, error: str) -> dict[str, pa.Table]:
        row = _reject_row(item, Reject("worker_crashed", f"decoding {item.uri} killed the worker: {error}"))
        return {SOURCES.name: rows_table(SOURCES, [], unit.unit_id), REJECTS.name: rows_table(REJECTS, [row], unit.unit_id)}

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        unit_id = fingerprint(f"{self.name}.images", {"version": VERSION, "units": sorted(done_units)})
        con = connect(store)
        reader = con.sql(named_query("images_from_sources"), params={"unit_id": unit_id}).to_arrow_reader()
        return [Derivation(unit_id, IMAGES, reader)]

    def summarize(self, con) -> dict[str, Any]:
        (sources, images) = con.execute("SELECT (SELECT count(*) FROM sources), (SELECT count(*) FROM images)").fetchone()
        reasons = reject_reasons(con, self)
        rejects = sum(reasons.values())
        return {
            "accounted": sources + rejects,
            "images": images,
            "duplicates": sources - images,
            "rejects": rejects,
            "reject_reasons": reasons,
        }
