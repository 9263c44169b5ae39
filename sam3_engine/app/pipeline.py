"""One run: a run directory with its metadata, the stages in order, and a summary at the end.

The run directory (any fsspec URL) holds ``run.json`` (run id, engine version, git commit),
``config.yaml`` (the resolved configuration of the latest attempt) and ``tables/``. Restarting a
run with the same directory resumes it: committed units are skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

import sam3_engine
from sam3_engine.engine import storage
from sam3_engine.engine.catalog import connect
from sam3_engine.engine.config import ConfigError, RunConfig
from sam3_engine.engine.lock import RunLock, RunLockedError
from sam3_engine.engine.runner import Executor, ProcessExecutor, StageReport, UnitRunner, start_fork_server
from sam3_engine.engine.stage import BuildContext, Stage, stage_class, stage_modules
from sam3_engine.engine.store import TableStore
from sam3_engine.io import inputs
from sam3_engine.io.inputs import InputError
from sam3_engine.models.hub import ModelLoadError
from sam3_engine.schemas.tables import RUNS


class ReconciliationError(RuntimeError):
    """A stage's outputs do not account for every one of its inputs."""


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, SIGTERM); its committed units stay, a re-run resumes."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []
"""Signals that stopped this process's run: Ray re-raises a handler's exception as a plain KeyboardInterrupt."""


def stop_on_signals() -> None:
    """SIGTERM stops a run as Ctrl-C does: the run is marked interrupted, Ray is shut down, a re-run resumes."""

    def interrupted(signum, frame):
        _received.append(signum)
        raise RunInterrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupted)


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal behind an interruption (SIGINT unless a handler saw another)."""
    return getattr(exc, "signum", None) or (_received[-1] if _received else int(signal.SIGINT))


class RunFailed(RuntimeError):
    """An unexpected failure (the node out of memory, a lost worker node, a bug), said in one line.

    The traceback is in ``log_url``, a file in the run directory; committed units stay.
    """

    def __init__(self, message: str, log_url: str):
        super().__init__(message)
        self.log_url = log_url


EXPECTED = (ConfigError, InputError, ModelLoadError, ReconciliationError, RunLockedError)
"""Failures that are the user's to fix, already said in one line: no traceback file."""

_ENVIRONMENT = {
    "OutOfMemoryError": "Ray killed a worker because the node ran out of memory",
    "MemoryError": "the driver ran out of memory",
    "NodeDiedError": "a Ray node died",
    "RaySystemError": "the Ray cluster failed",
}
"""What a person should read for failures of the environment rather than of the inputs."""


@dataclass
class RunResult:
    run_id: str
    attempt_id: str
    output: str
    engine_version: str
    git_commit: str | None
    seconds: float
    stages: list[StageReport]
    notices: list[str]


def build_stages(config: RunConfig, run_id: str) -> list[Stage]:
    """The configured stages, built from the registry and checked up front: a missing input or unreachable model fails before any work."""
    context = BuildContext(config, run_id, storage.absolute_url(config.output))
    for name in config.stages:
        context.built.append(stage_class(name).build(context))
    return context.built


def notices(stages: list[Stage]) -> list[str]:
    """What a user must not miss, printed at the start and the end of a run."""
    return list(dict.fromkeys(notice for stage in stages for notice in stage.notices()))


def _release_ray() -> None:
    """Shut down the Ray session this run opened, if any: Ray is imported only by a run with a model stage."""
    ray_executor = sys.modules.get("sam3_engine.engine.ray_executor")
    if ray_executor is not None:
        ray_executor.release_ray()


def _start_process_pool(config: RunConfig) -> None:
    """Start the process pools' fork server with the run's CPU stages, when they run on local processes: it imports
    them while this process checks the models and plans the first stage."""
    pool_stages = [cls for cls in map(stage_class, config.stages) if not cls.uses_model]
    if pool_stages and not config.ray.cpu_stages_on_ray():
        start_fork_server(stage_modules(pool_stages))


def _executor(stage: Stage, config: RunConfig) -> Executor:
    """Model stages run on Ray actors (GPUs where the cluster has them); the rest as Ray tasks across a configured
    cluster, else on local processes (a private Ray's start-up is not worth it on one machine)."""
    if stage.uses_model:
        from sam3_engine.engine.ray_executor import RayExecutor  # Ray loads only for a run that uses it

        return RayExecutor(stage.actors, stage.gpus_per_actor, config.ray.address)
    if config.ray.cpu_stages_on_ray():
        from sam3_engine.engine.ray_executor import RayTaskExecutor

        return RayTaskExecutor(config.ray.address)
    return ProcessExecutor(config.ingest.workers or os.cpu_count() or 1)


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


def _read_run_metadata(config: RunConfig) -> dict:
    """The run's ``run.json`` as it stands, or fresh metadata for a first attempt; writes nothing."""
    fs, root = storage.filesystem(config.output, config.storage)
    meta_path = storage.join(root, "run.json")
    if fs.exists(meta_path):
        with fs.open(meta_path, "r") as f:
            meta = json.load(f)
    else:
        meta = {"run_id": uuid.uuid4().hex, "created_at": datetime.now(UTC).isoformat()}
    return {**meta, "engine_version": sam3_engine.__version__, "git_commit": git_commit()}


def _write_run_metadata(config: RunConfig, meta: dict) -> None:
    """Write ``run.json`` and the resolved ``config.yaml`` of this attempt."""
    fs, root = storage.filesystem(config.output, config.storage)
    fs.makedirs(root, exist_ok=True)
    with fs.open(storage.join(root, "run.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with fs.open(storage.join(root, "config.yaml"), "w") as f:
        f.write(config.to_yaml())


def _mark_killed(store: TableStore, attempt_id: str) -> None:
    """Attempts still ``running`` while this one holds the run lock ended without saying so (kill -9, a lost machine):
    record them as ``killed``, so that ``runs`` never shows a dead attempt as running."""
    runs = store.read(RUNS.name)
    dead = runs.filter(pc.equal(runs["status"], "running"))
    if not dead.num_rows:
        return
    said = f"killed: still marked running when attempt {attempt_id} took the run lock (SIGKILL, or its machine was lost)"
    dead = dead.set_column(dead.schema.get_field_index("status"), "status", pa.array(["killed"] * dead.num_rows))
    dead = dead.set_column(dead.schema.get_field_index("error"), "error", pa.array([said] * dead.num_rows))
    store.replace(RUNS, dead["attempt_id"].to_pylist(), dead)


def _runs_row(meta: dict, attempt_id: str, config: RunConfig, started: datetime, status: str, summary=None, error=None) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "attempt_id": attempt_id,
                "run_id": meta["run_id"],
                "status": status,
                "started_at": started,
                "finished_at": None if status == "running" else datetime.now(UTC),
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


def _nothing_found(stage: Stage, config: RunConfig) -> str:
    """The warning of a run whose first stage found nothing: an empty input for ingest, earlier stages not run for the rest."""
    if stage.name == "ingest":
        return f"stage ingest found no inputs in {config.input} (an empty folder, or a glob matching nothing): nothing to do"
    return f"stage {stage.name} found nothing to work on: the stages before it have not written its inputs yet; run them first"


def _check_input(config: RunConfig) -> None:
    """A missing input fails before the run directory is made (a glob is checked when it is listed)."""
    if "ingest" not in config.stages or not config.input:
        return
    fs, path = storage.filesystem(config.input, config.storage)
    if not fs.exists(path) and not inputs.is_glob(path):
        raise InputError(f"input {config.input!r} does not exist")


def _make_run_directory(config: RunConfig) -> bool:
    """Create the run directory; True if it did not exist. A file or an unwritable path is a config error."""
    storage.check_table_path(config.output)
    fs, root = storage.filesystem(config.output, config.storage)
    try:
        if fs.isfile(root):
            raise ConfigError(f"output {config.output!r} is a file, not a run directory")
        existed = fs.isdir(root)
        fs.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output {config.output!r}: cannot create the run directory ({exc.strerror or exc})") from exc
    return not existed


def _remove_unused(config: RunConfig) -> None:
    """Remove a run directory this attempt created and wrote nothing to (it failed before any work)."""
    fs, root = storage.filesystem(config.output, config.storage)
    if {storage.join(root, "run.lock")} >= {p.rstrip("/") for p in fs.ls(root, detail=False)}:
        fs.rm(root, recursive=True)


def _log_failure(config: RunConfig, attempt_id: str, exc: BaseException) -> RunFailed:
    """Write the traceback to ``logs/<attempt>.log`` in the run directory; the error says it in one line."""
    log_url = storage.join(storage.absolute_url(config.output), "logs", f"{attempt_id}.log")
    fs, path = storage.filesystem(log_url, config.storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write("".join(traceback.format_exception(exc)))
    name = type(exc).__name__
    what = _ENVIRONMENT.get(name, f"{name}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
    return RunFailed(f"{what}; committed work is kept and re-running the same command resumes (traceback: {log_url})", log_url)


def run_pipeline(
    config: RunConfig,
    progress=None,
    announce: Callable[[list[str]], None] | None = None,
    wait_for_lock: bool = False,
    on_wait: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run ``config.stages`` in order into ``config.output``; safe to call again after a crash.

    One run at a time holds the run directory (``engine.lock``): another refuses with
    ``RunLockedError``, or with ``wait_for_lock`` waits (``on_wait`` is told the holder once).
    ``announce`` receives the run's notices (such as a model fallback) before any work starts.
    """
    _check_input(config)
    created = _make_run_directory(config)
    lock = RunLock(config.output, config.storage).acquire(wait_for_lock, on_wait)
    try:
        return _run_locked(config, lock, progress, announce, created)
    finally:
        lock.release()
        _release_ray()


def _run_locked(config: RunConfig, lock: RunLock, progress, announce, created: bool) -> RunResult:
    clock = time.monotonic()
    _start_process_pool(config)  # after the lock: a refused run starts nothing
    meta = _read_run_metadata(config)
    try:
        stages = build_stages(config, meta["run_id"])
    except BaseException:
        if created:
            _remove_unused(config)
        raise
    _write_run_metadata(config, meta)
    found = notices(stages)
    if not lock.supported:
        found.append(f"no run lock on {storage.protocol_of(lock.run_url)}://: do not start two runs on this output at once")
    if announce is not None:
        announce(found)
    store = TableStore(config.output, config.storage)
    attempt_id = uuid.uuid4().hex
    if lock.supported:
        _mark_killed(store, attempt_id)
    started = datetime.now(UTC)
    store.replace(RUNS, attempt_id, _runs_row(meta, attempt_id, config, started, "running"))
    runner = UnitRunner(store, attempt_id, progress)
    reports: list[StageReport] = []
    try:
        for stage in stages:
            if lock.lost:
                raise RunLockedError(f"run directory {lock.run_url}: the run lock was taken over (its heartbeat was late); stopping")
            report = runner.run(stage, _executor(stage, config))
            con = connect(store)
            report.counts = stage.summarize(con)
            con.close()
            accounted = report.counts.pop("accounted", None)
            if accounted is not None and accounted != report.items_total:
                raise ReconciliationError(
                    f"stage {stage.name}: {report.items_total} inputs but {accounted} rows in its result and rejects tables"
                )
            reports.append(report)
            if len(reports) == 1 and not report.items_total and stage.outputs:  # a stage of derived tables alone (splits) has no units
                found.append(_nothing_found(stage, config))
    except BaseException as exc:
        summary = {"stages": [asdict(r) for r in reports]}
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = f"{type(exc).__name__}: {exc}" if status == "failed" else f"interrupted by signal {signal_of(exc)}"
        store.replace(RUNS, attempt_id, _runs_row(meta, attempt_id, config, started, status, summary, error))
        if isinstance(exc, Exception) and not isinstance(exc, EXPECTED):
            raise _log_failure(config, attempt_id, exc) from exc
        raise
    result = RunResult(
        meta["run_id"], attempt_id, store.run_url, meta["engine_version"], meta["git_commit"], time.monotonic() - clock, reports, found
    )
    summary = {"seconds": result.seconds, "notices": result.notices, "stages": [asdict(r) for r in reports]}
    store.replace(RUNS, attempt_id, _runs_row(meta, attempt_id, config, started, "finished", summary))
    return result
