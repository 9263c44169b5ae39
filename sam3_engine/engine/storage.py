"""Where bytes live: one place that turns a URL plus the storage config into fsspec and Delta options.

Credentials never come from config files: both fsspec (s3fs/botocore) and deltalake read the
standard AWS_* environment variables and credential files. The config only says where the
endpoint is and how to talk to it.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from sam3_engine.engine.config import ConfigError, StorageConfig


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``url`` and the path within it."""
    return url_to_fs(url, **fsspec_options(url, storage))


def fsspec_options(url: str, storage: StorageConfig) -> dict[str, Any]:
    if protocol_of(url) not in ("s3", "s3a"):
        return {}
    client_kwargs: dict[str, Any] = {}
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    options: dict[str, Any] = {"client_kwargs": client_kwargs}
    if storage.anonymous:
        options["anon"] = True
    return options


def delta_options(url: str, storage: StorageConfig) -> dict[str, str] | None:
    """Storage options for deltalake (delta-rs object_store keys)."""
    if protocol_of(url) not in ("s3", "s3a"):
        return None
    options: dict[str, str] = {}
    if storage.endpoint_url:
        options["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if storage.endpoint_url.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if storage.region:
        options["AWS_REGION"] = storage.region
    if storage.anonymous:
        options["AWS_SKIP_SIGNATURE"] = "true"
    if storage.s3_single_writer:
        # The engine commits from one driver process only, so a rename without a lock is safe.
        options["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
    return options


def read_text(url: str, storage: StorageConfig) -> str:
    """A small UTF-8 text file (a vocabulary, an ontology) at any fsspec URL, with universal newlines."""
    return io.TextIOWrapper(io.BytesIO(read_bytes(url, storage)), encoding="utf-8").read()


def read_table(url: str, storage: StorageConfig):
    """A small table file at any fsspec URL: Parquet, CSV, or JSON lines (by suffix), as a pyarrow Table.

    A blank CSV cell is a missing value (null) in every column, strings included: a file mixing rows
    of different kinds (pair labels and mask labels) leaves the other kind's cells blank.
    Arrow parses the file from its own memory (``arrow_buffer``).
    """
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    blank_is_null = pyarrow.csv.ConvertOptions(null_values=[""], strings_can_be_null=True)
    readers = {
        ".parquet": pyarrow.parquet.read_table,
        ".csv": lambda f: pyarrow.csv.read_csv(f, convert_options=blank_is_null),
        ".jsonl": pyarrow.json.read_json,
        ".ndjson": pyarrow.json.read_json,
    }
    suffix = next((s for s in readers if url.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{url}: expected a .parquet, .csv or .jsonl file")
    return readers[suffix](pa.BufferReader(arrow_buffer(read_bytes(url, storage))))


def read_bytes(url: str, storage: StorageConfig) -> bytes:
    """A whole file's bytes. For Arrow to parse, copy them with ``arrow_buffer``, never hand it the file object fsspec
    opens: Arrow reads that from its own IO threads, which call back into Python."""
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"no file at {url}")
    with fs.open(path, "rb") as f:
        return f.read()


def arrow_buffer(data: bytes):
    """A copy of ``data`` in Arrow's memory pool, for Arrow to parse.

    Arrow's readers can release their input on one of Arrow's threads after the read has returned (the CSV reader
    does). Releasing a buffer over Python bytes takes the GIL, and a thread that does so while the interpreter exits
    aborts the finished command ("terminate called without an active exception", seen in calibrate); releasing
    Arrow's own memory does not involve Python.
    """
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


def absolute_url(url: str) -> str:
    """A URL with an absolute local path, so that it means the same from every worker."""
    if protocol_of(url) == "file":
        return os.path.abspath(url.removeprefix("file://"))
    return url.rstrip("/")


UNSTORABLE_IN_TABLE_PATH = re.compile(r"[\[\]^|\\]|%[0-9A-Fa-f]{2}")
"""What Delta Lake cannot read back in a table's path: it parses the path as a URL (it panics on a bracket) and decodes escapes."""


def check_table_path(url: str) -> None:
    """A run directory Delta Lake cannot store tables under is a config error before anything is written."""
    found = UNSTORABLE_IN_TABLE_PATH.search(url.split("://", 1)[-1])
    if found:
        raise ConfigError(f"output {url!r}: Delta Lake cannot store tables under a path with {found.group()!r} in it; choose another name")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
