"""A vision-language model as a yes/no judge: pictures and a question in, the probability of "yes" out.

``VlmJudge.load`` takes a Hugging Face id or local directory of an Idefics3-family checkpoint (the
SmolVLM models: Apache-2.0, 256M to 2.2B parameters, no gate), or ``tiny-random``: a small
``Idefics3Config`` with seeded random weights, the CLIP BPE tokenizer that ships inside open_clip and
SmolVLM's chat template. Same classes, same code path.

The score is read from the logits at the answer position: P(yes) / (P(yes) + P(no)), each summed
over its spellings, never parsed from generated text.

Pictures come first in every prompt (``data/vlm_prompts.yaml``), so the questions asked about the
same pictures share a prefix: the vision encoder and the language model's pass over the picture
tokens run once per picture set, and each question runs only its own tokens on that prefix's cache.
A photo with K phrases costs one prefix and K short suffixes, not K full prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from scipy import ndimage

from sam3_engine.models.hub import HubChoice, ModelLoadError, cache_only, choose_checkpoint

TINY_RANDOM_SEED = 0
TINY_RANDOM_INIT_RANGE = 0.2
"""At the default init (0.02) a model this small answers P(yes) = 0.48 to everything; at 0.2 its answers on the quickstart
spread over 0.15-0.86 (presence), 0.37-0.9 (masks) and 0.07-0.3 (exhaustivity), so a smoke run's verdicts take most
values and every path runs. They mean nothing."""
YES = ("yes", "Yes", " yes", " Yes", "YES")
NO = ("no", "No", " no", " No", "NO")
KINDS = ("presence", "mask", "exhaustivity")
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM's chat template, for the tiny model (a real checkpoint brings its own)."""
HIGHLIGHT = (255, 0, 0)
DIMMED_256 = 90
"""Brightness kept outside the highlighted region, in 256ths (35%)."""


@cache
def prompt_templates() -> dict[str, Any]:
    """The questions, their pictures and their version (``data/vlm_prompts.yaml``)."""
    templates = yaml.safe_load(resources.files("sam3_engine.data").joinpath("vlm_prompts.yaml").read_text())
    missing = [kind for kind in KINDS if "{phrase}" not in templates.get(kind, {}).get("question", "")]
    if missing:
        raise ValueError(f"vlm_prompts.yaml: question(s) {missing} missing or without {{phrase}}")
    return templates


def _load_error(name: str, revision: str | None, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the VLM {name!r}" + (f" at revision {revision!r}" if revision else "") + f": {type(exc).__name__}: {exc}\n"
        "  - without network access, copy a checkpoint saved with save_pretrained and pass its directory "
        "(verify_vlm.model: /path/to/SmolVLM), or pre-fill the Hugging Face cache on every machine "
        "(read without the hub when it is unreachable);\n"
        "  - for a smoke run with random weights, set verify_vlm.model: tiny-random."
    )


class VlmChoice(HubChoice):
    """Which VLM checkpoint a run uses."""


def choose_vlm(name: str, revision: str | None, fallback_to_tiny_random: bool) -> VlmChoice:
    """Check that the checkpoint is reachable (its config.json, not its weights); fall back only if asked."""
    return choose_checkpoint(VlmChoice, name, revision, fallback_to_tiny_random, _load_error)


def _tiny_tokenizer():
    from sam3_engine.text.clip_tokenizer import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer(model_max_length=8192)
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid]}
    )
    return tokenizer


def tiny_random_processor():
    """SmolVLM's processor at toy size: 64 px tiles of 4 picture tokens, up to 2 x 2 tiles and a global view."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    image_processor = Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=_tiny_tokenizer(), image_seq_len=4, chat_template=SMOLVLM_CHAT_TEMPLATE
    )


def tiny_random_config(processor):
    """A small Idefics3 (SigLIP vision tower and Llama language model, 32 wide, 2 deep): every module of SmolVLM."""
    from transformers import Idefics3Config

    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16),
        text_config=dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(processor.tokenizer),
        ),
        scale_factor=2,
        image_token_id=processor.image_token_id,
    )
    for part in (config, config.vision_config, config.text_config):
        part.initializer_range = TINY_RANDOM_INIT_RANGE
    return config


def load_processor(choice: VlmChoice, local_files_only: bool | None = None):
    """The checkpoint's processor alone (tokenizer and image settings, no weights): for CPU preparation workers.
    ``local_files_only`` None: from the cache alone if the hub cannot be reached now (``cache_only``)."""
    if choice.random_weights:
        return tiny_random_processor()
    from transformers import Idefics3Processor

    try:
        local = cache_only(choice.name) if local_files_only is None else local_files_only
        return Idefics3Processor.from_pretrained(choice.name, revision=choice.revision, local_files_only=local)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(choice.name, choice.revision, exc) from exc


@dataclass(frozen=True)
class PictureSet:
    """Pictures and the prompt's tokens up to the end of the last picture, with the questions asked about them."""

    input_ids: np.ndarray
    """int64 [L]: the shared prefix, picture tokens included."""
    pixels: np.ndarray
    """uint8 [tiles, 3, H, W]: resized and tiled by the processor, not yet rescaled or normalised (a quarter of float32's bytes)."""
    pixel_mask: np.ndarray
    """bool [tiles, H, W]: the real (not padded) pixels of each tile."""
    questions: tuple[np.ndarray, ...]
    """int64 token ids of each question's own part, after the prefix."""


class Prompts:
    """Turns pictures and phrases into picture sets, with the processor alone: runs on CPU workers, next to no memory."""

    def __init__(self, processor, templates: dict[str, Any] | None = None):
        self.processor = processor
        self.templates = templates or prompt_templates()

    def texts(self, kind: str, phrases: list[str]) -> list[str]:
        """The chat-formatted prompt of each phrase, pictures first, ready for the answer.

        A phrase is text, never markup: the tokenizer's special tokens (``<image>``, ``<end_of_utterance>``, ...) are
        removed from it, so that a hostile phrase cannot add a picture slot or end the user's turn.
        """
        template = self.templates[kind]
        phrases = [self._plain(phrase) for phrase in phrases]
        content = [{"type": "image"} for _ in template["pictures"]]
        return [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [*content, {"type": "text", "text": template["question"].replace("{phrase}", phrase)}]}],
                add_generation_prompt=True,
            )
            for phrase in phrases
        ]

    def _plain(self, phrase: str) -> str:
        for token in sorted(self.processor.tokenizer.get_added_vocab(), key=len, reverse=True):
            phrase = phrase.replace(token, " ")
        return " ".join(phrase.split())

    @property
    def tile(self) -> int:
        """The side of the model's square tiles, in pixels."""
        return self.processor.image_processor.max_image_size["longest_edge"]

    def image_settings(self, split_tiles: bool) -> dict[str, Any]:
        """At most 2 x 2 tiles and a global view, or one tile: pictures are drawn at 1024 px at most, so the processor's
        default of up to 4 x 4 tiles (SmolVLM: 2048 px) would only upsample them, at 2.5x the tokens."""
        return {"do_image_splitting": split_tiles, "size": {"longest_edge": self.tile * (2 if split_tiles else 1)}}

    def picture_set(self, kind: str, pictures: list[Image.Image], phrases: list[str], split_tiles: bool = True) -> PictureSet:
        """``kind``'s question for each phrase about ``pictures``; ``split_tiles`` False sends each picture as one tile."""
        if len(pictures) != len(self.templates[kind]["pictures"]):
            raise ValueError(f"{kind} questions take {len(self.templates[kind]['pictures'])} picture(s), got {len(pictures)}")
        marker = self.processor.image_token
        texts = self.texts(kind, phrases)
        cut = [text.rindex(marker) + len(marker) for text in texts]
        prefixes = {text[:end] for text, end in zip(texts, cut, strict=True)}
        if len(prefixes) != 1:
            raise ValueError("the chat template puts phrase-dependent text before the pictures: questions cannot share a prefix")
        encoded = self.processor(
            text=[prefixes.pop()],
            images=[[picture.convert("RGB") for picture in pictures]],
            add_special_tokens=False,  # the chat template writes every special token itself
            do_rescale=False,
            do_normalize=False,
            return_tensors="np",
            **self.image_settings(split_tiles),
        )
        questions = tuple(
            np.asarray(self.processor.tokenizer(text[end:], add_special_tokens=False)["input_ids"], np.int64)
            for text, end in zip(texts, cut, strict=True)
        )
        return PictureSet(
            encoded["input_ids"][0].astype(np.int64),
            encoded["pixel_values"][0].round().astype(np.uint8),
            encoded["pixel_attention_mask"][0].astype(bool),
            questions,
        )


def highlight(image: Image.Image, masks: list[np.ndarray]) -> Image.Image:
    """``image`` dimmed outside the union of ``masks``, each mask outlined in red: the visual prompt of the mask questions.

    In uint8 throughout, and each outline found within its mask's box: a prepare task draws one picture per mask.
    """
    pixels = np.asarray(image.convert("RGB"))
    union = np.logical_or.reduce(masks) if masks else np.zeros(pixels.shape[:2], bool)
    out = np.where(union[..., None], pixels, (pixels.astype(np.uint16) * DIMMED_256 >> 8).astype(np.uint8))
    width = max(1, min(image.size) // 150)
    for mask in masks:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if not len(rows):
            continue
        top, bottom = max(0, rows[0] - 1), rows[-1] + 2
        left, right = max(0, cols[0] - 1), cols[-1] + 2
        box = mask[top:bottom, left:right]
        edge = box & ~ndimage.binary_erosion(box, iterations=width, border_value=0)
        out[top:bottom, left:right][edge] = HIGHLIGHT
    return Image.fromarray(out)


def close_up(picture: Image.Image, box: tuple[float, float, float, float], padding: float = 0.25) -> Image.Image:
    """The region of ``box`` ([x, y, w, h]) with ``padding`` of its size around it."""
    x, y, w, h = box
    pad = padding * max(w, h, 1.0)
    left, top = max(0, int(x - pad)), max(0, int(y - pad))
    right, bottom = min(picture.width, int(np.ceil(x + w + pad))), min(picture.height, int(np.ceil(y + h + pad)))
    return picture.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


def mask_pictures(photo: Image.Image, mask: np.ndarray, box: tuple[float, float, float, float], side: int) -> list[Image.Image]:
    """The mask question's two pictures: the photo with the mask highlighted, and a close-up of the mask's ``box``,
    each shrunk to fit a ``side`` square (one tile: the processor would only shrink them again, slower)."""
    picture = highlight(photo, [mask])
    pictures = [picture, close_up(picture, box)]
    for each in pictures:
        each.thumbnail((side, side), Image.Resampling.LANCZOS)
    return pictures


class VlmJudge:
    """An Idefics3-family VLM on one device; ``yes_probabilities`` is the whole interface."""

    def __init__(self, model, processor, choice: VlmChoice):
        self.model = model.eval()
        self.processor = processor
        self.choice = choice
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        image_processor = processor.image_processor
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)
        self.yes_ids = self._answer_ids(YES)
        self.no_ids = self._answer_ids(NO)
        if set(self.yes_ids) & set(self.no_ids):
            raise ModelLoadError(f"the tokenizer of {choice.label} does not tell yes from no")

    @classmethod
    def load(cls, choice: VlmChoice, device: str | None = None, dtype: str | None = None) -> VlmJudge:
        """Load weights and processor; bf16 on CUDA and fp32 on CPU unless ``dtype`` says otherwise."""
        from transformers import Idefics3ForConditionalGeneration

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if choice.random_weights:
            processor = load_processor(choice)
            torch.manual_seed(TINY_RANDOM_SEED)
            model = Idefics3ForConditionalGeneration(tiny_random_config(processor))
            return cls(model.to(device=device, dtype=torch_dtype), processor, choice)
        local = cache_only(choice.name)
        try:
            model = Idefics3ForConditionalGeneration.from_pretrained(
                choice.name, revision=choice.revision, dtype=torch_dtype, local_files_only=local
            )
        except Exception as exc:  # noqa: BLE001 - missing, offline, not an Idefics3 checkpoint: one actionable error
            raise _load_error(choice.name, choice.revision, exc) from exc
        return cls(model.to(device), load_processor(choice, local), choice)

    def _answer_ids(self, spellings: tuple[str, ...]) -> list[int]:
        """The first token of each spelling of an answer, once each."""
        tokenizer = self.processor.tokenizer
        ids = {tokenizer(spelling, add_special_tokens=False)["input_ids"][0] for spelling in spellings}
        return sorted(ids)

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [..., 3, H, W] to the model's input: rescaled and normalised on the model's device."""
        shape = pixels.shape
        flat = pixels.to(self.device, non_blocking=True).reshape(-1, *shape[-3:]).float() * self.scale
        return ((flat - self.mean) / self.std).reshape(shape).to(self.dtype)

    @torch.inference_mode()
    def yes_probabilities(self, sets: list[PictureSet], batch_size: int = 16) -> list[np.ndarray]:
        """For each picture set, P(yes) against P(no) of each of its questions.

        Picture sets of the same shape run their prefixes together, ``batch_size`` at a time; then
        their questions, ``batch_size`` at a time, each on a view of its prefix's cache.
        """
        results: list[np.ndarray | None] = [None] * len(sets)
        shapes: dict[tuple, list[int]] = {}
        for index, picture_set in enumerate(sets):
            shapes.setdefault((len(picture_set.input_ids), picture_set.pixels.shape), []).append(index)
        for indices in shapes.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                for index, probabilities in zip(chunk, self._ask([sets[i] for i in chunk], batch_size), strict=True):
                    results[index] = probabilities
        return results  # type: ignore[return-value]

    def _ask(self, sets: list[PictureSet], batch_size: int) -> list[np.ndarray]:
        prefix_cache, prefix_length = self._prefix(sets)
        rows = [(position, question) for position, picture_set in enumerate(sets) for question in picture_set.questions]
        answers = []
        for start in range(0, len(rows), batch_size):
            answers.append(self._questions(prefix_cache, prefix_length, rows[start : start + batch_size]))
        flat = np.concatenate(answers) if answers else np.zeros(0)
        counts = np.cumsum([len(s.questions) for s in sets])[:-1]
        return np.split(flat, counts)

    def _prefix(self, sets: list[PictureSet]):
        """The picture sets' shared prefixes in one forward: their cache (batch = sets) and length."""
        ids = torch.from_numpy(np.stack([s.input_ids for s in sets])).to(self.device)
        pixels = self.pixel_values(torch.from_numpy(np.stack([s.pixels for s in sets])))
        mask = torch.from_numpy(np.stack([s.pixel_mask for s in sets])).to(self.device)
        inner = self.model.model
        features = torch.cat(inner.get_image_features(pixels, mask).pooler_output)
        embeds = self.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == inner.image_token_id)[..., None], features.to(embeds.dtype))
        out = inner.text_model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=True)
        return out.cache, ids.shape[1]

    def _questions(self, prefix_cache, prefix_length: int, rows: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """Each row's question on its prefix: right-padded, so each answer is read at the question's last real token."""
        from transformers import DynamicCache

        owners = torch.tensor([owner for owner, _ in rows], device=self.device)
        lengths = torch.tensor([len(question) for _, question in rows], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (_, question) in enumerate(rows):
            ids[row, : len(question)] = torch.as_tensor(question.tolist())
        ids = ids.to(self.device)
        own = (torch.arange(width, device=self.device)[None] < lengths[:, None]).long()
        attention = torch.cat([torch.ones(len(rows), prefix_length, dtype=torch.long, device=self.device), own], dim=1)
        positions = (prefix_length + torch.arange(width, device=self.device))[None].expand(len(rows), -1)
        shared = DynamicCache(config=self.model.config.text_config)
        for layer, source in zip(shared.layers, prefix_cache.layers, strict=True):
            layer.update(source.keys.index_select(0, owners), source.values.index_select(0, owners))
        out = self.model.model.text_model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=shared, use_cache=True)
        last = out.last_hidden_state[torch.arange(len(rows), device=self.device), lengths - 1]
        probabilities = self.model.lm_head(last).float().softmax(-1)
        yes = probabilities[:, self.yes_ids].sum(-1)
        no = probabilities[:, self.no_ids].sum(-1)
        return (yes / (yes + no).clamp(min=1e-30)).cpu().numpy()
