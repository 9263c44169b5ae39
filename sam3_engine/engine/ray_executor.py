"""Runs a model stage on Ray: CPU tasks prepare units, model actors process them, the driver commits.

Each model actor is pinned to one GPU by Ray (``num_gpus=1``) and sets its stage up once (loads the model); on a
cluster without GPUs the actors are CPU actors. Preparation (decode, orient, resize) runs as Ray
CPU tasks apart from the actors. Every actor holds at most two units: while it runs one, the next
one's inputs are being prepared, so the GPU does not wait, and memory stays bounded at any corpus
size. An actor that dies has its units redone on a fresh actor; only the driver commits, so no
row is written twice. A unit that kills actors twice is split into single items so that only the
culprit is rejected.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from sam3_engine.engine.runner import Pending, crash_if_asked, isolate
from sam3_engine.engine.stage import Stage, WorkerContext, WorkUnit, start_worker

KILL_ACTOR_ONCE_ENV = "SAM3_ENGINE_KILL_MODEL_ACTOR_ONCE"
"""Fault injection for tests: a path; the first actor to create it SIGKILLs itself mid-unit."""
KILL_NODE_ONCE_ENV = "SAM3_ENGINE_KILL_WORKER_NODE_ONCE"
"""Fault injection for tests: a path; the first unit (task or actor) on a worker node to create it SIGKILLs the node's
raylet, which takes the node's workers down with it: a node lost mid-stage."""

FAULT_ENV_PREFIX = "SAM3_ENGINE_"
_DEATHS = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError, NodeDiedError, ObjectLostError)
"""A unit's worker, or its node, died: the unit is redone elsewhere (objects lost with a node included)."""
IN_FLIGHT_PER_ACTOR = 2


_owned: dict[str, int] = {}
"""Set while this process holds a Ray session that ``ensure_ray`` opened: the reaper pipe's write end, if any."""


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS) when given, else start a local Ray; reuse a live session.

    ``ray.init`` replaces the driver's SIGTERM handler with ``sys.exit`` for as long as it runs; the
    handler the caller had (the CLI's: stop the run cleanly) is put back, and a SIGTERM that came
    during ``ray.init`` is handed to it. The reaper starts first, so that Ray processes started before
    such a stop are killed when the driver exits.
    """
    if ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    address = address or os.environ.get("RAY_ADDRESS")
    pipe = -1 if address else _start_reaper()
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # A private local Ray on loopback: never join some other cluster that happens to run here.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    except SystemExit as exc:
        if exc.code != signal.SIGTERM or not callable(previous):
            raise
        # The caller's handler first (a second SIGTERM while Ray shuts down reaches it too). The reaper's pipe stays
        # open: it closes as the driver exits, and what Ray had started is reaped then.
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()
        previous(signal.SIGTERM, None)
        raise
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _owned["session"] = pipe


def release_ray() -> None:
    """Shut down the Ray session ``ensure_ray`` opened (a caller's own session is left alone)."""
    pipe = _owned.pop("session", None)
    if pipe is None:
        return
    ray.shutdown()
    if pipe >= 0:
        os.close(pipe)  # the reaper wakes, finds Ray's processes gone (or kills stragglers) and exits


def _start_reaper() -> int:
    """Start ``ray_reaper`` watching this driver; returns the pipe end that only this process holds."""
    read_end, write_end = os.pipe()  # not inheritable: no other child keeps the write end open
    subprocess.Popen([sys.executable, "-m", "sam3_engine.engine.ray_reaper", str(os.getpid())], stdin=read_end, start_new_session=True)
    os.close(read_end)
    return write_end


def _first_to_create(marker: str | None) -> bool:
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _kill_node_if_asked() -> None:
    """Fault injection (see KILL_NODE_ONCE_ENV); the head node, which the driver needs, is never killed."""
    node_id = ray.get_runtime_context().get_node_id()
    (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
    if "node:__internal_head__" in node["Resources"] or not _first_to_create(os.environ.get(KILL_NODE_ONCE_ENV)):
        return
    import psutil

    raylet = next(p for p in psutil.Process().parents() if p.name() == "raylet")
    raylet.kill()
    os.kill(os.getpid(), signal.SIGKILL)


class SetupFailed(Exception):
    """A model actor could not set its stage up (load its model). Every actor would fail alike, so the stage stops with
    the setup's own error instead of redoing each unit and rejecting each image as a crash."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


class _ModelWorker:
    """One model actor: its stage is set up (the model loaded) once, here, and kept for every unit."""

    def __init__(self, stage: Stage, context: WorkerContext, torch_threads: int | None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.setup_error: Exception | None = None
        try:
            self.stage = start_worker(stage, context)
        except Exception as exc:  # noqa: BLE001 - raised with the first unit, where the driver sees it (an actor that dies is redone)
            self.setup_error = exc

    def process(self, unit: WorkUnit, prepared):
        if self.setup_error is not None:
            raise SetupFailed(self.setup_error)
        crash_if_asked(unit)
        tables = self.stage.process(unit, prepared)
        if KILL_NODE_ONCE_ENV in os.environ:
            _kill_node_if_asked()
        if _first_to_create(os.environ.get(KILL_ACTOR_ONCE_ENV)):
            os.kill(os.getpid(), signal.SIGKILL)
        return tables


def _cpu_actor_threads(actors: int) -> int:
    """Torch threads for a CPU model actor: its share of a node's cores.

    Ray limits an actor's thread pools to its ``num_cpus`` (one, so that preparation tasks can be
    scheduled beside it); a CPU model then runs at a fraction of the node's speed. Model compute
    dominates preparation, so each CPU actor takes its share of the cores instead.
    """
    cpus = [node["Resources"]["CPU"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")]
    if not cpus:
        return 1
    actors_per_node = -(-actors // len(cpus))
    return max(1, int(min(cpus)) // actors_per_node)


def _prepare(stage: Stage, context: WorkerContext, unit: WorkUnit):
    return start_worker(stage, context, setup=False).prepare(unit)


_task_stage: dict[str, Stage] = {}
"""A Ray worker process's set-up stage, by the ``execute`` call it serves: set up once, kept for every unit it runs."""


def _run_task(key: str, stage: Stage, context: WorkerContext, unit: WorkUnit):
    """A CPU stage's unit as a Ray task: prepare and process it in the worker (as a pool worker would)."""
    if key not in _task_stage:
        _task_stage.clear()
        _task_stage[key] = start_worker(stage, context)
    crash_if_asked(unit)
    worker = _task_stage[key]
    tables = worker.process(unit, worker.prepare(unit))
    if KILL_NODE_ONCE_ENV in os.environ:
        _kill_node_if_asked()
    return tables


def _fault_options() -> dict:
    """Fault-injection switches reach Ray's worker processes, which do not inherit the driver's environment."""
    injected = {k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)}
    return {"runtime_env": {"env_vars": injected}} if injected else {}


def _cluster_placement() -> dict:
    return {
        "executor": "ray",
        "ray_address": ray.get_runtime_context().gcs_address,
        "ray_nodes": sum(node["Alive"] for node in ray.nodes()),
    }


class _Lanes:
    """Where units are sent, each with at most ``capacity`` in flight: model actors, or one lane of Ray tasks."""

    capacity: int

    def lanes(self) -> list:
        raise NotImplementedError

    def submit(self, lane, unit: WorkUnit) -> ray.ObjectRef:
        raise NotImplementedError

    def lost(self, lane) -> int:
        """A unit's worker died on ``lane``: returns 1 for a crash not yet counted (several units die with one actor)."""
        return 1

    def run_alone(self, unit: WorkUnit):
        """One unit on a fresh worker: an item that crashes it harms nothing else."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the lanes hold."""


def drive(stage: Stage, pending: Pending, committed, lanes: _Lanes) -> int:
    """Run units with at most ``capacity`` in flight per lane; commit those that finish together in one call. A unit
    whose worker (or node) dies is redone; one that dies twice is isolated item by item. Returns the crashes seen."""
    strikes: dict[str, int] = {}
    inflight: dict[ray.ObjectRef, tuple[WorkUnit, object]] = {}
    load: dict[object, int] = {}
    crashes = 0
    try:
        while pending or inflight:
            for lane in lanes.lanes():
                while pending and load.get(lane, 0) < lanes.capacity:
                    unit = pending.pop()
                    inflight[lanes.submit(lane, unit)] = (unit, lane)
                    load[lane] = load.get(lane, 0) + 1
            refs = list(inflight)
            ready, waiting = ray.wait(refs, num_returns=1)
            if waiting:  # whatever else has finished by now is committed with it, in one commit per table
                ready += ray.wait(waiting, num_returns=len(waiting), timeout=0)[0]
            results = []
            for ref in ready:
                unit, lane = inflight.pop(ref)
                load[lane] -= 1
                try:
                    results.append((unit, ray.get(ref)))
                except RayTaskError as exc:
                    if isinstance(exc.cause, SetupFailed):
                        raise exc.cause.error from None
                    raise
                except _DEATHS:
                    crashes += lanes.lost(lane)
                    strikes[unit.unit_id] = strikes.get(unit.unit_id, 0) + 1
                    if strikes[unit.unit_id] < 2:
                        pending.redo(unit)
                    else:
                        crashes += isolate(stage, unit, lanes.run_alone, _DEATHS, committed)
            if results:
                committed(results)
    finally:
        lanes.close()
    return crashes


class _Actors(_Lanes):
    """Model actors, each set up once; an actor that dies is replaced, its units redone on the others."""

    capacity = IN_FLIGHT_PER_ACTOR

    def __init__(self, stage: Stage, context: WorkerContext, count: int, gpus: float):
        # Named after the stage, so that the Ray dashboard shows what each actor does.
        worker_class = type(f"{stage.name.title()}ModelWorker", (_ModelWorker,), {})
        actor_class = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1, max_restarts=0, **_fault_options())(worker_class)
        self._prepare = ray.remote(num_cpus=1, max_retries=3)(_prepare)
        self._stage_ref = ray.put(stage)
        self._context = context
        threads = None if gpus else _cpu_actor_threads(count)
        actor_context = replace(context, device="cuda" if gpus else "cpu")
        self._new = lambda: actor_class.remote(self._stage_ref, actor_context, threads)
        self._actors = [self._new() for _ in range(count)]

    def lanes(self) -> list:
        return self._actors

    def submit(self, lane, unit: WorkUnit) -> ray.ObjectRef:
        return lane.process.remote(unit, self._prepare.remote(self._stage_ref, self._context, unit))

    def lost(self, lane) -> int:
        if lane not in self._actors:
            return 0
        self._actors.remove(lane)
        ray.kill(lane, no_restart=True)
        self._actors.append(self._new())
        return 1

    def run_alone(self, unit: WorkUnit):
        actor = self._new()
        try:
            return ray.get(self.submit(actor, unit))
        finally:
            ray.kill(actor, no_restart=True)

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)


class _Tasks(_Lanes):
    """CPU units as Ray tasks over the whole cluster, at most two in flight per CPU: what a process pool is on one node."""

    def __init__(self, stage: Stage, context: WorkerContext):
        # Spread over the nodes: a CPU stage is mostly reading and decoding, which every node's network and cores share.
        self._run = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD", **_fault_options())(_run_task)
        self._key = uuid.uuid4().hex
        self._stage_ref = ray.put(stage)
        self._context = context
        self.capacity = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def lanes(self) -> list:
        return ["tasks"]

    def submit(self, lane, unit: WorkUnit) -> ray.ObjectRef:
        return self._run.remote(self._key, self._stage_ref, self._context, unit)

    def run_alone(self, unit: WorkUnit):
        return ray.get(self._run.options(max_retries=0).remote(uuid.uuid4().hex, self._stage_ref, self._context, unit))


@dataclass
class RayExecutor:
    """Model actors: ``actors`` of them (default: one per GPU in the cluster, else one CPU actor)."""

    actors: int | None = None
    gpus_per_actor: float | None = None
    address: str | None = None
    placement: dict = field(default_factory=dict)
    """What the last ``execute`` used: the cluster it joined, its nodes, the actors and their GPUs."""

    def describe(self) -> dict:
        return self.placement

    def execute(self, stage: Stage, units: Pending, committed, context: WorkerContext) -> int:
        if not units:  # every unit done (say, a verdict-only re-run): no cluster, no model
            self.placement = {"executor": "ray", "model_actors": 0}
            return 0
        ensure_ray(self.address)
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
        count = self.actors or max(1, int(cluster_gpus // gpus) if gpus else 1)
        self.placement = {**_cluster_placement(), "model_actors": count, "gpus_per_actor": gpus}
        return drive(stage, units, committed, _Actors(stage, context, count, gpus))


@dataclass
class RayTaskExecutor:
    """A CPU stage's units as Ray tasks across the cluster's nodes (ingest, mine, retrieve, ...), when one is configured."""

    address: str | None = None
    placement: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return self.placement

    def execute(self, stage: Stage, units: Pending, committed, context: WorkerContext) -> int:
        if not units:
            self.placement = {"executor": "ray", "tasks": 0}
            return 0
        ensure_ray(self.address)
        lanes = _Tasks(stage, context)
        self.placement = {**_cluster_placement(), "tasks_in_flight": lanes.capacity}
        return drive(stage, units, committed, lanes)
