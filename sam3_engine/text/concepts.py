"""Concepts: how a phrase becomes a concept, the ontology that relates concepts, and caption noun phrases.

One normal form for every source (captions, vocabularies, user phrases): lower case, no leading articles,
possessives or punctuation, head noun singular, synonyms collapsed to the ontology's name. A
concept's id is a hash of that form, so the same concept has the same id in every run.

Caption noun phrases come from TextBlob's pattern tagger and chunker, which ship inside the
``textblob`` wheel: nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import pyarrow as pa
import yaml

from sam3_engine.text import clip_tokenizer

TEXT_CONTEXT = 32
"""SAM 3's text context in tokens, start and end tokens included."""
MAX_WORDS = TEXT_CONTEXT - 2
"""Words a phrase can have and still fit the text context: every word is at least one token."""
PARSE_WINDOW = 2000
"""Characters parsed at a time: TextBlob's chunker is quadratic in a sentence's length, so longer text is cut."""

BUILTIN = "builtin"
ARTICLES = frozenset("a an the this that these those some any each every its their his her our my your".split())
COLOURS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan teal navy maroon "
    "violet cyan magenta turquoise dark light bright pale colorful colourful multicolored".split()
)
NOT_CONCEPTS = frozenset(
    "front back side top bottom left right middle center centre edge corner background foreground picture image photo "
    "photograph view scene shot closeup close-up lot lots couple group number pair bunch kind type sort piece part area way "
    "thing things something someone somebody one other others day time color colour shape".split()
)
"""Nouns that name no visual concept of their own ("in front of", "a group of")."""
PLURAL_MODIFIERS = frozenset("sports clothes arms goods sales news glasses".split())
"""Plural nouns that modify a following noun ("sports bib"); any other plural ends a compound."""


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"'s\b|s'(?=\s|$)", lambda m: "" if m.group(0) == "'s" else "s", text)
    text = re.sub(r"[^\w\s-]|_", " ", text)
    text = re.sub(r"(?<!\w)-+|-+(?!\w)", " ", re.sub(r"-+", "-", text))  # a hyphen joins words ("close-up") or goes
    words = text.split()
    while len(words) > 1 and words[0] in ARTICLES:  # a phrase that is one article ("a") is kept as that word
        words.pop(0)
    return " ".join(words)


LAZY_IMPORTS = ("inflect", "textblob.en", *clip_tokenizer.LAZY_IMPORTS)
"""The modules this one imports on first use (seconds, not needed to start the CLI), for process pools to import once."""


@cache
def _inflect():
    import inflect

    return inflect.engine()


def singular(phrase: str) -> str:
    """The phrase with its last word (the head noun) in the singular."""
    if not phrase:
        return phrase
    *rest, head = phrase.split()
    single = _inflect().singular_noun(head) if not head.isdigit() else False
    return " ".join([*rest, single or head])


def concept_id(normal_form: str) -> str:
    return hashlib.sha256(normal_form.encode()).hexdigest()[:16]


def pair_id(image_id: str, concept: str) -> str:
    """The id of an (image, concept) pair, shared by `candidates` and `pairs`."""
    return hashlib.sha256(f"{image_id}\0{concept}".encode()).hexdigest()[:24]


@cache
def _tokenizer():
    return clip_tokenizer.offline_clip_tokenizer(TEXT_CONTEXT)


def token_count(phrase: str) -> int:
    """Tokens SAM 3's CLIP tokenizer gives the phrase, start and end tokens included."""
    return len(_tokenizer().backend_tokenizer.encode(phrase).ids)


@dataclass(frozen=True)
class Concept:
    name: str
    """The normal form: the phrase given to the model."""
    synonyms: tuple[str, ...] = ()
    parent: str | None = None
    ancestors: tuple[str, ...] = ()
    """The parent, its parent, and so on."""
    sources: tuple[str, ...] = ()

    @property
    def concept_id(self) -> str:
        return concept_id(self.name)


@dataclass
class Ontology:
    """Concepts with synonyms and parents: collapses synonyms, and relates concepts for hard negatives."""

    concepts: dict[str, Concept] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    """Normal form of every name and synonym -> the concept's name."""
    digest: str = "empty"
    """Hash of the ontology's content, part of every unit fingerprint that depends on it."""
    _index: tuple | None = field(default=None, repr=False)

    @classmethod
    def load(cls, source: str | None, text: str | None = None) -> Ontology:
        """``builtin`` (COCO + LVIS), a YAML/JSON file's ``text``, or None for an empty ontology."""
        if source is None:
            return cls()
        if source == BUILTIN:
            text = resources.files("sam3_engine.data").joinpath("ontology.json").read_text()
        try:
            data = json.loads(text) if source.endswith(".json") or source == BUILTIN else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{source}: not valid YAML/JSON: {exc}") from exc
        entries = data.get("concepts", []) if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ValueError(f"{source}: expected a list of concepts or a mapping with `concepts:`")
        return cls.from_entries(entries, source, text)

    @classmethod
    def from_entries(cls, entries: list, source: str, text: str) -> Ontology:
        """Concepts from strings or mappings; ``text`` (their source text) gives the digest."""
        ontology = cls(digest=hashlib.sha256(text.encode()).hexdigest()[:16])
        for entry in entries:
            ontology._add(entry, None, source)
        ontology._resolve_ancestors()
        return ontology

    def _add(self, entry, parent: str | None, source: str) -> None:
        """A concept from a plain string or a mapping (name, synonyms, parent, ancestors, sources, children)."""
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{source}: each concept needs a `name`, got {entry!r}")
        # Names and synonyms are kept as spelled (cleaned, not singularised): LVIS's "trunks" (short
        # pants) must not capture "trunk", and plural-only names ("skis") stay as they are.
        name = _clean(entry["name"])
        if not name:
            raise ValueError(f"{source}: empty concept name {entry['name']!r}")
        if name in self.concepts:
            return
        declared_parent = entry.get("parent")
        concept = Concept(
            name=name,
            synonyms=tuple(s for s in (_clean(s) for s in entry.get("synonyms", [])) if s and s != name),
            parent=_clean(declared_parent) if declared_parent else parent,
            ancestors=tuple(_clean(a) for a in entry.get("ancestors", [])),
            sources=tuple(entry.get("sources", ["ontology"] if source == BUILTIN else ["user_ontology"])),
        )
        self.concepts[name] = concept
        for alias in (name, *concept.synonyms):
            self.aliases.setdefault(alias, name)
        for child in entry.get("children", []):
            self._add(child, name, source)

    def _resolve_ancestors(self) -> None:
        """Fill in ancestors from parent links where the file did not list them (user trees)."""
        for name, concept in list(self.concepts.items()):
            if concept.ancestors or concept.parent is None:
                continue
            chain, node = [], concept.parent
            while node is not None and node not in chain:
                chain.append(node)
                node = self.concepts[node].parent if node in self.concepts else None
            self.concepts[name] = Concept(concept.name, concept.synonyms, concept.parent, tuple(chain), concept.sources)

    def merge(self, other: Ontology) -> None:
        """Add ``other``'s concepts and synonyms; where both define a concept, this one's wins."""
        for name, concept in other.concepts.items():
            if name not in self.concepts and name not in self.aliases:
                self.concepts[name] = concept
            for alias in (name, *concept.synonyms):
                self.aliases.setdefault(alias, self.aliases.get(name, name))
        self.digest = hashlib.sha256(f"{self.digest}+{other.digest}".encode()).hexdigest()[:16]
        self._index = None

    def table(self) -> pa.Table:
        """The concepts as rows of (concept_id, phrase, parent, synonyms, sources)."""
        concepts = list(self.concepts.values())
        return pa.table(
            {
                "concept_id": [c.concept_id for c in concepts],
                "phrase": [c.name for c in concepts],
                "parent": [c.parent for c in concepts],
                "synonyms": pa.array([list(c.synonyms) for c in concepts], type=pa.list_(pa.string())),
                "sources": pa.array([list(c.sources) for c in concepts], type=pa.list_(pa.string())),
            }
        )

    def canonical(self, phrase: str) -> str:
        """The normal form of ``phrase`` with synonyms collapsed to the ontology's name."""
        cleaned = _clean(phrase)
        if cleaned in self.aliases:  # plural-only names ("skis", "scissors") before singularising
            return self.aliases[cleaned]
        normal = singular(cleaned)
        return self.aliases.get(normal, normal)

    def relatives(self, name: str) -> list[tuple[str, str]]:
        """(concept, relation) pairs easy to confuse with ``name``; never its ancestors.

        Siblings share its parent. Cousins share its grandparent: as their parent ("bus" for
        "sedan" under cars < vehicles) or as their grandparent.
        """
        concept = self.concepts.get(name)
        if concept is None or concept.parent is None:
            return []
        children, grandchildren = self._family()
        lineage = {name, *concept.ancestors}
        siblings = [(other, "sibling") for other in children.get(concept.parent, ()) if other not in lineage]
        grandparent = concept.ancestors[1] if len(concept.ancestors) > 1 else None
        family = [*children.get(grandparent, ()), *grandchildren.get(grandparent, ())] if grandparent is not None else []
        cousins = [
            (other, "cousin") for other in dict.fromkeys(family) if other not in lineage and self.concepts[other].parent != concept.parent
        ]
        return siblings + cousins

    def _family(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Concepts by parent and by grandparent, built once."""
        if self._index is None:
            children: dict[str, list[str]] = {}
            grandchildren: dict[str, list[str]] = {}
            for concept in self.concepts.values():
                if concept.parent is not None:
                    children.setdefault(concept.parent, []).append(concept.name)
                if len(concept.ancestors) > 1:
                    grandchildren.setdefault(concept.ancestors[1], []).append(concept.name)
            self._index = (children, grandchildren)
        return self._index

    def lineage(self, name: str) -> tuple[str, ...]:
        """The concept's ancestors (a pickup truck is a truck: never a negative for it)."""
        concept = self.concepts.get(name)
        return concept.ancestors if concept else ()


def phrase_lines(text: str) -> list[str]:
    """A plain vocabulary: one phrase per line; blank lines and ``#`` comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def normal_form(phrase: str) -> str:
    """Lower case, no leading articles, possessives or punctuation, head noun singular (no synonym collapse)."""
    return singular(_clean(phrase))


def load_ontology(source: str | None, read_text) -> Ontology:
    """The ontology named by a config value: ``builtin``, None, or a path read with ``read_text(path)``."""
    if source in (None, BUILTIN):
        return Ontology.load(source)
    return Ontology.load(source, read_text(source))


def _pieces(text: str) -> list[str]:
    """``text`` cut into pieces of at most PARSE_WINDOW characters: after a sentence's end where there is one, else between words."""
    pieces, start = [], 0
    while len(text) - start > PARSE_WINDOW:
        window = text[start : start + PARSE_WINDOW]
        sentence_end = max(window.rfind(". "), window.rfind("! "), window.rfind("? "), window.rfind("\n"))
        cut = sentence_end + 1 or window.rfind(" ") + 1 or PARSE_WINDOW
        pieces.append(window[:cut])
        start += cut
    return [*pieces, text[start:]]


def noun_phrases(text: str, ontology: Ontology | None = None) -> list[str]:
    """Noun compounds in ``text``, in their raw spelling; plus each shorter tail that the ontology knows.

    "four paper grocery bags" gives "paper grocery bags" and, if known, "grocery bags" and "bags".
    Leading colour words and adjectives are dropped; nouns that name no concept ("front") are skipped.
    """
    from textblob.en import parse

    found: list[str] = []

    def flush(run: list[tuple[str, str]]) -> None:
        words = [w for w, _ in run]
        while words and words[0].lower() in COLOURS:
            words.pop(0)
        if not words or words[-1].lower() in NOT_CONCEPTS:
            return
        found.append(" ".join(words))
        for start in range(max(1, len(words) - MAX_WORDS), len(words)):  # a longer tail cannot be a concept
            tail = " ".join(words[start:])
            if ontology is not None and ontology.canonical(tail) in ontology.concepts:
                found.append(tail)

    sentences = (sentence for piece in _pieces(text) for sentence in parse(piece, chunks=True, relations=False, lemmata=False).split())
    for sentence in sentences:
        run: list[tuple[str, str]] = []
        for word, tag, chunk, *_ in sentence:
            is_noun = tag.startswith("NN") and chunk.endswith("NP")
            if run and (not is_noun or chunk.startswith("B-") or (run[-1][1] == "NNS" and run[-1][0].lower() not in PLURAL_MODIFIERS)):
                flush(run)
                run = []
            if is_noun:
                run.append((word, tag))
        if run:
            flush(run)
    return found
