"""Hub ids: fail fast (one line) when the hub cannot be used, instead of ~25 s of retries and a traceback.

``HF_TOKEN`` (or ``huggingface-cli login``) is read by huggingface_hub itself for gated and private models;
simdiff never passes or stores a token.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

from simdiff.core.errors import SimdiffError

log = logging.getLogger(__name__)

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES


def datasets_offline() -> bool:
    """``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` is set: datasets come from the cache only."""
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in TRUE_VALUES


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def is_cached(repo_id: str, revision: str | None) -> bool:
    """Whether the hub cache holds this model's ``config.json`` at ``revision``."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the hub endpoint opens within ``timeout`` (assumed true behind a proxy)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    url = urlsplit(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def local_files_only(repo_id: str, revision: str | None) -> bool:
    """True when ``repo_id`` must come from the cache (offline or unreachable hub); an error when it cannot."""
    at = f" at revision {revision!r}" if revision else ""
    if hub_offline():
        if is_cached(repo_id, revision):
            return True
        raise SimdiffError(f"hub model {repo_id!r}{at} is not in the local cache and HF_HUB_OFFLINE is set: "
                           "download it once online, or give a local model directory")
    if hub_reachable():
        return False
    if is_cached(repo_id, revision):
        log.warning("cannot reach %s; using the cached copy of %s", hub_endpoint(), repo_id)
        return True
    raise SimdiffError(f"cannot reach {hub_endpoint()} to download {repo_id!r}{at}, and it is not in the local "
                       "cache: check the network (or proxy), or give a local model directory")
