"""Safety at the seams (issue 27): --force replaces only an earlier twins-timm output, no command writes a
file it reads, and a full disk is one paragraph with nothing left behind -- all checked before the work."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import write_checkpoint
from cli_checks import one_paragraph as _one_paragraph
from cli_checks import sha256_of as _sha
from zoo_server import _leftovers, _path
from zoo_server import cache, files, seg_record  # noqa: F401 (fixtures)
from tools_standin import random_rgb
from twins_timm import cli, zoo
from twins_timm.files import disk


def _debris(root: Path) -> list:
    return sorted(str(p) for p in root.rglob('*') if '.partial' in p.name or p.name.endswith('-old'))


@pytest.fixture(scope='module')
def src(tmp_path_factory):
    return write_checkpoint('official/pcpvt_small_v0', tmp_path_factory.mktemp('src') / 'pcpvt_small.pth', seed=3)


@pytest.fixture
def no_work(no_model_load, monkeypatch):
    """Fail the test if a command gets as far as loading a model, converting or downloading."""
    from twins_timm.convert import api
    for owner, name in ((api, 'convert_checkpoint'), (zoo.published, '_download')):
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail('the work started before the error'))


def _our_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / 'config.json').write_text(json.dumps({'twins_timm': {'variant': 'twins_pcpvt_small'}}))
    return path


def _ade(root: Path) -> Path:
    for sub in ('images', 'annotations'):
        (root / sub / 'validation').mkdir(parents=True)
    Image.fromarray(random_rgb(32, 32)).save(root / 'images' / 'validation' / 'x.jpg')
    Image.fromarray(np.ones((32, 32), np.uint8)).save(root / 'annotations' / 'validation' / 'x.png')
    return root


# ------------------------------------------------------------------------ --force: only what we wrote

def test_convert_force_never_replaces_a_users_folder_or_a_link(tmp_path, src, no_work, monkeypatch, capsys):
    precious = tmp_path / 'precious'
    precious.mkdir()
    (precious / 'thesis.tex').write_text('x')
    assert cli.main(['convert', str(src), str(precious), '--force']) == 2
    err = _one_paragraph(capsys, 'convert')
    assert 'not written by twins-timm' in err and 'thesis.tex' in err
    assert (precious / 'thesis.tex').read_text() == 'x'
    repo = tmp_path / 'repo'
    (repo / '.git').mkdir(parents=True)
    (repo / '.git' / 'HEAD').write_text('ref: refs/heads/main\n')
    monkeypatch.chdir(repo)
    assert cli.main(['convert', str(src), '.', '--force']) == 2
    assert '.git' in _one_paragraph(capsys, 'convert')
    assert (repo / '.git' / 'HEAD').read_text() == 'ref: refs/heads/main\n'
    target = _our_folder(tmp_path / 'target')  # even a link to a folder of ours is not replaced
    link = tmp_path / 'link'
    link.symlink_to(target)
    assert cli.main(['convert', str(src), str(link), '--force']) == 2
    assert 'symbolic link' in _one_paragraph(capsys, 'convert')
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ['config.json']
    assert _debris(tmp_path) == []


def test_convert_force_replaces_its_own_files_only(tmp_path, src, capsys):
    ours = tmp_path / 'w.safetensors'
    assert cli.main(['convert', str(src), str(ours), '--no-parity']) == 0
    before = _sha(ours)
    assert cli.main(['convert', str(src), str(ours), '--force', '--dtype', 'bf16']) == 0
    assert _sha(ours) != before
    mmseg = tmp_path / 'm.pth'
    to_mmseg = ['--to', 'mmseg', '--drop', 'head,norm']  # a classifier's head has no place in mmseg's backbone
    assert cli.main(['convert', str(src), str(mmseg)] + to_mmseg) == 0
    assert cli.main(['convert', str(src), str(mmseg), '--force'] + to_mmseg) == 0
    capsys.readouterr()
    from safetensors.torch import save_file
    foreign_st = tmp_path / 'theirs.safetensors'
    save_file({'x': torch.zeros(2)}, str(foreign_st))
    foreign_pth = tmp_path / 'theirs.pth'
    torch.save({'meta': {}, 'state_dict': {'x': torch.zeros(2)}}, foreign_pth)
    for dst, extra, why in ((foreign_st, [], 'no twins-timm metadata'),
                            (foreign_pth, to_mmseg, 'no twins-timm entry')):
        sha = _sha(dst)
        assert cli.main(['convert', str(src), str(dst), '--force'] + extra) == 2
        err = _one_paragraph(capsys, 'convert')
        assert 'not written by twins-timm' in err and why in err
        assert _sha(dst) == sha


def test_convert_never_writes_a_file_of_its_source_folder(tmp_path, src, monkeypatch, capsys):
    folder = tmp_path / 'F'
    assert cli.main(['convert', str(src), str(folder), '--no-parity']) == 0
    capsys.readouterr()
    shas = {p.name: _sha(p) for p in folder.iterdir()}
    from twins_timm.convert import api
    monkeypatch.setattr(api, 'convert_checkpoint', lambda *a, **k: pytest.fail('converted before refusing'))
    for name, extra in (('model.safetensors', ['--dtype', 'bf16']), ('config.json', [])):
        assert cli.main(['convert', str(folder), str(folder / name), '--force'] + extra) == 2
        err = _one_paragraph(capsys, 'convert')
        assert 'would overwrite the input' in err and name in err
    assert {p.name: _sha(p) for p in folder.iterdir()} == shas


def test_eval_json_never_replaces_a_cached_models_file(tmp_path, no_work, monkeypatch, capsys):
    monkeypatch.setenv('TWINS_TIMM_CACHE', str(tmp_path / 'cache'))
    name = next(m.name for m in zoo.MODELS.values() if m.origin != 'timm')
    entry = zoo.folder_for(name)
    entry.mkdir(parents=True)
    (entry / 'config.json').write_text('{"_model_class": "TwinsUPerNet"}')
    (entry / 'model.safetensors').write_bytes(b'weights')
    data = _ade(tmp_path / 'ade')
    sha = _sha(entry / 'config.json')
    assert cli.main(['eval', '--data', str(data), '--model', name, '--json', str(entry / 'config.json'),
                     '--force']) == 2
    assert 'would overwrite the input' in _one_paragraph(capsys, 'eval')
    assert _sha(entry / 'config.json') == sha
    theirs = tmp_path / 'theirs.json'
    theirs.write_text('{"a": 1}')
    assert cli.main(['eval', '--data', str(data), '--model', name, '--json', str(theirs), '--force']) == 2
    assert 'not written by twins-timm' in _one_paragraph(capsys, 'eval')
    assert theirs.read_text() == '{"a": 1}'


def test_eval_json_of_ours_is_replaced_with_force(tmp_path, standin, capsys):
    data = _ade(tmp_path / 'ade')
    out = tmp_path / 'm.json'
    assert cli.main(['eval', '--data', str(data), '--json', str(out), '--quiet']) == 0
    assert cli.main(['eval', '--data', str(data), '--json', str(out), '--quiet']) == 2
    assert '--force' in _one_paragraph(capsys, 'eval')
    assert cli.main(['eval', '--data', str(data), '--json', str(out), '--quiet', '--force']) == 0


def test_segment_force_spares_foreign_pngs_and_links(tmp_path, no_work, capsys):
    Image.fromarray(random_rgb(40, 48)).save(tmp_path / 'x.png')
    out = tmp_path / 'out'
    out.mkdir()
    theirs = out / 'x_labels.png'
    Image.fromarray(random_rgb(40, 48, 1)).save(theirs)
    sha = _sha(theirs)
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--out', str(out), '--force']) == 2
    assert 'not written by twins-timm' in _one_paragraph(capsys, 'segment')
    assert _sha(theirs) == sha
    theirs.unlink()
    (out / 'x_overlay.png').symlink_to(tmp_path / 'nowhere.png')  # dangling: exists() says no
    for extra, said in (([], 'already exist'), (['--force'], 'symbolic link')):
        assert cli.main(['segment', str(tmp_path / 'x.png'), '--out', str(out)] + extra) == 2
        assert said in _one_paragraph(capsys, 'segment')
    assert (out / 'x_overlay.png').is_symlink() and not (tmp_path / 'nowhere.png').exists()


def test_segment_writing_nothing_names_no_folder(tmp_path, standin, monkeypatch, capsys):
    monkeypatch.setattr(standin, 'forward', lambda x: (_ for _ in ()).throw(ValueError('input too small')))
    Image.fromarray(random_rgb(20, 20)).save(tmp_path / 'tiny.png')
    out = tmp_path / 'out'
    assert cli.main(['segment', str(tmp_path / 'tiny.png'), '--no-resize', '--out', str(out)]) == 1
    printed = capsys.readouterr().out
    assert 'Wrote nothing (%s was not created)' % out in printed and 'Wrote 0' not in printed
    assert not out.exists()


def test_models_download_force_spares_a_users_folder_in_the_cache(cache, seg_record, no_work, capsys):
    entry = zoo.folder_for(seg_record.name)
    entry.mkdir(parents=True)
    (entry / 'notes.txt').write_text('mine')
    assert cli.main(['models', '--download', seg_record.name, '--force']) == 2
    err = _one_paragraph(capsys, 'models')
    assert 'not written by twins-timm' in err and 'notes.txt' in err
    assert (entry / 'notes.txt').read_text() == 'mine'


def test_models_download_force_replaces_its_own_cache_entry(cache, seg_record, files, monkeypatch, capsys):
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    raw = zoo.raw_path(seg_record.url)  # put there by hand: converted without a download
    raw.parent.mkdir(parents=True)
    raw.write_bytes(files[_path(files, 'fpn_pcpvt_s_test-')])
    assert cli.main(['models', '--download', seg_record.name]) == 0
    weights = zoo.folder_for(seg_record.name) / 'model.safetensors'
    inode = weights.stat().st_ino  # the new folder is written beside the old one: its files are new inodes
    assert cli.main(['models', '--download', seg_record.name, '--force']) == 0
    assert weights.stat().st_ino != inode and _leftovers(cache) == []


def test_training_checkpoints_are_folders_of_ours(tmp_path, src, capsys):
    from train_data import SHALLOW_DEPTHS, tiny_model
    from twins_timm.train.run_folder import save_checkpoint
    from twins_timm.train.recipe import Recipe
    model = tiny_model(depths=SHALLOW_DEPTHS)
    recipe = Recipe(head='upernet', encoder='twins_svt_small', config='test', lr=1e-3, weight_decay=0.01)
    first = save_checkpoint(tmp_path, 12, model, {'iter': 12}, recipe, {})
    assert save_checkpoint(tmp_path, 12, model, {'iter': 12}, recipe, {}) == first  # a resumed run writes it again
    assert cli.main(['convert', str(src), str(first), '--force']) == 2  # ours, but not an output of convert
    assert 'training_state.pt' in _one_paragraph(capsys, 'convert')
    (first / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='notes.txt'):
        save_checkpoint(tmp_path, 12, model, {'iter': 12}, recipe, {})
    assert (first / 'notes.txt').read_text() == 'mine' and _debris(tmp_path) == []


def test_train_resume_refuses_inputs_inside_out(tmp_path, capsys):
    out = tmp_path / 'run'
    (out / 'data').mkdir(parents=True)
    (out / 'run.json').write_text('{}')
    assert cli.main(['train', '--data', str(out / 'data'), '--model', 'upernet:twins_svt_small', '--out', str(out),
                     '--resume']) == 2
    assert 'would overwrite the input' in _one_paragraph(capsys, 'train')


# ------------------------------------------------------------------------------------------- full disk

def _full_disk_after(nbytes: int, error: BaseException):
    """A writer stand-in that fills the disk: writes ``nbytes`` to its path, then raises ``error``."""
    def write(obj, path, *a, **k):
        Path(path).write_bytes(b'\0' * nbytes)
        raise error
    return write


@pytest.mark.parametrize('kind', ['safetensors', 'folder', 'mmseg'])
def test_full_disk_during_convert_is_one_paragraph_and_leaves_nothing(tmp_path, src, monkeypatch, capsys, kind):
    from safetensors import SafetensorError
    rust = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')
    monkeypatch.setattr('safetensors.torch.save_file', _full_disk_after(4096, rust))
    if kind == 'mmseg':  # torch.save says only "file write failed"; the disk is then (nearly) full
        free = [10 << 30]
        monkeypatch.setattr(disk, 'free_bytes', lambda folder: free[0])

        def torch_save(obj, path, *a, **k):
            Path(path).write_bytes(b'\0' * 4096)
            free[0] = 0
            raise RuntimeError('[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing '
                               'file data/3: file write failed')
        monkeypatch.setattr(torch, 'save', torch_save)
    (tmp_path / 'keep.txt').write_text('mine')
    dst = tmp_path / 'new' / {'safetensors': 'w.safetensors', 'folder': 'F', 'mmseg': 'm.pth'}[kind]
    extra = ['--to', 'mmseg', '--drop', 'head,norm'] if kind == 'mmseg' else []
    assert cli.main(['convert', str(src), str(dst), '--no-parity'] + extra) == 2
    err = _one_paragraph(capsys, 'convert')
    assert 'no space left on' in err and str(dst) in err and 'needed ~' in err and 'free' in err, err
    assert 'nothing partial is left' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.txt']  # not even the folder made for DST


def test_too_little_space_is_refused_before_writing(tmp_path, src, monkeypatch, capsys):
    monkeypatch.setattr(disk, 'free_bytes', lambda folder: 1000)
    monkeypatch.setattr('safetensors.torch.save_file', lambda *a, **k: pytest.fail('wrote despite no space'))
    assert cli.main(['convert', str(src), str(tmp_path / 'w.safetensors')]) == 2
    err = _one_paragraph(capsys, 'convert')
    assert 'needed ~' in err and 'MB' in err and 'free 1.0 kB' in err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_zoo_conversion(cache, seg_record, files, monkeypatch, capsys):
    monkeypatch.setenv('TWINS_TIMM_OFFLINE', '1')
    raw = zoo.raw_path(seg_record.url)
    raw.parent.mkdir(parents=True)
    raw.write_bytes(files[_path(files, 'fpn_pcpvt_s_test-')])
    monkeypatch.setattr('safetensors.torch.save_file',
                        _full_disk_after(4096, OSError(errno.ENOSPC, 'No space left on device')))
    assert cli.main(['models', '--download', seg_record.name]) == 2
    err = _one_paragraph(capsys, 'models')
    assert 'no space left on' in err and 'needed ~' in err
    assert not zoo.folder_for(seg_record.name).exists() and _leftovers(cache) == []
