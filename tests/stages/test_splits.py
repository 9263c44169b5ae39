"""Split rules on constructed verification tables, run through the real stage, Delta tables and DuckDB."""

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import ConfigError, load_config
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import CANDIDATES, MASK_VERIFICATIONS, PAIR_VERIFICATIONS
from tests.helpers import rows

SAYS = {  # (presence, exhaustivity, accepted masks)
    "positive": ("present", "exhaustive", 1),
    "negative": ("absent", "exhaustive", 0),
    "unsure": ("uncertain", "unknown", 0),
}


def _pair(pair_id, verifier, says, image_id="img-a"):
    presence, exhaustivity, accepted = SAYS[says]
    return {
        "pair_id": pair_id,
        "image_id": image_id,
        "concept_id": f"c-{pair_id}",
        "phrase": f"phrase {pair_id}",
        "presence_probability": 0.5,
        "presence": presence,
        "presence_reason": "signals_agree",
        "accepted_masks": accepted,
        "uncovered_fraction": None,
        "exhaustivity": exhaustivity,
        "exhaustivity_reason": "covered",
        "verifier": verifier,
        "verifier_version": "test",
        "thresholds": "{}",
    }


def _mask(pair_id, verifier, verdict, image_id="img-a"):
    return {
        "mask_id": f"m-{pair_id}-{verdict}",
        "pair_id": pair_id,
        "image_id": image_id,
        "concept_id": f"c-{pair_id}",
        "score": 0.9,
        "verdict": verdict,
        "reasons": [] if verdict == "accept" else ["duplicate"],
        "verifier": verifier,
        "verifier_version": "test",
        "thresholds": "{}",
    }


VOTES = {  # pair: {verifier: says}
    "agree": {"v1": "positive", "v2": "positive"},
    "single": {"v1": "positive", "v2": "unsure"},
    "disagree": {"v1": "positive", "v2": "negative"},
    "absent": {"v1": "negative", "v2": "negative"},
    "human-wins": {"v1": "negative", "human": "positive"},
    "rejected-mask": {"v1": "positive", "v2": "positive"},
    "nobody": {"v1": "unsure", "v2": "unsure"},
}


@pytest.fixture
def judged(tmp_path):
    store = TableStore(str(tmp_path / "run"))
    by_verifier: dict[str, list] = {}
    masks: dict[str, list] = {}
    for pair, votes in VOTES.items():
        for verifier, says in votes.items():
            by_verifier.setdefault(verifier, []).append(_pair(pair, verifier, says))
            if says == "positive":
                masks.setdefault(verifier, []).append(_mask(pair, verifier, "accept"))
    masks["v2"].append(_mask("rejected-mask", "v2", "reject"))  # v2 accepts one mask of the pair and rejects another
    for name in ["neg-hard", "neg-1", "neg-2"]:  # negatives of one image, one of them a hard negative
        for verifier in ("v1", "v2"):
            by_verifier[verifier].append(_pair(name, verifier, "negative", image_id="img-b"))
    for verifier, pairs in by_verifier.items():
        store.replace(PAIR_VERIFICATIONS, verifier, pa.Table.from_pylist(pairs, schema=PAIR_VERIFICATIONS.schema))
    for verifier, pairs in masks.items():
        store.replace(MASK_VERIFICATIONS, verifier, pa.Table.from_pylist(pairs, schema=MASK_VERIFICATIONS.schema))
    candidates = [
        {
            "pair_id": p,
            "image_id": "img-b",
            "concept_id": f"c-{p}",
            "phrase": p,
            "origin": "hard_negative" if p == "neg-hard" else "caption",
            "raw_phrase": None,
            "score": 1.0,
            "related_concept_id": None,
            "relation": None,
            "unit_id": "constructed",
        }
        for p in ("neg-hard", "neg-1", "neg-2")
    ]
    store.replace(CANDIDATES, "constructed", pa.Table.from_pylist(candidates, schema=CANDIDATES.schema))
    return tmp_path / "run"


def _splits(run_dir, **settings):
    result = run_pipeline(load_config(None, {"output": str(run_dir), "stages": "splits", **settings}))
    return {r["pair_id"]: r for r in rows(run_dir, "SELECT * FROM splits")}, result.stages[0]


def test_tiers_follow_the_sources(judged):
    splits, report = _splits(judged, **{"splits.max_negatives_per_image": 2})
    got = {p: (r["tier"], r["kind"], r["reason"]) for p, r in splits.items()}
    assert got == {
        "agree": ("gold", "positive", "agreeing_positive"),
        "single": ("silver", "positive", "single_source_positive"),
        "disagree": ("excluded", None, "sources_disagree"),
        "absent": ("gold", "negative", "agreeing_negative"),
        "human-wins": ("gold", "positive", "human_positive"),
        "rejected-mask": ("silver", "positive", "positive_with_rejected_masks"),
        "nobody": ("excluded", None, "unconfirmed"),
        "neg-hard": ("gold", "negative", "agreeing_negative"),  # the hard negative is kept first
        "neg-1" if splits["neg-1"]["tier"] == "gold" else "neg-2": ("gold", "negative", "agreeing_negative"),
        "neg-2" if splits["neg-1"]["tier"] == "gold" else "neg-1": ("excluded", None, "negative_cap"),
    }
    assert splits["agree"]["sources"] == ["v1", "v2"] and splits["human-wins"]["sources"] == ["human"]
    assert splits["neg-hard"]["hard_negative"] is True and splits["neg-1"]["hard_negative"] is False
    assert report.counts["pairs"] == 10 and report.counts["images_in_two_splits"] == 0
    assert report.counts["excluded"] == {"negative_cap": 1, "sources_disagree": 1, "unconfirmed": 1}


def test_gold_needs_the_configured_number_of_sources(judged):
    splits, _ = _splits(judged, **{"splits.verifiers": ["v1", "human"]})
    assert (splits["agree"]["tier"], splits["agree"]["reason"]) == ("silver", "single_source_positive")
    assert splits["disagree"]["tier"] == "silver"  # without v2 nothing contradicts v1
    one, _ = _splits(judged, **{"splits.gold_min_sources": 1})
    assert one["single"]["tier"] == "gold"


def test_an_image_never_sits_in_two_splits_and_the_deal_follows_the_fractions(tmp_path):
    store = TableStore(str(tmp_path / "run"))
    pairs = [_pair(f"p{i}-{j}", "v1", "positive", image_id=f"image-{i}") for i in range(400) for j in range(3)]
    store.replace(PAIR_VERIFICATIONS, "v1", pa.Table.from_pylist(pairs, schema=PAIR_VERIFICATIONS.schema))
    splits, report = _splits(tmp_path / "run")
    per_image = {}
    for row in splits.values():
        per_image.setdefault(row["image_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in per_image.values()) and report.counts["images_in_two_splits"] == 0
    shares = {name: sum(s == {name} for s in per_image.values()) / 400 for name in ("train", "val", "test")}
    assert abs(shares["train"] - 0.8) < 0.06 and abs(shares["val"] - 0.1) < 0.05 and abs(shares["test"] - 0.1) < 0.05
    again, _ = _splits(tmp_path / "run", **{"splits.salt": "another"})
    assert any(again[p]["split"] != splits[p]["split"] for p in splits)  # another salt, another deal
    same, second = _splits(tmp_path / "run")
    assert {p: r["split"] for p, r in same.items()} == {p: r["split"] for p, r in splits.items()}


def test_splits_run_again_on_unchanged_verdicts_commits_nothing(judged):
    _splits(judged)
    versions = {name: DeltaTable(str(judged / "tables" / name)).version() for name in ("splits", "units")}
    _, again = _splits(judged)
    assert {name: DeltaTable(str(judged / "tables" / name)).version() for name in versions} == versions
    assert again.units_removed == 0


def test_fractions_must_fit():
    with pytest.raises(ConfigError, match="exceeds 1"):
        load_config(None, {"splits.train_fraction": 0.9, "splits.val_fraction": 0.2})
