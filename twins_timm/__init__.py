"""Twins-PCPVT / Twins-SVT for timm and SMP."""
from .models import twins  # noqa: F401  registers the six models with timm

