"""TwinsUPerNet: Twins backbone + mmseg UPerHead (+ auxiliary FCNHead), as an SMP model."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

from segmentation_models_pytorch.base.hub_mixin import supports_config_loading

from twins_timm.adapters.base import MMSEG_MEAN, MMSEG_STD, TwinsSegmentationModel
from twins_timm.adapters.modules import SegHead
from twins_timm.adapters.decoders.upernet.decoder import UPerNetDecoder


class TwinsUPerNet(TwinsSegmentationModel):
    """UPerNet on a Twins backbone with mmsegmentation's numerics (Twins ADE20K UPerNet models).

    Args (see `TwinsSegmentationModel` for the shared ones; aux_head defaults to True here):
        decoder_channels: UPerHead width (mmseg: 512).
        pool_scales: pyramid pooling output sizes (mmseg: 1, 2, 3, 6).
    """

    model_type = 'twins-upernet'

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = 'twins_svt_small',
        classes: int = 150,
        encoder_args: Optional[Dict[str, Any]] = None,
        aux_head: bool = True,
        encoder_weights: Optional[Union[bool, str]] = None,
        in_channels: int = 3,
        decoder_channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
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
        self.decoder = UPerNetDecoder(self.encoder.stage_channels, decoder_channels, pool_scales)
        self.segmentation_head = SegHead(decoder_channels, classes, decoder_dropout)
        self._build_aux_head(aux_head, aux_channels, decoder_dropout)
        self.initialize()
