"""Seeded weights and timm's own Twins, in one place for every test (fixtures in conftest.py).

Models are built on the meta device (timm's own Twins with its init skipped there: ``create_on_meta``;
ours skips it itself) and filled with seeded random values once. Two fills: ``randomize_`` moves every parameter and buffer off its
default (norms, BN statistics), so a wrong eps, a missing norm or swapped statistics shows;
``timm_like_init_`` keeps the scale of timm's own init, for comparisons with timm at its tolerances.
"""
from __future__ import annotations

from typing import Callable, Tuple

import timm
import timm.models.twins as timm_twins
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import twins_timm  # noqa: F401  registers our Twins under timm's names

__all__ = ['randomize_', 'timm_like_init_', 'no_init_on_meta', 'no_parameter_init', 'create_on_meta',
           'seeded_model', 'timm_reference', 'timm_pair', 'perturb_batchnorm_', 'ONE_BLOCK_DEPTHS']

# the smallest Twins that still has every block kind: SVT's stage 3 gets an LSA and a GSA block
ONE_BLOCK_DEPTHS = dict(depths=[1, 1, 2, 1])

# the in-place writes timm's init makes (trunc_normal_ is uniform_, erfinv_, mul_, add_, clamp_)
_INIT_WRITES = frozenset({'uniform_', 'normal_', 'erfinv_', 'mul_', 'add_', 'clamp_', 'zero_', 'fill_'})


class _SkipInitWrites(TorchFunctionMode):
    """In-place init writes (``_INIT_WRITES``, and ``torch.nn.init``'s functions, which run their own writes
    out of the mode's sight) to the tensors ``skip`` picks return at once; shapes, flags and every other
    call go through unchanged."""

    def __init__(self, skip: Callable[[object], bool]):
        super().__init__()
        self.skip = skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        init = getattr(func, '__name__', '') in _INIT_WRITES or getattr(func, '__module__', '') == 'torch.nn.init'
        target = args[0] if args else kwargs.get('tensor')  # torch.nn.init passes it by keyword
        if init and target is not None and self.skip(target):
            return target
        return func(*args, **kwargs)


def no_init_on_meta() -> _SkipInitWrites:
    """Within the block, weight-init writes to meta tensors return at once: a meta tensor holds no values, yet
    timm's init on it runs every op's Python meta implementation (~0.4 s per model)."""
    return _SkipInitWrites(lambda t: getattr(t, 'is_meta', False))


def no_parameter_init() -> _SkipInitWrites:
    """Within the block, init writes to parameters return at once, leaving their memory unset: for models
    that cannot be built on meta (mmseg's Twins calls ``.item()`` in ``__init__``), filled after by
    ``builders.fill_``. Buffers are still written (BN statistics, a preprocessor's mean and std)."""
    return _SkipInitWrites(lambda t: isinstance(t, nn.Parameter))


def create_on_meta(entry: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """``entry(*args, device='meta', **kwargs)`` without its weight init (fill values after to_empty), for
    timm's own Twins, which runs its init on meta tensors too."""
    with no_init_on_meta():
        return entry(*args, device='meta', **kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights that make every parameter and buffer matter.

    Default init leaves norms at 1/0 and BN statistics at 0/1, which would hide wrong eps,
    missing norms or swapped statistics; those get random values here.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(randn(module.weight) / fan_in ** 0.5)
            if module.bias is not None:
                module.bias.copy_(0.1 * randn(module.bias))
        elif isinstance(module, nn.MultiheadAttention):
            fan_in = module.embed_dim
            module.in_proj_weight.copy_(randn(module.in_proj_weight) / fan_in ** 0.5)
            module.in_proj_bias.copy_(0.1 * randn(module.in_proj_bias))
        elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            module.weight.copy_(1 + 0.2 * randn(module.weight))
            module.bias.copy_(0.1 * randn(module.bias))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.2 * randn(module.running_mean))
                module.running_var.copy_(
                    0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.num_batches_tracked.fill_(1000)
    return model


@torch.no_grad()
def timm_like_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights on the scale of timm's own init (Linear std .02, conv fan-out), norms perturbed."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(randn(m.weight) * .02)
            m.bias.copy_(randn(m.bias) * .02)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.copy_(randn(m.weight) * (2.0 / fan_out) ** 0.5)
            m.bias.copy_(randn(m.bias) * .02)
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + .1 * randn(m.weight))
            m.bias.copy_(randn(m.bias) * .02)
    return model


@torch.no_grad()
def perturb_batchnorm_(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine away from the identity (global RNG), so folding them in would show."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, .2)
            m.running_var.uniform_(.5, 2)
            m.weight.normal_(1, .2)
            m.bias.normal_(0, .2)
    return model


def seeded_model(name: str, seed: int = 0, init: Callable[[nn.Module, int], nn.Module] = randomize_,
                 **kwargs) -> nn.Module:
    """Our timm model ``name`` with seeded weights (``init``), eval mode."""
    model = timm.create_model(name, device='meta', **kwargs).to_empty(device='cpu')
    return init(model, seed).eval()


def timm_reference(name: str, state_dict, **kwargs) -> nn.Module:
    """timm's own Twins class, built by timm's own entry point (still reachable on its module), with
    ``state_dict`` loaded strictly, eval mode."""
    ref = create_on_meta(getattr(timm_twins, name), pretrained=False, **kwargs).to_empty(device='cpu')
    assert type(ref) is timm_twins.Twins
    ref.load_state_dict(state_dict, strict=True)
    return ref.eval()


def timm_pair(name: str, seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    """(ours, timm's own Twins) for variant ``name`` with the same seeded timm-scale weights, eval mode."""
    ours = seeded_model(name, seed, init=timm_like_init_)
    return ours, timm_reference(name, ours.state_dict())
