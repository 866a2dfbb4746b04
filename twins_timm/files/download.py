"""One HTTP download with bounds: size, stalls, the announced length, a full disk -- each a clear error.

torch.hub's downloader waits forever on a server that trickles or stalls, writes an endless body until
the disk is full and accepts a body shorter than its Content-Length; this loop around urllib does not.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar
from urllib.request import Request, urlopen

from tqdm import tqdm

from twins_timm.files.disk import DISK_FULL_ERRNOS

TIMEOUT_ENV = 'TWINS_TIMM_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT_S = 60.0
# A window of TIMEOUT seconds that brings less than this is a stall too: a server sending a byte now and
# then would otherwise never time out.
MIN_BYTES_PER_WINDOW = 64 * 1024
CHUNK = 1 << 20
POLL_S = 0.2
T = TypeVar('T')


class DownloadError(OSError):
    """The transfer failed (stalled, too large, cut short); the message says how, in a few words."""


def stall_timeout() -> float:
    """Seconds without progress after which a download is abandoned: $TWINS_TIMM_DOWNLOAD_TIMEOUT or 60."""
    raw = os.environ.get(TIMEOUT_ENV, '').strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError('%s=%r is not a number of seconds above 0' % (TIMEOUT_ENV, raw))
    return value


class StallWatch:
    """Progress counted in windows of ``stall_timeout()`` seconds: a window that brings less than
    MIN_BYTES_PER_WINDOW is a stall (DownloadError)."""

    def __init__(self) -> None:
        self.timeout = stall_timeout()
        self._start, self._bytes = time.monotonic(), 0

    def add(self, n: int) -> None:
        self._bytes += n
        if time.monotonic() - self._start >= self.timeout:
            if self._bytes < MIN_BYTES_PER_WINDOW:
                raise DownloadError('under %d bytes in %g s (stalled; %s sets the limit)'
                                    % (MIN_BYTES_PER_WINDOW, self.timeout, TIMEOUT_ENV))
            self._start, self._bytes = time.monotonic(), 0


def is_full_disk(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def _open_output(path: Path) -> BinaryIO:
    return open(path, 'xb')


def download(url: str, dst: Path, max_bytes: int, progress: bool = False) -> str:
    """Write the body at ``url`` to the new file ``dst``; return its sha256 (hex).

    Raises DownloadError when no progress is made for ``stall_timeout()`` seconds, when the body is (or is
    announced as) larger than ``max_bytes``, or ends before its Content-Length; urllib's HTTPError /
    URLError for the request itself; OSError with ENOSPC / EDQUOT for a full disk.
    """
    watch = StallWatch()
    with urlopen(Request(url, headers={'User-Agent': 'twins-timm'}), timeout=watch.timeout) as response:
        announced = response.headers.get('Content-Length')
        announced = int(announced) if announced and announced.isdigit() else None
        if announced is not None and announced > max_bytes:
            raise DownloadError('the server announces %d bytes, more than the %d this file can be' % (announced,
                                                                                                      max_bytes))
        digest, total = hashlib.sha256(), 0
        with _open_output(dst) as out, tqdm(total=announced, unit='B', unit_scale=True, unit_divisor=1024,
                                            disable=not progress, file=sys.stderr) as bar:
            while True:
                try:
                    chunk = response.read1(CHUNK)
                except socket.timeout:
                    raise DownloadError('no data for %g s (stalled; %s sets the limit)' % (watch.timeout,
                                                                                         TIMEOUT_ENV)) from None
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise DownloadError('the server sent more than the %d bytes this file can be' % max_bytes)
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
                watch.add(len(chunk))
    if announced is not None and total != announced:
        raise DownloadError('the connection ended after %d of the %d bytes announced' % (total, announced))
    return digest.hexdigest()


def run_watched(fn: Callable[[], T], folder: Path) -> T:
    """``fn()`` (a download by another client) in a thread, abandoned with a DownloadError when the files
    in ``folder`` stop growing (StallWatch); its own errors are raised here."""
    result: dict = {}
    watch = StallWatch()   # a bad TWINS_TIMM_DOWNLOAD_TIMEOUT is refused before the download starts

    def run() -> None:
        try:
            result['value'] = fn()
        except BaseException as e:  # noqa: BLE001  handed to the caller
            result['error'] = e

    thread = threading.Thread(target=run, name='twins-timm download', daemon=True)
    thread.start()
    size = _folder_bytes(folder)
    while thread.is_alive():
        thread.join(POLL_S)
        now = _folder_bytes(folder)
        watch.add(max(0, now - size))
        size = now
    if 'error' in result:
        raise result['error']
    return result['value']


def _folder_bytes(folder: Path) -> int:
    """Bytes written to the files in ``folder``: blocks where the OS counts them, so that a file made
    full-size at once and then filled (sparse) still shows its progress."""
    total = 0
    for p in folder.glob('*') if folder.is_dir() else ():
        try:
            st = p.stat()
        except OSError:  # renamed meanwhile
            continue
        blocks = getattr(st, 'st_blocks', None)
        total += st.st_size if blocks is None else blocks * 512
    return total
