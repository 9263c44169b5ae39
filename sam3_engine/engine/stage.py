"""What a stage is: it plans work units from tables, turns one unit into rows, and derives tables at the end.

A stage never schedules anything: ``engine.runner`` decides where ``process`` runs (a worker
process, later a Ray actor), commits each unit's rows, and skips units already in the ledger.

Stages are found, not listed: a stage class marked ``@register_stage`` declares its name, its place
in the pipeline (``order``), its tables (``outputs``, ``derived``) and how it is built from a run's
config (``build``). The packages named in the ``sam3_engine.stages`` entry-point group are imported
on first use (the engine's own is ``sam3_engine.stages``, which imports every module in it), so a
new stage is one module, here or in another installed package.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

import pyarrow as pa

from sam3_engine.schemas.tables import TABLES, TableSpec

T = TypeVar("T")

STATS_KEY = "stats"
"""Optional entry of a unit's result next to its tables: counters (``dict[str, float]``) that go to the unit's ledger row."""


@dataclass(frozen=True)
class WorkUnit:
    """A shard of a stage's inputs whose rows are committed together or not at all."""

    unit_id: str
    items: tuple[Any, ...]

    @property
    def size(self) -> int:
        return len(self.items)


def fingerprint(stage: str, payload: Any) -> str:
    """``stage:hash`` of everything that decides a unit's rows: stage version, config, inputs."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}:{digest[:32]}"


def plan_units(
    ledger: str,
    settings: dict[str, Any],
    items: Iterable[T],
    key: Callable[[T], str],
    unit_size: int,
    identity: Callable[[T], Any],
    field: str = "images",
) -> Iterator[WorkUnit]:
    """Content-defined shards of ``items`` (sorted by ``key``), each a unit whose id hashes ``settings`` and the
    ``identity`` of every item in it under ``field``: what decides the unit's rows, so a change to either re-runs it.
    Items are drawn as the units are: a plan made from a stream of rows never holds them all."""
    for shard in content_defined_chunks(items, key, unit_size):
        yield WorkUnit(fingerprint(ledger, {**settings, field: [identity(item) for item in shard]}), tuple(shard))


def content_defined_chunks(items: Iterable[T], key: Callable[[T], str], unit_size: int) -> Iterator[list[T]]:
    """Shards of sorted ``items`` that end after an item whose key hashes to 0 mod ``unit_size``.

    Primary boundaries depend only on each key, so adding items changes the shard they land in (or
    splits it) and nothing past the next primary boundary. Past twice the average size a shard also
    ends at any key hitting 0 mod unit_size/8, which keeps shards short without a fixed cap (a fixed
    cap would shift every later boundary after an insertion); those secondary boundaries depend on
    the shard's length, so an insertion can move the one or two after it, up to the next primary one.
    """
    current = []
    for item in items:
        current.append(item)
        digest = int(hashlib.sha256(key(item).encode()).hexdigest()[:12], 16)
        if digest % unit_size == 0 or (len(current) >= 2 * unit_size and digest % max(1, unit_size // 8) == 0):
            yield current
            current = []
    if current:
        yield current


def arrow_rows(table: pa.Table, batch_rows: int = 4096) -> Iterator[dict[str, Any]]:
    """A table's rows as dicts, one batch at a time: a plan keeps its inputs in Arrow's compact columns and makes
    Python objects only for the rows it is sharding (at 100,000 images, about 2 KiB per image less at the peak)."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield from batch.to_pylist()


def reject_reasons(con, stage: Stage) -> dict[str, int]:
    """Rejects per reason code of one stage's ledger (one verifier's, say), from the run's DuckDB catalog, for its summary."""
    return dict(
        con.execute(
            "SELECT reason, count(*) FROM rejects WHERE stage = $stage AND starts_with(unit_id, $ledger) GROUP BY reason ORDER BY reason",
            {"stage": stage.name, "ledger": f"{stage.ledger}:"},
        ).fetchall()
    )


def image_reject(stage: str, item: Any, reason: str, detail: str) -> dict[str, Any]:
    """A ``rejects`` row for an image a stage could not handle; ``item`` has ``image_id`` and ``uri``."""
    return {"input_id": item.image_id, "stage": stage, "uri": item.uri, "image_id": item.image_id, "reason": reason, "detail": detail}


def rows_table(spec: TableSpec, rows: list[dict[str, Any]], unit_id: str) -> pa.Table:
    """A unit's rows as an Arrow table of ``spec``'s schema, each stamped with the unit id."""
    return pa.Table.from_pylist([{**row, "unit_id": unit_id} for row in rows], schema=spec.schema)


@dataclass(frozen=True)
class Derivation:
    """A table computed from all committed units at the end of a stage, replaced whole in one commit."""

    unit_id: str
    table: TableSpec
    rows: pa.RecordBatchReader
    key: str | None = None
    """When set, only the table's rows whose replace column equals ``key`` are replaced (one verifier's
    verdicts beside another's); otherwise the whole table is."""


@dataclass
class BuildContext:
    """What building a run's stages needs: the run's config and where it lives, and the stages built so far."""

    config: Any
    """The run's ``RunConfig``."""
    run_id: str
    run_url: str
    built: list[Stage] = field(default_factory=list)
    """Stages already built for this run, in order: a later one may share an earlier one's state (the ontology)."""


@dataclass(frozen=True)
class WorkerContext:
    """Where a worker runs: handed to its stage once per worker process or model actor (``Stage.setup``)."""

    run_url: str
    """The run directory: a worker reopens the run's tables from it."""
    storage: Any
    """The run's ``StorageConfig``: how to reach the run directory and the images."""
    device: str = "cpu"
    """Torch device the executor gave this worker: ``cuda`` on an actor holding a GPU, else ``cpu``."""


def start_worker(stage: Stage, context: WorkerContext, setup: bool = True) -> Stage:
    """Give a stage its worker's context and, unless it only prepares units, set it up (load its model)."""
    stage.context = context
    if setup:
        stage.setup(context)
    return stage


def stage_modules(stages: Iterable[type[Stage]]) -> list[str]:
    """The modules a worker of these stage classes needs: each one's own and its ``worker_imports``."""
    return list(dict.fromkeys(module for stage in stages for module in (stage.__module__, *stage.worker_imports)))


class Stage(ABC):
    name: ClassVar[str]
    order: ClassVar[int]
    """Place in the pipeline: a run's stages run in ascending order."""
    outputs: ClassVar[tuple[TableSpec, ...]]
    """Tables each unit writes; a unit's rows in each are replaced together."""
    derived: ClassVar[tuple[TableSpec, ...]] = ()
    """Tables the stage's ``derive`` writes."""
    config_model: ClassVar[type | None] = None
    """The pydantic model of the stage's config section, keyed by ``name`` (``mine.unit_size``); None: no section."""
    reasons: ClassVar[dict[str, str]] = {}
    """Reject reason codes the stage writes to ``rejects``, and what each means."""

    @classmethod
    @abstractmethod
    def build(cls, context: BuildContext) -> Stage:
        """The stage for this run, from ``context.config``; a config it cannot run with raises ``ConfigError``."""

    @property
    def ledger(self) -> str:
        """The stage's name in the units ledger. A run removes the rows of this ledger's units that the
        current plan no longer has, so stages whose runs must not replace each other's rows (two
        verifiers) keep separate ledgers."""
        return self.name

    @abstractmethod
    def plan(self, store) -> Iterable[WorkUnit]:
        """Every unit of the stage for the current config and inputs, done or not, in a stable order.

        Best made as a generator over the stage's inputs (``plan_units``, ``arrow_rows``): the runner reads the plan
        twice, once for unit ids and sizes and again as it sends units to workers, so it never holds every unit's
        items. It must read its inputs before yielding the first unit: the stage's commits start after that.
        """

    uses_model: ClassVar[bool] = False
    """True for stages whose ``process`` needs a model: the engine runs them on model actors."""
    actors: int | None = None
    """Model actors the stage asks for (default: one per GPU, or one CPU actor)."""
    gpus_per_actor: float | None = None
    """GPUs per model actor (default: 1 when the cluster has GPUs, else 0)."""
    worker_imports: ClassVar[tuple[str, ...]] = ()
    """Modules beyond its own that the stage imports in ``setup`` or ``process`` (where they are lazy, to keep the CLI
    fast): a process pool's fork server imports them once, and each worker starts without importing them again."""

    context: WorkerContext | None = None
    """Set by the engine in every process that runs the stage's ``prepare`` or ``process``."""

    def setup(self, context: WorkerContext) -> None:  # noqa: B027 - a hook: most stages load nothing
        """Once per worker process or model actor, before its first unit: load the model here and keep it on ``self``.

        Not called where units are only prepared (CPU tasks beside model actors): ``prepare`` must not need it.
        """

    def prepare(self, unit: WorkUnit) -> Any:
        """CPU work for a unit (decoding, resizing), run apart from ``process`` so a GPU never waits on it."""
        return None

    @abstractmethod
    def process(self, unit: WorkUnit, prepared: Any = None) -> dict[str, pa.Table]:
        """The rows of one unit, per output table, from ``prepare``'s result; runs in a set-up worker.

        The result may also hold counters under ``STATS_KEY``; they are recorded in the ledger.
        """

    def process_isolated(self, unit: WorkUnit, item: Any, error: str) -> dict[str, pa.Table]:
        """Rows for an item whose processing crashed its worker; by default the unit fails."""
        raise RuntimeError(f"stage {self.name}: a worker crashed on {item!r}: {error}")

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        """Tables built from all of the stage's committed rows once every unit is done, written in order."""
        return []

    def summarize(self, con) -> dict[str, Any]:
        """Counts for the run summary, from the run's DuckDB catalog."""
        return {}

    def notices(self) -> list[str]:
        """What a user must not miss (a model that fell back to random weights), printed at the start and the end of a run."""
        return []


ENTRY_POINT_GROUP = "sam3_engine.stages"
_REGISTRY: dict[str, type[Stage]] = {}
_discovered: list[bool] = []

S = TypeVar("S", bound=type[Stage])


def register_stage(cls: S) -> S:
    """Class decorator: make a stage known by its ``name``, and its tables known to the catalog."""
    known = _REGISTRY.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"two stages named {cls.name!r}: {known.__module__}.{known.__qualname__} and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    for spec in (*cls.outputs, *cls.derived):
        TABLES.setdefault(spec.name, spec)
    return cls


@contextmanager
def registered(cls: type[Stage]) -> Iterator[type[Stage]]:
    """Register a stage (and its new tables) for the length of a block: a stage defined in a test."""
    new_tables = [spec.name for spec in (*cls.outputs, *cls.derived) if spec.name not in TABLES]
    register_stage(cls)
    try:
        yield cls
    finally:
        _REGISTRY.pop(cls.name, None)
        for name in new_tables:
            TABLES.pop(name, None)


def discover() -> None:
    """Import the stage packages of the ``sam3_engine.stages`` entry-point group, once per process."""
    if _discovered:
        return
    _discovered.append(True)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def stage_names() -> tuple[str, ...]:
    """Every known stage, in pipeline order."""
    discover()
    return tuple(sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].order, name)))


def stage_class(name: str) -> type[Stage]:
    discover()
    return _REGISTRY[name]
