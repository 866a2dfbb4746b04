"""Bilinear resizing of score maps to a large image in parts, with PyTorch's own numbers.

mmseg resizes each view's logits to the image with ``F.interpolate(..., mode='bilinear',
align_corners=False)``.  For a 12-megapixel photo and 150 classes that map alone is 7 GB, and for a
144-megapixel one 86 GB; these functions give the same values a band of rows at a time
(:func:`resized_rows`), or the class map of one view without making the score map at all
(:func:`upsampled_argmax`).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def source_rows(out_size: int, in_size: int) -> Tuple[torch.Tensor, ...]:
    """Per output position: the two source positions and their weights (bilinear, no corner alignment).

    PyTorch's rule (``area_pixel_compute_source_index``, ``guard_index_and_lambda``): source =
    max(in / out * (i + 0.5) - 0.5, 0) with the ratio in float32 and the multiply-add rounded once
    (its CPU kernel's fused multiply-add: the weights then equal its own bit for bit), positions
    floor(source) and the next (the last one repeated at the edge), weights 1 - frac and frac.
    """
    scale = (torch.tensor(float(in_size), dtype=torch.float32) / out_size).double()
    src = (scale * (torch.arange(out_size, dtype=torch.float64) + 0.5) - 0.5).float().clamp_(min=0)
    first = src.floor().long().clamp_(max=in_size - 1)
    frac = (src - first).clamp_(0, 1)
    second = (first + 1).clamp_(max=in_size - 1)
    return first, second, 1 - frac, frac


def resized_rows(v: torch.Tensor, out_hw: Tuple[int, int], r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of ``F.interpolate(v, out_hw, mode='bilinear', align_corners=False)``.

    Work and memory in proportion to the band: the source rows it reads (plus the next one) are
    resized along the width by ``F.interpolate``, then each output row mixes its two source rows
    with PyTorch's own indices and weights (:func:`source_rows`), in the kernel's order.
    """
    h_out, w_out = out_hw
    h_in, w_in = v.shape[-2:]
    if (h_in, w_in) == (h_out, w_out):
        return v[:, :, r0:r1]
    if (r0, r1) == (0, h_out):
        return F.interpolate(v, size=out_hw, mode='bilinear', align_corners=False)
    top, bottom, w_top, w_bottom = (t[r0:r1].to(v.device) for t in source_rows(h_out, h_in))
    s0, s1 = int(top[0]), int(bottom[-1]) + 1
    slab = v[:, :, s0:s1]
    if w_in != w_out:
        slab = F.interpolate(slab, size=(s1 - s0, w_out), mode='bilinear', align_corners=False)
    if h_in == h_out:
        return slab
    upper = slab.index_select(2, top - s0).mul_(w_top.view(-1, 1))
    return upper.add_(slab.index_select(2, bottom - s0).mul_(w_bottom.view(-1, 1)))


def upsampled_argmax(v: torch.Tensor, out_hw: Tuple[int, int], band_elements: int = 1 << 26,
                     chunk_elements: int = 1 << 22) -> torch.Tensor:
    """``F.interpolate(v, out_hw, mode='bilinear', align_corners=False).argmax(1)`` without the score map.

    Each output pixel mixes the four logit vectors at the corners of its source cell with weights
    that sum to one, so a class that is at most ``m`` at every corner stays at most ``m``, and one that
    is at least ``m`` at every corner stays at least ``m``.  A cell where one class is sure to win
    that way (inside a region, the most of them) gives its label to all its pixels at once; only
    in the others (along class borders) are the pixels computed, for the classes that can win there.
    Work: the classes times the network-size cells, plus the border pixels, plus one write a pixel.
    Agrees with the full computation except where two classes tie to float rounding.  Where classes
    crowd every cell (noise), the scores are made in bands of at most ``band_elements`` instead.
    """
    b, _, h_in, w_in = v.shape
    h_out, w_out = out_hw
    rows = source_rows(h_out, h_in)
    cols = source_rows(w_out, w_in)
    labels = torch.empty((b, h_out, w_out), dtype=torch.int64, device=v.device)
    for k in range(b):
        _upsampled_argmax_one(v[k], rows, cols, labels[k], band_elements, chunk_elements)
    return labels


def _upsampled_argmax_one(v: torch.Tensor, rows, cols, out: torch.Tensor, band_elements: int,
                          chunk_elements: int) -> None:
    """:func:`upsampled_argmax` of one (C, h, w) map into ``out`` (H, W)."""
    _, h_in, w_in = v.shape
    top, left = rows[0].to(v.device), cols[0].to(v.device)
    nxt_row = (torch.arange(h_in, device=v.device) + 1).clamp_(max=h_in - 1)
    nxt_col = (torch.arange(w_in, device=v.device) + 1).clamp_(max=w_in - 1)
    high = torch.maximum(v, v[:, nxt_row])
    high = torch.maximum(high, high[:, :, nxt_col])  # (C, h, w): what each class can reach in the cell
    low = torch.minimum(v, v[:, nxt_row])
    low = torch.minimum(low, low[:, :, nxt_col])     # ... and what it is sure to keep
    # rounding of the weighted sums (a few ulp of the largest logit) must not turn a sure winner
    tol = 64 * torch.finfo(v.dtype).eps * float(v.abs().max())
    floor = low.amax(0) - tol  # the best sure value in each cell
    can_win = high >= floor    # (C, h, w)
    n_candidates = can_win.sum(0)
    cell_label = low.argmax(0)  # the winner where it is the only candidate
    del high, low
    # output rows / columns of each cell: [start, end) in the sorted first-source positions
    cells_r, cells_c = torch.arange(h_in, device=v.device), torch.arange(w_in, device=v.device)
    row_start, row_end = torch.searchsorted(top, cells_r), torch.searchsorted(top, cells_r, right=True)
    col_start, col_end = torch.searchsorted(left, cells_c), torch.searchsorted(left, cells_c, right=True)
    pixels = (row_end - row_start)[:, None] * (col_end - col_start)[None, :]  # (h, w) output pixels a cell
    border = (n_candidates > 1) & (pixels > 0)
    work = int((n_candidates * pixels)[border].sum())
    if work * 4 > v.shape[0] * out.numel():  # classes crowd everywhere (noise): the plain way is cheaper
        step = max(1, band_elements // (v.shape[0] * out.shape[1]))
        for r0 in range(0, out.shape[0], step):
            r1 = min(r0 + step, out.shape[0])
            out[r0:r1] = resized_rows(v[None], tuple(out.shape), r0, r1)[0].argmax(0)
        return
    # every pixel takes its cell's label (a band of rows at a time); the border cells are then computed over
    step = max(1, chunk_elements // out.shape[1])
    for r0 in range(0, out.shape[0], step):
        out[r0:r0 + step] = cell_label[top[r0:r0 + step]][:, left]
    bh = int((row_end - row_start).max())
    bw = int((col_end - col_start).max())
    # cells in groups of like candidate counts (2, 3-4, 5-8, ...), each padded to its group's largest
    group = torch.ceil(torch.log2(n_candidates.clamp(min=2).float())).long()
    for g in group[border].unique().tolist():
        cells = (border & (group == g)).nonzero()  # (n, 2): cell rows and columns
        k_max = min(1 << g, v.shape[0])
        per_chunk = max(1, chunk_elements // (k_max * bh * bw))
        for c0 in range(0, len(cells), per_chunk):
            i, j = cells[c0:c0 + per_chunk].unbind(1)
            _border_cells(v, can_win[:, i, j].t(), k_max, row_start[i], row_end[i], col_start[j], col_end[j],
                          rows, cols, bh, bw, out)


def _border_cells(v: torch.Tensor, can_win: torch.Tensor, k_max: int, row_start, row_end, col_start, col_end,
                  rows, cols, bh: int, bw: int, out: torch.Tensor) -> None:
    """Compute the output pixels of n cells for their candidate classes (``can_win``: (n, C)) and write
    the winners; the pixel values are ``F.interpolate``'s sums in its order (width first)."""
    top, bottom, w_top, w_bottom = (t.to(v.device) for t in rows)
    left, right, w_left, w_right = (t.to(v.device) for t in cols)
    n = len(row_start)
    # the candidates first, in class order (ties go to the lowest class, as argmax); the rest pads
    cand = torch.where(can_win, 0, 1).argsort(dim=1, stable=True)[:, :k_max]  # (n, K)
    # output pixels of each cell, padded by repeating the last one (the same value, written twice)
    pr = (row_start[:, None] + torch.arange(bh, device=v.device)).minimum(row_end[:, None] - 1)  # (n, bh)
    pc = (col_start[:, None] + torch.arange(bw, device=v.device)).minimum(col_end[:, None] - 1)  # (n, bw)
    r_a, r_b, c_a, c_b = top[pr], bottom[pr], left[pc], right[pc]
    wl, wr = w_left[pc][:, None, None, :], w_right[pc][:, None, None, :]
    upper = _corner(v, cand, r_a, c_a).mul_(wl).add_(_corner(v, cand, r_a, c_b).mul_(wr))
    lower = _corner(v, cand, r_b, c_a).mul_(wl).add_(_corner(v, cand, r_b, c_b).mul_(wr))
    upper.mul_(w_top[pr][:, None, :, None]).add_(lower.mul_(w_bottom[pr][:, None, :, None]))
    del lower
    pad = torch.gather(~can_win, 1, cand)  # a pad class must not win a tie: below every candidate
    upper.masked_fill_(pad[:, :, None, None], float('-inf'))
    best = torch.gather(cand, 1, upper.argmax(1).flatten(1)).view(n, bh, bw)
    out[pr[:, :, None], pc[:, None, :]] = best


def _corner(v: torch.Tensor, cand: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, K, bh, bw): logits of the candidate classes ``cand`` (n, K) at rows ``r`` (n, bh) x columns ``c`` (n, bw)."""
    return v[cand[:, :, None, None], r[:, None, :, None], c[:, None, None, :]]
