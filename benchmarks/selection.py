"""Selection for review: errors found per 100 reviewed pairs against random, and the cost at scale.

    python benchmarks/selection.py --pairs 100000 --budget 2000        # the simulated annotator
    python benchmarks/selection.py --scale 100000 1000000               # select's time at each size

Simulated annotator. The splits benchmark's synthetic run (30 phrases per image), with machine verdicts
that are wrong as a calibrated model's would be. A pair of presence probability p is truly present with
probability p; the machine says present at p >= 0.6 and absent at p <= 0.4, so a decided verdict is wrong
with probability 1 - p or p. A mask is truly bad with probability 1 - its stability score (stability
drawn from Beta(10, 1), mean 0.91). An error is a wrong decided verdict, or a bad mask the verifier accepted (one per
pair at most). Each strategy selects ``--budget`` pairs; the annotator finds the errors among them.
Uncertain pairs (0.4 < p < 0.6) are undecided, not errors: a strategy that only chases them scores low.

Scale: ``select`` with every strategy (CLIP-like 512-d unit embeddings for each image), timed in-process
after the run is built.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from splits_export import build  # noqa: E402 - the benchmark beside this one builds the synthetic run


def _replace_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def simulated_run(store, pairs: int, seed: int = 0) -> tuple[set[str], int]:
    """Build the run with calibrated machine errors; returns the pairs holding an error, and the undecided pairs."""
    from sam3_engine.schemas.tables import IMAGE_EMBEDDINGS, MASK_VERIFICATIONS, MASKS, PAIR_VERIFICATIONS

    build(store, pairs, 2)
    rng = np.random.default_rng(seed)
    verdicts = store.read("pair_verifications")
    probability = rng.random(verdicts.num_rows)
    presence = np.where(probability >= 0.6, "present", np.where(probability <= 0.4, "absent", "uncertain"))
    truly_present = rng.random(verdicts.num_rows) < probability
    verdicts = _replace_column(verdicts, "presence_probability", probability)
    verdicts = _replace_column(verdicts, "presence", presence)
    store.overwrite(PAIR_VERIFICATIONS, pa.RecordBatchReader.from_batches(verdicts.schema, verdicts.to_batches()))
    pair_ids = np.array(verdicts["pair_id"].to_pylist())
    wrong = ((presence == "present") & ~truly_present) | ((presence == "absent") & truly_present)
    errors = set(pair_ids[wrong])

    masks = store.read("masks")
    stability = rng.beta(10, 1, masks.num_rows)
    masks = _replace_column(masks, "stability_score", stability)
    masks = _replace_column(masks, "reprompt_iou", np.clip(stability + rng.normal(0, 0.05, masks.num_rows), 0, 1))
    store.overwrite(MASKS, pa.RecordBatchReader.from_batches(masks.schema, masks.to_batches()))
    judged = store.read("mask_verifications")
    bad = rng.random(masks.num_rows) > stability
    accepted = np.array(judged["verdict"].to_pylist()) == "accept"
    errors |= set(np.array(masks["pair_id"].to_pylist())[bad & accepted])
    store.overwrite(MASK_VERIFICATIONS, pa.RecordBatchReader.from_batches(judged.schema, judged.to_batches()))

    images = store.read("images", ["image_id"])["image_id"]
    vectors = rng.normal(size=(len(images), 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = pa.table(
        {
            "image_id": images,
            "model": pa.array(["synthetic"] * len(images)),
            "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            "unit_id": pa.array(["synthetic"] * len(images)),
        }
    )
    store.overwrite(IMAGE_EMBEDDINGS, pa.RecordBatchReader.from_batches(embeddings.schema, embeddings.to_batches()))
    return errors, int((presence == "uncertain").sum())


STRATEGIES = {
    "random": {"random": 1.0},
    "uncertainty": {"uncertainty": 1.0},
    "uncertainty+diversity": {"uncertainty": 1.0, "diversity": 0.5},
    "disagreement": {"disagreement": 1.0},
    "coverage": {"coverage": 1.0},
    "default": None,
}


def simulate(pairs: int, budget: int) -> None:
    from sam3_engine.engine.store import TableStore
    from sam3_engine.labeling.select import parse_strategies, select

    with tempfile.TemporaryDirectory() as tmp:
        store = TableStore(str(Path(tmp, "run")))
        errors, undecided = simulated_run(store, pairs)
        print(json.dumps({"pairs": pairs, "errors": len(errors), "error_share": round(len(errors) / pairs, 3), "undecided": undecided}))
        for label, weights in STRATEGIES.items():
            started = time.perf_counter()
            chosen = select(store, label.replace("+", "-"), budget, weights or parse_strategies(None), max_pairs_per_image=10)
            seconds = time.perf_counter() - started
            picked = chosen.rows["pair_id"].to_pylist()
            found = sum(pair in errors for pair in picked)
            print(
                json.dumps(
                    {
                        "strategy": label,
                        "reviewed": len(picked),
                        "errors_found": found,
                        "per_100": round(100 * found / len(picked), 1),
                        "select_s": round(seconds, 1),
                    }
                ),
                flush=True,
            )
            _forget(store, label.replace("+", "-"))


def _forget(store, name: str) -> None:
    """Drop a selection so that the next strategy chooses from the same candidates."""
    from sam3_engine.schemas.tables import SELECTIONS

    store.replace(SELECTIONS, name, SELECTIONS.empty())


def scale(sizes: list[int], budget: int) -> None:
    from sam3_engine.engine.store import TableStore
    from sam3_engine.labeling.select import parse_strategies, select

    for pairs in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = TableStore(str(Path(tmp, "run")))
            simulated_run(store, pairs)
            for label, weights in (("default (with diversity)", parse_strategies(None)), ("uncertainty", {"uncertainty": 1.0})):
                started = time.perf_counter()
                chosen = select(store, "scale", budget, weights)
                seconds = time.perf_counter() - started
                print(
                    json.dumps({"pairs": pairs, "strategies": label, "selected": chosen.rows.num_rows, "select_s": round(seconds, 1)}),
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--scale", type=int, nargs="*", help="Time select at these sizes instead of simulating the annotator.")
    args = parser.parse_args()
    if args.scale:
        scale(args.scale, args.budget)
    else:
        simulate(args.pairs, args.budget)


if __name__ == "__main__":
    main()
