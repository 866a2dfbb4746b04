"""Fine-tune a Twins segmenter on an ADE20K-layout folder with mmsegmentation's Twins recipe.

DATA holds images/training, images/validation and annotations/... (the layout `twins-timm eval`
reads).  The defaults are mmseg's Twins ADE20K configs for the model's head: AdamW with the
config's lr and weight decay (none on norms and position convs for UPerNet), poly schedule with
linear warm-up, auxiliary loss 0.4, the config's global batch (reached by gradient accumulation),
random resize 0.5-2.0 of (4 crop, crop), random crop with cat_max_ratio 0.75, flip and photometric
distortion.  Every setting is printed at the start and stored with each checkpoint.

Several processes: `torchrun --nproc-per-node N -m twins_timm train ...` (DDP with SyncBN; NCCL
on CUDA, gloo on CPU); --batch-size is per process.  OUT/checkpoints/iter_N/ are folders that
`from_pretrained` and `segment --model` load (they carry the test scale that `eval` and `segment` then
use); --resume continues from the newest readable one with the run's own settings; OUT/best/ holds
the best mIoU; OUT/metrics.jsonl logs loss and mIoU (in percent, as printed: mIoU_percent).
Labels are checked against --classes and the labelling convention before the first step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from twins_timm.commands import DEVICE_HELP

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm train --data ADEChallengeData2016 --model upernet:twins_svt_small --out runs/svt_s
  twins-timm train --data my_set --model upernet_twins_svt_large.ade20k --classes 5 \\
      --class-names names.txt --iters 4000 --batch-size 4 --out runs/mine
  torchrun --nproc-per-node 8 -m twins_timm train --data ADEChallengeData2016 \\
      --model fpn:twins_pcpvt_base --batch-size 4 --out runs/fpn_b
  twins-timm train ... --out runs/mine --resume     # continue after an interruption
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--data', required=True, metavar='DIR',
                        help='ADE20K-layout folder: images/{training,validation}, annotations/{...}')
    parser.add_argument('--model', required=True, metavar='SPEC',
                        help='HEAD:VARIANT (upernet:twins_svt_small, fpn:twins_pcpvt_base: fresh heads on '
                             "timm's ImageNet backbone), a folder from save_pretrained / `twins-timm convert`, "
                             'a checkpoint file, or a published model name')
    parser.add_argument('--out', required=True, metavar='DIR', help='run folder (checkpoints, logs)')
    parser.add_argument('--classes', type=int, default=None, metavar='N',
                        help="number of classes (default: the model's, or the --class-names count, or 150)")
    parser.add_argument('--class-names', metavar='FILE', default=None, help='text file, one class name per line')
    parser.add_argument('--iters', type=int, default=None, metavar='N',
                        help="optimizer steps (default: the config's, 160000 UPerNet / 80000 FPN)")
    parser.add_argument('--batch-size', type=int, default=2, metavar='N', help='images per process and step (default 2)')
    parser.add_argument('--global-batch', type=int, default=None, metavar='N',
                        help="images per optimizer step over all processes (default: the config's, 8x4 or 8x2)")
    parser.add_argument('--crop-size', type=int, default=None, metavar='N', help='training crop (default 512)')
    parser.add_argument('--lr', type=float, default=None, help="base learning rate (default: the config's)")
    parser.add_argument('--save-interval', type=int, default=None, metavar='N',
                        help="iterations between checkpoints (default: the config's, 16000 / 8000)")
    parser.add_argument('--eval-interval', type=int, default=None, metavar='N',
                        help="iterations between validations (default: the config's, 16000 / 8000; 0: never)")
    parser.add_argument('--log-interval', type=int, default=None, metavar='N',
                        help='iterations between loss lines in metrics.jsonl (default 50)')
    parser.add_argument('--drop-path-rate', type=float, default=None, metavar='F',
                        help="backbone stochastic depth (default: the config's, 0.2 or 0.3)")
    parser.add_argument('--resume', action='store_true',
                        help='continue the run in --out from its newest readable checkpoint, with its own settings '
                             '(--iters, --lr, --crop-size, --global-batch, --seed may repeat them, not change them)')
    parser.add_argument('--from-scratch', action='store_true',
                        help='HEAD:VARIANT with a random-initialised backbone (no download)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (autocast) where the device supports it')
    parser.add_argument('--grad-checkpointing', action='store_true', help='recompute backbone activations (less memory)')
    parser.add_argument('--workers', type=int, default=2, metavar='N', help='data loader processes (default 2)')
    parser.add_argument('--no-reduce-zero-label', action='store_true',
                        help='annotations are 0-based class indices (ADE20K files are 1-based, 0 = other)')
    parser.add_argument('--device', default='auto', help=DEVICE_HELP)
    parser.add_argument('--seed', type=int, default=None, help='data order and augmentation seed (default 0)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def _class_names(path):
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError('--class-names %s: no such file (one class name per line)' % p)
    names = [line.strip() for line in p.read_text(encoding='utf-8').splitlines() if line.strip()]
    if not names:
        raise ValueError('--class-names %s holds no names' % p)
    return names


def run(args: argparse.Namespace) -> int:
    import torch

    from twins_timm.train import build_model, fit
    from twins_timm.train.recipe import check_settings
    from twins_timm.train.transforms import min_crop_size
    from twins_timm.inference.distributed import Dist, finish, init

    check_settings(iters=args.iters, lr=args.lr, global_batch=args.global_batch, batch_size=args.batch_size,
                   save_interval=args.save_interval, eval_interval=args.eval_interval,
                   log_interval=args.log_interval, workers=args.workers, drop_path_rate=args.drop_path_rate)
    if args.crop_size is not None and args.crop_size < min_crop_size():
        raise ValueError('--crop-size %d is too small: the Twins backbone needs at least %d pixels'
                         % (args.crop_size, min_crop_size()))
    names = _class_names(args.class_names)
    if names and args.classes and len(names) != args.classes:
        raise ValueError('--class-names has %d names but --classes is %d' % (len(names), args.classes))
    if args.classes is not None and not 1 <= args.classes <= 255:
        raise ValueError('--classes must be between 1 and 255 (label 255 means "ignore")')
    out = Path(args.out)
    from twins_timm.train.data import find_pairs
    from twins_timm.train.run_folder import check_out
    check_out(out, args.resume)  # fail before loading a model
    from twins_timm.files.paths import refuse_inputs_as_outputs
    from twins_timm.zoo.resolve import model_files
    inputs = [Path(args.data)] + model_files(args.model) + ([Path(args.class_names)] if args.class_names else [])
    refuse_inputs_as_outputs([out], inputs, 'Keep the data, the model and --class-names outside the --out folder.')
    find_pairs(args.data, 'training')  # the labels are checked once the classes are known
    if args.eval_interval != 0:
        find_pairs(args.data, 'validation')
    device = args.device
    if device != 'auto':
        from twins_timm.inference.devices import pick_device
        device = str(pick_device(device))
    torch.manual_seed(args.seed or 0)
    ctx = Dist()
    try:
        ctx = init('cuda' if (device == 'auto' and torch.cuda.is_available()) or device.startswith('cuda') else 'cpu')
        say = print if ctx.main else (lambda *a, **k: None)
        model, source = build_model(args.model, classes=args.classes or (len(names) if names else None),
                                    class_names=names, from_scratch=args.from_scratch,
                                    drop_path_rate=args.drop_path_rate, log=say)
        say('Model: %s' % source)
        fit(model, args.data, out, iters=args.iters, batch_size=args.batch_size, global_batch=args.global_batch,
            crop_size=args.crop_size, lr=args.lr, save_interval=args.save_interval,
            eval_interval=args.eval_interval, log_interval=args.log_interval, resume=args.resume, amp=args.amp,
            grad_checkpointing=args.grad_checkpointing, workers=args.workers,
            reduce_zero_label=not args.no_reduce_zero_label, device=device, seed=args.seed,
            progress=not args.quiet, log=say, extra_settings=dict(model_spec=args.model, model_source=source))
    finally:
        finish(ctx)
    return 0
