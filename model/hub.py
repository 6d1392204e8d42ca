"""The Hugging Face hub: whether it can be reached, and `fetch`, the one way a repository's files come in.

huggingface_hub retries a request that cannot connect five times with back-off (about 25 s) and logs
each retry; a machine without network then waits and prints a screenful before the one line that
matters. `fetch` asks first (a 3-second connect, once per process) and reads only the local cache when
the answer is no; whatever goes wrong, gated, missing, not cached, it raises one HubError sentence.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse


class HubError(OSError, RuntimeError):
    """A hub repository or file that cannot be had: str() is one sentence saying which, why and what to do
    instead; `reason` is the sentence without that advice, for a caller that gives its own. An OSError
    and a RuntimeError, what the BERT loader and model loading have always raised."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


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


def hub_command(command: str) -> str:
    """The hub's command line for `command` ("login", "download REPO ...") as the installed huggingface_hub
    spells it: `hf auth login`, `hf download ...` from 0.34 on, `huggingface-cli ...` before (no `hf` then)."""
    import huggingface_hub

    if tuple(int(part) for part in huggingface_hub.__version__.split(".")[:2]) < (0, 34):
        return f"huggingface-cli {command}"
    return "hf auth login" if command == "login" else f"hf {command}"


def _first_line(error: Exception) -> str:
    """'ErrorType: first line of its message' (a library's message may run over several lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def fetch(repo_id: str, *, instead: str, allow_patterns: list[str] | None = None, filename: str | None = None,
          repo_type: str = "model") -> Path:
    """The local folder of a hub repository's files matching `allow_patterns` or, given `filename`, the local
    path of that one file: from the cache, downloaded only when the hub can be reached (HF_HUB_OFFLINE is
    honoured). Raises HubError, one sentence ending with `instead` (what the caller can pass in its place)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    what = f"{repo_id}/{filename}" if filename else repo_id
    kind = "dataset" if repo_type == "dataset" else "model"
    offline = why_offline()   # asked first: huggingface_hub would retry for ~25 s without network
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, local_files_only=offline is not None))
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                                      local_files_only=offline is not None))
    except GatedRepoError:
        page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
        reason = (f"{repo_id} is gated: accept its licence on {page}, then log in with `{hub_command('login')}` "
                  "(or set HF_TOKEN) and run again")
        raise HubError(reason, reason) from None
    except RepositoryNotFoundError:
        reason = f"{kind} {repo_id} was not found on the hub (check the spelling, or log in if it is private)"
        raise HubError(reason, reason) from None
    except LocalEntryNotFoundError:   # not in the local cache, and the hub was not (or could not be) asked
        reason = f"{what} is not in the local cache and {offline or 'the hub could not be reached'}"
        command = hub_command(f"download {repo_id}" + (f" {filename}" if filename else "")
                              + (" --repo-type dataset" if kind == "dataset" else ""))
        raise HubError(f"{reason}: download it on a connected machine (`{command}`) or {instead}", reason) from None
    except EntryNotFoundError:
        reason = f"{kind} {repo_id} has no file {filename!r}"
        raise HubError(f"{reason}; {instead}", reason) from None
    except HFValidationError as e:
        reason = f"{repo_id!r} is not a hub id ({_first_line(e)})"
        raise HubError(f"{reason}; {instead}", reason) from None
    except OSError as e:              # connection errors surface as OSError subclasses
        reason = f"could not download {what} from the hub ({_first_line(e)})"
        raise HubError(f"{reason}; {instead}, or set HF_HUB_OFFLINE=1 to use the cache", reason) from None
