"""The proposal stage end to end on the real photos, with the tiny random-weight SAM 3."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import ConfigError, StorageConfig, load_config
from sam3_engine.stages.propose import ProposeConfig, load_phrases
from sam3_engine.text.concepts import concept_id
from tests.helpers import rows

PHRASES = ["grocery bag", "pickup truck", "child", "Pickup  Truck"]


def _run(input_dir, run_dir, **overrides):
    """ingest and propose in-process: callers request ``ray_cluster`` so that propose's model actors join the session's cluster."""
    settings = {
        "input": str(input_dir),
        "output": str(run_dir),
        "stages": "ingest,propose",
        "model.name": "tiny-random",
        "propose.phrases": PHRASES,
        "propose.unit_size": 2,
        "propose.image_batch": 2,
        **overrides,
    }
    return run_pipeline(load_config(None, settings))


@pytest.fixture(scope="module")
def photo_run(ray_cluster, photos_dir, tmp_path_factory):
    """The three photos plus an EXIF-rotated copy of the truck (stored 1800x1200, shown 1200x1800); read-only for its tests."""
    folder = tmp_path_factory.mktemp("photos")
    for photo in photos_dir.glob("*.jpg"):
        (folder / photo.name).write_bytes(photo.read_bytes())
    truck = Image.open(photos_dir / "truck.jpg")
    exif = truck.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    truck.save(buffer, "JPEG", exif=exif, quality=90)
    (folder / "truck-rotated.jpg").write_bytes(buffer.getvalue())
    run_dir = tmp_path_factory.mktemp("run") / "run"
    return run_dir, _run(folder, run_dir)


def test_every_image_gets_a_pair_per_concept(photo_run):
    run_dir, result = photo_run
    propose = result.stages[1]
    assert propose.counts["phrases"] == 3  # "Pickup  Truck" is the same concept as "pickup truck"
    assert propose.counts["pairs"] == 4 * 3 and propose.counts["rejects"] == 0
    assert propose.counts["random_weights"] is True
    concepts = rows(run_dir, "SELECT concept_id, phrase FROM concepts ORDER BY phrase")
    assert [c["phrase"] for c in concepts] == ["child", "grocery bag", "pickup truck"]
    assert all(c["concept_id"] == concept_id(c["phrase"]) for c in concepts)
    (check,) = rows(run_dir, "SELECT count(*) AS n FROM pairs p JOIN concepts c USING (concept_id) JOIN images i USING (image_id)")
    assert check["n"] == 12
    counts = rows(
        run_dir, "SELECT p.pair_id, p.instance_count, count(m.mask_id) AS n FROM pairs p LEFT JOIN masks m USING (pair_id) GROUP BY ALL"
    )
    assert all(c["instance_count"] == c["n"] for c in counts)
    assert rows(run_dir, "SELECT DISTINCT model_id, random_weights FROM pairs") == [{"model_id": "tiny-random", "random_weights": True}]


def test_masks_decode_to_their_stored_area_and_box_at_the_oriented_resolution(photo_run):
    run_dir, _ = photo_run
    masks = rows(run_dir, "SELECT m.*, i.uri FROM masks m JOIN images i USING (image_id)")
    assert len(masks) > 0
    sizes = {r["uri"].rsplit("/", 1)[1]: (r["height"], r["width"]) for r in masks}
    assert sizes["truck.jpg"] == (1200, 1800) and sizes["truck-rotated.jpg"] == (1800, 1200)
    non_empty = 0
    for m in masks:
        rle = {"size": [m["height"], m["width"]], "counts": m["rle_counts"].encode()}
        decoded = mask_utils.decode(rle)
        assert decoded.shape == (m["height"], m["width"])
        assert int(decoded.sum()) == m["area"] == int(mask_utils.area(rle))
        assert np.allclose(m["bbox"], mask_utils.toBbox(rle))
        if m["area"]:
            ys, xs = np.nonzero(decoded)
            assert m["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            non_empty += 1
        assert m["score"] >= 0.3 and abs(m["score"] - m["object_score"] * m["presence_score"]) < 1e-5
        assert 0.0 <= m["stability_score"] <= 1.0
    assert non_empty > 0


def test_rerun_skips_and_a_new_threshold_reruns_every_unit(ray_cluster, photo_run, tmp_path):
    shutil.copytree(photo_run[0], tmp_path / "run")  # the module's run, copied: this test changes it
    first = photo_run[1]
    folder = Path(rows(tmp_path / "run", "SELECT uri FROM images LIMIT 1")[0]["uri"]).parent
    again = _run(folder, tmp_path / "run", stages="propose")
    assert again.stages[0].units_committed == 0 and again.stages[0].units_skipped == first.stages[1].units_total
    before = rows(tmp_path / "run", "SELECT count(*) AS n FROM masks")[0]["n"]
    stricter = _run(folder, tmp_path / "run", stages="propose", **{"propose.threshold": 0.32})
    assert stricter.stages[0].units_removed == stricter.stages[0].units_committed == first.stages[1].units_total
    after = rows(tmp_path / "run", "SELECT count(*) AS n, min(score) AS low FROM masks")[0]
    assert after["n"] < before and after["low"] >= 0.32
    assert rows(tmp_path / "run", "SELECT count(*) AS n FROM pairs")[0]["n"] == 4 * 3  # every image's pair per concept, masks or not


def test_an_image_gone_at_proposal_time_is_rejected(ray_cluster, photos_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("groceries.jpg", "truck.jpg"):
        (folder / name).write_bytes((photos_dir / name).read_bytes())
    _run(folder, tmp_path / "run", stages="ingest")
    (folder / "truck.jpg").unlink()
    result = _run(folder, tmp_path / "run", stages="propose")
    (reject,) = rows(tmp_path / "run", "SELECT uri, reason FROM rejects WHERE stage = 'propose'")
    assert reject["uri"].endswith("truck.jpg") and reject["reason"] == "image_unreadable"
    assert result.stages[0].counts["pairs"] == 3


def test_detections_whose_mask_vanishes_on_a_tiny_image_are_dropped_and_counted(ray_cluster, photos_dir, tmp_path):
    """At threshold 0 every query of every pair is a detection: each becomes a mask row or is counted as dropped."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (1, 1), (120, 30, 30)).save(folder / "dot.png")
    (folder / "truck.jpg").write_bytes((photos_dir / "truck.jpg").read_bytes())
    result = _run(folder, tmp_path / "run", **{"propose.threshold": 0.0})
    counts = result.stages[-1].counts
    queries = 5  # tiny-random's DETR decoder
    assert counts["pairs"] == 2 * 3 and counts["masks"] + counts["empty_masks_dropped"] == counts["pairs"] * queries
    assert counts["empty_masks_dropped"] > 0 and rows(tmp_path / "run", "SELECT min(area) AS a FROM masks") == [{"a": 1}]
    stats = rows(tmp_path / "run", "SELECT sum(stats['empty_masks_dropped']) AS n FROM units WHERE stage = 'propose'")
    assert stats == [{"n": counts["empty_masks_dropped"]}]


def test_phrases_from_a_vocabulary_file(tmp_path):
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("# animals\ncat\n\ndog\nCat\n")
    assert load_phrases(ProposeConfig(phrases=("bird",), vocabulary=str(vocabulary)), StorageConfig()) == ("bird", "cat", "dog")
    with pytest.raises(ConfigError, match="empty"):
        load_phrases(ProposeConfig(phrases=("cat", "  ")), StorageConfig())
    assert load_phrases(ProposeConfig(), StorageConfig()) == ()  # then the mined candidates are asked


def test_an_unreachable_checkpoint_fails_unless_fallback_is_asked_for(ray_cluster, photos_dir, tmp_path):
    """The checkpoint is unreachable for sure (offline), wherever the test runs; the fallback run joins the session's cluster."""
    command = [
        sys.executable,
        "-m",
        "sam3_engine",
        "run",
        "-q",
        "--input",
        str(photos_dir),
        "--output",
        str(tmp_path / "run"),
        "--stages",
        "ingest,propose",
        "--set",
        "propose.phrases=[car]",
    ]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    failed = subprocess.run(command, capture_output=True, text=True, env=offline)
    assert failed.returncode == 2 and "huggingface-cli login" in failed.stderr and "--model tiny-random" in failed.stderr
    fallback = subprocess.run(
        [*command, "--set", "model.fallback_to_tiny_random=true"],
        capture_output=True,
        text=True,
        env={**offline, "RAY_ADDRESS": ray_cluster.address},
    )
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stderr.count("NOT REAL SAM 3") == 2
    runs = json.loads(
        subprocess.run(
            [sys.executable, "-m", "sam3_engine", "query", str(tmp_path / "run"), "SELECT summary_json FROM runs", "-f", "json"],
            capture_output=True,
            text=True,
        ).stdout
    )
    assert "NOT REAL SAM 3" in runs[0]["summary_json"]
