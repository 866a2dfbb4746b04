"""Our decoders against mmseg's own neck / heads, on random feature maps (no backbone needed).

Weights go from mmseg to us through the contract's key layout (decode_head.X -> decoder.X,
decode_head.conv_seg -> segmentation_head.conv_seg, neck.X -> decoder.neck.X,
auxiliary_head.X -> aux_head.X) with strict loading, so these also pin the names.
"""
import math

import pytest
import torch
from torch import nn

import mmseg_reference as ref
from twins_timm.adapters.decoders.fpn.decoder import FPNDecoder
from twins_timm.adapters.decoders.upernet.decoder import UPerNetDecoder
from twins_timm.adapters.modules import FCNHead, SegHead

pytestmark = pytest.mark.slow  # the whole file: mmseg parity: minutes

# PCPVT-B/L heads are configured exactly like PCPVT-S's (checked below), so one stands for three
CONFIGS = [(f, s, h) for f, s in [('pcpvt', 'small'), ('svt', 'small'), ('svt', 'base'),
                                  ('svt', 'large')] for h in ref.HEADS]
# input sizes whose stride-4..32 maps (mmseg's corner padding: ceil) are odd / non-square
INPUT_SIZES = [(36, 52), (64, 44)]


def _stage_sizes(h: int, w: int):
    sizes, h, w = [], math.ceil(h / 4), math.ceil(w / 4)
    for _ in range(4):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return sizes


class OurHeads(nn.Module):
    """Our modules under the segmenter's attribute names (decoder / segmentation_head / aux_head)."""

    def __init__(self, head: str, channels, classes: int):
        super().__init__()
        if head == 'upernet':
            self.decoder = UPerNetDecoder(channels, 512)
            self.segmentation_head = SegHead(512, classes)
            self.aux_head = FCNHead(channels[2], classes, 256)
        else:
            self.decoder = FPNDecoder(channels, 256, 128)
            self.segmentation_head = SegHead(128, classes)

    def forward(self, feats):
        logits = self.segmentation_head(self.decoder(feats))
        aux = self.aux_head(feats[2]) if hasattr(self, 'aux_head') else None
        return logits, aux


def _contract_rename(prefix_map, state_dict):
    out = {}
    for key, value in state_dict.items():
        for src, dst in prefix_map:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
        else:
            raise AssertionError(f'no rule for {key}')
    return out


@pytest.fixture(scope='module')
def mmseg_registry():
    ref.require_mmseg()
    from mmseg.registry import MODELS
    return MODELS


@pytest.mark.parametrize('head', ref.HEADS)
def test_pcpvt_heads_same_config_for_all_sizes(mmseg_registry, head):
    small = ref.model_config('pcpvt', 'small', head)
    for size in ('base', 'large'):
        cfg = ref.model_config('pcpvt', size, head)
        assert cfg['backbone']['embed_dims'] == small['backbone']['embed_dims']
        for part in ('neck', 'decode_head', 'auxiliary_head'):
            assert cfg.get(part) == small.get(part)


@pytest.mark.parametrize('family,size,head', CONFIGS)
def test_heads_match_mmseg(mmseg_registry, family, size, head):
    cfg = ref.model_config(family, size, head)
    channels = cfg['backbone']['embed_dims']
    torch.manual_seed(0)
    parts = {'decode_head': mmseg_registry.build(cfg['decode_head'])}
    if head == 'fpn':
        parts['neck'] = mmseg_registry.build(cfg['neck'])
    else:
        parts['auxiliary_head'] = mmseg_registry.build(cfg['auxiliary_head'])
    theirs = ref.randomize_(nn.ModuleDict(parts), seed=1).eval()

    rules = [('decode_head.conv_seg.', 'segmentation_head.conv_seg.'),
             ('decode_head.', 'decoder.'), ('neck.', 'decoder.neck.'),
             ('auxiliary_head.', 'aux_head.')]
    with torch.device('meta'):  # no default init: the strict load below writes every parameter and buffer
        ours = OurHeads(head, channels, cfg['decode_head']['num_classes'])
    ours = ours.to_empty(device='cpu').eval()
    assert dict(ours.named_buffers()).keys() <= ours.state_dict().keys()  # none left unwritten
    ours.load_state_dict(_contract_rename(rules, theirs.state_dict()), strict=True)

    gen = torch.Generator().manual_seed(2)
    for h, w in INPUT_SIZES:
        feats = [torch.randn(1, c, *hw, generator=gen)
                 for c, hw in zip(channels, _stage_sizes(h, w))]
        with torch.no_grad():
            ins = theirs['neck'](feats) if head == 'fpn' else feats
            expected = theirs['decode_head'](ins)
            logits, aux = ours(feats)
        assert logits.shape == expected.shape == (1, 150, *_stage_sizes(h, w)[0])
        assert (logits - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max())
        if head == 'upernet':
            with torch.no_grad():
                expected_aux = theirs['auxiliary_head'](feats)
            assert aux.shape == expected_aux.shape
            assert (aux - expected_aux).abs().max().item() <= 1e-5 * max(1.0, expected_aux.abs().max())
