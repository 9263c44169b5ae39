"""DuckDB over a run's committed tables.

Each table becomes a view of its name over the files of the table's latest Delta commit, so a
query never sees a half-written unit. Tables a run has not written yet appear empty, with their
declared schema, so queries work at any point of a run.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import duckdb

from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import TABLES


def connect(run: str | TableStore, storage_config: StorageConfig | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of ``run`` (a run URL or its store)."""
    store = run if isinstance(run, TableStore) else TableStore(run, storage_config)
    con = duckdb.connect()
    for name in TABLES:
        con.register(name, store.dataset(name))
    return con


def query(run: str | TableStore, sql: str, params: dict[str, Any] | list[Any] | None = None, storage_config: StorageConfig | None = None):
    """Run ``sql`` with bound ``params`` over the run's tables; returns a pyarrow Table."""
    con = connect(run, storage_config)
    try:
        return con.sql(sql, params=params or None).to_arrow_table()
    finally:
        con.close()


def named_query(name: str) -> str:
    """The text of a packaged query file, ``sam3_engine/schemas/sql/<name>.sql``."""
    return resources.files("sam3_engine.schemas").joinpath("sql", f"{name}.sql").read_text()
