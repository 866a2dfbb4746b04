"""Segmentation adapters: Twins backbones in SMP models with mmsegmentation's heads.

    from twins_timm.adapters import TwinsUPerNet, TwinsFPN, from_pretrained, mmseg_loss
"""
from . import ade20k
from .base import MMSEG_MEAN, MMSEG_STD, TwinsSegmentationModel
from .decoders.fpn.model import TwinsFPN
from .decoders.upernet.model import TwinsUPerNet
from .encoder import TwinsEncoder
from .hub import HEAD_CLASSES, HEADS, MODEL_CLASSES, from_pretrained, read_config
from .loss import AUX_WEIGHT, MAIN_WEIGHT, mmseg_loss

__all__ = [
    'ade20k', 'MMSEG_MEAN', 'MMSEG_STD', 'TwinsSegmentationModel', 'TwinsFPN', 'TwinsUPerNet',
    'TwinsEncoder', 'HEAD_CLASSES', 'HEADS', 'MODEL_CLASSES', 'from_pretrained', 'read_config', 'AUX_WEIGHT',
    'MAIN_WEIGHT', 'mmseg_loss',
]
