"""Model stages on Ray: a two-node local cluster, a killed actor, an item that crashes its actor, out-of-memory."""

import json
import os
import subprocess
from dataclasses import replace

import pytest
import ray

from sam3_engine.app.pipeline import build_stages
from sam3_engine.engine.catalog import connect
from sam3_engine.engine.config import load_config
from sam3_engine.engine.ray_executor import KILL_ACTOR_ONCE_ENV, RayExecutor
from sam3_engine.engine.runner import CRASH_ON_ENV, ProcessExecutor, UnitRunner
from sam3_engine.engine.store import TableStore
from sam3_engine.models.hub import ModelLoadError
from sam3_engine.stages.propose import OOM_ABOVE_ENV
from tests.helpers import ingest, rows, run_command

SNAPSHOT = {
    "pairs": "SELECT * EXCLUDE (unit_id) FROM pairs ORDER BY pair_id",
    "masks": "SELECT * EXCLUDE (unit_id) FROM masks ORDER BY mask_id",
    "rejects": "SELECT * EXCLUDE (unit_id) FROM rejects WHERE stage = 'propose' ORDER BY input_id",
}


@pytest.fixture(scope="module")
def images_run(photos_dir, tmp_path_factory):
    """Ingested photos (three real ones, plus flipped copies), ready for proposals."""
    from PIL import Image, ImageOps

    folder = tmp_path_factory.mktemp("photos")
    for photo in photos_dir.glob("*.jpg"):
        image = Image.open(photo)
        image.save(folder / photo.name)
        ImageOps.mirror(image).save(folder / f"mirror-{photo.name}")
    run_dir = tmp_path_factory.mktemp("base") / "run"
    ingest(folder, run_dir)
    return run_dir


def _propose(run_dir, executor, **overrides):
    config = load_config(
        None,
        {
            "output": str(run_dir),
            "stages": "propose",
            "model.name": "tiny-random",
            "propose.phrases": ["car", "truck", "child"],
            "propose.unit_size": 1,
            "propose.image_batch": 2,
            **overrides,
        },
    )
    (stage,) = build_stages(config, "test-run")
    store = TableStore(str(run_dir))
    report = UnitRunner(store, "attempt", None).run(stage, executor)
    con = connect(store)
    report.counts = stage.summarize(con)
    con.close()
    return report


def _copy(run_dir, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _snapshot(run_dir):
    return {name: rows(run_dir, sql) for name, sql in SNAPSHOT.items()}


@pytest.fixture(scope="module")
def reference(images_run, tmp_path_factory):
    run_dir = _copy(images_run, tmp_path_factory.mktemp("reference"))
    report = _propose(run_dir, ProcessExecutor(1))
    assert report.units_committed == report.units_total > 1
    return _snapshot(run_dir)


def test_two_node_cluster_gives_the_rows_of_a_local_run(ray_cluster, images_run, reference, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    run_dir = _copy(images_run, tmp_path)
    report = _propose(run_dir, RayExecutor(actors=2))
    assert report.worker_crashes == 0
    assert _snapshot(run_dir) == reference
    assert len(reference["masks"]) > 0


def test_the_cli_joins_a_running_cluster_through_ray_address(ray_cluster, images_run, reference, tmp_path):
    run_dir = _copy(images_run, tmp_path)
    command = run_command(
        output=run_dir,
        stages="propose",
        model="tiny-random",
        settings=["propose.phrases=[car, truck, child]", "propose.unit_size=1", "propose.image_batch=2"],
    )
    done = subprocess.run(command, env={**os.environ, "RAY_ADDRESS": ray_cluster.address}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = rows(run_dir, "SELECT summary_json FROM runs WHERE status = 'finished' AND 'propose' IN stages")
    placement = json.loads(summary["summary_json"])["stages"][0]["executor"]
    assert placement["ray_address"] == ray_cluster.address and placement["ray_nodes"] == 2
    without_run_id = lambda snapshot: {t: [{k: v for k, v in r.items() if k != "run_id"} for r in snapshot[t]] for t in snapshot}  # noqa: E731
    _assert_same_rows_up_to_float_noise(without_run_id(_snapshot(run_dir)), without_run_id(reference))


def test_a_killed_model_actor_loses_and_duplicates_nothing(ray_cluster, images_run, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ACTOR_ONCE_ENV, str(tmp_path / "killed-once"))
    run_dir = _copy(images_run, tmp_path)
    report = _propose(run_dir, RayExecutor(actors=2))
    assert (tmp_path / "killed-once").exists(), "an actor must really have been killed"
    assert report.worker_crashes >= 1
    assert _snapshot(run_dir) == reference


def test_an_image_that_kills_its_actor_is_rejected_alone(ray_cluster, images_run, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ON_ENV, "mirror-truck.jpg")
    run_dir = _copy(images_run, tmp_path)
    report = _propose(run_dir, RayExecutor(actors=1), **{"propose.unit_size": 3})
    (reject,) = rows(run_dir, "SELECT uri, reason FROM rejects WHERE stage = 'propose'")
    assert reject["uri"].endswith("mirror-truck.jpg") and reject["reason"] == "worker_crashed"
    crashed_image = rows(run_dir, "SELECT image_id FROM images WHERE uri LIKE '%mirror-truck.jpg'")[0]["image_id"]
    others = {t: [r for r in reference[t] if r["image_id"] != crashed_image] for t in ("pairs", "masks")}
    _assert_same_rows_up_to_float_noise({**_snapshot(run_dir), "rejects": []}, {**others, "rejects": []})
    assert report.worker_crashes >= 2


def test_a_model_that_fails_to_load_on_its_actor_stops_the_stage_with_its_own_error(ray_cluster, images_run, tmp_path):
    """Checked on the driver, the checkpoint broke before the actors loaded it: one error, not a crash per image."""
    run_dir = _copy(images_run, tmp_path)
    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    config = load_config(None, {"output": str(run_dir), "stages": "propose", "model.name": "tiny-random", "propose.phrases": ["car"]})
    (stage,) = build_stages(config, "test-run")
    stage.choice = replace(stage.choice, name=str(broken))
    with pytest.raises(ModelLoadError, match="broken-checkpoint"):
        UnitRunner(TableStore(str(run_dir)), "attempt", None).run(stage, RayExecutor(actors=1))
    assert rows(run_dir, "SELECT count(*) AS n FROM rejects WHERE stage = 'propose'") == [{"n": 0}]
    assert rows(run_dir, "SELECT count(*) AS n FROM pairs") == [{"n": 0}]


def _assert_same_rows_up_to_float_noise(got, expected):
    """Batch size and thread count change float reduction order: scores move by ~1e-7, and mask
    pixels whose logits are within rounding of zero may flip; nothing else may differ."""
    from pycocotools import mask as mask_utils

    for table in ("pairs", "masks", "rejects"):
        assert len(got[table]) == len(expected[table]), table
        for a, b in zip(got[table], expected[table], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert abs(a[key] - b[key]) < 1e-5, (table, key)
                elif key in ("rle_counts", "foreground_counts") and a[key] is not None and b[key] is not None:
                    x, y = ({"size": [r["height"], r["width"]], "counts": r[key].encode()} for r in (a, b))
                    differing = int(mask_utils.area(mask_utils.merge([x, y], intersect=False))) - int(
                        mask_utils.area(mask_utils.merge([x, y], intersect=True))
                    )
                    # tiny-random's mask logits are flat (~0.1), so more pixels than a real model's sit near zero
                    assert differing <= a["height"] * a["width"] // 100_000, differing
                elif key in ("area", "bbox", "foreground_area") and a[key] is not None and b[key] is not None:
                    assert a[key] == pytest.approx(b[key], abs=a["height"] * a["width"] // 100_000), (table, key)
                elif key == "model_box":  # pixels: a 1e-7 relative change of a normalised box
                    assert a[key] == pytest.approx(b[key], abs=1e-2), (table, key)
                else:
                    assert a[key] == b[key], (table, key)


def test_out_of_memory_halves_the_batch_and_loses_nothing(images_run, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(OOM_ABOVE_ENV, "2")  # 2 images x 3 phrases fails, then 1 x 3, then 1 x 2 fits
    run_dir = _copy(images_run, tmp_path)
    report = _propose(run_dir, ProcessExecutor(1), **{"propose.unit_size": 1000})  # one unit, batches of two images
    _assert_same_rows_up_to_float_noise(_snapshot(run_dir), reference)
    images = len({p["image_id"] for p in reference["pairs"]})
    # The two-image batches halve once each; then per image the phrase batch halves 16 -> 8 -> 4 -> 2.
    assert report.counts["oom_retries"] == images // 2 + 3 * images
    assert report.counts["reject_reasons"] == {}
    assert report.counts["peak_worker_rss_mib"] > 100


def test_out_of_memory_at_one_image_and_one_phrase_is_a_reject(images_run, tmp_path, monkeypatch):
    monkeypatch.setenv(OOM_ABOVE_ENV, "0")
    run_dir = _copy(images_run, tmp_path)
    report = _propose(run_dir, ProcessExecutor(1))
    images = rows(run_dir, "SELECT count(*) AS n FROM images")[0]["n"]
    assert report.counts["pairs"] == 0 and report.counts["reject_reasons"] == {"out_of_memory": images}
    assert report.counts["accounted"] == images
