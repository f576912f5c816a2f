"""Whether the Hugging Face hub can be reached, asked once per process; and what the installed transformers can
do, read from its source.

Without it, an offline machine (a Kaggle notebook with internet off, a locked-down cluster) waits 20-45 s of
retries in huggingface_hub for every name it looks up before failing or falling back to the local cache. With
it, tinyrl reads the local caches only (`local_only`, `switched_off`) and a missing file is one line at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
import threading
import urllib.request
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the hub's host (HF_ENDPOINT) does not answer."""
    if any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return not _reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A TCP connection to the endpoint opens within `timeout`, name lookup included. Where a proxy would carry
    the request (environment or system settings), or the endpoint cannot be parsed, the answer is yes: this
    check only ever saves time, it never blocks a load that could work."""
    try:
        url = urlparse(endpoint)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return True
    if not host or url.scheme not in ("http", "https"):
        return True
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return True
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout).close()
            answer.append(True)
        except (OSError, UnicodeError):
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # one deadline for the lookup and every address tried
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def local_only(path: str) -> dict:
    """from_pretrained kwargs: read only the local cache when `path` is a hub name and the hub is offline."""
    return {"local_files_only": True} if not os.path.isdir(path) and offline() else {}


@contextlib.contextmanager
def switched_off(datasets_module):
    """huggingface_hub and `datasets` in offline mode for the duration: cached datasets load, nothing is asked of
    the network (their own switches are read from the environment only at import)."""
    import huggingface_hub.constants as hub_constants

    flags = [(hub_constants, "HF_HUB_OFFLINE"), (datasets_module.config, "HF_HUB_OFFLINE")]
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, True)
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


def transformers_source(name: str) -> str:
    """The text of a module of the installed transformers (`name` relative to its package folder), or "" (not
    installed, or not where expected). For questions about its behaviour that must not cost an import."""
    try:
        spec = importlib.util.find_spec("transformers")
        folder = spec.submodule_search_locations[0]  # type: ignore[union-attr,index]
        with open(os.path.join(folder, *name.split("/"))) as f:
            return f.read()
    except (AttributeError, ImportError, IndexError, OSError, TypeError, ValueError):
        return ""
