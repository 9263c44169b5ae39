"""The family base of stages that run a model on images (embed, propose, verify).

What they share is written once here: the model actors and GPUs they ask for, the model loaded
once per actor (``setup``), images loaded or rejected with a reason, and the rows of an item that
crashed its worker. A subclass says how to load its model and what to do with a unit's images.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image

from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.stage import Stage, WorkerContext, WorkUnit, image_reject, rows_table
from sam3_engine.io.inputs import load_image
from sam3_engine.schemas.tables import REJECTS


@dataclass(frozen=True)
class LoadedImages:
    """A unit's images that decoded, their items in the same order, and a reject for each one that did not."""

    items: tuple[Any, ...]
    images: tuple[Image.Image, ...]
    rejects: tuple[dict[str, Any], ...]


class ImageModelStage(Stage):
    uses_model: ClassVar[bool] = True
    model_label: ClassVar[str] = "CLIP"
    """The model's name in notices."""
    output_label: ClassVar[str] = "CLIP embeddings, retrievals and verification scores are"
    """What random weights make meaningless, in notices."""
    choice: Any
    """The model the run loads (``ClipChoice`` or ``ModelChoice``): its name, and whether and why it has random weights."""

    def __init__(self, storage_config: StorageConfig, workers: int | None, gpus_per_worker: float | None):
        self.storage_config = storage_config
        self.actors = workers
        self.gpus_per_actor = gpus_per_worker
        self.model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """A stage travels to workers without its model: each worker loads its own in ``setup``."""
        return {**self.__dict__, "model": None}

    @abstractmethod
    def load_model(self, device: str) -> Any:
        """The stage's model on ``device`` (the worker's, unless the config names one)."""

    def setup(self, context: WorkerContext) -> None:
        self.model = self.load_model(context.device)

    def notices(self) -> list[str]:
        if self.choice.fallback_reason:
            return [
                f"NOT REAL {self.model_label}: {self.choice.fallback_reason}; running tiny-random (random weights): "
                f"{self.output_label} meaningless"
            ]
        if self.choice.random_weights:
            return [f"{self.model_label} tiny-random: random weights, {self.output_label} meaningless (a smoke run)"]
        return []

    def load_images(self, items: tuple[Any, ...]) -> LoadedImages:
        """Each item's image (``item.uri``) decoded and oriented; an unreadable one is an ``image_unreadable`` reject."""
        loaded, images, rejects = [], [], []
        for item in items:
            try:
                images.append(load_image(item.uri, self.storage_config))
            except Exception as exc:  # noqa: BLE001 - a bad file is a reject, not a crash
                rejects.append(image_reject(self.name, item, "image_unreadable", f"{type(exc).__name__}: {exc}"))
                continue
            loaded.append(item)
        return LoadedImages(tuple(loaded), tuple(images), tuple(rejects))

    def process_isolated(self, unit: WorkUnit, item: Any, error: str) -> dict[str, pa.Table]:
        """No rows for an item that killed its worker twice, and a ``worker_crashed`` reject if it is an image."""
        rejects = (
            [image_reject(self.name, item, "worker_crashed", f"the model worker died on this image: {error}")]
            if hasattr(item, "uri")
            else []
        )
        return {spec.name: rows_table(spec, rejects if spec is REJECTS else [], unit.unit_id) for spec in self.outputs}
