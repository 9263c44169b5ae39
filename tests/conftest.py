"""Shared fixtures: the real example photos, a generated corpus of odd and broken files, an S3 server."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock
from PIL import Image

from tests.helpers import without_ray_address

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def quickstart(request, tmp_path_factory):
    """The README's quickstart run by the CLI from a scratch working directory, printing for an 80-column terminal, as on
    a fresh machine (no Ray cluster to join): (run directory, the finished process). Shared and read-only: a test that
    changes the run works on a copy. Under pytest-xdist the controller runs it while the workers run other tests."""
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is None:
        return _finished_quickstart(_run_quickstart(tmp_path_factory.mktemp("user")))
    folder = Path(workerinput[QUICKSTART_FOLDER])
    with FileLock(folder / "quickstart.lock"):  # held by the controller until the run has ended
        fields = json.loads((folder / "quickstart.json").read_text())
    return _finished_quickstart(fields)


QUICKSTART_FOLDER = "sam3_engine_quickstart"
"""The key of ``workerinput`` naming the folder of the quickstart the xdist controller runs."""


def _quickstart_command() -> list[str]:
    return [sys.executable, "-m", "sam3_engine", "run", str(EXAMPLES / "quickstart.yaml")]


def _quickstart_env() -> dict[str, str]:
    return {**without_ray_address(), "COLUMNS": "80"}


def _run_quickstart(cwd: Path) -> dict:
    done = subprocess.run(_quickstart_command(), capture_output=True, text=True, cwd=cwd, env=_quickstart_env())
    return {"cwd": str(cwd), "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _finished_quickstart(fields: dict) -> tuple[Path, subprocess.CompletedProcess]:
    assert fields["returncode"] == 0, fields["stderr"]
    done = subprocess.CompletedProcess(_quickstart_command(), 0, fields["stdout"], fields["stderr"])
    return Path(fields["cwd"]) / "runs" / "quickstart", done


class _BackgroundQuickstart:
    """The quickstart run by the xdist controller from the session's start: the workers run other tests meanwhile, where
    one of them would otherwise run it (a minute) while every other worker that needs it sat waiting. The controller
    holds the run's lock until its record is written; a worker that needs the run waits on that lock."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = FileLock(folder / "quickstart.lock", thread_local=False)  # released by the thread that waits on the run
        self.lock.acquire()
        cwd = folder / "user"
        cwd.mkdir()
        self.process = subprocess.Popen(
            _quickstart_command(),
            cwd=cwd,
            env=_quickstart_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.waiter = threading.Thread(target=self._record, args=(cwd,), name="quickstart", daemon=True)
        self.waiter.start()

    def _record(self, cwd: Path) -> None:
        try:
            stdout, stderr = self.process.communicate()
            fields = {"cwd": str(cwd), "returncode": self.process.returncode, "stdout": stdout, "stderr": stderr}
            (self.folder / "quickstart.json").write_text(json.dumps(fields))
        finally:
            self.lock.release()

    def stop(self) -> None:
        """Stop a run no test waited for (a session of other tests), the way a user stops one: SIGTERM."""
        if self.process.poll() is None:
            self.process.terminate()
        self.waiter.join(60)


_BACKGROUND_QUICKSTART = pytest.StashKey[_BackgroundQuickstart]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    if session.config.pluginmanager.has_plugin("dsession"):  # the xdist controller, before it starts its workers
        folder = Path(tempfile.mkdtemp(prefix="sam3-engine-tests-"))
        session.config.stash[_BACKGROUND_QUICKSTART] = _BackgroundQuickstart(folder)


def pytest_configure_node(node):
    """xdist: tell each worker where the controller's quickstart is."""
    node.workerinput[QUICKSTART_FOLDER] = str(node.config.stash[_BACKGROUND_QUICKSTART].folder)


def pytest_sessionfinish(session):
    background = session.config.stash.get(_BACKGROUND_QUICKSTART, None)
    if background is not None:
        background.stop()
        shutil.rmtree(background.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The real photos: ../shared/data when present (the developers' machines), else the bundled copies."""
    shared = SHARED_DATA / "images"
    return shared if shared.is_dir() else EXAMPLES / "images"


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core, at most two, the measured set-up (`-n N` asks for more). Each worker builds its
    own Ray clusters and servers, a few GiB of memory each."""
    return max(1, min(os.cpu_count() or 1, 2))


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _gradient(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    image.putdata(
        [((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x + y + seed) % 256) for y in range(height) for x in range(width)]
    )
    return image


def odd_images() -> dict[str, tuple[bytes, dict]]:
    """Valid images in unusual encodings, with the probe results they must give."""
    rotated = _gradient((40, 20), 1)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 40x20, displayed 20x40
    return {
        "cmyk.jpg": (_save(_gradient((32, 24), 2).convert("CMYK"), "JPEG"), {"mode": "CMYK", "width": 32, "height": 24, "format": "JPEG"}),
        "gray16.png": (_save(Image.new("I;16", (30, 10), 40000), "PNG"), {"mode": "I;16", "width": 30, "height": 10, "format": "PNG"}),
        "palette.png": (_save(_gradient((16, 16), 3).convert("P"), "PNG"), {"mode": "P", "width": 16, "height": 16, "format": "PNG"}),
        "alpha.png": (
            _save(Image.new("RGBA", (12, 8), (255, 0, 0, 128)), "PNG"),
            {"mode": "RGBA", "width": 12, "height": 8, "format": "PNG"},
        ),
        "gray.jpg": (_save(_gradient((20, 30), 4).convert("L"), "JPEG"), {"mode": "L", "width": 20, "height": 30, "format": "JPEG"}),
        "exif_rotated.jpg": (
            _save(rotated, "JPEG", exif=exif),
            {"mode": "RGB", "width": 20, "height": 40, "format": "JPEG", "exif_orientation": 6},
        ),
        "photo.webp": (_save(_gradient((24, 24), 5), "WEBP"), {"mode": "RGB", "width": 24, "height": 24, "format": "WEBP"}),
    }


def broken_files(photo: bytes) -> dict[str, tuple[bytes, str]]:
    """Files that must be rejected, with the exact reason code each must get."""
    png = _save(_gradient((64, 48), 6), "PNG")
    corrupt_png = bytearray(png)
    start = png.index(b"IDAT") + 8
    corrupt_png[start : start + 16] = bytes(16)
    corrupt_jpeg = bytearray(photo)
    corrupt_jpeg[2000:6000] = b"\xff" * 4000
    return {
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (photo[: len(photo) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "corrupt.png": (bytes(corrupt_png), "corrupt"),
        "corrupt.jpg": (bytes(corrupt_jpeg), "corrupt"),
        "notes.jpg": (b"this is a text file with an image suffix\n", "not_an_image"),
        "readme.txt": (b"hello\n", "not_an_image"),
        "picture.heic": (b"\x00\x00\x00\x18ftypheic" + bytes(64), "unsupported_format"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "unsupported_format"),
        "portable.ppm": (_save(_gradient((8, 8), 7), "PPM"), "unsupported_format"),
        # 144 megapixels of a 1-bit image: an 18 kB decompression bomb.
        "bomb.png": (_save(Image.new("1", (12000, 12000)), "PNG"), "too_large"),
    }


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, photos_dir) -> Path:
    """A folder of real photos, a duplicate under another name, odd valid images and broken files."""
    root = tmp_path_factory.mktemp("corpus")
    for photo in sorted(photos_dir.glob("*.jpg")):
        shutil.copy(photo, root / photo.name)
    (root / "nested").mkdir()
    shutil.copy(photos_dir / "truck.jpg", root / "nested" / "truck-copy.jpg")
    for name, (data, _) in odd_images().items():
        (root / name).write_bytes(data)
    for name, (data, _) in broken_files((photos_dir / "groceries.jpg").read_bytes()).items():
        (root / name).write_bytes(data)
    (root / ".hidden.jpg").write_bytes(b"not listed: hidden files are skipped")
    return root


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Forty small distinct images, two duplicates and two broken files: enough units to kill a run midway."""
    root = tmp_path_factory.mktemp("synthetic")
    for i in range(40):
        (root / f"img{i:03d}.png").write_bytes(_save(_gradient((16 + i % 5, 12 + i % 3), i), "PNG"))
    (root / "dup-a.png").write_bytes((root / "img005.png").read_bytes())
    (root / "dup-b.png").write_bytes((root / "img006.png").read_bytes())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    (root / "empty.png").write_bytes(b"")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol endpoint on loopback (moto in server mode), with credentials in the environment."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError as exc:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto server did not start") from exc
            time.sleep(0.2)
    yield endpoint
    process.terminate()
    process.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster():
    """One two-node local Ray cluster shared by every test that runs model actors."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
