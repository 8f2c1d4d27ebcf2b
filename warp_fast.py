"""The fast paths of warp.py: the same numbers as its readable definitions, in less memory and time.

warp.py defines backward warping (EFC eq. (1)) and the FlowNetC correlation in the plainest PyTorch
(autograd differentiates them) and calls the functions here by default; tests/test_warp.py checks that
both give the same values and gradients. Read warp.py first: nothing here changes what is computed.

  bilinear_warp        backward_warp with a hand-written backward that keeps nothing of size C
                       (autograd through the four gathers kept every gathered corner: 5.3x x's size)
  all_pairs_correlation  one (HW x C) @ (C x HW) matmul, then a gather (small maps)
  tiled_correlation      D matmuls over row tiles, with a hand-written backward (large maps)
Why each exists, with its measurements: docs/benchmarks.md#micro-benchmarks.
"""
import torch
import torch.nn.functional as F

import warp


def bilinear_warp(x, flow, padding):
    """warp.warp_by_definition's values and gradients (tests/test_warp.py, float64, at the kinks too)
    in the memory of its inputs: x (B, C, H, W), flow (B, 2, H, W), both in the geometry dtype
    (warp.backward_warp casts them) -> (warped (B, C, H, W), valid (B, 1, H, W))."""
    return _BilinearWarp.apply(x, flow, padding)


def _bilinear_cell(flow, padding):
    """Where backward_warp samples, for every output pixel: the four corners of the cell around
    p + flow(p) and their bilinear weights, shared by _BilinearWarp's forward and backward (the
    backward recomputes them from the flow rather than keeping them).

    flow: (B, 2, H, W). Returns
      corners: 4 x (index (B, H*W) long into x's flattened H*W, weight (B, H*W)), in the order
               (y0, x0), (y0, x1), (y1, x0), (y1, x1); with "zeros" the weights are 0 where the
               sample is outside (that zeroes the sample and every gradient through it);
      wx, wy:  (B, H*W) each, (wx0, wx1) and (wy0, wy1): d weight / d px = -wy0, +wy0, -wy1, +wy1 for
               the four corners, and likewise for py (the weights are bilinear in px - x0, py - y0);
      moves:   (B, 2, H*W) 1 where the position moves with the flow, 0 where "border" clamped it
               (torch.clamp's gradient: 1 on the closed interval [0, W-1], 0 outside);
      valid:   (B, H*W) bool, p + flow(p) inside [0, W-1] x [0, H-1].
    """
    B, _, H, W = flow.shape
    pos = (warp.pixel_grid(H, W, flow.device, flow.dtype) + flow).view(B, 2, H * W)  # sampling points, pixels
    px, py = pos[:, 0], pos[:, 1]  # (B, HW) each
    valid = (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)  # (B, HW) bool
    moves = torch.ones_like(pos)
    if padding == "border":
        moves = torch.stack(((px >= 0) & (px <= W - 1), (py >= 0) & (py <= H - 1)), 1).to(pos.dtype)
        px, py = px.clamp(0, W - 1), py.clamp(0, H - 1)
    x0, y0 = px.floor(), py.floor()
    wx1, wy1 = px - x0, py - y0  # fractional parts in [0, 1): weights of the right / lower cell
    wx0, wy0 = 1 - wx1, 1 - wy1
    # Indices are clamped only so that gather stays in range; every out-of-image sample has weight 0
    # ("zeros") or was clamped into the image ("border"), and an in-image sample on the last
    # row/column has weight 0 on its clamped neighbour (wx1 = 0 when px = W-1).
    x0i, x1i = x0.clamp(0, W - 1).long(), (x0 + 1).clamp(0, W - 1).long()
    y0i, y1i = y0.clamp(0, H - 1).long(), (y0 + 1).clamp(0, H - 1).long()
    inside = valid.to(pos.dtype) if padding == "zeros" else 1
    corners = [(y0i * W + x0i, wy0 * wx0 * inside), (y0i * W + x1i, wy0 * wx1 * inside),
               (y1i * W + x0i, wy1 * wx0 * inside), (y1i * W + x1i, wy1 * wx1 * inside)]
    return corners, (wx0 * inside, wx1 * inside), (wy0 * inside, wy1 * inside), moves, valid


def _gather(flat, index):
    """flat (B, C, N) at index (B, M) of its last axis -> (B, C, M), every channel at the same places."""
    B, C, _ = flat.shape
    return flat.gather(2, index.unsqueeze(1).expand(B, C, index.shape[1]))


class _BilinearWarp(torch.autograd.Function):
    """bilinear_warp's sampling, with a hand-written backward that keeps nothing of size C.

    Autograd through the four gathers and their weighted sum (warp.warp_by_definition) keeps every
    gathered (B, C, H, W) corner and product for the backward, 2-6x the memory of F.grid_sample
    (issue #18). Here the forward keeps only its inputs (x is the caller's tensor, kept alive
    anyway; the flow has two channels) and the backward recomputes the cell (_bilinear_cell) and
    regathers the corners one at a time:
        grad x[q]   += sum over the corners k that sample q of  w_k * grad          (scatter-add)
        grad u      = sum_c grad * (wy0 (x01 - x00) + wy1 (x11 - x10))
        grad v      = sum_c grad * (wx0 (x10 - x00) + wx1 (x11 - x01))
    (x_yx the corners (y0, x0), (y0, x1), ...), each times `moves` (0 where border padding clamped
    the position). At a kink (a position on an integer column or row) both take the slope of the
    cell floor() picks, warp.warp_by_definition's convention.
    """

    @staticmethod
    def forward(ctx, x, flow, padding):
        B, C, H, W = x.shape
        corners, _, _, _, valid = _bilinear_cell(flow, padding)
        flat = x.reshape(B, C, H * W)
        warped = None
        for index, weight in corners:  # summed in place: one gathered corner alive at a time
            term = _gather(flat, index).mul_(weight.unsqueeze(1))  # (B, C, HW)
            warped = term if warped is None else warped.add_(term)
        ctx.save_for_backward(x, flow)
        ctx.padding = padding
        valid = valid.view(B, 1, H, W).to(x.dtype)
        ctx.mark_non_differentiable(valid)
        return warped.view(B, C, H, W), valid

    @staticmethod
    def backward(ctx, grad, _):
        x, flow = ctx.saved_tensors
        B, C, H, W = x.shape
        grad_x = grad_flow = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            corners, (wx0, wx1), (wy0, wy1), moves, _ = _bilinear_cell(flow, ctx.padding)
            grad = grad.to(x.dtype).reshape(B, C, H * W)
            if ctx.needs_input_grad[0]:
                grad_x = x.new_zeros(B, C, H * W)  # contiguous, whatever x's memory format
                for index, weight in corners:
                    grad_x.scatter_add_(2, index.unsqueeze(1).expand(B, C, H * W), grad * weight.unsqueeze(1))
                grad_x = grad_x.view(B, C, H, W)
            if ctx.needs_input_grad[1]:
                flat = x.reshape(B, C, H * W)
                # s_k = sum_c grad * corner k: the output's sensitivity to each corner's value, (B, HW)
                s00, s01, s10, s11 = (_gather(flat, index).mul_(grad).sum(1) for index, _ in corners)
                du = wy0 * (s01 - s00) + wy1 * (s11 - s10)  # (B, HW)
                dv = wx0 * (s10 - s00) + wx1 * (s11 - s01)
                grad_flow = (torch.stack((du, dv), 1) * moves).view(B, 2, H, W)
        return grad_x, grad_flow, None


def all_pairs_correlation(f1, f2, d, s):
    """warp.correlation's all-pairs path: every pixel of f1 against every pixel of f2 in one batched
    matmul (the cost volume of RAFT, Teed and Deng 2020), then each pixel's D^2 displacements read
    out of its row with one gather. Autograd differentiates it (matmul and gather; the gather's
    backward scatters into a (B, HW, HW) zero matrix, as large as the forward's).
    f1, f2: (B, C, H, W) -> (B, D^2, H, W), summed over the channels (not divided by C)."""
    B, C, H, W = f1.shape
    D = 2 * (d // s) + 1
    # (B, HW, C) @ (B, C, HW): pairs[b, p, q] = f1 pixel p . f2 pixel q (pixels row-major, y * W + x)
    pairs = torch.matmul(f1.flatten(2).transpose(1, 2), f2.flatten(2))
    offsets = torch.arange(-d, d + 1, s, device=f1.device)  # (D,) the dy (and dx) values
    ty = torch.arange(H, device=f1.device).view(1, 1, H, 1) + offsets.view(D, 1, 1, 1)  # (D, 1, H, 1) row y + dy
    tx = torch.arange(W, device=f1.device).view(1, 1, 1, W) + offsets.view(1, D, 1, 1)  # (1, D, 1, W) column x + dx
    inside = ((ty >= 0) & (ty < H) & (tx >= 0) & (tx < W)).reshape(D * D, H * W).t()  # (HW, D^2)
    # f2's pixel for each (pixel p, displacement k), clamped into the map where it lies outside
    # (those entries are zeroed below): row p of `target` lists p's D^2 partners, k = iy * D + ix.
    target = (ty.clamp(0, H - 1) * W + tx.clamp(0, W - 1)).reshape(D * D, H * W).t()  # (HW, D^2)
    out = pairs.gather(2, target.expand(B, H * W, D * D)).masked_fill(~inside, 0)  # (B, HW, D^2)
    return out.transpose(1, 2).reshape(B, D * D, H, W)


def tiled_correlation(f1, f2, d, s, tile=64):
    """warp.correlation's tiled path: dense matmuls, no per-displacement loop over D^2 and no
    (B, D^2, C, H, W) tensor (the unfold approach). f1, f2: (B, C, H, W) -> (B, D^2, H, W), summed
    over the channels (not divided by C).

    For one vertical offset dy, the dot products of `tile` consecutive pixels of a row of f1 with
    the tile + D - 1 pixels of row y + dy of f2 that their horizontal offsets reach form a
    (tile x (tile + D - 1)) matrix, one batched matmul for all tiles of all rows; the wanted offsets
    are its diagonals M[t, t + j], read out with one gather. With a stride s > 1, pixel x only meets
    f2 columns of its own residue x mod s, so the columns are split into s interleaved sets first,
    in which the D offsets are consecutive. Cost: D matmuls computing tile + D - 1 products per
    pixel to use D of them: at EFC's 90x90 maps (d = 20, s = 2) a residue row is 45 pixels, one
    tile, 65 products per pixel (a whole row without the split would be W + 2d = 130). Narrower
    tiles waste less but make matmuls too small to run fast on a CPU (tile 16: slower at 90x90,
    measured). Memory: the output, the inputs rearranged once (f2 with its tile overlaps), one
    matrix per offset dy. The backward is written out (_TiledCorrelation).
    """
    B, C, H, W = f1.shape
    D = 2 * (d // s) + 1
    # Column x = m * s + p of f1 (p = x mod s) meets padded f2 column x + d + dx = (m + j) * s + p for
    # dx = -d + j * s, j = 0..D-1: in the set of columns of residue p, offsets are consecutive.
    T = max(1, min(tile, -(-W // s)))  # pixels per tile (no wider than a row)
    n = -(-W // (s * T))  # tiles per row and residue
    width = n * T  # columns m per residue, the last tile padded
    f1 = F.pad(f1, (0, s * width - W))  # (B, C, H, s * width)
    f2 = F.pad(f2, (d, s * (width + D - 1) - d - W, d, d))  # (B, C, H + 2d, s * (width + D - 1)), zero border
    # (B, H, s, n, T, C): tile rows of f1, one per residue and tile
    rows1 = f1.reshape(B, C, H, n, T, s).permute(0, 2, 5, 3, 4, 1).contiguous()
    # (B, H + 2d, s, n, C, T + D - 1): the f2 columns each tile reaches (overlapping windows, copied once)
    rows2 = f2.reshape(B, C, H + 2 * d, width + D - 1, s).permute(0, 2, 4, 1, 3)
    rows2 = rows2.unfold(4, T + D - 1, T).permute(0, 1, 2, 4, 3, 5).contiguous()
    out = _TiledCorrelation.apply(rows1, rows2, D, s)  # (B, H, s, D_y, n, T, D_x)
    out = out.permute(0, 3, 6, 1, 4, 5, 2).reshape(B, D * D, H, width * s)[..., :W]  # k = iy * D + ix, x = m s + p
    return out


class _TiledCorrelation(torch.autograd.Function):
    """The matmuls of tiled_correlation on its rearranged inputs, with a hand-written backward.

    rows1 (B, H, s, n, T, C), rows2 (B, H + 2d, s, n, C, T + D - 1) -> (B, H, s, D, n, T, D).
    Autograd through the loop would give every offset dy its own zero-filled gradient of all of
    rows2 (the backward of a slice); here the D offsets accumulate into one buffer in place: for
    each dy the output gradient is put on the diagonals of a (T x (T + D - 1)) band G and
    grad rows1 += G rows2_dy^T, grad rows2_dy += rows1^T G. Under autocast the matmuls run in the
    autocast dtype, as torch.matmul would.
    """

    @staticmethod
    def forward(ctx, rows1, rows2, D, s):
        device = rows1.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else \
            torch.promote_types(rows1.dtype, rows2.dtype)
        ctx.dtypes = rows1.dtype, rows2.dtype
        rows1, rows2 = rows1.to(dtype), rows2.to(dtype)
        B, H, _, n, T, _ = rows1.shape
        diagonals = (torch.arange(T, device=rows1.device).view(T, 1) + torch.arange(D, device=rows1.device).view(1, D))
        diagonals = diagonals.expand(B, H, s, n, T, D)
        out = rows1.new_empty(B, H, s, D, n, T, D)
        for iy in range(D):  # row y + dy of f2 is row y + iy * s of the padded f2
            M = torch.matmul(rows1, rows2[:, iy * s:iy * s + H])  # (B, H, s, n, T, T + D - 1)
            torch.gather(M, 5, diagonals, out=out[:, :, :, iy])  # the D horizontal offsets of this dy
        ctx.save_for_backward(rows1, rows2, diagonals)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx, grad):
        rows1, rows2, diagonals = ctx.saved_tensors
        s, D, H = ctx.s, diagonals.shape[-1], rows1.shape[1]
        grad = grad.to(rows1.dtype)
        grad1, grad2 = torch.zeros_like(rows1), torch.zeros_like(rows2)
        band = rows1.new_zeros(*rows1.shape[:5], rows2.shape[-1])  # (B, H, s, n, T, T + D - 1)
        for iy in range(D):
            band.scatter_(5, diagonals, grad[:, :, :, iy])  # only the diagonals are ever written
            rows2_dy = rows2[:, iy * s:iy * s + H]
            grad1.add_(torch.matmul(band, rows2_dy.transpose(-1, -2)))
            grad2[:, iy * s:iy * s + H].add_(torch.matmul(rows1.transpose(-1, -2), band))
        return grad1.to(ctx.dtypes[0]), grad2.to(ctx.dtypes[1]), None, None
