"""Tests of data.py: the synthetic world, the dataset loaders, the joint augmentation, bad inputs.

One tiny synthetic world (2 train + 1 val snippets of 48 x 64) is generated once for the module.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data
from data import (CAR_MOVING, CAR_PARKED, CITYSCAPES_LABEL_TO_TRAIN, LABELLED_INDEX, SNIPPET_LENGTH, SYNTH_CLASSES,
                  CamVid, CityscapesFlow2Seg, CityscapesImages, CityscapesPairs, JointTransform, KittiFlow,
                  SyntheticSequence, denormalize, make_synthetic_world, read_kitti_flow, write_flo, write_kitti_flow)
from warp import backward_warp

ROOT = Path(__file__).resolve().parent.parent

SIZE = (48, 64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_synthetic_world(tmp_path_factory.mktemp("world") / "synthetic", num_train=2, num_val=1, size=SIZE,
                                seed=3, workers=1)


def load_png(path):
    return np.array(Image.open(path))


def photometric_error(image_a, image_b, flow, mask):
    """|backward_warp(b, F_a->b) - a| (mean over RGB) at the pixels of `mask` whose target is inside b
    -> (1-D tensor of errors, the mask of those pixels)."""
    warped, inside = backward_warp(image_b[None], flow[None])
    keep = mask & (inside[0, 0] > 0)
    return (warped[0] - image_a).abs().mean(0)[keep], keep


# ------------------------------------------------------------------------------------ the world
def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(world, tmp_path):
    again = make_synthetic_world(tmp_path / "again", num_train=2, num_val=1, size=SIZE, seed=3, workers=2)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * (2 * SNIPPET_LENGTH + 1 + 3 * (SNIPPET_LENGTH - 1))  # classes.json + 3 snippets
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (world / name).read_bytes() == (again / name).read_bytes(), name
    other = make_synthetic_world(tmp_path / "other", num_train=1, num_val=0, size=SIZE, seed=4, workers=1)
    first = sorted((other / "leftImg8bit_sequence").rglob("*.png"))[0]
    assert not np.array_equal(load_png(first), load_png(sorted((world / "leftImg8bit_sequence").rglob("*.png"))[0]))
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_world(other, num_train=1, num_val=0, size=SIZE, seed=4)
    # overwrite replaces the old world; a snippet depends on (seed, split, index) only, not on the count
    make_synthetic_world(other, num_train=1, num_val=0, size=SIZE, seed=3, overwrite=True)
    rewritten = sorted(p.relative_to(other) for p in other.rglob("*.png"))
    assert len(rewritten) == 2 * SNIPPET_LENGTH + 1 + 3 * (SNIPPET_LENGTH - 1)
    assert all((other / name).read_bytes() == (world / name).read_bytes() for name in rewritten)


def test_an_interrupted_world_is_refused_and_its_writers_die_with_the_generator(tmp_path, monkeypatch):
    real, written = data._write_snippet, []

    def crash_on_the_second(job):
        if written:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
        written.append(real(job))

    monkeypatch.setattr(data, "_write_snippet", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_world(tmp_path / "half", num_train=2, num_val=1, size=SIZE, seed=3, workers=1)
    assert data.world_is_incomplete(tmp_path / "half")
    for dataset in (data.CityscapesPairs, data.SyntheticSequence):
        with pytest.raises(FileNotFoundError, match="half: an incomplete synthetic world .*--overwrite"):
            dataset(tmp_path / "half", "train")
    monkeypatch.undo()
    make_synthetic_world(tmp_path / "half", num_train=1, num_val=1, size=SIZE, seed=3, workers=1, overwrite=True)
    assert not data.world_is_incomplete(tmp_path / "half") and len(data.SyntheticSequence(tmp_path / "half", "val")) > 0
    # SIGKILL the command-line generator while its two workers write: no worker survives it (Linux)
    if not os.path.isdir("/proc"):
        return
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "data.py", "synth", "--out", str(out), "--train", "40", "--val", "0",
                                "--workers", "2"], cwd=ROOT)
    deadline = time.time() + 60
    while not list(out.glob("leftImg8bit_sequence/train/*/*.png")) and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    time.sleep(1.0)
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and str(out) in _cmdline(p)]  # workers: same cmdline
    assert not survivors
    assert data.world_is_incomplete(out)


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_world_layout_only_the_twentieth_frame_in_gtfine(world):
    info = json.loads((world / "classes.json").read_text())
    assert info["names"] == list(SYNTH_CLASSES) and len(info["palette"]) == len(SYNTH_CLASSES)
    labelled_numbers = []
    for split, cities in (("train", ["synth0"]), ("val", ["synthval0"])):
        assert sorted(p.name for p in (world / "gtFine" / split).iterdir()) == cities
        for gt in sorted((world / "gtFine" / split).rglob("*_gtFine_labelTrainIds.png")):
            city, seq, frame = gt.name.split("_")[:3]
            labelled_numbers.append(int(frame))
            numbers = range(int(frame) - LABELLED_INDEX, int(frame) + SNIPPET_LENGTH - LABELLED_INDEX)
            for k, n in enumerate(numbers):
                prefix = f"{split}/{city}/{city}_{seq}_{n:06d}"
                assert (world / "leftImg8bit_sequence" / f"{prefix}_leftImg8bit.png").is_file()
                assert (world / "gt_all" / f"{prefix}_gtFine_labelTrainIds.png").is_file()
                assert (world / "flow_fw" / f"{prefix}_leftImg8bit_flow.png").is_file() == (k < SNIPPET_LENGTH - 1)
                assert (world / "occ_fw" / f"{prefix}_leftImg8bit_occ.png").is_file() == (k < SNIPPET_LENGTH - 1)
                assert (world / "flow_bw" / f"{prefix}_leftImg8bit_flow.png").is_file() == (k > 0)
                assert (world / "gtFine" / f"{prefix}_gtFine_labelTrainIds.png").is_file() == (k == LABELLED_INDEX)
            # the gtFine label is the all-frame label of the 20th frame
            assert np.array_equal(load_png(gt), load_png(world / "gt_all" / split / city / gt.name))
    assert len(labelled_numbers) == 3 and labelled_numbers != [19, 19, 19]


def test_ground_truth_flow_warps_next_frame_onto_current(world):
    sequence = SyntheticSequence(world, "train")
    assert len(sequence) == 2 * (SNIPPET_LENGTH - 1)
    p90, p90_shifted, means, occluded = [], [], [], []
    for index in range(0, len(sequence), 3):
        item = sequence[index]
        a, b = denormalize(item["image_a"][None])[0], denormalize(item["image_b"][None])[0]
        visible = ~item["occ_fw"]
        error, keep = photometric_error(a, b, item["flow_fw"], visible)
        # Small photometric error on non-occluded pixels: bilinear interpolation, the 1/64-px
        # rounding of the PNG and a brightness change of at most 1 %. The larger errors sit on the
        # few pixels whose bilinear footprint in b straddles an object's edge.
        assert error.median() < 0.006 and keep.float().mean() > 0.8
        means.append(error.mean().item())
        p90.append(error.quantile(0.9).item())
        shifted, _ = photometric_error(a, b, item["flow_fw"] + torch.tensor([0.5, 0.0]).view(2, 1, 1), visible)
        p90_shifted.append(shifted.quantile(0.9).item())
        occluded.append(item["occ_fw"].float().mean().item())
        # The backward flow lives on b's grid: warping a by it reproduces b.
        # (a little looser: the camera's zoom, up to 4 %/frame, shrinks a's texture seen from b, so
        # b's pixels sample a between its texels)
        error_bw, keep_bw = photometric_error(b, a, item["flow_bw"], torch.ones_like(visible))
        assert error_bw.median() < 0.008 and keep_bw.float().mean() > 0.8
        # Labels follow the flow too: the next label, fetched by the flow, agrees on visible pixels.
        label_b, _ = backward_warp(item["label_b"][None, None].float(), item["flow_fw"].round()[None])
        assert (label_b[0, 0].long() == item["label_a"])[keep].float().mean() > 0.9
    assert np.mean(means) < 0.015 and max(p90) < 0.03  # p90: edge pixels of 6-10 cars in a 48x64 frame
    assert np.mean(p90) < 0.6 * np.mean(p90_shifted)  # the flow is right to much better than half a pixel
    assert 0 < np.mean(occluded) < 0.3


def test_every_class_appears(world):
    seen_all, seen_labelled = set(), set()
    for path in world.joinpath("gt_all").rglob("*.png"):
        seen_all |= set(np.unique(load_png(path)).tolist())
    for path in world.joinpath("gtFine").rglob("*.png"):
        seen_labelled |= set(np.unique(load_png(path)).tolist())
    assert seen_all == set(range(len(SYNTH_CLASSES)))
    assert seen_labelled == set(range(len(SYNTH_CLASSES)))


def test_lookalike_cars_differ_only_in_motion(world):
    # Appearance: every car sprite is used once parked and once moving, so the two classes have
    # identical sprite statistics (colours, sizes, shapes) in every snippet.
    for seed in range(5):
        scene = data._Scene(np.random.default_rng(seed), *SIZE)
        parked = sorted(s.texture.tobytes() + s.mask.tobytes() for s in scene.sprites if s.cls == CAR_PARKED)
        moving = sorted(s.texture.tobytes() + s.mask.tobytes() for s in scene.sprites if s.cls == CAR_MOVING)
        assert parked == moving and len(parked) >= 2
    # ...and the rendered frames agree: the colour statistics of the two classes are close.
    stats = {CAR_PARKED: [], CAR_MOVING: []}
    for image_path in world.joinpath("leftImg8bit_sequence").rglob("*.png"):
        label_path = str(image_path).replace("leftImg8bit_sequence", "gt_all")
        label_path = label_path.replace("_leftImg8bit", "_gtFine_labelTrainIds")
        image, label = load_png(image_path) / 255.0, load_png(label_path)
        for cls in stats:
            stats[cls].append(image[label == cls])
    parked, moving = (np.concatenate(stats[c]) for c in (CAR_PARKED, CAR_MOVING))
    assert np.abs(parked.mean(0) - moving.mean(0)).max() < 0.1 and np.abs(parked.std(0) - moving.std(0)).max() < 0.1
    # Motion: parked cars move exactly with the static scene (a similarity transform of the pixel
    # grid, fitted on road pixels); moving cars do not.
    sequence = SyntheticSequence(world, "train")
    residual = {CAR_PARKED: [], CAR_MOVING: []}
    for index in range(0, len(sequence), 4):
        item = sequence[index]
        flow, label = item["flow_fw"], item["label_a"]
        ys, xs = torch.meshgrid(torch.arange(SIZE[0]), torch.arange(SIZE[1]), indexing="ij")
        design = torch.stack([xs, ys, torch.ones_like(xs)], -1).double()  # u = a x + b y + c, v likewise
        road = label == data.ROAD
        coef = torch.linalg.lstsq(design[road], flow.permute(1, 2, 0)[road].double()).solution
        for cls in residual:
            m = label == cls
            if m.any():
                residual[cls].append((design[m] @ coef - flow.permute(1, 2, 0)[m].double()).norm(dim=1).mean().item())
    assert max(residual[CAR_PARKED]) < 0.02  # the 1/64-px rounding of the PNG
    assert min(residual[CAR_MOVING]) > 0.15


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


def test_flow_to_color_and_the_command_line(world, tmp_path, monkeypatch, capsys):
    flow = np.zeros((2, 3, 2))
    flow[0, 0] = (1, 0)
    colours = data.flow_to_color(flow)
    assert colours.dtype == np.uint8 and (colours[1, 1] == 255).all()  # no motion: white
    assert colours[0, 0, 0] == 255 and colours[0, 0, 1] == 0  # right: red
    out = tmp_path / "cli"
    monkeypatch.setattr("sys.argv", ["data.py", "synth", "--out", str(out), "--train", "1", "--val", "0",
                                     "--size", "32", "48", "--workers", "1"])
    data.main()
    assert "wrote 1 + 0 snippets of 30 frames (32x48)" in capsys.readouterr().out
    assert len(list((out / "gtFine" / "train" / "synth0").iterdir())) == 1
    monkeypatch.setattr("sys.argv", ["data.py", "preview", "--root", str(world), "--out", str(tmp_path / "p.png")])
    data.main()
    picture = load_png(tmp_path / "p.png")
    assert picture.shape == (2 * 48 + 2, 4 * 64 + 6, 3)  # two train snippets: image | labels | flow | occlusion
    monkeypatch.setattr("sys.argv", ["data.py", "synth", "--out", str(out)])
    with pytest.raises(SystemExit):  # an existing world is not overwritten silently
        data.main()
    assert "not empty" in capsys.readouterr().err


def test_the_world_moves_like_a_driving_camera_and_shows_both_cars(tmp_path):
    """At the default 128x256: the static scene |F| median >= 3 px and p90 >= 8 px; moving cars
    6-16 px/frame relative to the road; parked cars move exactly with it; each car class >= 6 % of
    the labelled pixels (measured on 40 train snippets: 10.4 % and 9.4 %)."""
    root = make_synthetic_world(tmp_path / "w", num_train=0, num_val=5, seed=0, workers=2)
    sequence = SyntheticSequence(root, "val")
    background, relative, cars = [], [], np.zeros(3)
    for s in range(5):
        for i in (4, 12, 18, 24):
            item = sequence[s * (SNIPPET_LENGTH - 1) + i]
            flow, valid, label = item["flow_fw"].numpy(), item["flow_fw_valid"].numpy(), item["label_a"].numpy()
            static = valid & (label <= data.SKY)
            background.append(np.hypot(flow[0], flow[1])[static])
            ys, xs = np.nonzero(static)  # the static scene's flow is affine (pan + zoom): fit it
            fit = np.linalg.lstsq(np.stack([xs, ys, np.ones_like(xs)], 1), flow[:, static].T, rcond=None)[0]
            for cls in (CAR_MOVING, CAR_PARKED):
                ys, xs = np.nonzero(valid & (label == cls))
                if len(xs):
                    residual = np.hypot(*(flow[:, ys, xs].T - np.stack([xs, ys, np.ones_like(xs)], 1) @ fit).T)
                    if cls == CAR_PARKED:
                        assert residual.max() < 0.05  # 1/64 px rounding of the stored flow
                    else:
                        relative.append(residual)
        label = SyntheticSequence(root, "val")[s * (SNIPPET_LENGTH - 1) + LABELLED_INDEX]["label_a"].numpy()
        cars += [(label == CAR_MOVING).sum(), (label == CAR_PARKED).sum(), (label != 255).sum()]
    background, relative = np.concatenate(background), np.concatenate(relative)
    assert np.median(background) >= 3 and np.percentile(background, 90) >= 8
    assert 6 <= np.percentile(relative, 10) and np.percentile(relative, 90) <= 16.5
    assert cars[0] / cars[2] >= 0.06 and cars[1] / cars[2] >= 0.06, cars


def test_progress_reports_rate_and_time_left_only_on_long_loops(capsys):
    assert list(data.progress(range(3), 3, "quick")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # a short loop says nothing
    for _ in data.progress(range(4), 4, "slow", every=0.005):
        time.sleep(0.06)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("slow: 1/4, ") and "/s, about " in lines[0] and lines[0].endswith(" s left")
    assert lines[-1].startswith("slow: 4/4 in ")
