"""The unit runner's rules for derived tables."""

import pyarrow as pa
import pytest

from sam3_engine.engine.runner import ProcessExecutor, UnitRunner
from sam3_engine.engine.stage import Derivation, Stage, fingerprint
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import SPLITS


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
