"""The Hugging Face Hub, the one way: what a Hub id is, when we are offline, the local cache first, and a
bounded download.

Every layer that reads the Hub comes here: timm's ImageNet weights (``twins_timm.models.twins``), the
segmenter loader (``twins_timm.adapters.hub``), the zoo's timm classifiers and the model-spec resolver.
``TWINS_TIMM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: nothing is downloaded, a miss is an error at once;
``TWINS_TIMM_MIRROR=http://host:port`` replaces the Hub's address too.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlsplit

from twins_timm.files.download import DownloadError, run_watched

OFFLINE_SWITCHES = 'TWINS_TIMM_OFFLINE / HF_HUB_OFFLINE'
# huggingface_hub's repo ids: owner/name, letters, digits, '-', '_', '.'; no '..' (a path, not an id)
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')
REACH_TIMEOUT_S = 5.0


class FetchError(OSError):
    """A model could not be fetched (network, server, offline and not cached).

    ``reason`` says why in a few words, ``remedy`` what to do; the message is both."""

    def __init__(self, reason: str, remedy: str = ''):
        super().__init__('%s. %s' % (reason.rstrip('.'), remedy) if remedy else reason)
        self.reason, self.remedy = reason, remedy


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hub repo id (``owner/name``) rather than a local path."""
    return bool(HUB_ID.match(spec)) and '..' not in spec


def offline() -> bool:
    """TWINS_TIMM_OFFLINE or huggingface_hub's offline mode (HF_HUB_OFFLINE, now or when it was imported):
    nothing is downloaded."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or any(os.environ.get(v, '').strip().lower() in ('1', 'true', 'yes', 'on')
                                                for v in ('TWINS_TIMM_OFFLINE', 'HF_HUB_OFFLINE'))


def endpoint() -> Optional[str]:
    """``$TWINS_TIMM_MIRROR`` for the Hub client too (None: its own, HF_ENDPOINT or huggingface.co)."""
    mirror = os.environ.get('TWINS_TIMM_MIRROR', '').strip()
    return mirror.rstrip('/') or None


def manual_steps(repo_id: str, name: Optional[str] = None) -> str:
    """How to get a Hub repo onto an air-gapped machine (``name``: its zoo name, fetched by `twins-timm models`)."""
    also = ', or `twins-timm models --download %s`' % name if name else ''
    return ('Download it once with internet (`hf download %s`%s) and copy the Hugging Face cache here, or set '
            'HF_ENDPOINT to a mirror.' % (repo_id, also))


def cached_file(repo_id: str, filename: str) -> Optional[Path]:
    """``filename`` of ``repo_id`` in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001  an invalid repo id, an unreadable cache: not cached
        return None
    return Path(found) if isinstance(found, str) else None


def cached_snapshot(repo_id: str, filename: str = 'config.json') -> Optional[Path]:
    """The folder of ``repo_id`` in the local Hugging Face cache (one that holds ``filename``), or None."""
    found = cached_file(repo_id, filename)
    return found.parent if found is not None else None


def _check_reachable(url: str, what: str, remedy: str) -> None:
    """One quick connection to the server first: without internet the Hub client retries for ~25 s and
    then says only that the file is not cached."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)),
                                 timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        raise FetchError('%s: not in the local Hugging Face cache, and %s cannot be reached (%s): no internet '
                         'access?' % (what, parts.netloc, e.strerror or e), remedy) from None


def snapshot(repo_id: str, patterns: Sequence[str], what: Optional[str] = None, remedy: Optional[str] = None,
             needs: str = 'config.json') -> Path:
    """The local folder of ``repo_id``: the Hugging Face cache first (a snapshot holding ``needs``); offline,
    a FetchError at once; else one download of the files matching ``patterns``, abandoned when it stalls.

    ``what`` names the model in errors (default: the repo id), ``remedy`` says how to get it by hand."""
    what, remedy = what or repo_id, remedy or manual_steps(repo_id)
    cached = cached_snapshot(repo_id, needs)
    if cached is not None:
        return cached
    if offline():
        raise FetchError('%s: not in the local Hugging Face cache, and offline mode is on (%s)'
                         % (what, OFFLINE_SWITCHES), remedy)
    from huggingface_hub import constants, snapshot_download
    _check_reachable(endpoint() or os.environ.get('HF_ENDPOINT') or constants.ENDPOINT, what, remedy)
    # the Hub client waits forever on a server that trickles: abandoned when its blobs stop growing
    blobs = Path(constants.HF_HUB_CACHE) / ('models--%s' % repo_id.replace('/', '--')) / 'blobs'
    source = ('' if what == repo_id else what + ': ') + 'downloading ' + repo_id
    try:
        return Path(run_watched(lambda: snapshot_download(repo_id, allow_patterns=list(patterns),
                                                          endpoint=endpoint()), blobs))
    except DownloadError as e:
        raise FetchError('%s from the Hugging Face Hub failed: %s' % (source, e), remedy) from None
    except Exception as e:  # noqa: BLE001  huggingface_hub's network errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FetchError('%s from the Hugging Face Hub failed (%s)' % (source, first), remedy) from None
