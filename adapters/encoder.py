"""Twins backbone as an SMP encoder.

SMP's `tu-` route (`TimmUniversalEncoder`) wraps timm's `features_only` model, whose state dict
gains an extra `model.` level and keeps nothing else; here the plain timm model is held directly
as `.model` without its classifier and final norm (the segmentation heads never use them), so the
keys are exactly `encoder.model.<timm backbone key>` and checkpoints convert by prefix.
The output follows SMP's encoder convention for transformer-style backbones: `[input, empty
stride-2 placeholder, stride 4, 8, 16, 32]`, so SMP's own decoders accept it as well.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import timm
import torch
from torch import nn

from twins_timm.adapters.config import check_encoder_args

NUM_STAGES = 4


class TwinsEncoder(nn.Module):
    """Four Twins feature maps (strides 4, 8, 16, 32) for segmentation decoders.

    Args:
        name: timm model name, e.g. 'twins_svt_small' (registered by `import twins_timm`).
        in_channels: input channels.
        weights: True (or SMP's 'imagenet') loads timm's ImageNet weights (the local Hugging Face cache
            first, offline a clear error: `twins_timm.files.hub`); None: random.
        **encoder_args: backbone options (`stage_norm`, `norm_eps`, `window_mask`,
            `patch_padding`, drop_path_rate, ...), passed to `timm.create_model`; only those in
            `twins_timm.adapters.config.ENCODER_ARGS` (a config.json holds them: they must load back safely).
    """

    def __init__(self, name: str = 'twins_svt_small', in_channels: int = 3,
                 weights: Optional[Union[bool, str]] = None, **encoder_args: Any):
        super().__init__()
        if not name.startswith('twins_'):
            raise ValueError(f"TwinsEncoder builds Twins backbones (twins_pcpvt_* / twins_svt_*), "
                             f"got encoder_name={name!r}")
        encoder_args = check_encoder_args(encoder_args)
        pretrained = bool(weights)
        create_args = dict(pretrained=pretrained, in_chans=in_channels, num_classes=0)
        if pretrained and encoder_args.get('stage_norm'):
            create_args['pretrained_strict'] = False  # classification weights have no stage norms
        self.name = name
        self.model = timm.create_model(name, **create_args, **encoder_args)
        self._drop_unused_head()
        self._in_channels = in_channels
        self._out_channels = [in_channels, 0] + self.stage_channels

    def _drop_unused_head(self) -> None:
        """Remove the final norm and classifier: segmentation reads the four stage maps."""
        if hasattr(self.model, 'prune_intermediate_layers'):
            self.model.prune_intermediate_layers(
                list(range(NUM_STAGES)), prune_norm=True, prune_head=True)
        else:  # pragma: no cover - every timm Twins has it
            self.model.norm = nn.Identity()
            self.model.reset_classifier(0)

    @property
    def stage_channels(self) -> List[int]:
        return [int(c) for c in self.model.embed_dims[:NUM_STAGES]]

    @property
    def out_channels(self) -> List[int]:
        """SMP convention: input channels, 0 for the missing stride-2 map, then the stages."""
        return self._out_channels

    @property
    def output_stride(self) -> int:
        return 32

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in backward to save memory (timm's switch)."""
        self.model.set_grad_checkpointing(enable)

    def forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four NCHW stage maps, strides 4, 8, 16, 32."""
        return self.model.forward_intermediates(
            x, indices=list(range(NUM_STAGES)), intermediates_only=True)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        stages = self.forward_stages(x)
        b, _, h, w = x.shape
        placeholder = x.new_empty((b, 0, h // 2, w // 2))
        return [x, placeholder, *stages]
