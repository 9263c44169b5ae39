"""Mine: which concepts to ask SAM 3 about on each image, from its captions, the user's phrases and a vocabulary.

Entry point: ``MineStage``. A unit is a shard of images; every phrase found is brought to its
normal form (``text.concepts``) and becomes a candidate (image, concept, origin). Phrases that
are empty once normalised, or longer than SAM 3's 32-token context, are rejected with a reason.
At the end the ``concepts`` table is rebuilt: the ontology's and vocabulary's concepts plus every
mined one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import Field

from sam3_engine.engine import storage
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import ConfigError, ConfigSection, StorageConfig, file_field
from sam3_engine.engine.stage import (
    BuildContext,
    Derivation,
    Stage,
    WorkUnit,
    arrow_rows,
    fingerprint,
    plan_units,
    register_stage,
    reject_reasons,
    rows_table,
)
from sam3_engine.schemas.tables import CANDIDATES, CONCEPTS, IMAGES, REJECTS
from sam3_engine.text.concepts import (
    LAZY_IMPORTS,
    TEXT_CONTEXT,
    Ontology,
    concept_id,
    load_ontology,
    noun_phrases,
    pair_id,
    phrase_lines,
    token_count,
)

VERSION = 3
"""Bump when a change to this module changes the rows it writes: every unit then re-runs."""


class MineConfig(ConfigSection):
    captions: bool = Field(True, description="Mine noun phrases from the images' captions and alt texts.")
    max_caption_chars: int = Field(
        10_000, ge=1, description="Characters of captions and alt texts mined per image; the rest is a caption_truncated reject."
    )
    phrases: tuple[str, ...] = Field(
        (), description="Phrases asked on every image (origin user). Per-image phrases come from the manifest's `phrases`."
    )
    vocabulary: str | None = file_field(
        None,
        "A vocabulary asked on every image (origin vocabulary): a text file, one phrase per line, "
        "or a YAML/JSON tree of concepts (name, synonyms, parent, children).",
    )
    ontology: str | None = file_field(
        "builtin", "Synonyms and parents: builtin (COCO's 80 and LVIS's 1,203 categories with WordNet parents), a YAML/JSON file, or null."
    )
    unit_size: int = Field(1024, ge=1, description="Images per work unit.")


FREQUENCY_LIST = 5
"""Concepts listed as most and least frequent in the run summary."""

REASONS = {
    "empty_phrase": 'A user phrase that is blank, or has no words left once punctuation is removed ("--").',
    "phrase_too_long": f"A phrase longer than SAM 3's {TEXT_CONTEXT}-token text context.",
    "caption_truncated": "An image's captions and alt texts hold more than mine.max_caption_chars characters: only the first are mined.",
}
SHOWN_CHARS = 200
"""Characters of a rejected phrase quoted in its reject's detail."""


def load_vocabulary(url: str | None, storage_config: StorageConfig) -> Ontology:
    """A vocabulary file: YAML/JSON concept trees (with synonyms and parents), or plain text, one phrase per line."""
    if url is None:
        return Ontology()
    try:
        text = storage.read_text(url, storage_config)
    except FileNotFoundError as exc:
        raise ConfigError(f"mine.vocabulary: {exc}") from exc
    if url.endswith((".yaml", ".yml", ".json")):
        try:
            return Ontology.load(url, text)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"mine.vocabulary: {exc}") from exc
    try:
        return Ontology.from_entries(phrase_lines(text), url, text)
    except ValueError as exc:
        raise ConfigError(f"mine.vocabulary: {exc}") from exc


def run_ontology(config: MineConfig, storage_config: StorageConfig, vocabulary: Ontology | None = None) -> Ontology:
    """The configured ontology with the vocabulary's concepts and synonyms merged in."""
    try:
        ontology = load_ontology(config.ontology, lambda url: storage.read_text(url, storage_config))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"mine.ontology: {exc}") from exc
    ontology.merge(vocabulary if vocabulary is not None else load_vocabulary(config.vocabulary, storage_config))
    return ontology


def capped(texts: tuple[str, ...], limit: int) -> tuple[list[str], int]:
    """The texts cut to their first ``limit`` characters in all, ending between words, and how many characters were left out.

    Mining's cost grows with the text's length: one huge caption must not stall the stage.
    """
    kept, room = [], limit
    for text in texts:
        if len(text) > room:
            head = re.match(r"(?s).*\s", text[: room + 1])  # up to the cut's last whitespace: a word cut in two is left out
            kept.append(head.group(0)[:room] if head else "")
            break
        kept.append(text)
        room -= len(text)
    return [text for text in kept if text.strip()], sum(map(len, texts)) - sum(map(len, kept))


def _shown(raw: str) -> str:
    return repr(raw) if len(raw) <= SHOWN_CHARS else f"{raw[:SHOWN_CHARS]!r}... ({len(raw)} characters)"


def shared_ontology(context: BuildContext) -> Ontology:
    """The run's ontology, loaded once: the one an earlier stage of this run built (mine, negatives), else from the config."""
    for stage in context.built:
        if isinstance(getattr(stage, "ontology", None), Ontology):
            return stage.ontology
    return run_ontology(context.config.mine, context.config.storage)


@dataclass(frozen=True)
class ImageText:
    image_id: str
    uri: str
    texts: tuple[str, ...]
    """Captions and alt texts."""
    phrases: tuple[str, ...]
    """The user's phrases for this image."""


@register_stage
class MineStage(Stage):
    name = "mine"
    order = 20
    config_model = MineConfig
    reasons = REASONS
    outputs = (CANDIDATES, REJECTS)
    derived = (CONCEPTS,)
    worker_imports = LAZY_IMPORTS

    @classmethod
    def build(cls, context: BuildContext) -> MineStage:
        return cls(context.config.mine, context.config.storage)

    def __init__(self, config: MineConfig, storage_config: StorageConfig):
        self.config = config
        vocabulary = load_vocabulary(config.vocabulary, storage_config)
        self.ontology = run_ontology(config, storage_config, vocabulary)
        self.everywhere = self._run_phrases(vocabulary)

    def _run_phrases(self, vocabulary: Ontology) -> tuple[tuple[str, str, str], ...]:
        """(normal form, raw, origin) asked on every image; a bad run-level phrase is a config error."""
        asked = [(raw, "user", "mine.phrases") for raw in self.config.phrases]
        asked += [(name, "vocabulary", "mine.vocabulary") for name in vocabulary.concepts]
        found = []
        for raw, origin, key in asked:
            name = self.ontology.canonical(raw)
            if not name:
                raise ConfigError(f"{key}: the phrase {raw!r} is empty once punctuation is removed")
            if token_count(name) > TEXT_CONTEXT:
                raise ConfigError(f"{key}: the phrase {raw!r} is longer than SAM 3's {TEXT_CONTEXT}-token context")
            found.append((name, raw, origin))
        return tuple(found)

    def plan(self, store) -> Iterator[WorkUnit]:
        rows = store.read(IMAGES.name, columns=["image_id", "uri", "captions", "alt_texts", "phrases"]).sort_by("image_id")
        images = (
            ImageText(r["image_id"], r["uri"], tuple(r["captions"]) + tuple(r["alt_texts"]), tuple(r["phrases"])) for r in arrow_rows(rows)
        )
        settings = {
            "version": VERSION,
            "captions": self.config.captions,
            "max_caption_chars": self.config.max_caption_chars,
            "ontology": self.ontology.digest,
            "everywhere": [list(p) for p in self.everywhere],
        }
        yield from plan_units(
            self.name, settings, images, lambda i: i.image_id, self.config.unit_size, lambda i: (i.image_id, i.texts, i.phrases)
        )

    def process(self, unit: WorkUnit, prepared: Any = None) -> dict[str, pa.Table]:
        candidates: dict[tuple[str, str], dict[str, Any]] = {}
        rejects: dict[str, dict[str, Any]] = {}
        for image in unit.items:
            texts, left_out = capped(image.texts, self.config.max_caption_chars) if self.config.captions else ([], 0)
            if left_out:
                total, limit = sum(map(len, image.texts)), self.config.max_caption_chars
                detail = f"{total} characters of captions and alt texts: the first {total - left_out} mined, {left_out} left out"
                self._reject(rejects, image, "caption_truncated", "caption_truncated", f"{detail} (mine.max_caption_chars = {limit})")
            found = [(raw, "caption") for text in texts for raw in noun_phrases(text, self.ontology)]
            found += [(raw, "user") for raw in image.phrases]
            for raw, origin in dict.fromkeys(found):
                name = self.ontology.canonical(raw)
                problem = "empty_phrase" if not name else "phrase_too_long" if token_count(name) > TEXT_CONTEXT else None
                if problem:
                    self._reject(rejects, image, problem, f"{origin}\0{raw}", f"{origin} phrase {_shown(raw)}")
                    continue
                self._add(candidates, image, name, raw, origin)
            for name, raw, origin in self.everywhere:
                self._add(candidates, image, name, raw, origin)
        return {
            CANDIDATES.name: rows_table(CANDIDATES, sorted(candidates.values(), key=lambda r: (r["pair_id"], r["origin"])), unit.unit_id),
            REJECTS.name: rows_table(REJECTS, list(rejects.values()), unit.unit_id),
        }

    def _reject(self, rejects: dict, image: ImageText, reason: str, key: str, detail: str) -> None:
        input_id = hashlib.sha256(f"{image.image_id}\0{key}".encode()).hexdigest()[:24]
        rejects[input_id] = {
            "input_id": input_id,
            "stage": self.name,
            "uri": image.uri,
            "image_id": image.image_id,
            "reason": reason,
            "detail": detail,
        }

    @staticmethod
    def _add(candidates: dict, image: ImageText, name: str, raw: str, origin: str) -> None:
        cid = concept_id(name)
        candidates.setdefault(
            (image.image_id, cid, origin),
            {
                "pair_id": pair_id(image.image_id, cid),
                "image_id": image.image_id,
                "concept_id": cid,
                "phrase": name,
                "origin": origin,
                "raw_phrase": raw,
                "score": 1.0,
                "related_concept_id": None,
                "relation": None,
            },
        )

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        unit_id = fingerprint(f"{self.name}.concepts", {"version": VERSION, "ontology": self.ontology.digest, "units": sorted(done_units)})
        con = connect(store)
        con.register("pool", self.ontology.table())
        reader = con.sql(named_query("concepts_from_candidates"), params={"unit_id": unit_id}).to_arrow_reader()
        return [Derivation(unit_id, CONCEPTS, reader)]

    def summarize(self, con) -> dict[str, Any]:
        images, mined, concepts = con.execute(
            "SELECT (SELECT count(*) FROM images), (SELECT count(DISTINCT pair_id) FROM candidates WHERE origin <> 'hard_negative'), "
            "(SELECT count(DISTINCT concept_id) FROM candidates WHERE origin <> 'hard_negative')"
        ).fetchone()
        by_origin = dict(
            con.execute(
                "SELECT origin, count(*) FROM candidates WHERE origin <> 'hard_negative' GROUP BY origin ORDER BY origin"
            ).fetchall()
        )
        reasons = reject_reasons(con, self)
        frequency = con.sql(named_query("concept_frequency")).fetchall()
        return {
            "images": images,
            "concepts": concepts,
            "pairs": mined,
            "concepts_per_image": round(mined / images, 2) if images else 0.0,
            "pairs_by_origin": by_origin,
            "rejects": sum(reasons.values()),
            "reject_reasons": reasons,
            "most_frequent": [f"{phrase} ({n})" for phrase, n in frequency[:FREQUENCY_LIST]],
            "least_frequent": [f"{phrase} ({n})" for phrase, n in frequency[::-1][:FREQUENCY_LIST]],
        }
