"""Evaluate a segmenter on an ADE20K-format folder: mIoU, mAcc, aAcc and a per-class table.

The folder holds DATA/images/<split>/*.jpg and DATA/annotations/<split>/*.png with the same
names.  Metrics follow mmsegmentation's IoUMetric: ADE20K annotations are reduced by one
(0 = "other" becomes 255, ignored), pixels labelled 255 are ignored, areas are summed over the
whole set before dividing, and classes absent from both prediction and ground truth (union 0)
have no IoU and are left out of the means.  Predictions are made at the annotation's size with
mmseg's test resize (see `twins-timm segment --help` for the inference options).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from .common import (add_inference_arguments, add_model_arguments, describe_settings,
                     model_classes, pick_device, quiet_stdout, settings_from_args)
from .inference import InferenceSettings, predict_labels
from .loading import RANDOM_LABEL, load_model, read_image, read_label_map
from .paths import check_output_file, refuse_inputs_as_outputs
from .visualize import class_name_list
from twins_timm.convert.io import atomic_path
from ..train.data import IMAGE_SUFFIXES, check_pairs, find_pairs, reduce_zero_label  # noqa: F401
from . import distributed
from ..optimize import optimize

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm eval --data ADEChallengeData2016 --model ./twins_svt_l_upernet
  twins-timm eval --data ADEChallengeData2016 --model ./model --tta --device cuda --json metrics.json
  twins-timm eval --data my_set --split val --no-reduce-zero-label --model ./model --limit 50
  torchrun --nproc-per-node 4 -m twins_timm eval --data ADEChallengeData2016 --model ./model
      # images sharded over the processes, counts summed: the same mIoU as one process
"""

# ----------------------------------------------------------------------------- metrics

def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = 255) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    ignore_index: int = 255
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


# ----------------------------------------------------------------------------- data set

def evaluate(model: torch.nn.Module, pairs: Sequence[Tuple[Path, Path]], settings: InferenceSettings,
             num_classes: int, device=None, reduce_zero: bool = True, ignore_index: int = 255,
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


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--data', required=True, metavar='DIR',
                        help='ADE20K-format folder: images/SPLIT/*.jpg, annotations/SPLIT/*.png')
    parser.add_argument('--split', default='validation', help='sub-folder name (default: validation)')
    add_model_arguments(parser, random_fallback=False)
    parser.add_argument('--no-reduce-zero-label', action='store_true',
                        help='annotations are already 0-based class indices (ADE20K files are not)')
    parser.add_argument('--ignore-index', type=int, default=255, help='label ignored (default 255)')
    parser.add_argument('--limit', type=int, default=None, metavar='N', help='first N images only')
    parser.add_argument('--json', metavar='FILE', default=None, help='also write the metrics as JSON')
    parser.add_argument('--force', action='store_true', help='overwrite an existing --json file')
    parser.add_argument('--quiet', action='store_true', help='no progress bar or model-loading messages')
    add_inference_arguments(parser)


def _write_json(path: Path, payload: dict, overwrite: bool) -> None:
    with atomic_path(path, force=overwrite) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    pairs = find_pairs(Path(args.data), args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError('--limit must be at least 1')
        pairs = pairs[:args.limit]
    if args.json:  # checked before the model loads: a bad path must not cost an evaluation
        inputs = [p for pair in pairs for p in pair]
        model_path = Path(args.model) if args.model else None
        if model_path is not None and model_path.exists():
            inputs += sorted(model_path.iterdir()) if model_path.is_dir() else [model_path]
        refuse_inputs_as_outputs([args.json], inputs, 'Give --json a new file name.')
        check_output_file(args.json, '--json', force=args.force)
    check_pairs(pairs, progress=not args.quiet, what=args.split)  # every file, before the first forward
    device = pick_device(args.device)
    ctx = distributed.init(device.type, quiet_others=True)  # torchrun: each process evaluates every world-th image
    device = distributed.device_for(ctx, device)
    with quiet_stdout(args.quiet):
        loaded = load_model(args.model, allow_random=False)
    model = optimize(loaded.model.to(device).eval(), kernels=args.kernels)  # CPU-inference layers
    num_classes, names, _ = model_classes(model)
    names = class_name_list(num_classes, names)
    print('Model: %s' % loaded.source)
    if loaded.random_weights:
        print('*** %s: these metrics are NOT those of a trained model ***' % RANDOM_LABEL)
    print('Data: %d image(s) from %s/%s; inference: %s on %s'
          % (len(pairs), args.data, args.split, describe_settings(settings), device))
    acc = evaluate(model, distributed.shard(pairs, ctx), settings, num_classes, device=device,
                   reduce_zero=not args.no_reduce_zero_label, ignore_index=args.ignore_index,
                   progress=not args.quiet and ctx.main)
    acc.sum_over_processes(ctx)
    distributed.finish(ctx)
    if not ctx.main:
        return 0
    summary = acc.summary()
    print('\nper-class results:')
    print(format_table(acc, names))
    print('\naAcc %.2f  mIoU %.2f  mAcc %.2f  (%d images, %d classes with an IoU)' % (
        100 * summary['aAcc'], 100 * summary['mIoU'], 100 * summary['mAcc'], acc.images,
        int(np.isfinite(acc.per_class()['IoU']).sum())))
    if args.json:
        per = acc.per_class()
        nan_to_none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
        _write_json(Path(args.json), {
            'model': loaded.source, 'random_weights': loaded.random_weights,
            'images': acc.images, 'settings': describe_settings(settings), **summary,
            'per_class': {'class': names, 'IoU': nan_to_none(per['IoU']), 'Acc': nan_to_none(per['Acc'])},
        }, args.force)
        print('Wrote %s' % args.json)
    return 0
