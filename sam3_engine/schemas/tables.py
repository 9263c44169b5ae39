"""Arrow schemas of every table the engine writes: the contract between stages.

Each table is declared once here, with a doc string per column and a schema version. Writers
validate against these declarations (``validate``); the README's tables reference and
``sam3-engine tables`` are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

DOC_KEY = b"doc"
TABLE_KEY = b"sam3_engine.table"
VERSION_KEY = b"sam3_engine.schema_version"


class SchemaError(ValueError):
    """Rows that do not match their table's declared schema."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable, metadata={DOC_KEY: self.doc})


@dataclass(frozen=True)
class TableSpec:
    """A table: its columns, its version, and the column whose value a commit replaces."""

    name: str
    doc: str
    version: int
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    replace_column: str = "unit_id"

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [c.field() for c in self.columns],
            metadata={TABLE_KEY: self.name.encode(), VERSION_KEY: str(self.version).encode()},
        )

    @property
    def stored_schema(self) -> pa.Schema:
        """What the table's files hold: the schema without column docs. Delta refuses a write whose field
        metadata differs from the table's, so a reworded doc must never reach the files."""
        return pa.schema([field.remove_metadata() for field in self.schema], metadata=self.schema.metadata)

    def empty(self) -> pa.Table:
        return self.schema.empty_table()


def _unit_column() -> Column:
    return Column("unit_id", pa.string(), "Work unit that wrote the row (stage:fingerprint); a re-run replaces a unit's rows whole.")


_PROBE_COLUMNS = (
    Column("width", pa.int32(), "Width in pixels after applying the EXIF orientation."),
    Column("height", pa.int32(), "Height in pixels after applying the EXIF orientation."),
    Column("format", pa.string(), "Container format as detected by Pillow (JPEG, PNG, WEBP, ...)."),
    Column("mode", pa.string(), "Pillow pixel mode as stored (RGB, RGBA, L, P, CMYK, I;16, ...)."),
    Column("num_bytes", pa.int64(), "File size in bytes."),
    Column("exif_orientation", pa.int8(), "EXIF orientation tag 1-8 (1 when absent); 5-8 swap width and height."),
)

SOURCES = TableSpec(
    name="sources",
    doc="One row per input that decoded: where it came from and what the probe found. Duplicates of one photo share an image_id.",
    version=2,
    key=("input_id",),
    columns=(
        Column(
            "input_id",
            pa.string(),
            "Hash of the input's URI and its occurrence number among equal URIs: unique per input, stable when inputs are added.",
        ),
        Column("uri", pa.string(), "Fully qualified URI the bytes were read from."),
        Column("image_id", pa.string(), "SHA-256 of the file's bytes (hex): the same photo under two paths has one id."),
        *_PROBE_COLUMNS,
        Column("captions", pa.list_(pa.string()), "Captions given with this input (manifest or COCO captions)."),
        Column("alt_text", pa.string(), "Alt text given with this input.", nullable=True),
        Column("source", pa.string(), "Free-form provenance label given with this input.", nullable=True),
        Column("phrases", pa.list_(pa.string()), "Phrases the user asked for on this input (the manifest's `phrases`)."),
        _unit_column(),
    ),
)

IMAGES = TableSpec(
    name="images",
    doc="One row per distinct image (by content hash), with every URI it was found under.",
    version=2,
    key=("image_id",),
    columns=(
        Column("image_id", pa.string(), "SHA-256 of the file's bytes (hex)."),
        Column("uri", pa.string(), "Canonical URI: the smallest of `uris`."),
        Column("uris", pa.list_(pa.string()), "Every URI with these exact bytes, sorted."),
        *_PROBE_COLUMNS,
        Column("captions", pa.list_(pa.string()), "Distinct captions from all of the image's inputs, sorted."),
        Column("alt_texts", pa.list_(pa.string()), "Distinct alt texts from all of the image's inputs, sorted."),
        Column("sources", pa.list_(pa.string()), "Distinct provenance labels, sorted."),
        Column("phrases", pa.list_(pa.string()), "Distinct user phrases from all of the image's inputs, sorted."),
        _unit_column(),
    ),
)

REJECTS = TableSpec(
    name="rejects",
    doc="One row per input a stage could not use, with a reason code and a human-readable detail.",
    version=1,
    key=("stage", "input_id"),
    columns=(
        Column("input_id", pa.string(), "Identifier of the rejected input within its stage (ingest: the input_id)."),
        Column("stage", pa.string(), "Stage that rejected the input."),
        Column("uri", pa.string(), "URI (or other locator) of the rejected input.", nullable=True),
        Column("image_id", pa.string(), "SHA-256 of the bytes when they could be read.", nullable=True),
        Column("reason", pa.string(), "Machine-readable reason code (see the README's reject reasons)."),
        Column("detail", pa.string(), "Human-readable explanation."),
        _unit_column(),
    ),
)

UNITS = TableSpec(
    name="units",
    doc="The ledger of committed work units; a unit listed here is done and is skipped on restart.",
    version=2,
    key=("unit_id",),
    columns=(
        Column("unit_id", pa.string(), "stage:fingerprint of the stage's version, its config and the unit's inputs."),
        Column("stage", pa.string(), "Stage that ran the unit."),
        Column("attempt_id", pa.string(), "Run attempt (see `runs`) that committed the unit."),
        Column("num_inputs", pa.int64(), "Inputs the unit covered."),
        Column("rows_written", pa.map_(pa.string(), pa.int64()), "Rows committed per table."),
        Column(
            "stats",
            pa.map_(pa.string(), pa.float64()),
            "What the stage measured on the unit (OOM retries, batch splits, peak memory, seconds); see each stage.",
        ),
        Column("committed_at", pa.timestamp("us", tz="UTC"), "When the unit's last table commit finished."),
    ),
)

RUNS = TableSpec(
    name="runs",
    doc="One row per attempt at a run (a restart is a new attempt of the same run_id).",
    version=1,
    key=("attempt_id",),
    replace_column="attempt_id",
    columns=(
        Column("attempt_id", pa.string(), "Unique id of this invocation."),
        Column("run_id", pa.string(), "Id of the run directory, stable across restarts."),
        Column(
            "status", pa.string(), "running, finished, failed, interrupted, or killed (found still running by a later attempt: SIGKILL)."
        ),
        Column("started_at", pa.timestamp("us", tz="UTC"), "Start of the attempt."),
        Column("finished_at", pa.timestamp("us", tz="UTC"), "End of the attempt.", nullable=True),
        Column("engine_version", pa.string(), "sam3-data-engine version."),
        Column("git_commit", pa.string(), "Git commit of the engine's source, when known.", nullable=True),
        Column("stages", pa.list_(pa.string()), "Stages this attempt ran, in order."),
        Column("config_yaml", pa.string(), "The resolved configuration, as YAML."),
        Column("summary_json", pa.string(), "Counts and timings of the attempt, as JSON.", nullable=True),
        Column("error", pa.string(), "Error message of a failed attempt.", nullable=True),
    ),
)

CONCEPTS = TableSpec(
    name="concepts",
    doc="One row per concept: every mined phrase and every concept of the ontology and vocabulary.",
    version=2,
    key=("concept_id",),
    columns=(
        Column("concept_id", pa.string(), "Hash of the normal form: the same concept has the same id in every run."),
        Column(
            "phrase",
            pa.string(),
            "The normal form (lower case, no articles or punctuation, head noun "
            "singular, synonyms collapsed): the phrase given to the model.",
        ),
        Column("spellings", pa.list_(pa.string()), "Distinct raw spellings mined for it (captions, user phrases), sorted."),
        Column("parent", pa.string(), "Parent concept in the ontology (LVIS: WordNet hypernym; COCO: supercategory).", nullable=True),
        Column("synonyms", pa.list_(pa.string()), "Synonyms that collapse to this concept."),
        Column(
            "sources",
            pa.list_(pa.string()),
            "Where it came from: ontology sources (lvis, coco, user_ontology), mining origins (caption, user, vocabulary) "
            "and propose.phrases (asked by the config, added to mine's concepts).",
        ),
        _unit_column(),
    ),
)

CANDIDATES = TableSpec(
    name="candidates",
    doc="Mined (image, concept) pairs to ask SAM 3 about, one row per origin; hard negatives are expected absent.",
    version=1,
    key=("pair_id", "origin"),
    columns=(
        Column("pair_id", pa.string(), "Hash of image_id and concept_id: the `pairs` row the proposal stage writes for it."),
        Column("image_id", pa.string(), "The image."),
        Column("concept_id", pa.string(), "The concept (see `concepts`)."),
        Column("phrase", pa.string(), "The concept's normal form."),
        Column("origin", pa.string(), "caption, user, vocabulary, clip or hard_negative."),
        Column("raw_phrase", pa.string(), "The phrase as found (caption text, user spelling).", nullable=True),
        Column(
            "score",
            pa.float32(),
            "Mining score: 1 for text origins; clip: the CLIP similarity; hard negatives: how "
            "confusable (1 sibling, 0.5 cousin, CLIP text similarity for a neighbour).",
        ),
        Column("related_concept_id", pa.string(), "Hard negatives: the present concept it is confusable with.", nullable=True),
        Column(
            "relation",
            pa.string(),
            "Hard negatives: sibling or cousin (in the ontology) or clip_neighbour (by CLIP text similarity) of the related concept.",
            nullable=True,
        ),
        _unit_column(),
    ),
)

IMAGE_EMBEDDINGS = TableSpec(
    name="image_embeddings",
    doc="CLIP embedding of each image (unit length), reused by retrieval, negatives and later stages.",
    version=1,
    key=("image_id",),
    columns=(
        Column("image_id", pa.string(), "The image."),
        Column("model", pa.string(), "CLIP architecture/pretrained tag, or tiny-random."),
        Column("embedding", pa.list_(pa.float32()), "Unit-length image embedding."),
        _unit_column(),
    ),
)

PHRASE_EMBEDDINGS = TableSpec(
    name="phrase_embeddings",
    doc="CLIP text embedding of each concept's phrase (unit length, prompt 'a photo of a {phrase}.').",
    version=1,
    key=("concept_id",),
    columns=(
        Column("concept_id", pa.string(), "The concept (see `concepts`)."),
        Column("phrase", pa.string(), "The phrase embedded."),
        Column("model", pa.string(), "CLIP architecture/pretrained tag, or tiny-random."),
        Column("embedding", pa.list_(pa.float32()), "Unit-length text embedding."),
        _unit_column(),
    ),
)

PAIRS = TableSpec(
    name="pairs",
    doc="One row per (image, concept) the proposal stage ran, with SAM 3's presence score and instance count.",
    version=3,
    key=("pair_id",),
    columns=(
        Column("pair_id", pa.string(), "Hash of image_id and concept_id: stable across runs."),
        Column("image_id", pa.string(), "The image (see `images`)."),
        Column("concept_id", pa.string(), "The concept (see `concepts`)."),
        Column("phrase", pa.string(), "The phrase, for convenience."),
        Column("presence_score", pa.float32(), "sigmoid(presence logit): is the concept in the image at all."),
        Column("instance_count", pa.int32(), "Instances kept at `propose.threshold`."),
        Column("max_score", pa.float32(), "Best combined score over all of SAM 3's queries, kept or not: how close a negative came."),
        Column("height", pa.int32(), "Image height after EXIF orientation (the foreground's and masks' height)."),
        Column("width", pa.int32(), "Image width after EXIF orientation."),
        Column(
            "foreground_counts",
            pa.string(),
            "SAM 3's semantic segmentation of the phrase (sigmoid > 0.5), COCO compressed RLE counts at the image's resolution; "
            "null where no instance was kept (the mask decoder did not run).",
            nullable=True,
        ),
        Column("foreground_area", pa.int64(), "Pixels in the semantic foreground; null with it.", nullable=True),
        Column("phrase_truncated", pa.bool_(), "The phrase exceeded SAM 3's 32-token context and was truncated."),
        Column("model_id", pa.string(), "Checkpoint id or directory, or tiny-random."),
        Column("model_revision", pa.string(), "Checkpoint revision, when pinned.", nullable=True),
        Column("random_weights", pa.bool_(), "True when the model had random weights (tiny-random): not a real prediction."),
        Column("run_id", pa.string(), "Run that produced the pair."),
        _unit_column(),
    ),
)

MASKS = TableSpec(
    name="masks",
    doc="One row per proposed instance: a COCO RLE mask at the image's original (EXIF-oriented) resolution with its scores.",
    version=2,
    key=("mask_id",),
    columns=(
        Column("mask_id", pa.string(), "Hash of pair_id and the model's query index: deterministic."),
        Column("pair_id", pa.string(), "The (image, concept) pair (see `pairs`)."),
        Column("image_id", pa.string(), "The image."),
        Column("concept_id", pa.string(), "The concept."),
        Column("query_index", pa.int32(), "Index of the DETR query that produced the instance."),
        Column("height", pa.int32(), "Mask height: the image's height after EXIF orientation."),
        Column("width", pa.int32(), "Mask width: the image's width after EXIF orientation."),
        Column("rle_counts", pa.string(), "COCO compressed RLE counts (pycocotools string form) of the mask."),
        Column("bbox", pa.list_(pa.float64(), 4), "Box of the mask, [x, y, w, h] in pixels (pycocotools toBbox)."),
        Column("area", pa.int64(), "Mask area in pixels (pycocotools area)."),
        Column("model_box", pa.list_(pa.float32(), 4), "The model's own box, [x0, y0, x1, y1] in pixels."),
        Column("object_score", pa.float32(), "sigmoid(object logit) of the query."),
        Column("presence_score", pa.float32(), "The pair's presence score."),
        Column("score", pa.float32(), "object_score x presence_score, as SAM 3 ranks instances."),
        Column("stability_score", pa.float32(), "IoU of the mask at logit > +1 and logit > -1: how crisp its boundary is."),
        Column(
            "reprompt_iou",
            pa.float32(),
            "IoU of the mask with SAM 3's mask when prompted again with the phrase and this box (at the model's mask resolution); "
            "null when `propose.reprompt_boxes` is off.",
            nullable=True,
        ),
        _unit_column(),
    ),
)


def _verifier_columns() -> tuple[Column, ...]:
    return (
        Column("verifier", pa.string(), "Name of the verifier (`verify.verifier`): rows of independent verifiers sit side by side."),
        Column("verifier_version", pa.string(), "The verifier's code version and models, e.g. `1;clip=ViT-B-32/laion2b_s34b_b79k`."),
    )


MASK_SCORES = TableSpec(
    name="mask_scores",
    doc=(
        "The verify stage's raw scores per mask; verdicts are derived from them (and "
        "from `masks`) by SQL, so thresholds re-tune without a model."
    ),
    version=1,
    key=("mask_id", "verifier"),
    columns=(
        Column("mask_id", pa.string(), "The mask (see `masks`)."),
        Column("pair_id", pa.string(), "Its pair."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("area_fraction", pa.float32(), "Mask area over image area."),
        Column("fragments", pa.int32(), "Connected pieces of the mask (8-connected)."),
        Column("largest_fragment_fraction", pa.float32(), "Share of the mask's area in its largest piece."),
        Column("border_fraction", pa.float32(), "Share of the image's outer frame of pixels that the mask covers."),
        Column("duplicate_iou", pa.float32(), "Highest mask IoU with a higher-scored mask of the same pair (0 when none)."),
        Column("duplicate_of", pa.string(), "That higher-scored mask.", nullable=True),
        Column(
            "conflict_iou", pa.float32(), "Highest mask IoU with a higher-scored mask of an unrelated phrase on the image (0 when none)."
        ),
        Column("conflict_with", pa.string(), "That mask.", nullable=True),
        Column(
            "clip_crop_similarity",
            pa.float32(),
            "CLIP cosine similarity of the masked crop with the mask's phrase; null for an empty mask.",
            nullable=True,
        ),
        Column(
            "clip_crop_margin",
            pa.float32(),
            "That similarity minus the best similarity of the crop with the image's "
            "unrelated phrases; null when the image has no other phrase.",
            nullable=True,
        ),
        *_verifier_columns(),
        _unit_column(),
    ),
)

PAIR_SCORES = TableSpec(
    name="pair_scores",
    doc="The verify stage's raw scores per (image, phrase) pair: the independent presence signal next to SAM 3's.",
    version=1,
    key=("pair_id", "verifier"),
    columns=(
        Column("pair_id", pa.string(), "The pair (see `pairs`)."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("clip_similarity", pa.float32(), "CLIP cosine similarity of the whole image with the phrase."),
        Column(
            "clip_z",
            pa.float32(),
            "That similarity as a z-score against the image's other phrases (calibrates "
            "CLIP per image); null with fewer than 2 other phrases.",
            nullable=True,
        ),
        *_verifier_columns(),
        _unit_column(),
    ),
)

VLM_PAIR_SCORES = TableSpec(
    name="vlm_pair_scores",
    doc=(
        "The VLM verifier's answers per pair (`verify_vlm`): P(yes) against P(no) read from its logits. A table of its own, "
        "since its signals are not CLIP's; its verdicts join the others' in `pair_verifications`."
    ),
    version=1,
    key=("pair_id", "verifier"),
    columns=(
        Column("pair_id", pa.string(), "The pair (see `pairs`)."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("presence_yes", pa.float64(), 'P(yes) to "Is there a <phrase> in this image?" (prompt `presence`).'),
        Column(
            "exhaustive_yes",
            pa.float64(),
            'P(yes) to "Is every <phrase> in the image highlighted?" with the pair\'s masks drawn (prompt `exhaustivity`); '
            "null for a pair without masks.",
            nullable=True,
        ),
        Column("masks_shown", pa.int32(), "Masks drawn for the exhaustivity question."),
        *_verifier_columns(),
        _unit_column(),
    ),
)

VLM_MASK_SCORES = TableSpec(
    name="vlm_mask_scores",
    doc="The VLM verifier's answer per mask (`verify_vlm`); its verdicts join the others' in `mask_verifications`.",
    version=1,
    key=("mask_id", "verifier"),
    columns=(
        Column("mask_id", pa.string(), "The mask (see `masks`)."),
        Column("pair_id", pa.string(), "Its pair."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column(
            "whole_yes",
            pa.float64(),
            'P(yes) to "Is the highlighted region one whole <phrase>?" with the mask outlined, the rest dimmed, and a close-up '
            "(prompt `mask`); null when the mask's size is not its image's.",
            nullable=True,
        ),
        *_verifier_columns(),
        _unit_column(),
    ),
)

MASK_VERIFICATIONS = TableSpec(
    name="mask_verifications",
    doc="Mask verification (MV) verdicts: the `mask_verdicts` SQL macro over the stored scores at the config's thresholds.",
    version=1,
    key=("mask_id", "verifier"),
    replace_column="verifier",
    columns=(
        Column("mask_id", pa.string(), "The mask."),
        Column("pair_id", pa.string(), "Its pair."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("score", pa.float32(), "SAM 3's score of the mask."),
        Column("verdict", pa.string(), "accept, reject (a reason in `verify.reject_reasons`) or uncertain (other reasons only)."),
        Column("reasons", pa.list_(pa.string()), "Reason codes (README: mask verdict reasons); empty when accepted."),
        *_verifier_columns(),
        Column("thresholds", pa.string(), "The thresholds the verdict used, as JSON."),
    ),
)

PAIR_VERIFICATIONS = TableSpec(
    name="pair_verifications",
    doc="Presence and exhaustivity (EV) verdicts per pair: the `pair_verdicts` SQL macro at the config's thresholds.",
    version=1,
    key=("pair_id", "verifier"),
    replace_column="verifier",
    columns=(
        Column("pair_id", pa.string(), "The pair."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("phrase", pa.string(), "The phrase."),
        Column("presence_probability", pa.float64(), "sigmoid(sam_weight x logit(SAM 3 presence) + clip_weight x clip_z + presence_bias)."),
        Column("presence", pa.string(), "present, absent or uncertain."),
        Column("presence_reason", pa.string(), "Why (README: presence reasons)."),
        Column("accepted_masks", pa.int32(), "Masks of the pair accepted by mask verification."),
        Column(
            "uncovered_fraction",
            pa.float64(),
            "Share of SAM 3's semantic foreground outside the union of accepted masks; null without a foreground.",
            nullable=True,
        ),
        Column("exhaustivity", pa.string(), "exhaustive, not_exhaustive or unknown: do the accepted masks cover every instance."),
        Column("exhaustivity_reason", pa.string(), "Why (README: exhaustivity reasons)."),
        *_verifier_columns(),
        Column("thresholds", pa.string(), "The thresholds the verdict used, as JSON."),
    ),
)


SPLITS = TableSpec(
    name="splits",
    doc="Every verified pair's place in the benchmark: split (by image), tier and why; derived by `schemas/sql/splits.sql`.",
    version=1,
    key=("pair_id",),
    columns=(
        Column("pair_id", pa.string(), "The pair."),
        Column("image_id", pa.string(), "Its image: all of an image's pairs share one split."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("phrase", pa.string(), "The phrase."),
        Column(
            "split",
            pa.string(),
            "train, val or test: from a hash of the image's near-duplicate group (`near_duplicates.group_id`; its own id "
            "without dedup) and `splits.salt`.",
        ),
        Column("tier", pa.string(), "gold, silver or excluded."),
        Column(
            "kind",
            pa.string(),
            "positive (present, exhaustive, with masks) or negative (verified absent); null when excluded.",
            nullable=True,
        ),
        Column("reason", pa.string(), "Why this tier (README: split reasons)."),
        Column("sources", pa.list_(pa.string()), "The verifiers whose verdicts confirm the pair's kind."),
        Column("hard_negative", pa.bool_(), "A negative mined as a hard negative (a relative of a present concept)."),
        _unit_column(),
    ),
)

SELECTIONS = TableSpec(
    name="selections",
    doc="Pairs picked for human review by `sam3-engine select`, one selection (a named round) at a time.",
    version=1,
    key=("selection", "pair_id"),
    replace_column="selection",
    columns=(
        Column("selection", pa.string(), "Name of the selection (a review round); selecting again under the name replaces it."),
        Column("pair_id", pa.string(), "The pair to review."),
        Column("image_id", pa.string(), "Its image: an image's selected pairs go out together."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("phrase", pa.string(), "The phrase."),
        Column("rank", pa.int32(), "Order of selection, from 1; the pairs of one image are consecutive."),
        Column("strategy", pa.string(), "The strategy that contributed most to the pair's score (README: selection strategies)."),
        Column("score", pa.float64(), "The pair's weighted score in [0, 1] (before the diversity term, which ranks images)."),
        Column("created_at", pa.timestamp("us", tz="UTC"), "When the selection was made."),
    ),
)

HUMAN_LABELS = TableSpec(
    name="human_labels",
    doc="People's answers per pair, read back from a labelling tool by `sam3-engine labeling pull`.",
    version=1,
    key=("selection", "pair_id"),
    replace_column="selection",
    columns=(
        Column("selection", pa.string(), "The selection the pair went out in; a pull replaces the selection's rows."),
        Column("pair_id", pa.string(), "The pair."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("phrase", pa.string(), "The phrase."),
        Column("present", pa.bool_(), "The person's presence answer: masks drawn or kept (true) or marked absent (false)."),
        Column("kept_mask_ids", pa.list_(pa.string()), "The engine's masks the person kept unchanged (bit for bit)."),
        Column("dropped_mask_ids", pa.list_(pa.string()), "The engine's masks the person deleted or redrew."),
        Column("drawn_masks", pa.int32(), "Masks the person drew or redrew (rows of `human_masks`)."),
        Column("tool", pa.string(), "label-studio or cvat."),
        Column("project", pa.string(), "The tool's project (or task bundle)."),
        Column("task_id", pa.string(), "The tool's task (one per image)."),
        Column("annotation_id", pa.string(), "The tool's annotation the answer comes from (the latest of the task's)."),
        Column("annotator", pa.string(), "Who answered, as the tool names them."),
        Column("labelled_at", pa.timestamp("us", tz="UTC"), "When the annotation was last changed."),
        Column("lead_time_s", pa.float64(), "Seconds the person spent on the task, as the tool measured them.", nullable=True),
    ),
)

HUMAN_MASKS = TableSpec(
    name="human_masks",
    doc="Masks people drew or redrew in a labelling tool, in the engine's COCO RLE, with their provenance.",
    version=1,
    key=("selection", "mask_id"),
    replace_column="selection",
    columns=(
        Column("selection", pa.string(), "The selection the pair went out in."),
        Column("mask_id", pa.string(), "Hash of the tool, its annotation and the drawing: stable across pulls."),
        Column("pair_id", pa.string(), "The pair."),
        Column("image_id", pa.string(), "Its image."),
        Column("concept_id", pa.string(), "Its concept."),
        Column("height", pa.int32(), "Mask height (the image's)."),
        Column("width", pa.int32(), "Mask width (the image's)."),
        Column("rle_counts", pa.string(), "COCO RLE counts, as in `masks`."),
        Column("bbox", pa.list_(pa.float64(), 4), "Box of the mask, [x, y, w, h] in pixels (pycocotools toBbox)."),
        Column("area", pa.int64(), "Mask area in pixels."),
        Column("tool", pa.string(), "label-studio or cvat."),
        Column("annotation_id", pa.string(), "The tool's annotation."),
        Column("annotator", pa.string(), "Who drew it."),
    ),
)

IMAGE_HASHES = TableSpec(
    name="image_hashes",
    doc="Perceptual hashes of each image (the dedup stage), from which `near_duplicates` is derived.",
    version=1,
    key=("image_id",),
    columns=(
        Column("image_id", pa.string(), "The image."),
        Column(
            "phash",
            pa.int64(),
            "pHash (imagehash.phash, 64 bits) of the EXIF-oriented image in grey, first reduced by an integer box filter to a short "
            "side of 256 to 511 pixels; the bits of its hex string as a signed integer (Hamming distance: bit_count(xor(a, b))).",
        ),
        Column("phash_mirrored", pa.int64(), "The same of the image mirrored left to right: finds mirrored copies."),
        Column(
            "phash_crops",
            pa.list_(pa.int64(), 4),
            "The same of its four corner crops keeping 93% of each side (top left, top right, bottom left, bottom right): "
            "finds slightly cropped copies.",
        ),
        _unit_column(),
    ),
)

NEAR_DUPLICATES = TableSpec(
    name="near_duplicates",
    doc=(
        "Every hashed image's near-duplicate group (a group of one when it has none), derived by the dedup stage from "
        "`image_hashes` and the CLIP `image_embeddings`; splits deal a group whole."
    ),
    version=1,
    key=("image_id",),
    columns=(
        Column("image_id", pa.string(), "The image."),
        Column("group_id", pa.string(), "The smallest image id of its group (its own id when alone): stable while the group is."),
        Column("group_size", pa.int64(), "Images in the group."),
        Column(
            "linked_by",
            pa.list_(pa.string()),
            "How the image is linked to others of its group: phash (hashes within `dedup.phash_max_distance`), mirrored (with a "
            "mirror image's hash), crop (with a corner crop's hash), clip (CLIP cosine at least `dedup.clip_min_cosine`); "
            "empty when alone.",
        ),
        Column("phash_distance", pa.int32(), "Smallest Hamming distance of its pHash links (of 64 bits); null without one.", nullable=True),
        Column("clip_cosine", pa.float32(), "Highest CLIP cosine of its CLIP links; null without one.", nullable=True),
        Column("unit_id", pa.string(), "The derivation that wrote the table (dedup.near_duplicates:fingerprint)."),
    ),
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        IMAGES,
        SOURCES,
        REJECTS,
        CONCEPTS,
        CANDIDATES,
        IMAGE_EMBEDDINGS,
        PHRASE_EMBEDDINGS,
        PAIRS,
        MASKS,
        MASK_SCORES,
        PAIR_SCORES,
        VLM_PAIR_SCORES,
        VLM_MASK_SCORES,
        MASK_VERIFICATIONS,
        PAIR_VERIFICATIONS,
        SPLITS,
        SELECTIONS,
        HUMAN_LABELS,
        HUMAN_MASKS,
        IMAGE_HASHES,
        NEAR_DUPLICATES,
        UNITS,
        RUNS,
    )
}


def validate(spec: TableSpec, table: pa.Table) -> pa.Table:
    """Return ``table`` cast to ``spec``'s schema, or raise SchemaError naming the table and column.

    Columns must match by name and order; types may differ only by a safe cast (int32 -> int64,
    say). Non-nullable columns may hold no nulls and the key must be unique within the rows.
    """
    expected = spec.schema
    if table.column_names != expected.names:
        raise SchemaError(f"table {spec.name!r}: columns {table.column_names} do not match the schema's {expected.names}")
    columns = []
    for field, column in zip(expected, table.columns, strict=True):
        if field.nullable is False and column.null_count:
            raise SchemaError(f"table {spec.name!r}: column {field.name!r} is not nullable but has {column.null_count} null(s)")
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(
                f"table {spec.name!r}: column {field.name!r} of type {column.type} does not cast to {field.type}: {exc}"
            ) from exc
    result = pa.Table.from_arrays(columns, schema=expected)
    if result.num_rows and len(spec.key):
        distinct = result.group_by(list(spec.key)).aggregate([]).num_rows
        if distinct != result.num_rows:
            raise SchemaError(f"table {spec.name!r}: key {spec.key} has {result.num_rows - distinct} duplicate(s)")
    return result
