"""mmseg's ADE20K training pipeline on torchvision.transforms.v2 (image + tv_tensors.Mask).

mmseg (configs/_base_/datasets/ade20k.py)      here
  RandomResize(scale=(2048, 512),                RandomResizeKeepRatio(scale=(4c, c), (0.5, 2.0))
               ratio_range=(0.5, 2.0), keep_ratio)
  RandomCrop(crop_size, cat_max_ratio=0.75)       RandomCropCatMax(c, 0.75)
  RandomFlip(prob=0.5)                            v2.RandomHorizontalFlip(0.5)
  PhotoMetricDistortion()                         PhotoMetricDistortion()
  SegDataPreProcessor(mean, std, size=crop)       Normalize + PadTo(c) (image 0, labels 255)

Images are bilinear-resized without antialiasing (as cv2 / mmcv), labels nearest.  The colour
distortion follows mmseg's order and ranges (brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5,
hue +-18 of 180, each with probability 0.5, contrast first or last); saturation and hue use
torchvision's colour functions instead of OpenCV's HSV round trip.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from twins_timm.adapters.loss import IGNORE_INDEX


def _mask_of(flat_inputs: List[Any]) -> torch.Tensor:
    return next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))


def _size_of(flat_inputs: List[Any]) -> Tuple[int, int]:
    return tuple(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)).shape[-2:])


class RandomResizeKeepRatio(v2.Transform):
    """mmseg's RandomResize(keep_ratio=True): fit the image into ``scale`` x U(ratio_range).

    ``scale`` is (long, short) as mmseg's (2048, 512): the image is scaled by
    min(long / long side, short / short side) and rounded as mmcv.rescale_size does.
    """

    def __init__(self, scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        long_t, short_t = self.scale[0] * ratio, self.scale[1] * ratio
        h, w = _size_of(flat_inputs)
        factor = min(long_t / max(h, w), short_t / min(h, w))
        return dict(size=[int(h * factor + 0.5), int(w * factor + 0.5)])

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return TF.resize(inpt, params['size'], interpolation=v2.InterpolationMode.NEAREST)
        if isinstance(inpt, tv_tensors.Image):
            return TF.resize(inpt, params['size'], interpolation=v2.InterpolationMode.BILINEAR,
                             antialias=False)
        return inpt


class RandomCropCatMax(v2.Transform):
    """mmseg's RandomCrop: a random crop (smaller if the image is), retried up to 10 times
    until no single class covers more than ``cat_max_ratio`` of its labelled pixels."""

    def __init__(self, crop_size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.crop_size, self.cat_max_ratio, self.ignore_index = crop_size, cat_max_ratio, ignore_index

    def _box(self, h: int, w: int) -> Tuple[int, int, int, int]:
        top = int(torch.randint(0, max(h - self.crop_size, 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.crop_size, 0) + 1, ()))
        return top, left, min(self.crop_size, h), min(self.crop_size, w)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _size_of(flat_inputs)
        box = self._box(h, w)
        if self.cat_max_ratio < 1.0:
            mask = _mask_of(flat_inputs)
            for _ in range(10):
                t, l, ch, cw = box
                crop = mask[..., t:t + ch, l:l + cw]
                _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                box = self._box(h, w)
        return dict(box=box)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return TF.crop(inpt, *params['box'])
        return inpt


class PhotoMetricDistortion(v2.Transform):
    """mmseg's PhotoMetricDistortion on a uint8 image (labels untouched)."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range, self.hue_delta = contrast_range, saturation_range, hue_delta

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        coin = lambda: bool(torch.randint(2, ()))  # noqa: E731
        p = dict(brightness=None, contrast=None, saturation=None, hue=None, contrast_first=coin())
        if coin():
            p['brightness'] = self._uniform(-self.brightness_delta, self.brightness_delta)
        if coin():
            p['contrast'] = self._uniform(*self.contrast_range)
        if coin():
            p['saturation'] = self._uniform(*self.saturation_range)
        if coin():
            p['hue'] = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ())) / 180.0
        return p

    def transform(self, inpt: Any, p: Dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        img = inpt.as_subclass(torch.Tensor).float()
        if p['brightness'] is not None:
            img = (img + p['brightness']).clamp(0, 255)
        if p['contrast_first'] and p['contrast'] is not None:
            img = (img * p['contrast']).clamp(0, 255)
        if p['saturation'] is not None:
            img = TF.adjust_saturation(img / 255, p['saturation']).mul(255).clamp(0, 255)
        if p['hue'] is not None:
            img = TF.adjust_hue(img / 255, p['hue']).mul(255).clamp(0, 255)
        if not p['contrast_first'] and p['contrast'] is not None:
            img = (img * p['contrast']).clamp(0, 255)
        return tv_tensors.wrap(img.round().to(torch.uint8), like=inpt)


class NormalizePad(v2.Transform):
    """mmseg's SegDataPreProcessor: (x - mean) / std on 0-255 RGB, then pad bottom / right to
    ``size`` with 0 (image) and the ignore value (labels)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int = 0,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.mean, self.std, self.size, self.ignore_index = list(mean), list(std), size, ignore_index

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image):
            x = TF.normalize(inpt.as_subclass(torch.Tensor).float(), self.mean, self.std)
            fill = 0.0
        elif isinstance(inpt, tv_tensors.Mask):
            x, fill = inpt.as_subclass(torch.Tensor).long(), self.ignore_index
        else:
            return inpt
        h, w = x.shape[-2:]
        ph, pw = max(self.size - h, 0), max(self.size - w, 0)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=fill)
        return tv_tensors.wrap(x, like=inpt)


def train_transform(crop_size: int, mean: Sequence[float], std: Sequence[float],
                    scale: Tuple[int, int] = None, ratio_range: Tuple[float, float] = (0.5, 2.0),
                    cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                    photometric: bool = True) -> v2.Compose:
    """mmseg's ADE20K train pipeline for ``crop_size`` (scale defaults to (4 crop, crop))."""
    scale = tuple(scale) if scale else (4 * crop_size, crop_size)
    steps = [RandomResizeKeepRatio(scale, ratio_range), RandomCropCatMax(crop_size, cat_max_ratio),
             v2.RandomHorizontalFlip(flip_prob)]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(NormalizePad(mean, std, crop_size))
    return v2.Compose(steps)


def min_crop_size() -> int:
    from ..models.twins import MIN_INPUT_SIZE
    return int(MIN_INPUT_SIZE)


__all__ = ['RandomResizeKeepRatio', 'RandomCropCatMax', 'PhotoMetricDistortion', 'NormalizePad',
           'train_transform', 'min_crop_size']
