"""The speed ceiling (twins_timm.devtools.speed_ceiling): which calls it records and how it rebuilds them.

Nothing here is timed against anything: the ceiling's seconds are only checked to be positive; what can
fail is the recording (every essential op once, nothing else) and the replayed inputs' layout.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from twins_timm.optimize import optimize
from twins_timm.devtools.bench_timing import count_flops
from twins_timm.devtools.speed_ceiling import _make, _spec, record_essential_calls, speed_ceiling


def _names(calls):
    return sorted((func.overloadpacket.__name__, n) for (func, _, _), n in calls.items())


def test_records_each_essential_op_once_and_nothing_else():
    lin = torch.nn.Linear(16, 24)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 16).transpose(1, 2)  # strided 4-D input: matmul folds it, inner mm not recorded
    img = torch.randn(1, 4, 10, 10)
    q = torch.randn(1, 2, 12, 8)

    def forward():
        y = F.layer_norm(lin(x), (24,)).softmax(-1)
        z = F.interpolate(torch.relu(conv(img)), scale_factor=2, mode='bilinear')  # relu: foldable, not recorded
        return y + 1, z, F.scaled_dot_product_attention(q, q, q), q @ q.transpose(-1, -2)

    with torch.inference_mode():
        calls = record_essential_calls(forward)
    assert _names(calls) == [('conv2d', 1), ('layer_norm', 1), ('linear', 1), ('matmul', 1),
                             ('scaled_dot_product_attention', 1), ('softmax', 1), ('upsample_bilinear2d', 1)]


def test_products_inside_other_composites_are_seen():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    with torch.inference_mode():
        calls = record_essential_calls(lambda: torch.einsum('bij,bjk->bik', a, b))
    assert [name for name, _ in _names(calls)] == ['bmm']


def test_repeated_calls_are_counted_not_duplicated():
    lin = torch.nn.Linear(8, 8)
    x, y = torch.randn(5, 8), torch.randn(7, 8)
    with torch.inference_mode():
        calls = record_essential_calls(lambda: (lin(x), lin(x), lin(x), lin(y)))
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


def _kernels_run(fn):
    """The aten ops one call runs, as the profiler sees them (a mode would change them: see below)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages()})


def test_replay_runs_the_kernels_the_model_ran():
    # the window projection: a linear on a strided 6-D view, one GEMM only while the weight's transpose
    # still requires grad; a replayed weight that was a view lost the flag in inference mode (bmm, 2.2x slower)
    windows = torch.randn(2, 14, 14, 32).view(2, 2, 7, 2, 7, 32).transpose(2, 3)
    lin = torch.nn.Linear(32, 96)
    # (a dispatch mode that decomposed the call would itself drop the flag below autograd: the profiler looks)
    with torch.inference_mode():
        ((func, args_spec, kwargs_spec),) = record_essential_calls(lambda: lin(windows)).keys()
        args, kwargs = _make(args_spec, torch.Generator().manual_seed(0)), _make(kwargs_spec, torch.Generator())
        original = _kernels_run(lambda: func(windows, lin.weight, lin.bias))
        replay = _kernels_run(lambda: func(*args, **kwargs))
    assert 'aten::mm' in original and 'aten::bmm' not in original
    assert replay == original


def test_other_arguments_are_replayed_as_recorded():
    args = [3, 0.5, None, torch.float16, torch.channels_last, torch.device('cpu'), {'dim': -1}, (2, [1, 2])]
    rebuilt = _make(_spec(args), torch.Generator())
    assert rebuilt == args and rebuilt[3] is torch.float16 and rebuilt[4] is torch.channels_last
    with pytest.raises(TypeError):
        _spec([{1, 2}])  # unhashable: a new kind of argument, not silently replayed as something else


@pytest.mark.parametrize('optimized', [False, True])
def test_ceiling_covers_all_of_a_twins_forward(optimized):
    # every product of the forward recorded once: their FLOPs are the plain model's count exactly, plain or
    # optimized
    import timm

    import twins_timm  # noqa: F401
    plain = timm.create_model('twins_svt_small', pretrained=False, img_size=64).eval()
    model = optimize(copy.deepcopy(plain)) if optimized else plain
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        flops = count_flops(lambda: plain.forward_intermediates(x, intermediates_only=True))
        fn = lambda: model.forward_intermediates(x, intermediates_only=True)  # noqa: E731
        fn()
        ceiling = speed_ceiling(fn, repeats=1)
    assert ceiling['flops'] == flops > 0
    assert ceiling['calls'] == sum(op['calls'] for op in ceiling['ops']) > ceiling['distinct'] == len(ceiling['ops'])
    assert ceiling['product_seconds'] > 0 and ceiling['other_seconds'] > 0
    assert all(op['seconds_per_call'] > 0 for op in ceiling['ops'])
    products = {op['op'] for op in ceiling['ops'] if op['kind'] == 'product'}
    others = {}
    for op in ceiling['ops']:
        if op['kind'] == 'other':
            others[op['op']] = others.get(op['op'], 0) + op['calls']
    # SVT-S: 18 blocks with 2 LayerNorms each, 4 patch embeddings and the 7 global attentions whose keys are
    # sub-sampled (sr > 1) normalise: 47. Softmax: none (SDPA everywhere, as timm)
    assert others['layer_norm'] == 2 * 18 + 4 + 7
    assert 'softmax' not in others
    assert products == {'linear', 'scaled_dot_product_attention', 'conv2d'}  # timm's calls


def test_segmenter_products_are_all_seen():
    # the plain model's products' FLOPs equal torch's count for the whole segmenter (decoder included)
    from twins_timm.adapters import TwinsFPN, TwinsUPerNet
    x = torch.randn(1, 3, 64, 64)
    for cls in (TwinsFPN, TwinsUPerNet):
        model = cls(encoder_name='twins_pcpvt_small', encoder_weights=None, classes=5).eval()
        with torch.inference_mode():
            fn = lambda: model(x)  # noqa: E731
            fn()
            ceiling = speed_ceiling(fn, repeats=1)
            assert ceiling['flops'] == count_flops(fn) > 0, cls.__name__
            assert any(op['op'].startswith('upsample') for op in ceiling['ops'])
