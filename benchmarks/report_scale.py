"""The coverage report and the live dashboard at scale, on synthetic runs.

    python benchmarks/report_scale.py --pairs 10000 100000 1000000

Report: build time, peak memory and HTML size. Dashboard (``sam3-engine dashboard``, served on
127.0.0.1): the overview's first answer (the report's queries) and a repeat (cached until a table
gets a commit), gallery pages of several concepts at several offsets, and a tile, each timed as a
browser would ask for it (one HTTP request), and the server's resident memory at the end. The
synthetic images do not exist (their tiles are placeholders); ``--photos-run RUN`` times the
pictures drawn from a run on real photos.

Each size builds the splits benchmark's synthetic run (N pairs, about 5N masks, verdicts; no
model), runs the splits stage, then writes the report in a fresh process (``sam3-engine report``)
so that its peak memory is the report's alone. The synthetic images do not exist on disk, so the
gallery shows placeholders: the figures exclude decoding and drawing images (at most
``--gallery-concepts`` x ``--gallery`` pairs, 150 by default, whatever the run's size).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from splits_export import build  # noqa: E402 - the benchmark beside this one builds the synthetic run


def report_once(run: Path, out: Path) -> dict:
    """The report in a fresh process: its time and its peak memory (VmHWM: ru_maxrss would carry this process's over exec)."""
    probe = (
        "import sys, time; from sam3_engine.app.cli import main; started = time.perf_counter(); sys.argv = "
        f"['sam3-engine', 'report', {str(run)!r}, '-o', {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "print(time.perf_counter() - started, peak / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    seconds, peak = map(float, done.stdout.splitlines()[-1].split())
    return {"report_s": round(seconds, 1), "peak_rss_mib": round(peak), "html_mib": round(out.stat().st_size / 2**20, 1)}


def _timed_get(url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        body = response.read()
    return time.perf_counter() - started, body


def _dashboard(run: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "sam3_engine", "dashboard", str(run), "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    return server, re.search(r"(http://127\.0\.0\.1:\d+)/", server.stderr.readline()).group(1)


def tiles_once(run: Path) -> dict:
    """Pictures drawn from real photos: every tile of every concept's first gallery page, thumbnail and full size."""
    server, base = _dashboard(run)
    try:
        _, overview = _timed_get(base + "/")
        thumbnails, full = [], []
        for concept in re.findall(r'<td data-column="phrase"><a href="(/gallery/[^"]+)">', overview.decode()):
            _, page = _timed_get(base + concept)
            for tile in re.findall(r'<img src="(/tile/[^"]+)"', page.decode()):
                tile = tile.replace("&amp;", "&")
                thumbnails.append(_timed_get(base + tile)[0])
                full.append(_timed_get(base + tile.replace("side=256", "side=1024"))[0])
    finally:
        server.terminate()
        server.wait(60)
    return {
        "tiles": len(thumbnails),
        "thumbnail_median_s": round(statistics.median(thumbnails), 3),
        "thumbnail_max_s": round(max(thumbnails), 3),
        "full_median_s": round(statistics.median(full), 3),
    }


def dashboard_once(run: Path) -> dict:
    server, base = _dashboard(run)
    try:
        first, overview = _timed_get(base + "/")
        again, _ = _timed_get(base + "/")
        concepts = re.findall(r'<td data-column="phrase"><a href="(/gallery/[^"]+)">', overview.decode())[:5]
        pages, tiles = [], []
        for concept in concepts:
            for page in (0, 3, 40):
                seconds, body = _timed_get(f"{base}{concept}?page={page}")
                pages.append(seconds)
                tiles += re.findall(r'<img src="(/tile/[^"]+)"', body.decode())[:1]
        tile_seconds = [_timed_get(base + tile.replace("&amp;", "&"))[0] for tile in tiles]
        rss = psutil.Process(server.pid).memory_info().rss / 2**20
    finally:
        server.terminate()
        server.wait(60)
    return {
        "overview_first_s": round(first, 2),
        "overview_cached_s": round(again, 3),
        "gallery_page_median_s": round(statistics.median(pages), 3),
        "gallery_page_max_s": round(max(pages), 3),
        "tile_median_s": round(statistics.median(tile_seconds), 3),
        "dashboard_rss_mib": round(rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--photos-run", type=Path, help="A run on real photos (the quickstart's): time the gallery's pictures too.")
    args = parser.parse_args()
    if args.photos_run:
        print(json.dumps({"photos_run": str(args.photos_run), **tiles_once(args.photos_run)}), flush=True)

    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.config import load_config
    from sam3_engine.engine.store import TableStore

    results = []
    for pairs in args.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp, "run")
            store = TableStore(str(run))
            started = time.perf_counter()
            build(store, pairs, 5)
            run_pipeline(load_config(None, {"output": str(run), "stages": "splits", "splits.gold_min_sources": 1}))
            built = round(time.perf_counter() - started, 1)
            masks = store.open("masks").to_pyarrow_dataset().count_rows()
            report = report_once(run, Path(tmp, "report.html"))
            results.append({"pairs": pairs, "masks": masks, "build_and_splits_s": built, **report, **dashboard_once(run)})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
