"""Export a segmenter to ONNX (and OpenVINO IR) for CPU inference engines, checked against torch.

MODEL is any model spec `segment` and `eval` take (a published name, a folder, a checkpoint file, an
http(s) URL, a Hub id).  OUT becomes a folder holding model.onnx (+ openvino_model.xml / .bin with
--format openvino), config.json (input normalisation, classes, checks, sha256 of every file) and README.md.
The graph takes `pixel_values`, a normalised float32 NCHW batch -- any batch, any height and width from
32 -- and gives `logits` (batch, classes, height, width).  Each file is run once at a size it was not
traced at and compared with torch before OUT is written.  Needs: pip install "twins-timm[deploy]".
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from twins_timm.files.atomic import atomic_path
from twins_timm.commands.common import quiet_stdout
from twins_timm.zoo.resolve import load_model, model_files
from twins_timm.files.paths import check_replaceable, check_writable_dir, inside, refuse_inputs_as_outputs

from twins_timm.deploy.export import (CONFIG_FILE, EXPORT_FILES, FORMAT_MODULES, FORMATS, INPUT_NAME, OUTPUT_NAME, README_FILE,
                     export_folder, folder_problem, require_modules)

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm export upernet_twins_svt_large.ade20k svt_l_onnx/
  twins-timm export ./my_converted_model my_model_openvino/ --format openvino
  twins-timm export fpn_twins_pcpvt_small.ade20k out/ --force    # replace an earlier export in out/
"""
# every name an export writes: --force replaces a folder holding nothing else
EXPORT_NAMES = {CONFIG_FILE, README_FILE, *EXPORT_FILES}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', metavar='MODEL', help='a published model name, a folder, a checkpoint file, an '
                                                       'http(s) URL or a Hub id')
    parser.add_argument('out', metavar='OUT', help='output folder (new, or an earlier export with --force)')
    parser.add_argument('--format', choices=FORMATS, default='onnx',
                        help='onnx: model.onnx (ONNX Runtime and others); openvino: model.onnx and the '
                             'OpenVINO IR openvino_model.xml / .bin (default onnx)')
    parser.add_argument('--force', action='store_true',
                        help='replace OUT when it holds an earlier export (nothing else is ever replaced)')
    parser.add_argument('--quiet', action='store_true', help='no progress lines')


def not_an_earlier_export(folder: Path) -> Optional[str]:
    """Why OUT may not be replaced: None for an empty folder or an earlier, unchanged `twins-timm export`."""
    if not folder.is_dir():
        return 'not an earlier twins-timm export: a file, not a folder'
    names = sorted(p.name for p in folder.iterdir())
    others = [n for n in names if n not in EXPORT_NAMES]
    if others:
        return 'not an earlier twins-timm export: it holds %s' % ', '.join(others[:5])
    problem = folder_problem(folder) if names else None
    return problem and 'not an earlier twins-timm export, unchanged: %s' % problem


def check_out(out: Path, model_spec: str, force: bool) -> None:
    """OUT is new, or an earlier export replaced with --force; never a file the model reads, nor around or
    inside the model's folder."""
    hint = 'OUT and MODEL overlap: choose an OUT folder outside the model.'
    refuse_inputs_as_outputs([out], model_files(model_spec), hint)
    model_path = Path(os.path.expanduser(model_spec))
    if inside(out, model_path):
        raise ValueError('OUT %s lies in the folder of MODEL %s; %s' % (out, model_spec, hint))
    check_replaceable(out, 'OUT', force, not_an_earlier_export)
    check_writable_dir(out.parent, 'OUT %s: its parent folder' % out)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    require_modules(FORMAT_MODULES[args.format], '--format %s' % args.format)
    check_out(out, args.model, args.force)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with quiet_stdout(args.quiet):
        loaded = load_model(args.model, allow_random=False)
    print('Model: %s' % loaded.source)
    with atomic_path(out, force=True, folder=True, not_ours=not_an_earlier_export) as tmp:
        config = export_folder(loaded.model, tmp, args.format == 'openvino', loaded.source, log)
    for check in config['checks']:
        print('Checked %s against torch at %s: max |difference| %.2g (%.2g of the logits\' scale)'
              % (check['engine'], 'x'.join(map(str, check['shape'])), check['max_abs_diff'], check['scaled_diff']))
    print('Wrote %s to %s in %.0f s: input %r (normalised float32 NCHW, any batch, H, W >= 32), output %r'
          % (', '.join(config['files']), out, config['export_seconds'], INPUT_NAME, OUTPUT_NAME))
    return 0
