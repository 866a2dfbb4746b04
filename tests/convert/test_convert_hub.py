"""Outputs: timm Hub folders (local-dir: and hf-hub: from an offline HF cache), segmenter folders, dtypes."""
import json
import os
import textwrap

import pytest
import torch

from checkpoint_factory import random_state_dict, wrap, write_checkpoint
from fresh_python import fresh_python
from twins_timm.convert import build_model, convert_checkpoint, save



@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('hub')


@pytest.fixture(scope='module')
def cls_folder(work):
    src = write_checkpoint('official/alt_gvt_small', work / 'alt_gvt_small.pth', seed=7, training_extras=True)
    res = convert_checkpoint(src)
    info = save(res, work / 'twins_svt_small.in1k', parity=True)
    return res, info


def test_timm_folder_contents(cls_folder):
    res, info = cls_folder
    folder = info.path
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['architecture'] == 'twins_svt_small' and cfg['num_classes'] == 1000
    assert cfg['model_args']['num_classes'] == 1000 and 'pretrained_cfg' in cfg
    assert cfg['twins_timm']['format'] == 'official_cls'
    card = (folder / 'README.md').read_text()
    for needle in ('alt_gvt_small.pth', 'official Twins classification', 'twins_svt_small', 'Apache-2.0',
                   'Parity at conversion: max |converted - timm Twins|'):
        assert needle in card, needle
    assert info.parity['max_abs_diff'] <= 1e-5
    assert len(info.sha256) == 64 and info.kind == 'timm folder'
    # no temporaries left beside the output
    assert not [p for p in folder.parent.iterdir() if '.partial-' in p.name]


def test_timm_folder_loads_with_local_dir(cls_folder):
    import timm

    res, info = cls_folder
    model = timm.create_model('local-dir:%s' % info.path, pretrained=True).eval()
    ref = build_model(res)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.slow  # a faster sibling covers the same code
def test_folders_load_offline_from_a_local_hf_cache(work, cls_folder, hf_cache):
    res, info = cls_folder
    cache = work / 'hf_cache'
    hf_cache(cache, 'twins-test/svt-small', info.path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({'x': x, 'y': build_model(res)(x)}, work / 'expected_cls.pt')
    seg_res, seg_info = _seg(work)
    hf_cache(cache, 'twins-test/fpn-svt-small', seg_info.path)
    with torch.no_grad():
        torch.save({'y': build_model(seg_res)(x)}, work / 'expected_seg.pt')
    seg_check = textwrap.dedent('''
        from twins_timm.adapters import from_pretrained
        seg = from_pretrained('twins-test/fpn-svt-small').eval()
        with torch.no_grad():
            d = (seg(e['x']) - torch.load(work + '/expected_seg.pt')['y']).abs().max().item()
        assert d == 0, d
        print('seg ok', seg.classes)
    ''')
    script = textwrap.dedent('''
        import sys, torch, timm, twins_timm
        work = sys.argv[1]
        e = torch.load(work + '/expected_cls.pt')
        m = timm.create_model('hf-hub:twins-test/svt-small', pretrained=True).eval()
        with torch.no_grad():
            d = (m(e['x']) - e['y']).abs().max().item()
        assert d == 0, d
        print('timm ok', m.num_classes)
    ''') + seg_check
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(work / 'hf_home'),
               HF_HUB_DISABLE_TELEMETRY='1')
    out = fresh_python(script, argv=[work], env=env)  # huggingface_hub reads HF_HUB_* when imported
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'timm ok 1000' in out.stdout
    assert 'seg ok 150' in out.stdout


_SEG = {}
SEG_NAME = 'official/fpn_alt_gvt_s'  # SVT: exercises the official-seg settings (stage norms, window mask)


def _seg(work):
    """One converted segmenter folder shared by the tests (converted from memory to save disk time)."""
    if 'v' not in _SEG:
        res = convert_checkpoint(wrap(SEG_NAME, random_state_dict(SEG_NAME, seed=8)))
        _SEG['v'] = (res, save(res, work / 'fpn_svt_s'))
    return _SEG['v']


def test_segmenter_folder_loads_with_the_adapter(work):
    from twins_timm.adapters import TwinsFPN, from_pretrained
    from twins_timm.models.twins import checkpoint_family_args

    res, info = _seg(work)
    assert info.kind == 'segmenter folder'
    assert sorted(p.name for p in info.path.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    model = from_pretrained(str(info.path)).eval()
    assert isinstance(model, TwinsFPN)
    assert model.classes == 150 and model.class_names[:2] == ['class_000', 'class_001']  # from the file's meta
    cfg = json.loads((info.path / 'config.json').read_text())
    assert cfg['encoder_args'] == checkpoint_family_args('official_seg', 'twins_svt_small')
    sd = model.state_dict()
    assert set(sd) == set(res.state_dict)
    assert all(torch.equal(sd[k], res.state_dict[k]) for k in sd)
    card = (info.path / 'README.md').read_text()
    assert 'official Twins segmentation' in card and 'unused classification head' in card
    assert '(in-memory state dict)' in card
    # one card writer: the conversion's provenance and the adapter's init parameters in the same card
    assert '## Model init parameters' in card and 'from_pretrained' in card


def test_dtype_and_safetensors_output(work):
    res = convert_checkpoint(write_checkpoint('official/pcpvt_small_v0', work / 'pcpvt_small.pth', seed=9))
    from safetensors.torch import load_file

    info = save(res, work / 'pcpvt_s_fp16.safetensors', dtype='fp16')
    got = load_file(str(info.path))
    assert got['blocks.0.0.attn.q.weight'].dtype == torch.float16
    assert torch.equal(got['head.bias'], res.state_dict['head.bias'].half())
    back = convert_checkpoint(info.path)
    assert (back.format, back.variant, back.task) == ('timm', 'twins_pcpvt_small', 'classification')
    info = save(res, work / 'pcpvt_s_bf16', dtype='bf16', parity=False)
    assert load_file(str(info.weights))['head.weight'].dtype == torch.bfloat16
    with pytest.raises(ValueError, match='unknown dtype'):
        save(res, work / 'x', dtype='int8')
    with pytest.raises(ValueError, match='--to mmseg'):
        save(res, work / 'x.pth')


def test_family_settings_travel_with_the_timm_folder(work):
    """An official-seg SVT backbone needs stage norms + window mask: config.json records them, timm honours them."""
    import timm

    name = 'official/seg_alt_gvt_small'
    res = convert_checkpoint(wrap(name, random_state_dict(name, seed=10)))
    info = save(res, work / 'seg_svt_s_backbone', parity=False)
    cfg = json.loads((info.path / 'config.json').read_text())
    assert cfg['model_args']['stage_norm'] is True and cfg['model_args']['window_mask'] is True
    assert cfg['num_classes'] == 0 and cfg['twins_timm']['dropped'] == ['head']
    model = timm.create_model('local-dir:%s' % info.path, pretrained=True)
    assert model.stage_norms is not None and torch.equal(model.stage_norms[2].weight,
                                                         res.state_dict['stage_norms.2.weight'])
    # the folder converts again (timm format, passed through) with the same settings
    again = convert_checkpoint(info.path)
    assert (again.format, again.task, again.model_args) == ('timm', 'backbone', res.model_args)
    assert all(torch.equal(again.state_dict[k], v) for k, v in res.state_dict.items())
