"""SAM 3 behind a narrow interface: images and phrases in; per pair a presence score, per instance a mask out.

``Sam3Segmenter.load`` takes a Hugging Face id (``facebook/sam3``, gated), a local directory in
``save_pretrained`` layout, or ``tiny-random``: a small ``Sam3Config`` with seeded random weights
and an offline CLIP tokenizer, which runs exactly the code path of the real model.

One vision pass per image: its cached features are expanded (a view, no copy) to a batch of
phrases, so K phrases cost one encoder pass plus K text-conditioned heads. The mask decoder (a
third of a head) runs only for phrases with an instance above the threshold: most mined phrases
are absent. Kept instances are upsampled to full resolution and run-length encoded on the model's
device, so only run lengths, not full-resolution masks, cross to the host; on CUDA, that work and
pycocotools' part of it run on a host thread and a second stream while the next phrase batch runs.
Text features are cached per phrase (phrases repeat across images). ``compile`` wraps the vision
encoder and the head in ``torch.compile``, with phrase batches padded to powers of two so that a
compiled head sees a few shapes, not one per phrase count.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_engine.models.hub import TINY_RANDOM, HubChoice, ModelLoadError, cache_only, choose_checkpoint
from sam3_engine.text.clip_tokenizer import offline_clip_tokenizer
from sam3_engine.text.concepts import TEXT_CONTEXT

TINY_RANDOM_SEED = 0
TINY_RANDOM_INIT_RANGE = 0.1
STABILITY_OFFSET = 1.0
"""Logit offset for the stability score: IoU of the masks at logit > +offset and logit > -offset."""
TEXT_CACHE_SIZE = 4096
"""Phrases whose text features a segmenter keeps (32 x 256 values each: 16 KiB in bfloat16)."""
COMPILED_MODULES = ("vision_encoder", "detr_encoder", "detr_decoder", "mask_decoder")
"""What ``Sam3Segmenter.compile`` compiles: the vision pass and the head. The text encoder's output is cached."""


@dataclass(frozen=True)
class Instance:
    query: int
    """Index of the DETR query that produced the instance: stable for a given model and input."""
    rle: dict
    """The mask as COCO compressed RLE (``size`` [H, W], ``counts`` bytes) at the image's original
    (EXIF-oriented) resolution; ``pycocotools.mask`` reads it as is."""
    box_xyxy: tuple[float, float, float, float]
    """The model's box in pixels."""
    object_score: float
    score: float
    """object_score x presence score, as SAM 3 ranks instances."""
    stability: float
    reprompt_iou: float | None = None
    """IoU (at the model's mask resolution) between this mask and SAM 3's mask when prompted again with
    the phrase and this instance's box; None when re-prompting is off. Low means the model disagrees
    with itself about the instance's extent."""

    @cached_property
    def mask(self) -> np.ndarray:
        """The decoded boolean mask, H x W."""
        return mask_utils.decode(self.rle).astype(bool)


@dataclass(frozen=True)
class PairPrediction:
    presence_score: float
    max_score: float
    """The best combined score over all queries, kept or not."""
    instances: tuple[Instance, ...]
    foreground: dict | None = None
    """SAM 3's semantic segmentation of the phrase (sigmoid > 0.5) as COCO RLE at the image's resolution:
    where the concept is, instance or not. None where the mask decoder did not run (no kept instance)."""
    empty_masks: int = 0
    """Detections above the threshold whose mask covers no pixel at the image's size (a tiny image): not instances,
    counted so that the run summary can say how many were dropped."""


@dataclass(frozen=True)
class Tokens:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: tuple[bool, ...]


def rle_encode(masks: torch.Tensor) -> list[dict]:
    """COCO compressed RLE of boolean masks (N x H x W), run lengths found on the masks' device.

    COCO RLE runs down columns (Fortran order), starting with a run of zeros. Only the positions
    where a column-major scan changes value leave the device; pycocotools compresses the counts.
    """
    count, height, width = masks.shape
    if count == 0:
        return []
    flat = masks.transpose(1, 2).reshape(count, height * width)
    rows, cols = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    rows, cols, first = rows.cpu().numpy(), cols.cpu().numpy() + 1, flat[:, 0].cpu().numpy()
    splits = np.searchsorted(rows, np.arange(1, count))
    encoded = []
    for i, changes in enumerate(np.split(cols, splits)):
        edges = np.concatenate(([0], changes, [height * width]))
        counts = np.diff(edges)
        if first[i]:
            counts = np.concatenate(([0], counts))
        encoded.append(mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width))
    return encoded


def tiny_random_config():
    """A small SAM 3: ViT 32 wide and 2 deep at 224 px, 5 queries; every module of the real one."""
    from transformers.models.sam3 import (
        Sam3Config,
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    backbone = Sam3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=14,
        window_size=8,
        global_attn_indexes=[1],
        pretrain_image_size=224,
    )
    config = Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=32, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]]),
        text_config=dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2),
        geometry_encoder_config=Sam3GeometryEncoderConfig(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=Sam3DETREncoderConfig(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=Sam3DETRDecoderConfig(hidden_size=32, num_layers=1, num_queries=5, num_attention_heads=2, intermediate_size=64),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2, num_attention_heads=2),
    )
    # At the default init (0.02) a model this small outputs mask logits of ~1e-4, so float noise
    # flips mask pixels and every score sits at 0.25. At 0.1, logits are ~0.1 and combined scores
    # spread over ~0.2-0.35: the default keep-threshold of 0.3 keeps real, stable masks.
    for part in (
        config,
        config.vision_config,
        config.vision_config.backbone_config,
        config.text_config,
        config.geometry_encoder_config,
        config.detr_encoder_config,
        config.detr_decoder_config,
        config.mask_decoder_config,
    ):
        part.initializer_range = TINY_RANDOM_INIT_RANGE
    return config


def _load_error(name: str, revision: str | None, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load SAM 3 from {name!r}" + (f" at revision {revision!r}" if revision else "") + f": {type(exc).__name__}: {exc}\n"
        "  - facebook/sam3 is gated: request access on its Hugging Face page, accept the licence, then run "
        "`huggingface-cli login` (or set HF_TOKEN) on every machine that runs the model;\n"
        "  - without network access, copy a checkpoint saved with save_pretrained and pass its directory "
        "(--model /path/to/sam3), or pre-fill the Hugging Face cache on every machine (read without the hub when it is unreachable);\n"
        "  - for a smoke run with random weights, use --model tiny-random."
    )


class ModelChoice(HubChoice):
    """Which SAM 3 checkpoint a run uses."""


def choose_model(name: str, revision: str | None, fallback_to_tiny_random: bool) -> ModelChoice:
    """Check that the checkpoint is reachable (its config.json, not its weights); fall back only if asked."""
    return choose_checkpoint(ModelChoice, name, revision, fallback_to_tiny_random, _load_error)


def load_image_processor(choice: ModelChoice):
    """The checkpoint's image processor alone (a small JSON, no weights): for CPU preprocessing workers."""
    from transformers.models.sam3 import Sam3ImageProcessor

    if choice.random_weights:
        size = tiny_random_config().vision_config.backbone_config.image_size
        return Sam3ImageProcessor(size={"height": size, "width": size})
    try:
        return Sam3ImageProcessor.from_pretrained(choice.name, revision=choice.revision, local_files_only=cache_only(choice.name))
    except Exception as exc:  # noqa: BLE001
        raise _load_error(choice.name, choice.revision, exc) from exc


def preprocess(image_processor, images: list[Image.Image]) -> torch.Tensor:
    """Resized, normalised pixels on CPU: the model's input, made apart from the model."""
    return image_processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def resize(image_processor, images: list[Image.Image]) -> torch.Tensor:
    """Resized pixels on CPU, still uint8: a quarter of ``preprocess``'s float32 bytes through Ray's object store and the
    host-to-device copy. ``Sam3Segmenter.encode_images`` rescales and normalises them on the model's device."""
    return image_processor([image.convert("RGB") for image in images], return_tensors="pt", do_rescale=False, do_normalize=False)[
        "pixel_values"
    ]


class TextCache:
    """Projected text features by phrase, least recently used dropped first; capacity 0 caches nothing."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, phrase: str) -> torch.Tensor | None:
        found = self.entries.get(phrase)
        if found is not None:
            self.entries.move_to_end(phrase)
        return found

    def put(self, phrase: str, features: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.entries[phrase] = features
        self.entries.move_to_end(phrase)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def bucket(count: int, cap: int) -> int:
    """``count`` rounded up to a power of two, but not past ``cap`` (nor below ``count``)."""
    return max(count, min(1 << (count - 1).bit_length(), cap))


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def compile_or_eager(module: torch.nn.Module, name: str, **options) -> bool:
    """Replace ``module.forward`` with its ``torch.compile``d version; on a compile error, now or at a call, warn and stay eager.

    An error at a call is retried eagerly, and the module stays eager from then on; out-of-memory is
    not a compile error and propagates, so that callers can shrink the batch. Returns whether it compiled.
    """
    eager = module.forward

    def fall_back(exc: BaseException) -> None:
        module.forward = eager
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"torch.compile of SAM 3's {name} failed, running it eagerly: {type(exc).__name__}: {first_line}", stacklevel=3)

    try:
        compiled = torch.compile(eager, **options)
    except Exception as exc:  # noqa: BLE001 - an unknown backend, an unsupported platform: eager still works
        fall_back(exc)
        return False

    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            if is_out_of_memory(exc):
                raise
            fall_back(exc)
            return eager(*args, **kwargs)

    module.forward = forward
    return True


class Sam3Segmenter:
    """SAM 3 on one device. ``predict`` is the whole interface."""

    def __init__(self, model, processor, model_id: str, revision: str | None, random_weights: bool):
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        self.random_weights = random_weights
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.decode_all_masks = False
        """Decode masks for every phrase, as the plain forward does; for benchmarks and tests only."""
        self.reprompt_boxes = False
        """Prompt SAM 3 again with each kept instance's box (and its phrase) and record the masks' IoU."""
        self.text_cache = TextCache(TEXT_CACHE_SIZE)
        self.bucket_batches = False
        """Pad phrase batches and mask-decoder rows to powers of two (padded rows dropped): few shapes for a compiled head."""
        self.overlap_host = self.device.type == "cuda"
        """Upsample and encode kept masks on a host thread (and a second CUDA stream) while the next phrase batch runs."""
        self.keep_top: tuple[int, int] | None = None
        """Benchmarks only: (P, Q) keeps the Q best queries of each image's first P phrases whatever the threshold,
        so that random weights give a set number of instances (masks upsampled and encoded as real ones would be)."""
        self._host: ThreadPoolExecutor | None = None
        self._side_stream = None

    @classmethod
    def load(cls, name: str, revision: str | None = None, device: str | None = None, dtype: str | None = None) -> Sam3Segmenter:
        """Load weights and processor; bf16 on CUDA and fp32 on CPU unless ``dtype`` says otherwise."""
        from transformers.models.sam3 import Sam3Model, Sam3Processor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if name == TINY_RANDOM:
            config = tiny_random_config()
            torch.manual_seed(TINY_RANDOM_SEED)
            model = Sam3Model(config)
            processor = Sam3Processor(
                image_processor=load_image_processor(ModelChoice(TINY_RANDOM, None)), tokenizer=offline_clip_tokenizer(TEXT_CONTEXT)
            )
            return cls(model.to(device=device, dtype=torch_dtype), processor, TINY_RANDOM, None, random_weights=True)
        local = cache_only(name)
        try:
            model = Sam3Model.from_pretrained(
                name, revision=revision, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=local
            )
            processor = Sam3Processor.from_pretrained(name, revision=revision, local_files_only=local)
        except Exception as exc:  # noqa: BLE001 - gated, missing, offline: all become one actionable error
            raise _load_error(name, revision, exc) from exc
        return cls(model.to(device), processor, name, revision, random_weights=False)

    def tokenize(self, phrases: list[str]) -> Tokens:
        """Token ids padded to SAM 3's 32-token context; longer phrases are truncated and flagged."""
        tokenizer = self.processor.tokenizer
        lengths = [len(ids) for ids in tokenizer(phrases, truncation=False)["input_ids"]]
        truncated = tuple(n > TEXT_CONTEXT for n in lengths)
        if any(truncated):
            warnings.warn(f"{sum(truncated)} phrase(s) exceed SAM 3's {TEXT_CONTEXT}-token context and were truncated", stacklevel=2)
        encoded = tokenizer(phrases, padding="max_length", truncation=True, max_length=TEXT_CONTEXT, return_tensors="pt")
        return Tokens(encoded["input_ids"], encoded["attention_mask"], truncated)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess(self.processor.image_processor, images)

    def compile(self, **options) -> None:
        """``torch.compile`` the vision encoder and the head's modules (``COMPILED_MODULES``); batches are then bucketed.

        Options go to ``torch.compile`` (backend, mode); shapes are static, one graph per bucket.
        A module whose compilation fails warns once and runs eagerly.
        """
        self.bucket_batches = True
        # Buckets of phrase batches, mask-decoder rows and re-prompt chunks (1, 2, 4, ... each) exceed dynamo's default of 8 graphs.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for name in COMPILED_MODULES:
            compile_or_eager(getattr(self.model, name), name, dynamic=False, **options)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor):
        """Vision features of pixels from ``preprocess`` (float, normalised) or ``resize`` (uint8, normalised here)."""
        if self.device.type == "cuda":  # pinned memory: the upload is a DMA that overlaps the GPU's work
            pixel_values = pixel_values.pin_memory().to(self.device, non_blocking=True)
        if pixel_values.dtype == torch.uint8:
            pixel_values = self._normalize(pixel_values.to(self.device))
        return self.model.get_vision_features(pixel_values=pixel_values.to(self.device, self.dtype))

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image processor's rescale and normalisation, in float32 on the model's device."""
        processor = self.processor.image_processor
        pixels = pixels.float()
        if processor.do_rescale:
            pixels = pixels * processor.rescale_factor
        if processor.do_normalize:
            mean = torch.tensor(processor.image_mean, device=pixels.device).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, device=pixels.device).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def predict(
        self, images: list[Image.Image], phrases: list[list[str]], threshold: float = 0.3, phrase_batch: int = 16
    ) -> list[list[PairPrediction]]:
        """Per image, per phrase: the presence score and every instance whose score >= ``threshold``."""
        sizes = [(image.height, image.width) for image in images]
        return self.predict_pixels(self.preprocess(images), sizes, phrases, threshold, phrase_batch)

    @torch.inference_mode()
    def predict_pixels(
        self,
        pixel_values: torch.Tensor,
        sizes: list[tuple[int, int]],
        phrases: list[list[str]],
        threshold: float = 0.3,
        phrase_batch: int = 16,
    ) -> list[list[PairPrediction]]:
        """``predict`` on pixels from ``preprocess`` (made elsewhere, e.g. on a CPU worker); sizes are (H, W)."""
        vision = self.encode_images(pixel_values)
        pending: list[list[Future]] = []
        for index, (size, image_phrases) in enumerate(zip(sizes, phrases, strict=True)):
            pending.append([])
            for start in range(0, len(image_phrases), phrase_batch):
                finish = self._head(vision, index, image_phrases[start : start + phrase_batch], size, threshold, start, phrase_batch)
                pending[-1].append(self._finish(finish))
        return [[prediction for part in image for prediction in part.result()] for image in pending]

    def _finish(self, finish: Callable[[], list[PairPrediction]]) -> Future:
        """Run a head's host-side remainder now, or on the host thread (and side stream) when ``overlap_host``."""
        if not self.overlap_host:
            done: Future = Future()
            done.set_result(finish())
            return done
        if self._host is None:
            self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3-masks")
            self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        stream = self._side_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))

        def run() -> list[PairPrediction]:
            with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else nullcontext():
                return finish()

        return self._host.submit(run)

    def _expanded(self, vision, index: int, count: int):
        """Image ``index``'s vision features as a batch of ``count`` views: no copy, no recompute."""
        pick = lambda t: t[index : index + 1].expand(count, *t.shape[1:])  # noqa: E731
        return type(vision)(
            last_hidden_state=pick(vision.last_hidden_state),
            fpn_hidden_states=tuple(pick(t) for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(pick(t) for t in vision.fpn_position_encoding),
        )

    def _text_embeds(self, phrases: list[str], tokens: Tokens):
        """The text encoder's projected output for ``phrases``, encoding only those not in the cache."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        fresh: dict[str, torch.Tensor] = {}
        found = {phrase: self.text_cache.get(phrase) for phrase in dict.fromkeys(phrases)}
        missing = [phrase for phrase, features in found.items() if features is None]
        if missing:
            rows = [phrases.index(phrase) for phrase in missing]
            encoded = self.model.get_text_features(
                input_ids=tokens.input_ids[rows].to(self.device), attention_mask=tokens.attention_mask[rows].to(self.device)
            ).pooler_output
            fresh = dict(zip(missing, encoded, strict=True))
            for phrase, features in fresh.items():
                self.text_cache.put(phrase, features)
        return BaseModelOutputWithPooling(pooler_output=torch.stack([fresh.get(p, found[p]) for p in phrases]))

    def _head(
        self, vision, index: int, phrases: list[str], size: tuple[int, int], threshold: float, first: int = 0, phrase_batch: int = 0
    ) -> Callable[[], list[PairPrediction]]:
        """Scores, boxes and the masks of kept rows on the device; returns the host-side remainder (upsampling, RLE) to run.

        ``first`` is the index of ``phrases[0]`` among the image's phrases; ``phrase_batch`` caps the bucket.
        """
        count = len(phrases)
        tokens = self.tokenize(phrases)
        padded = bucket(count, max(count, phrase_batch)) if self.bucket_batches else count
        rows_in = torch.tensor(list(range(count)) + [count - 1] * (padded - count))
        batch_phrases = [phrases[i] for i in rows_in.tolist()]
        with self._deferred_mask_decoder() as mask_inputs:
            out = self.model(
                vision_embeds=self._expanded(vision, index, padded),
                text_embeds=self._text_embeds(batch_phrases, Tokens(tokens.input_ids[rows_in], tokens.attention_mask[rows_in], ())),
                attention_mask=tokens.attention_mask[rows_in].to(self.device),
            )
        presence = out.presence_logits[:count].float().sigmoid()[:, 0]
        object_scores = out.pred_logits[:count].float().sigmoid()
        scores = object_scores * presence[:, None]
        pred_boxes = out.pred_boxes[:count]
        # One small transfer of every score; masks are decoded only for rows with a kept instance.
        presence, object_scores, scores = presence.cpu(), object_scores.cpu(), scores.cpu()
        keeps = [torch.nonzero(scores[row] >= threshold).flatten() for row in range(count)]
        if self.keep_top is not None:
            top_phrases, top_queries = self.keep_top
            best = lambda row: scores[row].topk(min(top_queries, scores.shape[1])).indices.sort().values  # noqa: E731
            keeps = [best(row) if first + row < top_phrases else keep for row, keep in enumerate(keeps)]
        rows = [row for row, keep in enumerate(keeps) if self.decode_all_masks or len(keep)]
        pred_masks, semantic = self._decode_masks(mask_inputs, rows) if rows else (None, None)
        kept = [(row, query) for row, keep in enumerate(keeps) for query in keep.tolist()]
        reprompt = {}
        if self.reprompt_boxes and kept:
            reprompt = self._reprompt_ious(vision, index, phrases, tokens, pred_boxes, pred_masks, rows, kept)
        height, width = size
        boxes = pred_boxes.float().cpu() * torch.tensor([width, height, width, height])

        def finish() -> list[PairPrediction]:
            foregrounds = []
            if rows:
                upsampled = F.interpolate(semantic.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
                foregrounds = rle_encode(upsampled > 0)
            predictions = []
            for row, keep in enumerate(keeps):
                instances: tuple[Instance, ...] = ()
                empty = 0
                if len(keep):
                    logits = F.interpolate(
                        pred_masks[rows.index(row), keep.to(self.device)][:, None].float(), size=size, mode="bilinear", align_corners=False
                    )[:, 0]
                    high, low = logits > STABILITY_OFFSET, logits > -STABILITY_OFFSET
                    stability = (high.flatten(1).sum(1).float() / low.flatten(1).sum(1).clamp(min=1).float()).cpu()
                    covers = (logits > 0).flatten(1).any(1).tolist()  # a mask of no pixel at the image's size is no instance
                    instances = tuple(
                        Instance(
                            query=query,
                            rle=rle,
                            box_xyxy=tuple(boxes[row, query].tolist()),
                            object_score=float(object_scores[row, query]),
                            score=float(scores[row, query]),
                            stability=float(stability[j]),
                            reprompt_iou=reprompt.get((row, query)),
                        )
                        for j, (query, rle) in enumerate(zip(keep.tolist(), rle_encode(logits > 0), strict=True))
                        if covers[j]
                    )
                    empty = len(covers) - len(instances)
                foreground = foregrounds[rows.index(row)] if row in rows else None
                predictions.append(PairPrediction(float(presence[row]), float(scores[row].max()), instances, foreground, empty))
            return predictions

        return finish

    def _reprompt_ious(
        self, vision, index: int, phrases: list[str], tokens: Tokens, pred_boxes, pred_masks, rows: list[int], kept: list[tuple[int, int]]
    ) -> dict[tuple[int, int], float]:
        """Per kept (row, query): IoU of its mask with the mask SAM 3 gives when prompted with its phrase and its box.

        SAM 3 treats a box as an exemplar and may return every similar instance; the instance whose
        box overlaps the prompt most is the one to compare. Runs in batches of ``len(rows)`` rows or
        fewer, so it never needs more memory than the phrase batch did.
        """
        from torchvision.ops import box_iou

        ious: dict[tuple[int, int], float] = {}
        batch = max(1, len(tokens.truncated))
        for start in range(0, len(kept), batch):
            chunk = kept[start : start + batch]
            padded = chunk + chunk[-1:] * (bucket(len(chunk), batch) - len(chunk) if self.bucket_batches else 0)
            token_rows = torch.tensor([row for row, _ in padded])
            prompts = torch.stack([pred_boxes[row, query] for row, query in padded]).float()
            cxcywh = torch.cat([(prompts[:, :2] + prompts[:, 2:]) / 2, prompts[:, 2:] - prompts[:, :2]], dim=-1)[:, None]
            out = self.model(
                vision_embeds=self._expanded(vision, index, len(padded)),
                text_embeds=self._text_embeds(
                    [phrases[row] for row, _ in padded], Tokens(tokens.input_ids[token_rows], tokens.attention_mask[token_rows], ())
                ),
                attention_mask=tokens.attention_mask[token_rows].to(self.device),
                input_boxes=cxcywh.to(self.device, self.dtype),
                input_boxes_labels=torch.ones(len(padded), 1, dtype=torch.long, device=self.device),
            )
            for i, (row, query) in enumerate(chunk):
                best = int(box_iou(prompts[i : i + 1], out.pred_boxes[i].float()).argmax())
                again, before = out.pred_masks[i, best] > 0, pred_masks[rows.index(row), query] > 0
                union = int((again | before).sum())
                ious[(row, query)] = float((again & before).sum()) / union if union else 1.0
        return ious

    @contextmanager
    def _deferred_mask_decoder(self):
        """Run the model's forward with its mask decoder swapped for a stub that records its inputs.

        The forward computes presence, scores and boxes before it calls the mask decoder, and
        nothing after it depends on the masks; so the real decoder can then run on the rows that
        need masks only, with the exact inputs the forward would have given it.
        """
        decoder = self.model.mask_decoder
        recorder = _MaskDecoderInputs()
        self.model.mask_decoder = recorder
        try:
            yield recorder.inputs
        finally:
            self.model.mask_decoder = decoder

    def _decode_masks(self, inputs: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits and semantic-segmentation logits of ``rows``."""
        count = len(rows)
        padded = bucket(count, inputs["decoder_queries"].shape[0]) if self.bucket_batches else count
        index = torch.tensor(rows + [rows[-1]] * (padded - count), device=self.device)
        pick = lambda value: value.index_select(0, index) if isinstance(value, torch.Tensor) else value  # noqa: E731
        sliced = {key: [pick(v) for v in value] if isinstance(value, list) else pick(value) for key, value in inputs.items()}
        decoded = self.model.mask_decoder(**sliced)
        return decoded.pred_masks[:count], decoded.semantic_seg[:count]


class _MaskDecoderInputs(torch.nn.Module):
    """Stands in for the mask decoder during a forward: keeps its keyword inputs, returns no masks."""

    def __init__(self):
        super().__init__()
        self.inputs: dict = {}

    def forward(self, **inputs):
        from transformers.models.sam3.modeling_sam3 import Sam3MaskDecoderOutput

        self.inputs.update(inputs)
        return Sam3MaskDecoderOutput(pred_masks=None, semantic_seg=None)
