"""Evaluation of every method: metrics, inference modes, pictures, benchmark files, a user's video.

Covers
  EFC "Evaluation Metrics", Tables 3-4: mIoU ("IoU cls") and, on Cityscapes, the category IoU over
                the 7 official categories ("IoU cat")                     -> segmentation_metrics
  EFC Tables 2 and 5: average end-point error on KITTI 2015 over non-occluded ("Noc", flow_noc) and
                all ("All", flow_occ) pixels, plus KITTI's Fl outlier rate   -> flow_error_counts, flow_metrics
  Temporal consistency, the property EFC trains for and neither paper measures: agreement of the
                predictions of consecutive frames across the flow, occluded pixels left out
                                                                          -> consistency_counts
  Flow2Seg 4.3 / PSPNet's test procedure: multi-scale inference with flip, sliding-window crops
                                                                          -> segment_multiscale, segment_sliding
  train.py's periodic validation                                          -> validate
  A run's curves (loss terms, validation metrics) from its log.jsonl       -> draw_curves
  EFC "Dataset and Setting" (KITTI): coarse segmentation labels of KITTI raw frames "through a model
                trained on Cityscapes" (--pseudo-labels; kitti_raw.py reads them) -> write_pseudo_labels
  The command line: any checkpoint on its validation set (a table, metrics.json, pictures),
  Cityscapes / KITTI submission files, a folder of frames without ground truth, and KITTI raw
  pseudo-labels (see main()).

Choices where the papers are silent (each also stated where it is made):
  * IoU of a class absent from both ground truth and prediction is NaN and left out of the mean
    (cityscapesScripts does the same); a class predicted but absent from the ground truth has IoU 0
    and counts. One confusion matrix is accumulated over the whole split (not a mean of per-image IoUs).
  * Flow averages come both ways: "pooled" (sum over all valid pixels of all images / their count)
    and "per image" (the mean of per-image means). KITTI's devkit pools its Fl outlier counts over
    all images (evaluate_scene_flow.cpp sums errors and pixel counts before dividing); the
    unsupervised-flow papers that EFC Table 5 compares with average EPE per image. The table prints
    both; validate() returns pooled numbers under the plain names.
  * Temporal consistency looks up frame b's prediction at the flow target p + F_a->b(p) rounded to
    the nearest pixel (labels are not interpolated), on pixels that are not occluded, have a valid
    flow and whose target lies inside frame b; pooled over all pixels of all pairs.
  * Inference returns log-probabilities (log of the averaged softmax; single scale: log_softmax of
    the logits), so that every mode is comparable and argmax gives the prediction.

Conventions are warp.py's: flow (B, 2, H, W), u first, in pixels of its own grid; occlusion 1 (True)
= occluded; labels 255 = ignore; images ImageNet-normalised (data.normalize).
"""
import argparse
import collections
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import kitti_raw
import model as models
import warp

IGNORE = 255
DATASETS = ("synthetic", "cityscapes", "camvid", "kitti")
CONFIG_KEYS = ("backbone", "flow_backbone", "num_classes", "dataset", "data_root", "flow_dir", "max_displacement",
               "corr_stride")
PSP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # PSPNet's multi-scale test (semseg's cityscapes config)
PSP_CROP = (713, 713)  # the training crop of PSPNet and EFC, PSPNet's sliding-window size
STRIDE_RATE = 2 / 3  # window stride = 2/3 of the window (semseg's test procedure)
FL_ABS, FL_REL = 3.0, 0.05  # KITTI 2015: an outlier has EPE > 3 px and > 5 % of the ground-truth length
PHOTO_ERROR_WHITE = 0.25  # photometric-error pictures: a mean RGB difference of 0.25 (on [0, 1]) is white
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


# =============================================================================================
# 1. Checkpoints
# =============================================================================================
def checkpoint_checksum(obj):
    """SHA-256 over every tensor of a checkpoint dict (model, optimizer, RNG states), in a fixed order
    of their key paths, each with its dtype and shape: train.save_checkpoint stores it as
    'checksum' and read_checkpoint verifies it, so a flipped bit anywhere in a tensor is caught."""
    digest = hashlib.sha256()

    def visit(prefix, value):
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            digest.update(f"{prefix}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if not (prefix == "" and key == "checksum"):
                    visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                visit(f"{prefix}/{k}", item)

    visit("", obj)
    return digest.hexdigest()


def non_finite_tensors(state):
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [name for name, t in state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def read_checkpoint(path, device="cpu"):
    """Read and check a train.py checkpoint -> its dict (train.py's --resume / --init use it too).

    The file is a dict with 'method' (one of model.METHODS), 'config' (the network's arguments,
    the dataset and its root) and 'model' (the state dict of the unwrapped network); train.py's
    also hold a 'checksum' (checkpoint_checksum), verified here. Weights or buffers that are NaN
    or inf are refused (a run that diverged is no start for anything).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint (a copy or a disk that failed?)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises pickle, zip, EOF and runtime errors for broken files
        first_line = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or not {"method", "config", "model"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not a train.py checkpoint (expected a dict with 'method', 'config', 'model'; "
                         f"found {found})")
    if "checksum" in checkpoint and checkpoint["checksum"] != checkpoint_checksum(checkpoint):
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted (its tensors are not what was saved)")
    bad = non_finite_tensors(checkpoint["model"])
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight/buffer tensors hold NaN or inf (e.g. {bad[0]}); "
                         "the run diverged before this checkpoint")
    method, config = checkpoint["method"], checkpoint["config"]
    if method not in models.METHODS:
        raise ValueError(f"{path}: unknown method {method!r}, expected one of {', '.join(models.METHODS)}")
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(f"{path}: the checkpoint's config lacks {', '.join(missing)}")
    return checkpoint


def load_checkpoint(path, device="cpu"):
    """A train.py checkpoint -> (network in eval mode on `device`, the checkpoint dict)."""
    checkpoint = read_checkpoint(path, device)
    method, config = checkpoint["method"], checkpoint["config"]
    # context / flow_context (train.py --context / --flow-context) are absent from checkpoints made
    # before they existed, whose networks are the defaults: PSPNet, and Flow2Seg's FCN flow path.
    context, flow_context = config.get("context", "psp"), config.get("flow_context", "fcn")
    # corr_layer / match_input (train.py --corr-layer / --match-input) likewise: older flow decoders
    # correlate layer3 and read no soft-argmax.
    net = models.build_model(method, config["num_classes"], config["backbone"], config["flow_backbone"],
                             config["max_displacement"], config["corr_stride"], context, flow_context,
                             config.get("corr_layer", "layer3"), bool(config.get("match_input", False)),
                             bool(config.get("pass_through", False)), int(config.get("fine_match", 0)),
                             config.get("cost_volume", "cosine"))  # older checkpoints: the cosine
    try:
        net.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit a {method} network with backbone {config['backbone']}, "
                         f"context {context}, flow context {flow_context} and {config['num_classes']} classes "
                         f"({str(e).splitlines()[0]})") from None
    return net.to(device).eval(), checkpoint


def config_of(checkpoint, dataset=None, data_root=None, flow_dir=None):
    """The checkpoint's config with its method, and with the command line's overrides applied."""
    config = dict(checkpoint["config"], method=checkpoint["method"])
    if dataset is not None:
        config["dataset"] = dataset
    if data_root is not None:
        config["data_root"] = data_root
    if flow_dir is not None:
        config["flow_dir"] = flow_dir
    return config


# =============================================================================================
# 2. Inference
# =============================================================================================
def segment(model, method, image, flow=None):
    """Single-scale logits (B, K, H, W) of a normalised image (B, 3, H, W).

    psp, efc: model(image) (EFCNet's inference is its PSPNet alone); flow2seg: model(image, flow)
    with flow (B, 2, H, W) = F_t->t-1 in pixels of the image grid.
    """
    if method == "flow2seg":
        if flow is None:
            raise ValueError("flow2seg needs the flow F_t->t-1 of the frame as its second input")
        return model(image, flow)["logits"]
    if method == "flow":
        raise ValueError("a 'flow' checkpoint has no trained segmentation decoder")
    return model(image)["logits"]


def flow_outputs(model, image_a, image_b):
    """EFCNet's flow branch on one pair, everything at the image size (B, ., H, W):
    'flow_ab' F_a->b and 'flow_ba' F_b->a in image pixels (the finest, stride-4 prediction resized
    by warp.resize_flow), 'occ_a' the predicted occlusion O_est of frame a (probability, bilinear)."""
    if not isinstance(model, models.EFCNet):
        raise ValueError(f"flow needs an efc or flow network, got {type(model).__name__}")
    size = image_a.shape[-2:]
    out = model(image_a, image_b, segment=False)
    return {"flow_ab": warp.resize_flow(out["flow_ab"][0], size),  # (B, 2, H, W)
            "flow_ba": warp.resize_flow(out["flow_ba"][0], size),
            "occ_a": F.interpolate(out["occ_a"][0].float(), size=tuple(size), mode="bilinear", align_corners=False)}


def predict_flow(model, image_a, image_b):
    """F_a->b (B, 2, H, W) in image pixels, predicted by an efc/flow network."""
    return flow_outputs(model, image_a, image_b)["flow_ab"]


def flip_flow(flow):
    """Horizontal flip of a flow field: the grid is mirrored and u changes sign."""
    return flow.flip(-1) * flow.new_tensor([-1.0, 1.0]).view(1, 2, 1, 1)


def _window_probabilities(model, method, image, flow, crop, stride_rate):
    """Softmax (B, K, H, W) averaged over overlapping crop windows (PSPNet's sliding evaluation).

    Windows of crop = (h, w), clamped to the image (a smaller image is one window, never padded: the
    networks are fully convolutional), start every ceil(stride_rate * h) rows and columns; the last
    row / column of windows is shifted to end at the image border. Every pixel averages the windows
    that cover it.
    """
    H, W = image.shape[-2:]
    h, w = min(crop[0], H), min(crop[1], W)
    step_y, step_x = max(1, math.ceil(h * stride_rate)), max(1, math.ceil(w * stride_rate))
    rows, cols = math.ceil((H - h) / step_y) + 1, math.ceil((W - w) / step_x) + 1
    total, count = None, torch.zeros(1, 1, H, W, device=image.device)
    for r in range(rows):
        top = min(r * step_y, H - h)
        for c in range(cols):
            left = min(c * step_x, W - w)
            window = (..., slice(top, top + h), slice(left, left + w))
            f = flow[window] if flow is not None else None
            p = segment(model, method, image[window], f).float().softmax(1)  # (B, K, h, w)
            if total is None:
                total = image.new_zeros(p.shape[:2] + (H, W), dtype=torch.float32)
            total[window] += p
            count[window] += 1
    return total / count


def segment_multiscale(model, method, image, flow=None, scales=PSP_SCALES, flip=True, crop=None,
                       stride_rate=STRIDE_RATE):
    """Multi-scale (and flipped, and optionally sliding-window) inference -> (B, K, H, W) log-probabilities.

    For every scale s the image is resized to round(s * (H, W)) (bilinear, align_corners=False as
    everywhere; s is relative to the input size, which for Cityscapes is PSPNet's base size 2048);
    Flow2Seg's input flow is resized with warp.resize_flow (values scaled with the grid). With
    `flip`, each scale also runs on the mirrored image (and the mirrored flow with u negated) and the
    output is mirrored back. With `crop`, each run is PSPNet's sliding window (_window_probabilities),
    else the whole resized image. The softmax probabilities of all runs are resized back to (H, W)
    and averaged (PSPNet's semseg test script); the log of that average is returned.
    """
    H, W = image.shape[-2:]
    total, runs = 0.0, 0
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        x = image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        f = None if flow is None else warp.resize_flow(flow, size)
        for mirrored in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if mirrored else x
            fi = flip_flow(f) if mirrored and f is not None else f
            if crop is not None:
                p = _window_probabilities(model, method, xi, fi, crop, stride_rate)
            else:
                p = segment(model, method, xi, fi).float().softmax(1)  # (B, K, h, w)
            if mirrored:
                p = p.flip(-1)
            if p.shape[-2:] != (H, W):
                p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
            total, runs = total + p, runs + 1
    return (total / runs).clamp_min(torch.finfo(torch.float32).tiny).log()


def segment_sliding(model, method, image, flow=None, crop=PSP_CROP, stride_rate=STRIDE_RATE, flip=False):
    """Single-scale sliding-window inference (PSPNet) -> (B, K, H, W) log-probabilities."""
    return segment_multiscale(model, method, image, flow, scales=(1.0,), flip=flip, crop=crop, stride_rate=stride_rate)


def infer(model, method, image, flow=None, scales=(1.0,), flip=False, crop=None, stride_rate=STRIDE_RATE):
    """The inference of an evaluation mode (see `inference_mode`) -> (B, K, H, W) log-probabilities."""
    if tuple(scales) == (1.0,) and not flip and crop is None:
        return segment(model, method, image, flow).float().log_softmax(1)
    return segment_multiscale(model, method, image, flow, scales, flip, crop, stride_rate)


def inference_mode(mode, scales=PSP_SCALES, flip=True, crop=None, stride_rate=STRIDE_RATE):
    """The keyword arguments of `infer` for the command line's --mode:
      single      the whole image at its own size
      multiscale  `scales` (default PSPNet's 0.5-1.75) with flip; sliding windows too if `crop` is given
      sliding     one scale, windows of `crop` (default 713 x 713) at stride_rate (default 2/3), no flip
    """
    if mode == "single":
        return {}
    if mode == "multiscale":
        return {"scales": tuple(scales), "flip": flip, "crop": crop, "stride_rate": stride_rate}
    if mode == "sliding":
        return {"scales": (1.0,), "flip": False, "crop": tuple(crop or PSP_CROP), "stride_rate": stride_rate}
    raise ValueError(f"inference mode {mode!r}: expected single, multiscale or sliding")


def describe_inference(inference):
    """One line saying what `infer` does with these arguments."""
    if not inference:
        return "single scale"
    scales = ", ".join(f"{s:g}" for s in inference["scales"])
    text = f"scales {scales}" + (" + flip" if inference["flip"] else "")
    if inference.get("crop"):
        h, w = inference["crop"]
        rate = inference["stride_rate"]
        stride = f"{math.ceil(h * rate)}x{math.ceil(w * rate)}"
        text += f", sliding {h}x{w} windows, stride {stride} ({rate:.3g} of a window)"
    return text


# =============================================================================================
# 3. Metrics
# =============================================================================================
def confusion_matrix(prediction, label, num_classes):
    """(K, K) int64 counts, rows = ground truth, columns = prediction; label 255 is left out.

    prediction, label: integer tensors of one shape (e.g. (B, H, W)). A label outside 0..K-1 and 255
    is an error (an unmapped label file would otherwise count as a class).
    """
    keep = label != IGNORE
    gt, pr = label[keep].long(), prediction[keep].long()
    if gt.numel() and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"label values {sorted(set(gt[(gt < 0) | (gt >= num_classes)].tolist()))[:10]} are "
                         f"outside 0..{num_classes - 1} and {IGNORE}")
    counts = torch.bincount(gt * num_classes + pr, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def _iou(confusion):
    """Per-class IoU of a confusion matrix: TP / (TP + FP + FN); NaN where TP + FP + FN = 0."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else float("nan")


def segmentation_metrics(confusion, categories=None):
    """Metrics of an accumulated (K, K) confusion matrix (rows ground truth, columns prediction).

    Returns 'iou' (K floats), 'miou' (their mean over the classes that are not NaN), 'pixel_acc'
    (correct / labelled pixels). A class absent from both ground truth and prediction has IoU NaN
    and does not enter the mean; one predicted but never in the ground truth has IoU 0 and does.
    With `categories` (a category index per class, e.g. data.CITYSCAPES_TRAIN_TO_CATEGORY), also
    'category_ious' and their mean 'category_iou' (EFC Table 3 "IoU cat"): the classes of a
    category are merged into one (cityscapesScripts' getIouScoreForCategory), i.e. the IoU of the
    category-level confusion matrix M^T C M with M the (K, C) class-to-category indicator.
    Everything is NaN where nothing is labelled (an all-ignore split).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    iou = _iou(confusion)
    total = confusion.sum()
    out = {"miou": _nanmean(iou), "pixel_acc": float(np.trace(confusion) / total) if total else float("nan"),
           "iou": [float(v) for v in iou]}
    if categories is not None:
        categories = np.asarray(categories)
        if len(categories) != len(confusion):
            raise ValueError(f"{len(categories)} category indices for {len(confusion)} classes")
        member = np.eye(int(categories.max()) + 1)[categories]  # (K, C) one-hot
        category_iou = _iou(member.T @ confusion @ member)
        out["category_ious"] = [float(v) for v in category_iou]
        out["category_iou"] = _nanmean(category_iou)
    return out


LOOK_ALIKE = ("car_moving", "car_parked")


def merged_car_metrics(confusion, classes):
    """The synthetic world's look-alike cars merged into one class: 'iou_car_merged' and
    'miou_cars_merged' (the mIoU over K - 1 classes); {} for a dataset without them. Why: the two
    come from one sprite generator and differ only in motion, so a network that reads one image
    (the PSPNet, EFC at inference) can only guess which is which; their split IoUs measure that
    guess, the merged IoU what the image can tell (a car). Flow2Seg's claim is the split."""
    classes = list(classes)
    if not all(name in classes for name in LOOK_ALIKE):
        return {}
    moving, parked = (classes.index(name) for name in LOOK_ALIKE)
    merged = [k - (k > parked) for k in range(len(classes))]  # class index -> index with parked removed
    merged[parked] = merged[moving]
    result = segmentation_metrics(confusion, merged)
    return {"miou_cars_merged": result["category_iou"], "iou_car_merged": result["category_ious"][merged[moving]]}


def flow_error_counts(flow, gt, valid):
    """Per-image sums for the flow metrics.

    flow, gt: (B, 2, H, W) in pixels; valid: (B, H, W) bool, the pixels to count.
    Returns (B, 3) float64 rows (sum of EPE, number of Fl outliers, number of pixels) over `valid`.
    EPE = |flow - gt|_2; an outlier (KITTI 2015 "Fl") has EPE > 3 px and EPE > 5 % of |gt|.
    """
    epe = (flow.double() - gt.double()).pow(2).sum(1).sqrt()  # (B, H, W) px
    length = gt.double().pow(2).sum(1).sqrt()
    outlier = (epe > FL_ABS) & (epe > FL_REL * length)
    valid = valid.bool()
    return torch.stack([(epe * valid).flatten(1).sum(1), (outlier & valid).flatten(1).sum(1).double(),
                        valid.flatten(1).sum(1).double()], 1).cpu()


def flow_metrics(counts, region):
    """Averages of stacked per-image rows of flow_error_counts, named for `region` ('all', 'noc'):
    epe_<region>, fl_<region> pooled over all pixels of all images (Fl as a fraction), and
    epe_<region>_per_image, fl_<region>_per_image, the means of the per-image averages over images
    with at least one counted pixel. NaN where nothing was counted."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    epe_sum, outliers, pixels = counts[:, 0], counts[:, 1], counts[:, 2]
    nan = float("nan")
    used = pixels > 0
    return {f"epe_{region}": float(epe_sum.sum() / pixels.sum()) if pixels.sum() else nan,
            f"fl_{region}": float(outliers.sum() / pixels.sum()) if pixels.sum() else nan,
            f"epe_{region}_per_image": float((epe_sum[used] / pixels[used]).mean()) if used.any() else nan,
            f"fl_{region}_per_image": float((outliers[used] / pixels[used]).mean()) if used.any() else nan}


def consistency_counts(labels_a, labels_b, flow_ab, ignore=None):
    """Temporal consistency of two label maps across a flow -> (agreeing pixels, counted pixels).

    labels_a, labels_b: (B, H, W) integer maps of frames a and b (predictions or ground truth);
    flow_ab: (B, 2, H, W) F_a->b; ignore: (B, H, W) bool, pixels of a to leave out (occluded: they
    have no counterpart in b; or flow without ground truth). Pixel p of a is compared with b's label
    at p + F_a->b(p) rounded to the nearest pixel; pixels whose target leaves the image and pixels
    labelled 255 on either side are not counted.
    """
    B, H, W = labels_a.shape
    grid = warp.pixel_grid(H, W, flow_ab.device, torch.float32)  # (2, H, W)
    target = grid + flow_ab.float()  # (B, 2, H, W)
    # Integer offsets make backward_warp's bilinear weights exactly 0 and 1: a pure lookup.
    looked_up, inside = warp.backward_warp(labels_b[:, None].float(), target.round() - grid)  # (B, 1, H, W) each
    looked_up = looked_up[:, 0].round().long()
    keep = (inside[:, 0] > 0) & (labels_a != IGNORE) & (looked_up != IGNORE)
    if ignore is not None:
        keep &= ~ignore.bool()
    agree = (looked_up == labels_a.long()) & keep
    return int(agree.sum()), int(keep.sum())


# =============================================================================================
# 4. Validation data, built from a config so that train.py and evaluate.py measure the same thing
# =============================================================================================
def has_own_flow(config):
    """Whether a checkpoint's network computes its own trained flow: efc and flow do, except EFC
    Table 1's TCC_fix (--ablation tcc-fix), whose flow decoder is frozen at its start and never runs
    (the flow came from the fixed --flow-init network, which is evaluated as a run of its own)."""
    return config["method"] in ("efc", "flow") and config.get("ablation") != "tcc-fix"


def validation_datasets(config, split=None):
    """The evaluation datasets of config['dataset'] for config['method'] -> dict:
      'segmentation'  labelled frames (CityscapesImages; CityscapesFlow2Seg for flow2seg, whose input
                      flow comes from config['flow_dir'], None = the synthetic world's ground truth;
                      CamVid), or None (method 'flow'; KITTI, which has no segmentation labels)
      'flow'          pairs with ground-truth flow for efc / flow (has_own_flow): SyntheticSequence (F_a->b, occ_fw)
                      or KittiFlow (flow_occ, flow_noc), else None
      'consistency'   SyntheticSequence for segmenting methods on the synthetic world, else None
      'classes'       class names; 'split' the split used.
    Default splits: 'val' (Cityscapes layout, CamVid), 'training' for KITTI (its 200 flow pairs; EFC
    Tables 2 and 5 evaluate there); KITTI's 'testing' gives unlabelled pairs (submission only).
    """
    method, name, root = config["method"], config["dataset"], config["data_root"]
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(DATASETS)} (--dataset)")
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: data root of dataset {name!r} not found (--data-root)")
    segmenting = method != "flow"
    out = {"segmentation": None, "flow": None, "consistency": None, "classes": None}
    if name in ("synthetic", "cityscapes"):
        split = split or "val"
        if method == "flow2seg":
            out["segmentation"] = data.CityscapesFlow2Seg(root, split, config.get("flow_dir"))
        elif segmenting:
            out["segmentation"] = data.CityscapesImages(root, split)
        if name == "synthetic":
            sequence = data.SyntheticSequence(root, split)
            out["flow"] = sequence if has_own_flow(config) else None
            out["consistency"] = sequence if segmenting else None
            out["classes"] = sequence.classes
    elif name == "camvid":
        split = split or "val"
        if method == "flow2seg":
            raise ValueError("flow2seg evaluates on the Cityscapes layout (synthetic or cityscapes): CamVid has no "
                             "input flows")
        out["segmentation"] = data.CamVid(root, split) if segmenting else None
    else:
        split = split or "training"
        if has_own_flow(config):
            out["flow"] = data.KittiFlow(root, split, mode="flow" if split == "training" else "pairs")
    if out["segmentation"] is not None:
        out["classes"] = out["segmentation"].classes
    if segmenting and out["classes"] is not None and len(out["classes"]) != config["num_classes"]:
        raise ValueError(f"{root}: dataset {name!r} has {len(out['classes'])} classes but the network predicts "
                         f"{config['num_classes']}")
    out["split"] = split
    return out


def palette_for(config, num_classes):
    """Colours of the classes: the synthetic world's classes.json, Cityscapes' or CamVid's official
    palette; a generated one (Pascal VOC's bit pattern) when the class count fits none of them."""
    root = Path(config["data_root"]) if config.get("data_root") else None
    if root is not None and (root / "classes.json").is_file():
        palette = [tuple(c) for c in json.loads((root / "classes.json").read_text())["palette"]]
    else:
        palette = {"cityscapes": data.CITYSCAPES_PALETTE, "camvid": data.CAMVID_PALETTE,
                   "synthetic": data.SYNTH_PALETTE}.get(config["dataset"], ())
    if len(palette) == num_classes:
        return tuple(palette)
    generated = []
    for k in range(num_classes):
        r = g = b = 0
        for bit in range(8):
            r |= ((k >> (3 * bit)) & 1) << (7 - bit)
            g |= ((k >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((k >> (3 * bit + 2)) & 1) << (7 - bit)
        generated.append((r, g, b))
    return tuple(generated)


# =============================================================================================
# 5. Evaluation loops. Batch size 1 (the images of a dataset may differ in size); items are read
# one by one in the main process, so validate() starts no workers inside train.py.
# =============================================================================================
def _batch(item, device):
    """A dataset item -> the same dict with a batch axis on every tensor, on `device`."""
    return {k: v[None].to(device) if torch.is_tensor(v) else v for k, v in item.items()}


def _count(dataset, max_items):
    return len(dataset) if max_items is None else min(len(dataset), max_items)


def _picture_indices(count, pictures):
    """`pictures` item indices spread evenly over the `count` evaluated items."""
    if pictures <= 0 or count == 0:
        return {}
    picks = np.linspace(0, count - 1, min(pictures, count)).round().astype(int)
    return {int(index): n for n, index in enumerate(picks)}


@torch.no_grad()
def evaluate_segmentation(model, method, dataset, device, categories=None, max_items=None, inference=None,
                          out=None, pictures=0, palette=None, submit=None):
    """Segmentation metrics over (the first max_items of) a labelled dataset.

    Pictures `seg_NNN.png` (segmentation_panel) of `pictures` items go to `out`; with `submit`,
    every prediction is written there as a Cityscapes labelIds PNG named like its image.
    Returns segmentation_metrics(...) plus 'segmentation_images'; for flow2seg also
    'miou_flow_path' and 'iou_flow_path', the flow path's own logits (Flow2Seg Table 2).
    """
    num_classes = len(dataset.classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    path_confusion = torch.zeros_like(confusion)  # Flow2Seg's flow path alone
    count = _count(dataset, max_items)
    picks = _picture_indices(count, pictures)
    for index in data.progress(range(count), count, "segmentation"):
        item = _batch(dataset[index], device)
        flow = item["flow"] if method == "flow2seg" else None
        prediction = infer(model, method, item["image"], flow, **(inference or {})).argmax(1)  # (1, H, W)
        confusion += confusion_matrix(prediction, item["label"], num_classes)
        if method == "flow2seg":  # Flow2Seg Table 2 measures the flow path alone (single scale)
            path = model(item["image"], flow)["flow_logits"].argmax(1)  # (1, H, W)
            path_confusion += confusion_matrix(path, item["label"], num_classes)
        if index in picks:
            panel = segmentation_panel(item["image"][0], item["label"][0], prediction[0], palette,
                                       flow[0] if flow is not None else None, dataset.classes)
            Image.fromarray(panel).save(Path(out) / f"seg_{picks[index]:03d}.png")
        if submit is not None:
            write_cityscapes_prediction(Path(submit) / dataset.items[index][0].name, prediction[0])
    metrics = segmentation_metrics(confusion.numpy(), categories)
    metrics.update(merged_car_metrics(confusion.numpy(), dataset.classes))
    metrics["segmentation_images"] = count
    if method == "flow2seg":
        path = segmentation_metrics(path_confusion.numpy())
        metrics["miou_flow_path"], metrics["iou_flow_path"] = path["miou"], path["iou"]
    return metrics


def spread_indices(size, max_items):
    """`max_items` item indices spread evenly over a dataset of `size` items (all of them without a
    cap): a capped validation then sees every snippet of SyntheticSequence (29 pairs per snippet, in
    order), not the first two, whose single camera pans a constant flow could match."""
    count = _count(range(size), max_items)
    return sorted({int(round(k)) for k in np.linspace(0, size - 1, count)}) if count else []


def geometric_median(points, iterations=100):
    """The point c minimising the mean |x - c| over `points` (N, 2) (Weiszfeld's iteration, in
    float64): the best constant flow under the EPE, the answer of a network that ignores its input."""
    points = points.double()
    c = points.median(0).values
    for _ in range(iterations):
        w = 1 / (points - c).norm(dim=1).clamp(min=1e-6)
        c = (points * w[:, None]).sum(0) / w.sum()
    return c


def occlusion_counts(o_est, flow_ba, occ, known):
    """Pixel sums for the occlusion metrics of one pair: O_est (B, H, W) probabilities at 0.5 and the
    range map of flow_ba (B, 2, H, W) F_b->a (EFC eq. (3)) against the true occlusion occ (B, H, W),
    over the pixels `known` (B, H, W) bool -> {'est_inter', 'est_union', 'range_inter', 'range_union'
    (intersection and union with the truth), 'est_on_occluded', 'occluded', 'est_on_visible', 'visible'
    (O_est summed over, and the number of, truly occluded / visible pixels)}."""
    truth = occ.bool() & known
    counts = {}
    for name, found in (("est", o_est > 0.5), ("range", warp.occlusion_mask(flow_ba)[:, 0] > 0)):
        counts[name + "_inter"] = (found & truth).sum().item()
        counts[name + "_union"] = ((found | truth) & known).sum().item()
    for name, region in (("occluded", truth), ("visible", known & ~truth)):
        counts["est_on_" + name] = o_est[region].sum().item()
        counts[name] = region.sum().item()
    return counts


# The classes that move on their own in the synthetic world (synthetic.py's sprites with a speed);
# everything else moves with the camera alone, which is what camera_flow is fitted to.
OWN_MOTION = ("car_moving", "person", "bicycle")


def camera_flow(flow, mask):
    """The camera's own flow (1, 2, H, W): u = z (x - c_x) + t_x, v = z (y - c_y) + t_y, fitted by least
    squares (float64) to the true flow (1, 2, H, W) on the pixels of `mask` (1, H, W), c the image centre.

    Why these three parameters: the world's camera sees the plane through X = o_t + s_t (p - c)
    (synthetic.py), so a point that does not move on its own goes from p to
    c + (o_t - o_t+1 + s_t (p - c)) / s_t+1: a zoom about c plus a translation, exactly (the fit's
    residual on the world's static classes is 0.006 px, the flow files' 1/64-px rounding). Evaluated
    on the cars, it is what a network that gets the camera right and ignores their own motion outputs.
    """
    H, W = flow.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) - (H - 1) / 2,
                            torch.arange(W, dtype=torch.float64) - (W - 1) / 2, indexing="ij")  # (H, W) each
    m = mask[0].bool().cpu()
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"camera_flow: {n} pixels to fit zoom and translation to, need at least 2")
    A = torch.zeros(2 * n, 3, dtype=torch.float64)  # rows: u of each pixel, then v of each pixel
    A[:n, 0], A[:n, 1] = xs[m], 1  # u = z x + t_x
    A[n:, 0], A[n:, 2] = ys[m], 1  # v = z y + t_y
    rhs = torch.cat([flow[0, 0].cpu()[m], flow[0, 1].cpu()[m]]).double()[:, None]  # (2n, 1)
    z, tx, ty = torch.linalg.lstsq(A, rhs).solution[:, 0]
    return torch.stack([z * xs + tx, z * ys + ty])[None].to(flow.dtype).to(flow.device)  # (1, 2, H, W)


@torch.no_grad()
def evaluate_flow(model, dataset, device, max_items=None, out=None, pictures=0, submit=None):
    """EPE and Fl of an efc / flow network over pairs with ground truth, with baselines.

    SyntheticSequence items: 'all' = flow_fw_valid, 'noc' = those pixels not occluded (occ_fw),
    'moving' = the valid pixels of frame a labelled car_moving (datasets whose classes have one: the
    synthetic world's cars that move on their own; the rest of a frame moves with the camera alone).
    KittiFlow items: 'all' = flow_occ's valid mask, 'noc' = flow_noc's; padded items are cropped
    back to their 'size' first. Items without ground truth (KITTI 'testing') give no metrics.
    max_items pairs are spread over the whole dataset (spread_indices).
    Pictures `flow_NNN.png` (flow_panel) go to `out`; with `submit`, every flow is written as
    submit/flow/<name of frame 10> (KITTI's submission layout). Returns flow_metrics for 'all'
    and 'noc' (and 'moving' where counted) plus 'flow_pairs' (pairs with ground truth) and the checks that a constant cannot fool:
      epe_all_zero     EPE of the zero flow
      epe_all_const    EPE of the best constant flow (geometric_median of the true flows), and
                       const_u, const_v: that flow (a collapsed network can do no better)
      identity_flow    mean |F(a, a)| in pixels: the flow of a frame to itself, 0 for a network
                       that reads its input (a constant bias shows here)
    and, where a 'moving' region is counted, whether the flow holds the cars' own motion:
      epe_moving_camera   EPE on the same car_moving pixels of camera_flow, each pair's zoom +
                          translation fitted to its true flow on the classes not in OWN_MOTION (an
                          oracle of the camera that knows nothing of the cars' own motion), and
      moving_camera_ratio epe_moving / epe_moving_camera: near 1 for a flow of the camera alone
    and, where the true occlusion is known (the world: every pixel of frame a; KITTI: the pixels with
    flow_occ ground truth), how each of EFC's two occlusion maps finds it, as IoU at 0.5 pooled
    over the pairs:
      occ_iou_est      the predicted O_est (occ_a > 0.5)
      occ_iou_range    the range map of the predicted F_b->a (EFC eq. (3), warp.occlusion_mask)
      occ_est_occluded, occ_est_visible   mean O_est on the truly occluded / visible pixels (a soft
                       O_est that never passes 0.5 has IoU 0 but may still rank them)
    """
    counts = {"all": [], "noc": [], "moving": [], "zero": [], "moving_camera": []}
    truths, identity = [], []
    occlusion = collections.Counter()  # occlusion_counts' pixel sums over the pairs
    classes = list(getattr(dataset, "classes", ()))
    moving_class = classes.index("car_moving") if "car_moving" in classes else None
    own_motion = torch.tensor([classes.index(name) for name in OWN_MOTION if name in classes], device=device)
    indices = spread_indices(len(dataset), max_items)
    picks = _picture_indices(len(indices), pictures)
    for position, index in enumerate(data.progress(indices, len(indices), "flow: pairs")):
        item = _batch(dataset[index], device)
        image_a, image_b = item["image_a"], item["image_b"]
        predicted = flow_outputs(model, image_a, image_b)
        gt = valid = noc = occ = None
        if "flow_fw" in item:  # the synthetic world
            gt, valid, occ = item["flow_fw"], item["flow_fw_valid"], item["occ_fw"]
            noc = valid & ~occ
        elif "flow" in item:  # KITTI: occluded = has flow_occ ground truth but not flow_noc
            gt, valid, noc = item["flow"], item["flow_valid"], item["noc_valid"]
            occ = valid & ~noc
        if "size" in item:  # KITTI items are padded to a multiple of 64: crop back to the image
            h, w = item["size"][0].tolist()
            image_a, image_b = image_a[..., :h, :w], image_b[..., :h, :w]
            predicted = {k: v[..., :h, :w] for k, v in predicted.items()}
            if gt is not None:
                gt, valid, noc, occ = gt[..., :h, :w], valid[..., :h, :w], noc[..., :h, :w], occ[..., :h, :w]
        if gt is not None:
            counts["all"].append(flow_error_counts(predicted["flow_ab"], gt, valid))
            counts["noc"].append(flow_error_counts(predicted["flow_ab"], gt, noc))
            if moving_class is not None and "label_a" in item:
                moving = valid & (item["label_a"] == moving_class)  # (1, H, W) the cars' own motion
                counts["moving"].append(flow_error_counts(predicted["flow_ab"], gt, moving))
                static = valid & ~torch.isin(item["label_a"], own_motion)  # (1, H, W) moves with the camera
                counts["moving_camera"].append(flow_error_counts(camera_flow(gt, static), gt, moving))
            counts["zero"].append(flow_error_counts(torch.zeros_like(gt), gt, valid))
            truths.append(gt.permute(0, 2, 3, 1)[valid.bool()].float().cpu())  # (N, 2) true vectors
            same = flow_outputs(model, image_a, image_a)["flow_ab"]  # (1, 2, h, w) F(a, a)
            identity.append(same.norm(dim=1).mean().item())
            known = valid if "flow" in item else torch.ones_like(occ)  # (1, H, W) where occ is the truth
            for name, value in occlusion_counts(predicted["occ_a"][:, 0], predicted["flow_ba"], occ, known).items():
                occlusion[name] += value
        if position in picks:
            panel = flow_panel(image_a[0], image_b[0], predicted["flow_ab"][0], predicted["occ_a"][0, 0],
                               None if gt is None else gt[0], None if gt is None else valid[0],
                               None if occ is None else occ[0])
            Image.fromarray(panel).save(Path(out) / f"flow_{picks[position]:03d}.png")
        if submit is not None:
            write_kitti_submission(Path(submit) / "flow" / dataset.items[index][0].name, predicted["flow_ab"][0])
    metrics = {"flow_pairs": len(counts["all"])}
    if counts["all"]:
        for region in ("all", "noc", "moving"):
            if counts[region]:
                metrics.update(flow_metrics(torch.cat(counts[region]).numpy(), region))
        metrics["epe_all_zero"] = flow_metrics(torch.cat(counts["zero"]).numpy(), "all")["epe_all"]
        truths = torch.cat(truths)  # (N, 2)
        if len(truths):
            const = geometric_median(truths)
            metrics["epe_all_const"] = float((truths.double() - const).norm(dim=1).mean())
            metrics["const_u"], metrics["const_v"] = float(const[0]), float(const[1])
        metrics["identity_flow"] = float(np.mean(identity))
        if counts["moving_camera"] and "epe_moving" in metrics:
            metrics["epe_moving_camera"] = flow_metrics(torch.cat(counts["moving_camera"]).numpy(), "x")["epe_x"]
            metrics["moving_camera_ratio"] = metrics["epe_moving"] / metrics["epe_moving_camera"]
        nan, o = float("nan"), occlusion
        metrics["occ_iou_est"] = o["est_inter"] / o["est_union"] if o["est_union"] else nan
        metrics["occ_iou_range"] = o["range_inter"] / o["range_union"] if o["range_union"] else nan
        metrics["occ_est_occluded"] = o["est_on_occluded"] / o["occluded"] if o["occluded"] else nan
        metrics["occ_est_visible"] = o["est_on_visible"] / o["visible"] if o["visible"] else nan
    return metrics


def _synthetic_flow_input(sequence, flow_dir, snippet, frame):
    """Flow2Seg's input F_t->t-1 for frame `frame` of a synthetic snippet from a flow directory
    (names as data.flow_path), as a (1, 2, H, W) tensor; None where the directory has no file."""
    image = sequence.root / "leftImg8bit_sequence" / f"{sequence.snippets[snippet][frame]}_leftImg8bit.png"
    for suffix in data.FLOW_SUFFIXES:
        path = data.flow_path(flow_dir, sequence.split, image, suffix)
        if path.is_file():
            flow, _ = data.read_flow(path)
            return torch.from_numpy(flow).permute(2, 0, 1)[None]
    return None


@torch.no_grad()
def evaluate_consistency(model, method, sequence, device, max_items=None, inference=None, flow_dir=None):
    """Temporal consistency of the predictions on consecutive frames of SyntheticSequence items.

    Frames are segmented once each, in order: item (a = I_i, b = I_i+1) segments b and compares it
    with the prediction of a kept from the previous item, across the ground-truth F_a->b, occluded
    pixels (occ_fw) ignored. So the first pair of every snippet is not measured, for every method
    alike (Flow2Seg has no input flow for a snippet's first frame). Flow2Seg's input for frame b is
    the ground-truth F_b->a (flow_bw) or, with `flow_dir`, that directory's file for b (frames
    without one are skipped). The same pairs measured on the ground-truth labels give
    'temporal_consistency_labels', the value a perfect segmentation would reach (below 1 only by
    the nearest-pixel lookup and by label boundaries). Returns the two and 'consistency_pairs';
    nothing when no pair could be measured.
    """
    agree = counted = agree_labels = counted_labels = pairs = 0
    previous = None  # ((snippet, frame index), prediction) of the last segmented frame
    count = _count(sequence, max_items)
    # The progress counts the frames segmented (29 per snippet); the result, the pairs compared (28).
    for index in data.progress(range(count), count, "temporal consistency: frames segmented"):
        item = _batch(sequence[index], device)
        s, i = int(item["snippet"]), int(item["i"])
        flow = None
        if method == "flow2seg":
            flow = item["flow_bw"] if flow_dir is None else _synthetic_flow_input(sequence, flow_dir, s, i + 1)
            if flow is None:
                previous = None
                continue
            flow = flow.to(device)
        prediction_b = infer(model, method, item["image_b"], flow, **(inference or {})).argmax(1)  # (1, H, W)
        if previous is not None and previous[0] == (s, i):
            ignore = item["occ_fw"] | ~item["flow_fw_valid"]  # (1, H, W)
            a, c = consistency_counts(previous[1], prediction_b, item["flow_fw"], ignore)
            agree, counted = agree + a, counted + c
            a, c = consistency_counts(item["label_a"], item["label_b"], item["flow_fw"], ignore)
            agree_labels, counted_labels, pairs = agree_labels + a, counted_labels + c, pairs + 1
        previous = ((s, i + 1), prediction_b)
    if not pairs:
        return {}
    return {"temporal_consistency": agree / counted if counted else math.nan,  # NaN: no pixel compared
            "temporal_consistency_labels": agree_labels / counted_labels if counted_labels else math.nan,
            "consistency_pairs": pairs}


def run_evaluation(model, config, device, max_items=None, inference=None, split=None, out=None, pictures=0,
                   submit=None):
    """Every metric of config['method'] on its evaluation data (validation_datasets) -> (metrics, sets).

    Pictures and submission files as in evaluate_segmentation / evaluate_flow. The model runs in
    eval mode under torch.no_grad and gets its previous mode back.
    """
    method = config["method"]
    sets = validation_datasets(config, split)
    categories = None
    if config["dataset"] == "cityscapes" and config["num_classes"] == len(data.CITYSCAPES_CLASSES):
        categories = data.CITYSCAPES_TRAIN_TO_CATEGORY
    palette = palette_for(config, config["num_classes"])
    for folder in (out, submit):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    metrics = {}
    try:
        if sets["segmentation"] is not None:
            metrics.update(evaluate_segmentation(model, method, sets["segmentation"], device, categories, max_items,
                                                 inference, out, pictures, palette,
                                                 submit if config["dataset"] == "cityscapes" else None))
        if sets["flow"] is not None:
            metrics.update(evaluate_flow(model, sets["flow"], device, max_items, out, pictures,
                                         submit if config["dataset"] == "kitti" else None))
        if sets["consistency"] is not None:
            metrics.update(evaluate_consistency(model, method, sets["consistency"], device, max_items, inference,
                                                config.get("flow_dir")))
    finally:
        model.train(was_training)
    return metrics, sets


def check_validation_data(config, max_items=None):
    """Read every file validate(config, max_items) will read, without a network: train.py calls it
    before the first iteration, so that a missing, truncated or malformed validation file stops
    the run at once with evaluate's one-line error, not after hours of training. The items are
    those of evaluate_segmentation and evaluate_consistency (the first max_items) and of
    evaluate_flow (spread_indices), and for Flow2Seg with a flow_dir its flow files."""
    sets = validation_datasets(config)
    for key in ("segmentation", "flow", "consistency"):
        dataset = sets[key]
        if dataset is None:
            continue
        indices = spread_indices(len(dataset), max_items) if key == "flow" else range(_count(dataset, max_items))
        for index in indices:
            item = dataset[index]
            if key == "consistency" and config["method"] == "flow2seg" and config.get("flow_dir"):
                _synthetic_flow_input(dataset, config["flow_dir"], int(item["snippet"]), int(item["i"]) + 1)
    return sets


def validate(model, config, device, max_items=None):
    """train.py's periodic validation: single-scale metrics of config['method'] on its validation data.

    Returns a dict of plain floats and lists: 'miou', 'pixel_acc', 'iou' (NaN for classes absent
    from ground truth and prediction), 'category_iou' (Cityscapes) for psp / efc / flow2seg;
    'epe_all', 'epe_noc', 'fl_all', 'fl_noc' (pooled; *_per_image too) for efc / flow on the
    synthetic world or KITTI; 'temporal_consistency' for segmenting methods on the synthetic world;
    and item counts. max_items caps the items of each dataset. Call it on the unwrapped model.
    """
    return run_evaluation(model, config, device, max_items)[0]


# =============================================================================================
# 6. Pictures (uint8 RGB arrays, saved with Pillow)
# =============================================================================================
def to_rgb(image):
    """A normalised image (3, H, W) -> (H, W, 3) uint8."""
    rgb = data.denormalize(image[None].float())[0].clamp(0, 1)
    return (rgb.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def grey(x):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 grey levels."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    return np.repeat((x * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def side_by_side(tiles, gap=2):
    """Tiles (H, W, 3) uint8 of one height, left to right, separated by white columns."""
    space = np.full((tiles[0].shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([x for tile in tiles for x in (tile, space)][:-1], axis=1)


def annotate(tiles, titles, footer=None, gap=2):
    """Tiles (H, W, 3) uint8 side by side (side_by_side) under a white strip with one title per tile
    (several lines where a title holds newlines), with an optional footer image below (a legend)."""
    from PIL import ImageDraw
    row = side_by_side(tiles, gap)
    lines = max(t.count("\n") + 1 for t in titles)
    strip = Image.new("RGB", (row.shape[1], 12 * lines + 4), "white")
    pen = ImageDraw.Draw(strip)
    x = 0
    for tile, title in zip(tiles, titles):
        pen.multiline_text((x + 2, 2), title, fill=(0, 0, 0), spacing=1)
        x += tile.shape[1] + gap
    parts = [np.asarray(strip), row]
    if footer is not None:
        width = row.shape[1]
        footer = footer[:, :width] if footer.shape[1] >= width else np.pad(
            footer, ((0, 0), (0, width - footer.shape[1]), (0, 0)), constant_values=255)
        parts.append(footer)
    return np.concatenate(parts, axis=0)


def class_legend(names, palette, width=None, swatch=10):
    """A legend (h, w, 3) uint8: a colour swatch and the name of every class, wrapped to `width`."""
    from PIL import ImageDraw
    cell = swatch + 6 + 7 * max(len(n) for n in names) + 10
    per_row = max(1, (width or cell * len(names)) // cell)
    rows = -(-len(names) // per_row)
    canvas = Image.new("RGB", (per_row * cell, rows * (swatch + 6) + 4), "white")
    pen = ImageDraw.Draw(canvas)
    for k, name in enumerate(names):
        x, y = (k % per_row) * cell + 2, (k // per_row) * (swatch + 6) + 3
        pen.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in palette[k]), outline=(0, 0, 0))
        pen.text((x + swatch + 4, y), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def flow_key(size, max_radius):
    """The colour-wheel key of data.flow_to_color: (size, size, 3) uint8, a disc whose rim is a flow
    of max_radius pixels (hue = direction: right red, down yellow, left cyan, up violet)."""
    r = np.linspace(-1, 1, size)
    u, v = np.meshgrid(r, r)  # x right, y down
    disc = np.hypot(u, v) <= 1
    key = data.flow_to_color(np.stack([u, v], -1) * max_radius, max_radius)
    return np.where(disc[..., None], key, 255).astype(np.uint8)


def segmentation_panel(image, label, prediction, palette, flow=None, names=None):
    """image | ground truth | prediction | error [| input flow for Flow2Seg | its colour key],
    titled, with a class legend below when `names` are given: (H', W', 3) uint8.

    image (3, H, W) normalised; label, prediction (H, W); flow (2, H, W) Flow2Seg's input.
    Colours are the dataset's palette, ignored pixels black; error: white = wrong, black = right,
    grey = ignored in the ground truth.
    """
    label, prediction = label.cpu().numpy(), prediction.cpu().numpy()
    error = np.where(label == IGNORE, 0.5, (label != prediction).astype(np.float64))
    tiles = [to_rgb(image), data.colorize(label, palette), data.colorize(prediction, palette), grey(error)]
    titles = ["image", "ground truth\n(black: ignored)", "prediction", "error: white wrong,\nblack right, grey ignored"]
    if flow is not None:
        flow_np = flow.permute(1, 2, 0).cpu().numpy()
        radius = max(float(np.hypot(flow_np[..., 0], flow_np[..., 1]).max()), 1e-3)
        tiles += [data.flow_to_color(flow_np, radius), flow_key(label.shape[0], radius)]
        titles += ["input flow F_t->t-1", f"flow key: rim\n= {radius:.1f} px"]
    legend = class_legend(names, palette, sum(t.shape[1] + 2 for t in tiles)) if names else None
    return annotate(tiles, titles, legend)


def overlay(image, prediction, palette, alpha=0.5):
    """The segmentation blended over its frame: (H, W, 3) uint8, `alpha` of the class colour."""
    colour = data.colorize(prediction, palette).astype(np.float64)
    return np.rint((1 - alpha) * to_rgb(image) + alpha * colour).astype(np.uint8)


def flow_panel(image_a, image_b, flow, occ_predicted, gt=None, valid=None, occ=None):
    """image | ground-truth flow | predicted flow | ground-truth occlusion | predicted occlusion |
    photometric error | the flows' colour key, titled, (H', 7 W, 3) uint8.

    image_a, image_b (3, H, W) normalised; flow (2, H, W) predicted F_a->b; occ_predicted (H, W)
    O_est in [0, 1]; gt (2, H, W), valid (H, W), occ (H, W) bool, all optional (black tiles without).
    Flows use the Middlebury colour wheel (data.flow_to_color) with one scale for both, the largest
    valid ground-truth length (else the prediction's); pixels without ground truth are black.
    Occlusion: white = occluded, grey = no ground truth. Photometric error: |I_a - warp(I_b, flow)|
    averaged over RGB on [0, 1] images, white at PHOTO_ERROR_WHITE and above; red where the flow
    leaves the image.
    """
    H, W = flow.shape[-2:]
    flow_np = flow.permute(1, 2, 0).cpu().numpy()
    black = np.zeros((H, W, 3), dtype=np.uint8)
    gt_tile, occ_tile, max_radius = black, black, None
    if gt is not None:
        gt_np, valid_np = gt.permute(1, 2, 0).cpu().numpy(), valid.cpu().numpy()
        if valid_np.any():
            max_radius = float(np.hypot(gt_np[..., 0], gt_np[..., 1])[valid_np].max())
        gt_tile = np.where(valid_np[..., None], data.flow_to_color(gt_np, max_radius), 0).astype(np.uint8)
    if occ is not None:
        occ_tile = grey(np.where(valid.cpu().numpy(), occ.cpu().numpy().astype(np.float64), 0.5))
    a, b = data.denormalize(image_a[None].float()), data.denormalize(image_b[None].float())
    warped, inside = warp.backward_warp(b, flow[None].float())
    error = (a - warped).abs().mean(1)[0].cpu().numpy() / PHOTO_ERROR_WHITE  # (H, W)
    error_tile = np.where(inside[0, 0, ..., None].cpu().numpy() > 0, grey(error), np.array([255, 0, 0], np.uint8))
    tiles = [to_rgb(image_a), gt_tile, data.flow_to_color(flow_np, max_radius), occ_tile,
             grey(occ_predicted.cpu().numpy()), error_tile.astype(np.uint8)]
    radius = max_radius if max_radius is not None else max(float(np.hypot(flow_np[..., 0], flow_np[..., 1]).max()), 1e-3)
    tiles.append(flow_key(H, radius))
    titles = ["frame a", "true flow a->b\n(black: none)", "predicted flow", "true occlusion\n(white)",
              "predicted O_est\n(white = 1)", "|I_a - warp(I_b)|\nred: leaves frame", f"flow key: rim\n= {radius:.1f} px"]
    return annotate(tiles, titles)


def read_log(path):
    """log.jsonl -> (config or None, training records, validation records), each a list of dicts."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    configs = [r["config"] for r in records if "config" in r]
    return (configs[0] if configs else None, [r for r in records if "loss" in r],
            [r for r in records if "validation" in r])


def curve_series(path):
    """The series a run's curves show -> list of (title, [(iteration, value)], reference values drawn
    as grey lines). Training: the total
    and every loss term that is not 0 throughout (unweighted, as logged). Validation: mIoU and the
    IoU of every car class (the look-alike cars Flow2Seg tells apart) in %, the flow's EPE with its
    zero and best-constant baselines in px, F(a, a) in px."""
    config, train, val = read_log(path)
    names = [k for k in train[0] if k not in ("iteration", "lr", "images_per_s", "eta_s", "peak_memory_mb")] if train else []
    series = [(("loss (total, weighted)" if k == "loss" else f"{k} (unweighted)"),
               [(r["iteration"], r[k]) for r in train if k in r], []) for k in names
              if any(r.get(k) for r in train)]
    classes = None
    if config is not None and val and val[0]["validation"].get("iou") is not None:
        try:
            classes = data._dataset_classes(config["data_root"])
        except (OSError, ValueError, KeyError):
            classes = None
    def points(key, scale=1):
        return [(r["iteration"], scale * r["validation"][key]) for r in val
                if isinstance(r["validation"].get(key), (int, float))]

    wanted = [("miou", "val mIoU %", 100), ("epe_all", "val EPE px (grey: zero flow, best constant)", 1),
              ("identity_flow", "val F(a, a) px", 1)]
    for key, title, scale in wanted:
        if points(key):
            refs = [v for k in ("epe_all_zero", "epe_all_const") for _, v in points(k)[-1:]] if key == "epe_all" else []
            series.append((title, points(key, scale), refs))
    for key, what in (("iou", ""), ("iou_flow_path", ", flow path alone")):
        for c, name in enumerate(classes or []):
            if "car" in name:
                found = [(r["iteration"], 100 * r["validation"][key][c]) for r in val
                         if len(r["validation"].get(key) or []) > c and r["validation"][key][c] is not None]
                if found:
                    series.append((f"val IoU {name}{what} %", found, []))
    return series


def draw_curves(log_path, out_png, columns=3, tile=(300, 150)):
    """A picture of a run's curves (curve_series), one small plot per series, from its log.jsonl,
    with Pillow alone: each plot has its own y range (written at its corners) and the run's
    iterations on x. Returns the path written."""
    from PIL import ImageDraw
    series = curve_series(log_path)
    if not series:
        raise ValueError(f"{log_path}: no training or validation records to draw")
    w, h = tile
    rows = -(-len(series) // columns)
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    pen = ImageDraw.Draw(canvas)
    last = max(i for _, points, _ in series for i, _ in points)
    for k, (title, points, refs) in enumerate(series):
        x0, y0 = (k % columns) * w, (k // columns) * h
        left, top, right, bottom = x0 + 44, y0 + 18, x0 + w - 8, y0 + h - 18
        values = [v for _, v in points]
        lo, hi = min(values + refs), max(values + refs)
        if hi - lo < 1e-12:
            lo, hi = lo - 1, hi + 1
        pen.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        pen.text((x0 + 4, y0 + 3), title, fill=(0, 0, 0))
        pen.text((x0 + 2, top), f"{hi:.3g}", fill=(80, 80, 80))
        pen.text((x0 + 2, bottom - 10), f"{lo:.3g}", fill=(80, 80, 80))
        pen.text((left, bottom + 3), "0", fill=(80, 80, 80))
        pen.text((right - 40, bottom + 3), f"it {last}", fill=(80, 80, 80))
        xy = [(left + (right - left) * i / max(last, 1), bottom - (bottom - top) * (v - lo) / (hi - lo))
              for i, v in points]
        for ref in refs:
            y = bottom - (bottom - top) * (ref - lo) / (hi - lo)
            pen.line([(left, y), (right, y)], fill=(170, 170, 170), width=1)
        if len(xy) > 1:
            pen.line(xy, fill=(31, 119, 180), width=2)
        for x, y in xy if len(xy) <= 20 else xy[-1:]:
            pen.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(214, 39, 40))
        pen.text((right - 70, top + 2), f"last {values[-1]:.3g}", fill=(214, 39, 40))
    canvas.save(out_png)
    return Path(out_png)


# =============================================================================================
# 7. Benchmark files
# =============================================================================================
# Cityscapes' server scores labelIds: every train id goes back to the one label id that maps to it.
CITYSCAPES_TRAIN_TO_LABEL = tuple(label_id for _, label_id, train_id, _, _ in
                                  sorted(data.CITYSCAPES_LABELS, key=lambda row: row[2]) if 0 <= train_id < 255)
KITTI_FLOW_RANGE = (-512.0, 511.984375)  # what KITTI's 16-bit PNG can hold


def write_cityscapes_prediction(path, train_ids):
    """Write a prediction (H, W) of Cityscapes train ids 0..18 as an 8-bit labelIds PNG at `path`.

    The benchmark (cityscapesScripts' evalPixelLevelSemanticLabeling) finds a result by the
    CITY_SEQ_FRAME in its name; we keep the image's own name, CITY_SEQ_FRAME_leftImg8bit.png.
    """
    train_ids = np.asarray(train_ids.cpu() if torch.is_tensor(train_ids) else train_ids)
    table = np.array(CITYSCAPES_TRAIN_TO_LABEL, dtype=np.uint8)
    if train_ids.min() < 0 or train_ids.max() >= len(table):
        raise ValueError(f"{path}: train ids must be 0..{len(table) - 1}, got {train_ids.min()}..{train_ids.max()}")
    Image.fromarray(table[train_ids]).save(path)


def write_kitti_submission(path, flow):
    """Write a predicted flow (2, H, W) as a KITTI 16-bit PNG (data.write_kitti_flow), every pixel valid.

    Values beyond what the format holds ([-512, 511.98] px) are clipped to it, with a warning: a
    prediction that long is an outlier either way, and the benchmark needs a file for every image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flow = flow.permute(1, 2, 0).cpu().double().numpy()
    outside = int(((flow < KITTI_FLOW_RANGE[0]) | (flow > KITTI_FLOW_RANGE[1])).sum())
    if outside:
        print(f"warning: {path}: {outside} flow values beyond KITTI's 16-bit range {KITTI_FLOW_RANGE} px clipped")
    flow = flow.clip(*KITTI_FLOW_RANGE)
    data.write_kitti_flow(path, flow)


# =============================================================================================
# 8. A folder of frames without ground truth
# =============================================================================================
def list_frames(folder):
    """The image files of a folder (.png, .jpg, .jpeg), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: frames folder not found (--frames)")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise FileNotFoundError(f"{folder}: no .png or .jpg frames (--frames)")
    return frames


def _frame_flow_file(flow_dir, frame):
    """The flow F_t->t-1 of a frame in a flow folder: the frame's name with .flo, _flow.png or .npy."""
    for suffix in data.FLOW_SUFFIXES:
        path = Path(flow_dir) / (frame.stem + suffix)
        if path.is_file():
            return path
    return None


@torch.no_grad()
def run_frames(model, method, frames, out, device, palette, inference=None, flow_net=None, flow_dir=None,
               log=print):
    """Predictions for every frame of a video without ground truth, written to `out`:
      NAME_seg.png   the colourised segmentation (psp, efc, flow2seg)
      NAME_flow.png  F_t->t+1 in Middlebury colours, for every frame but the last, when a flow
                     network is given (an efc / flow checkpoint itself, or --flow-checkpoint)
    Flow2Seg's input F_t->t-1 comes from `flow_dir` (files named like the frames, see
    _frame_flow_file; every frame but the first needs one), else from `flow_net`. The first frame
    has no previous frame: it gets zero flow (a static scene) unless flow_dir holds a file for it.
    With a flow network the temporal consistency of consecutive predictions is measured across
    its flow F_t->t+1, occlusion by the forward-backward check (warp.fb_occlusion). Returns
    {'frames', and 'temporal_consistency', 'consistency_pairs', 'consistency_pixels' when measured;
    the consistency is NaN when no pixel could be compared}.
    """
    if method == "flow2seg" and flow_dir is None and flow_net is None:
        raise ValueError("flow2seg needs an input flow F_t->t-1 for each frame: pass --flow-dir (flows named "
                         "like the frames, .flo / _flow.png / .npy) or --flow-checkpoint (an efc or flow checkpoint)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segmenting = method != "flow"
    agree = counted = pairs = 0
    previous_image = previous_prediction = None
    size = None
    for t, frame in enumerate(frames):
        rgb = data.image_tensor(frame)  # (3, H, W) in [0, 1]
        image = data.normalize(rgb[None]).to(device)  # (1, 3, H, W)
        if size is None:
            size = image.shape[-2:]
        elif image.shape[-2:] != size:
            raise ValueError(f"{frame}: frame is {image.shape[-1]}x{image.shape[-2]}, the first frame "
                             f"{size[1]}x{size[0]} (width x height); all frames must have one size")
        flows = None
        if flow_net is not None and previous_image is not None:
            flows = flow_outputs(flow_net, image, previous_image)  # flow_ab = F_t->t-1, flow_ba = F_t-1->t
            Image.fromarray(data.flow_to_color(flows["flow_ba"][0].permute(1, 2, 0).cpu().numpy())).save(
                out / f"{frames[t - 1].stem}_flow.png")
        if segmenting:
            flow_input = None
            if method == "flow2seg":
                path = _frame_flow_file(flow_dir, frame) if flow_dir is not None else None
                if path is not None:
                    flow_input = torch.from_numpy(data.read_flow(path)[0]).permute(2, 0, 1)[None].to(device)
                    if flow_input.shape[-2:] != size:
                        raise ValueError(f"{path}: flow is {flow_input.shape[-1]}x{flow_input.shape[-2]}, the frames "
                                         f"{size[1]}x{size[0]} (width x height)")
                elif t == 0:
                    flow_input = image.new_zeros(1, 2, *size)
                elif flow_dir is not None:
                    raise FileNotFoundError(f"{Path(flow_dir) / frame.stem}.flo (or _flow.png, .npy) not found: the "
                                            f"flow F_t->t-1 of {frame.name} (--flow-dir)")
                else:
                    flow_input = flows["flow_ab"]
            prediction = infer(model, method, image, flow_input, **(inference or {})).argmax(1)  # (1, H, W)
            Image.fromarray(data.colorize(prediction[0].cpu().numpy(), palette)).save(out / f"{frame.stem}_seg.png")
            Image.fromarray(overlay(image[0], prediction[0].cpu().numpy(), palette)).save(
                out / f"{frame.stem}_overlay.png")
            if flows is not None:
                occluded = warp.fb_occlusion(flows["flow_ba"], flows["flow_ab"])[:, 0] > 0  # pixels of t-1
                a, c = consistency_counts(previous_prediction, prediction, flows["flow_ba"], occluded)
                agree, counted, pairs = agree + a, counted + c, pairs + 1
            previous_prediction = prediction
        previous_image = image
        log(f"\rframe {t + 1}/{len(frames)}", end="", flush=True)
    log("")
    result = {"frames": len(frames)}
    if pairs:  # no pixel counted (every pixel occluded or leaving the frame): undefined, NaN, printed '-'
        result.update(temporal_consistency=agree / counted if counted else math.nan, consistency_pairs=pairs,
                      consistency_pixels=counted)
    return result


# =============================================================================================
# 9. Pseudo-labels for KITTI raw (EFC "Dataset and Setting": "we generate some coarse segmentation
# results as the segmentation ground truths through a model trained on Cityscapes")
# =============================================================================================
@torch.no_grad()
def write_pseudo_labels(model, method, frames, raw_root, out, device, inference=None, log=print):
    """The segmentation of every frame as a label PNG (kitti_raw.label_path: `out` mirrors the raw
    layout under raw_root), values the argmax train ids of `model`. The paper names no confidence
    threshold, so none is applied: the plain argmax, no pixel 255. Inference as `infer` (single
    scale by default; --mode multiscale gives PSPNet's test procedure). Returns the number written."""
    if method not in ("psp", "efc"):
        raise ValueError(f"pseudo-labels come from a segmentation network on single frames (psp or efc), "
                         f"not {method}" + (" (it needs a flow input)" if method == "flow2seg" else ""))
    for k, frame in enumerate(frames):
        image = data.normalize(data.image_tensor(frame)[None]).to(device)  # (1, 3, H, W)
        prediction = infer(model, method, image, **(inference or {})).argmax(1)[0]  # (H, W) train ids
        kitti_raw.write_label(kitti_raw.label_path(out, raw_root, frame), prediction.cpu().numpy())
        log(f"\rpseudo-labels: {k + 1}/{len(frames)}", end="", flush=True)
    log("")
    return len(frames)


def _pseudo_label_command(args, net, checkpoint, inference, device):
    """evaluate.py --pseudo-labels RAW --out LABELS: the labels kitti_raw.KittiRaw reads."""
    config = checkpoint["config"]
    if config["dataset"] != "cityscapes" or config["num_classes"] != len(data.CITYSCAPES_CLASSES):
        raise ValueError(f"{args.checkpoint}: pseudo-labels need a Cityscapes model (19 train ids), this one "
                         f"was trained on {config['dataset']} with {config['num_classes']} classes")
    frames = kitti_raw.labelled_frames(args.pseudo_labels)
    count = write_pseudo_labels(net, checkpoint["method"], frames, args.pseudo_labels, args.out, device, inference)
    print(f"wrote {count} pseudo-labels of {args.pseudo_labels} ({describe_inference(inference)}) under {args.out}")


# =============================================================================================
# 10. The table and the command line
# =============================================================================================
def _number(value, scale=1.0, width=9, digits=2):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value * scale:>{width}.{digits}f}"


def format_table(metrics, classes=None, title=""):
    """The printed table: per-class IoU rows, summary lines, flow rows with pooled and per-image
    columns. IoU, accuracy, consistency and Fl in %, EPE in pixels; '-' = not defined (NaN)."""
    lines = [title] if title else []
    if "iou" in metrics:
        names = classes or [str(k) for k in range(len(metrics["iou"]))]
        path = metrics.get("iou_flow_path")  # Flow2Seg: its flow path alone, a second column
        lines.append(f"{'class':<24}{'IoU %':>9}" + (f"{'flow path alone':>17}" if path else ""))
        lines += [f"{name:<24}{_number(v, 100)}" + (_number(path[k], 100, 17) if path else "")
                  for k, (name, v) in enumerate(zip(names, metrics["iou"]))]
        if "category_ious" in metrics:
            lines += [f"{'category ' + name:<24}{_number(v, 100)}"
                      for name, v in zip(data.CITYSCAPES_CATEGORIES, metrics["category_ious"])]
        lines.append(f"{'mIoU (IoU cls)':<24}{_number(metrics['miou'], 100)}"
                     + (_number(metrics["miou_flow_path"], 100, 17) if path else ""))
        if "category_iou" in metrics:
            lines.append(f"{'IoU cat':<24}{_number(metrics['category_iou'], 100)}")
        if "miou_cars_merged" in metrics:  # what one image can tell: a car, not which car (merged_car_metrics)
            lines.append(f"{'car, both kinds merged':<24}{_number(metrics['iou_car_merged'], 100)}")
            lines.append(f"{'mIoU, cars merged':<24}{_number(metrics['miou_cars_merged'], 100)}")
        n = metrics["segmentation_images"]
        lines.append(f"{'pixel accuracy':<24}{_number(metrics['pixel_acc'], 100)}   ({n} image{'s' * (n != 1)})")
    if "temporal_consistency" in metrics:
        lines.append(f"{'temporal consistency':<24}{_number(metrics['temporal_consistency'], 100)}"
                     f"   ({metrics['consistency_pairs']} frame pairs, occluded pixels ignored)")
        if "temporal_consistency_labels" in metrics:
            lines.append(f"{'  of the ground truth':<24}{_number(metrics['temporal_consistency_labels'], 100)}")
    if "epe_all" in metrics:
        lines.append(f"{'flow':<24}{'pooled':>9}{'per image':>11}   ({metrics['flow_pairs']} pairs)")
        for key, name, scale in (("epe_noc", "EPE noc (px)", 1), ("epe_all", "EPE all (px)", 1),
                                 ("fl_noc", "Fl-noc %", 100), ("fl_all", "Fl-all %", 100)):
            lines.append(f"{name:<24}{_number(metrics[key], scale)}{_number(metrics[key + '_per_image'], scale, 11)}")
        if "epe_moving_camera" in metrics:  # the cars' own motion: a camera-only flow's ratio is ~1
            lines.append(f"{'EPE car_moving (px)':<24}{_number(metrics['epe_moving'])}   (camera-only flow "
                         f"{metrics['epe_moving_camera']:.2f} px: ratio {metrics['moving_camera_ratio']:.2f})")
        if "occ_iou_est" in metrics:
            lines.append(f"{'occlusion IoU at 0.5 %':<24}{_number(metrics['occ_iou_est'], 100)}   O_est;"
                         f"{_number(metrics['occ_iou_range'], 100, 7)} range map of F_b->a, EFC eq. (3)")
            lines.append(f"{'mean O_est %':<24}{_number(metrics['occ_est_occluded'], 100)}   on occluded pixels;"
                         f"{_number(metrics['occ_est_visible'], 100, 7)} on visible ones")
    return "\n".join(lines)


def format_metric(name, value):
    """One validation number for a log line, in the units the tables use: EPEs, flows and the
    identity check in pixels, every fraction (mIoU, accuracy, Fl, temporal consistency, occlusion
    IoU) in %, an error over another's (*_ratio) as a factor."""
    if name.startswith(("epe", "const_", "identity")):
        return f"{name} {value:.2f} px"
    if name.endswith(("_pixels", "_pairs", "_images")):  # counts
        return f"{name} {value:.0f}"
    if name.endswith("_ratio"):  # one error over another's (moving_camera_ratio)
        return f"{name} {value:.2f}x"
    return f"{name} {100 * value:.2f} %"


def json_safe(value):
    """metrics.json and train.py's log: NaN -> null (JSON has no NaN), in nested lists and dicts."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def check_arguments(parser, args):
    """The flags' combinations main() refuses, each in one line."""
    if not args.checkpoint:
        parser.error("give --checkpoint CKPT (or --curves RUN_DIR)")
    if args.pictures < 0 or (args.max_items is not None and args.max_items < 1):
        parser.error(f"--pictures {args.pictures} must be >= 0 and --max-items {args.max_items} >= 1")
    if not 0 < args.stride_rate <= 1 or any(s <= 0 for s in args.scales) or (args.crop and min(args.crop) < 1):
        parser.error(f"--stride-rate {args.stride_rate} must be in (0, 1], --scales {args.scales} positive, "
                     f"--crop {args.crop} at least 1 x 1")
    if (args.frames or args.pseudo_labels) and not args.out:
        parser.error(f"{'--frames' if args.frames else '--pseudo-labels'} writes to --out: give --out DIR")
    if args.frames and args.submit or args.flow_checkpoint and not args.frames:
        parser.error("--flow-checkpoint goes with --frames, --submit with a dataset (not --frames)")
    if args.pseudo_labels and (args.frames or args.submit):
        parser.error("--pseudo-labels goes alone: not with --frames or --submit")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate a train.py checkpoint on its validation set (table, metrics.json, pictures), write "
                    "benchmark files, or run it on a folder of frames.")
    parser.add_argument("--checkpoint", help="a train.py checkpoint (ckpt.pt)")
    parser.add_argument("--curves", metavar="RUN_DIR",
                        help="instead of evaluating: draw RUN_DIR/curves.png (loss terms and validation metrics "
                             "over iterations) from RUN_DIR/log.jsonl; train.py draws it at the end of every run")
    parser.add_argument("--dataset", choices=DATASETS, help="override the checkpoint's dataset")
    parser.add_argument("--data-root", help="override the checkpoint's data root")
    parser.add_argument("--flow-dir", help="Flow2Seg's input flows: a flow directory (data.flow_path) for a dataset; "
                                           "with --frames, flows F_t->t-1 named like the frames")
    parser.add_argument("--split", help="default: val (Cityscapes layout, CamVid), training (KITTI)")
    parser.add_argument("--out", help="write metrics.json and pictures (or, with --frames, the predictions) here")
    parser.add_argument("--pictures", type=int, default=4, help="picture panels per dataset (default: %(default)s)")
    parser.add_argument("--submit", help="write benchmark files here: Cityscapes labelIds PNGs, KITTI flow/*.png")
    parser.add_argument("--mode", choices=("single", "multiscale", "sliding"), default="single",
                        help="inference: single scale; multiscale (--scales, flip; sliding too with --crop); "
                             "sliding windows of --crop at --stride-rate (default: %(default)s)")
    parser.add_argument("--scales", type=float, nargs="+", default=PSP_SCALES,
                        help="multiscale: scales of the input size (default: PSPNet's 0.5 .. 1.75)")
    parser.add_argument("--no-flip", action="store_true", help="multiscale: no mirrored runs")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                        help="sliding window size (default for --mode sliding: 713 713)")
    parser.add_argument("--stride-rate", type=float, default=STRIDE_RATE,
                        help="window stride as a fraction of the window (default: 2/3)")
    parser.add_argument("--max-items", type=int, help="evaluate only the first N items of each dataset")
    parser.add_argument("--frames", help="a folder of video frames without ground truth (needs --out)")
    parser.add_argument("--flow-checkpoint", help="with --frames: an efc or flow checkpoint giving the flow")
    parser.add_argument("--pseudo-labels", metavar="KITTI_RAW",
                        help="write pseudo-labels (argmax train ids) of a KITTI raw root's labelled frames with a "
                             "Cityscapes checkpoint to --out, for train.py's KITTI raw (kitti_raw.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = data.one_line_errors(parser).parse_args(argv)
    if args.curves:
        log = Path(args.curves) / "log.jsonl"
        if not log.is_file():
            parser.error(f"--curves {args.curves}: no log.jsonl there (expected a train.py run folder)")
        try:
            print(f"wrote {draw_curves(log, Path(args.curves) / 'curves.png')}")
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            parser.error(f"--curves {args.curves}: {e}")
        return
    check_arguments(parser, args)
    try:
        device = torch.device(args.device)
        net, checkpoint = load_checkpoint(args.checkpoint, device)
        if args.pseudo_labels:
            inference = inference_mode(args.mode, args.scales, not args.no_flip, args.crop, args.stride_rate)
            return _pseudo_label_command(args, net, checkpoint, inference, device)
        config = config_of(checkpoint, args.dataset, args.data_root, None if args.frames else args.flow_dir)
        method = config["method"]
        inference = inference_mode(args.mode, args.scales, not args.no_flip, args.crop, args.stride_rate)
        palette = palette_for(config, config["num_classes"])
        start = time.perf_counter()
        title = (f"{method} ({config['backbone']}) from {args.checkpoint}, iteration {checkpoint.get('iteration', '?')}"
                 f"; {describe_inference(inference)}")
        if args.frames:
            flow_net = net if has_own_flow(config) else None  # TCC_fix: give --flow-checkpoint
            if args.flow_checkpoint:
                flow_net, flow_checkpoint = load_checkpoint(args.flow_checkpoint, device)
                if flow_checkpoint["method"] not in ("efc", "flow"):
                    raise ValueError(f"{args.flow_checkpoint}: a {flow_checkpoint['method']} checkpoint computes no "
                                     "flow; --flow-checkpoint needs an efc or flow checkpoint")
            frames = list_frames(args.frames)
            metrics = run_frames(net, method, frames, args.out, device, palette, inference, flow_net, args.flow_dir)
            title += f"; {len(frames)} frames of {args.frames} -> {args.out}"
        else:
            if args.submit and not ((config["dataset"] == "cityscapes" and method != "flow")
                                    or (config["dataset"] == "kitti" and has_own_flow(config))):
                raise ValueError(f"--submit writes Cityscapes labelIds (psp, efc, flow2seg) or KITTI flow (efc, flow; not TCC_fix, whose flow is another network's); "
                                 f"nothing to submit for {method} on {config['dataset']}")
            metrics, sets = run_evaluation(net, config, device, args.max_items, inference, args.split, args.out,
                                           args.pictures if args.out else 0, args.submit)
            if not metrics.get("segmentation_images") and not metrics.get("flow_pairs") and not args.submit:
                raise ValueError(f"nothing to evaluate: {method} on {config['dataset']} {sets['split']} has no "
                                 "segmentation labels or flow ground truth")
            title += f"; {config['dataset']} {sets['split']} at {config['data_root']}"
        print(format_table(metrics, None if args.frames else sets["classes"], title))
        print(f"{time.perf_counter() - start:.1f} s")
        if args.out:
            record = {"checkpoint": str(args.checkpoint), "iteration": checkpoint.get("iteration"), "method": method,
                      "dataset": config["dataset"], "data_root": str(config["data_root"]),
                      "inference": describe_inference(inference), "inference_args": inference,
                      "classes": None if args.frames else json_safe(list(sets["classes"] or [])),
                      "metrics": {k: json_safe(v) for k, v in metrics.items()}}
            if not args.frames:
                record["split"] = sets["split"]
            Path(args.out, "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
            pictures = len(list(Path(args.out).rglob("*.png")))
            print(f"wrote {Path(args.out, 'metrics.json')} and {pictures} PNG files under {args.out}")
    except (OSError, ValueError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
