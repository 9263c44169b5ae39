"""Costs that must not grow with hostile input: mining a long caption, a large query result, a killed driver's Ray.

    python benchmarks/hardening.py [--words 2000 8000 24000 80000] [--rows 1000000 10000000 100000000]

1. ``noun_phrases`` on ``"car " * n`` (one noun run, no punctuation): seconds per size, which must
   grow linearly; and the mine stage's cap (``mine.max_caption_chars``) on a 1 MB caption.
2. ``sam3-engine query RUN "SELECT * FROM range(N)" --max-rows 2`` in a subprocess: its peak RSS,
   which must stay flat as N grows.
3. A driver with a private local Ray killed by SIGKILL: seconds until no process of its tree runs.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def mining(sizes: list[int]) -> None:
    from sam3_engine.stages.mine import MineConfig
    from sam3_engine.text.concepts import noun_phrases

    noun_phrases("warm up the tagger")
    print("| words | seconds | seconds per 1k words |\n|---:|---:|---:|")
    for words in sizes:
        started = time.perf_counter()
        noun_phrases("car " * words)
        seconds = time.perf_counter() - started
        print(f"| {words:,} | {seconds:.2f} | {1000 * seconds / words:.3f} |")
    cap = MineConfig().max_caption_chars
    started = time.perf_counter()
    noun_phrases(("car " * 262_144)[:cap])
    print(f"1 MB caption cut at mine.max_caption_chars = {cap:,}: {time.perf_counter() - started:.2f} s")


def query_memory(sizes: list[int], run_dir: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sam3_engine",
            "run",
            "--input",
            str(REPO / "examples" / "images"),
            "--output",
            str(run_dir),
            "--stages",
            "ingest",
            "-q",
        ],
        check=True,
        capture_output=True,
    )
    print("| rows in the result | --max-rows | peak RSS MiB | wall s |\n|---:|---:|---:|---:|")
    for rows in sizes:
        started = time.perf_counter()
        query = [sys.executable, "-m", "sam3_engine", "query", str(run_dir), f"SELECT * FROM range({rows})", "--max-rows", "2"]
        done = subprocess.run([sys.executable, "-c", MEASURE, *query], capture_output=True, text=True)
        code, peak_kib = done.stdout.split()[-2:]
        note = "" if code == "0" else f" (exit {code})"
        print(f"| {rows:,} | 2 | {int(peak_kib) / 1024:.0f}{note} | {time.perf_counter() - started:.1f} |")


MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
"""Runs one command and prints its exit status and peak RSS (KiB), apart from any other child's."""

DRIVER = """
import os, time
from sam3_engine.engine.ray_executor import ensure_ray
ensure_ray()
print("ready", flush=True)
time.sleep(3600)
"""


def killed_driver() -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    driver.stdout.readline()
    time.sleep(3)  # let the agents start
    tree = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed = time.monotonic()
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
        time.sleep(0.1)
    print(f"kill -9 of a driver with a private Ray: {len(tree)} processes, all gone {time.monotonic() - killed:.1f} s later")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, nargs="+", default=[2000, 8000, 24000, 80000])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    args = parser.parse_args()
    mining(args.words)
    with tempfile.TemporaryDirectory() as folder:
        query_memory(args.rows, Path(folder) / "run")
    killed_driver()


if __name__ == "__main__":
    main()
