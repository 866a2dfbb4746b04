"""The rule tables and the engine: round trips per format, the q/kv split, every key accounted for."""
import pytest
import torch

from checkpoint_factory import random_state_dict, shapes_only
from twins_timm.convert import MappingError, apply_rules, convert_checkpoint, to_mmseg
from twins_timm.convert.formats import table_for
from twins_timm.convert.rules import MMSEG_BACKBONE, SEG_HEADS, TIMM_BACKBONE, Rename, prefixed


def _same(a, b):
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('name', ['mmseg/twins_svt-s_uperhead_ade20k', 'mmseg/twins_pcpvt-s_fpn_ade20k'])
def test_mmseg_round_trip_is_exact(name):
    src = random_state_dict(name, seed=1)
    res = convert_checkpoint({'meta': {}, 'state_dict': src})
    back = to_mmseg(res)
    _same(back, src)


def test_mmseg_in_proj_split_puts_q_first_and_kv_after():
    src = random_state_dict('mmseg/twins_pcpvt-s_fpn_ade20k', seed=2)
    res = convert_checkpoint({'state_dict': src})
    w = src['backbone.layers.2.1.attn.attn.in_proj_weight']
    b = src['backbone.layers.2.1.attn.attn.in_proj_bias']
    c = w.shape[1]
    sd = res.state_dict
    assert torch.equal(sd['encoder.model.blocks.2.1.attn.q.weight'], w[:c])
    assert torch.equal(sd['encoder.model.blocks.2.1.attn.kv.weight'], w[c:])
    assert torch.equal(sd['encoder.model.blocks.2.1.attn.kv.bias'], b[c:])
    assert torch.equal(sd['encoder.model.blocks.2.1.attn.proj.weight'],
                       src['backbone.layers.2.1.attn.attn.out_proj.weight'])
    assert torch.equal(sd['encoder.model.pos_block.0.proj.0.weight'], src['backbone.position_encodings.0.proj.weight'])
    assert torch.equal(sd['encoder.model.blocks.0.0.mlp.fc1.weight'], src['backbone.layers.0.0.ffn.layers.0.0.weight'])


def test_svt_window_and_global_proj_map_back_to_their_own_names():
    """attn.proj is out_proj in global blocks but attn.proj in window blocks: the reverse must tell them apart."""
    sd = shapes_only('mmseg/twins_svt-s_fpn_ade20k')
    out = apply_rules(prefixed(MMSEG_BACKBONE, 'backbone.', 'encoder.model.') + SEG_HEADS, sd).state_dict
    back = apply_rules(prefixed(MMSEG_BACKBONE, 'backbone.', 'encoder.model.') + SEG_HEADS, out, reverse=True)
    assert 'backbone.layers.0.0.attn.proj.weight' in back.state_dict          # window block (even)
    assert 'backbone.layers.0.1.attn.attn.out_proj.weight' in back.state_dict  # global block (odd)
    assert set(back.state_dict) == set(sd)


def test_official_seg_round_trip_through_the_table():
    src = random_state_dict('official/upernet_alt_gvt_s', seed=3)
    rules = table_for('official_seg', 'upernet', 'backbone.')
    fwd = apply_rules(rules, src, drop={'head', 'norm'})
    assert sorted(fwd.dropped) == sorted(['backbone.head.weight', 'backbone.head.bias',
                                          'backbone.norm.weight', 'backbone.norm.bias'])
    assert torch.equal(fwd.state_dict['encoder.model.stage_norms.3.bias'], src['backbone.norm_list.3.bias'])
    assert torch.equal(fwd.state_dict['aux_head.convs.0.bn.running_var'], src['auxiliary_head.convs.0.bn.running_var'])
    back = apply_rules(rules, fwd.state_dict, reverse=True).state_dict
    _same(back, {k: v for k, v in src.items() if k not in fwd.dropped})


def test_classification_round_trip_is_identity():
    src = random_state_dict('official/pcpvt_small_v0', seed=4)
    res = convert_checkpoint({'model': src})
    _same(res.state_dict, src)
    _same(apply_rules(TIMM_BACKBONE, res.state_dict, reverse=True).state_dict, src)


def test_missing_extra_and_misshaped_keys_are_listed():
    sd = dict(shapes_only('mmseg/twins_pcpvt-s_fpn_ade20k'))
    del sd['backbone.layers.1.2.norm2.bias']
    sd['backbone.layers.0.0.attn.gate.weight'] = torch.empty(3, device='meta')
    sd['decode_head.conv_seg.bias'] = torch.empty(151, device='meta')
    with pytest.raises(MappingError) as e:
        convert_checkpoint({'state_dict': sd})
    p = e.value.problems
    assert p['target keys not filled'] == ['encoder.model.blocks.1.2.norm2.bias']
    assert p['keys with no place in the target model'] == [
        'encoder.model.blocks.0.0.attn.gate.weight (from backbone.layers.0.0.attn.gate.weight)']
    assert p['shape mismatches'] == [
        'segmentation_head.conv_seg.bias: [151] from decode_head.conv_seg.bias, model expects [150]']
    msg = str(e.value)
    assert 'norm2.bias' in msg and 'attn.gate' in msg and 'conv_seg.bias' in msg


def test_unmapped_and_duplicate_keys_are_listed():
    rules = (Rename('a.{w}', 'x.{w}'), Rename('b.{w}', 'x.{w}'))
    with pytest.raises(MappingError) as e:
        apply_rules(rules, {'a.weight': torch.zeros(1), 'b.weight': torch.zeros(1), 'c.weight': torch.zeros(1)})
    assert e.value.problems['unmapped source keys'] == ['c.weight']
    assert e.value.problems['target keys produced twice'] == ['x.weight (from a.weight and b.weight)']
    with pytest.raises(MappingError, match='cannot be split'):
        apply_rules(MMSEG_BACKBONE, {'layers.0.0.attn.attn.in_proj_weight': torch.zeros(5, 2)})


def test_dropping_parts_is_explicit_and_reported():
    sd = shapes_only('official/upernet_pcpvt_s')
    res = convert_checkpoint({'state_dict': sd}, drop='aux_head')
    assert res.aux_head is False and 'dropped on request' in res.dropped_parts['aux_head']
    assert not any(k.startswith('aux_head.') for k in res.state_dict)
    assert any(k.startswith('auxiliary_head.') for k in res.dropped)
    cls = convert_checkpoint({'model': shapes_only('official/alt_gvt_small')}, drop=['head'])
    assert (cls.task, cls.num_classes) == ('backbone', 0) and sorted(cls.dropped) == ['head.bias', 'head.weight']
    with pytest.raises(ValueError, match='has no auxiliary FCN head'):
        convert_checkpoint({'state_dict': shapes_only('official/fpn_pcpvt_s')}, drop='aux_head')
    with pytest.raises(ValueError, match="cannot drop 'decoder'"):
        convert_checkpoint({'state_dict': sd}, drop='decoder')
    # timm -> mmseg: timm's final norm has no mmseg slot and must be dropped by name
    with pytest.raises(MappingError, match="drop part 'norm'"):
        to_mmseg(cls)
    assert 'norm.weight' not in to_mmseg(cls, drop='norm')


@pytest.mark.parametrize('name,family', [('official/alt_gvt_small', 'svt'), ('official/pcpvt_small_v0', 'pcpvt')])
def test_mmseg_pretrain_backbone_maps_back_to_the_official_classifier_exactly(name, family):
    """mmseg's published ImageNet backbones (twins2mmseg.py output): every tensor lands where it came from."""
    from checkpoint_factory import twins2mmseg

    official = random_state_dict(name, seed=3)
    res = convert_checkpoint(twins2mmseg(official, family))
    assert (res.format, res.task, res.num_classes, res.model_args) == ('mmseg_pretrain', 'backbone', 0, {})
    _same(res.state_dict, {k: v for k, v in official.items() if not k.startswith('head.')})
