"""One run per run directory: a second run refuses naming the holder, or waits with --wait; on disk and on S3."""

import json
import signal
import socket
import subprocess
import sys

import boto3
import pytest

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import StorageConfig, load_config
from sam3_engine.engine.lock import RunLock, RunLockedError
from tests.conftest import EXAMPLES
from tests.helpers import rows

HOLD = """
import sys
from sam3_engine.engine.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "sam3_engine", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_lock_on_a_local_run_directory_is_refused_and_names_its_holder(tmp_path):
    first = RunLock(str(tmp_path / "run"), command="run").acquire()
    with pytest.raises(RunLockedError, match=r"in use by pid \d+ on host .* \(run\); wait for it to finish, or pass --wait"):
        RunLock(str(tmp_path / "run")).acquire()
    first.release()
    RunLock(str(tmp_path / "run")).acquire().release()


def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
        RunLock(str(tmp_path / "run")).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLock(str(tmp_path / "run")).acquire().release()


def test_a_second_run_refuses_with_one_line_then_waits_with_wait(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock(str(run_dir), command="import-labels").acquire()
    refused = _cli("run", "--input", str(EXAMPLES / "images"), "--output", str(run_dir), "--stages", "ingest", "-q")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert "Traceback" not in err
    assert f"is in use by pid {lock.holder['pid']} on host {socket.gethostname()}" in err and "(import-labels)" in err
    assert not (run_dir / "run.json").exists()

    waiting = _cli("run", "--input", str(EXAMPLES / "images"), "--output", str(run_dir), "--stages", "ingest", "-q", "--wait")
    for line in waiting.stderr:
        if "waiting for the run directory" in line:
            break
    else:
        pytest.fail("the waiting run never said it waits")
    assert waiting.poll() is None
    lock.release()
    waiting.wait(timeout=120)
    assert waiting.returncode == 0
    assert rows(run_dir, "SELECT count(*) AS n FROM images") == [{"n": 3}]
    assert rows(run_dir, "SELECT count(DISTINCT run_id) AS n FROM runs") == [{"n": 1}]


@pytest.fixture()
def s3_run(s3_server, request):
    bucket = f"lock-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/one", StorageConfig(endpoint_url=s3_server)


def test_s3_lock_is_exclusive_and_released(s3_run, photos_dir):
    url, storage = s3_run
    lock = RunLock(url, storage).acquire()
    with pytest.raises(RunLockedError, match="in use by pid"):
        RunLock(url, storage).acquire()
    config = load_config(None, {"input": str(photos_dir), "output": url, "storage.endpoint_url": storage.endpoint_url, "stages": "ingest"})
    with pytest.raises(RunLockedError):
        run_pipeline(config)
    lock.release()
    run_pipeline(config)
    assert rows(url, "SELECT count(*) AS n FROM images", storage_config=storage) == [{"n": 3}]
    RunLock(url, storage).acquire().release()  # the run let go of it


def test_s3_stale_lock_is_taken_over_and_a_fresh_one_is_not(s3_run, s3_server):
    url, storage = s3_run
    bucket, key = url.removeprefix("s3://").split("/", 1)
    elsewhere = {"host": "another-host", "pid": 1, "command": "run", "since": "2026-01-01T00:00:00+00:00"}
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=f"{key}/run.lock", Body=json.dumps(elsewhere).encode())
    with pytest.raises(RunLockedError, match="pid 1 on host another-host"):
        RunLock(url, storage, stale_after=3600).acquire()
    taker = RunLock(url, storage, stale_after=0).acquire()  # its heartbeat is older than 0 s: stale
    held = json.loads(boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=bucket, Key=f"{key}/run.lock")["Body"].read())
    assert held["pid"] == taker.holder["pid"] and held["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match=f"pid {taker.holder['pid']} "):
        RunLock(url, storage, stale_after=3600).acquire()
    taker.release()


def test_s3_lock_of_a_dead_process_on_this_host_is_free_at_once(s3_run, s3_server):
    url, storage = s3_run
    bucket, key = url.removeprefix("s3://").split("/", 1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {"host": socket.gethostname(), "pid": gone.pid, "command": "run", "since": "2026-01-01T00:00:00+00:00"}
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=f"{key}/run.lock", Body=json.dumps(dead).encode())
    RunLock(url, storage, stale_after=3600).acquire().release()


def test_import_labels_takes_the_run_lock(tmp_path, photos_dir):
    from tests.helpers import ingest

    run_dir = tmp_path / "run"
    ingest(photos_dir, run_dir)
    labels = tmp_path / "labels.csv"
    labels.write_text("pair_id,present\nnot-a-pair,true\n")
    command = [sys.executable, "-m", "sam3_engine", "import-labels", str(run_dir), "--labels", str(labels)]
    with RunLock(str(run_dir), command="run") as lock:
        refused = subprocess.run(command, capture_output=True, text=True)
        assert refused.returncode == 2 and f"in use by pid {lock.holder['pid']} " in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 labels name no pair or mask of this run" in done.stderr
