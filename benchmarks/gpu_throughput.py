"""SAM 3 proposal throughput on one GPU against its dense bf16 peak (issue 17), in one call that writes JSON and a table.

    python benchmarks/gpu_throughput.py --out $OUT                          # the GPU run: 1008 px, full architecture
    python benchmarks/gpu_throughput.py --out /tmp/gpu --quick --device cpu # the same parts at tiny sizes (tiny-random)

Parts, each guarded (a failure is recorded and the next part runs), each skipped when the time
budget (--budget-s) is nearly spent, in this order:
  sdpa       which attention kernel each block gets (ViT windowed and global, the head's blocks);
  vision     the vision pass alone, eager, at image batches 1..32 (stops at out-of-memory);
  head       the text-conditioned head alone (masks decoded for every phrase), eager, phrase batches 8..64;
  engine     end to end through the Ray executor (CPU prepare tasks, one model actor, results to the
             driver, Delta commits), K = 1, 8, 16, 35 phrases per image with 5 keeping 8 instances each
             (K = 1: 1), re-prompting off and on; steady state from the first unit's commit to the last;
  compiled   vision and head again with torch.compile, at the best eager sizes;
  engine_compiled  K = 35 end to end with model.compile, when compiling paid in the parts above.
FLOP model (1008 px): vision 5.61 TFLOP per image; head 0.44 per phrase, minus 0.143 per phrase
whose masks are skipped; plus a head (0.44) per re-prompted instance. The model is the full-size
SAM 3 architecture with seeded random weights (``propose_speed.full_size_checkpoint``); instances
come from ``SAM3_ENGINE_BENCH_KEEP_TOP`` (the best queries of the first phrases, threshold 1.0).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# This checkout's package, here and in Ray's workers (which inherit PYTHONPATH), even where another copy is installed.
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
from propose_speed import PHRASES, full_size_checkpoint, photos  # noqa: E402

VISION_TFLOP = 5.61
HEAD_TFLOP = 0.44
MASKS_TFLOP = 0.143
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peak by device name (SXM parts; an H100 PCIe is 756)."""
KEEP_PHRASES, KEEP_QUERIES = 5, 8


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def peak_tflops(device: str) -> tuple[str, float | None]:
    if not device.startswith("cuda"):
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name()
    peak = 756.0 if "H100" in name and "PCIe" in name else next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, peak


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``repeats`` more)."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return first, sorted(times)[len(times) // 2]


def pct(tflop: float, seconds: float, peak: float | None, valid: bool) -> float | None:
    return round(100 * tflop / seconds / peak, 1) if peak and valid and seconds > 0 else None


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def load(args, compiled: bool = False):
    from sam3_engine.models.sam3 import Sam3Segmenter

    segmenter = Sam3Segmenter.load(args.model, device=args.device, dtype=args.dtype)
    if compiled:
        segmenter.compile()
    return segmenter


def part_sdpa(args, ctx) -> dict:
    from sam3_engine.models.sam3_attention import attention_report

    segmenter = load(args)
    image = photos(1)[0]
    report = attention_report(segmenter, segmenter.preprocess([image]), (image.height, image.width), PHRASES[:4])
    del segmenter
    free(args.device)
    return report


def vision_sweep(args, ctx, segmenter, batches: list[int], repeats: int) -> dict:
    side = ctx["image_size"]
    rows = {}
    for batch in batches:
        if ctx["budget"].left() < 30:
            rows[batch] = {"skipped": "time budget"}
            break
        try:
            pixels = torch.randn(batch, 3, side, side, device=args.device, dtype=segmenter.dtype)
            first, seconds = timed(lambda pixels=pixels: segmenter.encode_images(pixels), args.device, repeats)
        except torch.cuda.OutOfMemoryError as exc:
            rows[batch] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            free(args.device)
            break
        rows[batch] = {
            "first_call_s": round(first, 3),
            "ms_per_image": round(1000 * seconds / batch, 2),
            "pct_of_peak": pct(VISION_TFLOP * batch, seconds, ctx["peak"], ctx["flops_valid"]),
        }
        del pixels
    free(args.device)
    return rows


def head_sweep(args, ctx, segmenter, batches: list[int], repeats: int) -> dict:
    image = photos(1)[0]
    size = (image.height, image.width)
    vision = segmenter.encode_images(segmenter.preprocess([image]))
    phrases = [f"{p} {i}" if i else p for i in range(4) for p in PHRASES]
    segmenter.decode_all_masks = True  # the full head: 0.44 TFLOP per phrase at 1008 px
    rows = {}
    try:
        for batch in batches:
            if ctx["budget"].left() < 30:
                rows[batch] = {"skipped": "time budget"}
                break
            chunk = phrases[:batch]
            try:
                with torch.inference_mode():
                    first, seconds = timed(
                        lambda chunk=chunk: segmenter._head(vision, 0, chunk, size, 1.0, 0, len(chunk)), args.device, repeats
                    )
            except torch.cuda.OutOfMemoryError as exc:
                rows[batch] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
                break
            rows[batch] = {
                "first_call_s": round(first, 3),
                "ms_per_phrase": round(1000 * seconds / batch, 2),
                "pct_of_peak": pct(HEAD_TFLOP * batch, seconds, ctx["peak"], ctx["flops_valid"]),
            }
    finally:
        segmenter.decode_all_masks = False
    return rows


def best(rows: dict, key: str) -> int | None:
    measured = {size: row[key] for size, row in rows.items() if key in row}
    return min(measured, key=measured.get) if measured else None


def part_vision(args, ctx) -> dict:
    segmenter = load(args)
    rows = vision_sweep(args, ctx, segmenter, args.image_batches, args.repeats)
    del segmenter
    free(args.device)
    ctx["best_image_batch"] = best(rows, "ms_per_image")
    return {"eager": rows, "best_batch": ctx["best_image_batch"]}


def part_head(args, ctx) -> dict:
    segmenter = load(args)
    rows = head_sweep(args, ctx, segmenter, args.phrase_batches, args.repeats)
    del segmenter
    free(args.device)
    ctx["best_phrase_batch"] = best(rows, "ms_per_phrase")
    return {"eager": rows, "best_batch": ctx["best_phrase_batch"]}


def part_compiled(args, ctx) -> dict:
    """Vision and head compiled (inductor), at the best eager batch and half of it: compile time is per shape."""
    segmenter = load(args, compiled=True)
    image_batch = ctx.get("best_image_batch") or args.image_batches[0]
    phrase_batch = ctx.get("best_phrase_batch") or args.phrase_batches[0]
    vision = vision_sweep(args, ctx, segmenter, sorted({max(1, image_batch // 2), image_batch}), args.repeats)
    head = head_sweep(args, ctx, segmenter, sorted({max(1, phrase_batch // 2), phrase_batch}), args.repeats)
    eager_vision, eager_head = ctx["results"]["vision"].get("eager", {}), ctx["results"]["head"].get("eager", {})
    faster = lambda rows, eager, key: any(  # noqa: E731
        key in row and key in eager.get(size, {}) and row[key] < 0.95 * eager[size][key] for size, row in rows.items()
    )
    ctx["compile_pays"] = faster(vision, eager_vision, "ms_per_image") or faster(head, eager_head, "ms_per_phrase")
    del segmenter
    free(args.device)
    return {"vision": vision, "head": head, "pays": ctx["compile_pays"]}


def image_folder(count: int, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(photos(count)):
        image.crop((i % 7, 0, image.width, image.height)).save(folder / f"img{i:04d}.jpg", quality=92)
    return folder


class TimedExecutor:
    """The Ray executor, with the time at which each group of units finished committing."""

    def __init__(self, inner):
        self.inner = inner
        self.commits: list[tuple[float, int, int]] = []

    def describe(self) -> dict:
        return self.inner.describe()

    def execute(self, stage, units, committed, context) -> int:
        def timed_commit(finished):
            committed(finished)
            masks = sum(tables["masks"].num_rows for _, tables in finished)
            self.commits.append((time.perf_counter(), sum(unit.size for unit, _ in finished), masks))

        return self.inner.execute(stage, units, timed_commit, context)


def engine_run(args, ctx, phrases: int, reprompt: bool, compiled: bool) -> dict:
    from sam3_engine.engine.config import ModelConfig, StorageConfig
    from sam3_engine.engine.ray_executor import RayExecutor
    from sam3_engine.engine.runner import UnitRunner
    from sam3_engine.engine.store import TableStore
    from sam3_engine.models.sam3 import ModelChoice
    from sam3_engine.stages.propose import ProposeConfig, ProposeStage

    run_dir = Path(ctx["tmp"], f"run-k{phrases}-r{int(reprompt)}-c{int(compiled)}")
    shutil.copytree(ctx["ingested"], run_dir)
    words = [f"{p} {i}" if i else p for i in range(4) for p in PHRASES][:phrases]
    image_batch = args.engine_image_batch or min(ctx.get("best_image_batch") or 8, 16)
    phrase_batch = args.engine_phrase_batch or ctx.get("best_phrase_batch") or 16
    config = ProposeConfig(
        phrases=tuple(words),
        threshold=1.0,  # nothing passes on its own: the kept instances are SAM3_ENGINE_BENCH_KEEP_TOP's
        reprompt_boxes=reprompt,
        unit_size=args.unit_size,
        image_batch=image_batch,
        phrase_batch=phrase_batch,
        workers=1,
    )
    model = ModelConfig(name=args.model, device=args.device, dtype=args.dtype, compile=compiled)
    stage = ProposeStage(config, model, ModelChoice(args.model, None), StorageConfig(), "bench")
    executor = TimedExecutor(RayExecutor(actors=1))
    started = time.perf_counter()
    report = UnitRunner(TableStore(str(run_dir)), "bench").run(stage, executor)
    total = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    commits = executor.commits
    steady_images = sum(images for _, images, _ in commits[1:])
    steady_s = commits[-1][0] - commits[0][0] if len(commits) > 1 else 0.0
    images_per_s = steady_images / steady_s if steady_s else None
    keeping = min(KEEP_PHRASES, phrases)
    instances = sum(masks for _, _, masks in commits) / max(1, sum(images for _, images, _ in commits))
    tflop = VISION_TFLOP + phrases * HEAD_TFLOP - (phrases - keeping) * MASKS_TFLOP + (instances * HEAD_TFLOP if reprompt else 0.0)
    return {
        "phrases": phrases,
        "phrases_keeping": keeping,
        "reprompt": reprompt,
        "compiled": compiled,
        "image_batch": image_batch,
        "phrase_batch": phrase_batch,
        "images": report.items_total,
        "instances_per_image": round(instances, 1),
        "tflop_per_image": round(tflop, 2),
        "images_per_s": round(images_per_s, 3) if images_per_s else None,
        "pct_of_peak": pct(tflop * images_per_s, 1.0, ctx["peak"], ctx["flops_valid"]) if images_per_s else None,
        "steady_images": steady_images,
        "total_s_with_actor_start_and_model_load": round(total, 1),
        "worker_crashes": report.worker_crashes,
    }


def part_engine(args, ctx, compiled: bool = False) -> dict:
    from sam3_engine.app.pipeline import run_pipeline
    from sam3_engine.engine.config import load_config
    from sam3_engine.engine.ray_executor import ensure_ray

    if "ingested" not in ctx:
        folder = image_folder(args.images, Path(ctx["tmp"], "images"))
        ctx["ingested"] = Path(ctx["tmp"], "ingested")
        run_pipeline(load_config(None, {"input": str(folder), "output": str(ctx["ingested"]), "stages": "ingest"}))
        ensure_ray()
    runs = [(35, False)] if compiled else [(k, r) for r in (False, True) for k in args.engine_phrases]
    rows = []
    for phrases, reprompt in runs:
        if ctx["budget"].left() < args.engine_min_s:
            rows.append({"phrases": phrases, "reprompt": reprompt, "skipped": "time budget"})
            continue
        try:
            rows.append(engine_run(args, ctx, phrases, reprompt, compiled))
        except Exception as exc:  # noqa: BLE001 - record, then the next configuration
            rows.append({"phrases": phrases, "reprompt": reprompt, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        write(args.out, ctx["results"])
    return {"runs": rows}


def metadata(args, ctx) -> dict:
    def command(*argv: str) -> str | None:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": ctx["device_name"],
        "peak_bf16_tflops": ctx["peak"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "driver": command("nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"),
        "cpus": os.cpu_count(),
        "git_commit": command("git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "image_size": ctx["image_size"],
        "flop_model_valid": ctx["flops_valid"],
    }


def write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def summary(results: dict) -> str:
    lines = [f"# SAM 3 GPU throughput ({results['meta'].get('device')}, {results['meta'].get('date_utc')})", ""]
    for name in ("vision", "head"):
        eager = results.get(name, {}).get("eager", {})
        compiled = results.get("compiled", {}).get(name, {}) if isinstance(results.get("compiled"), dict) else {}
        unit = "ms_per_image" if name == "vision" else "ms_per_phrase"
        lines += [
            f"## {name}",
            "",
            f"| batch | eager {unit} | eager % peak | compiled {unit} | compiled % peak |",
            "|---:|---:|---:|---:|---:|",
        ]
        for size in sorted({*eager, *compiled}, key=int):
            e, c = eager.get(size, {}), compiled.get(size, {})
            lines.append(f"| {size} | {e.get(unit, '')} | {e.get('pct_of_peak', '')} | {c.get(unit, '')} | {c.get('pct_of_peak', '')} |")
        lines.append("")
    lines += [
        "## engine (Ray, commits included)",
        "",
        "| K | keep | reprompt | compiled | instances/img | TFLOP/img | images/s | % peak |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for part in ("engine", "engine_compiled"):
        for run in results.get(part, {}).get("runs", []) if isinstance(results.get(part), dict) else []:
            speed = run.get("images_per_s") or str(run.get("skipped") or run.get("error") or "")[:60]
            lines.append(
                f"| {run.get('phrases')} | {run.get('phrases_keeping', '')} | {run.get('reprompt')} | {run.get('compiled', '')} | "
                f"{run.get('instances_per_image', '')} | {run.get('tflop_per_image', '')} | {speed} | {run.get('pct_of_peak', '')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for results.json and summary.md.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and tiny-random: proves the script on a CPU.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="Default: bfloat16 on CUDA, float32 on CPU.")
    parser.add_argument("--image-size", type=int, default=1008)
    parser.add_argument("--model", default=None, help="A save_pretrained folder; default: the full-size random checkpoint.")
    parser.add_argument("--budget-s", type=float, default=540.0, help="Parts are skipped once this much wall time is spent.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--phrase-batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--engine-phrases", type=int, nargs="+", default=[1, 8, 16, 35])
    parser.add_argument("--images", type=int, default=96, help="Images per engine run.")
    parser.add_argument("--unit-size", type=int, default=16)
    parser.add_argument("--engine-image-batch", type=int, default=None, help="Default: the best vision batch, at most 16.")
    parser.add_argument("--engine-phrase-batch", type=int, default=None, help="Default: the best head batch.")
    parser.add_argument("--engine-min-s", type=float, default=45.0, help="Skip an engine run with less budget left than this.")
    parser.add_argument("--parts", nargs="+", default=["sdpa", "vision", "head", "engine", "compiled", "engine_compiled"])
    args = parser.parse_args()
    if args.quick:
        args.model = args.model or "tiny-random"
        args.image_batches, args.phrase_batches, args.engine_phrases = [1, 2], [2, 4], [1, 8]
        args.images, args.unit_size, args.repeats, args.engine_min_s = 8, 2, 1, 5.0
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    # Engine runs keep the best queries of each image's first phrases (model actors inherit this at Ray's start).
    os.environ["SAM3_ENGINE_BENCH_KEEP_TOP"] = f"{KEEP_PHRASES},{KEEP_QUERIES}"
    device_name, peak = peak_tflops(args.device)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sam3-gpu-") as tmp:
        if args.model is None:
            args.model = str(full_size_checkpoint(args.image_size, Path(tmp, "checkpoint")))
        if args.model == "tiny-random":
            from sam3_engine.models.sam3 import tiny_random_config

            image_size = tiny_random_config().vision_config.backbone_config.image_size
        else:
            image_size = args.image_size
        ctx = {
            "budget": budget,
            "tmp": tmp,
            "peak": peak,
            "device_name": device_name,
            "image_size": image_size,
            "flops_valid": image_size == 1008 and args.model != "tiny-random",
            "results": results,
        }
        results["meta"] = metadata(args, ctx)
        parts = {
            "sdpa": part_sdpa,
            "vision": part_vision,
            "head": part_head,
            "engine": part_engine,
            "compiled": part_compiled,
            "engine_compiled": lambda a, c: part_engine(a, c, compiled=True),
        }
        for name in args.parts:
            started = time.monotonic()
            if name == "engine_compiled" and not ctx.get("compile_pays"):
                results[name] = {"skipped": "torch.compile did not pay in the vision or head parts (or was not measured)"}
            elif budget.left() < 20:
                results[name] = {"skipped": "time budget"}
            else:
                try:
                    results[name] = parts[name](args, ctx)
                except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
                    free(args.device)
            if isinstance(results[name], dict):
                results[name]["part_s"] = round(time.monotonic() - started, 1)
            write(args.out, results)
    (args.out / "summary.md").write_text(summary(results))
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
