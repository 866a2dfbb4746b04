""" Twins-PCPVT and Twins-SVT: timm's Twins, ready for dense prediction.

`Twins: Revisiting the Design of Spatial Attention in Vision Transformers` - https://arxiv.org/abs/2104.13840

This is timm's ``timm/models/twins.py``: the same modules, parameter names, constructor arguments
(``norm_layer``, ``block_cls``, ``act_layer``, ...) and computations, so with timm's weights the output
equals timm's Twins bit for bit. On top of it, model arguments reproduce the numerics of the other
checkpoint families (see ``checkpoint_family_args``), all off by default:
  * ``stage_norm``: a norm after every stage *inside* the trunk (official / mmseg SVT segmentation),
  * ``norm_eps``: shorthand for ``norm_layer=partial(nn.LayerNorm, eps=norm_eps)`` (mmseg: 1e-5),
  * ``window_mask``: the official segmentation window-attention mask, quirk included,
  * ``patch_padding``: ``'corner'`` zero-pads bottom/right to a patch multiple (mmseg) instead of flooring.
Also: any input size of at least ``MIN_INPUT_SIZE``, gradient checkpointing, NHWC intermediates, and a
window attention that torch.compile / torch.export trace with symbolic sizes.

CPU-inference speed-ups live outside this file: ``twins_timm.optimize(model)``.
"""
import math
import warnings
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, is_meta_device, trunc_normal_, use_fused_attn
from timm.models import (build_model_with_cfg, checkpoint, generate_default_cfgs, get_pretrained_cfg, register_model,
                         register_notrace_module)
from timm.models._features import feature_take_indices  # in that module's __all__; timm.models does not re-export it
from timm.models.vision_transformer import Attention

from twins_timm.files import hub
from twins_timm.models.families import checkpoint_family_args

__all__ = ['Twins', 'checkpoint_family_args', 'MIN_INPUT_SIZE', 'VARIANTS']

WEIGHTS_FILE = 'model.safetensors'   # what timm's Hub repos hold
# Every Twins this package registers with timm: the one list the trainer, the bench and the converter use.
VARIANTS = tuple('twins_%s_%s' % (family, size) for family in ('pcpvt', 'svt') for size in ('small', 'base', 'large'))

Size_ = Tuple[int, int]

MIN_INPUT_SIZE = 32  # the last stage needs at least one 32x32 patch
PATCH_PADDINGS = ('none', 'corner')
WINDOW_MASK_VALUE = -1000.0  # the official segmentation code's value, not -inf


def window_token_index(height: int, width: int, ws: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token of the ws x ws windows (zero padding right/bottom), window-major.

    1-D integer arithmetic on one arange: with symbolic sizes (torch.export) nothing is reshaped or
    broadcast along a size that depends on the input, so no fact about H, W has to be proven. A remainder
    by a symbolic size is written ``a - a // b * b`` (same values): ONNX export converts no other form.
    """
    gw = (width + ws - 1) // ws
    n = torch.arange((height + ws - 1) // ws * gw * ws * ws, device=device)
    window, pos = n // (ws * ws), n % (ws * ws)
    return window // gw * ws + pos // ws, (window - window // gw * gw) * ws + pos % ws


def window_attn_mask(
        height: int, width: int, ws: int, device: torch.device, dtype: torch.dtype,
        mask_value: float = WINDOW_MASK_VALUE,
) -> torch.Tensor:
    """Additive (num_windows, L, L) mask of the official segmentation code for a map padded to ``ws``.

    Pairs where exactly one token is padding get -1000, but only when both height and width are padded:
    the original builds its mask with ``[-pad:]`` slices, and ``[-0:]`` marks every token, which makes
    the mask uniform (plain zero padding) whenever either pad is 0. Built from comparisons, with no
    Python branch on the sizes, so it also traces with symbolic shapes (torch.export).
    """
    rows, cols = window_token_index(height, width, ws, device)
    pad_row, pad_col = rows >= height, cols >= width
    pad = ((pad_row | pad_col) & (pad_row.any() & pad_col.any())).unflatten(0, (-1, ws * ws))
    differs = pad.unsqueeze(-2) != pad.unsqueeze(-1)
    return torch.zeros(differs.shape, device=device, dtype=dtype).masked_fill_(differs, mask_value)


@register_notrace_module  # FX can't trace the shape-dependent padding
class LocallyGroupedAttn(nn.Module):
    """LSA: self attention inside non-overlapping ws x ws windows (zero padding right/bottom), as timm's.

    ``window_mask``: the official segmentation code's additive mask between padding and real tokens.
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            ws: int = 1,
            window_mask: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        assert ws != 1
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divided by num_heads {num_heads}."
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.window_mask = window_mask
        self.qkv = nn.Linear(dim, dim * 3, bias=True, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ws = ws

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if torch.compiler.is_compiling():  # symbolic sizes possible
            return self._forward_traced(x, size)
        B, N, C = x.shape
        H, W = size
        ws = self.ws
        x = x.view(B, H, W, C)
        pad_r = (ws - W % ws) % ws
        pad_b = (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # padded tokens get qkv = bias and take part, as in the original
        _, Hp, Wp, _ = x.shape
        _h, _w = Hp // ws, Wp // ws
        x = x.reshape(B, _h, ws, _w, ws, C).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, _h * _w, ws * ws, 3, self.num_heads, C // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)
        mask: Optional[torch.Tensor] = None
        if self.window_mask and pad_r > 0 and pad_b > 0:  # the mask is uniform (no mask) otherwise
            mask = window_attn_mask(H, W, ws, x.device, q.dtype).unsqueeze(1)
        x = self._attend(q, k, v, mask)
        x = x.transpose(2, 3).reshape(B, _h, _w, ws, ws, C)
        x = x.transpose(2, 3).reshape(B, _h * ws, _w * ws, C)
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        x = x.reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v over the last two dims: timm's SDPA call or its explicit path."""
        if self.fused_attn:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    @torch.jit.unused
    def _forward_traced(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        """The same computation for torch.compile / torch.export, where H and W may be symbolic.

        Tokens move between the map and the windows by gathers with computed indices, and reshapes only
        split off static sizes, so the exporter needs no divisibility facts about H and W.
        """
        B, N, C = x.shape
        H, W = size
        ws, nh = self.ws, self.num_heads
        dev = x.device
        rows, cols = window_token_index(H, W, ws, dev)
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, ws - 1, 0, ws - 1))  # zero tokens past the bottom/right
        num_windows = ((H + ws - 1) // ws) * ((W + ws - 1) // ws)
        n = torch.arange(num_windows, device=dev)[:, None] * (ws * ws) + torch.arange(ws * ws, device=dev)
        x = x[:, rows[n], cols[n]]  # (B, nW, L, C): indexed into shape, no reshape of a symbolic size
        qkv = self.qkv(x).unflatten(-1, (3, nh, C // nh))  # (B, nW, L, 3, nh, d)
        # (B * nW, nh, L, d): attention on 4-D tensors, the rank ONNX's attention takes
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).flatten(1, 2).unbind(0)
        mask = None
        if self.window_mask:
            mask = window_attn_mask(H, W, ws, dev, q.dtype).unsqueeze(1).repeat(B, 1, 1, 1)  # (B * nW, 1, L, L)
        x = self._attend(q, k, v, mask).unflatten(0, (B, -1)).transpose(2, 3).flatten(-2)  # (B, nW, L, C)
        t = torch.arange(H * W, device=dev)
        h = t // W
        w = t - h * W  # t % W, in the form ONNX export converts (window_token_index)
        x = x[:, h // ws * ((W + ws - 1) // ws) + w // ws, h % ws * ws + w % ws]  # (B, H*W, C)
        return self.proj_drop(self.proj(x))


class GlobalSubSampleAttn(nn.Module):
    """GSA: every token attends to a spatially sub-sampled (sr x sr patch conv) summary of the map."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sr_ratio: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divided by num_heads {num_heads}."
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=True, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=True, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)  # eps 1e-5 in every checkpoint family
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        if self.sr is not None:
            x = x.permute(0, 2, 1).reshape(B, C, size[0], size[1])
            x = self.sr(x).reshape(B, C, -1).permute(0, 2, 1)
            x = self.norm(x)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    """Pre-norm transformer block: windowed (LSA, ws > 1), global sub-sampled (GSA, ws 1) or full attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            sr_ratio: int = 1,
            ws: Optional[int] = None,
            window_mask: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        if ws is None:
            # timm's line, as broken as in timm 1.0.31 (no Twins variant builds it): its positional
            # arguments miss the newer Attention's signature, whose forward takes no size
            self.attn = Attention(dim, num_heads, False, None, attn_drop, proj_drop, **dd)
        elif ws == 1:
            self.attn = GlobalSubSampleAttn(dim, num_heads, attn_drop, proj_drop, sr_ratio, **dd)
        else:
            self.attn = LocallyGroupedAttn(dim, num_heads, attn_drop, proj_drop, ws, window_mask, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PosConv(nn.Module):
    """PEG (https://arxiv.org/abs/2102.10882): depthwise 3x3 conv + residual."""

    def __init__(self, in_chans: int, embed_dim: int = 768, stride: int = 1, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 3, stride, 1, bias=True, groups=embed_dim, **dd),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        B, N, C = x.shape
        cnn_feat_token = x.transpose(1, 2).view(B, C, size[0], size[1])
        x = self.proj(cnn_feat_token)
        if self.stride == 1:
            x += cnn_feat_token
        x = x.flatten(2).transpose(1, 2)
        return x

    def no_weight_decay(self):
        return ['proj.%d.weight' % i for i in range(4)]


class PatchEmbed(nn.Module):
    """Patch embedding (conv kernel == stride, then LayerNorm eps 1e-5): NCHW map in, (B, N, C) tokens out.

    ``padding='corner'`` zero-pads bottom/right to a patch multiple first (mmseg); 'none' floors (timm).
    """

    def __init__(
            self,
            patch_size: int = 4,
            in_chans: int = 3,
            embed_dim: int = 768,
            padding: str = 'none',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.padding = padding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Size_]:
        if self.padding == 'corner':
            # p - 1 zeros right / bottom: the conv (kernel = stride = p) then gives ceil(W / p) outputs, the same
            # values as padding to a multiple of p, and sizes as plain floor divisions (export: 4x faster to trace)
            p = self.patch_size[0]
            x = F.pad(x, (0, p - 1, 0, p - 1))
        x = self.proj(x)
        out_size = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = self.norm(x)
        return x, out_size


class Twins(nn.Module):
    """Twins Vision Transformer (Revisiting Spatial Attention), timm's, for any input size.

    Adapted from PVT (PyramidVisionTransformer) class at https://github.com/whai362/PVT.git
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            num_heads: Tuple[int, ...] = (1, 2, 4, 8),
            mlp_ratios: Tuple[float, ...] = (4, 4, 4, 4),
            depths: Tuple[int, ...] = (3, 4, 6, 3),
            sr_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            wss: Optional[Tuple[int, ...]] = None,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            block_cls: Any = Block,
            act_layer: Optional[Type[nn.Module]] = None,
            norm_eps: Optional[float] = None,
            stage_norm: bool = False,
            window_mask: bool = False,
            patch_padding: str = 'none',
            device=None,
            dtype=None,
    ):
        """
        Args (beyond timm's Twins; ``img_size`` is accepted and unused: any input size works):
            norm_layer: norm of the blocks, the final norm and the stage norms (default timm's
                ``partial(nn.LayerNorm, eps=1e-6)``). Patch-embed and attention-reduction norms are
                LayerNorm eps 1e-5 in every family.
            act_layer: the MLPs' activation (default the block's, nn.GELU).
            norm_eps: shorthand for ``norm_layer=partial(nn.LayerNorm, eps=norm_eps)`` (a number, so
                that config files can hold it); not with ``norm_layer``.
            stage_norm: a norm after each stage, inside the trunk (the normed map feeds the next stage).
            window_mask: apply the official segmentation window mask in LSA blocks (SVT).
            patch_padding: 'none' (floor, timm) or 'corner' (zero-pad bottom/right, mmseg).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('', 'avg'):
            raise ValueError(f"global_pool must be 'avg' or '' for Twins, got {global_pool!r}")
        if patch_padding not in PATCH_PADDINGS:
            raise ValueError(f'patch_padding must be one of {PATCH_PADDINGS}, got {patch_padding!r}')
        if norm_eps is not None and norm_layer is not None:
            raise ValueError('give Twins norm_layer or norm_eps, not both (norm_eps makes a LayerNorm)')
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6 if norm_eps is None else norm_eps)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.depths = depths
        self.embed_dims = embed_dims
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.patch_embeds = nn.ModuleList()
        self.pos_drops = nn.ModuleList()
        prev_chs = in_chans
        for i in range(len(depths)):
            self.patch_embeds.append(PatchEmbed(patch_size, prev_chs, embed_dims[i], patch_padding, **dd))
            self.pos_drops.append(nn.Dropout(p=pos_drop_rate))
            prev_chs = embed_dims[i]
            patch_size = 2

        # options only a block that knows them gets: timm's own Block works as block_cls
        block_args = dict(act_layer=act_layer) if act_layer is not None else {}
        if window_mask:
            block_args['window_mask'] = True
        self.blocks = nn.ModuleList()
        self.feature_info = []
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # linear stochastic depth decay
        cur = 0
        for k in range(len(depths)):
            self.blocks.append(nn.ModuleList([block_cls(
                dim=embed_dims[k],
                num_heads=num_heads[k],
                mlp_ratio=mlp_ratios[k],
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[cur + i],
                norm_layer=norm_layer,
                sr_ratio=sr_ratios[k],
                ws=1 if wss is None or i % 2 == 1 else wss[k],
                **block_args,
                **dd,
            ) for i in range(depths[k])]))
            self.feature_info += [dict(module=f'blocks.{k}', num_chs=embed_dims[k], reduction=2 ** (2 + k))]
            cur += depths[k]

        self.pos_block = nn.ModuleList([PosConv(d, d, **dd) for d in embed_dims])
        # Identity where a family has no stage norms: no parameters, one loop for every family
        self.stage_norms = nn.ModuleList([norm_layer(d, **dd) if stage_norm else nn.Identity() for d in embed_dims])
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if not is_meta_device(device):  # meta tensors hold no values: the init would only cost time
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(['pos_block.' + n for n, p in self.pos_block.named_parameters()])

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embeds.0',
            blocks=[
                (r'^(?:blocks|patch_embeds|pos_block|stage_norms)\.(\d+)', None),
                ('^norm', (99999,)),
            ] if coarse else [
                (r'^blocks\.(\d+)\.(\d+)', None),
                (r'^(?:patch_embeds|pos_block)\.(\d+)', (0,)),
                (r'^stage_norms\.(\d+)', (99998,)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Re-compute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be 'avg' or '' for Twins, got {global_pool!r}")
            self.global_pool = global_pool
        ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.parameters())
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor):
        """Fail early, with what is expected, instead of deep inside a reshape (eager calls only).

        FX traces a Proxy, whose sizes are not known: nothing to check then.
        """
        if isinstance(x, torch.fx.Proxy):
            return
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = f'shape {tuple(x.shape)}' if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'Twins expects a 4-D image batch (B, {self.in_chans}, H, W), got {got}.')
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f'Twins expects {self.in_chans} input channels (B, {self.in_chans}, H, W), got shape '
                f'{tuple(x.shape)}; for channels-last images permute with x.permute(0, 3, 1, 2).')
        if not x.is_floating_point():
            raise ValueError(
                f'Twins expects a floating point image tensor, got {x.dtype}; convert and normalise it '
                f'first, e.g. (x.float() / 255 - mean) / std.')
        if x.shape[-2] < MIN_INPUT_SIZE or x.shape[-1] < MIN_INPUT_SIZE:
            raise ValueError(
                f'Twins needs H and W of at least {MIN_INPUT_SIZE} pixels (output stride 32), '
                f'got {x.shape[-2]}x{x.shape[-1]}; resize or pad the image.')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor (B, C, H, W), any H, W >= 32
            indices: Take last n stages if int, all if None, select matching indices if sequence
            norm: Apply the final norm to the last stage's intermediate (the only one it is sized for)
            stop_early: Stop iterating over stages when last desired intermediate hit
            output_fmt: 'NCHW' or 'NHWC'
            intermediates_only: Only return intermediate features
        """
        if output_fmt not in ('NCHW', 'NHWC'):  # no f-string: TorchScript compiles this method
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC', got " + output_fmt)
        if not torch.jit.is_scripting():
            self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        last_idx = len(self.blocks) - 1
        if torch.jit.is_scripting() or not stop_early:  # can't slice module lists in torchscript
            patch_embeds = self.patch_embeds  # one module list per statement: TorchScript iterates them then
            pos_drops = self.pos_drops
            stages = self.blocks
            pos_blocks = self.pos_block
            stage_norms = self.stage_norms
        else:
            patch_embeds = self.patch_embeds[:max_index + 1]
            pos_drops = self.pos_drops[:max_index + 1]
            stages = self.blocks[:max_index + 1]
            pos_blocks = self.pos_block[:max_index + 1]
            stage_norms = self.stage_norms[:max_index + 1]

        i = 0
        for i, (embed, drop, blocks, pos_blk, stage_norm) in enumerate(zip(
                patch_embeds, pos_drops, stages, pos_blocks, stage_norms)):
            x, size = embed(x)
            x = drop(x)
            for j, blk in enumerate(blocks):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, size)
                else:
                    x = blk(x, size)
                if j == 0:
                    x = pos_blk(x, size)  # PEG here
            x = stage_norm(x)
            if i < last_idx:  # tokens are kept for the last (kept) stage, as the head expects
                x = self._stage_map(x, size)  # the next stage's input and the feature handed out
                feat = x
            else:  # only the last feature can be normed
                feat = self._stage_map(self.norm(x) if norm else x, size)
            if i in take_indices:
                intermediates.append(feat if output_fmt == 'NCHW' else feat.permute(0, 2, 3, 1))

        if intermediates_only:
            return intermediates
        if i == last_idx:
            x = self.norm(x)  # tokens (B, N, C), as forward_features returns them
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Prune layers not required for specified intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        prune_end = max_index < len(self.blocks) - 1
        self.patch_embeds = self.patch_embeds[:max_index + 1]
        self.pos_drops = self.pos_drops[:max_index + 1]
        self.blocks = self.blocks[:max_index + 1]
        self.pos_block = self.pos_block[:max_index + 1]
        self.stage_norms = self.stage_norms[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage tokens (B, N, C) after the final norm, as timm's Twins returns them."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        last_idx = len(self.blocks) - 1
        for i, (embed, drop, blocks, pos_blk, stage_norm) in enumerate(zip(
                self.patch_embeds, self.pos_drops, self.blocks, self.pos_block, self.stage_norms)):
            x, size = embed(x)
            x = drop(x)
            for j, blk in enumerate(blocks):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, size)
                else:
                    x = blk(x, size)
                if j == 0:
                    x = pos_blk(x, size)  # PEG here
            x = stage_norm(x)
            if i < last_idx:  # tokens are kept for the last (kept) stage, as the head expects
                x = self._stage_map(x, size)
        return self.norm(x)

    def _stage_map(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        """Tokens (B, N, C) -> the NCHW map the next stage (and a feature) takes: timm's contiguous copy."""
        return x.reshape(x.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Twins) -> Dict[str, torch.Tensor]:
    """Unwrap training-script checkpoints; timm and official classification names load as they are.

    Other families (official segmentation, mmsegmentation) go through ``twins_timm.convert``.
    """
    for wrapper in ('model', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    if any(k.startswith(('encoder.model.', 'segmentation_head.')) for k in state_dict):
        where = (getattr(model, 'pretrained_cfg', None) or {}).get('file') or 'these weights'
        raise ValueError(f'{where} holds a twins_timm segmenter (TwinsUPerNet / TwinsFPN), not a timm backbone: '
                         f'load it with twins_timm.adapters.from_pretrained({str(where)!r}) (its backbone is '
                         f'model.encoder.model)')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _hub_weights(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The kwargs of ``timm.create_model(variant, pretrained=True)`` with timm's ImageNet weights found by
    ``twins_timm.files.hub``: the local Hugging Face cache first; offline, a clear error at once; else one
    watched download. (timm's own path retries the Hub for a minute without internet, ignores
    TWINS_TIMM_OFFLINE and ends in a traceback.) Weights the caller chose (a file, URL, state dict, another
    pretrained_cfg, cache_dir) are left to timm."""
    cfg, overlay = kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay') or {}
    name = '%s.%s' % (variant, cfg or 'in1k') if isinstance(cfg, (str, type(None))) else None
    tagged = get_pretrained_cfg(name, allow_unregistered=False) if name else None
    if (tagged is None or not tagged.hf_hub_id or kwargs.get('cache_dir')
            or any(overlay.get(k) for k in ('file', 'url', 'state_dict', 'hf_hub_id', 'source'))):
        return kwargs
    folder = hub.snapshot(tagged.hf_hub_id, ['config.json', WEIGHTS_FILE], what=name,
                          remedy=hub.manual_steps(tagged.hf_hub_id, name), needs=WEIGHTS_FILE)
    return dict(kwargs, pretrained_cfg_overlay=dict(overlay, file=str(folder / WEIGHTS_FILE)))


def _create_twins(variant: str, pretrained: bool = False, **kwargs) -> Twins:
    if pretrained:  # timm's ImageNet weights: the local cache first, offline a clear error at once
        kwargs = _hub_weights(variant, kwargs)
    out_indices = kwargs.pop('out_indices', 4)
    return build_model_with_cfg(
        Twins, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embeds.0.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs
    }


def _register(fn: Callable[..., Twins]) -> Callable[..., Twins]:
    """timm's ``register_model``, quiet: replacing timm's own Twins under the same names is the point of this
    module, not a conflict worth a warning, however the module is reached."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'Overwriting twins_', category=UserWarning)
        return register_model(fn)


# timm's own pretrained tags: `pretrained=True` fetches timm's hub weights into this implementation.
default_cfgs = generate_default_cfgs({
    'twins_pcpvt_small.in1k': _cfg(hf_hub_id='timm/'),
    'twins_pcpvt_base.in1k': _cfg(hf_hub_id='timm/'),
    'twins_pcpvt_large.in1k': _cfg(hf_hub_id='timm/'),
    'twins_svt_small.in1k': _cfg(hf_hub_id='timm/'),
    'twins_svt_base.in1k': _cfg(hf_hub_id='timm/'),
    'twins_svt_large.in1k': _cfg(hf_hub_id='timm/'),
})


@_register
def twins_pcpvt_small(pretrained: bool = False, **kwargs) -> Twins:
    model_args = dict(
        patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
        depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1])
    return _create_twins('twins_pcpvt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@_register
def twins_pcpvt_base(pretrained: bool = False, **kwargs) -> Twins:
    model_args = dict(
        patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
        depths=[3, 4, 18, 3], sr_ratios=[8, 4, 2, 1])
    return _create_twins('twins_pcpvt_base', pretrained=pretrained, **dict(model_args, **kwargs))


@_register
def twins_pcpvt_large(pretrained: bool = False, **kwargs) -> Twins:
    model_args = dict(
        patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
        depths=[3, 8, 27, 3], sr_ratios=[8, 4, 2, 1])
    return _create_twins('twins_pcpvt_large', pretrained=pretrained, **dict(model_args, **kwargs))


@_register
def twins_svt_small(pretrained: bool = False, **kwargs) -> Twins:
    model_args = dict(
        patch_size=4, embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[4, 4, 4, 4],
        depths=[2, 2, 10, 4], wss=[7, 7, 7, 7], sr_ratios=[8, 4, 2, 1])
    return _create_twins('twins_svt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@_register
def twins_svt_base(pretrained: bool = False, **kwargs) -> Twins:
    model_args = dict(
        patch_size=4, embed_dims=[96, 192, 384, 768], num_heads=[3, 6, 12, 24], mlp_ratios=[4, 4, 4, 4],
        depths=[2, 2, 18, 2], wss=[7, 7, 7, 7], sr_ratios=[8, 4, 2, 1])
    return _create_twins('twins_svt_base', pretrained=pretrained, **dict(model_args, **kwargs))


@_register
def twins_svt_large(pretrained: bool = False, **kwargs) -> Twins:
    model_args = dict(
        patch_size=4, embed_dims=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], mlp_ratios=[4, 4, 4, 4],
        depths=[2, 2, 18, 2], wss=[7, 7, 7, 7], sr_ratios=[8, 4, 2, 1])
    return _create_twins('twins_svt_large', pretrained=pretrained, **dict(model_args, **kwargs))
