"""Markdown tables of `twins-timm bench --json` runs, so that docs/benchmarks.md is generated, not typed.

    twins-timm bench --json run.json
    python -m twins_timm.devtools.bench_report run.json [more.json ...] > tables.md

Each run becomes one section headed by its CPU and date, with the machine, the reference matmul rates and
the bench's tables (backbones vs timm's Twins, segmenters vs mmseg, engines, training memory) as the
JSON holds them; the 'kernels' section of older runs (the kernel table ``optimize`` no longer has) is
skipped. It only reads the JSON files and prints to stdout; bad input is one paragraph on stderr and exit
code 2, before anything is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from twins_timm.devtools.bench_render import format_cell

REQUIRED_KEYS = ('machine', 'settings', 'matmul')


def _ratio(v: Optional[float]) -> str:
    return '-' if v is None else '%.2fx' % v


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else '%.0f' % v


def _size(r: Dict[str, Any]) -> str:
    return '%dx%dx%d' % (r['batch'], r['height'], r['width'])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(format_cell(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def _machine(run: Dict[str, Any]) -> List[str]:
    m, s = run['machine'], run['settings']
    lines = ['%s thread(s) of %s cores available, device %s; torch %s, timm %s, Python %s; %s.'
             % (m.get('threads'), m.get('cores_available'), m.get('device'), m.get('torch'), m.get('timm'),
                m.get('python'), m.get('platform')),
             'Median of %s timed runs after %s warm-up runs, ours and the reference interleaved.'
             % (s.get('repeats'), s.get('warmup'))]
    for precision, r in run['matmul'].items():
        line = '%s %d x %d matmul: %.0f GFLOP/s' % (precision, r['n'], r['n'], r['gflops'])
        if r.get('onednn_gflops'):
            line += '; the same product through oneDNN: %.0f GFLOP/s' % r['onednn_gflops']
        lines.append(line + '.')
    return lines


def _backbones(run: Dict[str, Any]) -> List[str]:
    rows = []
    for r in run.get('backbones') or []:
        if 'error' in r:
            rows.append([r['variant'], _size(r), r['precision'], r['mode'], r['error']] + ['-'] * 7)
            continue
        ceiling = r.get('ceiling') or {}
        rows.append([r['variant'], _size(r), r['precision'], r['mode'], r['ours']['images_per_s'],
                     r['timm']['images_per_s'], _ratio(r['ratio']), _ratio((r.get('exact') or {}).get('ratio')),
                     _pct(r['ours'].get('pct_gemm')), _pct(r['timm'].get('pct_gemm')),
                     _pct(ceiling.get('pct_gemm')), _ratio(ceiling.get('ratio'))])
    if not rows:
        return []
    return ["Backbones, ours over timm's Twins (images/s; % of the best GEMM rate; exact: ours with timm's "
            'kernels; ceiling: ours if only its products, norms, softmaxes and resizes took time):', '',
            markdown_table(['variant', 'BxHxW', 'prec', 'mode', 'ours img/s', 'timm img/s', 'ratio', 'exact ratio',
                            'ours %gemm', 'timm %gemm', 'ceiling %gemm', 'ceiling ratio'], rows)]


def _segmenters(run: Dict[str, Any]) -> List[str]:
    seg = run.get('segmenters') or {}
    if not seg.get('available'):
        return ['Segmenters vs mmseg: not measured (%s).' % seg.get('reason', 'not in the JSON')]
    rows = []
    for r in seg['results']:
        if 'error' in r:
            rows.append([r['variant'], r['head'], '-', '-', r['error']] + ['-'] * 5)
            continue
        ceiling = r.get('ceiling') or {}
        rows.append([r['variant'], r['head'], _size(r), r['precision'], r['ours']['images_per_s'],
                     r['mmseg']['images_per_s'], _ratio(r['ratio']), _pct(r['ours'].get('pct_gemm')),
                     _pct(ceiling.get('pct_gemm')), _ratio(ceiling.get('ratio'))])
    return ["Segmenters end to end, ours over mmsegmentation's own:", '',
            markdown_table(['variant', 'head', 'BxHxW', 'prec', 'ours img/s', 'mmseg img/s', 'ratio', 'ours %gemm',
                            'ceiling %gemm', 'ceiling ratio'], rows)]


def _memory(run: Dict[str, Any]) -> List[str]:
    rows = []
    for r in (run.get('memory') or {}).get('results') or []:
        off, on = r['without_checkpointing'], r['with_checkpointing']
        rows.append([r['variant'], _size(r), r['precision'],
                     *('%.0f' % (d['peak_bytes'] / 2 ** 20) if 'peak_bytes' in d else d.get('error', '-')
                       for d in (off, on)), '%.2f' % r['ratio'] if r.get('ratio') else '-'])
    if not rows:
        return []
    return ['Peak training memory (forward + backward), MiB above the model and input:', '',
            markdown_table(['variant', 'BxHxW', 'prec', 'no checkpointing', 'checkpointing', 'ratio'], rows)]


def _engines(run: Dict[str, Any]) -> List[str]:
    eng = run.get('engines') or {}
    rows = []
    for r in eng.get('results') or []:
        agree = r.get('argmax_agreement')
        rows.append([r['model'], _size(r), r['engine'], r['dtype'], r.get('images_per_s', '-'),
                     _ratio(r.get('speedup')), r.get('export_seconds', '-'), r.get('first_call_seconds', '-'),
                     '%.1e' % r['scaled_diff'] if 'scaled_diff' in r else '-',
                     '%.2f %%' % (100 * agree) if agree is not None else '-',
                     (r.get('skipped') or r.get('error') or '')[:80] or '-'])
    if not rows:
        return []
    return ['CPU inference engines, speed-up over torch fp32 (the plain model) on the same input; export and '
            'first call in s; parity against torch fp32 (bf16 native: %s):' % eng.get('bf16_note'), '',
            markdown_table(['model', 'BxHxW', 'engine', 'dtype', 'img/s', 'speed-up', 'export s', 'first call s',
                            'scaled diff', 'argmax agree', 'note'], rows)]


def render_run(run: Dict[str, Any], source: str) -> str:
    """One bench run as a Markdown section headed by its CPU and date."""
    title = '## %s, %s' % (run['machine'].get('cpu', 'unknown CPU'), run.get('date') or 'undated (no date in the JSON)')
    parts = [title, '', 'From `%s`. ' % source + ' '.join(_machine(run))]
    for section in (_backbones(run), _segmenters(run), _engines(run), _memory(run)):
        if section:
            parts += [''] + section
    return '\n'.join(parts) + '\n'


def read_run(path: Path) -> Dict[str, Any]:
    try:
        run = json.loads(path.read_text(encoding='utf-8'))
    except OSError as e:
        raise OSError('cannot read %s (%s); give the JSON file written by twins-timm bench --json'
                      % (path, e.strerror or e)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError('%s is not JSON (%s); give the file written by twins-timm bench --json' % (path, e)) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(run, dict) or k not in run]
    if missing:
        raise ValueError('%s is not a twins-timm bench result (no %s); give the file written by twins-timm bench '
                         '--json' % (path, ', '.join(missing)))
    return run


def render_one(path: Path) -> str:
    run = read_run(path)
    try:
        return render_run(run, path.name)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError('%s does not hold a complete twins-timm bench result (%s: %s); give the file written by '
                         'twins-timm bench --json' % (path, type(e).__name__, e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m twins_timm.devtools.bench_report',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', metavar='JSON', help='files written by twins-timm bench --json')
    args = parser.parse_args(argv)
    sections = []
    try:
        for p in map(Path, args.runs):  # every file read and rendered before any output
            sections.append(render_one(p))
    except (OSError, ValueError) as e:
        print('bench_report: error: %s' % e, file=sys.stderr)
        return 2
    print('\n'.join(sections), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
