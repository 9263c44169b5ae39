"""Run configuration: validated, immutable, with a default for every field that can have one.

A config comes from a YAML file, CLI flags, or both (flags win). Unknown keys and wrong types are
errors that name the key and the file. Relative local paths in a file are relative to that file;
relative paths given as flags are relative to the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGE_NAMES = ("ingest", "mine", "embed", "retrieve", "negatives", "propose", "verify", "splits")
"""Every stage the engine knows, in pipeline order."""

DEFAULT_RUNS_DIR = "runs"
_PATH_KEYS = (("propose", "vocabulary"), ("mine", "vocabulary"), ("mine", "ontology"))
"""Config keys holding file paths: relative ones are relative to the config file (or to the working directory for flags)."""


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message that names the file and the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Frozen):
    """How to reach object storage; credentials come from the standard AWS_* environment."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO.")
    region: str | None = Field(None, description="S3 region.")
    anonymous: bool = Field(False, description="Read public buckets without credentials.")
    s3_single_writer: bool = Field(
        True,
        description="Commit Delta tables on S3 without a lock (safe: only the run's driver commits).",
    )


class IngestConfig(_Frozen):
    input_format: Literal["auto", "files", "manifest", "coco"] = Field(
        "auto", description="How to read `input`: auto picks by suffix (.jsonl/.csv/.parquet manifest, .json COCO, else files)."
    )
    unit_size: int = Field(256, ge=1, description="Average inputs per work unit (one atomic commit).")
    workers: int | None = Field(None, ge=1, description="Decoding processes; default: the machine's CPU count.")
    max_pixels: int = Field(100_000_000, ge=1, description="Images with more pixels are rejected as too_large (decompression bombs).")
    max_bytes: int = Field(512 * 2**20, ge=1, description="Files with more bytes are rejected as file_too_large without being read whole.")
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"),
        description="Pillow formats accepted; others are rejected as unsupported_format.",
    )

    @field_validator("formats")
    @classmethod
    def _upper(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f.upper() for f in formats)


class ModelConfig(_Frozen):
    name: str = Field("facebook/sam3", description="Hugging Face id or local directory of the SAM 3 checkpoint, or tiny-random (random weights, for smoke runs).")
    revision: str | None = Field(None, description="Pinned revision of the checkpoint.")
    device: str | None = Field(None, description="Torch device for the model; default: cuda when the worker has a GPU, else cpu.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(None, description="Weights and activations; default: bfloat16 on CUDA, float32 on CPU.")
    fallback_to_tiny_random: bool = Field(
        False, description="When the checkpoint cannot be reached, run tiny-random instead of failing (the quickstart only; announced loudly)."
    )


class MineConfig(_Frozen):
    captions: bool = Field(True, description="Mine noun phrases from the images' captions and alt texts.")
    max_caption_chars: int = Field(
        10_000, ge=1, description="Characters of captions and alt texts mined per image; the rest is a caption_truncated reject."
    )
    phrases: tuple[str, ...] = Field((), description="Phrases asked on every image (origin user). Per-image phrases come from the manifest's `phrases`.")
    vocabulary: str | None = Field(
        None, description="A vocabulary asked on every image (origin vocabulary): a text file, one phrase per line, or a YAML/JSON tree of concepts (name, synonyms, parent, children)."
    )
    ontology: str | None = Field(
        "builtin", description="Synonyms and parents: builtin (COCO's 80 and LVIS's 1,203 categories with WordNet parents), a YAML/JSON file, or null."
    )
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


class ClipConfig(_Frozen):
    model: str = Field("ViT-B-32", description="open_clip architecture, or tiny-random (random weights, for smoke runs).")
    pretrained: str | None = Field("laion2b_s34b_b79k", description="open_clip pretrained tag (weights from the Hugging Face hub) or a local weights file.")
    device: str | None = Field(None, description="Torch device; default: cuda when the worker has a GPU, else cpu.")
    fallback_to_tiny_random: bool = Field(False, description="When the weights cannot be reached, run tiny-random instead of failing (announced loudly).")
    batch_size: int = Field(64, ge=1, description="Images or phrases per forward pass.")
    unit_size: int = Field(256, ge=1, description="Images (or 4x as many phrases) per work unit.")
    workers: int | None = Field(None, ge=1, description="Model actors; default: one per GPU in the Ray cluster, or one CPU actor without GPUs.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per model actor; default: 1 when the cluster has GPUs, else 0.")


class RetrieveConfig(_Frozen):
    top_k: int = Field(10, ge=0, description="At most this many concepts per image from CLIP retrieval (origin clip).")
    min_similarity: float = Field(0.25, ge=-1.0, le=1.0, description="CLIP cosine similarity a retrieved concept needs (ViT-B-32: present concepts score about 0.25-0.35).")
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


class NegativesConfig(_Frozen):
    max_per_image: int = Field(30, ge=0, description="At most this many hard negatives per image: absent concepts easy to confuse with present ones.")
    clip_neighbours: int = Field(5, ge=0, description="Per present concept, this many nearest concepts by CLIP text similarity are candidate negatives (needs the embed stage).")
    max_image_similarity: float = Field(
        0.2, ge=-1.0, le=1.0, description="A candidate negative whose CLIP similarity to the image is above this may be present: it is dropped (needs the embed stage)."
    )
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


class ProposeConfig(_Frozen):
    phrases: tuple[str, ...] = Field((), description="Phrases to ask SAM 3 about on every image, instead of the mined candidates.")
    vocabulary: str | None = Field(None, description="A text file of phrases, one per line, added to `phrases`.")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Keep instances whose combined score (object x presence) is at least this.")
    reprompt_boxes: bool = Field(
        True, description="Prompt SAM 3 again with each kept instance's box and phrase, for verification's consistency check (costs one more head per instance)."
    )
    unit_size: int = Field(16, ge=1, description="Images per work unit (one atomic commit).")
    image_batch: int = Field(4, ge=1, description="Images per vision-encoder batch.")
    phrase_batch: int = Field(16, ge=1, description="Phrases per text-conditioned head batch, against one image's cached features.")
    workers: int | None = Field(None, ge=1, description="Model actors; default: one per GPU in the Ray cluster, or one CPU actor without GPUs.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per model actor; default: 1 when the cluster has GPUs, else 0 (CPU actors).")


MASK_REASONS = ("too_small", "fragmented", "border_hugging", "duplicate", "conflict", "unstable", "reprompt_inconsistent", "clip_mismatch")
"""Every reason code the mask verdict can give (see ``schemas/sql/verdicts.sql``)."""


class MaskThresholds(_Frozen):
    """The ``verify.*`` thresholds of mask verdicts: declared once here, they are both config keys and, by the same names
    and defaults, the parameters of the SQL macro ``mask_verdicts`` (``catalog.connect`` writes them into its definition)."""

    min_area_fraction: float = Field(0.0005, ge=0.0, le=1.0, description="Masks smaller than this share of the image are too_small.")
    max_fragments: int = Field(5, ge=1, description="Masks in more connected pieces than this are fragmented.")
    min_largest_fragment: float = Field(
        0.5, ge=0.0, le=1.0, description="Masks whose largest piece holds less than this share of their area are fragmented."
    )
    max_border_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Masks covering more than this share of the image's outer frame are border_hugging."
    )
    max_duplicate_iou: float = Field(
        0.5, ge=0.0, le=1.0, description="A mask overlapping a higher-scored mask of its pair above this IoU is a duplicate."
    )
    max_conflict_iou: float = Field(
        0.5, ge=0.0, le=1.0, description="A mask overlapping a higher-scored mask of an unrelated phrase above this IoU is a conflict."
    )
    min_stability: float = Field(0.8, ge=0.0, le=1.0, description="Masks with a lower stability score are unstable.")
    min_reprompt_iou: float = Field(
        0.5, ge=0.0, le=1.0, description="Masks that SAM 3, prompted with their box, reproduces below this IoU are reprompt_inconsistent."
    )
    min_clip_margin: float = Field(
        0.0, ge=-2.0, le=2.0,
        description="Masks whose CLIP crop similarity to their phrase is below the best unrelated phrase's plus this are clip_mismatch.",
    )
    reject_reasons: tuple[str, ...] = Field(
        ("too_small", "fragmented", "border_hugging", "duplicate", "conflict"),
        description="Reasons that reject a mask; the other reasons make it uncertain.",
    )

    @field_validator("reject_reasons")
    @classmethod
    def _known_reasons(cls, reasons: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(reasons) - set(MASK_REASONS))
        if unknown:
            raise ValueError(f"unknown reason(s) {unknown}; known: {list(MASK_REASONS)}")
        return reasons


class PairThresholds(_Frozen):
    """The ``verify.*`` thresholds of presence and exhaustivity verdicts: config keys and, by the same names and defaults,
    the parameters of the SQL macro ``pair_verdicts``."""

    sam_weight: float = Field(1.0, description="Weight of logit(SAM 3 presence) in the presence logit.")
    clip_weight: float = Field(
        1.0, description="Weight of the CLIP z-score (image-phrase similarity against the image's other phrases) in the presence logit."
    )
    presence_bias: float = Field(0.0, description="Added to the presence logit.")
    present_threshold: float = Field(0.6, ge=0.0, le=1.0, description="Presence probability at or above which a pair is present.")
    absent_threshold: float = Field(
        0.4, ge=0.0, le=1.0, description="Presence probability at or below which a pair is absent (between the two: uncertain)."
    )
    max_uncovered_fraction: float = Field(
        0.2, ge=0.0, le=1.0,
        description="A pair whose semantic foreground is uncovered by its accepted masks beyond this share is not exhaustive.",
    )
    high_score: float = Field(
        0.5, ge=0.0, le=1.0,
        description="A rejected mask (not a duplicate or conflict) scoring at least this makes its pair not exhaustive.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> PairThresholds:
        if self.absent_threshold > self.present_threshold:
            raise ValueError(f"absent_threshold ({self.absent_threshold}) must not exceed present_threshold ({self.present_threshold})")
        return self


VERDICT_THRESHOLDS: dict[str, type[_Frozen]] = {"mask_verdicts": MaskThresholds, "pair_verdicts": PairThresholds}
"""Each verdict macro of ``schemas/sql/verdicts.sql`` and the declaration of its thresholds."""


class VerifyConfig(PairThresholds, MaskThresholds):
    """Scoring settings (they decide the stored scores) and, inherited, the thresholds (they decide only the verdicts).

    Changing a threshold and running the verify stage again re-derives the verdict tables from the
    stored scores without loading a model.
    """

    verifier: str = Field(
        "sam3-clip", pattern=r"^[A-Za-z0-9_.-]+$",
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
        return self.model_dump(mode="json", include={name for model in VERDICT_THRESHOLDS.values() for name in model.model_fields})


class SplitsConfig(_Frozen):
    """Who may confirm a pair, how many must agree for Gold, and how images are dealt to train/val/test."""

    verifiers: tuple[str, ...] = Field((), description="Verifiers whose verdicts count as sources; empty: every verifier in the run.")
    human_verifiers: tuple[str, ...] = Field(("human",), description="Verifiers that are human labels: one of them confirming a pair makes it Gold, and it overrides machines.")
    gold_min_sources: int = Field(2, ge=1, description="Independent machine verifiers that must agree for Gold.")
    max_negatives_per_image: int = Field(30, ge=0, description="At most this many negative pairs per image, hard negatives first.")
    train_fraction: float = Field(0.8, ge=0.0, le=1.0, description="Share of images (not pairs) in train.")
    val_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of images in val; test takes the rest.")
    salt: str = Field("sam3-engine", description="Mixed into the hash of each image id that picks its split: change it for another deal.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitsConfig:
        if self.train_fraction + self.val_fraction > 1.0:
            raise ValueError(f"train_fraction + val_fraction ({self.train_fraction} + {self.val_fraction}) exceeds 1")
        return self


class RayConfig(_Frozen):
    address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS; else a local Ray is started).")


class RunConfig(_Frozen):
    input: str | None = Field(None, description="Images: a folder, a glob, a manifest (.jsonl/.csv/.parquet) or a COCO .json; any fsspec URL.")
    output: str | None = Field(None, description="Run directory (any fsspec URL); default runs/<config or input name>.")
    stages: tuple[str, ...] = Field(STAGE_NAMES, description="Stages to run, in pipeline order.")
    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    mine: MineConfig = MineConfig()
    clip: ClipConfig = ClipConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    negatives: NegativesConfig = NegativesConfig()
    propose: ProposeConfig = ProposeConfig()
    verify: VerifyConfig = VerifyConfig()
    splits: SplitsConfig = SplitsConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("stages", mode="before")
    @classmethod
    def _split(cls, stages: Any) -> Any:
        return [s.strip() for s in stages.split(",") if s.strip()] if isinstance(stages, str) else stages

    @field_validator("stages")
    @classmethod
    def _known(cls, stages: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(STAGE_NAMES)}")
        if not stages:
            raise ValueError("at least one stage is needed")
        return tuple(sorted(set(stages), key=STAGE_NAMES.index))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _rebase(url: str, base: Path) -> str:
    path = url.removeprefix("file://")
    return url if not _is_local(url) or os.path.isabs(path) else str((base / path).resolve())


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML file (optional), apply flag overrides, validate, and fill in the output default."""
    data: dict[str, Any] = {}
    source = "command-line flags"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
        base = Path(path).resolve().parent
        for key in ("input", "output"):
            if isinstance(data.get(key), str):
                data[key] = _rebase(data[key], base)
        for section, key in _PATH_KEYS:
            values = data.get(section)
            if isinstance(values, dict) and isinstance(values.get(key), str) and values[key] != "builtin":
                values[key] = _rebase(values[key], base)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if (key in ("input", "output") or tuple(key.split(".")) in _PATH_KEYS) and isinstance(value, str) and value != "builtin":
            value = _rebase(value, Path.cwd())
        _set_dotted(data, key, value)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if config.output is None:
        name = Path(path).stem if path is not None else Path((config.input or "run").rstrip("/")).stem or "run"
        config = config.model_copy(update={"output": str(Path(DEFAULT_RUNS_DIR, name).resolve())})
    return config


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)
