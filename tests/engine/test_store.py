import pyarrow as pa
import pytest

from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import REJECTS, TABLES, SchemaError, validate


def _rejects(unit_id, ids, reason="corrupt"):
    return pa.table(
        {
            "input_id": ids,
            "stage": ["ingest"] * len(ids),
            "uri": [f"/x/{i}" for i in ids],
            "image_id": [None] * len(ids),
            "reason": [reason] * len(ids),
            "detail": ["d"] * len(ids),
            "unit_id": [unit_id] * len(ids),
        }
    )


def test_replacing_a_unit_twice_keeps_its_rows_once(tmp_path):
    store = TableStore(str(tmp_path))
    store.replace(REJECTS, "ingest:a", _rejects("ingest:a", ["1", "2"]))
    store.replace(REJECTS, "ingest:b", _rejects("ingest:b", ["3"]))
    store.replace(REJECTS, "ingest:a", _rejects("ingest:a", ["1", "2"], reason="truncated"))
    table = store.read("rejects").sort_by("input_id")
    assert table["input_id"].to_pylist() == ["1", "2", "3"]
    assert table["reason"].to_pylist() == ["truncated", "truncated", "corrupt"]
    store.delete_units(REJECTS, ["ingest:a"])
    assert store.read("rejects")["input_id"].to_pylist() == ["3"]


def test_writes_are_validated_against_the_declared_schema(tmp_path):
    store = TableStore(str(tmp_path))
    with pytest.raises(SchemaError, match="not nullable"):
        store.replace(REJECTS, "ingest:a", _rejects("ingest:a", ["1"]).set_column(4, "reason", pa.array([None], pa.string())))
    with pytest.raises(SchemaError, match="duplicate"):
        store.replace(REJECTS, "ingest:a", _rejects("ingest:a", ["1", "1"]))
    with pytest.raises(SchemaError, match="columns"):
        store.replace(REJECTS, "ingest:a", _rejects("ingest:a", ["1"]).drop(["detail"]))
    with pytest.raises(ValueError, match="outside the keys replaced"):
        store.replace(REJECTS, "ingest:a", _rejects("ingest:b", ["1"]))
    with pytest.raises(ValueError, match="not a valid"):
        store.delete_units(REJECTS, ["x'); DROP"])
    assert store.open("rejects") is None


def test_every_column_is_documented_and_versioned():
    for spec in TABLES.values():
        assert spec.version >= 1 and spec.doc
        for field in spec.schema:
            assert field.metadata[b"doc"], (spec.name, field.name)
        validate(spec, spec.empty())


def test_a_reworded_column_doc_does_not_lock_out_existing_tables(tmp_path):
    """Docs stay in the code: tables written with docs (older runs) and without both take writes from a spec whose doc changed."""
    import dataclasses

    from deltalake import write_deltalake

    store = TableStore(str(tmp_path / "run"))
    older = _rejects("ingest:a", ["1"]).cast(REJECTS.schema)
    write_deltalake(store.table_url(REJECTS.name), older)  # an older run's files, docs in the field metadata
    reworded = dataclasses.replace(REJECTS, columns=tuple(dataclasses.replace(c, doc=c.doc + " (reworded)") for c in REJECTS.columns))
    store.replace(reworded, "ingest:b", _rejects("ingest:b", ["2"]))
    store.replace(REJECTS, "ingest:c", _rejects("ingest:c", ["3"]))
    assert sorted(store.read("rejects")["input_id"].to_pylist()) == ["1", "2", "3"]


def test_units_finished_together_are_replaced_and_recorded_in_one_commit_each(tmp_path):
    from deltalake import DeltaTable

    from sam3_engine.engine.store import LedgerEntry

    store = TableStore(str(tmp_path))
    store.replace(REJECTS, "ingest:a", _rejects("ingest:a", ["1", "2"]))
    store.replace(REJECTS, "ingest:c", _rejects("ingest:c", ["9"]))
    before = DeltaTable(store.table_url("rejects")).version()
    # a's rows replaced (one row now), b's added, b given as its own table, c untouched
    written = store.replace(REJECTS, ["ingest:a", "ingest:b"], [_rejects("ingest:a", ["1"]), _rejects("ingest:b", ["3", "4"])])
    assert written == 3
    assert DeltaTable(store.table_url("rejects")).version() == before + 1
    table = store.read("rejects").sort_by("input_id")
    assert list(zip(table["input_id"].to_pylist(), table["unit_id"].to_pylist(), strict=True)) == [
        ("1", "ingest:a"),
        ("3", "ingest:b"),
        ("4", "ingest:b"),
        ("9", "ingest:c"),
    ]
    store.record_units("ingest", "attempt-1", [LedgerEntry("ingest:a", 1, {"rejects": 1}), LedgerEntry("ingest:b", 2, {"rejects": 2})])
    assert DeltaTable(store.table_url("units")).version() == 0, "both units in the ledger's first commit"
    store.record_unit("mine", "mine:x", "attempt-1", 5, {})
    assert store.ledger() == {"ingest": {"ingest:a", "ingest:b"}, "mine": {"mine:x"}}
    assert store.done_units("ingest") == {"ingest:a", "ingest:b"} and store.done_units("splits") == set()
