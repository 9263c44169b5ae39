"""Embed: CLIP embeddings of every image and every concept, stored for retrieval, negatives and later stages.

Entry point: ``EmbedStage``. Two kinds of unit: shards of images (decoded and transformed by CPU
preparation tasks, embedded by the model actors) and shards of concepts (the ontology's,
vocabulary's and mined ones from ``concepts``). An image that can no longer be read is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from sam3_engine.engine.config import ClipConfig, StorageConfig
from sam3_engine.engine.stage import BuildContext, WorkUnit, arrow_rows, plan_units, register_stage, reject_reasons, rows_table
from sam3_engine.schemas.tables import CONCEPTS, IMAGE_EMBEDDINGS, IMAGES, PHRASE_EMBEDDINGS, REJECTS
from sam3_engine.stages.image_model import ImageModelStage

if TYPE_CHECKING:  # torch and open_clip load where a model runs, not in every process that lists stages
    from sam3_engine.models.clip import ClipChoice, ClipEmbedder

VERSION = 1
"""Bump when a change to this module changes the rows it writes: every unit then re-runs."""

REASONS = {
    "image_unreadable": "The image could not be read or decoded when it was embedded.",
    "worker_crashed": "The model worker died on this image twice (a crash, not an exception).",
}
PHRASES_PER_IMAGE_UNIT = 4
"""Concept units hold this many times ``clip.unit_size`` phrases: a phrase costs a fraction of an image."""


@dataclass(frozen=True)
class ImageItem:
    image_id: str
    uri: str


@dataclass(frozen=True)
class ConceptItem:
    concept_id: str
    phrase: str


@dataclass(frozen=True)
class PreparedImages:
    items: tuple[ImageItem, ...]
    pixels: np.ndarray | None
    rejects: tuple[dict[str, Any], ...]


@register_stage
class EmbedStage(ImageModelStage):
    name = "embed"
    order = 30
    reasons = REASONS
    outputs = (IMAGE_EMBEDDINGS, PHRASE_EMBEDDINGS, REJECTS)

    @classmethod
    def build(cls, context: BuildContext) -> EmbedStage:
        from sam3_engine.models.clip import choose_clip

        clip = context.config.clip
        return cls(clip, choose_clip(clip.model, clip.pretrained, clip.fallback_to_tiny_random), context.config.storage)

    def __init__(self, config: ClipConfig, choice: ClipChoice, storage_config: StorageConfig):
        super().__init__(storage_config, config.workers, config.gpus_per_worker)
        self.config = config
        self.choice = choice

    def load_model(self, device: str) -> ClipEmbedder:
        from sam3_engine.models.clip import ClipEmbedder

        return ClipEmbedder.load(self.choice, self.config.device or device)

    def plan(self, store) -> Iterator[WorkUnit]:
        settings = {"version": VERSION, "model": self.choice.label}
        images = store.read(IMAGES.name, columns=["image_id", "uri"]).sort_by("image_id")
        concepts = store.read(CONCEPTS.name, columns=["concept_id", "phrase"]).sort_by("concept_id")
        by_id = lambda item: item.image_id  # noqa: E731
        yield from plan_units(self.name, settings, (ImageItem(**r) for r in arrow_rows(images)), by_id, self.config.unit_size, by_id)
        yield from plan_units(
            self.name,
            settings,
            (ConceptItem(**r) for r in arrow_rows(concepts)),
            lambda c: c.concept_id,
            self.config.unit_size * PHRASES_PER_IMAGE_UNIT,
            lambda c: (c.concept_id, c.phrase),
            field="concepts",
        )

    def prepare(self, unit: WorkUnit) -> PreparedImages | None:
        """Decode, orient and transform a unit's images on a CPU worker; unreadable ones become rejects."""
        if not isinstance(unit.items[0], ImageItem):
            return None
        from sam3_engine.models.clip import image_transform

        transform = image_transform(self.choice)
        loaded = self.load_images(unit.items)
        pixels = np.stack([transform(image).numpy() for image in loaded.images]) if loaded.images else None
        return PreparedImages(loaded.items, pixels, loaded.rejects)

    def process(self, unit: WorkUnit, prepared: PreparedImages | None = None) -> dict[str, pa.Table]:
        import torch

        embedder = self.model
        images, phrases, rejects = [], [], []
        if isinstance(unit.items[0], ImageItem):
            prepared = prepared if prepared is not None else self.prepare(unit)
            rejects = list(prepared.rejects)
            for start in range(0, len(prepared.items), self.config.batch_size):
                batch = torch.from_numpy(prepared.pixels[start : start + self.config.batch_size].copy())
                for item, vector in zip(prepared.items[start : start + self.config.batch_size], embedder.embed_pixels(batch), strict=True):
                    images.append({"image_id": item.image_id, "model": self.choice.label, "embedding": vector})
        else:
            for start in range(0, len(unit.items), self.config.batch_size):
                batch = unit.items[start : start + self.config.batch_size]
                for item, vector in zip(batch, embedder.embed_phrases([c.phrase for c in batch]), strict=True):
                    phrases.append({"concept_id": item.concept_id, "phrase": item.phrase, "model": self.choice.label, "embedding": vector})
        return {
            IMAGE_EMBEDDINGS.name: rows_table(IMAGE_EMBEDDINGS, images, unit.unit_id),
            PHRASE_EMBEDDINGS.name: rows_table(PHRASE_EMBEDDINGS, phrases, unit.unit_id),
            REJECTS.name: rows_table(REJECTS, rejects, unit.unit_id),
        }

    def summarize(self, con) -> dict[str, Any]:
        images, phrases = con.execute("SELECT (SELECT count(*) FROM image_embeddings), (SELECT count(*) FROM phrase_embeddings)").fetchone()
        reasons = reject_reasons(con, self)
        counts = {
            "images": images,
            "phrases": phrases,
            "rejects": sum(reasons.values()),
            "reject_reasons": reasons,
            "model": self.choice.label,
        }
        if self.choice.random_weights:
            counts["random_weights"] = True
        return counts
