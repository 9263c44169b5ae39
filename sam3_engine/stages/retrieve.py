"""Retrieve: the concepts CLIP finds most similar to each image, from the whole concept pool.

Entry point: ``RetrieveStage``. Reads the embed stage's tables: each image's embedding against every
concept's text embedding (the ontology's, the vocabulary's and the mined ones); the ``top_k`` most
similar at or above ``min_similarity`` become candidates with origin ``clip`` and the similarity as
their score. Plain matrix products on CPU workers: no model runs here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from sam3_engine.engine.config import ConfigSection
from sam3_engine.engine.stage import BuildContext, Stage, WorkerContext, WorkUnit, arrow_rows, plan_units, register_stage, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.io.embeddings import EmbeddingStore, phrase_digest
from sam3_engine.schemas.tables import CANDIDATES, IMAGE_EMBEDDINGS
from sam3_engine.text.concepts import pair_id

VERSION = 1
"""Bump when a change to this module changes the rows it writes: every unit then re-runs."""


class RetrieveConfig(ConfigSection):
    top_k: int = Field(10, ge=0, description="At most this many concepts per image from CLIP retrieval (origin clip).")
    min_similarity: float = Field(
        0.25,
        ge=-1.0,
        le=1.0,
        description="CLIP cosine similarity a retrieved concept needs (ViT-B-32: present concepts score about 0.25-0.35).",
    )
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


@register_stage
class RetrieveStage(Stage):
    name = "retrieve"
    order = 40
    config_model = RetrieveConfig
    outputs = (CANDIDATES,)

    @classmethod
    def build(cls, context: BuildContext) -> RetrieveStage:
        return cls(context.config.retrieve)

    def __init__(self, config: RetrieveConfig):
        self.config = config

    def setup(self, context: WorkerContext) -> None:
        self.embeddings = EmbeddingStore(TableStore(context.run_url, context.storage))

    def plan(self, store) -> Iterator[WorkUnit]:
        image_ids = store.read(IMAGE_EMBEDDINGS.name, columns=["image_id"]).sort_by("image_id")
        settings = {
            "version": VERSION,
            "top_k": self.config.top_k,
            "min_similarity": self.config.min_similarity,
            "phrases": phrase_digest(store),
        }
        same = lambda image_id: image_id  # noqa: E731
        yield from plan_units(self.name, settings, (r["image_id"] for r in arrow_rows(image_ids)), same, self.config.unit_size, same)

    def process(self, unit: WorkUnit, prepared: Any = None) -> dict[str, pa.Table]:
        concepts = self.embeddings.phrases()
        image_ids, vectors = self.embeddings.images(list(unit.items))
        similarity = vectors @ concepts.vectors.T if len(concepts.ids) else np.zeros((len(image_ids), 0), np.float32)
        rows = []
        k = min(self.config.top_k, similarity.shape[1])
        for image_id, scores in zip(image_ids, similarity, strict=True):
            best = np.argsort(-scores, kind="stable")[:k]
            for index in best:
                if scores[index] < self.config.min_similarity:
                    break
                cid = concepts.ids[index]
                rows.append(
                    {
                        "pair_id": pair_id(image_id, cid),
                        "image_id": image_id,
                        "concept_id": cid,
                        "phrase": concepts.phrases[index],
                        "origin": "clip",
                        "raw_phrase": None,
                        "score": float(scores[index]),
                        "related_concept_id": None,
                        "relation": None,
                    }
                )
        return {CANDIDATES.name: rows_table(CANDIDATES, rows, unit.unit_id)}

    def summarize(self, con) -> dict[str, Any]:
        images, pairs, concepts = con.execute(
            "SELECT count(DISTINCT image_id), count(*), count(DISTINCT concept_id) FROM candidates WHERE origin = 'clip'"
        ).fetchone()
        return {"images": images, "pairs": pairs, "concepts": concepts, "concepts_per_image": round(pairs / images, 2) if images else 0.0}
