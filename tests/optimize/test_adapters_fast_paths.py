"""The segmenters' inference shortcuts (swapped in by ``twins_timm.optimize``) compute what their plain
(autograd) path computes.

Shortcuts: UPerHead's fusion conv over the concatenated pyramid run as a sum of per-level convs, the
coarse levels through `upsampled_conv3x3` (channel mixing at the small size, resize as matmuls); the
backbone's in-place MLP GELU inside the segmenters. Differences are measured against the output's scale
(see numerics.py). Input sizes are odd so that every resize has a non-integer factor somewhere.
"""
import pytest
import torch
import torch.nn.functional as F

import twins_timm  # noqa: F401  registers the Twins variants with timm
from numerics import FP32_TOL, scaled_diff
from references import perturb_batchnorm_
from twins_timm.adapters import TwinsFPN, TwinsUPerNet
from twins_timm.adapters import modules
from twins_timm.adapters.modules import resize
from twins_timm.models.twins import checkpoint_family_args
from twins_timm.optimize import decoders, optimize
from twins_timm.optimize.decoders import shifted_resize_matrices, upsampled_conv3x3

SHALLOW = {'twins_pcpvt_small': [1, 1, 1, 1], 'twins_svt_small': [2, 2, 2, 2]}


@pytest.mark.parametrize('small,size', [((16, 16), (64, 64)), ((8, 12), (64, 96)), ((17, 25), (70, 100)),
                                        ((1, 1), (4, 7)), ((5, 3), (5, 3))])
@pytest.mark.parametrize('chunk_elements', [None, 2000], ids=['one-chunk', 'channel-chunks'])
def test_upsampled_conv3x3_is_conv_of_resized_map(small, size, chunk_elements, monkeypatch):
    if chunk_elements:  # 16 output channels in uneven chunks (e.g. 6, 5, 5 at 8x12), each its own taps
        monkeypatch.setattr(decoders, 'UPSAMPLED_CONV_CHUNK_ELEMENTS', chunk_elements)
    torch.manual_seed(0)
    x = torch.randn(2, 24, *small)
    weight = torch.randn(16, 24, 3, 3) / 24 ** .5
    base = torch.randn(2, 16, *size)
    conv2d, taps = F.conv2d, []  # tap-map channels of each chunk's 1x1 conv on x (24 in)
    with torch.no_grad():
        want = F.conv2d(resize(x, size), weight, padding=1)
        monkeypatch.setattr(F, 'conv2d', lambda inp, wt, *a, **k: (wt.shape[1] == 24 and taps.append(wt.shape[0])) or conv2d(inp, wt, *a, **k))
        got = upsampled_conv3x3(x, weight, size)
        into = base.clone()
        added = upsampled_conv3x3(x, weight, size, add_to=into)
    assert got.shape == want.shape == (2, 16, *size)
    assert scaled_diff(got, want) <= FP32_TOL
    assert added is into and scaled_diff(into - base, want) <= FP32_TOL
    assert sum(taps) == 2 * 9 * 16  # every output channel once per call
    pixels = small[0] * small[1]
    if chunk_elements and 9 * 16 * pixels > chunk_elements:
        per_call = taps[:len(taps) // 2]  # near-equal chunks, on average within the budget (or one channel each)
        assert len(per_call) > 1 and max(per_call) - min(per_call) <= 9
        assert sum(per_call) / len(per_call) * pixels <= chunk_elements or max(per_call) == 9
    elif not chunk_elements:
        assert taps == [9 * 16, 9 * 16]


def test_shifted_resize_matrices_are_resize_weights_moved_by_one():
    like = torch.zeros(1)
    mats = shifted_resize_matrices(5, 12, like)
    assert mats.shape == (3, 12, 5)
    x = torch.randn(5)
    resized = resize(x.view(1, 1, 5, 1), (12, 1)).view(12)
    assert torch.allclose(mats[1] @ x, resized, atol=1e-6)
    assert torch.allclose(mats[0][1:] @ x, resized[:-1], atol=1e-6) and (mats[0][0] == 0).all()
    assert torch.allclose(mats[2][:-1] @ x, resized[1:], atol=1e-6) and (mats[2][-1] == 0).all()


# UPerHead 128 wide instead of mmseg's 512: the same code paths (none depends on the width) at 1/16 of
# the head's FLOPs; mmseg's width is checked against mmseg itself in test_mmseg_parity_*.
HEAD = {TwinsUPerNet: dict(decoder_channels=128), TwinsFPN: {}}


def _segmenter(cls, variant, **encoder_args):
    """Optimized: every fast path."""
    torch.manual_seed(0)
    args = dict(checkpoint_family_args('mmseg', variant), depths=SHALLOW[variant], **encoder_args)
    model = perturb_batchnorm_(cls(encoder_name=variant, classes=7, encoder_args=args, **HEAD[cls]).eval())
    return optimize(model)


def _plain(model, x):
    with torch.enable_grad():
        return model(x.clone().requires_grad_()).detach()


@pytest.mark.parametrize('variant', list(SHALLOW))
@pytest.mark.parametrize('size', [(64, 64), (97, 130)])
def test_upernet_inference_equals_plain_path(variant, size, monkeypatch):
    model = _segmenter(TwinsUPerNet, variant)
    calls = []
    fused = decoders.upsampled_conv3x3
    monkeypatch.setattr(decoders, 'upsampled_conv3x3', lambda *a, **k: calls.append(a[0].shape) or fused(*a, **k))
    x = torch.randn(2, 3, *size)
    plain = _plain(model, x)
    assert calls == []  # autograd: the concatenation path, as mmseg computes it
    with torch.inference_mode():
        fast = model(x)
    assert len(calls) == 3  # the three coarse levels went through the fused conv
    assert fast.shape == plain.shape == (2, 7, *size)
    assert scaled_diff(fast, plain) <= FP32_TOL


@pytest.mark.parametrize('variant', list(SHALLOW))
@pytest.mark.parametrize('size', [(64, 64), (97, 130)])
def test_fpn_inference_equals_plain_path(variant, size):
    model = _segmenter(TwinsFPN, variant)
    x = torch.randn(2, 3, *size)
    plain = _plain(model, x)
    with torch.no_grad():
        fast = model(x)
    assert fast.shape == plain.shape
    assert scaled_diff(fast, plain) <= FP32_TOL


def test_training_mode_with_grad_keeps_aux_and_plain_path():
    model = _segmenter(TwinsUPerNet, 'twins_pcpvt_small').train()
    logits, aux = model(torch.randn(2, 3, 64, 64))
    assert logits.requires_grad and aux.requires_grad and logits.shape == aux.shape == (2, 7, 64, 64)


@pytest.mark.parametrize('bins', [1, 2, 3, 6])
@pytest.mark.parametrize('size', [(2, 3), (7, 7), (16, 21), (9, 40)])
def test_export_pooling_equals_adaptive_avg_pool(bins, size):
    # the pyramid pooling's export path: the same bins as adaptive_avg_pool2d, also where they overlap
    x = torch.randn(2, 5, *size)
    assert scaled_diff(modules.adaptive_avg_pool(x, bins), F.adaptive_avg_pool2d(x, bins)) <= FP32_TOL
