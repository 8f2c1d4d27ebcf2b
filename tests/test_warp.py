"""Tests of warp.py on synthetic flows whose answers are known exactly."""
import math

import pytest
import torch

import warp
import warp_fast
from warp import backward_warp, correlation, fb_occlusion, occlusion_mask, pixel_grid, range_map, resize_flow


def constant_flow(B, H, W, u, v, dtype=torch.float32):
    flow = torch.empty(B, 2, H, W, dtype=dtype)
    flow[:, 0], flow[:, 1] = u, v
    return flow


# ------------------------------------------------------------------------------------------ warp
def test_zero_flow_is_exact_identity():
    x = torch.randn(2, 5, 13, 17)
    warped, valid = backward_warp(x, torch.zeros(2, 2, 13, 17))
    assert torch.equal(warped, x)
    assert torch.equal(valid, torch.ones(2, 1, 13, 17))


@pytest.mark.parametrize("u,v", [(3, 0), (0, -2), (-4, 5), (1, 1)])
def test_integer_flow_shifts_exactly(u, v):
    H, W = 9, 11
    x = torch.randn(2, 3, H, W)
    warped, valid = backward_warp(x, constant_flow(2, H, W, u, v))
    expected = torch.zeros_like(x)
    expected_valid = torch.zeros(2, 1, H, W)
    for y in range(H):
        for xx in range(W):
            if 0 <= y + v < H and 0 <= xx + u < W:
                expected[:, :, y, xx] = x[:, :, y + v, xx + u]
                expected_valid[:, :, y, xx] = 1
    assert torch.equal(warped, expected)
    assert torch.equal(valid, expected_valid)


def test_subpixel_flow_interpolates_bilinearly():
    # x = [[0, 1, 2], [3, 4, 5]]; sampling (x, y) = (0.25, 0.5) from pixel (0, 0):
    # 0.75*0.5*0 + 0.25*0.5*1 + 0.75*0.5*3 + 0.25*0.5*4 = 1.75
    x = torch.tensor([[0.0, 1, 2], [3, 4, 5]]).view(1, 1, 2, 3)
    flow = torch.zeros(1, 2, 2, 3)
    flow[0, :, 0, 0] = torch.tensor([0.25, 0.5])
    flow[0, :, 0, 1] = torch.tensor([0.9, 0.1])  # (1.9, 0.1): 0.1*0.9*1 + 0.9*0.9*2 + 0.1*0.1*4 + 0.9*0.1*5 = 2.2
    flow[0, :, 1, 2] = torch.tensor([-1.5, -0.25])  # (0.5, 0.75): 0.25*0.5*(0+1) + 0.75*0.5*(3+4) = 2.75
    warped, valid = backward_warp(x, flow)
    assert warped[0, 0, 0, 0].item() == pytest.approx(1.75, abs=1e-6)
    assert warped[0, 0, 0, 1].item() == pytest.approx(2.2, abs=1e-6)
    assert warped[0, 0, 1, 2].item() == pytest.approx(2.75, abs=1e-6)
    assert warped[0, 0, 1, 0].item() == 3.0 and valid.sum().item() == 6


def test_samples_outside_give_zero_and_invalid():
    x = torch.ones(1, 2, 4, 5)
    flow = torch.zeros(1, 2, 4, 5)
    flow[0, 0, 0, 0] = -0.5  # half a pixel left of the image: outside, not a blend with padding
    flow[0, 1, 1, 1] = 2.5  # y = 3.5 > H - 1
    flow[0, 0, 2, 4] = 0.0  # the last column itself is inside
    warped, valid = backward_warp(x, flow)
    assert warped[0, :, 0, 0].eq(0).all() and valid[0, 0, 0, 0] == 0
    assert warped[0, :, 1, 1].eq(0).all() and valid[0, 0, 1, 1] == 0
    assert warped[0, :, 2, 4].eq(1).all() and valid[0, 0, 2, 4] == 1
    assert valid.sum().item() == 18


def autograd_backward_warp(x, flow, padding="zeros"):
    """The reference of the tests below: warp.py's definition of eq. (1), autograd differentiating
    its four gathers and their weights."""
    return backward_warp(x, flow, padding, path="definition")


def kinked_flow(B, H, W, generator):
    """A float64 flow whose sampling points cover every case of the bilinear sampler: a quarter
    random (non-integer, some outside the image), a quarter exactly on integer columns and rows, a
    quarter one ulp below an integer, and a quarter on the border itself (coordinates 0 and W-1 /
    H-1, exactly) or outside it."""
    g = pixel_grid(H, W, dtype=torch.float64)
    random = 3 * torch.randn(B, 2, H, W, dtype=torch.float64, generator=generator)
    integer = torch.randint(-2, 3, (B, 2, H, W), generator=generator).double()
    target = (g + integer).clamp(min=1)  # integer positions >= 1, so that one ulp below is below an integer
    below = torch.nextafter(target, torch.zeros_like(target)) - g
    size = torch.tensor([W - 1.0, H - 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    edge = torch.randint(0, 3, (B, 2, H, W), generator=generator).double()  # 0: coordinate 0, 1: the last, 2: outside
    border = torch.where(edge == 0, 0.0, torch.where(edge == 1, size, size + 0.5)) - g
    case = torch.randint(0, 4, (B, 1, H, W), generator=generator)
    return torch.where(case == 0, random, torch.where(case == 1, integer, torch.where(case == 2, below, border)))


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_hand_written_backward_equals_autograd_through_the_gathers(padding):
    # Values and both gradients, at random, integer, just-below-integer and border positions, in
    # float64: the same numbers as the implementation it replaces, so the convention at the kinks is
    # unchanged (see test_flow_gradient_takes_the_slope_of_the_cell_floor_picks).
    generator = torch.Generator().manual_seed(1)
    B, C, H, W = 2, 3, 6, 7
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=generator, requires_grad=True)
    flow = kinked_flow(B, H, W, generator).requires_grad_()
    weights = torch.randn(B, C, H, W, dtype=torch.float64, generator=generator)
    ours, valid = backward_warp(x, flow, padding)
    reference, reference_valid = autograd_backward_warp(x, flow, padding)
    assert torch.equal(ours, reference) and torch.equal(valid, reference_valid)
    assert 0 < valid.mean() < 1 and not valid.requires_grad
    grads = torch.autograd.grad((ours * weights).sum(), (x, flow))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (x, flow))
    for a, b in zip(grads, reference_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_warp_gradcheck_in_x_and_flow(padding):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    # Fractional positions away from the cell edges, where bilinear sampling is differentiable
    # (gradcheck's central difference across a kink would average the two one-sided slopes); the
    # integer part reaches up to 3 pixels outside, where "zeros" gives 0 and "border" clamps.
    flow = (0.3 + 0.4 * torch.rand(2, 2, 5, 6, dtype=torch.float64)) * torch.tensor([1.0, -1.0], dtype=torch.float64).view(1, 2, 1, 1)
    flow = (flow + torch.randint(-3, 4, (2, 2, 5, 6)).double()).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, f: backward_warp(a, f, padding)[0], (x, flow), fast_mode=True)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_flow_gradient_takes_the_slope_of_the_cell_floor_picks(padding):
    # The interpolant of x = [0, 1, 4, 9, 16] (k^2) has a kink at every integer: slopes 1, 3, 5, 7.
    # d warped / d u at a position p is the slope of the cell [floor(p), floor(p) + 1]:
    #   p = 2 exactly      -> the cell to the right, 9 - 4 = 5 (the forward difference);
    #   p = 2 - one ulp    -> the cell to the left, 4 - 1 = 3;
    #   p = 4 = W - 1      -> no cell to the right: its corner is column 4 itself, slope 0;
    #   p = 0 exactly      -> 1 - 0 = 1.
    # Why the right-hand slope: it is the derivative of what is computed on [k, k + 1), the cell
    # that contains k (floor), and what autograd gave through the weights px - floor(px) before the
    # backward was written out (test above). Integer positions are not rare: zero flow, the flow
    # decoder's start (model.FlowDecoder), samples every pixel on its integer centre.
    x = torch.tensor([0.0, 1, 4, 9, 16], dtype=torch.float64).view(1, 1, 1, 5).expand(1, 1, 2, 5)
    two = torch.tensor(2.0, dtype=torch.float64)
    positions = torch.stack([two, torch.nextafter(two, torch.tensor(0.0, dtype=torch.float64)),
                             torch.tensor(4.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)])
    for p, slope in zip(positions, (5.0, 3.0, 0.0, 1.0)):
        flow = torch.zeros(1, 2, 2, 5, dtype=torch.float64)
        flow[0, 0, 0, 1] = p - 1  # pixel (x, y) = (1, 0) samples at (p, 0)
        flow.requires_grad_()
        warped, _ = backward_warp(x, flow, padding)
        grad, = torch.autograd.grad(warped[0, 0, 0, 1], flow)
        assert grad[0, 0, 0, 1].item() == slope, (p.item(), padding)
        assert grad.abs().sum().item() == abs(slope)  # nothing reaches v or the other pixels


def test_grid_sample_flow_gradient_differs_where_its_round_trip_crosses_an_integer():
    # Issue #18 saw the flow gradient differ from grid_sample's by up to 6.0 (on a scale of 21) at
    # 512x1024. Where: at positions within float32 rounding of an integer. grid_sample maps x to
    # 2x/(W-1) - 1 and back; on a 1024-wide map the round trip moves a position one ulp below an
    # integer k to k or above, and grid_sample then takes the cell to the right, we the cell to the
    # left (floor of the exact position). Both take the slope of the cell floor() picks, of
    # different coordinates: the differences are whole slope differences, x(k+1) - 2x(k) + x(k-1).
    torch.manual_seed(0)
    W = 1024
    x = torch.randn(1, 1, 2, W)
    k = torch.arange(1, W - 1, dtype=torch.float32)
    flow = torch.zeros(1, 2, 2, W)
    flow[0, 0, 0, 1:-1] = torch.nextafter(k, torch.zeros_like(k)) - k  # one ulp below each integer
    flow.requires_grad_()
    ours, = torch.autograd.grad(backward_warp(x, flow)[0].sum(), flow)
    pos = pixel_grid(2, W) + flow.detach()
    grid = torch.stack((2 * pos[:, 0] / (W - 1) - 1, 2 * pos[:, 1] - 1), dim=-1)  # (1, 2, W, 2), H - 1 = 1
    sampled = torch.nn.functional.grid_sample(x, grid.requires_grad_(), align_corners=True)
    theirs = torch.autograd.grad(sampled.sum(), grid)[0][..., 0] * 2 / (W - 1)  # d/d grid -> d/d pixels
    row = x[0, 0, 0]
    left, right = row[1:-1] - row[:-2], row[2:] - row[1:-1]  # slopes of the cells left and right of k
    assert torch.allclose(ours[0, 0, 0, 1:-1], left, atol=1e-5)
    flipped = (theirs[0, 0, 1:-1] - left).abs() > 1e-3
    assert flipped.sum() > 10  # 87 of 1022 with torch 2.13's grid_sample
    assert torch.allclose(theirs[0, 0, 1:-1][flipped], right[flipped], atol=1e-3)


def test_hand_written_backward_takes_channels_last_inputs():
    # train.py --channels-last hands the losses NHWC features and images: the same numbers.
    torch.manual_seed(2)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    flow = 2 * torch.randn(2, 2, 6, 7, dtype=torch.float64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        a = x.contiguous(memory_format=layout).requires_grad_()
        f = flow.contiguous(memory_format=layout).requires_grad_()
        warped, _ = backward_warp(a, f)
        results.append((warped, *torch.autograd.grad(warped.square().sum(), (a, f))))
    assert all(torch.allclose(p, q, atol=1e-12) for p, q in zip(*results))


def test_hand_written_backward_keeps_nothing_of_size_c_but_x():
    # The memory the issue asked to cut: what the graph keeps for the backward. Ours keeps x (the
    # caller's tensor, alive anyway) and the flow; autograd through the gathers kept every corner.
    B, C, H, W = 1, 16, 8, 9
    x = torch.randn(B, C, H, W, requires_grad=True)
    flow = torch.randn(B, 2, H, W, requires_grad=True)

    def saved_bytes(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, flow)
        return sum(n for ptr, n in storages.items() if ptr not in (x.untyped_storage().data_ptr(),
                                                                    flow.untyped_storage().data_ptr()))

    size_c = B * C * H * W * 4  # bytes of one float32 (B, C, H, W)
    assert saved_bytes(backward_warp) < size_c / 4
    assert saved_bytes(autograd_backward_warp) >= 4 * size_c


def test_warp_under_bf16_autocast_samples_in_float32():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 600)
    flow = constant_flow(1, 16, 600, 0.37, -0.21) + 3 * torch.randn(1, 2, 16, 600)
    reference, _ = backward_warp(x, flow)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped, valid = backward_warp(x, flow)
        warped_bf16_input, _ = backward_warp(x.bfloat16(), flow.bfloat16())
    assert warped.dtype == torch.float32 and torch.equal(warped, reference)
    assert warped_bf16_input.dtype == torch.float32
    # bf16 would round pixel x-coordinates near 600 to multiples of 4; float32 positions keep the
    # sub-pixel result within bf16's rounding of the *values* only.
    ref_rounded, _ = backward_warp(x.bfloat16().float(), flow.bfloat16().float())
    assert torch.allclose(warped_bf16_input, ref_rounded, atol=1e-5)


def test_warp_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share B, H, W"):
        backward_warp(torch.zeros(1, 3, 4, 5), torch.zeros(1, 2, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        backward_warp(torch.zeros(1, 3, 4, 5), torch.zeros(1, 3, 4, 5))


# ---------------------------------------------------------------------------------------- resize
def test_resize_flow_scales_each_component_by_its_own_ratio():
    flow = constant_flow(2, 8, 12, 3.0, -2.0)
    out = resize_flow(flow, (4, 24))  # height halves, width doubles
    assert out.shape == (2, 2, 4, 24)
    assert torch.allclose(out[:, 0], torch.full((2, 4, 24), 6.0))
    assert torch.allclose(out[:, 1], torch.full((2, 4, 24), -1.0))
    assert resize_flow(flow, (8, 12)) is flow  # float32 already: no copy
    assert resize_flow(flow.half(), (8, 12)).dtype == torch.float32


def test_resize_flow_keeps_warping_consistent():
    # A smooth image under a smooth flow; halving both and warping must agree with warping and
    # then halving, in the interior (both are approximations of the same continuous warp).
    H, W = 64, 96
    g = pixel_grid(H, W)
    image = (torch.sin(g[0] / 7.0) + torch.cos(g[1] / 5.0)).view(1, 1, H, W)
    flow = torch.stack((2.0 + 0.02 * g[1], -1.0 + 0.01 * g[0])).unsqueeze(0)
    full, _ = backward_warp(image, flow)
    half_image = torch.nn.functional.interpolate(image, size=(32, 48), mode="bilinear", align_corners=False)
    half, _ = backward_warp(half_image, resize_flow(flow, (32, 48)))
    full_half = torch.nn.functional.interpolate(full, size=(32, 48), mode="bilinear", align_corners=False)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert (half - full_half)[interior].abs().max() < 0.05
    # Without the rescaling the error is an order of magnitude larger.
    wrong, _ = backward_warp(half_image, torch.nn.functional.interpolate(flow, size=(32, 48), mode="bilinear"))
    assert (wrong - full_half)[interior].abs().max() > 0.3


# ------------------------------------------------------------------------------------- occlusion
def mask_of(rows, cols, H, W):
    m = torch.zeros(1, 1, H, W)
    m[0, 0, rows, cols] = 1
    return m


@pytest.mark.parametrize("tx,ty", [(3, 0), (-2, 0), (0, 4), (2, -3)])
def test_translation_occludes_exactly_the_strip_that_leaves(tx, ty):
    H, W = 12, 15
    flow_fw = constant_flow(1, H, W, tx, ty)  # F_i->i+t: frame i's content moves by (tx, ty)
    flow_bw = constant_flow(1, H, W, -tx, -ty)  # F_i+t->i
    expected = torch.zeros(1, 1, H, W)
    gx = pixel_grid(H, W)
    leaves = (gx[0] + tx < 0) | (gx[0] + tx > W - 1) | (gx[1] + ty < 0) | (gx[1] + ty > H - 1)
    expected[0, 0][leaves] = 1
    assert torch.equal(occlusion_mask(flow_bw), expected)
    assert torch.equal(fb_occlusion(flow_fw, flow_bw), expected)
    assert torch.equal(range_map(flow_bw), 1 - expected)


def test_fractional_translation_within_one_pixel_of_the_strip():
    H, W = 10, 20
    for tx in (2.3, 2.5, 2.7):
        occ = occlusion_mask(constant_flow(1, H, W, -tx, 0.0))[0, 0]
        # Columns x + tx > W - 1 leave; the boundary column may go either way (a one-pixel band).
        assert occ[:, : W - 1 - math.ceil(tx)].eq(0).all()
        assert occ[:, W - math.floor(tx):].eq(1).all()
        assert occ[:, W - 1 - math.ceil(tx) + 1: W - math.floor(tx)].numel() <= H * 1


def square_scene(H=24, W=32, top=6, left=8, size=7, dx=4, dy=3):
    """A square at (top, left) in frame i moving by (dx, dy) over a static background.
    Returns F_i->i+t, F_i+t->i, the square's masks in both frames."""
    sq_i = mask_of(slice(top, top + size), slice(left, left + size), H, W)
    sq_j = mask_of(slice(top + dy, top + dy + size), slice(left + dx, left + dx + size), H, W)
    flow_fw = torch.cat((sq_i * dx, sq_i * dy), 1)  # (1, 2, H, W) on frame i
    flow_bw = torch.cat((-sq_j * dx, -sq_j * dy), 1)  # on frame i+t
    return flow_fw, flow_bw, sq_i, sq_j


def test_moving_square_occludes_the_background_it_covers():
    flow_fw, flow_bw, sq_i, sq_j = square_scene()
    covered = sq_j * (1 - sq_i)  # background of frame i hidden by the square in frame i+t
    uncovered = sq_i * (1 - sq_j)  # background of frame i+t that the square revealed
    assert torch.equal(occlusion_mask(flow_bw), covered)  # frame i, from F_i+t->i
    assert torch.equal(occlusion_mask(flow_fw), uncovered)  # frame i+t, from F_i->i+t
    assert torch.equal(fb_occlusion(flow_fw, flow_bw), covered)
    assert torch.equal(fb_occlusion(flow_bw, flow_fw), uncovered)


def similarity_scene(H, W, scale=1.0, angle=0.0):
    """Frame i+t = frame i zoomed by `scale` and rotated by `angle` about the image centre.
    Returns F_i->i+t (exact), F_i+t->i (exact) and the exact occlusion of frame i: the pixels
    whose forward target leaves the image, with the band of pixels within one pixel of that
    boundary (where the range map's bilinear footprint may decide either way)."""
    g = pixel_grid(H, W, dtype=torch.float64)
    c = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64).view(2, 1, 1)
    cos, sin = math.cos(angle), math.sin(angle)

    def forward_map(p, s, a_cos, a_sin):  # rotate by angle, scale by s about c
        d = p - c
        return c + s * torch.stack((a_cos * d[0] - a_sin * d[1], a_sin * d[0] + a_cos * d[1]))

    target = forward_map(g, scale, cos, sin)
    source = forward_map(g, 1 / scale, cos, -sin)
    flow_fw = (target - g).unsqueeze(0).float()
    flow_bw = (source - g).unsqueeze(0).float()
    tx, ty = target[0], target[1]
    leaves = (tx < 0) | (tx > W - 1) | (ty < 0) | (ty > H - 1)
    margin = 1.0 * max(scale, 1.0)
    band = ((tx > -margin) & (tx < margin)) | ((tx > W - 1 - margin) & (tx < W - 1 + margin)) \
        | ((ty > -margin) & (ty < margin)) | ((ty > H - 1 - margin) & (ty < H - 1 + margin))
    return flow_fw, flow_bw, leaves.float().view(1, 1, H, W), band.view(1, 1, H, W)


@pytest.mark.parametrize("scale,angle", [(1.15, 0.0), (1.0, 0.12), (1.1, -0.08)])
def test_zoom_and_rotation_occlude_what_leaves_the_view(scale, angle):
    H, W = 40, 56
    flow_fw, flow_bw, expected, band = similarity_scene(H, W, scale, angle)
    for occ in (occlusion_mask(flow_bw), fb_occlusion(flow_fw, flow_bw)):
        assert torch.equal(occ[~band], expected[~band])
        assert expected.sum() > 50  # the scene does occlude something
    assert band.float().mean() < 0.25


def test_zoom_out_occludes_nothing_in_the_earlier_frame():
    # Frame i+t is frame i shrunk by 0.85: all of frame i stays visible; only frame i+t's border
    # is new content. The range map of the spread-out pixels stays above the 0.5 threshold.
    H, W = 40, 56
    flow_fw, flow_bw, expected, _ = similarity_scene(H, W, scale=0.85)
    assert expected.sum() == 0
    assert occlusion_mask(flow_bw).sum() == 0
    assert fb_occlusion(flow_fw, flow_bw).sum() == 0
    assert range_map(flow_bw).min() > 0.5
    # ...while frame i+t's new border is occluded with respect to frame i.
    assert occlusion_mask(flow_fw)[0, 0, :, 0].eq(1).all() and occlusion_mask(flow_fw)[0, 0, H // 2, W // 2] == 0


def test_fb_occlusion_thresholds():
    H, W = 4, 4
    fw = constant_flow(1, H, W, 0.0, 0.0)
    # Zero forward flow, backward flow of length r at the same place: occluded iff r^2 > 0.01 r^2 + 0.5.
    for r, occluded in ((0.7, False), (0.72, True)):
        bw = constant_flow(1, H, W, r, 0.0)
        assert fb_occlusion(fw, bw)[0, 0, 1, 1].item() == float(occluded)
    # Relative term: |fw + bw|^2 = 1 with |fw| = 10: 1 < 0.01 * (100 + 81) + 0.5 -> consistent.
    fw = constant_flow(1, 30, 30, 10.0, 0.0)
    bw = constant_flow(1, 30, 30, -9.0, 0.0)
    assert fb_occlusion(fw, bw)[0, 0, 5, 5] == 0
    assert fb_occlusion(fw, bw)[0, 0, 5, 25] == 1  # 25 + 10 > 29: leaves the image


def test_occlusion_masks_carry_no_gradient():
    flow = torch.randn(1, 2, 6, 7, requires_grad=True)
    assert not occlusion_mask(flow).requires_grad
    assert not fb_occlusion(flow, -flow).requires_grad


# ----------------------------------------------------------------------------------- correlation
def naive_correlation(f1, f2, d, s):
    """The definition, one displacement and one pixel at a time."""
    B, C, H, W = f1.shape
    D = 2 * (d // s) + 1
    out = torch.zeros(B, D * D, H, W, dtype=f1.dtype)
    for iy, dy in enumerate(range(-d, d + 1, s)):
        for ix, dx in enumerate(range(-d, d + 1, s)):
            for y in range(H):
                for x in range(W):
                    if 0 <= y + dy < H and 0 <= x + dx < W:
                        out[:, iy * D + ix, y, x] = (f1[:, :, y, x] * f2[:, :, y + dy, x + dx]).mean(1)
    return out


PATHS = ["tiled", "all_pairs", "definition"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,C,H,W,d,s", [(2, 3, 5, 7, 2, 1), (1, 4, 7, 5, 4, 2), (3, 2, 6, 9, 6, 3), (2, 5, 3, 11, 4, 4)])
def test_correlation_matches_the_definition(B, C, H, W, d, s, path):
    # Values and gradients: the gradients of the pixel-by-pixel definition come from autograd
    # through naive_correlation's slice assignments.
    torch.manual_seed(B * 100 + d)
    f1 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    out = correlation(f1, f2, d, s, path=path)
    definition = naive_correlation(f1, f2, d, s)
    assert out.shape == (B, (2 * (d // s) + 1) ** 2, H, W)
    assert torch.allclose(out, definition, atol=1e-12)
    assert torch.allclose(correlation(f1, f2, d, s, normalize=False, path=path), out * C, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (f1, f2))
    definition_grads = torch.autograd.grad((definition * weights).sum(), (f1, f2))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, definition_grads))


def test_correlation_picks_the_all_pairs_path_up_to_its_threshold(monkeypatch):
    # By the map's pixel count: all-pairs up to warp.ALL_PAIRS_MAX_PIXELS at the swept displacements
    # (here made d = 2's 25), tiled above; an explicit path wins. Spies record which path ran.
    taken = []
    for name in ("tiled_correlation", "all_pairs_correlation"):
        original = getattr(warp_fast, name)
        monkeypatch.setattr(warp_fast, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    monkeypatch.setattr(warp, "ALL_PAIRS_MAX_PIXELS", 4 * 6)
    monkeypatch.setattr(warp, "ALL_PAIRS_SWEPT_DISPLACEMENTS", 25)
    for H, W, path in ((4, 6, None), (5, 5, None), (3, 3, "tiled"), (6, 6, "all_pairs"), (6, 6, "definition")):
        correlation(torch.randn(1, 2, H, W), torch.randn(1, 2, H, W), 2, 1, path=path)
    assert taken == ["all_pairs_correlation", "tiled_correlation", "tiled_correlation", "all_pairs_correlation"]
    with pytest.raises(ValueError, match="path"):
        correlation(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), path="loop")


def test_correlation_path_threshold_scales_with_the_displacements():
    # The sweep's d = 20, s = 2 (441 displacements): all-pairs up to 64 x 64 (the constant), tiled at 90 x 90.
    # Fewer displacements move the crossover down in proportion (up to 752 pixels at d = 4's 81, 232 at
    # d = 2's 25): the quick recipe's stride-8 match (d = 4, 16 x 32) stays all-pairs, its stride-4 one
    # (d = 2, 32 x 64) goes tiled (both measured, warp.py).
    assert (warp.ALL_PAIRS_MAX_PIXELS, warp.ALL_PAIRS_SWEPT_DISPLACEMENTS) == (4096, 441)
    cases = {(64, 64, 20, 2): "all_pairs", (90, 90, 20, 2): "tiled", (16, 32, 4, 1): "all_pairs",
             (16, 47, 4, 1): "all_pairs", (16, 48, 4, 1): "tiled", (8, 29, 2, 1): "all_pairs",
             (8, 30, 2, 1): "tiled", (32, 64, 2, 1): "tiled"}
    assert {case: warp.correlation_path(*case) for case in cases} == cases


@pytest.mark.parametrize("path", PATHS)
def test_correlation_channel_order_and_default_size(path):
    # One bright pixel in f2 at (y, x) = (4, 7); f1 all ones: the response at f1 pixel (2, 3) is in
    # channel k = iy * D + ix with dy = 2, dx = 4 at stride 2 -> iy = (2 + 20) / 2, ix = (4 + 20) / 2.
    f1 = torch.ones(1, 1, 10, 12)
    f2 = torch.zeros(1, 1, 10, 12)
    f2[0, 0, 4, 7] = 1
    out = correlation(f1, f2, path=path)
    assert out.shape == (1, 441, 10, 12)
    k = 11 * 21 + 12
    assert out[0, k, 2, 3] == 1 and out[0, k].sum() == 1
    # The pixel is seen from every f1 pixel at an even offset: y in {0, 2, 4, 6, 8}, x odd (6 of them).
    assert out.sum() == 30


@pytest.mark.parametrize("path", PATHS)
def test_correlation_gradcheck(path):
    # fast_mode: gradcheck's full mode runs one backward per output element (500 here), each with
    # small matmuls that stall on a busy 2-core machine (torch's 2-thread regions wait ~16 ms for
    # the second core: measured 16 ms per 20x20 bmm under load, 2 us with one thread).
    f1 = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: correlation(a, b, 2, 1, path=path), (f1, f2), fast_mode=True)


def test_correlation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of stride"):
        correlation(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 5, 2)
    with pytest.raises(ValueError, match="must be equal"):
        correlation(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))


def test_warp_agrees_with_grid_sample_inside_the_image():
    # An independent implementation: grid_sample with align_corners=True and coordinates
    # normalised by W - 1 and H - 1 samples the same bilinear interpolant; inside the image the two
    # agree to float32 rounding, outside ours is 0 where grid_sample blends with zero padding.
    torch.manual_seed(3)
    B, C, H, W = 2, 3, 17, 23
    x = torch.randn(B, C, H, W)
    flow = 4 * torch.randn(B, 2, H, W)
    ours, valid = backward_warp(x, flow)
    pos = pixel_grid(H, W) + flow
    grid = torch.stack((2 * pos[:, 0] / (W - 1) - 1, 2 * pos[:, 1] / (H - 1) - 1), dim=-1)  # (B, H, W, 2)
    reference = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    assert valid.mean() > 0.5
    assert torch.allclose(ours, reference * valid, atol=1e-5)


@pytest.mark.parametrize("tile", [1, 2, 3, 5, 64])
def test_correlation_tiles_give_the_same_result(tile):
    # Tiles of any width (one pixel, several per row with a padded last one, wider than a row) tile
    # the row exactly: the result is the definition's.
    torch.manual_seed(tile)
    f1 = torch.randn(2, 3, 4, 13, dtype=torch.float64)
    f2 = torch.randn(2, 3, 4, 13, dtype=torch.float64)
    for d, s in ((4, 2), (3, 1), (6, 3)):
        out = correlation(f1, f2, d, s, tile=tile, path="tiled")
        assert torch.allclose(out, naive_correlation(f1, f2, d, s), atol=1e-12)


@pytest.mark.parametrize("path", ["tiled", "all_pairs"])  # the definition runs in its inputs' dtype
def test_correlation_under_bf16_autocast_matches_float32(path):
    torch.manual_seed(5)
    f1 = torch.randn(2, 8, 6, 10, requires_grad=True)
    f2 = torch.randn(2, 8, 6, 10, requires_grad=True)
    reference = correlation(f1, f2, 4, 2, path=path)
    g1, g2 = torch.autograd.grad(reference.square().sum(), (f1, f2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = correlation(f1, f2, 4, 2, path=path)
    assert out.dtype == torch.bfloat16  # the matmuls ran in the autocast dtype, as torch.matmul would
    h1, h2 = torch.autograd.grad(out.float().square().sum(), (f1, f2))
    assert h1.dtype == h2.dtype == torch.float32
    assert torch.allclose(out.float(), reference, atol=0.03)
    for ours, exact in ((h1, g1), (h2, g2)):
        assert (ours - exact).norm() < 0.02 * exact.norm()


def test_border_padding_samples_the_nearest_image_point_and_carries_no_gradient_outside():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 5, 7)
    flow = torch.zeros(1, 2, 5, 7)
    flow[:, 0, :, 4:] = 10.0  # the three right columns point far to the right
    flow[:, 1, 0] = -0.25  # the top row a quarter pixel above the image
    flow.requires_grad_(True)
    warped, valid = backward_warp(x, flow, padding="border")
    zeros, valid_zeros = backward_warp(x, flow, padding="zeros")
    assert torch.equal(valid, valid_zeros) and valid[0, 0, 1:, 4:].sum() == 0 and valid[0, 0, 0].sum() == 0
    assert torch.equal(warped[..., 1:, 4:], x[..., 1:, 6:7].expand(-1, -1, -1, 3))  # the last column
    assert torch.equal(warped[..., 0, :4], x[..., 0, :4])  # clamped to row 0
    assert torch.equal(warped[..., 1:, :4], zeros[..., 1:, :4]) and zeros[..., 1:, 4:].abs().sum() == 0
    warped.sum().backward()
    # a clamped coordinate carries no gradient; the other one still moves along the border
    assert flow.grad[0, 0, 1:, 4:].abs().sum() == 0 and flow.grad[0, 1, 1:4, 4:].abs().sum() > 0
    assert flow.grad[0, 1, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="padding"):
        backward_warp(x, flow, padding="reflect")


# ------------------------------------------------------------------- the definitions and the fast paths
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_the_fast_warp_is_the_default_and_equals_the_definition(padding, monkeypatch):
    # warp.py's readable definition and warp_fast's hand-written backward, on the float32 inputs
    # training gives them (kinked_flow covers float64 and the kinks above): values and both gradients.
    calls = []
    fast = warp_fast.bilinear_warp
    monkeypatch.setattr(warp_fast, "bilinear_warp", lambda *a: calls.append(1) or fast(*a))
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 9, 11, generator=generator, requires_grad=True)
    flow = (4 * torch.randn(2, 2, 9, 11, generator=generator)).requires_grad_()
    weights = torch.randn(2, 6, 9, 11, generator=generator)
    results = []
    for path in (None, "definition"):
        warped, valid = backward_warp(x, flow, padding, path=path)
        results.append((warped, valid, *torch.autograd.grad((warped * weights).sum(), (x, flow))))
    assert calls == [1]  # the default ran the fast path, "definition" did not
    for fast_value, definition_value in zip(*results):
        assert torch.allclose(fast_value, definition_value, rtol=1e-5, atol=1e-5)
    assert results[0][3].abs().sum() > 0 and 0 < results[0][1].mean() < 1
    with pytest.raises(ValueError, match="path"):
        backward_warp(x, flow, path="grid_sample")


def test_every_correlation_path_equals_the_definition_at_the_quick_recipes_shape():
    # The quick recipe's cost volume (d 4, stride 1) on a 16x32 map, and EFC's (d 20, stride 2) on a
    # map narrower than its reach: float32, values and gradients of each fast path against the definition.
    generator = torch.Generator().manual_seed(6)
    for shape, d, s in (((2, 32, 16, 32), 4, 1), ((1, 16, 12, 14), 20, 2)):
        f1 = torch.randn(*shape, generator=generator, requires_grad=True)
        f2 = torch.randn(*shape, generator=generator, requires_grad=True)
        definition = correlation(f1, f2, d, s, path="definition")
        weights = torch.randn(definition.shape, generator=generator)
        expected = torch.autograd.grad((definition * weights).sum(), (f1, f2))
        for path in ("tiled", "all_pairs", None):
            out = correlation(f1, f2, d, s, path=path)
            assert torch.allclose(out, definition, atol=1e-5), (shape, path)
            grads = torch.autograd.grad((out * weights).sum(), (f1, f2))
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, expected)), (shape, path)
        assert definition.abs().sum() > 0
