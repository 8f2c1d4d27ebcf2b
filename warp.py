"""Geometry shared by both papers: warping, flow resizing, occlusion and the correlation layer.

Covers
  EFC eq. (1)   backward warping by bilinear interpolation           -> backward_warp
  EFC eq. (3)   occlusion from the backward flow (a range map)        -> range_map, occlusion_mask
  EFC "Implementation Details": the FlowNetC correlation layer that the
                flow decoder is built on (Ilg et al. 2017)            -> correlation
  plus the forward-backward consistency check (Meister et al. 2018, "UnFlow"), used as an
  alternative occlusion estimate and for evaluation                   -> fb_occlusion

Conventions (the whole project follows them):
  * A flow F_a->b is a tensor (B, 2, H, W) in pixels of its own resolution; channel 0 = u (x, to the
    right), channel 1 = v (y, down). Pixel p = (x, y) of frame a moves to p + F_a->b(p) in frame b.
  * backward_warp(x_b, F_a->b) samples frame b at p + F_a->b(p) and so brings b's content onto
    a's pixel grid (EFC eq. (1): S'_i = Warp(S_{i+t}, F_{i->i+t}); the warp runs against the flow).
  * Pixel (x, y) is the centre of the pixel in column x, row y; the image spans [0, W-1] x [0, H-1].
  * Occlusion masks are (B, 1, H, W) floats with 1 = occluded / no correspondence; they carry no
    gradient.
"""
import torch
import torch.nn.functional as F


def pixel_grid(height, width, device=None, dtype=torch.float32):
    """The coordinates of every pixel centre: (2, H, W), channel 0 = x (column), channel 1 = y (row)."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy))  # (2, H, W)


def _geometry_dtype(*tensors):
    """float32 for half/bf16/float32 inputs, float64 when any input is float64.

    Pixel coordinates up to a few thousand need float32's 24-bit mantissa to keep sub-pixel
    precision (bf16 has 8 bits: coordinate 1000 would be rounded to a multiple of 4), so sampling
    positions and weights are never computed in reduced precision, even under autocast.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_flow(flow, name="flow"):
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"{name} must be (B, 2, H, W) with u first, got shape {tuple(flow.shape)}")


def backward_warp(x, flow, padding="zeros"):
    """EFC eq. (1): warped(p) = x(p + flow(p)) by bilinear interpolation.

    Args:
      x:    (B, C, H, W) any channel count: an image, features S_{i+t}, logits, a flow field...
      flow: (B, 2, H, W) F_a->b in pixels, u first, on the grid of the *output* (frame a); x is frame b.
      padding: what a point outside the image samples. "zeros": exactly 0. "border": the nearest
            point of the image (the position is clamped to [0, W-1] x [0, H-1] first, so such a
            sample carries no gradient to the flow); the photometric losses use it (losses.py).
    Returns:
      warped: (B, C, H, W) in float32 (float64 if an input is float64), x sampled at p + flow(p).
      valid:  (B, 1, H, W) same dtype, 1 where p + flow(p) lies inside [0, W-1] x [0, H-1], else 0.
    Properties: zero flow returns x exactly and an integer flow shifts exactly (the bilinear weights
    are then exactly 0 and 1); differentiable in x and in flow (the weights are linear in the
    fractional position, so d warped / d flow is the local image gradient of the sampled cell).

    The flow gradient where the interpolant has a kink (a position on an integer column or row,
    where the left and right slopes differ) is the one-sided slope of the cell that floor() picks:
    the cell to the right (below), i.e. the forward difference x(k+1) - x(k). On the last column
    (row) that cell would lie outside, its right corner is the column itself, and the slope is 0.
    Both are what autograd gave through the weights px - floor(px) (the implementation before
    _BilinearWarp, kept by tests/test_warp.py as the reference). F.grid_sample takes the same
    cell for the same coordinate, but its [-1, 1] round trip (below) moves a position that lies on
    an integer in float32 by an ulp to either side, and then takes the other slope: that is the
    whole of the difference between the two flow gradients (tests/test_warp.py shows it).

    The sampling is written out (four gathers and their bilinear weights) rather than done by
    F.grid_sample: grid_sample needs coordinates normalised to [-1, 1], and the round trip
    x -> 2x/(W-1) - 1 -> x is not exact in float32, so zero flow would not return x bit for bit.
    With "zeros", points outside the image are zeroed explicitly instead of blending with zero
    padding, so a sample half a pixel outside gives 0 (and valid 0), not half the border value.
    """
    _check_flow(flow)
    if x.dim() != 4 or x.shape[0] != flow.shape[0] or x.shape[2:] != flow.shape[2:]:
        raise ValueError(f"backward_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} must share B, H, W")
    if padding not in ("zeros", "border"):
        raise ValueError(f"backward_warp: padding must be 'zeros' or 'border', got {padding!r}")
    dtype = _geometry_dtype(x, flow)
    with torch.autocast(device_type=x.device.type, enabled=False):
        # The casts stay outside the Function: autograd casts the gradients back to the inputs' dtypes.
        return _BilinearWarp.apply(x.to(dtype), flow.to(dtype), padding)


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
    pos = (pixel_grid(H, W, flow.device, flow.dtype) + flow).view(B, 2, H * W)  # sampling points, pixels
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
    """backward_warp's sampling, with a hand-written backward that keeps nothing of size C.

    Autograd through the four gathers and their weighted sum kept every gathered (B, C, H, W)
    corner and product for the backward, 2-6x the memory of F.grid_sample (issue #18). Here the
    forward keeps only its inputs (x is the caller's tensor, kept alive anyway; the flow has two
    channels) and the backward recomputes the cell (_bilinear_cell) and regathers the corners one
    at a time:
        grad x[q]   += sum over the corners k that sample q of  w_k * grad          (scatter-add)
        grad u      = sum_c grad * (wy0 (x01 - x00) + wy1 (x11 - x10))
        grad v      = sum_c grad * (wx0 (x10 - x00) + wx1 (x11 - x01))
    (x_yx the corners (y0, x0), (y0, x1), ...), each times `moves` (0 where border padding clamped
    the position). In float64 it equals autograd through the gathers to rounding, at the kinks too
    (tests/test_warp.py).
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


def resize_flow(flow, size):
    """Resample a flow field to `size` = (H_new, W_new) and rescale its vectors.

    A displacement of u pixels at width W is u * W_new / W pixels at width W_new (v likewise with
    the heights), so u and v are scaled by their own ratios; a flow at 1/8 of the image has values
    1/8 as large (the classic slip is to resize a flow without rescaling it).
    Resampling is bilinear with align_corners=False, the pixel-area convention that PIL and
    F.interpolate use for the images themselves, under which resizing maps the pixel-centre
    coordinate x to (x + 0.5) * W_new / W - 0.5: displacements scale by exactly W_new / W.
    flow: (B, 2, H, W) -> (B, 2, H_new, W_new), float32 at least.
    """
    _check_flow(flow)
    H, W = flow.shape[2:]
    H_new, W_new = int(size[0]), int(size[1])
    dtype = _geometry_dtype(flow)
    if (H_new, W_new) == (H, W):
        return flow.to(dtype)
    with torch.autocast(device_type=flow.device.type, enabled=False):
        out = F.interpolate(flow.to(dtype), size=(H_new, W_new), mode="bilinear", align_corners=False)
        scale = torch.tensor([W_new / W, H_new / H], dtype=dtype, device=flow.device).view(1, 2, 1, 1)
        return out * scale


def range_map(flow_bw):
    """How much of frame i+t lands on each pixel of frame i (Wang et al. 2018, "range map").

    flow_bw: (B, 2, H, W) the backward flow F_{i+t->i}, defined on frame i+t's grid.
    Every pixel q of frame i+t is splatted to q + F_{i+t->i}(q) in frame i with bilinear weights
    (each pixel carries a total mass of 1); mass that lands outside the image is dropped.
    Returns (B, 1, H, W) on frame i's grid: 1 where exactly one pixel's worth arrives (rigid
    motion), 0 where nothing arrives. No gradient.
    """
    _check_flow(flow_bw, "flow_bw")
    B, _, H, W = flow_bw.shape
    dtype = _geometry_dtype(flow_bw)
    with torch.no_grad(), torch.autocast(device_type=flow_bw.device.type, enabled=False):
        pos = pixel_grid(H, W, flow_bw.device, dtype) + flow_bw.to(dtype)  # (B, 2, H, W) targets in frame i
        px, py = pos[:, 0].reshape(B, -1), pos[:, 1].reshape(B, -1)  # (B, H*W)
        x0, y0 = px.floor(), py.floor()
        fx, fy = px - x0, py - y0
        mass = torch.zeros(B, H * W, dtype=dtype, device=flow_bw.device)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            tx, ty = x0 + dx, y0 + dy  # one of the four pixels around the target
            weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (tx >= 0) & (tx <= W - 1) & (ty >= 0) & (ty <= H - 1)
            index = (ty.clamp(0, H - 1) * W + tx.clamp(0, W - 1)).long()
            mass.scatter_add_(1, index, weight * inside)
        return mass.view(B, 1, H, W)


def occlusion_mask(flow_bw, threshold=0.5):
    """EFC eq. (3): O_hat_i = 1 where no pixel of frame i+t corresponds to the pixel of frame i.

    flow_bw: (B, 2, H, W) the backward flow F_{i+t->i}. Returns (B, 1, H, W), 1 = occluded, float,
    no gradient: it is a target (EFC eq. (4)), never a path for gradients.

    The paper's test "some pixel of I_{i+t} lands on (y, x)" is made on the range map (above):
    O_hat = 1 where R < threshold. The threshold is our choice (papers use 0.2 to 0.8): 0.5 is the
    midpoint between fully covered (R = 1) and empty (R = 0), so
      * an integer motion gives R in {0, 1, 2, ...} and the mask is exact;
      * a boundary pixel whose nearest incoming sample is more than half a pixel away is occluded;
      * a divergent flow (zoom-out by s < 1: frame i+t's pixels land on frame i with spacing 1/s)
        keeps R >= (2 - 1/s)^2 > 0.5 for every s >= 0.78 per axis, far beyond the zoom that t <= 5
        frames of driving video produce, so zoom does not create false occlusion.
    """
    return (range_map(flow_bw) < threshold).to(_geometry_dtype(flow_bw))


def fb_occlusion(flow_fw, flow_bw, alpha1=0.01, alpha2=0.5):
    """Forward-backward occlusion check (Meister et al. 2018, "UnFlow"), an alternative to eq. (3).

    flow_fw: (B, 2, H, W) F_a->b on frame a's grid;  flow_bw: (B, 2, H, W) F_b->a on frame b's grid.
    With F_bw' = backward_warp(F_b->a, F_a->b) (the backward flow fetched at the forward target),
    pixel p of frame a is occluded where
        |F_fw + F_bw'|^2 > alpha1 * (|F_fw|^2 + |F_bw'|^2) + alpha2
    (a consistent pair cancels: p -> p + F_fw -> p again). A pixel whose forward target leaves the
    image has no correspondence at all and is marked occluded too.
    Returns (B, 1, H, W) of frame a, 1 = occluded, float, no gradient.
    """
    _check_flow(flow_fw, "flow_fw")
    _check_flow(flow_bw, "flow_bw")
    with torch.no_grad():
        bw_warped, valid = backward_warp(flow_bw, flow_fw)  # (B, 2, H, W), (B, 1, H, W)
        fw = flow_fw.to(bw_warped.dtype)
        mismatch = (fw + bw_warped).pow(2).sum(1, keepdim=True)  # (B, 1, H, W) px^2
        magnitude = fw.pow(2).sum(1, keepdim=True) + bw_warped.pow(2).sum(1, keepdim=True)
        occluded = (mismatch > alpha1 * magnitude + alpha2) | (valid == 0)
        return occluded.to(bw_warped.dtype)


# Maps of at most this many pixels (H * W) take correlation's all-pairs path, larger ones the tiled
# path. Measured by `python bench.py --device cpu --threads 1` on the 2-core CPU (forward + backward,
# 2 x 4 items of 256 channels, d = 20, s = 2; docs/benchmarks.md): all-pairs takes 0.05 / 0.17 / 0.26
# / 0.42 / 0.84x the tiled time at 12 / 24 / 32 / 45 / 64 pixels square, 2.4x at 90x90 (and 2.9x
# its memory). The largest map where it was faster is 64x64. At 1024 channels it is 0.89x at 90x90
# but takes 1.6x the memory: EFC's 90x90 maps stay tiled. The quick recipe's 16x32 maps take
# all-pairs (0.30-0.38x). On a GPU the crossover is yet to be measured (bench.py --gpu-check).
ALL_PAIRS_MAX_PIXELS = 64 * 64


def correlation(f1, f2, max_displacement=20, stride=2, normalize=True, tile=64, path=None):
    """FlowNetC correlation with kernel size 1 (Dosovitskiy et al. 2015; Ilg et al. 2017).

        out[:, k, y, x] = mean_c f1[:, c, y, x] * f2[:, c, y + dy, x + dx]

    over the displacements (dy, dx) in {-d, -d+s, ..., d}^2 (d = max_displacement, s = stride),
    k = iy * D + ix with D = 2 * (d // s) + 1 (dy-major, then dx); f2 outside the image counts as 0.
    f1, f2: (B, C, H, W) features of the two frames. Returns (B, D^2, H, W); d = 20, s = 2 gives
    D^2 = 441 channels. `normalize` divides by C (the Caffe FlowNetC convention, which keeps the
    output's scale independent of the channel count; some reimplementations drop it, so it is a flag).
    The displacements are in pixels of the feature map: at stride 8 that is +-160 image pixels.

    Two implementations of the same definition (tests/test_warp.py checks both, values and
    gradients), chosen by `path` = "tiled" or "all_pairs", or by the map's size when None:
    all-pairs up to ALL_PAIRS_MAX_PIXELS pixels, tiled above.
      * tiled (_tiled_correlation): C * D * (tile + D - 1) multiply-adds per pixel in D small
        matmuls; memory about the output's.
      * all-pairs (_all_pairs_correlation): C * H * W multiply-adds per pixel in one large matmul,
        and a (B, HW, HW) matrix. More arithmetic than the tiled path at EFC's 45x45 and up (at
        45x45, d = 20, s = 2: 2025 products per pixel against 21 * 43 = 903) but one large matmul
        runs near the machine's peak where 21 matmuls of 23 x C by C x 43 do not, and it has none of
        the tiled path's rearranging copies; at 12x12 it also does less arithmetic (144 against
        546). On large maps the quadratic matrix loses (90x90: 8100 against 1365, and 262 MB per
        batch item in float32).
    """
    if f1.shape != f2.shape or f1.dim() != 4:
        raise ValueError(f"correlation: f1 {tuple(f1.shape)} and f2 {tuple(f2.shape)} must be equal (B, C, H, W)")
    if max_displacement < 0 or stride < 1 or max_displacement % stride:
        raise ValueError(f"correlation: max_displacement ({max_displacement}) must be a non-negative multiple of stride ({stride})")
    if path not in (None, "tiled", "all_pairs"):
        raise ValueError(f"correlation: path must be None, 'tiled' or 'all_pairs', got {path!r}")
    B, C, H, W = f1.shape
    if path is None:
        path = "all_pairs" if H * W <= ALL_PAIRS_MAX_PIXELS else "tiled"
    if path == "all_pairs":
        out = _all_pairs_correlation(f1, f2, max_displacement, stride)
    else:
        out = _tiled_correlation(f1, f2, max_displacement, stride, tile)
    return out / C if normalize else out


def _all_pairs_correlation(f1, f2, d, s):
    """correlation's all-pairs path: every pixel of f1 against every pixel of f2 in one batched
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


def _tiled_correlation(f1, f2, d, s, tile):
    """correlation's tiled path: dense matmuls, no per-displacement loop over D^2 and no
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
    """The matmuls of `correlation` on its rearranged inputs, with a hand-written backward.

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
