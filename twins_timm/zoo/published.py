"""The published models: their records, the cache of converted folders, and fetching (see ``twins_timm.zoo``)."""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union
from urllib.parse import urlsplit

from twins_timm.files import hub
from twins_timm.files.download import DownloadError, download, is_full_disk
from twins_timm.files.hub import OFFLINE_SWITCHES, FetchError, offline
from twins_timm.files.paths import check_writable_dir
from twins_timm.zoo import cache_entry

MMSEG_ROOT = 'https://download.openmmlab.com/mmsegmentation/v0.5/'
MMSEG_LICENCE = ('apache-2.0 (OpenMMLab mmsegmentation); trained on ImageNet-1k and ADE20K, whose terms of use '
                 'also apply')
TIMM_LICENCE = 'apache-2.0 (timm); trained on ImageNet-1k, whose terms of use also apply'
# the published files hold float32 weights and little else: a body much larger than that is refused
SIZE_SLACK, SIZE_MARGIN = 1.5, 16 << 20
MAX_UNLISTED_BYTES = 4 << 30   # a URL that is no zoo record and whose server announces no length
# torch.hub's convention: the file name ends in -<first hex digits of the file's sha256>.<ext>
HASH_IN_NAME = re.compile(r'-([a-f0-9]{6,64})\.[A-Za-z0-9]+$')
WEIGHTS = 'model.safetensors'


@dataclass(frozen=True)
class ZooModel:
    """One published model: where it is, what it is, what it scored."""
    name: str
    task: str                      # 'upernet' | 'fpn' | 'backbone' | 'classification'
    variant: str                   # twins_{pcpvt,svt}_{small,base,large}
    dataset: str
    classes: int
    url: str                       # the exact published file (or Hub repo)
    params: int                    # parameters in the published weights
    miou: Optional[float] = None           # published single-scale mIoU
    miou_ms: Optional[float] = None        # published multi-scale + flip mIoU
    licence: str = MMSEG_LICENCE
    origin: str = 'mmsegmentation'         # 'mmsegmentation' | 'timm' (Hugging Face Hub)

    @property
    def is_segmenter(self) -> bool:
        return self.task in ('upernet', 'fpn')

    @property
    def hub_repo(self) -> Optional[str]:
        """Hugging Face repo id of Hub-hosted models (timm's classifiers), else None."""
        return self.url.split('huggingface.co/', 1)[1] if self.origin == 'timm' else None

    @property
    def sha256_prefix(self) -> Optional[str]:
        return hash_prefix(self.url)

    @property
    def download_bytes(self) -> int:
        """Approximate download size: float32 weights (the files hold little else)."""
        return 4 * self.params

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(sha256_prefix=self.sha256_prefix, download_bytes=self.download_bytes, is_segmenter=self.is_segmenter)
        return d


def _seg(decoder: str, fam: str, size: str, path: str, miou: float, miou_ms: float, params: int) -> ZooModel:
    return ZooModel('%s_twins_%s_%s.ade20k' % (decoder, fam, size), decoder, 'twins_%s_%s' % (fam, size), 'ADE20K',
                    150, MMSEG_ROOT + 'twins/' + path, params, miou, miou_ms)


def _mmseg_backbone(fam: str, size: str, file: str, params: int) -> ZooModel:
    return ZooModel('twins_%s_%s.in1k_mmseg' % (fam, size), 'backbone', 'twins_%s_%s' % (fam, size), 'ImageNet-1k',
                    0, MMSEG_ROOT + 'pretrain/twins/' + file, params)


def _timm(fam: str, size: str, params: int) -> ZooModel:
    name = 'twins_%s_%s.in1k' % (fam, size)
    return ZooModel(name, 'classification', 'twins_%s_%s' % (fam, size), 'ImageNet-1k', 1000,
                    'https://huggingface.co/timm/' + name, params, licence=TIMM_LICENCE, origin='timm')


# Weights URLs copied from mmsegmentation 1.2.2's configs/twins/metafile.yaml (its SVT-L UPerNet entry is
# misnamed twins_pcpvt-l_uperhead...; the URL is SVT-L's) and configs/twins/*.py (`checkpoint = ...`).
# Parameters: counted on the converted model (UPerNet includes the auxiliary head, backbones the final norm).
MODELS: Dict[str, ZooModel] = {m.name: m for m in (
    _seg('fpn', 'pcpvt', 'small', 'twins_pcpvt-s_fpn_fpnhead_8x4_512x512_80k_ade20k/'
         'twins_pcpvt-s_fpn_fpnhead_8x4_512x512_80k_ade20k_20211201_204132-41acd132.pth', 43.26, 44.11, 27858838),
    _seg('upernet', 'pcpvt', 'small', 'twins_pcpvt-s_uperhead_8x4_512x512_160k_ade20k/'
         'twins_pcpvt-s_uperhead_8x4_512x512_160k_ade20k_20211201_233537-8e99c07a.pth', 46.04, 46.92, 54080044),
    _seg('fpn', 'pcpvt', 'base', 'twins_pcpvt-b_fpn_fpnhead_8x4_512x512_80k_ade20k/'
         'twins_pcpvt-b_fpn_fpnhead_8x4_512x512_80k_ade20k_20211130_141019-d396db72.pth', 45.66, 46.48, 47581078),
    _seg('upernet', 'pcpvt', 'base', 'twins_pcpvt-b_uperhead_8x2_512x512_160k_ade20k/'
         'twins_pcpvt-b_uperhead_8x2_512x512_160k_ade20k_20211130_141020-02094ea5.pth', 47.91, 48.64, 73802284),
    _seg('fpn', 'pcpvt', 'large', 'twins_pcpvt-l_fpn_fpnhead_8x4_512x512_80k_ade20k/'
         'twins_pcpvt-l_fpn_fpnhead_8x4_512x512_80k_ade20k_20211201_105226-bc6d61dc.pth', 45.94, 46.70, 64742294),
    _seg('upernet', 'pcpvt', 'large', 'twins_pcpvt-l_uperhead_8x2_512x512_160k_ade20k/'
         'twins_pcpvt-l_uperhead_8x2_512x512_160k_ade20k_20211201_075053-c6095c07.pth', 49.35, 50.08, 90963500),
    _seg('fpn', 'svt', 'small', 'twins_svt-s_fpn_fpnhead_8x4_512x512_80k_ade20k/'
         'twins_svt-s_fpn_fpnhead_8x4_512x512_80k_ade20k_20211130_141006-0a0d3317.pth', 44.47, 45.42, 27798934),
    _seg('upernet', 'svt', 'small', 'twins_svt-s_uperhead_8x2_512x512_160k_ade20k/'
         'twins_svt-s_uperhead_8x2_512x512_160k_ade20k_20211130_141005-e48a2d94.pth', 46.08, 46.96, 53856300),
    _seg('fpn', 'svt', 'base', 'twins_svt-b_fpn_fpnhead_8x4_512x512_80k_ade20k/'
         'twins_svt-b_fpn_fpnhead_8x4_512x512_80k_ade20k_20211201_113849-88b2907c.pth', 46.77, 47.47, 59676438),
    _seg('upernet', 'svt', 'base', 'twins_svt-b_uperhead_8x2_512x512_160k_ade20k/'
         'twins_svt-b_uperhead_8x2_512x512_160k_ade20k_20211202_040826-0943a1f1.pth', 48.04, 48.87, 87724460),
    _seg('fpn', 'svt', 'large', 'twins_svt-l_fpn_fpnhead_8x4_512x512_80k_ade20k/'
         'twins_svt-l_fpn_fpnhead_8x4_512x512_80k_ade20k_20211130_141005-1d59bee2.pth', 46.55, 47.74, 102744214),
    _seg('upernet', 'svt', 'large', 'twins_svt-l_uperhead_8x2_512x512_160k_ade20k/'
         'twins_svt-l_uperhead_8x2_512x512_160k_ade20k_20211130_141005-3e2cae61.pth', 49.65, 50.63, 132782892),
    _mmseg_backbone('pcpvt', 'small', 'pcpvt_small_20220308-e638c41c.pth', 23593216),
    _mmseg_backbone('pcpvt', 'base', 'pcpvt_base_20220308-0621964c.pth', 43315456),
    _mmseg_backbone('pcpvt', 'large', 'pcpvt_large_20220308-37579dc6.pth', 60476672),
    _mmseg_backbone('svt', 'small', 'alt_gvt_small_20220308-7e1c3695.pth', 23547776),
    _mmseg_backbone('svt', 'base', 'alt_gvt_base_20220308-1b7eb711.pth', 55301952),
    _mmseg_backbone('svt', 'large', 'alt_gvt_large_20220308-fb5936f3.pth', 98246400),
    _timm('pcpvt', 'small', 24106216),
    _timm('pcpvt', 'base', 43828456),
    _timm('pcpvt', 'large', 60989672),
    _timm('svt', 'small', 24060776),
    _timm('svt', 'base', 56070952),
    _timm('svt', 'large', 99271400),
)}

# The best published ADE20K model: what `twins-timm segment` uses without --model.
DEFAULT_SEGMENTER = 'upernet_twins_svt_large.ade20k'


# A published model could not be fetched: the error of every fetch (twins_timm.files.hub), by its zoo name.
ZooError = FetchError


class DamagedEntry(ZooError):
    """A cached converted folder failed its check and cannot be fetched again now (offline)."""


class ChecksumError(ValueError):
    """A download does not match the sha256 its published file name carries."""


# ------------------------------------------------------------------------------------- lookup
def list_models(task: Optional[str] = None) -> List[ZooModel]:
    return [m for m in MODELS.values() if task is None or m.task == task]


def is_url(spec: Union[str, os.PathLike]) -> bool:
    return isinstance(spec, str) and spec.lower().startswith(('http://', 'https://'))


def get(name: str) -> ZooModel:
    """The record of a published model; a ValueError naming close matches otherwise."""
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
    raise ValueError('%r is not a published model name%s; `twins-timm models` lists them all'
                     % (name, ' (did you mean %s?)' % ', '.join(close) if close else ''))


def check_url(url: str) -> None:
    """Refuse, before any work, an http(s) URL that does not name a file (no host, ``/``, ``..``)."""
    parts = urlsplit(url)
    segments = parts.path.split('/')
    if not parts.hostname or segments[-1] in ('', '.') or '..' in segments:
        raise ValueError('%s does not name a file: a model URL is http(s)://host/path/FILE, e.g. '
                         'https://example.org/models/twins_svt-s_fpn-0a0d3317.pth' % url)


def hash_prefix(url: str) -> Optional[str]:
    """The sha256 prefix a published file name carries (torch.hub's ``NAME-<hex>.pth``), else None."""
    m = HASH_IN_NAME.search(urlsplit(url).path)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------ locations
def cache_dir() -> Path:
    """``$TWINS_TIMM_CACHE``, else ``$XDG_CACHE_HOME/twins_timm``, else ``~/.cache/twins_timm``."""
    if os.environ.get('TWINS_TIMM_CACHE'):
        return Path(os.environ['TWINS_TIMM_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
    return Path(base).expanduser() / 'twins_timm'


def mirrored(url: str) -> str:
    """``url`` with scheme and host replaced by ``$TWINS_TIMM_MIRROR`` (path kept), if it is set."""
    mirror = os.environ.get('TWINS_TIMM_MIRROR', '').strip()
    if not mirror:
        return url
    m, u = urlsplit(mirror), urlsplit(url)
    if m.scheme not in ('http', 'https') or not m.netloc:
        raise ValueError('TWINS_TIMM_MIRROR=%r is not an http(s)://host[:port] address' % mirror)
    return '%s://%s%s%s' % (m.scheme, m.netloc, m.path.rstrip('/'), u.path + ('?' + u.query if u.query else ''))


def _url_folder_name(url: str) -> str:
    stem = re.sub(r'[^\w.-]+', '_', Path(urlsplit(url).path).stem)[:80] or 'checkpoint'
    return 'url/%s-%s' % (stem, hashlib.sha256(url.encode()).hexdigest()[:8])


def folder_for(spec: str) -> Path:
    """Where the converted folder of a zoo name or URL lives (whether or not it is there yet)."""
    return cache_dir() / (_url_folder_name(spec) if is_url(spec) else get(spec).name)


def cached_path(spec: str) -> Optional[Path]:
    """The local folder of ``spec`` (zoo name or URL) if it is cached and whole (its size checked; ``fetch``
    also checks its sha256), else None."""
    if not is_url(spec) and get(spec).origin == 'timm':
        return hub.cached_snapshot(get(spec).hub_repo, WEIGHTS)
    folder = folder_for(spec)
    return folder if folder.is_dir() and cache_entry.problem(folder, WEIGHTS, full=False) is None else None


def raw_path(url: str) -> Path:
    """Where a raw published file is kept (``keep_raw``) or may be put by hand for offline use: a folder
    per URL, so files of the same name from other addresses are never taken for it."""
    return cache_dir() / 'downloads' / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(urlsplit(url).path).name


def manual_steps(spec: str) -> str:
    """How to get the weights by hand (for air-gapped machines), in a sentence or two."""
    if not is_url(spec) and get(spec).origin == 'timm':
        return hub.manual_steps(get(spec).hub_repo, spec)
    url = spec if is_url(spec) else get(spec).url
    return ('Download %s by hand and put it at %s (it is verified and converted on first use), or serve it from a '
            'mirror: TWINS_TIMM_MIRROR=http://host:port.' % ('it' if is_url(spec) else url, raw_path(url)))


# ------------------------------------------------------------------------------------- fetching
def fetch(spec: str, progress: Optional[bool] = None, keep_raw: bool = False, force: bool = False) -> Path:
    """The converted local folder of a zoo name or an http(s) URL: cached and checked, or downloaded and
    converted now.

    Raises ZooError (network / offline and not cached; DamagedEntry: a damaged entry, offline),
    ChecksumError (the file is not the published one), ValueError for a URL that names no file, and the
    converter's errors for a file that is not a supported Twins checkpoint; nothing is cached then.
    """
    record = None if is_url(spec) else get(spec)
    if record is not None and record.origin == 'timm':
        return hub.snapshot(record.hub_repo, ['config.json', WEIGHTS], record.name, manual_steps(record.name),
                            needs=WEIGHTS)
    if record is None:
        check_url(spec)
    try:
        return _fetch_file(spec, record, sys.stderr.isatty() if progress is None else progress, keep_raw, force)
    except ZooError as e:
        raise type(e)(e.reason if spec in e.reason else '%s: %s' % (spec, e.reason), e.remedy) from None


def _fetch_file(spec: str, record: Optional[ZooModel], progress: bool, keep_raw: bool, force: bool) -> Path:
    folder = folder_for(spec)
    if not force and folder.is_dir() and cache_entry.problem(folder, WEIGHTS) is None:
        return folder
    root = cache_dir()
    # before hundreds of MB are downloaded: a probe file, which also holds for root and read-only mounts
    check_writable_dir(root, 'the model cache (TWINS_TIMM_CACHE moves it)')
    root.mkdir(parents=True, exist_ok=True)
    waiting = lambda: print('Waiting for another process that is fetching %s ...' % spec, file=sys.stderr)  # noqa: E731
    with cache_entry.locked(root, str(folder.relative_to(root)), waiting):
        damage = cache_entry.problem(folder, WEIGHTS) if folder.is_dir() else None
        if not force and folder.is_dir() and damage is None:
            return folder   # whole, or just completed by the process we waited for
        url = spec if record is None else record.url
        if damage and not force:
            if offline() and not raw_path(url).is_file():
                raise DamagedEntry('the cached copy at %s is damaged (%s)' % (folder, damage),
                                   'Fetch it again with internet access: twins-timm models --download %s --force'
                                   % spec)
            print('The cached copy of %s at %s is damaged (%s); fetching it again.' % (spec, folder, damage),
                  file=sys.stderr)
        _fill(folder, url, record, progress, keep_raw)
    return folder


def _fill(folder: Path, url: str, record: Optional[ZooModel], progress: bool, keep_raw: bool) -> None:
    """Download (or take the kept raw file), verify and convert ``url`` into ``folder``."""
    root = cache_dir()
    _remove_stale_downloads(root)
    work = Path(tempfile.mkdtemp(prefix='.download-%d-' % os.getpid(), dir=root))
    try:
        kept, kept_sha = raw_path(url), _kept_sha256(url)
        if kept.is_file():
            raw = kept   # kept by us (its sha256 beside it) or put there by hand (the name's prefix, if any)
            _check_hash(raw, kept_sha.read_text().strip() if kept_sha.is_file() else hash_prefix(url),
                        'the kept file %s' % raw)
        else:
            raw = work / kept.name
            digest = _download(url, raw, record, progress)
        _convert(raw, work / 'entry', url, record, progress)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists() or folder.is_symlink():
            os.replace(folder, work / 'replaced')   # our own earlier entry: removed with the work folder
        os.replace(work / 'entry', folder)
        if keep_raw and raw != kept:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept_sha.write_text(digest + '\n')
            os.replace(raw, kept)
    except OSError as e:
        if not is_full_disk(e):
            raise
        raise ZooError('the disk holding the model cache %s is full (%s); nothing was cached' % (root, e.strerror),
                       'Free some space, or move the cache to a larger disk with TWINS_TIMM_CACHE') from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kept_sha256(url: str) -> Path:
    """The sha256 of a raw file kept with ``keep_raw``, checked whenever it is used again."""
    kept = raw_path(url)
    return kept.with_name(kept.name + '.sha256')


def _size_limit(record: Optional[ZooModel]) -> int:
    return int(record.download_bytes * SIZE_SLACK) + SIZE_MARGIN if record is not None else MAX_UNLISTED_BYTES


def _download(url: str, dst: Path, record: Optional[ZooModel], progress: bool) -> str:
    """Download ``url`` (through the mirror, if set) into ``dst``; its sha256."""
    source = mirrored(url)
    manual = manual_steps(url if record is None else record.name)
    if offline():
        raise ZooError('not cached, and offline mode is on (%s)' % OFFLINE_SWITCHES, manual)
    if progress:
        print('Downloading %s' % source, file=sys.stderr)
    try:
        digest = download(source, dst, _size_limit(record), progress)
    except urllib.error.HTTPError as e:
        raise ZooError('downloading %s failed: HTTP %d %s' % (source, e.code, e.reason),
                       'Check the address%s. %s' % (' and TWINS_TIMM_MIRROR' if source != url else '', manual)
                       ) from None
    except DownloadError as e:
        raise ZooError('downloading %s failed: %s; nothing was cached' % (source, e), 'Retry. ' + manual) from None
    except OSError as e:
        if is_full_disk(e):
            raise
        reason = getattr(e, 'reason', None) or e
        raise ZooError('downloading %s failed (%s): no internet access, or the server is down; nothing was cached'
                       % (source, reason), 'Retry with internet. ' + manual) from None
    expected = hash_prefix(url)
    if expected and not digest.startswith(expected):
        raise ChecksumError('the file downloaded from %s is not the published one: its sha256 is %s, but the file '
                            'name promises one starting with %s (a changed file or a bad mirror). Nothing was '
                            'cached; retry, or fetch it by hand from %s' % (source, digest, expected, url))
    return digest


def _check_hash(path: Path, expected: Optional[str], what: str) -> None:
    if not expected:
        return
    from twins_timm.files.checkpoint import sha256_file
    digest = sha256_file(path)
    if not digest.startswith(expected):
        raise ChecksumError('%s is not the file that was published or kept: its sha256 is %s, expected %s. Delete '
                            'it and fetch it again' % (what, digest, expected + ('...' if len(expected) < 64 else '')))


def _convert(raw: Path, dst: Path, url: str, record: Optional[ZooModel], progress: bool) -> None:
    """Convert ``raw`` into the new folder ``dst`` and record its weights' size and sha256 there."""
    from twins_timm.convert import convert_checkpoint, save

    res = convert_checkpoint(raw, progress=progress)
    if record is not None and (res.variant, res.task) != (record.variant, record.task):
        raise ValueError('%s holds a %s %s, but %s is listed as a %s %s; the zoo record is wrong, please report it'
                         % (url, res.variant, res.task, record.name, record.variant, record.task))
    card: Dict[str, Any] = {'source_url': url}
    if record is not None:
        card.update(name=record.name, dataset=record.dataset, licence=record.licence)
        if record.miou is not None:
            card['metrics'] = {'mIoU (single scale)': record.miou, 'mIoU (multi-scale + flip)': record.miou_ms}
    info = save(res, dst, card=card)
    cache_entry.write_record(dst, info.weights.name, url, info.sha256)


def _remove_stale_downloads(root: Path) -> None:
    """Temporary download folders of killed processes (never taken for good files: removed here)."""
    from twins_timm.files.atomic import pid_alive
    for p in root.glob('.download-*-*'):
        m = re.match(r'^\.download-(\d+)-', p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


