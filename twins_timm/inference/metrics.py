"""mmsegmentation's IoUMetric: areas summed over the whole set, then divided; classes with no union left out.

ADE20K annotations are reduced by one (0 = "other" becomes the ignored 255) when ``reduce_zero``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from twins_timm.adapters.loss import IGNORE_INDEX
from twins_timm.inference import distributed
from twins_timm.inference.images import read_image, read_label_map
from twins_timm.inference.predict import InferenceSettings, predict_labels


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K convention: 0 ("other") -> 255 (ignored), every other class index minus one."""
    label = np.asarray(label).astype(np.int64)
    out = label - 1
    out[label == 0] = IGNORE_INDEX
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 stays ignored
    return out


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts (intersection, union, predicted, labelled) of one image.

    Pixels labelled ``ignore_index`` are dropped; other labels outside 0..num_classes-1 count
    for nothing in the label histogram (as mmseg's ``torch.histc``) but their predictions count.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError('prediction and label sizes differ: %d vs %d pixels' % (pred.size, label.size))
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]

    def hist(values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < num_classes)]
        return np.bincount(values, minlength=num_classes).astype(np.int64)

    area_intersect = hist(pred[pred == label])
    area_pred = hist(pred)
    area_label = hist(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


@dataclass
class IoUAccumulator:
    """Sums per-class areas over a data set and turns them into mmseg's metrics."""
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = True
    intersect: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)
    pred_area: np.ndarray = field(init=False)
    label_area: np.ndarray = field(init=False)
    images: int = 0

    def __post_init__(self) -> None:
        z = lambda: np.zeros(self.num_classes, np.int64)  # noqa: E731
        self.intersect, self.union, self.pred_area, self.label_area = z(), z(), z(), z()

    def add(self, pred: np.ndarray, raw_label: np.ndarray) -> None:
        """``raw_label`` as stored in the annotation file (reduced here when configured)."""
        label = reduce_zero_label(raw_label) if self.reduce_zero_label else np.asarray(raw_label)
        i, u, p, l = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.intersect += i
        self.union += u
        self.pred_area += p
        self.label_area += l
        self.images += 1

    def sum_over_processes(self, ctx: 'distributed.Dist') -> None:
        """Exact sums of every process's areas (torchrun: each evaluated its share), in place."""
        self.intersect, self.union, self.pred_area, self.label_area, (images,) = distributed.all_sum(
            [self.intersect, self.union, self.pred_area, self.label_area, [self.images]], ctx)
        self.images = int(images)

    def per_class(self) -> Dict[str, np.ndarray]:
        """IoU and Acc per class in [0, 1]; NaN where the denominator is 0."""
        with np.errstate(divide='ignore', invalid='ignore'):
            iou = np.where(self.union > 0, self.intersect / np.maximum(self.union, 1), np.nan)
            acc = np.where(self.label_area > 0, self.intersect / np.maximum(self.label_area, 1), np.nan)
        return {'IoU': iou, 'Acc': acc}

    def summary(self) -> Dict[str, float]:
        """aAcc, mIoU, mAcc in [0, 1] (NaN classes excluded from the means)."""
        total = self.label_area.sum()
        if total == 0:
            raise ValueError('no labelled pixels were evaluated (every pixel ignored?)')
        per = self.per_class()
        return {'aAcc': float(self.intersect.sum() / total),
                'mIoU': float(np.nanmean(per['IoU'])),
                'mAcc': float(np.nanmean(per['Acc']))}


def format_table(acc: IoUAccumulator, class_names: Sequence[str]) -> str:
    """Per-class IoU / Acc table in percent; '-' for classes without a value."""
    per = acc.per_class()
    width = max([len('Class')] + [len(n) for n in class_names])
    lines = ['%-*s  %7s  %7s  %10s  %10s' % (width, 'Class', 'IoU', 'Acc', 'GT pixels', 'pred pixels')]
    lines.append('-' * len(lines[0]))
    fmt = lambda v: '      -' if np.isnan(v) else '%7.2f' % (100 * v)  # noqa: E731
    for k, name in enumerate(class_names):
        lines.append('%-*s  %s  %s  %10d  %10d' % (width, name, fmt(per['IoU'][k]), fmt(per['Acc'][k]),
                                                  acc.label_area[k], acc.pred_area[k]))
    return '\n'.join(lines)


# what every metrics JSON holds besides the metrics: what marks a file as one we wrote (--force replaces only those)
JSON_KEYS = frozenset({'model', 'random_weights', 'images', 'settings', 'per_class'})


def metrics_json(acc: IoUAccumulator, class_names: Sequence[str], model_source: str, random_weights: bool,
                 settings: str) -> Dict[str, Any]:
    """The metrics as `twins-timm eval --json` writes them: aAcc, mIoU, mAcc, per-class IoU / Acc (None for a
    class without a value) and what made them (the model, whether its weights were random, the settings)."""
    per = acc.per_class()
    nan_to_none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
    return {'model': model_source, 'random_weights': random_weights, 'images': acc.images, 'settings': settings,
            **acc.summary(),
            'per_class': {'class': list(class_names), 'IoU': nan_to_none(per['IoU']), 'Acc': nan_to_none(per['Acc'])}}


def json_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not a metrics JSON that :func:`metrics_json` made (None: it is one)."""
    try:
        payload = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return 'not a JSON file'
    return None if isinstance(payload, dict) and JSON_KEYS <= set(payload) else 'not a twins-timm eval result'


# ----------------------------------------------------------------------------- data set

def evaluate(model: torch.nn.Module, pairs: Sequence[Tuple[Path, Path]], settings: InferenceSettings,
             num_classes: int, device=None, reduce_zero: bool = True, ignore_index: int = IGNORE_INDEX,
             progress: bool = True) -> IoUAccumulator:
    acc = IoUAccumulator(num_classes, ignore_index, reduce_zero)
    for img_path, ann_path in tqdm(pairs, unit='img', disable=not progress, file=sys.stderr):
        image, _ = read_image(img_path)
        label = read_label_map(ann_path)
        if label.shape != image.shape[:2]:
            raise ValueError('%s is %dx%d but its annotation %s is %dx%d' % (
                img_path, image.shape[1], image.shape[0], ann_path, label.shape[1], label.shape[0]))
        pred = predict_labels(model, image, settings, device=device)[0].numpy()
        acc.add(pred, label)
    return acc


