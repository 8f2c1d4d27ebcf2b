"""KITTI raw as EFC trains on it for its flow results (EFC Tables 2 and 5).

EFC "Dataset and Setting", KITTI: "The training data we use here is similar to (Yin and Shi 2018),
where the official training images are adopted as testing set. All the related images in the 28
scenes covered by testing data are excluded. Since there are no segmentation labels on our training
set, we generate some coarse segmentation results as the segmentation ground truths through a model
trained on Cityscapes."

  the test scenes      kitti_test_scenes.txt (its header gives the source: the KITTI 2015 devkit's
                       train_mapping.txt; 29 drives, the paper says 28)   -> read_scene_list,
                                                                             drives_of_mapping, check_test_scenes
  the pseudo-labels    written by `python evaluate.py --checkpoint CITYSCAPES_CKPT --pseudo-labels RAW
                       --out LABELS` (evaluate.write_pseudo_labels) at    -> label_path, labelled_frames
  the pairs            EFC pairs in data.CityscapesPairs' item format     -> KittiRaw
  the crop             256 x 640                                          -> CROP

Layout: RAW/<date>/<date>_drive_<id>_sync/image_02/data/<frame>.png (the left colour camera, frames
numbered 0000000000, 0000000001, ...); labels: LABELS/<the same relative path>, 8-bit PNGs of
Cityscapes train ids 0..18 (255 = ignore).

Where the paper is silent:
  * Which frames get labels ("some coarse segmentation results"): every drive is cut into snippets
    shaped like Cityscapes' (30 consecutive frames, the 20th labelled), so the pair sampling of
    Cityscapes (ten pairs, t in [1, 5], five with the labelled frame) applies unchanged. A drive's
    last snippet is its last 30 frames (overlapping the one before) so that no frame is left out;
    a drive shorter than a snippet is one snippet, its labelled frame the 20th or else the last.
  * The labels are the plain argmax of the Cityscapes model (no confidence threshold: the paper
    names none), so no pixel is 255 unless a label file says so.
  * The crop: EFC's 713 x 713 does not fit a 375 x 1242 frame below scale 1.9 (713 / 375), which
    would pin the scale to [1.9, 2]. CROP = 256 x 640 fits every KITTI frame size (the smallest is
    370 x 1224) at scale 1 and any angle within +-10 degrees (data.rotated_crop_extent: 365 x 676),
    so the scale draw keeps [1, 2] whole and goes down to 0.69-0.97 (by angle), with no padding.
"""
import re
from pathlib import Path

import numpy as np
from PIL import Image

import data

TEST_SCENES_FILE = Path(__file__).resolve().with_name("kitti_test_scenes.txt")
DRIVE_NAME = re.compile(r"^(?P<date>\d{4}_\d{2}_\d{2})_drive_\d{4}_sync$")
FRAME_NAME = re.compile(r"^(?P<number>\d{10})\.png$")
CAMERA = "image_02"  # the left colour camera, as KITTI 2015's image_2
CROP = (256, 640)  # (H, W): see the module docstring
LAYOUT = "expected the KITTI raw layout RAW/<date>/<date>_drive_<id>_sync/image_02/data/0000000000.png"


def read_scene_list(path=TEST_SCENES_FILE):
    """The drive names of a scene list (one per line, e.g. 2011_09_26_drive_0005_sync; '#' starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scene list not found")
    names = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    names = [name for name in names if name]
    bad = [name for name in names if not DRIVE_NAME.match(name)]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} is not a KITTI raw drive name (expected like 2011_09_26_drive_0005_sync)")
    return tuple(sorted(set(names)))


def drives_of_mapping(path):
    """The raw drives named by a KITTI devkit mapping file (lines 'DATE DRIVE FRAME'; empty lines are
    images that come from no raw drive) -> sorted tuple of drive names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mapping file not found (the devkit's mapping/train_mapping.txt)")
    drives = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not DRIVE_NAME.match(fields[1]):
            raise ValueError(f"{path}, line {number}: expected 'DATE DRIVE FRAME' "
                             f"(e.g. 2011_09_26 2011_09_26_drive_0005_sync 0000000010), got {line.strip()!r}")
        drives.add(fields[1])
    return tuple(sorted(drives))


def check_test_scenes(mapping, scenes=TEST_SCENES_FILE):
    """Compare the scene list with a devkit's train_mapping.txt: raise naming the differences, else
    print that they agree."""
    ours, theirs = set(read_scene_list(scenes)), set(drives_of_mapping(mapping))
    if ours != theirs:
        raise ValueError(f"{scenes} and {mapping} differ: only in the list {sorted(ours - theirs)}, "
                         f"only in the mapping {sorted(theirs - ours)}")
    print(f"{scenes}: the same {len(ours)} drives as {mapping}")


def raw_drives(root, exclude):
    """The drive folders of a KITTI raw root, except those named in `exclude` -> sorted paths."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: {LAYOUT}")
    found = sorted(drive for date in root.iterdir() if date.is_dir() for drive in date.iterdir()
                   if drive.is_dir() and DRIVE_NAME.match(drive.name) and drive.name.startswith(date.name))
    if not found:
        raise FileNotFoundError(f"{root} holds no <date>/<date>_drive_<id>_sync folders: {LAYOUT}")
    kept = [drive for drive in found if drive.name not in set(exclude)]
    if not kept:
        raise FileNotFoundError(f"{root}: all {len(found)} drives are excluded (test scenes)")
    return kept


def drive_frames(drive):
    """A drive's frames image_02/data/NNNNNNNNNN.png in time order; a gap in the numbering is an error
    (a pair must be t frames apart in time, not in a listing)."""
    folder = drive / CAMERA / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: {LAYOUT}")
    names = sorted(name for name in data._listing(folder, LAYOUT) if FRAME_NAME.match(name))
    if len(names) < 2:
        raise FileNotFoundError(f"{folder} holds {len(names)} frame(s) named NNNNNNNNNN.png; a pair needs two")
    numbers = [int(name[:10]) for name in names]
    for a, b in zip(numbers, numbers[1:]):
        if b != a + 1:
            raise FileNotFoundError(f"{folder / f'{a + 1:010d}.png'} not found: frames {a:010d} and {b:010d} "
                                    "of the drive are not consecutive")
    return [folder / name for name in names]


def snippet_windows(count, length, labelled_index):
    """[(first frame, labelled frame's index in the snippet, snippet length)] covering `count` frames:
    windows of `length` from frame 0, the last one ending at the last frame (see the module docstring)."""
    if count <= length:
        return [(0, min(labelled_index, count - 1), count)]
    starts = list(range(0, count - length + 1, length))
    if starts[-1] + length < count:
        starts.append(count - length)
    return [(start, labelled_index, length) for start in starts]


def label_path(labels_root, raw_root, image):
    """Where the pseudo-label of a raw frame lives: labels_root / (the frame's path under raw_root)."""
    return Path(labels_root) / Path(image).relative_to(raw_root)


def _snippets(root, exclude, length, labelled_index):
    """[(frames, labelled index)] of every snippet of the kept drives."""
    snippets = []
    for drive in raw_drives(root, exclude):
        frames = drive_frames(drive)
        for start, labelled, size in snippet_windows(len(frames), length, labelled_index):
            snippets.append((frames[start:start + size], labelled))
    return snippets


def labelled_frames(root, exclude=None, snippet_length=data.SNIPPET_LENGTH, labelled_index=data.LABELLED_INDEX):
    """The frames KittiRaw reads labels for (the ones evaluate.py --pseudo-labels writes), in order."""
    exclude = read_scene_list() if exclude is None else exclude
    return [frames[k] for frames, k in _snippets(root, exclude, snippet_length, labelled_index)]


class KittiRaw(data._PairDataset):
    """EFC pairs from KITTI raw drives with pseudo-labels (EFC Table 2's "EFC full" and Table 5).

    root: the raw root; labels: the folder evaluate.py --pseudo-labels wrote (label_path). exclude:
    drive names to leave out (default: kitti_test_scenes.txt). Every drive is cut into snippets
    (snippet_windows); each gives pairs_per_snippet pairs (I_i, I_{i+t}), 1 <= t <= max_gap, both
    frames from one snippet and so from one drive, drawn as in data.CityscapesPairs (set_epoch,
    set_pair_mode). Items as data.CityscapesPairs: image_a, image_b (3, H, W) normalised; label_a,
    label_b (H, W) int64 (Cityscapes train ids, all 255 for an unlabelled frame); labelled_a,
    labelled_b; i, t. Every label file is looked for when the dataset is built.
    """

    def __init__(self, root, labels, pairs_per_snippet=10, max_gap=5, transform=None, seed=0, exclude=None,
                 snippet_length=data.SNIPPET_LENGTH, labelled_index=data.LABELLED_INDEX, labelled_pairs=None,
                 fixed_labelled=False, unlabelled_companion=False):
        if pairs_per_snippet < 1 or not 1 <= max_gap < snippet_length or not 0 <= labelled_index < snippet_length:
            raise ValueError(f"pairs_per_snippet ({pairs_per_snippet}) must be >= 1, max_gap ({max_gap}) in "
                             f"[1, {snippet_length - 1}] and labelled_index ({labelled_index}) in "
                             f"[0, {snippet_length - 1}]")
        self.root, self.labels, self.transform = Path(root), Path(labels), transform
        self.pairs_per_snippet, self.max_gap, self.seed = pairs_per_snippet, max_gap, seed
        self.set_pair_mode(labelled_pairs, fixed_labelled, unlabelled_companion)
        self.classes, self.num_classes = data.CITYSCAPES_CLASSES, len(data.CITYSCAPES_CLASSES)
        self.exclude = read_scene_list() if exclude is None else tuple(exclude)
        self.snippets = []
        for frames, k in _snippets(self.root, self.exclude, snippet_length, labelled_index):
            label = label_path(self.labels, self.root, frames[k])
            if not label.is_file():
                raise FileNotFoundError(f"{label} not found, the pseudo-label of {frames[k]}: write them with "
                                        f"`python evaluate.py --checkpoint CITYSCAPES_CKPT --pseudo-labels {self.root} "
                                        f"--out {self.labels}`")
            self.snippets.append(data.Snippet(frames, k, label))

    def _read_label(self, path):
        return data.read_label(path, data.train_id_lut(self.num_classes), "Cityscapes train ids 0..18 and 255")


def write_label(path, train_ids):
    """An (H, W) array of train ids (0..255, 255 = ignore) -> an 8-bit PNG at `path` (folders made)."""
    train_ids = np.asarray(train_ids)
    if train_ids.ndim != 2 or train_ids.min() < 0 or train_ids.max() > 255:
        raise ValueError(f"{path}: a label image must be (H, W) with values 0..255, got {train_ids.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(train_ids.astype(np.uint8)).save(path)  # a 2-D uint8 array is an 8-bit grey ("L") PNG
