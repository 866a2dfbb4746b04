"""mmseg's training loss for the Twins segmenters, for plain-PyTorch fine-tuning loops."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

MAIN_WEIGHT = 1.0
AUX_WEIGHT = 0.4   # mmseg Twins UPerNet configs: decode_head 1.0, auxiliary_head 0.4
IGNORE_INDEX = 255


def mmseg_loss(outputs: Union[torch.Tensor, Sequence[torch.Tensor]], target: torch.Tensor,
               weights: Tuple[float, float] = (MAIN_WEIGHT, AUX_WEIGHT),
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Weighted pixel cross-entropy of the main (and auxiliary) logits, as mmseg computes it.

    `outputs` is what a train-mode model returns: logits, or `(logits, aux_logits)`, at the
    label size. Like mmseg's CrossEntropyLoss (`avg_non_ignore=False`), each loss is averaged
    over all pixels, ignored ones counting as zero.
    """
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    if len(outputs) > len(weights):
        raise ValueError(f'got {len(outputs)} outputs but only {len(weights)} loss weights')
    total = outputs[0].new_zeros(())
    for logits, weight in zip(outputs, weights):
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(f'logits {tuple(logits.shape[-2:])} and labels '
                             f'{tuple(target.shape[-2:])} differ in size; resize the labels')
        per_pixel = F.cross_entropy(logits, target.long(), ignore_index=ignore_index,
                                    reduction='none')
        total = total + weight * per_pixel.mean()
    return total
