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
import textwrap
from pathlib import Path

import numpy as np

from twins_timm.commands.common import (add_inference_arguments, add_model_arguments, describe_settings,
                                        engine_from_args, model_classes, quiet_stdout, scale_for_model,
                                        settings_from_args)
from twins_timm.files.atomic import atomic_path
from twins_timm.files.paths import check_output_file, refuse_inputs_as_outputs
from twins_timm.inference import distributed
from twins_timm.inference.devices import pick_device
from twins_timm.inference.metrics import evaluate, format_table, json_not_ours, metrics_json
from twins_timm.inference.visualize import class_name_list
from twins_timm.train.data import check_pairs, find_pairs, label_convention_problem
from twins_timm.zoo.resolve import DEFAULT_MODEL_ID, RANDOM_LABEL, load_model, model_files

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm eval --data ADEChallengeData2016 --model ./twins_svt_l_upernet
  twins-timm eval --data ADEChallengeData2016 --model ./model --tta --device cuda --json metrics.json
  twins-timm eval --data my_set --split val --no-reduce-zero-label --model ./model --limit 50
  torchrun --nproc-per-node 4 -m twins_timm eval --data ADEChallengeData2016 --model ./model
      # images sharded over the processes, counts summed: the same mIoU as one process
"""

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
    parser.add_argument('--force', action='store_true',
                        help='overwrite an existing --json file that an earlier `twins-timm eval` wrote')
    parser.add_argument('--quiet', action='store_true', help='no progress bar or model-loading messages')
    add_inference_arguments(parser)


def _write_json(path: Path, payload: dict, overwrite: bool) -> None:
    with atomic_path(path, force=overwrite, not_ours=json_not_ours) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    pairs = find_pairs(Path(args.data), args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError('--limit must be at least 1')
        pairs = pairs[:args.limit]
    if args.json:  # checked before the model loads: a bad path must not cost an evaluation
        inputs = [p for pair in pairs for p in pair] + model_files(args.model, DEFAULT_MODEL_ID)
        refuse_inputs_as_outputs([args.json], inputs, 'Give --json a new file name.')
        check_output_file(args.json, '--json', force=args.force, not_ours=json_not_ours)
    check_pairs(pairs, progress=not args.quiet, what=args.split)  # every file, before the first forward
    device = pick_device(args.device)
    ctx = distributed.init(device.type, quiet_others=True)  # torchrun: each process evaluates every world-th image
    device = distributed.device_for(ctx, device)
    with quiet_stdout(args.quiet):
        loaded = load_model(args.model, allow_random=False)
    model = loaded.model.to(device).eval()
    settings, scale_source = scale_for_model(settings, args, model)
    model = engine_from_args(model, args, loaded.source)
    num_classes, names, _ = model_classes(model)
    names = class_name_list(num_classes, names)
    # every annotation decoded before the first forward: truncated files and labels the model has no class for
    labels = check_pairs(distributed.shard(pairs, ctx), num_classes, not args.no_reduce_zero_label,
                         args.ignore_index, progress=not args.quiet and ctx.main, what=args.split,
                         report=lambda items: distributed.gather(items, ctx))
    convention = label_convention_problem(labels, num_classes, not args.no_reduce_zero_label, args.ignore_index)
    if convention and ctx.main:  # a warning, not a refusal: a split may simply lack the last class
        print(textwrap.fill('twins-timm eval: warning: %s If these labels are 1-based and the last class just does '
                            'not occur in this split, the metrics are right.' % convention, 100,
                            break_long_words=False, break_on_hyphens=False), file=sys.stderr)
    print('Model: %s' % loaded.source)
    if loaded.random_weights:
        print('*** %s: these metrics are NOT those of a trained model ***' % RANDOM_LABEL)
    print('Data: %d image(s) from %s/%s; inference: %s on %s'
          % (len(pairs), args.data, args.split, describe_settings(settings, scale_source), device))
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
        _write_json(Path(args.json), metrics_json(acc, names, loaded.source, loaded.random_weights,
                                                  describe_settings(settings)), args.force)
        print('Wrote %s' % args.json)
    return 0
