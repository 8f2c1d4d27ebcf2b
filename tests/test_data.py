"""Tests of data.py: the dataset loaders, the joint augmentation, bad inputs (the world itself: test_synthetic.py).

One tiny synthetic world (2 train + 1 val snippets of 48 x 64) is generated once for the module.
"""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data
import synthetic
from data import (CITYSCAPES_LABEL_TO_TRAIN, LABELLED_INDEX, SNIPPET_LENGTH, SYNTH_CLASSES,
                  CamVid, CityscapesFlow2Seg, CityscapesImages, CityscapesPairs, JointTransform, KittiFlow,
                  SyntheticSequence, denormalize, read_kitti_flow, write_flo, write_kitti_flow)
from warp import backward_warp

ROOT = Path(__file__).resolve().parent.parent

SIZE = (48, 64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.make_synthetic_world(tmp_path_factory.mktemp("world") / "synthetic", num_train=2, num_val=1,
                                          size=SIZE, seed=3, workers=1)


def load_png(path):
    return np.array(Image.open(path))


def photometric_error(image_a, image_b, flow, mask):
    """|backward_warp(b, F_a->b) - a| (mean over RGB) at the pixels of `mask` whose target is inside b
    -> (1-D tensor of errors, the mask of those pixels)."""
    warped, inside = backward_warp(image_b[None], flow[None])
    keep = mask & (inside[0, 0] > 0)
    return (warped[0] - image_a).abs().mean(0)[keep], keep


# ------------------------------------------------------------------------- Cityscapes loaders
def test_cityscapes_pairs_on_the_synthetic_world(world):
    pairs = CityscapesPairs(world, "train", pairs_per_snippet=10, max_gap=5)
    assert len(pairs) == 20 and pairs.num_classes == len(SYNTH_CLASSES)
    gts = sorted((world / "gtFine" / "train").rglob("*.png"))
    for s in range(2):
        items = [pairs[s * 10 + k] for k in range(10)]
        drawn = [(item["i"], item["t"]) for item in items]
        assert len(set(drawn)) == 10 and drawn == pairs.pairs(s)
        with_label = 0
        for item in items:
            i, t = item["i"], item["t"]
            assert 1 <= t <= 5 and 0 <= i and i + t < SNIPPET_LENGTH
            assert item["labelled_a"].item() == (i == LABELLED_INDEX)
            assert item["labelled_b"].item() == (i + t == LABELLED_INDEX)
            with_label += item["labelled_a"].item() or item["labelled_b"].item()
            for name, k in (("a", i), ("b", i + t)):
                frame = pairs.snippets[s].frames[k]
                image = torch.from_numpy(load_png(frame)).permute(2, 0, 1) / 255.0
                assert torch.allclose(denormalize(item[f"image_{name}"][None])[0], image, atol=1e-5)
                label = item[f"label_{name}"]
                assert label.dtype == torch.int64 and item[f"image_{name}"].dtype == torch.float32
                if k == LABELLED_INDEX:
                    assert torch.equal(label, torch.from_numpy(load_png(gts[s]).astype(np.int64)))
                else:
                    assert (label == 255).all()
        assert with_label == 5
    # Pairs are a function of (seed, epoch, index): a second dataset agrees, a new epoch redraws.
    again = CityscapesPairs(world, "train")
    assert [again.pairs(s) for s in range(2)] == [pairs.pairs(s) for s in range(2)]
    again.set_epoch(1)
    assert [again.pairs(s) for s in range(2)] != [pairs.pairs(s) for s in range(2)]
    assert len(CityscapesPairs(world, "val", pairs_per_snippet=4)) == 4


def test_pair_modes_of_the_efc_table1_rows(world):
    def labelled(pair_list):
        return [p for p in pair_list if LABELLED_INDEX in (p[0], p[0] + p[1])]
    # TCC_single / TCC_multi: the labelled pairs are drawn once, the same in every epoch
    single = CityscapesPairs(world, "train", pairs_per_snippet=1, labelled_pairs=1, fixed_labelled=True)
    multi = CityscapesPairs(world, "train", pairs_per_snippet=5, labelled_pairs=5, fixed_labelled=True, max_gap=5)
    for dataset, n in ((single, 1), (multi, 5)):
        first = [dataset.pairs(s) for s in range(2)]
        dataset.set_epoch(7)
        assert [dataset.pairs(s) for s in range(2)] == first and len(dataset) == 2 * n
        assert all(len(labelled(p)) == n for p in first)
    assert len(set(multi.pairs(0))) == 5  # five different pairs (max_gap 5 has 10 candidates)
    # "+ UD": each item = the labelled pair of TCC_multi (same seed) + an unlabelled pair redrawn per epoch
    full = CityscapesPairs(world, "train", pairs_per_snippet=10, labelled_pairs=5, fixed_labelled=True,
                           unlabelled_companion=True, max_gap=5)
    assert len(full) == len(multi) == 10
    item = full[3]
    assert item["image_a"].shape[0] == 2 and item["label_a"].shape[0] == 2
    assert [(int(item["i"][0]), int(item["t"][0]))] == [multi.pairs(0)[3]]
    assert (item["labelled_a"][0] | item["labelled_b"][0]) and not (item["labelled_a"][1] | item["labelled_b"][1])
    assert (item["label_a"][1] == 255).all() and (item["label_b"][1] == 255).all()
    unlabelled = [full.pairs(s)[5:] for s in range(2)]
    full.set_epoch(1)
    assert [full.pairs(s)[:5] for s in range(2)] == [multi.pairs(s) for s in range(2)]
    assert [full.pairs(s)[5:] for s in range(2)] != unlabelled
    with pytest.raises(ValueError, match="2 x labelled_pairs"):
        CityscapesPairs(world, "train", pairs_per_snippet=10, labelled_pairs=4, unlabelled_companion=True)


def test_sample_pairs_halves_and_gap_range():
    rng = np.random.default_rng(0)
    for count, gap in ((10, 5), (7, 3), (30, 2)):
        drawn = data.sample_pairs(30, 19, count, gap, rng)
        assert len(drawn) == count
        labelled = [p for p in drawn if 19 in (p[0], p[0] + p[1])]
        assert len(labelled) == count // 2
        assert all(1 <= t <= gap and i + t < 30 for i, t in drawn)
    # a half asking for more pairs than exist cycles through them: gap 2 has only 4 labelled pairs
    assert len(set(data.sample_pairs(30, 19, 30, 2, rng)[:15])) == 4


def write_rgb(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def cityscapes_tree(root, label_ids, split="train", city="aachen", frame=19, sequence=True, single=False,
                    train_ids=None):
    """A tiny Cityscapes tree: one snippet (30 frames around `frame`) and its gtFine labelIds."""
    h, w = label_ids.shape
    rng = np.random.default_rng(0)
    prefix = f"{city}_000000_{frame:06d}"
    if sequence:
        for n in range(frame - 19, frame + 11):
            write_rgb(root / "leftImg8bit_sequence" / split / city / f"{city}_000000_{n:06d}_leftImg8bit.png",
                      rng.integers(0, 256, (h, w, 3)))
    if single:
        write_rgb(root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", rng.integers(0, 256, (h, w, 3)))
    write_rgb(root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png", label_ids)
    if train_ids is not None:
        write_rgb(root / "gtFine" / split / city / f"{prefix}_gtFine_labelTrainIds.png", train_ids)
    return root


def test_label_ids_map_to_train_ids_on_every_official_id(tmp_path):
    ids = np.arange(36).reshape(6, 6) % 34  # every official id 0..33
    root = cityscapes_tree(tmp_path / "cs", ids, frame=57, single=True)
    expected = torch.tensor([[CITYSCAPES_LABEL_TO_TRAIN[i] for i in row] for row in ids.tolist()])
    item = CityscapesImages(root, "train")[0]
    assert torch.equal(item["label"], expected)
    pairs = CityscapesPairs(root, "train", pairs_per_snippet=2)
    labelled = [pairs[k] for k in range(2) if pairs[k]["labelled_a"] or pairs[k]["labelled_b"]][0]
    assert torch.equal(labelled["label_a"] if labelled["labelled_a"] else labelled["label_b"], expected)
    # the official table itself: 19 train ids, everything else 255
    assert sorted(t for t in CITYSCAPES_LABEL_TO_TRAIN.values() if t != 255) == [-1] + list(range(19))
    official = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)  # road ... bicycle
    assert [CITYSCAPES_LABEL_TO_TRAIN[i] for i in official] == list(range(19))
    assert len(data.CITYSCAPES_TRAIN_TO_CATEGORY) == 19 and data.CITYSCAPES_TRAIN_TO_CATEGORY[13] == 6
    # *_labelTrainIds.png wins when present
    train_ids = np.full((6, 6), 4, np.uint8)
    train_ids[0, 0] = 255
    root = cityscapes_tree(tmp_path / "cs2", ids, frame=19, single=True, train_ids=train_ids)
    assert torch.equal(CityscapesImages(root, "train")[0]["label"], torch.from_numpy(train_ids.astype(np.int64)))


def test_flow2seg_items_and_flow_directories(world, tmp_path):
    dataset = CityscapesFlow2Seg(world, "train")  # no flow_dir: the ground truth in flow_bw
    assert len(dataset) == 2
    item = dataset[0]
    assert set(item) == {"image", "image_prev", "label", "flow", "flow_valid"}
    image, prev = (denormalize(item[k][None])[0] for k in ("image", "image_prev"))
    error, keep = photometric_error(image, prev, item["flow"], item["flow_valid"])
    assert error.median() < 0.006 and keep.float().mean() > 0.8  # F_t->t-1 brings the 19th frame onto the 20th
    image_path, _, label_path, flow_file = dataset.items[0]
    assert flow_file == world / "flow_bw" / "train" / image_path.parent.name / (image_path.stem + "_flow.png")
    # A flow directory mirroring the image names, in each format.
    flow, _ = read_kitti_flow(flow_file)
    for suffix in (".flo", ".npy", "_flow.png"):
        flow_dir = tmp_path / suffix.strip("._")
        for image_path, _, _, _ in dataset.items:
            target = data.flow_path(flow_dir, "train", image_path, suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            if suffix == ".flo":
                write_flo(target, flow)
            elif suffix == ".npy":
                np.save(target, flow)
            else:
                write_kitti_flow(target, flow)
        loaded = CityscapesFlow2Seg(world, "train", flow_dir=flow_dir)[0]
        assert torch.equal(loaded["flow"], torch.from_numpy(flow).permute(2, 0, 1)) and loaded["flow_valid"].all()
    target.unlink()
    with pytest.raises(FileNotFoundError, match=target.name.replace("_flow.png", ".flo")):
        CityscapesFlow2Seg(world, "train", flow_dir=flow_dir)


def test_cityscapes_images_fall_back_to_the_labelled_sequence_frames(world):
    images = CityscapesImages(world, "val")
    assert len(images) == 1
    gt = next((world / "gtFine" / "val").rglob("*.png"))
    assert images.items[0][0].name == gt.name.replace("_gtFine_labelTrainIds", "_leftImg8bit")
    assert images[0]["image"].shape == (3,) + SIZE


# --------------------------------------------------------------------------- CamVid and KITTI
def test_camvid_segnet_layout_and_video_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    annot = np.arange(48).reshape(6, 8) % 12  # 0..10 classes, 11 void
    for name in ("0001TP_006690.png", "Seq05VD_f00000.png"):
        write_rgb(tmp_path / "train" / name, rng.integers(0, 256, (6, 8, 3)))
        write_rgb(tmp_path / "trainannot" / name, annot)
    for n in range(6660, 6701):
        write_rgb(tmp_path / "frames" / f"0001TP_{n:06d}.png", rng.integers(0, 256, (6, 8, 3)))
    for n in range(1, 4):
        write_rgb(tmp_path / "frames" / f"Seq05VD_f{n:05d}.png", rng.integers(0, 256, (6, 8, 3)))
    single = CamVid(tmp_path, "train")
    assert len(single) == 2 and single.num_classes == 11
    label = single[0]["label"]
    assert torch.equal(label, torch.from_numpy(np.where(annot == 11, 255, annot)))
    pairs = CamVid(tmp_path, "train", frames_dir=tmp_path / "frames", pairs_per_frame=4, max_gap=3)
    assert len(pairs) == 8
    first, second = pairs.snippets
    assert len(first.frames) == 30 and first.labelled == 19
    assert first.frames[19] == tmp_path / "train" / "0001TP_006690.png"  # the labelled frame itself
    assert first.frames[0].name == "0001TP_006671.png" and first.frames[-1].name == "0001TP_006700.png"
    assert len(second.frames) == 4 and second.labelled == 0  # the video starts at the labelled frame
    for k in range(8):
        item, snippet = pairs[k], pairs.snippets[k // 4]
        assert 1 <= item["t"] <= 3 and item["i"] + item["t"] < len(snippet.frames)
        assert item["labelled_a"] == (item["i"] == snippet.labelled)
        assert item["labelled_b"] == (item["i"] + item["t"] == snippet.labelled)
        assert bool(item["labelled_a"] or item["labelled_b"]) == (k % 4 < 2)  # half of each frame's pairs
    write_rgb(tmp_path / "trainannot" / "Seq05VD_f00000.png", np.full((6, 8), 12))
    with pytest.raises(ValueError, match=r"Seq05VD_f00000.png: label values \[12\] are outside"):
        single[1]
    with pytest.raises(FileNotFoundError, match="SegNet CamVid layout"):
        CamVid(tmp_path, "val")


def test_kitti_flow_pads_varying_sizes_and_unlabelled_modes(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "kitti"
    for scene, (h, w) in ((0, (20, 70)), (1, (18, 66))):
        for k in range(21):
            write_rgb(root / "training" / "image_2" / f"{scene:06d}_{k:02d}.png", rng.integers(0, 256, (h, w, 3)))
        flow = np.round(rng.uniform(-5, 5, (h, w, 2)) * 64) / 64
        occ_valid = rng.random((h, w)) > 0.2
        for folder, valid in (("flow_occ", occ_valid), ("flow_noc", occ_valid & (rng.random((h, w)) > 0.3))):
            (root / "training" / folder).mkdir(parents=True, exist_ok=True)
            write_kitti_flow(root / "training" / folder / f"{scene:06d}_10.png", flow, valid)
    dataset = KittiFlow(root)
    assert len(dataset) == 2
    for item, (h, w) in zip(dataset, ((20, 70), (18, 66))):
        assert item["image_a"].shape == (3, 64, 128) and item["flow"].shape == (2, 64, 128)
        assert item["size"].tolist() == [h, w]
        assert not item["flow_valid"][h:].any() and not item["flow_valid"][:, w:].any()
        assert (item["noc_valid"] <= item["flow_valid"]).all() and item["flow_valid"][:h, :w].float().mean() > 0.7
        assert torch.allclose(denormalize(item["image_a"][None])[0][:, h:], torch.zeros(1), atol=1e-6)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["flow"].shape == (2, 2, 64, 128)
    cropped = KittiFlow(root, crop=(16, 60))[1]
    assert cropped["image_a"].shape == (3, 16, 60)
    assert len(KittiFlow(root, mode="pairs")) == 2
    multiview = KittiFlow(root, mode="multiview")
    assert len(multiview) == 2 * 15  # 20 consecutive pairs per scene, minus the 5 touching frames 9-12
    assert all(not {int(a.stem[-2:]), int(b.stem[-2:])} & {9, 10, 11, 12} for a, b, _, _ in multiview.items)
    assert set(multiview[0]) == {"image_a", "image_b", "size"}


# ------------------------------------------------------------------------------- augmentation
def moving_pair(world):
    """A pair with a large known flow: b is a synthetic frame, a = backward_warp(b, F) for a smooth
    F of several pixels, so backward_warp(b, F) reproduces a exactly before any augmentation."""
    item = SyntheticSequence(world, "train", transform=lambda sample: sample)[0]
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    flow = torch.stack([3 + 0.05 * (x - 32) + 1.5 * torch.sin(y / 6), -2 + 0.04 * (y - 24) + 1.5 * torch.cos(x / 8)])
    image_a, inside = backward_warp(item["image_b"][None], flow[None])
    label_a, _ = backward_warp(item["label_b"][None, None].float(), flow.round()[None])
    return {"image_a": image_a[0], "image_b": item["image_b"], "label_a": label_a[0, 0].long(), "flow_fw": flow,
            "flow_fw_valid": inside[0, 0] > 0, "occ_fw": torch.zeros(48, 64, dtype=torch.bool)}


def warp_error(sample):
    """Mean |backward_warp(b, F) - a| over valid, non-occluded pixels, and their share of the frame."""
    a, b = (denormalize(sample[k][None])[0] for k in ("image_a", "image_b"))
    mask = sample["flow_fw_valid"] & ~sample["occ_fw"]
    error, keep = photometric_error(a, b, sample["flow_fw"], mask)
    return error.mean().item(), keep.float().mean().item()


OFF = dict(scale=None, flip=False, rotate=0, jitter=0)


@pytest.mark.parametrize("name,options", [
    ("flip", dict(OFF, flip=1.0)),
    ("scale down", dict(OFF, scale=(0.6, 0.6))),
    ("scale up", dict(OFF, scale=(1.7, 1.7))),
    ("rotation", dict(OFF, rotate=30)),
    ("crop", dict(OFF, crop=(40, 40))),
    ("pad", dict(OFF, crop=(60, 80))),
    ("all", dict(crop=(56, 56), scale=(0.5, 2.0), flip=True, rotate=15, jitter=0.2)),
    ("rotation unpadded", dict(OFF, crop=(32, 40), rotate=10, pad=False)),
    ("all unpadded", dict(crop=(32, 40), scale=(0.5, 2.0), flip=True, rotate=10, jitter=0.2, shift=10, pad=False)),
])
def test_augmentation_keeps_the_flow_consistent(world, name, options):
    # The flow is 1.5 to 6 px long, so a vector not flipped, scaled or rotated with the image
    # gives errors of 0.03 to 0.07 here (checked by breaking each on purpose).
    sample = moving_pair(world)
    assert warp_error(JointTransform(**OFF)(sample))[0] < 1e-6
    torch.manual_seed(0)
    for trial in range(3):
        out = JointTransform(**options)(sample)
        assert out["flow_fw"].shape[1:] == out["image_a"].shape[1:] == out["label_a"].shape == out["occ_fw"].shape
        error, kept = warp_error(out)
        assert kept > 0.15
        # backward_warp(aug(b), aug(F)) reproduces aug(a): exactly for flips and crops, up to
        # interpolation for scaling and rotation
        assert error < (1e-6 if name in ("flip", "crop", "pad") else 0.015), (name, trial, error)
    if name == "flip":
        assert torch.equal(out["image_a"], JointTransform(**OFF)(sample)["image_a"].flip(-1))
        assert torch.equal(out["flow_fw"][0], -sample["flow_fw"][0].flip(-1))
    if name in ("scale down", "scale up"):
        assert out["image_a"].shape[1:] == (round(48 * options["scale"][0]), round(64 * options["scale"][0]))
    if name == "pad":
        pad = (denormalize(out["image_b"][None])[0].abs() < 1e-5).all(0)  # image 0 around the 48 x 64 frame
        assert pad.float().mean() == pytest.approx(1 - 48 * 64 / (60 * 80))
        assert (out["label_a"][pad] == 255).all() and out["occ_fw"][pad].all()
        assert not out["flow_fw_valid"][pad].any()
    # the same on a real pair of the world (occlusions, many sprite edges): no worse than resampling
    # noise, which blends the layers along every car's outline (0.004-0.025 over 6 draws of "all")
    world_pair = SyntheticSequence(world, "train", transform=JointTransform(**options))[7]
    plain_pair = SyntheticSequence(world, "train")[7]
    assert warp_error(world_pair)[0] < warp_error(plain_pair)[0] + 0.02


def test_labels_stay_aligned_with_images():
    # An image painted with one colour per class: after any transform, the colour of every pixel
    # (away from class boundaries) still names its label.
    palette = torch.tensor(data.SYNTH_PALETTE, dtype=torch.float32) / 255.0  # (K, 3)
    label = torch.zeros(48, 64, dtype=torch.int64)
    for k in range(1, 9):
        label[(k * 5):, (k * 7) % 64:] = k
    sample = {"image": palette[label].permute(2, 0, 1), "label": label, "flow": torch.zeros(2, 48, 64)}
    torch.manual_seed(1)
    for _ in range(5):
        out = JointTransform(crop=(50, 50), scale=(0.7, 1.5), rotate=20, jitter=0)(sample)
        image = denormalize(out["image"][None])[0].permute(1, 2, 0)  # (H, W, 3)
        nearest = torch.cdist(image.reshape(-1, 3), palette).argmin(1).view(image.shape[:2])
        label = out["label"]
        # pixels inside a class region: the label and its four neighbours agree (not padding)
        interior = (label != 255)[1:-1, 1:-1]
        for shifted in (label[:-2, 1:-1], label[2:, 1:-1], label[1:-1, :-2], label[1:-1, 2:]):
            interior &= shifted == label[1:-1, 1:-1]
        assert interior.float().mean() > 0.5
        assert (nearest[1:-1, 1:-1] == label[1:-1, 1:-1])[interior].float().mean() > 0.995
        assert (out["flow_valid"] <= (label != 255)).all()  # a valid flow pixel is never padding


def test_colour_jitter_is_the_same_on_both_frames_and_leaves_flows_alone():
    image = torch.rand(3, 20, 30)
    flow = torch.randn(2, 20, 30)
    sample = {"image_a": image, "image_b": image.clone(), "flow": flow}
    torch.manual_seed(0)
    out = JointTransform(scale=None, flip=False, rotate=0, jitter=0.3)(sample)
    assert torch.equal(out["image_a"], out["image_b"])
    assert not torch.allclose(denormalize(out["image_a"][None])[0], image, atol=1e-3)
    assert torch.equal(out["flow"], flow) and out["flow_valid"].all()
    evaluation = JointTransform(crop=(16, 16), train=False)(sample)
    assert torch.allclose(denormalize(evaluation["image_a"][None])[0], image[:, 2:18, 7:23], atol=1e-6)


def test_without_padding_every_crop_pixel_is_image_and_the_scale_still_varies():
    # The flow-training augmentation (train.training_dataset for efc and flow): padded pixels are a
    # static black pattern in both frames that the photometric loss scores best at zero flow.
    sample = {"image_a": torch.rand(3, 48, 64) * 0.8 + 0.1, "flow": torch.randn(2, 48, 64)}
    torch.manual_seed(0)
    padded = JointTransform(crop=(40, 56), scale=(0.5, 2.0), rotate=10, jitter=0)
    plain = JointTransform(crop=(40, 56), scale=(0.5, 2.0), rotate=0, jitter=0, pad=False)
    assert any(not padded(sample)["flow_valid"].all() for _ in range(20))  # the default does pad
    means = set()
    for _ in range(40):
        out = plain(sample)
        assert out["image_a"].shape[1:] == (40, 56) and out["flow_valid"].all()
        assert (denormalize(out["image_a"][None])[0] > 0.05).all()  # no black padding pixel
        means.add(round(out["flow"].abs().mean().item(), 3))  # flow values scale with the draw
    assert len(means) > 30
    with pytest.raises(ValueError, match="pad=False with rotate=10.0 needs a crop"):
        JointTransform(pad=False)


def test_paper_recipes_have_each_papers_ranges():
    # EFC: scaling, rotation, flip, colour ("Implementation Details"; ranges PSPNet's), unpadded where
    # the flow learns from photometric losses; Flow2Seg 4.2: flip, crop, colour [-10, 10], scale [0.5, 2]
    efc = data.paper_augmentation("efc")
    assert efc == dict(scale=(0.5, 2.0), rotate=10.0, flip=True, jitter=0.1, shift=0.0, pad=False)
    assert data.paper_augmentation("flow") == efc and data.paper_augmentation("psp") == dict(efc, pad=True)
    assert data.paper_augmentation("flow2seg") == dict(scale=(0.5, 2.0), rotate=0.0, flip=True, jitter=0.0,
                                                       shift=10.0, pad=True)
    assert data.quick_augmentation(True) == dict(pad=False, rotate=0.0) and data.quick_augmentation(False) == {}
    with pytest.raises(ValueError, match="unknown method 'seg'"):
        data.paper_augmentation("seg")
    # the transforms they build draw within those ranges: Flow2Seg's colour offsets stay within
    # +-10 grey levels, one per channel, the same on both frames, and nothing rotates
    sample = {"image_a": torch.full((3, 40, 60), 0.5), "image_b": torch.full((3, 40, 60), 0.5)}
    transform = JointTransform(crop=(40, 60), **dict(data.paper_augmentation("flow2seg"), scale=None, flip=False))
    offsets = []
    for _ in range(200):
        out = transform(sample)
        a, b = (denormalize(out[k][None])[0] for k in ("image_a", "image_b"))
        assert torch.allclose(a, b) and torch.allclose(a, a[:, :1, :1], atol=1e-5)  # uniform: no rotation, no blur
        offsets.append((a[:, 0, 0] - 0.5) * 255)
    offsets = torch.stack(offsets)
    assert offsets.abs().max() <= 10 + 1e-3 and offsets.abs().max() > 9
    assert (offsets[:, 0] - offsets[:, 1]).abs().max() > 1  # the channels draw their own offsets


def test_efc_paper_rotation_and_scale_ranges_and_the_raised_scale_floor(monkeypatch):
    # EFC's transform turns by up to +-10 degrees and scales up to 2; the floor of each draw's scale
    # is the smallest at which the rotated frame holds the crop
    draws = []
    real = data._rotate_crop_sample
    monkeypatch.setattr(data, "_rotate_crop_sample",
                        lambda sample, degrees, *window: draws.append((degrees, data._size(sample))) or
                        real(sample, degrees, *window))
    transform = JointTransform(crop=(40, 40), **data.paper_augmentation("efc"))
    sample = {"image_a": torch.rand(3, 100, 200)}
    torch.manual_seed(0)
    for _ in range(300):
        transform(sample)
    angles = torch.tensor([d for d, _ in draws])
    scales = torch.tensor([size[1] / 200 for _, size in draws])
    assert angles.abs().max() <= 10 and angles.min() < -9 and angles.max() > 9
    assert scales.max() <= 2 and scales.max() > 1.9 and scales.min() < 0.55  # the paper's [0.5, 2], a 40 crop fits
    big = JointTransform(crop=(90, 90), **data.paper_augmentation("efc"))
    draws.clear()
    for _ in range(100):
        big(sample)
    for degrees, (H, W) in draws:  # a 90 x 90 crop at angle theta needs 1 + 90 (|cos| + |sin|) rows
        assert H >= 1 + 90 * (abs(np.cos(np.deg2rad(degrees))) + abs(np.sin(np.deg2rad(degrees))))
    # the floor follows each draw's angle (91 rows near 0 degrees, 106 at 10), not the worst case
    assert min(H for _, (H, _) in draws) < 106 and max(H for _, (H, _) in draws) > 180
    assert data.rotated_crop_extent(90, 90, 10.0) == data.rotated_crop_extent(90, 90, -10.0) == (106, 106)
    assert data.rotated_crop_extent(40, 60, 0.0) == (41, 61)


def test_rotation_without_padding_brings_in_no_pixel_from_outside_the_image():
    # An all-ones frame (and an all-valid flow, labels 3, a mask of False) turned and cropped, at
    # the largest angle and at scales down to the floor: every output pixel is interpolated from
    # image pixels only, so it stays 1 (to float rounding), no label is 255 and the flow stays valid.
    ones = {"image_a": torch.ones(3, 60, 90), "image_b": torch.ones(3, 60, 90), "label_a": torch.full((60, 90), 3),
            "flow": torch.ones(2, 60, 90), "occ": torch.zeros(60, 90, dtype=torch.bool)}
    torch.manual_seed(0)
    for rotate, crop in ((10, (48, 64)), (10, (20, 80)), (30, (30, 30))):
        transform = JointTransform(crop=crop, scale=(0.5, 2.0), rotate=rotate, jitter=0, pad=False)
        for _ in range(60):
            out = transform(ones)
            for key in ("image_a", "image_b"):
                image = denormalize(out[key][None])[0]
                assert image.shape[1:] == crop and (image - 1).abs().max() < 1e-5, key
            assert out["flow_valid"].all() and (out["label_a"] == 3).all() and not out["occ"].any()
    # the same windows placed by hand one pixel too far out are refused, not padded
    sample = {"image_a": torch.ones(3, 60, 90)}
    with pytest.raises(ValueError, match="fall outside the 90x60 image rotated by 10.00 degrees"):
        data._rotate_crop_sample(sample, 10.0, 0, 0, 48, 64)


def test_rotated_and_cropped_translation_stays_consistent_with_warping():
    # b is a smooth picture, a = b shifted by a constant flow F_a->b = (3, -2) px. After the unpadded
    # rotate-and-crop, the flow must be that vector turned by the angle, and warping aug(b) by aug(F)
    # must give aug(a); a flow not rotated with the image misses by ~0.5 px at 10 degrees.
    y, x = torch.meshgrid(torch.arange(80.0), torch.arange(120.0), indexing="ij")
    picture = lambda dx, dy: torch.stack([0.5 + 0.4 * torch.sin((x + dx) / 5) * torch.cos((y + dy) / 7),
                                          0.5 + 0.4 * torch.cos((x + dx + y + dy) / 9),
                                          0.5 + 0.3 * torch.sin((y + dy) / 4)])
    flow = torch.tensor([3.0, -2.0]).view(2, 1, 1).expand(2, 80, 120).clone()
    sample = {"image_a": picture(3.0, -2.0), "image_b": picture(0.0, 0.0), "flow": flow}
    transform = JointTransform(crop=(48, 64), scale=None, flip=False, rotate=10, jitter=0, pad=False)
    torch.manual_seed(2)
    turned = 0
    for _ in range(10):
        out = transform(sample)
        u, v = out["flow"][0], out["flow"][1]
        angle = np.rad2deg(np.arctan2(v.mean().item(), u.mean().item()) - np.arctan2(-2.0, 3.0))
        assert u.std() < 1e-4 and v.std() < 1e-4 and abs(angle) <= 10 + 1e-3  # one vector, turned by the angle
        assert torch.hypot(u, v).mean().item() == pytest.approx(np.hypot(3, -2), abs=1e-4)
        turned += abs(angle) > 2
        a, b = (denormalize(out[k][None])[0] for k in ("image_a", "image_b"))
        error, keep = photometric_error(a, b, out["flow"], out["flow_valid"])
        assert keep.float().mean() > 0.8 and error.mean() < 0.01
    assert turned >= 5


# --------------------------------------------------------------------- DataLoader and workers
class NumpyNoise(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor(np.random.random())


def test_dataloader_workers_and_distributed_sampler(world):
    pairs = CityscapesPairs(world, "train", transform=JointTransform(crop=(32, 32)))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(pairs, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        seen.append(list(sampler))
        loader = DataLoader(pairs, batch_size=5, sampler=sampler, num_workers=2, worker_init_fn=data.worker_init_fn,
                            generator=torch.Generator().manual_seed(0))
        batches = list(loader)
        again = list(DataLoader(pairs, batch_size=5, sampler=sampler, num_workers=2, worker_init_fn=data.worker_init_fn,
                                generator=torch.Generator().manual_seed(0)))
        assert len(batches) == 2 and batches[0]["image_a"].shape == (5, 3, 32, 32)
        assert batches[0]["label_a"].dtype == torch.int64 and batches[0]["labelled_a"].dtype == torch.bool
        for x, y in zip(batches, again):  # the same seed gives the same augmented batches
            assert torch.equal(x["image_a"], y["image_a"]) and torch.equal(x["t"], y["t"])
    assert sorted(seen[0] + seen[1]) == list(range(len(pairs))) and not set(seen[0]) & set(seen[1])
    # worker_init_fn gives every worker its own numpy stream
    values = torch.cat(list(DataLoader(NumpyNoise(), batch_size=2, num_workers=2, worker_init_fn=data.worker_init_fn)))
    assert values[0] != values[2]


# ------------------------------------------------------------------------------ bad inputs
def test_missing_root_or_split_names_the_expected_layout(tmp_path, world):
    for root, split in ((tmp_path / "nowhere", "train"), (world, "test")):
        for make in (CityscapesPairs, CityscapesImages, CityscapesFlow2Seg):
            with pytest.raises(FileNotFoundError, match=r"gtFine/.*labelIds\.png.*leftImg8bit") as info:
                make(root, split)
            assert str(root) in str(info.value)
    with pytest.raises(FileNotFoundError, match="KITTI 2015 layout"):
        KittiFlow(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="SyntheticSequence expects"):
        SyntheticSequence(tmp_path / "nowhere", "train")
    # a snippet with a missing frame names it
    ids = np.full((4, 5), 7, np.uint8)
    root = cityscapes_tree(tmp_path / "cs", ids, frame=30)
    missing = root / "leftImg8bit_sequence/train/aachen/aachen_000000_000015_leftImg8bit.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        CityscapesPairs(root, "train")


def test_broken_images_sizes_and_labels_name_their_files(tmp_path):
    ids = np.full((4, 5), 7, np.uint8)
    root = cityscapes_tree(tmp_path / "cs", ids, frame=19, sequence=False, single=True)
    image = root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    label = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    dataset = CityscapesImages(root, "train")
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{image}: cannot read image"):
        dataset[0]
    image.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=f"{image}: cannot read image"):
        dataset[0]
    write_rgb(image, np.zeros((6, 5, 3)))  # 5x6 image, 5x4 label
    with pytest.raises(ValueError, match="size mismatch") as info:
        dataset[0]
    assert str(image) in str(info.value) and str(label) in str(info.value)
    write_rgb(image, np.zeros((4, 5, 3)))
    for bad, kind in ((34, "labelIds"), (200, "labelIds"), (19, "labelTrainIds")):
        values = ids.copy()
        values[1, 2] = bad
        path = label if kind == "labelIds" else label.with_name(label.name.replace("labelIds", "labelTrainIds"))
        write_rgb(path, values)
        with pytest.raises(ValueError, match=rf"label values \[{bad}\] are outside the known set") as info:
            CityscapesImages(root, "train")[0]
        assert path.name in str(info.value)
    write_rgb(label.with_name(label.name.replace("labelIds", "labelTrainIds")), np.full((4, 5), 3))
    assert (CityscapesImages(root, "train")[0]["label"] == 3).all()
    write_rgb(label.with_name(label.name.replace("labelIds", "labelTrainIds")), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="single-channel"):
        CityscapesImages(root, "train")[0]


def test_flow_to_color():
    flow = np.zeros((2, 3, 2))
    flow[0, 0] = (1, 0)
    colours = data.flow_to_color(flow)
    assert colours.dtype == np.uint8 and (colours[1, 1] == 255).all()  # no motion: white
    assert colours[0, 0, 0] == 255 and colours[0, 0, 1] == 0  # right: red


def test_progress_reports_rate_and_time_left_only_on_long_loops(capsys):
    assert list(data.progress(range(3), 3, "quick")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # a short loop says nothing
    for _ in data.progress(range(4), 4, "slow", every=0.005):
        time.sleep(0.06)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("slow: 1/4, ") and "/s, about " in lines[0] and lines[0].endswith(" s left")
    assert lines[-1].startswith("slow: 4/4 in ")


def _worker_then_wait(ready):
    data.worker_init_fn(0)
    ready.set()
    time.sleep(60)


def test_a_loader_worker_ignores_ctrl_c_but_ends_on_sigterm():
    """worker_init_fn: a terminal's Ctrl-C must not kill the workers (the training process stops
    them), but SIGTERM must: multiprocessing ends daemonic workers with it at exit, and a worker
    that ignored it kept `pytest` waiting forever after the suite had passed."""
    import multiprocessing
    import signal
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_worker_then_wait, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(20)
        os.kill(worker.pid, signal.SIGINT)
        worker.join(1)
        assert worker.is_alive()  # Ctrl-C ignored
        worker.terminate()  # SIGTERM, as multiprocessing's exit handler sends it
        worker.join(10)
        assert not worker.is_alive()
    finally:
        if worker.is_alive():
            worker.kill()


# ------------------------------------------------------------------ Cityscapes coarse annotations
def write_cityscapes_frame(root, annotation, split, city, seq, frame, label, kind="labelIds", value=100):
    """One labelled frame of the Cityscapes layout: leftImg8bit/SPLIT/CITY/... and ANNOTATION/SPLIT/CITY/..."""
    stem = f"{city}_{seq:06d}_{frame:06d}"
    image = np.full(label.shape + (3,), value, np.uint8)
    for folder, name, array in (("leftImg8bit", f"{stem}_leftImg8bit.png", image),
                                (annotation, f"{stem}_{annotation}_{kind}.png", label.astype(np.uint8))):
        (root / folder / split / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / folder / split / city / name)


def test_coarse_annotations_join_the_fine_ones(tmp_path):
    # gtFine/train plus gtCoarse/train_extra (EFC "PSP CRS", Flow2Seg's coarse fine-tuning); coarse
    # labelIds map to train ids like fine ones (0 = unannotated -> 255), labelTrainIds win when present
    root = tmp_path / "cs"
    fine = np.full((4, 6), 7)  # road
    coarse = np.array([[0, 0, 26, 26, 21, 21]] * 4)  # unlabelled, car, vegetation
    write_cityscapes_frame(root, "gtFine", "train", "aachen", 0, 19, fine, value=10)
    write_cityscapes_frame(root, "gtCoarse", "train", "aachen", 0, 19, np.zeros((4, 6)), value=10)  # not asked for
    write_cityscapes_frame(root, "gtCoarse", "train_extra", "bonn", 1, 5, coarse, value=20)
    write_cityscapes_frame(root, "gtCoarse", "train_extra", "erlangen", 2, 7, coarse, value=30)
    write_cityscapes_frame(root, "gtCoarse", "train_extra", "erlangen", 2, 7, np.full((4, 6), 18), "labelTrainIds", 30)
    assert len(CityscapesImages(root, "train")) == 1  # fine only, as before
    both = CityscapesImages(root, "train", coarse_splits=("train_extra",))
    assert len(both) == 3 and both.num_classes == 19
    items = [both[k] for k in range(3)]
    shades = [round(denormalize(item["image"][None])[0, 0, 0, 0].item() * 255) for item in items]
    assert shades == [10, 20, 30]  # each image with its own label
    assert (items[0]["label"] == 0).all()
    assert items[1]["label"][0].tolist() == [255, 255, 13, 13, 8, 8]
    assert (items[2]["label"] == 18).all()
    with pytest.raises(FileNotFoundError, match=r"gtCoarse/val not found: expected the Cityscapes layout .*gtCoarse"):
        CityscapesImages(root, "train", coarse_splits=("val",))
    (root / "leftImg8bit" / "train_extra" / "bonn" / "bonn_000001_000005_leftImg8bit.png").unlink()
    with pytest.raises(FileNotFoundError, match="bonn_000001_000005_leftImg8bit.png not found, the image of"):
        CityscapesImages(root, "train", coarse_splits=("train_extra",))


# ------------------------------------------------------------------------------------ KITTI raw
KEPT = ("2011_09_26_drive_0001_sync", "2011_10_03_drive_0027_sync")
TEST_DRIVE = "2011_09_26_drive_0005_sync"  # a KITTI 2015 training scene: excluded


def make_kitti_raw(root, drives, frames=8, size=(6, 10)):
    """A tiny KITTI raw layout; frame k of drive d is a flat image of value 10 d + k."""
    for d, name in enumerate(drives):
        folder = root / name[:10] / name / "image_02" / "data"
        folder.mkdir(parents=True)
        for k in range(frames):
            Image.fromarray(np.full(size + (3,), 10 * d + k, np.uint8)).save(folder / f"{k:010d}.png")
    return root


def test_kitti_raw_pairs_exclude_the_test_scenes_and_read_pseudo_labels(tmp_path):
    import kitti_raw
    drives = (TEST_DRIVE,) + KEPT
    root, labels = make_kitti_raw(tmp_path / "raw", drives), tmp_path / "labels"
    # snippets of 5 frames, the 4th labelled: frames 0-4 and 3-7 (the last snippet ends at the last frame)
    frames = kitti_raw.labelled_frames(root, snippet_length=5, labelled_index=3)
    assert [(f.parts[-4], f.name) for f in frames] == [(d, f"{k:010d}.png") for d in KEPT for k in (3, 6)]
    for n, frame in enumerate(frames):  # pseudo-labels: class n in the top row, ignore below
        label = np.full((6, 10), 255)
        label[0] = n
        kitti_raw.write_label(kitti_raw.label_path(labels, root, frame), label)
    assert (labels / "2011_09_26" / KEPT[0] / "image_02" / "data" / "0000000003.png").is_file()
    with pytest.raises(FileNotFoundError, match=r"0000000003.png not found, the pseudo-label of .*python evaluate.py"):
        kitti_raw.KittiRaw(root, labels, max_gap=2, exclude=(), snippet_length=5, labelled_index=3)  # none for 0005
    pairs = kitti_raw.KittiRaw(root, labels, pairs_per_snippet=4, max_gap=2, snippet_length=5, labelled_index=3)
    assert len(pairs.exclude) == 29 and TEST_DRIVE in pairs.exclude and len(pairs) == 4 * 4
    seen = set()
    for index in range(len(pairs)):
        item = pairs[index]
        a, b = (round(denormalize(item[k][None])[0, 0, 0, 0].item() * 255) for k in ("image_a", "image_b"))
        assert a // 10 == b // 10 != 0  # one drive, never the excluded one (drive 0)
        assert 1 <= b - a == item["t"] <= 2
        snippet = pairs.snippets[index // 4]
        for name, value in (("a", a), ("b", b)):
            labelled = value % 10 == int(snippet.frames[snippet.labelled].stem)
            assert bool(item[f"labelled_{name}"]) == labelled
            expected = torch.full((6, 10), 255)
            if labelled:  # the label written for that frame: its index in `frames` in the top row
                expected[0] = frames.index(root / snippet.label.relative_to(labels))
            assert torch.equal(item[f"label_{name}"], expected)
            seen.add((value, labelled))
    assert {v for v, labelled in seen if labelled} == {13, 16, 23, 26}


def test_kitti_raw_layout_errors_and_the_test_scene_list(tmp_path):
    import kitti_raw
    root = make_kitti_raw(tmp_path / "raw", KEPT, frames=4)
    (root / "2011_09_26" / KEPT[0] / "image_02" / "data" / "0000000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"0000000002.png not found: frames 0000000001 and 0000000003"):
        kitti_raw.labelled_frames(root)
    with pytest.raises(FileNotFoundError, match="holds no <date>/<date>_drive_<id>_sync folders"):
        kitti_raw.labelled_frames(tmp_path)
    with pytest.raises(FileNotFoundError, match="all 2 drives are excluded"):
        kitti_raw.labelled_frames(root, exclude=KEPT)
    # the list: 29 drives, the same as the devkit's train_mapping.txt names (an excerpt in its format:
    # 'DATE DRIVE FRAME' lines and empty lines for images from no raw drive)
    scenes = kitti_raw.read_scene_list()
    assert len(scenes) == 29 and scenes[0] == TEST_DRIVE and scenes[-1] == "2011_10_03_drive_0047_sync"
    mapping = tmp_path / "train_mapping.txt"
    mapping.write_text("\n\n" + "".join(f"{d[:10]} {d} 0000000010\n\n" for d in scenes))
    kitti_raw.check_test_scenes(mapping)
    mapping.write_text(mapping.read_text() + "2011_09_26 2011_09_26_drive_0001_sync 0000000001\n")
    with pytest.raises(ValueError, match=r"only in the mapping \['2011_09_26_drive_0001_sync'\]"):
        kitti_raw.check_test_scenes(mapping)
    mapping.write_text("2011_09_26 drive_5 10\n")
    with pytest.raises(ValueError, match="train_mapping.txt, line 1: expected 'DATE DRIVE FRAME'"):
        kitti_raw.drives_of_mapping(mapping)


def test_kitti_raw_crop_fits_every_kitti_frame_at_scale_one_and_any_paper_angle():
    import kitti_raw
    # KITTI's smallest frame is 370 x 1224; EFC's 713 crop would need scale >= 1.9 of a 375-row frame
    for degrees in np.linspace(-10, 10, 41):
        need_h, need_w = data.rotated_crop_extent(*kitti_raw.CROP, degrees)
        assert need_h <= 370 and need_w <= 1224
    assert data.rotated_crop_extent(713, 713, 0.0)[0] / 375 > 1.9
    # a KITTI-sized frame under EFC's paper augmentation and this crop: scales from below 1 up to 2
    sample = {"image_a": torch.rand(3, 370, 1224), "image_b": torch.rand(3, 370, 1224)}
    transform = JointTransform(crop=kitti_raw.CROP, **data.paper_augmentation("efc"))
    torch.manual_seed(0)
    out = transform(sample)
    assert out["image_a"].shape[1:] == kitti_raw.CROP
