"""SAM 3's CLIP tokenizer, built offline from open_clip's BPE file, against open_clip's own tokenizer."""

import random
import subprocess
import sys
import tempfile

import pytest

from sam3_engine.text.clip_tokenizer import offline_clip_tokenizer
from sam3_engine.text.concepts import TEXT_CONTEXT, token_count
from tests.conftest import REPO

PHRASES = (
    "grocery bag",
    "a white pickup truck",
    "children's sports bibs!",
    "café",
    "Ünïcödé 汉字 straße",
    "the QUICK brown fox   jumps",
    "emoji 🐕 dog",
    "123 4567 dogs",
    "e\u0301cole",
    "x" * 80,
    " ".join(["car"] * 40),
)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def test_ids_equal_open_clips(open_clip_tokenizer):
    """The phrases above and 300 drawn from CLIP's own vocabulary (ASCII words: open_clip repairs mojibake first)."""
    tokenizer = offline_clip_tokenizer(TEXT_CONTEXT)
    words = [token.removesuffix("</w>") for token in list(open_clip_tokenizer.encoder)[512:49152] if token.isascii() and token.isalnum()]
    draw = random.Random(0)
    drawn = [" ".join(draw.choice(words) for _ in range(draw.randint(1, 6))) for _ in range(300)]
    for phrase in (*PHRASES, *drawn):
        assert tokenizer(phrase)["input_ids"] == [49406, *open_clip_tokenizer.encode(phrase), 49407], phrase


def test_token_counts_include_start_and_end_and_do_not_truncate(open_clip_tokenizer):
    for phrase in PHRASES:
        assert token_count(phrase) == len(open_clip_tokenizer.encode(phrase)) + 2, phrase
    assert token_count(" ".join(["car"] * 40)) == 42 > TEXT_CONTEXT


def test_building_it_leaves_no_file_behind(tmp_path, monkeypatch):
    """Every actor builds one: a build that wrote its vocabulary to files filled /tmp (1.5 MB each)."""
    offline_clip_tokenizer(TEXT_CONTEXT)  # imports done first: importing torch's compiler sets up its own cache folder
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(tmp_path)
    offline_clip_tokenizer(TEXT_CONTEXT)
    assert list(tmp_path.iterdir()) == []


def test_counting_tokens_loads_neither_torch_nor_open_clip():
    """Mine's pool workers count every phrase's tokens: importing open_clip (and torch with it) cost each about 5 s."""
    probe = "import sys; from sam3_engine.text.concepts import token_count; token_count('a dog'); " + (
        "print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
