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


def backward_warp(x, flow):
    """EFC eq. (1): warped(p) = x(p + flow(p)) by bilinear interpolation.

    Args:
      x:    (B, C, H, W) any channel count: an image, features S_{i+t}, logits, a flow field...
      flow: (B, 2, H, W) F_a->b in pixels, u first, on the grid of the *output* (frame a); x is frame b.
    Returns:
      warped: (B, C, H, W) in float32 (float64 if an input is float64), x sampled at p + flow(p);
              exactly 0 where that point lies outside the image.
      valid:  (B, 1, H, W) same dtype, 1 where p + flow(p) lies inside [0, W-1] x [0, H-1], else 0.
    Properties: zero flow returns x exactly and an integer flow shifts exactly (the bilinear weights
    are then exactly 0 and 1); differentiable in x and in flow (the weights are linear in the
    fractional position, so d warped / d flow is the local image gradient of the sampled cell).

    The sampling is written out (four gathers and their bilinear weights) rather than done by
    F.grid_sample: grid_sample needs coordinates normalised to [-1, 1], and the round trip
    x -> 2x/(W-1) - 1 -> x is not exact in float32, so zero flow would not return x bit for bit.
    Points outside the image are zeroed explicitly instead of blending with zero padding, so a
    sample half a pixel outside gives 0 (and valid 0), not half the border value.
    """
    _check_flow(flow)
    if x.dim() != 4 or x.shape[0] != flow.shape[0] or x.shape[2:] != flow.shape[2:]:
        raise ValueError(f"backward_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} must share B, H, W")
    B, C, H, W = x.shape
    dtype = _geometry_dtype(x, flow)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        pos = pixel_grid(H, W, x.device, dtype) + flow.to(dtype)  # (B, 2, H, W) sampling points
        px, py = pos[:, 0], pos[:, 1]  # (B, H, W) each, in pixels
        valid = (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)  # (B, H, W) bool

        x0, y0 = px.floor(), py.floor()
        wx1, wy1 = px - x0, py - y0  # fractional parts in [0, 1): weights of the right / lower cell
        wx0, wy0 = 1 - wx1, 1 - wy1
        # Indices are clamped only so that gather stays in range; every out-of-image sample is
        # zeroed by `valid` below, and an in-image sample on the last row/column has weight 0 on
        # its clamped neighbour (wx1 = 0 when px = W-1).
        x0i = x0.clamp(0, W - 1).long()
        x1i = (x0 + 1).clamp(0, W - 1).long()
        y0i = y0.clamp(0, H - 1).long()
        y1i = (y0 + 1).clamp(0, H - 1).long()

        flat = x.reshape(B, C, H * W)

        def gather(yi, xi):  # (B, H, W) indices -> (B, C, H, W) values of x
            idx = (yi * W + xi).view(B, 1, H * W).expand(B, C, H * W)
            return flat.gather(2, idx).view(B, C, H, W)

        warped = ((wy0 * wx0).unsqueeze(1) * gather(y0i, x0i)
                  + (wy0 * wx1).unsqueeze(1) * gather(y0i, x1i)
                  + (wy1 * wx0).unsqueeze(1) * gather(y1i, x0i)
                  + (wy1 * wx1).unsqueeze(1) * gather(y1i, x1i))
        valid = valid.unsqueeze(1).to(dtype)  # (B, 1, H, W)
        return warped * valid, valid


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


def correlation(f1, f2, max_displacement=20, stride=2, normalize=True):
    """FlowNetC correlation with kernel size 1 (Dosovitskiy et al. 2015; Ilg et al. 2017).

        out[:, k, y, x] = mean_c f1[:, c, y, x] * f2[:, c, y + dy, x + dx]

    over the displacements (dy, dx) in {-d, -d+s, ..., d}^2 (d = max_displacement, s = stride),
    k = iy * D + ix with D = 2 * (d // s) + 1 (dy-major, then dx); f2 outside the image counts as 0.
    f1, f2: (B, C, H, W) features of the two frames. Returns (B, D^2, H, W); d = 20, s = 2 gives
    D^2 = 441 channels. `normalize` divides by C (the Caffe FlowNetC convention, which keeps the
    output's scale independent of the channel count; some reimplementations drop it, so it is a flag).
    The displacements are in pixels of the feature map: at stride 8 that is +-160 image pixels.

    How: for one vertical offset dy, the dot products of row y of f1 with row y + dy of f2 at
    *all* horizontal pairs form a (W x W) matrix M = f1_row^T f2_row, one batched matmul over all
    (B, H) rows; the wanted horizontal offsets are the diagonals M[x, x + dx] of that matrix, read
    out with one gather. D matmuls in total, no per-displacement loop over D^2 and no tensor of
    size (B, D^2, C, H, W) (the unfold approach).
    Cost: time O(B * D * H * W * (W + 2d) * C) multiply-adds, run as dense matmuls (so it also uses
    tensor cores under autocast); memory: the output (B, D^2, H, W), two transposed copies of the
    inputs (B, H, W, C) (the only tensors kept for backward), and one (B, H, W, W + 2d) matrix at a
    time.
    The matmul computes W + 2d pairs per pixel to use D of them; for feature maps of width
    around 100 that costs less than the elementwise alternative, which reads the whole
    (B, C, H, W) input D^2 times.
    """
    if f1.shape != f2.shape or f1.dim() != 4:
        raise ValueError(f"correlation: f1 {tuple(f1.shape)} and f2 {tuple(f2.shape)} must be equal (B, C, H, W)")
    if max_displacement < 0 or stride < 1 or max_displacement % stride:
        raise ValueError(f"correlation: max_displacement ({max_displacement}) must be a non-negative multiple of stride ({stride})")
    B, C, H, W = f1.shape
    d, s = max_displacement, stride
    D = 2 * (d // s) + 1
    # Both made contiguous once, so that every slice below is a stack of dense matrices.
    rows1 = f1.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): row y of f1, pixel by pixel
    rows2 = F.pad(f2, (d, d, d, d)).permute(0, 2, 1, 3).contiguous()  # (B, H + 2d, C, W + 2d), zero border
    # Column index into a row of M padded by d on both sides: entry (x, j) is horizontal offset
    # dx_j = -d + j * s, i.e. padded column x + d + dx_j = x + j * s.
    cols = (torch.arange(W, device=f1.device).view(W, 1) + s * torch.arange(D, device=f1.device).view(1, D))
    cols = cols.view(1, 1, W, D).expand(B, H, W, D)
    out = []
    for iy in range(D):
        y_start = iy * s  # row y + dy of f2 is row y + dy + d = y + iy * s of the padded f2
        M = torch.matmul(rows1, rows2[:, y_start:y_start + H])  # (B, H, W, W + 2d)
        out.append(M.gather(3, cols))  # (B, H, W, D): the D horizontal offsets of this dy
    out = torch.stack(out, dim=3)  # (B, H, W, D_y, D_x)
    out = out.reshape(B, H, W, D * D).permute(0, 3, 1, 2)  # (B, D^2, H, W), k = iy * D + ix
    return out / C if normalize else out
