"""`twins-timm models`: the published Twins models by name, what they scored, whether they are cached."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """List the published Twins models that twins-timm fetches by name (or download some now).

Every name works wherever a model does: `twins-timm segment / eval --model NAME`,
`twins_timm.from_pretrained(NAME)` (also `twins_timm.zoo.create_model(NAME)`). The first use downloads
the published file (sha256 checked against its name), converts it and caches the converted folder under
TWINS_TIMM_CACHE (default: ~/.cache/twins_timm); later uses are offline, each checking the cached weights
(a damaged copy is fetched again; offline, --download NAME --force replaces it).
TWINS_TIMM_MIRROR=http://host:port fetches from a mirror (same paths); TWINS_TIMM_OFFLINE=1 never touches
the network; TWINS_TIMM_DOWNLOAD_TIMEOUT=SECONDS (default 60) abandons a stalled download."""

EPILOG = """examples:
  twins-timm models                                   # the table
  twins-timm models --task upernet --json             # machine-readable (name, url, sha256_prefix, ...)
  twins-timm models --download upernet_twins_svt_large.ade20k   # fetch + convert now, for offline use later
  TWINS_TIMM_MIRROR=http://mirror.local:8080 twins-timm models --download fpn_twins_svt_small.ade20k"""

TASKS = ('upernet', 'fpn', 'backbone', 'classification')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--task', choices=TASKS, help='only models of this task')
    p.add_argument('--json', action='store_true', help='print a JSON list (name, url, task, dataset, classes, '
                                                       'mIoU, params, download_bytes, sha256_prefix, cached, path)')
    p.add_argument('--download', nargs='+', metavar='NAME_OR_URL',
                   help='download, verify, convert and cache these models now (names from the list, or http(s) URLs)')
    p.add_argument('--keep-raw', action='store_true',
                   help='with --download: also keep the published .pth file in the cache (downloads/)')
    p.add_argument('--force', action='store_true',
                   help='with --download: fetch and convert again even if cached (replacing only a model folder '
                        'twins-timm wrote)')


def _check_cache_entry(spec: str, force: bool) -> None:
    """Before any download: the folder the converted model goes to is free, or a model folder twins-timm
    wrote there (replaced with --force, or when damaged); never a folder of the user's that happens to sit
    in the cache."""
    from twins_timm import zoo
    from twins_timm.zoo import cache_entry
    from twins_timm.files.ownership import HUB_FOLDER_FILES, folder_not_ours
    from twins_timm.files.paths import check_replaceable

    if not zoo.is_url(spec) and zoo.get(spec).origin == 'timm':
        return  # kept in the Hugging Face cache, by huggingface_hub
    if force or zoo.cached_path(spec) is None:  # the fetch will (re)place the folder: only one of ours
        entry_files = HUB_FOLDER_FILES | {cache_entry.RECORD}
        check_replaceable(zoo.folder_for(spec), 'the cache folder', True,
                          lambda folder: folder_not_ours(folder, entry_files))


def _size(n: float) -> str:
    return '%.0f MB' % (n / 1e6) if n >= 1e6 else '%.0f kB' % (n / 1e3)


def _miou(v) -> str:
    return '-' if v is None else '%.2f' % v


def run(args: argparse.Namespace) -> int:
    from twins_timm import zoo

    if args.download:
        for spec in args.download:  # every name and URL checked before the first download
            if zoo.is_url(spec):
                zoo.check_url(spec)
            else:
                zoo.get(spec)
            _check_cache_entry(spec, args.force)
        for spec in args.download:
            folder = zoo.fetch(spec, progress=sys.stderr.isatty(), keep_raw=args.keep_raw, force=args.force)
            print('%s: %s' % (spec, folder))
        return 0
    rows = []
    for m in zoo.list_models(args.task):
        path = zoo.cached_path(m.name)
        rows.append(dict(m.as_dict(), cached=path is not None, path=str(path) if path else None))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ('name', 'task', 'dataset', 'classes', 'mIoU', 'ms+flip', 'params', 'size', 'cached', 'source')
    table = [header] + [(r['name'], r['task'], r['dataset'], str(r['classes'] or '-'), _miou(r['miou']),
                         _miou(r['miou_ms']), '%.1f M' % (r['params'] / 1e6), '~' + _size(r['download_bytes']),
                         'yes' if r['cached'] else 'no', r['url']) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print('  '.join(c.ljust(w) for c, w in zip(row, widths)) + '  ' + row[-1])
    print('\ncache: %s (TWINS_TIMM_CACHE); sizes are float32 weights, the downloads are about that big.'
          % zoo.cache_dir())
    return 0
