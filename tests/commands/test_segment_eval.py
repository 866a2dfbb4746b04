"""`twins-timm segment` / `twins-timm eval`: inputs, outputs, errors, model lookup, main job."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools_standin import ade_folder as _ade_folder, random_rgb
from twins_timm import cli
from twins_timm.inference import images
from twins_timm.zoo import resolve
from twins_timm.inference.metrics import IoUAccumulator
from twins_timm.inference.predict import InferenceSettings, predict_labels
from twins_timm.inference.images import read_image


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty local Hub cache, offline."""
    from huggingface_hub import constants
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TWINS_TIMM_CACHE', str(tmp_path / 'zoo_cache'))  # published models: none cached
    return cache


# ----------------------------------------------------------------------------- image reading

def test_image_modes_converted_or_refused(tmp_path):
    rgb = random_rgb(9, 11)
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    arr, note = read_image(tmp_path / 'rgb.png')
    assert note is None and arr.dtype == np.uint8 and np.array_equal(arr, rgb)
    rgba = np.dstack([rgb, np.full((9, 11), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / 'rgba.png')
    arr, note = read_image(tmp_path / 'rgba.png')
    assert np.array_equal(arr, rgb) and 'alpha' in note
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / 'grey.png')
    arr, note = read_image(tmp_path / 'grey.png')
    assert arr.shape == (9, 11, 3) and np.array_equal(arr[:, :, 2], rgb[:, :, 0]) and 'greyscale' in note
    Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg')
    arr, note = read_image(tmp_path / 'cmyk.jpg')
    assert arr.shape == (9, 11, 3) and 'CMYK' in note
    Image.fromarray(rgb).convert('P').save(tmp_path / 'pal.png')
    assert read_image(tmp_path / 'pal.png')[0].shape == (9, 11, 3)
    Image.fromarray(np.zeros((4, 4), np.float32) + 0.5).save(tmp_path / 'float.tiff')
    with pytest.raises(ValueError, match='float.tiff: image mode .F.*not supported.*16-bit'):
        read_image(tmp_path / 'float.tiff')
    (tmp_path / 'junk.jpg').write_bytes(b'not an image at all')
    with pytest.raises(ValueError, match='junk.jpg: not an image'):
        read_image(tmp_path / 'junk.jpg')
    with pytest.raises(FileNotFoundError, match='no such file'):
        read_image(tmp_path / 'missing.png')


def _png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG (greyscale for HxW, RGB for HxWx3), written by hand: Pillow cannot write 16-bit RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    h, w = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = values.astype('>u2').reshape(h, -1)
    raw = b''.join(b'\x00' + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack('>IIBBBBB', w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
                     + chunk(b'IEND', b''))


def test_sixteen_bit_grey_and_rgb_read_the_same_way(tmp_path, standin, capsys):
    """16-bit greyscale and 16-bit RGB both keep the high byte (as OpenCV, mmseg's reader) and segment."""
    values = np.random.default_rng(0).integers(0, 65536, (24, 30), dtype=np.uint16)
    values[0, :3] = (255, 256, 65535)  # high bytes 0, 1, 255: cut, not rounded
    _png16(tmp_path / 'grey16.png', values)
    _png16(tmp_path / 'rgb16.png', np.dstack([values] * 3))
    expected = np.dstack([values >> 8] * 3).astype(np.uint8)
    for name in ('grey16.png', 'rgb16.png'):
        arr, note = read_image(tmp_path / name)
        assert arr.dtype == np.uint8 and np.array_equal(arr, expected), name
        assert '16-bit' in note and 'high byte' in note, name
    assert read_image(tmp_path / 'grey16.png')[0][0, :3, 0].tolist() == [0, 1, 255]
    out = tmp_path / 'out'
    assert cli.main(['segment', str(tmp_path / 'grey16.png'), str(tmp_path / 'rgb16.png'),
                     '--out', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'grey16.png: 16-bit greyscale' in stdout and 'rgb16.png: 16-bit values' in stdout
    grey, rgb = (np.asarray(Image.open(out / n)) for n in ('grey16_labels.png', 'rgb16_labels.png'))
    assert np.array_equal(grey, rgb)
    assert np.array_equal(grey, predict_labels(standin, expected)[0].numpy())


def test_overlay_blend_in_bands_is_the_plain_blend():
    from twins_timm.inference.visualize import blend, colorize
    rng = np.random.default_rng(0)
    img, labels = random_rgb(123, 77), rng.integers(0, 9, (123, 77))
    palette = rng.integers(0, 256, (9, 3), dtype=np.uint8)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        plain = img.astype(np.float32) * (1 - alpha) + colorize(labels, palette).astype(np.float32) * alpha
        assert np.array_equal(blend(img, labels, palette, alpha, chunk_pixels=500),
                              np.clip(plain + 0.5, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- segment

def test_segment_writes_label_and_overlay_pngs(tmp_path, standin, capsys):
    a, b = random_rgb(30, 40, 1), random_rgb(30, 40, 2)
    Image.fromarray(a).save(tmp_path / 'a.png')
    Image.fromarray(np.dstack([b, np.full((30, 40), 255, np.uint8)])).save(tmp_path / 'b.png')  # RGBA
    out = tmp_path / 'out'
    args = ['segment', str(tmp_path / 'a.png'), str(tmp_path / 'b.png'), '--out', str(out),
            '--batch-size', '2', '--scale', '64', '32', '--device', 'cpu']
    assert cli.main(args) == 0
    std = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ['a_labels.png', 'a_overlay.png', 'b_labels.png',
                                                        'b_overlay.png']
    assert '2/2' in std.err  # progress bar
    assert 'alpha channel dropped' in std.out and 'RANDOM' not in std.out
    assert [c[0] for c in standin.calls] == [2]  # both images in one forward
    settings = InferenceSettings(scale=(64, 32))
    for name, img in (('a', a), ('b', b)):
        saved = Image.open(out / (name + '_labels.png'))
        assert saved.mode == 'P'
        assert np.array_equal(np.asarray(saved), predict_labels(standin, img, settings)[0].numpy())
        overlay = Image.open(out / (name + '_overlay.png'))
        assert overlay.height >= 30 and overlay.width > 40  # legend panel on the right
    # outputs are never replaced silently
    assert cli.main(args) == 2
    assert '--force' in capsys.readouterr().err
    assert cli.main(args + ['--force', '--quiet']) == 0
    assert not list(out.glob('.*.partial-*'))  # atomic writes leave no temporary behind
    assert sorted(p.name for p in out.iterdir()) == ['a_labels.png', 'a_overlay.png', 'b_labels.png', 'b_overlay.png']



def test_segment_outputs_from_python_without_the_cli(tmp_path):
    """What `segment` writes is a library call: names beside the inputs' stems, then the two PNGs."""
    from twins_timm.inference.outputs import check_outputs, label_summary, output_paths, write_segmentation
    from twins_timm.inference.visualize import make_palette
    photo = tmp_path / 'room.jpg'
    (paths,) = output_paths([photo], tmp_path / 'out', random_weights=True)
    assert [p.name for p in paths] == ['room_labels_RANDOM-WEIGHTS.png', 'room_overlay_RANDOM-WEIGHTS.png']
    with pytest.raises(ValueError, match='would both write'):
        output_paths([photo, tmp_path / 'other' / 'room.png'], tmp_path / 'out')
    labels = np.zeros((20, 30), np.int64)
    labels[:, 20:] = 2
    paths = output_paths([photo], tmp_path)[0]
    write_segmentation(random_rgb(20, 30), labels, paths, make_palette(3), ['wall', 'floor', 'sky'],
                       text={'Source': 'test'})
    assert np.array_equal(np.asarray(Image.open(paths[0])), labels)
    assert Image.open(paths[1]).text['Source'] == 'test'
    assert label_summary(labels, ['wall', 'floor', 'sky']) == 'wall 67%, sky 33%'
    with pytest.raises(FileExistsError, match='--force'):
        check_outputs([paths], force=False)
    check_outputs([paths], force=True)  # our own PNGs: replaceable

def test_segment_refuses_unreadable_inputs_before_writing(tmp_path, standin, capsys):
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / 'ok.png')
    (tmp_path / 'bad.jpg').write_bytes(b'\x00' * 10)
    out = tmp_path / 'out'
    code = cli.main(['segment', str(tmp_path / 'ok.png'), str(tmp_path / 'bad.jpg'),
                     str(tmp_path / 'nope.png'), '--out', str(out)])
    err = ' '.join(capsys.readouterr().err.split())
    assert code == 2 and 'bad.jpg: not an image' in err and 'nope.png: no such file' in err
    assert 'nothing was written' in err and not out.exists()


def test_segment_slide_and_tta_options(tmp_path, standin):
    Image.fromarray(random_rgb(20, 28)).save(tmp_path / 'x.png')
    out = tmp_path / 'o'
    assert cli.main(['segment', str(tmp_path / 'x.png'), '--out', str(out), '--mode', 'slide',
                     '--crop-size', '32', '--stride', '16', '--tta', '--scale', '80', '40', '--quiet']) == 0
    s = InferenceSettings(mode='slide', scale=(80, 40), crop_size=(32, 32), stride=(16, 16),
                          ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    expected = predict_labels(standin, random_rgb(20, 28), s)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(out / 'x_labels.png')), expected)


def test_missing_model_and_bad_device_are_clear_errors(tmp_path, capsys, offline_hub):
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / 'x.png')
    code = cli.main(['segment', str(tmp_path / 'x.png'), '--model', str(tmp_path / 'no_model'),
                     '--out', str(tmp_path / 'o')])
    assert code == 2 and 'does not exist' in capsys.readouterr().err
    code = cli.main(['segment', str(tmp_path / 'x.png'), '--model', 'someone/not-cached',
                     '--out', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    err = ' '.join(err.split())
    assert code == 2 and 'not in the local Hugging Face cache' in err and 'HF_HUB_OFFLINE' in err
    assert 'hf download someone/not-cached' in err and 'Traceback' not in err
    if not torch.cuda.is_available():
        code = cli.main(['segment', str(tmp_path / 'x.png'), '--device', 'cuda', '--out', str(tmp_path / 'o')])
        assert code == 2 and 'CUDA is not available' in capsys.readouterr().err


@pytest.mark.parametrize('command', ['segment', 'eval', 'train', 'bench'])
def test_one_device_rule_in_every_command(command, tmp_path, capsys, monkeypatch):
    """An unknown --device is the same one-paragraph error (exit 2) everywhere, before any model is made."""
    from twins_timm.inference.devices import pick_device
    from twins_timm.train import models as train_models
    monkeypatch.setattr(resolve, 'resolve', lambda *a, **k: pytest.fail('a model was made before the error'))
    monkeypatch.setattr(train_models, 'resolve', resolve.resolve)
    data = _ade_folder(tmp_path / 'ade', 1, 3)
    shutil.copytree(data / 'images' / 'validation', data / 'images' / 'training')
    shutil.copytree(data / 'annotations' / 'validation', data / 'annotations' / 'training')
    args = {'segment': ['--out', str(tmp_path / 'o')], 'eval': ['--data', str(data)],
            'train': ['--data', str(data), '--model', 'upernet:twins_svt_small', '--out', str(tmp_path / 'run')],
            'bench': ['--json', str(tmp_path / 'b.json')]}[command]
    assert cli.main([command, *args, '--device', 'tpu9']) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert "unknown device 'tpu9'; use 'cpu', 'cuda', 'cuda:N' or 'mps'" in err and 'Traceback' not in err
    assert pick_device('auto') == pick_device(None) == torch.device('cuda' if torch.cuda.is_available() else 'cpu')


# ----------------------------------------------------------------------------- eval

def _reference_metrics(model, data: Path, settings: InferenceSettings, classes: int) -> dict:
    acc = IoUAccumulator(classes)
    for img in sorted((data / 'images' / 'validation').glob('*.jpg')):
        pred = predict_labels(model, read_image(img)[0], settings)[0].numpy()
        acc.add(pred, np.asarray(Image.open(data / 'annotations' / 'validation' / (img.stem + '.png'))))
    return acc.summary()


def test_eval_reports_mmseg_metrics(tmp_path, standin, capsys):
    data = _ade_folder(tmp_path / 'ade', 3, standin.classes)
    out_json = tmp_path / 'm.json'
    code = cli.main(['eval', '--data', str(data), '--scale', '64', '32', '--json', str(out_json)])
    std = capsys.readouterr()
    assert code == 0
    assert '3/3' in std.err and 'per-class results' in std.out and 'class_4' in std.out
    ref = _reference_metrics(standin, data, InferenceSettings(scale=(64, 32)), standin.classes)
    got = json.loads(out_json.read_text())
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert got[key] == pytest.approx(ref[key], abs=1e-12)
    m = re.search(r'aAcc ([\d.]+)\s+mIoU ([\d.]+)\s+mAcc ([\d.]+)', std.out)
    assert float(m.group(2)) == pytest.approx(100 * ref['mIoU'], abs=0.006)
    assert len(got['per_class']['IoU']) == standin.classes


def test_eval_layout_errors(tmp_path, standin, capsys):
    assert cli.main(['eval', '--data', str(tmp_path)]) == 2
    assert 'images/validation' in capsys.readouterr().err
    data = _ade_folder(tmp_path / 'ade', 1, 5)
    (data / 'annotations' / 'validation' / 'img_0.png').unlink()
    assert cli.main(['eval', '--data', str(data)]) == 2
    assert 'no annotation' in capsys.readouterr().err


def test_eval_never_falls_back_to_random_weights(tmp_path, offline_hub, capsys):
    data = _ade_folder(tmp_path / 'ade', 1, 5)
    assert cli.main(['eval', '--data', str(data)]) == 2
    err = ' '.join(capsys.readouterr().err.split())
    assert 'upernet_twins_svt_large.ade20k: ' in err and 'not cached, and offline mode is on' in err


# ----------------------------------------------------------------------------- real adapter

@pytest.fixture(scope='module')
def saved_segmenter(tmp_path_factory):
    """A small real TwinsUPerNet (PCPVT-S, narrow decoder, random init) saved with save_pretrained."""
    from twins_timm.adapters import TwinsUPerNet, ade20k
    torch.manual_seed(0)
    model = TwinsUPerNet(encoder_name='twins_pcpvt_small', classes=150, decoder_channels=32,
                         aux_head=False, class_names=list(ade20k.CLASSES),
                         palette=[list(c) for c in ade20k.PALETTE]).eval()
    folder = tmp_path_factory.mktemp('model') / 'pcpvt_s_upernet'
    model.save_pretrained(str(folder))
    return folder


def test_segment_and_eval_with_real_adapter_folder(tmp_path, saved_segmenter, capsys):
    from twins_timm.adapters import from_pretrained
    model = from_pretrained(str(saved_segmenter)).eval()
    img = random_rgb(40, 56, 4)
    Image.fromarray(img).save(tmp_path / 'p.png')
    out = tmp_path / 'out'
    assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', str(saved_segmenter),
                     '--out', str(out), '--scale', '96', '48', '--quiet']) == 0
    settings = InferenceSettings(scale=(96, 48))
    assert np.array_equal(np.asarray(Image.open(out / 'p_labels.png')), predict_labels(model, img, settings)[0].numpy())
    data = _ade_folder(tmp_path / 'ade', 2, 150, size=(36, 48))
    out_json = tmp_path / 'm.json'
    assert cli.main(['eval', '--data', str(data), '--model', str(saved_segmenter), '--scale', '64', '32',
                     '--json', str(out_json), '--quiet']) == 0
    ref = _reference_metrics(model, data, InferenceSettings(scale=(64, 32)), 150)
    assert json.loads(out_json.read_text())['mIoU'] == pytest.approx(ref['mIoU'], abs=1e-12)
    assert 'wall' in capsys.readouterr().out  # ADE20K class names in the table


def test_hub_id_found_in_local_cache(offline_hub, saved_segmenter, hf_cache):
    hf_cache(offline_hub, 'someone/pcpvt-s-upernet', saved_segmenter)
    loaded = resolve.load_model('someone/pcpvt-s-upernet')
    assert not loaded.random_weights and 'Hub cache' in loaded.source
    assert loaded.model.classes == 150


def test_main_job_default_model_from_cache(offline_hub, saved_segmenter, tmp_path, capsys):
    from twins_timm import zoo
    from twins_timm.zoo import cache_entry
    entry = shutil.copytree(saved_segmenter, zoo.folder_for(resolve.DEFAULT_MODEL_ID))  # fetched earlier
    cache_entry.write_record(entry, zoo.WEIGHTS, zoo.MODELS[resolve.DEFAULT_MODEL_ID].url)
    out = tmp_path / 'out'
    assert cli.main(['segment', '--out', str(out), '--quiet', '--scale', '96', '64']) == 0
    std = capsys.readouterr()
    assert 'RANDOM' not in std.out + std.err and resolve.DEFAULT_MODEL_ID in std.out
    assert (out / 'coffee_labels.png').exists() and (out / 'coffee_overlay.png').exists()


def test_main_job_without_weights_runs_labelled_random_model(offline_hub, tmp_path, capsys):
    """The README's first command, offline with nothing cached: sample image, random weights.

    At a short side of 128 instead of 512 (--scale): the fallback model, sample photo and outputs are the
    README command's; no check here depends on the resolution, which made the forward 16x bigger."""
    out = tmp_path / 'out'
    assert cli.main(['segment', '--out', str(out), '--scale', '2048', '128']) == 0
    std = capsys.readouterr()
    assert 'No converted weights found' in std.err and 'RANDOM WEIGHTS' in std.out
    assert 'sample photo' in std.out and '1/1' in std.err
    assert sorted(p.name for p in out.iterdir()) == ['coffee_labels_RANDOM-WEIGHTS.png',
                                                     'coffee_overlay_RANDOM-WEIGHTS.png']
    label_png = Image.open(out / 'coffee_labels_RANDOM-WEIGHTS.png')
    assert 'RANDOM WEIGHTS' in label_png.text['Warning']  # the class map itself says so
    labels = np.asarray(label_png)
    assert labels.shape == (400, 600) and labels.max() < 150
    overlay_png = Image.open(out / 'coffee_overlay_RANDOM-WEIGHTS.png')
    assert 'RANDOM WEIGHTS' in overlay_png.text['Warning']
    overlay = np.asarray(overlay_png.convert('RGB'))
    assert overlay.shape[1] > 600 and overlay.shape[0] > 400  # legend panel, red banner on top
    assert tuple(overlay[2, 2]) == (200, 0, 0)
