"""`twins-timm convert SRC DST`: the command-line shell over ``twins_timm.convert.api``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DESCRIPTION = """Convert a Twins checkpoint into a timm backbone or an SMP segmenter (or back to mmseg).

Reads official Twins classification files (pcpvt_*.pth, alt_gvt_*.pth), official Twins segmentation
files (mmseg 0.x), mmsegmentation Twins checkpoints, mmseg's ImageNet backbones (pretrain/twins/*.pth,
made by its twins2mmseg.py), and timm state dicts / .safetensors. The
format, family (PCPVT/SVT), size, task and number of classes are detected from the keys and shapes;
every key must map onto the target model, or nothing is written. Files are read without unpickling
code, and the output is written atomically.

Leaving parts out is explicit (--drop) and always reported. One drop is on by default: official
segmentation files keep their backbone's ImageNet classifier (backbone.head.*, and for segmenters the
final backbone.norm.*), which the segmentation model never uses; the summary lists them."""

EPILOG = """examples:
  # official ImageNet classifier -> timm Hub folder (config.json, model.safetensors, README.md)
  twins-timm convert alt_gvt_small.pth twins_svt_small.in1k
  # load it (pretrained=True loads the folder's weights; without it timm builds random ones)
  python -c "import timm, twins_timm; timm.create_model('local-dir:twins_svt_small.in1k', pretrained=True)"

  # mmsegmentation ADE20K UPerNet -> SMP segmenter folder, without the training-only auxiliary head
  twins-timm convert twins_svt-s_uperhead_8xb2-160k_ade20k-512x512.pth svt_s_upernet --drop aux_head

  # classifier without its head, as a feature backbone in a single .safetensors file, in bf16
  twins-timm convert pcpvt_small.pth pcpvt_s_backbone.safetensors --drop head --dtype bf16

  # our segmenter folder back to an mmsegmentation 1.x checkpoint
  twins-timm convert svt_s_upernet twins_svt-s_upernet_mmseg.pth --to mmseg

  # check what a file is without writing anything, or insist on a variant
  twins-timm convert upernet_alt_gvt_s.pth --dry-run
  twins-timm convert alt_gvt_small.pth out --variant svt-s --push-to-hub me/twins_svt_small.in1k"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('src', metavar='SRC', help='checkpoint to convert: .pth/.pt/.bin, .safetensors, or a Hub folder')
    p.add_argument('dst', metavar='DST', nargs='?',
                   help='output: a folder (Hub folder, default), a .safetensors file (state dict only), or a '
                        '.pth with --to mmseg; optional with --dry-run')
    p.add_argument('--variant', help='expected variant (e.g. twins_svt_small, svt-s, pcpvt_base); an error if '
                                     'the weights are another one')
    p.add_argument('--drop', action='append', default=[], metavar='PART',
                   help='leave out a part (repeat or comma-separate): head (classifier -> headless backbone), '
                        'aux_head (training-only auxiliary head), norm (final norm; only with --to mmseg)')
    p.add_argument('--to', choices=('timm', 'mmseg'), default='timm',
                   help='output naming: timm/SMP (default) or mmsegmentation 1.x')
    p.add_argument('--dtype', choices=('fp32', 'fp16', 'bf16'), default=None, help='cast floating weights')
    p.add_argument('--force', action='store_true',
                   help='replace DST if it is an earlier output of twins-timm convert (never anything else)')
    p.add_argument('--push-to-hub', metavar='REPO', help='upload the written folder to this Hugging Face repo')
    p.add_argument('--private', action='store_true', help='with --push-to-hub: create the repo private')
    p.add_argument('--no-parity', action='store_true', help="skip the parity forward pass against timm's Twins")
    p.add_argument('--dry-run', action='store_true', help='detect and map, print the summary, write nothing')
    p.add_argument('--json', action='store_true', help='print the summary as JSON')


def _fmt_params(n: int) -> str:
    return '%.2f M' % (n / 1e6)


def summary(res, info=None, seconds: float = 0.0) -> dict:
    out = {
        'source': res.source, 'format': res.format, 'wrapper': res.wrapper or None,
        'variant': res.variant, 'family': res.family, 'size': res.size, 'task': res.task,
        'num_classes': res.num_classes, 'model_args': res.model_args,
        'keys_source': res.n_source_keys, 'keys_mapped': res.n_mapped, 'keys_target': len(res.state_dict),
        'dropped': {p: why for p, why in res.dropped_parts.items()},
        'dropped_keys': len(res.dropped), 'parameters': res.n_params, 'notes': res.notes,
        'seconds': round(seconds, 2),
    }
    if info is not None:
        out.update({'output': str(info.path), 'output_kind': info.kind, 'sha256': info.sha256,
                    'parity_max_abs_diff': info.parity['max_abs_diff'] if info.parity else None,
                    'output_dropped': info.dropped_parts})
    return out


def _print_summary(s: dict) -> None:
    rows = [
        ('source', '%s (%s%s)' % (s['source'], s['format'],
                                  ", wrapped in '%s'" % s['wrapper'] if s['wrapper'] else '')),
        ('variant', '%s (%s, %s)' % (s['variant'], s['family'].upper(), s['size'])),
        ('task', '%s, %d classes' % (s['task'], s['num_classes'])),
        ('settings', json.dumps(s['model_args'], sort_keys=True) if s['model_args'] else 'timm defaults'),
        ('keys', '%d source keys: %d mapped -> %d target keys, %d dropped'
         % (s['keys_source'], s['keys_mapped'], s['keys_target'], s['dropped_keys'])),
    ]
    for part, why in s['dropped'].items():
        rows.append(('dropped', '%s: %s' % (part, why)))
    rows.append(('parameters', _fmt_params(s['parameters'])))
    for note in s['notes']:
        rows.append(('note', note))
    if 'output' in s:
        if s['parity_max_abs_diff'] is not None:
            rows.append(('parity', "max |converted - timm Twins| = %.2e" % s['parity_max_abs_diff']))
        for part in s.get('output_dropped', []):
            rows.append(('dropped', '%s: left out of the %s output (--drop %s)' % (part, s['output_kind'], part)))
        rows.append(('output', '%s (%s)' % (s['output'], s['output_kind'])))
        rows.append(('sha256', s['sha256']))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print('%s : %s' % (k.ljust(width), v))


def _check_dst(src: Path, dst: Path, to: str, force: bool) -> None:
    """Before any work: DST is none of the files SRC reads (nor a folder holding them), fits --to, is new or
    (with --force) an earlier output of ours, and its folder is writable."""
    from twins_timm.convert.save import check_output
    from twins_timm.files.paths import check_writable_dir, refuse_inputs_as_outputs
    from twins_timm.zoo.resolve import model_files
    if dst.is_dir() and src.resolve().is_relative_to(dst.resolve()):
        raise ValueError('DST %s is the folder that holds SRC %s; replacing it would delete the input, even with '
                         '--force. Choose another DST.' % (dst, src))
    refuse_inputs_as_outputs([dst], [src] + model_files(str(src)), 'Choose another DST.')
    check_output(dst, to, force)
    check_writable_dir(dst.parent, 'the folder of DST')


def run(args: argparse.Namespace) -> int:
    try:
        from twins_timm.convert.api import convert_checkpoint, save
    except ImportError as e:  # pragma: no cover - broken installation
        raise OSError('twins-timm is not installed completely (%s); reinstall it with pip install twins-timm' % e)

    if args.dst is None and not args.dry_run:
        raise ValueError('missing DST: give an output path (a folder, a .safetensors file, or a .pth with --to '
                         'mmseg), or --dry-run to only inspect SRC')
    if args.push_to_hub and args.dry_run:
        raise ValueError('--push-to-hub needs a written folder; drop --dry-run')
    if args.push_to_hub and args.dst and Path(args.dst).suffix:
        raise ValueError('--push-to-hub uploads a Hub folder; give a folder path as DST (not %s)' % args.dst)
    if args.dst is not None and not args.dry_run:
        _check_dst(Path(args.src), Path(args.dst), args.to, args.force)
    t0 = time.time()
    drop = [p for d in args.drop for p in d.split(',') if p.strip()]
    # the final norm exists in every timm model; it can only be left out of an mmseg output
    res = convert_checkpoint(args.src, variant=args.variant,
                             drop=[p for p in drop if not (p == 'norm' and args.to == 'mmseg')],
                             progress=None if sys.stderr.isatty() else False)
    info = None
    if not args.dry_run:
        try:
            info = save(res, args.dst, to=args.to, force=args.force, dtype=args.dtype,
                        parity=not args.no_parity, mmseg_drop=drop)
        except Exception as e:  # safetensors' I/O errors are not OSErrors and name a temporary file
            if type(e).__name__ != 'SafetensorError':
                raise
            raise OSError('writing %s failed (%s); nothing was written. Check the free space and that the '
                          'folder is writable, or choose another DST' % (args.dst, str(e).split(' at path ')[0])
                          ) from None
    s = summary(res, info, time.time() - t0)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print_summary(s)
    if args.push_to_hub and info is not None:
        from twins_timm.convert.hub import push_to_hub
        try:
            url = push_to_hub(info.path, args.push_to_hub, private=args.private)
        except Exception as e:  # network / auth errors of huggingface_hub come in many types
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError('the conversion succeeded and %s was written, but uploading it to %s failed: %s. Log in '
                          '(huggingface-cli login) or check the repo name, then upload the folder again, e.g. '
                          'huggingface-cli upload %s %s' % (info.path, args.push_to_hub, why, args.push_to_hub,
                                                            info.path)) from None
        print('pushed     : %s' % url)
    return 0


def main(argv=None) -> int:
    """``python -m twins_timm.commands.convert SRC DST``: the same command without the top-level dispatcher."""
    p = argparse.ArgumentParser(prog='twins-timm convert', description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print('twins-timm convert: error: %s' % e, file=sys.stderr)
        return 2


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
