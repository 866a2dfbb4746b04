"""Peak training memory of a backbone, forward + backward, each configuration in a fresh process."""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch

from twins_timm.devtools.bench_models import materialize
from twins_timm.devtools.bench_timing import precision_context, short_error

MMAP_THRESHOLD = 128 * 1024  # bytes; glibc malloc setting of the memory subprocesses


def measure_training_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One forward + backward of our backbone; peak bytes above the state after model creation."""
    torch.set_num_threads(int(spec['threads']))
    device = spec['device']
    b, h, w = spec['size']
    model = materialize(lambda: timm.create_model(spec['variant'], pretrained=False, num_classes=0),
                         device, int(spec['seed'])).train()
    model.set_grad_checkpointing(bool(spec['checkpointing']))
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        gc.collect()
        base = _reset_peak_rss()
    with precision_context(spec['precision'], device):
        feats = model.forward_intermediates(x, intermediates_only=True)
        loss = sum(f.float().mean() for f in feats)
    loss.backward()
    if device == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss()
    return {'peak_bytes': peak - base, 'baseline_bytes': base}


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the process's RSS high-water mark where Linux allows it; the baseline in bytes.

    Writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS, so transient peaks of imports and
    model creation drop out; elsewhere the baseline is ru_maxrss (the peak so far), which can hide small
    activations under an earlier transient.
    """
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        rss = _proc_status_bytes('VmRSS')
        if rss is not None and _proc_status_bytes('VmHWM') is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak_rss() -> int:
    hwm = _proc_status_bytes('VmHWM')
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_fresh_processes(specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """:func:`measure_training_memory` of each spec in a process of its own, forked from this one (which has
    imported torch and timm and computed nothing, so no thread pool is inherited). Without os.fork this
    process is itself the fresh one, given one spec."""
    if not hasattr(os, 'fork'):
        return [measure_training_memory(spec) for spec in specs]
    results = []
    for spec in specs:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report, leave without running the parent's clean-up
            os.close(read)
            try:
                out = measure_training_memory(spec)
            except BaseException as e:
                out = {'error': short_error(e)}
            with os.fdopen(write, 'w') as f:
                f.write(json.dumps(out))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        results.append(json.loads(text) if text else
                       {'error': 'memory process ended with status %d and no result' % status})
    return results


def memory_in_subprocess(specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """CPU peak RSS is per process, so every configuration gets a fresh one: one subprocess imports torch and
    timm once and forks a child per configuration (:func:`measure_in_fresh_processes`); without os.fork, a
    subprocess per configuration."""
    if not hasattr(os, 'fork') and len(specs) > 1:
        return [result for spec in specs for result in memory_in_subprocess([spec])]
    code = ('import json, sys; from twins_timm.devtools.bench_memory import measure_in_fresh_processes; '
            'print("RESULT " + json.dumps(measure_in_fresh_processes(json.loads(sys.argv[1]))))')
    # A fixed mmap threshold makes glibc hand every large block straight back to the OS when it is freed,
    # so RSS follows the live tensors instead of the allocator's free lists.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, '-c', code, json.dumps(specs)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError('memory subprocess exited with %d: %s' % (proc.returncode, tail))
