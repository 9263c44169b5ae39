"""One run: a run directory with its metadata, the stages in order, and a summary at the end.

The run directory (any fsspec URL) holds ``run.json`` (run id, engine version, git commit),
``config.yaml`` (the resolved configuration of the latest attempt) and ``tables/``. Restarting a
run with the same directory resumes it: committed units are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

import sam3_engine
from sam3_engine.engine import storage
from sam3_engine.engine.catalog import connect
from sam3_engine.engine.config import ConfigError, RunConfig
from sam3_engine.engine.runner import StageReport, UnitRunner
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import RUNS
from sam3_engine.stages.base import Stage
from sam3_engine.stages.ingest import IngestStage


class ReconciliationError(RuntimeError):
    """A stage's outputs do not account for every one of its inputs."""


@dataclass
class RunResult:
    run_id: str
    attempt_id: str
    output: str
    engine_version: str
    git_commit: str | None
    seconds: float
    stages: list[StageReport]


def build_stage(name: str, config: RunConfig) -> Stage:
    if name == "ingest":
        if not config.input:
            raise ConfigError("the ingest stage needs an input: set `input:` in the config or pass --input")
        return IngestStage(storage.absolute_url(config.input), config.ingest, config.storage)
    raise ConfigError(f"unknown stage {name!r}")


def git_commit() -> str | None:
    """The engine's source commit when it runs from a git checkout (an editable install)."""
    source = Path(sam3_engine.__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _run_metadata(config: RunConfig) -> dict:
    """Read the run's ``run.json``, creating it on the first attempt; rewrite ``config.yaml``."""
    fs, root = storage.filesystem(config.output, config.storage)
    fs.makedirs(root, exist_ok=True)
    meta_path = storage.join(root, "run.json")
    if fs.exists(meta_path):
        with fs.open(meta_path, "r") as f:
            meta = json.load(f)
    else:
        meta = {"run_id": uuid.uuid4().hex, "created_at": datetime.now(timezone.utc).isoformat()}
    meta.update(engine_version=sam3_engine.__version__, git_commit=git_commit())
    with fs.open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    with fs.open(storage.join(root, "config.yaml"), "w") as f:
        f.write(config.to_yaml())
    return meta


def _runs_row(meta: dict, attempt_id: str, config: RunConfig, started: datetime, status: str, summary=None, error=None) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "attempt_id": attempt_id,
                "run_id": meta["run_id"],
                "status": status,
                "started_at": started,
                "finished_at": None if status == "running" else datetime.now(timezone.utc),
                "engine_version": meta["engine_version"],
                "git_commit": meta["git_commit"],
                "stages": list(config.stages),
                "config_yaml": config.to_yaml(),
                "summary_json": None if summary is None else json.dumps(summary, default=str),
                "error": error,
            }
        ],
        schema=RUNS.schema,
    )


def run_pipeline(config: RunConfig, progress=None) -> RunResult:
    """Run ``config.stages`` in order into ``config.output``; safe to call again after a crash."""
    clock = time.monotonic()
    stages = [build_stage(name, config) for name in config.stages]
    meta = _run_metadata(config)
    store = TableStore(config.output, config.storage)
    attempt_id = uuid.uuid4().hex
    started = datetime.now(timezone.utc)
    store.replace(RUNS, attempt_id, _runs_row(meta, attempt_id, config, started, "running"))
    runner = UnitRunner(store, attempt_id, config.ingest.workers or os.cpu_count() or 1, progress)
    reports: list[StageReport] = []
    try:
        for stage in stages:
            report = runner.run(stage)
            con = connect(store)
            report.counts = stage.summarize(con)
            con.close()
            accounted = report.counts.pop("accounted", None)
            if accounted is not None and accounted != report.items_total:
                raise ReconciliationError(
                    f"stage {stage.name}: {report.items_total} inputs but {accounted} rows in its result and rejects tables"
                )
            reports.append(report)
    except BaseException as exc:
        summary = {"stages": [asdict(r) for r in reports]}
        store.replace(RUNS, attempt_id, _runs_row(meta, attempt_id, config, started, "failed", summary, f"{type(exc).__name__}: {exc}"))
        raise
    result = RunResult(meta["run_id"], attempt_id, store.run_url, meta["engine_version"], meta["git_commit"], time.monotonic() - clock, reports)
    summary = {"seconds": result.seconds, "stages": [asdict(r) for r in reports]}
    store.replace(RUNS, attempt_id, _runs_row(meta, attempt_id, config, started, "finished", summary))
    return result
