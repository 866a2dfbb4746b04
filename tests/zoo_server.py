"""A local HTTP server standing in for the model hosts (it may stall, trickle or lie), the files it serves (an
mmseg FPN PCPVT-S segmenter and an ImageNet backbone, seeded) and an empty zoo cache: shared by the zoo's tests
and the commands' safety tests. Real URLs and hashes are never changed: test records point at an unreachable
host, reached only through TWINS_TIMM_MIRROR."""
from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from checkpoint_factory import random_state_dict, twins2mmseg, wrap
from twins_timm import zoo

SEG_MANIFEST = 'mmseg/twins_pcpvt-s_fpn_ade20k'
REAL_HOST = 'https://download.example.invalid'   # test records' host: only reachable through the mirror


# ---------------------------------------------------------------------------------- the server
class _Handler(BaseHTTPRequestHandler):
    files: dict = {}       # path -> bytes
    # path -> 'ok' | 'die' (half the body, then the connection closes) | 'stall' (1 MiB, then nothing) |
    # 'trickle' (a byte every 0.1 s) | 'slow' (the body in 10 parts, 0.1 s apart) | 'endless' (no length,
    # zeros until the client hangs up) | 'huge' (announces 1 TB) | 'gate' (the body once ``gate`` is set);
    # modes['*']: every path (a stalled mirror)
    modes: dict = {}
    hits: dict = {}
    release = threading.Event()
    gate = threading.Event()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        path = self.path.split('?')[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        if path not in self.files and '*' not in self.modes:
            self.send_error(404, 'Not Found')
            return
        body, mode = self.files.get(path, bytes(2 << 20)), self.modes.get(path, self.modes.get('*', 'ok'))
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if mode != 'endless':
            self.send_header('Content-Length', str(10 ** 12 if mode == 'huge' else len(body)))
        self.end_headers()
        if mode == 'gate':
            self.gate.wait(60)
            mode = 'ok'
        if mode == 'ok':
            self.wfile.write(body)
            return
        if mode in ('trickle', 'slow', 'endless'):
            self._drip(body, mode)
            return
        self.wfile.write(body[:len(body) // 2] if mode == 'die' else body[:1 << 20])
        self.wfile.flush()
        if mode == 'stall':  # until the test is over (the client is killed meanwhile)
            self.release.wait(60)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client hung up first
            pass

    def _drip(self, body: bytes, mode: str) -> None:
        """Send slowly, or without end; stop when the client hangs up or the test is over."""
        parts = {'trickle': (body[i:i + 1] for i in range(len(body))),
                 'slow': (body[i:i + len(body) // 10 + 1] for i in range(0, len(body), len(body) // 10 + 1)),
                 'endless': iter(lambda: bytes(1 << 16), None)}[mode]
        try:
            for part in parts:
                self.wfile.write(part)
                self.wfile.flush()
                if self.release.wait(0 if mode == 'endless' else 0.1):
                    return
        except OSError:  # the client gave up
            pass


class Server:
    def __init__(self, files):
        handler = type('Handler', (_Handler,), {'files': dict(files), 'modes': {}, 'hits': {},
                                                 'release': threading.Event(), 'gate': threading.Event()})
        self.handler = handler
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.httpd.daemon_threads = True
        self.root = 'http://127.0.0.1:%d' % self.httpd.server_address[1]
        # shutdown() waits for the loop's next poll: 0.5 s by default, on every test's teardown
        threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.02}, daemon=True).start()

    def url(self, path: str) -> str:
        return self.root + path

    def stop(self) -> None:
        self.handler.release.set()
        self.handler.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _named(stem: str, data: bytes) -> str:
    """torch.hub's convention: the first 8 hex digits of the sha256 in the file name."""
    return '%s-%s.pth' % (stem, hashlib.sha256(data).hexdigest()[:8])


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _half(sd):
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope='module')
def files():
    """path -> bytes: an mmseg FPN PCPVT-S segmenter and an mmseg ImageNet backbone (twins2mmseg), fp16."""
    seg_sd = _half(random_state_dict(SEG_MANIFEST, seed=5))
    seg = _to_bytes(wrap(SEG_MANIFEST, seg_sd))
    backbone = _to_bytes(twins2mmseg(_half(random_state_dict('official/pcpvt_small_v0', seed=6)), 'pcpvt'))
    return {
        '/mmsegmentation/v0.5/twins/fpn/' + _named('fpn_pcpvt_s_test', seg): seg,
        '/mmsegmentation/v0.5/pretrain/twins/' + _named('pcpvt_small_test', backbone): backbone,
        '/plain/fpn_pcpvt_s.pth': seg,                                   # a URL without a hash in its name
        '/mmsegmentation/v0.5/twins/fpn/fpn_pcpvt_s_test-deadbeef.pth': seg,   # the wrong hash
    }


def _path(files, stem):
    return next(p for p in files if stem in p)


@pytest.fixture
def server(files):
    s = Server(files)
    yield s
    s.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty zoo cache, online (no offline switches), no mirror."""
    from huggingface_hub import constants
    root = tmp_path / 'zoo_cache'
    monkeypatch.setenv('TWINS_TIMM_CACHE', str(root))
    monkeypatch.setenv('TWINS_TIMM_DOWNLOAD_TIMEOUT', '2')   # every stall a test provokes ends in seconds
    for var in ('TWINS_TIMM_OFFLINE', 'HF_HUB_OFFLINE', 'TWINS_TIMM_MIRROR'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)   # as read at import
    return root


def _record(files, stem, name, task='fpn', params=None, **kw) -> zoo.ZooModel:
    """A test-only zoo record whose URL lives on REAL_HOST (reached through the mirror); ``params`` as a
    float32 file of that size would hold (downloads are bounded by it), by default the file's."""
    variant, path = 'twins_pcpvt_small', _path(files, stem)
    return zoo.ZooModel(name, task, variant, 'ADE20K' if task == 'fpn' else 'ImageNet-1k',
                        150 if task == 'fpn' else 0, REAL_HOST + path, params or len(files[path]) // 4, **kw)


@pytest.fixture
def seg_record(files, monkeypatch):
    rec = _record(files, 'fpn_pcpvt_s_test-', 'fpn_twins_pcpvt_small.test', miou=12.34, miou_ms=23.45)
    assert rec.sha256_prefix and rec.sha256_prefix != 'deadbeef'
    monkeypatch.setitem(zoo.MODELS, rec.name, rec)
    return rec


def _leftovers(root: Path):
    return sorted(p.name for p in root.rglob('*') if '.download-' in p.name or '.partial' in p.name)


# ------------------------------------------------------------------------------------- success
