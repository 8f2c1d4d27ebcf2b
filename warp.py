"""Geometry shared by both papers: warping, flow resizing, occlusion and the correlation layer.

Covers
  EFC eq. (1)   backward warping by bilinear interpolation           -> warp_by_definition, backward_warp
  EFC eq. (3)   occlusion from the backward flow (a range map)        -> range_map, occlusion_mask
  EFC "Implementation Details": the FlowNetC correlation layer that the
                flow decoder is built on (Ilg et al. 2017)            -> correlation_by_definition, correlation
  plus the forward-backward consistency check (Meister et al. 2018, "UnFlow"), used as an
  alternative occlusion estimate and for evaluation                   -> fb_occlusion

The warp and the correlation are each written twice. First as their definitions, in the plainest
PyTorch, differentiated by autograd (warp_by_definition, correlation_by_definition): read these.
Then the entry points every other file calls (backward_warp, correlation) check their inputs and
run, by default, a fast path of warp_fast.py that computes the same numbers in less memory and time;
`path="definition"` runs the definition instead. tests/test_warp.py checks that the two agree,
values and gradients.

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

import warp_fast


def pixel_grid(height, width, device=None, dtype=torch.float32):
    """The coordinates of every pixel centre: (2, H, W), channel 0 = x (column), channel 1 = y (row)."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy))  # (2, H, W)


def warp_by_definition(x, flow, padding="zeros"):
    """EFC eq. (1), S'_i = Warp(S_{i+t}, F_{i->i+t}): warped(p) = x(p + flow(p)), bilinear.

    x (B, C, H, W) is frame b (any channels: an image, features, logits, a flow); flow (B, 2, H, W)
    is F_a->b on frame a's grid. Returns warped (B, C, H, W) on frame a's grid and valid (B, 1, H, W),
    1 where p + flow(p) lies inside [0, W-1] x [0, H-1]. padding "zeros": a point outside samples 0;
    "border": it samples the nearest image point (no gradient to the flow there).
    """
    B, C, H, W = x.shape
    pos = pixel_grid(H, W, x.device, x.dtype) + flow  # (B, 2, H, W) the sampling points p + flow(p), pixels
    px, py = pos[:, 0], pos[:, 1]  # (B, H, W) each
    valid = (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)
    if padding == "border":
        px, py = px.clamp(0, W - 1), py.clamp(0, H - 1)
    x0, y0 = px.floor(), py.floor()  # the cell's top-left corner
    wx1, wy1 = px - x0, py - y0  # bilinear weights of the right column and the lower row
    wx0, wy0 = 1 - wx1, 1 - wy1
    # Clamped so that the gather stays in range: an outside corner has weight 0 or was clamped in.
    x0i, x1i = x0.clamp(0, W - 1).long(), (x0 + 1).clamp(0, W - 1).long()
    y0i, y1i = y0.clamp(0, H - 1).long(), (y0 + 1).clamp(0, H - 1).long()

    def corner(yi, xi):  # x at the pixels (yi, xi): (B, C, H, W)
        index = (yi * W + xi).view(B, 1, H * W).expand(B, C, H * W)
        return x.reshape(B, C, H * W).gather(2, index).view(B, C, H, W)

    warped = ((wy0 * wx0).unsqueeze(1) * corner(y0i, x0i) + (wy0 * wx1).unsqueeze(1) * corner(y0i, x1i)
              + (wy1 * wx0).unsqueeze(1) * corner(y1i, x0i) + (wy1 * wx1).unsqueeze(1) * corner(y1i, x1i))
    valid = valid.unsqueeze(1).to(x.dtype)
    return (warped * valid if padding == "zeros" else warped), valid


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


def backward_warp(x, flow, padding="zeros", path=None):
    """EFC eq. (1), as every other file calls it: warp_by_definition's values and gradients, with
    its inputs checked and cast to float32 (float64 if an input is), autocast off.

    path: None or "fast" runs warp_fast.bilinear_warp (a hand-written backward that keeps nothing
    of size C: autograd through warp_by_definition's gathers keeps 5.3x x's size); "definition"
    runs warp_by_definition. Properties of both: zero flow returns x exactly and an integer flow
    shifts exactly; with "zeros" a sample half a pixel outside gives 0, not half the border value.

    Why the sampling is written out rather than done by F.grid_sample: grid_sample's [-1, 1] round
    trip x -> 2x/(W-1) - 1 -> x is not exact in float32, so zero flow would not return x bit for bit,
    and a position on an integer can move by an ulp and take the other cell's slope. Here the flow
    gradient at an integer column (row) is the forward difference x(k+1) - x(k), 0 on the last one
    (tests/test_warp.py pins it; the measurements: docs/benchmarks.md#micro-benchmarks).
    """
    _check_flow(flow)
    if x.dim() != 4 or x.shape[0] != flow.shape[0] or x.shape[2:] != flow.shape[2:]:
        raise ValueError(f"backward_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} must share B, H, W")
    if padding not in ("zeros", "border"):
        raise ValueError(f"backward_warp: padding must be 'zeros' or 'border', got {padding!r}")
    if path not in (None, "fast", "definition"):
        raise ValueError(f"backward_warp: path must be None, 'fast' or 'definition', got {path!r}")
    dtype = _geometry_dtype(x, flow)
    with torch.autocast(device_type=x.device.type, enabled=False):
        # The casts stay outside the fast path's autograd Function: autograd casts the gradients back.
        x, flow = x.to(dtype), flow.to(dtype)
        if path == "definition":
            return warp_by_definition(x, flow, padding)
        return warp_fast.bilinear_warp(x, flow, padding)


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


def correlation_by_definition(f1, f2, d, s):
    """FlowNetC correlation, kernel 1, one displacement at a time (summed over channels, not divided):
        out[:, k, y, x] = sum_c f1[:, c, y, x] * f2[:, c, y + dy, x + dx],  k = iy * D + ix,
    for (dy, dx) in {-d, -d+s, ..., d}^2, D = 2 (d // s) + 1; f2 outside the map counts as 0.
    f1, f2: (B, C, H, W) -> (B, D^2, H, W)."""
    H, W = f1.shape[2:]
    padded = F.pad(f2, (d, d, d, d))  # (B, C, H + 2d, W + 2d), zeros around f2
    out = [(f1 * padded[:, :, d + dy:d + dy + H, d + dx:d + dx + W]).sum(1)  # (B, H, W)
           for dy in range(-d, d + 1, s) for dx in range(-d, d + 1, s)]  # dy-major, then dx
    return torch.stack(out, 1)  # (B, D^2, H, W)


# Maps of at most this many pixels (H * W) take the all-pairs path, larger ones the tiled path: the
# largest swept map at which all-pairs was the faster on the 2-core CPU (docs/benchmarks.md#measured),
# at d = 20, s = 2 (ALL_PAIRS_SWEPT_DISPLACEMENTS = 441). All-pairs computes every pixel against every
# pixel, the tiled path only the D^2 displacements, so the crossover scales with D^2: the quick
# recipe's stride-4 match (d = 2, 25 displacements, 16 x 64 x 32 x 64) took 604 ms forward + backward
# on all-pairs and 138 ms tiled, and the stride-8 one (d = 4, 81, 16 x 384 x 16 x 32) 93 against 279.
ALL_PAIRS_MAX_PIXELS = 64 * 64
ALL_PAIRS_SWEPT_DISPLACEMENTS = 21 * 21


def correlation_path(H, W, max_displacement, stride):
    """The fast path `correlation` takes on an H x W map: "all_pairs" or "tiled" (see above)."""
    D = 2 * (max_displacement // stride) + 1
    return "all_pairs" if H * W * ALL_PAIRS_SWEPT_DISPLACEMENTS <= ALL_PAIRS_MAX_PIXELS * D * D else "tiled"


def correlation(f1, f2, max_displacement=20, stride=2, normalize=True, tile=64, path=None):
    """FlowNetC correlation with kernel size 1 (Dosovitskiy et al. 2015; Ilg et al. 2017), as every
    other file calls it: correlation_by_definition, divided by the channel count C when `normalize`
    (the Caffe FlowNetC convention, which keeps the output's scale independent of C; some
    reimplementations drop it, so it is a flag). f1, f2: (B, C, H, W) features of the two frames ->
    (B, D^2, H, W); d = 20, s = 2 gives D^2 = 441 channels. The displacements are in pixels of the
    feature map: at stride 8, +-160 image pixels.

    path: "definition"; or a fast path of warp_fast.py with the same values and gradients:
    "all_pairs" (one (HW x C) @ (C x HW) matmul, RAFT's cost volume; quadratic memory) or "tiled"
    (D matmuls over row tiles of `tile` pixels); None picks all_pairs up to ALL_PAIRS_MAX_PIXELS
    pixels at 441 displacements (in proportion to D^2 at others), tiled above. Why two:
    docs/benchmarks.md#micro-benchmarks.
    """
    if f1.shape != f2.shape or f1.dim() != 4:
        raise ValueError(f"correlation: f1 {tuple(f1.shape)} and f2 {tuple(f2.shape)} must be equal (B, C, H, W)")
    if max_displacement < 0 or stride < 1 or max_displacement % stride:
        raise ValueError(f"correlation: max_displacement ({max_displacement}) must be a non-negative multiple of stride ({stride})")
    if path not in (None, "definition", "tiled", "all_pairs"):
        raise ValueError(f"correlation: path must be None, 'definition', 'tiled' or 'all_pairs', got {path!r}")
    B, C, H, W = f1.shape
    d, s = max_displacement, stride
    if path is None:
        path = correlation_path(H, W, d, s)
    if path == "definition":
        out = correlation_by_definition(f1, f2, d, s)
    elif path == "all_pairs":
        out = warp_fast.all_pairs_correlation(f1, f2, d, s)
    else:
        out = warp_fast.tiled_correlation(f1, f2, d, s, tile)
    return out / C if normalize else out
