"""Kills what a driver started when the driver dies without shutting its private local Ray down.

After ``kill -9`` of a driver, Ray's raylet and GCS die with it, but its DashboardAgent and
RuntimeEnvAgent notice the dead raylet and then wait on the dead GCS for a minute or more (about
220 MB between them). The driver starts this watcher with the read end of a pipe whose write end
only the driver holds. While the pipe is open the watcher notes the driver's descendants once a
second; end of file means the driver shut Ray down (it is still alive: nothing to do) or died (every
noted process that still runs is SIGKILLed).

Usage (by ``ray_executor``): ``python -m sam3_engine.engine.ray_reaper DRIVER_PID``.
"""

from __future__ import annotations

import os
import select
import sys
import time

import psutil

POLL_SECONDS = 1.0
EXIT_GRACE_SECONDS = 5.0
"""A killed driver's pipe reaches end of file a moment before the driver is a zombie (the kernel closes a dying
process's files first; longer on a loaded machine). A driver that closed the pipe itself, having shut Ray down, is
still running after this long."""


def watch(driver_pid: int, stream) -> dict[int, float]:
    """Note the driver's descendants (pid -> start time) until ``stream`` reaches end of file."""
    driver, me = psutil.Process(driver_pid), os.getpid()
    seen: dict[int, float] = {}
    while True:
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass  # the driver is gone: its children are already noted
        ready, _, _ = select.select([stream], [], [], POLL_SECONDS)
        if ready and not stream.read(4096):
            return seen


def reap(processes: dict[int, float]) -> int:
    """SIGKILL the processes that still run; a pid reused by a newer process (another start time) is spared."""
    killed = 0
    for pid, created in processes.items():
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - created) < 0.01:
                process.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def driver_gone(driver_pid: int) -> bool:
    """The driver has exited (or is a zombie): it may vanish between any two checks, which counts as gone."""
    try:
        return psutil.Process(driver_pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def driver_exits(driver_pid: int, within: float) -> bool:
    """The driver is gone now or within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not driver_gone(driver_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main() -> None:
    driver_pid = int(sys.argv[1])
    seen = watch(driver_pid, sys.stdin.buffer.raw)
    if driver_exits(driver_pid, EXIT_GRACE_SECONDS):
        reap(seen)


if __name__ == "__main__":
    main()
