"""The worker lifecycle: a stage is set up once per worker process or model actor and sees its worker's context."""

import os
import pickle

import pyarrow as pa
import pytest

from sam3_engine.engine.config import ClipConfig, StorageConfig
from sam3_engine.engine.ray_executor import RayExecutor
from sam3_engine.engine.runner import ProcessExecutor, UnitRunner
from sam3_engine.engine.stage import Stage, WorkerContext, WorkUnit, plan_units, registered, rows_table, start_worker
from sam3_engine.engine.store import TableStore
from sam3_engine.models.clip import ClipEmbedder, choose_clip
from sam3_engine.schemas.tables import Column, TableSpec
from sam3_engine.stages.embed import EmbedStage

SEEN = TableSpec(
    name="seen",
    doc="What the worker that processed each item saw.",
    version=1,
    columns=(
        Column("item", pa.int64(), "The item."),
        Column("pid", pa.int64(), "Process that ran it."),
        Column("setups", pa.int64(), "How often the stage was set up in that process before this item."),
        Column("device", pa.string(), "The context's device."),
        Column("run_url", pa.string(), "The context's run directory."),
        Column("prepared_in", pa.string(), "The run directory the preparation saw."),
        Column("unit_id", pa.string(), "Work unit that wrote the row."),
    ),
    key=("item",),
)


class CountingStage(Stage):
    name = "counting"
    order = 1
    outputs = (SEEN,)
    setups = 0

    def __init__(self, uses_model: bool):
        self.uses_model = uses_model

    @classmethod
    def build(cls, context):
        return cls(False)

    def setup(self, context):
        self.setups += 1

    def plan(self, store):
        return plan_units(self.name, {}, list(range(40)), str, 3, lambda item: item)

    def prepare(self, unit):
        return self.context.run_url

    def process(self, unit, prepared=None):
        prepared = prepared if prepared is not None else self.prepare(unit)
        rows = [
            {
                "item": item,
                "pid": os.getpid(),
                "setups": self.setups,
                "device": self.context.device,
                "run_url": self.context.run_url,
                "prepared_in": prepared,
            }
            for item in unit.items
        ]
        return {SEEN.name: rows_table(SEEN, rows, unit.unit_id)}


def _run(tmp_path, executor) -> list[dict]:
    store = TableStore(str(tmp_path / "run"))
    with registered(CountingStage):  # the store reads the tables of registered stages
        report = UnitRunner(store, "attempt").run(CountingStage(uses_model=isinstance(executor, RayExecutor)), executor)
        assert report.units_committed == report.units_total > 5
        return store.read(SEEN.name).to_pylist(), store.run_url


def test_pool_workers_set_the_stage_up_once_each_and_see_the_run(tmp_path):
    rows, run_url = _run(tmp_path, ProcessExecutor(2))
    assert sorted(r["item"] for r in rows) == list(range(40))
    assert {r["setups"] for r in rows} == {1}  # once per process, however many units it ran
    assert len({r["pid"] for r in rows}) <= 2 and os.getpid() not in {r["pid"] for r in rows}
    assert {(r["device"], r["run_url"], r["prepared_in"]) for r in rows} == {("cpu", run_url, run_url)}


def test_model_actors_set_the_stage_up_once_each_and_preparation_tasks_see_the_run(tmp_path, ray_cluster):
    rows, run_url = _run(tmp_path, RayExecutor(actors=2, gpus_per_actor=0))
    assert sorted(r["item"] for r in rows) == list(range(40))
    assert {r["setups"] for r in rows} == {1}
    assert len({r["pid"] for r in rows}) == 2
    assert {(r["device"], r["run_url"], r["prepared_in"]) for r in rows} == {("cpu", run_url, run_url)}


def test_an_image_model_stage_loads_its_model_in_setup_and_never_ships_it():
    stage = EmbedStage(ClipConfig(model="tiny-random"), choose_clip("tiny-random", None, False), StorageConfig())
    assert stage.model is None
    start_worker(stage, WorkerContext("unused", StorageConfig(), device="cpu"))
    assert isinstance(stage.model, ClipEmbedder) and stage.model.device == "cpu"
    shipped = pickle.loads(pickle.dumps(stage))
    assert shipped.model is None and shipped.choice == stage.choice


def test_a_stage_without_a_context_cannot_prepare():
    with pytest.raises(AttributeError):
        CountingStage(False).prepare(WorkUnit("counting:x", (1,)))
