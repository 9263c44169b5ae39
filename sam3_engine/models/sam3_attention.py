"""Which attention kernel each of SAM 3's blocks gets, at the shapes and dtype a run actually uses.

Hugging Face's SAM 3 calls ``torch.nn.functional.scaled_dot_product_attention`` when the model's
``_attn_implementation`` is "sdpa" (the default); SDPA then picks flash, memory-efficient, cuDNN or
the math fallback per call, from shapes, dtype and mask. The math fallback materialises the full
attention matrix: in the ViT's global blocks (5184 tokens at 1008 px) that is what to find and fix.
The report tags every SDPA call with its block and reads the ATen kernel that ran from the profiler.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F

BLOCK_TAG = "sam3_block::"
KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (other)",
}


def block_of(name: str, model) -> str:
    """A readable block for an attention module's qualified name: the ViT's windowed and global layers apart."""
    top = name.split(".", 1)[0]
    if top != "vision_encoder":
        return top
    layer = model.get_submodule(name.rsplit(".", 1)[0])
    return "vit_windowed" if getattr(layer, "window_size", 0) > 0 else "vit_global"


def attention_implementations(model) -> dict[str, str | None]:
    """``_attn_implementation`` of the model and each sub-model's config."""
    found = {"model": model.config._attn_implementation}
    for name, module in model.named_children():
        config = getattr(module, "config", None)
        if config is not None:
            found[name] = getattr(config, "_attn_implementation", None)
    return found


@contextmanager
def tagged_sdpa(model, calls: list[dict]):
    """Every SDPA call inside ``model`` runs under a profiler label naming its block; its shapes go to ``calls``."""
    current: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and name:
            block = block_of(name, model)
            handles.append(module.register_forward_pre_hook(lambda *_, block=block: current.append(block)))
            handles.append(module.register_forward_hook(lambda *_: current.pop() and None))  # None: the output stays
    original = F.scaled_dot_product_attention

    def tagged(query, key, value, attn_mask=None, *args, **kwargs):
        block = current[-1] if current else "other"
        calls.append(
            {
                "block": block,
                "query": list(query.shape),
                "key": list(key.shape),
                "dtype": str(query.dtype).removeprefix("torch."),
                "mask": None if attn_mask is None else str(attn_mask.dtype).removeprefix("torch."),
                **_backends_allowed(query, key, value, attn_mask),
            }
        )
        with torch.profiler.record_function(BLOCK_TAG + block):
            return original(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = tagged
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def _backends_allowed(query, key, value, mask) -> dict:
    """On CUDA, whether flash, memory-efficient and cuDNN attention accept this call (SDPA takes the first that does)."""
    if not query.is_cuda:
        return {}
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, mask, 0.0, False, False)
    except TypeError:  # older torch: no enable_gqa
        params = torch.backends.cuda.SDPAParams(query, key, value, mask, 0.0, False)
    checks = {
        "flash_ok": torch.backends.cuda.can_use_flash_attention,
        "efficient_ok": torch.backends.cuda.can_use_efficient_attention,
        "cudnn_ok": getattr(torch.backends.cuda, "can_use_cudnn_attention", None),
    }
    return {name: bool(check(params, False)) for name, check in checks.items() if check is not None}


def attention_report(segmenter, pixel_values: torch.Tensor, size: tuple[int, int], phrases: list[str]) -> dict:
    """One ``predict_pixels`` of one image and ``phrases`` (masks decoded for all): per block, its SDPA calls and kernels run."""
    model = segmenter.model
    calls: list[dict] = []
    decode_all, segmenter.decode_all_masks = segmenter.decode_all_masks, True
    try:
        with tagged_sdpa(model, calls), torch.profiler.profile() as profile:
            segmenter.predict_pixels(pixel_values[:1], [size], [phrases], threshold=1.0, phrase_batch=len(phrases))
    finally:
        segmenter.decode_all_masks = decode_all
    kernels: dict[str, Counter] = {}
    for event in profile.events():
        if event.name not in KERNELS:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(BLOCK_TAG):
            parent = parent.cpu_parent
        block = parent.name.removeprefix(BLOCK_TAG) if parent is not None else "untagged"
        kernels.setdefault(block, Counter())[KERNELS[event.name]] += 1
    shapes: dict[str, Counter] = {}
    for call in calls:
        shapes.setdefault(call["block"], Counter())[repr({k: v for k, v in call.items() if k != "block"})] += 1
    return {
        "attn_implementation": attention_implementations(model),
        "kernels": {block: dict(counts) for block, counts in sorted(kernels.items())},
        "calls": {block: [{"call": call, "count": n} for call, n in counts.items()] for block, counts in sorted(shapes.items())},
    }
