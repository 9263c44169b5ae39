"""Verification with known answers.

The verifier's inputs are constructed (masks drawn on a real photo, SAM 3 presence scores chosen);
everything that judges them is real: the verify stage with a tiny random-weight CLIP on Ray, the
stored Delta tables, and the SQL verdict macros in DuckDB. CLIP's random opinions are kept out of
the verdicts here (``clip_weight`` 0, ``min_clip_margin`` -2), except where a test checks them.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_engine.app.calibration import Signal, calibrate, fit_threshold
from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.catalog import connect, uncovered_fraction
from sam3_engine.engine.config import MASK_REASONS, VERDICT_THRESHOLDS, ConfigError, load_config
from sam3_engine.engine.runner import KILL_AFTER_COMMITS_ENV
from sam3_engine.engine.store import TableStore
from sam3_engine.metrics.mask_checks import geometry, masked_crop, overlaps
from sam3_engine.models.clip import ClipEmbedder, choose_clip, input_size
from sam3_engine.schemas.tables import MASK_SCORES, MASKS, PAIR_SCORES, PAIRS, UNITS
from sam3_engine.stages.verify import VERSION, VerifyConfig, VerifyStage
from sam3_engine.text.concepts import concept_id, pair_id
from tests.helpers import ingest, rows

UNIT = "constructed"


def _box(shape, top, left, height, width):
    mask = np.zeros(shape, bool)
    mask[top : top + height, left : left + width] = True
    return mask


def _blobs(shape, count, size):
    mask = np.zeros(shape, bool)
    for i in range(count):
        top, left = 100 + (i // 4) * 3 * size, 100 + (i % 4) * 3 * size
        mask[top : top + size, left : left + size] = True
    return mask


def _counts(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def test_geometry_of_constructed_masks():
    shape = (200, 300)
    clean = geometry(_box(shape, 50, 60, 40, 80))
    assert (clean.fragments, clean.largest_fragment_fraction, clean.border_fraction) == (1, 1.0, 0.0)
    assert clean.area_fraction == pytest.approx(40 * 80 / (200 * 300))
    pieces = geometry(_blobs((400, 400), 10, 5))
    assert pieces.fragments == 10 and pieces.largest_fragment_fraction == pytest.approx(0.1)
    diagonal = np.eye(50, dtype=bool)  # touching corners: one piece when 8-connected
    assert geometry(diagonal).fragments == 1
    frame = np.ones(shape, bool)
    frame[5:-5, 5:-5] = False
    hugging = geometry(frame)
    assert hugging.border_fraction == 1.0 and hugging.fragments == 1
    empty = geometry(np.zeros(shape, bool))
    assert (empty.area_fraction, empty.fragments, empty.largest_fragment_fraction) == (0.0, 0, 0.0)


def test_overlaps_find_duplicates_in_a_pair_and_conflicts_only_between_unrelated_pairs():
    shape = (100, 100)
    masks = {
        "a": ("car", 0.9, _box(shape, 10, 10, 40, 40)),
        "b": ("car", 0.8, _box(shape, 12, 10, 40, 40)),  # the same car again, lower score
        "c": ("bus", 0.7, _box(shape, 10, 12, 40, 40)),  # the car's region, claimed by an unrelated phrase
        "d": ("motor vehicle", 0.6, _box(shape, 10, 10, 40, 40)),  # the car's region, by its ancestor: allowed
        "e": ("bus", 0.95, _box(shape, 70, 70, 20, 20)),
    }
    ids = list(masks)
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for _, _, m in masks.values()]
    duplicates, conflicts = overlaps(
        ids, [p for p, _, _ in masks.values()], [s for _, s, _ in masks.values()], rles, lambda a, b: {a, b} != {"car", "motor vehicle"}
    )
    found = {i: (d.other, round(d.iou, 3), c.other, round(c.iou, 3)) for i, d, c in zip(ids, duplicates, conflicts, strict=True)}
    iou_ab = 38 * 40 / (42 * 40)
    assert found["a"] == (None, 0.0, None, 0.0)  # the best mask loses to nothing
    assert found["b"][:2] == ("a", round(iou_ab, 3))
    assert found["c"][0] is None and found["c"][2] == "a"
    assert found["d"][2] == "c"  # not the car (related) but the bus above it
    assert found["e"] == (None, 0.0, None, 0.0)


def test_masked_crop_fills_outside_the_mask_and_is_a_centred_square():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    mask = _box((100, 200), 40, 50, 10, 60)
    crop = masked_crop(image, mask, (50, 40, 60, 10), padding=0.1, size=36)  # 72 x 22 px with padding, scaled by 1/2
    pixels = np.asarray(crop)
    assert crop.size == (36, 36)
    assert (pixels[18, 18] == 255).all() and tuple(pixels[18, 1]) == (124, 116, 104) and tuple(pixels[0, 18]) == (124, 116, 104)
    assert masked_crop(image, np.zeros((100, 200), bool), (0, 0, 0, 0), 0.1, 36) is None


def test_fit_threshold_takes_the_highest_recall_at_the_target_precision():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    truth = np.array([True, True, False, True, False, False])
    assert fit_threshold(scores, truth, 1.0, at_least=True) == (0.8, 1.0, 2 / 3)
    assert fit_threshold(scores, truth, 0.75, at_least=True) == (0.6, 0.75, 1.0)
    assert fit_threshold(scores, ~truth, 1.0, at_least=False) == (0.5, 1.0, 2 / 3)
    tied = fit_threshold(np.array([0.5, 0.5, 0.4]), np.array([True, False, True]), 1.0, at_least=True)
    assert tied is None  # a threshold cannot split equal scores
    assert fit_threshold(scores, np.zeros(6, bool), 0.5, at_least=True) is None


def test_config_rejects_unknown_reasons_and_crossed_thresholds():
    with pytest.raises(ConfigError, match="unknown reason"):
        load_config(None, {"verify.reject_reasons": ["too_small", "ugly"]})
    with pytest.raises(ConfigError, match="must not exceed present_threshold"):
        load_config(None, {"verify.absent_threshold": 0.7})


SETTINGS = {"clip.model": "tiny-random", "verify.clip_weight": 0.0, "verify.min_clip_margin": -2.0}
VERIFY_TABLES = ("mask_scores", "pair_scores", "mask_verifications", "pair_verifications")


def _construct(photos_dir, folder, run_dir):
    """One real photo with proposals drawn by hand, each built to trip exactly one check."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truck.jpg").write_bytes((photos_dir / "truck.jpg").read_bytes())
    ingest(folder, run_dir)
    (image,) = rows(run_dir, "SELECT image_id, width, height FROM images")
    shape = (image["height"], image["width"])
    car = _box(shape, 300, 400, 300, 500)
    person = _box(shape, 700, 1200, 200, 100)
    masks = {  # name: (phrase, score, mask)
        "clean": ("car", 0.9, car),
        "duplicate": ("car", 0.8, _box(shape, 305, 400, 300, 500)),
        "conflict": ("bus", 0.7, _box(shape, 300, 405, 300, 500)),
        "related": ("motor vehicle", 0.75, car),  # above the bus, so only the car outranks it
        "fragmented": ("dog", 0.9, _blobs(shape, 12, 20)),
        "tiny": ("cup", 0.9, _box(shape, 50, 50, 3, 3)),
        "border": ("sky", 0.9, ~_box(shape, 4, 4, shape[0] - 8, shape[1] - 8)),
        "person": ("person", 0.9, person),
    }
    foregrounds = {"car": car, "person": _box(shape, 600, 1000, 500, 600), "dog": _blobs(shape, 12, 20)}
    presence = {"car": 0.95, "bus": 0.9, "motor vehicle": 0.9, "dog": 0.9, "cup": 0.9, "sky": 0.9, "person": 0.95, "giraffe": 0.02}
    pairs = [
        _pair_row(image, phrase, score, sum(p == phrase for p, _, _ in masks.values()), foregrounds.get(phrase))
        for phrase, score in presence.items()
    ]
    mask_rows = [_mask_row(image, name, phrase, score, mask, presence[phrase]) for name, (phrase, score, mask) in masks.items()]
    _store_proposals(run_dir, pairs, mask_rows)
    return image, masks, foregrounds


def _pair_row(image, phrase, presence, instances, foreground=None):
    cid = concept_id(phrase)
    return {
        "pair_id": pair_id(image["image_id"], cid),
        "image_id": image["image_id"],
        "concept_id": cid,
        "phrase": phrase,
        "presence_score": presence,
        "instance_count": instances,
        "max_score": presence,
        "height": image["height"],
        "width": image["width"],
        "foreground_counts": None if foreground is None else _counts(foreground),
        "foreground_area": None if foreground is None else int(foreground.sum()),
        "phrase_truncated": False,
        "model_id": "constructed",
        "model_revision": None,
        "random_weights": False,
        "run_id": "constructed",
        "unit_id": UNIT,
    }


def _mask_row(image, name, phrase, score, mask, presence):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    cid = concept_id(phrase)
    return {
        "mask_id": name,
        "pair_id": pair_id(image["image_id"], cid),
        "image_id": image["image_id"],
        "concept_id": cid,
        "query_index": 0,
        "height": image["height"],
        "width": image["width"],
        "rle_counts": encoded["counts"].decode("ascii"),
        "bbox": mask_utils.toBbox(encoded).tolist(),
        "area": int(mask.sum()),
        "model_box": [0.0, 0.0, 1.0, 1.0],
        "object_score": score,
        "presence_score": presence,
        "score": score,
        "stability_score": 0.95,
        "reprompt_iou": 0.9,
        "unit_id": UNIT,
    }


def _store_proposals(run_dir, pairs, masks):
    store = TableStore(str(run_dir))
    store.replace(PAIRS, UNIT, pa.Table.from_pylist(pairs, schema=PAIRS.schema))
    store.replace(MASKS, UNIT, pa.Table.from_pylist(masks, schema=MASKS.schema))


def _snapshot(run_dir):
    """Every column of the verify tables, and the ledger rows of its units but for when and by which attempt they were committed."""
    snapshot = {table: rows(run_dir, f"SELECT * FROM {table} ORDER BY ALL") for table in VERIFY_TABLES}
    ledger = "SELECT unit_id, stage, num_inputs, rows_written FROM units WHERE starts_with(stage, 'verify') ORDER BY unit_id"
    return {**snapshot, "units": rows(run_dir, ledger)}


UNITS_SETTINGS = {**SETTINGS, "verify.unit_size": 1}
SCENES = 4


def _construct_units(folder, run_dir):
    """Four small images, one verification unit each. Each has the phrases car and bus and one of its own: every unit
    after the first in a process meets one phrase that no unit before it had, the first meets three."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(SCENES):
        noise = np.random.default_rng(index).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"scene{index}.png")
    ingest(folder, run_dir)
    pairs, masks = [], []
    for index, image in enumerate(rows(run_dir, "SELECT image_id, width, height FROM images ORDER BY image_id")):
        for k, phrase in enumerate(["car", "bus", f"thing {index}"]):
            mask = _box((image["height"], image["width"]), 10 + 20 * k, 10 + 30 * k, 25, 35)
            pairs.append(_pair_row(image, phrase, 0.9, 1, mask))
            masks.append(_mask_row(image, f"{phrase}-{index}", phrase, 0.8, mask, 0.9))
    _store_proposals(run_dir, pairs, masks)


@pytest.fixture(scope="module")
def units_run(ray_cluster, photos_dir, tmp_path_factory):
    """Verification of the four images, uninterrupted, in one process: the rows every other run of them must write.
    Shared by the module: read it, or copy it (shutil.copytree into tmp_path) to change it."""
    run_dir = tmp_path_factory.mktemp("units") / "run"
    _construct_units(tmp_path_factory.mktemp("scenes"), run_dir)
    report = _verify(run_dir, **UNITS_SETTINGS).stages[0]
    assert report.units_committed == report.units_total == SCENES
    return run_dir, _snapshot(run_dir)


@pytest.fixture(scope="module")
def constructed(ray_cluster, photos_dir, tmp_path_factory):
    """The constructed photo verified once, shared by the module's tests: read-only (a test that writes takes ``own_constructed``)."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    image, masks, foregrounds = _construct(photos_dir, tmp_path_factory.mktemp("photo"), run_dir)
    result = _verify(run_dir, **SETTINGS)
    return run_dir, image, masks, foregrounds, SETTINGS, result


@pytest.fixture()
def own_constructed(constructed, tmp_path):
    """``constructed`` with a copy of its run directory that this test alone may change."""
    run_dir = tmp_path / "run"
    shutil.copytree(constructed[0], run_dir)
    return (run_dir, *constructed[1:])


def _verify(run_dir, **settings):
    return run_pipeline(load_config(None, {"output": str(run_dir), "stages": "verify", **settings}))


def _verdicts(run_dir):
    return {r["mask_id"]: (r["verdict"], r["reasons"]) for r in rows(run_dir, "SELECT mask_id, verdict, reasons FROM mask_verifications")}


def test_each_constructed_mask_gets_the_right_verdict_and_reason(constructed):
    run_dir, _, _, _, _, result = constructed
    verdicts = _verdicts(run_dir)
    assert verdicts == {
        "clean": ("accept", []),
        "duplicate": ("reject", ["duplicate"]),
        "conflict": ("reject", ["conflict"]),
        "related": ("accept", []),  # a car's ancestor may claim the car
        "fragmented": ("reject", ["fragmented"]),
        "tiny": ("reject", ["too_small"]),
        "border": ("reject", ["border_hugging"]),
        "person": ("accept", []),
    }
    counts = result.stages[0].counts
    assert counts["masks"] == 8 and counts["mask_verdicts"] == {"accept": 3, "reject": 5}
    assert result.stages[0].items_total == 1 and counts["rejects"] == 0  # the run reconciles images with scores + rejects
    scores = {r["mask_id"]: r for r in rows(run_dir, "SELECT * FROM mask_scores")}
    assert scores["duplicate"]["duplicate_of"] == "clean" and scores["conflict"]["conflict_with"] == "clean"
    assert {r["verifier"] for r in scores.values()} == {"sam3-clip"} and scores["clean"][
        "verifier_version"
    ] == f"{VERSION};clip=tiny-random"


def test_exhaustivity_and_presence_of_constructed_pairs(constructed):
    run_dir, _, masks, foregrounds, _, _ = constructed
    pairs = {r["phrase"]: r for r in rows(run_dir, "SELECT * FROM pair_verifications")}
    assert (pairs["car"]["exhaustivity"], pairs["car"]["exhaustivity_reason"]) == ("exhaustive", "covered")
    assert pairs["car"]["accepted_masks"] == 1 and pairs["car"]["uncovered_fraction"] == 0.0
    person = pairs["person"]
    assert (person["exhaustivity"], person["exhaustivity_reason"]) == ("not_exhaustive", "uncovered_foreground")
    fg, accepted = foregrounds["person"], masks["person"][2]
    assert person["uncovered_fraction"] == pytest.approx((fg & ~accepted).sum() / fg.sum())
    assert (pairs["dog"]["exhaustivity"], pairs["dog"]["exhaustivity_reason"]) == ("not_exhaustive", "present_without_masks")
    giraffe = pairs["giraffe"]  # SAM 3's presence 0.02, no masks, no foreground
    assert (giraffe["presence"], giraffe["exhaustivity"], giraffe["exhaustivity_reason"]) == (
        "absent",
        "exhaustive",
        "absent_without_masks",
    )
    assert giraffe["uncovered_fraction"] is None
    assert giraffe["presence_probability"] == pytest.approx(0.02)  # clip_weight 0: SAM 3's probability unchanged
    assert json.loads(giraffe["thresholds"])["clip_weight"] == 0.0


def test_clip_crop_scores_are_clips_own(constructed, photos_dir):
    run_dir, image, masks, _, _, _ = constructed
    scores = {r["mask_id"]: r for r in rows(run_dir, "SELECT * FROM mask_scores")}
    choice = choose_clip("tiny-random", None, False)
    clip = ClipEmbedder.load(choice, "cpu")
    photo = Image.open(photos_dir / "truck.jpg").convert("RGB")
    clean = masks["clean"][2]
    box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(clean.astype(np.uint8)))).tolist()
    crop = masked_crop(photo, clean, box, VerifyConfig().crop_padding, input_size(choice))
    phrases = ["car", "bus", "dog", "cup", "sky", "person", "giraffe"]  # the unrelated phrases on the image ("motor vehicle" is related)
    similarity = clip.embed_phrases(phrases) @ clip.embed_images([crop])[0]
    assert scores["clean"]["clip_crop_similarity"] == pytest.approx(float(similarity[0]), abs=1e-4)
    assert scores["clean"]["clip_crop_margin"] == pytest.approx(float(similarity[0] - similarity[1:].max()), abs=1e-4)
    whole = {r["concept_id"]: r["clip_similarity"] for r in rows(run_dir, "SELECT * FROM pair_scores")}
    expected = clip.embed_phrases(["car"]) @ clip.embed_images([photo])[0]
    assert whole[concept_id("car")] == pytest.approx(float(expected[0]), abs=1e-4)


def test_presence_needs_both_signals(constructed):
    """The presence macro on chosen signal values: low from both is absent; a disagreement is uncertain or outweighed."""
    run_dir, image, _, _, _, _ = constructed
    cases = {"giraffe": -2.0, "car": 2.0, "bus": -3.0, "dog": -2.0, "person": -0.3}  # clip_z per phrase; SAM 3 presence from the pairs
    store = TableStore(str(run_dir))
    con = connect(store)
    scores = [
        {
            "pair_id": pair_id(image["image_id"], concept_id(p)),
            "image_id": image["image_id"],
            "concept_id": concept_id(p),
            "clip_similarity": 0.0,
            "clip_z": z,
            "verifier": "sam3-clip",
            "verifier_version": "test",
            "unit_id": UNIT,
        }
        for p, z in cases.items()
    ]
    con.register("pair_scores", pa.Table.from_pylist(scores, schema=PAIR_SCORES.schema))
    result = con.sql(
        "SELECT phrase, presence_probability, presence, presence_reason FROM pair_verdicts(sam_weight := 1.0, clip_weight := 1.0)"
    ).fetchall()
    got = {phrase: (p, verdict, reason) for phrase, p, verdict, reason in result}
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for phrase, z in cases.items():
        sam = {"giraffe": 0.02, "car": 0.95, "bus": 0.9, "dog": 0.9, "person": 0.95}[phrase]
        assert got[phrase][0] == pytest.approx(1 / (1 + math.exp(-(logit(sam) + z))))
    assert got["giraffe"][1:] == ("absent", "signals_agree")
    assert got["car"][1:] == ("present", "signals_agree")
    assert got["bus"][1:] == ("absent", "clip_outweighs_sam")  # logit(0.9) - 3 = -0.80: 0.31
    assert got["dog"][1:] == ("uncertain", "signals_disagree")  # logit(0.9) - 2 = 0.20: 0.55
    assert got["person"][1:] == ("present", "sam_outweighs_clip")  # logit(0.95) - 0.3 = 2.64: 0.93


def test_thresholds_retune_in_sql_and_by_rerunning_without_a_model(own_constructed):
    run_dir, _, _, _, settings, _ = own_constructed
    stored = rows(run_dir, "SELECT verdict, count(*) AS n FROM mask_verdicts(min_clip_margin := -2.0) GROUP BY ALL ORDER BY ALL")
    assert stored == [{"verdict": "accept", "n": 3}, {"verdict": "reject", "n": 5}]  # the run's thresholds give the stored verdicts
    clip_decides = rows(run_dir, "SELECT count(*) AS n FROM mask_verdicts() WHERE list_contains(reasons, 'clip_mismatch')")
    assert clip_decides[0]["n"] > 0  # random CLIP prefers another phrase for some crops: at the default margin they become doubtful
    loose = rows(
        run_dir,
        "SELECT verdict, count(*) AS n FROM mask_verdicts(min_clip_margin := -2.0, "
        "max_duplicate_iou := 0.99, reject_reasons := ['too_small']) "
        "GROUP BY ALL ORDER BY ALL",
    )
    assert loose == [
        {"verdict": "accept", "n": 4},
        {"verdict": "reject", "n": 1},
        {"verdict": "uncertain", "n": 3},
    ]  # conflict, fragmented, border: doubtful
    strict = rows(
        run_dir,
        "SELECT exhaustivity, count(*) AS n FROM pair_verdicts(max_uncovered_fraction := "
        "0.95, clip_weight := 0.0) WHERE phrase = 'person' GROUP BY ALL",
    )
    assert strict == [{"exhaustivity": "exhaustive", "n": 1}]
    again = _verify(run_dir, **settings, **{"verify.max_duplicate_iou": 0.99})
    report = again.stages[0]
    assert report.units_committed == 0 and report.units_skipped == report.units_total == 1  # no scoring re-ran
    assert report.executor == {"executor": "ray", "model_actors": 0}  # and no model actor started
    verdicts = _verdicts(run_dir)
    assert verdicts["duplicate"] == ("accept", []) and report.counts["mask_verdicts"] == {"accept": 4, "reject": 4}
    assert json.loads(rows(run_dir, "SELECT thresholds FROM mask_verifications LIMIT 1")[0]["thresholds"])["max_duplicate_iou"] == 0.99
    _verify(run_dir, **settings)
    assert _verdicts(run_dir)["duplicate"] == ("reject", ["duplicate"])


# Per declared threshold, a value that changes a verdict of _store_boundary_scores's masks and pairs: a threshold declared
# without one here fails the test below.
MOVED = {
    "min_area_fraction": 0.001,
    "max_fragments": 4,
    "min_largest_fragment": 0.6,
    "max_border_fraction": 0.4,
    "max_duplicate_iou": 0.4,
    "max_conflict_iou": 0.4,
    "min_stability": 0.9,
    "min_reprompt_iou": 0.6,
    "min_clip_margin": 0.1,
    "reject_reasons": ["too_small", "unstable"],
    "sam_weight": 2.0,
    "clip_weight": 0.0,
    "presence_bias": 1.0,
    "present_threshold": 0.95,
    "absent_threshold": 0.55,
    "max_uncovered_fraction": 0.05,
    "high_score": 0.3,
}


def _store_boundary_scores(run_dir):
    """A 10x10 image with pairs cat (present, 0.1 of its foreground uncovered) and dog (presence 0.5: uncertain). Cat's mask
    "edge" sits on every mask threshold's default, passing each; "small" is too_small and scores 0.4; "shaky" is only unstable."""
    image = {"image_id": "img", "height": 10, "width": 10}
    cat, foreground = _box((10, 10), 0, 0, 2, 9), _box((10, 10), 0, 0, 2, 10)
    pairs = [_pair_row(image, "cat", 0.9, 3, foreground), _pair_row(image, "dog", 0.5, 0)]
    edge = {
        "area_fraction": 0.0005,
        "fragments": 5,
        "largest_fragment_fraction": 0.5,
        "border_fraction": 0.5,
        "duplicate_iou": 0.5,
        "conflict_iou": 0.5,
        "clip_crop_similarity": 0.3,
        "clip_crop_margin": 0.0,
    }
    verifier = {"verifier": "sam3-clip", "verifier_version": "test"}
    ids = ("pair_id", "image_id", "concept_id", "unit_id")
    masks, scores = [], []
    for name, score, stability, changed in (("edge", 0.9, 0.8, {}), ("small", 0.4, 0.8, {"area_fraction": 1e-4}), ("shaky", 0.3, 0.5, {})):
        row = {**_mask_row(image, name, "cat", score, cat, 0.9), "stability_score": stability, "reprompt_iou": 0.5}
        masks.append(row)
        scores.append({"mask_id": name, **{k: row[k] for k in ids}, **edge, **changed, **verifier})
    pair_scores = [
        {**{k: p[k] for k in ids}, "clip_similarity": 0.3, "clip_z": z, **verifier} for p, z in zip(pairs, (0.5, 0.0), strict=True)
    ]
    store = TableStore(str(run_dir))
    for spec, table in ((PAIRS, pairs), (MASKS, masks), (MASK_SCORES, scores), (PAIR_SCORES, pair_scores)):
        store.replace(spec, UNIT, pa.Table.from_pylist(table, schema=spec.schema))
    return store


def test_every_declared_threshold_is_a_config_key_and_a_macro_parameter_that_decides_verdicts(tmp_path):
    """Set in the config, each threshold declared for a verdict macro changes the verdicts the verify stage derives with that
    macro; at the config's defaults they are what the macros give called bare (same defaults)."""
    store = _store_boundary_scores(tmp_path / "run")

    def derived(settings):
        config = load_config(None, {"output": str(tmp_path / "run"), **settings})
        stage = VerifyStage(config.verify, config.clip, choose_clip("tiny-random", None, False), None, config.storage)
        return [d.rows.read_all().drop_columns(["thresholds"]).sort_by(d.table.key[0]).to_pylist() for d in stage.derive(store, [])]

    macros = (VerifyStage.mask_macro, VerifyStage.pair_macro)  # derive gives the mask verdicts, then the pair verdicts
    declared = {macro: set(VERDICT_THRESHOLDS[macro].model_fields) for macro in macros}
    assert declared["mask_verdicts"] | declared["pair_verdicts"] == set(VerifyConfig().thresholds()) == set(MOVED)
    defaults = dict(zip(macros, derived({}), strict=True))
    default_masks, default_pairs = defaults["mask_verdicts"], defaults["pair_verdicts"]
    con = connect(store)
    con.execute("CREATE TEMP TABLE bare AS SELECT * FROM mask_verdicts()")
    assert con.sql("SELECT * FROM bare ORDER BY mask_id").to_arrow_table().to_pylist() == default_masks
    assert con.sql("SELECT * FROM pair_verdicts(mask_table := 'bare') ORDER BY pair_id").to_arrow_table().to_pylist() == default_pairs
    assert [(m["mask_id"], m["verdict"]) for m in default_masks] == [("edge", "accept"), ("shaky", "uncertain"), ("small", "reject")]
    assert {p["phrase"]: (p["presence"], p["exhaustivity_reason"]) for p in default_pairs} == {
        "cat": ("present", "covered"),
        "dog": ("uncertain", "presence_uncertain"),
    }
    for macro, names in declared.items():
        for name in names:
            assert dict(zip(macros, derived({f"verify.{name}": MOVED[name]}), strict=True))[macro] != defaults[macro], name


def test_uncovered_fraction_function():
    shape = (50, 60)
    fg = _box(shape, 10, 10, 20, 20)
    half, other = _box(shape, 10, 10, 10, 20), _box(shape, 0, 0, 5, 5)
    assert uncovered_fraction(*shape, _counts(fg), [_counts(half), _counts(other)]) == pytest.approx(0.5)
    assert uncovered_fraction(*shape, _counts(fg), []) == 1.0
    assert uncovered_fraction(*shape, _counts(np.zeros(shape, bool)), [_counts(half)]) == 0.0
    assert uncovered_fraction(*shape, None, [_counts(half)]) is None


def test_a_units_rows_do_not_depend_on_the_units_run_before_it(units_run, tmp_path):
    """Three of the four units re-run in a fresh process, where the second unit now comes first: its rows must not change."""
    reference_dir, reference = units_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    ledger = rows(run_dir, "SELECT unit_id, stage FROM units WHERE starts_with(stage, 'verify') ORDER BY committed_at")
    scoring = [u["unit_id"] for u in ledger if u["stage"] == "verify.sam3-clip"]
    verdicts = [u["unit_id"] for u in ledger if u["stage"] != "verify.sam3-clip"]  # re-derived from the re-run scores
    assert len(scoring) == SCENES and len(verdicts) == 2
    TableStore(str(run_dir)).delete_units(UNITS, scoring[1:] + verdicts)
    report = _verify(run_dir, **UNITS_SETTINGS).stages[0]
    assert report.units_committed == SCENES - 1
    assert _snapshot(run_dir) == reference


@pytest.mark.parametrize("commits", [6, 17])
def test_killed_between_commits_then_resumed_writes_the_same_rows(ray_cluster, units_run, tmp_path, commits):
    """Commits: four units (3 tables + ledger each), then mask verdicts and pair verdicts (table + ledger each). Killed inside
    the second unit, or between the mask verdicts and their ledger row; other kill points are the runner's, tested with ingest."""
    run_dir = tmp_path / "run"
    _construct_units(tmp_path / "scenes", run_dir)
    command = [sys.executable, "-m", "sam3_engine", "run", "-q", "--output", str(run_dir), "--stages", "verify"]
    command += [arg for key, value in UNITS_SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    killed = subprocess.run(command, env={**env, KILL_AFTER_COMMITS_ENV: str(commits)}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _snapshot(run_dir) == units_run[1]


def test_a_second_verifier_writes_beside_the_first_and_calibration_compares_them(own_constructed):
    run_dir = own_constructed[0]
    strict = {"verify.verifier": "strict", "verify.min_stability": 0.99, "verify.reject_reasons": list(MASK_REASONS)}
    _verify(run_dir, **SETTINGS, **strict)
    counts = rows(run_dir, "SELECT verifier, verdict, count(*) AS n FROM mask_verifications GROUP BY ALL ORDER BY ALL")
    assert counts == [
        {"verifier": "sam3-clip", "verdict": "accept", "n": 3},
        {"verifier": "sam3-clip", "verdict": "reject", "n": 5},
        {"verifier": "strict", "verdict": "reject", "n": 8},
    ]  # every mask's stability (0.95) is below 0.99
    assert rows(run_dir, "SELECT count(DISTINCT verifier) AS n FROM mask_scores") == [{"n": 2}]
    truth = {
        "clean": True,
        "related": True,
        "person": True,
        "duplicate": False,
        "conflict": False,
        "fragmented": False,
        "tiny": False,
        "border": False,
    }
    labels = pa.table({"mask_id": list(truth), "good": list(truth.values())})
    report = calibrate(TableStore(str(run_dir)), labels, "sam3-clip", target_precision=1.0)
    accept = {v["verifier"]: v for v in report["verdicts"] if v["verdict"] == "verdict=accept"}
    assert (accept["sam3-clip"]["precision"], accept["sam3-clip"]["recall"]) == (1.0, 1.0)
    assert (accept["strict"]["precision"], accept["strict"]["recall"]) == (None, 0.0)
    fitted = calibrate(TableStore(str(run_dir)), labels, "sam3-clip", target_precision=0.5)["thresholds"]
    assert fitted == {
        "min_area_fraction": pytest.approx(own_constructed[2]["person"][2].mean(), rel=1e-6)
    }  # the smallest good mask's: person's
    # calibrate --write writes them as the `verify:` section: they load, by their declared names, as the config's thresholds
    assert load_config(None, {f"verify.{k}": v for k, v in fitted.items()}).verify.thresholds().items() >= fitted.items()
    with pytest.raises(ValueError, match="'present_threshold' is not a threshold of mask_verdicts"):
        Signal("mask", "score", "good", "present_threshold", True)
    with pytest.raises(ValueError, match="no verdicts of verifier 'other'"):
        calibrate(TableStore(str(run_dir)), labels, "other", 0.9)


def test_an_image_gone_before_verification_is_a_reject_and_the_run_reconciles(ray_cluster, photos_dir, tmp_path):
    run_dir = tmp_path / "run"
    _construct(photos_dir, tmp_path / "photo", run_dir)
    (tmp_path / "photo" / "truck.jpg").unlink()
    result = _verify(run_dir, **SETTINGS)
    report = result.stages[0]
    assert report.items_total == 1 and report.counts["reject_reasons"] == {"image_unreadable": 1}  # the run's reconciliation passed
    (reject,) = rows(run_dir, "SELECT stage, reason, uri FROM rejects WHERE stage = 'verify'")
    assert reject["reason"] == "image_unreadable" and reject["uri"].endswith("truck.jpg")
    assert rows(run_dir, "SELECT count(*) AS n FROM mask_scores") == [{"n": 0}]
