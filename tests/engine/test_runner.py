"""The unit runner's rules: derived tables, units committed together, the ledger read once."""

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.runner import ProcessExecutor, UnitRunner
from sam3_engine.engine.stage import Derivation, Stage, WorkUnit, fingerprint, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import REJECTS, SPLITS, UNITS


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
