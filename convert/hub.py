"""Hub folders for converted models: timm (``config.json`` + ``model.safetensors``) and SMP segmenters.

The folders are written with the libraries' own savers (timm's ``save_for_hf``, the adapter's
``save_pretrained``) into a temporary folder that is renamed into place, plus a model card.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from huggingface_hub import ModelCard, ModelCardData

from torch import nn

from twins_timm.convert.io import write_folder

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

def _format_display(fmt: str) -> str:
    from twins_timm.convert.formats import FORMATS
    return FORMATS[fmt].display if fmt in FORMATS else fmt


def model_card(res=None, parity: Optional[Dict[str, Any]] = None, source_sha256: Optional[str] = None,
               card: Optional[Mapping[str, Any]] = None, model: Optional[nn.Module] = None,
               metrics: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None) -> ModelCard:
    """The one model-card writer (huggingface_hub.ModelCard) of every folder twins-timm writes.

    ``res`` (a conversion result) adds where the weights come from and how faithfully they were converted,
    ``card`` its provenance (source_url, name, dataset, licence, published metrics); ``model`` (a
    segmenter saved with ``save_pretrained``, with or without a conversion) adds its init parameters;
    ``metrics`` / ``dataset`` are what SMP's ``save_pretrained`` passes for its card.
    """
    card = dict(card or {})
    seg = res.is_segmenter if res is not None else True
    tags = ['image-segmentation', 'segmentation-models-pytorch'] if seg else ['image-classification', 'timm']
    data = ModelCardData(library_name='segmentation-models-pytorch' if seg else 'timm', license='apache-2.0',
                         tags=tags + ['twins', 'twins-timm'],
                         pipeline_tag='image-segmentation' if seg else 'image-classification',
                         # the Hub's dataset ids, for the published data sets only
                         datasets=['ade20k' if card.get('dataset') == 'ADE20K' else 'imagenet-1k']
                         if card.get('dataset') else None)
    if res is not None:
        lines = ['# %s' % (card.get('name') or '%s (%s)' % (res.variant, res.task)), '']
        lines += _conversion_lines(res, parity, source_sha256, card)
    else:
        lines = ['# %s (%s)' % (type(model).__name__, model.encoder_name), '',
                 'Twins backbone with an mmsegmentation-equivalent head, as a segmentation-models-pytorch model.']
    if model is not None:
        params = {k: v for k, v in model.config.items() if not k.startswith('_') and k not in ('class_names', 'palette')}
        lines += ['', '## Model init parameters', '', '```json', json.dumps(params, indent=2), '```', '',
                  'Classes: %d (names and palette in config.json).' % model.classes]
    if metrics:
        lines += ['', '## Metrics', '', '```json', json.dumps(metrics, indent=2), '```']
    if dataset:  # what save_pretrained was told (a published data set is in the conversion table)
        lines += ['', 'Dataset: %s' % dataset]
    lines += ['', '## Usage', '', '```python']
    if seg:
        lines += ['from twins_timm.adapters import from_pretrained',
                  "model = from_pretrained('%s').eval()" % (card.get('name') or 'PATH_OR_REPO'),
                  '# RGB 0-255 normalised with config mean / std, NCHW float -> logits (B, classes, H, W)']
    else:
        lines += ['import timm, twins_timm',
                  "model = timm.create_model('local-dir:PATH', pretrained=True)  # or 'hf-hub:REPO_ID'"]
    lines += ['```']
    if res is not None:
        lines += ['', '## Licence', '']
        if card.get('licence'):
            lines += ['Licence of the published weights: %s.' % card['licence'], '']
        lines += [LICENCE_NOTE]
    return ModelCard('---\n%s\n---\n\n%s\n' % (data.to_yaml(), '\n'.join(lines)))


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
        '| source format | %s |' % _format_display(res.format),
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
    from timm.models import save_for_hf

    from twins_timm.adapters.config import check_encoder_args
    model_args = check_encoder_args(res.model_args, 'model_args')  # what the reader will accept back

    def fill(tmp: Path) -> None:
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True)
        cfg_path = tmp / 'config.json'
        cfg = json.loads(cfg_path.read_text())
        cfg['twins_timm'] = _provenance(res, parity, card)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        model_card(res, parity, source_sha256, card).save(tmp / 'README.md')

    return write_folder(dst, fill, force, needed)


def save_segmenter_folder(res, model: nn.Module, dst, force: bool = False, parity: Optional[Dict[str, Any]] = None,
                          source_sha256: Optional[str] = None, card: Optional[Mapping[str, Any]] = None,
                          needed: Optional[int] = None) -> Path:
    """SMP Hub folder through the adapter's own ``save_pretrained``, loadable by ``from_pretrained``."""
    def fill(tmp: Path) -> None:  # the card comes from the adapter's generate_model_card, given the conversion
        model.save_pretrained(str(tmp), model_card_kwargs=dict(
            conversion=dict(res=res, parity=parity, source_sha256=source_sha256, card=card)))

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
