"""What every model wrapper shares, kept free of torch so that the CLI starts fast: the load error and a fast hub check."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


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
