"""Loading the wrong kind of model says what it is and what to do; every written file honours the umask."""
from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import write_checkpoint
from twins_timm import cli


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _modes(folder):
    return {p.name: p.stat().st_mode & 0o777 for p in [folder] + sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def classifier_ckpt(tmp_path_factory):
    return write_checkpoint('official/pcpvt_small_v0', tmp_path_factory.mktemp('ckpt') / 'pcpvt_small.pth')


@pytest.fixture(scope='module')
def segmenter_folder(tmp_path_factory):
    from twins_timm.adapters import TwinsFPN
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('seg') / 'fpn'
    TwinsFPN(encoder_name='twins_pcpvt_small', classes=4, decoder_pyramid_channels=16, decoder_segmentation_channels=16).save_pretrained(str(folder))
    return folder


def test_every_convert_output_honours_the_umask(classifier_ckpt, tmp_path, umask_027):
    out = tmp_path / 'cls'
    assert cli.main(['convert', str(classifier_ckpt), str(out), '--no-parity']) == 0
    assert _modes(out) == {'cls': 0o750, 'README.md': 0o640, 'config.json': 0o640, 'model.safetensors': 0o640}
    assert cli.main(['convert', str(classifier_ckpt), str(tmp_path / 'b.safetensors'), '--drop', 'head']) == 0
    assert cli.main(['convert', str(out), str(tmp_path / 'm.pth'), '--to', 'mmseg', '--drop', 'head,norm']) == 0
    for name in ('b.safetensors', 'm.pth'):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_save_pretrained_honours_the_umask(tmp_path, umask_027):
    from twins_timm.adapters import TwinsFPN
    model = TwinsFPN(encoder_name='twins_pcpvt_small', classes=3, decoder_pyramid_channels=16, decoder_segmentation_channels=16)
    model.save_pretrained(str(tmp_path / 'seg'))
    modes = _modes(tmp_path / 'seg')
    assert modes['model.safetensors'] == modes['config.json'] == modes['README.md'] == 0o640


def test_classifier_or_backbone_folder_given_to_segment_says_what_it_is(classifier_ckpt, tmp_path, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'p.png')
    cls_dir, bb_dir = tmp_path / 'cls', tmp_path / 'bb'
    assert cli.main(['convert', str(classifier_ckpt), str(cls_dir), '--no-parity']) == 0
    assert cli.main(['convert', str(classifier_ckpt), str(bb_dir), '--drop', 'head', '--no-parity']) == 0
    capsys.readouterr()
    for folder, what in ((cls_dir, 'ImageNet classifier (1000 classes)'), (bb_dir, 'backbone without a classifier')):
        assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', str(folder), '--out', str(tmp_path / 'o')]) == 2
        err = ' '.join(capsys.readouterr().err.split())
        assert what in err and "timm.create_model('local-dir:" in err and 'upernet_twins_svt_large.ade20k' in err
        assert 'Traceback' not in err
    # a classification checkpoint file says the same kind of thing
    assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', str(classifier_ckpt),
                     '--out', str(tmp_path / 'o')]) == 2
    assert 'not a segmentation model' in capsys.readouterr().err


def test_timm_local_dir_of_a_segmenter_says_it_is_one(segmenter_folder):
    import timm

    import twins_timm  # noqa: F401
    with pytest.raises(ValueError, match='holds a twins_timm segmenter.*from_pretrained'):
        timm.create_model('local-dir:%s' % segmenter_folder, pretrained=True)
    from twins_timm.adapters import from_pretrained
    assert type(from_pretrained(str(segmenter_folder))).__name__ == 'TwinsFPN'   # the extra keys do not disturb SMP


def test_from_pretrained_missing_folder_and_unknown_name(monkeypatch):
    """The resolver answers at once, with close names; the adapters' loader (folders and Hub ids only) points
    at it for what it does not take."""
    import twins_timm
    from twins_timm.adapters import from_pretrained
    from twins_timm.adapters import hub as adapters_hub

    def no_network(*a, **k):
        raise AssertionError('the Hub must not be asked')

    monkeypatch.setattr(adapters_hub, 'hf_hub_download', no_network)
    monkeypatch.setattr('huggingface_hub.snapshot_download', no_network)
    with pytest.raises(FileNotFoundError, match=r'\./nope does not exist'):
        twins_timm.from_pretrained('./nope')
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match='nope does not exist.*published model name'):
        twins_timm.from_pretrained('nope')
    assert time.monotonic() - t0 < 5   # an answer, not 23 s of retries (generous bound: not a timing test)
    with pytest.raises(FileNotFoundError, match='did you mean upernet_twins_svt_large.ade20k'):
        twins_timm.from_pretrained('upernet_twins_svt_large')
    for spec in ('upernet_twins_svt_large.ade20k', 'https://example.org/m-0a0d3317.pth', './nope'):
        with pytest.raises(FileNotFoundError, match=r"use twins_timm\.from_pretrained\('%s'\)" % re.escape(spec)):
            from_pretrained(spec)


def test_hub_id_offline_never_touches_the_network(monkeypatch):
    """TWINS_TIMM_OFFLINE=1: a Hub repo id not in the local cache fails at once, with no connection tried."""
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError

    from twins_timm.adapters import from_pretrained

    def no_network(*args, **kwargs):
        raise AssertionError('a connection was attempted offline')

    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    with pytest.raises(LocalEntryNotFoundError):
        from_pretrained('twins-timm-tests/not-cached-anywhere')


@pytest.mark.parametrize('spec, hub_id', [('someone/model', True), ('some.one/model-v1.2', True),
                                          ('./someone/model', False), ('someone/../model', False),
                                          ('a/b/c', False), ('some one/model', False),
                                          ('upernet:twins_svt_small', False), ('/abs/path', False)])
def test_one_hub_id_rule(spec, hub_id, tmp_path, capsys, monkeypatch):
    """What reads as owner/name goes to the Hub (offline: the local cache, then the one offline error), the
    rest is a local path, the same in the adapters' loader, the resolver and the commands."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from twins_timm.adapters import from_pretrained
    from twins_timm.files.hub import is_hub_id
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    assert is_hub_id(spec) == hub_id
    if spec.startswith('upernet:'):
        return   # HEAD:VARIANT: the resolver's own case (test_zoo)
    with pytest.raises(LocalEntryNotFoundError if hub_id else FileNotFoundError):
        from_pretrained(spec)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'p.png')
    assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', spec, '--out', str(tmp_path / 'o')]) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert ('not in the local Hugging Face cache' in err) == hub_id and ('does not exist' in err) == (not hub_id)
    assert 'Traceback' not in err


def test_one_offline_rule_never_connects(tmp_path, monkeypatch, capsys):
    """TWINS_TIMM_OFFLINE=1: a Hub id, timm's ImageNet weights (timm, an SMP encoder, HEAD:VARIANT) and a
    published name each fail at once with the same offline error and the step that fixes it; no connection."""
    import socket

    import timm
    from huggingface_hub import constants

    import twins_timm
    from twins_timm.adapters import TwinsUPerNet
    from twins_timm.files.hub import OFFLINE_SWITCHES, FetchError

    def no_network(*args, **kwargs):
        raise AssertionError('a connection was attempted offline')

    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('TWINS_TIMM_CACHE', str(tmp_path / 'zoo'))
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    attempts = {
        'someone/not-cached': lambda: twins_timm.from_pretrained('someone/not-cached'),
        'twins_pcpvt_small.in1k': lambda: timm.create_model('twins_pcpvt_small', pretrained=True),
        'twins_svt_small.in1k': lambda: TwinsUPerNet(encoder_name='twins_svt_small', encoder_weights='imagenet'),
        'twins_svt_base.in1k': lambda: twins_timm.from_pretrained('fpn:twins_svt_base'),
        'upernet_twins_svt_large.ade20k': lambda: twins_timm.from_pretrained('upernet_twins_svt_large.ade20k'),
    }
    for name, attempt in attempts.items():
        with pytest.raises(FetchError) as e:
            attempt()
        msg = str(e.value)
        assert msg.startswith(name + ':') and 'offline mode is on (%s)' % OFFLINE_SWITCHES in msg, msg
    data = tmp_path / 'data'
    for split in ('training', 'validation'):
        for kind, ext, mode in (('images', 'jpg', 'RGB'), ('annotations', 'png', 'L')):
            (data / kind / split).mkdir(parents=True)
            Image.new(mode, (40, 40)).save(data / kind / split / ('a.' + ext))
    assert cli.main(['train', '--model', 'upernet:twins_svt_small', '--data', str(data), '--out',
                     str(tmp_path / 'run'), '--device', 'cpu']) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert 'twins_svt_small.in1k: not in the local Hugging Face cache, and offline mode is on' in err
    assert 'hf download timm/twins_svt_small.in1k' in err and '--from-scratch' in err and 'Traceback' not in err
