"""Proposal speed: encode-once phrase batching against the naive per-pair forward, and Ray pipeline efficiency.

    python benchmarks/propose_speed.py encode-once --image-size 336            # CPU: reduced input size
    python benchmarks/propose_speed.py encode-once --image-size 1008 --device cuda
    python benchmarks/propose_speed.py negatives --image-size 112 --positives 5 --negatives 30
    python benchmarks/propose_speed.py pipeline --image-size 1008 --images 64 --phrases 16
    python benchmarks/propose_speed.py reprompt --image-size 112 --positives 5 --negatives 30

The model is the full-size SAM 3 architecture (default ``Sam3Config``) with random weights, saved
once in ``save_pretrained`` layout and loaded through the engine's normal path (``--model DIR``).
Random weights cost exactly what real ones cost.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
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
    "door",
    "person",
    "wheel",
    "bag",
    "box",
    "road",
    "sky",
    "shoe",
]


def full_size_checkpoint(image_size: int, folder: Path) -> Path:
    """The default Sam3Config at ``image_size`` with seeded random weights, saved with its processor."""
    from transformers.models.sam3 import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from sam3_engine.text.clip_tokenizer import offline_clip_tokenizer
    from sam3_engine.text.concepts import TEXT_CONTEXT

    config = Sam3Config()
    backbone = config.vision_config.backbone_config
    backbone.image_size = image_size
    side = image_size // backbone.patch_size
    config.vision_config.backbone_feature_sizes = [[side * 4, side * 4], [side * 2, side * 2], [side, side]]
    torch.manual_seed(0)
    model = Sam3Model(config)
    model.save_pretrained(folder)
    Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=offline_clip_tokenizer(TEXT_CONTEXT)
    ).save_pretrained(folder)
    return folder


def photos(count: int) -> list[Image.Image]:
    base = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted((EXAMPLES / "images").glob("*.jpg"))]
    return [(ImageOps.mirror(base[i % 3]) if (i // 3) % 2 else base[i % 3]) for i in range(count)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (kernels, allocator)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def encode_once(args, checkpoint: Path) -> dict:
    from sam3_engine.models.sam3 import Sam3Segmenter

    segmenter = Sam3Segmenter.load(str(checkpoint), device=args.device)
    image = photos(1)
    pixels = segmenter.preprocess(image)
    size = [(image[0].height, image[0].width)]
    results = {}

    timed = lambda fn: _timed(fn, args.device)  # noqa: E731

    with torch.inference_mode():
        vision_s = timed(lambda: segmenter.encode_images(pixels))
        vision = segmenter.encode_images(pixels)
        head_s = timed(lambda: segmenter._head(vision, 0, PHRASES[:1], size[0], args.threshold)())

        def naive(phrases):
            for phrase in phrases:  # the vision pass is recomputed for every phrase
                segmenter.predict_pixels(pixels, size, [[phrase]], args.threshold, phrase_batch=1)

        for k in args.k:
            phrases = (PHRASES * 4)[:k]
            batched = timed(lambda phrases=phrases, k=k: segmenter.predict_pixels(pixels, size, [phrases], args.threshold, phrase_batch=k))
            looped = timed(lambda phrases=phrases: naive(phrases))
            ideal = k * (vision_s + head_s) / (vision_s + k * head_s)
            results[k] = {
                "encode_once_s": round(batched, 4),
                "naive_s": round(looped, 4),
                "speedup": round(looped / batched, 2),
                "ideal_from_measured_parts": round(ideal, 2),
            }
    return {"vision_pass_s": round(vision_s, 4), "head_per_phrase_s": round(head_s, 4), "by_k": results}


def _mixed_phrases(args, checkpoint: Path):
    """The model, one photo's pixels, P + N phrases, and a call predicting them at a threshold that keeps exactly P.

    The threshold is set between the P-th and (P+1)-th phrase's best instance score on this image,
    so the split is the model's own, not made up.
    """
    from sam3_engine.models.sam3 import Sam3Segmenter

    segmenter = Sam3Segmenter.load(str(checkpoint), device=args.device)
    image = photos(1)
    pixels = segmenter.preprocess(image)
    size = [(image[0].height, image[0].width)]
    phrases = [f"{p} {i}" if i else p for i in range(4) for p in PHRASES][: args.positives + args.negatives]
    (pairs,) = segmenter.predict_pixels(pixels, size, [phrases], threshold=2.0, phrase_batch=args.phrase_batch)
    best = sorted((pair.max_score for pair in pairs), reverse=True)
    threshold = (best[args.positives - 1] + best[args.positives]) / 2
    return segmenter, pixels, phrases, lambda: segmenter.predict_pixels(pixels, size, [phrases], threshold, args.phrase_batch)


def negatives(args, checkpoint: Path) -> dict:
    """A SA-Co-like mix: P phrases with instances and N without, with and without skipping the negatives' mask decoding."""
    segmenter, pixels, phrases, run = _mixed_phrases(args, checkpoint)
    (kept,) = run()
    segmenter.decode_all_masks = True
    every_s = _timed(run, args.device)
    segmenter.decode_all_masks = False
    gated_s = _timed(run, args.device)
    vision_s = _timed(lambda: segmenter.encode_images(pixels), args.device)
    return {
        "phrases": len(phrases),
        "phrases_with_instances": sum(bool(p.instances) for p in kept),
        "instances": sum(len(p.instances) for p in kept),
        "decode_every_mask_s": round(every_s, 3),
        "skip_negatives_s": round(gated_s, 3),
        "speedup": round(every_s / gated_s, 3),
        "vision_pass_s": round(vision_s, 3),
        "heads_speedup": round((every_s - vision_s) / (gated_s - vision_s), 3),
    }


def reprompt(args, checkpoint: Path) -> dict:
    """The cost of ``propose.reprompt_boxes`` on the SA-Co-like mix of ``negatives``: one more head per kept instance."""
    segmenter, pixels, phrases, run = _mixed_phrases(args, checkpoint)
    (kept,) = run()
    off_s = _timed(run, args.device)
    segmenter.reprompt_boxes = True
    on_s = _timed(run, args.device)
    segmenter.reprompt_boxes = False
    instances = sum(len(p.instances) for p in kept)
    return {
        "phrases": len(phrases),
        "phrases_with_instances": sum(bool(p.instances) for p in kept),
        "instances": instances,
        "reprompt_off_s": round(off_s, 3),
        "reprompt_on_s": round(on_s, 3),
        "overhead": round(on_s / off_s - 1, 3),
        "seconds_per_instance": round((on_s - off_s) / instances, 4) if instances else None,
    }


def pipeline(args, checkpoint: Path) -> dict:
    """Images/s through the Ray executor (CPU prepare tasks + model actors), against a bare loop over the same model and images.

    The executor's results are collected rather than committed, so that this measures scheduling and
    data movement; a Delta commit costs the driver a few milliseconds per unit (see BENCHMARKS.md).
    """
    from sam3_engine.engine.config import ModelConfig, StorageConfig
    from sam3_engine.engine.ray_executor import RayExecutor, ensure_ray
    from sam3_engine.engine.stage import WorkerContext, WorkUnit
    from sam3_engine.models.sam3 import ModelChoice, Sam3Segmenter
    from sam3_engine.stages.propose import ImageRef, ProposeConfig, ProposeStage

    phrases = (PHRASES * 4)[: args.phrases]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        refs = []
        for i, image in enumerate(photos(args.images)):
            path = folder / f"img{i:04d}.jpg"
            image.crop((i % 7, 0, image.width, image.height)).save(path, quality=92)
            refs.append(ImageRef(image_id=f"{i:064d}", uri=str(path)))
        loaded = [ImageOps.exif_transpose(Image.open(r.uri)).convert("RGB") for r in refs]

        segmenter = Sam3Segmenter.load(str(checkpoint), device=args.device)
        segmenter.predict(loaded[:1], [phrases], args.threshold, args.phrases)  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        for i in range(0, len(loaded), args.image_batch):
            batch = loaded[i : i + args.image_batch]
            segmenter.predict(batch, [phrases] * len(batch), args.threshold, args.phrases)
        _sync(args.device)
        bare = time.perf_counter() - start
        peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        del segmenter
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

        ensure_ray()
        config = ProposeConfig(phrases=tuple(phrases), threshold=args.threshold, image_batch=args.image_batch, phrase_batch=args.phrases)
        stage = ProposeStage(
            config, ModelConfig(name=str(checkpoint), device=args.device), ModelChoice(str(checkpoint), None), StorageConfig(), "bench"
        )
        units = [WorkUnit(f"propose:{i:08d}", tuple(refs[i : i + args.unit_size])) for i in range(0, len(refs), args.unit_size)]
        collected = []
        start = time.perf_counter()
        RayExecutor(actors=args.actors).execute(
            stage,
            units,
            lambda unit, tables: collected.append((time.perf_counter(), unit.size, tables)),
            WorkerContext(tmp, StorageConfig()),
        )
        total = time.perf_counter() - start
        masks = sum(t["masks"].num_rows for _, _, t in collected)
        actor_peaks = [t["stats"] for _, _, t in collected]
    # Steady state: from the first unit's result (actors started, model loaded) to the last.
    steady_images = sum(size for _, size, _ in collected[1:])
    steady = collected[-1][0] - collected[0][0]
    n = len(loaded)
    return {
        "images": n,
        "phrases": len(phrases),
        "masks": masks,
        "bare_loop_images_per_s": round(n / bare, 3),
        "engine_images_per_s": round(steady_images / steady, 3),
        "engine_pairs_per_s": round(steady_images * len(phrases) / steady, 2),
        "efficiency": round((steady_images / steady) / (n / bare), 3),
        "engine_total_s_with_actor_start_and_model_load": round(total, 1),
        "peak_gpu_memory_gib_bare_loop": peak_gpu,
        "peak_rss_mib_model_actor": round(max(p["peak_rss_mib"] for p in actor_peaks)),
        "peak_gpu_mib_model_actor": round(max(p["peak_gpu_mib"] for p in actor_peaks)) if "peak_gpu_mib" in actor_peaks[0] else None,
        "peak_rss_driver_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["encode-once", "negatives", "reprompt", "pipeline"])
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--phrases", type=int, default=4)
    parser.add_argument("--image-batch", type=int, default=4)
    parser.add_argument("--unit-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--positives", type=int, default=5)
    parser.add_argument("--negatives", type=int, default=30)
    parser.add_argument("--phrase-batch", type=int, default=16)
    parser.add_argument("--checkpoint", type=Path, default=None, help="Reuse a saved random checkpoint folder.")
    args = parser.parse_args()
    folder = args.checkpoint or Path(tempfile.mkdtemp(prefix="sam3-full-random-"))
    if not (folder / "config.json").exists():
        full_size_checkpoint(args.image_size, folder)
    try:
        result = {"encode-once": encode_once, "negatives": negatives, "reprompt": reprompt, "pipeline": pipeline}[args.what](args, folder)
    finally:
        if args.checkpoint is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"what": args.what, "image_size": args.image_size, "device": args.device, **result}, indent=2))


if __name__ == "__main__":
    main()
