"""What the CPU stages of a run cost on the local process pool, by stage and pool size.

Every CPU stage starts its own pool, so each of its workers pays for its imports (the engine, the stage's
modules, and what it imports lazily, such as inflect and TextBlob for mine) once per stage of every run.
This runs ``sam3-engine run --stages ingest,mine,dedup`` on a generated folder of small photos-like images
in a fresh directory for each pool size, and reports the median seconds of each stage (as the run prints
them) and of the whole command.

    python benchmarks/pool_start.py [--images 40] [--workers 1 2 4] [--repeat 3]
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
from pathlib import Path

from PIL import Image

STAGES = ("ingest", "mine", "dedup")
STAGE_LINE = re.compile(r"^(\w+): .* in ([0-9.]+) s;", re.MULTILINE)


def _manifest(folder: Path, count: int) -> Path:
    """``count`` distinct small images, each with a caption for mine, listed in a JSONL manifest."""
    records = []
    for i in range(count):
        width, height = 64 + i % 7, 48 + i % 5
        image = Image.new("RGB", (width, height))
        image.putdata([((x * 7 + i * 31) % 256, (y * 5 + i * 17) % 256, (x + y + i) % 256) for y in range(height) for x in range(width)])
        image.save(folder / f"img{i:04d}.png")
        records.append(json.dumps({"uri": str(folder / f"img{i:04d}.png"), "caption": f"a red car {i} beside two dogs on a wooden bench"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(records) + "\n")
    return manifest


def _run(manifest: Path, output: Path, workers: int) -> dict[str, float]:
    command = [sys.executable, "-m", "sam3_engine", "run", "-q", "--input", str(manifest), "--output", str(output)]
    command += ["--workers", str(workers), "--stages", ",".join(STAGES)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    seconds = {name: float(value) for name, value in STAGE_LINE.findall(done.stdout + done.stderr)}
    return {**{stage: seconds[stage] for stage in STAGES}, "command": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        manifest = _manifest(images, args.images)
        print(f"| workers | {' | '.join(STAGES)} | command |")
        print("|---:|" + "---:|" * (len(STAGES) + 1))
        for workers in args.workers:
            runs = [_run(manifest, Path(scratch) / f"run-{workers}-{i}", workers) for i in range(args.repeat)]
            medians = [statistics.median(run[key] for run in runs) for key in (*STAGES, "command")]
            print(f"| {workers} | " + " | ".join(f"{m:.1f}" for m in medians) + " |", flush=True)


if __name__ == "__main__":
    main()
