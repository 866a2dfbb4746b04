"""CPU-inference kernels for the Twins backbone and its segmentation heads, chosen by measurement.

Used by the layers ``twins_timm.optimize`` swaps in (``layers.py``); nothing here is on the plain model's
path. Each choice is between timm's call (``F.linear``, ``F.scaled_dot_product_attention``, the whole
tensor at once; 'plain') and another computation of the same function: the product as a oneDNN 1x1
convolution ('onednn'), the MLP over cache-sized row chunks ('rows'), SVT's window attention over
chunks of windows ('windows'), a 3x3 conv by Winograd F(2x2, 3x3) ('winograd'). A :class:`KernelTable`
holds one model's choices: measured on first use of a shape ('auto': both candidates timed interleaved
on the layer's own weights; the other is taken only when at least ``MARGIN`` faster), fixed ('plain',
'onednn': every choice the other candidate), or a table saved from ``table.choices`` (JSON), which
makes runs reproducible; shapes a saved table lacks take 'plain', untimed.

Restructured calls are taken only when the modules involved carry no forward hooks (``has_hooks``), so
hooks always see the full tensors. Under ``torch.compile`` in CPU inference the linear layers trace
the kernel measured for them (``compiled_linear_kernel``). Nothing here runs on a GPU.

Private torch APIs used: ``torch.nn.modules.module._global_forward_hooks`` / ``_global_forward_pre_hooks``
(``has_hooks``), ``torch.ops.mkldnn._reorder_convolution_weight`` / ``_convolution_pointwise`` (what
inductor's freezing runs, timed for compiled graphs) and ``torch._inductor.config.freezing`` (read
through ``sys.modules``, never imported here).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as module_mod

__all__ = [
    'KernelTable', 'fast_inference', 'compiled_inference', 'linear', 'compiled_linear_kernel', 'attention',
    'has_hooks', 'row_chunks', 'mlp_kernel', 'chunked_window_attention', 'window_attention', 'conv3x3',
    'winograd_conv3x3', 'winograd_weight', 'onednn_linear', 'onednn_attention',
]

PLAIN = 'plain'    # what timm calls: F.linear / F.scaled_dot_product_attention
ONEDNN = 'onednn'  # the same product as a oneDNN (1x1) convolution
ROWS = 'rows'      # the inference MLP over cache-sized row chunks instead of the whole tensor
WINDOWS = 'windows'  # SVT's window attention over cache-sized chunks of windows instead of all at once
WINOGRAD = 'winograd'  # a 3x3 convolution by Winograd F(2x2, 3x3)
MARGIN = 0.05      # oneDNN must be this much faster to be chosen
# work per timed calibration run (~10 ms): sets the largest rows bucket. Large enough that oneDNN's per-call
# weight reorder weighs as on the model's own calls: at 2e8, 128-row samples of SVT-B's 384 -> 1536 MLP chose
# F.linear, which its 2048-row calls ran ~15 % slower (each variant 4-9 % slower in all, on the EPYC)
CALIBRATION_FLOPS = 2e9
CALIBRATION_ROUNDS = 3   # interleaved timed rounds after one warm-up each; the minimum counts
ANY_ROWS = 1 << 62  # a choice made without the rows (compiled graphs): the largest rows bucket
MLP_CHUNK_ELEMENTS = 1 << 20  # hidden activation per inference MLP chunk: 4 MiB in fp32, cache-sized
MLP_CHUNK_MIN_ROWS = 512
MLP_CALIBRATION_CHUNKS = 8  # the MLP calibration times at most this many chunks' rows
ATTN_CHUNK_ELEMENTS = 1 << 20  # attention scores per chunk of query rows (oneDNN attention)
# attention scores per chunk of windows (2 MiB in fp32): at 2x512² SVT-S 5-9 %, SVT-B 1-5 %, SVT-L 2-4 % faster
# in all than all windows at once; 1 MiB and 4 MiB chunks 1-4 % behind (on the EPYC)
WINDOW_CHUNK_ELEMENTS = 1 << 19
WINDOW_CALIBRATION_CHUNKS = 8  # the window-attention calibration times at most this many chunks' windows
WINOGRAD_CHUNK_TILES = 512  # 2x2 output tiles per band of the Winograd conv (16 x 512 x channels operand)
CONV_CALIBRATION_FLOPS = 4e9  # direct-conv work per timed 3x3 calibration run (~20 ms): caps its rows
# Winograd must be this much faster on its calibration strip: a few rows flatter it on narrow layers (256
# channels: 1.15-1.2x on the strip, 0.9-1.1x on the whole map; 512: 1.45x on both, measured on the EPYC)
WINOGRAD_MARGIN = 0.2

_HAS_ONEDNN = torch.backends.mkldnn.is_available()
_TIMER: Callable[[], float] = time.perf_counter
POLICIES = ('auto', PLAIN, ONEDNN)
CHOICES = (PLAIN, ONEDNN, ROWS, WINDOWS, WINOGRAD)


def fast_inference(x) -> bool:
    """Whether work on ``x`` may take the CPU-inference kernels: eager CPU inference (no autograd)."""
    return (_cpu_inference(x) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def compiled_inference(x) -> bool:
    """Whether ``x`` is traced by torch.compile for CPU inference (not exported)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and _cpu_inference(x)  # eager: 1 check


def _cpu_inference(x) -> bool:
    return (_HAS_ONEDNN and isinstance(x, torch.Tensor) and x.device.type == 'cpu'
            and not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.jit.is_scripting())


# ------------------------------------------------------------------------------ choosing kernels
class KernelTable:
    """One model's kernel choices, by calibration key ('family:shape...'), and what was measured.

    ``policy``: 'auto' measures each new key once; 'plain' / 'onednn' fix every choice without timing
    ('onednn' takes the other candidate of every choice: oneDNN kernels, row chunks, Winograd, ...);
    'saved' answers from ``choices`` (a saved table) and takes 'plain' for keys it lacks.
    """

    def __init__(self, policy: str = 'auto', choices: Optional[Dict[str, str]] = None,
                 timer: Optional[Callable[[], float]] = None):
        self.policy = policy
        self.choices: Dict[str, str] = dict(choices or {})
        self.measured: Dict[str, Dict] = {}  # key -> {'family', 'shape', 'choice', 'gflops'}
        self.timer = timer or _TIMER

    @classmethod
    def from_spec(cls, spec: Union[str, Path, Dict[str, str], 'KernelTable']) -> 'KernelTable':
        """'auto', 'plain', 'onednn', a saved choices dict, or the path of a JSON file holding one."""
        if isinstance(spec, KernelTable):
            return spec
        if isinstance(spec, str) and spec in POLICIES:
            return cls(spec)
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"kernels must be one of {POLICIES}, a dict of saved choices or the path of a "
                                 f"JSON file holding one; got {str(spec)!r}, which is neither a policy nor a file")
            try:
                spec = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f'kernels file {str(path)!r} is not a JSON table of kernel choices: {e}') from None
        if not isinstance(spec, dict) or not all(
                isinstance(k, str) and v in CHOICES for k, v in spec.items()):
            raise ValueError(f'a saved kernel table maps calibration keys (str) to one of {CHOICES}; got {spec!r:.200}')
        return cls('saved', spec)

    def choose(self, family: str, key: Tuple, flops: float,
               candidates: Union[Dict[str, Callable[[], object]], Callable[[], Dict[str, Callable[[], object]]]],
               alternative: str = ONEDNN, margin: float = MARGIN) -> str:
        """The kernel for ``key`` in ``family``: from the table, else by the policy, else measured once.

        ``candidates`` maps kernel names to zero-argument calls on calibration inputs (or is a function that
        builds that mapping, called only when ``key`` is measured: inputs are made once, not per forward);
        the first is the plain kernel and is kept unless another runs at least ``margin`` faster. ``flops`` is
        one call's work. ``alternative`` names the other candidate (what the 'onednn' policy takes).
        """
        name = family + ':' + ','.join(str(k) for k in key)
        hit = self.choices.get(name)
        if hit is not None:
            return hit
        if self.policy != 'auto':
            return alternative if self.policy == ONEDNN else PLAIN
        if callable(candidates):
            candidates = candidates()
        with torch.inference_mode():
            seconds = _time_interleaved(candidates, self.timer)
        plain = next(iter(candidates))
        choice = min(seconds, key=seconds.get)
        if seconds[choice] > (1 - margin) * seconds[plain]:
            choice = plain
        self.choices[name] = choice
        self.measured[name] = {'family': family, 'shape': tuple(key), 'choice': choice,
                               'gflops': {k: flops / max(s, 1e-12) / 1e9 for k, s in seconds.items()}}
        return choice

    def report(self) -> List[Dict]:
        """Every choice measured for this table: family, shape, chosen kernel, GFLOP/s of each kernel."""
        return [dict(v) for v in self.measured.values()]


# the table of a swapped-in layer made without optimize (PEFT's LoRA builds its adapters as type(base_layer)):
# timm's calls, nothing timed, nothing stored
PLAIN_TABLE = KernelTable(PLAIN)


def _time_interleaved(candidates: Dict[str, Callable[[], object]], timer: Callable[[], float]) -> Dict[str, float]:
    best = {name: math.inf for name in candidates}
    for name, fn in candidates.items():  # warm-up: first-call allocations and weight reorders
        fn()
    for _ in range(CALIBRATION_ROUNDS):
        for name, fn in candidates.items():
            t0 = timer()
            fn()
            best[name] = min(best[name], timer() - t0)
    return best


def _rows_bucket(rows: int, work_per_row: float) -> int:
    """Power-of-two rows bucket, capped where one calibration run would exceed CALIBRATION_FLOPS."""
    cap = max(64, 1 << int(math.log2(max(1.0, CALIBRATION_FLOPS / max(work_per_row, 1.0)))))
    return min(_pow2_at_least(rows), cap)


def _dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16': the dtype as calibration keys and reports name it."""
    return str(dtype).replace('torch.', '')


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------- linear
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` computed by oneDNN as a 1x1 conv on a channels-last view of the rows.

    (rows, features) memory is a (1, features, rows, 1) channels-last image, and the output comes back
    in that layout: the views cost nothing. Same multiply-adds as ``F.linear``, another summation order
    once the inner dimension passes ~192 (~1e-7 relative per layer).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    image = x.reshape(1, -1, 1, k).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight.view(weight.shape[0], k, 1, 1), bias)
    return out.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


def linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], table: KernelTable) -> str:
    """'plain' or 'onednn' for this product on this machine (calibrated once per shape bucket)."""
    return _linear_kernel(x.numel() // max(weight.shape[1], 1), x.dtype, weight, bias, table)


def _linear_kernel(rows: int, dtype: torch.dtype, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   table: KernelTable, prepacked: bool = False) -> str:
    n, k = weight.shape
    bucket = _rows_bucket(rows, 2.0 * k * n)
    key = (bucket, k, n, bias is not None, _dtype_name(dtype))

    def candidates() -> Dict[str, Callable[[], object]]:
        sample = torch.randn(bucket, k, generator=torch.Generator().manual_seed(0)).to(dtype)
        onednn = _prepacked_onednn_linear(sample, weight, bias) if prepacked else \
            (lambda: onednn_linear(sample, weight, bias))
        return {PLAIN: lambda: F.linear(sample, weight, bias), ONEDNN: onednn}
    return table.choose('compiled linear' if prepacked else 'linear', key, 2.0 * bucket * k * n, candidates)


@torch.compiler.assume_constant_result
def compiled_linear_kernel(layer: nn.Linear, dtype: torch.dtype) -> str:
    """The kernel a compiled CPU-inference graph takes for ``layer``: chosen while torch.compile traces it.

    Dynamo runs this once per trace and keeps the answer as a constant; inductor then compiles the chosen
    kernel's ops. Measured at the largest rows bucket, since a compiled graph may have symbolic sizes. With
    inductor's freezing the candidates are what it will run: ``F.linear`` (its prepacked MKL GEMM runs at
    the same rate) against the 1x1 convolution with a prepacked weight, which a per-call weight reorder
    would understate by up to ~15 % ('compiled linear' in the table's report); otherwise as in eager.
    """
    inductor_config = sys.modules.get('torch._inductor.config')
    freezing = inductor_config is not None and bool(inductor_config.freezing)
    with torch.inference_mode():
        return _linear_kernel(ANY_ROWS, dtype, layer.weight.detach(),
                              None if layer.bias is None else layer.bias.detach(), layer.kernel_table,
                              prepacked=freezing)


def _prepacked_onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Callable[[], object]:
    """``onednn_linear(x, weight, bias)`` as inductor's freezing runs it: the conv weight reordered once.

    Inductor's own oneDNN ops (private); where this torch lacks them, the eager call stands in.
    """
    n, k = weight.shape
    image = x.reshape(1, -1, 1, k).permute(0, 3, 1, 2)
    no_pad, ones = [0, 0], [1, 1]
    try:
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight.view(n, k, 1, 1), no_pad, ones, ones, 1,
                                                              list(image.shape))
        conv = torch.ops.mkldnn._convolution_pointwise
        conv(image, packed, bias, no_pad, ones, ones, 1, 'none', [], '')
    except (AttributeError, RuntimeError):
        return lambda: onednn_linear(x, weight, bias)
    return lambda: conv(image, packed, bias, no_pad, ones, ones, 1, 'none', [], '')


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], table: KernelTable) -> torch.Tensor:
    """``F.linear``; in CPU inference by the kernel ``table`` picks for the shape (plain or oneDNN)."""
    if fast_inference(x) and linear_kernel(x, weight, bias, table) == ONEDNN:
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------- attention
def onednn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per head on token-major tensors, as oneDNN grouped 1x1 convs.

    q: (B, N, heads * d) as the q projection returns it; k, v: (B, Nk, heads, d). Per image the keys and
    values are the weights of two grouped 1x1 convs (one group per head), so the scores and the output
    come out token-major, the output already (B, N, C) for the projection. Query rows go in cache-sized
    chunks; the scores never exist at full size.
    """
    B, N, C = q.shape
    nk, nh, d = k.shape[1:]
    out = torch.empty_like(q)
    rows = max(64, ATTN_CHUNK_ELEMENTS // (nh * nk))
    for b in range(B):
        keys = (k[b] * scale).transpose(0, 1).reshape(nh * nk, d, 1, 1)
        values = v[b].permute(1, 2, 0).reshape(nh * d, nk, 1, 1)
        for start in range(0, N, rows):
            q_rows = q[b, start:start + rows]
            n = q_rows.shape[0]
            scores = F.conv2d(q_rows.reshape(1, n, 1, C).permute(0, 3, 1, 2), keys, groups=nh)
            attn = scores.permute(0, 2, 3, 1).reshape(n, nh, nk).softmax(-1)
            x = F.conv2d(attn.view(1, n, 1, nh * nk).permute(0, 3, 1, 2), values, groups=nh)
            out[b, start:start + n] = x.permute(0, 2, 3, 1).reshape(n, C)
    return out


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain kernel on the same layouts: timm's ``F.scaled_dot_product_attention`` call."""
    B, N, C = q.shape
    nh = k.shape[2]
    x = F.scaled_dot_product_attention(q.view(B, N, nh, C // nh).transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2))
    return x.transpose(1, 2).reshape(B, N, C)


def attention_kernel(q: torch.Tensor, k: torch.Tensor, table: KernelTable) -> str:
    """'plain' (SDPA) or 'onednn' for global attention of this shape on this machine."""
    B, N, C = q.shape
    nk, nh, d = k.shape[1:]
    bucket = _rows_bucket(N, 4.0 * nk * C)
    key = (bucket, nk, nh, d, _dtype_name(q.dtype))

    def candidates() -> Dict[str, Callable[[], object]]:
        gen = torch.Generator().manual_seed(0)
        qs = torch.randn(1, bucket, C, generator=gen).to(q.dtype)
        ks, vs = (torch.randn(1, nk, nh, d, generator=gen).to(q.dtype) for _ in range(2))
        return {PLAIN: lambda: sdpa_attention(qs, ks, vs, d ** -0.5),
                ONEDNN: lambda: onednn_attention(qs, ks, vs, d ** -0.5)}
    return table.choose('attention', key, 4.0 * bucket * nk * C, candidates)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              table: KernelTable) -> Optional[torch.Tensor]:
    """Global attention by the kernel measured fastest, or None where the caller's plain path applies.

    Only for the default scale (head_dim ** -0.5) in fast inference; the caller runs timm's SDPA
    call otherwise, so a None costs nothing.
    """
    if not fast_inference(q) or scale != k.shape[-1] ** -0.5 or attention_kernel(q, k, table) != ONEDNN:
        return None
    return onednn_attention(q, k, v, scale)


# --------------------------------------------------------------------------- window attention
def _windows_per_chunk(heads: int, tokens: int) -> int:
    """Windows whose scores (heads x tokens x tokens) fill one ``WINDOW_CHUNK_ELEMENTS`` chunk."""
    return max(1, WINDOW_CHUNK_ELEMENTS // (heads * tokens * tokens))


def chunked_window_attention(qkv: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention inside each window (qkv: (Bw, L, 3, nh, d), mask: additive (Bw, 1, L, L)) over cache-sized
    chunks of windows: (Bw, nh, L, d), as the windows' heads batched all at once would give.

    All windows' scores at once stream several MiB through memory three times (scores, softmax, weights
    @ v); a chunk's stay in cache. The scale rides on the score GEMM (``baddbmm``'s alpha) instead of two
    passes over q and k: another rounding, ~1e-7 of the output's scale.
    """
    bw, n_tok, _, nh, d = qkv.shape
    out = qkv.new_empty(bw, nh, n_tok, d)
    step = _windows_per_chunk(nh, n_tok)
    for start in range(0, bw, step):
        q, k, v = qkv[start:start + step].permute(2, 0, 3, 1, 4).unbind(0)  # (n, nh, L, d) each
        n = q.shape[0]
        attn = torch.baddbmm(q.new_empty(()), q.reshape(n * nh, n_tok, d),
                             k.reshape(n * nh, n_tok, d).transpose(1, 2), beta=0, alpha=scale)
        if mask is not None:
            attn.view(n, nh, n_tok, n_tok).add_(mask[start:start + n])
        torch.bmm(attn.softmax(dim=-1), v.reshape(n * nh, n_tok, d),
                  out=out[start:start + n].view(n * nh, n_tok, d))
    return out


AttentionFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # (qkv, mask) -> output


def window_attention_kernel(qkv: torch.Tensor, plain: AttentionFn, table: KernelTable) -> str:
    """'plain' (all windows at once: ``plain(qkv, None)``, the layer's own path, as timm's) or 'windows'
    (chunks of windows) for this shape here.

    Timed on up to ``WINDOW_CALIBRATION_CHUNKS`` chunks' windows: enough that all-at-once scores leave the
    caches, as they do at full size.
    """
    bw, n_tok, _, nh, d = qkv.shape
    sample = min(bw, WINDOW_CALIBRATION_CHUNKS * _windows_per_chunk(nh, n_tok))
    key = (_pow2_at_least(bw), n_tok, nh, d, _dtype_name(qkv.dtype))

    def candidates() -> Dict[str, Callable[[], object]]:
        qkvs = torch.randn(sample, n_tok, 3, nh, d, generator=torch.Generator().manual_seed(0)).to(qkv.dtype)
        scale = d ** -0.5
        return {PLAIN: lambda: plain(qkvs, None),
                WINDOWS: lambda: chunked_window_attention(qkvs, scale)}
    return table.choose('window attention', key, 4.0 * sample * nh * n_tok * n_tok * d, candidates, alternative=WINDOWS)


def window_attention(qkv: torch.Tensor, scale: float, mask: Optional[torch.Tensor],
                     plain: AttentionFn, table: KernelTable) -> Optional[torch.Tensor]:
    """Window attention by the kernel measured faster, or None where the caller's ``plain`` path applies
    (outside fast inference, or where all windows at once measured as fast)."""
    if not fast_inference(qkv) or window_attention_kernel(qkv, plain, table) != WINDOWS:
        return None
    return chunked_window_attention(qkv, scale, mask)


# ----------------------------------------------------------------------------- 3x3 convolution
_WINOGRAD_G = ((1., 0., 0.), (.5, .5, .5), (.5, -.5, .5), (0., 0., 1.))


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(16, in, out): the 3x3 kernels of ``weight`` (out, in, 3, 3) in Winograd F(2x2, 3x3)'s domain, G g G^T."""
    k, c = weight.shape[:2]
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    return (torch.kron(g, g) @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(16, c, k)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     transformed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(2x2, 3x3): 2.25x fewer multiplies.

    Each 2x2 output tile is A^T [(G g G^T) . (B^T d B)] A over its 4x4 input tile d; the 16 products
    are 16 GEMMs (tiles x in) @ (in x out). Tiles go in cache-sized bands of rows (``WINOGRAD_CHUNK_TILES``
    per band): whole-map transforms would stream several times the map through memory. Another
    summation order than a direct conv (~2e-6 of the output's scale in fp32). ``transformed`` is
    ``winograd_weight(weight)`` made beforehand (the calibration times the conv alone). Output: NCHW shape,
    channels-last memory.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    u = winograd_weight(weight) if transformed is None else transformed
    th, tw = (h + 1) // 2, (w + 1) // 2
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))  # (n, 2th+2, 2tw+2, c)
    s_n, s_h, s_w, s_c = padded.stride()
    tiles = padded.as_strided((n, th, tw, 4, 4, c), (s_n, 2 * s_h, 2 * s_w, s_h, s_w, s_c))
    out = x.new_empty(n, th, 2, tw, 2, k)
    band = max(1, WINOGRAD_CHUNK_TILES // (n * tw))
    for start in range(0, th, band):
        d = tiles[:, start:start + band]
        rows = d.shape[1]
        v = x.new_empty(4, 4, n, rows, tw, c)
        r = d.unbind(3)  # B^T d: along the tile's rows ...
        t = (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])
        for a, ta in enumerate(t):  # ... then d B: along its columns, written into the GEMM operand
            torch.sub(ta[..., 0, :], ta[..., 2, :], out=v[a, 0])
            torch.add(ta[..., 1, :], ta[..., 2, :], out=v[a, 1])
            torch.sub(ta[..., 2, :], ta[..., 1, :], out=v[a, 2])
            torch.sub(ta[..., 1, :], ta[..., 3, :], out=v[a, 3])
        m = torch.bmm(v.view(16, -1, c), u).view(4, 4, n, rows, tw, k)
        tile_out = out[:, start:start + rows]
        for p, s in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T m A
            torch.add(s[0] + s[1], s[2], out=tile_out[:, :, p, :, 0])
            torch.sub(s[1] - s[2], s[3], out=tile_out[:, :, p, :, 1])
    if bias is not None:
        out += bias
    out = out.view(n, 2 * th, 2 * tw, k)
    if 2 * th != h or 2 * tw != w:  # odd sizes: the last tiles' extra row / column dropped
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


def conv3x3_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], table: KernelTable) -> str:
    """'plain' (oneDNN's direct conv, what timm and mmseg call) or 'winograd' for this 3x3 conv here.

    Timed on a strip of the layer's width: a quarter of one Winograd band (its GEMMs already run at
    full rate there), the whole height of a smaller map, or fewer rows where one run would exceed
    ``CONV_CALIBRATION_FLOPS``: the first call of a shape stays short.
    """
    k, c = weight.shape[:2]
    width = _pow2_at_least(x.shape[-1])
    strip = 2 * max(1, WINOGRAD_CHUNK_TILES // 4 // ((width + 1) // 2))
    affordable = 2 * max(1, int(CONV_CALIBRATION_FLOPS // (36.0 * c * k * width)))  # even rows within the cap
    rows = min(strip, affordable, _pow2_at_least(max(2, x.shape[-2])))
    key = (c, k, width, rows, bias is not None, _dtype_name(x.dtype))

    def candidates() -> Dict[str, Callable[[], object]]:
        sample = torch.randn(1, c, rows, width, generator=torch.Generator().manual_seed(0)).to(x.dtype)
        sample = sample.contiguous(memory_format=torch.channels_last)
        u = winograd_weight(weight)
        return {PLAIN: lambda: F.conv2d(sample, weight, bias, padding=1),
                WINOGRAD: lambda: winograd_conv3x3(sample, weight, bias, u)}
    return table.choose('conv3x3', key, 18.0 * c * k * rows * width, candidates, alternative=WINOGRAD,
                  margin=WINOGRAD_MARGIN)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], table: KernelTable) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (3x3, stride 1); in CPU inference by the kernel measured
    fastest."""
    if (fast_inference(x) and x.dim() == 4 and not torch.is_autocast_enabled('cpu')  # autocast: its conv
            and conv3x3_kernel(x, weight, bias, table) == WINOGRAD):
        return winograd_conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


# ------------------------------------------------------------------------ restructured calls
def has_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook (on these modules, their children or global) would see the call."""
    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for top in modules for m in top.modules())


def row_chunks(x: torch.Tensor, hidden: int) -> int:
    """How many row chunks keep an MLP's hidden activation (``hidden`` wide) cache-sized."""
    rows = x.numel() // x.shape[-1]
    return max(1, rows // max(MLP_CHUNK_MIN_ROWS, MLP_CHUNK_ELEMENTS // hidden))


def mlp_kernel(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, hidden: int, chunks: int, table: KernelTable) -> str:
    """'plain' (``mlp(norm(x))`` on the whole tensor, as timm) or 'rows' (over ``chunks`` row chunks).

    Calibrated on the block's own modules with up to ``MLP_CALIBRATION_CHUNKS`` chunks' rows: enough for the
    whole-tensor hidden activation to leave the caches, as it does at full size, for a few ms of work.
    """
    rows, c = x.numel() // x.shape[-1], x.shape[-1]
    per_chunk = -(-rows // chunks)
    sample_chunks = min(chunks, MLP_CALIBRATION_CHUNKS)
    key = (_pow2_at_least(rows), c, hidden, _dtype_name(x.dtype))  # uncapped: whole-tensor size

    def candidates() -> Dict[str, Callable[[], object]]:
        sample = torch.randn(per_chunk * sample_chunks, c, generator=torch.Generator().manual_seed(0)).to(x.dtype)
        scratch = sample.clone()

        def by_rows() -> None:
            for part in scratch.tensor_split(sample_chunks):
                part.add_(mlp(norm(part)))
        return {PLAIN: lambda: mlp(norm(sample)).add_(sample), ROWS: by_rows}
    return table.choose('mlp', key, 4.0 * per_chunk * sample_chunks * c * hidden, candidates, alternative=ROWS)
