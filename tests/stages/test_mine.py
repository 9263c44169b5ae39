"""Concept mining on the example photos' captions: normal forms, ontologies, rejects, hard negatives, and proposal on the mined pairs."""

import json
import shutil

import pytest

from sam3_engine.app.pipeline import build_stages, run_pipeline
from sam3_engine.engine.config import ConfigError, StorageConfig, load_config
from sam3_engine.engine.stage import WorkUnit
from sam3_engine.stages.mine import ImageText, MineConfig, MineStage
from sam3_engine.text.concepts import COLOURS, NOT_CONCEPTS, Ontology, concept_id, normal_form, noun_phrases, pair_id
from tests.conftest import EXAMPLES
from tests.helpers import rows


@pytest.fixture(scope="module")
def builtin():
    return Ontology.load("builtin")


@pytest.fixture(scope="module")
def captions():
    return {json.loads(line)["file_name"]: json.loads(line)["caption"] for line in (EXAMPLES / "captions.jsonl").read_text().splitlines()}


def test_captions_give_the_obvious_concepts_and_no_junk(builtin, captions):
    mined = {name: {builtin.canonical(p) for p in noun_phrases(text, builtin)} for name, text in captions.items()}
    assert {"car", "grocery bag", "trunk", "vegetable"} <= mined["groceries.jpg"]
    assert {"pickup truck", "truck", "wall", "canopy"} <= mined["truck.jpg"]
    assert {"child", "basketball court", "sports bib", "building"} <= mined["test_image.jpg"]
    for concept in set().union(*mined.values()):
        words = concept.split()
        assert concept == concept.lower() and words[0] not in {"a", "an", "the"}
        assert not set(words) <= COLOURS, concept
        assert concept not in NOT_CONCEPTS, concept
    assert "front" not in set().union(*mined.values())


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("The children's bibs", "children bib"),
        ("a car's  wheels!", "car wheel"),
        ("Buses", "bus"),
        ("geese", "goose"),
        ("  the  ", "the"),
        ("Pickup  Truck", "pickup truck"),
        ("café tables", "café table"),
        ("--", ""),
        ("- close--up -", "close-up"),
    ],
)
def test_normal_form(raw, normal):
    assert normal_form(raw) == normal


def test_the_builtin_ontology_collapses_synonyms_and_knows_parents(builtin):
    assert len(builtin.concepts) >= 1203 + 10
    assert builtin.canonical("automobiles") == builtin.canonical("Car") == "car"
    assert builtin.canonical("skis") == "skis"  # a plural-only name is not singularised away
    assert builtin.canonical("trunk") == "trunk"  # LVIS's "trunks" (short pants) does not capture it
    coco = [c for c in builtin.concepts.values() if "coco" in c.sources]
    assert len(coco) == 80 and all(c.parent for c in coco)
    assert builtin.concepts["pickup truck"].parent == "truck"
    relatives = dict(builtin.relatives("pickup truck"))
    assert relatives["tow truck"] == "sibling" and "truck" not in relatives and "pickup truck" not in relatives


def test_a_user_ontology_tree_with_synonyms_and_children(tmp_path):
    text = """
concepts:
  - name: Vehicles
    children:
      - name: cars
        synonyms: [automobile, auto]
        children: [sedan, hatchback]
      - bus
  - name: animal
    children: [dog, cat]
"""
    ontology = Ontology.load("tree.yaml", text)
    assert set(ontology.concepts) == {"vehicles", "cars", "sedan", "hatchback", "bus", "animal", "dog", "cat"}
    assert ontology.canonical("Automobiles") == "cars"
    assert ontology.concepts["sedan"].ancestors == ("cars", "vehicles")
    assert dict(ontology.relatives("sedan")) == {"hatchback": "sibling", "bus": "cousin"}
    assert dict(ontology.relatives("dog")) == {"cat": "sibling"}
    with pytest.raises(ValueError, match="name"):
        Ontology.load("bad.yaml", "- {synonyms: [x]}")


def test_bad_run_level_phrases_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        MineStage(MineConfig(phrases=("--",)), StorageConfig())
    with pytest.raises(ConfigError, match="32-token"):
        MineStage(MineConfig(phrases=(" ".join(["word"] * 40),)), StorageConfig())
    with pytest.raises(ConfigError, match="no file"):
        MineStage(MineConfig(vocabulary=str(tmp_path / "missing.txt")), StorageConfig())


@pytest.fixture(scope="module")
def mined_run(photos_dir, tmp_path_factory):
    """Ingest and mine the photos from a manifest with captions, per-image phrases (one empty, one too long) and a vocabulary.
    Shared by the module: read-only (a test that runs stages on it copies it)."""
    folder = tmp_path_factory.mktemp("mine")
    captions = {
        json.loads(line)["file_name"]: json.loads(line)["caption"] for line in (EXAMPLES / "captions.jsonl").read_text().splitlines()
    }
    extra = {"truck.jpg": ["wheels", "--", " ".join(["very"] * 40) + " long thing"], "groceries.jpg": ["Grocery Bags"]}
    manifest = folder / "manifest.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"uri": str(photos_dir / name), "caption": text, "phrases": extra.get(name, [])}) for name, text in captions.items()
        )
    )
    (folder / "vocabulary.txt").write_text("# asked everywhere\nsky\nautomobile\n")
    run_dir = folder / "run"
    config = load_config(
        None,
        {
            "input": str(manifest),
            "output": str(run_dir),
            "stages": "ingest,mine,negatives",
            "mine.vocabulary": str(folder / "vocabulary.txt"),
            "mine.phrases": ["Person"],
            "negatives.max_per_image": 12,
        },
    )
    return run_dir, run_pipeline(config)


def test_mined_candidates_have_their_origins_and_bad_phrases_are_rejected(mined_run):
    run_dir, result = mined_run
    candidates = rows(run_dir, "SELECT i.uri, c.* FROM candidates c JOIN images i USING (image_id) WHERE origin <> 'hard_negative'")
    by_image = {}
    for c in candidates:
        by_image.setdefault(c["uri"].rsplit("/", 1)[1], {}).setdefault(c["origin"], set()).add(c["phrase"])
        assert c["concept_id"] == concept_id(c["phrase"]) and c["pair_id"] == pair_id(c["image_id"], c["concept_id"])
    for origins in by_image.values():
        assert origins["vocabulary"] == {"sky", "car"}  # "automobile" collapses to the ontology's "car"
        assert "person" in origins["user"]
    assert "wheel" in by_image["truck.jpg"]["user"] and "grocery bag" in by_image["groceries.jpg"]["user"]
    assert "grocery bag" in by_image["groceries.jpg"]["caption"]
    rejects = rows(run_dir, "SELECT reason, detail FROM rejects WHERE stage = 'mine' ORDER BY reason")
    assert [r["reason"] for r in rejects] == ["empty_phrase", "phrase_too_long"]
    mine = result.stages[1]
    assert mine.counts["reject_reasons"] == {"empty_phrase": 1, "phrase_too_long": 1}
    assert mine.counts["images"] == 3 and mine.counts["pairs"] == len({(c["image_id"], c["concept_id"]) for c in candidates})
    assert mine.counts["most_frequent"][:3] == ["car (3)", "person (3)", "sky (3)"]  # the vocabulary and run phrases are on every image
    assert len(mine.counts["least_frequent"]) == 5 and all(entry.endswith("(1)") for entry in mine.counts["least_frequent"])


def test_concepts_table_holds_the_ontology_and_every_mined_concept(mined_run):
    run_dir, _ = mined_run
    concepts = {c["phrase"]: c for c in rows(run_dir, "SELECT * FROM concepts")}
    assert len(concepts) >= 1203
    assert concepts["pickup truck"]["parent"] == "truck" and "caption" in concepts["pickup truck"]["sources"]
    assert "lvis" in concepts["pickup truck"]["sources"]
    assert concepts["grocery bag"]["spellings"] == ["Grocery Bags", "grocery bags"]
    assert concepts["wall"]["parent"] is None and concepts["wall"]["sources"] == ["caption"]
    assert all(c["concept_id"] == concept_id(phrase) for phrase, c in concepts.items())
    mined = rows(run_dir, "SELECT DISTINCT concept_id FROM candidates EXCEPT SELECT concept_id FROM concepts")
    assert mined == []


def test_hard_negatives_are_absent_relatives_of_present_concepts(mined_run, builtin):
    run_dir, result = mined_run
    present = {}
    for c in rows(run_dir, "SELECT image_id, phrase FROM candidates WHERE origin <> 'hard_negative'"):
        present.setdefault(c["image_id"], set()).add(c["phrase"])
    negatives = rows(
        run_dir,
        "SELECT c.*, r.phrase AS related FROM candidates c JOIN concepts r ON "
        "r.concept_id = c.related_concept_id WHERE origin = 'hard_negative'",
    )
    assert negatives, "the photos' concepts have relatives in the ontology"
    counts = {}
    for n in negatives:
        here = present[n["image_id"]]
        assert n["phrase"] not in here and builtin.canonical(n["phrase"]) not in here
        assert all(n["phrase"] not in builtin.lineage(p) for p in here), "an ancestor of a present concept is present"
        assert n["related"] in here and dict(builtin.relatives(n["related"]))[n["phrase"]] == n["relation"]
        counts[n["image_id"]] = counts.get(n["image_id"], 0) + 1
    assert max(counts.values()) == 12
    assert result.stages[2].counts["hard_negatives"] == len(negatives)


def test_a_rerun_skips_every_mining_unit(mined_run, tmp_path):
    run_dir = tmp_path / "run"  # a run of its own: the module's run stays as its other tests read it
    shutil.copytree(mined_run[0], run_dir)
    config = load_config(
        None,
        {
            "output": str(run_dir),
            "stages": "mine,negatives",
            "mine.vocabulary": str(mined_run[0].parent / "vocabulary.txt"),
            "mine.phrases": ["Person"],
            "negatives.max_per_image": 12,
        },
    )
    before = rows(run_dir, "SELECT * EXCLUDE (unit_id) FROM candidates ORDER BY pair_id, origin")
    again = run_pipeline(config)
    assert all(stage.units_committed == 0 and stage.units_skipped == stage.units_total for stage in again.stages)
    assert rows(run_dir, "SELECT * EXCLUDE (unit_id) FROM candidates ORDER BY pair_id, origin") == before


def test_propose_asks_each_image_its_mined_concepts(mined_run, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(mined_run[0], run_dir)
    config = load_config(None, {"output": str(run_dir), "stages": "propose", "model.name": "tiny-random", "propose.unit_size": 2})
    (stage,) = build_stages(config, "test")
    assert stage.phrases == ()
    result = run_pipeline(config)
    expected = rows(run_dir, "SELECT DISTINCT pair_id, phrase FROM candidates ORDER BY pair_id")
    assert rows(run_dir, "SELECT pair_id, phrase FROM pairs ORDER BY pair_id") == expected
    counts = result.stages[0].counts
    assert counts["hard_negative_pairs"] == rows(run_dir, "SELECT count(*) AS n FROM candidates WHERE origin = 'hard_negative'")[0]["n"]
    assert counts["hard_negatives_fired"] == len(
        rows(run_dir, "SELECT * FROM pairs p JOIN candidates c USING (pair_id) WHERE origin = 'hard_negative' AND instance_count > 0")
    )


def test_propose_phrases_are_added_to_the_mined_concepts_not_put_in_their_place(mined_run, ray_cluster, tmp_path):
    """Both stages derive the concepts table: propose's phrases once replaced mine's whole ontology (1,280 concepts -> 1)."""
    run_dir = tmp_path / "run"
    shutil.copytree(mined_run[0], run_dir)
    mined = {r["concept_id"]: r for r in rows(run_dir, "SELECT * FROM concepts")}
    known = next(r["phrase"] for r in mined.values() if "caption" in r["sources"])
    settings = {"output": str(run_dir), "stages": "propose", "model.name": "tiny-random", "propose.unit_size": 4}
    for asked in ([known, "sky"], [known, "blue widget"]):  # asked again with other phrases: the earlier ones are not left marked
        run_pipeline(load_config(None, {**settings, "propose.phrases": asked}))
        after = {r["concept_id"]: r for r in rows(run_dir, "SELECT * FROM concepts")}
        assert set(after) == set(mined) | {concept_id(p) for p in asked}  # every mined concept stays, the new one is added
        asked_ids = {concept_id(p) for p in asked}
        for cid, row in after.items():
            if cid not in mined:
                assert row["sources"] == ["propose.phrases"], row["phrase"]
                continue
            assert sorted(row["sources"]) == sorted({*mined[cid]["sources"], *(["propose.phrases"] if cid in asked_ids else [])})
            assert (row["phrase"], row["parent"], row["synonyms"]) == (mined[cid]["phrase"], mined[cid]["parent"], mined[cid]["synonyms"])


def test_a_long_noun_run_is_mined_in_linear_time_and_gives_its_compound_and_known_tails(builtin):
    """Only tails that fit SAM 3's text context are looked at: 24k words of "car" once took over a minute."""
    found = noun_phrases("car " * 24_000, builtin)
    assert set(found) == {"car", " ".join(["car"] * 500)}  # parsed in pieces of 2,000 characters, 500 words each


def test_a_1mb_caption_is_mined_up_to_the_cap_and_the_cut_is_a_reject(photos_dir, tmp_path):
    """A 1 MB caption without punctuation stalled mining for hours; now its first mine.max_caption_chars are mined."""
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        {"uri": str(photos_dir / "truck.jpg"), "caption": "car " * 262_144},  # 1 MB
        {"uri": str(photos_dir / "groceries.jpg"), "caption": "bags"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    run_dir = tmp_path / "run"
    result = run_pipeline(load_config(None, {"input": str(manifest), "output": str(run_dir), "stages": "ingest,mine"}))
    (reject,) = rows(run_dir, "SELECT r.detail, i.uri FROM rejects r JOIN images i USING (image_id) WHERE reason = 'caption_truncated'")
    assert reject["uri"].endswith("truck.jpg")  # the caption is stored stripped: 1,048,575 characters
    assert reject["detail"] == (
        "1048575 characters of captions and alt texts: the first 10000 mined, 1038575 left out (mine.max_caption_chars = 10000)"
    )
    mined = rows(run_dir, "SELECT i.uri, c.phrase FROM candidates c JOIN images i USING (image_id) WHERE origin = 'caption' ORDER BY uri")
    assert [(r["uri"].rsplit("/", 1)[1], r["phrase"]) for r in mined] == [("groceries.jpg", "bag"), ("truck.jpg", "car")]
    assert result.stages[1].counts["reject_reasons"] == {"caption_truncated": 1, "phrase_too_long": 1}  # "car car ...": 500 words


def test_the_caption_cap_is_configurable_and_cuts_between_words():
    stage = MineStage(MineConfig(max_caption_chars=14, ontology=None), StorageConfig())
    image = ImageText("img", "photo.jpg", ("grocery bags in a car trunk", "a dog"), ())
    tables = stage.process(WorkUnit("unit", (image,)))
    assert tables["candidates"].column("phrase").to_pylist() == ["grocery bag"]
    (reject,) = tables["rejects"].to_pylist()
    assert reject["reason"] == "caption_truncated" and "the first 13 mined, 19 left out (mine.max_caption_chars = 14)" in reject["detail"]


def test_per_image_phrases_one_letter_each_are_concepts_and_blank_or_dash_ones_are_rejected():
    """ "a;b;c" gave only b and c (the article "a" was dropped), and "--" became a concept."""
    stage = MineStage(MineConfig(ontology=None), StorageConfig())
    tables = stage.process(WorkUnit("unit", (ImageText("img", "photo.jpg", (), ("a", "b", "c", "--", "")),)))
    assert sorted(tables["candidates"].column("phrase").to_pylist()) == ["a", "b", "c"]
    rejects = sorted((r["reason"], r["detail"]) for r in tables["rejects"].to_pylist())
    assert rejects == [("empty_phrase", "user phrase ''"), ("empty_phrase", "user phrase '--'")]
