"""Inference library behind `twins-timm segment` / `twins-timm eval`: images, mmseg's test rules, metrics, pictures.

    from twins_timm.inference import InferenceSettings, ms_flip_settings, predict_labels
    labels = predict_labels(model, rgb_uint8_hwc, ms_flip_settings())  # (1, H, W) class indices
"""
from twins_timm.inference.predict import (ADE20K_TEST_SCALE, MS_RATIOS, InferenceSettings, ms_flip_settings,
                                          predict_labels, predict_scores)

__all__ = ['ADE20K_TEST_SCALE', 'MS_RATIOS', 'InferenceSettings', 'ms_flip_settings',
           'predict_labels', 'predict_scores']
