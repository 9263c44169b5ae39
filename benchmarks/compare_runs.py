"""Compare the rows two runs wrote, to show that a change (a refactor) left the pipeline's output as it was.

    python benchmarks/compare_runs.py RUN_A RUN_B

Reads every Delta table under RUN_A/tables and RUN_B/tables and compares each table's rows as sorted lists (rows turned to
repr, so row order, column order and NaN do not matter). ``runs`` is skipped: it is timings and attempt ids. Columns that differ
from one attempt to the next by nature are dropped first: attempt and run ids, ``*seconds*``, ``started*``, ``finished*``,
``committed_at``, ``peak_*`` and any timestamp column; so are such keys inside map columns (the ``units`` ledger's ``stats``
holds ``model_seconds`` and ``peak_rss_mib``). Prints a line per table and exits 1 if any table differs or is in one run only.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

SKIPPED = {"runs"}
PER_ATTEMPT = re.compile(r"attempt_id|run_id|seconds|^started|^finished|committed_at|^peak_")
SHOWN = 3


def read_tables(run: Path) -> dict[str, pa.Table]:
    root = run / "tables"
    return {p.name: DeltaTable(str(p)).to_pyarrow_table() for p in sorted(root.iterdir()) if (p / "_delta_log").is_dir()}


def per_attempt_columns(table: pa.Table) -> set[str]:
    return {f.name for f in table.schema if PER_ATTEMPT.search(f.name) or pa.types.is_timestamp(f.type)}


def row_reprs(table: pa.Table, drop: set[str], dropped_keys: set[str]) -> list[str]:
    """Each row as the repr of a dict with sorted keys, ``drop`` left out and per-attempt keys taken out of map columns."""
    maps = {f.name for f in table.schema if pa.types.is_map(f.type)}
    rows = []
    for row in table.drop_columns(sorted(drop & set(table.column_names))).to_pylist():
        for name in maps & row.keys():
            if row[name] is not None:
                dropped_keys.update(f"{name}[{k}]" for k, _ in row[name] if PER_ATTEMPT.search(k))
                row[name] = sorted((k, v) for k, v in row[name] if not PER_ATTEMPT.search(k))
        rows.append(repr({k: row[k] for k in sorted(row)}))
    return sorted(rows)


def short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def compare(run_a: Path, run_b: Path) -> bool:
    tables_a, tables_b = read_tables(run_a), read_tables(run_b)
    same = True
    for name in sorted(tables_a.keys() | tables_b.keys()):
        if name in SKIPPED:
            print(f"{name}: skipped (timings and attempt ids)")
            continue
        if name not in tables_a or name not in tables_b:
            print(f"{name}: only in {'A' if name in tables_a else 'B'}")
            same = False
            continue
        a, b = tables_a[name], tables_b[name]
        drop = per_attempt_columns(a) | per_attempt_columns(b)
        dropped_keys: set[str] = set()
        rows_a, rows_b = row_reprs(a, drop, dropped_keys), row_reprs(b, drop, dropped_keys)
        if dropped := sorted(drop) + sorted(dropped_keys):
            print(f"{name}: dropped {', '.join(dropped)}")
        if rows_a == rows_b:
            print(f"{name}: A {len(rows_a)} rows, B {len(rows_b)} rows, same")
            continue
        same = False
        only_a = sorted((Counter(rows_a) - Counter(rows_b)).elements())
        only_b = sorted((Counter(rows_b) - Counter(rows_a)).elements())
        print(f"{name}: A {len(rows_a)} rows, B {len(rows_b)} rows, DIFFERENT ({len(only_a)} rows only in A, {len(only_b)} only in B)")
        for side, rows in (("A", only_a), ("B", only_b)):
            for row in rows[:SHOWN]:
                print(f"  only in {side}: {short(row)}")
    return same


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RUN_A RUN_B")
    code = 0 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 1
    sys.stdout.flush()
    os._exit(code)  # not sys.exit: deltalake's runtime threads sometimes abort the interpreter's shutdown ("terminate called ...")


if __name__ == "__main__":
    main()
