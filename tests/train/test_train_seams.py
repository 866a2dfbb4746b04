"""Safety at the seams of `train` and `eval` (issue 27): the labelling convention, the test scale a
trained model carries, resuming, and damaged or huge files -- each a clear error or the right result."""
from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from twins_timm.adapters import TwinsFPN, from_pretrained
from twins_timm.cli import main as cli_main
from twins_timm.train import checkpoint_folders
from twins_timm.train.data import label_convention_problem

from cli_checks import one_paragraph as _one_paragraph
from train_data import make_dataset, tiny_model_folder


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('ade') / 'data', n_train=4, n_val=2)


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp('model') / 'tiny')


def _train(data, model, out, *extra):
    return cli_main(['train', '--data', str(data), '--model', str(model), '--out', str(out), '--iters', '2',
                     '--batch-size', '2', '--global-batch', '2', '--crop-size', '64', '--workers', '0',
                     '--quiet', '--device', 'cpu', *extra])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG header claiming side x side RGB pixels (no pixel data): Pillow refuses it on open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0))
                     + chunk(b'IEND', b''))


# ----------------------------------------------------------------------------- labelling convention

def test_label_convention_rule():
    # reduce-zero-label on (ADE20K files: 0 = ignored "other", classes 1..N)
    assert 'Pass --no-reduce-zero-label' in label_convention_problem([0, 1, 2], 3, True)  # fits 0..N-1 exactly
    assert label_convention_problem([0, 1, 2, 3], 3, True) is None       # reaches N: 1-based with "other"
    assert label_convention_problem([1, 2], 3, True) is None              # no 0: nothing silently ignored
    assert label_convention_problem([0, 1, 2, 3, 255], 3, True) is None
    # reduce-zero-label off (0-based files, classes 0..N-1)
    assert 'Leave out --no-reduce-zero-label' in label_convention_problem([0, 1, 2, 3], 3, False)
    assert label_convention_problem([1, 2, 3], 3, False) is not None      # 1..N: only 1-based holds N
    assert label_convention_problem([0, 1, 2, 255], 3, False) is None


def test_zero_based_labels_without_the_option_stop_before_training(tmp_path, model_folder, capsys):
    data = make_dataset(tmp_path / 'zero_based', n_train=2, n_val=1, classes=3, reduce_zero_label=False)
    assert _train(data, model_folder, tmp_path / 'o', '--classes', '3') == 2  # labels 0..2
    err = _one_paragraph(capsys, 'train')
    assert 'fit 0..2' in err and 'class 0 would be ignored without a word' in err and 'Pass --no-reduce-zero-label' in err
    assert 'The rule:' in err and not (tmp_path / 'o').exists()
    # eval cannot refuse (a split may lack the last class) but says so
    assert cli_main(['eval', '--data', str(data), '--model', str(model_folder), '--quiet', '--device', 'cpu',
                     '--scale', '64', '32']) == 0  # 4 classes, labels 0..2
    err = ' '.join(capsys.readouterr().err.split())
    assert err.startswith('twins-timm eval: warning: the labels fit 0..3') and 'Pass --no-reduce-zero-label' in err


def test_one_based_labels_with_no_reduce_zero_label_get_the_other_hint(tmp_path, dataset, model_folder, capsys):
    assert _train(dataset, model_folder, tmp_path / 'o', '--no-reduce-zero-label') == 2  # labels 1..4, 4 classes
    err = _one_paragraph(capsys, 'train')
    assert 'label(s) 4' in err and 'Leave out --no-reduce-zero-label' in err and not (tmp_path / 'o').exists()


# ----------------------------------------------------------------------------- damaged and huge files

def test_huge_image_in_the_data_is_one_paragraph(tmp_path, dataset, model_folder, capsys):
    data = _copy(dataset, tmp_path / 'd')
    _bomb_png(data / 'images' / 'training' / 'training_001.png')
    assert _train(data, model_folder, tmp_path / 'o') == 2
    err = _one_paragraph(capsys, 'train')
    assert 'training_001.png: too large to read' in err and not (tmp_path / 'o').exists()
    _bomb_png(data / 'images' / 'validation' / 'validation_001.png')
    assert cli_main(['eval', '--data', str(data), '--model', str(tmp_path / 'no-model-here'), '--quiet']) == 2
    assert 'validation_001.png: too large to read' in _one_paragraph(capsys, 'eval')


def test_truncated_annotation_is_named_before_the_work(tmp_path, dataset, model_folder, capsys, monkeypatch):
    data = _copy(dataset, tmp_path / 'd')
    _truncate(data / 'annotations' / 'training' / 'training_002.png')
    assert _train(data, model_folder, tmp_path / 'o') == 2
    err = _one_paragraph(capsys, 'train')
    assert 'training_002.png: not a readable annotation PNG, its data is truncated' in err
    assert not (tmp_path / 'o').exists()
    _truncate(data / 'annotations' / 'validation' / 'validation_001.png')
    from twins_timm.inference import metrics

    def no_forward(*a, **k):
        raise AssertionError('a forward pass ran before the annotations were checked')
    monkeypatch.setattr(metrics, 'predict_labels', no_forward)
    assert cli_main(['eval', '--data', str(data), '--model', str(model_folder), '--quiet', '--device', 'cpu']) == 2
    assert 'validation_001.png: not a readable annotation PNG' in _one_paragraph(capsys, 'eval')


# ----------------------------------------------------------------------------- the test scale

def _miou(text: str) -> str:
    return re.search(r'mIoU:? ([\d.]+)', text).group(1)


def test_eval_and_segment_test_at_the_scale_the_model_was_trained_for(tmp_path, dataset, model_folder, capsys):
    out = tmp_path / 'run'
    assert _train(dataset, model_folder, out, '--eval-interval', '2') == 0
    trained = capsys.readouterr().out
    ckpt = checkpoint_folders(out)[-1]
    assert from_pretrained(str(ckpt)).test_scale == (256, 64)
    assert cli_main(['eval', '--data', str(dataset), '--model', str(ckpt), '--quiet', '--device', 'cpu']) == 0
    evaluated = capsys.readouterr().out
    assert "keep-ratio to 256x64 (the model's own test scale; --scale overrides)" in evaluated
    assert _miou(evaluated) == _miou(trained.splitlines()[-1])  # the number training printed
    assert cli_main(['eval', '--data', str(dataset), '--model', str(ckpt), '--quiet', '--device', 'cpu',
                     '--scale', '2048', '512']) == 0
    assert 'keep-ratio to 2048x512 (--scale)' in capsys.readouterr().out
    img = sorted((dataset / 'images' / 'validation').iterdir())[0]
    assert cli_main(['segment', str(img), '--model', str(ckpt), '--out', str(tmp_path / 'seg'), '--quiet',
                     '--device', 'cpu']) == 0
    assert "Inference: mode=whole resize=keep-ratio to 256x64 (the model's own test scale" in capsys.readouterr().out
    # a model without one (converted, published): the ADE20K scale, said so
    assert cli_main(['eval', '--data', str(dataset), '--model', str(model_folder), '--quiet', '--device', 'cpu']) == 0
    assert 'keep-ratio to 2048x512 (the ADE20K test scale; --scale overrides)' in capsys.readouterr().out


def test_a_wrong_test_scale_in_config_json_is_refused(tmp_path, model_folder):
    folder = _copy(model_folder, tmp_path / 'm')
    config = json.loads((folder / 'config.json').read_text())
    for bad in ([256], [256, 0], '256x64', [256.5, 64], [True, 64], [10 ** 9, 64]):
        (folder / 'config.json').write_text(json.dumps(dict(config, test_scale=bad)))
        with pytest.raises(ValueError, match='test_scale must be two positive integers'):
            from_pretrained(str(folder))


# ----------------------------------------------------------------------------- resuming

@pytest.fixture
def run_of_two(tmp_path, dataset, model_folder, capsys):
    """A finished 2-iteration run with a checkpoint after each iteration."""
    out = tmp_path / 'run'
    assert _train(dataset, model_folder, out, '--save-interval', '1', '--eval-interval', '0', '--lr', '0.001') == 0
    capsys.readouterr()
    assert [p.name for p in checkpoint_folders(out)] == ['iter_000001', 'iter_000002']
    return out


def test_resume_passes_over_a_damaged_newest_checkpoint(run_of_two, dataset, model_folder, capsys):
    out = run_of_two
    _truncate(out / 'checkpoints' / 'iter_000002' / 'model.safetensors')
    assert _train(dataset, model_folder, out, '--save-interval', '1', '--eval-interval', '0', '--resume') == 0
    said = ' '.join(capsys.readouterr().out.split())
    assert 'passing over damaged checkpoint(s) (iter_000002: ' in said
    assert 'resuming from %s, the newest complete one' % (out / 'checkpoints' / 'iter_000001') in said
    assert 'Training TwinsUPerNet (twins_svt_small) for 2 iterations from iteration 1' in said
    assert from_pretrained(str(out / 'checkpoints' / 'iter_000002')).classes == 4  # written again, whole
    # nothing readable left: one paragraph, nothing trained
    for ckpt in checkpoint_folders(out):
        _truncate(ckpt / 'training_state.pt')
    assert _train(dataset, model_folder, out, '--resume') == 2
    err = _one_paragraph(capsys, 'train')
    assert 'no checkpoint in %s can be read back' % (out / 'checkpoints') in err and 'iter_000001: ' in err


def test_resume_refuses_other_settings_and_another_model(run_of_two, dataset, model_folder, tmp_path, capsys):
    out = run_of_two
    before = sorted(p.name for p in out.rglob('*'))
    assert _train(dataset, model_folder, out, '--resume', '--lr', '0.002', '--iters', '3') == 2
    err = _one_paragraph(capsys, 'train')
    assert '--resume continues the run in %s with its own settings' % out in err
    assert '--iters 3 (the run: 2)' in err and '--lr 0.002 (the run: 0.001)' in err
    assert '--model %s --out NEW_FOLDER' % (out / 'checkpoints' / 'iter_000002') in err
    assert _train(dataset, model_folder, out, '--resume', '--no-reduce-zero-label') == 2
    assert 'with --no-reduce-zero-label (the run: without)' in _one_paragraph(capsys, 'train')
    fpn = tiny_model_folder(tmp_path / 'fpn', TwinsFPN)
    assert _train(dataset, fpn, out, '--resume') == 2
    err = _one_paragraph(capsys, 'train')
    assert ('the run in %s trained a TwinsUPerNet on twins_svt_small with 4 classes, but --model gives a TwinsFPN '
            'on twins_svt_small with 4 classes' % out) in err
    assert '(--model %s, as in its run.json)' % model_folder in err
    assert sorted(p.name for p in out.rglob('*')) == before
