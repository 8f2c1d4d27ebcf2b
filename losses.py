"""Training losses of both papers, as pure functions.

EFC ("Every Frame Counts", AAAI 2020), sections "Temporally Consistent Constraint", "Occlusion
Estimation", "Optical Flow Estimation" and "Joint Learning":
  eq. (2)  L_cons, feature consistency across the flow          -> consistency_loss
  eq. (4)  L_occ, occlusion against the range-map target O_hat  -> occlusion_loss
  eq. (5)  O_seg and the error mask O_error                     -> segmentation_mismatch, error_map
  eq. (6)  G and the photometric loss L_pm                      -> ssim, photometric_map, photometric_loss
  eq. (7)  edge-aware smoothness L_sm                           -> smoothness_loss
           the scales both are computed on                      -> flow_scales
  eq. (8)  L_seg, cross-entropy (+ the PSPNet auxiliary loss)   -> segmentation_loss
  eq. (9)  the total, with the ablation switches of Tables 1, 2 -> efc_loss
Not in the papers: flow_regression_loss, the EPE of the flow decoder against given flows (the
label-free warm-up towards the correlation's soft-argmax, efc_loss(warmup=True), and the
supervised diagnostic).
Flow2Seg ("Motion-Aided Semantic Segmentation"), section 3.4:
  eq. (1)  L = L_image + L_fusion + 0.2 L_flow + 0.4 L_aux      -> flow2seg_loss

Conventions are warp.py's: flow (B, 2, H, W) u first, in pixels of its own grid;
backward_warp(x_b, F_a->b) brings b's content onto a's grid (EFC eq. (1)); occlusion 1 = occluded.
Labels are int64 (B, H, W) with 255 = ignore. The paper's sums over pixels sum_xy become means over
pixels, so that the lambdas of eq. (9) do not depend on the crop size (reduction="sum" keeps the sums).
Our settings that the paper does not have, each with its keyword of efc_loss that restores the paper's
value, are listed in docs/choices.md#the-paper-recipe-against-the-papers.
Photometric, SSIM, smoothness and occlusion terms run in float32 even under autocast.
"""
import torch
import torch.nn.functional as F

import data
import warp

IGNORE_INDEX = 255
BETA = 0.85  # EFC eq. (6), following Yin and Shi 2018
ALPHA_OCC = 0.2  # EFC eq. (4), "0.2 is the best"
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # Wang et al. 2004 with a dynamic range of 1
# EFC writes exp(-|grad I|) without a constant. On [0, 1] images neighbouring pixels differ by
# 0.01-0.1, so exp(-|dI|) stays in [0.9, 1] and sees no edges: a car's outline must make the flow's
# jump there cheap. UFlow's 150 (ARFlow: 10; docs/learning.md#choices-measured-on-the-world).
EDGE_WEIGHT = 150.0
NORM_EPS = 1e-6  # sqrt(sum d^2 + eps): finite gradient at d = 0, a bias of at most 1e-3 per pixel
AUX_WEIGHT = 0.4  # PSPNet's auxiliary loss (Zhao et al. 2017), also Flow2Seg's beta
EFC_WEIGHTS = {"cons": 10.0, "occ": 0.4, "sm": 0.5}  # EFC "Implementation Details"
FLOW2SEG_ALPHA = 0.2  # Flow2Seg eq. (1): weight of L_Flow2Seg
TERMS = ("seg", "cons", "occ", "sm", "pm", "warmup")
# Decoder grids smaller than this on either side get no flow loss (the paper trains every scale of
# its 713x713 crops, whose coarsest grid is 12x12). At the quick recipe's 96x96 crop the strides
# 16, 32 and 64 give 6x6, 3x3 and 2x2 grids: area-averaged images that small keep no texture to
# match, and one cell of them is a third of the crop, so their loss only pulls the flow to a mean.
MIN_GRID = 8


def masked_mean(x, mask=None):
    """Mean of x over the elements where mask is 1; all elements without a mask.

    mask is a 0/1 map broadcastable to x; the count is clamped at 1, so an empty mask (all-ignore
    labels, or a zero-size map) gives exactly 0, never NaN. Every reduction below goes through here.

    Distributed (N > 1 processes): the mean over the *global* batch. Each process divides its own
    sum by the global count / N (one all_reduce of the count, no gradient); DDP averages the N
    gradients, so the step is that of sum over all processes / global count, as one process with
    the whole batch would take. A per-process mean would weigh a process's pixels by 1 / its own
    count: L_seg's weight would change with the process count and with how crops spread ignore
    pixels. Without a mask every process holds the same number of elements (equal local batches),
    so the local count is already the global one / N.
    """
    if mask is None:
        return x.sum() / max(x.numel(), 1)
    mask = mask.to(x.dtype).expand_as(x)
    return (x * mask).sum() / _per_process_count(mask.detach().sum(dtype=torch.float64)).to(x.dtype)


def reduce_pixels(x, mask=None, reduction="mean"):
    """Every EFC term's reduction: masked_mean, or with reduction="sum" the papers' sum_xy, the sum over
    each image's (masked) pixels, averaged over the batch's B images (B = x.shape[0]).

    Distributed: every process holds an equal share of the batch, so its own sum / its own B is the
    global mean over images / N, and DDP's averaged gradient is that of one process with the whole batch.
    """
    if reduction == "mean":
        return masked_mean(x, mask)
    if reduction != "sum":
        raise ValueError(f"reduction {reduction!r}: expected 'mean' or 'sum'")
    if mask is not None:
        x = x * mask.to(x.dtype).expand_as(x)
    return x.sum() / max(x.shape[0], 1)


def _per_process_count(count):
    """count (a 0-dim tensor) -> max(global count, 1) / N over the N processes (count itself when N = 1)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count.clamp(min=1)
    world = torch.distributed.get_world_size()
    if world == 1:
        return count.clamp(min=1)
    count = count.clone()
    torch.distributed.all_reduce(count)
    return count.clamp(min=1) / world


def _no_autocast(x):
    """A region where autocast is off on x's device: the terms inside are computed in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def resize_image(image, size):
    """Resample an image (B, C, H, W) to a decoder grid `size` = (h, w) by area averaging.

    Area (each coarse pixel is the mean of the fine pixels it covers) is anti-aliased, has no
    parameter to tune, and is the image a camera with larger pixels would record.
    """
    if tuple(image.shape[2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="area")


def ssim(x, y):
    """Per-pixel SSIM (Wang et al. 2004) of two images (B, C, H, W) in [0, 1] -> (B, C, H, W).

    Local statistics come from a 3x3 mean window, a simplification of the original 11x11 Gaussian.
    Borders: reflection padding of 1 before the 3x3 average, so the output has the input's size.
    """
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"ssim: x {tuple(x.shape)} and y {tuple(y.shape)} must be equal (B, C, H, W)")
    # A map one pixel thick (a coarse decoder scale of a small input) cannot be reflected: replicate.
    mode = "reflect" if min(x.shape[2:]) > 1 else "replicate"
    with _no_autocast(x):
        x, y = x.float(), y.float()

        def mean3x3(t):
            return F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode=mode), kernel_size=3, stride=1)

        mu_x, mu_y = mean3x3(x), mean3x3(y)
        sigma_x = mean3x3(x * x) - mu_x ** 2
        sigma_y = mean3x3(y * y) - mu_y ** 2
        sigma_xy = mean3x3(x * y) - mu_x * mu_y
        return ((2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
                / ((mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)))


def photometric_map(I, I_warped):
    """The loss map G of two images (B, 3, H, W) in [0, 1] -> (B, 1, H, W), mean over colours."""
    with _no_autocast(I):
        I, I_warped = I.float(), I_warped.float()
        dssim = ((1 - ssim(I, I_warped)) / 2).clamp(0, 1)  # (B, 3, H, W)
        # EFC eq. (6): G(I, I') = beta (1 - SSIM(I, I')) / 2 + (1 - beta) |I - I'|_1
        G = BETA * dssim + (1 - BETA) * (I - I_warped).abs()
        return G.mean(1, keepdim=True)  # (B, 1, H, W)


def photometric_loss(I_a, I_b, flow_ab, O_est_a, O_error_a, reduction="mean"):
    """L_pm of one scale and direction: frame b warped onto a by F_a->b, compared with frame a.

    I_a, I_b: (B, 3, h, w) in [0, 1] on the flow's grid; flow_ab: (B, 2, h, w);
    O_est_a, O_error_a: (B, 1, h, w) or 0. O_est keeps its gradient (eq. (4)'s penalty balances it).
    A point p + F(p) outside the image samples the nearest border pixel (warp's "border" padding, as
    ARFlow does), which is where the paper is silent. Zero-filled samples made a correct flow lose:
    on the synthetic world the true flow scored worse than zero flow at every decoder scale (all the
    pixels that leave the frame compared a colour with black). UnFlow instead masks the pixels whose
    flow leaves the image and normalises by the rest; with a mask taken from the predicted flow,
    pointing outside escapes the loss, so we do not mask: leaving the image is occlusion, learned by
    O_est (EFC's "in-and-out of image occlusion").
    """
    I_b_warped, _ = warp.backward_warp(I_b, flow_ab, padding="border")  # (B, 3, h, w) float32
    with _no_autocast(I_a):
        G = photometric_map(I_a, I_b_warped)  # (B, 1, h, w)
        # EFC eq. (6): L_pm = sum_xy G(I, I') * (1 + O_error - O_est)
        return reduce_pixels(G * (1 + O_error_a - O_est_a), reduction=reduction)


def smoothness_loss(flow, image, edge_weight=EDGE_WEIGHT, reduction="mean"):
    """L_sm of one scale, first order and edge-aware; edge_weight is the constant of exp(-w |grad I|)
    (EDGE_WEIGHT's comment; the paper's eq. (7): w = 1).

    flow: (B, 2, h, w) in pixels of its own grid (no further normalisation: a flow's gradient in its
    own grid's pixels is the same at every scale); image: (B, 3, h, w) in [0, 1] on that grid.
    |grad F| is |du| + |dv| (L1); |grad I| is the mean over colours of the absolute difference.
    """
    with _no_autocast(flow):
        flow, image = flow.float(), image.float()
        dF_dx = (flow[..., :, 1:] - flow[..., :, :-1]).abs().sum(1, keepdim=True)  # (B, 1, h, w-1)
        dF_dy = (flow[..., 1:, :] - flow[..., :-1, :]).abs().sum(1, keepdim=True)  # (B, 1, h-1, w)
        dI_dx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(1, keepdim=True)  # (B, 1, h, w-1)
        dI_dy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(1, keepdim=True)  # (B, 1, h-1, w)
        # EFC eq. (7): L_sm = sum_xy |grad F| * exp(-|grad I|), with exp(-edge_weight |grad I|)
        return (reduce_pixels(dF_dx * torch.exp(-edge_weight * dI_dx), reduction=reduction)
                + reduce_pixels(dF_dy * torch.exp(-edge_weight * dI_dy), reduction=reduction))


def consistency_loss(S_a, S_b, flow_ab, O_est_a, detach_occ=True, reduction="mean"):
    """L_cons of one direction on the shared encoder's features.

    S_a, S_b: (B, C_S, h8, w8); flow_ab: (B, 2, h, w) the finest flow (the network's best estimate),
    resized and rescaled to the features' grid; O_est_a: (B, 1, h, w) resized bilinearly, or 0.
    Gradient reaches S_a, S_b and the flow. ||S - S'||_2 is the paper's plain Euclidean norm over the
    C_S channels, so lambda_cons = 10 weighs it as the paper does (the norm grows with sqrt(C_S):
    layer3 has 256 channels in ResNet-18, 1024 in ResNet-50/101; its gradient is a unit vector
    per pixel whatever C_S). Averaged over the pixels whose p + F(p) lies inside the frame: a pixel
    that leaves it has no feature to be consistent with (zero-filled, S' = 0 would tie S_a to 0).

    O_est is a detached weight here (detach_occ; eq. (2) as written passes its gradient). With it, the minimum of
    lambda_cons (1 - O) d + lambda_occ BCE(O, 0) over O is O = 1 - lambda_occ / (lambda_cons d):
    near 1 for any feature distance d of an untrained encoder, so L_cons would switch itself off
    (measured: within one SGD step at lr 0.01). O_est still learns from L_occ and from L_pm, which
    is where the paper's "tends to predict more occlusion" shows.
    """
    size = S_a.shape[2:]
    flow = warp.resize_flow(flow_ab, size)  # (B, 2, h8, w8) in feature pixels
    if torch.is_tensor(O_est_a):
        O_est_a = F.interpolate((O_est_a.detach() if detach_occ else O_est_a).float(), size=size, mode="bilinear",
                                align_corners=False)  # (B, 1, h8, w8)
    S_b_warped, valid = warp.backward_warp(S_b, flow)  # S' = Warp(S_b, F_a->b), (B, C_S, h8, w8) float32
    difference = S_a.to(S_b_warped.dtype) - S_b_warped  # (B, C_S, h8, w8)
    distance = torch.sqrt(difference.pow(2).sum(1, keepdim=True) + NORM_EPS)  # (B, 1, h8, w8), ||S - S'||_2
    # EFC eq. (2): L_cons = sum_xy (1 - O_est) ||S - S'||_2
    return reduce_pixels((1 - O_est_a) * distance, valid, reduction)


def occlusion_loss(O_est_a, flow_ba, alpha=ALPHA_OCC, reduction="mean"):
    """L_occ of one scale and direction.

    O_est_a: (B, 1, h, w) sigmoid probabilities of frame a; flow_ba: (B, 2, h, w) the backward flow
    F_b->a, from which O_hat_a = warp.occlusion_mask (EFC eq. (3), a detached target).
    F.binary_cross_entropy clamps its log at -100 (no log(0)) and refuses autocast: float32 block.
    A larger alpha penalises occlusion more and moves the optimum toward less occlusion.
    """
    if O_est_a.shape[2:] != flow_ba.shape[2:] or O_est_a.shape[1] != 1:
        raise ValueError(f"occlusion_loss: O_est {tuple(O_est_a.shape)} must be (B, 1, h, w) "
                         f"on the grid of flow {tuple(flow_ba.shape)}")
    O_hat = warp.occlusion_mask(flow_ba).float()  # (B, 1, h, w), no gradient
    with _no_autocast(O_est_a):
        O_est = O_est_a.float()
        # EFC eq. (4): L_occ = sum_xy -log p(O_est = O_hat) - alpha exp(-O_est)
        return reduce_pixels(F.binary_cross_entropy(O_est, O_hat, reduction="none") - alpha * torch.exp(-O_est),
                             reduction=reduction)


@torch.no_grad()
def segmentation_mismatch(logits_a, logits_b, flow_ab):
    """O_seg of frame a on the flow's grid: 1 where a's segmentation disagrees with b's warped onto a.

    logits_a, logits_b: (B, K, H, W); flow_ab: (B, 2, h, w). Both are resized bilinearly to (h, w);
    M' is the argmax of b's softmax warped bilinearly ("warped segmentation prediction with bilinear
    interpolation"). Where the flow leaves the image there is no correspondence: O_seg = 1.
    Returns (B, 1, h, w) float, no gradient.
    """
    size = flow_ab.shape[2:]
    with _no_autocast(logits_a):
        logits_a = F.interpolate(logits_a.float(), size=size, mode="bilinear", align_corners=False)  # (B, K, h, w)
        logits_b = F.interpolate(logits_b.float(), size=size, mode="bilinear", align_corners=False)  # (B, K, h, w)
        M = logits_a.argmax(1, keepdim=True)  # (B, 1, h, w)
        P_b = logits_b.softmax(1)  # (B, K, h, w)
        P_b_warped, valid = warp.backward_warp(P_b, flow_ab)  # (B, K, h, w), (B, 1, h, w)
        M_warped = P_b_warped.argmax(1, keepdim=True)  # (B, 1, h, w), M'
        # EFC eq. (5): O_seg = (M != M'), and 1 where the flow leaves the image
        return ((M != M_warped) | (valid == 0)).float()


@torch.no_grad()
def error_map(O_seg, O_est):
    """O_error (B, 1, h, w) from O_seg and O_est (B, 1, h, w), or O_est = 0; a detached weight."""
    # EFC eq. (5): O_error = max(O_seg - O_est, 0)
    return (O_seg - O_est).clamp(min=0)


def segmentation_loss(logits, labels, aux=None, reduction="mean"):
    """L_seg: cross-entropy (B, K, H, W) vs labels (B, H, W), ignore 255, + 0.4 x the same on aux.

    Averaged over labelled pixels only; a batch whose labels are all 255 gives exactly 0.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"segmentation_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "must be (B, K, H, W) and (B, H, W)")
    if labels.dtype != torch.int64:
        raise ValueError(f"segmentation_loss: labels must be int64, got {labels.dtype}")

    def cross_entropy(x):
        # EFC eq. (8): L_seg = -sum_xy log p(M = M_gt)
        ce = F.cross_entropy(x.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
        return reduce_pixels(ce, labels != IGNORE_INDEX, reduction)

    return cross_entropy(logits) + (AUX_WEIGHT * cross_entropy(aux) if aux is not None else 0)


def flow_scales(flows, occ, image_size, full_res=True):
    """The grids the flow losses are computed on -> list of (flows, occ) dicts keyed 'a', 'b'.

    flows, occ: dicts 'a', 'b' -> lists of the decoder's (B, 2, h_l, w_l) flows and (B, 1, h_l, w_l)
    O_est, finest first; image_size (H, W). First the finest flow upsampled to the input resolution
    (resize_flow: values rescaled; O_est bilinearly), as GeoNet and UnFlow do: a warp at full
    resolution sees the image's own texture, where area-downsampled grids average it away (the
    paper trains only the decoder's grids, so this term is our addition: full_res=False leaves it out).
    Then every decoder grid of at least MIN_GRID pixels on each side, finest first (the paper's
    multi-scale terms).
    """
    size = tuple(image_size)
    full = ({k: warp.resize_flow(v[0], size) for k, v in flows.items()},
            {k: F.interpolate(v[0].float(), size=size, mode="bilinear", align_corners=False) for k, v in occ.items()})
    decoder = [({k: v[level] for k, v in flows.items()}, {k: v[level] for k, v in occ.items()})
               for level in range(len(flows["a"])) if min(flows["a"][level].shape[2:]) >= MIN_GRID]
    return [full] * full_res + decoder


def efc_loss(outputs, batch, weights=None, *, occlusion=True, error_mask=True, consistency=True,
             flow_only=False, frozen_flow=False, warmup=False, edge_weight=EDGE_WEIGHT, full_res_scale=True,
             detach_occ_in_cons=True, reduction="mean"):
    """EFC eq. (9) on one pair: returns (total, terms), terms the unweighted L_seg, L_cons, L_occ,
    L_sm, L_pm and the warm-up term as detached tensors ('seg', 'cons', 'occ', 'sm', 'pm',
    'warmup'; a dropped term is 0).

    outputs: EFCNet.forward_pair's dict (see model.py); batch: 'image_a', 'image_b' (B, 3, H, W)
    ImageNet-normalised, 'label_a', 'label_b' (B, H, W) int64 (all 255 for an unlabelled frame).
    weights: overrides of EFC_WEIGHTS. Per direction, L_pm, L_sm and L_occ are averaged with equal
    weights over the scales of flow_scales (the input resolution and the decoder grids of at least
    MIN_GRID pixels; so their size does not depend on the number of scales) and the two directions
    are summed (the paper writes each loss per direction, "two directions").
    Ablation switches (EFC Tables 1 and 2):
      occlusion=False    O_est = 0 in every weight, no L_occ (Table 1 rows without "OM"; Table 2 "UL + TC")
      error_mask=False   O_error = 0 (Table 2 "UL + OE + TC")
      consistency=False  no L_cons
      flow_only=True     Table 2 "UL" (with occlusion: "UL + OE"): L = L_pm + 0.5 L_sm (+ 0.4 L_occ);
                         no segmentation, so no L_seg, L_cons or O_error (logits may be None)
      frozen_flow=True   Table 1 "TCC_fix": no L_pm, L_sm, L_occ; L_cons uses a detached flow
    Our settings against the paper's (docs/choices.md#the-paper-recipe-against-the-papers):
      edge_weight        L_sm's exp(-w |grad I|) (smoothness_loss; eq. (7): w = 1)
      full_res_scale     the input-resolution scale of flow_scales (False: the decoder's grids alone)
      detach_occ_in_cons O_est without gradient in L_cons (consistency_loss; False: eq. (2) as written)
      reduction          "mean" over pixels, or "sum" per image as sum_xy (reduce_pixels)
    warmup=True (not in the paper; train.py --flow-warmup): the flow terms L_pm, L_sm, L_occ and
    L_cons are replaced by flow_regression_loss against the correlation's own soft-argmax flow
    (outputs 'match_ab', 'match_ba', from forward_pair(..., warmup=True)); L_seg stays. Why: from a
    decoder that does not yet read its cost volume, the photometric gradient at a pixel is nearly
    orthogonal to the way to the truth (cosine 0.03 at the input resolution, 0.2 at stride 8), so
    the only part of it that agrees across pixels and pairs is a mean flow: every unsupervised run
    settled on the best constant flow. The matching flow is a label-free target with a per-pixel
    direction (3.0 px EPE on the world's val pairs, zero flow 6.1) that teaches the decoder to read
    its input; the paper's losses then refine what it reads.
    """
    if flow_only and frozen_flow:
        raise ValueError("efc_loss: flow_only trains only the flow and frozen_flow freezes it: choose one")
    if frozen_flow and not consistency:
        raise ValueError("efc_loss: frozen_flow without consistency leaves no term that uses the flow")
    if warmup and (frozen_flow or outputs.get("match_ab") is None):
        raise ValueError("efc_loss: warmup needs outputs with 'match_ab' / 'match_ba' "
                         "(forward_pair(..., warmup=True)) and a flow that trains (not frozen_flow)")
    unknown = set(weights or {}) - set(EFC_WEIGHTS)
    if unknown:
        raise ValueError(f"efc_loss: unknown weights {sorted(unknown)}, expected keys of {sorted(EFC_WEIGHTS)}")
    lam = {**EFC_WEIGHTS, **(weights or {})}
    if not flow_only and outputs["logits_a"] is None:
        raise ValueError("efc_loss: outputs hold no segmentation (a flow-only model): pass flow_only=True")
    flows = {"a": outputs["flow_ab"], "b": outputs["flow_ba"]}
    occ = {"a": outputs["occ_a"], "b": outputs["occ_b"]}
    if not len(flows["a"]) == len(flows["b"]) == len(occ["a"]) == len(occ["b"]):
        raise ValueError("efc_loss: flow_ab, flow_ba, occ_a and occ_b must hold the same number of scales")
    with _no_autocast(batch["image_a"]):
        images = {"a": data.denormalize(batch["image_a"].float()),
                  "b": data.denormalize(batch["image_b"].float())}  # (B, 3, H, W) in [0, 1]
    logits = {"a": outputs["logits_a"], "b": outputs["logits_b"]}
    features = {"a": outputs["S_a"], "b": outputs["S_b"]}
    terms = {name: torch.zeros((), device=images["a"].device) for name in TERMS}
    use_error = error_mask and not flow_only
    scales = [] if frozen_flow or warmup else flow_scales(flows, occ, images["a"].shape[2:], full_res_scale)
    if warmup:
        size = images["a"].shape[2:]
        terms["warmup"] = flow_regression_loss(outputs, warp.resize_flow(outputs["match_ab"], size),
                                               warp.resize_flow(outputs["match_ba"], size))
        consistency = False

    for a, b in (("a", "b"), ("b", "a")):  # direction a <- b: frame b warped onto frame a by F_a->b
        for flow, O in scales:
            flow_ab, flow_ba = flow[a], flow[b]  # (B, 2, h, w) each
            size = flow_ab.shape[2:]
            I_a, I_b = resize_image(images[a], size), resize_image(images[b], size)  # (B, 3, h, w)
            O_est = O[a] if occlusion else 0  # (B, 1, h, w)
            O_error = error_map(segmentation_mismatch(logits[a], logits[b], flow_ab), O_est) if use_error else 0
            terms["pm"] = terms["pm"] + photometric_loss(I_a, I_b, flow_ab, O_est, O_error, reduction) / len(scales)
            terms["sm"] = terms["sm"] + smoothness_loss(flow_ab, I_a, edge_weight, reduction) / len(scales)
            if occlusion:
                terms["occ"] = terms["occ"] + occlusion_loss(O_est, flow_ba, reduction=reduction) / len(scales)
        if consistency and not flow_only:
            flow_ab = flows[a][0].detach() if frozen_flow else flows[a][0]  # finest scale
            O_est = occ[a][0] if occlusion else 0  # a detached weight inside consistency_loss (detach_occ_in_cons)
            terms["cons"] = terms["cons"] + consistency_loss(features[a], features[b], flow_ab, O_est,
                                                             detach_occ_in_cons, reduction)

    if not flow_only:
        labels = torch.cat((batch["label_a"], batch["label_b"]))  # (2B, H, W), both frames together
        aux = torch.cat((outputs["aux_a"], outputs["aux_b"])) if outputs.get("aux_a") is not None else None
        terms["seg"] = segmentation_loss(torch.cat((logits["a"], logits["b"])), labels, aux, reduction)
    # EFC eq. (9): L = L_seg + lambda_cons L_cons + lambda_occ L_occ + lambda_sm L_sm + L_pm
    # (+ our warm-up term, 0 outside the warm-up, where the four flow terms are 0 instead)
    total = (terms["seg"] + lam["cons"] * terms["cons"] + lam["occ"] * terms["occ"]
             + lam["sm"] * terms["sm"] + terms["pm"] + terms["warmup"])
    return total, {name: value.detach() for name, value in terms.items()}


def flow_regression_loss(outputs, target_ab, target_ba, valid_ab=None, valid_ba=None):
    """Mean end-point error (input pixels) of the flow decoder against given flows; in no paper.
    Two uses in train.py:
      --flow-warmup        targets = the correlation's own soft-argmax flow ('match_ab', 'match_ba'
                           of EFCNet.forward_pair, upsampled): label-free, before the paper's losses;
      --flow-supervised    targets = the world's true flow: a diagnostic that tells what the decoder
                           can learn from what the unsupervised losses teach it.
    outputs: EFCNet.forward_pair's dict; target_ab = F_a->b, target_ba = F_b->a (B, 2, H, W) at the
    input resolution; valid_* (B, H, W) 0/1 or None (all valid). Every decoder grid of at least
    MIN_GRID pixels is upsampled to (H, W) (values rescaled) and compared there; grids weigh
    equally, the two directions are summed.
    """
    total = 0
    for key, target, valid in (("flow_ab", target_ab, valid_ab), ("flow_ba", target_ba, valid_ba)):
        gt = target.float()  # (B, 2, H, W)
        mask = None if valid is None else valid[:, None]  # (B, 1, H, W)
        grids = [f for f in outputs[key] if min(f.shape[2:]) >= MIN_GRID]
        for flow in grids:
            flow = warp.resize_flow(flow, gt.shape[2:])  # (B, 2, H, W) image pixels
            epe = torch.sqrt((flow - gt).pow(2).sum(1, keepdim=True) + NORM_EPS)  # (B, 1, H, W)
            total = total + masked_mean(epe, mask) / len(grids)
    return total


def flow2seg_loss(outputs, labels, alpha=FLOW2SEG_ALPHA, beta=AUX_WEIGHT):
    """Flow2Seg eq. (1) -> (total, terms): terms 'image', 'fusion', 'flow', 'aux' unweighted, detached.

    outputs: Flow2SegNet's dict, 'logits' (fused), 'image_logits', 'flow_logits', 'aux' (B, K, H, W)
    ('aux' may be None: its term is then 0); labels (B, H, W) int64, 255 = ignore. Every term is
    the cross-entropy of segmentation_loss (its eq. (8) form), without the EFC auxiliary weight.
    """
    terms = {name: segmentation_loss(outputs[key], labels)
             for name, key in (("image", "image_logits"), ("fusion", "logits"), ("flow", "flow_logits"))}
    aux = outputs.get("aux")
    terms["aux"] = segmentation_loss(aux, labels) if aux is not None else torch.zeros((), device=labels.device)
    # Flow2Seg eq. (1): L = L_Image2Seg + L_Fusion + alpha L_Flow2Seg + beta L_Aux
    total = terms["image"] + terms["fusion"] + alpha * terms["flow"] + beta * terms["aux"]
    return total, {name: value.detach() for name, value in terms.items()}
