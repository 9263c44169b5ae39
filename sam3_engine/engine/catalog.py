"""DuckDB over a run's committed tables.

Each table becomes a view of its name over the files of the table's latest Delta commit, so a
query never sees a half-written unit. Tables a run has not written yet appear empty, with their
declared schema, so queries work at any point of a run. Every connection also has the verdict
macros (``schemas/sql/verdicts.sql``) and the mask function they use, ``rle_uncovered_fraction``,
and the coverage measures (``schemas/sql/coverage_macros.sql``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import duckdb
import pyarrow as pa
from pycocotools import mask as mask_utils

from sam3_engine.engine import storage
from sam3_engine.engine.config import MASK_REASONS, VERDICT_THRESHOLDS, StorageConfig
from sam3_engine.engine.stage import discover
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import TABLES

STREAM_BATCH_ROWS = 10_000
"""Rows per batch of a streamed result: small enough for wide rows (masks' RLE), large enough to be cheap per row."""


class RunUnreadable(Exception):
    """A table of the run cannot be read (a damaged or half-copied run directory): one line for the person, not a traceback."""


def connect(run: str | TableStore, storage_config: StorageConfig | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of ``run`` (a run URL or its store)."""
    discover()  # the tables of every installed stage, a plugin's too
    store = run if isinstance(run, TableStore) else TableStore(run, storage_config)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # DuckDB draws it on stdout: it would corrupt CSV and JSON output
    if storage.protocol_of(store.run_url) != "file":
        con.register_filesystem(storage.filesystem(store.run_url, store.storage_config)[0])
    for name in TABLES:
        try:
            files = store.files(name)
            if files:  # DuckDB's own reader: filters and projections reach the Parquet pages, not just the files
                listed = ", ".join(_quoted(path) for path in files)  # a view binds no parameters: the paths are quoted
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}], union_by_name = true)")
            else:
                con.register(name, TABLES[name].empty())
        except Exception as exc:  # noqa: BLE001 - deltalake, DuckDB and fsspec each raise their own kinds
            con.close()
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RunUnreadable(f"cannot read table {name} of {store.run_url}: {type(exc).__name__}: {detail}") from exc
    con.create_function(
        "rle_uncovered_fraction",
        _uncovered_fractions,
        ["INTEGER", "INTEGER", "VARCHAR", "VARCHAR[]"],
        "DOUBLE",
        type="arrow",
        null_handling="special",
    )
    con.execute(verdict_macros())
    con.execute(named_query("coverage_macros"))
    return con


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def verdict_macros() -> str:
    """``verdicts.sql`` with each macro's ``{{<macro> thresholds}}`` filled in from the one declaration of its thresholds."""
    sql = named_query("verdicts")
    for macro, declared in VERDICT_THRESHOLDS.items():
        parameters = ",\n    ".join(f"{name} := {_literal(field.default)}" for name, field in declared.model_fields.items())
        sql = sql.replace(f"{{{{{macro} thresholds}}}}", parameters)
    return sql


def _literal(value: Any) -> str:
    """A threshold's default as SQL text: a macro definition binds no parameters, so only numbers and known mask reasons are written."""
    if isinstance(value, tuple) and set(value) <= set(MASK_REASONS):
        return "[" + ", ".join(f"'{reason}'" for reason in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float("-inf") < value < float("inf"):
        return repr(value)
    raise TypeError(f"threshold default {value!r} is neither a finite number nor a tuple of mask reasons")


def uncovered_fraction(height: int, width: int, foreground: str | None, masks: list[str]) -> float | None:
    """Share of the ``foreground`` RLE outside the union of the ``masks`` RLEs (all COCO counts strings of one size).

    None without a foreground; 0 for an empty one (nothing to cover).
    """
    if foreground is None:
        return None
    region = {"size": [height, width], "counts": foreground.encode()}
    area = int(mask_utils.area(region))
    if area == 0:
        return 0.0
    if not masks:
        return 1.0
    union = mask_utils.merge([{"size": [height, width], "counts": counts.encode()} for counts in masks], intersect=False)
    covered = int(mask_utils.area(mask_utils.merge([region, union], intersect=True)))
    return 1.0 - covered / area


def _uncovered_fractions(heights: pa.Array, widths: pa.Array, foregrounds: pa.Array, masks: pa.Array) -> pa.Array:
    rows = zip(heights.to_pylist(), widths.to_pylist(), foregrounds.to_pylist(), masks.to_pylist(), strict=True)
    return pa.array([uncovered_fraction(h, w, f, m or []) for h, w, f, m in rows], pa.float64())


def query(run: str | TableStore, sql: str, params: dict[str, Any] | list[Any] | None = None, storage_config: StorageConfig | None = None):
    """Run ``sql`` with bound ``params`` over the run's tables; returns a pyarrow Table."""
    with stream(run, sql, params, storage_config) as reader:
        return reader.read_all()


@contextmanager
def stream(
    run: str | TableStore,
    sql: str,
    params: dict[str, Any] | list[Any] | None = None,
    storage_config: StorageConfig | None = None,
    batch_rows: int = STREAM_BATCH_ROWS,
) -> Iterator[pa.RecordBatchReader]:
    """Run ``sql`` with bound ``params`` over the run's tables; yields its result as batches that DuckDB makes as they are read.

    Memory holds a batch or so, not the result; stop reading and the rest is never computed. A ValueError when the SQL has no
    statement that returns rows (empty, or only comments).
    """
    con = connect(run, storage_config)
    try:
        relation = con.sql(sql, params=params or None)
        if relation is None:
            raise ValueError("the SQL has no statement that returns rows")
        yield relation.to_arrow_reader(batch_rows)
    finally:
        con.close()


def named_query(name: str) -> str:
    """The text of a packaged query file, ``sam3_engine/schemas/sql/<name>.sql``."""
    return resources.files("sam3_engine.schemas").joinpath("sql", f"{name}.sql").read_text()
