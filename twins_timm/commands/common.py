"""Command-line options shared by `twins-timm segment` and `twins-timm eval`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from twins_timm.deploy.engines import DTYPES, ENGINES, check_engine_request, engine_model

from twins_timm.optimize import optimize
from twins_timm.commands import DEVICE_HELP
from twins_timm.inference.predict import ADE20K_TEST_SCALE, MS_RATIOS, InferenceSettings
from twins_timm.zoo.resolve import DEFAULT_MODEL_ID

# Smallest slide-mode crop: the segmenters' backbones have an output stride of 32 and refuse smaller
# inputs (MIN_INPUT_SIZE in twins_timm.models.twins); checked here so the error comes before the work.
MIN_CROP_SIZE = 32


def _pair(values: Optional[Sequence[int]], name: str) -> Optional[Tuple[int, int]]:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError('%s takes one or two positive integers (H W), got %s' % (name, list(values)))
    return (values[0], values[-1])


def add_model_arguments(parser: argparse.ArgumentParser, random_fallback: bool) -> None:
    fallback = (', or a labelled random-initialised model when it is not available' if random_fallback
                else ' (an error when it is not available: metrics need trained weights)')
    parser.add_argument('--model', metavar='NAME_OR_PATH', default=None,
                        help='a published model name (`twins-timm models`; downloaded and converted once, then '
                             'cached), an http(s) URL of a checkpoint, a folder from `twins-timm convert` / '
                             'save_pretrained, a checkpoint file, or a Hub id (the local cache is tried first). '
                             'Default: %s%s' % (DEFAULT_MODEL_ID, fallback))
    parser.add_argument('--device', default='auto', help=DEVICE_HELP)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('inference (mmseg test rules)')
    g.add_argument('--mode', choices=('whole', 'slide'), default='whole',
                   help='whole image in one forward (default, as the Twins ADE20K configs), or '
                        'sliding window with averaged overlaps')
    g.add_argument('--crop-size', type=int, nargs='+', metavar='N', default=[512, 512],
                   help='slide mode: crop size H [W] (default 512 512)')
    g.add_argument('--stride', type=int, nargs='+', metavar='N', default=[341, 341],
                   help='slide mode: stride H [W] (default 341 341)')
    g.add_argument('--scale', type=int, nargs=2, metavar=('LONG', 'SHORT'), default=None,
                   help='keep-ratio test resize bound (default: the test scale saved with the model by '
                        '`twins-timm train`, else %d %d, the ADE20K test scale)' % ADE20K_TEST_SCALE)
    g.add_argument('--no-resize', action='store_true',
                   help='feed images at their own size instead of the --scale resize')
    g.add_argument('--tta', action='store_true',
                   help='multi-scale + flip test-time augmentation of the ms+flip column: ratios '
                        '%s of --scale, plus horizontal flip, softmax averaged'
                        % ', '.join('%g' % r for r in MS_RATIOS))
    g.add_argument('--ratios', type=float, nargs='+', metavar='R', default=None,
                   help='custom scale ratios (implies multi-scale; default 1, or the ms set with --tta)')
    g.add_argument('--flip', action='store_true', help='add the horizontally flipped view')
    g.add_argument('--crop-batch', type=int, default=4, metavar='N',
                   help='slide mode: crops per forward pass (default 4)')
    g.add_argument('--engine', choices=ENGINES, default='torch',
                   help='what runs the model: torch (default), or onnxruntime / openvino on the CPU (the model is '
                        'exported once, checked against torch and cached; pip install "twins-timm[deploy]")')
    g.add_argument('--dtype', choices=DTYPES, default='fp32',
                   help='fp32 (default) or bf16: torch autocast, OpenVINO\'s inference precision; on a CPU only '
                        'with native bf16 (AVX512-BF16 or AMX) unless --force-bf16')
    g.add_argument('--force-bf16', action='store_true',
                   help='run --dtype bf16 even on a CPU without native bf16 (emulated: slow)')


def settings_from_args(args: argparse.Namespace) -> InferenceSettings:
    """The inference settings; also checks --engine / --dtype (and moves an exported engine to the CPU)."""
    args.device = check_engine_request(args.engine, args.dtype, args.force_bf16, args.device)
    ratios = args.ratios or (MS_RATIOS if args.tta else (1.0,))
    if args.crop_batch < 1:
        raise ValueError('--crop-batch must be at least 1')
    if args.scale is not None and min(args.scale) < 1:
        raise ValueError('--scale takes two positive integers (LONG SHORT), got %s; the ADE20K test scale is '
                         '--scale %d %d' % (' '.join(map(str, args.scale)), *ADE20K_TEST_SCALE))
    crop = _pair(args.crop_size, '--crop-size')
    if args.mode == 'slide' and min(crop) < MIN_CROP_SIZE:
        raise ValueError('--crop-size %s is too small: Twins segmenters need crops of at least %dx%d pixels '
                         '(output stride 32); mmseg\'s ADE20K setting is --crop-size 512 --stride 341'
                         % (' '.join(map(str, args.crop_size)), MIN_CROP_SIZE, MIN_CROP_SIZE))
    return InferenceSettings(
        mode=args.mode,
        scale=None if args.no_resize else tuple(args.scale or ADE20K_TEST_SCALE),
        ratios=tuple(ratios),
        flip=bool(args.flip or args.tta),
        crop_size=crop,
        stride=_pair(args.stride, '--stride'),
        crop_batch=args.crop_batch,
    )


def scale_for_model(settings: InferenceSettings, args: argparse.Namespace, model) -> Tuple[InferenceSettings, str]:
    """The settings with the test scale the model was trained for (``model.test_scale``, saved by
    `twins-timm train`) unless --scale or --no-resize was given; and where the scale comes from."""
    if args.no_resize:
        return settings, '--no-resize'
    if args.scale is not None:
        return settings, '--scale'
    own = getattr(model, 'test_scale', None)
    if own:
        return dataclasses.replace(settings, scale=tuple(own)), "the model's own test scale; --scale overrides"
    return settings, 'the ADE20K test scale; --scale overrides'


def engine_from_args(model: torch.nn.Module, args: argparse.Namespace, source: str) -> torch.nn.Module:
    """The loaded model on --engine at --dtype (export progress on stderr unless --quiet); on torch, with the
    CPU-inference layers swapped in (exports trace the plain model)."""
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.engine == 'torch':
        model = optimize(model)
    model = engine_model(model, args.engine, args.dtype, source, log)
    print('Engine: %s %s' % (args.engine, args.dtype))
    return model


def describe_settings(s: InferenceSettings, scale_source: Optional[str] = None) -> str:
    parts = ['mode=%s' % s.mode]
    if s.mode == 'slide':
        parts.append('crop=%dx%d stride=%dx%d' % (s.crop_size + s.stride))
    parts.append('resize=%s' % ('none' if s.scale is None else 'keep-ratio to %dx%d' % tuple(s.scale)))
    if scale_source and s.scale is not None:
        parts[-1] += ' (%s)' % scale_source
    if s.ratios != (1.0,):
        parts.append('ratios=%s' % ','.join('%g' % r for r in s.ratios))
    if s.flip:
        parts.append('flip')
    return ' '.join(parts)


@contextlib.contextmanager
def quiet_stdout(quiet: bool) -> Iterator[None]:
    """Swallow what libraries print on stdout (e.g. huggingface_hub's "Loading weights from local
    directory") while ``quiet``; errors still raise."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def model_classes(model) -> Tuple[int, List[str], list]:
    """(number of classes, class names, palette or None) from the model's attributes."""
    n = getattr(model, 'classes', None)
    if not isinstance(n, int):
        raise ValueError('the model has no integer `classes` attribute; is it a twins_timm segmenter?')
    return n, list(getattr(model, 'class_names', None) or []), getattr(model, 'palette', None)
