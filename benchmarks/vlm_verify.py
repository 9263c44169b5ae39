"""The VLM verifier's cost: per pair and per mask, in FLOPs and in seconds, next to SAM 3's per image.

    python benchmarks/vlm_verify.py --size tiny                      # the tests' tiny random Idefics3, CPU
    python benchmarks/vlm_verify.py --size smolvlm-256m --repeat 1   # SmolVLM-256M's architecture, random weights
    python benchmarks/vlm_verify.py --size smolvlm-256m --device cuda --dtype bfloat16 --out vlm.json   # on a GPU

One real photo (truck.jpg, 1800x1200) with K phrases and M masks (rectangles spread over the photo),
P of the pairs with masks: the work of one image in the verify_vlm stage. Measured separately:
the CPU side (drawing the pictures and running the processor: what a prepare task does) and the
model side (``VlmJudge.yes_probabilities``), and FLOPs of each kind of question with torch's counter.
``smolvlm-256m`` is built from SmolVLM-256M-Instruct's published hyperparameters (SigLIP-B/16 at
512 px tiles, 64 tokens per tile after a 4x pixel shuffle; SmolLM2-135M), with random weights:
they cost what the real ones cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam3_engine.models import vlm

PHOTO = Path(__file__).resolve().parent.parent / "examples" / "images" / "truck.jpg"
SAM3_VISION_TFLOP, SAM3_HEAD_TFLOP = 5.614, 0.44
"""SAM 3 at 1008 px (BENCHMARKS.md, proposal): one vision pass per image, one head per phrase."""


def smolvlm_256m(device: str, dtype: torch.dtype):
    """SmolVLM-256M-Instruct's architecture with seeded random weights, and a processor of its image settings."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokenizer = vlm._tiny_tokenizer()
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64, chat_template=vlm.SMOLVLM_CHAT_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=len(tokenizer),
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
        scale_factor=4,
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).to(device=device, dtype=dtype)
    return vlm.VlmJudge(model, processor, vlm.VlmChoice("smolvlm-256m-architecture", None))


def one_image(prompts: vlm.Prompts, photo: Image.Image, phrases: int, masks: int, pairs_with_masks: int):
    """The picture sets of one image: its presence set, one set per mask, one exhaustivity set per pair with masks."""
    scale = min(1.0, 1024 / max(photo.size))
    working = photo.resize((round(photo.width * scale), round(photo.height * scale)))
    names = [f"thing {i}" for i in range(phrases)]
    sets = {"presence": [prompts.picture_set("presence", [working], names)], "mask": [], "exhaustivity": []}
    drawn: dict[int, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for index in range(masks):
        mask = np.zeros((working.height, working.width), bool)
        h, w = rng.integers(40, working.height // 2), rng.integers(40, working.width // 2)
        top, left = rng.integers(0, working.height - h), rng.integers(0, working.width - w)
        mask[top : top + h, left : left + w] = True
        pictures = vlm.mask_pictures(working, mask, (left, top, w, h), prompts.tile)
        sets["mask"].append(prompts.picture_set("mask", pictures, ["thing"], False))
        drawn.setdefault(index % pairs_with_masks, []).append(mask)
    for pair, pair_masks in drawn.items():
        sets["exhaustivity"].append(prompts.picture_set("exhaustivity", [vlm.highlight(working, pair_masks)], [f"thing {pair}"]))
    return sets


def flops(judge: vlm.VlmJudge, picture_set: vlm.PictureSet) -> tuple[float, float]:
    """(prefix, one question) TFLOP of a picture set, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        judge.yes_probabilities([vlm.PictureSet(picture_set.input_ids, picture_set.pixels, picture_set.pixel_mask, ())])
    prefix = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        judge.yes_probabilities(
            [vlm.PictureSet(picture_set.input_ids, picture_set.pixels, picture_set.pixel_mask, picture_set.questions[:1])]
        )
    return prefix / 1e12, (counter.get_total_flops() - prefix) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "smolvlm-256m"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--phrases", type=int, default=16)
    parser.add_argument("--masks", type=int, default=40)
    parser.add_argument("--pairs-with-masks", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--prepare-only", action="store_true", help="Time the CPU side only (drawing and processor).")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.size == "tiny":
        judge = vlm.VlmJudge.load(vlm.choose_vlm("tiny-random", None, False), args.device, args.dtype)
    else:
        judge = smolvlm_256m(args.device, dtype)
    prompts = vlm.Prompts(judge.processor)
    photo = Image.open(PHOTO).convert("RGB")
    started = time.perf_counter()
    sets = one_image(prompts, photo, args.phrases, args.masks, args.pairs_with_masks)
    prepare_s = time.perf_counter() - started
    if args.prepare_only:
        print(json.dumps({"size": args.size, "prepare_s_per_image": prepare_s, "prepare_s_per_mask": prepare_s / args.masks}))
        return
    every = [s for kind in ("presence", "mask", "exhaustivity") for s in sets[kind]]
    judge.yes_probabilities(every[:2], args.batch_size)  # warm-up
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    timings = {}
    for kind, kind_sets in sets.items():
        runs = []
        for _ in range(args.repeat):
            sync()
            started = time.perf_counter()
            judge.yes_probabilities(kind_sets, args.batch_size)
            sync()
            runs.append(time.perf_counter() - started)
        timings[kind] = float(np.median(runs))
    counted = {kind: flops(judge, kind_sets[0]) for kind, kind_sets in sets.items()}
    tokens = {kind: int(kind_sets[0].input_ids.shape[0]) for kind, kind_sets in sets.items()}
    per_image_tflop = (
        counted["presence"][0]
        + args.phrases * counted["presence"][1]
        + args.masks * sum(counted["mask"])
        + len(sets["exhaustivity"]) * sum(counted["exhaustivity"])
    )
    sam3 = SAM3_VISION_TFLOP + SAM3_HEAD_TFLOP * args.phrases
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "phrases": args.phrases,
        "masks": args.masks,
        "exhaustivity_questions": len(sets["exhaustivity"]),
        "prepare_s_per_image": prepare_s,
        "prepare_s_per_mask": prepare_s / args.masks,
        "model_s": timings,
        "model_s_per_pair": (timings["presence"] + timings["exhaustivity"]) / args.phrases,
        "model_s_per_mask": timings["mask"] / args.masks,
        "model_s_per_image": sum(timings.values()),
        "prefix_tokens": tokens,
        "tflop_prefix_and_question": counted,
        "tflop_per_image": per_image_tflop,
        "sam3_tflop_per_image": sam3,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
