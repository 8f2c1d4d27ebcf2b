"""Tests of losses.py: EFC eqs. (2)-(9) and Flow2Seg eq. (1), on small hand-made tensors.

No model is built: `make_pair` returns a batch and an output dict that follow the contract of
EFCNet.forward_pair (model.py), for 32 x 48 images with decoder grids at strides 4 to 64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import losses
import warp
import synthetic

H, W = 32, 48
GRIDS = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]  # strides 4, 8, 16, 32, 64 of a 32 x 48 image
FEATURES = (8, 4, 6)  # C_S, h8, w8


def texture(*shape, seed=0):
    """A smooth random image in [0, 1]: uniform noise averaged over 3 x 3."""
    g = torch.Generator().manual_seed(seed)
    B, C, h, w = shape
    return F.avg_pool2d(torch.rand(B, C, h + 2, w + 2, generator=g), 3, stride=1)


def shifted(x_b, u, v):
    """Frame a with x_a(x, y) = x_b(x + u, y + v) for integer (u, v): F_a->b = (u, v) everywhere.

    Pixels whose target leaves the image get wrapped-around content, i.e. they are occluded.
    """
    return torch.roll(x_b, shifts=(-v, -u), dims=(2, 3))


def constant_flow(B, h, w, u, v):
    return torch.tensor([float(u), float(v)]).view(1, 2, 1, 1).expand(B, 2, h, w).clone()


def make_pair(B=2, K=4, seed=0, image_value=None, flow_scale=2.0, occ=None):
    """A batch (frame a labelled, frame b not) and an EFCNet output dict whose tensors are leaves."""
    g = torch.Generator().manual_seed(seed)
    rgb_a, rgb_b = texture(B, 3, H, W, seed=seed), texture(B, 3, H, W, seed=seed + 1)
    if image_value is not None:
        rgb_a, rgb_b = torch.full_like(rgb_a, image_value), torch.full_like(rgb_b, image_value)
    batch = {"image_a": data.normalize(rgb_a), "image_b": data.normalize(rgb_b),
             "label_a": torch.randint(0, K, (B, H, W), generator=g),
             "label_b": torch.full((B, H, W), 255, dtype=torch.int64)}

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    def probabilities(h, w):
        p = torch.rand(B, 1, h, w, generator=g) if occ is None else torch.full((B, 1, h, w), float(occ))
        return p.requires_grad_()

    outputs = {"logits_a": leaf(B, K, H, W), "logits_b": leaf(B, K, H, W),
               "aux_a": leaf(B, K, H, W), "aux_b": leaf(B, K, H, W),
               "S_a": leaf(B, *FEATURES), "S_b": leaf(B, *FEATURES),
               "flow_ab": [(flow_scale * torch.randn(B, 2, h, w, generator=g)).requires_grad_() for h, w in GRIDS],
               "flow_ba": [(flow_scale * torch.randn(B, 2, h, w, generator=g)).requires_grad_() for h, w in GRIDS],
               "occ_a": [probabilities(h, w) for h, w in GRIDS],
               "occ_b": [probabilities(h, w) for h, w in GRIDS]}
    return outputs, batch


def leaves(outputs):
    for value in outputs.values():
        for t in (value if isinstance(value, list) else [value]):
            if t is not None:
                yield t


def weighted_total(terms, weights=losses.EFC_WEIGHTS):
    return (terms["seg"] + weights["cons"] * terms["cons"] + weights["occ"] * terms["occ"]
            + weights["sm"] * terms["sm"] + terms["pm"])


# ------------------------------------------------------------------------------------ SSIM
def test_ssim_of_an_image_with_itself_is_one():
    x = texture(2, 3, H, W)
    s = losses.ssim(x, x)
    assert s.shape == x.shape
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
    c = torch.full((1, 3, 5, 7), 0.3)
    torch.testing.assert_close(losses.ssim(c, c), torch.ones_like(c), atol=1e-6, rtol=0)


def ssim_by_hand(xs, ys):
    """SSIM of two lists of the 9 values in one 3 x 3 window (population statistics)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    vx = sum(a * a for a in xs) / n - mx * mx
    vy = sum(b * b for b in ys) / n - my * my
    cxy = sum(a * b for a, b in zip(xs, ys)) / n - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def test_ssim_matches_hand_computed_values_centre_and_reflected_corner():
    x = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]
    y = [[0.2, 0.1, 0.4], [0.3, 0.6, 0.5], [0.9, 0.7, 0.8]]
    s = losses.ssim(torch.tensor(x).view(1, 1, 3, 3), torch.tensor(y).view(1, 1, 3, 3))
    # Centre: the window is the whole patch.
    centre = ssim_by_hand(sum(x, []), sum(y, []))
    # Corner (0, 0): reflection padding makes the window rows (1, 0, 1) and columns (1, 0, 1).
    corner = ssim_by_hand([x[r][c] for r in (1, 0, 1) for c in (1, 0, 1)],
                          [y[r][c] for r in (1, 0, 1) for c in (1, 0, 1)])
    assert s[0, 0, 1, 1].item() == pytest.approx(centre, abs=1e-5)
    assert s[0, 0, 0, 0].item() == pytest.approx(corner, abs=1e-5)
    # By hand: both means 0.5, both variances 0.0667, covariance 0.06 ->
    # (0.5 + C1)(0.12 + C2) / ((0.5 + C1)(0.1333 + C2)) = 0.9007.
    assert centre == pytest.approx(0.9007, abs=1e-4)


def test_ssim_is_float32_under_bf16_autocast_and_handles_one_pixel_maps():
    x, y = texture(1, 3, 1, 2), texture(1, 3, 1, 2, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = losses.ssim(x.bfloat16(), y.bfloat16())
    assert s.dtype == torch.float32 and s.shape == x.shape and torch.isfinite(s).all()
    with pytest.raises(ValueError):
        losses.ssim(x, texture(1, 3, 2, 2))


# ------------------------------------------------------------------------------ L_pm, eq. (6)
def test_photometric_loss_vanishes_with_the_ground_truth_flow_on_non_occluded_pixels():
    I_b = texture(2, 3, H, W)
    u, v = 3, -2
    I_a = shifted(I_b, u, v)
    flow = constant_flow(2, H, W, u, v)
    _, valid = warp.backward_warp(I_b, flow)
    # Occluded: the target leaves the image, and (for SSIM's 3 x 3 window) its neighbours.
    O_est = F.max_pool2d(1 - valid, 3, stride=1, padding=1)
    assert 0.05 < O_est.mean() < 0.5
    at_truth = losses.photometric_loss(I_a, I_b, flow, O_est, 0)
    at_zero = losses.photometric_loss(I_a, I_b, torch.zeros_like(flow), O_est, 0)
    assert at_truth.item() < 1e-6
    assert at_zero.item() > 0.1


def test_descending_photometric_and_smoothness_losses_recovers_a_translation():
    """L_ph + L_sm, minimised over a free per-pixel flow that starts at zero, finds F_a->b = (2, -1):
    the losses' gradients point the right way through backward_warp (a flipped convention would
    pull towards (-2, 1), EPE 4.5)."""
    I_b = F.avg_pool2d(texture(1, 3, H + 4, W + 4, seed=3), 5, stride=1)  # smoother: a wider basin
    u, v = 2, -1
    I_a = shifted(I_b, u, v)
    truth = constant_flow(1, H, W, u, v)
    O_est = F.max_pool2d(1 - warp.backward_warp(I_b, truth)[1], 3, stride=1, padding=1)  # wrapped-around rim
    flow = torch.zeros(1, 2, H, W, requires_grad=True)
    optimizer = torch.optim.Adam([flow], lr=0.1)
    for _ in range(200):
        # lambda_sm 0.3: with the edge constant 150 the smoothness acts only where the texture is
        # flat, which a free per-pixel flow needs to carry the translation there
        loss = losses.photometric_loss(I_a, I_b, flow, O_est, 0) + 0.3 * losses.smoothness_loss(flow, I_a)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    epe = (flow.detach() - truth).norm(dim=1)[0][O_est[0, 0] == 0]  # the zero flow's EPE is 2.24
    assert epe.mean() < 0.1 and epe.quantile(0.95) < 0.3  # measured: 0.055 and 0.081


def test_photometric_weight_follows_error_and_occlusion_masks():
    I_a, I_b = texture(1, 3, 8, 12), texture(1, 3, 8, 12, seed=1)
    flow = torch.zeros(1, 2, 8, 12)
    G = losses.photometric_map(I_a, I_b)  # (1, 1, 8, 12)
    assert G.shape == (1, 1, 8, 12)
    O_error, O_est = torch.zeros(1, 1, 8, 12), torch.zeros(1, 1, 8, 12)
    O_error[..., :4] = 1
    O_est[..., 8:] = 1
    expected = (G * (1 + O_error - O_est)).mean()
    torch.testing.assert_close(losses.photometric_loss(I_a, I_b, flow, O_est, O_error), expected)


# ------------------------------------------------------------------------------ L_sm, eq. (7)
def test_smoothness_is_zero_for_a_constant_flow():
    image = texture(2, 3, H, W)
    assert losses.smoothness_loss(constant_flow(2, H, W, 3.7, -1.2), image).item() == 0.0


def test_smoothness_grows_with_flow_discontinuities_away_from_image_edges():
    flat = torch.full((1, 3, H, W), 0.5)
    edge = torch.zeros(1, 3, H, W)
    edge[..., 24:] = 1.0  # a black-to-white vertical edge between columns 23 and 24

    def step(column, size):
        flow = torch.zeros(1, 2, H, W)
        flow[:, 0, :, column:] = size
        return flow

    small, large = losses.smoothness_loss(step(12, 1.0), flat), losses.smoothness_loss(step(12, 2.0), flat)
    assert small.item() > 0
    assert large.item() == pytest.approx(2 * small.item(), rel=1e-6)
    on_edge, off_edge = losses.smoothness_loss(step(24, 2.0), edge), losses.smoothness_loss(step(12, 2.0), edge)
    assert on_edge.item() < 1e-3 * off_edge.item()


# ----------------------------------------------------------------------------- L_cons, eq. (2)
def test_consistency_loss_vanishes_for_features_warped_with_the_true_flow():
    S_b = torch.randn(2, *FEATURES, generator=torch.Generator().manual_seed(0))
    u, v = 1, -1  # in feature pixels (stride 8)
    S_a = shifted(S_b, u, v)
    flow = constant_flow(2, 8, 12, 2 * u, 2 * v)  # the finest flow, stride 4: twice the displacement
    _, valid = warp.backward_warp(S_b, constant_flow(2, 4, 6, u, v))
    O_est = F.interpolate(1 - valid, scale_factor=2, mode="nearest")  # (2, 1, 8, 12) on the flow's grid
    at_truth = losses.consistency_loss(S_a, S_b, flow, O_est)
    at_zero = losses.consistency_loss(S_a, S_b, torch.zeros_like(flow), O_est)
    assert at_truth.item() < 1e-2  # sqrt(NORM_EPS) = 1e-3 at most
    assert at_zero.item() > 0.5  # RMS over channels of two unrelated unit-variance maps: ~1


def test_consistency_gradient_reaches_encoder_and_flow_but_not_occlusion():
    encoder = torch.nn.Conv2d(3, FEATURES[0], kernel_size=8, stride=8)
    I_a, I_b = texture(2, 3, H, W), texture(2, 3, H, W, seed=1)
    S_a, S_b = encoder(I_a), encoder(I_b)  # (2, 8, 4, 6)
    S_a.retain_grad()
    S_b.retain_grad()
    flow = torch.full((2, 2, 8, 12), 0.7, requires_grad=True)
    logit = torch.zeros(2, 1, 8, 12, requires_grad=True)
    losses.consistency_loss(S_a, S_b, flow, torch.sigmoid(logit)).backward()
    for grad in (encoder.weight.grad, S_a.grad, S_b.grad, flow.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert logit.grad is None  # O_est is a detached weight in L_cons (see consistency_loss)


def test_consistency_norm_has_a_finite_gradient_at_zero_distance():
    S = torch.randn(1, 4, 3, 5, requires_grad=True)
    flow = torch.zeros(1, 2, 3, 5, requires_grad=True)
    losses.consistency_loss(S, S, flow, 0).backward()
    assert torch.isfinite(S.grad).all() and torch.isfinite(flow.grad).all()


# ------------------------------------------------------------------------------ L_occ, eq. (4)
def half_occluded_backward_flow():
    """F_b->a moving every pixel W/2 to the left: the right half of frame a receives nothing."""
    flow_ba = constant_flow(1, 8, 12, -6, 0)
    O_hat = warp.occlusion_mask(flow_ba)
    assert O_hat[..., :6].sum() == 0 and O_hat[..., 6:].min() == 1
    return flow_ba, O_hat


def test_occlusion_loss_is_lowest_when_O_est_equals_O_hat():
    flow_ba, O_hat = half_occluded_backward_flow()
    best = losses.occlusion_loss(O_hat, flow_ba)
    g = torch.Generator().manual_seed(0)
    others = [1 - O_hat, torch.full_like(O_hat, 0.5), torch.zeros_like(O_hat), torch.ones_like(O_hat),
              0.9 * O_hat + 0.05, (O_hat + 0.3 * torch.rand(O_hat.shape, generator=g)).clamp(0, 1)]
    for O_est in others:
        assert losses.occlusion_loss(O_est, flow_ba).item() > best.item()
    assert torch.isfinite(losses.occlusion_loss(1 - O_hat, flow_ba))  # log(0) is clamped


def test_larger_alpha_moves_the_occlusion_optimum_toward_less_occlusion():
    flow_ba, O_hat = half_occluded_backward_flow()
    levels = torch.linspace(0.01, 0.99, 99)

    def optimum(alpha):
        values = [losses.occlusion_loss(torch.full_like(O_hat, c.item()), flow_ba, alpha).item() for c in levels]
        return levels[min(range(len(values)), key=values.__getitem__)].item()

    assert optimum(0.0) == pytest.approx(0.5, abs=0.011)
    assert optimum(0.0) > optimum(losses.ALPHA_OCC) > optimum(0.8)


def test_no_gradient_flows_into_O_hat():
    flow_ba = torch.randn(1, 2, 8, 12, requires_grad=True)
    O_est = torch.full((1, 1, 8, 12), 0.3, requires_grad=True)
    assert not warp.occlusion_mask(flow_ba).requires_grad
    grad_flow, grad_occ = torch.autograd.grad(losses.occlusion_loss(O_est, flow_ba), [flow_ba, O_est],
                                              allow_unused=True)
    assert grad_flow is None
    assert grad_occ is not None and grad_occ.abs().sum() > 0


# ---------------------------------------------------------------------- O_seg, O_error, eq. (5)
def test_error_map_on_hand_made_masks():
    O_seg = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 5)
    O_est = torch.tensor([1.0, 0.3, 0.0, 0.6, 0.0], requires_grad=True).view(1, 1, 1, 5)
    O_error = losses.error_map(O_seg, O_est)
    torch.testing.assert_close(O_error, torch.tensor([0.0, 0.7, 0.0, 0.0, 1.0]).view(1, 1, 1, 5))
    assert not O_error.requires_grad
    torch.testing.assert_close(losses.error_map(O_seg, 0), O_seg)


def test_segmentation_mismatch_with_true_and_zero_flow():
    M_b = torch.zeros(1, 8, 12, dtype=torch.int64)
    M_b[..., 6:] = 1  # class 1 from column 6
    logits_b = 5 * F.one_hot(M_b, 3).permute(0, 3, 1, 2).float()  # (1, 3, 8, 12)
    logits_a = shifted(logits_b, 2, 0)  # class 1 from column 4 in frame a
    at_truth = losses.segmentation_mismatch(logits_a, logits_b, constant_flow(1, 8, 12, 2, 0))
    expected = torch.zeros(1, 1, 8, 12)
    expected[..., 10:] = 1  # the flow leaves the image: no correspondence
    torch.testing.assert_close(at_truth, expected)
    at_zero = losses.segmentation_mismatch(logits_a, logits_b, torch.zeros(1, 2, 8, 12))
    expected = torch.zeros(1, 1, 8, 12)
    expected[..., 4:6] = 1
    expected[..., 10:] = 1  # the wrapped-around columns of frame a disagree too
    torch.testing.assert_close(at_zero, expected)


# ------------------------------------------------------------------------------ L_seg, eq. (8)
def test_segmentation_loss_ignores_255_adds_aux_and_is_zero_without_labels():
    g = torch.Generator().manual_seed(0)
    logits, aux = torch.randn(2, 4, 6, 7, generator=g), torch.randn(2, 4, 6, 7, generator=g)
    labels = torch.randint(0, 4, (2, 6, 7), generator=g)
    labels[0, :3] = 255
    torch.testing.assert_close(losses.segmentation_loss(logits, labels),
                               F.cross_entropy(logits, labels, ignore_index=255))
    torch.testing.assert_close(losses.segmentation_loss(logits, labels, aux),
                               F.cross_entropy(logits, labels, ignore_index=255)
                               + 0.4 * F.cross_entropy(aux, labels, ignore_index=255))
    logits.requires_grad_()
    unlabelled = losses.segmentation_loss(logits, torch.full_like(labels, 255), aux)
    assert unlabelled.item() == 0.0
    unlabelled.backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        losses.segmentation_loss(logits, labels.int())


# --------------------------------------------------------------------------- efc_loss, eq. (9)
def test_efc_loss_total_is_the_weighted_sum_and_every_leaf_gets_a_gradient():
    outputs, batch = make_pair()
    total, terms = losses.efc_loss(outputs, batch)
    assert set(terms) == {"seg", "cons", "occ", "sm", "pm", "warmup"}
    assert all(t.item() != 0 for n, t in terms.items() if n != "warmup") and terms["warmup"].item() == 0
    torch.testing.assert_close(total.detach(), weighted_total(terms))
    total.backward()
    # every output gets a gradient, except the flows and occlusions of grids below MIN_GRID
    small = {id(t) for key in ("flow_ab", "flow_ba", "occ_a", "occ_b") for t in outputs[key]
             if min(t.shape[2:]) < losses.MIN_GRID}
    assert small  # the test's coarsest grids are smaller than MIN_GRID
    for t in leaves(outputs):
        if id(t) in small:
            assert t.grad is None
        else:
            assert t.grad is not None and torch.isfinite(t.grad).all()
    heavier, _ = losses.efc_loss(outputs, batch, {"cons": 1.0})
    torch.testing.assert_close(heavier.detach(), weighted_total(terms, {**losses.EFC_WEIGHTS, "cons": 1.0}))


def test_efc_loss_ablation_switches_drop_exactly_the_terms_they_name():
    outputs, batch = make_pair()
    _, full = losses.efc_loss(outputs, batch)

    def run(**switches):
        total, terms = losses.efc_loss(outputs, batch, **switches)
        torch.testing.assert_close(total.detach(), weighted_total(terms))
        return terms

    no_occ = run(occlusion=False)
    assert no_occ["occ"] == 0 and no_occ["seg"] == full["seg"] and no_occ["sm"] == full["sm"]
    assert no_occ["cons"] != full["cons"] and no_occ["pm"] != full["pm"]  # O_est = 0 in the weights

    no_error = run(error_mask=False)
    assert all(no_error[k] == full[k] for k in ("seg", "cons", "occ", "sm"))
    assert no_error["pm"] < full["pm"]  # O_error only ever adds weight

    no_cons = run(consistency=False)
    assert no_cons["cons"] == 0 and all(no_cons[k] == full[k] for k in ("seg", "occ", "sm", "pm"))

    flow_only = run(flow_only=True)
    assert flow_only["seg"] == 0 and flow_only["cons"] == 0
    assert all(flow_only[k] == no_error[k] for k in ("occ", "sm", "pm"))

    frozen = run(frozen_flow=True)
    assert frozen["pm"] == 0 and frozen["sm"] == 0 and frozen["occ"] == 0
    assert frozen["seg"] == full["seg"] and frozen["cons"] == full["cons"]


def test_flow_only_runs_without_segmentation_outputs():
    outputs, batch = make_pair()
    outputs.update(logits_a=None, logits_b=None, aux_a=None, aux_b=None)
    total, terms = losses.efc_loss(outputs, batch, flow_only=True, occlusion=False)
    assert terms["seg"] == 0 and terms["cons"] == 0 and terms["occ"] == 0
    torch.testing.assert_close(total.detach(), terms["pm"] + 0.5 * terms["sm"])
    with pytest.raises(ValueError, match="flow_only"):
        losses.efc_loss(outputs, batch)


def test_frozen_flow_detaches_flow_and_occlusion_but_trains_the_encoder():
    outputs, batch = make_pair()
    total, _ = losses.efc_loss(outputs, batch, frozen_flow=True)
    total.backward()
    assert all(t.grad is None for t in outputs["flow_ab"] + outputs["flow_ba"] + outputs["occ_a"] + outputs["occ_b"])
    assert outputs["S_a"].grad.abs().sum() > 0 and outputs["S_b"].grad.abs().sum() > 0


def test_efc_loss_refuses_contradictory_switches_and_unknown_weights():
    outputs, batch = make_pair()
    with pytest.raises(ValueError):
        losses.efc_loss(outputs, batch, flow_only=True, frozen_flow=True)
    with pytest.raises(ValueError):
        losses.efc_loss(outputs, batch, frozen_flow=True, consistency=False)
    with pytest.raises(ValueError):
        losses.efc_loss(outputs, batch, {"smooth": 0.5})


@pytest.mark.parametrize("autocast", [False, True])
def test_efc_loss_is_finite_for_constant_images_far_flows_saturated_occlusion_and_no_labels(autocast):
    outputs, batch = make_pair(image_value=0.5, flow_scale=1e4, occ=1.0)
    for occ in outputs["occ_b"]:
        occ.data.zero_()  # O_est exactly 0 in frame b, exactly 1 in frame a
    batch["label_a"].fill_(255)
    if autocast:  # a bf16 network's outputs, the loss called inside the autocast region
        outputs = {k: [t.detach().bfloat16().requires_grad_() for t in v] if isinstance(v, list)
                   else v.detach().bfloat16().requires_grad_() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, terms = losses.efc_loss(outputs, batch)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(t) for t in terms.values()) and terms["seg"] == 0
    total.backward()
    for t in leaves(outputs):
        assert t.grad is None or torch.isfinite(t.grad).all()
    assert outputs["flow_ab"][0].grad is not None


# --------------------------------------------------------------------- Flow2Seg, eq. (1)
def test_flow2seg_loss_weights_and_all_ignore_labels():
    g = torch.Generator().manual_seed(0)
    outputs = {k: torch.randn(2, 5, 6, 7, generator=g, requires_grad=True)
               for k in ("logits", "image_logits", "flow_logits", "aux")}
    labels = torch.randint(0, 5, (2, 6, 7), generator=g)
    total, terms = losses.flow2seg_loss(outputs, labels)

    def ce(key):
        return F.cross_entropy(outputs[key], labels, ignore_index=255).detach()

    torch.testing.assert_close(terms["image"], ce("image_logits"))
    torch.testing.assert_close(terms["fusion"], ce("logits"))
    torch.testing.assert_close(total.detach(), ce("image_logits") + ce("logits")
                               + 0.2 * ce("flow_logits") + 0.4 * ce("aux"))
    total, terms = losses.flow2seg_loss(outputs, torch.full_like(labels, 255))
    assert total.item() == 0.0 and not math.isnan(total.item())


# ------------------------------------------------------------ the flow losses prefer the true flow
@pytest.fixture(scope="module")
def moving_world(tmp_path_factory):
    """One val snippet of the synthetic world at its default size (128 x 256), where it moves 5-9 px."""
    return data.SyntheticSequence(synthetic.make_synthetic_world(tmp_path_factory.mktemp("moving") / "world", num_train=0,
                                                            num_val=1, seed=0, workers=1), "val")


def scale_losses(sequence, frames, stride, padding, crop=None):
    """Mean L_pm (no occlusion weights) of the true flow and of zero flow on the grid of `stride`."""
    true = zero = 0.0
    for i in frames:
        item = sequence[i]
        I_a, I_b = data.denormalize(item["image_a"][None]), data.denormalize(item["image_b"][None])
        flow = item["flow_fw"][None]  # (1, 2, 128, 256)
        if crop is not None:  # a 96 x 96 training crop
            I_a, I_b, flow = (x[..., 16:16 + crop, 80:80 + crop] for x in (I_a, I_b, flow))
        size = (I_a.shape[2] // stride, I_a.shape[3] // stride)
        a, b, f = losses.resize_image(I_a, size), losses.resize_image(I_b, size), warp.resize_flow(flow, size)
        for value, name in ((f, "true"), (torch.zeros_like(f), "zero")):
            warped, _ = warp.backward_warp(b, value, padding=padding)
            loss = losses.photometric_map(a, warped).mean().item() / len(frames)
            true, zero = (true + loss, zero) if name == "true" else (true, zero + loss)
    return true, zero


def test_true_flow_has_lower_photometric_loss_than_zero_flow_at_every_trained_scale(moving_world):
    frames = (3, 10, 17, 24)
    # the scales efc_loss trains: full resolution, then the decoder grids of >= MIN_GRID pixels
    for crop, strides in ((None, (1, 4, 8, 16)), (96, (1, 4, 8))):
        for stride in strides:
            true, zero = scale_losses(moving_world, frames, stride, "border", crop)
            assert true < 0.7 * zero, (crop, stride, true, zero)
    # why border padding: zero-filled samples (black beyond the frame) make the true flow lose
    # on the coarse grids, where the pixels that leave a frame are a large share
    losing = [s for s in (8, 16) if scale_losses(moving_world, frames, s, "zeros")[0]
              > scale_losses(moving_world, frames, s, "zeros")[1]]
    assert losing, "zero padding was expected to make the true flow lose at a coarse scale"


def test_flow_scales_adds_full_resolution_and_drops_grids_below_min_grid():
    flows = {k: [torch.randn(1, 2, s, s) for s in (24, 12, 6, 3, 2)] for k in "ab"}
    occ = {k: [torch.rand(1, 1, s, s) for s in (24, 12, 6, 3, 2)] for k in "ab"}
    scales = losses.flow_scales(flows, occ, (96, 96))
    assert [tuple(f["a"].shape[2:]) for f, _ in scales] == [(96, 96), (24, 24), (12, 12)]
    assert torch.allclose(scales[0][0]["b"], warp.resize_flow(flows["b"][0], (96, 96)))  # values x4
    assert scales[0][1]["a"].shape == (1, 1, 96, 96) and scales[1][0]["a"] is flows["a"][0]


def test_consistency_loss_is_the_plain_norm_and_ignores_pixels_whose_flow_leaves_the_frame():
    C = 16
    S_a = torch.zeros(1, C, 8, 8)
    S_b = torch.full((1, C, 8, 8), 0.5)  # ||S_a - S_b||_2 = 0.5 sqrt(C) = 2 at every pixel
    flow = torch.zeros(1, 2, 32, 32)  # the finest flow at 4x the features' grid
    assert losses.consistency_loss(S_a, S_b, flow, 0).item() == pytest.approx(2.0, abs=1e-3)
    # the right half of the pixels points 40 image px (10 feature px) to the right: out of the frame
    # and not counted, while S_a there is wildly different from anything
    S_a[..., 4:] = 100.0
    flow[:, 0, :, 16:] = 40.0
    assert losses.consistency_loss(S_a, S_b, flow, 0).item() == pytest.approx(2.0, abs=1e-3)


def test_flow_regression_loss_is_the_mean_epe_in_input_pixels_over_valid_pixels():
    zero = torch.zeros(2, 2, 32, 32)
    constant = torch.zeros(2, 2, 8, 8)
    # a constant (3, 4) image-px flow, predicted on a stride-4 grid (0.75, 1.0 of its own pixels)
    outputs = {"flow_ab": [constant + torch.tensor([3.0, 4.0]).view(1, 2, 1, 1) / 4], "flow_ba": [constant]}
    assert losses.flow_regression_loss(outputs, zero, zero).item() == pytest.approx(5.0, abs=1e-3)
    # the truth costs nothing; invalid pixels do not count
    truth = zero + torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    assert losses.flow_regression_loss(outputs, truth, zero).item() == pytest.approx(0.0, abs=3e-3)
    wrong = truth.clone()
    wrong[:, :, :, 16:] = 100.0
    valid = torch.ones(2, 32, 32)
    valid[:, :, 16:] = 0
    assert losses.flow_regression_loss(outputs, wrong, zero, valid, None).item() == pytest.approx(0.0, abs=3e-3)
    assert losses.flow_regression_loss(outputs, wrong, zero).item() > 50


def test_unsupervised_loss_prefers_the_true_flow_to_a_constant_pan_per_pair(moving_world):
    """efc_loss (flow only: L_pm + 0.5 L_sm over flow_scales) of the true flows of 96x96 crops, as if
    the decoder had predicted them at its five grids, against each pair's own constant pan: with an
    edge constant of 10 the pan won (the smoothness of the cars' outlines outweighed their
    photometric gain), so a network could not be taught to see moving cars."""
    frames = [moving_world[i] for i in range(2, 29, 4)]
    crop = {k: torch.stack([f[k][..., 16:112, 80:176] for f in frames]) for k in ("image_a", "image_b", "flow_fw", "flow_bw")}
    grids = [(24, 24), (12, 12), (6, 6), (3, 3), (2, 2)]

    def loss(fw, bw, edge):
        out = {"flow_ab": [warp.resize_flow(fw, g) for g in grids], "flow_ba": [warp.resize_flow(bw, g) for g in grids],
               "occ_a": [torch.zeros(len(fw), 1, *g) for g in grids], "occ_b": [torch.zeros(len(fw), 1, *g) for g in grids],
               "logits_a": None, "logits_b": None, "S_a": None, "S_b": None}
        return losses.efc_loss(out, crop, flow_only=True, occlusion=False, edge_weight=edge)[0].item()

    def pan(flow):  # (B, 2, h, w) -> each pair's median flow everywhere
        return flow.flatten(2).median(2).values[..., None, None].expand_as(flow)

    truth, pans = (crop["flow_fw"], crop["flow_bw"]), (pan(crop["flow_fw"]), pan(crop["flow_bw"]))
    assert loss(*truth, losses.EDGE_WEIGHT) < 0.9 * loss(*pans, losses.EDGE_WEIGHT)
    assert loss(*truth, 10.0) > loss(*pans, 10.0)  # the old constant: the pan wins


def test_warmup_replaces_the_flow_terms_by_the_regression_to_the_matching_flow():
    outputs, batch = make_pair()
    g = torch.Generator().manual_seed(5)
    outputs["match_ab"] = torch.randn(2, 2, *FEATURES[1:], generator=g)  # feature pixels, stride 8
    outputs["match_ba"] = torch.randn(2, 2, *FEATURES[1:], generator=g)
    total, terms = losses.efc_loss(outputs, batch, warmup=True)
    expected = losses.flow_regression_loss(outputs, warp.resize_flow(outputs["match_ab"], (H, W)),
                                           warp.resize_flow(outputs["match_ba"], (H, W)))
    assert terms["warmup"].item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 0.1
    assert all(terms[n].item() == 0 for n in ("pm", "sm", "occ", "cons"))
    assert total.item() == pytest.approx(terms["seg"].item() + terms["warmup"].item(), rel=1e-6)
    total.backward()  # the flows learn from it, the features get no L_cons gradient
    assert outputs["flow_ab"][0].grad.abs().sum() > 0 and outputs["S_a"].grad is None
    # after the warm-up the term is 0 and the paper's terms are back
    _, terms = losses.efc_loss(outputs, batch)
    assert terms["warmup"].item() == 0 and terms["pm"].item() > 0
    del outputs["match_ab"]
    with pytest.raises(ValueError, match="warmup=True"):
        losses.efc_loss(outputs, batch, warmup=True)


# ------------------------------------------------------- the switches back to the paper's settings
def test_sum_reduction_is_the_mean_times_the_pixels_per_image():
    # EFC writes every term as sum_xy: reduction="sum" sums each image's counted pixels, averaged over images
    x = torch.rand(3, 1, 5, 7)
    mask = (torch.rand(3, 1, 5, 7) > 0.4).float()
    count = mask.sum().item()
    assert losses.reduce_pixels(x, mask, "sum").item() == pytest.approx(
        losses.masked_mean(x, mask).item() * count / 3, rel=1e-6)
    assert losses.reduce_pixels(x, None, "sum").item() == pytest.approx(x.mean().item() * 5 * 7, rel=1e-6)
    labels = torch.randint(0, 4, (2, H, W))
    labels[0, :10] = 255
    logits = torch.randn(2, 4, H, W)
    mean, total = (losses.segmentation_loss(logits, labels, reduction=r).item() for r in ("mean", "sum"))
    assert total == pytest.approx(mean * (labels != 255).sum().item() / 2, rel=1e-5)
    with pytest.raises(ValueError, match="expected 'mean' or 'sum'"):
        losses.reduce_pixels(x, None, "max")


def test_edge_weight_is_the_constant_of_the_smoothness_edge_term():
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 0, :, 2:] = 1.0  # a jump of 1 px in u between columns 1 and 2
    image = torch.zeros(1, 3, 4, 4)
    image[..., 2:] = 0.1  # an image edge in the same place, |dI| = 0.1
    # the jump is 4 of the 12 horizontal differences; no vertical ones
    for w in (0.0, 1.0, losses.EDGE_WEIGHT):
        expected = 4 * math.exp(-w * 0.1) / 12
        assert losses.smoothness_loss(flow, image, edge_weight=w).item() == pytest.approx(expected, rel=1e-5)
    assert losses.smoothness_loss(flow, image).item() == pytest.approx(4 * math.exp(-15) / 12, rel=1e-4)


def test_full_res_scale_false_keeps_the_decoder_grids_alone():
    flows = {k: [torch.randn(1, 2, s, s) for s in (24, 12, 6)] for k in "ab"}
    occ = {k: [torch.rand(1, 1, s, s) for s in (24, 12, 6)] for k in "ab"}
    scales = losses.flow_scales(flows, occ, (96, 96), full_res=False)
    assert [tuple(f["a"].shape[2:]) for f, _ in scales] == [(24, 24), (12, 12)] and scales[0][0]["a"] is flows["a"][0]
    outputs, batch = make_pair()
    with_full = losses.efc_loss(outputs, batch)[1]
    without = losses.efc_loss(outputs, batch, full_res_scale=False)[1]
    for term in ("pm", "sm", "occ"):  # the flow terms change, L_seg and L_cons do not
        assert with_full[term] != without[term], term
    assert with_full["seg"] == without["seg"] and with_full["cons"] == without["cons"]


def test_detach_occ_in_cons_false_passes_the_gradient_into_O_est():
    S_a, S_b = torch.randn(1, 8, 4, 6, requires_grad=True), torch.randn(1, 8, 4, 6)
    flow = torch.zeros(1, 2, 8, 12)
    grads = {}
    for detach in (True, False):
        logit = torch.zeros(1, 1, 8, 12, requires_grad=True)
        loss = losses.consistency_loss(S_a, S_b, flow, torch.sigmoid(logit), detach_occ=detach)
        loss.backward()
        grads[detach] = logit.grad
    assert grads[True] is None
    # d/dO of mean((1 - O) d) is -d / count: O_est is pushed up where the features differ
    assert grads[False] is not None and (grads[False] < 0).all()
    outputs, batch = make_pair()
    losses.efc_loss(outputs, batch, detach_occ_in_cons=False, weights={"occ": 0, "sm": 0})[0].backward()
    with_gradient = outputs["occ_a"][0].grad.clone()
    outputs, batch = make_pair()
    losses.efc_loss(outputs, batch, weights={"occ": 0, "sm": 0})[0].backward()
    assert not torch.allclose(with_gradient, outputs["occ_a"][0].grad)
