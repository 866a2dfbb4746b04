"""What a careless user can do to the command line: nothing is lost, mistakes fail before the work,
every user error is one paragraph with exit code 2 (issue 14)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import one_paragraph as _one_paragraph
from cli_checks import sha256_of as _sha
from tools_standin import OpsSeen, random_rgb
from twins_timm import cli
from twins_timm.commands import evaluate as evaluate_mod
from twins_timm.inference import images
from twins_timm.zoo import resolve
from twins_timm.commands import segment as segment_mod
from twins_timm.inference.predict import merged_bands, ms_flip_settings, predict_labels


# ----------------------------------------------------------------------------- data loss

def test_segment_into_the_photos_folder_keeps_the_photo(tmp_path, standin):
    photo = tmp_path / 'photo.png'
    Image.fromarray(random_rgb(40, 48)).save(photo)
    before = _sha(photo)
    for extra in ([], ['--force']):
        assert cli.main(['segment', str(photo), '--out', str(tmp_path), '--quiet'] + extra) == 0
        assert _sha(photo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photo.png', 'photo_labels.png', 'photo_overlay.png']


def test_output_named_like_an_input_is_refused_even_with_force(tmp_path, no_model_load, capsys):
    a, a_labels = tmp_path / 'a.png', tmp_path / 'a_labels.png'
    Image.fromarray(random_rgb(40, 48, 1)).save(a)
    Image.fromarray(random_rgb(40, 48, 2)).save(a_labels)  # a.png's class map would land on this input
    before = _sha(a_labels)
    for extra in ([], ['--force']):
        assert cli.main(['segment', str(a), str(a_labels), '--out', str(tmp_path)] + extra) == 2
        err = _one_paragraph(capsys, 'segment')
        assert 'would overwrite the input' in err and 'a_labels.png' in err and 'even with --force' in err
    assert _sha(a_labels) == before


def test_eval_json_never_replaces_an_input(tmp_path, no_model_load, capsys):
    data = tmp_path / 'ade'
    for sub in ('images', 'annotations'):
        (data / sub / 'validation').mkdir(parents=True)
    Image.fromarray(random_rgb(32, 32)).save(data / 'images' / 'validation' / 'x.jpg')
    ann = data / 'annotations' / 'validation' / 'x.png'
    Image.fromarray(np.ones((32, 32), np.uint8)).save(ann)
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    (model_dir / 'config.json').write_text('{}')
    for target in (ann, model_dir / 'config.json'):
        before = _sha(target)
        assert cli.main(['eval', '--data', str(data), '--model', str(model_dir), '--json', str(target),
                         '--force']) == 2
        assert 'would overwrite the input' in _one_paragraph(capsys, 'eval')
        assert _sha(target) == before


def test_convert_never_replaces_its_source(tmp_path, capsys):
    src = tmp_path / 'w.safetensors'
    src.write_bytes(b'not really weights')
    assert cli.main(['convert', str(src), str(src), '--force']) == 2
    assert 'would overwrite the input' in _one_paragraph(capsys, 'convert')
    assert cli.main(['convert', str(src), str(tmp_path), '--force']) == 2
    assert 'holds SRC' in _one_paragraph(capsys, 'convert')
    assert src.read_bytes() == b'not really weights'


# ----------------------------------------------------------------------------- fail before the work

def test_unwritable_outputs_fail_before_the_model_loads(tmp_path, no_model_load, monkeypatch, capsys):
    Image.fromarray(random_rgb(32, 32)).save(tmp_path / 'x.png')
    (tmp_path / 'file').write_text('')
    for out in ('/proc/self/out', str(tmp_path / 'file')):
        assert cli.main(['segment', str(tmp_path / 'x.png'), '--out', out]) == 2
        err = _one_paragraph(capsys, 'segment')
        assert '--out' in err and ('not writable' in err or 'is a file' in err), err
    data = tmp_path / 'ade'
    for sub in ('images', 'annotations'):
        (data / sub / 'validation').mkdir(parents=True)
    Image.fromarray(random_rgb(32, 32)).save(data / 'images' / 'validation' / 'x.jpg')
    Image.fromarray(np.ones((32, 32), np.uint8)).save(data / 'annotations' / 'validation' / 'x.png')
    assert cli.main(['eval', '--data', str(data), '--json', '/proc/self/m.json']) == 2
    assert '--json /proc/self/m.json' in _one_paragraph(capsys, 'eval')
    from twins_timm.devtools import bench

    def no_measuring(*a, **k):
        raise AssertionError('bench measured before checking --json')
    monkeypatch.setattr(bench, 'matmul_rate', no_measuring)
    for path in ('/proc/self/b.json', str(tmp_path / 'file'), str(tmp_path)):
        assert cli.main(['bench', '--quick', '--json', path]) == 2
        err = _one_paragraph(capsys, 'bench')
        assert '--json %s' % path in err, err


def test_convert_to_an_unwritable_place_is_one_paragraph(tmp_path, capsys):
    src = tmp_path / 'x.pth'
    torch.save({'a': torch.zeros(1)}, src)
    assert cli.main(['convert', str(src), '/proc/self/foo.safetensors']) == 2
    err = _one_paragraph(capsys, 'convert')
    assert 'not writable' in err and '.tmp' not in err and 'partial' not in err


def test_an_image_given_as_checkpoint_says_what_it_is(tmp_path, capsys):
    photo = tmp_path / 'photo.png'
    Image.fromarray(random_rgb(32, 32)).save(photo)
    assert cli.main(['convert', str(photo), str(tmp_path / 'x.safetensors')]) == 2
    err = _one_paragraph(capsys, 'convert')
    assert 'not a PyTorch checkpoint (it is a PNG image)' in err and 'weights_only' not in err
    assert not (tmp_path / 'x.safetensors').exists()


def test_unwritable_model_cache_fails_before_downloading(tmp_path, monkeypatch, capsys):
    from twins_timm import zoo

    def no_download(*a, **k):
        raise AssertionError('downloaded into a cache that cannot take the result')
    monkeypatch.setattr(zoo.published, '_download', no_download)
    monkeypatch.setenv('TWINS_TIMM_CACHE', '/proc/self/twins-cache')
    assert cli.main(['models', '--download', 'fpn_twins_pcpvt_small.ade20k']) == 2
    err = _one_paragraph(capsys, 'models')
    assert 'model cache' in err and 'TWINS_TIMM_CACHE' in err and 'not writable' in err


def test_paths_in_an_error_stay_whole(tmp_path, no_model_load, capsys):
    """The paragraph breaks lines at spaces only: a long path with hyphens in it can be copied."""
    photo = tmp_path.joinpath(*['a-long-hyphenated-folder-name'] * 4, 'no-such-photo.png')
    assert cli.main(['segment', str(photo), '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert str(photo) in err and 'Traceback' not in err


def test_small_crop_size_says_so(tmp_path, no_model_load, capsys):
    Image.fromarray(random_rgb(64, 64)).save(tmp_path / 'x.png')
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--mode', 'slide', '--crop-size', '16',
                     '--out', str(tmp_path / 'o')]) == 2
    assert '--crop-size 16 is too small' in _one_paragraph(capsys, 'segment')
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--scale', '0', '0', '--out', str(tmp_path / 'o')]) == 2
    assert '--scale takes two positive integers' in _one_paragraph(capsys, 'segment')


def test_huge_images_clear_error_and_limit_option(tmp_path, no_model_load, capsys):
    big, large = tmp_path / 'big.png', tmp_path / 'large.png'
    Image.new('1', (15000, 12000)).save(big)  # 180 MP: Pillow raises DecompressionBombError
    Image.new('1', (10000, 10000)).save(large)  # 100 MP: Pillow warns
    assert cli.main(['segment', str(big), '--out', str(tmp_path / 'o')]) == 2
    err = _one_paragraph(capsys, 'segment')
    assert '15000x12000' in err and '--max-pixels 180000000' in err
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no raw Pillow warning
        assert images.check_image(large)[0] == (10000, 10000)
        assert images.check_image(big, max_pixels=180_000_000)[0] == (15000, 12000)
        assert images.check_image(big, max_pixels=0)[0] == (15000, 12000)
    with pytest.raises(ValueError, match='max_pixels'):
        images.read_image(large, max_pixels=1000)
    with pytest.raises(ValueError, match='15000x12000'):
        images.read_label_map(big)  # an annotation that large: the same clear error, no traceback
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is back for everyone else


def test_memory_estimate_is_right_at_small_sizes(tmp_path, no_model_load, capsys):
    Image.new('L', (1001, 1000)).save(tmp_path / 'x.png')
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--max-pixels', '1000000', '--out', str(tmp_path / 'o')]) == 2
    err = _one_paragraph(capsys, 'segment')
    assert 'limit of 1 megapixels' in err and 'about %.0f MB' % (1001 * 1000 * images.DECODE_BYTES_PER_PIXEL / 1e6) in err
    assert '0.0 GB' not in err


@contextlib.contextmanager
def _within(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts a blocked open() or read() in this (main) thread."""
    def expire(signum, frame):
        raise TimeoutError('still blocked after %g s' % seconds)
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='named pipes are POSIX')
def test_fifo_and_devices_are_refused_without_opening_them(tmp_path, no_model_load, capsys):
    fifo = tmp_path / 'photo.png'
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    inputs = [str(fifo)] + [d for d in ('/dev/zero', '/dev/null') if os.path.exists(d)]
    with _within(30):
        assert cli.main(['segment'] + inputs + ['--out', str(tmp_path / 'o')]) == 2
        err = _one_paragraph(capsys, 'segment')
        assert 'photo.png: is a named pipe (FIFO), not an image file' in err
        assert all('%s: is a device' % d in err for d in inputs[1:])
        with pytest.raises(ValueError, match='named pipe'):
            images.read_image(fifo)
        with pytest.raises(ValueError, match='named pipe'):
            images.read_label_map(fifo)
    assert not (tmp_path / 'o').exists()


# ----------------------------------------------------------------------------- the dispatcher

def test_unknown_command_version_and_bugs(monkeypatch, capsys):
    assert cli.main(['segmnet', 'x.png']) == 2
    err = capsys.readouterr().err
    assert "'segmnet'" in err and "Did you mean 'segment'" in err and 'convert, segment, eval' in err
    with pytest.raises(SystemExit) as e:
        cli.main(['--version'])
    assert e.value.code == 0 and 'twins-timm 0.1.0' in capsys.readouterr().out

    def buggy(args):
        raise KeyError('architecture')
    monkeypatch.setattr(segment_mod, 'run', buggy)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.main(['segment'])


@pytest.mark.parametrize('argv', [['--help'], ['--version'], ['segmnet']])
def test_console_script_answers_without_importing_torch(argv):
    # the console script's entry point (setup.cfg) runs the dispatcher without the twins_timm package
    code = ('import sys, contextlib, io\n'
            'import twins_timm_launcher\n'
            'out, err = io.StringIO(), io.StringIO()\n'
            'with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n'
            '    try: code = twins_timm_launcher.main(%r)\n'
            '    except SystemExit as e: code = e.code\n'
            'print(code, repr(out.getvalue() + err.getvalue()))\n'
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "twins_timm", '
            '"segmentation_models_pytorch") and m != "twins_timm.cli"))\n' % (argv,))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result, imported = proc.stdout.strip().splitlines()
    assert imported == '[]'
    code, text = result.split(' ', 1)
    if argv == ['--help']:
        assert code == '0' and 'segment' in text and 'Convert a Twins checkpoint' in text
    elif argv == ['--version']:
        assert code == '0' and 'twins-timm 0.1.0' in text
    else:
        assert code == '2' and "Did you mean 'segment'" in text


def test_console_script_runs_commands():
    import twins_timm_launcher
    assert twins_timm_launcher.main(['models', '--json']) == 0


# ----------------------------------------------------------------------------- feedback

def test_corrupt_image_in_a_batch_is_skipped_and_reported(tmp_path, standin, capsys):
    paths = [tmp_path / ('%s.png' % n) for n in ('a', 'b', 'c')]
    for i, p in enumerate(paths):
        Image.fromarray(random_rgb(40, 48, i)).save(p)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:len(data) // 2])  # header fine, pixel data cut
    out = tmp_path / 'out'
    assert cli.main(['segment'] + [str(p) for p in paths] + ['--out', str(out)]) == 1
    err = ' '.join(capsys.readouterr().err.split())
    assert 'skipped' in err and 'b.png' in err and '1 of 3 image(s)' in err
    assert sorted(p.name for p in out.iterdir()) == ['a_labels.png', 'a_overlay.png', 'c_labels.png',
                                                     'c_overlay.png']


def test_image_the_model_refuses_is_skipped_and_reported(tmp_path, standin, monkeypatch, capsys):
    forward = standin.forward

    def picky(x):  # as the Twins segmenters: inputs below 32 pixels are a ValueError
        if min(x.shape[-2:]) < 32:
            raise ValueError('input %dx%d is too small' % tuple(x.shape[-2:]))
        return forward(x)
    monkeypatch.setattr(standin, 'forward', picky)
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / 'tiny.png')
    Image.fromarray(random_rgb(40, 48)).save(tmp_path / 'ok.png')
    out = tmp_path / 'out'
    assert cli.main(['segment', str(tmp_path / 'tiny.png'), str(tmp_path / 'ok.png'), '--no-resize',
                     '--out', str(out)]) == 1
    err = ' '.join(capsys.readouterr().err.split())
    assert 'tiny.png: input 8x8 is too small (skipped)' in err and '1 of 2 image(s)' in err
    assert sorted(p.name for p in out.iterdir()) == ['ok_labels.png', 'ok_overlay.png']


def test_tta_progress_counts_views(tmp_path, standin, capsys):
    Image.fromarray(random_rgb(40, 48)).save(tmp_path / 'x.png')
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--tta', '--scale', '64', '48',
                     '--out', str(tmp_path / 'o')]) == 0
    assert '12/12' in capsys.readouterr().err  # 6 ratios x (plain + flip)
    seen = []
    predict_labels(standin, random_rgb(40, 48), ms_flip_settings(scale=(64, 48)), on_view=lambda: seen.append(1))
    assert len(seen) == 12


def test_tta_holds_one_view_at_a_time(standin):
    """Memory: each flipped copy has its own forward, and a view is released before the next."""
    standin.calls.clear()
    settings = ms_flip_settings(scale=(64, 48))
    predict_labels(standin, random_rgb(40, 48), settings)
    assert [c[0] for c in standin.calls] == [1] * 12  # batch 1: no plain + flip pair in one forward
    refs = []

    def views():
        for _ in range(4):
            assert not refs or refs[-1]() is None, 'the previous view is still held'
            v = torch.randn(1, 5, 12, 16)
            refs.append(weakref.ref(v))
            yield v
            del v
    (_, _, merged), = list(merged_bands(views(), (9, 11)))
    assert merged.shape == (1, 5, 9, 11)


def test_tta_frees_each_network_size_view_before_the_next_forward(standin, monkeypatch):
    forward, outputs = standin.forward, []

    def tracked(x):
        assert all(r() is None for r in outputs), 'a previous view is still held during a forward'
        out = forward(x)
        outputs.append(weakref.ref(out))
        return out
    monkeypatch.setattr(standin, 'forward', tracked)
    seen = []
    predict_labels(standin, random_rgb(40, 48), ms_flip_settings(scale=(64, 48)), on_view=lambda: seen.append(1))
    assert len(outputs) == 12 and len(seen) == 12


@pytest.mark.parametrize('extra', [[], ['--tta']], ids=['one-view', 'tta'])
def test_large_photo_never_makes_its_score_map(tmp_path, standin, monkeypatch, extra):
    """A photo whose score map is over the memory bound: one view gives its labels without the map, TTA
    keeps its (smaller) views and merges them in bands; the labels are those of the plain whole-map merge."""
    photo = random_rgb(240, 320)
    Image.fromarray(photo).save(tmp_path / 'big.png')
    settings_from_args, plain = segment_mod.settings_from_args, []

    def bounded(args):  # 256 MB stands for bands of 16 rows here
        plain.append(settings_from_args(args))
        return dataclasses.replace(plain[-1], full_bytes=standin.classes * 320 * 4 * 16)
    monkeypatch.setattr(segment_mod, 'settings_from_args', bounded)
    with OpsSeen() as seen:
        assert cli.main(['segment', str(tmp_path / 'big.png'), '--scale', '48', '36', '--quiet',
                         '--out', str(tmp_path / 'o')] + extra) == 0
    assert seen.largest < standin.classes * 240 * 320  # no tensor as large as the score map
    expected = predict_labels(standin, photo, plain[0])[0].numpy()  # default bound: the whole map at once
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'o' / 'big_labels.png')), expected)


def test_quiet_silences_the_loader(tmp_path, capsys):
    from twins_timm.adapters import TwinsFPN
    torch.manual_seed(0)
    folder = tmp_path / 'fpn'
    TwinsFPN(encoder_name='twins_pcpvt_small', classes=3, decoder_pyramid_channels=16,
             decoder_segmentation_channels=16).eval().save_pretrained(str(folder))
    Image.fromarray(random_rgb(32, 32)).save(tmp_path / 'x.png')
    args = ['segment', str(tmp_path / 'x.png'), '--model', str(folder), '--scale', '32', '32']
    assert cli.main(args + ['--out', str(tmp_path / 'a')]) == 0
    assert 'Loading weights from local directory' in capsys.readouterr().out  # what --quiet must hide
    assert cli.main(args + ['--out', str(tmp_path / 'b'), '--quiet']) == 0
    std = capsys.readouterr()
    assert 'Loading weights' not in std.out + std.err and 'Model: folder' in std.out


# ----------------------------------------------------------------------------- honest hints

def test_uint8_input_hint_names_the_segmenters_own_normalisation():
    from twins_timm.adapters import TwinsFPN
    model = TwinsFPN(encoder_name='twins_pcpvt_small', classes=3, decoder_pyramid_channels=16,
                     decoder_segmentation_channels=16, mean=(10.0, 20.0, 30.0), std=(2.0, 3.0, 4.0)).eval()
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    msg = str(e.value)
    assert 'mean=[10.0, 20.0, 30.0]' in msg and 'std=[2.0, 3.0, 4.0]' in msg
    assert 'do not divide by 255' in msg
