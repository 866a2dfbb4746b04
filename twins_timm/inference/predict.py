"""Semantic-segmentation inference with mmsegmentation's test-time rules, in plain PyTorch.

What is reproduced (mmseg 1.2.2 / mmcv 2.1, and mmseg 0.x for the ADE20K "ms+flip" column):

* test resize: keep-ratio rescale to ``scale=(2048, 512)`` -- scale factor
  ``min(max(scale) / max(h, w), min(scale) / min(h, w))``, new size ``int(w * s + 0.5)`` x
  ``int(h * s + 0.5)`` (``mmcv.rescale_size``), bilinear on the uint8 image;
* normalisation after the resize, on 0-255 RGB with the model's ``mean`` / ``std``;
* ``whole`` mode: one forward, logits resized (bilinear, ``align_corners=False``) to the image;
* ``slide`` mode: ``EncoderDecoder.slide_inference`` -- grid of crops clipped to the image, crops
  smaller than the crop size when the image is smaller, overlapping logits summed and divided by
  a count map; here the crops go through the model in batches;
* multi-scale + flip: each scale ``(2048 * r, 512 * r)`` for r in ``MS_RATIOS`` (mmseg 0.x
  ``MultiScaleFlipAug``), with and without horizontal flip; each prediction's logits are resized
  to the original image, turned into softmax probabilities and averaged (mmseg's ``aug_test`` and
  ``SegTTAModel.merge_preds`` both average softmax); the flipped copy shares the forward pass of
  the unflipped one.  (mmseg 1.x's own ``ade20k.py`` ``tta_pipeline`` instead scales the image's
  own size by r, without the (2048, 512) bound: ``scale=None``, i.e. ``--no-resize --tta``.)

Resize: mmcv resizes with OpenCV's fixed-point ``INTER_LINEAR``; :func:`resize_uint8` replays
its integer arithmetic in torch (no OpenCV needed), which matches cv2 on x86 exactly on most
images and by at most one grey level on ~0.05% of pixels; plain ``F.interpolate`` rounded to
uint8 (``method='torch'``) is off by one grey level on ~12% of pixels (see the tests).
Memory: one view is computed at a time (the flipped copy in its own forward pass) and merged into
one image-size accumulator as it comes, so TTA holds one network-size score map, not all.  For photos
whose score map would exceed ``full_bytes`` (a 150-class map is 7 GB at 12 megapixels): one view's
labels come without the map (:func:`~twins_timm.inference.bilinear.upsampled_argmax`); TTA holds either
its views at network size or one image-size map, whichever is smaller, and resizes in bands of rows
with ``F.interpolate``'s own numbers (:func:`merged_bands`), in time linear in the pixels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twins_timm.adapters.base import MMSEG_MEAN, MMSEG_STD

from twins_timm.inference.bilinear import resized_rows, upsampled_argmax

# mmseg's ADE20K test scale (w, h) -- long side at most 2048, short side at most 512.
ADE20K_TEST_SCALE: Tuple[int, int] = (2048, 512)
# The image ratios of the ADE20K "mIoU (ms+flip)" column.
MS_RATIOS: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DEFAULT_MEAN, DEFAULT_STD = MMSEG_MEAN, MMSEG_STD  # a model without its own mean / std: mmseg's


@dataclass
class InferenceSettings:
    """How to run a segmenter on one image.

    ``scale=None`` feeds the image at its own size (times each ratio).  ``flip`` adds the
    horizontally flipped copy of every scale.  With more than one prediction (several ratios or
    flip) the merged output is the mean of softmax probabilities, as in mmseg.
    """
    mode: str = 'whole'
    scale: Optional[Tuple[int, int]] = ADE20K_TEST_SCALE
    ratios: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crop_size: Tuple[int, int] = (512, 512)
    stride: Tuple[int, int] = (341, 341)
    crop_batch: int = 4
    band_rows: int = 1 << 30
    full_bytes: int = 256 << 20
    resize_method: str = 'cv2'

    def __post_init__(self) -> None:
        if self.mode not in ('whole', 'slide'):
            raise ValueError("inference mode must be 'whole' or 'slide', got %r" % (self.mode,))
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError('ratios must be positive numbers, got %r' % (self.ratios,))
        if min(self.crop_size) < 1 or min(self.stride) < 1:
            raise ValueError('crop size and stride must be positive, got %r and %r'
                             % (self.crop_size, self.stride))
        self.ratios = tuple(float(r) for r in self.ratios)

    @property
    def num_predictions(self) -> int:
        return len(self.ratios) * (2 if self.flip else 1)


def ms_flip_settings(**overrides) -> InferenceSettings:
    """The settings behind the ADE20K table's ms+flip column."""
    kw = dict(ratios=MS_RATIOS, flip=True)
    kw.update(overrides)
    return InferenceSettings(**kw)


# ----------------------------------------------------------------------------- resize rules

def rescale_size(size_wh: Tuple[int, int], scale: Union[float, Tuple[int, int]]) -> Tuple[int, int]:
    """mmcv's keep-ratio target size (w, h) for an image of ``size_wh``.

    ``scale`` is a factor or a (long, short)-bounding pair; the pair's order does not matter.
    """
    w, h = size_wh
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if scale <= 0:
            raise ValueError('scale factor must be positive, got %r' % (scale,))
        factor = float(scale)
    else:
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def scale_for_ratio(scale: Tuple[int, int], ratio: float) -> Tuple[int, int]:
    """mmseg 0.x ``MultiScaleFlipAug``: ``(int(w * r), int(h * r))``."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def network_input_size(size_wh: Tuple[int, int], scale: Optional[Tuple[int, int]], ratio: float) -> Tuple[int, int]:
    """Network input size (w, h) for one scale of the test-time pipeline."""
    if scale is None:
        return rescale_size(size_wh, ratio)
    return rescale_size(size_wh, scale_for_ratio(scale, ratio))


def resize_uint8(images: torch.Tensor, size_hw: Tuple[int, int], method: str = 'cv2') -> torch.Tensor:
    """Bilinear resize of uint8-valued NCHW images to ``size_hw``; float tensor of whole numbers.

    ``method='cv2'`` reproduces OpenCV's ``INTER_LINEAR`` on uint8 (what mmcv uses): 11-bit
    fixed-point weights and the rounding of its SIMD vertical pass; ``'torch'`` is
    ``F.interpolate`` (same half-pixel rule, float weights) rounded to whole numbers.
    """
    h, w = images.shape[-2:]
    if (h, w) == tuple(size_hw):
        return images.float()
    if method == 'torch':
        out = F.interpolate(images.float(), size=size_hw, mode='bilinear', align_corners=False)
        return out.round_().clamp_(0, 255)
    if method != 'cv2':
        raise ValueError("resize method must be 'cv2' or 'torch', got %r" % (method,))
    device = images.device
    y0, y1, b0, b1 = (t.to(device) for t in _cv2_linear_weights(size_hw[0], h))
    x0, x1, a0, a1 = (t.to(device) for t in _cv2_linear_weights(size_hw[1], w))
    # the horizontal pass only for the source rows the vertical one reads (a large photo: a few percent)
    needed = torch.cat([y0, y1]).unique()
    x = images.index_select(-2, needed)
    rows = x[..., x0].long() * a0 + x[..., x1].long() * a1  # horizontal pass, weights sum to 2048
    y0, y1 = torch.searchsorted(needed, y0), torch.searchsorted(needed, y1)
    b0, b1 = b0.view(-1, 1), b1.view(-1, 1)
    v = (((rows[..., y0, :] >> 4) * b0) >> 16) + (((rows[..., y1, :] >> 4) * b1) >> 16)
    return ((v + 2) >> 2).clamp_(0, 255).float()


@functools.lru_cache(maxsize=32)
def _cv2_linear_weights(out_size: int, in_size: int) -> Tuple[torch.Tensor, ...]:
    """Source indices and 11-bit weights of OpenCV's INTER_LINEAR along one axis."""
    scale = 1.0 / (out_size / in_size)
    f = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    i0 = f.floor().long()
    f = f - i0
    low, high = i0 < 0, i0 >= in_size - 1
    f[low | high] = 0
    i0 = i0.clamp(0, in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (1 - f).mul(2048).round().long(), f.mul(2048).round().long()


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel on 0-255 RGB NCHW."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() - m) / s


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB array -> 1x3xHxW uint8 tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError('expected an RGB image of shape (H, W, 3), got %r' % (image.shape,))
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)


# ----------------------------------------------------------------------------- forward modes

def slide_windows(h: int, w: int, crop_size: Tuple[int, int], stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's sliding-window grid; every window has the same size."""
    h_crop, w_crop = crop_size
    h_stride, w_stride = stride
    h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * h_stride + h_crop, h)
            x2 = min(wi * w_stride + w_crop, w)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def slide_logits(model: nn.Module, x: torch.Tensor, crop_size: Tuple[int, int],
                 stride: Tuple[int, int], crop_batch: int = 4) -> torch.Tensor:
    """mmseg ``slide`` inference on normalised NCHW ``x``, ``crop_batch`` windows per forward."""
    b, _, h, w = x.shape
    windows = slide_windows(h, w, crop_size, stride)
    preds = None
    count = x.new_zeros((1, 1, h, w))
    for start in range(0, len(windows), max(1, crop_batch)):
        chunk = windows[start:start + max(1, crop_batch)]
        crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = _at_size(model(crops), crops.shape[-2:])
        if preds is None:
            preds = x.new_zeros((b, out.shape[1], h, w))
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            preds[:, :, y1:y2, x1:x2] += out[k * b:(k + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


class NonFiniteLogitsError(ValueError):
    """The model's output holds NaN or Inf: an argmax over it would label pixels arbitrarily, not fail."""


def model_logits(model: nn.Module, x: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Logits at the size of ``x`` (normalised NCHW) in the configured mode; a NonFiniteLogitsError if any is
    NaN or infinite."""
    if settings.mode == 'slide':
        logits = slide_logits(model, x, settings.crop_size, settings.stride, settings.crop_batch)
    else:
        logits = _at_size(model(x), x.shape[-2:])
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError('the model gave NaN or infinite logits, so its labels would mean nothing: its '
                                   'weights hold extreme values, or a half-precision model overflowed (run it in '
                                   'float32)')
    return logits


def _at_size(logits: torch.Tensor, size_hw) -> torch.Tensor:
    """Segmenters here return input-size logits; others (e.g. stride-4 maps) are resized."""
    if logits.shape[-2:] == size_hw:
        return logits
    return F.interpolate(logits, size=size_hw, mode='bilinear', align_corners=False)


def augmented_logits(model: nn.Module, images: torch.Tensor, settings: InferenceSettings,
                     mean: Sequence[float], std: Sequence[float]) -> Iterator[torch.Tensor]:
    """Logits of every test-time view of a batch of same-size uint8 NCHW images, one at a time.

    Yields one (B, C, h_r, w_r) tensor per view, already un-flipped, at that view's input size.
    The flipped copy has a forward pass of its own, after the original's logits were handed on:
    peak memory is that of one view, not of two.
    """
    _, _, h, w = images.shape
    for ratio in settings.ratios:
        new_w, new_h = network_input_size((w, h), settings.scale, ratio)
        if min(new_w, new_h) < 1:
            raise ValueError('image of %dx%d is too small for scale ratio %g' % (w, h, ratio))
        x = normalize(resize_uint8(images, (new_h, new_w), settings.resize_method), mean, std)
        yield model_logits(model, x, settings)
        if settings.flip:
            yield _unflip(model_logits(model, x.flip(-1), settings))
        del x


def _unflip(logits: torch.Tensor, channels: int = 16) -> torch.Tensor:
    """``logits.flip(-1)`` in place, a few channels at a time: no second network-size score map."""
    for c in range(0, logits.shape[1], channels):
        logits[:, c:c + channels] = logits[:, c:c + channels].flip(-1)
    return logits


# ----------------------------------------------------------------------------- merge at image size

# A merge band's size once a merge goes in bands: 4000-pixel rows of 150 classes, 12 views: 8 MiB bands took
# 61 s, 256 MiB bands 133 s (2-core Xeon); the band's temporaries stay in cache.
MERGE_BAND_BYTES = 8 << 20


def merged_bands(views: Iterable[torch.Tensor], out_hw: Tuple[int, int], band_rows: int = 1 << 30,
                 full_bytes: int = 256 << 20, view_pixels: Optional[int] = None
                 ) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Resize each view to ``out_hw`` and merge them, as mmseg: one view's logits, or the mean softmax.

    Yields (row_start, row_end, (B, C, rows, W) scores).  Every resize is ``F.interpolate``
    (bilinear, ``align_corners=False``); above ``full_bytes`` a view is resized in bands of rows
    (:func:`_resized_rows`, same values), so no temporary is larger than a band.  Two ways to merge:

    * accumulate: views are consumed one at a time into one image-size map (one view held);
    * keep: all views are held at their network size and the result is made band by band (no
      image-size map).  Used for a large image when the views' ``view_pixels`` in all (per image;
      None: unknown) are fewer than the image's pixels -- a big photo under the test scale's bound.
    """
    h_out, w_out = out_hw
    views = iter(views)
    first = next(views)
    b, c = first.shape[:2]
    row_bytes = b * c * w_out * 4
    step = max(1, min(band_rows, full_bytes // row_bytes))
    if step < h_out:  # banded: bands of a few MiB, which stay in cache through resize, softmax and sum
        step = max(1, min(step, MERGE_BAND_BYTES // row_bytes))
    bands = [(r0, min(r0 + step, h_out)) for r0 in range(0, h_out, step)]
    if len(bands) > 1 and (view_pixels is None or view_pixels < h_out * w_out):
        yield from _merged_from_kept([first] + list(views), out_hw, bands)
        return
    acc, n = None, 0
    view = first
    del first  # no network-size map is held while the next view is computed
    while view is not None:
        for r0, r1 in bands:
            band = resized_rows(view, out_hw, r0, r1)
            if acc is None and len(bands) == 1:
                acc = band if band is not view else band.clone()
                continue
            if acc is None:
                acc = view.new_empty((b, c, h_out, w_out))
            if n == 0:
                acc[:, :, r0:r1] = band
                continue
            if n == 1:  # a second view: the first one's logits become probabilities
                acc[:, :, r0:r1] = acc[:, :, r0:r1].softmax(dim=1)
            acc[:, :, r0:r1] += band.softmax(dim=1)
        n += 1
        del view, band  # the network-size map goes before the next view is computed
        view = next(views, None)
    yield 0, h_out, acc if n == 1 else acc.div_(n)


def _merged_from_kept(kept: List[torch.Tensor], out_hw: Tuple[int, int],
                      bands: List[Tuple[int, int]]) -> Iterator[Tuple[int, int, torch.Tensor]]:
    for r0, r1 in bands:
        acc = resized_rows(kept[0], out_hw, r0, r1)
        if len(kept) > 1:
            acc = acc.softmax(dim=1)
            for v in kept[1:]:
                acc += resized_rows(v, out_hw, r0, r1).softmax(dim=1)
            acc /= len(kept)
        yield r0, r1, acc


# ----------------------------------------------------------------------------- public entry points

def _model_norm(model: nn.Module) -> Tuple[Sequence[float], Sequence[float]]:
    return getattr(model, 'mean', None) or DEFAULT_MEAN, getattr(model, 'std', None) or DEFAULT_STD


def _prepare(model: nn.Module, images: Union[np.ndarray, torch.Tensor], device) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = to_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    return images.to(device)


def _counted(views: Iterator[torch.Tensor], on_view: Optional[Callable[[], None]]) -> Iterator[torch.Tensor]:
    """Call ``on_view()`` once each view has been merged (when the next one is asked for).

    Holds no reference to the view it hands on (``yield next(...)``), so the consumer can free it.
    """
    views = iter(views)
    while True:
        try:
            yield next(views)
        except StopIteration:
            return
        if on_view is not None:
            on_view()


def predict_scores(model: nn.Module, images: Union[np.ndarray, torch.Tensor],
                   settings: Optional[InferenceSettings] = None, device=None,
                   on_view: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Scores (B, C, H, W) at the original image size: logits for one view, else mean softmax.

    ``images``: an HWC uint8 RGB array, or a uint8-valued (B, 3, H, W) tensor of same-size images.
    ``on_view``: called after each of the ``settings.num_predictions`` views (progress bars).
    """
    settings = settings or InferenceSettings()
    x = _prepare(model, images, device)
    mean, std = _model_norm(model)
    scores = None
    with torch.inference_mode():
        for r0, r1, band in _merged(model, x, settings, mean, std, on_view):
            if (r0, r1) == (0, x.shape[-2]):
                return band
            if scores is None:
                scores = band.new_empty(band.shape[:2] + x.shape[-2:])
            scores[:, :, r0:r1] = band
    return scores


def predict_labels(model: nn.Module, images: Union[np.ndarray, torch.Tensor],
                   settings: Optional[InferenceSettings] = None, device=None,
                   on_view: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Class index map (B, H, W) int64 at the original image size (argmax of the merged scores).

    ``on_view``: called after each of the ``settings.num_predictions`` views (progress bars).
    """
    settings = settings or InferenceSettings()
    x = _prepare(model, images, device)
    mean, std = _model_norm(model)
    b, _, h, w = x.shape
    labels = torch.empty((b, h, w), dtype=torch.int64)
    with torch.inference_mode():
        if settings.num_predictions == 1 and _score_map_bytes(model, x) > settings.full_bytes:
            view, = _counted(augmented_logits(model, x, settings, mean, std), on_view)
            return upsampled_argmax(view, (h, w), settings.full_bytes // 4).cpu()  # no image-size score map
        for r0, r1, band in _merged(model, x, settings, mean, std, on_view):
            labels[:, r0:r1] = band.argmax(dim=1).cpu()
    return labels


def _score_map_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Size of the float32 score map at image size (classes from the model; 150 when it does not say)."""
    classes = getattr(model, 'classes', None)
    return x.shape[0] * (classes if isinstance(classes, int) else 150) * x.shape[-2] * x.shape[-1] * 4


def _merged(model: nn.Module, x: torch.Tensor, settings: InferenceSettings, mean: Sequence[float],
            std: Sequence[float], on_view: Optional[Callable[[], None]]) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """The merged scores of ``x`` in bands of rows; told how large the views will be, so that
    :func:`merged_bands` can hold whichever needs less memory (the views or an image-size map)."""
    h, w = x.shape[-2:]
    view_pixels = settings.num_predictions // len(settings.ratios) * sum(
        vw * vh for vw, vh in (network_input_size((w, h), settings.scale, r) for r in settings.ratios))
    views = _counted(augmented_logits(model, x, settings, mean, std), on_view)
    return merged_bands(views, (h, w), settings.band_rows, settings.full_bytes, view_pixels)
