"""TwinsFPN: Twins backbone + mmseg FPN neck and FPNHead, as an SMP model."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

from segmentation_models_pytorch.base.hub_mixin import supports_config_loading

from twins_timm.adapters.base import MMSEG_MEAN, MMSEG_STD, TwinsSegmentationModel
from twins_timm.adapters.modules import SegHead
from twins_timm.adapters.decoders.fpn.decoder import FPNDecoder


class TwinsFPN(TwinsSegmentationModel):
    """Semantic FPN on a Twins backbone with mmsegmentation's numerics (Twins ADE20K FPN models).

    Args (see `TwinsSegmentationModel` for the shared ones; mmseg's FPN models have no aux_head):
        decoder_pyramid_channels: FPN neck width (mmseg: 256).
        decoder_segmentation_channels: FPNHead width (mmseg: 128).
    """

    model_type = 'twins-fpn'

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = 'twins_svt_small',
        classes: int = 150,
        encoder_args: Optional[Dict[str, Any]] = None,
        aux_head: bool = False,
        encoder_weights: Optional[Union[bool, str]] = None,
        in_channels: int = 3,
        decoder_pyramid_channels: int = 256,
        decoder_segmentation_channels: int = 128,
        decoder_dropout: float = 0.1,
        aux_channels: int = 256,
        class_names: Optional[Sequence[str]] = None,
        palette: Optional[Sequence[Sequence[int]]] = None,
        mean: Sequence[float] = MMSEG_MEAN,
        std: Sequence[float] = MMSEG_STD,
        activation: Optional[Union[str, Callable]] = None,
    ):
        super().__init__()
        self._build_common(encoder_name, encoder_weights, encoder_args, in_channels, classes,
                           class_names, palette, mean, std, activation)
        self.decoder = FPNDecoder(self.encoder.stage_channels, decoder_pyramid_channels,
                                  decoder_segmentation_channels)
        self.segmentation_head = SegHead(decoder_segmentation_channels, classes, decoder_dropout)
        self._build_aux_head(aux_head, aux_channels, decoder_dropout)
        self.initialize()
