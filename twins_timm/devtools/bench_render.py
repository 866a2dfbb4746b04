"""The bench's results as plain-text tables (the JSON holds everything; these are for reading)."""
from __future__ import annotations

import textwrap
from typing import Any, Dict, List, Optional, Sequence

CEILING_LEGEND = 'ceiling: ours if nothing but its products, norms, softmaxes and resizes took time, each timed alone'


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns: text left, numbers right."""
    cells = [[str(h) for h in headers]] + [[format_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [any(_is_number(row[i]) for row in rows) and all(_is_number(row[i]) or row[i] is None for row in rows)
               for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append('  '.join(c.rjust(wd) if numeric[i] else c.ljust(wd) for i, (c, wd) in
                               enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append('  '.join('-' * wd for wd in widths))
    return '\n'.join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_cell(v: Any) -> str:
    if isinstance(v, float):
        return '%.3g' % v if abs(v) < 0.01 else ('%.2f' % v if abs(v) < 100 else '%.0f' % v)
    return '-' if v is None else str(v)


def render(out: Dict[str, Any]) -> str:
    m = out['machine']
    parts = ['twins-timm bench: %s, %d thread(s), device %s, torch %s, timm %s'
             % (m['cpu'], m['threads'], m['device'], m['torch'], m['timm'])]
    for prec, r in out['matmul'].items():
        line = 'matmul rate (%s, %d x %d): %.1f GFLOP/s' % (prec, r['n'], r['n'], r['gflops'])
        if r.get('onednn_gflops'):
            line += '; the same product through oneDNN: %.1f GFLOP/s' % r['onednn_gflops']
        parts.append(line)
    rows = []
    for r in out['backbones']:
        size = '%dx%dx%d' % (r['batch'], r['height'], r['width'])
        if 'error' in r:
            rows.append([r['variant'], size, r['precision'], r['mode']] + [None] * 11 + [r['error']])
            continue
        exact, ceiling = r.get('exact', {}), r.get('ceiling') or {}
        rows.append([r['variant'], size, r['precision'], r['mode'], r['ours']['images_per_s'],
                     r['timm']['images_per_s'], r['ratio'], exact.get('ratio'), r['ours']['gflops'],
                     r['ours']['pct_matmul'], r['timm']['pct_matmul'], r['ours'].get('pct_gemm'),
                     ceiling.get('pct_gemm'), ceiling.get('ratio'),
                     '%.1e' % r.get('max_abs_diff', r.get('max_abs_diff_vs_eager', 0.0)),
                     '%.1e' % r.get('scaled_diff', r.get('scaled_diff_vs_eager', 0.0))])
    if rows:
        parts += ['', "Backbones, ours vs timm's Twins (features_only, eval, inference mode; compiled: diff vs "
                      "our eager; exact: ours with F.linear, bit-identical to timm; %s)" % CEILING_LEGEND,
                  format_table(['variant', 'BxHxW', 'prec', 'mode', 'ours img/s', 'timm img/s', 'ratio',
                                'exact ratio', 'ours GFLOP/s', 'ours %mm', 'timm %mm', 'ours %gemm', 'ceiling %gemm',
                                'ceiling ratio', 'max|diff|', 'scaled'], rows)]
    seg = out['segmenters']
    parts.append('')
    if not seg['available']:
        parts.append("Segmenters vs mmseg: not measured (%s)" % seg['reason'])
    else:
        rows = []
        for r in seg['results']:
            if 'error' in r:
                rows.append([r['variant'], r['head']] + [None] * 10 + [r['error']])
                continue
            ceiling = r.get('ceiling') or {}
            rows.append([r['variant'], r['head'], '%dx%dx%d' % (r['batch'], r['height'], r['width']),
                         r['precision'], r['ours']['images_per_s'], r['mmseg']['images_per_s'], r['ratio'],
                         r['ours']['pct_matmul'], r['ours'].get('pct_gemm'), ceiling.get('pct_gemm'),
                         ceiling.get('ratio'), '%.1e' % r['max_abs_diff'],
                         '%.1e' % r.get('scaled_diff', 0.0)])
        parts += ["Segmenters, ours vs mmseg's own models (end to end, eval; %s)" % CEILING_LEGEND,
                  format_table(['variant', 'head', 'BxHxW', 'prec', 'ours img/s', 'mmseg img/s', 'ratio',
                                'ours %mm', 'ours %gemm', 'ceiling %gemm', 'ceiling ratio', 'max|diff|', 'scaled'],
                               rows)]
    parts += render_engines(out.get('engines') or {})
    mem = out['memory']
    parts.append('')
    if not mem['results']:
        parts.append('Training memory: not measured (%s)' % mem.get('reason'))
    else:
        rows = []
        for r in mem['results']:
            off, on = r['without_checkpointing'], r['with_checkpointing']
            rows.append([r['variant'], '%dx%dx%d' % (r['batch'], r['height'], r['width']), r['precision'],
                         _mib(off), _mib(on), r.get('ratio'), off.get('error') or on.get('error')])
        parts += ['Peak training memory (forward + backward), MiB above the model and input',
                  textwrap.fill('method: ' + mem['method'], 110, subsequent_indent='  '),
                  format_table(['variant', 'BxHxW', 'prec', 'no ckpt', 'ckpt', 'ratio', 'error'], rows)]
    parts.append('')
    return '\n'.join(parts)


def render_engines(eng: Dict[str, Any]) -> List[str]:
    """The engines table: speed-up over torch fp32, export and first-call times, parity."""
    if not eng.get('results'):
        return []
    rows = []
    for r in eng['results']:
        agree = r.get('argmax_agreement')
        rows.append([r['model'], '%dx%dx%d' % (r['batch'], r['height'], r['width']), r['engine'], r['dtype'],
                     r.get('images_per_s'), r.get('speedup'), r.get('export_seconds'), r.get('convert_seconds'),
                     r.get('first_call_seconds'),
                     '%.1e' % r['scaled_diff'] if 'scaled_diff' in r else None,
                     '%.2f%%' % (100 * agree) if agree is not None else None,
                     (r.get('skipped') or r.get('error') or '')[:100] or None])
    return ['', 'CPU inference engines, each against torch fp32 on the same input (speed-up: torch fp32 time over '
                'the engine\'s; export, OpenVINO conversion and first call in s; bf16 native: %s)'
            % eng.get('bf16_note'),
            format_table(['model', 'BxHxW', 'engine', 'dtype', 'img/s', 'speed-up', 'export s', 'convert s',
                          'first call s', 'scaled diff', 'argmax agree', 'note'], rows)]


def _mib(d: Dict[str, Any]) -> Optional[float]:
    return d['peak_bytes'] / 2 ** 20 if 'peak_bytes' in d else None
