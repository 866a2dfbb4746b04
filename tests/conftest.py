"""Shared test set-up: the ``slow`` marker, a local Hugging Face cache, timm's
reference models (seeded weights: tests/references.py), the stand-in segmenter.

``python -m pytest -q -n 2 --dist worksteal -m "not slow"`` is the quick first check (every module and
command, small variants only); CI runs everything (README: the same without ``-m``).  Slow tests are marked
where they are written: ``pytestmark`` in the mmseg parity, export and bench files, ``@pytest.mark.slow`` on a
few single tests whose faster siblings cover the same code, and ``marks.larger_variants_slow`` on
parametrisations over the six models (their small variants stay in the quick set).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

# glibc keeps freed memory for reuse instead of handing every large block back to the OS: torch allocates
# and frees big buffers op after op, and each fresh mapping is paid again in page faults (the mmseg parity
# file: 1.35 M -> 0.37 M faults, system time 4.5 -> 2.6 s). Read by glibc when a process starts, so this
# reaches the xdist workers and every process the tests start; the bench sets its own for its memory runs.
os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', str(1 << 30))
os.environ.setdefault('MALLOC_TRIM_THRESHOLD_', str(1 << 30))

# Under pytest-xdist (`-n N`) the cores are shared out: each worker's torch, and the subprocesses it starts,
# get cores // N threads (one each with -n 2 on 2 cores) instead of all of them competing for every core.
if os.environ.get('PYTEST_XDIST_WORKER'):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    WORKER_THREADS = max(1, _cores // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))
    os.environ['OMP_NUM_THREADS'] = str(WORKER_THREADS)
else:
    WORKER_THREADS = None

def pytest_configure(config):
    if WORKER_THREADS:
        import torch
        torch.set_num_threads(WORKER_THREADS)


def pytest_collection_finish(session):
    """The garbage collector's time in a run, 11 s -> 6 s: the imported libraries' objects (torch, timm,
    SMP, mmseg, ...) are frozen once collected, so full passes skip them, and collections start after
    50,000 new objects instead of 700 (torch.export and dynamo make and drop millions)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def pytest_sessionfinish(session):
    """One garbage collection at the end, then the survivors frozen: pytest's unraisable-exception check
    collects five more times on exit, ~0.5 s each in a worker whose heap holds torch.export's and
    dynamo's objects, while the run waits for the workers to exit. Whatever this collection finds is
    still reported (the check is still installed here)."""
    import gc
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope='module')
def module_temp_files(request, tmp_path_factory):
    """What a module makes under the run's temp root (its module-scoped checkpoints, converted models and
    exports: ~100-700 MB a module) goes when the module ends, unless one of its tests failed: a run leaves
    nothing behind when it passes (with ``tmp_path_retention_policy = failed`` in setup.cfg for the tests'
    own tmp_path), and only what a failure needs to be looked at otherwise. A session-scoped fixture that
    needs a folder must make its own (tempfile), as it would go with the first module that used it."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def same_thread_count():
    """A test that changes torch's thread count (the bench sets its --threads) gives it back: later tests,
    and the subprocesses they start with OMP_NUM_THREADS from it, keep the run's."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fill_hf_cache(cache: Path, repo_id: str, folder: Path, revision: str = 'a' * 40) -> Path:
    """Copy ``folder`` into ``cache`` as huggingface_hub lays a downloaded repo out (read offline):
    models--org--name/refs/main -> snapshots/<revision>/<files>. Returns the snapshot folder."""
    repo = Path(cache) / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / revision
    shutil.copytree(folder, snapshot)
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(revision)
    return snapshot


@pytest.fixture
def hf_cache() -> Callable[..., Path]:
    """``hf_cache(cache, repo_id, folder)``: a local Hub cache holding ``folder`` as ``repo_id``."""
    return fill_hf_cache


@pytest.fixture
def hf_offline(monkeypatch) -> Callable[[Path], None]:
    """``hf_offline(cache)``: from here on this process reads the Hub from ``cache`` only, as a user's
    ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=cache`` gives: the environment, and the values huggingface_hub read
    from it at import (it reads them then; test_convert_hub checks that path end to end in a new process)."""
    from huggingface_hub import constants

    def offline(cache: Path) -> None:
        for name, value in (('HF_HUB_OFFLINE', True), ('HF_HUB_CACHE', str(cache))):
            monkeypatch.setenv(name, '1' if value is True else value)
            monkeypatch.setattr(constants, name, value)
    return offline


@pytest.fixture(scope='session')
def timm_pair() -> Callable:
    """``timm_pair(name)`` -> (ours, timm's own Twins) with the same seeded timm-scale weights, eval mode.

    Build each variant once per test module (a module-scoped fixture over the variants, as test_backbone's
    ``timm_parity``): the six-variant parity tests are a large share of the suite's time."""
    from references import timm_pair as build
    return build


@pytest.fixture
def standin(monkeypatch):
    """``segment`` and ``eval`` use the tiny stand-in segmenter (tests/tools_standin.py) instead of loading
    a model."""
    from tools_standin import TinySegmenter
    from twins_timm.commands import evaluate, segment
    from twins_timm.zoo.resolve import LoadedModel
    model = TinySegmenter().eval()
    fake = lambda spec=None, **kw: LoadedModel(model, 'stand-in')  # noqa: E731
    monkeypatch.setattr(segment, 'load_model', fake)
    monkeypatch.setattr(evaluate, 'load_model', fake)
    return model


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    from twins_timm.commands import evaluate as evaluate_mod, segment as segment_mod
    def fail(*a, **k):
        raise AssertionError('the model was loaded before the mistake was reported')
    monkeypatch.setattr(segment_mod, 'load_model', fail)
    monkeypatch.setattr(evaluate_mod, 'load_model', fail)
