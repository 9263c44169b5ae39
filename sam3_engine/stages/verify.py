"""Verify: scores that say whether each proposal is right, and verdicts derived from them in SQL.

Entry point: ``VerifyStage``. A unit is a shard of images with proposals. SAM 3 is not run again:
its stored outputs (presence, stability, box re-prompt IoU, semantic foreground) are read from
``pairs`` and ``masks``. Per unit, a CPU worker decodes the image and its masks and computes
geometry and overlaps (``mask_checks``); a CLIP actor then scores each masked crop and the whole
image against the image's phrases. Scores go to ``mask_scores`` and ``pair_scores``.

Verdicts are not computed here but by the SQL macros ``mask_verdicts`` and ``pair_verdicts``
(``schemas/sql/verdicts.sql``) at the config's thresholds, materialised at the end of the stage as
``mask_verifications`` and ``pair_verifications``. A threshold change re-derives them from the
stored scores: every scoring unit is skipped and no model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils
from pydantic import Field

from sam3_engine.engine.config import ClipConfig, MaskThresholds, PairThresholds, StorageConfig, verdict_parameters
from sam3_engine.engine.stage import BuildContext, WorkUnit, register_stage, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.metrics.mask_checks import geometry, masked_crop, overlaps, rle
from sam3_engine.schemas.tables import MASK_SCORES, MASKS, PAIR_SCORES, PAIRS, REJECTS
from sam3_engine.stages.mine import shared_ontology
from sam3_engine.stages.verifier import ImageTask, VerifierStage, rows_by_image
from sam3_engine.text.concepts import Ontology

if TYPE_CHECKING:  # torch and open_clip load where a model runs, not in every process that lists stages
    from sam3_engine.models.clip import ClipChoice, ClipEmbedder

VERSION = 2
"""Bump when a change to this module changes the scores it writes: every unit then re-runs.
2: a unit's phrases are embedded in its own batches (were: batches of a per-process cache)."""


class VerifyConfig(PairThresholds, MaskThresholds):
    """Scoring settings (they decide the stored scores) and, inherited, the thresholds (they decide only the verdicts).

    Changing a threshold and running the verify stage again re-derives the verdict tables from the
    stored scores without loading a model.
    """

    verifier: str = Field(
        "sam3-clip",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name recorded on every score and verdict, so that independent verifiers can be compared.",
    )
    unit_size: int = Field(8, ge=1, description="Images per work unit.")
    crop_padding: float = Field(
        0.1, ge=0.0, le=1.0, description="Context around a mask's box in its CLIP crop, as a fraction of the box size."
    )
    workers: int | None = Field(
        None, ge=1, description="CLIP actors; default: one per GPU in the Ray cluster, or one CPU actor without GPUs."
    )
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per CLIP actor; default: 1 when the cluster has GPUs, else 0.")

    def thresholds(self) -> dict[str, Any]:
        """The verdict parameters, named as the SQL macros' parameters."""
        return verdict_parameters(self, "mask_verdicts", "pair_verdicts")


REASONS = {
    "image_unreadable": "The image could not be read or decoded at verification time; its proposals get no scores.",
    "worker_crashed": "The verification worker died on this image twice (a crash, not an exception).",
}
MIN_PHRASES_FOR_Z = 3
"""A CLIP z-score needs at least two other phrases on the image to compare against."""


@dataclass(frozen=True)
class PreparedImage:
    image_id: str
    pairs: tuple[dict[str, Any], ...]
    """pair_id, concept_id, phrase of each pair."""
    masks: tuple[dict[str, Any], ...]
    """Each mask's ids and model-free scores; ``crop`` indexes ``crops`` (None for an empty mask)."""
    unrelated: frozenset[tuple[str, str]]
    """(pair, pair) whose phrases are not related in the ontology: the phrases a crop competes with."""


@dataclass(frozen=True)
class PreparedUnit:
    images: tuple[PreparedImage, ...]
    pixels: np.ndarray | None
    """CLIP input of each image (rows 0..n-1) then of each masked crop."""
    rejects: tuple[dict[str, Any], ...]


@register_stage
class VerifyStage(VerifierStage):
    name = "verify"
    order = 70
    config_model = VerifyConfig
    reasons = REASONS
    outputs = (MASK_SCORES, PAIR_SCORES, REJECTS)
    version = VERSION
    mask_macro = "mask_verdicts"
    pair_macro = "pair_verdicts"
    pair_scores = PAIR_SCORES
    mask_scores = MASK_SCORES

    @classmethod
    def build(cls, context: BuildContext) -> VerifyStage:
        cls.check_verifier_name(context)
        config = context.config
        from sam3_engine.models.clip import choose_clip

        choice = choose_clip(config.clip.model, config.clip.pretrained, config.clip.fallback_to_tiny_random)
        return cls(config.verify, config.clip, choice, shared_ontology(context), config.storage)

    def __init__(self, config: VerifyConfig, clip: ClipConfig, choice: ClipChoice, ontology: Ontology, storage_config: StorageConfig):
        super().__init__(storage_config, config.workers, config.gpus_per_worker)
        self.config = config
        self.clip = clip
        self.choice = choice
        self.ontology = ontology
        self.verifier_version = f"{VERSION};clip={choice.label}"

    def load_model(self, device: str) -> ClipEmbedder:
        from sam3_engine.models.clip import ClipEmbedder

        return ClipEmbedder.load(self.choice, self.clip.device or device)

    def plan(self, store) -> list[WorkUnit]:
        settings = {"clip": self.choice.label, "crop_padding": self.config.crop_padding, "ontology": self.ontology.digest}
        return self.plan_images(store, settings)

    def prepare(self, unit: WorkUnit) -> PreparedUnit:
        """Decode each image and its masks; geometry, overlaps and CLIP inputs, all on a CPU worker."""
        import torch

        store = TableStore(self.context.run_url, self.context.storage)
        ids = [task.image_id for task in unit.items]
        pairs = rows_by_image(store, PAIRS.name, ids, ["pair_id", "image_id", "concept_id", "phrase"], "pair_id")
        masks = rows_by_image(
            store,
            MASKS.name,
            ids,
            ["mask_id", "pair_id", "image_id", "concept_id", "height", "width", "rle_counts", "bbox", "score"],
            "mask_id",
        )
        from sam3_engine.models.clip import image_transform

        transform = image_transform(self.choice)
        loaded = self.load_images(unit.items)
        images, whole, crops = [], [], []
        for task, image in zip(loaded.items, loaded.images, strict=True):
            prepared, image_crops = self._prepare_image(task, image, pairs.get(task.image_id, []), masks.get(task.image_id, []), len(crops))
            whole.append(transform(image))
            crops.extend(transform(crop) for crop in image_crops)
            images.append(prepared)
        tensors = whole + crops
        pixels = torch.stack(tensors).numpy() if tensors else None
        return PreparedUnit(tuple(images), pixels, loaded.rejects)

    def _prepare_image(self, task: ImageTask, image, pairs: list[dict], masks: list[dict], first_crop: int):
        unrelated = frozenset(
            (a["pair_id"], b["pair_id"]) for a in pairs for b in pairs if a is not b and not self._related(a["phrase"], b["phrase"])
        )
        rles = [rle(m["rle_counts"], m["height"], m["width"]) for m in masks]
        duplicates, conflicts = overlaps(
            [m["mask_id"] for m in masks],
            [m["pair_id"] for m in masks],
            [m["score"] for m in masks],
            rles,
            lambda a, b: (a, b) in unrelated,
        )
        from sam3_engine.models.clip import input_size

        rows, crops, side = [], [], input_size(self.choice)
        for mask_row, encoded, duplicate, conflict in zip(masks, rles, duplicates, conflicts, strict=True):
            mask = mask_utils.decode(encoded).astype(bool)
            shape = geometry(mask, mask_row["bbox"])
            fits = mask.shape == (image.height, image.width)
            crop = masked_crop(image, mask, mask_row["bbox"], self.config.crop_padding, side) if fits else None
            rows.append(
                {
                    "mask_id": mask_row["mask_id"],
                    "pair_id": mask_row["pair_id"],
                    "image_id": task.image_id,
                    "concept_id": mask_row["concept_id"],
                    "area_fraction": shape.area_fraction,
                    "fragments": shape.fragments,
                    "largest_fragment_fraction": shape.largest_fragment_fraction,
                    "border_fraction": shape.border_fraction,
                    "duplicate_iou": duplicate.iou,
                    "duplicate_of": duplicate.other,
                    "conflict_iou": conflict.iou,
                    "conflict_with": conflict.other,
                    "crop": None if crop is None else first_crop + len(crops),
                }
            )
            if crop is not None:
                crops.append(crop)
        return PreparedImage(task.image_id, tuple(pairs), tuple(rows), unrelated), crops

    def _related(self, a: str, b: str) -> bool:
        return a in self.ontology.lineage(b) or b in self.ontology.lineage(a)

    def process(self, unit: WorkUnit, prepared: PreparedUnit | None = None) -> dict[str, pa.Table]:
        import torch

        prepared = prepared if prepared is not None else self.prepare(unit)
        embedder = self.model
        vectors = np.zeros((0, 0), np.float32)
        if prepared.pixels is not None:
            embed = lambda batch: embedder.embed_pixels(torch.from_numpy(batch.copy()))  # noqa: E731
            vectors = np.stack(_in_batches(embed, prepared.pixels, self.clip.batch_size))
        phrases = sorted({p["phrase"] for image in prepared.images for p in image.pairs})
        text = dict(zip(phrases, _in_batches(embedder.embed_phrases, phrases, self.clip.batch_size), strict=True))
        crop_offset = len(prepared.images)
        pair_rows, mask_rows = [], []
        stamp = {"verifier": self.config.verifier, "verifier_version": self.verifier_version}
        for index, image in enumerate(prepared.images):
            pair_ids = [p["pair_id"] for p in image.pairs]
            phrase_matrix = (
                np.stack([text[p["phrase"]] for p in image.pairs]) if image.pairs else np.zeros((0, vectors.shape[1]), np.float32)
            )
            similarity = phrase_matrix @ vectors[index]
            for i, pair in enumerate(image.pairs):
                pair_rows.append(
                    {
                        "pair_id": pair["pair_id"],
                        "image_id": image.image_id,
                        "concept_id": pair["concept_id"],
                        "clip_similarity": float(similarity[i]),
                        "clip_z": _z_score(similarity, i),
                        **stamp,
                    }
                )
            row_of = {pair_id: i for i, pair_id in enumerate(pair_ids)}
            for mask in image.masks:
                row = {k: v for k, v in mask.items() if k != "crop"}
                own, margin = None, None
                if mask["crop"] is not None:
                    crop_similarity = phrase_matrix @ vectors[crop_offset + mask["crop"]]
                    own = float(crop_similarity[row_of[mask["pair_id"]]])
                    rivals = [float(crop_similarity[row_of[other]]) for other in pair_ids if (mask["pair_id"], other) in image.unrelated]
                    margin = own - max(rivals) if rivals else None
                mask_rows.append({**row, "clip_crop_similarity": own, "clip_crop_margin": margin, **stamp})
        return {
            MASK_SCORES.name: rows_table(MASK_SCORES, mask_rows, unit.unit_id),
            PAIR_SCORES.name: rows_table(PAIR_SCORES, pair_rows, unit.unit_id),
            REJECTS.name: rows_table(REJECTS, list(prepared.rejects), unit.unit_id),
        }


def _in_batches(embed, items, size: int) -> list[np.ndarray]:
    """``embed`` over a unit's own ``items`` in consecutive batches of ``size``.

    A float result depends on the batch it was computed in (batch size picks the kernels and their
    summation order), so batches hold one unit's items only: never a cache filled by whichever unit
    a process ran first, or a unit re-run after a kill would score differently from the uninterrupted run.
    """
    return [vector for start in range(0, len(items), size) for vector in embed(items[start : start + size])]


def _z_score(similarity: np.ndarray, index: int) -> float | None:
    """The similarity at ``index`` against the image's other phrases: (s - mean) / std of the others."""
    if len(similarity) < MIN_PHRASES_FOR_Z:
        return None
    others = np.delete(similarity, index)
    spread = float(others.std())
    return None if spread == 0 else float((similarity[index] - others.mean()) / spread)
