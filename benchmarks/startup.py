"""What a process pays before its first unit: the run driver, pool workers, model actors.

Every driver, every pool worker and every model actor is a fresh Python process, so this cost is
paid once per process of every run (and by every test that starts one). Each case runs in a new
interpreter; the figures are the median of ``--repeat`` runs.

    python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = {
    "cli driver (sam3-engine run, before any stage)": "import sam3_engine.app.cli, sam3_engine.app.pipeline",
    "ingest pool worker (stage modules, its stage unpickled)": (
        "from sam3_engine.engine.stage import stage_names, stage_class; stage_names(); stage_class('ingest')"
    ),
    "mine pool worker (its stage, a phrase counted, singularised and parsed)": (
        "from sam3_engine.engine.stage import stage_names, stage_class; stage_names(); stage_class('mine'); "
        "from sam3_engine.text.concepts import token_count, singular, noun_phrases; "
        "token_count('a red dog'); singular('dogs'); noun_phrases('a red dog on the grass')"
    ),
    "model actor (CLIP and SAM 3 wrappers: torch, open_clip, transformers)": (
        "import sam3_engine.stages, sam3_engine.models.clip, sam3_engine.models.sam3"
    ),
    "SAM 3 actor, tiny-random (model and processor built on CPU)": (
        "from sam3_engine.models.sam3 import Sam3Segmenter; Sam3Segmenter.load('tiny-random', device='cpu')"
    ),
}

PROBE = """
import resource, sys, time
started = time.perf_counter()
exec({code!r})
heavy = sorted({{'torch', 'ray', 'transformers', 'open_clip'}} & set(sys.modules))
print({{"seconds": time.perf_counter() - started, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "heavy": heavy}})
"""


def measure(code: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True, check=True)
        runs.append(eval(done.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own probe's dict
    return {
        "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        "rss_mib": round(statistics.median(r["rss_mib"] for r in runs)),
        "heavy_modules": runs[0]["heavy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps({name: measure(code, args.repeat) for name, code in CASES.items()}, indent=2))


if __name__ == "__main__":
    main()
