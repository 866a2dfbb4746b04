"""Markdown of `python -m twins_timm.devtools.ablation` runs, for docs/benchmarks.md.

    python -m twins_timm.devtools.ablation_report ablation.json [more.json ...] > tables.md

Per run: a section headed by its CPU and date, a table of tricks by model (each trick's end-to-end gain, and
whether it clears the threshold), and the private torch APIs against their public alternatives. It only
reads the JSON files and prints to stdout; bad input is one paragraph on stderr and exit code 2, before
anything is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from twins_timm.devtools.bench_report import markdown_table

KIND = 'ablation'  # the 'kind' of the JSON the ablation writes
REQUIRED_KEYS = ('machine', 'settings', 'tricks', 'models', 'private_apis')


def _gain(r: Dict[str, Any]) -> str:
    if 'skipped' in r:
        return '- (%s)' % r['skipped']
    text = '%+.1f %%%s' % (r['gain_pct'], '' if r['clears_threshold'] else ' (under)')
    beyond = r.get('gain_beyond_included_pct')
    return text if beyond is None else '%s; beyond the included: %+.1f %%' % (text, beyond)


def _figure(v: Any) -> str:
    return '%+.1f %%' % v if isinstance(v, (int, float)) else str(v)


def render_run(run: Dict[str, Any], source: str) -> str:
    """One ablation run as a Markdown section: per trick and model, the optimized model's gain over the
    same model without the trick; then the private torch APIs."""
    m = run['machine']
    models = run['models']
    labels = ['%s %s' % (r['head'], r['variant'].replace('twins_', '')) for r in models]
    rows = [['(all tricks: ms; speed-up over plain)', ''] +
            ['%.0f; %.2fx' % (1e3 * r['eager']['all_seconds'], r['eager']['speedup_all_over_plain']) for r in models]]
    for name, trick in run['tricks'].items():
        mode = 'compiled' if trick.get('compiled') else 'eager'  # earlier runs measured compiled tricks too
        cells = [_gain((r.get(mode) or {}).get('tricks', {}).get(name) or
                       {'skipped': (r.get(mode) or {}).get('error', 'not measured')}) for r in models]
        what = trick['what'] + ('; includes %s' % trick['includes'] if trick.get('includes') else '')
        rows.append([name, what] + cells)
    size = '%dx3x%dx%d' % (models[0]['batch'], models[0]['height'], models[0]['width']) if models else '-'
    apis = [[a['api'], a['public'], '; '.join('%s: %s' % (k, _figure(v)) for k, v in a['figures'].items())
             or 'not measured'] for a in run['private_apis']]
    return '\n'.join([
        '## %s, %s' % (m.get('cpu', 'unknown CPU'), run.get('date') or 'undated (no date in the JSON)'), '',
        'From `%s`: each trick of `twins_timm.optimize` switched off alone, %s fp32, %s thread(s) of %s cores '
        'available, CPU flags %s; torch %s. "(under)": below the %s %% a trick needs to stay. Method: %s.'
        % (source, size, m.get('threads'), m.get('cores_available'), ', '.join(m.get('cpu_flags') or []) or '-',
           m.get('torch'), run.get('threshold_pct'), run.get('method')), '',
        markdown_table(['trick', 'what'] + labels, rows), '',
        'Private torch APIs on the path against their public alternatives (gain of the private call, end to end):',
        '', markdown_table(['private API', 'public alternative', 'figure'], apis)]) + '\n'


def read_run(path: Path) -> Dict[str, Any]:
    hint = 'give the file written by python -m twins_timm.devtools.ablation'
    try:
        run = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError('cannot read %s as JSON (%s); %s' % (path, getattr(e, 'strerror', None) or e, hint)) from None
    if not isinstance(run, dict) or run.get('kind') != KIND or any(k not in run for k in REQUIRED_KEYS):
        raise ValueError('%s is not an ablation result (no kind %r with %s); %s'
                         % (path, KIND, ', '.join(REQUIRED_KEYS), hint))
    return run


def render_one(path: Path) -> str:
    run = read_run(path)
    try:
        return render_run(run, path.name)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise ValueError('%s does not hold a complete ablation result (%s: %s)' % (path, type(e).__name__, e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m twins_timm.devtools.ablation_report',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', metavar='JSON', help='files written by python -m twins_timm.devtools.ablation')
    try:  # every file read and rendered before any output
        markdown = '\n'.join([render_one(Path(p)) for p in parser.parse_args(argv).runs])
    except ValueError as e:
        print('ablation_report: error: %s' % e, file=sys.stderr)
        return 2
    print(markdown, end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
