"""The one model-card writer (huggingface_hub.ModelCard) of every folder twins-timm writes.

It sits with the segmenters, the lowest layer that writes cards (``save_pretrained``); what a conversion adds
(where the weights come from, how faithfully they were converted) is handed in as plain text by the
converter (``twins_timm.convert.hub``), so this module needs nothing above it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

__all__ = ['Provenance', 'model_card']


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights come from, as its writer tells it."""
    title: str                                 # the card's heading
    lines: Sequence[str]                       # markdown after the heading: source, settings, numerics
    licence: Sequence[str] = ()                # markdown of the card's Licence section
    hub_dataset: Optional[str] = None          # the Hub's id of the training data set ('ade20k', 'imagenet-1k')
    name: Optional[str] = None                 # what to load it by, for the usage snippet


def model_card(segmenter: bool, provenance: Optional[Provenance] = None, model: Optional[nn.Module] = None,
               metrics: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None) -> ModelCard:
    """A card for a segmenter (SMP) or a timm backbone / classifier.

    ``provenance`` says where the weights come from; ``model`` (a segmenter saved with ``save_pretrained``)
    adds its init parameters; ``metrics`` / ``dataset`` are what SMP's ``save_pretrained`` passes for its card.
    """
    tags = ['image-segmentation', 'segmentation-models-pytorch'] if segmenter else ['image-classification', 'timm']
    hub_dataset = provenance.hub_dataset if provenance is not None else None
    data = ModelCardData(library_name='segmentation-models-pytorch' if segmenter else 'timm',
                         license='apache-2.0', tags=tags + ['twins', 'twins-timm'],
                         pipeline_tag='image-segmentation' if segmenter else 'image-classification',
                         datasets=[hub_dataset] if hub_dataset else None)
    if provenance is not None:
        lines = ['# %s' % provenance.title, '', *provenance.lines]
    else:
        lines = ['# %s (%s)' % (type(model).__name__, model.encoder_name), '',
                 'Twins backbone with an mmsegmentation-equivalent head, as a segmentation-models-pytorch model.']
    if model is not None:
        params = {k: v for k, v in model.config.items()
                  if not k.startswith('_') and k not in ('class_names', 'palette')}
        lines += ['', '## Model init parameters', '', '```json', json.dumps(params, indent=2), '```', '',
                  'Classes: %d (names and palette in config.json).' % model.classes]
    if metrics:
        lines += ['', '## Metrics', '', '```json', json.dumps(metrics, indent=2), '```']
    if dataset:  # what save_pretrained was told (a published data set is in the provenance)
        lines += ['', 'Dataset: %s' % dataset]
    name = (provenance.name if provenance is not None else None) or 'PATH_OR_REPO'
    lines += ['', '## Usage', '', '```python']
    if segmenter:
        lines += ['from twins_timm.adapters import from_pretrained',
                  "model = from_pretrained('%s').eval()" % name,
                  '# RGB 0-255 normalised with config mean / std, NCHW float -> logits (B, classes, H, W)']
    else:
        lines += ['import timm, twins_timm',
                  "model = timm.create_model('local-dir:PATH', pretrained=True)  # or 'hf-hub:REPO_ID'"]
    lines += ['```']
    if provenance is not None and provenance.licence:
        lines += ['', '## Licence', '', *provenance.licence]
    return ModelCard('---\n%s\n---\n\n%s\n' % (data.to_yaml(), '\n'.join(lines)))
