"""Proof at size: a synthetic captioned corpus through every stage with the tiny models, on local disk.

    python benchmarks/scale.py --images 1000 5000          # each size in its own run directory
    python benchmarks/scale.py --images 2000 --stages ingest,mine --cpu-stages ray   # CPU stages as Ray tasks

The corpus is ``mine_throughput.corpus`` (distinct crops of the example photos, captions from the
ontology's names). Every stage of the quickstart runs, with tiny-random SAM 3, CLIP and VLM (same
classes and code path as the real models). Reports per stage: seconds and images per second; peak
resident memory by kind of process (the driver, pool workers, Ray workers, Ray's own daemons),
sampled every 0.2 s; Parquet files per table at the end; and the time of a no-op resume of the
finished run (the same command again).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mine_throughput import corpus  # noqa: E402

STAGES = "ingest,mine,embed,dedup,retrieve,negatives,propose,verify,verify_vlm,splits"


def kind(process: psutil.Process, driver: int) -> str:
    if process.pid == driver:
        return "driver"
    command = " ".join(process.cmdline())
    if "multiprocessing" in command:
        return "pool_worker"
    if "default_worker.py" in command or process.name().startswith("ray::"):
        return "ray_worker"
    return "ray_daemon" if "ray" in command else "other"


class PeakMemoryByKind(threading.Thread):
    """The largest resident set seen for each kind of process, and of the whole tree, sampled."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[str, int] = {}
        self.running = True

    def run(self):
        me = psutil.Process()
        while self.running:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    rss = process.memory_info().rss
                    name = kind(process, me.pid)
                except psutil.Error:
                    continue
                total += rss
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            self.peaks["process_tree"] = max(self.peaks.get("process_tree", 0), total)
            time.sleep(0.2)


def measure(images: int, tmp: Path, stages: str, cpu_stages: str) -> dict:
    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.config import load_config
    from sam3_engine.engine.store import TableStore
    from sam3_engine.schemas.tables import TABLES

    manifest = corpus(tmp / "corpus", images)
    settings = {
        "input": str(manifest),
        "output": str(tmp / "run"),
        "stages": stages,
        "ray.cpu_stages": cpu_stages,
        "model.name": "tiny-random",
        "clip.model": "tiny-random",
        "verify_vlm.model": "tiny-random",
        "retrieve.min_similarity": 0.0,
        "propose.threshold": 0.3,
    }
    config = load_config(None, settings)
    memory = PeakMemoryByKind()
    memory.start()
    result = run_pipeline(config)
    memory.running = False
    memory.join()
    resumed_at = time.perf_counter()
    again = run_pipeline(config)
    resume = time.perf_counter() - resumed_at
    assert all(stage.units_committed == 0 for stage in again.stages), "a finished run's resume commits nothing"
    store = TableStore(str(tmp / "run"))
    return {
        "images": images,
        "cpu_stages": cpu_stages,
        "total_s": round(result.seconds, 1),
        "stages": {s.name: {"s": round(s.seconds, 1), "img_per_s": round(images / s.seconds, 1)} for s in result.stages},
        "peak_rss_mib": {k: round(v / 2**20) for k, v in sorted(memory.peaks.items())},
        "files_per_table": {name: len(store.files(name)) for name in TABLES if store.open(name) is not None},
        "noop_resume_s": round(resume, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000])
    parser.add_argument("--stages", default=STAGES)
    parser.add_argument("--cpu-stages", default="auto", choices=["auto", "ray", "processes"])
    args = parser.parse_args()
    for images in args.images:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(images, Path(tmp), args.stages, args.cpu_stages)), flush=True)


if __name__ == "__main__":
    main()
