"""Detection from keys and shapes: every manifest, foreign / ambiguous files, forced variants."""
import re

import pytest
import torch

from checkpoint_factory import kind_of, manifest, manifest_names, shapes_only
from marks import larger_variants_slow
from twins_timm.convert import DetectionError, convert_checkpoint, detect, normalize_variant, unwrap


def expected_from_name(name):
    """What the manifest's file name says the checkpoint is (independent of the detector)."""
    stem = name.split('/')[-1]
    family = 'svt' if ('alt_gvt' in stem or 'svt' in stem) else 'pcpvt'
    m = re.search(r'(small|base|large)', stem) or re.search(r'[_-]([sbl])(?:_|$)', stem)
    size = {'s': 'small', 'b': 'base', 'l': 'large'}.get(m.group(1), m.group(1))
    if 'fpn' in stem:
        task, classes = 'fpn', 150
    elif 'uper' in stem:
        task, classes = 'upernet', 150
    elif stem.startswith('seg_') or name.startswith('mmseg_pretrain/'):
        task, classes = 'backbone', 0
    else:
        task, classes = 'classification', 1000
    return family, size, task, classes


@pytest.mark.parametrize('name', larger_variants_slow(manifest_names()))
def test_detects_every_manifest_and_maps_every_key(name):
    m = manifest(name)
    sd = shapes_only(name)
    family, size, task, classes = expected_from_name(name)
    det = detect(sd, wrapper=m['wrapper'])
    assert (det.family, det.size, det.task, det.num_classes) == (family, size, task, classes)
    assert det.format == kind_of(name)
    assert det.aux_head == (task == 'upernet')

    # the whole mapping onto the target model (built with meta weights) accounts for every key
    res = convert_checkpoint({m['wrapper']: sd, 'meta': {}} if m['wrapper'] else sd)
    assert res.variant == 'twins_%s_%s' % (family, size)
    dropped = set(res.dropped)
    assert res.n_mapped + len(dropped) == len(sd)
    if kind_of(name) == 'official_seg':  # the segmentation backbone's unused classifier is reported
        assert 'head' in res.dropped_parts and 'dropped by default' in res.dropped_parts['head']
        assert {k for k in dropped} >= {'backbone.head.weight', 'backbone.head.bias'}
    else:
        assert not dropped
    if task in ('fpn', 'upernet'):
        assert all(k.startswith(('encoder.model.', 'decoder.', 'segmentation_head.', 'aux_head.'))
                   for k in res.state_dict)
        assert not any(k.startswith('encoder.model.' + p) for k in res.state_dict for p in ('head.', 'norm.'))
    stage_norms = any('stage_norms.' in k for k in res.state_dict)
    assert stage_norms == (family == 'svt' and kind_of(name) in ('official_seg', 'mmseg'))
    assert res.model_args.get('stage_norm', False) == stage_norms


def test_unwrap_handles_module_prefix_and_wrappers():
    sd = {'module.patch_embeds.0.proj.weight': torch.zeros(1)}
    out, wrapper, meta = unwrap({'model': sd, 'epoch': 3})
    assert wrapper == 'model' and list(out) == ['patch_embeds.0.proj.weight'] and meta == {}
    with pytest.raises(DetectionError, match='no state dict'):
        unwrap({'epoch': 3, 'lr': 0.1})
    with pytest.raises(DetectionError, match='not a state dict'):
        unwrap([torch.zeros(1)])


def test_foreign_checkpoints_are_rejected():
    import timm
    with torch.device('meta'):
        resnet = timm.create_model('resnet18').state_dict()
        swin = timm.create_model('swin_tiny_patch4_window7_224').state_dict()
    with pytest.raises(DetectionError, match='not a Twins checkpoint.*ResNet'):
        convert_checkpoint(resnet)
    with pytest.raises(DetectionError, match='not a Twins checkpoint.*Swin'):
        convert_checkpoint({'model': swin})


def test_ambiguous_and_unsupported_checkpoints_are_rejected():
    mixed = dict(shapes_only('official/pcpvt_small_v0'))
    mixed.update(shapes_only('mmseg/twins_pcpvt-s_fpn_ade20k'))
    with pytest.raises(DetectionError, match='ambiguous'):
        detect(mixed)
    both_heads = dict(shapes_only('official/fpn_pcpvt_s'))
    both_heads.update({k: v for k, v in shapes_only('official/upernet_pcpvt_s').items() if 'psp_modules' in k})
    with pytest.raises(DetectionError, match='ambiguous.*UPerNet.*FPN'):
        detect(both_heads)
    shallow = {k: v for k, v in shapes_only('official/pcpvt_small_v0').items() if not k.startswith('blocks.2.5.')}
    with pytest.raises(DetectionError, match=r'depths \[3, 4, 5, 3\].*matches none'):
        detect(shallow)
    odd_head = {k: v for k, v in shapes_only('official/fpn_pcpvt_s').items() if not k.startswith('neck.')}
    with pytest.raises(DetectionError, match='unsupported type'):
        detect(odd_head)


def test_wrong_variant_is_rejected_and_right_one_accepted():
    sd = shapes_only('official/upernet_alt_gvt_s')
    with pytest.raises(DetectionError, match='--variant twins_pcpvt_small does not match.*twins_svt_small'):
        convert_checkpoint({'state_dict': sd}, variant='pcpvt-s')
    with pytest.raises(DetectionError, match='--variant twins_svt_base does not match'):
        convert_checkpoint({'state_dict': sd}, variant='twins_svt_base')
    assert convert_checkpoint({'state_dict': sd}, variant='SVT-S').variant == 'twins_svt_small'
    assert normalize_variant('alt_gvt_large') == 'twins_svt_large'
    with pytest.raises(DetectionError, match='unknown variant'):
        normalize_variant('vit_small')
