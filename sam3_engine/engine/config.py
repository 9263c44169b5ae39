"""Run configuration: validated, immutable, with a default for every field that can have one.

A config comes from a YAML file, CLI flags, or both (flags win). Unknown keys and wrong types are
errors that name the key and the file. Relative local paths in a file are relative to that file;
relative paths given as flags are relative to the working directory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from sam3_engine.engine.stage import stage_class, stage_names

DEFAULT_RUNS_DIR = "runs"


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message that names the file and the key."""


class ConfigSection(BaseModel):
    """A section of the run config: unknown keys are errors, values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def file_field(default: str | None, description: str) -> Any:
    """A key holding a file path: a relative one is relative to the config file (to the working directory for a flag)."""
    return Field(default, description=description, json_schema_extra={"file": True})


class StorageConfig(ConfigSection):
    """How to reach object storage; credentials come from the standard AWS_* environment."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO.")
    region: str | None = Field(None, description="S3 region.")
    anonymous: bool = Field(False, description="Read public buckets without credentials.")
    s3_single_writer: bool = Field(
        True,
        description="Commit Delta tables on S3 without a lock (safe: only the run's driver commits).",
    )
    compact_every: int = Field(
        25,
        ge=1,
        description="Compact a table's small files into large ones after this many commits to it (and at the end of a stage), "
        "so that a commit's cost does not grow with the run.",
    )
    units_per_commit: int = Field(
        64,
        ge=1,
        description="Units that finish together are committed together, at most this many per commit: "
        "the driver's commits per unit fall as the cluster grows.",
    )
    vacuum_retention_hours: int = Field(
        1,
        ge=0,
        description="Files that compaction replaced, and log entries before the latest checkpoint, are deleted once they are "
        "this old: a reader holding an older snapshot (a live dashboard) keeps its files until then.",
    )


class ModelConfig(ConfigSection):
    name: str = Field(
        "facebook/sam3",
        description="Hugging Face id or local directory of the SAM 3 checkpoint, or tiny-random (random weights, for smoke runs).",
    )
    revision: str | None = Field(None, description="Pinned revision of the checkpoint.")
    device: str | None = Field(None, description="Torch device for the model; default: cuda when the worker has a GPU, else cpu.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="Weights and activations; default: bfloat16 on CUDA, float32 on CPU."
    )
    fallback_to_tiny_random: bool = Field(
        False,
        description="When the checkpoint cannot be reached, run tiny-random instead of failing (the quickstart only; announced loudly).",
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile SAM 3's vision encoder and text-conditioned head (phrase batches padded to powers of two, so a few "
            "graphs serve every phrase count); costs a minute or more per model actor at start; falls back to eager, with a "
            "warning, on any compile error."
        ),
    )


class ClipConfig(ConfigSection):
    model: str = Field("ViT-B-32", description="open_clip architecture, or tiny-random (random weights, for smoke runs).")
    pretrained: str | None = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag (weights from the Hugging Face hub) or a local weights file."
    )
    device: str | None = Field(None, description="Torch device; default: cuda when the worker has a GPU, else cpu.")
    fallback_to_tiny_random: bool = Field(
        False, description="When the weights cannot be reached, run tiny-random instead of failing (announced loudly)."
    )
    batch_size: int = Field(64, ge=1, description="Images or phrases per forward pass.")
    unit_size: int = Field(256, ge=1, description="Images (or 4x as many phrases) per work unit.")
    workers: int | None = Field(
        None, ge=1, description="Model actors; default: one per GPU in the Ray cluster, or one CPU actor without GPUs."
    )
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per model actor; default: 1 when the cluster has GPUs, else 0.")


MASK_REASONS = ("too_small", "fragmented", "border_hugging", "duplicate", "conflict", "unstable", "reprompt_inconsistent", "clip_mismatch")
"""Every reason code the mask verdict can give (see ``schemas/sql/verdicts.sql``)."""


class MaskThresholds(ConfigSection):
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
        0.0,
        ge=-2.0,
        le=2.0,
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


class PairThresholds(ConfigSection):
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
        0.2,
        ge=0.0,
        le=1.0,
        description="A pair whose semantic foreground is uncovered by its accepted masks beyond this share is not exhaustive.",
    )
    high_score: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A rejected mask (not a duplicate or conflict) scoring at least this makes its pair not exhaustive.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> PairThresholds:
        if self.absent_threshold > self.present_threshold:
            raise ValueError(f"absent_threshold ({self.absent_threshold}) must not exceed present_threshold ({self.present_threshold})")
        return self


class VlmMaskThresholds(ConfigSection):
    """The ``verify_vlm.*`` thresholds of the VLM's mask verdicts, on P(yes) to "is the highlighted region one whole <phrase>?";
    also the parameters of the SQL macro ``vlm_mask_verdicts``."""

    accept_threshold: float = Field(0.6, ge=0.0, le=1.0, description="A mask whose P(yes) is at least this is accepted.")
    reject_threshold: float = Field(
        0.4, ge=0.0, le=1.0, description="A mask whose P(yes) is at most this is rejected (between the two: uncertain)."
    )

    @model_validator(mode="after")
    def _mask_thresholds_ordered(self) -> VlmMaskThresholds:
        if self.reject_threshold > self.accept_threshold:
            raise ValueError(f"reject_threshold ({self.reject_threshold}) must not exceed accept_threshold ({self.accept_threshold})")
        return self


class VlmPairThresholds(ConfigSection):
    """The ``verify_vlm.*`` thresholds of the VLM's presence and exhaustivity verdicts, on P(yes); also the parameters of the
    SQL macro ``vlm_pair_verdicts``."""

    present_threshold: float = Field(
        0.6, ge=0.0, le=1.0, description='P(yes) to "is there a <phrase>?" at or above which a pair is present.'
    )
    absent_threshold: float = Field(
        0.4, ge=0.0, le=1.0, description="P(yes) at or below which a pair is absent (between the two: uncertain)."
    )
    exhaustive_threshold: float = Field(
        0.6, ge=0.0, le=1.0, description='P(yes) to "is every <phrase> highlighted?" at or above which a pair is exhaustive.'
    )
    not_exhaustive_threshold: float = Field(
        0.4, ge=0.0, le=1.0, description="P(yes) at or below which a pair is not exhaustive (between the two: unknown)."
    )

    @model_validator(mode="after")
    def _pair_thresholds_ordered(self) -> VlmPairThresholds:
        if self.absent_threshold > self.present_threshold:
            raise ValueError(f"absent_threshold ({self.absent_threshold}) must not exceed present_threshold ({self.present_threshold})")
        if self.not_exhaustive_threshold > self.exhaustive_threshold:
            raise ValueError(
                f"not_exhaustive_threshold ({self.not_exhaustive_threshold}) must not exceed "
                f"exhaustive_threshold ({self.exhaustive_threshold})"
            )
        return self


VERDICT_THRESHOLDS: dict[str, type[ConfigSection]] = {
    "mask_verdicts": MaskThresholds,
    "pair_verdicts": PairThresholds,
    "vlm_mask_verdicts": VlmMaskThresholds,
    "vlm_pair_verdicts": VlmPairThresholds,
}
"""Each verdict macro of ``schemas/sql/verdicts.sql`` and the declaration of its thresholds."""


def verdict_parameters(config: BaseModel, *macros: str) -> dict[str, Any]:
    """``config``'s thresholds of these verdict macros, named as the macros' parameters."""
    names = {name for macro in macros for name in VERDICT_THRESHOLDS[macro].model_fields}
    return config.model_dump(mode="json", include=names)


class RayConfig(ConfigSection):
    address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS; else a local Ray is started).")
    cpu_stages: Literal["auto", "ray", "processes"] = Field(
        "auto",
        description="Where stages without a model run: Ray tasks across the cluster, or a process pool on the driver's "
        "machine; auto: Ray when a cluster is given (ray.address or RAY_ADDRESS), else processes.",
    )

    def cpu_stages_on_ray(self) -> bool:
        if self.cpu_stages == "auto":
            return bool(self.address or os.environ.get("RAY_ADDRESS"))
        return self.cpu_stages == "ray"


class RunConfig(ConfigSection):
    """The keys every run has; each registered stage with a ``config_model`` adds its section (``run_config_model``)."""

    input: str | None = Field(
        None, description="Images: a folder, a glob, a manifest (.jsonl/.csv/.parquet) or a COCO .json; any fsspec URL."
    )
    output: str | None = Field(None, description="Run directory (any fsspec URL); default runs/<config or input name>.")
    stages: tuple[str, ...] = Field(default_factory=stage_names, description="Stages to run, in pipeline order (default: every stage).")
    model: ModelConfig = ModelConfig()
    clip: ClipConfig = ClipConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("stages", mode="before")
    @classmethod
    def _split(cls, stages: Any) -> Any:
        return [s.strip() for s in stages.split(",") if s.strip()] if isinstance(stages, str) else stages

    @field_validator("stages")
    @classmethod
    def _known(cls, stages: tuple[str, ...]) -> tuple[str, ...]:
        known = stage_names()
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(known)}")
        if not stages:
            raise ValueError("at least one stage is needed")
        return tuple(sorted(set(stages), key=known.index))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def run_config_model() -> type[RunConfig]:
    """``RunConfig`` with a section per registered stage that declares a config model, keyed by the stage's name."""
    return _with_sections(tuple((name, stage_class(name).config_model) for name in stage_names() if stage_class(name).config_model))


@functools.cache
def _with_sections(sections: tuple[tuple[str, type[ConfigSection]], ...]) -> type[RunConfig]:
    fields = {name: (model, Field(default_factory=model, description=model.__doc__)) for name, model in sections}
    return create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)


def sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The model's nested sections by key: ``model``, ``mine``, ``verify``, ..."""
    return {
        name: field.annotation
        for name, field in model.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def _file_keys(model: type[RunConfig]) -> set[tuple[str, str]]:
    return {
        (name, key)
        for name, section in sections(model).items()
        for key, field in section.model_fields.items()
        if (field.json_schema_extra or {}).get("file")
    }


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _rebase(url: str, base: Path) -> str:
    path = url.removeprefix("file://")
    return url if not _is_local(url) or os.path.isabs(path) else str((base / path).resolve())


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML file (optional), apply flag overrides, validate, and fill in the output default."""
    model = run_config_model()
    file_keys = _file_keys(model)
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
        for section, key in file_keys:
            values = data.get(section)
            if isinstance(values, dict) and isinstance(values.get(key), str) and values[key] != "builtin":
                values[key] = _rebase(values[key], base)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if (key in ("input", "output") or tuple(key.split(".")) in file_keys) and isinstance(value, str) and value != "builtin":
            value = _rebase(value, Path.cwd())
        _set_dotted(data, key, value)
    try:
        config = model.model_validate(data)
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
