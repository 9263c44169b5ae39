"""Near-duplicates: leaks across splits before and after the dedup stage, false merges, and the cost of its indexes.

    python benchmarks/near_duplicates.py --grid 6                  # the planted corpus
    python benchmarks/near_duplicates.py --index 10000 100000 1000000  # index cost on synthetic items

Planted corpus: "photos" are the tiles of a grid laid on each example photo (tiles do not overlap, so
no two photos share a pixel); each photo comes with five planted near-duplicates: resized to half,
re-encoded as JPEG at quality 20, cropped by 5% of each side at a random place, mirrored, and all of
these at once (60% size, 5% crop, mirrored, quality 35). The run: ingest, one verified positive pair
per image, splits (dealt per image: before), dedup, splits again (dealt per group: after). A family
(a photo and its variants) "crosses" when its images sit in more than one split, counted over five
salts. False merges: groups holding images of two families. The pHash distance is swept on the
stored hashes, without hashing again.

Index cost: N images of random 64-bit hashes (the worst case for an index: no structure) and random
unit vectors of dimension 512, each with a planted near-duplicate (4 and 10 bits away; cosine 0.95),
through the functions the stage uses. The pHash index holds 2N entries and answers 5N queries, the
CLIP index N and N; where a full pass would take too long, its queries are timed on a sample and
scaled. Each measurement runs in a process of its own, for its peak memory.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "images"
SALTS = ("sam3-engine", "a", "b", "c", "d")
VARIANTS = ("resized", "jpeg_q20", "cropped", "mirrored", "combined")
SAMPLE_QUERIES = 50_000


def _crop(image: Image.Image, cut: float, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    keep_w, keep_h = round(width * (1 - cut)), round(height * (1 - cut))
    left, top = round((width - keep_w) * rng.random()), round((height - keep_h) * rng.random())
    return image.crop((left, top, left + keep_w, top + keep_h))


def variants(photo: Image.Image, rng: np.random.Generator) -> dict[str, tuple[Image.Image, str, dict]]:
    """The planted near-duplicates of a photo: image, format and save options."""
    width, height = photo.size
    small = photo.resize((width * 6 // 10, height * 6 // 10), Image.LANCZOS)
    return {
        "resized": (photo.resize((width // 2, height // 2), Image.LANCZOS), "PNG", {}),
        "jpeg_q20": (photo, "JPEG", {"quality": 20}),
        "cropped": (_crop(photo, 0.05, rng), "JPEG", {"quality": 90}),
        "mirrored": (ImageOps.mirror(photo), "JPEG", {"quality": 90}),
        "combined": (ImageOps.mirror(_crop(small, 0.05, rng)), "JPEG", {"quality": 35}),
    }


def planted_corpus(root: Path, grid: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write the corpus; returns each file's (family, variant), variant ``source`` for the photo itself."""
    rng = np.random.default_rng(seed)
    truth = {}
    for path in sorted(PHOTOS.glob("*.jpg")):
        photo = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        width, height = photo.size
        for column in range(grid):
            for row in range(grid):
                family = f"{path.stem}-{column}-{row}"
                box = (column * width // grid, row * height // grid, (column + 1) * width // grid, (row + 1) * height // grid)
                tile = photo.crop(box)
                tile.save(root / f"{family}.jpg", quality=95)
                truth[f"{family}.jpg"] = (family, "source")
                for name, (image, fmt, options) in variants(tile, rng).items():
                    file = f"{family}.{name}.{'png' if fmt == 'PNG' else 'jpg'}"
                    buffer = io.BytesIO()
                    image.save(buffer, fmt, **options)
                    (root / file).write_bytes(buffer.getvalue())
                    truth[file] = (family, name)
    return truth


def _positive_pairs(store, image_ids: list[str]) -> None:
    """One positive pair per image, as a verifier would have confirmed it: what splits deals."""
    from sam3_engine.schemas.tables import PAIR_VERIFICATIONS

    rows = [
        {
            "pair_id": f"pair-{image_id}",
            "image_id": image_id,
            "concept_id": "c",
            "phrase": "thing",
            "presence_probability": 0.9,
            "presence": "present",
            "presence_reason": "signals_agree",
            "accepted_masks": 1,
            "uncovered_fraction": 0.0,
            "exhaustivity": "exhaustive",
            "exhaustivity_reason": "covered",
            "verifier": "bench",
            "verifier_version": "bench",
            "thresholds": "{}",
        }
        for image_id in image_ids
    ]
    store.replace(PAIR_VERIFICATIONS, "bench", pa.Table.from_pylist(rows, schema=PAIR_VERIFICATIONS.schema))


def _crossing(run: str, family_of: dict[str, str], salt: str) -> int:
    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.catalog import query
    from sam3_engine.engine.config import load_config

    run_pipeline(load_config(None, {"output": run, "stages": "splits", "splits.salt": salt}))
    placed: dict[str, set[str]] = {}
    for row in query(run, "SELECT image_id, split FROM splits").to_pylist():
        placed.setdefault(family_of[row["image_id"]], set()).add(row["split"])
    return sum(len(splits) > 1 for splits in placed.values())


def _grouping(hashes: dict, labels: list[str], distance: int) -> dict:
    """Recall of planted variants, families kept whole and false merges, from stored hashes at one distance."""
    from sam3_engine.metrics.near_duplicates import connected_groups, phash_edges

    groups = connected_groups(len(labels), phash_edges(hashes["phash"], hashes["mirrored"], hashes["crops"], distance, 10, 10**9)).label
    family = [label[0] for label in labels]
    source_group = {f: g for (f, variant), g in zip(labels, groups, strict=True) if variant == "source"}
    found = Counter(variant for (f, variant), g in zip(labels, groups, strict=True) if variant != "source" and g == source_group[f])
    members: dict[int, set[str]] = {}
    for f, g in zip(family, groups, strict=True):
        members.setdefault(g, set()).add(f)
    whole = sum(len({g for f2, g in zip(family, groups, strict=True) if f2 == f}) == 1 for f in source_group)
    merged = [m for m in members.values() if len(m) > 1]
    return {
        "distance": distance,
        "recall": sum(found.values()) / (len(labels) - len(source_group)),
        "per_variant": {v: found[v] / len(source_group) for v in VARIANTS},
        "families_whole": whole,
        "families": len(source_group),
        "false_merge_groups": len(merged),
        "families_merged": sum(len(m) for m in merged),
    }


def planted(grid: int, workers: int) -> None:
    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.catalog import query
    from sam3_engine.engine.config import load_config
    from sam3_engine.engine.store import TableStore

    with tempfile.TemporaryDirectory() as tmp:
        corpus, run = Path(tmp, "corpus"), str(Path(tmp, "run"))
        corpus.mkdir()
        truth = planted_corpus(corpus, grid)
        print(f"corpus: {len(truth)} images, {sum(v == 'source' for _, v in truth.values())} families (grid {grid}x{grid})")
        run_pipeline(load_config(None, {"input": str(corpus), "output": run, "stages": "ingest", "ingest.workers": workers}))
        images = query(run, "SELECT image_id, uri FROM images ORDER BY image_id").to_pylist()
        family_of = {row["image_id"]: truth[Path(row["uri"]).name][0] for row in images}
        _positive_pairs(TableStore(run), list(family_of))
        before = {salt: _crossing(run, family_of, salt) for salt in SALTS}
        started = time.monotonic()
        result = run_pipeline(load_config(None, {"output": run, "stages": "dedup", "ingest.workers": workers}))
        seconds = time.monotonic() - started
        after = {salt: _crossing(run, family_of, salt) for salt in SALTS}
        counts = result.stages[0].counts
        print(f"dedup: {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.0f} images/s, {workers} workers); {counts}")
        print("\nfamilies whose images sit in two or more splits, per salt:")
        print("| salt | per image (before) | per group (after) |\n|---|---:|---:|")
        for salt in SALTS:
            print(f"| {salt} | {before[salt]} of {len(set(family_of.values()))} | {after[salt]} |")
        stored = query(run, "SELECT h.*, i.uri FROM image_hashes h JOIN images i USING (image_id) ORDER BY image_id").to_pylist()
        hashes = {
            "phash": np.array([r["phash"] for r in stored], np.int64),
            "mirrored": np.array([r["phash_mirrored"] for r in stored], np.int64),
            "crops": np.array([r["phash_crops"] for r in stored], np.int64),
        }
        labels = [truth[Path(r["uri"]).name] for r in stored]
        print("\n| pHash distance | recall of variants | " + " | ".join(VARIANTS) + " | families whole | false-merge groups |")
        print("|---:" * (4 + len(VARIANTS)) + "|")
        for distance in (6, 8, 10, 12, 14):
            g = _grouping(hashes, labels, distance)
            per = " | ".join(f"{g['per_variant'][v]:.1%}" for v in VARIANTS)
            print(
                f"| {distance} | {g['recall']:.1%} | {per} | {g['families_whole']} of {g['families']} | "
                f"{g['false_merge_groups']} ({g['families_merged']} families) |"
            )
        alone = np.repeat(hashes["phash"][:, None], 4, axis=1)
        print("\nAt distance 10, without some of the hashes:\n")
        print("| hashes | recall of variants | " + " | ".join(VARIANTS) + " | families whole | false-merge groups |")
        print("|---" + "|---:" * (3 + len(VARIANTS)) + "|")
        for name, ablated in (
            ("image and mirror image (no corner crops)", {**hashes, "crops": alone}),
            ("image only", {"phash": hashes["phash"], "mirrored": hashes["phash"], "crops": alone}),
        ):
            g = _grouping(ablated, labels, 10)
            per = " | ".join(f"{g['per_variant'][v]:.1%}" for v in VARIANTS)
            print(
                f"| {name} | {g['recall']:.1%} | {per} | {g['families_whole']} of {g['families']} | "
                f"{g['false_merge_groups']} ({g['families_merged']} families) |"
            )
        distinct = np.array([r["phash"] for r, label in zip(stored, labels, strict=True) if label[1] == "source"], np.int64)
        bits = np.unpackbits(distinct.astype(">i8").view(np.uint8).reshape(-1, 8), axis=1)
        between = (bits[:, None, :] != bits[None, :, :]).sum(2)[np.triu_indices(len(bits), 1)]
        print(
            f"\npHash distance between distinct photos: min {between.min()}, "
            f"1st percentile {np.percentile(between, 1):.0f}, median {np.median(between):.0f}"
        )


def _planted_codes(rng: np.random.Generator, codes: np.ndarray, flips: int) -> np.ndarray:
    bits = np.unpackbits(codes.astype(">i8").view(np.uint8).reshape(-1, 8), axis=1)
    for row in range(len(bits)):
        bits[row, rng.choice(64, flips, replace=False)] ^= 1
    return np.packbits(bits, axis=1).view(">i8").ravel().astype(np.int64)


def index_one(kind: str, method: str, count: int) -> dict:
    """One index measurement, in this process: build and query seconds (queries scaled from a sample), recall, peak MiB."""
    from sam3_engine.metrics import near_duplicates as nd

    rng = np.random.default_rng(0)
    planted = min(count // 2, 5_000)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "phash":
        codes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (count, 6), dtype=np.int64)
        codes[:planted, 0] = _planted_codes(rng, codes[count - planted :, 0], 4)  # 4 bits from another image
        codes[planted : 2 * planted, 0] = _planted_codes(rng, codes[count - 2 * planted : count - planted, 0], 10)
        entries = nd._codes(np.concatenate([codes[:, 0], codes[:, 1]]))
        queries = nd._codes(np.concatenate([codes[:, 0], codes[:, 2:].T.ravel()]))
        started = time.monotonic()
        index = nd.phash_index(entries, exact=method == "flat")
        build = time.monotonic() - started
        sample = np.concatenate([np.arange(2 * planted), rng.choice(len(queries), min(len(queries), SAMPLE_QUERIES), replace=False)])
        started = time.monotonic()
        rows, labels, _ = nd.phash_search(index, queries[sample], method == "flat", 10, 20)  # the stage's defaults
        query = (time.monotonic() - started) / len(sample) * len(queries)
        hits = [set() for _ in range(2 * planted)]
        for row, label in zip(rows, labels, strict=True):
            if row < 2 * planted:
                hits[row].add(label)
        target = [count - planted + i for i in range(planted)] + [count - 2 * planted + i for i in range(planted)]
        recall = [
            np.mean([target[i] in hits[i] for i in range(planted)]),
            np.mean([target[i] in hits[i] for i in range(planted, 2 * planted)]),
        ]
        size = (len(entries), len(queries))
    else:
        vectors = rng.standard_normal((count, 512), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        noise = rng.standard_normal((planted, 512), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        vectors[:planted] = 0.95 * vectors[count - planted :] + np.sqrt(1 - 0.95**2) * noise  # cosine 0.95 to another image
        started = time.monotonic()
        index = nd.clip_index(vectors, exact=method == "flat")
        build = time.monotonic() - started
        sample = np.concatenate([np.arange(planted), rng.choice(count, min(count, SAMPLE_QUERIES // 10), replace=False)])
        started = time.monotonic()
        _, labels = index.search(vectors[sample], 11)
        query = (time.monotonic() - started) / len(sample) * count
        recall = [np.mean([count - planted + i in set(labels[i]) for i in range(planted)])]
        size = (count, count)
    return {
        "kind": kind,
        "method": method,
        "images": count,
        "entries": size[0],
        "queries": size[1],
        "build_s": round(build, 2),
        "query_s": round(query, 1),
        "recall": [round(float(r), 4) for r in recall],
        "peak_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024),
    }


def index_cost(counts: list[int]) -> None:
    print("| index | images | entries | queries | build s | queries s | recall of planted neighbours | memory MiB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for kind, methods in (("phash", ("flat", "hnsw")), ("clip", ("flat", "ivf"))):
        for count in counts:
            for method in methods:
                done = subprocess.run(
                    [sys.executable, __file__, "--index-one", kind, method, str(count)], capture_output=True, text=True, check=True
                )
                r = json.loads(done.stdout.strip().splitlines()[-1])
                recall = (
                    f"4 bits {r['recall'][0]:.1%}, 10 bits {r['recall'][1]:.1%}" if kind == "phash" else f"cosine 0.95 {r['recall'][0]:.1%}"
                )
                print(
                    f"| {kind} {method} | {count:,} | {r['entries']:,} | {r['queries']:,} | {r['build_s']} | {r['query_s']} | {recall} | "
                    f"{r['peak_mib']} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=0, help="Planted corpus: tiles per side of each example photo.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--index", type=int, nargs="*", default=[], help="Index cost at these numbers of images.")
    parser.add_argument("--index-one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index_one:
        kind, method, count = args.index_one
        print(json.dumps(index_one(kind, method, int(count))))
        return
    if args.grid:
        planted(args.grid, args.workers)
    if args.index:
        index_cost(args.index)


if __name__ == "__main__":
    main()
