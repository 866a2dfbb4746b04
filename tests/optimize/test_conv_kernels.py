"""The decoders' optimized 3x3 convolutions: the `Conv2d` `optimize` swaps in and its Winograd F(2x2, 3x3) kernel.

Winograd computes what `F.conv2d(x, w, b, padding=1)` computes (other summation order, measured against
the output's scale); the module is an `nn.Conv2d` that takes it only in CPU inference, for 3x3 stride-1
convs, where its kernel table picks it. Choices are fixed or timed by an injected timer here.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numerics import FP32_TOL, scaled_diff
from twins_timm.optimize import calibration_report, kernels, optimize
from twins_timm.optimize.layers import Conv2d


def _conv(*args, kernels='winograd', **kwargs):
    """An optimized nn.Conv2d whose table fixes every choice ('winograd': Winograd, the alternative)."""
    return optimize(nn.Conv2d(*args, **kwargs), kernels='onednn' if kernels == 'winograd' else kernels)


def _conv_input(channels, size, batch=2, channels_last=True):
    x = torch.randn(batch, channels, *size)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (17, 25), (32, 32)])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('channels_last', [True, False])
def test_winograd_equals_direct_conv(size, bias, channels_last):
    torch.manual_seed(0)
    x = _conv_input(24, size, channels_last=channels_last)
    w, b = torch.randn(40, 24, 3, 3) / 216 ** .5, (torch.randn(40) if bias else None)
    with torch.no_grad():
        out = kernels.winograd_conv3x3(x, w, b)
        want = F.conv2d(x, w, b, padding=1)
    assert out.shape == want.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert scaled_diff(out, want) <= FP32_TOL


def test_winograd_runs_the_tiles_in_bands(monkeypatch):
    # 9 tile rows x 13 tiles per image, 2 images: bands of 2 tile rows (52 tiles), the last one short
    monkeypatch.setattr(kernels, 'WINOGRAD_CHUNK_TILES', 52)
    products = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, 'bmm', lambda a, b: products.append(a.shape[1]) or bmm(a, b))
    torch.manual_seed(0)
    x = _conv_input(8, (17, 25))
    w, b = torch.randn(8, 8, 3, 3) / 72 ** .5, torch.randn(8)
    with torch.no_grad():
        out = kernels.winograd_conv3x3(x, w, b)
    assert products == [2 * 2 * 13] * 4 + [2 * 1 * 13]
    assert scaled_diff(out, F.conv2d(x, w, b, padding=1)) <= FP32_TOL


def test_winograd_weight_is_g_w_gt():
    w = torch.randn(5, 3, 3, 3)
    g = torch.tensor(kernels._WINOGRAD_G)
    want = torch.einsum('ar,kcrs,bs->abck', g, w, g).reshape(16, 3, 5)
    assert torch.allclose(kernels.winograd_weight(w), want, atol=1e-6)


def _winograd_calls(monkeypatch):
    calls = []
    real = kernels.winograd_conv3x3
    monkeypatch.setattr(kernels, 'winograd_conv3x3', lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def test_conv_module_takes_winograd_only_in_cpu_inference(monkeypatch):
    torch.manual_seed(0)
    conv = _conv(16, 32, 3, padding=1)
    assert type(conv) is Conv2d and isinstance(conv, torch.nn.Conv2d) and set(conv.state_dict()) == {'weight', 'bias'}
    calls = _winograd_calls(monkeypatch)
    x = _conv_input(16, (9, 14))
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1).detach()
    with torch.inference_mode():
        fast = conv(x)
    assert len(calls) == 1 and scaled_diff(fast, direct) <= FP32_TOL
    assert torch.equal(conv(x), direct)  # autograd: F.conv2d, as nn.Conv2d
    with torch.no_grad():
        assert torch.equal(optimize(conv, kernels='plain')(x), direct)  # plain chosen
        optimize(conv, kernels='onednn')
        for other in (_conv(16, 32, 1), _conv(16, 32, 3, stride=2, padding=1),
                      _conv(16, 32, 3, padding=1, groups=4), _conv(16, 32, 3, padding=2, dilation=2)):
            assert torch.equal(other(x), F.conv2d(x, other.weight, other.bias, other.stride, other.padding,
                                                  other.dilation, other.groups))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16  # autocast's own (bf16) conv, as nn.Conv2d
    assert len(calls) == 1  # none of those took Winograd


def test_conv_module_hooks_fire_and_weight_changes_are_seen():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # before optimize: it still fires
    optimize(conv, kernels='onednn')
    x = _conv_input(8, (6, 6))
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(2)  # in place: the parameter's version moves
        second = conv(x)
        conv.weight.data += conv.weight.data  # in place through .data, as PEFT's merge: the version stays
        third = conv(x)
        conv.weight.data = conv.weight.data * 0.25  # new storage
        fourth = conv(x)
    assert seen == [first.shape] * 4
    bias = conv.bias.detach().view(1, -1, 1, 1)
    assert scaled_diff(second - bias, 2 * (first - bias)) <= FP32_TOL
    assert scaled_diff(third - bias, 4 * (first - bias)) <= FP32_TOL
    assert scaled_diff(fourth, first) <= FP32_TOL


@pytest.mark.parametrize('plain_s,winograd_s,expect', [
    (1.0, 0.5, kernels.WINOGRAD),   # clearly faster: taken
    (1.0, 0.85, kernels.PLAIN),     # 15 % faster on the strip: within Winograd's margin, oneDNN stays
    (1.0, 1.2, kernels.PLAIN),      # slower: never taken
])
def test_conv3x3_is_a_measured_choice(monkeypatch, plain_s, winograd_s, expect):
    conv = _conv(8, 16, 3, padding=1, kernels='auto').eval()
    ran = []

    def timed(candidates, timer):
        assert list(candidates) == [kernels.PLAIN, kernels.WINOGRAD]
        ran.extend(fn().shape for fn in candidates.values())  # both on a sample of the layer's width
        return {kernels.PLAIN: plain_s, kernels.WINOGRAD: winograd_s}
    monkeypatch.setattr(kernels, '_time_interleaved', timed)
    calls = _winograd_calls(monkeypatch)
    x = _conv_input(8, (10, 30), batch=1)
    with torch.no_grad():
        out = conv(x)
        conv(x)
    rows = 16  # the map's 10 rows rounded up: less than the strip (a quarter band: 128 tiles, 16 rows of 16)
    assert ran == [(1, 16, rows, 32)] * 2  # measured once, cached
    assert len(calls) == (3 if expect == kernels.WINOGRAD else 1)  # 1 in the calibration
    (rec,) = calibration_report(conv)
    assert rec['family'] == 'conv3x3' and rec['choice'] == expect and rec['shape'][:4] == (8, 16, 32, rows)
    with torch.no_grad():
        assert scaled_diff(out, F.conv2d(x, conv.weight, conv.bias, padding=1)) <= FP32_TOL
