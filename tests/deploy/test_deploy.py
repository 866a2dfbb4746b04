"""Deployability: torch.compile(fullgraph=True), torch.export / ONNX with dynamic height and width,
channels_last inputs -- for the backbone and the segmenters, checked numerically against eager.

Models are the real Twins variants with fewer blocks per stage (every kind of block, attention,
positional conv and padding path is still there) so that tracing stays fast on 2 CPU cores.
"""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import timm
import torch
from torch import nn

import twins_timm  # noqa: F401  registers our Twins
from numerics import max_diff
from twins_timm.adapters import TwinsFPN, TwinsUPerNet
from twins_timm.models.twins import checkpoint_family_args

pytestmark = pytest.mark.slow  # the whole file: exports take minutes

# depths: 2 blocks per SVT stage keeps both window (LSA) and global (GSA) attention in every stage
SHALLOW = {'twins_pcpvt_small': [1, 1, 1, 1], 'twins_svt_small': [2, 2, 2, 2]}
SIZE_A, SIZE_B = (64, 96), (97, 130)  # not multiples of 32 or 7 * 32: padding paths run


class Features(nn.Module):
    """features_only semantics (the four NCHW maps) as a plain module to compile / export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return tuple(self.model.forward_intermediates(x, intermediates_only=True))


def backbone(variant: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return Features(timm.create_model(variant, pretrained=False, num_classes=0, depths=SHALLOW[variant],
                                      **kwargs)).eval()


def segmenter(cls, variant: str, family: str = 'mmseg') -> nn.Module:
    torch.manual_seed(0)
    args = dict(checkpoint_family_args(family, variant), depths=SHALLOW[variant])
    return cls(encoder_name=variant, classes=5, encoder_args=args).eval()


def image(size, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def has_cxx() -> bool:
    return any(shutil.which(c) for c in ('g++', 'c++', 'clang++'))


# ------------------------------------------------------------------------------- torch.compile
def test_backbone_compiles_fullgraph():
    """One graph (fullgraph=True raises on any graph break); eager backend: no compiler needed.

    SVT with the mmseg options: window padding + mask, stage norms, corner padding (PCPVT's path is
    compiled by inductor below and by the segmenter test).
    """
    torch._dynamo.reset()
    variant = 'twins_svt_small'
    model = backbone(variant, **checkpoint_family_args('mmseg', variant))
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = image(SIZE_A)
    with torch.no_grad():
        assert max_diff(compiled(x), model(x)) < 1e-5


def test_segmenter_compiles_fullgraph_aot():
    """aot_eager also traces through AOTAutograd (the graph inductor would get)."""
    torch._dynamo.reset()
    model = segmenter(TwinsUPerNet, 'twins_pcpvt_small')
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = image(SIZE_A)
    with torch.no_grad():
        out = compiled(x)
        assert out.shape == (1, 5, *SIZE_A)
        assert max_diff(out, model(x)) < 1e-4


@pytest.mark.skipif(not has_cxx(), reason='inductor needs a C++ compiler on CPU (g++ / clang++ not found)')
def test_backbone_compiles_fullgraph_inductor():
    torch._dynamo.reset()
    model = backbone('twins_pcpvt_small')
    compiled = torch.compile(model, fullgraph=True)
    x = image(SIZE_A)
    with torch.no_grad():
        assert max_diff(compiled(x), model(x)) < 1e-4


# -------------------------------------------------------------------------------- torch.export
def dynamic_hw(min_size: int = 64):
    """Height and width free in [min_size, 2048]: any value, no multiple-of rule.

    From 64 rather than 32: at 32 the last stage is 1 x 1, a size the exporter always specialises.
    """
    h = torch.export.Dim('height', min=min_size, max=2048)
    w = torch.export.Dim('width', min=min_size, max=2048)
    return {'x': {2: h, 3: w}}


CHECK_SIZES = (SIZE_A, SIZE_B)


def check_exported(exported, eager) -> None:
    module = exported.module()
    with torch.no_grad():
        for size, want in zip(CHECK_SIZES, eager):
            assert max_diff(module(image(size, batch=2)), want) < 1e-4, size


def export(model: nn.Module):
    """(the exported program, the eager outputs at CHECK_SIZES): the export and ONNX tests of a model
    share both."""
    with torch.no_grad():
        eager = [model(image(size, batch=2)) for size in CHECK_SIZES]
    return torch.export.export(model, (image(SIZE_A, batch=2),), dynamic_shapes=dynamic_hw()), eager


@pytest.fixture(scope='module')
def exported_backbone():
    return export(backbone('twins_pcpvt_small'))


@pytest.fixture(scope='module')
def exported_segmenter():
    # timm-family backbone options: mmseg's patch_padding='corner' exports as well, but its padding
    # arithmetic at every stage makes tracing ~10x slower (~1 min here)
    return export(segmenter(TwinsFPN, 'twins_pcpvt_small', family='timm'))


@pytest.fixture(scope='module')
def exported_upernet():
    # the pyramid pooling exports as matmuls with bins computed from the size: ONNX would otherwise fix
    # adaptive_avg_pool2d's kernel at the export size (right there, wrong at other sizes)
    return export(segmenter(TwinsUPerNet, 'twins_pcpvt_small', family='timm'))


def test_export_backbone_dynamic_hw(exported_backbone):
    check_exported(*exported_backbone)


def test_export_backbone_dynamic_hw_svt():
    # SVT: window tokens are gathered by computed indices, so H, W stay free. From 256: below that the
    # last stage can hold a single 7 x 7 window, a size-1 case the exporter specialises on.
    torch.manual_seed(0)
    model = Features(timm.create_model('twins_svt_small', num_classes=0, depths=[1, 1, 1, 1])).eval()
    exported = torch.export.export(model, (image((256, 288), batch=2),), dynamic_shapes=dynamic_hw(256))
    module = exported.module()
    with torch.no_grad():
        for size in ((256, 256), (257, 300), (511, 333)):
            x = image(size, batch=2)
            assert max_diff(module(x), model(x)) < 1e-4, size


def test_export_segmenter_dynamic_hw(exported_segmenter):
    check_exported(*exported_segmenter)


def test_export_upernet_dynamic_hw(exported_upernet):
    check_exported(*exported_upernet)


# -------------------------------------------------------------------------------------- ONNX
def check_onnx(exported, eager, tmp_path, name: str) -> None:
    """The exported program -> ONNX (dynamo exporter), run in onnxruntime at two sizes."""
    for mod in ('onnx', 'onnxscript', 'onnxruntime'):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f'{mod} is not installed (pip install onnx onnxscript onnxruntime)')
    import onnxruntime as ort
    path = tmp_path / f'{name}.onnx'
    torch.onnx.export(exported, (), f=str(path), dynamo=True, optimize=False)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size, want in zip(CHECK_SIZES, eager):
        got = session.run(None, {session.get_inputs()[0].name: image(size, batch=2).numpy()})
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        assert len(got) == len(want)
        assert max_diff([torch.from_numpy(g) for g in got], want) < 1e-3, size


def test_onnx_backbone_dynamic_hw(exported_backbone, tmp_path):
    check_onnx(*exported_backbone, tmp_path, 'backbone')


def test_onnx_segmenter_dynamic_hw(exported_segmenter, tmp_path):
    check_onnx(*exported_segmenter, tmp_path, 'fpn')


def test_onnx_upernet_dynamic_hw(exported_upernet, tmp_path):
    check_onnx(*exported_upernet, tmp_path, 'upernet')


def test_export_folder_svt_runs_at_any_size(tmp_path):
    """twins-timm's export of an SVT UPerNet (windows gathered by computed indices): one file for any batch and
    any H, W >= 32, multiples of 32 or of the window or not; checked against torch when it was written."""
    for mod in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(mod)
    from twins_timm.deploy.export import export_folder
    from twins_timm.deploy.runners import load_onnxruntime
    model = segmenter(TwinsUPerNet, 'twins_svt_small', family='timm')
    config = export_folder(model, tmp_path, openvino=False, source='test', log=lambda msg: None)
    assert {c['engine'] for c in config['checks']} == {'onnxruntime'} and len(config['checks']) == 2
    assert all(c['scaled_diff'] < 1e-3 for c in config['checks'])
    run = load_onnxruntime(tmp_path / 'model.onnx')
    with torch.no_grad():
        for batch, size in ((1, (32, 32)), (2, (33, 47)), (1, (230, 70))):
            x = image(size, batch=batch)
            assert max_diff(run(x), model(x)) < 1e-3, (batch, size)


# ------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize('build', [lambda: backbone('twins_svt_small'),
                                   lambda: segmenter(TwinsFPN, 'twins_svt_small')],
                         ids=['backbone', 'fpn'])
def test_channels_last_inputs(build):
    model = build()
    x = image(SIZE_A)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    with torch.no_grad():
        want = model(x)
        assert max_diff(model(x_cl), want) < 1e-5
        model.to(memory_format=torch.channels_last)  # a channels_last model too (other conv kernels)
        assert max_diff(model(x_cl), want) < 1e-4
        assert max_diff(model(x), want) < 1e-4
