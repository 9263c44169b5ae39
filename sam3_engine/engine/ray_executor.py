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
from collections import deque
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

from sam3_engine.engine.runner import crash_if_asked, isolate
from sam3_engine.engine.stage import Stage, WorkerContext, WorkUnit, start_worker

KILL_ACTOR_ONCE_ENV = "SAM3_ENGINE_KILL_MODEL_ACTOR_ONCE"
"""Fault injection for tests: a path; the first actor to create it SIGKILLs itself mid-unit."""

FAULT_ENV_PREFIX = "SAM3_ENGINE_"
_DEATHS = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
IN_FLIGHT_PER_ACTOR = 2


_owned: dict[str, int] = {}
"""Set while this process holds a Ray session that ``ensure_ray`` opened: the reaper pipe's write end, if any."""


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS) when given, else start a local Ray; reuse a live session.

    ``ray.init`` replaces the driver's SIGTERM handler with one that exits mid-call (a native abort);
    the handler the caller had (the CLI's: stop the run cleanly) is put back.
    """
    if ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        _owned["session"] = -1
    else:
        # A private local Ray on loopback: never join some other cluster that happens to run here.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
        _owned["session"] = _start_reaper()
    if main_thread and previous is not None:
        signal.signal(signal.SIGTERM, previous)


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


class _ModelWorker:
    """One model actor: its stage is set up (the model loaded) once, here, and kept for every unit."""

    def __init__(self, stage: Stage, context: WorkerContext, torch_threads: int | None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.stage = start_worker(stage, context)

    def process(self, unit: WorkUnit, prepared):
        crash_if_asked(unit)
        tables = self.stage.process(unit, prepared)
        marker = os.environ.get(KILL_ACTOR_ONCE_ENV)
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), 9)
        return tables


def _cpu_actor_threads(actors: int) -> int:
    """Torch threads for a CPU model actor: its share of a node's cores.

    Ray limits an actor's thread pools to its ``num_cpus`` (one, so that preparation tasks can be
    scheduled beside it); a CPU model then runs at a fraction of the node's speed. Model compute
    dominates preparation, so each CPU actor takes its share of the cores instead.
    """
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    if not cpus:
        return 1
    actors_per_node = -(-actors // len(cpus))
    return max(1, int(min(cpus)) // actors_per_node)


def _prepare(stage: Stage, context: WorkerContext, unit: WorkUnit):
    return start_worker(stage, context, setup=False).prepare(unit)


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

    def execute(self, stage: Stage, units: list[WorkUnit], committed, context: WorkerContext) -> int:
        if not units:  # every unit done (say, a verdict-only re-run): no cluster, no model
            self.placement = {"executor": "ray", "model_actors": 0}
            return 0
        ensure_ray(self.address)
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
        count = self.actors or max(1, int(cluster_gpus // gpus) if gpus else 1)
        # Named after the stage, so that the Ray dashboard shows what each actor does.
        worker_class = type(f"{stage.name.title()}ModelWorker", (_ModelWorker,), {})
        # Fault-injection switches reach the actors' processes, which do not inherit the driver's environment.
        injected = {k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)}
        options = {"runtime_env": {"env_vars": injected}} if injected else {}
        self.placement = {
            "executor": "ray",
            "ray_address": ray.get_runtime_context().gcs_address,
            "ray_nodes": sum(node["Alive"] for node in ray.nodes()),
            "model_actors": count,
            "gpus_per_actor": gpus,
        }
        actor_class = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1, max_restarts=0, **options)(worker_class)
        prepare = ray.remote(num_cpus=1, max_retries=3)(_prepare)
        stage_ref = ray.put(stage)
        threads = None if gpus else _cpu_actor_threads(count)
        actor_context = replace(context, device="cuda" if gpus else "cpu")
        new_actor = lambda: actor_class.remote(stage_ref, actor_context, threads)  # noqa: E731
        actors = [new_actor() for _ in range(count)]
        pending = deque(units)
        strikes: dict[str, int] = {}
        inflight: dict[ray.ObjectRef, tuple[WorkUnit, object]] = {}
        load = {actor: 0 for actor in actors}
        crashes = 0
        try:
            while pending or inflight:
                for actor in list(load):
                    while pending and load[actor] < IN_FLIGHT_PER_ACTOR:
                        unit = pending.popleft()
                        inflight[actor.process.remote(unit, prepare.remote(stage_ref, context, unit))] = (unit, actor)
                        load[actor] += 1
                ready, _ = ray.wait(list(inflight), num_returns=1)
                unit, actor = inflight.pop(ready[0])
                if actor in load:
                    load[actor] -= 1
                try:
                    tables = ray.get(ready[0])
                except _DEATHS:
                    crashes += actor in load
                    if actor in load:
                        del load[actor]
                        ray.kill(actor, no_restart=True)
                        load[new_actor()] = 0
                    strikes[unit.unit_id] = strikes.get(unit.unit_id, 0) + 1
                    if strikes[unit.unit_id] < 2:
                        pending.appendleft(unit)
                    else:
                        crashes += isolate(
                            stage, unit, lambda single: self._run_alone(new_actor, prepare, stage_ref, context, single), _DEATHS, committed
                        )
                    continue
                committed(unit, tables)
        finally:
            for actor in load:
                ray.kill(actor, no_restart=True)
        return crashes

    @staticmethod
    def _run_alone(new_actor, prepare, stage_ref, context: WorkerContext, unit: WorkUnit):
        """One unit on a fresh actor, killed afterwards: an item that crashes it harms nothing else."""
        actor = new_actor()
        try:
            return ray.get(actor.process.remote(unit, prepare.remote(stage_ref, context, unit)))
        finally:
            ray.kill(actor, no_restart=True)
