"""Splits and export at scale: a synthetic run of N pairs and 5N masks, no model.

    python benchmarks/splits_export.py --pairs 1000000 --masks-per-pair 5

Writes synthetic ``images``, ``pairs``, ``masks``, ``candidates``, ``pair_verifications`` and
``mask_verifications`` (30 phrases per image, half the pairs positive with their masks accepted,
the rest verified absent, a third of those hard negatives; RLE strings drawn from a pool of real
rectangle encodings), then times the splits stage and SA-Co and Parquet exports of the train split,
with the process's peak memory after each step.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def _peak_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(prefix, numbers.astype(str)))


def build(store, pairs_n: int, per_pair: int) -> None:
    from pycocotools import mask as mask_utils

    from sam3_engine.schemas.tables import CANDIDATES, IMAGES, MASK_VERIFICATIONS, MASKS, PAIR_VERIFICATIONS, PAIRS

    rng = np.random.default_rng(0)
    height, width = 480, 640
    pool = []
    for _ in range(1000):
        mask = np.zeros((height, width), np.uint8)
        top, left = rng.integers(0, height - 50), rng.integers(0, width - 50)
        mask[top : top + 40, left : left + 40] = 1
        encoded = mask_utils.encode(np.asfortranarray(mask))
        pool.append((encoded["counts"].decode(), mask_utils.toBbox(encoded).tolist(), int(mask_utils.area(encoded))))
    numbers = np.arange(pairs_n)
    images_n = (pairs_n + 29) // 30
    image_of = numbers // 30
    positive = rng.random(pairs_n) < 0.5
    hard = ~positive & (rng.random(pairs_n) < 0.33)
    unit = "synthetic"
    pair_ids, image_ids = _ids("p", numbers), _ids("i", image_of)
    concept_ids = _ids("c", numbers % 500)
    image_numbers = np.arange(images_n)
    empty = pa.array([[]] * images_n, pa.list_(pa.string()))
    uris = _ids("s3://bucket/images/", image_numbers)
    store.replace(
        IMAGES,
        unit,
        pa.table(
            {
                "image_id": _ids("i", image_numbers),
                "uri": uris,
                "uris": pa.array([[u] for u in uris.to_pylist()], pa.list_(pa.string())),
                "width": np.full(images_n, width, np.int32),
                "height": np.full(images_n, height, np.int32),
                "format": pa.array(["JPEG"] * images_n),
                "mode": pa.array(["RGB"] * images_n),
                "num_bytes": np.full(images_n, 100_000, np.int64),
                "exif_orientation": np.ones(images_n, np.int8),
                "captions": empty,
                "alt_texts": empty,
                "sources": empty,
                "phrases": empty,
                "unit_id": pa.array([unit] * images_n),
            },
            schema=IMAGES.schema,
        ),
    )
    strings = lambda value: pa.array([value] * pairs_n)  # noqa: E731
    store.replace(
        PAIRS,
        unit,
        pa.table(
            {
                "pair_id": pair_ids,
                "image_id": image_ids,
                "concept_id": concept_ids,
                "phrase": concept_ids,
                "presence_score": rng.random(pairs_n).astype(np.float32),
                "instance_count": np.where(positive, per_pair * 2, 0).astype(np.int32),
                "max_score": np.ones(pairs_n, np.float32),
                "height": np.full(pairs_n, height, np.int32),
                "width": np.full(pairs_n, width, np.int32),
                "foreground_counts": pa.nulls(pairs_n, pa.string()),
                "foreground_area": pa.nulls(pairs_n, pa.int64()),
                "phrase_truncated": np.zeros(pairs_n, bool),
                "model_id": strings("synthetic"),
                "model_revision": pa.nulls(pairs_n, pa.string()),
                "random_weights": np.ones(pairs_n, bool),
                "run_id": strings("bench"),
                "unit_id": strings(unit),
            },
            schema=PAIRS.schema,
        ),
    )
    store.replace(
        CANDIDATES,
        unit,
        pa.table(
            {
                "pair_id": pair_ids,
                "image_id": image_ids,
                "concept_id": concept_ids,
                "phrase": concept_ids,
                "origin": pa.array(np.where(hard, "hard_negative", "caption")),
                "raw_phrase": pa.nulls(pairs_n, pa.string()),
                "score": np.ones(pairs_n, np.float32),
                "related_concept_id": pa.nulls(pairs_n, pa.string()),
                "relation": pa.nulls(pairs_n, pa.string()),
                "unit_id": strings(unit),
            },
            schema=CANDIDATES.schema,
        ),
    )
    store.replace(
        PAIR_VERIFICATIONS,
        "v1",
        pa.table(
            {
                "pair_id": pair_ids,
                "image_id": image_ids,
                "concept_id": concept_ids,
                "phrase": concept_ids,
                "presence_probability": rng.random(pairs_n),
                "presence": pa.array(np.where(positive, "present", "absent")),
                "presence_reason": strings("signals_agree"),
                "accepted_masks": np.where(positive, per_pair * 2, 0).astype(np.int32),
                "uncovered_fraction": np.zeros(pairs_n),
                "exhaustivity": strings("exhaustive"),
                "exhaustivity_reason": pa.array(np.where(positive, "covered", "absent_without_masks")),
                "verifier": strings("v1"),
                "verifier_version": strings("bench"),
                "thresholds": strings("{}"),
            },
            schema=PAIR_VERIFICATIONS.schema,
        ),
    )
    owners = np.repeat(np.flatnonzero(positive), per_pair * 2)  # positives hold all the masks: 5 per pair on average
    masks_n = len(owners)
    mask_numbers = np.arange(masks_n)
    drawn = rng.integers(0, len(pool), masks_n)
    mask_ids, owner_pairs = _ids("m", mask_numbers), _ids("p", owners)
    owner_images, owner_concepts = _ids("i", owners // 30), _ids("c", owners % 500)
    scores = rng.uniform(0.3, 1, masks_n).astype(np.float32)
    store.replace(
        MASKS,
        unit,
        pa.table(
            {
                "mask_id": mask_ids,
                "pair_id": owner_pairs,
                "image_id": owner_images,
                "concept_id": owner_concepts,
                "query_index": (mask_numbers % 200).astype(np.int32),
                "height": np.full(masks_n, height, np.int32),
                "width": np.full(masks_n, width, np.int32),
                "rle_counts": pa.array([pool[i][0] for i in drawn]),
                "bbox": pa.array([pool[i][1] for i in drawn], pa.list_(pa.float64(), 4)),
                "area": np.array([pool[i][2] for i in drawn], np.int64),
                "model_box": pa.array([[0.0, 0.0, 1.0, 1.0]] * masks_n, pa.list_(pa.float32(), 4)),
                "object_score": scores,
                "presence_score": scores,
                "score": scores,
                "stability_score": scores,
                "reprompt_iou": scores,
                "unit_id": pa.array([unit] * masks_n),
            },
            schema=MASKS.schema,
        ),
    )
    store.replace(
        MASK_VERIFICATIONS,
        "v1",
        pa.table(
            {
                "mask_id": mask_ids,
                "pair_id": owner_pairs,
                "image_id": owner_images,
                "concept_id": owner_concepts,
                "score": scores,
                "verdict": pa.array(["accept"] * masks_n),
                "reasons": pa.array([[]] * masks_n, pa.list_(pa.string())),
                "verifier": pa.array(["v1"] * masks_n),
                "verifier_version": pa.array(["bench"] * masks_n),
                "thresholds": pa.array(["{}"] * masks_n),
            },
            schema=MASK_VERIFICATIONS.schema,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--masks-per-pair", type=int, default=5)
    args = parser.parse_args()

    from sam3_engine.app.export import export
    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.config import StorageConfig, load_config
    from sam3_engine.engine.store import TableStore

    result = {"pairs": args.pairs}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp, "run")
        store = TableStore(str(run))
        started = time.perf_counter()
        build(store, args.pairs, args.masks_per_pair)
        result["build_s"] = round(time.perf_counter() - started, 1)
        result["masks"] = store.open("masks").to_pyarrow_dataset().count_rows()
        result["peak_rss_mib_after_build"] = _peak_mib()
        config = load_config(None, {"output": str(run), "stages": "splits", "splits.gold_min_sources": 1})
        started = time.perf_counter()
        report = run_pipeline(config).stages[0]
        result["splits_s"] = round(time.perf_counter() - started, 1)
        result["splits"] = report.counts["tiers"]
        result["peak_rss_mib_after_splits"] = _peak_mib()
        for fmt, name in (("saco", "train.json"), ("parquet", "train.parquet")):
            started = time.perf_counter()
            written = export(store, "train", "all", fmt, str(Path(tmp, name)), StorageConfig())
            result[f"export_{fmt}_s"] = round(time.perf_counter() - started, 1)
            result[f"export_{fmt}_pairs_masks"] = [written.pairs, written.masks]
            result[f"export_{fmt}_mib"] = round(Path(written.files[0]).stat().st_size / 2**20)
            result[f"peak_rss_mib_after_export_{fmt}"] = _peak_mib()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
