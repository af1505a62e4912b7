"""Whether the Hugging Face hub can be reached, asked before a hub dataset is opened.

Offline without ``HF_HUB_OFFLINE``, ``datasets.load_dataset`` goes through huggingface_hub's HTTP
backoff: every request fails with a DNS or connection error, is retried five times with waits of
1, 2, 4, 8 and 8 s and logs two lines per try, so the user reads ~25 s of retry lines before the
error. A failed name lookup or TCP connection to the hub's host is not fixed by waiting: we try
both once, within a few seconds, and fail in one line that names the fixes. Transient errors on a
working network are left to the retries (the hub's own, and ``HFSource``'s around a broken stream).
"""

import os
import socket
import threading
from urllib.parse import urlsplit

LOOKUP_SECONDS = 3.0  # a resolver that does not answer: getaddrinfo has no timeout of its own
CONNECT_SECONDS = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_mode() -> str | None:
    """The environment variable that switches the hub off (``HF_HUB_OFFLINE=1``), or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    try:  # datasets reads the variable once, at import: a caller may have switched it since
        import datasets.config

        return "HF_HUB_OFFLINE" if datasets.config.HF_HUB_OFFLINE else None
    except (ImportError, AttributeError):
        return None


def hub_endpoint() -> str:
    """The hub's URL as datasets uses it (``HF_ENDPOINT`` when set)."""
    try:
        import datasets.config

        return datasets.config.HF_ENDPOINT
    except (ImportError, AttributeError):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def unreachable_reason(endpoint: str) -> str | None:
    """Why ``endpoint``'s host cannot be reached (no name lookup, no TCP connection), or None."""
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    lookup: dict = {}

    def resolve() -> None:
        try:
            lookup["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            lookup["error"] = e

    thread = threading.Thread(target=resolve, daemon=True)  # daemon: a hung lookup must not keep the process
    thread.start()
    thread.join(LOOKUP_SECONDS)
    if "addresses" not in lookup:
        why = lookup.get("error") or f"no answer in {LOOKUP_SECONDS:.0f} s"
        return f"cannot resolve {host} ({why})"
    family, kind, proto, _, address = lookup["addresses"][0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(CONNECT_SECONDS)
            s.connect(address)
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e or type(e).__name__})"
    return None


def check_hub_reachable(dataset: str) -> None:
    """A ValueError naming the fixes when the hub cannot be reached and offline mode is off."""
    if offline_mode():
        return  # datasets reads its cache only, and fails at once when the dataset is not there
    endpoint = hub_endpoint()
    why = unreachable_reason(endpoint)
    if why:
        raise ValueError(
            f"hub dataset {dataset!r}: the hub is unreachable ({why}); connect to the network, or use a "
            "local copy (a file or folder path in data.datasets), or set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
            "to read the dataset from the Hugging Face cache"
        )


def open_error_message(dataset: str, split: str, error: str) -> str:
    """The one line for a hub dataset that ``load_dataset`` could not open (``error``: its first line)."""
    var = offline_mode()
    if var:
        return (f"hub dataset {dataset!r} (split {split!r}) is not in the Hugging Face cache and {var}=1 forbids "
                f"downloading it ({error}); use a local copy (a file or folder path in data.datasets), or unset "
                "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE once to fetch it")
    return (f"hub dataset {dataset!r} (split {split!r}) could not be opened ({error}); check the name "
            "(data.datasets 'hf:<repo>[:<config>]'), or use a local copy (a file or folder path in data.datasets), "
            "or, offline, set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 with the dataset in the Hugging Face cache")
