"""Reading the embed stage's tables in a worker: all phrase embeddings (read once per worker), a unit's image embeddings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import IMAGE_EMBEDDINGS, PHRASE_EMBEDDINGS


@dataclass(frozen=True)
class PhraseVectors:
    ids: list[str]
    phrases: list[str]
    vectors: np.ndarray
    """Unit-length rows, one per concept, float32."""
    index: dict[str, int]


def _matrix(column) -> np.ndarray:
    values = column.combine_chunks()
    if len(values) == 0:
        return np.zeros((0, 0), np.float32)
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1).astype(np.float32, copy=False)


def phrase_digest(store: TableStore) -> str:
    """Changes when any phrase embedding changes: part of the fingerprints of units that use them."""
    table = store.read(PHRASE_EMBEDDINGS.name, columns=["concept_id", "model"]).sort_by("concept_id")
    text = "\n".join(f"{c}\t{m}" for c, m in zip(table.column("concept_id").to_pylist(), table.column("model").to_pylist(), strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EmbeddingStore:
    """A worker's reader of the run's embeddings (made in ``Stage.setup``): phrase vectors are read once and kept."""

    def __init__(self, store: TableStore):
        self._store = store
        self._phrases: PhraseVectors | None = None

    def phrases(self) -> PhraseVectors:
        if self._phrases is None:
            table = self._store.read(PHRASE_EMBEDDINGS.name, columns=["concept_id", "phrase", "embedding"]).sort_by("concept_id")
            ids = table.column("concept_id").to_pylist()
            self._phrases = PhraseVectors(
                ids, table.column("phrase").to_pylist(), _matrix(table.column("embedding")), {c: i for i, c in enumerate(ids)}
            )
        return self._phrases

    def images(self, image_ids: list[str]) -> tuple[list[str], np.ndarray]:
        table = self._store.read_images(IMAGE_EMBEDDINGS.name, image_ids, ["image_id", "embedding"]).sort_by("image_id")
        return table.column("image_id").to_pylist(), _matrix(table.column("embedding"))
