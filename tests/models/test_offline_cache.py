"""Checkpoints already in the Hugging Face cache load at once when the hub cannot be reached (a cluster without internet
access, HF_HUB_OFFLINE not set): the hub client would otherwise retry every file five times with backoff first."""

import socket
import subprocess
import sys

from tests.conftest import REPO

LOADS = """
from pathlib import Path
from huggingface_hub import constants
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import Idefics3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.sam3 import Sam3Model, Sam3Processor

from sam3_engine.models.clip import cached_weights, choose_clip, load_tokenizer
from sam3_engine.models.sam3 import ModelChoice, Sam3Segmenter, load_image_processor, tiny_random_config
from sam3_engine.models.vlm import VlmChoice, VlmJudge, load_processor, tiny_random_config as tiny_vlm_config
from sam3_engine.models.vlm import tiny_random_processor

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def snapshot(repo):
    "A cache entry as the hub client leaves it: the files of one commit, and the branch pointing at it."
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return folder / "snapshots" / COMMIT


sam3 = snapshot("cached/sam3")
Sam3Model(tiny_random_config()).save_pretrained(sam3)
Sam3Processor(image_processor=load_image_processor(ModelChoice("tiny-random", None)),
              tokenizer=Sam3Segmenter.load("tiny-random").processor.tokenizer).save_pretrained(sam3)
vlm = snapshot("cached/vlm")
processor = tiny_random_processor()
Idefics3ForConditionalGeneration(tiny_vlm_config(processor)).save_pretrained(vlm)
processor.save_pretrained(vlm)
clip = snapshot("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
clip.mkdir(parents=True)
(clip / "open_clip_model.safetensors").write_bytes(b"weights")

siglip = snapshot("timm/ViT-B-16-SigLIP")
siglip.mkdir(parents=True)
(siglip / "open_clip_model.safetensors").write_bytes(b"weights")
try:
    choose_clip("ViT-B-16-SigLIP", "webli", fallback_to_tiny_random=False)
except Exception as exc:
    print("siglip without its tokenizer", type(exc).__name__)
words = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "photo": 3, "of": 4, "cat": 5}, unk_token="[UNK]"))
words.pre_tokenizer = Whitespace()
PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(siglip)
(siglip / "config.json").write_text('{"architecture": "vit_base_patch16_siglip_224"}')  # timm's, as in the repository

segmenter = Sam3Segmenter.load("cached/sam3")
print("sam3", segmenter.model_id, segmenter.random_weights)
print("sam3 image processor", type(load_image_processor(ModelChoice("cached/sam3", None))).__name__)
judge = VlmJudge.load(VlmChoice("cached/vlm", None))
print("vlm", type(judge.model).__name__, type(load_processor(VlmChoice("cached/vlm", None))).__name__)
print("clip", cached_weights("ViT-B-32", "laion2b_s34b_b79k") == str(clip / "open_clip_model.safetensors"))
print("clip choice", choose_clip("ViT-B-32", "laion2b_s34b_b79k", fallback_to_tiny_random=False).label)
print("siglip choice", choose_clip("ViT-B-16-SigLIP", "webli", fallback_to_tiny_random=False).label)
print("siglip tokens", load_tokenizer("ViT-B-16-SigLIP", offline=True)(["a photo of a dog"])[0, :6].tolist())
"""


def test_cached_checkpoints_load_without_retrying_an_unreachable_hub(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: the hub refuses every connection at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", LOADS], capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "Retrying" not in done.stderr
    assert done.stdout.splitlines() == [
        "siglip without its tokenizer ModelLoadError",
        "sam3 cached/sam3 False",
        "sam3 image processor Sam3ImageProcessor",
        "vlm Idefics3ForConditionalGeneration Idefics3Processor",
        "clip True",
        "clip choice ViT-B-32/laion2b_s34b_b79k",
        "siglip choice ViT-B-16-SigLIP/webli",
        "siglip tokens [2, 3, 4, 2, 1, 0]",
    ]
