"""Fresh Python processes for tests without paying torch's import in each one.

A test that needs a new process (fresh import state, environment variables read at import, kill -9, a
process group) gets it from multiprocessing's fork server, which has imported torch and torchvision once
(the slow ~3 s of every ``python -c "import timm"``) and nothing else: timm, huggingface_hub, twins_timm and
everything they read from the environment are imported fresh in each child, after the child has set the
environment the test asked for.  A test about the interpreter itself (the console script not importing
torch) still runs ``subprocess``.

    done = fresh_python('import twins_timm; print(1)', env={'HF_HUB_OFFLINE': '1'})
    assert done.returncode == 0 and done.stdout == '1\\n'
    child = start_python(module='twins_timm', argv=['train', ...]); child.kill(); child.wait()
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

PRELOAD = ['torch', 'torchvision']  # never anything that reads the variables the tests set
_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context('forkserver')
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(code: Optional[str], module: Optional[str], argv: Sequence[str], env: Mapping[str, str],
           cwd: str, out: str, err: str, warnings_as_errors: bool) -> None:
    """Runs in the forked child: the environment first, then the script as ``python -c`` / ``-m`` would."""
    import runpy
    import sys
    import traceback
    import warnings
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch  # preloaded; its thread count was read when the server started, so set it as asked
    if env.get('OMP_NUM_THREADS'):
        torch.set_num_threads(int(env['OMP_NUM_THREADS']))
    if warnings_as_errors:
        warnings.simplefilter('error')
    status = 0
    try:
        if module:
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name='__main__', alter_sys=True)
        else:
            sys.argv = ['-c', *argv]
            exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class FreshPython:
    """A running child: ``pid``, ``poll()``, ``wait(timeout)``, ``kill()``; ``returncode`` (-9 after
    SIGKILL, as subprocess reports it), ``stdout`` / ``stderr`` once it has ended."""

    def __init__(self, code, module, argv, env, cwd, warnings_as_errors):
        self._dir = tempfile.TemporaryDirectory(prefix='fresh-python-')
        self._out, self._err = (os.path.join(self._dir.name, n) for n in ('out', 'err'))
        for p in (self._out, self._err):
            Path(p).touch()
        env = dict(os.environ if env is None else env)
        self._proc = _fork_server().Process(
            target=_child, args=(code, module, [str(a) for a in argv], env, str(cwd or os.getcwd()),
                                 self._out, self._err, warnings_as_errors), daemon=True)
        self._proc.start()
        self.pid = self._proc.pid
        self.stdout = self.stderr = None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.exitcode

    def poll(self) -> Optional[int]:
        return self._proc.exitcode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        self._proc.join(timeout)
        if self._proc.exitcode is not None and self.stdout is None:
            self.stdout, self.stderr = Path(self._out).read_text(), Path(self._err).read_text()
            self._dir.cleanup()
        return self._proc.exitcode

    def kill(self) -> None:
        self._proc.kill()

    def stderr_so_far(self) -> str:
        """What the running child has written to stderr until now."""
        return Path(self._err).read_text() if self.stderr is None else self.stderr


def start_python(code: Optional[str] = None, *, module: Optional[str] = None, argv: Sequence = (),
                 env: Optional[Mapping[str, str]] = None, cwd=None,
                 warnings_as_errors: bool = False) -> FreshPython:
    """``python -c CODE ARGV...`` or ``python -m MODULE ARGV...`` in a fresh process (``env``: its whole
    environment, default this process's), started and not waited for."""
    assert (code is None) != (module is None), 'give code or module'
    return FreshPython(code, module, argv, env, cwd, warnings_as_errors)


def fresh_python(code: Optional[str] = None, *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, '-c', code, *argv], capture_output=True, text=True)``."""
    child = start_python(code, **kwargs)
    if child.wait(timeout) is None:
        child.kill()
        child.wait()
        raise subprocess.TimeoutExpired(code or kwargs.get('module'), timeout, child.stdout, child.stderr)
    return subprocess.CompletedProcess(code or kwargs.get('module'), child.returncode, child.stdout, child.stderr)
