"""One writer per run directory: ``run.lock`` beside ``run.json`` names the process that holds the run.

Two runs on one output would do all the work twice and race on the Delta logs, so the second one
refuses (or waits). The arbiter is the storage itself:

- local disks: an ``flock`` on ``run.lock``; the kernel drops it when its holder dies, even by
  ``kill -9``, so a lock is never stale;
- S3: a conditional create (``If-None-Match: *``) of ``run.lock``, refreshed by a heartbeat. A lock
  whose heartbeat is older than ``stale_after`` seconds, or whose holder process is gone from this
  host, is taken over with a conditional overwrite (``If-Match`` its ETag), so of two processes
  taking over a stale lock only one wins.

The same lock, under another name in the run directory, keeps apart two processes doing one smaller thing
(``labeling push`` of one selection to one tool) without holding the whole run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fsspec.asyn import sync

from sam3_engine.engine import storage
from sam3_engine.engine.config import StorageConfig

LOCK_NAME = "run.lock"
_CONFLICTS = {"PreconditionFailed", "ConditionalRequestConflict"}


class RunLockedError(RuntimeError):
    """Another process holds the run directory."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def describe_holder(holder: dict) -> str:
    """``pid 12 on host h since 2026-...`` for an error message."""
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} ({holder.get('command', 'run')})"


def _alive_here(holder: dict) -> bool:
    """False only when the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


class RunLock:
    """Held for the length of a ``with`` block; ``acquire(wait=True)`` polls until the holder is done."""

    def __init__(
        self,
        run_url: str,
        storage_config: StorageConfig | None = None,
        command: str = "run",
        stale_after: float = 120.0,
        poll_seconds: float = 2.0,
        name: str = LOCK_NAME,
    ):
        self.run_url = storage.absolute_url(run_url)
        self.storage_config = storage_config or StorageConfig()
        self.stale_after = stale_after
        self.poll_seconds = poll_seconds
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "since": _now()}
        self._fs, root = storage.filesystem(self.run_url, self.storage_config)
        self._path = storage.join(root, name)
        protocol = storage.protocol_of(self.run_url)
        self._local = protocol == "file"
        # Other stores (gs://, ...) have no conditional write here: the run goes on unlocked, with a notice.
        self.supported = protocol in ("file", "s3", "s3a")
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost = False

    def acquire(self, wait: bool = False, on_wait: Callable[[dict], None] | None = None) -> RunLock:
        """Take the lock, or raise ``RunLockedError`` naming its holder (``wait``: poll until it is free)."""
        announced = False
        while self.supported:
            holder = self._try_local() if self._local else self._try_object()
            if holder is None:
                return self
            if not wait:
                raise RunLockedError(
                    f"run directory {self.run_url} is in use by {describe_holder(holder)}; wait for it to finish, or pass --wait"
                )
            if on_wait is not None and not announced:
                on_wait(holder)
                announced = True
            time.sleep(self.poll_seconds)
        return self

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        elif self._etag is not None:
            try:
                self._call("delete_object", IfMatch=self._etag)
            except OSError:
                pass  # taken over after going stale: the lock is no longer ours to remove
            self._etag = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._etag is not None

    def __enter__(self) -> RunLock:
        """``with RunLock(...)`` takes the lock; ``with lock.acquire(wait=True)`` uses the one already taken."""
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": _now()}).encode()

    def _try_local(self) -> dict | None:
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._read_local()
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._body(), 0)
        self._fd = fd
        return None

    def _read_local(self) -> dict:
        try:
            with open(self._path, encoding="utf-8") as f:
                return json.loads(f.read() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _call(self, method: str, **kwargs):
        bucket, key, _ = self._fs.split_path(self._path)
        return self._fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)

    def _try_object(self) -> dict | None:
        try:
            self._etag = self._call("put_object", Body=self._body(), IfNoneMatch="*")["ETag"]
        except (FileExistsError, OSError) as exc:
            if not _conflict(exc):
                raise
        else:
            self._start_heartbeat()
            return None
        try:
            found = self._call("get_object")
        except FileNotFoundError:
            return self._try_object()  # released in between: try again
        holder = json.loads(sync(self._fs.loop, found["Body"].read) or b"{}")
        age = (datetime.now(UTC) - found["LastModified"]).total_seconds()
        if age <= self.stale_after and _alive_here(holder):
            return holder
        try:
            self._etag = self._call("put_object", Body=self._body(), IfMatch=found["ETag"])["ETag"]
        except OSError as exc:
            if not _conflict(exc):
                raise
            return holder  # someone else took it over first
        self._start_heartbeat()
        return None

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            try:
                self._etag = self._call("put_object", Body=self._body(), IfMatch=self._etag)["ETag"]
            except OSError:
                self.lost = True
                return


def _conflict(exc: BaseException) -> bool:
    """True for S3's answer to a failed condition (s3fs raises it as an OSError with the boto error as cause)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in _CONFLICTS
