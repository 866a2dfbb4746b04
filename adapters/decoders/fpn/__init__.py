"""Semantic FPN (mmseg FPN neck + FPNHead)."""
from .decoder import FPNDecoder, FPNNeck
from .model import TwinsFPN

__all__ = ["FPNDecoder", "FPNNeck", "TwinsFPN"]
