"""`twins-timm convert` end to end: exit codes, summary, errors as one paragraph, both directions."""
import json
import os

import pytest
import torch

from checkpoint_factory import random_state_dict, write_checkpoint
from fresh_python import fresh_python
from twins_timm.cli import main
from twins_timm.convert import sha256_file


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('cli')


@pytest.fixture(scope='module')
def cls_src(work):
    return write_checkpoint('official/pcpvt_small_v0', work / 'pcpvt_small.pth', seed=11, training_extras=True)


def _err(capsys):
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert err.startswith('twins-timm convert: error: ')
    return ' '.join(err.split())  # the message is wrapped to the terminal width


def test_convert_summary_and_no_overwrite(work, cls_src, capsys):
    dst = work / 'pcpvt_s'
    assert main(['convert', str(cls_src), str(dst)]) == 0
    out = capsys.readouterr().out
    for needle in ('official_cls', "wrapped in 'model'", 'twins_pcpvt_small (PCPVT, small)',
                   'classification, 1000 classes', '304 source keys: 304 mapped -> 304 target keys, 0 dropped',
                   'parameters : 24.11 M', 'parity', 'timm folder'):
        assert needle in out, (needle, out)
    sha = sha256_file(dst / 'model.safetensors')
    assert 'sha256     : %s' % sha in out
    parity = float(out.split('max |converted - timm Twins| = ')[1].split()[0])
    assert parity <= 1e-5
    # an existing output is refused, untouched, then replaced with --force
    assert main(['convert', str(cls_src), str(dst), '--no-parity']) == 2
    assert '--force' in _err(capsys)
    assert sha256_file(dst / 'model.safetensors') == sha
    assert main(['convert', str(cls_src), str(dst), '--force', '--drop', 'head', '--no-parity']) == 0
    out = capsys.readouterr().out
    assert 'head: dropped on request (--drop head)' in out and 'backbone, 0 classes' in out
    assert json.loads((dst / 'config.json').read_text())['num_classes'] == 0


def test_errors_exit_2_with_one_paragraph(work, cls_src, capsys):
    dst = work / 'never'
    assert main(['convert', str(cls_src), str(dst), '--variant', 'svt_base']) == 2
    assert 'does not match the checkpoint, which is twins_pcpvt_small' in _err(capsys)
    resnet = work / 'resnet18.pth'
    import timm
    torch.save(timm.create_model('resnet18').state_dict(), resnet)
    assert main(['convert', str(resnet), str(dst)]) == 2
    assert 'not a Twins checkpoint' in _err(capsys)
    evil = work / 'evil.pth'
    marker = work / 'PWNED'

    class Payload:
        def __reduce__(self):
            return os.system, ('touch %s' % marker,)

    torch.save({'model': Payload()}, evil)
    assert main(['convert', str(evil), str(dst)]) == 2
    assert 'refused' in _err(capsys)
    assert not marker.exists()
    (work / 'empty.pth').write_bytes(b'')
    assert main(['convert', str(work / 'empty.pth'), str(dst)]) == 2
    assert 'empty' in _err(capsys)
    assert main(['convert', str(cls_src)]) == 2
    assert 'missing DST' in _err(capsys)
    assert main(['convert', str(cls_src), str(dst), '--drop', 'decoder']) == 2
    assert 'cannot drop' in _err(capsys)
    assert not dst.exists()
    assert not [p for p in work.iterdir() if '.partial-' in p.name]


def test_push_to_hub_plumbing_without_network(work, cls_src, capsys, monkeypatch):
    from twins_timm.convert import hub

    calls = []
    monkeypatch.setattr(hub, 'push_to_hub', lambda folder, repo, private=False: calls.append((folder, repo, private))
                        or 'https://huggingface.co/%s' % repo)
    dst = work / 'pushed'
    assert main(['convert', str(cls_src), str(dst), '--no-parity', '--push-to-hub', 'me/twins', '--private']) == 0
    assert calls == [(dst, 'me/twins', True)]
    assert 'pushed     : https://huggingface.co/me/twins' in capsys.readouterr().out

    def fail(*a, **k):
        raise RuntimeError('401 Client Error: Unauthorized')

    monkeypatch.setattr(hub, 'push_to_hub', fail)
    assert main(['convert', str(cls_src), str(work / 'pushed2'), '--no-parity', '--push-to-hub', 'me/twins']) == 2
    err = _err(capsys)
    assert 'uploading it to me/twins failed: 401' in err and (work / 'pushed2').is_dir()
    assert main(['convert', str(cls_src), str(work / 'x.safetensors'), '--push-to-hub', 'me/twins']) == 2
    assert 'folder' in _err(capsys)


def test_dry_run_json(cls_src, capsys):
    assert main(['convert', str(cls_src), '--dry-run', '--json']) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s['format'], s['variant'], s['task'], s['num_classes']) == (
        'official_cls', 'twins_pcpvt_small', 'classification', 1000)
    assert s['keys_mapped'] == s['keys_source'] == 304 and 'output' not in s


def test_mmseg_round_trip_through_the_cli(work, capsys):
    name = 'mmseg/twins_pcpvt-s_fpn_ade20k'
    sd = random_state_dict(name, seed=12)
    src = write_checkpoint(name, work / 'twins_pcpvt-s_fpn.pth', sd=sd)
    folder, back = work / 'fpn_pcpvt_s', work / 'back.pth'
    assert main(['convert', str(src), str(folder), '--variant', 'pcpvt-s']) == 0
    out = capsys.readouterr().out
    assert 'mmseg' in out and 'fpn, 150 classes' in out and '"norm_eps": 1e-05' in out
    assert main(['convert', str(folder), str(back), '--to', 'mmseg']) == 0
    assert 'mmseg checkpoint' in capsys.readouterr().out
    got = torch.load(back, weights_only=True)
    assert set(got['state_dict']) == set(sd)
    assert all(torch.equal(got['state_dict'][k], sd[k]) for k in sd)


def test_help_shows_examples_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as e:
        main(['convert', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'examples:' in out and 'twins-timm convert alt_gvt_small.pth' in out and '--drop' in out
    proc = fresh_python(module='twins_timm', argv=['convert', '--help'])  # as `python -m twins_timm`
    assert proc.returncode == 0 and 'examples:' in proc.stdout


def test_help_loads_local_dir_with_pretrained_weights(capsys):
    """timm's local-dir: loader builds random weights unless pretrained=True: every example loading one says it."""
    with pytest.raises(SystemExit):
        main(['convert', '--help'])
    lines = [line for line in capsys.readouterr().out.splitlines() if "create_model('local-dir:" in line]
    assert lines and all('pretrained=True' in line for line in lines)
