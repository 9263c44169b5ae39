"""The run's tables: Delta Lake tables (Parquet files plus a transaction log) on any storage.

Every write replaces the rows of one work unit in one Delta commit (``overwrite`` with a
predicate on the unit column), so a commit is atomic and idempotent: a unit that is committed
twice, for instance after a crash between its table commits, still has its rows exactly once.
The ``units`` ledger is committed last; a unit in the ledger is done.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from sam3_engine.engine import storage
from sam3_engine.engine.config import StorageConfig
from sam3_engine.schemas.tables import TABLES, UNITS, TableSpec, validate

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")


def _literal(value: str) -> str:
    """A SQL string literal for a Delta predicate; ids are engine-made, checked against a strict pattern."""
    if not _SAFE_ID.match(value):
        raise ValueError(f"not a valid unit or attempt id: {value!r}")
    return f"'{value}'"


@dataclass(frozen=True)
class LedgerEntry:
    """One unit's row in the ``units`` ledger: what it read and wrote."""

    unit_id: str
    num_inputs: int
    rows_written: dict[str, int]
    stats: dict[str, float] = field(default_factory=dict)


class TableStore:
    """Reads and writes the Delta tables under one run directory."""

    def __init__(self, run_url: str, storage_config: StorageConfig | None = None):
        self.run_url = storage.absolute_url(run_url)
        self.storage_config = storage_config or StorageConfig()
        self._delta_options = storage.delta_options(self.run_url, self.storage_config)

    def table_url(self, name: str) -> str:
        return storage.join(self.run_url, "tables", name)

    def open(self, name: str) -> DeltaTable | None:
        try:
            return DeltaTable(self.table_url(name), storage_options=self._delta_options)
        except TableNotFoundError:
            return None

    def dataset(self, name: str):
        """The committed rows of a table as a pyarrow dataset (an empty table when never written)."""
        table = self.open(name)
        return TABLES[name].empty() if table is None else table.to_pyarrow_dataset()

    def files(self, name: str) -> list[str]:
        """The Parquet files of a table's latest commit (none when never written).

        Delta Lake gives them percent-encoded (a space as ``%20``, ``é`` as ``%C3%A9``); the filesystem wants the names.
        """
        table = self.open(name)
        return [] if table is None else [unquote(uri) for uri in table.file_uris()]

    def read_images(self, name: str, image_ids: list[str], columns: list[str]) -> pa.Table:
        """The rows of ``name`` about these images (a unit's), with the filter pushed down to the files."""
        dataset = self.dataset(name)
        dataset = ds.dataset(dataset) if isinstance(dataset, pa.Table) else dataset
        return dataset.to_table(columns=columns, filter=pc.field("image_id").isin(image_ids))

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        table = self.open(name)
        spec = TABLES[name]
        if table is None:
            empty = spec.empty()
            return empty.select(columns) if columns else empty
        return table.to_pyarrow_table(columns=columns)

    def replace(self, spec: TableSpec, keys: str | Collection[str], rows: pa.Table | pa.RecordBatchReader | Sequence[pa.Table]) -> int:
        """Make ``rows`` the only rows of ``spec`` whose replace column is one of ``keys``: one commit, however many keys
        (several finished units committed together). ``rows`` may come as one table per key; all are validated together."""
        keys = [keys] if isinstance(keys, str) else sorted(set(keys))
        rows = rows.read_all() if isinstance(rows, pa.RecordBatchReader) else rows
        parts = [rows] if isinstance(rows, pa.Table) else list(rows)
        rows = pa.concat_tables(parts, promote_options="default") if parts else spec.stored_schema.empty_table()
        rows = validate(spec, rows).cast(spec.stored_schema)
        stray = set(rows.column(spec.replace_column).unique().to_pylist()) - set(keys) if rows.num_rows else set()
        if stray:
            raise ValueError(f"rows for {spec.name!r} have {spec.replace_column} {sorted(stray)[:3]}, outside the keys replaced")
        write_deltalake(
            self.table_url(spec.name),
            rows,
            mode="overwrite",
            predicate=_in_predicate(spec.replace_column, keys),
            storage_options=self._delta_options,
        )
        return rows.num_rows

    def overwrite(self, spec: TableSpec, rows: pa.RecordBatchReader) -> int:
        """Replace a whole table in one commit (for tables derived from all of another's rows)."""
        checked = pa.RecordBatchReader.from_batches(spec.stored_schema, _validated(spec, rows))
        written = 0

        def counted():
            nonlocal written
            for batch in checked:
                written += batch.num_rows
                yield batch

        write_deltalake(
            self.table_url(spec.name),
            pa.RecordBatchReader.from_batches(spec.stored_schema, counted()),
            mode="overwrite",
            schema_mode="overwrite",
            storage_options=self._delta_options,
        )
        return written

    def compact(self, name: str) -> int:
        """Rewrite the table's small files as large ones: one atomic Delta commit, the rows unchanged. Returns the files it
        took out of the table. A kill before the commit leaves the table as it was (the new files are unreferenced)."""
        table = self.open(name)
        return 0 if table is None else int(table.optimize.compact().get("numFilesRemoved", 0))

    def vacuum(self, name: str) -> None:
        """Delete the files no version of the table has needed for ``vacuum_retention_hours``: those compaction replaced,
        and those a killed commit left unreferenced. A reader holding an older snapshot keeps its files until then."""
        table = self.open(name)
        if table is not None:
            table.vacuum(retention_hours=self.storage_config.vacuum_retention_hours, dry_run=False, enforce_retention_duration=False)

    def trim_log(self, name: str) -> None:
        """Checkpoint the table's log and delete the commit files before the checkpoint that are older than
        ``vacuum_retention_hours``: loading the table (every commit does) lists the log, so an ever-growing log would make
        every commit slower. The table's rows are in the checkpoint; only time travel to older versions is given up."""
        table = self.open(name)
        if table is None:
            return
        retention = f"interval {self.storage_config.vacuum_retention_hours} hours"
        if table.metadata().configuration.get("delta.logRetentionDuration") != retention:
            table.alter.set_table_properties({"delta.logRetentionDuration": retention}, raise_if_not_exists=False)
            table = self.open(name)
        table.create_checkpoint()
        table.cleanup_metadata()

    def delete_units(self, spec: TableSpec, unit_ids: Iterable[str]) -> None:
        unit_ids = sorted(set(unit_ids))
        if not unit_ids:
            return
        predicate = _in_predicate(spec.replace_column, unit_ids)
        table = self.open(spec.name)
        if table is not None:
            table.delete(predicate)

    def ledger(self) -> dict[str, set[str]]:
        """Every done unit, by ledger stage: one read, which the runner keeps for the rest of its attempt."""
        ledger = self.read(UNITS.name, columns=["unit_id", "stage"])
        done: dict[str, set[str]] = {}
        for unit_id, stage in zip(ledger["unit_id"].to_pylist(), ledger["stage"].to_pylist(), strict=True):
            done.setdefault(stage, set()).add(unit_id)
        return done

    def done_units(self, stage: str) -> set[str]:
        return self.ledger().get(stage, set())

    def record_units(self, stage: str, attempt_id: str, entries: Sequence[LedgerEntry]) -> None:
        """Mark units done in one ledger commit, after their rows are committed."""
        now = datetime.now(UTC)
        rows = pa.table(
            {
                "unit_id": [e.unit_id for e in entries],
                "stage": [stage] * len(entries),
                "attempt_id": [attempt_id] * len(entries),
                "num_inputs": [e.num_inputs for e in entries],
                "rows_written": pa.array([list(e.rows_written.items()) for e in entries], type=pa.map_(pa.string(), pa.int64())),
                "stats": pa.array([list((e.stats or {}).items()) for e in entries], type=pa.map_(pa.string(), pa.float64())),
                "committed_at": [now] * len(entries),
            }
        )
        self.replace(UNITS, [e.unit_id for e in entries], rows)

    def record_unit(
        self,
        stage: str,
        unit_id: str,
        attempt_id: str,
        num_inputs: int,
        rows_written: dict[str, int],
        stats: dict[str, float] | None = None,
    ) -> None:
        self.record_units(stage, attempt_id, [LedgerEntry(unit_id, num_inputs, rows_written, stats or {})])


def _in_predicate(column: str, keys: Sequence[str]) -> str:
    """A Delta predicate selecting these keys' rows (one key: an equality, which delta-rs prunes files with)."""
    literals = [_literal(k) for k in keys]
    return f"{column} = {literals[0]}" if len(literals) == 1 else f"{column} IN ({', '.join(literals)})"


def _validated(spec: TableSpec, reader: pa.RecordBatchReader):
    for batch in reader:
        yield from validate(spec, pa.Table.from_batches([batch])).cast(spec.stored_schema).to_batches()
