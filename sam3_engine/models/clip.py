"""CLIP (open_clip) behind a narrow interface: images in, unit-length embeddings out; phrases likewise.

``ClipEmbedder.load`` takes an open_clip architecture and pretrained tag (weights from the Hugging
Face hub or a local file), or ``tiny-random``: a small architecture from the config file shipped in
``sam3_engine/data``, seeded random weights and the CLIP BPE tokenizer inside open_clip: the same
classes and code path, for tests and smoke runs.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam3_engine.models.hub import ModelLoadError, check_hub_reachable, hub_unreachable

TINY_RANDOM = "tiny-random"
TINY_RANDOM_ARCHITECTURE = "sam3-engine-tiny-clip"
TINY_RANDOM_SEED = 0
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The weights files open_clip looks for in a hub repository named without a file, in its order."""
PROMPT = "a photo of a {}."
"""CLIP's standard prompt: phrases are embedded as captions, as CLIP was trained."""


@cache
def _register_tiny_architecture() -> None:
    import open_clip

    open_clip.add_model_config(Path(str(resources.files("sam3_engine.data").joinpath(f"{TINY_RANDOM_ARCHITECTURE}.json"))))


def _clip_error(model: str, pretrained: str | None, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load CLIP {model!r} with pretrained weights {pretrained!r}: {type(exc).__name__}: {exc}\n"
        "  - without network access, download the weights elsewhere and pass the file as clip.pretrained, "
        "or pre-fill the Hugging Face cache on every machine (read without the hub when it is unreachable);\n"
        "  - for a smoke run with random weights, set clip.model: tiny-random."
    )


@dataclass(frozen=True)
class ClipChoice:
    """Which CLIP a run uses, decided once on the driver."""

    model: str
    pretrained: str | None
    fallback_reason: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.model == TINY_RANDOM

    @property
    def label(self) -> str:
        """How embeddings are tagged: architecture and weights."""
        return TINY_RANDOM if self.random_weights else f"{self.model}/{self.pretrained}"


def choose_clip(model: str, pretrained: str | None, fallback_to_tiny_random: bool) -> ClipChoice:
    """Check that the weights (and a Hugging Face tokenizer, for models that use one) are cached, a local file, or on a
    reachable hub; fall back only if asked."""
    import open_clip

    if model == TINY_RANDOM:
        return ClipChoice(model, pretrained)
    local_file = bool(pretrained) and Path(pretrained).is_file()
    if not local_file and model not in open_clip.list_models():
        raise _clip_error(model, pretrained, ValueError(f"unknown architecture; open_clip knows e.g. {open_clip.list_models()[:5]}"))
    if not local_file and not open_clip.get_pretrained_cfg(model, pretrained or ""):
        raise _clip_error(model, pretrained, ValueError(f"unknown pretrained tag; known: {open_clip.list_pretrained_tags_by_model(model)}"))
    try:
        if not (local_file or cached_weights(model, pretrained)) or not tokenizer_cached(model):
            check_hub_reachable()
    except Exception as exc:  # noqa: BLE001 - offline or unreachable
        if not fallback_to_tiny_random:
            raise _clip_error(model, pretrained, exc) from exc
        return ClipChoice(TINY_RANDOM, None, fallback_reason=f"CLIP {model}/{pretrained} is not reachable ({type(exc).__name__})")
    return ClipChoice(model, pretrained)


def cached_weights(model: str, pretrained: str | None) -> str | None:
    """The local path of a pretrained tag's hub weights when they are in the Hugging Face cache, the safetensors
    file first as open_clip takes it; None when they are not (or the tag's weights are not on the hub)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    repo, filename = posixpath.split((open_clip.get_pretrained_cfg(model, pretrained or "") or {}).get("hf_hub", ""))
    if not repo:
        return None
    names = (filename.rsplit(".", 1)[0] + ".safetensors", filename) if filename else HUB_WEIGHTS
    return next((path for name in names if isinstance(path := try_to_load_from_cache(repo, name), str)), None)


def hub_tokenizer(model: str) -> str | None:
    """The hub repository of the model's Hugging Face tokenizer (SigLIP, the multilingual CLIPs); None for CLIP's own BPE."""
    import open_clip

    return ((open_clip.get_model_config(model) or {}).get("text_cfg") or {}).get("hf_tokenizer_name") or None


def tokenizer_cached(model: str) -> bool:
    """Whether the model needs nothing from the hub to tokenize: CLIP's BPE ships with open_clip, a Hugging Face
    tokenizer must be in the cache."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_tokenizer(model)
    return repo is None or isinstance(try_to_load_from_cache(repo, "tokenizer_config.json"), str)


def load_tokenizer(model: str, offline: bool):
    """open_clip's tokenizer for ``model``; a Hugging Face one from the cache alone when the hub is ``offline`` (the
    hub client would retry each file for minutes first)."""
    import open_clip

    return open_clip.get_tokenizer(model, **({"local_files_only": True} if offline and hub_tokenizer(model) else {}))


def input_size(choice: ClipChoice) -> int:
    """The side of the model's square input, in pixels."""
    import open_clip

    _register_tiny_architecture()
    architecture = TINY_RANDOM_ARCHITECTURE if choice.random_weights else choice.model
    return open_clip.get_model_config(architecture)["vision_cfg"]["image_size"]


def image_transform(choice: ClipChoice):
    """The model's CPU preprocessing alone (no weights): for preparation workers."""
    import open_clip

    size = input_size(choice)
    source = {} if choice.random_weights else (open_clip.get_pretrained_cfg(choice.model, choice.pretrained) or {})
    return open_clip.image_transform(
        size,
        is_train=False,
        mean=source.get("mean"),
        std=source.get("std"),
        resize_mode=source.get("resize_mode"),
        interpolation=source.get("interpolation"),
    )


class ClipEmbedder:
    """CLIP on one device."""

    def __init__(self, model, tokenizer, choice: ClipChoice, device: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.choice = choice
        self.device = device

    @classmethod
    def load(cls, choice: ClipChoice, device: str | None = None) -> ClipEmbedder:
        import open_clip

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _register_tiny_architecture()
        if choice.random_weights:
            torch.manual_seed(TINY_RANDOM_SEED)
            model = open_clip.create_model(TINY_RANDOM_ARCHITECTURE, pretrained=None, device=device)
            return cls(model, open_clip.get_tokenizer(TINY_RANDOM_ARCHITECTURE), choice, device)
        precision = "fp16" if device.startswith("cuda") else "fp32"
        weights, preprocessing = choice.pretrained, None
        cached = cached_weights(choice.model, choice.pretrained)
        # Probe the hub only when its answer changes what is read: a local weights file with CLIP's own BPE needs no hub.
        offline = bool(cached or hub_tokenizer(choice.model)) and hub_unreachable()
        if cached and offline:  # the file itself: open_clip's download would retry the hub for minutes first
            weights, preprocessing = cached, open_clip.get_pretrained_cfg(choice.model, choice.pretrained)
        try:
            model = open_clip.create_model(
                choice.model, pretrained=weights, device=device, precision=precision, force_preprocess_cfg=preprocessing
            )
            tokenizer = load_tokenizer(choice.model, offline)
        except Exception as exc:  # noqa: BLE001 - gated, missing, offline: one actionable error
            raise _clip_error(choice.model, choice.pretrained, exc) from exc
        return cls(model, tokenizer, choice, device)

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        features = self.model.encode_image(pixels.to(self.device, next(self.model.parameters()).dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        transform = image_transform(self.choice)
        return self.embed_pixels(torch.stack([transform(image.convert("RGB")) for image in images]))

    @torch.inference_mode()
    def embed_phrases(self, phrases: list[str]) -> np.ndarray:
        tokens = self.tokenizer([PROMPT.format(p) for p in phrases]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()
