"""Verification speed: the verify stage's throughput, and deriving verdicts from stored scores at scale.

    python benchmarks/verify_speed.py stage --images 24 --phrases 8                 # tiny-random SAM 3 and CLIP
    python benchmarks/verify_speed.py stage --images 24 --phrases 8 --clip ViT-B-32 # full-size CLIP, random weights
    python benchmarks/verify_speed.py verdicts --pairs 200000 --masks-per-pair 5    # SQL verdicts, no model

``stage`` proposes masks with the tiny random SAM 3 on distinct crops of the example photos, then
times the verify stage on them (CPU tasks for geometry and crops, a CLIP actor on Ray).
``verdicts`` writes synthetic ``pairs``, ``masks``, ``mask_scores`` and ``pair_scores`` tables
(rectangular masks, uniform random scores) and times what a threshold change costs: the verdict
macros over every row plus the union of accepted masks per pair, and the two commits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PHRASES = [
    "grocery bag",
    "car",
    "vegetable",
    "pickup truck",
    "child",
    "basketball court",
    "wall",
    "stairs",
    "building",
    "bib",
    "tree",
    "window",
]


def stage(args) -> dict:
    from mine_throughput import random_vit_b_32

    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.config import load_config

    base = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted((EXAMPLES / "images").glob("*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        for i in range(args.images):
            image = base[i % 3]
            image.crop((i, 0, image.width, image.height)).resize((args.width, args.width * image.height // image.width)).save(
                folder / f"{i:05d}.jpg", quality=90
            )
        settings = {
            "input": str(folder),
            "output": str(Path(tmp, "run")),
            "model.name": "tiny-random",
            "clip.model": args.clip,
            "propose.phrases": PHRASES[: args.phrases],
            "propose.unit_size": 8,
            "verify.unit_size": args.unit_size,
        }
        if args.clip != "tiny-random":  # a seeded random-weight checkpoint: real weights cost the same
            settings["clip.pretrained"] = str(random_vit_b_32(Path(tmp)))
        run_pipeline(load_config(None, {**settings, "stages": "ingest,propose"}))
        started = time.perf_counter()
        result = run_pipeline(load_config(None, {**settings, "stages": "verify"}))
        total = time.perf_counter() - started
        report = result.stages[0]
        retune = run_pipeline(load_config(None, {**settings, "stages": "verify", "verify.min_stability": 0.5})).stages[0]
    return {
        "images": args.images,
        "image_width": args.width,
        "phrases": args.phrases,
        "masks": report.counts["masks"],
        "clip": args.clip,
        "verify_stage_s": round(report.seconds, 2),
        "run_s_with_planning": round(total, 2),
        "images_per_s": round(args.images / report.seconds, 2),
        "masks_per_s": round(report.counts["masks"] / report.seconds, 1),
        "threshold_change_s": round(retune.seconds, 2),
        "threshold_change_units_run": retune.units_committed,
    }


def _rectangle_counts(height: int, width: int, top: int, left: int, box_h: int, box_w: int) -> str:
    """COCO compressed RLE counts of a filled rectangle, built from run lengths (no full mask in memory)."""
    from pycocotools import mask as mask_utils

    counts, position = [], 0
    for column in range(left, left + box_w):
        start = column * height + top
        counts += [start - position, box_h]
        position = start + box_h
    counts.append(height * width - position)
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)["counts"].decode("ascii")


def verdicts(args) -> dict:
    from sam3_engine.engine.config import ClipConfig, StorageConfig
    from sam3_engine.engine.store import TableStore
    from sam3_engine.models.clip import ClipChoice
    from sam3_engine.schemas.tables import MASK_SCORES, MASKS, PAIR_SCORES, PAIRS
    from sam3_engine.stages.verify import VerifyConfig, VerifyStage
    from sam3_engine.text.concepts import Ontology

    rng = np.random.default_rng(0)
    height = width = args.size
    pairs_n, per_pair = args.pairs, args.masks_per_pair
    masks_n = pairs_n * per_pair
    pair_ids = np.array([f"p{i:09d}" for i in range(pairs_n)])
    image_ids = np.array([f"i{i // 30:08d}" for i in range(pairs_n)])  # 30 phrases per image
    concept_ids = np.array([f"c{i % 30:03d}" for i in range(pairs_n)])
    tops, lefts = rng.integers(0, height // 2, masks_n), rng.integers(0, width // 2, masks_n)
    sides = rng.integers(2, height // 4, masks_n)
    counts = [_rectangle_counts(height, width, int(t), int(left), int(s), int(s)) for t, left, s in zip(tops, lefts, sides, strict=True)]
    foreground = _rectangle_counts(height, width, 0, 0, height // 2, width // 2)
    unit = "synthetic"
    with tempfile.TemporaryDirectory() as tmp:
        store = TableStore(tmp)
        mask_pair = np.repeat(pair_ids, per_pair)
        mask_image, mask_concept = np.repeat(image_ids, per_pair), np.repeat(concept_ids, per_pair)
        mask_ids = pa.array([f"m{i:010d}" for i in range(masks_n)])
        scores = rng.uniform(0.3, 1.0, masks_n).astype(np.float32)
        store.replace(
            PAIRS,
            unit,
            pa.table(
                {
                    "pair_id": pair_ids,
                    "image_id": image_ids,
                    "concept_id": concept_ids,
                    "phrase": concept_ids,
                    "presence_score": rng.uniform(0, 1, pairs_n).astype(np.float32),
                    "instance_count": np.full(pairs_n, per_pair, np.int32),
                    "max_score": np.ones(pairs_n, np.float32),
                    "height": np.full(pairs_n, height, np.int32),
                    "width": np.full(pairs_n, width, np.int32),
                    "foreground_counts": pa.array([foreground] * pairs_n),
                    "foreground_area": np.full(pairs_n, height * width // 4, np.int64),
                    "phrase_truncated": np.zeros(pairs_n, bool),
                    "model_id": pa.array(["synthetic"] * pairs_n),
                    "model_revision": pa.nulls(pairs_n, pa.string()),
                    "random_weights": np.ones(pairs_n, bool),
                    "run_id": pa.array(["bench"] * pairs_n),
                    "unit_id": pa.array([unit] * pairs_n),
                },
                schema=PAIRS.schema,
            ),
        )
        store.replace(
            MASKS,
            unit,
            pa.table(
                {
                    "mask_id": mask_ids,
                    "pair_id": mask_pair,
                    "image_id": mask_image,
                    "concept_id": mask_concept,
                    "query_index": np.zeros(masks_n, np.int32),
                    "height": np.full(masks_n, height, np.int32),
                    "width": np.full(masks_n, width, np.int32),
                    "rle_counts": pa.array(counts),
                    "bbox": pa.array(
                        [[float(left), float(t), float(s), float(s)] for t, left, s in zip(tops, lefts, sides, strict=True)],
                        pa.list_(pa.float64(), 4),
                    ),
                    "area": (sides.astype(np.int64) ** 2),
                    "model_box": pa.array([[0.0, 0.0, 1.0, 1.0]] * masks_n, pa.list_(pa.float32(), 4)),
                    "object_score": scores,
                    "presence_score": scores,
                    "score": scores,
                    "stability_score": rng.uniform(0.5, 1, masks_n).astype(np.float32),
                    "reprompt_iou": rng.uniform(0, 1, masks_n).astype(np.float32),
                    "unit_id": pa.array([unit] * masks_n),
                },
                schema=MASKS.schema,
            ),
        )
        stamp = {
            "verifier": pa.array(["sam3-clip"] * masks_n),
            "verifier_version": pa.array(["bench"] * masks_n),
            "unit_id": pa.array([unit] * masks_n),
        }
        store.replace(
            MASK_SCORES,
            unit,
            pa.table(
                {
                    "mask_id": mask_ids,
                    "pair_id": mask_pair,
                    "image_id": mask_image,
                    "concept_id": mask_concept,
                    "area_fraction": (sides.astype(np.float32) ** 2 / (height * width)),
                    "fragments": np.ones(masks_n, np.int32),
                    "largest_fragment_fraction": np.ones(masks_n, np.float32),
                    "border_fraction": np.zeros(masks_n, np.float32),
                    "duplicate_iou": rng.uniform(0, 0.7, masks_n).astype(np.float32),
                    "duplicate_of": pa.nulls(masks_n, pa.string()),
                    "conflict_iou": rng.uniform(0, 0.7, masks_n).astype(np.float32),
                    "conflict_with": pa.nulls(masks_n, pa.string()),
                    "clip_crop_similarity": rng.uniform(0, 0.4, masks_n).astype(np.float32),
                    "clip_crop_margin": rng.uniform(-0.1, 0.1, masks_n).astype(np.float32),
                    **stamp,
                },
                schema=MASK_SCORES.schema,
            ),
        )
        store.replace(
            PAIR_SCORES,
            unit,
            pa.table(
                {
                    "pair_id": pair_ids,
                    "image_id": image_ids,
                    "concept_id": concept_ids,
                    "clip_similarity": rng.uniform(0, 0.4, pairs_n).astype(np.float32),
                    "clip_z": rng.normal(0, 1, pairs_n).astype(np.float32),
                    **{k: v[:pairs_n] for k, v in stamp.items()},
                },
                schema=PAIR_SCORES.schema,
            ),
        )
        verify = VerifyStage(VerifyConfig(), ClipConfig(), ClipChoice("tiny-random", None), Ontology.load(None), StorageConfig())
        started = time.perf_counter()
        derived = verify.derive(store, [unit])
        derive_s = time.perf_counter() - started
        started = time.perf_counter()
        written = {d.table.name: store.replace(d.table, d.key, d.rows) for d in derived}
        write_s = time.perf_counter() - started
    import resource

    return {
        "pairs": pairs_n,
        "masks": masks_n,
        "mask_size": f"{height}x{width}",
        "derive_s": round(derive_s, 2),
        "write_s": round(write_s, 2),
        "rows_written": written,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["stage", "verdicts"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--width", type=int, default=640, help="Width the benchmark images are resized to.")
    parser.add_argument("--phrases", type=int, default=8)
    parser.add_argument("--unit-size", type=int, default=8)
    parser.add_argument("--clip", default="tiny-random", help="tiny-random, or an open_clip architecture run with random weights.")
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--masks-per-pair", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="Synthetic mask side in pixels.")
    args = parser.parse_args()
    result = {"stage": stage, "verdicts": verdicts}[args.what](args)
    print(json.dumps({"what": args.what, **result}, indent=2))


if __name__ == "__main__":
    main()
