"""Segment images with a converted Twins segmenter; write class-index and overlay PNGs.

For every IMAGE, OUT/<name>_labels.png holds the class index of each pixel (0-based indices into the
model's class names; a palette PNG, so it also opens in colour) and OUT/<name>_overlay.png the
photo blended with the class colours and a legend of the classes present.  Without IMAGE, the
sample photo shipped with the package is used; without --model, the default converted ADE20K
model, or -- when it is not available offline -- a random-initialised model that is labelled as such:
its outputs are named <name>_labels_RANDOM-WEIGHTS.png / <name>_overlay_RANDOM-WEIGHTS.png, the overlay
carries a red banner and both PNGs a "Warning" text chunk.

Safety: no output ever replaces an input (not even with --force), and --force replaces only PNGs that
twins-timm wrote (never a link); every input header, the output folder and the existing outputs are
checked before the model loads.  An image that fails later (its
data turns out corrupt while decoding, or it is too small for the model) is skipped and listed at the
end; the others are still written, and the exit code is 1 (0: all written; 2: nothing done, the
error says why).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import List

import numpy as np
import torch
from tqdm import tqdm

from twins_timm.inference import distributed
from twins_timm.inference.devices import pick_device
from twins_timm.commands.common import (add_inference_arguments, add_model_arguments, describe_settings, engine_from_args,
                     model_classes, quiet_stdout, scale_for_model, settings_from_args)
from twins_timm.inference.predict import predict_labels
from twins_timm.inference.images import DEFAULT_MAX_PIXELS, check_image, read_image, sample_image_path
from twins_timm.zoo.resolve import DEFAULT_MODEL_ID, RANDOM_LABEL, load_model, model_files
from twins_timm.files.paths import check_writable_dir
from twins_timm.inference.outputs import check_outputs, label_summary, output_paths, write_segmentation
from twins_timm.inference.visualize import class_name_list, make_palette

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm segment --out out/                  # sample photo, default model
  twins-timm segment photos/*.jpg --model ./twins_svt_l_upernet --out seg/ --batch-size 4
  twins-timm segment room.jpg --model ./model --tta --device cuda --out seg/   # ms+flip
  twins-timm segment big.jpg --model ./model --mode slide --crop-size 512 --stride 341 --out seg/
  torchrun --nproc-per-node 4 -m twins_timm segment photos/*.jpg --model ./model --out seg/  # sharded
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='image files (default: the sample photo shipped with twins-timm)')
    add_model_arguments(parser, random_fallback=True)
    parser.add_argument('--out', metavar='DIR', default='twins-timm-out',
                        help='output folder (default: ./twins-timm-out)')
    parser.add_argument('--batch-size', type=int, default=1, metavar='N',
                        help='images per forward pass; images of equal size are batched (default 1)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='weight of the class colours in the overlay (default 0.5)')
    parser.add_argument('--force', action='store_true',
                        help='replace existing output files (never an input: outputs end in _labels.png / '
                             '_overlay.png, and an output path equal to an input is always refused)')
    parser.add_argument('--max-pixels', type=int, default=DEFAULT_MAX_PIXELS, metavar='N',
                        help='largest image read, in pixels, a guard against decompression bombs '
                             '(default %d, Pillow\'s own limit; 0: no limit)' % DEFAULT_MAX_PIXELS)
    parser.add_argument('--quiet', action='store_true',
                        help='no progress bar, per-image lines or model-loading messages (errors, the '
                             'summary and the random-weights warning are still shown)')
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError('--batch-size must be at least 1')
    if not 0.0 <= args.opacity <= 1.0:
        raise ValueError('--opacity must be between 0 and 1, got %g' % args.opacity)
    if args.max_pixels < 0:
        raise ValueError('--max-pixels must be 0 (no limit) or a positive number of pixels')
    settings = settings_from_args(args)
    images = [Path(p) for p in args.images] or [sample_image_path()]
    if not args.images:
        print('No IMAGE given: segmenting the sample photo %s' % images[0])
    problems = []
    for p in images:
        try:
            check_image(p, args.max_pixels)
        except (ValueError, OSError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError('cannot read %d of %d input(s), nothing was written. %s'
                         % (len(problems), len(images), ' | '.join(problems)))
    out_dir = Path(args.out)
    model_inputs = model_files(args.model, DEFAULT_MODEL_ID)
    outputs = output_paths(images, out_dir, model_inputs=model_inputs)
    check_writable_dir(out_dir, '--out')
    check_outputs(outputs, args.force)
    device = pick_device(args.device)
    ctx = distributed.init(device.type, quiet_others=True)  # torchrun: each process takes every world-th image
    device = distributed.device_for(ctx, device)
    distributed.barrier(ctx)  # every process has checked the outputs before any writes
    mine = distributed.shard(list(range(len(images))), ctx)
    with quiet_stdout(args.quiet):
        loaded = load_model(args.model, log=None if not args.quiet else _stderr_if_random)
    model = loaded.model.to(device).eval()
    settings, scale_source = scale_for_model(settings, args, model)
    model = engine_from_args(model, args, loaded.source)
    num_classes, names, palette = model_classes(model)
    names = class_name_list(num_classes, names)
    colours = make_palette(num_classes, palette)
    banner = RANDOM_LABEL if loaded.random_weights else None
    if banner:  # the random model's outputs carry the mark in their names too
        outputs = output_paths(images, out_dir, random_weights=True, model_inputs=model_inputs)
        check_outputs(outputs, args.force)
    text = {'Software': 'twins-timm', 'Source': loaded.source}
    if banner:
        text['Warning'] = '%s: this segmentation is NOT meaningful' % RANDOM_LABEL
    print('Model: %s' % loaded.source)
    if banner:
        print('*** %s: the segmentation below is NOT meaningful ***' % RANDOM_LABEL)
    print('Inference: %s on %s' % (describe_settings(settings, scale_source), device))

    failed: List[str] = []
    written = 0
    views = settings.num_predictions
    bar = tqdm(total=len(mine) * views, unit='view' if views > 1 else 'img',
               disable=args.quiet or not ctx.main, file=sys.stderr)
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start:start + args.batch_size]
        decoded = {}
        for i in chunk:
            try:
                decoded[i], note = read_image(images[i], args.max_pixels)
                if note and not args.quiet:
                    tqdm.write('%s: %s' % (images[i], note))
            except (ValueError, OSError) as e:
                tqdm.write('error: %s (skipped)' % e, file=sys.stderr)
                failed.append(str(images[i]))
                bar.update(views)
        groups = defaultdict(list)  # same size -> one batch
        for i, arr in decoded.items():
            groups[arr.shape].append(i)
        for idx in groups.values():
            batch = torch.from_numpy(np.stack([decoded[i] for i in idx])).permute(0, 3, 1, 2)
            try:
                labels = predict_labels(model, batch, settings, device=device,
                                        on_view=lambda: bar.update(len(idx))).numpy()
            except ValueError as e:  # e.g. an image too small for the model: skip it, go on
                from twins_timm.inference.predict import NonFiniteLogitsError
                if isinstance(e, NonFiniteLogitsError):  # the model, not this image: stop
                    raise
                tqdm.write('error: %s: %s (skipped)' % (', '.join(str(images[i]) for i in idx), e),
                           file=sys.stderr)
                failed.extend(str(images[i]) for i in idx)
                continue
            for i, lab in zip(idx, labels):
                write_segmentation(decoded[i], lab, outputs[i], colours, names, opacity=args.opacity,
                                   banner=banner, text=text, overwrite=args.force)
                written += 1
                if not args.quiet:
                    tqdm.write('%s -> %s: %s' % (images[i].name, outputs[i][1], label_summary(lab, names)))
    bar.close()
    written = int(distributed.all_sum([[written]], ctx)[0][0])
    failed = distributed.gather(failed, ctx)
    distributed.finish(ctx)
    if written:
        print('Wrote %d class-index PNG(s) and %d overlay(s) to %s' % (written, written, out_dir))
    else:
        print('Wrote nothing%s' % ('' if out_dir.is_dir() else ' (%s was not created)' % out_dir))
    if banner:
        print('(made with %s)' % RANDOM_LABEL)
    if failed:
        print('error: %d of %d image(s) could not be segmented and were skipped: %s'
              % (len(failed), len(images), ', '.join(failed)), file=sys.stderr)
        return 1
    return 0


def _stderr_if_random(msg: str) -> None:
    """With --quiet the random-weights notice still goes to stderr, shortened to its first line."""
    print(msg.splitlines()[0], file=sys.stderr)
