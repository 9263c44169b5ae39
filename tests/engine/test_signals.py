"""Stopping a run that has a private local Ray: SIGTERM stops it cleanly, kill -9 leaves no Ray process behind."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import EXAMPLES
from tests.helpers import rows, without_ray_address

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees as Linux shows them")


def _start(output):
    """The quickstart's first stages as a user runs them, started without a cluster: the run starts its own Ray."""
    command = [
        sys.executable,
        "-m",
        "sam3_engine",
        "run",
        str(EXAMPLES / "quickstart.yaml"),
        "--stages",
        "ingest,mine,embed",
        "--output",
        str(output),
        "-q",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=without_ray_address())


def _descendants_once_the_model_actor_runs(driver: subprocess.Popen) -> list[psutil.Process]:
    """The driver's process tree, read once its embed model actor exists (Ray's helpers started by then)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        tree = psutil.Process(driver.pid).children(recursive=True)
        if any("EmbedModelWorker" in " ".join(_cmdline(p)) for p in tree):
            return tree
        time.sleep(0.2)
    pytest.fail(f"no embed model actor appeared: {driver.communicate()[1][-2000:]}")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _gone(processes: list[psutil.Process], within: float) -> list[str]:
    """Those of ``processes`` still running after ``within`` seconds (a zombie counts as gone)."""
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [" ".join(_cmdline(p))[:80] for p in alive]
        time.sleep(0.2)


def test_sigterm_marks_the_run_interrupted_and_shuts_ray_down(tmp_path):
    output = tmp_path / "run"
    driver = _start(output)
    tree = _descendants_once_the_model_actor_runs(driver)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 143, err[-3000:]
    assert "interrupted by SIGTERM" in err and "run the same command again to resume" in err
    assert "Traceback" not in err and "SystemExit" not in err
    assert not _gone(tree, within=30), "Ray processes outlived a run stopped by SIGTERM"
    runs = rows(output, "SELECT status, error FROM runs")
    assert runs == [{"status": "interrupted", "error": f"interrupted by signal {int(signal.SIGTERM)}"}]
    assert not (output / "run.lock").read_text(), "the run lock was not released"


def test_sigterm_while_ray_starts_marks_the_run_interrupted_and_leaves_no_ray_process_behind(tmp_path):
    """``ray.init`` sets a SIGTERM handler of its own (``sys.exit``) while it starts the local node: the signal is sent
    as soon as the node's first process (the GCS) runs, and every process the driver started is noted until it exits."""
    output = tmp_path / "run"
    driver = _start(output)
    tree: dict[int, psutil.Process] = {}
    signalled = False
    while driver.poll() is None:
        try:
            tree.update((p.pid, p) for p in psutil.Process(driver.pid).children(recursive=True) if p.pid not in tree)
        except psutil.Error:
            continue  # the driver is exiting
        if not signalled and any("gcs_server" in " ".join(_cmdline(p)) for p in tree.values()):
            driver.send_signal(signal.SIGTERM)
            signalled = True
        time.sleep(0.02)
    _, err = driver.communicate()
    assert signalled, "Ray's GCS never appeared among the driver's processes"
    assert driver.returncode == 143, err[-3000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err and "SystemExit" not in err
    assert not _gone(list(tree.values()), within=30), "Ray processes outlived a run stopped while Ray started"
    assert rows(output, "SELECT status FROM runs") == [{"status": "interrupted"}]
    assert not (output / "run.lock").read_text(), "the run lock was not released"


def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    driver = _start(tmp_path / "run")
    tree = _descendants_once_the_model_actor_runs(driver)
    helpers = [p for p in tree if any(name in " ".join(_cmdline(p)) for name in ("DashboardAgent", "RuntimeEnvAgent"))]
    reaper = [p for p in tree if "ray_reaper" in " ".join(_cmdline(p))]
    assert helpers and len(reaper) == 1
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    reaper[0].wait(timeout=60)
    # The reaper exits right after its SIGKILLs; the kernel tears a killed process down a moment later (longer on a
    # loaded machine: 10 s was once too short with a Label Studio server and a second suite running). Unreaped, the
    # agents wait on the dead GCS for a minute or more, so 30 s still tells them apart.
    assert not _gone(tree, within=30), "Ray processes outlived a killed driver"


def test_a_ray_out_of_memory_kill_ends_in_one_line_and_a_traceback_file(tmp_path):
    """Ray's own memory monitor, told that 1% of the node's memory is too much, kills the run's workers for real."""
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "sam3_engine",
        "run",
        str(EXAMPLES / "quickstart.yaml"),
        "--stages",
        "ingest,mine,embed",
        "--output",
        str(output),
        "-q",
    ]
    env = {**without_ray_address(), "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Ray killed a worker because the node ran out of memory; committed work is kept and re-running"), last
    assert "Traceback" not in done.stderr
    log = last.split("(traceback: ")[1].rstrip(")")
    assert log.startswith(str(output / "logs")) and "OutOfMemoryError" in open(log).read()
    assert rows(output, "SELECT status FROM runs") == [{"status": "failed"}]
    assert rows(output, "SELECT count(*) AS n FROM images") == [{"n": 3}], "ingest's committed rows are kept"


def test_the_reaper_counts_a_driver_that_vanishes_or_lingers_as_a_zombie_as_gone():
    """The driver may exit between any two of the reaper's checks: that is gone, not an error."""
    from sam3_engine.engine.ray_reaper import driver_gone

    assert not driver_gone(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
    assert driver_gone(child.pid), "a zombie"
    child.wait()
    assert driver_gone(child.pid), "no such process"


def test_the_reaper_waits_for_a_driver_whose_pipe_closed_to_exit():
    """A killed driver's pipe closes a moment before it exits: the reaper waits for that, but not for a live driver."""
    from sam3_engine.engine.ray_reaper import driver_exits, driver_gone

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    assert not driver_gone(exiting.pid), "still running when the reaper would have given up before"
    assert driver_exits(exiting.pid, within=60), "exited within the grace period"
    exiting.wait()
    assert not driver_exits(os.getpid(), within=0.2), "a driver still running is not gone"
