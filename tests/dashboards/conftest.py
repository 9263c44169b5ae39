"""Shared by the dashboard tests: a live dashboard on 127.0.0.1, and a run whose phrases are hostile."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sam3_engine.dashboards.live import Dashboard, listen, server
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import TABLES
from tests.helpers import rewrite, rows

HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')
"""Phrases a caption or a vocabulary file could carry: shown as text, never run."""


@contextmanager
def serving(run_dir, **options) -> Iterator[str]:
    """A dashboard of ``run_dir`` served by uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    sock = listen("127.0.0.1", 0)
    web = server(Dashboard(str(run_dir), **options))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # waits for the server to be up; what the test sees does not depend on it
    assert web.started, "the dashboard did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def hostile_run(quickstart, tmp_path_factory):
    """A copy of the quickstart whose two concepts with the most masks are named with ``HOSTILE`` phrases, in every table."""
    run_dir, _ = quickstart
    copy = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(run_dir, copy)
    top = rows(copy, "SELECT concept_id FROM pairs GROUP BY concept_id ORDER BY sum(instance_count) DESC, concept_id LIMIT 2")
    renamed = {row["concept_id"]: phrase for row, phrase in zip(top, HOSTILE, strict=True)}
    for name, spec in TABLES.items():
        if "phrase" in spec.schema.names and "concept_id" in spec.schema.names and TableStore(str(copy)).open(name) is not None:
            rewrite(copy, name, "phrase", "concept_id", renamed)
    for name in ("pairs", "candidates"):
        assert rows(copy, f"SELECT count(*) AS n FROM {name} WHERE list_contains($p, phrase)", {"p": list(HOSTILE)})[0]["n"] > 0
    return copy, renamed
