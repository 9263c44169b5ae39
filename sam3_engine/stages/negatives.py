"""Negatives: per image, absent concepts that are easy to confuse with its present ones.

Entry point: ``NegativesStage``. SA-Co's lesson: most pairs worth asking are negatives, and hard
ones (a tow truck beside a pickup truck) teach the most. For each concept mined as present, its
ontology siblings (same parent), then cousins (same grandparent), then its nearest concepts by
CLIP text similarity become candidates with origin ``hard_negative``, taken in turns across the
present concepts up to ``negatives.max_per_image``. A negative is never a present concept, a
synonym of one (synonyms share a concept), or an ancestor of one (a pickup truck is a truck); when
the embed stage has run, one the image itself scores high on with CLIP is dropped (it may be
present). Whether SAM 3 fires on it is for proposal and verification.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import ConfigSection
from sam3_engine.engine.stage import BuildContext, Stage, WorkerContext, WorkUnit, arrow_rows, plan_units, register_stage, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.io.embeddings import EmbeddingStore, PhraseVectors, phrase_digest
from sam3_engine.schemas.tables import CANDIDATES, IMAGE_EMBEDDINGS
from sam3_engine.stages.mine import shared_ontology
from sam3_engine.text.concepts import Ontology, concept_id, pair_id

VERSION = 1
"""Bump when a change to this module changes the rows it writes: every unit then re-runs."""


class NegativesConfig(ConfigSection):
    max_per_image: int = Field(
        30, ge=0, description="At most this many hard negatives per image: absent concepts easy to confuse with present ones."
    )
    clip_neighbours: int = Field(
        5,
        ge=0,
        description=(
            "Per present concept, this many nearest concepts by CLIP text similarity are candidate negatives (needs the embed stage)."
        ),
    )
    max_image_similarity: float = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description=(
            "A candidate negative whose CLIP similarity to the image is above this may be present: it is dropped (needs the embed stage)."
        ),
    )
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


RELATIONS = ("sibling", "cousin", "clip_neighbour")
ONTOLOGY_SCORES = {"sibling": 1.0, "cousin": 0.5}


@dataclass(frozen=True)
class PresentConcepts:
    image_id: str
    present: tuple[str, ...]


@register_stage
class NegativesStage(Stage):
    name = "negatives"
    order = 50
    config_model = NegativesConfig
    outputs = (CANDIDATES,)

    @classmethod
    def build(cls, context: BuildContext) -> NegativesStage:
        config = context.config
        return cls(config.negatives, shared_ontology(context))

    def __init__(self, config: NegativesConfig, ontology: Ontology):
        self.config = config
        self.ontology = ontology

    def setup(self, context: WorkerContext) -> None:
        self.embeddings = EmbeddingStore(TableStore(context.run_url, context.storage))

    def plan(self, store) -> Iterator[WorkUnit]:
        con = connect(store)
        present = con.sql(named_query("present_concepts_per_image")).to_arrow_table()
        con.close()
        settings = {
            "version": VERSION,
            "ontology": self.ontology.digest,
            **self.config.model_dump(exclude={"unit_size"}),
            "phrases": phrase_digest(store),
            "images": store.read(IMAGE_EMBEDDINGS.name, columns=["image_id"]).num_rows,
        }
        images = (PresentConcepts(r["image_id"], tuple(r["present"])) for r in arrow_rows(present))
        yield from plan_units(self.name, settings, images, lambda i: i.image_id, self.config.unit_size, lambda i: (i.image_id, i.present))

    def process(self, unit: WorkUnit, prepared: Any = None) -> dict[str, pa.Table]:
        phrases = self.embeddings.phrases()
        image_ids, vectors = self.embeddings.images([i.image_id for i in unit.items]) if len(phrases.ids) else ([], None)
        image_vectors = dict(zip(image_ids, vectors, strict=True)) if vectors is not None else {}
        rows = [row for image in unit.items for row in self.negatives(image, phrases, image_vectors.get(image.image_id))]
        return {CANDIDATES.name: rows_table(CANDIDATES, rows, unit.unit_id)}

    def _neighbours(self, name: str, phrases: PhraseVectors) -> list[tuple[str, str, float]]:
        """The concepts nearest to ``name`` by CLIP text similarity, when the embed stage has run."""
        index = phrases.index.get(concept_id(name))
        if index is None or not self.config.clip_neighbours:
            return []
        similarity = phrases.vectors @ phrases.vectors[index]
        nearest = [i for i in np.argsort(-similarity, kind="stable")[: self.config.clip_neighbours + 1] if i != index]
        return [(phrases.phrases[i], "clip_neighbour", float(similarity[i])) for i in nearest[: self.config.clip_neighbours]]

    def negatives(self, image: PresentConcepts, phrases: PhraseVectors, image_vector: np.ndarray | None) -> list[dict[str, Any]]:
        present = set(image.present)
        excluded = present | {ancestor for name in present for ancestor in self.ontology.lineage(name)}
        per_concept = {
            name: [(other, relation, ONTOLOGY_SCORES[relation]) for other, relation in self.ontology.relatives(name)]
            + self._neighbours(name, phrases)
            for name in sorted(present)
        }

        def maybe_present(other: str) -> bool:
            index = phrases.index.get(concept_id(other))
            return (
                image_vector is not None
                and index is not None
                and float(phrases.vectors[index] @ image_vector) > self.config.max_image_similarity
            )

        chosen: dict[str, dict[str, Any]] = {}
        for relation in RELATIONS:  # every sibling before any cousin, in turns across the present concepts
            tier = [
                [(other, score, name) for other, kind, score in candidates if kind == relation] for name, candidates in per_concept.items()
            ]
            for round_ in zip_longest(*tier):
                for entry in round_:
                    if entry is None or entry[0] in excluded or entry[0] in chosen or maybe_present(entry[0]):
                        continue
                    if len(chosen) >= self.config.max_per_image:
                        return list(chosen.values())
                    other, score, related = entry
                    cid = concept_id(other)
                    chosen[other] = {
                        "pair_id": pair_id(image.image_id, cid),
                        "image_id": image.image_id,
                        "concept_id": cid,
                        "phrase": other,
                        "origin": "hard_negative",
                        "raw_phrase": None,
                        "score": score,
                        "related_concept_id": concept_id(related),
                        "relation": relation,
                    }
        return list(chosen.values())

    def summarize(self, con) -> dict[str, Any]:
        images, negatives, positives = con.execute(
            "SELECT count(DISTINCT image_id), count(*) FILTER (origin = 'hard_negative'), "
            "count(DISTINCT pair_id) FILTER (origin <> 'hard_negative') FROM candidates"
        ).fetchone()
        return {
            "images": images,
            "hard_negatives": negatives,
            "negatives_per_image": round(negatives / images, 2) if images else 0.0,
            "share_of_negatives": round(negatives / (negatives + positives), 3) if negatives + positives else 0.0,
        }
