"""Export: one split of the benchmark as SA-Co JSON, COCO instances JSON, or Parquet.

Entry point: ``export``. Reads ``splits`` (tiers, kinds, sources), ``pairs``, ``images``, ``masks``
and ``mask_verifications`` through the macros of ``schemas/sql/export.sql``, and streams each file
batch by batch, so memory does not grow with the split. Masks are COCO RLE at the image's original
(EXIF-oriented) resolution, exactly as stored; each file keeps the masks its source accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from sam3_engine.engine import storage
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.store import TableStore

FORMATS = ("saco", "coco", "parquet")
TIERS = {"gold": ["gold"], "silver": ["silver"], "all": ["gold", "silver"]}
SPLITS = ("train", "val", "test")
PIXEL_EXHAUSTIVE_UNCOVERED = 0.01
"""A positive is marked pixel-exhaustive when its source left at most this share of SAM 3's semantic foreground uncovered."""
SOURCE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class ExportError(ValueError):
    """An export that cannot be made, with the reason."""


@dataclass
class ExportReport:
    files: list[str] = field(default_factory=list)
    pairs: int = 0
    positives: int = 0
    negatives: int = 0
    masks: int = 0


def _batches(con, sql: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for batch in con.sql(sql, params=params).to_arrow_reader():
        yield from batch.to_pylist()


def _write_json(target: _Target, path: str, sections: dict[str, Iterable[Any]]) -> None:
    """A JSON object of lists, written item by item."""
    with target.open(path, "w") as f:
        f.write("{")
        for index, (key, items) in enumerate(sections.items()):
            f.write(("," if index else "") + json.dumps(key) + ": [")
            for count, item in enumerate(items):
                f.write(("," if count else "") + "\n" + json.dumps(item))
            f.write("]")
        f.write("}\n")


def _normalised_box(bbox: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = bbox
    return [x / width, y / height, w / width, h / height]


def _source_paths(out: str, count: int) -> list[str]:
    """One file per source when pairs have several (SA-Co Gold ships ``_a``, ``_b``, ``_c``)."""
    if count <= 1:
        return [out]
    stem, dot, suffix = out.rpartition(".") if out.lower().endswith(".json") else (out, "", "")
    return [f"{stem}_{SOURCE_LETTERS[i]}{dot}{suffix}" for i in range(count)]


def export(store: TableStore, split: str, tier: str, format: str, out: str, storage_config: StorageConfig) -> ExportReport:
    """Write ``split`` (train, val, test) of ``tier`` (gold, silver, all) to ``out`` in ``format``."""
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {SPLITS}, not {split!r}")
    if tier not in TIERS:
        raise ExportError(f"--tier must be one of {tuple(TIERS)}, not {tier!r}")
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, not {format!r}")
    con = connect(store)
    try:
        con.execute(named_query("export"))
        params = {"split": split, "tiers": TIERS[tier]}
        ((pairs, sources),) = con.sql(
            "SELECT count(*), coalesce(max(source_count), 0) FROM export_pairs($split, $tiers, 1)", params=params
        ).fetchall()
        if not pairs:
            raise ExportError(_empty_split(con, split, tier))
        fs, path = storage.filesystem(out, storage_config)
        if fs.isdir(path):  # checked up front: with several sources the files are OUT_a, OUT_b, ..., which would land beside the folder
            raise ExportError(f"cannot write --out {out}: Is a directory")
        for source_path in _source_paths(out, sources) if format == "saco" else ():
            if fs.isdir(storage.filesystem(source_path, storage_config)[1]):
                raise ExportError(f"cannot write {source_path}, a file of --out {out} (one per source): Is a directory")
        writer = {"saco": _saco, "coco": _coco, "parquet": _parquet}[format]
        target = _Target(fs)
        try:
            return writer(con, target, out, params, sources)
        except BaseException:  # a write that failed (a full disk) or was interrupted: no half-written export is left
            target.discard()
            raise
    finally:
        con.close()


def _empty_split(con, split: str, tier: str) -> str:
    """Why ``split`` has nothing to export: what is empty, and which splits have pairs of the tier."""
    kind = "" if tier == "all" else f"{tier} "
    ((built,),) = con.sql("SELECT count(*) FROM splits").fetchall()
    if not built:
        return f"split {split!r} has no {kind}pairs: the splits table is empty (run the splits stage first)"
    counted = "SELECT count(*) FROM export_pairs($split, $tiers, 1)"
    sizes = {name: con.sql(counted, params={"split": name, "tiers": TIERS[tier]}).fetchall()[0][0] for name in SPLITS}
    found = ", ".join(f"{name} ({count})" for name, count in sizes.items() if count) or "none"
    return f"split {split!r} has no {kind}pairs; splits with {kind}pairs: {found}"


@dataclass
class _Target:
    """Where the export writes: every file it opened, so that a failed export removes them all (an SA-Co export has one per source)."""

    fs: Any
    opened: list[str] = field(default_factory=list)

    @contextmanager
    def open(self, path: str, mode: str):
        """``path`` opened for writing; any failure, opening (a directory, no permission, no such folder) or writing (a full
        disk), is an ExportError naming it."""
        try:
            f = self.fs.open(path, mode)
        except OSError as exc:
            raise ExportError(f"cannot write --out {path}: {exc.strerror or exc}") from exc
        self.opened.append(path)
        try:
            with f:
                yield f
        except OSError as exc:
            raise ExportError(f"cannot write --out {path}: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        """Remove the files opened; only files: ``--out /dev/full`` is a device, which the export did not make."""
        for path in self.opened:
            try:
                if self.fs.isfile(path):
                    self.fs.rm(path)
            except OSError:
                pass  # already gone: nothing of it is left either way


def _saco(con, target: _Target, out: str, params: dict[str, Any], sources: int) -> ExportReport:
    report = ExportReport()
    for index, path in enumerate(_source_paths(out, sources), start=1):
        selection = {**params, "source": index}
        counts = {"pairs": 0, "positives": 0, "masks": 0}

        def images(selection=selection, counts=counts) -> Iterator[dict[str, Any]]:
            for row in _batches(con, "SELECT * FROM export_pairs($split, $tiers, $source)", selection):
                counts["pairs"] += 1
                counts["positives"] += row["kind"] == "positive"
                uncovered = row["uncovered_fraction"]
                pixel = row["kind"] == "negative" or (uncovered is not None and uncovered <= PIXEL_EXHAUSTIVE_UNCOVERED)
                yield {
                    "id": row["pair_number"],
                    "file_name": row["uri"],
                    "text_input": row["phrase"],
                    "width": row["width"],
                    "height": row["height"],
                    "queried_category": row["concept_id"],
                    "is_instance_exhaustive": 1,
                    "is_pixel_exhaustive": int(pixel),
                    "pair_id": row["pair_id"],
                    "image_id": row["image_id"],
                    "tier": row["tier"],
                    "split": row["split"],
                    "source": row["source"],
                }

        def masks(selection=selection, counts=counts) -> Iterator[dict[str, Any]]:
            for row in _batches(con, "SELECT * FROM export_masks($split, $tiers, $source)", selection):
                counts["masks"] += 1
                size = row["width"] * row["height"]
                yield {
                    "id": row["mask_number"],
                    "image_id": row["pair_number"],
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": {"size": [row["height"], row["width"]], "counts": row["rle_counts"]},
                    "bbox": _normalised_box(row["bbox"], row["width"], row["height"]),
                    "area": row["area"] / size,
                    "source": f"created by SAM 3, verified by {row['source']}",
                    "mask_id": row["mask_id"],
                }

        _write_json(target, path, {"images": images(), "annotations": masks(), "categories": [{"id": 1, "name": "object"}]})
        report.files.append(path)
        report.pairs, report.positives, report.masks = counts["pairs"], counts["positives"], counts["masks"]
    report.negatives = report.pairs - report.positives
    return report


def _coco(con, target: _Target, out: str, params: dict[str, Any], sources: int) -> ExportReport:
    """COCO instances: images are photos, categories are concepts; negatives as LVIS's ``neg_category_ids``."""
    selection = {**params, "source": 1}
    pairs = con.sql("SELECT * FROM export_pairs($split, $tiers, $source)", params=selection).to_arrow_table().to_pylist()
    concepts = {c: i for i, c in enumerate(sorted({(p["concept_id"], p["phrase"]) for p in pairs}), start=1)}
    category_of = {concept_id: number for (concept_id, _), number in concepts.items()}
    photos: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        photo = photos.setdefault(
            pair["image_id"],
            {
                "id": len(photos) + 1,
                "file_name": pair["uri"],
                "width": pair["width"],
                "height": pair["height"],
                "image_id": pair["image_id"],
                "neg_category_ids": [],
                "pos_category_ids": [],
            },
        )
        photo["neg_category_ids" if pair["kind"] == "negative" else "pos_category_ids"].append(category_of[pair["concept_id"]])
    report = ExportReport(files=[out], pairs=len(pairs), positives=sum(p["kind"] == "positive" for p in pairs))
    report.negatives = report.pairs - report.positives

    def masks() -> Iterator[dict[str, Any]]:
        for row in _batches(con, "SELECT * FROM export_masks($split, $tiers, $source)", selection):
            report.masks += 1
            yield {
                "id": row["mask_number"],
                "image_id": photos[row["image_id"]]["id"],
                "category_id": category_of[row["concept_id"]],
                "iscrowd": 0,
                "segmentation": {"size": [row["height"], row["width"]], "counts": row["rle_counts"]},
                "bbox": row["bbox"],
                "area": row["area"],
                "score": row["score"],
                "mask_id": row["mask_id"],
            }

    categories = [{"id": number, "name": phrase, "concept_id": concept_id} for (concept_id, phrase), number in concepts.items()]
    _write_json(target, out, {"images": photos.values(), "annotations": masks(), "categories": categories})
    return report


def _parquet(con, target: _Target, out: str, params: dict[str, Any], sources: int) -> ExportReport:
    """One row per pair, its accepted masks as a list (those of its first source)."""
    report = ExportReport(files=[out])
    reader = con.sql(named_query("export_parquet"), params={**params, "source": 1}).to_arrow_reader()
    with target.open(out, "wb") as f, pq.ParquetWriter(f, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            report.pairs += batch.num_rows
            report.positives += sum(kind == "positive" for kind in batch.column("kind").to_pylist())
            report.masks += sum(len(m) for m in batch.column("masks").to_pylist())
    report.negatives = report.pairs - report.positives
    return report


def predictions(store: TableStore, split: str, tier: str) -> list[dict[str, Any]]:
    """The run's own proposals for a split, as a COCO results list keyed like the SA-Co export (every mask, with SAM 3's score)."""
    con = connect(store)
    try:
        con.execute(named_query("export"))
        rows = con.sql(named_query("split_predictions"), params={"split": split, "tiers": TIERS[tier]}).to_arrow_table().to_pylist()
    finally:
        con.close()
    return [
        {
            "image_id": row["pair_number"],
            "category_id": 1,
            "score": row["score"],
            "segmentation": {"size": [row["height"], row["width"]], "counts": row["rle_counts"]},
            "bbox": _normalised_box(row["bbox"], row["width"], row["height"]),
        }
        for row in rows
    ]
