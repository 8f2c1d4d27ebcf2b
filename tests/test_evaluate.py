"""Tests of evaluate.py: metrics with known answers, the colour wheel, temporal consistency, the
inference modes, benchmark files, checkpoints, validate() and the command line.

Networks are ResNet-18s on a tiny synthetic world (one validation snippet of 48 x 64), checkpoints
written by hand in train.py's format; small stand-in networks check the inference modes exactly.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import model
import train
import warp
import synthetic

SIZE = (48, 64)
K = 9  # the synthetic world's classes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core machine, two intra-op threads make these small forwards ~10x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.make_synthetic_world(tmp_path_factory.mktemp("world") / "synthetic", num_train=1, num_val=1,
                                     size=SIZE, seed=5, workers=1)


def config_for(method, root, num_classes=K, dataset="synthetic"):
    return {"method": method, "backbone": "resnet18", "flow_backbone": "resnet18", "num_classes": num_classes,
            "dataset": dataset, "data_root": str(root), "flow_dir": None, "max_displacement": 20, "corr_stride": 2}


def save_checkpoint(path, method, root, num_classes=K, dataset="synthetic"):
    """A checkpoint in train.py's format, as train.py writes it (plus a key evaluate.py must ignore)."""
    torch.manual_seed(0)
    net = model.build_model(method, num_classes, "resnet18", "resnet18", 20, 2)
    train.save_checkpoint(path, {"method": method, "config": config_for(method, root, num_classes, dataset),
                                 "model": net.state_dict(), "iteration": 7, "optimizer": {}})
    return path


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {method: save_checkpoint(folder / f"{method}.pt", method, world) for method in ("psp", "efc", "flow2seg")}


# ------------------------------------------------------------------------------ segmentation metrics
def test_segmentation_metrics_on_a_hand_made_confusion_matrix():
    # rows = ground truth, columns = prediction. Class 2 is predicted but never labelled (IoU 0,
    # counts in the mean); class 3 is neither labelled nor predicted (NaN, left out).
    confusion = np.array([[3, 1, 0, 0],
                          [0, 4, 2, 0],
                          [0, 0, 0, 0],
                          [0, 0, 0, 0]])
    m = evaluate.segmentation_metrics(confusion)
    assert m["iou"][0] == pytest.approx(3 / 4)
    assert m["iou"][1] == pytest.approx(4 / 7)
    assert m["iou"][2] == 0.0 and np.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((3 / 4 + 4 / 7 + 0) / 3)
    assert m["pixel_acc"] == pytest.approx(7 / 10)


def test_confusion_matrix_ignores_255_and_an_all_ignore_image_adds_nothing():
    label = torch.tensor([[0, 0, 1, 1, 255]])
    prediction = torch.tensor([[0, 1, 1, 1, 2]])
    confusion = evaluate.confusion_matrix(prediction, label, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    ignored = evaluate.confusion_matrix(torch.randint(0, 3, (4, 5)), torch.full((4, 5), 255), 3)
    assert ignored.sum() == 0
    with np.errstate(all="raise"):  # no division warnings on an empty matrix
        m = evaluate.segmentation_metrics(ignored.numpy())
    assert np.isnan(m["miou"]) and np.isnan(m["pixel_acc"]) and all(np.isnan(m["iou"]))
    with pytest.raises(ValueError, match="outside 0..2"):
        evaluate.confusion_matrix(prediction, torch.tensor([[0, 0, 7, 1, 255]]), 3)


def test_category_iou_merges_the_classes_of_a_category():
    n = len(data.CITYSCAPES_CLASSES)
    confusion = np.zeros((n, n))
    road, sidewalk, car = (data.CITYSCAPES_CLASSES.index(c) for c in ("road", "sidewalk", "car"))
    confusion[road, road], confusion[road, sidewalk] = 6, 2  # road taken for sidewalk: both "flat"
    confusion[car, car], confusion[car, road] = 1, 1  # a car taken for road: a category error
    m = evaluate.segmentation_metrics(confusion, data.CITYSCAPES_TRAIN_TO_CATEGORY)
    flat, vehicle = data.CITYSCAPES_CATEGORIES.index("flat"), data.CITYSCAPES_CATEGORIES.index("vehicle")
    assert m["iou"][road] == pytest.approx(6 / 9) and m["iou"][sidewalk] == 0.0
    assert m["category_ious"][flat] == pytest.approx(8 / 9)  # 8 flat pixels right, 1 car pixel called flat
    assert m["category_ious"][vehicle] == pytest.approx(1 / 2)
    assert sum(not np.isnan(v) for v in m["category_ious"]) == 2
    assert m["category_iou"] == pytest.approx((8 / 9 + 1 / 2) / 2)


# ------------------------------------------------------------------------------ flow metrics
def test_flow_metrics_known_answers_pooled_and_per_image():
    gt = torch.zeros(3, 2, 2, 3)
    flow = torch.zeros(3, 2, 2, 3)
    valid = torch.zeros(3, 2, 3, dtype=torch.bool)
    occluded = torch.zeros(3, 2, 3, dtype=torch.bool)
    # image 0, pixel by pixel (row-major): (gt, prediction)
    cases = [((10, 0), (14, 0)),  # EPE 4 > 3 and > 5 % of 10: outlier
             ((100, 0), (104, 0)),  # EPE 4 < 5 % of 100: not an outlier
             ((0, 0), (0, 2)),  # EPE 2 < 3: not an outlier
             ((3, 4), (3, 4)),  # EPE 0
             ((0, 0), (1000, 0)),  # invalid: never counted
             ((0, 0), (3, 4))]  # EPE 5, outlier, occluded: in 'all' only
    for p, (g, f) in enumerate(cases):
        gt[0, :, p // 3, p % 3], flow[0, :, p // 3, p % 3] = torch.tensor(g), torch.tensor(f)
    valid[0] = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    occluded[0, 1, 2] = True
    flow[1, 0, 0, 0], valid[1, 0, 0] = 1.0, True  # image 1: one valid pixel, EPE 1
    # image 2: nothing valid, left out of the per-image means
    all_ = evaluate.flow_metrics(evaluate.flow_error_counts(flow, gt, valid), "all")
    noc = evaluate.flow_metrics(evaluate.flow_error_counts(flow, gt, valid & ~occluded), "noc")
    assert all_["epe_all"] == pytest.approx((4 + 4 + 2 + 0 + 5 + 1) / 6)
    assert all_["epe_all_per_image"] == pytest.approx((15 / 5 + 1) / 2)
    assert all_["fl_all"] == pytest.approx(2 / 6)
    assert all_["fl_all_per_image"] == pytest.approx((2 / 5 + 0) / 2)
    assert noc["epe_noc"] == pytest.approx(11 / 5) and noc["fl_noc"] == pytest.approx(1 / 5)
    nothing = evaluate.flow_metrics(evaluate.flow_error_counts(flow, gt, torch.zeros_like(valid)), "all")
    assert all(np.isnan(v) for v in nothing.values())


def test_colour_wheel_maps_the_axes_to_the_standard_colours_and_zero_flow_to_white():
    # Baker et al.'s colour wheel (RY 15, YG 6, GC 4, CB 11, BM 13, MR 6), as its reference code gives them.
    axes = np.array([[[1, 0], [0, 1], [-1, 0], [0, -1]]], dtype=np.float32)  # right, down, left, up
    colours = data.flow_to_color(axes).astype(int)[0]
    expected = np.array([(255, 0, 0), (255, 230, 0), (0, 209, 255), (88, 0, 255)])
    assert np.abs(colours - expected).max() <= 1
    assert (data.flow_to_color(np.zeros((3, 4, 2))) == 255).all()
    half = data.flow_to_color(axes * 0.5, max_radius=1.0).astype(int)[0, 0]  # half length: halfway to white
    assert np.abs(half - (255, 128, 128)).max() <= 1


# ------------------------------------------------------------------------------ temporal consistency
def test_merged_cars_count_a_swapped_car_as_right_and_a_missed_car_as_wrong():
    classes = list(data.SYNTH_CLASSES)
    confusion = np.diag([50, 40, 30, 20, 10, 8, 8, 2, 0]).astype(np.float64)
    confusion[5, 6] = confusion[6, 5] = 8  # half of each look-alike car taken for the other
    split = evaluate.segmentation_metrics(confusion)
    assert split["iou"][5] == pytest.approx(8 / 24) and split["iou"][6] == pytest.approx(8 / 24)
    merged = evaluate.merged_car_metrics(confusion, classes)
    assert merged["iou_car_merged"] == 1.0 and merged["miou_cars_merged"] == 1.0  # bicycle: NaN, left out
    confusion[5, 0] = 32  # now a car's pixels called road: 32 of the 64 car pixels lost
    merged = evaluate.merged_car_metrics(confusion, classes)
    assert merged["iou_car_merged"] == pytest.approx(32 / 64)
    assert merged["miou_cars_merged"] == pytest.approx(np.mean([50 / 82, 1, 1, 1, 1, 0.5, 1]))
    assert evaluate.merged_car_metrics(np.eye(3), ["a", "b", "c"]) == {}  # no look-alike cars: nothing


def test_temporal_consistency_is_one_for_consistent_predictions_and_drops_with_a_corrupted_frame():
    g = torch.Generator().manual_seed(0)
    H, W = 12, 16
    labels_b = torch.randint(0, 5, (1, H, W), generator=g)
    flow = torch.zeros(1, 2, H, W)
    flow[:, 0], flow[:, 1] = 2.0, -1.0  # pixel (x, y) of a is at (x + 2, y - 1) in b
    labels_a = torch.randint(0, 5, (1, H, W), generator=g)  # the border that leaves b: anything
    labels_a[:, 1:, :W - 2] = labels_b[:, :H - 1, 2:]
    inside = (H - 1) * (W - 2)
    assert evaluate.consistency_counts(labels_a, labels_b, flow) == (inside, inside)
    # sub-pixel flow: the nearest pixel is looked up
    assert evaluate.consistency_counts(labels_a, labels_b, flow + 0.3) == (inside, inside)
    # occluded pixels do not count, whatever they hold
    occluded = torch.zeros(1, H, W, dtype=torch.bool)
    occluded[:, 4:8, 4:8] = True
    wrong = labels_a.clone()
    wrong[occluded] = (wrong[occluded] + 1) % 5
    assert evaluate.consistency_counts(wrong, labels_b, flow, occluded) == (inside - 16, inside - 16)
    # a corrupted frame b: exactly the changed pixels disagree
    corrupted = labels_b.clone()
    corrupted[:, 2:6, 5:10] = (corrupted[:, 2:6, 5:10] + 1) % 5
    assert evaluate.consistency_counts(labels_a, corrupted, flow) == (inside - 20, inside)


# ------------------------------------------------------------------------------ inference modes
class Pointwise(torch.nn.Module):
    """A PSPNet stand-in whose logits depend on each pixel alone: windows cannot change them."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, image):
        return {"logits": self.conv(image)}


class FlowEcho(torch.nn.Module):
    """A Flow2Seg stand-in: the class-0 logit is the input flow's u, the class-1 logit 0."""

    def forward(self, image, flow):
        return {"logits": torch.cat([flow[:, :1], torch.zeros_like(flow[:, :1])], 1)}


def test_multiscale_and_sliding_equal_single_scale_with_one_scale_and_a_covering_window():
    torch.manual_seed(0)
    net = model.PSPNet(5, "resnet18").eval()
    image = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        single = evaluate.segment(net, "psp", image).log_softmax(1)
        for out in (evaluate.segment_multiscale(net, "psp", image, scales=(1.0,), flip=False),
                    evaluate.segment_sliding(net, "psp", image, crop=SIZE),
                    evaluate.segment_sliding(net, "psp", image, crop=(713, 713)),  # clamped to the image
                    evaluate.infer(net, "psp", image)):
            torch.testing.assert_close(out, single, atol=1e-5, rtol=0)
        both = evaluate.segment_multiscale(net, "psp", image, scales=(0.75, 1.0), flip=True)
    assert both.shape == single.shape and torch.allclose(both.exp().sum(1), torch.ones(1))


def test_sliding_windows_cover_every_pixel_and_average_exactly():
    torch.manual_seed(0)
    net = Pointwise()
    image = torch.randn(2, 3, 20, 31)
    with torch.no_grad():
        single = evaluate.segment(net, "psp", image).log_softmax(1)
        for crop, rate in (((8, 11), 2 / 3), ((7, 7), 1.0), ((20, 10), 0.5)):
            torch.testing.assert_close(evaluate.segment_sliding(net, "psp", image, crop=crop, stride_rate=rate),
                                       single, atol=1e-5, rtol=0)


def test_flow2seg_multiscale_rescales_and_mirrors_the_input_flow():
    image, flow = torch.randn(1, 3, 8, 12), torch.zeros(1, 2, 8, 12)
    flow[:, 0] = 1.0
    # At scale 2 the flow is twice as long in pixels of the resized grid: the class-0 logit is 2.
    p = evaluate.segment_multiscale(FlowEcho(), "flow2seg", image, flow, scales=(2.0,), flip=False).exp()
    torch.testing.assert_close(p[:, 0], torch.full((1, 8, 12), torch.sigmoid(torch.tensor(2.0)).item()))
    # The mirrored run sees u = -1 (mirroring negates u): probabilities sigmoid(1) and sigmoid(-1) average to 1/2.
    p = evaluate.segment_multiscale(FlowEcho(), "flow2seg", image, flow, scales=(1.0,), flip=True).exp()
    torch.testing.assert_close(p[:, 0], torch.full((1, 8, 12), 0.5))
    with pytest.raises(ValueError, match="flow2seg needs the flow"):
        evaluate.segment(FlowEcho(), "flow2seg", image)


# ------------------------------------------------------------------------------ benchmark files
def test_cityscapes_prediction_round_trips_through_label_ids(tmp_path):
    train_ids = torch.arange(19).repeat_interleave(3).view(3, 19)
    path = tmp_path / "frankfurt_000000_000294_leftImg8bit.png"
    evaluate.write_cityscapes_prediction(path, train_ids)
    stored = np.array(Image.open(path))
    assert stored.dtype == np.uint8 and stored[0, 0] == 7 and stored[-1, -1] == 33  # road, bicycle as labelIds
    back = data.read_label(path, data.CITYSCAPES_LABEL_LUT, "Cityscapes label ids")
    assert (back == train_ids.numpy()).all()


def test_kitti_submission_round_trips_and_clips_what_the_format_cannot_hold(tmp_path):
    flow = torch.randn(2, 5, 7) * 30
    flow[0, 0, 0], flow[1, 0, 1] = 900.0, -700.0
    path = tmp_path / "flow" / "000003_10.png"
    evaluate.write_kitti_submission(path, flow)
    back, valid = data.read_kitti_flow(path)
    expected = flow.permute(1, 2, 0).numpy().clip(*evaluate.KITTI_FLOW_RANGE)
    assert valid.all() and np.abs(back - expected).max() <= 1 / 128


# ------------------------------------------------------------------------------ checkpoints
def test_load_checkpoint_errors_name_the_file(tmp_path, world, checkpoints):
    net, checkpoint = evaluate.load_checkpoint(checkpoints["psp"])
    assert isinstance(net, model.PSPNet) and not net.training and checkpoint["iteration"] == 7
    with pytest.raises(FileNotFoundError, match="nowhere.pt: checkpoint not found"):
        evaluate.load_checkpoint(tmp_path / "nowhere.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt: not a readable torch checkpoint"):
        evaluate.load_checkpoint(text)
    torch.save({"model": {}}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare.pt: not a train.py checkpoint"):
        evaluate.load_checkpoint(tmp_path / "bare.pt")
    torch.save({"method": "deeplab", "config": config_for("psp", world), "model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: unknown method 'deeplab'"):
        evaluate.load_checkpoint(tmp_path / "other.pt")
    torch.save({"method": "psp", "config": config_for("psp", world, num_classes=4),
                "model": torch.load(checkpoints["psp"], weights_only=True)["model"]}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt: the weights do not fit a psp network"):
        evaluate.load_checkpoint(tmp_path / "wrong.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt: empty file \(0 bytes\)"):
        evaluate.load_checkpoint(tmp_path / "empty.pt")


def test_a_corrupted_or_diverged_checkpoint_is_refused(tmp_path, checkpoints):
    saved = torch.load(checkpoints["psp"], weights_only=True)
    assert saved["checksum"] == evaluate.checkpoint_checksum(saved)  # train.py stored it
    name = next(k for k, v in saved["model"].items() if v.is_floating_point() and v.numel() >= 2000)
    flipped = saved["model"][name].clone()
    words = flipped.view(-1).view(torch.int32)
    words[:1000] ^= 1 << 3  # 1000 words with one low mantissa bit flipped: values barely move
    corrupted = dict(saved, model=dict(saved["model"], **{name: flipped}))
    torch.save(corrupted, tmp_path / "corrupted.pt")
    with pytest.raises(ValueError, match="corrupted.pt: checksum mismatch"):
        evaluate.load_checkpoint(tmp_path / "corrupted.pt")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in saved["model"].items()}
    diverged = dict(saved, model=nan)
    diverged["checksum"] = evaluate.checkpoint_checksum(diverged)
    torch.save(diverged, tmp_path / "diverged.pt")
    with pytest.raises(ValueError, match="diverged.pt: .* hold NaN or inf"):
        evaluate.load_checkpoint(tmp_path / "diverged.pt")


# ------------------------------------------------------------------------------ validate()
def test_validate_psp_and_efc_on_the_synthetic_world(world, checkpoints):
    psp, _ = evaluate.load_checkpoint(checkpoints["psp"])
    psp.train()
    m = evaluate.validate(psp, config_for("psp", world), "cpu", max_items=4)
    assert psp.training  # the previous mode is restored
    assert set(m) >= {"miou", "pixel_acc", "iou", "temporal_consistency"} and "epe_all" not in m
    assert len(m["iou"]) == K and 0 <= m["miou"] <= 1 and m["consistency_pairs"] == 3
    assert 0 <= m["temporal_consistency"] <= 1
    assert m["temporal_consistency_labels"] > 0.9  # ground truth across ground-truth flow: nearly consistent
    assert all(isinstance(v, (int, float, list)) for v in m.values())

    efc, _ = evaluate.load_checkpoint(checkpoints["efc"])
    m = evaluate.validate(efc, config_for("efc", world), "cpu", max_items=3)
    assert {"epe_all", "epe_noc", "fl_all", "fl_noc", "epe_all_per_image"} <= set(m) and m["flow_pairs"] == 3
    # the same numbers by hand: EPE of the predicted F_a->b on valid / valid and not occluded pixels
    # over pairs spread across the whole set (the first, middle and last), not the first three
    sequence = data.SyntheticSequence(world, "val")
    assert evaluate.spread_indices(len(sequence), 3) == [0, 14, 28]
    epe_all, epe_noc, epe_moving, truth, identity = [], [], [], [], []
    moving = sequence.classes.index("car_moving")
    with torch.no_grad():
        for index in (0, 14, 28):
            item = sequence[index]
            flow = evaluate.predict_flow(efc, item["image_a"][None], item["image_b"][None])[0]
            epe = (flow - item["flow_fw"]).norm(dim=0)
            epe_all.append(epe[item["flow_fw_valid"]])
            epe_noc.append(epe[item["flow_fw_valid"] & ~item["occ_fw"]])
            epe_moving.append(epe[item["flow_fw_valid"] & (item["label_a"] == moving)])  # the moving cars' pixels
            truth.append(item["flow_fw"].permute(1, 2, 0)[item["flow_fw_valid"]])
            same = evaluate.predict_flow(efc, item["image_a"][None], item["image_a"][None])[0]
            identity.append(same.norm(dim=0).mean().item())
    assert m["epe_all"] == pytest.approx(torch.cat(epe_all).mean().item(), rel=1e-5)
    assert m["epe_noc"] == pytest.approx(torch.cat(epe_noc).mean().item(), rel=1e-5)
    epe_moving = torch.cat(epe_moving)
    assert len(epe_moving) > 50 and len(epe_moving) < len(torch.cat(epe_all)) / 4  # a few cars, not the frame
    assert m["epe_moving"] == pytest.approx(epe_moving.mean().item(), rel=1e-5)
    truth = torch.cat(truth).double()
    assert m["epe_all_zero"] == pytest.approx(truth.norm(dim=1).mean().item(), rel=1e-5)
    const = torch.tensor([m["const_u"], m["const_v"]], dtype=torch.float64)
    assert m["epe_all_const"] == pytest.approx((truth - const).norm(dim=1).mean().item(), rel=1e-6)
    # the best constant: no nudge of it lowers the mean EPE, and it beats zero flow
    for du, dv in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        assert (truth - const - torch.tensor([du, dv])).norm(dim=1).mean() >= m["epe_all_const"] - 1e-9
    assert m["epe_all_const"] <= m["epe_all_zero"]
    assert m["identity_flow"] == pytest.approx(sum(identity) / 3, rel=1e-5)
    # The cars' own motion against the camera-only flow on the same pixels, and EFC's two occlusion maps
    # (O_est at 0.5, the range map of F_b->a) against the true occlusion: IoU pooled over the pairs.
    own = torch.tensor([sequence.classes.index(name) for name in evaluate.OWN_MOTION])
    camera_error, inter, union, on_occluded, occluded = [], [0, 0], [0, 0], 0.0, 0
    with torch.no_grad():
        for index in (0, 14, 28):
            item = sequence[index]
            cars = item["flow_fw_valid"] & (item["label_a"] == moving)
            static = item["flow_fw_valid"] & ~torch.isin(item["label_a"], own)
            camera = evaluate.camera_flow(item["flow_fw"][None], static[None])[0]
            camera_error.append((camera - item["flow_fw"]).norm(dim=0)[cars])
            out = evaluate.flow_outputs(efc, item["image_a"][None], item["image_b"][None])
            truth = item["occ_fw"]
            for k, found in enumerate((out["occ_a"][0, 0] > 0.5, warp.range_map(out["flow_ba"])[0, 0] < 0.5)):
                inter[k] += (found & truth).sum().item()
                union[k] += (found | truth).sum().item()
            on_occluded += out["occ_a"][0, 0][truth].sum().item()
            occluded += truth.sum().item()
    assert m["epe_moving_camera"] == pytest.approx(torch.cat(camera_error).double().mean().item(), rel=1e-5)
    assert m["moving_camera_ratio"] == pytest.approx(m["epe_moving"] / m["epe_moving_camera"], rel=1e-9)
    assert m["epe_moving_camera"] > 3  # the cars move on their own: the camera alone is far off on them
    assert occluded > 100 and union[1] > 0
    assert m["occ_iou_est"] == pytest.approx(inter[0] / union[0] if union[0] else float("nan"), rel=1e-9, nan_ok=True)
    assert m["occ_iou_range"] == pytest.approx(inter[1] / union[1], rel=1e-9)
    assert m["occ_est_occluded"] == pytest.approx(on_occluded / occluded, rel=1e-5)
    table = evaluate.format_table(m)
    assert f"camera-only flow {m['epe_moving_camera']:.2f} px: ratio {m['moving_camera_ratio']:.2f}" in table
    assert "occlusion IoU at 0.5 %" in table and "range map of F_b->a, EFC eq. (3)" in table


def test_geometric_median_is_the_point_of_least_mean_distance():
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 7.0]])
    assert torch.allclose(evaluate.geometric_median(points), torch.zeros(2, dtype=torch.float64), atol=1e-4)
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, -2.0])
    assert torch.allclose(evaluate.geometric_median(square), torch.tensor([3.0, -2.0], dtype=torch.float64), atol=1e-6)


def test_flow2seg_validates_with_the_ground_truth_flow_and_rejects_camvid(world, checkpoints):
    net, _ = evaluate.load_checkpoint(checkpoints["flow2seg"])
    m = evaluate.validate(net, config_for("flow2seg", world), "cpu", max_items=3)
    assert m["segmentation_images"] == 1 and m["consistency_pairs"] == 2 and "epe_all" not in m
    # the flow path alone (Flow2Seg Table 2), scored like the fused output: its own argmax
    item = evaluate.validation_datasets(config_for("flow2seg", world))["segmentation"][0]
    with torch.no_grad():
        path = net(item["image"][None], item["flow"][None])["flow_logits"].argmax(1)
    expected = evaluate.segmentation_metrics(evaluate.confusion_matrix(path, item["label"][None], 9).numpy())
    assert m["miou_flow_path"] == pytest.approx(expected["miou"])
    assert m["iou_flow_path"] == pytest.approx(expected["iou"], nan_ok=True)
    with pytest.raises(ValueError, match="CamVid has no input flows"):
        evaluate.validation_datasets(config_for("flow2seg", world, dataset="camvid"))


# ------------------------------------------------------------------------------ the command line
def test_command_line_prints_the_table_and_writes_metrics_and_pictures(tmp_path, world, checkpoints, capsys):
    out = tmp_path / "out"
    evaluate.main(["--checkpoint", str(checkpoints["efc"]), "--out", str(out), "--max-items", "3"])
    printed = capsys.readouterr().out
    for row in ("car_parked", "mIoU (IoU cls)", "pixel accuracy", "temporal consistency", "EPE noc (px)", "Fl-all %"):
        assert row in printed
    record = json.loads((out / "metrics.json").read_text())
    assert record["method"] == "efc" and record["split"] == "val" and record["classes"] == list(data.SYNTH_CLASSES)
    net, _ = evaluate.load_checkpoint(checkpoints["efc"])
    expected = evaluate.validate(net, config_for("efc", world), "cpu", max_items=3)
    assert record["metrics"]["miou"] == pytest.approx(expected["miou"])
    assert record["metrics"]["epe_all"] == pytest.approx(expected["epe_all"])
    assert [v is None for v in record["metrics"]["iou"]] == [bool(np.isnan(v)) for v in expected["iou"]]
    pictures = {p.name: np.array(Image.open(p)).shape
                for p in out.glob("*.png")}
    # one labelled frame in the world's val split: 4 tiles under two lines of titles (28 px), over a
    # legend of the 9 classes (5 rows of 16 px at this width); flows: 6 tiles and the 48 px flow key
    titles, legend = 28, 5 * 16 + 4
    assert pictures == {"seg_000.png": (titles + 48 + legend, 4 * 64 + 3 * 2, 3),
                        **{f"flow_00{k}.png": (titles + 48, 6 * 64 + 48 + 6 * 2, 3) for k in range(3)}}


def test_command_line_writes_cityscapes_submission_files(tmp_path, world, capsys):
    # The world without classes.json reads as Cityscapes: 19 classes, its labels are train ids 0..8.
    root = tmp_path / "cityscapes"
    shutil.copytree(world, root)
    (root / "classes.json").unlink()
    checkpoint = save_checkpoint(tmp_path / "psp19.pt", "psp", root, num_classes=19, dataset="cityscapes")
    evaluate.main(["--checkpoint", str(checkpoint), "--submit", str(tmp_path / "submit"), "--mode", "sliding",
                   "--crop", "32", "32"])
    assert "IoU cat" in capsys.readouterr().out
    images = data.CityscapesImages(root, "val")
    written = sorted(p.name for p in (tmp_path / "submit").iterdir())
    assert written == [image.name for image, _ in images.items]  # CITY_SEQ_FRAME_leftImg8bit.png
    net, _ = evaluate.load_checkpoint(checkpoint)
    with torch.no_grad():
        expected = evaluate.segment_sliding(net, "psp", images[0]["image"][None], crop=(32, 32)).argmax(1)[0]
    back = data.read_label(tmp_path / "submit" / written[0], data.CITYSCAPES_LABEL_LUT, "Cityscapes label ids")
    assert (back == expected.numpy()).all()


def test_command_line_evaluates_kitti_flow_and_writes_its_submission(tmp_path, world, checkpoints, capsys):
    # A one-pair KITTI tree made of a synthetic pair (48 x 64: KittiFlow pads it to 64 x 64).
    root = tmp_path / "kitti" / "training"
    sequence = data.SyntheticSequence(world, "val")
    prefix = world / "leftImg8bit_sequence" / f"{sequence.snippets[0][0]}_leftImg8bit.png"
    second = world / "leftImg8bit_sequence" / f"{sequence.snippets[0][1]}_leftImg8bit.png"
    for folder in ("image_2", "flow_occ", "flow_noc"):
        (root / folder).mkdir(parents=True)
    shutil.copy(prefix, root / "image_2" / "000000_10.png")
    shutil.copy(second, root / "image_2" / "000000_11.png")
    item = sequence[0]
    gt = item["flow_fw"].permute(1, 2, 0).numpy()
    data.write_kitti_flow(root / "flow_occ" / "000000_10.png", gt)
    data.write_kitti_flow(root / "flow_noc" / "000000_10.png", gt, ~item["occ_fw"].numpy())
    evaluate.main(["--checkpoint", str(checkpoints["efc"]), "--dataset", "kitti", "--data-root", str(root.parent),
                   "--submit", str(tmp_path / "submit"), "--out", str(tmp_path / "out")])
    assert "EPE all (px)" in capsys.readouterr().out
    flow, valid = data.read_kitti_flow(tmp_path / "submit" / "flow" / "000000_10.png")
    assert flow.shape == SIZE + (2,) and valid.all()
    net, _ = evaluate.load_checkpoint(checkpoints["efc"])
    kitti = data.KittiFlow(root.parent)[0]
    with torch.no_grad():
        predicted = evaluate.predict_flow(net, kitti["image_a"][None], kitti["image_b"][None])[0, :, :48, :64]
    assert np.abs(flow - predicted.permute(1, 2, 0).numpy()).max() <= 1 / 128
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    epe = (predicted - item["flow_fw"]).norm(dim=0)
    assert metrics["epe_all"] == pytest.approx(epe.mean().item(), rel=1e-4)
    assert metrics["epe_noc"] == pytest.approx(epe[~item["occ_fw"]].mean().item(), rel=1e-4)


def test_command_line_runs_flow2seg_on_a_folder_of_frames(tmp_path, world, checkpoints, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for n, path in enumerate(sorted((world / "leftImg8bit_sequence" / "val").rglob("*.png"))[:3]):
        shutil.copy(path, frames / f"frame{n}.png")
    out = tmp_path / "out"
    evaluate.main(["--checkpoint", str(checkpoints["flow2seg"]), "--frames", str(frames), "--out", str(out),
                   "--flow-checkpoint", str(checkpoints["efc"])])
    printed = capsys.readouterr().out
    assert "frame 3/3" in printed and "temporal consistency" in printed
    assert sorted(p.name for p in out.glob("*.png")) == ["frame0_flow.png", "frame0_overlay.png", "frame0_seg.png",
                                                          "frame1_flow.png", "frame1_overlay.png", "frame1_seg.png",
                                                          "frame2_overlay.png", "frame2_seg.png"]
    # the overlay is half frame, half class colour
    frame = np.asarray(Image.open(frames / "frame2.png").convert("RGB")).astype(np.float64)
    seg = np.asarray(Image.open(out / "frame2_seg.png")).astype(np.float64)
    assert np.abs(np.asarray(Image.open(out / "frame2_overlay.png")) - (frame + seg) / 2).max() <= 1.01
    assert json.loads((out / "metrics.json").read_text())["metrics"]["consistency_pairs"] == 2
    # precomputed flows: the first frame may have none (zero flow), every other frame needs its file
    flows = tmp_path / "flows"
    flows.mkdir()
    np.save(flows / "frame1.npy", np.zeros(SIZE + (2,), np.float32))
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(checkpoints["flow2seg"]), "--frames", str(frames), "--out", str(out),
                       "--flow-dir", str(flows)])
    assert "frame2.flo (or _flow.png, .npy) not found" in capsys.readouterr().err
    np.save(flows / "frame2.npy", np.ones(SIZE + (2,), np.float32))
    evaluate.main(["--checkpoint", str(checkpoints["flow2seg"]), "--frames", str(frames), "--out", str(tmp_path / "o2"),
                   "--flow-dir", str(flows)])
    assert len(list((tmp_path / "o2").glob("*_seg.png"))) == 3
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(checkpoints["flow2seg"]), "--frames", str(frames), "--out", str(out)])
    assert "pass --flow-dir" in capsys.readouterr().err


def test_temporal_consistency_over_no_pixel_is_undefined_not_zero(tmp_path, world, checkpoints, capsys, monkeypatch):
    frames = tmp_path / "frames"
    frames.mkdir()
    for n, path in enumerate(sorted((world / "leftImg8bit_sequence" / "val").rglob("*.png"))[:2]):
        shutil.copy(path, frames / f"frame{n}.png")
    monkeypatch.setattr(evaluate, "consistency_counts", lambda *args: (0, 0))  # every pixel occluded
    evaluate.main(["--checkpoint", str(checkpoints["efc"]), "--frames", str(frames), "--out", str(tmp_path / "out")])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("temporal consistency"))
    assert row.split()[2] == "-" and "0.00" not in row
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["temporal_consistency"] is None and metrics["consistency_pixels"] == 0


def test_pseudo_labels_of_kitti_raw_are_the_cityscapes_models_argmax(tmp_path, world, capsys):
    # EFC's KITTI labels: "coarse segmentation results ... through a model trained on Cityscapes".
    # A tiny KITTI raw tree (one kept drive, one test drive), a 19-class psp checkpoint.
    import kitti_raw
    raw, labels = tmp_path / "raw", tmp_path / "labels"
    rng = np.random.default_rng(0)
    for drive in ("2011_09_26_drive_0001_sync", "2011_09_26_drive_0005_sync"):  # 0005: a test scene
        folder = raw / "2011_09_26" / drive / "image_02" / "data"
        folder.mkdir(parents=True)
        for k in range(25):
            Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(folder / f"{k:010d}.png")
    checkpoint = save_checkpoint(tmp_path / "psp19.pt", "psp", world, num_classes=19, dataset="cityscapes")
    evaluate.main(["--checkpoint", str(checkpoint), "--pseudo-labels", str(raw), "--out", str(labels)])
    assert "wrote 1 pseudo-labels" in capsys.readouterr().out
    written = sorted(labels.rglob("*.png"))
    frame = raw / "2011_09_26" / "2011_09_26_drive_0001_sync" / "image_02" / "data" / "0000000019.png"
    assert written == [labels / frame.relative_to(raw)]  # the 20th frame of the one snippet of the kept drive
    net, _ = evaluate.load_checkpoint(checkpoint)
    with torch.no_grad():
        expected = net(data.normalize(data.image_tensor(frame)[None]))["logits"].argmax(1)[0].numpy()
    stored = np.array(Image.open(written[0]))
    assert stored.dtype == np.uint8 and (stored == expected).all() and len(np.unique(expected)) > 1
    pairs = kitti_raw.KittiRaw(raw, labels, pairs_per_snippet=2)  # and the dataset reads them back
    item = next(pairs[k] for k in range(len(pairs)) if pairs[k]["labelled_a"] or pairs[k]["labelled_b"])
    assert (item["label_a" if item["labelled_a"] else "label_b"].numpy() == expected).all()
    # refusals, one line each
    synthetic_ckpt = save_checkpoint(tmp_path / "psp9.pt", "psp", world)
    for argv, message in ((["--checkpoint", str(synthetic_ckpt), "--pseudo-labels", str(raw), "--out", str(labels)],
                           "pseudo-labels need a Cityscapes model (19 train ids), this one was trained on synthetic"),
                          (["--checkpoint", str(checkpoint), "--pseudo-labels", str(raw)],
                           "--pseudo-labels writes to --out")):
        with pytest.raises(SystemExit):
            evaluate.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="not flow2seg \\(it needs a flow input\\)"):
        evaluate.write_pseudo_labels(net, "flow2seg", [frame], raw, labels, "cpu")


def test_curves_show_the_loss_terms_the_flow_error_and_the_car_ious(tmp_path):
    root = tmp_path / "world"
    root.mkdir()
    (root / "classes.json").write_text(json.dumps({"names": ["road", "car_moving", "car_parked"]}))
    records = [{"iteration": 0, "resumed": False, "config": {"data_root": str(root)}}]
    for it in range(1, 5):
        records.append({"iteration": it, "loss": 5.0 - it, "seg": 1.0 / it, "cons": 0.0, "lr": 0.1})
    for it, car in ((2, 0.2), (4, 0.5)):
        records.append({"iteration": it, "validation": {"miou": 0.4, "epe_all": 4.0 / it, "epe_all_zero": 6.0,
                                                        "epe_all_const": 5.5, "iou": [0.9, car, None]}})
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    series = {title: (points, refs) for title, points, refs in evaluate.curve_series(log)}
    assert "cons (unweighted)" not in series  # 0 throughout: a term the run does not use
    assert series["seg (unweighted)"][0] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    epe = series["val EPE px (grey: zero flow, best constant)"]
    assert epe == ([(2, 2.0), (4, 1.0)], [6.0, 5.5])
    assert series["val IoU car_moving %"][0] == [(2, 20.0), (4, 50.0)]
    assert "val IoU car_parked %" not in series  # absent from ground truth and prediction: no points
    picture = np.asarray(Image.open(evaluate.draw_curves(log, tmp_path / "curves.png")))
    assert ((picture == (31, 119, 180)).all(axis=2)).sum() > 100  # the curves are drawn
    assert evaluate.main(["--curves", str(tmp_path)]) is None and (tmp_path / "curves.png").is_file()


def test_pictures_explain_themselves():
    palette = [(128, 64, 128), (0, 0, 142), (250, 170, 30)]
    image, label = torch.zeros(3, 20, 30), torch.tensor([[0, 1, 2] * 10] * 20)
    flow = torch.zeros(2, 20, 30)
    flow[0] = 3.0  # 3 px to the right everywhere
    panel = evaluate.segmentation_panel(image, label, label, palette, flow, ["road", "car_moving", "car_parked"])
    row = 16  # below the title strip (two lines of 12 px + 4)
    assert panel.shape[1] == 5 * 30 + 20 + 5 * 2 and panel.shape[0] > row + 20 + 10  # 5 tiles, key; titles, legend
    legend = panel[row + 20:]
    for colour in palette:  # every class has its swatch in the legend
        assert (legend == colour).all(axis=2).any()
    key = evaluate.flow_key(21, 3.0)
    assert (key[10, 20] == data.flow_to_color(np.array([[[3.0, 0.0]]]), 3.0)[0, 0]).all()  # rim, right: 3 px
    assert (key[10, 10] == 255).all() and (key[0, 0] == 255).all()  # centre: no motion (white); outside: white


def test_format_metric_units():
    # pixels for errors and flows, % for fractions, a factor for one error over another, counts bare
    assert evaluate.format_metric("epe_moving_camera", 11.094) == "epe_moving_camera 11.09 px"
    assert evaluate.format_metric("occ_iou_range", 0.2571) == "occ_iou_range 25.71 %"
    assert evaluate.format_metric("moving_camera_ratio", 0.4706) == "moving_camera_ratio 0.47x"
    assert evaluate.format_metric("flow_pairs", 60.0) == "flow_pairs 60"
