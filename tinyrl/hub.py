"""Whether the Hugging Face hub can be reached, asked once per process.

Without it, an offline machine (a Kaggle notebook with internet off, a locked-down cluster) waits 20-45 s of
retries in huggingface_hub for every name it looks up before failing or falling back to the local cache. With
it, tinyrl reads the local cache only (`local_files_only`) and a missing file is one line at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the hub's host (HF_ENDPOINT) does not answer."""
    if any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return not _reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A TCP connection to the endpoint opens within `timeout`. Behind a proxy the answer is yes: only the proxy
    knows what it can reach, and huggingface_hub goes through it."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def local_only(path: str) -> dict:
    """from_pretrained kwargs: read only the local cache when `path` is a hub name and the hub is offline."""
    return {"local_files_only": True} if not os.path.isdir(path) and offline() else {}
