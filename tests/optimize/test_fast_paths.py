"""The inference fast path ``twins_timm.optimize`` swaps into the backbone computes what the plain
(training / autograd) path computes.

The fast path: the MLP's GELU works in place on fc1's fresh output (inference only); the plain path is the
same model with autograd recording (nothing in place). Differences are measured against the output's scale
(see numerics.py). Nothing is chosen by timing: the optimized model computes the same numbers every run.
"""

import pytest
import torch
import torch.nn as nn

from numerics import FP32_TOL, scaled_diff
from references import ONE_BLOCK_DEPTHS, seeded_model, timm_like_init_
from twins_timm.models.twins import Block, checkpoint_family_args
from twins_timm.optimize import guards, optimize
from twins_timm.optimize.layers import InplaceGELU

SIZES = [(64, 64), (97, 131), (250, 333)]


def _model(name, family='timm', seed=0, optimized=True, **kwargs):
    """Seeded weights on timm's init scale, norms off their unit / zero defaults (references.py), optimized
    unless ``optimized`` is False (the plain model)."""
    args = checkpoint_family_args(family, name) if family != 'timm' else {}
    model = seeded_model(name, seed, init=timm_like_init_, **args, **kwargs)
    return optimize(model) if optimized else model


def _count_in_place_gelus(model):
    """Calls of the MLP GELUs that overwrote their input (a hook sees the call; hooks do not change it)."""
    calls = []
    for m in model.modules():
        if isinstance(m, InplaceGELU):
            m.register_forward_hook(lambda mod, i, o: calls.append(o.data_ptr() == i[0].data_ptr()))
    return calls


def _plain(model, x):
    with torch.enable_grad():
        out = model.forward_intermediates(x.requires_grad_(), intermediates_only=True)
    return [o.detach() for o in out]


@pytest.mark.parametrize('name,family', [('twins_pcpvt_small', 'timm'), ('twins_svt_small', 'timm'),
                                         ('twins_svt_small', 'official_seg'), ('twins_pcpvt_small', 'mmseg')])
@pytest.mark.parametrize('size', SIZES)
def test_inference_equals_plain_path(name, family, size):
    model = _model(name, family)
    calls = _count_in_place_gelus(model)
    x = torch.randn(2, 3, *size)
    plain = _plain(model, x.clone())
    assert calls and not any(calls)  # autograd: timm's F.gelu, nothing in place
    calls.clear()
    with torch.inference_mode():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert len(calls) == sum(model.depths) and all(calls)  # the inference run really worked in place
    assert [a.shape for a in fast] == [b.shape for b in plain]
    assert scaled_diff(fast, plain) <= FP32_TOL


def test_no_grad_also_takes_the_fast_path_and_leaves_input_alone():
    model = _model('twins_svt_small')
    x = torch.randn(1, 3, 96, 96)
    x0 = x.clone()
    plain = _plain(model, x.clone())
    calls = _count_in_place_gelus(model)
    with torch.no_grad():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert calls and all(calls)
    assert torch.equal(x, x0)
    assert scaled_diff(fast, plain) <= FP32_TOL


def test_the_optimized_model_is_deterministic_and_optimizing_again_changes_nothing():
    model = _model('twins_svt_small', **ONE_BLOCK_DEPTHS)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        first = model(x)
        assert optimize(model) is model
        assert torch.equal(model(x), first)
        assert torch.equal(_model('twins_svt_small', **ONE_BLOCK_DEPTHS)(x), first)  # another instance


def test_the_removed_kernels_argument_says_what_happened():
    model = _model('twins_svt_small', optimized=False, **ONE_BLOCK_DEPTHS)
    for spec in ('auto', 'rows', {'mlp:4096,8,32,float32': 'rows'}):
        with pytest.raises(TypeError, match='no longer takes kernels=.*row chunks.*removed'):
            optimize(model, kernels=spec)
    with pytest.raises(TypeError, match="unexpected keyword argument 'fast'"):
        optimize(model, fast=True)
    assert not any(isinstance(m, InplaceGELU) for m in model.modules())  # refused before any swap


def test_export_keeps_f_linear():  # the optimized model exports as the plain one
    model = _model('twins_svt_small', **ONE_BLOCK_DEPTHS)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
    assert targets.count('aten.linear.default') == sum(isinstance(m, nn.Linear) for m in model.modules())


def test_plain_model_never_takes_a_fast_path():
    # no global switch: the plain model has no optimize layers
    model = _model('twins_svt_small', optimized=False, **ONE_BLOCK_DEPTHS)
    assert not any(isinstance(m, InplaceGELU) for m in model.modules())
    assert sum(type(m) is nn.GELU for m in model.modules()) == sum(model.depths)


def test_nothing_cpu_specific_off_the_cpu():
    with torch.no_grad():
        assert guards.fast_inference(torch.empty(4, 8))
        assert not guards.fast_inference(torch.empty(4, 8, device='meta'))  # GPUs: timm's kernels
        assert not guards.fast_inference(torch.empty(4, 8, dtype=torch.float64))
    assert not guards.fast_inference(torch.empty(4, 8))  # autograd


def test_only_a_twins_blocks_mlp_gelu_works_in_place():
    # elsewhere a GELU's input may be needed after it (here: the residual of a user's own layer)
    model = nn.Sequential(Block(32, 1, mlp_ratio=4, ws=1), nn.GELU(), nn.Sequential(nn.GELU())).eval()
    optimize(model)
    assert type(model[0].mlp.act) is InplaceGELU
    assert type(model[1]) is nn.GELU and type(model[2][0]) is nn.GELU


def test_mlp_gelu_works_in_place_only_without_autograd():
    blk = optimize(Block(32, 1, mlp_ratio=4, ws=1).eval())
    act = blk.mlp.act
    assert type(act) is InplaceGELU and isinstance(act, nn.GELU)
    x = torch.randn(4, 8)
    want = nn.functional.gelu(x)
    with torch.no_grad():
        out = act(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, want)  # overwrote its (fresh) input
    y = torch.randn(4, 8, requires_grad=True)
    out = act(y)
    assert out.data_ptr() != y.data_ptr() and out.requires_grad  # autograd: timm's F.gelu
