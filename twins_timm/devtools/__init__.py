"""Developer instruments, apart from the runtime code: the bench behind ``twins-timm bench`` (``bench``: the
sections; ``bench_timing``, ``bench_models``, ``bench_memory``: how and what it measures; ``bench_render``: its
tables), its Markdown report, the speed ceiling and mmsegmentation as a numerical reference (which fakes
``mmcv.ops`` to import on CPU). Nothing here imports ``twins_timm.commands``."""
