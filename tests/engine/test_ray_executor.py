"""Model stages on Ray: a two-node local cluster, a killed actor, an item that crashes its actor."""

import pyarrow as pa
import pytest
import ray

from sam3_engine.engine.config import load_config
from sam3_engine.engine.ray_executor import KILL_ACTOR_ONCE_ENV, RayExecutor
from sam3_engine.engine.run import build_stages
from sam3_engine.engine.runner import CRASH_ON_ENV, ProcessExecutor, UnitRunner
from sam3_engine.engine.store import TableStore
from tests.helpers import ingest, rows

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
    config = load_config(None, {"output": str(run_dir), "stages": "propose", "model.name": "tiny-random",
                                "propose.phrases": ["car", "truck", "child"], "propose.unit_size": 1, "propose.image_batch": 2, **overrides})
    (stage,) = build_stages(config, "test-run")
    store = TableStore(str(run_dir))
    return UnitRunner(store, "attempt", None).run(stage, executor)


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
    got = _snapshot(run_dir)
    crashed_image = rows(run_dir, "SELECT image_id FROM images WHERE uri LIKE '%mirror-truck.jpg'")[0]["image_id"]
    assert got["pairs"] == [p for p in reference["pairs"] if p["image_id"] != crashed_image]
    assert report.worker_crashes >= 2
