"""What a unit's commit costs as a run grows, and what planning a resume costs, with and without compaction.

    python benchmarks/commit_cost.py --units 1000 10000                      # local disk, one unit per commit
    python benchmarks/commit_cost.py --units 1000 100000 --group 16          # 16 units finish together
    python benchmarks/commit_cost.py --units 1000 --s3                       # on a loopback S3 server (moto)
    python benchmarks/commit_cost.py --units 1000 --compact-every 1000000    # no compaction until the end (as before)

Drives ``UnitRunner``'s own commit path (``_commit``: one Delta commit per output table for the
units that finished together, then one to the ledger, then compaction every
``storage.compact_every`` commits) with one output table and one row per unit, as the issue
measured ``record_unit``; no worker, no model. Reports the mean commit time per unit over each
tenth of the run, the time of reading the ledger (what planning a resume reads, once) at the end,
and the files in each table's current version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

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


def measure(units: int, group: int, run_url: str, storage: StorageConfig) -> dict:
    store = TableStore(run_url, storage)
    runner = UnitRunner(store, "bench-attempt")
    stage = OneRowPerUnit()
    tenth = max(group, units // 10 // group * group)
    per_tenth, started = [], time.perf_counter()
    for first in range(0, units, group):
        finished = [WorkUnit(f"bench:{index:012d}", (index,)) for index in range(first, min(units, first + group))]
        runner._commit(stage, [(unit, stage.process(unit)) for unit in finished])
        if (first + group) % tenth == 0:
            now = time.perf_counter()
            per_tenth.append(round((now - started) / tenth * 1000, 2))
            started = now
    planned = time.perf_counter()
    done = TableStore(run_url, storage).ledger()[stage.name]
    planning = time.perf_counter() - planned
    assert len(done) == units
    return {
        "units": units,
        "units_per_commit": group,
        "compact_every": storage.compact_every,
        "retention_h": storage.vacuum_retention_hours,
        "storage": "s3" if run_url.startswith("s3://") else "local",
        "ms_per_unit_by_tenth": per_tenth,
        "resume_planning_s": round(planning, 3),
        "files": {name: len(store.files(name)) for name in (REJECTS.name, UNITS.name)},
        "log_files": {name: len(store_log(store, name)) for name in (REJECTS.name, UNITS.name)},
    }


def store_log(store: TableStore, name: str) -> list[str]:
    """The files in a table's ``_delta_log`` (commits and checkpoints): what loading the table lists."""
    from sam3_engine.engine import storage

    fs, path = storage.filesystem(storage.join(store.table_url(name), "_delta_log"), store.storage_config)
    return fs.ls(path, detail=False)


@contextlib.contextmanager
def loopback_s3():
    """A moto S3 server on 127.0.0.1 with a bucket; yields its endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, nargs="+", default=[1000])
    parser.add_argument("--group", type=int, default=1, help="units that finish together, committed together")
    parser.add_argument("--compact-every", type=int, default=StorageConfig().compact_every)
    parser.add_argument("--s3", action="store_true", help="run directory on a loopback S3 server (moto)")
    parser.add_argument("--vacuum-retention-hours", type=int, default=StorageConfig().vacuum_retention_hours)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(loopback_s3()) if args.s3 else None
        storage = StorageConfig(
            compact_every=args.compact_every,
            units_per_commit=args.group,
            endpoint_url=endpoint,
            vacuum_retention_hours=args.vacuum_retention_hours,
        )
        for units in args.units:
            if endpoint:
                print(json.dumps(measure(units, args.group, f"s3://bench/{uuid.uuid4().hex}", storage)), flush=True)
                continue
            with tempfile.TemporaryDirectory() as run_dir:
                print(json.dumps(measure(units, args.group, run_dir, storage)), flush=True)


if __name__ == "__main__":
    main()
