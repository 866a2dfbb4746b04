"""Published Twins models by name: download once, verify, convert, cache; then offline.

    >>> from twins_timm import zoo
    >>> folder = zoo.fetch('upernet_twins_svt_large.ade20k')   # converted Hub folder in the cache
    >>> model = zoo.create_model('upernet_twins_svt_large.ade20k')   # = twins_timm.from_pretrained

Names follow timm's ``arch.tag``: ``{upernet,fpn}_twins_{pcpvt,svt}_{small,base,large}.ade20k`` (mmseg's
ADE20K segmenters), ``twins_*.in1k_mmseg`` (mmseg's converted ImageNet backbones, no head) and
``twins_*.in1k`` (timm's ImageNet classifiers on the Hugging Face Hub). ``twins-timm models`` lists them.

Downloads (``twins_timm.files.download``: bounded in size and time, sha256 prefix from the file name checked)
go into a private temporary folder, then through the converter (safe loading, every key accounted for);
the converted folder, with the size and sha256 of its weights (``twins_timm.zoo.cache_entry``), is renamed
into ``cache_dir()/NAME`` only when complete, under a lock per entry: processes fetching the same entry
(torchrun ranks) wait for the first and use its result. Every use checks the entry first; a damaged one
is fetched again (or, offline, named with the command that fixes it).
``TWINS_TIMM_CACHE`` moves the cache; ``TWINS_TIMM_MIRROR=http://host:port`` replaces scheme and host
of every download (same path); ``TWINS_TIMM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` never touches the network
(``twins_timm.files.hub``: the one offline rule); ``TWINS_TIMM_DOWNLOAD_TIMEOUT`` (seconds, default 60)
bounds a stalled download.
"""
from twins_timm.zoo import cache_entry
from twins_timm.files.hub import OFFLINE_SWITCHES, offline
from twins_timm.zoo.published import (DEFAULT_SEGMENTER, HASH_IN_NAME, MAX_UNLISTED_BYTES, MMSEG_LICENCE, MMSEG_ROOT, MODELS,
                                      TIMM_LICENCE, WEIGHTS, ChecksumError, DamagedEntry, ZooError, ZooModel, cache_dir,
                                      cached_path, check_url, fetch, folder_for, get, hash_prefix, is_url, list_models,
                                      manual_steps, mirrored, raw_path)
from twins_timm.zoo.resolve import from_pretrained as create_model  # any model spec -> model: the one resolver

__all__ = ['cache_entry', 'OFFLINE_SWITCHES', 'offline', 'DEFAULT_SEGMENTER', 'HASH_IN_NAME', 'MAX_UNLISTED_BYTES',
           'MMSEG_LICENCE', 'MMSEG_ROOT', 'MODELS', 'TIMM_LICENCE', 'WEIGHTS', 'ChecksumError', 'DamagedEntry',
           'ZooError', 'ZooModel', 'cache_dir', 'cached_path', 'check_url', 'fetch', 'folder_for', 'get', 'hash_prefix',
           'is_url', 'list_models', 'manual_steps', 'mirrored', 'raw_path', 'create_model']
