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
    """The source each Arrow reader is handed and, for an in-memory reader, the buffer it reads: recorded before it parses."""
    seen = []
    for module, name in ((pyarrow.csv, "read_csv"), (pyarrow.json, "read_json"), (pyarrow.parquet, "read_table")):
        original = getattr(module, name)

        def recording(source, *args, _original=original, **kwargs):
            memory = None
            if isinstance(source, pa.BufferReader):
                memory = source.read_buffer().parent  # a slice of the buffer the reader reads
                source.seek(0)
            seen.append((source, memory))
            return _original(source, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return seen


def test_table_files_are_parsed_from_a_copy_in_arrows_memory(tmp_path, arrow_sources):
    """Arrow must be handed neither a Python file object (read from Arrow's IO threads) nor a buffer over Python bytes
    (its CSV reader drops its input on one of its threads after returning, which then takes the GIL). Either, still
    alive at exit, aborts the finished command ("terminate called without an active exception", seen in calibrate)."""
    expected = pa.table({"pair_id": ["p1", "p2"], "present": [True, None]})
    (tmp_path / "labels.csv").write_text("pair_id,present\np1,true\np2,\n")
    (tmp_path / "labels.jsonl").write_text('{"pair_id": "p1", "present": true}\n{"pair_id": "p2", "present": null}\n')
    pyarrow.parquet.write_table(expected, tmp_path / "labels.parquet")
    for name in ("labels.csv", "labels.jsonl", "labels.parquet"):
        assert storage.read_table(str(tmp_path / name), StorageConfig()).equals(expected), name
        source, memory = arrow_sources[-1]
        assert isinstance(source, pa.BufferReader), name
        assert memory.size == (tmp_path / name).stat().st_size, name
        # Python bytes are immutable, so a buffer over them is too; the copy Arrow allocated is its own, writable.
        assert memory.is_mutable, f"{name} was not copied into Arrow's memory"
    assert len(arrow_sources) == 3


def test_a_missing_table_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*gone.csv"):
        storage.read_table(str(tmp_path / "gone.csv"), StorageConfig())


def test_text_files_have_universal_newlines(tmp_path):
    (tmp_path / "vocabulary.txt").write_bytes("dog\r\ncafé\rcat\n".encode())
    assert storage.read_text(str(tmp_path / "vocabulary.txt"), StorageConfig()) == "dog\ncafé\ncat\n"
