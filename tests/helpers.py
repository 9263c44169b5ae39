"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from html.parser import HTMLParser

import pyarrow as pa

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine import catalog
from sam3_engine.engine.config import load_config
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import TABLES


def ingest(input_url, output, **overrides):
    """Run the ingest stage in-process; returns the RunResult."""
    config = load_config(None, {"input": str(input_url), "output": str(output), "stages": "ingest", **overrides})
    return run_pipeline(config)


def run_command(*arguments, settings: Iterable[str] = (), **flags) -> list[str]:
    """``sam3-engine run -q`` as a command line for a subprocess: ``flags`` as ``--name value``, ``settings`` as ``--set``."""
    command = [sys.executable, "-m", "sam3_engine", "run", "-q", *map(str, arguments)]
    for name, value in flags.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    for setting in settings:
        command += ["--set", setting]
    return command


def without_ray_address() -> dict[str, str]:
    """This process's environment without RAY_ADDRESS: a run started with it starts its own local Ray, as on a fresh
    machine, instead of joining a cluster a test fixture started."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def rows(run_dir, sql, params=None, **kwargs):
    return catalog.query(str(run_dir), sql, params, **kwargs).to_pylist()


def rewrite(run_dir, name: str, column: str, key: str, values: dict) -> None:
    """Set ``column`` of table ``name`` to ``values[row's key]`` where the row's ``key`` is in ``values``, in one commit."""
    store = TableStore(str(run_dir))
    table = store.read(name)
    changed = [values.get(k, v) for k, v in zip(table[key].to_pylist(), table[column].to_pylist(), strict=True)]
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(changed, table.schema.field(column).type))
    store.overwrite(TABLES[name], pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))


class _Cells(HTMLParser):
    """The text of every cell of one table, by row and column key, and every script's source attribute."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.body, self.column = table_id, False, False, None
        self.rows: list[dict[str, str]] = []
        self.script_sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and "src" in attrs:
            self.script_sources.append(attrs["src"])
        if tag == "table":
            self.inside = attrs.get("id") == self.table_id
        elif self.inside and tag == "tbody":
            self.body = True
        elif self.inside and self.body and tag == "tr":
            self.rows.append({})
        elif self.inside and tag == "td":
            self.column = attrs["data-column"]
            self.rows[-1][self.column] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = self.body = False
        elif tag == "td":
            self.column = None

    def handle_data(self, data):
        if self.inside and self.column:
            self.rows[-1][self.column] += data


def table_cells(page: str, table_id: str) -> _Cells:
    """The cells of the report's table ``table_id`` (``.rows``: per row, column key to text) and the page's script sources."""
    parser = _Cells(table_id)
    parser.feed(page)
    return parser
