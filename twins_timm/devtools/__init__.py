"""Developer instruments, apart from the runtime code: the bench (``twins-timm bench``), its report, the speed
ceiling and mmsegmentation as a numerical reference (which fakes ``mmcv.ops`` to import on CPU)."""
