"""Whether the Hugging Face hub can be reached, asked once per process with a 3-second connect.

huggingface_hub retries a request that cannot connect five times with back-off (about 25 s) and logs
each retry; a machine without network then waits and prints a screenful before the one line that
matters. Asking first, and reading only the local cache when the answer is no, gives that line at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def offline_forced() -> bool:
    """HF_HUB_OFFLINE is set (to anything but 0/false/empty)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint ($HF_ENDPOINT, default https://huggingface.co) opens."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def why_offline() -> str | None:
    """None when the hub may be asked, else the reason it is not ("HF_HUB_OFFLINE is set", ...)."""
    if offline_forced():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "the hub cannot be reached (no network?)"
    return None
