"""Concept mining at scale: a synthetic captioned corpus through ingest, mine, embed, retrieve and negatives.

    python benchmarks/mine_throughput.py --images 10000                      # tiny-random CLIP
    python benchmarks/mine_throughput.py --images 1000 --clip ViT-B-32       # full-size ViT-B-32, random weights

Images are small distinct crops of the example photos; captions are built from the built-in
ontology's names ("a red pickup truck next to two dogs on a sidewalk"), so mining, synonym
collapse and hard negatives do real work. ``--clip ViT-B-32`` saves a seeded random-weight
ViT-B-32 checkpoint and passes it as ``clip.pretrained``: real weights cost exactly the same.
Peak memory is sampled every 0.2 s over the whole process tree (driver, pool workers, Ray).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil
from PIL import Image, ImageOps

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COLOURS = ["red", "white", "blue", "old", "small", "large", "wooden", "shiny"]
PLACES = ["street", "table", "beach", "kitchen", "field", "sidewalk", "shelf", "porch"]


def corpus(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` distinct 96x64 JPEG crops and a JSONL manifest with one caption each."""
    import inflect

    from sam3_engine.text.concepts import Ontology

    plural = inflect.engine().plural
    rng = random.Random(seed)
    names = sorted(Ontology.load("builtin").concepts)
    photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted((EXAMPLES / "images").glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.jsonl", "w") as manifest:
        for i in range(count):
            photo = photos[i % len(photos)]
            x, y = rng.randrange(photo.width - 400), rng.randrange(photo.height - 300)
            photo.crop((x, y, x + 384, y + 256)).resize((96, 64)).save(folder / f"{i:06d}.jpg", quality=85)
            a, b, c = rng.sample(names, 3)
            caption = f"A {rng.choice(COLOURS)} {a} next to two {plural(b)} and a {c} on a {rng.choice(PLACES)}."
            manifest.write(json.dumps({"uri": f"{i:06d}.jpg", "caption": caption}) + "\n")
    return folder / "manifest.jsonl"


def random_vit_b_32(folder: Path) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    path = folder / "vit-b-32-random.pt"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)
    return path


class PeakMemory(threading.Thread):
    """Peak resident memory of this process and all its descendants, sampled."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_total = self.peak_single = 0
        self.running = True

    def run(self):
        me = psutil.Process()
        while self.running:
            sizes = []
            for process in [me, *me.children(recursive=True)]:
                try:
                    sizes.append(process.memory_info().rss)
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes))
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--clip", default="tiny-random", choices=["tiny-random", "ViT-B-32"])
    args = parser.parse_args()

    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = corpus(Path(tmp, "corpus"), args.images)
        made = time.perf_counter() - start
        settings = {
            "input": str(manifest),
            "output": str(Path(tmp, "run")),
            "stages": "ingest,mine,embed,retrieve,negatives",
            "clip.model": args.clip,
            "retrieve.min_similarity": 0.0 if args.clip == "tiny-random" else 0.25,
        }
        if args.clip != "tiny-random":
            settings["clip.pretrained"] = str(random_vit_b_32(Path(tmp)))
        memory = PeakMemory()
        memory.start()
        result = run_pipeline(load_config(None, settings))
        memory.running = False
        memory.join()
    stages = {
        s.name: {
            "seconds": round(s.seconds, 1),
            "items_per_s": round(s.items_total / s.seconds, 1),
            **{k: v for k, v in s.counts.items() if not isinstance(v, dict)},
        }
        for s in result.stages
    }
    print(
        json.dumps(
            {
                "images": args.images,
                "clip": args.clip,
                "corpus_seconds": round(made, 1),
                "total_seconds": round(result.seconds, 1),
                "stages": stages,
                "peak_rss_process_tree_mib": round(memory.peak_total / 2**20),
                "peak_rss_largest_process_mib": round(memory.peak_single / 2**20),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
