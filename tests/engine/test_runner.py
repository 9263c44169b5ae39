"""The unit runner's rules: derived tables, units committed together, the ledger read once."""

import subprocess
import sys

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import StorageConfig, load_config
from sam3_engine.engine.runner import ProcessExecutor, UnitRunner
from sam3_engine.engine.stage import Derivation, Stage, WorkUnit, fingerprint, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import REJECTS, SPLITS, UNITS
from tests.helpers import ingest


class _DerivesIntoItsOwnLedger(Stage):
    name = "selfish"
    outputs = ()

    @classmethod
    def build(cls, context):
        return cls()

    def plan(self, store):
        return []

    def process(self, unit, prepared=None):
        raise NotImplementedError

    def derive(self, store, done_units):
        return [Derivation(fingerprint(self.ledger, {}), SPLITS, pa.RecordBatchReader.from_batches(SPLITS.schema, []))]


def test_a_derivation_recorded_in_its_stages_unit_ledger_is_refused(tmp_path):
    """Each run removes the stage's ledger rows its plan lacks: such a derivation would be rebuilt by every run."""
    store = TableStore(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="shares the ledger"):
        UnitRunner(store, "attempt").run(_DerivesIntoItsOwnLedger(), ProcessExecutor(1))
    assert store.open(SPLITS.name) is None


class _RowsPerItem(Stage):
    """Ten units; unit i writes i rows (unit 0 writes none)."""

    name = "counted"
    outputs = (REJECTS,)

    @classmethod
    def build(cls, context):
        return cls()

    def plan(self, store):
        return [WorkUnit(f"counted:{i:02d}", tuple(range(i))) for i in range(10)]

    def process(self, unit, prepared=None):
        rows = [
            {"input_id": f"{unit.unit_id}/{i}", "stage": self.name, "uri": None, "image_id": None, "reason": "r", "detail": ""}
            for i in unit.items
        ]
        return {REJECTS.name: rows_table(REJECTS, rows, unit.unit_id)}


class _AllAtOnce:
    """Runs every unit in this process and hands them to the runner together, as a busy cluster's results arrive."""

    def describe(self):
        return {"executor": "in-process"}

    def execute(self, stage, units, committed, context):
        committed([(unit, stage.process(unit)) for unit in units])
        return 0


def _writes(store, name):
    return sum(entry["operation"] == "WRITE" for entry in DeltaTable(store.table_url(name)).history())


def test_units_that_finish_together_are_committed_together_at_most_units_per_commit(tmp_path):
    store = TableStore(str(tmp_path / "run"), StorageConfig(units_per_commit=4))
    report = UnitRunner(store, "attempt").run(_RowsPerItem(), _AllAtOnce())
    assert report.units_committed == 10
    assert _writes(store, REJECTS.name) == _writes(store, UNITS.name) == 3, "10 units in groups of 4, 4 and 2"
    ledger = store.read(UNITS.name).to_pylist()
    assert sorted((row["unit_id"], dict(row["rows_written"])[REJECTS.name], row["num_inputs"]) for row in ledger) == [
        (f"counted:{i:02d}", i, i) for i in range(10)
    ]
    assert store.read(REJECTS.name).num_rows == sum(range(10))
    again = UnitRunner(store, "attempt-2").run(_RowsPerItem(), _AllAtOnce())
    assert again.units_committed == 0 and again.units_skipped == 10


def test_the_runner_reads_the_ledger_once_and_keeps_it(tmp_path, monkeypatch):
    store = TableStore(str(tmp_path / "run"))
    reads = []
    original = store.ledger
    monkeypatch.setattr(store, "ledger", lambda: reads.append(1) or original())
    runner = UnitRunner(store, "attempt")
    runner.run(_RowsPerItem(), _AllAtOnce())
    again = runner.run(_RowsPerItem(), _AllAtOnce())
    assert len(reads) == 1
    assert again.units_committed == 0 and again.units_skipped == 10, "the kept ledger knows the units it committed"


_drawn: list[str] = []
"""Units the plan below has yielded, in the driver (the plan runs there)."""


class _CountsItsDraws(_RowsPerItem):
    """Forty one-item units from a generator that notes every unit it yields."""

    name = "drawn"

    def plan(self, store):
        for i in range(40):
            _drawn.append(f"drawn:{i:02d}")
            yield WorkUnit(f"drawn:{i:02d}", (i,))


def test_the_plan_is_drawn_as_workers_have_room_never_held_whole(tmp_path, monkeypatch):
    """The runner reads the plan once for ids and sizes, then again while it sends units: at any commit, the units drawn
    but not yet committed are at most the pool's in-flight bound (two per worker) and the one the runner looks ahead at."""
    store = TableStore(str(tmp_path / "run"))
    outstanding = []
    committed = []
    record = store.record_units

    def recording(stage, attempt_id, entries):
        outstanding.append(len(_drawn) - 40 - len(committed))
        committed.extend(entry.unit_id for entry in entries)
        record(stage, attempt_id, entries)

    monkeypatch.setattr(store, "record_units", recording)
    _drawn.clear()
    report = UnitRunner(store, "attempt").run(_CountsItsDraws(), ProcessExecutor(1))
    assert report.units_committed == 40 and sorted(committed) == [f"drawn:{i:02d}" for i in range(40)]
    assert len(_drawn) == 80, "two readings of the plan"
    assert max(outstanding) <= 3 and len(outstanding) >= 10
    _drawn.clear()
    again = UnitRunner(store, "attempt-2").run(_CountsItsDraws(), ProcessExecutor(1))
    assert again.units_skipped == 40 and again.units_committed == 0
    assert len(_drawn) == 40, "a finished stage's plan is read once, for its ids"


class _WritesItsWorkersEnvironment(_RowsPerItem):
    """One unit whose reject row says what its worker's environment holds."""

    name = "seen"

    def plan(self, store):
        return [WorkUnit("seen:0", (0,))]

    def process(self, unit, prepared=None):
        import os

        detail = os.environ.get("SAM3_ENGINE_TEST_SEEN", "unset")
        row = {"input_id": unit.unit_id, "stage": self.name, "uri": None, "image_id": None, "reason": "seen", "detail": detail}
        return {REJECTS.name: rows_table(REJECTS, [row], unit.unit_id)}


def test_pool_workers_see_the_drivers_environment_as_it_is_when_the_pool_starts(tmp_path, monkeypatch):
    """Workers are forked from a fork server that has the environment of the moment the process's first pool started
    it: each pool's workers must still see the driver's environment as it is now, as spawned ones would."""
    seen = []
    for value in ("first", "second"):
        monkeypatch.setenv("SAM3_ENGINE_TEST_SEEN", value)
        store = TableStore(str(tmp_path / value))
        UnitRunner(store, "attempt").run(_WritesItsWorkersEnvironment(), ProcessExecutor(1))
        seen += store.read(REJECTS.name).column("detail").to_pylist()
    assert seen == ["first", "second"]


PRELOADED = """
import sys
from sam3_engine.engine.runner import ProcessExecutor, start_fork_server
from sam3_engine.engine.stage import WorkerContext
from sam3_engine.stages.splits import SplitsConfig, SplitsStage

def imported(name):
    return name in sys.modules

if __name__ == "__main__":
    start_fork_server(["inflect"])
    with ProcessExecutor(1)._pool(SplitsStage(SplitsConfig()), WorkerContext(".", None)) as pool:
        print(pool.submit(imported, "inflect").result(), "inflect" in sys.modules)
"""


def test_pool_workers_start_with_the_modules_their_fork_server_preloaded(tmp_path):
    """A fresh driver: the fork server it starts imports the modules it is given (here one splits never imports), so
    a worker has it without importing it, and the driver never imports it at all."""
    script = tmp_path / "driver.py"
    script.write_text(PRELOADED)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_a_first_stage_with_nothing_to_do_says_why_and_a_derived_only_stage_says_nothing(tmp_path):
    """An empty folder for ingest; stages not run yet for the others; splits (derived tables alone) has no units to find."""
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    assert ingest(empty, run_dir).notices == [
        f"stage ingest found no inputs in {empty} (an empty folder, or a glob matching nothing): nothing to do"
    ]
    (notice,) = run_pipeline(load_config(None, {"output": str(run_dir), "stages": "dedup"})).notices
    assert notice == "stage dedup found nothing to work on: the stages before it have not written its inputs yet; run them first"
    assert run_pipeline(load_config(None, {"output": str(run_dir), "stages": "splits"})).notices == []
