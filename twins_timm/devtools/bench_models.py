"""The bench's models: ours and the references with the same seeded weights, built fast on the meta device."""
from __future__ import annotations

import copy
from typing import Any, Callable, List, Optional, Tuple

import timm
import timm.models.twins as timm_twins
import torch
from torch import nn

from twins_timm.adapters import TwinsFPN, TwinsUPerNet
from twins_timm.convert import build_model, convert_checkpoint
from twins_timm.devtools import mmseg_reference
from twins_timm.models import twins  # noqa: F401  registers ours under the timm names
from twins_timm.models.twins import checkpoint_family_args
from twins_timm.optimize import optimize


class Intermediates(nn.Module):
    """features_only semantics for any Twins: the 4 NCHW stage maps from forward_intermediates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, intermediates_only=True)


@torch.no_grad()
def seeded_fill_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random values in every parameter and buffer (also after `to_empty`).

    Matrices get fan-in scaled normals, 1-D weights (norms) 1 + noise, biases and running means small
    noise, running variances 0.5..1.5, integer buffers 0: fast (no trunc_normal) and numerically sane.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        leaf = name.rsplit('.', 1)[-1]
        if not t.is_floating_point():
            t.zero_()
            continue
        shape = t.shape
        if leaf == 'running_var':
            value = 0.5 + torch.rand(shape, generator=gen)
        elif t.ndim >= 2:
            value = torch.randn(shape, generator=gen) / max(t[0].numel(), 1) ** 0.5
        elif leaf == 'weight':
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        t.copy_(value.to(t.dtype))
    return model


def materialize(build: Callable[[], nn.Module], device: str, seed: int) -> nn.Module:
    """Build on the meta device (no slow trunc_normal init), allocate on `device`, seeded fill."""
    with torch.device('meta'):
        model = build()
    return seeded_fill_(model.to_empty(device=device), seed).eval()


def build_backbone_pair(variant: str, device: str, seed: int) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """(ours optimized, ours plain, timm's) Twins with identical weights, wrapped for features_only semantics."""
    ours = materialize(lambda: timm.create_model(variant, pretrained=False), device, seed)
    ref = getattr(timm_twins, variant)(pretrained=False, device='meta')
    if type(ref).__module__ != 'timm.models.twins':  # pragma: no cover - guard against a mix-up
        raise RuntimeError('expected timm\'s own Twins as the reference, got %s' % type(ref))
    ref = ref.to_empty(device=device)
    ref.load_state_dict(ours.state_dict(), strict=True)
    optimized = optimize(copy.deepcopy(ours))
    return Intermediates(optimized).eval(), Intermediates(ours).eval(), Intermediates(ref.eval()).eval()


def build_engine_model(variant: str, head: Optional[str], device: str, seed: int, **backbone_args: Any) -> nn.Module:
    """Our backbone (features_only semantics) or segmenter (mmseg's ADE20K options), seeded weights, eval.

    ``backbone_args`` change the backbone (the tests' shallow ``depths``).
    """
    if head is None:
        return Intermediates(materialize(lambda: timm.create_model(variant, pretrained=False, **backbone_args),
                                          device, seed)).eval()
    cls = {'fpn': TwinsFPN, 'upernet': TwinsUPerNet}[head]
    args = dict(checkpoint_family_args('mmseg', variant), **backbone_args)
    return materialize(lambda: cls(encoder_name=variant, classes=150, aux_head=False, encoder_args=args),
                        device, seed)


def build_mmseg_segmenter(variant: str, head: str, device: str, seed: int) -> nn.Module:
    """mmseg's own ADE20K Twins EncoderDecoder (SyncBN -> BN, no downloads), seeded weights, eval."""
    return seeded_fill_(mmseg_reference.build_segmenter(variant, head), seed).to(device).eval()


def convert_mmseg_segmenter(mmseg_model: nn.Module, device: str) -> nn.Module:
    """Our segmenter with the mmseg model's weights, through the package's converter."""
    sd = {k: v.detach().clone().cpu() for k, v in mmseg_model.state_dict().items()}
    res = convert_checkpoint({'meta': {'mmseg_version': '1.2.2'}, 'state_dict': sd})
    return build_model(res, device=device).eval()
