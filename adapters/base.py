"""What TwinsUPerNet and TwinsFPN share: encoder, metadata, input checks, forward, model card.

Both are SMP `SegmentationModel`s (hub mixin: save_pretrained / from_pretrained / push_to_hub).
Their forward is mmseg's whole-image inference: logits are resized bilinearly
(`align_corners=False`) to the input size, which may be any H x W >= 32 (no divisible-by-32
check: the Twins backbone and the heads handle any size).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from huggingface_hub import ModelCard
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base import initialization as init
from segmentation_models_pytorch.base.modules import Activation

from twins_timm.adapters import ade20k
from twins_timm.adapters.card import model_card
from twins_timm.adapters.config import MAX_CLASSES, check_config
from twins_timm.adapters.encoder import TwinsEncoder
from twins_timm.adapters.loss import AUX_WEIGHT, MAIN_WEIGHT
from twins_timm.adapters.modules import FCNHead, fold_batchnorm, resize
from twins_timm.files.atomic import honour_umask
from twins_timm.files.checkpoint import load_file
from twins_timm.models.twins import MIN_INPUT_SIZE

MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)
AUX_STAGE = 2  # mmseg's auxiliary FCNHead reads stage 3 (in_index=2)

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def default_class_names(classes: int) -> List[str]:
    """ADE20K's names for 150 classes (the published models), else class_0, class_1, ..."""
    if classes == len(ade20k.CLASSES):
        return list(ade20k.CLASSES)
    return [f'class_{i}' for i in range(classes)]


def default_palette(classes: int) -> List[List[int]]:
    """ADE20K's palette for 150 classes, else a fixed pseudo-random one (same on every run)."""
    if classes == len(ade20k.PALETTE):
        return [list(c) for c in ade20k.PALETTE]
    gen = torch.Generator().manual_seed(classes)
    return torch.randint(0, 256, (classes, 3), generator=gen, device='cpu').tolist()


def _checked_metadata(classes: int, class_names: Optional[Sequence[str]],
                      palette: Optional[Sequence[Sequence[int]]],
                      mean: Sequence[float], std: Sequence[float]):
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f'classes must be an integer from 1 to {MAX_CLASSES}, got {classes!r}')
    names = default_class_names(classes) if class_names is None else [str(n) for n in class_names]
    if len(names) != classes:
        raise ValueError(f'class_names has {len(names)} entries but classes={classes}; '
                         'give one name per class (or leave class_names out)')
    colours = default_palette(classes) if palette is None else [list(map(int, c)) for c in palette]
    if len(colours) != classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c)
                                      for c in colours):
        raise ValueError(f'palette must hold {classes} RGB triples with values 0-255 '
                         '(or leave palette out)')
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f'mean and std must be 3 values each (std > 0) on 0-255 RGB, '
                         f'got mean={mean!r}, std={std!r}')
    return names, colours, tuple(float(m) for m in mean), tuple(float(s) for s in std)


class TwinsSegmentationModel(SegmentationModel):
    """Base class; build a `TwinsUPerNet` or `TwinsFPN`.

    Eval mode: `model(x)` -> logits (B, classes, H, W) for a normalised (B, 3, H, W) batch.
    Train mode: `(logits, aux_logits)` when the model has an auxiliary head, else `logits`;
    mmseg weighs the two cross-entropy losses 1.0 and 0.4 (`loss_weights`, see `mmseg_loss`).
    Multi-GPU (DDP under torchrun): `timm.layers.convert_sync_batchnorm(model)` before wrapping (the
    heads are timm `ConvNormAct`s, BN + ReLU in one module), as mmseg's SyncBN configs train; `set_grad_checkpointing()` saves backbone memory.

    Arguments shared by TwinsUPerNet and TwinsFPN:
        encoder_name: 'twins_{pcpvt,svt}_{small,base,large}'.
        classes: number of output classes (ADE20K: 150).
        encoder_args: backbone options, e.g.
            `twins_timm.models.twins.checkpoint_family_args('mmseg', encoder_name)`.
        aux_head: mmseg's auxiliary FCNHead on stage 3 (training only; `aux_channels` wide).
        encoder_weights: True loads timm's ImageNet backbone weights (download); None: random.
        in_channels: input channels.
        decoder_dropout: Dropout2d before the classifier (mmseg: 0.1).
        class_names, palette: per-class names and RGB colours (default: ADE20K's for 150
            classes); stored in config.json for inference tools.
        mean, std: input normalisation on 0-255 RGB (default: mmseg's).
        activation: optional activation on the logits, as in SMP (None: raw logits).
    """

    # The keep-ratio test resize (long, short) the model was trained for, saved in config.json as 'test_scale'
    # (`twins-timm train` sets it; `eval` / `segment` use it unless --scale). None: ADE20K's 2048x512.
    test_scale: Optional[Tuple[int, int]] = None
    requires_divisible_input_shape = False
    _is_torch_scriptable = False
    loss_weights = (MAIN_WEIGHT, AUX_WEIGHT)
    model_type = ''

    def _build_common(self, encoder_name: str, encoder_weights: Optional[Union[bool, str]],
                      encoder_args: Optional[Dict[str, Any]], in_channels: int, classes: int,
                      class_names: Optional[Sequence[str]],
                      palette: Optional[Sequence[Sequence[int]]],
                      mean: Sequence[float], std: Sequence[float],
                      activation: Optional[Union[str, Callable]]) -> None:
        names, colours, self.mean, self.std = _checked_metadata(
            classes, class_names, palette, mean, std)
        self.classes = classes
        self.class_names = names
        self.palette = colours
        self.encoder_name = encoder_name
        self.encoder_args = dict(encoder_args or {})
        self.encoder = TwinsEncoder(encoder_name, in_channels=in_channels,
                                    weights=encoder_weights, **self.encoder_args)
        self.activation = Activation(activation)
        self.classification_head = None
        self.name = f'{self.model_type}-{encoder_name}'
        config = self._hub_mixin_config
        if isinstance(config, dict):  # config.json carries what inference tools need
            config.update(class_names=names, palette=colours,
                          mean=list(self.mean), std=list(self.std),
                          encoder_args=dict(self.encoder_args),
                          encoder_weights=None,  # saved weights already hold the encoder
                          # for timm's local-dir: / hf-hub: loader, which then says this is a segmenter
                          # (twins_timm.models.twins.checkpoint_filter_fn) instead of a KeyError
                          architecture=encoder_name, pretrained_cfg={})

    def _build_aux_head(self, enabled: bool, channels: int, dropout: float) -> None:
        self.aux_head = None
        if enabled:
            in_channels = self.encoder.stage_channels[AUX_STAGE]
            self.aux_head = FCNHead(in_channels, self.classes, channels, dropout=dropout)

    def initialize(self) -> None:
        if next(self.parameters()).is_meta:  # built on the meta device: no values to initialise
            return
        super().initialize()
        if self.aux_head is not None:
            init.initialize_decoder(self.aux_head.convs)
            init.initialize_head(self.aux_head.conv_seg)

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Any size from 32 x 32 up (no divisible-by-32 rule: the model does not need one)."""
        if x.ndim != 4:
            raise ValueError(f'expected a (B, C, H, W) batch, got shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise ValueError(
                f'{type(self).__name__} expects a normalised float image, got {x.dtype}; from 0-255 RGB use '
                f'(x.float() - mean) / std with this model\'s mean={list(self.mean)} and std={list(self.std)} '
                f'(model.mean / model.std, on the 0-255 scale: do not divide by 255 first)')
        h, w = x.shape[-2:]
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
            raise ValueError(f'input {h}x{w} is too small: height and width must be at least '
                             f'{MIN_INPUT_SIZE}; resize or pad the image')

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the backbone (trades compute for activation memory)."""
        self.encoder.set_grad_checkpointing(enable)

    def fold_batchnorm(self) -> 'TwinsSegmentationModel':
        """Fold the heads' eval BatchNorms into their convs, once (inference deployment; see `modules`).

        Same logits within rounding, one full-size pass less per conv block. Save before folding:
        the folded model has no `.bn.*` weights.
        """
        return fold_batchnorm(self)

    def forward(self, x: torch.Tensor) -> Outputs:
        """Logits at the input size; in training also the auxiliary logits if there is a head."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            self.check_input_shape(x)
        size = x.shape[-2:]
        features = self.encoder(x)
        logits = resize(self.segmentation_head(self.decoder(features)), size)
        logits = self.activation(logits)
        if self.training and self.aux_head is not None:
            stage = features[-4:][AUX_STAGE]
            aux = self.activation(resize(self.aux_head(stage), size))
            return logits, aux
        return logits

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> Any:
        """SMP's save_pretrained; the written files then get the modes the umask gives.

        (safetensors writes model.safetensors 0600, unreadable for a container running as another user.)
        config.json is checked first by the rules `from_pretrained` applies (`twins_timm.adapters.config`),
        so what is saved loads back.
        """
        self.config.pop('test_scale', None)
        if self.test_scale is not None:
            self.config['test_scale'] = list(_checked_test_scale(self.test_scale))
        as_json = json.loads(json.dumps(dict(self.config, _model_class=type(self).__name__), default=repr))
        check_config(as_json, f'save_pretrained({str(save_directory)!r})')
        result = super().save_pretrained(save_directory, *args, **kwargs)
        for name in ('config.json', 'model.safetensors', 'README.md'):
            path = os.path.join(save_directory, name)
            if os.path.isfile(path):
                honour_umask(path)
        return result

    @classmethod
    def _from_pretrained(cls, *, config: Optional[Dict[str, Any]] = None, **kwargs: Any) -> 'TwinsSegmentationModel':
        """The hub mixin's loading, with the model built on the meta device and the file's tensors adopted:
        no random init to throw away (SVT-L UPerNet from a folder: 1.5 s -> 0.1 s on 2 CPU cores).

        ``config`` (the mixin hands it over because this signature names it) is the folder's config.json as
        read, checked here before anything is built: only the keys twins_timm defines may pass (a ConfigError).
        If the file leaves some tensor unset (``strict=False`` with keys missing), the mixin's own way
        runs instead: random init, then the file's weights over it.
        """
        if config is not None:
            check_config(config, kwargs['model_id'])
        test_scale = _checked_test_scale((config or {}).get('test_scale'))
        try:
            with torch.device('meta'):
                model = super()._from_pretrained(**kwargs)
        except _PartialStateDict:
            model = super()._from_pretrained(**kwargs)
        model.test_scale = test_scale
        return model

    @classmethod
    def _load_as_safetensor(cls, model: 'TwinsSegmentationModel', model_file: str, map_location: str,
                            strict: bool) -> 'TwinsSegmentationModel':
        return _load_state(model, model_file, map_location, strict)

    @classmethod
    def _load_as_pickle(cls, model: 'TwinsSegmentationModel', model_file: str, map_location: str,
                        strict: bool) -> 'TwinsSegmentationModel':
        return _load_state(model, model_file, map_location, strict)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card ``save_pretrained`` writes, by the package's one card writer (``adapters.card``): how to
        load with twins_timm (plain SMP does not know the class), and where the weights come from when
        ``model_card_kwargs`` carries a ``provenance`` (``twins-timm convert`` passes one)."""
        return model_card(True, kwargs.get('provenance'), model=self, metrics=kwargs.get('metrics'),
                          dataset=kwargs.get('dataset'))


MAX_TEST_SIDE = 16384  # a test scale beyond this is a typo, not a resize to run


def _checked_test_scale(value: Any) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_TEST_SIDE for v in value)):
        raise ValueError(f'test_scale must be two positive integers up to {MAX_TEST_SIDE} (long side, short side), '
                         f'got {value!r}')
    return int(value[0]), int(value[1])


class _PartialStateDict(Exception):
    """A meta-built model that the weights file did not fill completely."""


class WeightsError(ValueError):
    """A weights file that does not fit its model (keys, shapes) or holds NaN / infinite values."""


def _few(items: Sequence[str], n: int = 3) -> str:
    return ', '.join(items[:n]) + (', ...' if len(items) > n else '')


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: one NaN classifier bias labels every pixel with that class."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f'{source} holds NaN or infinite values in {len(bad)} tensor(s) ({_few(bad)}), so the '
                           'model\'s output would mean nothing; the file is damaged or the training diverged: use '
                           'another copy of the weights')


def check_weights(model: torch.nn.Module, state: Any, strict: bool, source: str) -> None:
    """Refuse, before a tensor is adopted, weights whose keys (``strict``) or shapes differ from ``model``'s
    (built from config.json), or that are not finite."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f'{source} holds no state dict of tensors; it is not a saved twins_timm segmenter')
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    wrong = [f'{k} {tuple(v.shape)} where the model has {expected[k]}' for k, v in state.items()
             if k in expected and tuple(v.shape) != expected[k]]
    if wrong:
        problems.append(f'{len(wrong)} tensor(s) of another shape: {_few(wrong)}')
    missing = [k for k in expected if k not in state] if strict else []
    if missing:
        problems.append(f'{len(missing)} tensor(s) missing: {_few(missing)}')
    unexpected = [k for k in state if k not in expected] if strict else []
    if unexpected:
        problems.append(f'{len(unexpected)} tensor(s) the model does not have: {_few(unexpected)}')
    if problems:
        raise WeightsError(f'{source} does not fit the model its config.json describes ({"; ".join(problems)}); '
                           'the weights and config.json come from different models or one was edited: save or '
                           'convert the model again')
    check_finite(state, source)


def _load_state(model: torch.nn.Module, model_file: str, map_location: Union[str, torch.device],
                strict: bool) -> torch.nn.Module:
    """``model_file``'s weights, read without running code (``files.checkpoint``) and checked (``check_weights``),
    into ``model`` in eval mode. A model built on the meta device adopts a copy of each tensor in
    the dtype it was built with (as an ordinary load casts). A copy: torch's allocator aligns it to 64 bytes,
    where safetensors' tensors sit at any 4-byte offset, and the CPU kernels take other paths on those (not
    the bits of the saved model's output); and no loaded weight stays tied to a file."""
    state = load_file(model_file)
    check_weights(model, state, strict, model_file)
    if not next(model.parameters()).is_meta:
        model.load_state_dict(state, strict=strict)
        return model.eval()
    with torch.device(map_location):  # leave the caller's meta default behind for what loading creates
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        state = {k: v.to(map_location, dtypes[k] if k in dtypes and v.is_floating_point() else v.dtype, copy=True)
                 for k, v in state.items()}
        model.load_state_dict(state, strict=strict, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise _PartialStateDict
    return model.eval()
