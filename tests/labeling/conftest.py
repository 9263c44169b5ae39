"""A real Label Studio server on 127.0.0.1, started once for the labelling tests and stopped after them."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

SERVER_ENV = "SAM3_ENGINE_LABEL_STUDIO"
"""Path of the ``label-studio`` executable (its own virtualenv: it pins Django and friends); else it is looked up on PATH."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """(url, token, files_root) of a fresh Label Studio: its own data directory, a user and API token made at start."""
    executable = os.environ.get(SERVER_ENV) or shutil.which("label-studio")
    if not executable:
        message = f"Label Studio is not installed: pip install label-studio in a virtualenv, and set {SERVER_ENV} to its label-studio"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): there a missing server is a failure, not a skip
        pytest.skip(message)
    base = tmp_path_factory.mktemp("label-studio")
    files_root = base / "files"
    files_root.mkdir()
    token = secrets.token_hex(20)
    port = _free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": "annotator@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(16),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "SENTRY_DSN": "",
    }
    command = [executable, "start", "--internal-host", "127.0.0.1", "--port", str(port), "--data-dir", str(base / "data")]
    log = open(base / "server.log", "wb")  # noqa: SIM115 - open for the server's whole life
    server = subprocess.Popen(
        [*command, "--enable-legacy-api-token", "--no-browser"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a fresh data directory: migrations first (about a minute here)
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            raise RuntimeError(f"Label Studio did not start; see {base / 'server.log'}")
        time.sleep(0.5)  # waiting for the server to come up; no outcome depends on it
    yield url, token, files_root
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
    log.close()
