"""The CPU-inference kernel choice of the Twins MLP: whole tensor (timm's call) or cache-sized row chunks.

Used by the layers ``twins_timm.optimize`` swaps in (``layers.py``); nothing here is on the plain model's
path. The one choice is the inference MLP's: timm's ``mlp(norm(x))`` on the whole tensor ('plain') or the
same modules over cache-sized row chunks ('rows'). A :class:`KernelTable` holds one model's choices:
measured on first use of a shape ('auto': both candidates timed interleaved on the block's own modules;
the row chunks are taken only when at least ``MARGIN`` faster), fixed ('plain', 'rows': that kernel for
every choice, nothing timed), or a table saved from ``table.choices`` (JSON), which makes runs
reproducible; shapes a saved table lacks take 'plain', untimed.

Restructured calls (the row chunks, UPerHead's fused conv) are taken only when the modules involved carry
no forward hooks (``has_hooks``), so hooks always see the full tensors. Nothing here runs on a GPU.

Private torch API used: ``torch.nn.modules.module._global_forward_hooks`` / ``_global_forward_pre_hooks``
(``has_hooks``): torch has no public reader of global hooks; a correctness check, not a speed-up.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules import module as module_mod

__all__ = ['KernelTable', 'fast_inference', 'has_hooks', 'row_chunks', 'mlp_kernel']

PLAIN = 'plain'    # what timm calls: the MLP on the whole tensor
ROWS = 'rows'      # the inference MLP over cache-sized row chunks instead of the whole tensor
MARGIN = 0.05      # the row chunks must be this much faster to be chosen
CALIBRATION_ROUNDS = 3   # interleaved timed rounds after one warm-up each; the minimum counts
MLP_CHUNK_ELEMENTS = 1 << 20  # hidden activation per inference MLP chunk: 4 MiB in fp32, cache-sized
MLP_CHUNK_MIN_ROWS = 512
MLP_CALIBRATION_CHUNKS = 8  # the MLP calibration times at most this many chunks' rows

_TIMER: Callable[[], float] = time.perf_counter
POLICIES = ('auto', PLAIN, ROWS)
CHOICES = (PLAIN, ROWS)
# policies and saved choices of earlier versions, whose kernels were measured and removed (docs/cpu-inference.md)
REMOVED = ('onednn', 'windows', 'winograd')


def fast_inference(x) -> bool:
    """Whether work on ``x`` may take the CPU-inference paths: eager CPU inference (no autograd)."""
    return (isinstance(x, torch.Tensor) and x.device.type == 'cpu' and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.bfloat16) and not torch.jit.is_scripting()
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


# ------------------------------------------------------------------------------ choosing kernels
def _removed_hint(values) -> str:
    old = sorted({v for v in values if v in REMOVED})
    return (" (%s: kernels of earlier versions, measured and removed; see docs/cpu-inference.md)"
            % ', '.join(repr(v) for v in old)) if old else ''


class KernelTable:
    """One model's kernel choices, by calibration key ('family:shape...'), and what was measured.

    ``policy``: 'auto' measures each new key once; 'plain' / 'rows' take that kernel for every choice
    without timing; 'saved' answers from ``choices`` (a saved table) and takes 'plain' for keys it lacks.
    """

    def __init__(self, policy: str = 'auto', choices: Optional[Dict[str, str]] = None,
                 timer: Optional[Callable[[], float]] = None):
        self.policy = policy
        self.choices: Dict[str, str] = dict(choices or {})
        self.measured: Dict[str, Dict] = {}  # key -> {'family', 'shape', 'choice', 'gflops'}
        self.timer = timer or _TIMER

    @classmethod
    def from_spec(cls, spec: Union[str, Path, Dict[str, str], 'KernelTable']) -> 'KernelTable':
        """'auto', 'plain', 'rows', a saved choices dict, or the path of a JSON file holding one."""
        if isinstance(spec, KernelTable):
            return spec
        if isinstance(spec, str) and spec in POLICIES:
            return cls(spec)
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"kernels must be one of {POLICIES}, a dict of saved choices or the path of a "
                                 f"JSON file holding one; got {str(spec)!r}, which is neither a policy nor a "
                                 f"file{_removed_hint([spec])}")
            try:
                spec = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f'kernels file {str(path)!r} is not a JSON table of kernel choices: {e}') from None
        if not isinstance(spec, dict) or not all(
                isinstance(k, str) and v in CHOICES for k, v in spec.items()):
            hint = _removed_hint(spec.values()) if isinstance(spec, dict) else ''
            raise ValueError(f'a saved kernel table maps calibration keys (str) to one of {CHOICES}; '
                             f'got {spec!r:.200}{hint}')
        return cls('saved', spec)

    def choose(self, family: str, key: Tuple, flops: float,
               candidates: Union[Dict[str, Callable[[], object]], Callable[[], Dict[str, Callable[[], object]]]],
               margin: float = MARGIN) -> str:
        """The kernel for ``key`` in ``family``: from the table, else by the policy, else measured once.

        ``candidates`` maps kernel names to zero-argument calls on calibration inputs (or is a function that
        builds that mapping, called only when ``key`` is measured: inputs are made once, not per forward);
        the first is the plain kernel and is kept unless another runs at least ``margin`` faster. ``flops`` is
        one call's work.
        """
        name = family + ':' + ','.join(str(k) for k in key)
        hit = self.choices.get(name)
        if hit is not None:
            return hit
        if self.policy != 'auto':
            return self.policy if self.policy in CHOICES else PLAIN
        if callable(candidates):
            candidates = candidates()
        with torch.inference_mode():
            seconds = _time_interleaved(candidates, self.timer)
        plain = next(iter(candidates))
        choice = min(seconds, key=seconds.get)
        if seconds[choice] > (1 - margin) * seconds[plain]:
            choice = plain
        self.choices[name] = choice
        self.measured[name] = {'family': family, 'shape': tuple(key), 'choice': choice,
                               'gflops': {k: flops / max(s, 1e-12) / 1e9 for k, s in seconds.items()}}
        return choice

    def report(self) -> List[Dict]:
        """Every choice measured for this table: family, shape, chosen kernel, GFLOP/s of each kernel."""
        return [dict(v) for v in self.measured.values()]


# the table of a swapped-in layer made without optimize (PEFT's LoRA builds its adapters as type(base_layer)):
# timm's calls, nothing timed, nothing stored
PLAIN_TABLE = KernelTable(PLAIN)


def _time_interleaved(candidates: Dict[str, Callable[[], object]], timer: Callable[[], float]) -> Dict[str, float]:
    best = {name: math.inf for name in candidates}
    for name, fn in candidates.items():  # warm-up: first-call allocations
        fn()
    for _ in range(CALIBRATION_ROUNDS):
        for name, fn in candidates.items():
            t0 = timer()
            fn()
            best[name] = min(best[name], timer() - t0)
    return best


def _dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16': the dtype as calibration keys and reports name it."""
    return str(dtype).replace('torch.', '')


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------ restructured calls
def has_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook (on these modules, their children or global) would see the call."""
    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for top in modules for m in top.modules())


def row_chunks(x: torch.Tensor, hidden: int) -> int:
    """How many row chunks keep an MLP's hidden activation (``hidden`` wide) cache-sized."""
    rows = x.numel() // x.shape[-1]
    return max(1, rows // max(MLP_CHUNK_MIN_ROWS, MLP_CHUNK_ELEMENTS // hidden))


def mlp_kernel(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, hidden: int, chunks: int, table: KernelTable) -> str:
    """'plain' (``mlp(norm(x))`` on the whole tensor, as timm) or 'rows' (over ``chunks`` row chunks).

    Calibrated on the block's own modules with up to ``MLP_CALIBRATION_CHUNKS`` chunks' rows: enough for the
    whole-tensor hidden activation to leave the caches, as it does at full size, for a few ms of work.
    """
    rows, c = x.numel() // x.shape[-1], x.shape[-1]
    per_chunk = -(-rows // chunks)
    sample_chunks = min(chunks, MLP_CALIBRATION_CHUNKS)
    key = (_pow2_at_least(rows), c, hidden, _dtype_name(x.dtype))  # uncapped: whole-tensor size

    def candidates() -> Dict[str, Callable[[], object]]:
        sample = torch.randn(per_chunk * sample_chunks, c, generator=torch.Generator().manual_seed(0)).to(x.dtype)
        scratch = sample.clone()

        def by_rows() -> None:
            for part in scratch.tensor_split(sample_chunks):
                part.add_(mlp(norm(part)))
        return {PLAIN: lambda: mlp(norm(sample)).add_(sample), ROWS: by_rows}
    return table.choose('mlp', key, 4.0 * per_chunk * sample_chunks * c * hidden, candidates)
