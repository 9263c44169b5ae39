"""How long a SAM 3 checkpoint already in the Hugging Face cache takes to load when the hub cannot be reached.

The case of every model actor on a cluster without internet access: the checkpoint (tiny-random's
config and weights, saved as the hub client caches a download) is in a fresh cache, the hub endpoint
refuses connections, HF_HUB_OFFLINE is not set.

    python benchmarks/offline_cache_load.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

PROBE = """
import time
from pathlib import Path
from huggingface_hub import constants
from transformers.models.sam3 import Sam3Model, Sam3Processor
from sam3_engine.models.sam3 import ModelChoice, Sam3Segmenter, load_image_processor, tiny_random_config

commit = "0" * 40
folder = Path(constants.HF_HUB_CACHE) / "models--cached--sam3"
(folder / "refs").mkdir(parents=True)
(folder / "refs" / "main").write_text(commit)
Sam3Model(tiny_random_config()).save_pretrained(folder / "snapshots" / commit)
tokenizer = Sam3Segmenter.load("tiny-random").processor.tokenizer
image_processor = load_image_processor(ModelChoice("tiny-random", None))
Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "snapshots" / commit)
started = time.perf_counter()
Sam3Segmenter.load("cached/sam3", device="cpu")
print(time.perf_counter() - started)
"""


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HF_HOME": home, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    retries = done.stderr.count("Retrying in")
    print(json.dumps({"load_seconds": round(float(done.stdout.split()[-1]), 1), "hub_retries_logged": retries}))


if __name__ == "__main__":
    main()
