"""One engine that applies a rule table (``rules.py``) in either direction and accounts for every key.

Forward reads source-format keys and writes target (timm / SMP) keys; reverse does the opposite
with the same table. Every input key must be mapped by exactly one rule or belong to a dropped part;
every expected output key must be filled with the expected shape. Anything else raises
``MappingError`` listing the offending keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from twins_timm.convert.rules import Rename, Split

_PLACEHOLDERS = {'i': r'\d+', 'j': r'\d+', 'k': r'\d+', 'w': r'weight|bias', 'x': r'.+'}


class MappingError(ValueError):
    """Keys that could not be accounted for; ``problems`` maps a category to the offending keys."""

    def __init__(self, message: str, problems: Dict[str, List[str]]):
        super().__init__(message)
        self.problems = problems


@lru_cache(maxsize=None)
def _compile(template: str) -> 're.Pattern[str]':
    out, pos = [], 0
    for m in re.finditer(r'\{(\w)\}', template):
        out.append(re.escape(template[pos:m.start()]))
        out.append('(?P<%s>%s)' % (m.group(1), _PLACEHOLDERS[m.group(1)]))
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile('^' + ''.join(out) + '$')


def _fill(template: str, groups: Mapping[str, str]) -> str:
    return re.sub(r'\{(\w)\}', lambda m: groups[m.group(1)], template)


@dataclass
class MappingReport:
    state_dict: Dict[str, torch.Tensor]
    mapped: List[Tuple[str, str]] = field(default_factory=list)  # (input key, output key)
    dropped: List[str] = field(default_factory=list)             # input keys removed as a dropped part
    dropped_parts: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def n_mapped(self) -> int:
        return len({k for k, _ in self.mapped})


def _sides(rule, reverse: bool) -> Tuple[Optional[Sequence[str]], Optional[Sequence[str]]]:
    """(templates read, templates written) for this direction."""
    if isinstance(rule, Split):
        src, dst = (rule.src,), tuple(rule.dst)
    else:
        src = None if rule.src is None else (rule.src,)
        dst = None if rule.dst is None else (rule.dst,)
    return (dst, src) if reverse else (src, dst)


def _shorten(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    text = ', '.join(keys[:limit])
    return text + (' ... (%d more)' % (len(keys) - limit) if len(keys) > limit else '')


def apply_rules(rules: Sequence[object], state_dict: Mapping[str, torch.Tensor], reverse: bool = False,
                drop: Iterable[str] = (), expected: Optional[Mapping[str, Sequence[int]]] = None,
                ) -> MappingReport:
    """Map ``state_dict`` through ``rules``; raise MappingError unless every key is accounted for.

    ``expected`` (output key -> shape) is the state dict the output must fill exactly, usually taken
    from the target model built on the meta device.
    """
    drop = set(drop)
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    report = MappingReport(out)
    unmapped: List[str] = []
    duplicates: List[str] = []
    bad_split: List[str] = []
    consumed = set()

    def put(key_out: str, value: torch.Tensor, key_in: str) -> None:
        if key_out in out:
            duplicates.append('%s (from %s and %s)' % (key_out, origin[key_out], key_in))
            return
        out[key_out] = value
        origin[key_out] = key_in
        report.mapped.append((key_in, key_out))

    for key, value in state_dict.items():
        if key in consumed:
            continue
        for rule in rules:
            read, write = _sides(rule, reverse)
            if read is None:
                continue
            hit = [(n, _compile(t).match(key)) for n, t in enumerate(read)]
            hit = [(n, m) for n, m in hit if m]
            if not hit:
                continue
            n, m = hit[0]
            groups = m.groupdict()
            if isinstance(rule, Rename) and rule.when is not None:
                cond = rule.when[1] if reverse else rule.when[0]
                if _fill(cond, groups) not in state_dict:
                    continue
            if rule.part is not None and rule.part in drop:
                report.dropped.append(key)
                report.dropped_parts.setdefault(rule.part, []).append(key)
                break
            if write is None:
                unmapped.append('%s (has no place in the output format; drop part %r to leave it out)'
                                % (key, rule.part))
                break
            if isinstance(rule, Split) and reverse:
                # gather all pieces, concatenate in order
                names = [_fill(t, groups) for t in rule.dst]
                missing = [k for k in names if k not in state_dict]
                if missing:
                    if n == 0:
                        bad_split.append('%s (partner %s missing)' % (key, ', '.join(missing)))
                    else:
                        unmapped.append(key)
                    break
                if n != 0:
                    break  # handled together with the first piece
                consumed.update(names)
                put(_fill(rule.src, groups), torch.cat([state_dict[k] for k in names], 0), key)
                for k in names[1:]:
                    report.mapped.append((k, _fill(rule.src, groups)))
            elif isinstance(rule, Split):
                total = sum(rule.chunks)
                rows = value.shape[0] if value.dim() else 0
                if rows % total:
                    bad_split.append('%s (%d rows do not split %s)' % (key, rows, ':'.join(map(str, rule.chunks))))
                    break
                unit = rows // total
                pieces = torch.split(value, [c * unit for c in rule.chunks], 0)
                for t, piece in zip(rule.dst, pieces):
                    put(_fill(t, groups), piece.clone() if not piece.is_meta else piece, key)
            else:
                put(_fill(write[0], groups), value, key)
            break
        else:
            unmapped.append(key)

    problems: Dict[str, List[str]] = {}
    if unmapped:
        problems['unmapped source keys'] = unmapped
    if duplicates:
        problems['target keys produced twice'] = duplicates
    if bad_split:
        problems['keys that cannot be split/joined'] = bad_split
    if expected is not None:
        missing = [k for k in expected if k not in out]
        extra = [k for k in out if k not in expected]
        shapes = ['%s: %s from %s, model expects %s' % (k, list(out[k].shape), origin[k], list(expected[k]))
                  for k in out if k in expected and tuple(out[k].shape) != tuple(expected[k])]
        if missing:
            problems['target keys not filled'] = missing
        if extra:
            problems['keys with no place in the target model'] = ['%s (from %s)' % (k, origin[k]) for k in extra]
        if shapes:
            problems['shape mismatches'] = shapes
        # keep the model's own key order
        ordered = {k: out[k] for k in expected if k in out}
        ordered.update((k, v) for k, v in out.items() if k not in ordered)
        out.clear()
        out.update(ordered)
    if problems:
        lines = ['%s (%d): %s' % (what, len(keys), _shorten(keys)) for what, keys in problems.items()]
        raise MappingError('the checkpoint does not map cleanly onto the target model. ' + '; '.join(lines)
                           + '. Check that the file and --variant/--drop options match; every key must be '
                           'accounted for.', problems)
    return report
