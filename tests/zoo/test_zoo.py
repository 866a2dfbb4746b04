"""Published models by name: download (local HTTP server only), verify, convert once, cache, reuse offline.

The server on 127.0.0.1 serves generated small checkpoints (PCPVT-S, fp16); the real zoo records are
never changed: tests add their own records, reached through TWINS_TIMM_MIRROR, or use plain URLs.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import signal
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import random_state_dict, twins2mmseg
from fresh_python import start_python
from twins_timm import cli, zoo
from twins_timm.convert import convert_checkpoint

from zoo_server import _half, _path, _record, _leftovers
from zoo_server import files, server, cache, seg_record  # noqa: F401 (fixtures)


def test_fetch_by_name_through_mirror_then_offline_with_server_gone(server, cache, seg_record, files, monkeypatch):
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    old = os.umask(0o027)
    try:
        folder = zoo.fetch(seg_record.name)
    finally:
        os.umask(old)
    assert folder == cache / seg_record.name and zoo.cached_path(seg_record.name) == folder
    assert server.handler.hits == {_path(files, 'fpn_pcpvt_s_test-'): 1}   # the mirror, same path
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors',
                                                        'zoo_entry.json']
    entry = json.loads((folder / 'zoo_entry.json').read_text())   # what every later use checks
    weights = (folder / 'model.safetensors').read_bytes()
    assert (entry['size'], entry['sha256']) == (len(weights), hashlib.sha256(weights).hexdigest())
    for p in [folder] + list(folder.iterdir()):   # the umask decides, not the writer (safetensors writes 0600)
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p
    card = (folder / 'README.md').read_text()
    data = files[_path(files, 'fpn_pcpvt_s_test-')]
    for needle in (seg_record.url, hashlib.sha256(data).hexdigest(), '12.34', '23.45', 'apache-2.0', 'ADE20K'):
        assert needle in card, needle
    assert not list(cache.rglob('*.pth')) and not _leftovers(cache)   # the raw file is not kept

    server.stop()   # the second use needs nothing from the network
    monkeypatch.setenv('TWINS_TIMM_MIRROR', 'http://127.0.0.1:9')
    import twins_timm
    model = twins_timm.from_pretrained(seg_record.name)
    expected = convert_checkpoint(torch.load(io.BytesIO(data), weights_only=True)).state_dict
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k].to(expected[k].dtype), expected[k]) for k in expected)
    assert type(model).__name__ == 'TwinsFPN' and model.classes == 150


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_kind_of_spec_through_one_resolver(server, cache, seg_record, files, tmp_path, monkeypatch, hf_cache):
    """A published name, its URL, the checkpoint file, the converted folder and a Hub id holding it: one
    model through twins_timm.from_pretrained, zoo.create_model, the commands' loader and training's."""
    import twins_timm
    from huggingface_hub import constants
    from twins_timm.train.models import build_model
    from twins_timm.zoo.resolve import load_model
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    path = _path(files, 'fpn_pcpvt_s_test-')
    (tmp_path / 'seg.pth').write_bytes(files[path])
    folder = zoo.fetch(seg_record.name)
    hf_cache(tmp_path / 'hub', 'someone/fpn-pcpvt-s', folder)
    reference = twins_timm.from_pretrained(seg_record.name)
    assert type(reference).__name__ == 'TwinsFPN' and reference.classes == 150
    for spec in (server.url(path), str(tmp_path / 'seg.pth'), str(folder), 'someone/fpn-pcpvt-s'):
        assert _same_weights(twins_timm.from_pretrained(spec), reference), spec
    assert zoo.create_model is twins_timm.from_pretrained
    loaded = load_model('someone/fpn-pcpvt-s')   # what segment / eval / export load
    assert not loaded.random_weights and _same_weights(loaded.model, reference)
    trained, source = build_model('someone/fpn-pcpvt-s')
    assert source == loaded.source and _same_weights(trained, reference)
    assert server.handler.hits == {path: 2}   # the name and the URL: each its own cache entry, fetched once

    # HEAD:VARIANT: fresh heads on a (here random) backbone, the same for training and from_pretrained
    torch.manual_seed(3)
    fresh = twins_timm.from_pretrained('fpn:twins_pcpvt_small', classes=4, encoder_weights=None)
    torch.manual_seed(3)
    trained, source = build_model('fpn:twins_pcpvt_small', classes=4, from_scratch=True)
    assert type(fresh).__name__ == 'TwinsFPN' and fresh.classes == 4 and _same_weights(fresh, trained)
    assert source == 'fpn on a random-initialised twins_pcpvt_small backbone'
    assert trained.config['encoder_args']['drop_path_rate'] == 0.2   # the recipe's, kept in training
    assert dict(fresh.config['encoder_args'], drop_path_rate=0.2) == trained.config['encoder_args']  # mmseg's settings


def test_segmenter_commands_refuse_untrained_heads_with_what_to_do(tmp_path, capsys):
    args = ['segment', '--model', 'upernet:twins_svt_small', '--out', str(tmp_path / 'o')]
    assert cli.main(args) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert 'untrained segmenter' in err and 'twins-timm train --model upernet:twins_svt_small' in err
    assert 'Traceback' not in err and not (tmp_path / 'o').exists()
    assert cli.main(['segment', '--model', 'upernet:twins_svt_tiny', '--out', str(tmp_path / 'o')]) == 2
    assert "unknown Twins variant 'twins_svt_tiny'" in capsys.readouterr().err


def test_backbone_by_name_and_keep_raw(server, cache, files, monkeypatch):
    import timm
    rec = _record(files, 'pcpvt_small_test-', 'twins_pcpvt_small.test_mmseg', task='backbone')
    monkeypatch.setitem(zoo.MODELS, rec.name, rec)
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    assert cli.main(['models', '--download', rec.name, '--keep-raw']) == 0
    assert zoo.raw_path(rec.url).is_file()   # kept on request, under its published name
    model = zoo.create_model(rec.name)
    assert isinstance(model, timm.models.VisionTransformer) is False and model.num_classes == 0
    raw = twins2mmseg(_half(random_state_dict('official/pcpvt_small_v0', seed=6)), 'pcpvt')
    assert torch.equal(model.state_dict()['norm.weight'].half(), raw['norm.weight'])
    import twins_timm
    again = twins_timm.from_pretrained(rec.name)   # the same resolver under its public name
    assert type(again) is type(model) and all(torch.equal(v, model.state_dict()[k])
                                              for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match='not a segmentation model.*twins_timm.from_pretrained'):
        from twins_timm.zoo.resolve import load_model
        load_model(rec.name)


def test_url_as_model_segments_and_is_cached(server, cache, files, tmp_path, capsys):
    url = server.url(_path(files, 'fpn_pcpvt_s_test-'))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / 'p.png')
    args = ['segment', str(tmp_path / 'p.png'), '--model', url, '--scale', '64', '48', '--quiet']
    assert cli.main(args + ['--out', str(tmp_path / 'a')]) == 0
    assert cli.main(args + ['--out', str(tmp_path / 'b')]) == 0
    assert server.handler.hits[_path(files, 'fpn_pcpvt_s_test-')] == 1   # the second run used the cache
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob('p*.png')))) for d in 'ab')
    assert np.array_equal(a, b)
    assert zoo.cached_path(url) is not None and 'RANDOM' not in capsys.readouterr().out


def test_plain_url_without_hash_is_downloaded_and_converted(server, cache, files):
    url = server.url('/plain/fpn_pcpvt_s.pth')
    folder = zoo.fetch(url)
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['_model_class'] == 'TwinsFPN' and url in (folder / 'README.md').read_text()


# -------------------------------------------------------------------------------------- failures
def test_hash_mismatch_names_url_and_both_hashes_and_caches_nothing(server, cache, files):
    path = _path(files, '-deadbeef')
    url = server.url(path)
    with pytest.raises(zoo.ChecksumError) as e:
        zoo.fetch(url)
    msg = str(e.value)
    assert url in msg and 'deadbeef' in msg and hashlib.sha256(files[path]).hexdigest() in msg
    assert zoo.cached_path(url) is None and not _leftovers(cache)
    assert cli.main(['segment', '--model', url, '--out', str(cache / 'o')]) == 2


def test_404_is_a_clear_error(server, cache, monkeypatch, capsys):
    url = server.url('/mmsegmentation/v0.5/twins/nothing-12345678.pth')
    with pytest.raises(zoo.ZooError, match='HTTP 404'):
        zoo.fetch(url)
    assert cli.main(['models', '--download', url]) == 2
    err = capsys.readouterr().err
    assert '404' in err and str(zoo.raw_path(url)) in err and 'Traceback' not in err
    assert not _leftovers(cache) and zoo.cached_path(url) is None


def test_server_dying_mid_download_caches_nothing(server, cache, seg_record, files, monkeypatch):
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    for path in (_path(files, 'fpn_pcpvt_s_test-'), '/plain/fpn_pcpvt_s.pth'):
        server.handler.modes[path] = 'die'
    for spec in (seg_record.name, server.url('/plain/fpn_pcpvt_s.pth')):   # with a hash in the name or not
        with pytest.raises(zoo.ZooError, match=r'the connection ended after \d+ of the %d bytes announced'
                           % len(files['/plain/fpn_pcpvt_s.pth'])):
            zoo.fetch(spec)
    assert zoo.cached_path(seg_record.name) is None and not _leftovers(cache)
    assert [p.name for p in cache.iterdir() if not p.name.startswith('.')] == []


def test_killed_download_leaves_nothing_a_later_run_takes(server, cache, files):
    path = _path(files, 'fpn_pcpvt_s_test-')
    url = server.url(path)
    server.handler.modes[path] = 'stall'
    child = start_python(textwrap.dedent('''
        import sys
        from twins_timm import zoo
        zoo.fetch(sys.argv[1], progress=False)
        '''), argv=[url])
    try:
        deadline = time.time() + 120
        while not [p for p in cache.glob('.download-*/*') if p.stat().st_size > 0]:
            assert child.poll() is None and time.time() < deadline, 'the download never started'
            time.sleep(0.2)
        child.kill()  # SIGKILL
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert zoo.cached_path(url) is None and _leftovers(cache)   # only a hidden temporary, named as such
    server.handler.modes[path] = 'ok'
    folder = zoo.fetch(url)                                       # the next run starts over and cleans up
    assert (folder / 'model.safetensors').is_file() and not _leftovers(cache)


def test_offline_and_not_cached_says_how_to_get_it_by_hand(cache, monkeypatch):
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    name = zoo.DEFAULT_SEGMENTER
    with pytest.raises(zoo.ZooError) as e:
        zoo.fetch(name)
    msg, url = str(e.value), zoo.MODELS[name].url
    assert msg.count(url) == 1 and str(zoo.raw_path(url)) in msg and 'TWINS_TIMM_MIRROR' in msg
    assert msg.startswith(name + ': not cached, and offline mode is on') and len(msg) < 700


def test_file_put_by_hand_is_verified_and_converted_offline(cache, seg_record, files, monkeypatch):
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    raw = zoo.raw_path(seg_record.url)
    raw.parent.mkdir(parents=True)
    raw.write_bytes(files[_path(files, 'fpn_pcpvt_s_test-')][:-10])   # damaged: refused
    with pytest.raises(zoo.ChecksumError):
        zoo.fetch(seg_record.name)
    raw.write_bytes(files[_path(files, 'fpn_pcpvt_s_test-')])
    assert (zoo.fetch(seg_record.name) / 'model.safetensors').is_file()


def test_segment_default_offline_falls_back_with_the_command_that_fixes_it(cache, monkeypatch, tmp_path, capsys):
    from twins_timm.zoo import resolve
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    assert resolve.DEFAULT_MODEL_ID == zoo.DEFAULT_SEGMENTER == 'upernet_twins_svt_large.ade20k'
    loaded = resolve.load_model(None)
    assert loaded.random_weights
    notice = capsys.readouterr().err.strip()
    assert notice.endswith('twins-timm models --download upernet_twins_svt_large.ade20k')
    assert '\n' not in notice and len(notice) < 400 and 'http' not in notice and 'offline mode is on' in notice
    with pytest.raises(zoo.ZooError):
        resolve.load_model(zoo.DEFAULT_SEGMENTER)   # asked for by name: no silent random weights


# ------------------------------------------------------------------------------------- the list
def test_zoo_records_are_mmsegs_published_ones():
    """URLs and scores as in mmsegmentation's own metafile / configs (installed wheel), names unique."""
    yaml = pytest.importorskip('yaml')
    mmseg = pytest.importorskip('mmseg')
    root = Path(mmseg.__file__).parent / '.mim' / 'configs'
    published = {m['Weights']: m['Results']['Metrics'] for m in
                 yaml.safe_load((root / 'twins' / 'metafile.yaml').read_text())['Models']}
    configs = '\n'.join(p.read_text() for p in root.rglob('twins*.py'))
    segs = zoo.list_models('upernet') + zoo.list_models('fpn')
    assert len(segs) == 12 and len(zoo.list_models('backbone')) == 6 and len(zoo.list_models('classification')) == 6
    for m in segs:
        assert m.url in published, m.name
        assert (m.miou, m.miou_ms) == (published[m.url]['mIoU'], published[m.url]['mIoU(ms+flip)'])
        assert m.sha256_prefix and m.url.endswith('-%s.pth' % m.sha256_prefix)
        assert m.variant.replace('twins_', '').split('_')[0] in m.url
    for m in zoo.list_models('backbone'):
        assert "'%s'" % m.url in configs, m.name
    best = max(segs, key=lambda m: m.miou)
    assert best.name == zoo.DEFAULT_SEGMENTER and best.miou == 49.65 and 'svt-l_uperhead' in best.url


@pytest.mark.parametrize('name', ['upernet_twins_pcpvt_small.ade20k', 'fpn_twins_svt_small.ade20k',
                                  'twins_svt_small.in1k_mmseg', 'twins_pcpvt_small.in1k'])
def test_listed_parameter_counts(name):
    from twins_timm.convert import family_args, target_shapes
    m = zoo.MODELS[name]
    fmt = {'upernet': 'mmseg', 'fpn': 'mmseg'}.get(m.task, 'timm')
    shapes = target_shapes(m.variant, m.task, m.classes, family_args(fmt, m.variant), aux_head=m.task == 'upernet')
    assert m.params == sum(int(np.prod(s)) for k, s in shapes.items()
                           if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))


def test_models_command_table_and_json(cache, capsys):
    assert cli.main(['models']) == 0
    out = capsys.readouterr().out
    assert 'upernet_twins_svt_large.ade20k' in out and '49.65' in out and '50.63' in out
    assert cli.main(['models', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r['name']: r['url'] for r in rows} == {m.name: m.url for m in zoo.list_models()}
    assert all(r['cached'] is False for r in rows if r['task'] != 'classification')


def test_mirror_replaces_scheme_and_host_only(monkeypatch):
    monkeypatch.setenv('TWINS_TIMM_MIRROR', 'http://10.0.0.5:8080')
    url = zoo.MODELS[zoo.DEFAULT_SEGMENTER].url
    assert zoo.mirrored(url) == 'http://10.0.0.5:8080' + url[len('https://download.openmmlab.com'):]
    monkeypatch.setenv('TWINS_TIMM_MIRROR', 'ftp:/x')
    with pytest.raises(ValueError, match='TWINS_TIMM_MIRROR'):
        zoo.mirrored(url)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv('TWINS_TIMM_CACHE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert zoo.cache_dir() == tmp_path / 'xdg' / 'twins_timm'
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path))
    assert zoo.cache_dir() == tmp_path / '.cache' / 'twins_timm'


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match='did you mean upernet_twins_svt_large.ade20k'):
        zoo.get('upernet_twins_svt_larg.ade20k')


# ------------------------------------------------------------------------------ safety at the seams
def test_damaged_entry_is_fetched_again_online_and_named_offline(server, cache, seg_record, tmp_path, monkeypatch,
                                                                 capsys):
    from twins_timm.zoo import resolve
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    name = seg_record.name
    weights = zoo.fetch(name) / 'model.safetensors'
    good = weights.read_bytes()
    weights.write_bytes(good[:len(good) // 2])                 # truncated
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'x.png')
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--model', name, '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'damaged' in err and 'truncated' in err and 'Traceback' not in err
    assert 'twins-timm models --download %s --force' % name in ' '.join(err.split())
    assert zoo.cached_path(name) is None and not (tmp_path / 'o').exists()

    monkeypatch.delenv('TWINS_TIMM_OFFLINE')                   # online: fetched again, no --force needed
    assert cli.main(['models', '--download', name]) == 0
    assert 'is damaged' in capsys.readouterr().err and weights.read_bytes() == good
    assert sum(server.handler.hits.values()) == 2

    damaged = bytearray(good)                                  # same size, 4 MiB overwritten
    damaged[1 << 20:5 << 20] = bytes(4 << 20)
    weights.write_bytes(bytes(damaged))
    assert zoo.cached_path(name) == weights.parent             # the listing checks sizes only ...
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    with pytest.raises(zoo.DamagedEntry, match='sha256 differs'):   # ... every use the sha256 too
        zoo.fetch(name)
    loaded = resolve.load_model(name, allow_random=True)       # a fallback says how to replace it
    notice = capsys.readouterr().err
    assert loaded.random_weights and notice.strip().endswith('twins-timm models --download %s --force' % name)


def test_kept_raw_file_is_kept_per_url(server, cache, files):
    """The same path on another host is another file: its server is asked, not the kept file reused."""
    path = '/plain/fpn_pcpvt_s.pth'
    url, other = server.url(path), server.url(path).replace('127.0.0.1', 'localhost')
    zoo.fetch(url, keep_raw=True)
    assert zoo.raw_path(url).read_bytes() == files[path] and zoo.raw_path(other) != zoo.raw_path(url)
    server.handler.modes[path] = 'die'
    with pytest.raises(zoo.ZooError, match='connection ended'):
        zoo.fetch(other, keep_raw=True)
    assert server.handler.hits[path] == 2 and zoo.cached_path(other) is None
    kept = zoo.raw_path(url)                                   # a kept file is checked when used again
    kept.write_bytes(files[path][:-1] + b'x')
    with pytest.raises(zoo.ChecksumError, match='the kept file .* is not the file that was published or kept'):
        zoo.fetch(url, force=True)


@pytest.mark.parametrize('path', ['/..', '/', '', '/twins/../x.pth', '/twins/.'])
def test_urls_that_name_no_file_are_refused_before_any_work(cache, tmp_path, capsys, path):
    url = 'http://127.0.0.1:9' + path
    assert cli.main(['models', '--download', url, '--keep-raw']) == 2
    assert cli.main(['segment', '--model', url, '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert err.count('does not name a file') == 2 and 'Traceback' not in err
    assert not cache.exists() and not (tmp_path / 'o').exists()


@pytest.mark.parametrize('mode, reason', [
    ('stall', r'no data for 2 s \(stalled; TWINS_TIMM_DOWNLOAD_TIMEOUT sets the limit\)'),
    ('trickle', r'under 65536 bytes in 2 s \(stalled'),
    ('endless', r'the server sent more than the %d bytes' % (int(4 * (1 << 20) * 1.5) + (16 << 20))),
    ('huge', r'the server announces 1000000000000 bytes, more than the'),
])
def test_downloads_are_bounded_in_time_and_size(server, cache, files, monkeypatch, capsys, mode, reason):
    """The record's size bounds the body (with slack; here a 4 MiB record for the endless one), a window of
    TWINS_TIMM_DOWNLOAD_TIMEOUT seconds without 64 KiB is a stall."""
    rec = _record(files, 'fpn_pcpvt_s_test-', 'fpn_twins_pcpvt_small.bounded', params=1 << 20 if mode == 'endless'
                  else None)
    monkeypatch.setitem(zoo.MODELS, rec.name, rec)
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    server.handler.modes[_path(files, 'fpn_pcpvt_s_test-')] = mode
    assert cli.main(['models', '--download', rec.name]) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert re.search(reason, err) and 'nothing was cached' in err and 'Traceback' not in err, err
    assert zoo.cached_path(rec.name) is None and not _leftovers(cache)


def test_full_disk_is_reported_as_such(server, cache, monkeypatch, capsys):
    from twins_timm.files import download

    class FullDisk(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 1 << 20:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return super().write(data)

    monkeypatch.setattr(download, '_open_output', lambda path: FullDisk())
    assert cli.main(['models', '--download', server.url('/plain/fpn_pcpvt_s.pth')]) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert 'is full (No space left on device)' in err and 'TWINS_TIMM_CACHE' in err and 'internet' not in err
    assert not _leftovers(cache)


def test_two_fetches_of_one_entry_both_succeed(server, cache, capsys):
    """torchrun ranks (or two shells) fetching one entry: one downloads, the other waits and uses it."""
    path = '/plain/fpn_pcpvt_s.pth'
    server.handler.modes[path] = 'slow'
    results, errors = [], []

    def fetch():
        try:
            results.append(zoo.fetch(server.url(path), progress=False))
        except Exception as e:  # noqa: BLE001  reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2 and results[0] == results[1], errors
    assert server.handler.hits[path] == 1 and 'Waiting for another process' in capsys.readouterr().err
    assert (results[0] / 'model.safetensors').is_file() and not _leftovers(cache)


def test_two_processes_fetching_one_entry_both_succeed(server, cache):
    """Two `twins-timm models --download URL` at once (as torchrun's ranks): the second waits for the
    first (its download held until then) and uses its result."""
    path = '/plain/fpn_pcpvt_s.pth'
    server.handler.modes[path] = 'gate'
    env = dict(os.environ, TWINS_TIMM_DOWNLOAD_TIMEOUT='60')   # the held download is no stall
    children = [start_python(module='twins_timm', argv=['models', '--download', server.url(path)], env=env)
                for _ in range(2)]
    try:
        deadline = time.time() + 120
        while not any('Waiting for another process' in c.stderr_so_far() for c in children):
            assert all(c.poll() is None for c in children) and time.time() < deadline, \
                [c.stderr_so_far() for c in children]
            time.sleep(0.2)
        server.handler.gate.set()
        assert [c.wait(120) for c in children] == [0, 0], [c.stderr for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    folder = zoo.folder_for(server.url(path))
    assert [c.stdout for c in children] == ['%s: %s\n' % (server.url(path), folder)] * 2
    assert server.handler.hits[path] == 1 and zoo.cached_path(server.url(path)) == folder


def test_timm_pretrained_offline_fails_at_once_without_the_network(server, cache, tmp_path, monkeypatch, hf_cache):
    """timm.create_model(..., pretrained=True) with TWINS_TIMM_OFFLINE: the local Hugging Face cache or a
    clear error, never the Hub (here a local server that counts requests)."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(constants, 'ENDPOINT', server.root)
    monkeypatch.setenv('HF_ENDPOINT', server.root)
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    with pytest.raises(zoo.ZooError) as e:
        timm.create_model('twins_svt_small', pretrained=True)
    msg = str(e.value)
    assert 'offline mode is on' in msg and 'hf download timm/twins_svt_small.in1k' in msg and len(msg) < 400
    assert server.handler.hits == {}

    src = timm.create_model('twins_svt_small')
    (tmp_path / 'repo').mkdir()
    save_file(src.state_dict(), str(tmp_path / 'repo' / 'model.safetensors'))
    (tmp_path / 'repo' / 'config.json').write_text('{"architecture": "twins_svt_small"}')
    hf_cache(tmp_path / 'hub', 'timm/twins_svt_small.in1k', tmp_path / 'repo')
    model = timm.create_model('twins_svt_small', pretrained=True)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    assert server.handler.hits == {}


def test_hub_download_from_a_stalled_mirror_is_abandoned(server, cache, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('TWINS_TIMM_MIRROR', server.root)
    server.handler.modes['*'] = 'stall'
    assert cli.main(['models', '--download', 'twins_svt_small.in1k']) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert 'from the Hugging Face Hub failed: ' in err and '(stalled; TWINS_TIMM_DOWNLOAD_TIMEOUT' in err, err
    assert 'hf download timm/twins_svt_small.in1k' in err and 'Traceback' not in err
    assert sum(server.handler.hits.values()) >= 1   # the mirror was asked


def test_a_watched_download_may_outlast_the_timeout_while_it_makes_progress(tmp_path, monkeypatch):
    from twins_timm.files.download import DownloadError, run_watched
    monkeypatch.setenv('TWINS_TIMM_DOWNLOAD_TIMEOUT', '1')

    def growing():
        for _ in range(20):   # 2 s or more in all, 128 KiB every 0.1 s
            with open(tmp_path / 'blob.incomplete', 'ab') as f:
                f.write(os.urandom(1 << 17))
            time.sleep(0.1)
        return 'done'

    assert run_watched(growing, tmp_path) == 'done'
    with pytest.raises(DownloadError, match='stalled'):
        run_watched(lambda: time.sleep(30), tmp_path / 'nothing')
    with pytest.raises(KeyError, match='raised by the download'):
        run_watched(lambda: {}['raised by the download'], tmp_path)
