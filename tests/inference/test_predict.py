"""Inference rules: mmcv's resize, mmseg's slide inference, the ms+flip merge, batching."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tools_standin import MATRIX_PRODUCTS, OpsSeen, TinySegmenter, image, region_logits, require_mmseg
from twins_timm.inference.bilinear import resized_rows, upsampled_argmax
from twins_timm.inference.predict import (
    ADE20K_TEST_SCALE, MS_RATIOS, InferenceSettings, merged_bands, ms_flip_settings,
    network_input_size, normalize, predict_labels, predict_scores, rescale_size, resize_uint8,
    slide_logits, slide_windows)


def _manual_view(model, img, size_wh, flip):
    """One test-time view computed the plain way: resize, normalise, forward, un-flip."""
    x = normalize(resize_uint8(img, (size_wh[1], size_wh[0])), model.mean, model.std)
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        out = model(x)
    return out.flip(-1) if flip else out


# ----------------------------------------------------------------------------- resize rules

def test_rescale_size_rule_by_hand():
    # coffee.png (600x400) at the ADE20K scale and at every ms ratio: factor = short side bound
    sizes = [network_input_size((600, 400), ADE20K_TEST_SCALE, r) for r in MS_RATIOS]
    assert sizes == [(384, 256), (576, 384), (768, 512), (960, 640), (1152, 768), (1344, 896)]
    # typical ADE20K validation image: already 512 short side
    assert rescale_size((683, 512), (2048, 512)) == (683, 512)
    assert network_input_size((683, 512), (2048, 512), 0.5) == (342, 256)  # int(341.5 + 0.5)
    # a panorama: the long-side bound wins
    assert rescale_size((5000, 500), (2048, 512)) == (2048, 205)
    assert rescale_size((10, 7), 1.5) == (15, 11)
    assert network_input_size((10, 7), None, 2.0) == (20, 14)


def test_rescale_size_matches_mmcv():
    mmcv = pytest.importorskip('mmcv')
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 3000, 2))
        for r in MS_RATIOS:
            scale = (int(2048 * r), int(512 * r))  # mmseg 0.x MultiScaleFlipAug
            assert rescale_size((w, h), scale) == mmcv.rescale_size((w, h), scale)
        f = float(rng.uniform(0.1, 3))
        assert rescale_size((w, h), f) == mmcv.rescale_size((w, h), f)


def test_resize_matches_opencv_within_one_level():
    cv2 = pytest.importorskip('cv2')
    rng = np.random.default_rng(0)
    cases = [(40, 60, 51, 77), (60, 40, 26, 17), (33, 47, 64, 91), (50, 60, 50, 61), (64, 64, 32, 32)]
    for h, w, nh, nw in cases:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.int64)
        ours = resize_uint8(torch.from_numpy(img).permute(2, 0, 1)[None], (nh, nw))
        diff = np.abs(ours[0].permute(1, 2, 0).numpy().astype(np.int64) - ref)
        assert diff.max() <= 1, (h, w, nh, nw)
        assert (diff > 0).mean() < 0.01, (h, w, nh, nw, (diff > 0).mean())
        plain = resize_uint8(torch.from_numpy(img).permute(2, 0, 1)[None], (nh, nw), method='torch')
        assert np.abs(plain[0].permute(1, 2, 0).numpy() - ref).max() <= 1


def test_resize_of_a_large_photo_reads_only_the_rows_it_needs():
    """The horizontal pass runs on the source rows the vertical pass reads: a 12000-pixel photo brought to
    512 touches ~1000 rows, and no tensor the size of the photo (in 64-bit integers) is made."""
    img = torch.randint(0, 256, (1, 3, 600, 450), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with OpsSeen() as seen:
        small = resize_uint8(img, (25, 19))
    assert seen.largest <= img.numel() // 8
    plain = resize_uint8(img[:, :, :, :], (25, 19), method='torch')
    assert (small - plain).abs().max() <= 1  # the same picture (cv2's rounding against F.interpolate's)


# ----------------------------------------------------------------------------- slide mode

def test_slide_windows_grid():
    # h: max(10 - 4 + 3 - 1, 0) // 3 + 1 = 3 rows; w: max(7 - 4 + 2, 0) // 3 + 1 = 2 columns
    assert slide_windows(10, 7, (4, 4), (3, 3)) == [
        (0, 4, 0, 4), (0, 4, 3, 7), (3, 7, 0, 4), (3, 7, 3, 7), (6, 10, 0, 4), (6, 10, 3, 7)]
    # image smaller than the crop: one window, the whole (smaller) image
    assert slide_windows(3, 5, (4, 8), (2, 2)) == [(0, 3, 0, 5)]


@pytest.mark.parametrize('hw,crop,stride,crop_batch', [
    ((45, 61), (24, 32), (16, 20), 1),
    ((45, 61), (24, 32), (16, 20), 3),
    ((20, 70), (32, 32), (21, 21), 2),   # image shorter than the crop
    ((32, 32), (32, 32), (16, 16), 4),
])
def test_slide_matches_mmseg(hw, crop, stride, crop_batch):
    require_mmseg()
    from mmengine.config import ConfigDict
    from mmseg.models.segmentors import EncoderDecoder
    model = TinySegmenter().eval()
    x = normalize(torch.cat([image(*hw, seed=1), image(*hw, seed=2)]), model.mean, model.std)
    ref_self = types.SimpleNamespace(
        test_cfg=ConfigDict(mode='slide', crop_size=crop, stride=stride), out_channels=model.classes,
        encode_decode=lambda inputs, metas: model(inputs))
    with torch.no_grad():
        ref = EncoderDecoder.slide_inference(ref_self, x, [dict(), dict()])
        ours = slide_logits(model, x, crop, stride, crop_batch)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    if len(slide_windows(*hw, crop, stride)) > 1:  # then slide differs from whole for this model
        assert (ours - model(x)).abs().max().item() > 1e-3


def test_slide_of_pointwise_model_equals_whole():
    model = TinySegmenter()
    pointwise = torch.nn.Conv2d(3, 4, 1)
    x = normalize(image(37, 53).float(), model.mean, model.std)
    with torch.no_grad():
        assert torch.allclose(slide_logits(pointwise, x, (16, 16), (10, 12), 5), pointwise(x), atol=1e-6)


def test_slide_batches_crops_under_inference_mode():
    model = TinySegmenter().eval()
    s = InferenceSettings(mode='slide', scale=None, crop_size=(16, 16), stride=(10, 10), crop_batch=4)
    n_windows = len(slide_windows(36, 46, (16, 16), (10, 10)))
    predict_scores(model, torch.cat([image(36, 46, 1), image(36, 46, 2)]), s)
    assert len(model.calls) == -(-n_windows // 4)
    assert model.calls[0][:3] == (2 * 4, 16, 16)  # 4 crops of 2 images per forward
    assert all(c[3] for c in model.calls)  # torch.inference_mode() was on


def test_batched_images_equal_single_images():
    model = TinySegmenter().eval()
    s = InferenceSettings(mode='slide', scale=(48, 24), crop_size=(16, 16), stride=(12, 12), flip=True)
    imgs = [image(30, 41, 3), image(30, 41, 4)]
    both = predict_scores(model, torch.cat(imgs), s)
    for k, img in enumerate(imgs):
        assert (both[k] - predict_scores(model, img, s)[0]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- whole + ms/flip

def test_whole_single_view_is_resized_logits():
    model = TinySegmenter().eval()
    img = image(40, 50)
    ours = predict_scores(model, img, InferenceSettings(scale=(64, 32)))
    size = rescale_size((50, 40), (64, 32))
    assert size == (40, 32)
    ref = F.interpolate(_manual_view(model, img, size, False), size=(40, 50), mode='bilinear',
                        align_corners=False)
    assert (ours - ref).abs().max().item() <= 1e-5
    labels = predict_labels(model, img, InferenceSettings(scale=(64, 32)))
    assert torch.equal(labels, ref.argmax(1))


def test_ms_flip_merge_matches_independent_computation():
    model = TinySegmenter().eval()
    img = image(40, 50, seed=5)
    s = ms_flip_settings(scale=(64, 32))
    assert s.ratios == MS_RATIOS and s.flip
    ours = predict_scores(model, img, s)
    # the flipped copy has its own forward (one view in memory at a time): two calls per ratio
    assert [c[0] for c in model.calls] == [1] * (2 * len(MS_RATIOS))
    probs = []
    for r in MS_RATIOS:
        size = (int(50 * min(64 * r / 50, 32 * r / 40) + 0.5), int(40 * min(64 * r / 50, 32 * r / 40) + 0.5))
        for flip in (False, True):
            view = _manual_view(model, img, size, flip)
            probs.append(F.interpolate(view, size=(40, 50), mode='bilinear', align_corners=False).softmax(1))
    ref = torch.stack(probs).mean(0)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.allclose(ours.sum(1), torch.ones(1, 40, 50), atol=1e-5)  # probabilities
    banded = predict_scores(model, img, ms_flip_settings(scale=(64, 32), full_bytes=5 * 50 * 4 * 3))
    assert (banded - ref).abs().max().item() <= 1e-5  # large-image path: 3-row bands
    # averaging softmax is not averaging logits: the test can tell them apart
    logit_mean = torch.stack([p.log() for p in probs]).mean(0).softmax(1)
    assert (ref - logit_mean).abs().max().item() > 1e-4


def test_ms_flip_merge_matches_mmseg_tta():
    require_mmseg()
    import mmcv
    from mmseg.models.segmentors import BaseSegmentor, SegTTAModel
    from mmseg.structures import SegDataSample
    model = TinySegmenter().eval()
    img = image(36, 52, seed=7)
    ratios = (0.5, 1.0, 1.75)
    s = InferenceSettings(scale=(96, 24), ratios=ratios, flip=True)
    ours = predict_scores(model, img, s)
    ours_labels = predict_labels(model, img, s)
    np_img = img[0].permute(1, 2, 0).numpy()
    post_self = types.SimpleNamespace(align_corners=False)
    samples = []
    for r in ratios:
        ref_img = mmcv.imrescale(np_img, (int(96 * r), int(24 * r)), backend='cv2')
        size = network_input_size((52, 36), (96, 24), r)
        assert ref_img.shape[:2] == (size[1], size[0])
        for flip in (False, True):
            x = normalize(resize_uint8(img, ref_img.shape[:2]), model.mean, model.std)
            assert np.abs(resize_uint8(img, ref_img.shape[:2])[0].permute(1, 2, 0).numpy() - ref_img).max() <= 1
            with torch.no_grad():
                logits = model(x.flip(-1) if flip else x)
            sample = SegDataSample(metainfo=dict(ori_shape=(36, 52), img_shape=tuple(size[::-1]),
                                                 flip=flip, flip_direction='horizontal',
                                                 padding_size=[0, 0, 0, 0], img_path='x.png'))
            samples.extend(BaseSegmentor.postprocess_result(post_self, logits, [sample]))
    ref = torch.stack([smp.seg_logits.data.softmax(0) for smp in samples]).mean(0)
    assert (ours[0] - ref).abs().max().item() <= 1e-5
    tta_self = types.SimpleNamespace(module=types.SimpleNamespace(out_channels=model.classes))
    merged = SegTTAModel.merge_preds(tta_self, [samples])
    assert torch.equal(merged[0].pred_sem_seg.data.reshape(36, 52), ours_labels[0])


def test_banded_merge_equals_whole_merge():
    views = [torch.randn(1, 6, 13, 17), torch.randn(1, 6, 29, 31), torch.randn(1, 6, 40, 50)]
    full = list(merged_bands(iter(views), (40, 50)))
    assert len(full) == 1 and full[0][:2] == (0, 40)  # small map: one accumulator, no bands
    bands = list(merged_bands(views, (40, 50), band_rows=7))
    assert [b[0] for b in bands] == list(range(0, 40, 7))
    banded = torch.cat([b for _, _, b in bands], dim=2)
    assert (full[0][2] - banded).abs().max().item() <= 1e-5
    # memory bound: 6 classes x 50 columns x 4 bytes = 1200 bytes a row -> 4-row bands
    auto = list(merged_bands(views, (40, 50), full_bytes=4 * 1200))
    assert [b[0] for b in auto] == list(range(0, 40, 4))
    assert (torch.cat([b for _, _, b in auto], dim=2) - full[0][2]).abs().max().item() <= 1e-5
    single = torch.cat([b for _, _, b in merged_bands(views[:1], (40, 50), band_rows=9)], 2)
    ref = F.interpolate(views[0], size=(40, 50), mode='bilinear', align_corners=False)
    assert (single - ref).abs().max().item() <= 1e-4


def _whole_map_merge(views, out_hw):
    """mmseg's merge written plainly: every view interpolated at once, mean softmax."""
    maps = [F.interpolate(v, size=out_hw, mode='bilinear', align_corners=False) for v in views]
    return maps[0] if len(maps) == 1 else torch.stack([m.softmax(1) for m in maps]).mean(0)


@pytest.mark.parametrize('in_hw,out_hw', [((13, 17), (40, 50)), ((29, 31), (97, 120)), ((300, 200), (100, 150)),
                                          ((7, 9), (1000, 13)), ((100, 100), (33, 100)), ((1, 1), (5, 5))])
def test_band_resize_equals_whole_map_interpolation(in_hw, out_hw):
    v = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(v, size=out_hw, mode='bilinear', align_corners=False)
    for rows in (1, 7, 64):
        bands = [resized_rows(v, out_hw, r0, min(r0 + rows, out_hw[0])) for r0 in range(0, out_hw[0], rows)]
        assert all(b.shape[2] == min(rows, out_hw[0] - k * rows) for k, b in enumerate(bands))
        assert (torch.cat(bands, dim=2) - ref).abs().max().item() <= 1e-6  # PyTorch's weights; an ulp at most


def test_large_merge_holds_no_image_size_map():
    """A photo far larger than its views (TTA under the test scale): views kept, the result made in bands,
    and no tensor as large as the image-size score map is ever made; the values are mmseg's."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(1, 6, h, w, generator=g) for h, w in ((12, 16), (18, 24), (24, 32), (24, 32))]
    out_hw, row = (300, 400), 6 * 400
    ref = _whole_map_merge(views, out_hw)
    with OpsSeen() as seen:
        bands = list(merged_bands(iter(views), out_hw, full_bytes=20 * row * 4,
                                  view_pixels=sum(v[0, 0].numel() for v in views)))
    assert [b[0] for b in bands] == list(range(0, 300, 20))
    assert seen.largest <= 20 * row  # a band; the image-size map has 15x more
    assert 'upsample_bilinear2d' in seen.names and not seen.names & MATRIX_PRODUCTS
    assert (torch.cat([b for _, _, b in bands], dim=2) - ref).abs().max().item() <= 1e-6


def test_merge_of_views_larger_than_the_image_accumulates_in_bands():
    """Views that together outweigh the image (--no-resize, upscaling ratios): one image-size map, each view
    merged into it band by band as it comes; nothing else near the image's size."""
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(1, 6, h, w, generator=g) for h, w in ((60, 80), (90, 120), (45, 60))]
    out_hw, row = (60, 80), 6 * 80
    ref = _whole_map_merge(views, out_hw)
    with OpsSeen() as seen:
        (r0, r1, merged), = merged_bands(iter(views), out_hw, full_bytes=10 * row * 4,
                                         view_pixels=sum(v[0, 0].numel() for v in views))
    assert (r0, r1) == (0, 60)
    assert seen.largest <= max(views[1].numel(), 60 * row)  # the accumulator or the views themselves
    assert 'upsample_bilinear2d' in seen.names and not seen.names & MATRIX_PRODUCTS
    assert (merged - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize('in_hw,out_hw', [((48, 64), (403, 517)), ((64, 48), (50, 40)), ((40, 40), (1, 300))])
def test_upsampled_argmax_is_the_argmax_of_the_whole_map(in_hw, out_hw):
    """One view's class map of a large photo, without its score map: only the cells along class borders
    are computed, for the classes that can win there; the labels are the whole map's argmax."""
    views = torch.cat([region_logits(30, *in_hw, seed=3), region_logits(30, *in_hw, seed=4)])
    ref = F.interpolate(views, size=out_hw, mode='bilinear', align_corners=False).argmax(1)
    with OpsSeen() as seen:
        got = upsampled_argmax(views, out_hw)
    assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert 'upsample_bilinear2d' not in seen.names and not seen.names & MATRIX_PRODUCTS
    assert seen.largest <= max(got.numel(), views.numel())  # no score map at image size (30x the labels)
    assert len(ref[0].unique()) > 3  # several regions: borders were computed


def test_upsampled_argmax_of_noise_falls_back_to_bands():
    """Classes crowding every cell (noise, no regions): the same labels from interpolated bands."""
    v = torch.randn(1, 12, 20, 24, generator=torch.Generator().manual_seed(5))
    ref = F.interpolate(v, size=(170, 150), mode='bilinear', align_corners=False).argmax(1)
    with OpsSeen() as seen:
        got = upsampled_argmax(v, (170, 150), band_elements=12 * 150 * 16)
    assert torch.equal(got, ref)
    assert 'upsample_bilinear2d' in seen.names and seen.largest <= 12 * 150 * 16  # bands of 16 rows


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match='whole.*slide'):
        InferenceSettings(mode='sliding')
    with pytest.raises(ValueError, match='ratios'):
        InferenceSettings(ratios=(1.0, -0.5))
    with pytest.raises(ValueError, match='crop size'):
        InferenceSettings(crop_size=(0, 4))


def test_slide_end_to_end_matches_mmseg_twins_model():
    """A real converted model (mmseg PCPVT-S FPN, seeded random weights) in both slide loops."""
    require_mmseg()
    import mmseg_reference as ref
    from mmengine.config import ConfigDict
    from twins_timm.convert import build_model, convert_checkpoint
    mm = ref.build_reference('pcpvt', 'small', 'fpn')
    ours = build_model(convert_checkpoint(ref.mmseg_checkpoint_object(mm))).eval()
    x = torch.randn(1, 3, 70, 100, generator=torch.Generator().manual_seed(0))
    mm.test_cfg = ConfigDict(mode='slide', crop_size=(64, 64), stride=(40, 40))
    with torch.no_grad():
        expected = mm.slide_inference(x, [dict(ori_shape=(70, 100), img_shape=(70, 100), pad_shape=(70, 100))])
    with torch.inference_mode():
        got = slide_logits(ours, x, (64, 64), (40, 40), crop_batch=3)
    assert len(slide_windows(70, 100, (64, 64), (40, 40))) == 4
    assert (got - expected).abs().max().item() <= 1e-4
