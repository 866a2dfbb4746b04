"""Twins-PCPVT and Twins-SVT for timm, segmentation-models-pytorch and the Hugging Face Hub.

Importing the package registers ``twins_{pcpvt,svt}_{small,base,large}`` with timm, replacing timm's
own Twins under the same names (same parameter names, arguments and pretrained tags, so timm's hub
weights load and give timm's numbers). ``from_pretrained(spec)`` makes the model of any spec (a published
name, URL, folder, checkpoint file, Hub id or ``upernet:twins_svt_small``); ``optimize(model)`` swaps in
the CPU-inference layers.
"""
from .requirements import check_timm

check_timm()
from .models.twins import Twins, checkpoint_family_args  # registers the six models with timm
from .optimize import optimize
from .zoo.resolve import from_pretrained

__version__ = '0.1.0'
__all__ = ['Twins', 'checkpoint_family_args', 'from_pretrained', 'optimize', '__version__']
