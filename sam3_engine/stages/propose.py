"""Propose: every instance mask SAM 3 finds for every (image, phrase) pair.

Entry point: ``ProposeStage``. A unit is a shard of images; each image gets one vision pass and
all phrases run against its cached features (``models.sam3``). Masks are stored as COCO RLE at
the image's EXIF-oriented resolution. The model is loaded once per model actor (``setup``).
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils
from pydantic import Field

from sam3_engine.engine import storage
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import ConfigError, ConfigSection, ModelConfig, StorageConfig, file_field
from sam3_engine.engine.stage import (
    STATS_KEY,
    BuildContext,
    Derivation,
    WorkUnit,
    arrow_rows,
    fingerprint,
    image_reject,
    plan_units,
    register_stage,
    reject_reasons,
    rows_table,
)
from sam3_engine.schemas.tables import CONCEPTS, IMAGES, MASKS, PAIRS, REJECTS
from sam3_engine.stages.image_model import ImageModelStage
from sam3_engine.text.concepts import concept_id, normal_form, pair_id, phrase_lines

if TYPE_CHECKING:  # torch and transformers load where a model runs, not in every process that lists stages
    from sam3_engine.models.sam3 import ModelChoice, PairPrediction, Sam3Segmenter

VERSION = 4
"""Bump when a change to this module changes the rows it writes: every unit then re-runs.
4: a detection whose mask covers no pixel at the image's size (a tiny image) is not kept as an instance."""


class ProposeConfig(ConfigSection):
    phrases: tuple[str, ...] = Field((), description="Phrases to ask SAM 3 about on every image, instead of the mined candidates.")
    vocabulary: str | None = file_field(None, "A text file of phrases, one per line, added to `phrases`.")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Keep instances whose combined score (object x presence) is at least this.")
    reprompt_boxes: bool = Field(
        True,
        description=(
            "Prompt SAM 3 again with each kept instance's box and phrase, for "
            "verification's consistency check (costs one more head per instance)."
        ),
    )
    unit_size: int = Field(16, ge=1, description="Images per work unit (one atomic commit).")
    image_batch: int = Field(4, ge=1, description="Images per vision-encoder batch.")
    phrase_batch: int = Field(16, ge=1, description="Phrases per text-conditioned head batch, against one image's cached features.")
    workers: int | None = Field(
        None, ge=1, description="Model actors; default: one per GPU in the Ray cluster, or one CPU actor without GPUs."
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per model actor; default: 1 when the cluster has GPUs, else 0 (CPU actors)."
    )


KEEP_TOP_ENV = "SAM3_ENGINE_BENCH_KEEP_TOP"
"""Benchmarks only: "P,Q" keeps the Q best queries of each image's first P phrases whatever the threshold
(``Sam3Segmenter.keep_top``), so that random weights give real masks to upsample, encode and commit."""

OOM_ABOVE_ENV = "SAM3_ENGINE_OOM_ABOVE"
"""Fault injection for tests: a batch of more than this many (image, phrase) pairs raises CUDA out-of-memory."""

REASONS = {
    "worker_crashed": "The model worker died on this image twice (a crash, not an exception).",
    "image_unreadable": "The image could not be read or decoded at proposal time.",
    "model_error": "The model failed on this image alone (after its batch failed).",
    "out_of_memory": "The device ran out of memory even with a batch of one.",
}


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def load_phrases(config: ProposeConfig, storage_config: StorageConfig) -> tuple[str, ...]:
    """Normal forms of the config's phrases and vocabulary file, duplicates dropped; empty when mining supplies them."""
    phrases = list(config.phrases)
    if config.vocabulary:
        try:
            phrases += phrase_lines(storage.read_text(config.vocabulary, storage_config))
        except FileNotFoundError as exc:
            raise ConfigError(f"propose.vocabulary: {exc}") from exc
    normal = [normal_form(p) for p in phrases]
    if not all(normal):
        raise ConfigError("propose.phrases: empty phrases are not allowed")
    return tuple(dict.fromkeys(normal))


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    uri: str
    phrases: tuple[str, ...]
    """Normal forms of the concepts to ask about on this image."""


@dataclass(frozen=True)
class Prepared:
    """A unit after CPU preprocessing: what the model worker needs and nothing more."""

    refs: tuple[ImageRef, ...]
    sizes: tuple[tuple[int, int], ...]
    """(height, width) of each image after EXIF orientation."""
    pixels: np.ndarray | None
    """Resized, uint8 (normalised on the model's device)."""
    rejects: tuple[dict[str, Any], ...]


def _oom_if_asked(images: int, phrases: int) -> None:
    """Fault injection (see OOM_ABOVE_ENV): the error a too-large batch raises on a real GPU."""
    import torch

    limit = os.environ.get(OOM_ABOVE_ENV)
    if limit is not None and images * phrases > int(limit):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {images} images x {phrases} phrases > {limit})")


def _peak_memory_mib() -> dict[str, float]:
    """The worker process's peak resident memory, and its peak GPU memory when on CUDA."""
    import torch

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


@register_stage
class ProposeStage(ImageModelStage):
    name = "propose"
    order = 60
    config_model = ProposeConfig
    reasons = REASONS
    model_label = "SAM 3"
    output_label = "masks are"
    outputs = (PAIRS, MASKS, REJECTS)
    derived = (CONCEPTS,)

    @classmethod
    def build(cls, context: BuildContext) -> ProposeStage:
        config = context.config
        from sam3_engine.models.sam3 import choose_model

        choice = choose_model(config.model.name, config.model.revision, config.model.fallback_to_tiny_random)
        return cls(config.propose, config.model, choice, config.storage, context.run_id)

    def __init__(self, config: ProposeConfig, model: ModelConfig, choice: ModelChoice, storage_config: StorageConfig, run_id: str):
        super().__init__(storage_config, config.workers, config.gpus_per_worker)
        self.config = config
        self.model_config = model
        self.choice = choice
        self.run_id = run_id
        self.phrases = load_phrases(config, storage_config)
        from sam3_engine.models.sam3 import load_image_processor

        self.image_processor = load_image_processor(choice)
        """Loaded once here (a small JSON): it travels with the stage to every preparation task."""

    def load_model(self, device: str) -> Sam3Segmenter:
        from sam3_engine.models.sam3 import Sam3Segmenter

        segmenter = Sam3Segmenter.load(
            self.choice.name, self.choice.revision, device=self.model_config.device or device, dtype=self.model_config.dtype
        )
        if self.model_config.compile:
            segmenter.compile()
        keep_top = os.environ.get(KEEP_TOP_ENV)
        if keep_top:
            phrases, queries = (int(n) for n in keep_top.split(","))
            segmenter.keep_top = (phrases, queries)
        return segmenter

    def plan(self, store) -> Iterator[WorkUnit]:
        """One item per image with its phrases: the config's on every image, else the mined candidates."""
        if self.phrases:
            images = store.read(IMAGES.name, columns=["image_id", "uri"]).sort_by("image_id")
            refs = (ImageRef(row["image_id"], row["uri"], self.phrases) for row in arrow_rows(images))
        else:
            con = connect(store)
            phrases = con.sql(named_query("phrases_per_image")).to_arrow_table()
            con.close()
            refs = (ImageRef(row["image_id"], row["uri"], tuple(row["phrases"])) for row in arrow_rows(phrases))
            if not phrases.num_rows and store.read(IMAGES.name, columns=["image_id"]).num_rows:
                raise ConfigError(
                    "the propose stage has no phrases for any image: run the mine stage on images with captions, "
                    "or set mine.phrases, mine.vocabulary, or propose.phrases"
                )
        settings = {
            "version": VERSION,
            "model": [self.choice.name, self.choice.revision, self.model_config.dtype],
            "threshold": self.config.threshold,
            "reprompt_boxes": self.config.reprompt_boxes,
        }
        yield from plan_units(self.name, settings, refs, lambda r: r.image_id, self.config.unit_size, lambda r: (r.image_id, r.phrases))

    def prepare(self, unit: WorkUnit) -> Prepared:
        """Decode, orient and resize the unit's images on a CPU worker; unreadable ones become rejects."""
        loaded = self.load_images(unit.items)
        from sam3_engine.models.sam3 import resize

        pixels = resize(self.image_processor, list(loaded.images)).numpy() if loaded.images else None
        return Prepared(loaded.items, tuple((image.height, image.width) for image in loaded.images), pixels, loaded.rejects)

    def process(self, unit: WorkUnit, prepared: Prepared | None = None) -> dict[str, pa.Table]:
        prepared = prepared if prepared is not None else self.prepare(unit)
        segmenter = self.model
        segmenter.reprompt_boxes = self.config.reprompt_boxes
        distinct = sorted({p for ref in prepared.refs for p in ref.phrases})
        truncated = dict(zip(distinct, segmenter.tokenize(distinct).truncated if distinct else (), strict=True))
        pairs, masks, rejects = [], [], list(prepared.rejects)
        stats = {"images": float(len(prepared.refs)), "oom_retries": 0.0, "batch_splits": 0.0, "empty_masks_dropped": 0.0}
        started = time.perf_counter()
        indices = list(range(len(prepared.refs)))
        for start in range(0, len(indices), self.config.image_batch):
            batch = indices[start : start + self.config.image_batch]
            for i, outcome in self._predict(segmenter, prepared, batch, self.config.phrase_batch, stats):
                ref = prepared.refs[i]
                if isinstance(outcome, tuple):
                    rejects.append(image_reject(self.name, ref, *outcome))
                    continue
                for phrase, prediction in zip(ref.phrases, outcome, strict=True):
                    stats["empty_masks_dropped"] += prediction.empty_masks
                    pair = self._pair_row(ref, prepared.sizes[i], phrase, truncated[phrase], prediction)
                    pairs.append(pair)
                    masks.extend(self._mask_rows(pair, prepared.sizes[i], prediction))
        stats["model_seconds"] = time.perf_counter() - started
        return {
            PAIRS.name: rows_table(PAIRS, pairs, unit.unit_id),
            MASKS.name: rows_table(MASKS, masks, unit.unit_id),
            REJECTS.name: rows_table(REJECTS, rejects, unit.unit_id),
            STATS_KEY: {**stats, **_peak_memory_mib()},
        }

    def _predict(self, segmenter: Sam3Segmenter, prepared: Prepared, batch: list[int], phrase_batch: int, stats: dict[str, float]):
        """Yield (index, predictions or (reason, detail)).

        A failing batch is split in halves until the culprit is alone; out-of-memory then halves
        the phrase batch. ``stats`` counts both.
        """
        import torch

        try:
            phrases = [list(prepared.refs[i].phrases) for i in batch]
            _oom_if_asked(len(batch), min(phrase_batch, max(map(len, phrases))))
            results = segmenter.predict_pixels(
                torch.from_numpy(prepared.pixels[batch[0] : batch[-1] + 1].copy()),  # Ray hands out read-only arrays
                [prepared.sizes[i] for i in batch],
                phrases,
                self.config.threshold,
                phrase_batch,
            )
        except Exception as exc:  # noqa: BLE001 - decide below: split, shrink, or reject
            from sam3_engine.models.sam3 import is_out_of_memory

            oom = is_out_of_memory(exc)
            if oom and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) > 1:
                stats["oom_retries" if oom else "batch_splits"] += 1
                half = len(batch) // 2
                for part in (batch[:half], batch[half:]):
                    yield from self._predict(segmenter, prepared, part, phrase_batch, stats)
                return
            if oom and phrase_batch > 1:
                stats["oom_retries"] += 1
                yield from self._predict(segmenter, prepared, batch, phrase_batch // 2, stats)
                return
            yield batch[0], ("out_of_memory" if oom else "model_error", f"{type(exc).__name__}: {exc}")
            return
        yield from zip(batch, results, strict=True)

    def _pair_row(self, ref: ImageRef, size: tuple[int, int], phrase: str, truncated: bool, prediction: PairPrediction) -> dict[str, Any]:
        cid = concept_id(phrase)
        return {
            "pair_id": pair_id(ref.image_id, cid),
            "image_id": ref.image_id,
            "concept_id": cid,
            "phrase": phrase,
            "presence_score": prediction.presence_score,
            "instance_count": len(prediction.instances),
            "max_score": prediction.max_score,
            "height": size[0],
            "width": size[1],
            "foreground_counts": None if prediction.foreground is None else prediction.foreground["counts"].decode("ascii"),
            "foreground_area": None if prediction.foreground is None else int(mask_utils.area(prediction.foreground)),
            "phrase_truncated": truncated,
            "model_id": self.choice.name,
            "model_revision": self.choice.revision,
            "random_weights": self.choice.random_weights,
            "run_id": self.run_id,
        }

    def _mask_rows(self, pair: dict[str, Any], size: tuple[int, int], prediction: PairPrediction) -> list[dict[str, Any]]:
        rows = []
        for instance in prediction.instances:
            rle = instance.rle
            rows.append(
                {
                    "mask_id": _hash(pair["pair_id"], str(instance.query)),
                    "pair_id": pair["pair_id"],
                    "image_id": pair["image_id"],
                    "concept_id": pair["concept_id"],
                    "query_index": instance.query,
                    "height": size[0],
                    "width": size[1],
                    "rle_counts": rle["counts"].decode("ascii"),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "area": int(mask_utils.area(rle)),
                    "model_box": list(instance.box_xyxy),
                    "object_score": instance.object_score,
                    "presence_score": prediction.presence_score,
                    "score": instance.score,
                    "stability_score": instance.stability,
                    "reprompt_iou": instance.reprompt_iou,
                }
            )
        return rows

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        """The concepts of the config's phrases, added to the concepts table (mine's stay: ``concepts_with_asked_phrases``).

        The unit covers mine's concepts derivation too: when mine rebuilds the table (without these phrases), the next
        propose run adds them again.
        """
        if not self.phrases:
            return []
        mined = sorted(store.done_units("mine.concepts"))
        unit_id = fingerprint(f"{self.name}.concepts", {"version": VERSION, "phrases": list(self.phrases), "mine": mined})
        asked = pa.table({"concept_id": [concept_id(p) for p in self.phrases], "phrase": list(self.phrases)})
        con = connect(store)
        try:  # read whole before the table is overwritten with it (the ontology's concepts: thousands of rows, not millions)
            con.register("asked", asked)
            table = con.sql(named_query("concepts_with_asked_phrases"), params={"unit_id": unit_id}).to_arrow_table()
        finally:
            con.close()
        return [Derivation(unit_id, CONCEPTS, pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))]

    def summarize(self, con) -> dict[str, Any]:
        images, pairs, with_masks, masks = con.execute(
            "SELECT (SELECT count(DISTINCT image_id) FROM pairs), (SELECT count(*) FROM pairs), "
            "(SELECT count(*) FROM pairs WHERE instance_count > 0), (SELECT count(*) FROM masks)"
        ).fetchone()
        reasons = reject_reasons(con, self)
        oom_retries, batch_splits, empty_masks, peak_rss, peak_gpu = con.execute(
            "SELECT coalesce(sum(stats['oom_retries']), 0), coalesce(sum(stats['batch_splits']), 0), "
            "coalesce(sum(stats['empty_masks_dropped']), 0), max(stats['peak_rss_mib']), max(stats['peak_gpu_mib']) "
            "FROM units WHERE stage = $stage",
            {"stage": self.name},
        ).fetchone()
        negatives = con.execute("SELECT count(*) FROM pairs JOIN candidates USING (pair_id) WHERE origin = 'hard_negative'").fetchone()[0]
        fired = con.execute(f"SELECT count(*) FROM ({named_query('hard_negatives_fired')})").fetchone()[0]
        counts = {
            "accounted": images + sum(reasons.values()),
            "phrases": con.execute("SELECT count(DISTINCT concept_id) FROM pairs").fetchone()[0],
            "pairs": pairs,
            "pairs_with_masks": with_masks,
            "masks": masks,
            "hard_negative_pairs": negatives,
            "hard_negatives_fired": fired,
            "rejects": sum(reasons.values()),
            "reject_reasons": reasons,
            "oom_retries": int(oom_retries),
            "batch_splits": int(batch_splits),
            "empty_masks_dropped": int(empty_masks),
            "peak_worker_rss_mib": None if peak_rss is None else round(peak_rss),
            "peak_worker_gpu_mib": None if peak_gpu is None else round(peak_gpu),
            "model": self.choice.name,
        }
        if self.choice.random_weights:
            counts["random_weights"] = True
        return counts
