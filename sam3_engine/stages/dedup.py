"""Dedup: near-duplicate groups (the same photo resized, re-encoded, cropped a little, mirrored), so that splits deal whole groups.

Entry point: ``DedupStage``. A unit is a shard of images: each is decoded and oriented as the models
see it and hashed (``metrics.near_duplicates.perceptual_hashes``: its pHash, its mirror image's and
its corner crops') into ``image_hashes``. At the end, ``near_duplicates`` is derived from every hash
and every stored CLIP image embedding: images within ``dedup.phash_max_distance`` bits, or with a
CLIP cosine of at least ``dedup.clip_min_cosine``, are linked, and a group is a connected component.
Embeddings from a random-weight CLIP (tiny-random) are not used: they are close for any two images.
A threshold change re-derives the groups from the stored hashes; no image is read again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from sam3_engine.engine.catalog import connect
from sam3_engine.engine.config import ConfigSection, StorageConfig
from sam3_engine.engine.stage import (
    BuildContext,
    Derivation,
    Stage,
    WorkUnit,
    arrow_rows,
    fingerprint,
    image_reject,
    plan_units,
    register_stage,
    reject_reasons,
    rows_table,
)
from sam3_engine.io.inputs import load_image
from sam3_engine.metrics.near_duplicates import Edges, clip_edges, connected_groups, perceptual_hashes, phash_edges
from sam3_engine.schemas.tables import IMAGE_HASHES, IMAGES, NEAR_DUPLICATES, REJECTS

VERSION = 2
"""Bump when a change to this module changes the rows it writes: every unit then re-runs.
2: a plain image's pHash (one colour, a smooth gradient: ``near_duplicates.informative``) links it to nothing."""

RANDOM_CLIP = "tiny-random"
"""``image_embeddings.model`` of a random-weight CLIP (``models.clip.TINY_RANDOM``, not imported: it loads torch)."""

REASONS = {
    "image_unreadable": "The image could not be read or decoded when it was hashed.",
    "worker_crashed": "Hashing this image killed its worker process twice.",
}


class DedupConfig(ConfigSection):
    """How near two images must be to count as one photo, which splits then deal together."""

    phash_max_distance: int = Field(
        10,
        ge=0,
        le=32,
        description="Images whose pHashes (or one's and the other's mirror image or corner crop) differ in at most this many "
        "of 64 bits are near-duplicates.",
    )
    clip_min_cosine: float | None = Field(
        0.95,
        ge=-1.0,
        le=1.0,
        description="Images whose CLIP embeddings have at least this cosine are near-duplicates; null: pHash only. "
        "Not used with a random-weight CLIP.",
    )
    neighbours: int = Field(
        10,
        ge=1,
        description="Nearest images an image may be linked to by CLIP, and by pHash in the HNSW graph (larger groups still join "
        "through their members).",
    )
    phash_exact_up_to: int = Field(
        1_000_000,
        ge=0,
        description="Up to this many images every pair of pHashes is compared (exact); above, an HNSW graph finds each image's "
        "nearest (approximate).",
    )
    clip_exact_up_to: int = Field(
        50_000,
        ge=0,
        description="Up to this many images every pair of CLIP embeddings is compared (exact); above, an inverted file finds each "
        "image's nearest (approximate).",
    )
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


@dataclass(frozen=True)
class ImageItem:
    image_id: str
    uri: str


@register_stage
class DedupStage(Stage):
    name = "dedup"
    order = 35
    config_model = DedupConfig
    reasons = REASONS
    outputs = (IMAGE_HASHES, REJECTS)
    derived = (NEAR_DUPLICATES,)
    worker_imports = ("imagehash",)

    @classmethod
    def build(cls, context: BuildContext) -> DedupStage:
        embed = next((stage for stage in context.built if stage.name == "embed"), None)
        return cls(context.config.dedup, context.config.storage, random_clip=bool(embed and embed.choice.random_weights))

    def __init__(self, config: DedupConfig, storage_config: StorageConfig, random_clip: bool = False):
        self.config = config
        self.storage_config = storage_config
        self.random_clip = random_clip
        """The run's embed stage has a random-weight CLIP: said before the run; the derivation checks the stored embeddings."""

    def plan(self, store) -> Iterator[WorkUnit]:
        images = store.read(IMAGES.name, columns=["image_id", "uri"]).sort_by("image_id")
        by_id = lambda item: item.image_id  # noqa: E731
        yield from plan_units(
            self.name, {"version": VERSION}, (ImageItem(**r) for r in arrow_rows(images)), by_id, self.config.unit_size, by_id
        )

    def process(self, unit: WorkUnit, prepared: Any = None) -> dict[str, pa.Table]:
        hashes, rejects = [], []
        for item in unit.items:
            try:
                phash, mirrored, crops = perceptual_hashes(load_image(item.uri, self.storage_config))
            except Exception as exc:  # noqa: BLE001 - a file gone or damaged since ingest is a reject, not a crash
                rejects.append(image_reject(self.name, item, "image_unreadable", f"{type(exc).__name__}: {exc}"))
                continue
            hashes.append({"image_id": item.image_id, "phash": phash, "phash_mirrored": mirrored, "phash_crops": crops})
        return {IMAGE_HASHES.name: rows_table(IMAGE_HASHES, hashes, unit.unit_id), REJECTS.name: rows_table(REJECTS, rejects, unit.unit_id)}

    def process_isolated(self, unit: WorkUnit, item: ImageItem, error: str) -> dict[str, pa.Table]:
        reject = image_reject(self.name, item, "worker_crashed", f"hashing {item.uri} killed the worker: {error}")
        return {IMAGE_HASHES.name: rows_table(IMAGE_HASHES, [], unit.unit_id), REJECTS.name: rows_table(REJECTS, [reject], unit.unit_id)}

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        """``near_duplicates``, rebuilt when the hashes, the stored embeddings or the thresholds change."""
        con = connect(store)
        ((embeddings,),) = con.sql(
            "SELECT md5(coalesce(string_agg(u, ',' ORDER BY u), '')) "
            "FROM (SELECT DISTINCT unit_id || '/' || model AS u FROM image_embeddings)"
        ).fetchall()
        settings = self.config.model_dump(mode="json", exclude={"unit_size"})
        unit_id = fingerprint(
            f"{self.name}.{NEAR_DUPLICATES.name}", {"version": VERSION, **settings, "units": done_units, "embeddings": embeddings}
        )
        hashes = con.sql("SELECT * EXCLUDE (unit_id) FROM image_hashes ORDER BY image_id").to_arrow_table()
        ids = hashes.column("image_id").to_pylist()
        crops = _matrix(hashes.column("phash_crops"), np.int64)
        edges = [
            phash_edges(
                hashes.column("phash").to_numpy(),
                hashes.column("phash_mirrored").to_numpy(),
                crops,
                self.config.phash_max_distance,
                self.config.neighbours,
                self.config.phash_exact_up_to,
            )
        ]
        if self.clip_off(con) is None:
            embedded = con.sql(
                "SELECT h.image_id, e.embedding FROM image_hashes AS h JOIN image_embeddings AS e USING (image_id) ORDER BY h.image_id"
            ).to_arrow_table()
            position = {image_id: i for i, image_id in enumerate(ids)}
            owner = np.array([position[image_id] for image_id in embedded.column("image_id").to_pylist()], np.int64)
            found = clip_edges(
                _matrix(embedded.column("embedding"), np.float32),
                self.config.clip_min_cosine,
                self.config.neighbours,
                self.config.clip_exact_up_to,
            )
            edges.append(Edges(owner[found.first], owner[found.second], found.kind, found.distance))
        con.close()
        groups = connected_groups(len(ids), *edges)
        table = pa.table(
            {
                "image_id": ids,
                "group_id": [ids[i] for i in groups.first],
                "group_size": groups.size,
                "linked_by": [groups.linked_by(i) for i in range(len(ids))],
                "phash_distance": pa.array(groups.phash_distance, mask=groups.phash_distance < 0),
                "clip_cosine": pa.array(groups.clip_cosine, mask=np.isnan(groups.clip_cosine)),
                "unit_id": [unit_id] * len(ids),
            },
            schema=NEAR_DUPLICATES.schema,
        )
        return [Derivation(unit_id, NEAR_DUPLICATES, pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))]

    def clip_off(self, con) -> str | None:
        """Why CLIP embeddings link no images in this run (a short code for the summary), or None when they do."""
        if self.config.clip_min_cosine is None:
            return "disabled"
        return clip_usable(con)

    def summarize(self, con) -> dict[str, Any]:
        hashed, groups, grouped, largest = con.execute(
            "SELECT count(*), count(DISTINCT group_id) FILTER (group_size > 1), count(*) FILTER (group_size > 1), "
            "coalesce(max(group_size), 0) FROM near_duplicates"
        ).fetchone()
        links = dict(
            con.execute(
                "SELECT kind, count(*) FROM (SELECT unnest(linked_by) AS kind FROM near_duplicates) GROUP BY ALL ORDER BY ALL"
            ).fetchall()
        )
        reasons = reject_reasons(con, self)
        rejects = sum(reasons.values())
        counts = {
            "accounted": con.execute("SELECT count(*) FROM image_hashes").fetchone()[0] + rejects,
            "images": hashed,
            "groups": groups,
            "images_in_groups": grouped,
            "largest_group": largest,
            "images_linked_by": links,
            "rejects": rejects,
            "reject_reasons": reasons,
        }
        off = self.clip_off(con)
        if off:
            counts["clip_links_off"] = off
        return counts

    def notices(self) -> list[str]:
        if self.random_clip and self.config.clip_min_cosine is not None:
            return [
                "dedup: CLIP has random weights (tiny-random), whose embeddings are close for any two images: near-duplicates by pHash only"
            ]
        return []


def clip_usable(con) -> str | None:
    """Why the stored CLIP image embeddings cannot link near-duplicates, as a code: ``no_embeddings`` (the embed stage has
    not run), ``tiny-random`` (a random-weight model's: any two images are close), ``several_models``; None when they can."""
    models = [model for (model,) in con.execute("SELECT DISTINCT model FROM image_embeddings ORDER BY model").fetchall()]
    if not models:
        return "no_embeddings"
    if RANDOM_CLIP in models:
        return RANDOM_CLIP
    if len(models) > 1:
        return "several_models"
    return None


def _matrix(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A list column (embeddings, crop hashes) as a 2-d array, a row per value."""
    values = column.combine_chunks()
    if len(values) == 0:
        return np.zeros((0, 0), dtype)
    return values.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(values), -1)
