"""What a unit's commit costs as a run grows, and what planning a resume costs, with and without compaction.

    python benchmarks/commit_cost.py --units 1000 10000                      # local disk
    python benchmarks/commit_cost.py --units 1000 --compact-every 1000000    # no compaction until the end (as before)

Drives ``UnitRunner``'s own commit path (``_commit``: one Delta commit per output table, then the
ledger's, then compaction every ``storage.compact_every`` commits) with one output table and one
row per unit, as the issue measured ``record_unit``; no worker, no model. Reports the mean commit
time per unit over each tenth of the run, the time of ``done_units`` (what planning a resume reads)
at the end, and the files in each table's current version.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import pyarrow as pa

from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.runner import UnitRunner
from sam3_engine.engine.stage import Stage, WorkUnit, rows_table
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import REJECTS, UNITS


class OneRowPerUnit(Stage):
    name = "bench"
    outputs = (REJECTS,)

    @classmethod
    def build(cls, context) -> OneRowPerUnit:
        return cls()

    def plan(self, store) -> list[WorkUnit]:
        return []

    def process(self, unit: WorkUnit, prepared=None) -> dict[str, pa.Table]:
        row = {"input_id": unit.unit_id, "stage": self.name, "uri": None, "image_id": None, "reason": "bench", "detail": ""}
        return {REJECTS.name: rows_table(REJECTS, [row], unit.unit_id)}


def measure(units: int, compact_every: int, run_url: str, storage: StorageConfig) -> dict:
    store = TableStore(run_url, storage)
    runner = UnitRunner(store, "bench-attempt")
    stage = OneRowPerUnit()
    tenth = max(1, units // 10)
    per_tenth, started = [], time.perf_counter()
    for index in range(units):
        unit = WorkUnit(f"bench:{index:012d}", (index,))
        runner._commit(stage, unit, stage.process(unit))
        if (index + 1) % tenth == 0:
            now = time.perf_counter()
            per_tenth.append(round((now - started) / tenth * 1000, 1))
            started = now
    planned = time.perf_counter()
    done = store.done_units(stage.name)
    planning = time.perf_counter() - planned
    assert len(done) == units
    return {
        "units": units,
        "compact_every": compact_every,
        "ms_per_unit_by_tenth": per_tenth,
        "resume_planning_s": round(planning, 3),
        "files": {name: len(store.files(name)) for name in (REJECTS.name, UNITS.name)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, nargs="+", default=[1000])
    parser.add_argument("--compact-every", type=int, default=StorageConfig().compact_every)
    args = parser.parse_args()
    storage = StorageConfig(compact_every=args.compact_every)
    for units in args.units:
        with tempfile.TemporaryDirectory() as run_dir:
            print(json.dumps(measure(units, args.compact_every, run_dir, storage)), flush=True)


if __name__ == "__main__":
    main()
