"""Multi-process launches for the tests: a real ``torchrun -m twins_timm``, or two ranks started from
fresh_python's fork server with the environment torchrun gives its workers."""
import os
import socket
import subprocess
import sys
import time

from fresh_python import start_python

ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore')


def torchrun(*args, timeout=400):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
           '-m', 'twins_timm', *map(str, args)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def two_ranks(*args, timeout=400):
    """``python -m twins_timm ARGS`` as ranks 0 and 1 of a 2-process CPU launch, with torchrun's worker
    environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT); [rank 0's, rank 1's] result."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ranks = [start_python(module='twins_timm', argv=args,
                          env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))) for r in range(2)]
    deadline = time.time() + timeout
    try:  # as torchrun: one process failing ends the launch
        while (any(r.poll() is None for r in ranks) and not any(r.poll() for r in ranks)
               and time.time() < deadline):
            time.sleep(0.05)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
            rank.wait()
    for rank in ranks:
        assert rank.returncode == 0, (rank.returncode, rank.stdout[-3000:] + rank.stderr[-3000:])
    return ranks
