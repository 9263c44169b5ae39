"""A stage defined here, in the test file alone, runs through the normal pipeline: config, plan, commit, query, resume."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import ConfigError, load_config
from sam3_engine.engine.runner import KILL_AFTER_COMMITS_ENV
from sam3_engine.engine.stage import (
    Stage,
    WorkUnit,
    content_defined_chunks,
    fingerprint,
    registered,
    rows_table,
    stage_class,
    stage_modules,
    stage_names,
)
from sam3_engine.schemas.tables import Column, TableSpec
from tests.conftest import REPO
from tests.helpers import ingest, rows

TOY_SIZES = TableSpec(
    name="toy_sizes",
    doc="Pixels per image, counted by the toy stage.",
    version=1,
    columns=(
        Column("image_id", pa.string(), "The image."),
        Column("pixels", pa.int64(), "Width times height."),
        Column("unit_id", pa.string(), "Work unit that wrote the row."),
    ),
    key=("image_id",),
)


class ToyStage(Stage):
    name = "toy"
    order = 15
    outputs = (TOY_SIZES,)

    @classmethod
    def build(cls, context):
        return cls()

    def plan(self, store):
        images = store.read("images", columns=["image_id", "width", "height"]).sort_by("image_id").to_pylist()
        return [
            WorkUnit(fingerprint(self.name, shard), tuple(shard)) for shard in content_defined_chunks(images, lambda i: i["image_id"], 4)
        ]

    def process(self, unit, prepared=None):
        sizes = [{"image_id": i["image_id"], "pixels": i["width"] * i["height"]} for i in unit.items]
        return {TOY_SIZES.name: rows_table(TOY_SIZES, sizes, unit.unit_id)}

    def summarize(self, con):
        return {"sized": con.execute("SELECT count(*) FROM toy_sizes").fetchone()[0]}


DRIVER = """
import sys
from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import load_config
from sam3_engine.engine.stage import registered
from tests.engine.test_registry import ToyStage

if __name__ == "__main__":  # the pool's spawned workers import this file too
    with registered(ToyStage):
        run_pipeline(load_config(None, {"output": sys.argv[1], "stages": "toy"}))
"""


def _sizes(run_dir):
    with registered(ToyStage):  # the catalog shows the tables of registered stages
        return rows(run_dir, "SELECT image_id, pixels FROM toy_sizes ORDER BY image_id")


def test_a_registered_stage_takes_its_place_runs_and_is_queryable(synthetic_dir, tmp_path):
    assert "toy" not in stage_names()
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, {"stages": "toy"})
    with registered(ToyStage):
        assert stage_names()[:3] == ("ingest", "toy", "mine")
        config = load_config(None, {"input": str(synthetic_dir), "output": str(tmp_path / "run"), "stages": "toy,ingest"})
        assert config.stages == ("ingest", "toy")
        result = run_pipeline(config)
        assert result.stages[1].counts == {"sized": 40}
        expected = rows(tmp_path / "run", "SELECT image_id, width * height AS pixels FROM images ORDER BY image_id")
        assert rows(tmp_path / "run", "SELECT image_id, pixels FROM toy_sizes ORDER BY image_id") == expected and len(expected) == 40
    assert "toy" not in stage_names()


def test_a_registered_stage_killed_mid_run_resumes_to_the_same_rows(synthetic_dir, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for run_dir in (reference, killed):
        ingest(synthetic_dir, run_dir)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe: a killed driver's workers may hold a pipe open a while

    def drive(run_dir, extra=None):
        return subprocess.run([sys.executable, str(script), str(run_dir)], env={**env, **(extra or {})}, stdout=log, stderr=log)

    assert drive(reference).returncode == 0
    assert drive(killed, {KILL_AFTER_COMMITS_ENV: "3"}).returncode == -9
    partial = _sizes(killed)
    assert 0 < len(partial) < 40
    assert drive(killed).returncode == 0
    assert _sizes(killed) == _sizes(reference)
    assert rows(killed, "SELECT count(*) AS n FROM units WHERE stage = 'toy'") == rows(
        reference, "SELECT count(*) AS n FROM units WHERE stage = 'toy'"
    )


def test_every_stage_names_worker_modules_that_import():
    """The fork server skips a preload that fails to import, so a renamed module would only make workers slow: catch it here."""
    modules = stage_modules(map(stage_class, stage_names()))
    assert "inflect" in modules and "sam3_engine.stages.mine" in modules
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    done = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stderr
