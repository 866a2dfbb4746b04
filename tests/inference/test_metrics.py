"""mIoU / mAcc / aAcc with mmseg's rules, against independent counting and mmseg's IoUMetric."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tools_standin import require_mmseg
from twins_timm.inference.metrics import IoUAccumulator, format_table, intersect_and_union, reduce_zero_label


def _synthetic(seed: int, n: int = 4, classes: int = 6):
    """Raw ADE-style labels (0 = other, 1..classes, some 255) and 0-based predictions."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        h, w = int(rng.integers(5, 12)), int(rng.integers(5, 12))
        raw = rng.integers(0, classes, (h, w))  # class `classes` (raw value) never appears
        raw[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, np.clip(raw - 1, 0, classes - 1),
                        rng.integers(0, classes - 1, (h, w)))  # class classes-1 never predicted
        pairs.append((pred, raw))
    return pairs


def _independent(pairs, classes):
    """Per-class counting with Python loops, mmseg's definitions written out."""
    inter = [0] * classes
    pred_a = [0] * classes
    lab_a = [0] * classes
    for pred, raw in pairs:
        for p, r in zip(pred.reshape(-1).tolist(), raw.reshape(-1).tolist()):
            if r in (0, 255):
                continue  # "other" and ignored pixels
            lab = r - 1
            lab_a[lab] += 1
            pred_a[p] += 1
            inter[p] += int(p == lab)
    iou, acc = [], []
    for c in range(classes):
        union = pred_a[c] + lab_a[c] - inter[c]
        iou.append(inter[c] / union if union else math.nan)
        acc.append(inter[c] / lab_a[c] if lab_a[c] else math.nan)
    valid_iou = [v for v in iou if not math.isnan(v)]
    valid_acc = [v for v in acc if not math.isnan(v)]
    return dict(aAcc=sum(inter) / sum(lab_a), mIoU=sum(valid_iou) / len(valid_iou),
                mAcc=sum(valid_acc) / len(valid_acc), IoU=iou, Acc=acc)


def test_reduce_zero_label():
    raw = np.array([[0, 1, 2], [150, 255, 254]])
    assert reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 253]]


def test_metrics_match_independent_counting():
    classes = 6
    pairs = _synthetic(0, classes=classes)
    acc = IoUAccumulator(classes)
    for pred, raw in pairs:
        acc.add(pred, raw)
    ref = _independent(pairs, classes)
    got = acc.summary()
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert abs(got[key] - ref[key]) < 1e-12, key
    per = acc.per_class()
    np.testing.assert_allclose(per['IoU'], ref['IoU'], rtol=0, atol=1e-12)  # NaN positions equal too
    np.testing.assert_allclose(per['Acc'], ref['Acc'], rtol=0, atol=1e-12)


def test_absent_classes_are_excluded_and_false_positives_count():
    # class 2 absent from both -> no IoU; class 3 predicted but not in the ground truth -> IoU 0
    raw = np.array([[1, 1, 2, 2]])          # reduced: 0, 0, 1, 1
    pred = np.array([[0, 0, 1, 3]])
    acc = IoUAccumulator(4)
    acc.add(pred, raw)
    per = acc.per_class()
    assert per['IoU'][0] == 1.0 and per['IoU'][1] == 0.5 and per['IoU'][3] == 0.0
    assert math.isnan(per['IoU'][2]) and math.isnan(per['Acc'][2]) and math.isnan(per['Acc'][3])
    s = acc.summary()
    assert s['mIoU'] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert s['mAcc'] == pytest.approx((1.0 + 0.5) / 2)
    assert s['aAcc'] == pytest.approx(3 / 4)
    table = format_table(acc, ['a', 'b', 'c', 'd'])
    assert ' 50.00' in table and table.splitlines()[4].split()[1] == '-'



def test_metrics_json_marks_absent_classes_and_is_recognised_as_ours(tmp_path):
    from twins_timm.inference.metrics import json_not_ours, metrics_json
    acc = IoUAccumulator(3, reduce_zero_label=False)
    acc.add(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [1, 0]]))  # class 2 neither predicted nor labelled
    payload = metrics_json(acc, ['a', 'b', 'c'], 'model-dir', False, 'mode=whole')
    assert payload['per_class'] == {'class': ['a', 'b', 'c'], 'IoU': [0.5, 2 / 3, None], 'Acc': [0.5, 1.0, None]}
    assert payload['mIoU'] == pytest.approx((0.5 + 2 / 3) / 2) and payload['images'] == 1
    ours, other = tmp_path / 'm.json', tmp_path / 'other.json'
    ours.write_text(json.dumps(payload))
    other.write_text(json.dumps({'mIoU': 0.5}))
    assert json_not_ours(ours) is None and json_not_ours(other) == 'not a twins-timm eval result'

def test_without_reduce_zero_label_and_custom_ignore():
    label = np.array([[0, 1, 7, 2]])
    pred = np.array([[0, 1, 1, 0]])
    acc = IoUAccumulator(3, ignore_index=7, reduce_zero_label=False)
    acc.add(pred, label)
    assert acc.label_area.tolist() == [1, 1, 1] and acc.intersect.tolist() == [1, 1, 0]


def test_intersect_and_union_matches_mmseg():
    require_mmseg()
    from mmseg.evaluation.metrics import IoUMetric
    classes = 7
    pairs = _synthetic(1, n=5, classes=classes)
    acc = IoUAccumulator(classes)
    results = []
    for pred, raw in pairs:
        label = reduce_zero_label(raw)
        ref = IoUMetric.intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), classes, 255)
        ours = intersect_and_union(pred, label, classes, 255)
        for a, b in zip(ours, ref):
            assert a.tolist() == b.long().tolist()
        results.append(ref)
        acc.add(pred, raw)
    totals = [sum(r[k] for r in results) for k in range(4)]
    ref_metrics = IoUMetric.total_area_to_metrics(*totals, metrics=['mIoU'])
    s = acc.summary()
    assert abs(s['aAcc'] - float(ref_metrics['aAcc'])) < 1e-6
    assert abs(s['mIoU'] - float(np.nanmean(ref_metrics['IoU']))) < 1e-6
    assert abs(s['mAcc'] - float(np.nanmean(ref_metrics['Acc']))) < 1e-6
    np.testing.assert_allclose(acc.per_class()['IoU'], ref_metrics['IoU'], atol=1e-6)


def test_reduce_zero_label_matches_mmseg_loader(tmp_path):
    require_mmseg()
    from PIL import Image
    from mmseg.datasets.transforms import LoadAnnotations
    raw = np.array([[0, 1, 2, 150], [255, 254, 7, 0]], dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / 'a.png')
    loaded = LoadAnnotations(reduce_zero_label=True)(
        dict(seg_map_path=str(tmp_path / 'a.png'), reduce_zero_label=True, seg_fields=[]))
    assert loaded['gt_seg_map'].tolist() == reduce_zero_label(raw).tolist()
