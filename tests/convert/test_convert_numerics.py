"""Converted models compute what the source family computes.

* official classification -> equals timm's own ``Twins`` class on the same tensors;
* official segmentation SVT backbone -> the official segmentation computation (LayerNorm after each
  stage inside the trunk, eps 1e-6), written out here from timm's Twins modules;
* mmseg checkpoints -> mmseg's own Twins backbone (whole segmentor logits: the adapter's tests).
"""
import pytest
import torch
import torch.nn.functional as F

from checkpoint_factory import random_state_dict, wrap
from references import timm_reference
from twins_timm.convert import build_model, convert_checkpoint
from twins_timm.models.twins import checkpoint_family_args


@pytest.mark.parametrize('name,variant', [('official/alt_gvt_small', 'twins_svt_small'),
                                          ('official/pcpvt_small_v0', 'twins_pcpvt_small')])
def test_official_classification_equals_timm_twins(name, variant):
    src = random_state_dict(name, seed=21)
    res = convert_checkpoint(wrap(name, src, training_extras=False))
    assert res.model_args == checkpoint_family_args('official_cls', variant) == {}
    ours = build_model(res)
    ref = timm_reference(variant, src, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 112, 112), (1, 3, 96, 160)):   # both need window padding in SVT
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == (shape[0], 1000)
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, (shape, diff)


def test_official_seg_svt_backbone_reproduces_official_seg_computation():
    name = 'official/seg_alt_gvt_small'
    src = random_state_dict(name, seed=22)
    res = convert_checkpoint(wrap(name, src))
    assert res.model_args == checkpoint_family_args('official_seg', 'twins_svt_small')
    assert res.model_args.get('stage_norm') and res.model_args.get('window_mask')
    assert 'head' in res.dropped_parts and 'norm.weight' in res.state_dict
    ours = build_model(res)
    eps = {n: m.eps for n, m in ours.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps['stage_norms.0'] == eps['blocks.2.3.norm1'] == eps['norm'] == 1e-6
    assert eps['patch_embeds.0.norm'] == eps['blocks.0.1.attn.norm'] == 1e-5

    # reference: the official segmentation forward, from timm's modules and the file's norm_list
    bb = {k[len('backbone.'):]: v for k, v in src.items()}
    ref = timm_reference('twins_svt_small', {k: v for k, v in bb.items() if not k.startswith('norm_list.')},
                         num_classes=1000)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))  # no window padding at 224
    expected, plain = [], []
    with torch.no_grad():
        for use_norms, out in ((True, expected), (False, plain)):
            h = x
            for i in range(4):
                h, size = ref.patch_embeds[i](h)
                for j, blk in enumerate(ref.blocks[i]):
                    h = blk(h, size)
                    if j == 0:
                        h = ref.pos_block[i](h, size)
                if use_norms:
                    h = F.layer_norm(h, h.shape[-1:], bb['norm_list.%d.weight' % i], bb['norm_list.%d.bias' % i],
                                     eps=1e-6)
                h = h.reshape(1, size[0], size[1], -1).permute(0, 3, 1, 2).contiguous()
                out.append(h)
        got = ours.forward_intermediates(x, intermediates_only=True)
    for i, (a, b, c) in enumerate(zip(got, expected, plain)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5, i
        if i:  # the per-stage norms inside the trunk matter: timm's plain computation is far off
            assert (a - c).abs().max().item() > 1e-2, i


def test_mmseg_backbone_equals_mmseg(family='svt'):
    """Renamed keys, the in_proj q/kv split, eps 1e-5, corner padding and the window mask, against mmseg.

    SVT covers every mmseg rule (window and global blocks, stage norms); PCPVT end to end is in the
    adapter's parity tests.
    """
    mmseg_reference = pytest.importorskip('mmseg_reference')
    mmseg_reference.require_mmseg()
    ref = mmseg_reference.build_reference(family, 'small', 'fpn', seed=23)
    res = convert_checkpoint(mmseg_reference.mmseg_checkpoint_object(ref))
    variant = 'twins_%s_small' % family
    assert (res.format, res.variant, res.task) == ('mmseg', variant, 'fpn')
    assert res.model_args == checkpoint_family_args('mmseg', variant)
    assert res.meta['class_names'][:2] == ['wall', 'building']   # from mmseg's dataset_meta

    import timm
    backbone = timm.create_model(variant, num_classes=0, **res.model_args)
    enc = {k[len('encoder.model.'):]: v for k, v in res.state_dict.items() if k.startswith('encoder.model.')}
    missing, unexpected = backbone.load_state_dict(enc, strict=False)
    assert sorted(missing) == ['norm.bias', 'norm.weight'] and not unexpected   # mmseg has no final norm
    backbone.eval()
    x = torch.randn(1, 3, 99, 134, generator=torch.Generator().manual_seed(2))  # padded in both directions
    with torch.no_grad():
        want = mmseg_reference.reference_features(ref, x)
        got = backbone.forward_intermediates(x, intermediates_only=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item()), i
