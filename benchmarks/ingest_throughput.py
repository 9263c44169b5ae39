"""Ingest throughput and memory on a corpus derived from the example photos.

    python benchmarks/ingest_throughput.py --images 2000 --workers 2

Builds N distinct JPEGs (random crops, flips and quality settings of the real photos, at their
original resolutions), ingests them into a fresh run directory, then re-runs the same command to
time a resume with nothing to do. Prints images/s and the peak resident memory of the driver and
of the largest worker process.
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import load_config

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "images"


def make_corpus(root: Path, count: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    total = 0
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        left, top = rng.randrange(w // 4), rng.randrange(h // 4)
        image = photo.crop((left, top, left + w * 3 // 4, top + h * 3 // 4))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randrange(70, 95))
        (root / f"img{i:06d}.jpg").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--unit-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus")
        corpus.mkdir()
        size = make_corpus(corpus, args.images)
        overrides = {
            "input": str(corpus),
            "output": str(Path(tmp, "run")),
            "ingest.workers": args.workers,
            "ingest.unit_size": args.unit_size,
        }
        config = load_config(None, overrides)
        start = time.perf_counter()
        first = run_pipeline(config)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = run_pipeline(config)
        warm = time.perf_counter() - start
    report = first.stages[0]
    print(f"corpus: {args.images} JPEGs, {size / 2**20:.0f} MiB, units: {report.units_total}, workers: {args.workers}")
    print(f"ingest: {cold:.1f} s, {args.images / cold:.1f} images/s, {size / 2**20 / cold:.1f} MiB/s; counts {report.counts}")
    print(f"resume with nothing to do: {warm:.2f} s ({again.stages[0].units_skipped} units skipped)")
    print(
        f"peak RSS: driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, largest "
        f"worker {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
