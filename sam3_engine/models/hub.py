"""What every model wrapper shares, kept free of torch so that the CLI starts fast: the load error, a fast hub check, and the
choice of a Hugging Face checkpoint (or its tiny random stand-in) made once on the driver."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

TINY_RANDOM = "tiny-random"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what failed and what to do."""


def check_hub_reachable(timeout: float = 3.0) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when the hub is unreachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set and the checkpoint is not in the local cache")
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {constants.ENDPOINT}: {exc}") from exc


def cache_only(name: str) -> bool:
    """Whether to load checkpoint ``name`` from the local Hugging Face cache alone (``local_files_only``): the hub
    cannot be reached now. Otherwise the hub client retries every file five times with backoff before it falls back to
    the cache: five minutes for SAM 3's files, in every actor of a cluster without internet access."""
    return name != TINY_RANDOM and not Path(name).is_dir() and hub_unreachable()


def hub_unreachable() -> bool:
    try:
        check_hub_reachable()
    except ConnectionError:
        return True
    return False


@dataclass(frozen=True)
class HubChoice:
    """Which checkpoint a run uses, decided once on the driver before any worker loads it."""

    name: str
    revision: str | None
    fallback_reason: str | None = None
    """Why tiny-random replaced the configured checkpoint, when it did."""

    @property
    def random_weights(self) -> bool:
        return self.name == TINY_RANDOM

    @property
    def label(self) -> str:
        return self.name + (f"@{self.revision}" if self.revision else "")


Choice = TypeVar("Choice", bound=HubChoice)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""What ``save_pretrained`` writes the weights as: one file, or an index of shards."""


def _missing_checkpoint_files(directory: Path) -> str | None:
    """What a local checkpoint lacks, checked before any work: a model actor would otherwise fail on every machine."""
    if not (directory / "config.json").is_file():
        return "config.json"
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        return "weights (" + ", ".join(WEIGHT_FILES) + ")"
    return None


def choose_checkpoint(
    choice: type[Choice],
    name: str,
    revision: str | None,
    fallback_to_tiny_random: bool,
    load_error: Callable[[str, str | None, Exception], ModelLoadError],
) -> Choice:
    """Check that the checkpoint is reachable (its config.json, not its weights); fall back to tiny-random only if asked."""
    if name == TINY_RANDOM:
        return choice(name, revision)
    if Path(name).is_dir():
        missing = _missing_checkpoint_files(Path(name))
        if missing:
            raise load_error(
                name, revision, FileNotFoundError(f"the directory has no {missing}: not a checkpoint saved with save_pretrained")
            )
        return choice(name, revision)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            check_hub_reachable()
            hf_hub_download(name, "config.json", revision=revision)
    except Exception as exc:  # noqa: BLE001 - gated, missing, offline
        if not fallback_to_tiny_random:
            raise load_error(name, revision, exc) from exc
        return choice(TINY_RANDOM, None, fallback_reason=f"{name} is not reachable ({type(exc).__name__})")
    return choice(name, revision)
