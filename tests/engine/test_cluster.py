"""The pipeline on a real multi-node Ray cluster (``ray start``: a head and two worker nodes, separate processes on this
machine): every stage of the quickstart runs there and its tables' rows equal the local quickstart's; a worker node
killed mid-stage, input and output on the loopback S3 server, loses and duplicates nothing."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
from ray.exceptions import RpcError

from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.ray_executor import KILL_NODE_ONCE_ENV
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import TABLES
from tests.conftest import EXAMPLES
from tests.helpers import rows, run_command, without_ray_address

RAY = str(Path(sys.executable).with_name("ray"))
RUN_COLUMNS = {"run_id", "attempt_id", "committed_at", "stats"}
"""Columns that say which run or attempt wrote a row, when, and how fast (a unit's model seconds and peak memory): the only
ones two runs of the same inputs may differ in."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(index: int) -> list[str]:
    """Each node of a cluster on one machine needs ports of its own (Ray's defaults are fixed numbers); node ``index``'s
    workers get a range of their own below Linux's ephemeral ports, where no other node's ports are drawn."""
    low = 21000 + 500 * index
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 499}",
    ]


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the group is gone already
        pass


class Nodes:
    """A Ray cluster of ``ray start --block`` processes, each a node; stopping one's process group stops the node. As in
    ``ray_cluster.yaml``, the head has no CPUs for work: every unit runs on a worker node. Ray resolves 127.0.0.1 to the
    machine's own address for ``ray start``, so the nodes listen there; nothing leaves this machine."""

    def __init__(self, env: dict):
        self.env = env
        self.gcs: GcsClient | None = None
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.processes = [self._start(["--head", f"--port={port}", f"--temp-dir={self.temp}", "--include-dashboard=false"], cpus=0)]

    def _start(self, arguments: list[str], cpus: int = 2) -> subprocess.Popen:
        index = len(getattr(self, "processes", []))
        command = [RAY, "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats", *_ports(index), *arguments]
        log = open(Path(self.temp) / f"node{index}.log", "w")  # noqa: SIM115
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def add_worker(self) -> None:
        self.processes.append(self._start([f"--address={self.address}"]))

    def alive(self) -> int:
        """The nodes the GCS holds alive: one RPC, where ``ray status`` (a Python process, 2 s of CPU) reports the
        autoscaler's view, which lags it by seconds."""
        try:
            self.gcs = self.gcs or GcsClient(address=self.address)  # waits for the head's GCS to come up
            nodes = self.gcs.get_all_node_info(timeout=10)
        except RpcError:  # the head is not up yet
            return 0
        return sum(node.state == GcsNodeInfo.ALIVE for node in nodes.values())

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 120
        while self.alive() != count:
            assert time.monotonic() < deadline, f"the cluster did not reach {count} nodes: {self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        """The tails of the nodes' ``ray start`` output and of their raylets' logs, for a failure's message."""
        logs = sorted(Path(self.temp).glob("node*.log")) + sorted(Path(self.temp).glob("session_latest/logs/raylet*"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-800:]}" for p in logs)

    def stop(self) -> None:
        """SIGTERM every node, then SIGKILL what is left of each node's process group after a few seconds (a head's
        graceful stop takes about 30 s here; its workers and a killed node's orphans are in its group)."""
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Started after the S3 server, so that the nodes' workers have its credentials in their environment. Token
    authentication (on by default for ``ray start``) is off: every node and driver is on this machine. The head checks
    its nodes' health every second instead of every 3 (5 failed checks in a row mark a node dead, as by default): a
    killed node is noticed in 5 s, not 15."""
    nodes = Nodes({**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000"})
    try:
        nodes.wait_for(1)
        for count in (2, 3):  # one at a time: nodes starting together on one machine race for the same log and port files
            nodes.add_worker()
            nodes.wait_for(count)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def quickstart_bucket(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="cluster")
    for path in [EXAMPLES / "manifest.jsonl", *sorted((EXAMPLES / "images").glob("*.jpg"))]:
        client.upload_file(str(path), "cluster", f"quickstart/{path.relative_to(EXAMPLES)}")
    return "s3://cluster"


def _run(env: dict, *arguments, **flags) -> None:
    command = run_command(EXAMPLES / "quickstart.yaml", *arguments, **flags)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _run_on_s3(bucket, s3_server, output, env, **flags) -> str:
    run_url = f"{bucket}/runs/{output}"
    _run(env, input=f"{bucket}/quickstart/manifest.jsonl", output=run_url, settings=[f"storage.endpoint_url={s3_server}"], **flags)
    return run_url


def _snapshot(run_url, storage: StorageConfig | None = None) -> dict[str, list[dict]]:
    """Every table of the run but ``runs`` (one row per attempt), without the columns that name the run or attempt."""
    store = TableStore(str(run_url), storage)
    snapshot = {}
    for name, spec in TABLES.items():
        if name == "runs" or store.open(name) is None:
            continue
        columns = [f'"{c}"' for c in spec.schema.names if c not in RUN_COLUMNS]
        snapshot[name] = rows(run_url, f"SELECT {', '.join(columns)} FROM {name} ORDER BY ALL", storage_config=storage)
    return snapshot


def _executors(run_url, storage: StorageConfig | None = None) -> dict[str, dict]:
    (summary,) = rows(run_url, "SELECT summary_json FROM runs WHERE status = 'finished'", storage_config=storage)
    return {stage["name"]: stage["executor"] for stage in json.loads(summary["summary_json"])["stages"]}


def test_the_whole_pipeline_on_a_three_node_cluster_gives_the_rows_of_a_local_run(cluster, quickstart, tmp_path):
    """The reference is the README's quickstart (CPU stages on the driver's process pool, model stages on a private
    local Ray); the same config on the cluster runs every stage there."""
    local_dir, _ = quickstart
    assert {e["executor"] for e in _executors(local_dir).values()} == {"processes", "ray"}
    _run({**cluster.env, "RAY_ADDRESS": cluster.address}, output=tmp_path / "cluster")
    executors = _executors(tmp_path / "cluster")
    assert {name: e["executor"] for name, e in executors.items()} == dict.fromkeys(executors, "ray"), "every stage on the cluster"
    assert {e["ray_nodes"] for e in executors.values() if "ray_nodes" in e} == {3}
    local = _snapshot(local_dir)
    assert _snapshot(tmp_path / "cluster") == local
    assert {"images", "concepts", "masks", "pair_verifications", "splits"} <= set(local)


def test_a_worker_node_killed_mid_stage_loses_and_duplicates_nothing(cluster, quickstart_bucket, s3_server, tmp_path):
    """Ingest reads the photos from S3 on the worker nodes; the first unit on a worker node kills that node's raylet."""
    storage = StorageConfig(endpoint_url=s3_server)
    local = _snapshot(_run_on_s3(quickstart_bucket, s3_server, "local-ingest", without_ray_address(), stages="ingest"), storage)
    marker = tmp_path / "node-killed"
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, KILL_NODE_ONCE_ENV: str(marker)}
    run_url = _run_on_s3(quickstart_bucket, s3_server, "node-killed", env, stages="ingest")
    try:
        assert marker.exists(), "a worker node must really have been killed"
        cluster.wait_for(2)  # Ray marks the node dead once its health checks fail, which may be after the run
    finally:  # the other test may run after this one: it needs three nodes
        cluster.add_worker()
        cluster.wait_for(3)
    assert _executors(run_url, storage)["ingest"]["executor"] == "ray"
    assert _snapshot(run_url, storage) == local
    assert {"images", "sources", "units"} <= set(local) and len(local["images"]) == 3
    (summary,) = rows(run_url, "SELECT summary_json FROM runs WHERE status = 'finished'", storage_config=storage)
    assert sum(stage["worker_crashes"] for stage in json.loads(summary["summary_json"])["stages"]) >= 1
