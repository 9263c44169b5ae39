"""Verify with a vision-language model: a second verifier whose errors do not follow SAM 3's.

Entry point: ``VlmVerifyStage``. SA-Co's engine judged proposals with multimodal language models;
this stage asks one (SmolVLM by default) three questions from ``data/vlm_prompts.yaml``:

- per pair, about the photo: "Is there a {phrase} in this image?" (presence);
- per mask, with the mask outlined and the rest dimmed, and a close-up of it: "Is the highlighted
  region one whole {phrase}?" (mask quality);
- per pair with masks, with all of them drawn: "Is every {phrase} in the image highlighted?"
  (exhaustivity).

Each answer is P(yes) against P(no) from the model's logits (``models/vlm.py``). A CPU worker draws
the pictures and tokenizes; a model actor runs the VLM, the photo's prefix once for all its phrases.
Answers go to ``vlm_pair_scores`` and ``vlm_mask_scores``; the verdicts, from the SQL macros
``vlm_mask_verdicts`` and ``vlm_pair_verdicts`` at this section's thresholds, go to the same
``mask_verifications`` and ``pair_verifications`` as every verifier's, under ``verifier = vlm``:
``splits`` counts it as a source of its own, so a pair both verifiers confirm is Gold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import Field

from sam3_engine.engine.config import ConfigSection, StorageConfig, VlmMaskThresholds, VlmPairThresholds, verdict_parameters
from sam3_engine.engine.stage import BuildContext, WorkUnit, register_stage, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.metrics.mask_checks import rle
from sam3_engine.schemas.tables import MASKS, PAIRS, REJECTS, VLM_MASK_SCORES, VLM_PAIR_SCORES
from sam3_engine.stages.verifier import VerifierStage, rows_by_image

if TYPE_CHECKING:  # torch and transformers load where a model runs, not in every process that lists stages
    from sam3_engine.models.vlm import PictureSet, VlmChoice, VlmJudge

VERSION = 1
"""Bump when a change to this module changes the answers it writes: every unit then re-runs."""
WORKING_SIDE = 1024
"""Pictures are drawn on the photo scaled to this longest side: past it the model's processor only shrinks them again."""


class VlmSettings(ConfigSection):
    """The model and how it runs."""

    verifier: str = Field(
        "vlm", pattern=r"^[A-Za-z0-9_.-]+$", description="Name recorded on every answer and verdict; splits counts each name as a source."
    )
    model: str = Field(
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        description="Hugging Face id or local directory of an Idefics3-family VLM (SmolVLM), or tiny-random (random weights, smoke runs).",
    )
    revision: str | None = Field(None, description="Pinned revision of the checkpoint.")
    device: str | None = Field(None, description="Torch device; default: cuda when the worker has a GPU, else cpu.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="Weights and activations; default: bfloat16 on CUDA, float32 on CPU."
    )
    fallback_to_tiny_random: bool = Field(
        False, description="When the checkpoint cannot be reached, run tiny-random instead of failing (announced loudly)."
    )
    split_tiles: bool = Field(
        True,
        description="Show the photo of presence and exhaustivity questions in tiles plus a global view (sharper, more tokens); "
        "mask questions always take one tile per picture.",
    )
    batch_size: int = Field(16, ge=1, description="Picture sets per prefix pass, and questions per question pass.")
    unit_size: int = Field(8, ge=1, description="Images per work unit.")
    workers: int | None = Field(
        None, ge=1, description="VLM actors; default: one per GPU in the Ray cluster, or one CPU actor without GPUs."
    )
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per VLM actor; default: 1 when the cluster has GPUs, else 0.")


class VlmVerifyConfig(VlmPairThresholds, VlmMaskThresholds, VlmSettings):
    """The VLM verifier: its model and settings (they decide the stored answers) and its thresholds (they decide only the verdicts)."""

    def thresholds(self) -> dict[str, Any]:
        """The verdict parameters, named as the SQL macros' parameters."""
        return verdict_parameters(self, "vlm_mask_verdicts", "vlm_pair_verdicts")


REASONS = {
    "image_unreadable": "The image could not be read or decoded at verification time; its proposals get no answers.",
    "worker_crashed": "The VLM worker died on this image twice (a crash, not an exception).",
}


@dataclass(frozen=True)
class PreparedImage:
    image_id: str
    pairs: tuple[dict[str, Any], ...]
    """pair_id, concept_id, phrase of each pair, and ``masks_shown`` and ``exhaustivity`` (index of its set, or None)."""
    masks: tuple[dict[str, Any], ...]
    """mask_id, pair_id, concept_id of each mask, and ``picture_set``: index of its picture set, None when it cannot be shown."""
    presence: int
    """Index of the photo's picture set (one question per pair, in ``pairs`` order)."""


@dataclass(frozen=True)
class PreparedUnit:
    images: tuple[PreparedImage, ...]
    sets: tuple[PictureSet, ...]
    rejects: tuple[dict[str, Any], ...]


@register_stage
class VlmVerifyStage(VerifierStage):
    name = "verify_vlm"
    order = 75
    config_model = VlmVerifyConfig
    reasons = REASONS
    outputs = (VLM_MASK_SCORES, VLM_PAIR_SCORES, REJECTS)
    version = VERSION
    mask_macro = "vlm_mask_verdicts"
    pair_macro = "vlm_pair_verdicts"
    pair_scores = VLM_PAIR_SCORES
    mask_scores = VLM_MASK_SCORES
    model_label = "VLM"
    output_label = "VLM verification answers and verdicts (and any Gold they make) are"

    @classmethod
    def build(cls, context: BuildContext) -> VlmVerifyStage:
        from sam3_engine.models.vlm import choose_vlm

        cls.check_verifier_name(context)
        config = context.config.verify_vlm
        return cls(config, choose_vlm(config.model, config.revision, config.fallback_to_tiny_random), context.config.storage)

    def __init__(self, config: VlmVerifyConfig, choice: VlmChoice, storage_config: StorageConfig):
        super().__init__(storage_config, config.workers, config.gpus_per_worker)
        self.config = config
        self.choice = choice
        self._prompts = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_prompts": None}

    def load_model(self, device: str) -> VlmJudge:
        from sam3_engine.models.vlm import VlmJudge

        return VlmJudge.load(self.choice, self.config.device or device, self.config.dtype)

    def plan(self, store) -> list[WorkUnit]:
        from sam3_engine.models.vlm import prompt_templates

        settings = {"model": self.choice.label, "prompts": prompt_templates(), "split_tiles": self.config.split_tiles}
        return self.plan_images(store, settings)

    @property
    def prompts(self):
        """The processor and prompt templates, loaded once per worker process."""
        if self._prompts is None:
            from sam3_engine.models.vlm import Prompts, load_processor

            self._prompts = Prompts(load_processor(self.choice))
        return self._prompts

    def prepare(self, unit: WorkUnit) -> PreparedUnit:
        """Draw every picture and tokenize every question, on a CPU worker."""
        store = TableStore(self.context.run_url, self.context.storage)
        ids = [task.image_id for task in unit.items]
        pairs = rows_by_image(store, PAIRS.name, ids, ["pair_id", "image_id", "concept_id", "phrase"], "pair_id")
        masks = rows_by_image(
            store, MASKS.name, ids, ["mask_id", "pair_id", "image_id", "concept_id", "height", "width", "rle_counts", "bbox"], "mask_id"
        )
        loaded = self.load_images(unit.items)
        images: list[PreparedImage] = []
        sets: list[PictureSet] = []
        for task, image in zip(loaded.items, loaded.images, strict=True):
            images.append(self._prepare_image(task.image_id, image, pairs.get(task.image_id, []), masks.get(task.image_id, []), sets))
        return PreparedUnit(tuple(images), tuple(sets), loaded.rejects)

    def _prepare_image(self, image_id: str, image: Image.Image, pairs: list[dict], masks: list[dict], sets: list) -> PreparedImage:
        from sam3_engine.models.vlm import highlight, mask_pictures

        scale = min(1.0, WORKING_SIDE / max(image.size))
        working = image.convert("RGB")
        if scale < 1.0:
            working = working.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)
        phrase_of = {pair["pair_id"]: pair["phrase"] for pair in pairs}
        presence = len(sets)
        sets.append(self.prompts.picture_set("presence", [working], [pair["phrase"] for pair in pairs], self.config.split_tiles))
        shown: dict[str, list[np.ndarray]] = {}
        mask_rows = []
        for row in masks:
            mask = mask_utils.decode(rle(row["rle_counts"], row["height"], row["width"])).astype(bool)
            index = None
            if mask.shape == (image.height, image.width) and mask.any():
                small = np.asarray(Image.fromarray(mask).resize(working.size, Image.Resampling.NEAREST)) if scale < 1.0 else mask
                pictures = mask_pictures(working, small, tuple(value * scale for value in row["bbox"]), self.prompts.tile)
                index = len(sets)
                sets.append(self.prompts.picture_set("mask", pictures, [phrase_of[row["pair_id"]]], False))
                shown.setdefault(row["pair_id"], []).append(small)
            mask_rows.append({"mask_id": row["mask_id"], "pair_id": row["pair_id"], "concept_id": row["concept_id"], "picture_set": index})
        pair_rows = []
        for pair in pairs:
            drawn = shown.get(pair["pair_id"], [])
            exhaustivity = None
            if drawn:
                exhaustivity = len(sets)
                sets.append(
                    self.prompts.picture_set("exhaustivity", [highlight(working, drawn)], [pair["phrase"]], self.config.split_tiles)
                )
            pair_rows.append({**pair, "masks_shown": len(drawn), "exhaustivity": exhaustivity})
        return PreparedImage(image_id, tuple(pair_rows), tuple(mask_rows), presence)

    def process(self, unit: WorkUnit, prepared: PreparedUnit | None = None) -> dict[str, pa.Table]:
        prepared = prepared if prepared is not None else self.prepare(unit)
        answers = self.model.yes_probabilities(list(prepared.sets), self.config.batch_size)
        stamp = {"verifier": self.config.verifier, "verifier_version": f"{VERSION};vlm={self.choice.label}"}
        pair_rows, mask_rows = [], []
        for image in prepared.images:
            for position, pair in enumerate(image.pairs):
                exhaustive = None if pair["exhaustivity"] is None else float(answers[pair["exhaustivity"]][0])
                pair_rows.append(
                    {
                        "pair_id": pair["pair_id"],
                        "image_id": image.image_id,
                        "concept_id": pair["concept_id"],
                        "presence_yes": float(answers[image.presence][position]),
                        "exhaustive_yes": exhaustive,
                        "masks_shown": pair["masks_shown"],
                        **stamp,
                    }
                )
            for mask in image.masks:
                whole = None if mask["picture_set"] is None else float(answers[mask["picture_set"]][0])
                mask_rows.append(
                    {
                        "mask_id": mask["mask_id"],
                        "pair_id": mask["pair_id"],
                        "image_id": image.image_id,
                        "concept_id": mask["concept_id"],
                        "whole_yes": whole,
                        **stamp,
                    }
                )
        return {
            VLM_MASK_SCORES.name: rows_table(VLM_MASK_SCORES, mask_rows, unit.unit_id),
            VLM_PAIR_SCORES.name: rows_table(VLM_PAIR_SCORES, pair_rows, unit.unit_id),
            REJECTS.name: rows_table(REJECTS, list(prepared.rejects), unit.unit_id),
        }
