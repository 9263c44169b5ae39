"""The coverage report at scale: build time, peak memory and HTML size on synthetic runs.

    python benchmarks/report_scale.py --pairs 10000 100000 1000000

Each size builds the splits benchmark's synthetic run (N pairs, about 5N masks, verdicts; no
model), runs the splits stage, then writes the report in a fresh process (``sam3-engine report``)
so that its peak memory is the report's alone. The synthetic images do not exist on disk, so the
gallery shows placeholders: the figures exclude decoding and drawing images (at most
``--gallery-concepts`` x ``--gallery`` pairs, 150 by default, whatever the run's size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from splits_export import build  # noqa: E402 - the benchmark beside this one builds the synthetic run


def report_once(run: Path, out: Path) -> dict:
    probe = (
        "import resource, sys, time; from sam3_engine.app.cli import main; started = time.perf_counter(); sys.argv = "
        f"['sam3-engine', 'report', {str(run)!r}, '-o', {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    seconds, peak = map(float, done.stdout.splitlines()[-1].split())
    return {"report_s": round(seconds, 1), "peak_rss_mib": round(peak), "html_mib": round(out.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()

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
            results.append({"pairs": pairs, "masks": masks, "build_and_splits_s": built, **report_once(run, Path(tmp, "report.html"))})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
