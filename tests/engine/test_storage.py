"""Small table and text files read through storage: what Arrow is given to parse."""

import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet
import pytest

from sam3_engine.engine import storage
from sam3_engine.engine.config import StorageConfig


@pytest.fixture()
def arrow_sources(monkeypatch):
    """The source each Arrow reader is handed, recorded before it parses."""
    seen = []
    for module, name in ((pyarrow.csv, "read_csv"), (pyarrow.json, "read_json"), (pyarrow.parquet, "read_table")):
        original = getattr(module, name)

        def recording(source, *args, _original=original, **kwargs):
            seen.append(source)
            return _original(source, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return seen


def test_table_files_are_parsed_from_memory(tmp_path, arrow_sources):
    """A Python file object handed to Arrow is read from Arrow's IO threads; one still reading at exit aborts the
    process after the command has finished ("terminate called without an active exception", seen in calibrate)."""
    expected = pa.table({"pair_id": ["p1", "p2"], "present": [True, None]})
    (tmp_path / "labels.csv").write_text("pair_id,present\np1,true\np2,\n")
    (tmp_path / "labels.jsonl").write_text('{"pair_id": "p1", "present": true}\n{"pair_id": "p2", "present": null}\n')
    pyarrow.parquet.write_table(expected, tmp_path / "labels.parquet")
    for name in ("labels.csv", "labels.jsonl", "labels.parquet"):
        assert storage.read_table(str(tmp_path / name), StorageConfig()).equals(expected), name
    assert len(arrow_sources) == 3
    assert all(isinstance(source, pa.BufferReader) for source in arrow_sources)


def test_a_missing_table_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*gone.csv"):
        storage.read_table(str(tmp_path / "gone.csv"), StorageConfig())


def test_text_files_have_universal_newlines(tmp_path):
    (tmp_path / "vocabulary.txt").write_bytes("dog\r\ncafé\rcat\n".encode())
    assert storage.read_text(str(tmp_path / "vocabulary.txt"), StorageConfig()) == "dog\ncafé\ncat\n"
