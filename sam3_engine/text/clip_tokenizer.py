"""SAM 3's text tokenizer (CLIP's byte-level BPE), built offline from the vocabulary file inside open_clip_torch.

The file is found without importing open_clip: that import takes about 5 s and loads torch, and every
worker that only counts a phrase's tokens (mine's) would pay it. The tokenizer itself is transformers'
CLIPTokenizer, the class SAM 3's processor uses, so the engine counts and truncates as the model does.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2
"""Merges CLIP's vocabulary uses: 49,408 tokens are 256 bytes, their 256 word-final forms, the merges and 2 specials."""
START, END = "<start_of_text>", "<end_of_text>"
LAZY_IMPORTS = ("transformers.models.clip.tokenization_clip", "transformers.convert_slow_tokenizer")
"""What ``offline_clip_tokenizer`` imports on first use (about 2 s), for process pools to import once before forking."""


def bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / BPE_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"CLIP's BPE vocabulary ({BPE_FILE}) is not installed: pip install open_clip_torch")
    return path


def offline_clip_tokenizer(model_max_length: int):
    """CLIP's tokenizer: ids equal open_clip's for text that needs no mojibake or HTML-entity repair (which open_clip
    applies and SAM 3's processor does not)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(bpe_file(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : MERGES + 1]]
    characters = list(bytes_to_unicode().values())
    tokens = [*characters, *(c + "</w>" for c in characters), *("".join(pair) for pair in merges), START, END]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        bos_token=START,
        eos_token=END,
        pad_token=END,
        unk_token=END,
        model_max_length=model_max_length,
    )
