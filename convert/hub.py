"""Hub folders for converted models: timm (``config.json`` + ``model.safetensors``) and SMP segmenters.

The folders are written with the libraries' own savers (timm's ``save_for_hf``, the adapter's
``save_pretrained``) into a temporary folder that is renamed into place, plus a model card.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from timm.models import save_for_hf
from torch import nn

from twins_timm.adapters.card import Provenance, model_card
from twins_timm.adapters.config import check_encoder_args
from twins_timm.convert.formats import FORMATS
from twins_timm.files.atomic import write_folder

WEIGHTS_NAME = 'model.safetensors'

LICENCE_NOTE = (
    'The original Twins weights were released by Meituan-AutoML (https://github.com/Meituan-AutoML/Twins) '
    'and the mmsegmentation ones by OpenMMLab (https://github.com/open-mmlab/mmsegmentation), both under '
    'Apache-2.0. Models trained on ImageNet-1k or ADE20K are also subject to those datasets\' terms of use; '
    'check them before redistributing.')

# what each backbone setting (twins_timm.models.twins) means, for the model card
SETTING_TEXT = {
    'stage_norm': lambda v: 'a LayerNorm after every stage, inside the trunk' if v else 'no per-stage norms',
    'norm_eps': lambda v: 'LayerNorm eps %g in the blocks and stage norms' % v,
    'window_mask': lambda v: 'the official padding mask in SVT window attention' if v else 'plain window padding',
    'patch_padding': lambda v: 'inputs zero-padded bottom/right to a patch multiple' if v == 'corner'
    else 'patch embedding floors odd sizes',
}

def card_provenance(res, parity: Optional[Dict[str, Any]] = None, source_sha256: Optional[str] = None,
                    card: Optional[Mapping[str, Any]] = None) -> Provenance:
    """What a converted model's card says about its weights (``res``, a conversion result): where they come
    from and how faithfully they were converted; ``card`` adds their provenance (source_url, name, dataset,
    licence, published metrics)."""
    card = dict(card or {})
    licence = ['Licence of the published weights: %s.' % card['licence'], ''] if card.get('licence') else []
    return Provenance(
        title=card.get('name') or '%s (%s)' % (res.variant, res.task),
        lines=_conversion_lines(res, parity, source_sha256, card), licence=licence + [LICENCE_NOTE],
        # the Hub's dataset ids, for the published data sets only
        hub_dataset=('ade20k' if card['dataset'] == 'ADE20K' else 'imagenet-1k') if card.get('dataset') else None,
        name=card.get('name'))


def _conversion_lines(res, parity: Optional[Dict[str, Any]], source_sha256: Optional[str],
                      card: Mapping[str, Any]) -> List[str]:
    """Where converted weights come from and how faithfully they were converted: a table and a paragraph."""
    name = Path(res.source).name if res.source else '(in-memory state dict)'
    lines = [
        'Converted with `twins-timm convert` from `%s`.' % (card.get('source_url') or name),
        '',
        '| | |',
        '|---|---|',
    ]
    if card.get('source_url'):
        lines.append('| source URL | %s |' % card['source_url'])
    lines.append('| source file | `%s` |' % name)
    if source_sha256:
        lines.append('| source sha256 | `%s` |' % source_sha256)
    lines += [
        '| source format | %s |' % (FORMATS[res.format].display if res.format in FORMATS else res.format),
        '| variant | `%s` (%s, %s) |' % (res.variant, res.family.upper(), res.size),
        '| task | %s |' % res.task,
        '| classes | %d |' % res.num_classes,
    ]
    if card.get('dataset'):
        lines.append('| dataset | %s |' % card['dataset'])
    for metric, value in (card.get('metrics') or {}).items():
        lines.append('| published %s | %s |' % (metric, value))
    lines += [
        '| backbone settings | `%s` |' % json.dumps(res.model_args, sort_keys=True),
        '| keys mapped | %d of %d source keys |' % (res.n_mapped, res.n_source_keys),
    ]
    if res.dropped_parts:
        lines.append('| dropped | %s |' % '; '.join('%s: %s' % kv for kv in res.dropped_parts.items()))
    lines += ['', '## Numerics', '']
    if res.model_args:
        said = [SETTING_TEXT[k](v) for k, v in sorted(res.model_args.items()) if k in SETTING_TEXT]
        lines.append('The backbone settings above reproduce the computation of the source family (%s); they are '
                     'stored in `config.json` and applied on load.' % '; '.join(said))
    else:
        lines.append('The source family computes exactly as timm\'s Twins; no extra settings are needed.')
    lines.append('')
    if parity:
        lines.append('Parity at conversion: %s.' % parity['text'])
    else:
        lines.append('Parity: twins-timm ships no other implementation of the source family, so none is measured '
                     'at conversion; its test suite checks these settings against the family\'s own computation '
                     '(official segmentation code, mmsegmentation) to float32 rounding (about 1e-5 relative) on '
                     'features and logits.')
    lines.append('The written weights were read back and compared bit for bit with the converted ones.')
    return lines


def save_timm_folder(res, model: nn.Module, dst, force: bool = False, parity: Optional[Dict[str, Any]] = None,
                     source_sha256: Optional[str] = None, card: Optional[Mapping[str, Any]] = None,
                     needed: Optional[int] = None) -> Path:
    """timm Hub folder: config.json (architecture, num_classes, model_args, pretrained_cfg), weights, card."""
    model_args = check_encoder_args(res.model_args, 'model_args')  # what the reader will accept back

    def fill(tmp: Path) -> None:
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True)
        cfg_path = tmp / 'config.json'
        cfg = json.loads(cfg_path.read_text())
        cfg['twins_timm'] = _provenance(res, parity, card)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        model_card(res.is_segmenter, card_provenance(res, parity, source_sha256, card)).save(tmp / 'README.md')

    return write_folder(dst, fill, force, needed)


def save_segmenter_folder(res, model: nn.Module, dst, force: bool = False, parity: Optional[Dict[str, Any]] = None,
                          source_sha256: Optional[str] = None, card: Optional[Mapping[str, Any]] = None,
                          needed: Optional[int] = None) -> Path:
    """SMP Hub folder through the adapter's own ``save_pretrained``, loadable by ``from_pretrained``."""
    def fill(tmp: Path) -> None:  # the card comes from the adapter's generate_model_card, given the provenance
        about = card_provenance(res, parity, source_sha256, card)
        model.save_pretrained(str(tmp), model_card_kwargs=dict(provenance=about))

    return write_folder(dst, fill, force, needed)


def _provenance(res, parity: Optional[Dict[str, Any]], card: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    out = {'source': Path(res.source).name if res.source else None, 'format': res.format,
           'variant': res.variant, 'task': res.task, 'dropped': sorted(res.dropped_parts)}
    if card and card.get('source_url'):
        out['source_url'] = card['source_url']
    if parity:
        out['parity_max_abs_diff'] = parity.get('max_abs_diff')
    return out


def push_to_hub(folder, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = 'Add Twins weights converted with twins-timm') -> str:
    """Upload a written folder to the Hugging Face Hub; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(url)
