"""The GEMM ceiling (twins_timm.tools.gemm_ceiling): which calls it records and how it rebuilds them.

Nothing here is timed against anything: the ceiling's seconds are only checked to be positive; what can
fail is the recording (every product once, nothing else) and the replayed inputs' layout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twins_timm.models import kernels
from twins_timm.tools import bench
from twins_timm.tools.gemm_ceiling import _make, _spec, gemm_ceiling, record_gemm_calls


def test_records_each_product_once_and_nothing_else():
    lin = torch.nn.Linear(16, 24)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 16).transpose(1, 2)  # strided 4-D input: matmul folds it, inner mm not recorded
    img = torch.randn(1, 4, 10, 10)
    q = torch.randn(1, 2, 12, 8)

    def forward():
        y = F.layer_norm(lin(x), (24,)).softmax(-1)  # norm and softmax: not products
        z = torch.relu(conv(img))
        return y, z, F.scaled_dot_product_attention(q, q, q), q @ q.transpose(-1, -2)

    with torch.inference_mode():
        calls = record_gemm_calls(forward)
    ops = sorted((func.overloadpacket.__name__, n) for (func, _, _), n in calls.items())
    assert ops == [('conv2d', 1), ('linear', 1), ('matmul', 1), ('scaled_dot_product_attention', 1)]


def test_repeated_calls_are_counted_not_duplicated():
    lin = torch.nn.Linear(8, 8)
    x, y = torch.randn(5, 8), torch.randn(7, 8)
    with torch.inference_mode():
        calls = record_gemm_calls(lambda: (lin(x), lin(x), lin(x), lin(y)))
    assert sorted(calls.values()) == [1, 3]


@pytest.mark.parametrize('make', [
    lambda: torch.randn(3, 4, 5).permute(2, 0, 1),
    lambda: torch.randn(6, 1).expand(6, 9),
    lambda: torch.nn.Parameter(torch.randn(4, 4)),
    lambda: torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last),
])
def test_replayed_inputs_keep_shape_strides_and_requires_grad(make):
    # torch's matmul folds batch dimensions into one GEMM only for a weight that requires grad: a replay
    # that dropped the flag timed 350 seven-row GEMMs instead of one (2.4x slower on a window projection)
    t = make()
    spec = _spec(t)
    rebuilt = _make(spec, torch.Generator().manual_seed(0))
    assert _spec(rebuilt) == spec
    assert rebuilt.requires_grad == t.requires_grad and rebuilt.stride() == t.stride()


@pytest.mark.parametrize('kernel', ['plain', 'onednn'])
def test_ceiling_covers_all_of_a_twins_forward(kernel):
    # every product of the forward recorded once: their FLOPs are the plain path's count exactly, whichever
    # kernels ran (oneDNN linears and attention compute the same products)
    import timm

    import twins_timm  # noqa: F401
    model = timm.create_model('twins_svt_small', pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 96)
    with kernels.forced_kernel(kernel), torch.inference_mode():
        fn = lambda: model.forward_intermediates(x, intermediates_only=True)  # noqa: E731
        fn()
        ceiling = gemm_ceiling(fn, repeats=1)
        flops = bench.count_flops(fn)
    assert ceiling['flops'] == flops > 0
    assert ceiling['calls'] == sum(op['calls'] for op in ceiling['ops']) > ceiling['distinct'] == len(ceiling['ops'])
    assert ceiling['seconds'] > 0 and all(op['seconds_per_call'] > 0 for op in ceiling['ops'])
    ops = {op['op'] for op in ceiling['ops']}
    if kernel == 'plain':  # timm's calls: linears, fused attention, window matmuls, patch / positional convs
        assert {'linear', 'scaled_dot_product_attention', 'matmul', 'conv2d'} <= ops
    else:  # linears and global attention went through oneDNN convolutions: recorded as those
        assert 'linear' not in ops and 'scaled_dot_product_attention' not in ops and 'conv2d' in ops
