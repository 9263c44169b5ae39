"""The VLM verifier, on the photo with hand-drawn proposals of ``test_verify``.

The stage runs for real (a tiny random-weight Idefics3 on a Ray actor); where a test needs known answers it
sets them in the stored answer tables, as a real VLM would have written them, and everything downstream
(the SQL verdicts, splits, calibrate) judges them.
"""

import shutil

import pyarrow as pa
import pytest

from sam3_engine.app.calibration import calibrate
from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.catalog import connect
from sam3_engine.engine.config import ConfigError, load_config
from sam3_engine.engine.store import TableStore
from tests.helpers import rewrite, rows
from tests.stages.test_verify import SETTINGS, _construct

BOTH = {**SETTINGS, "verify_vlm.model": "tiny-random"}


def _run(run_dir, stages, **settings):
    return run_pipeline(load_config(None, {"output": str(run_dir), "stages": stages, **BOTH, **settings}))


@pytest.fixture(scope="module")
def judged(ray_cluster, photos_dir, tmp_path_factory):
    """The constructed photo through both verifiers and splits, once: read-only (``own_judged`` for a copy)."""
    run_dir = tmp_path_factory.mktemp("vlm") / "run"
    _, masks, _ = _construct(photos_dir, tmp_path_factory.mktemp("photo"), run_dir)
    return run_dir, masks, _run(run_dir, "verify,verify_vlm,splits")


@pytest.fixture()
def own_judged(judged, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(judged[0], run_dir)
    return run_dir, judged[1]


def _pair_ids(run_dir):
    return {r["phrase"]: r["pair_id"] for r in rows(run_dir, "SELECT phrase, pair_id FROM pairs")}


def _answer(run_dir, presence=None, exhaustive=None, whole=None):
    """Store these answers (phrase or mask name: P(yes)) as the VLM's."""
    ids = _pair_ids(run_dir)
    if presence:
        rewrite(run_dir, "vlm_pair_scores", "presence_yes", "pair_id", {ids[p]: v for p, v in presence.items()})
    if exhaustive:
        rewrite(run_dir, "vlm_pair_scores", "exhaustive_yes", "pair_id", {ids[p]: v for p, v in exhaustive.items()})
    if whole:
        rewrite(run_dir, "vlm_mask_scores", "whole_yes", "mask_id", whole)


def test_every_pair_and_mask_gets_one_answer_and_one_verdict_beside_the_first_verifiers(judged):
    run_dir, masks, result = judged
    report = {stage.name: stage for stage in result.stages}["verify_vlm"]
    answers = {r["mask_id"]: r["whole_yes"] for r in rows(run_dir, "SELECT mask_id, whole_yes FROM vlm_mask_scores")}
    assert set(answers) == set(masks) and all(0.0 < p < 1.0 for p in answers.values())
    drawn = {phrase: sum(p == phrase for p, _, _ in masks.values()) for phrase in _pair_ids(run_dir)}
    pairs = rows(run_dir, "SELECT p.phrase, s.* FROM vlm_pair_scores AS s JOIN pairs AS p USING (pair_id)")
    assert {p["phrase"]: p["masks_shown"] for p in pairs} == drawn
    assert all((p["exhaustive_yes"] is None) == (p["masks_shown"] == 0) for p in pairs)
    assert all(0.0 < p["presence_yes"] < 1.0 and p["verifier_version"] == "1;vlm=tiny-random" for p in pairs)
    assert rows(run_dir, "SELECT verifier, count(*) AS n FROM mask_verifications GROUP BY ALL ORDER BY ALL") == [
        {"verifier": "sam3-clip", "n": 8},
        {"verifier": "vlm", "n": 8},
    ]
    assert rows(run_dir, "SELECT verifier, count(*) AS n FROM pair_verifications GROUP BY ALL ORDER BY ALL") == [
        {"verifier": "sam3-clip", "n": 8},
        {"verifier": "vlm", "n": 8},
    ]
    assert report.counts["pairs"] == 8 and report.counts["masks"] == 8 and report.counts["random_weights"] is True
    assert sum(report.counts["mask_verdicts"].values()) == 8
    assert any("VLM tiny-random" in notice and "meaningless" in notice for notice in result.notices)


def test_verdicts_follow_the_answers_and_retune_in_sql_without_a_model(own_judged):
    run_dir, masks = own_judged
    _answer(
        run_dir,
        presence={"car": 0.9, "giraffe": 0.1, "dog": 0.5, "person": 0.6},
        exhaustive={"car": 0.2, "person": 0.6},
        whole={"clean": 0.9, "duplicate": 0.4, "conflict": 0.5, "person": 0.6},
    )
    mask_verdicts = {r["mask_id"]: (r["verdict"], r["reasons"]) for r in rows(run_dir, "SELECT * FROM vlm_mask_verdicts()")}
    assert {name: mask_verdicts[name] for name in ("clean", "duplicate", "conflict", "person")} == {
        "clean": ("accept", []),
        "duplicate": ("reject", ["vlm_not_whole"]),
        "conflict": ("uncertain", ["vlm_unsure"]),
        "person": ("accept", []),  # the defaults' edges belong to the verdict they name
    }
    con = connect(str(run_dir))
    con.execute("CREATE TEMP TABLE mv AS SELECT * FROM vlm_mask_verdicts()")
    verdicts = con.sql("SELECT phrase, presence, exhaustivity_reason FROM vlm_pair_verdicts(mask_table := 'mv')").fetchall()
    con.close()
    pairs = {phrase: (presence, reason) for phrase, presence, reason in verdicts}
    assert pairs["car"] == ("present", "vlm_instances_missing")
    assert pairs["person"] == ("present", "covered")
    assert pairs["dog"] == ("uncertain", "presence_uncertain")
    assert pairs["giraffe"] == ("absent", "absent_without_masks")
    # the stage re-derives its verdicts at new thresholds from the stored answers: no unit runs, no model loads
    result = _run(run_dir, "verify_vlm", **{"verify_vlm.accept_threshold": 0.95, "verify_vlm.present_threshold": 0.95})
    assert result.stages[0].units_committed == 0
    stored = {r["mask_id"]: r["verdict"] for r in rows(run_dir, "SELECT mask_id, verdict FROM mask_verifications WHERE verifier = 'vlm'")}
    assert stored["clean"] == "uncertain" and stored["duplicate"] == "reject"
    (car,) = rows(run_dir, "SELECT presence, thresholds FROM pair_verifications WHERE verifier = 'vlm' AND phrase = 'car'")
    assert car["presence"] == "uncertain" and '"present_threshold": 0.95' in car["thresholds"]


def test_two_agreeing_verifiers_make_gold_without_a_person_and_a_disagreeing_one_excludes(own_judged):
    run_dir, _ = own_judged
    # the CLIP verifier confirms "motor vehicle" (its one mask accepted, nothing uncovered) and the absent giraffe
    _answer(run_dir, presence={"motor vehicle": 0.9, "giraffe": 0.1}, exhaustive={"motor vehicle": 0.9}, whole={"related": 0.9})
    result = _run(run_dir, "verify_vlm,splits", **{"verify_vlm.present_threshold": 0.65})  # a new threshold: verdicts re-derived
    assert {s.name: s for s in result.stages}["splits"].counts["gold_from_random_weights"] == 2  # the summary says what it is worth
    tiers = {r["phrase"]: r for r in rows(run_dir, "SELECT phrase, tier, kind, reason, sources FROM splits")}
    assert tiers["motor vehicle"] | {"phrase": None} == {
        "phrase": None,
        "tier": "gold",
        "kind": "positive",
        "reason": "agreeing_positive",
        "sources": ["sam3-clip", "vlm"],
    }
    assert (tiers["giraffe"]["tier"], tiers["giraffe"]["reason"], tiers["giraffe"]["sources"]) == (
        "gold",
        "agreeing_negative",
        ["sam3-clip", "vlm"],
    )
    # one verifier alone is Silver
    _run(run_dir, "splits", **{"splits.verifiers": ["sam3-clip"]})
    alone = {r["phrase"]: (r["tier"], r["reason"]) for r in rows(run_dir, "SELECT phrase, tier, reason FROM splits")}
    assert alone["motor vehicle"] == ("silver", "single_source_positive")
    # the VLM rejecting the mask and saying absent is a negative against the CLIP verifier's positive
    _answer(run_dir, presence={"motor vehicle": 0.1}, whole={"related": 0.1})
    _run(run_dir, "verify_vlm,splits", **{"verify_vlm.present_threshold": 0.7})
    (pair,) = rows(run_dir, "SELECT tier, reason FROM splits WHERE phrase = 'motor vehicle'")
    assert pair == {"tier": "excluded", "reason": "sources_disagree"}


def test_calibrate_fits_the_vlms_thresholds_as_its_own_section(own_judged):
    run_dir, _ = own_judged
    _answer(run_dir, whole={"clean": 0.9, "related": 0.8, "person": 0.7, "duplicate": 0.65, "conflict": 0.3, "tiny": 0.2})
    truth = {"clean": True, "related": True, "person": True, "duplicate": False, "conflict": False, "tiny": False}
    labels = pa.table({"mask_id": list(truth), "good": list(truth.values())})
    report = calibrate(TableStore(str(run_dir)), labels, "vlm", target_precision=1.0)
    assert report["config_section"] == "verify_vlm"
    assert report["thresholds"]["accept_threshold"] == pytest.approx(0.7)  # the lowest answer of a good mask, above every bad one
    assert report["thresholds"]["reject_threshold"] == pytest.approx(0.65)  # the highest answer of a bad mask, below every good one
    assert {v["verifier"] for v in report["verdicts"]} == {"sam3-clip", "vlm"}
    config = load_config(None, {f"verify_vlm.{key}": value for key, value in report["thresholds"].items()})
    assert config.verify_vlm.thresholds().items() >= report["thresholds"].items()
    assert calibrate(TableStore(str(run_dir)), labels, "sam3-clip", 1.0)["config_section"] == "verify"


def test_crossed_thresholds_and_unknown_keys_are_config_errors():
    with pytest.raises(ConfigError, match="reject_threshold"):
        load_config(None, {"verify_vlm.reject_threshold": 0.9, "verify_vlm.accept_threshold": 0.5})
    with pytest.raises(ConfigError, match="not_exhaustive_threshold"):
        load_config(None, {"verify_vlm.not_exhaustive_threshold": 0.9})
    with pytest.raises(ConfigError, match="verify_vlm.verifier"):
        load_config(None, {"verify_vlm.verifier": "vlm'; DROP TABLE pairs; --"})


def test_a_verifier_name_taken_by_another_verifier_or_by_people_is_refused_before_any_work(own_judged):
    run_dir, _ = own_judged
    before = rows(run_dir, "SELECT verifier, verifier_version, count(*) AS n FROM mask_verifications GROUP BY ALL ORDER BY ALL")
    with pytest.raises(ConfigError, match="verify_vlm.verifier: 'sam3-clip' is also verify.verifier"):
        _run(run_dir, "verify_vlm,splits", **{"verify_vlm.verifier": "sam3-clip"})
    with pytest.raises(ConfigError, match="verify.verifier: 'vlm' is also verify_vlm.verifier"):
        _run(run_dir, "verify", **{"verify.verifier": "vlm"})
    with pytest.raises(ConfigError, match="verify_vlm.verifier: 'label-studio' is one of splits.human_verifiers"):
        _run(run_dir, "verify_vlm", **{"verify_vlm.verifier": "label-studio"})
    after = rows(run_dir, "SELECT verifier, verifier_version, count(*) AS n FROM mask_verifications GROUP BY ALL ORDER BY ALL")
    assert after == before and {r["verifier"] for r in after} == {"sam3-clip", "vlm"}


def test_an_image_gone_before_verification_is_a_reject_and_the_run_reconciles(ray_cluster, photos_dir, tmp_path):
    run_dir = tmp_path / "run"
    _construct(photos_dir, tmp_path / "photo", run_dir)
    (tmp_path / "photo" / "truck.jpg").unlink()
    report = _run(run_dir, "verify_vlm").stages[0]
    assert report.items_total == 1 and report.counts["reject_reasons"] == {"image_unreadable": 1}
    (reject,) = rows(run_dir, "SELECT reason, uri FROM rejects WHERE stage = 'verify_vlm'")
    assert reject["reason"] == "image_unreadable" and reject["uri"].endswith("truck.jpg")
    assert rows(run_dir, "SELECT count(*) AS n FROM vlm_pair_scores") == [{"n": 0}]
