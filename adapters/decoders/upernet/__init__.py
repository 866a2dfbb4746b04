"""UPerNet (mmseg UPerHead)."""
from .decoder import UPerNetDecoder
from .model import TwinsUPerNet

__all__ = ["UPerNetDecoder", "TwinsUPerNet"]
