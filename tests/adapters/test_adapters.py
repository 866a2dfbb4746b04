"""Segmentation adapters: SMP model API, state-dict layout, input sizes, hub round trip."""
import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

import twins_timm  # noqa: F401  registers the Twins variants with timm
from builders import on_meta, seeded
from twins_timm.adapters import (MMSEG_MEAN, MMSEG_STD, TwinsEncoder, TwinsFPN, TwinsUPerNet,
                                 ade20k, from_pretrained, read_config)
from twins_timm.models.twins import checkpoint_family_args

MANIFESTS = Path(__file__).parents[1] / 'fixtures' / 'manifests'
VARIANTS = [f'twins_{f}_{s}' for f in ('pcpvt', 'svt') for s in ('small', 'base', 'large')]


def _small_model(cls=TwinsUPerNet, variant='twins_svt_small', build=seeded, **kw):
    """An SVT-S segmenter with 5 classes and seeded random weights (``build=on_meta``: no values)."""
    torch.manual_seed(0)
    args = dict(encoder_name=variant, classes=5, encoder_args=checkpoint_family_args('mmseg', variant))
    args.update(kw)
    return build(cls, **args).eval()


# ------------------------------------------------------------------------------ API and layout
@pytest.mark.parametrize('cls', [TwinsUPerNet, TwinsFPN])
def test_models_are_smp_models_with_metadata(cls):
    model = _small_model(cls, build=on_meta)  # metadata only: no weight values needed
    assert isinstance(model, smp.base.SegmentationModel)
    for method in ('save_pretrained', 'from_pretrained', 'push_to_hub', 'predict', 'freeze_encoder'):
        assert callable(getattr(model, method))
    assert model.classes == 5 and model.class_names == [f'class_{i}' for i in range(5)]
    assert len(model.palette) == 5 and all(len(c) == 3 for c in model.palette)
    assert model.mean == MMSEG_MEAN and model.std == MMSEG_STD
    assert model.encoder.model.stage_norms is not None  # mmseg SVT options reached the backbone
    ade = on_meta(cls, encoder_name='twins_pcpvt_small')
    assert ade.classes == 150 and ade.class_names == list(ade20k.CLASSES)
    assert ade.palette == [list(c) for c in ade20k.PALETTE]


@pytest.mark.parametrize('task', ['fpn', 'upernet', 'classify'])
def test_builds_on_meta_skip_the_weight_init(task, monkeypatch):
    """The converter's and loaders' meta builds run no init (on meta it only costs time: ~0.1-0.3 s a model);
    a build that holds values still initialises every layer timm's and SMP's way."""
    from segmentation_models_pytorch.base import initialization
    from twins_timm.convert.build import make_model
    from twins_timm.models import twins

    calls = []
    monkeypatch.setattr(twins.Twins, '_init_weights', lambda self, m: calls.append('twins'))
    for name in ('initialize_decoder', 'initialize_head'):
        monkeypatch.setattr(initialization, name, lambda module, name=name: calls.append(name))
    model = make_model('twins_svt_small', task, 5, {}, aux_head=True, device='meta')
    assert next(model.parameters()).is_meta and calls == []
    make_model('twins_svt_small', task, 5, {}, aux_head=True)
    assert 'twins' in calls
    assert ('initialize_decoder' in calls) == (task != 'classify')


def test_ade20k_metadata_is_mmseg_s():
    from mmseg_reference import require_mmseg
    require_mmseg()
    from mmseg.datasets import ADE20KDataset
    assert list(ade20k.CLASSES) == list(ADE20KDataset.METAINFO['classes'])
    assert [list(c) for c in ade20k.PALETTE] == [list(c) for c in ADE20KDataset.METAINFO['palette']]


def _mmseg_to_ours(key):
    for src, dst in (('decode_head.conv_seg.', 'segmentation_head.conv_seg.'),
                     ('decode_head.', 'decoder.'), ('neck.', 'decoder.neck.'),
                     ('auxiliary_head.', 'aux_head.')):
        if key.startswith(src):
            return dst + key[len(src):]
    return None


@pytest.mark.parametrize('manifest', sorted(p.stem for p in (MANIFESTS / 'mmseg').glob('*.json')))
def test_head_keys_are_mmseg_names(manifest):
    """Every non-backbone key of the real mmseg files has its contract name and shape in our model."""
    from twins_timm.convert import target_shapes
    keys = json.loads((MANIFESTS / 'mmseg' / f'{manifest}.json').read_text())['keys']
    family, size = manifest.split('_')[1].split('-')
    variant = f"twins_{family}_{dict(s='small', b='base', l='large')[size]}"
    task = 'upernet' if 'uperhead' in manifest else 'fpn'
    ours = target_shapes(variant, task, 150, checkpoint_family_args('mmseg', variant),
                         aux_head=task == 'upernet')
    expected = {_mmseg_to_ours(k): tuple(v) for k, v in keys.items() if not k.startswith('backbone.')}
    assert {k: v for k, v in ours.items() if not k.startswith('encoder.')} == expected


@pytest.mark.parametrize('manifest', sorted(p.stem for p in (MANIFESTS / 'official').glob('*.json')
                                            if p.stem.startswith(('upernet_', 'fpn_'))))
def test_encoder_keys_are_timm_names(manifest):
    """encoder.model.<timm key>: the official segmentation files' backbone keys, minus the unused
    final norm and classifier, with `norm_list` as timm's `stage_norms`."""
    from twins_timm.convert import target_shapes
    keys = json.loads((MANIFESTS / 'official' / f'{manifest}.json').read_text())['keys']
    head, arch, size = manifest.split('_')[0], manifest.split('_')[1:-1], manifest.split('_')[-1]
    variant = f"twins_{'svt' if arch == ['alt', 'gvt'] else 'pcpvt'}_" \
              f"{dict(s='small', b='base', l='large')[size]}"
    ours = target_shapes(variant, head, 150, checkpoint_family_args('official_seg', variant),
                         aux_head=head == 'upernet')
    expected = {}
    for key, shape in keys.items():
        if not key.startswith('backbone.') or key.startswith(('backbone.norm.', 'backbone.head.')):
            continue
        name = key[len('backbone.'):].replace('norm_list.', 'stage_norms.')
        expected['encoder.model.' + name] = tuple(shape)
    assert {k: v for k, v in ours.items() if k.startswith('encoder.')} == expected


# ------------------------------------------------------------------------------ input sizes
@pytest.mark.parametrize('cls', [TwinsUPerNet, TwinsFPN])
def test_any_size_from_32_up(cls):
    model = _small_model(cls, decoder_channels=64) if cls is TwinsUPerNet else _small_model(cls)
    with torch.no_grad():
        for h, w in [(32, 32), (33, 47), (97, 45)]:
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 5, h, w) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='at least 32'):
        model(torch.randn(1, 3, 31, 64))


def test_batch_items_are_independent():
    model = _small_model(TwinsFPN)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        both = model(x)
        one = model(x[1:])
    assert (both[1:] - one).abs().max() < 1e-4


# ------------------------------------------------------------------------------ SMP encoders
def test_twins_encoder_works_in_smp_decoders():
    """TwinsEncoder follows SMP's encoder convention, so SMP's own decoders take it."""
    enc = seeded(TwinsEncoder, 'twins_pcpvt_small', **checkpoint_family_args('mmseg', 'twins_pcpvt_small'))
    assert enc.out_channels == [3, 0, 64, 128, 320, 512] and enc.output_stride == 32
    assert all(k.startswith('model.') and not k.startswith(('model.head', 'model.norm.'))
               for k in enc.state_dict())
    decoder = smp.decoders.upernet.decoder.UPerNetDecoder(enc.out_channels, decoder_channels=32).eval()
    with torch.no_grad():
        out = decoder(enc(torch.randn(1, 3, 64, 96)))
    assert out.shape == (1, 32, 16, 24)


def test_tu_twins_encoder_in_stock_smp_models():
    """`tu-twins_*` after `import twins_timm`, backbone options passed through SMP's kwargs."""
    unet = seeded(smp.Unet, 'tu-twins_svt_small', encoder_weights=None, classes=3, stage_norm=True,
                  window_mask=True)
    assert any('stage_norms' in k for k in unet.state_dict())
    upernet = seeded(smp.UPerNet, 'tu-twins_pcpvt_small', encoder_weights=None, classes=3)
    with torch.no_grad():
        assert unet(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
        assert upernet(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)


# ------------------------------------------------------------------------------ hub round trip
@pytest.mark.parametrize('cls', [TwinsUPerNet, TwinsFPN])
def test_save_and_load_pretrained(cls, tmp_path):
    names = [f'thing {i}' for i in range(5)]
    palette = [[i * 40, 255 - i * 40, 7] for i in range(5)]
    model = _small_model(cls, class_names=names, palette=palette, mean=(1.0, 2.0, 3.0),
                         std=(4.0, 5.0, 6.0), **({'decoder_channels': 64} if cls is TwinsUPerNet else {}))
    with torch.no_grad():  # make BN statistics non-default so they must round-trip too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / 'saved', metrics={'mIoU': 12.5}, dataset='toy shapes')
    config = json.loads((tmp_path / 'saved' / 'config.json').read_text())
    assert config['_model_class'] == cls.__name__
    assert config['class_names'] == names and config['palette'] == palette
    assert config['mean'] == [1.0, 2.0, 3.0] and config['std'] == [4.0, 5.0, 6.0]
    assert config['encoder_args'] == checkpoint_family_args('mmseg', 'twins_svt_small')
    assert (tmp_path / 'saved' / 'model.safetensors').is_file()
    card = (tmp_path / 'saved' / 'README.md').read_text()
    assert 'twins_timm.adapters import from_pretrained' in card and '"mIoU": 12.5' in card and 'toy shapes' in card
    assert 'Converted with' not in card  # no conversion, no provenance table

    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        expected = model(x)
    for loaded in (from_pretrained(tmp_path / 'saved'), cls.from_pretrained(str(tmp_path / 'saved'))):
        assert type(loaded) is cls and not loaded.training
        assert loaded.class_names == names and loaded.palette == palette
        assert loaded.mean == (1.0, 2.0, 3.0)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)
    assert read_config(tmp_path / 'saved')['classes'] == 5


def test_from_pretrained_adopts_the_file_without_random_init(tmp_path, monkeypatch, hf_cache):
    """Built on the meta device: no init runs, the loaded tensors are copies (a file overwritten in place
    later leaves the model as loaded) in the model's dtype; a Hub repo with only the pickle file loads too."""
    from safetensors.torch import save_file
    from twins_timm.models import twins
    model = _small_model(TwinsFPN)
    model.save_pretrained(tmp_path / 'saved')
    state = model.state_dict()
    monkeypatch.setattr(twins.Twins, '_init_weights', lambda self, m: pytest.fail('random init ran'))

    def loads_as(loaded, expected):
        got = loaded.state_dict()
        assert not loaded.training and not any(t.is_meta for t in got.values())
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in state.items()}
        return all(torch.equal(got[k], v) for k, v in expected.items())

    loaded = from_pretrained(tmp_path / 'saved')
    assert loads_as(loaded, state)
    with open(tmp_path / 'saved' / 'model.safetensors', 'r+b') as f:  # overwrite every byte in place
        f.write(b'\0' * len(f.read()))
    assert loads_as(loaded, state)

    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(tmp_path / 'saved' / 'model.safetensors'))
    assert loads_as(from_pretrained(tmp_path / 'saved'), {k: v.to(state[k].dtype) for k, v in half.items()})

    (tmp_path / 'saved' / 'model.safetensors').unlink()
    torch.save(state, tmp_path / 'saved' / 'pytorch_model.bin')
    hf_cache(tmp_path / 'cache', 'someone/old-format', tmp_path / 'saved')
    assert loads_as(TwinsFPN.from_pretrained('someone/old-format', cache_dir=tmp_path / 'cache',
                                             local_files_only=True), state)


def test_from_pretrained_strict_false_initialises_what_the_file_lacks(tmp_path):
    """strict=False with a key missing: the mixin's own way (random init, then the file), nothing on meta."""
    from safetensors.torch import load_file, save_file
    model = _small_model(TwinsFPN)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / 'model.safetensors'))
    missing = 'segmentation_head.conv_seg.weight'
    save_file({k: v for k, v in state.items() if k != missing}, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError, match=r'does not fit .*1 tensor\(s\) missing: segmentation_head.conv_seg.weight'):
        from_pretrained(tmp_path)
    loaded = TwinsFPN.from_pretrained(str(tmp_path), strict=False)
    got = loaded.state_dict()
    assert not any(t.is_meta for t in got.values()) and not loaded.training
    assert all(torch.equal(got[k], v) for k, v in state.items() if k != missing)
    assert got[missing].abs().sum() > 0 and not torch.equal(got[missing], model.state_dict()[missing])


def test_ade20k_names_and_palette_in_config(tmp_path):
    model = seeded(TwinsFPN, encoder_name='twins_pcpvt_small')
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['class_names'] == list(ade20k.CLASSES)
    assert config['palette'] == [list(c) for c in ade20k.PALETTE]
    assert config['mean'] == list(MMSEG_MEAN) and config['std'] == list(MMSEG_STD)


def test_from_local_hf_cache_offline(tmp_path, hf_cache, hf_offline):
    model = _small_model(TwinsUPerNet, decoder_channels=64)
    model.save_pretrained(tmp_path / 'saved', metrics={'mIoU': 12.5}, dataset='toy shapes')
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        expected = model(x)
    hf_cache(tmp_path / 'cache', 'someone/twins-upernet-test', tmp_path / 'saved')
    hf_offline(tmp_path / 'cache')
    loaded = from_pretrained('someone/twins-upernet-test')
    assert type(loaded) is TwinsUPerNet
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


# ------------------------------------------------------------------------------ errors
def test_bad_arguments_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match='class_names has 2 entries but classes=5'):
        TwinsFPN(encoder_name='twins_pcpvt_small', classes=5, class_names=['a', 'b'])
    with pytest.raises(ValueError, match='palette'):
        TwinsFPN(encoder_name='twins_pcpvt_small', classes=2, palette=[[0, 0, 0], [0, 0, 300]])
    with pytest.raises(ValueError, match='Twins backbones'):
        TwinsUPerNet(encoder_name='resnet50')
    with pytest.raises(FileNotFoundError, match='save_pretrained'):
        from_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({'_model_class': 'Unet'}))
    with pytest.raises(ValueError, match='not a twins_timm segmenter'):
        from_pretrained(tmp_path)
