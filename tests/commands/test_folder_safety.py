"""What a model folder or checkpoint may make us load, and clean errors for broken ones (issue 27).

A folder's config.json passes only the keys twins_timm defines, each type-checked, before anything is built;
broken weights (truncated, empty, a header bomb, a device or FIFO, shapes that do not fit, NaN / Inf) are one
paragraph and exit code 2 through the commands and a ValueError from ``from_pretrained``, before inference.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_checks import one_paragraph as _one_paragraph
from tools_standin import random_rgb
from twins_timm import cli
from twins_timm.adapters import TwinsFPN, from_pretrained
from twins_timm.commands import evaluate as evaluate_mod
from twins_timm.commands import segment as segment_mod

CLASSES = 3
TINY = dict(encoder_name='twins_pcpvt_small', classes=CLASSES, decoder_pyramid_channels=16,
            decoder_segmentation_channels=16, encoder_args=dict(depths=[1, 1, 1, 1], norm_eps=1e-5))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('saved') / 'fpn'
    TwinsFPN(**TINY).save_pretrained(str(folder))
    return folder


def _copy(saved, tmp_path, edit_config=None, edit_weights=None):
    folder = tmp_path / 'model'
    shutil.copytree(saved, folder)
    if edit_config is not None:
        config = json.loads((folder / 'config.json').read_text())
        edit_config(config)
        (folder / 'config.json').write_text(json.dumps(config))
    if edit_weights is not None:
        edit_weights(folder / 'model.safetensors')
    return folder


def _forbid(monkeypatch, why, *targets):
    """Fail the test if any of ``targets`` ((module, name) pairs) is called."""
    def fail(*a, **k):
        raise AssertionError(why)
    for module, name in targets:
        monkeypatch.setattr(module, name, fail)


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a backbone is created or default class names / colours are made."""
    from twins_timm.adapters import base, encoder
    _forbid(monkeypatch, 'built before config.json was checked', (encoder.timm, 'create_model'),
            (base, 'default_class_names'), (base, 'default_palette'))


def _set_encoder_arg(key, value):
    return lambda c: c['encoder_args'].update({key: value})


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize('edit, named, allowed', [
    (_set_encoder_arg('checkpoint_path', 'x.pth'), "'checkpoint_path'", 'stage_norm, window_mask, norm_eps'),
    (_set_encoder_arg('pretrained_cfg_overlay', {'file': 'x.pth'}), "'pretrained_cfg_overlay'", 'patch_padding'),
    (_set_encoder_arg('pretrained', True), "'pretrained'", 'drop_path_rate'),
    (_set_encoder_arg('features_only', True), "'features_only'", 'depths'),
    (lambda c: c.update(pretrained_checkpoint='x.pth'), "'pretrained_checkpoint'", 'classes, encoder_args'),
], ids=['checkpoint_path', 'pretrained_cfg_overlay', 'pretrained', 'features_only', 'top-level'])
def test_keys_we_do_not_define_are_refused_naming_the_allowed_ones(saved, tmp_path, nothing_built, edit, named,
                                                                   allowed):
    from twins_timm.adapters.config import ConfigError
    folder = _copy(saved, tmp_path, edit)
    for load in (from_pretrained, lambda f: TwinsFPN.from_pretrained(str(f))):
        with pytest.raises(ConfigError) as e:
            load(folder)
        assert named in str(e.value) and allowed in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.update(classes=10 ** 9), "'classes' must be an integer from 1 to 65535, got 1000000000"),
    (lambda c: c.update(classes=True), "'classes' must be an integer"),
    (lambda c: c.update(encoder_weights=True), "'encoder_weights' must be null"),  # would download
    (lambda c: c.update(pretrained_cfg={'file': '/etc/passwd'}), "'pretrained_cfg' must be {}"),
    (lambda c: c.update(encoder_name='resnet50'), "'encoder_name' must be a Twins variant"),
    (lambda c: c.update(architecture='resnet50'), "'architecture' must be a Twins variant"),  # timm's local-dir:
    (lambda c: c.update(palette='red'), "'palette' must be null or"),
    (_set_encoder_arg('stage_norm', 'yes'), "'stage_norm' must be true or false, got 'yes'"),
    (_set_encoder_arg('norm_eps', -1), "'norm_eps' must be a number above 0"),
    (_set_encoder_arg('depths', [1, 1, 10 ** 6, 1]), "'depths' must be 4 integers from 1 to 64"),
    (lambda c: c.update(encoder_args=['stage_norm']), "'encoder_args' must be an object of backbone settings"),
])
def test_values_are_type_checked_before_anything_is_built(saved, tmp_path, nothing_built, edit, message):
    folder = _copy(saved, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        from_pretrained(folder)
    assert message in str(e.value)


def test_config_that_is_not_a_json_object(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    for text, message in (('{"classes": ', 'is not a JSON file'), ('[1, 2]', 'holds a JSON list')):
        (folder / 'config.json').write_text(text)
        with pytest.raises(ValueError, match=message):
            from_pretrained(folder)
    (folder / 'config.json').unlink()
    os.mkfifo(folder / 'config.json')  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match='config.json is not a regular file'):
        from_pretrained(folder)


def test_the_constructor_and_save_pretrained_follow_the_same_rules(tmp_path):
    """What the loader would refuse is refused when built or saved: every saved folder loads back."""
    from twins_timm.adapters.config import ConfigError
    with pytest.raises(ConfigError, match="'checkpoint_path'.*the keys are: stage_norm"):
        TwinsFPN(**dict(TINY, encoder_args=dict(checkpoint_path='x.pth')))
    with pytest.raises(ValueError, match='classes must be an integer from 1 to 65535'):
        TwinsFPN(**dict(TINY, classes=10 ** 9))
    model = TwinsFPN(**dict(TINY, in_channels=1025))
    with pytest.raises(ConfigError, match="'in_channels' must be an integer from 1 to 1024, got 1025"):
        model.save_pretrained(str(tmp_path / 'x'))
    assert not (tmp_path / 'x').exists()


def test_convert_refuses_unknown_model_args_of_a_timm_folder(tmp_path, capsys):
    from checkpoint_factory import random_state_dict
    folder = tmp_path / 'timm'
    folder.mkdir()
    state = {k: v for k, v in random_state_dict('official/pcpvt_small_v0').items() if not k.startswith('head.')}
    save_file(state, str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps({'architecture': 'twins_pcpvt_small', 'num_classes': 0,
                                                    'model_args': {'checkpoint_path': '/tmp/evil.pth'}}))
    try:
        assert cli.main(['convert', str(folder), str(tmp_path / 'out')]) == 2
    finally:
        (folder / 'model.safetensors').unlink()
    err = _one_paragraph(capsys, 'convert')
    assert "model_args has the key 'checkpoint_path'" in err and 'the keys are: stage_norm' in err
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------- broken weights

def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _empty(path):
    path.write_bytes(b'')


def _header_bomb(path):  # a header length of 2**62 bytes
    path.write_bytes((1 << 62).to_bytes(8, 'little') + b'{}')


def _huge_tensor(path):  # a valid header promising far more data than the file holds
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [1 << 40], 'data_offsets': [0, 4 << 40]}}).encode()
    path.write_bytes(len(header).to_bytes(8, 'little') + header)


def _dev_zero(path):
    path.unlink()
    os.symlink('/dev/zero', path)


def _fifo(path):  # opening it for reading would wait for a writer forever
    path.unlink()
    os.mkfifo(path)


def _nan_bias(path):
    state = load_file(str(path))
    state['segmentation_head.conv_seg.bias'][1] = float('nan')
    save_file(state, str(path))


def _inf_weight(path):
    state = load_file(str(path))
    state['encoder.model.patch_embeds.0.proj.weight'][0, 0, 0, 0] = float('inf')
    save_file(state, str(path))


def _other_classes(path):
    state = load_file(str(path))
    state['segmentation_head.conv_seg.weight'] = state['segmentation_head.conv_seg.weight'][:2].clone()
    state['segmentation_head.conv_seg.bias'] = state['segmentation_head.conv_seg.bias'][:2].clone()
    save_file(state, str(path))


BROKEN = {
    'truncated': (_truncate, 'not a valid safetensors file'),
    'empty': (_empty, 'is empty (0 bytes)'),
    'header-bomb': (_header_bomb, 'not a valid safetensors file'),
    'huge-tensor': (_huge_tensor, 'not a valid safetensors file'),
    'dev-zero': (_dev_zero, 'is not a regular file'),
    'fifo': (_fifo, 'is not a regular file'),
    'nan': (_nan_bias, 'NaN or infinite values in 1 tensor(s) (segmentation_head.conv_seg.bias)'),
    'inf': (_inf_weight, 'NaN or infinite values in 1 tensor(s) (encoder.model.patch_embeds.0.proj.weight)'),
    'shapes': (_other_classes, 'does not fit the model its config.json describes (2 tensor(s) of another shape: '
                               'segmentation_head.conv_seg.bias (2,) where the model has (3,)'),
}


@pytest.fixture
def no_inference(monkeypatch):
    _forbid(monkeypatch, 'inference ran with broken weights', (segment_mod, 'predict_labels'),
            (evaluate_mod, 'evaluate'))


def _ade_folder(root):
    for sub in ('images', 'annotations'):
        (root / sub / 'validation').mkdir(parents=True)
    Image.fromarray(random_rgb(40, 48)).save(root / 'images' / 'validation' / 'x.jpg')
    Image.fromarray(np.ones((40, 48), np.uint8)).save(root / 'annotations' / 'validation' / 'x.png')
    return root


@pytest.mark.parametrize('case', list(BROKEN))
def test_broken_weights_are_one_paragraph_before_inference(saved, tmp_path, no_inference, capsys, case):
    break_it, message = BROKEN[case]
    folder = _copy(saved, tmp_path, edit_weights=break_it)
    with pytest.raises(ValueError) as e:  # a ValueError subclass, not safetensors' or torch's own error
        from_pretrained(folder)
    assert message in str(e.value) and type(e.value).__module__.startswith('twins_timm')
    Image.fromarray(random_rgb(40, 48)).save(tmp_path / 'p.png')
    assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', str(folder), '--out', str(tmp_path / 'o'),
                     '--quiet']) == 2
    assert message in _one_paragraph(capsys, 'segment')
    assert not (tmp_path / 'o').exists() or not any((tmp_path / 'o').iterdir())
    assert cli.main(['eval', '--data', str(_ade_folder(tmp_path / 'ade')), '--model', str(folder), '--quiet']) == 2
    assert message in _one_paragraph(capsys, 'eval')


def test_non_finite_weights_of_a_checkpoint_file_are_refused(tmp_path, no_inference, capsys):
    from checkpoint_factory import random_state_dict, write_checkpoint
    name = 'mmseg/twins_pcpvt-s_fpn_ade20k'
    sd = random_state_dict(name)
    sd['decode_head.conv_seg.bias'][7] = float('nan')
    ckpt = write_checkpoint(name, tmp_path / 'fpn.pth', sd=sd)
    Image.fromarray(random_rgb(40, 48)).save(tmp_path / 'p.png')
    try:
        assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', str(ckpt), '--out', str(tmp_path / 'o'),
                         '--quiet']) == 2
    finally:
        ckpt.unlink()
    assert 'NaN or infinite values in 1 tensor(s) (segmentation_head.conv_seg.bias)' in _one_paragraph(capsys,
                                                                                                      'segment')


def test_non_finite_logits_stop_with_a_clear_error(saved, tmp_path, capsys):
    """Finite weights can still overflow (extreme values, half precision): an argmax over NaN would label
    every pixel with one class and exit 0."""
    def overflowing(path):
        state = load_file(str(path))
        state['segmentation_head.conv_seg.weight'].fill_(3e38)
        save_file(state, str(path))
    folder = _copy(saved, tmp_path, edit_weights=overflowing)
    from twins_timm.inference.predict import InferenceSettings, NonFiniteLogitsError, predict_labels
    with pytest.raises(NonFiniteLogitsError, match='NaN or infinite logits'):
        predict_labels(from_pretrained(folder), random_rgb(40, 48), InferenceSettings(scale=None))
    Image.fromarray(random_rgb(40, 48)).save(tmp_path / 'p.png')
    assert cli.main(['segment', str(tmp_path / 'p.png'), '--model', str(folder), '--out', str(tmp_path / 'o'),
                     '--quiet', '--no-resize']) == 2
    assert 'NaN or infinite logits' in _one_paragraph(capsys, 'segment')
    assert not list((tmp_path / 'o').glob('*.png'))
    assert cli.main(['eval', '--data', str(_ade_folder(tmp_path / 'ade')), '--model', str(folder), '--quiet',
                     '--no-resize', '--mode', 'slide', '--crop-size', '32', '--stride', '24']) == 2
    assert 'NaN or infinite logits' in _one_paragraph(capsys, 'eval')
