"""Tests of synthetic.py: the world is deterministic, its ground truth is exact (the flow warps the
next frame onto this one, labels follow it), it moves like a driving camera, the look-alike cars
differ only in motion, an interrupted world is recognised, and the command line.

One tiny world (2 train + 1 val snippets of 48 x 64) is generated once for the module.
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

import data
import synthetic
from data import CAR_MOVING, CAR_PARKED, LABELLED_INDEX, SNIPPET_LENGTH, SYNTH_CLASSES, SyntheticSequence, denormalize
from test_data import SIZE, load_png, photometric_error  # the same tiny world's size and helpers
from warp import backward_warp

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.make_synthetic_world(tmp_path_factory.mktemp("world") / "synthetic", num_train=2, num_val=1,
                                          size=SIZE, seed=3, workers=1)


# ------------------------------------------------------------------------------------ the world
def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(world, tmp_path):
    again = synthetic.make_synthetic_world(tmp_path / "again", num_train=2, num_val=1, size=SIZE, seed=3, workers=2)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * (2 * SNIPPET_LENGTH + 1 + 3 * (SNIPPET_LENGTH - 1))  # classes.json + 3 snippets
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (world / name).read_bytes() == (again / name).read_bytes(), name
    other = synthetic.make_synthetic_world(tmp_path / "other", num_train=1, num_val=0, size=SIZE, seed=4, workers=1)
    first = sorted((other / "leftImg8bit_sequence").rglob("*.png"))[0]
    assert not np.array_equal(load_png(first), load_png(sorted((world / "leftImg8bit_sequence").rglob("*.png"))[0]))
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic.make_synthetic_world(other, num_train=1, num_val=0, size=SIZE, seed=4)
    # overwrite replaces the old world; a snippet depends on (seed, split, index) only, not on the count
    synthetic.make_synthetic_world(other, num_train=1, num_val=0, size=SIZE, seed=3, overwrite=True)
    rewritten = sorted(p.relative_to(other) for p in other.rglob("*.png"))
    assert len(rewritten) == 2 * SNIPPET_LENGTH + 1 + 3 * (SNIPPET_LENGTH - 1)
    assert all((other / name).read_bytes() == (world / name).read_bytes() for name in rewritten)


def test_an_interrupted_world_is_refused_and_its_writers_die_with_the_generator(tmp_path, monkeypatch):
    real, written = synthetic._write_snippet, []

    def crash_on_the_second(job):
        if written:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
        written.append(real(job))

    monkeypatch.setattr(synthetic, "_write_snippet", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic_world(tmp_path / "half", num_train=2, num_val=1, size=SIZE, seed=3, workers=1)
    assert data.world_is_incomplete(tmp_path / "half")
    for dataset in (data.CityscapesPairs, data.SyntheticSequence):
        with pytest.raises(FileNotFoundError, match="half: an incomplete synthetic world .*--overwrite"):
            dataset(tmp_path / "half", "train")
    monkeypatch.undo()
    synthetic.make_synthetic_world(tmp_path / "half", num_train=1, num_val=1, size=SIZE, seed=3, workers=1, overwrite=True)
    assert not data.world_is_incomplete(tmp_path / "half") and len(data.SyntheticSequence(tmp_path / "half", "val")) > 0
    # SIGKILL the command-line generator while its two workers write: no worker survives it (Linux)
    if not os.path.isdir("/proc"):
        return
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "synthetic.py", "synth", "--out", str(out), "--train", "40", "--val", "0",
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
        scene = synthetic._Scene(np.random.default_rng(seed), *SIZE)
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


def test_the_world_moves_like_a_driving_camera_and_shows_both_cars(tmp_path):
    """At the default 128x256: the static scene |F| median >= 3 px and p90 >= 8 px; moving cars
    6-16 px/frame relative to the road; parked cars move exactly with it; each car class >= 6 % of
    the labelled pixels (measured on 40 train snippets: 10.4 % and 9.4 %)."""
    root = synthetic.make_synthetic_world(tmp_path / "w", num_train=0, num_val=5, seed=0, workers=2)
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


def test_the_command_line_writes_a_world_and_its_preview(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    monkeypatch.setattr("sys.argv", ["synthetic.py", "synth", "--out", str(out), "--train", "1", "--val", "0",
                                     "--size", "32", "48", "--workers", "1"])
    synthetic.main()
    assert "wrote 1 + 0 snippets of 30 frames (32x48)" in capsys.readouterr().out
    assert len(list((out / "gtFine" / "train" / "synth0").iterdir())) == 1
    monkeypatch.setattr("sys.argv", ["synthetic.py", "preview", "--root", str(world), "--out", str(tmp_path / "p.png")])
    synthetic.main()
    picture = load_png(tmp_path / "p.png")
    assert picture.shape == (2 * 48 + 2, 4 * 64 + 6, 3)  # two train snippets: image | labels | flow | occlusion
    monkeypatch.setattr("sys.argv", ["synthetic.py", "synth", "--out", str(out)])
    with pytest.raises(SystemExit):  # an existing world is not overwritten silently
        synthetic.main()
    assert "not empty" in capsys.readouterr().err


# ------------------------------------------------------------------- two runs that need the world at once
WRITER = ("import sys, synthetic\n"
          "real = synthetic.make_synthetic_world\n"
          "def counted(*a, **k):\n"
          "    print('WROTE', flush=True)\n"
          "    return real(*a, **k)\n"
          "synthetic.make_synthetic_world = counted\n"
          "synthetic.write_world_once(sys.argv[1], num_train=2, num_val=1, size=(32, 48), workers=1)\n"
          "print(len(list(synthetic.Path(sys.argv[1]).rglob('*.png'))), flush=True)\n")


def test_two_runs_at_once_write_the_world_once_and_both_read_all_of_it(tmp_path):
    out = tmp_path / "data" / "synthetic"
    runs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in results]
    outputs = [stdout.split() for stdout, _ in results]
    assert sum(o.count("WROTE") for o in outputs) == 1  # one writer; the other waited or found it written
    files = 3 * (2 * SNIPPET_LENGTH + 1 + 3 * (SNIPPET_LENGTH - 1))
    assert [int(o[-1]) for o in outputs] == [files, files]  # each run saw the whole world
    assert synthetic.is_complete_world(out) and sorted(p.name for p in out.parent.iterdir()) == [
        ".synthetic.lock", "synthetic"]  # no temporary folder left


def test_the_next_writer_clears_a_killed_writers_folder_and_replaces_an_incomplete_world(tmp_path):
    out = tmp_path / "w"
    (tmp_path / ".w.writing-12345" / "gtFine").mkdir(parents=True)  # a writer killed midway
    out.mkdir()
    (out / data.INCOMPLETE_MARKER).write_text("interrupted\n")  # `synthetic.py synth` interrupted
    messages = []
    synthetic.write_world_once(out, messages.append, num_train=1, num_val=0, size=SIZE, workers=1)
    assert synthetic.is_complete_world(out) and not data.world_is_incomplete(out)
    assert not (tmp_path / ".w.writing-12345").exists() and len(messages) == 1 and "writing" in messages[0]
    before = (out / "classes.json").stat().st_mtime_ns
    synthetic.write_world_once(out, messages.append)  # complete: used as it is, nothing written
    assert (out / "classes.json").stat().st_mtime_ns == before and len(messages) == 1
