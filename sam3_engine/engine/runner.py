"""Runs a stage's work units on a pool of worker processes and commits each unit's rows.

The driver is the only process that commits, so Delta commits never race. Workers run
``Stage.process``; a worker that dies (segfault, OOM kill) breaks the pool, which is rebuilt. The
units it held are retried one at a time, and a unit that still kills its worker is split into
single items so that only the culprit is rejected.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import forkserver
from typing import Protocol

import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sam3_engine.engine.stage import STATS_KEY, Derivation, Stage, WorkerContext, WorkUnit, stage_modules, start_worker
from sam3_engine.engine.store import LedgerEntry, TableStore
from sam3_engine.schemas.tables import UNITS

KILL_AFTER_COMMITS_ENV = "SAM3_ENGINE_KILL_AFTER_COMMITS"
"""Fault injection for tests: SIGKILL the driver right after this many Delta commits."""
CRASH_ON_ENV = "SAM3_ENGINE_CRASH_WORKER_ON"
"""Fault injection for tests: a worker exits abruptly on an item whose repr contains this text."""


@dataclass
class StageReport:
    name: str
    units_total: int = 0
    units_skipped: int = 0
    units_committed: int = 0
    units_removed: int = 0
    items_total: int = 0
    worker_crashes: int = 0
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)
    executor: dict = field(default_factory=dict)
    """Where the units ran (see ``Executor.describe``)."""


def crash_if_asked(unit: WorkUnit) -> None:
    """Fault injection (see CRASH_ON_ENV): exit abruptly, as a segfault or an OOM kill would."""
    marker = os.environ.get(CRASH_ON_ENV)
    if marker and any(marker in repr(item) for item in unit.items):
        os._exit(70)


def start_fork_server(modules: Iterable[str]) -> None:
    """Start the process pools' fork server unless it runs. It imports the engine and ``modules`` while the driver goes on
    (checks, planning), so the first pool's workers need not wait for them; a started server keeps what it has."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(dict.fromkeys([__name__, *modules])))
    forkserver.ensure_running()


def die_with_driver(driver: int) -> None:
    """Pool worker initializer: the worker exits when the driver does, even when the driver is killed with kill -9.

    Without it, the idle workers of a killed run linger as orphans, holding memory. A worker's parent is the pool's
    fork server, which outlives the driver while any of its workers runs, so each worker watches the driver itself:
    a thread waits on the driver's pidfd (Linux) and exits the process when it becomes readable. A worker whose
    driver died before it started exits at once.
    """
    if not hasattr(os, "pidfd_open"):
        return
    try:
        driver_fd = os.pidfd_open(driver)
    except ProcessLookupError:
        os._exit(0)
    threading.Thread(target=_exit_when_ended, args=(driver_fd,), name="die-with-driver", daemon=True).start()


def _exit_when_ended(pidfd: int) -> None:
    select.select([pidfd], [], [])
    os._exit(0)


_worker_stage: Stage | None = None
"""A pool worker's stage, set up once by the pool's initializer and kept for every unit the worker runs."""


def _start_pool_worker(driver: int, environment: dict[str, str], stage: Stage, context: WorkerContext) -> None:
    """A worker forked by the fork server has the server's environment: it takes the driver's, as a spawned one would."""
    global _worker_stage
    die_with_driver(driver)
    os.environ.clear()
    os.environ.update(environment)
    _worker_stage = start_worker(stage, context)


def _process(unit: WorkUnit) -> dict[str, pa.Table]:
    crash_if_asked(unit)
    return _worker_stage.process(unit, _worker_stage.prepare(unit))


def isolate(
    stage: Stage,
    unit: WorkUnit,
    run_alone: Callable[[WorkUnit], dict[str, pa.Table]],
    deaths: tuple[type[BaseException], ...],
    committed: Commit,
) -> int:
    """Run a unit that killed its worker twice item by item, each on a fresh worker (``run_alone``); an item
    that kills its worker again gets the stage's ``process_isolated`` rows. Commits the unit; returns the crashes."""
    parts, crashes = [], 0
    for item in unit.items:
        try:
            parts.append(run_alone(WorkUnit(unit.unit_id, (item,))))
        except deaths as exc:
            crashes += 1
            parts.append(stage.process_isolated(unit, item, str(exc).splitlines()[0] if str(exc) else "the worker process died"))
    committed([(unit, {spec.name: pa.concat_tables([part[spec.name] for part in parts]) for spec in stage.outputs})])
    return crashes


class _Commits:
    """Counts Delta commits so that tests can kill the driver between any two of them."""

    def __init__(self):
        limit = os.environ.get(KILL_AFTER_COMMITS_ENV)
        self.remaining = int(limit) if limit else None

    def tick(self) -> None:
        if self.remaining is None:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


Finished = list[tuple[WorkUnit, dict[str, pa.Table]]]
"""Units whose results arrived together, with their tables: the runner commits them together."""
Commit = Callable[[Finished], None]


class Pending:
    """The units still to send: those to redo first, then the plan's, drawn one at a time as workers have room, so that
    neither the driver nor an executor ever holds every unit's items."""

    def __init__(self, units: Iterable[WorkUnit]):
        self._plan = iter(units)
        self._next: deque[WorkUnit] = deque()

    def __bool__(self) -> bool:
        if not self._next:
            unit = next(self._plan, None)
            if unit is None:
                return False
            self._next.append(unit)
        return True

    def pop(self) -> WorkUnit:
        if not self:
            raise IndexError("no units left")
        return self._next.popleft()

    def redo(self, unit: WorkUnit) -> None:
        """Send ``unit`` again, before any other."""
        self._next.appendleft(unit)

    def __iter__(self):
        while self:
            yield self.pop()


class Executor(Protocol):
    """Where units run. ``execute`` draws units from ``units`` as it has room for them, hands every finished unit to
    ``committed`` (those that finished together in one call) and returns the worker crashes it saw."""

    def execute(self, stage: Stage, units: Pending, committed: Commit, context: WorkerContext) -> int: ...

    def describe(self) -> dict:
        """Where the last ``execute`` ran its units, for the run summary."""


class UnitRunner:
    """Plans a stage, skips done units, drops stale ones, commits each unit's rows, derives tables."""

    def __init__(self, store: TableStore, attempt_id: str, progress: Progress | None = None):
        self.store = store
        self.attempt_id = attempt_id
        self.progress = progress
        self._commits = _Commits()
        self._uncompacted: dict[str, int] = {}
        """Commits to each table since it was last compacted by this runner."""
        self._ledger: dict[str, set[str]] | None = None
        """The done units by ledger stage: read once, then kept up to date by this runner, the only committer."""

    def done(self, ledger_stage: str) -> set[str]:
        if self._ledger is None:
            self._ledger = self.store.ledger()
        return self._ledger.setdefault(ledger_stage, set())

    def _forget(self, ledger_stage: str, unit_ids: set[str]) -> None:
        self.store.delete_units(UNITS, unit_ids)
        self.done(ledger_stage).difference_update(unit_ids)

    def run(self, stage: Stage, executor: Executor) -> StageReport:
        started = time.monotonic()
        report = StageReport(stage.name)
        sizes = {unit.unit_id: unit.size for unit in stage.plan(self.store)}
        report.units_total = len(sizes)
        report.items_total = sum(sizes.values())
        planned = set(sizes)
        done = self.done(stage.ledger)
        stale = done - planned
        if stale:
            # Rows of units that the current config and inputs no longer produce.
            for spec in stage.outputs:
                self.store.delete_units(spec, stale)
            self._forget(stage.ledger, stale)
            report.units_removed = len(stale)
        todo = planned - done
        report.units_skipped = len(planned) - len(todo)
        todo_items = sum(sizes[unit_id] for unit_id in todo)
        del sizes

        def todo_units():
            """The plan again, made as units are sent: only ids and sizes were kept from the first reading."""
            for unit in stage.plan(self.store):
                if unit.unit_id in todo:
                    todo.discard(unit.unit_id)
                    yield unit

        task = None
        if self.progress is not None:
            task = self.progress.add_task(stage.name, total=report.items_total, completed=report.items_total - todo_items)

        def committed(finished: Finished) -> None:
            group = self.store.storage_config.units_per_commit
            for start in range(0, len(finished), group):
                self._commit(stage, finished[start : start + group])
            report.units_committed += len(finished)
            if task is not None:
                self.progress.advance(task, sum(unit.size for unit, _ in finished))

        context = WorkerContext(self.store.run_url, self.store.storage_config)
        report.worker_crashes = executor.execute(stage, Pending(todo_units() if todo else ()), committed, context)
        report.executor = executor.describe()
        self._compact(minimum=2)  # a table with one new file has nothing to merge
        for derivation in stage.derive(self.store, sorted(planned)):
            self._derive(stage, derivation, report.items_total)
        report.seconds = time.monotonic() - started
        return report

    def _derive(self, stage: Stage, derivation: Derivation, num_inputs: int) -> None:
        """Rebuild a derived table unless the ledger holds exactly this derivation.

        A derivation needs a ledger of its own: every run removes the stage's ledger rows that its plan
        lacks, so a derivation recorded there would be removed and rebuilt by every run of a finished one.
        """
        ledger_stage = derivation.unit_id.split(":", 1)[0]
        if ledger_stage == stage.ledger:
            raise ValueError(f"derivation {derivation.unit_id} shares the ledger of stage {stage.name}'s units")
        self._forget(ledger_stage, self.done(ledger_stage) - {derivation.unit_id})
        if derivation.unit_id in self.done(ledger_stage):
            return
        if derivation.key is None:
            written = self.store.overwrite(derivation.table, derivation.rows)
        else:
            written = self.store.replace(derivation.table, derivation.key, derivation.rows)
        self._commits.tick()
        self.store.record_unit(ledger_stage, derivation.unit_id, self.attempt_id, num_inputs, {derivation.table.name: written})
        self.done(ledger_stage).add(derivation.unit_id)
        self._commits.tick()

    def _commit(self, stage: Stage, finished: Finished) -> None:
        """One commit per output table for all of ``finished``, then one ledger commit: a kill between them leaves rows
        without ledger entries, which the resumed run replaces."""
        unit_ids = [unit.unit_id for unit, _ in finished]
        for spec in stage.outputs:
            self.store.replace(spec, unit_ids, [tables[spec.name] for _, tables in finished])
            self._committed(spec.name)
        entries = [
            LedgerEntry(unit.unit_id, unit.size, {s.name: tables[s.name].num_rows for s in stage.outputs}, tables.get(STATS_KEY) or {})
            for unit, tables in finished
        ]
        self.store.record_units(stage.ledger, self.attempt_id, entries)
        self.done(stage.ledger).update(unit_ids)
        self._committed(UNITS.name)
        self._compact(minimum=self.store.storage_config.compact_every)

    def _committed(self, table: str) -> None:
        self._uncompacted[table] = self._uncompacted.get(table, 0) + 1
        self._commits.tick()

    def _compact(self, minimum: int) -> None:
        """Compact each table with at least ``minimum`` commits since its last compaction (every ``storage.compact_every``
        commits while a stage runs, and whatever a stage left at its end), vacuum it and trim its log, so that a commit
        costs the same at any size."""
        for table, count in list(self._uncompacted.items()):
            if count >= minimum:
                self.store.compact(table)
                self._commits.tick()
                self.store.vacuum(table)
                self._commits.tick()
                self.store.trim_log(table)
                self._commits.tick()
                self._uncompacted[table] = 0


class ProcessExecutor:
    """A pool of local worker processes, at most two units in flight per worker.

    Workers are forked from a fork server (a fresh process, not the driver with its threads and open tables) that
    has imported the engine and the stages' modules once (``start_fork_server``; the pipeline starts it with every
    CPU stage of the run): a worker starts in milliseconds instead of importing them again, for every stage.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def describe(self) -> dict:
        return {"executor": "processes", "workers": self.workers}

    def execute(self, stage: Stage, units: Pending, committed, context: WorkerContext) -> int:
        if not units:  # every unit done: no pool to start
            return 0
        suspects = self._run_pool(stage, context, units, committed)
        return sum(self._run_suspect(stage, context, unit, committed) for unit in suspects)

    def _pool(self, stage: Stage, context: WorkerContext, workers: int | None = None) -> ProcessPoolExecutor:
        """Workers that each receive the stage once and set it up before their first unit."""
        start_fork_server(stage_modules([type(stage)]))
        return ProcessPoolExecutor(
            workers or self.workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_start_pool_worker,
            initargs=(os.getpid(), dict(os.environ), stage, context),
        )

    def _run_pool(self, stage: Stage, context: WorkerContext, pending: Pending, committed) -> list[WorkUnit]:
        """Run units with a bounded number in flight; return those lost to a broken pool."""
        suspects: list[WorkUnit] = []
        pool = self._pool(stage, context)
        inflight: dict[Future, WorkUnit] = {}
        try:
            while pending or inflight:
                broken = False
                while pending and len(inflight) < 2 * self.workers:
                    unit = pending.pop()
                    try:
                        future = pool.submit(_process, unit)
                    except BrokenProcessPool:
                        pending.redo(unit)
                        broken = True
                        break
                    inflight[future] = unit
                # Once the pool is broken every future in flight completes, most with BrokenProcessPool.
                finished, _ = wait(inflight, return_when=ALL_COMPLETED if broken else FIRST_COMPLETED)
                broken = self._collect(finished, inflight, suspects, committed) or broken
                if broken:
                    self._collect(wait(inflight).done, inflight, suspects, committed)
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._pool(stage, context)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return suspects

    @staticmethod
    def _collect(finished, inflight: dict[Future, WorkUnit], suspects: list[WorkUnit], committed) -> bool:
        """Commit finished units together; those whose worker died become suspects. True if the pool broke."""
        broken, results = False, []
        for future in finished:
            unit = inflight.pop(future)
            try:
                results.append((unit, future.result()))
            except BrokenProcessPool:
                suspects.append(unit)
                broken = True
        if results:
            committed(results)
        return broken

    def _run_suspect(self, stage: Stage, context: WorkerContext, unit: WorkUnit, committed) -> int:
        """Retry a unit alone on a fresh worker; if it kills that one too, isolate its items. Returns crashes seen."""

        def run_alone(single: WorkUnit) -> dict[str, pa.Table]:
            with self._pool(stage, context, workers=1) as pool:
                return pool.submit(_process, single).result()

        try:
            committed([(unit, run_alone(unit))])
            return 0
        except BrokenProcessPool:
            return 1 + isolate(stage, unit, run_alone, (BrokenProcessPool,), committed)


def default_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
