"""Data: everything that reads, writes or synthesises data on disk, the datasets and the augmentation.

Sections, in file order
  1. Normalisation: ImageNet mean / std                                normalize, denormalize
  2. Flow files: Middlebury .flo, KITTI 16-bit PNG (through png16.py's codec, because Pillow reads
     16-bit RGB as 8 bits), and `read_flow` for any of .flo / KITTI PNG / .npy
  3. Images and labels: readers that name the file on bad input; the label tables
     (Cityscapes labelIds -> trainIds exactly as cityscapesScripts' labels.py, its 7 categories for
     "IoU cat"; CamVid's 11 classes; the synthetic world's classes)
  4. The synthetic world's layout: its classes, snippet shape and completion marker (synthetic.py
     renders and writes it: `python synthetic.py synth`)               world_is_incomplete
  5. Datasets (map-style, each item a dict of tensors)
       CityscapesPairs     EFC "Implementation Details": pairs (I_i, I_{i+t}), t in [1, 5], ten per
                           snippet, five of which contain the labelled frame (Table 1's rows:
                           _PairDataset.set_pair_mode)
       CityscapesFlow2Seg  Flow2Seg 4.1: the labelled 20th frame, the 19th, and the flow F_t->t-1
       CityscapesImages    single labelled frames (PSPNet / Image2Seg training, evaluation), gtFine
                           plus, with coarse_splits, gtCoarse (EFC Table 3 "PSP CRS", Flow2Seg 4.4)
       SyntheticSequence   every consecutive pair of the synthetic world with all ground truth
       CamVid              SegNet layout, 11 classes (EFC Table 4), optional video neighbours
       KittiFlow           KITTI 2015 flow (EFC Tables 2 and 5) and unlabelled pairs
     (KITTI raw with pseudo-labels, EFC's flow training set, is kitti_raw.py's KittiRaw.)
  6. Augmentation, identical on every image, label, flow and mask of a sample (EFC "Implementation
     Details"; Flow2Seg 4.2)                                           JointTransform
     each paper's own list (train.py's --recipe paper) and the quick recipe's
                                                                       paper_augmentation, quick_augmentation
  7. Loading, command lines and pictures: one_line_errors, progress, worker_init_fn, flow_to_color, colorize

A sample is a dict of tensors, recognised by dtype and shape (section 6 relies on it):
  image  (3, H, W) float32, RGB in [0, 1] inside the dataset, ImageNet-normalised when returned;
  label  (H, W) int64, 255 = ignore;
  flow   (2, H, W) float32 in pixels, u first (x, right), v second (y, down); its validity mask is
         the entry named like the flow plus "_valid";
  mask   (H, W) bool (validity; or occlusion, 1 = occluded, for keys starting with "occ");
  anything else (frame indices, flags) passes through unchanged.
On disk and in numpy, flows are (H, W, 2) with the same channel order; see warp.py for the flow
conventions (pixel p of frame a moves to p + F_a->b(p)).
"""
import json
import os
import random
import re
import signal
import struct
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from png16 import PNG_SIGNATURE, read_png16_rgb, write_png16_rgb  # noqa: F401 (tests import them from here)
from warp import backward_warp, pixel_grid, resize_flow

# =============================================================================================
# 1. Normalisation. Images enter every network as (B, 3, H, W) float RGB in [0, 1], minus the
# ImageNet mean, divided by the ImageNet std (the statistics the pretrained ResNets were trained
# with). The photometric losses (EFC eqs. (6)-(7)) work on [0, 1] images: `denormalize` undoes this.
# =============================================================================================
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(like):
    mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    return mean, std


def normalize(rgb):
    """(B, 3, H, W) RGB in [0, 1] -> network input."""
    mean, std = _stats(rgb)
    return (rgb - mean) / std


def denormalize(image):
    """Network input (B, 3, H, W) -> RGB in [0, 1] (the inverse of `normalize`)."""
    mean, std = _stats(image)
    return image * std + mean


# =============================================================================================
# 2. Flow files
# =============================================================================================
# ---------------------------------------------------------------------------------------------
# Middlebury .flo: float32 magic 202021.25 (the bytes "PIEH"), int32 width, int32 height, then
# H * W * 2 little-endian float32, row-major, u and v interleaved per pixel.
# ---------------------------------------------------------------------------------------------
FLO_MAGIC = 202021.25


def read_flo(path):
    """Read a Middlebury .flo file -> (H, W, 2) float32 array (u, v) in pixels."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12:
        raise ValueError(f"{path}: not a .flo file (only {len(data)} bytes; the header alone is 12)")
    magic, = struct.unpack("<f", data[:4])
    if magic != FLO_MAGIC:
        raise ValueError(f"{path}: not a .flo file (magic number {magic!r}, expected {FLO_MAGIC})")
    width, height = struct.unpack("<ii", data[4:12])
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: impossible .flo dimensions {width}x{height}")
    expected = 12 + 8 * width * height
    # A size check, not np.resize: a truncated file must fail, not be silently padded.
    if len(data) != expected:
        raise ValueError(f"{path}: .flo of {width}x{height} should be {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype="<f4", offset=12).reshape(height, width, 2).astype(np.float32)


def write_flo(path, flow):
    """Write an (H, W, 2) flow (u, v) in pixels to a Middlebury .flo file."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{path}: flow to write must be (H, W, 2), got shape {flow.shape}")
    height, width = flow.shape[:2]
    with open(path, "wb") as f:
        f.write(struct.pack("<fii", FLO_MAGIC, width, height))
        f.write(np.ascontiguousarray(flow, dtype="<f4").tobytes())


# ---------------------------------------------------------------------------------------------
# KITTI flow PNG: R = u * 64 + 2^15, G = v * 64 + 2^15, B = 1 where the flow is valid, else 0.
# ---------------------------------------------------------------------------------------------
def read_kitti_flow(path):
    """Read a KITTI flow PNG -> flow (H, W, 2) float32 in pixels, valid (H, W) bool.

    Invalid pixels (B == 0) are returned with flow exactly 0, whatever their R, G hold.
    """
    rgb = read_png16_rgb(path).astype(np.float32)
    valid = rgb[..., 2] > 0
    flow = (rgb[..., :2] - 2.0 ** 15) / 64.0
    flow[~valid] = 0.0
    return flow, valid


def write_kitti_flow(path, flow, valid=None):
    """Write flow (H, W, 2) in pixels and valid (H, W) bool (default: all valid) as a KITTI PNG.

    Values are rounded to the nearest 1/64 px. A valid value outside the 16-bit range
    [-512, 511.984375] px (or not finite) is refused, never wrapped or clipped; invalid
    pixels are written as zero flow with B = 0, whatever their values.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{path}: flow to write must be (H, W, 2), got shape {flow.shape}")
    valid = np.ones(flow.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != flow.shape[:2]:
        raise ValueError(f"{path}: valid mask {valid.shape} does not match flow {flow.shape[:2]}")
    coded = np.where(valid[..., None], np.rint(flow * 64.0 + 2.0 ** 15), 2.0 ** 15)
    bad = ~np.isfinite(coded) | (coded < 0) | (coded > 65535)
    if bad.any():
        y, x, c = np.argwhere(bad)[0]
        raise ValueError(f"{path}: flow {flow[y, x, c]!r} at (x={x}, y={y}) does not fit KITTI's 16-bit "
                         f"encoding (range [-512, 511.984375] px); {int(bad.sum())} value(s) out of range")
    rgb = np.dstack([coded, valid.astype(np.float64)]).astype(np.uint16)
    write_png16_rgb(path, rgb)


# ---------------------------------------------------------------------------------------------
# Any flow file, by its name. Precomputed flows for Flow2Seg come in whichever format the flow
# network wrote; the validity mask says where the file holds no flow.
# ---------------------------------------------------------------------------------------------
FLOW_SUFFIXES = (".flo", "_flow.png", ".npy")  # the names a flow directory may use, in order of preference


def read_flow(path):
    """Read a flow file -> flow (H, W, 2) float32 in pixels (0 where invalid), valid (H, W) bool.

      *.png  KITTI 16-bit PNG (valid = B > 0);
      *.flo  Middlebury; *.npy  an (H, W, 2) float array. In both, a pixel is invalid where a value is
             not finite or above 1e9 in magnitude (Middlebury's "unknown flow").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: flow file not found")
    if path.suffix == ".png":
        return read_kitti_flow(path)
    if path.suffix == ".flo":
        flow = read_flo(path)
    elif path.suffix == ".npy":
        try:
            flow = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read .npy flow ({e})") from None
        if flow.ndim != 3 or flow.shape[2] != 2 or not np.issubdtype(flow.dtype, np.floating):
            raise ValueError(f"{path}: expected an (H, W, 2) float flow array, got {flow.shape} {flow.dtype}")
    else:
        raise ValueError(f"{path}: unknown flow format (expected one of {', '.join(FLOW_SUFFIXES)})")
    flow = flow.astype(np.float32)
    valid = np.isfinite(flow).all(axis=2) & (np.abs(np.nan_to_num(flow)) < 1e9).all(axis=2)
    flow[~valid] = 0.0
    return flow, valid


# =============================================================================================
# 3. Images and labels
# =============================================================================================
def read_image(path):
    """Read an 8-bit RGB image -> (H, W, 3) uint8. A missing, unreadable or truncated file names itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later as a grey stripe
            if img.mode != "RGB":
                raise ValueError(f"expected an 8-bit RGB image, got mode {img.mode}")
            return np.array(img)
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for broken files are OSErrors
        raise ValueError(f"{path}: cannot read image ({e})") from None


def read_label(path, lut, known):
    """Read an 8-bit single-channel label PNG and map its values through `lut` -> (H, W) int64.

    lut: (256,) int64, the label to store for every stored value, -1 for values outside the
    dataset's known set; `known` describes that set for the error message. Unknown values are an
    error, never clipped or silently ignored (an unmapped labelIds file would otherwise train on
    nonsense).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise ValueError(f"expected a single-channel 8-bit label image, got mode {img.mode}")
            raw = np.array(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read label image ({e})") from None
    label = lut[raw]
    if (label < 0).any():
        bad = np.unique(raw[label < 0]).tolist()
        raise ValueError(f"{path}: label values {bad[:10]} are outside the known set ({known})")
    return label


def _lut(mapping):
    """{stored value: label} -> (256,) int64 lookup table, -1 for every value not in the mapping."""
    lut = np.full(256, -1, dtype=np.int64)
    for stored, label in mapping.items():
        lut[stored] = label
    return lut


def train_id_lut(num_classes):
    """Labels stored as train ids already: 0..num_classes-1 and 255 (ignore) are the known set."""
    return _lut({**{k: k for k in range(num_classes)}, 255: 255})


def _check_same_size(path_a, shape_a, path_b, shape_b):
    if tuple(shape_a[:2]) != tuple(shape_b[:2]):
        raise ValueError(f"size mismatch: {path_a} is {shape_a[1]}x{shape_a[0]} but {path_b} is "
                         f"{shape_b[1]}x{shape_b[0]} (width x height); they must be the same frame size")


def _to_tensor(image):
    """(H, W, 3) uint8 -> (3, H, W) float32 RGB in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def image_tensor(path):
    """An 8-bit RGB image file -> (3, H, W) float32 RGB in [0, 1] (before `normalize`)."""
    return _to_tensor(read_image(path))


# ---------------------------------------------------------------------------------------------
# Cityscapes: (name, id, trainId, category, colour) for every label, copied from cityscapesScripts'
# helpers/labels.py. Pixels of ids whose trainId is 255 are ignored in training and evaluation.
# ---------------------------------------------------------------------------------------------
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255, "void", (0, 0, 0)),
    ("ego vehicle", 1, 255, "void", (0, 0, 0)),
    ("rectification border", 2, 255, "void", (0, 0, 0)),
    ("out of roi", 3, 255, "void", (0, 0, 0)),
    ("static", 4, 255, "void", (0, 0, 0)),
    ("dynamic", 5, 255, "void", (111, 74, 0)),
    ("ground", 6, 255, "void", (81, 0, 81)),
    ("road", 7, 0, "flat", (128, 64, 128)),
    ("sidewalk", 8, 1, "flat", (244, 35, 232)),
    ("parking", 9, 255, "flat", (250, 170, 160)),
    ("rail track", 10, 255, "flat", (230, 150, 140)),
    ("building", 11, 2, "construction", (70, 70, 70)),
    ("wall", 12, 3, "construction", (102, 102, 156)),
    ("fence", 13, 4, "construction", (190, 153, 153)),
    ("guard rail", 14, 255, "construction", (180, 165, 180)),
    ("bridge", 15, 255, "construction", (150, 100, 100)),
    ("tunnel", 16, 255, "construction", (150, 120, 90)),
    ("pole", 17, 5, "object", (153, 153, 153)),
    ("polegroup", 18, 255, "object", (153, 153, 153)),
    ("traffic light", 19, 6, "object", (250, 170, 30)),
    ("traffic sign", 20, 7, "object", (220, 220, 0)),
    ("vegetation", 21, 8, "nature", (107, 142, 35)),
    ("terrain", 22, 9, "nature", (152, 251, 152)),
    ("sky", 23, 10, "sky", (70, 130, 180)),
    ("person", 24, 11, "human", (220, 20, 60)),
    ("rider", 25, 12, "human", (255, 0, 0)),
    ("car", 26, 13, "vehicle", (0, 0, 142)),
    ("truck", 27, 14, "vehicle", (0, 0, 70)),
    ("bus", 28, 15, "vehicle", (0, 60, 100)),
    ("caravan", 29, 255, "vehicle", (0, 0, 90)),
    ("trailer", 30, 255, "vehicle", (0, 0, 110)),
    ("train", 31, 16, "vehicle", (0, 80, 100)),
    ("motorcycle", 32, 17, "vehicle", (0, 0, 230)),
    ("bicycle", 33, 18, "vehicle", (119, 11, 32)),
    # labels.py gives the license plate id -1 and trainId -1; json2labelImg never draws negative
    # ids, so it cannot occur in a *_labelIds.png and is not in the lookup table below.
    ("license plate", -1, -1, "vehicle", (0, 0, 142)),
)
CITYSCAPES_LABEL_TO_TRAIN = {label_id: train_id for _, label_id, train_id, _, _ in CITYSCAPES_LABELS}
CITYSCAPES_TRAIN = sorted((t, name, cat, colour) for name, _, t, cat, colour in CITYSCAPES_LABELS if 0 <= t < 255)
CITYSCAPES_CLASSES = tuple(name for _, name, _, _ in CITYSCAPES_TRAIN)  # the 19 classes, by train id
CITYSCAPES_PALETTE = tuple(colour for _, _, _, colour in CITYSCAPES_TRAIN)
# "IoU cat": the 7 categories of labels.py (catIds 1..7; catId 0 is void), as indices 0..6 per train id.
CITYSCAPES_CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CITYSCAPES_TRAIN_TO_CATEGORY = tuple(CITYSCAPES_CATEGORIES.index(cat) for _, _, cat, _ in CITYSCAPES_TRAIN)
CITYSCAPES_LABEL_LUT = _lut({i: t for i, t in CITYSCAPES_LABEL_TO_TRAIN.items() if i >= 0})

# ---------------------------------------------------------------------------------------------
# CamVid in the SegNet layout: annotation values 0..10 are the 11 classes, 11 is void.
# ---------------------------------------------------------------------------------------------
CAMVID_CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
                  "pedestrian", "bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_LUT = _lut({**{k: k for k in range(11)}, 11: 255})


# =============================================================================================
# 4. The synthetic world's layout. synthetic.py renders and writes the world (how it moves, what the
# look-alike cars are); the readers below need only its classes, its snippet shape and the marker
# that tells a complete world from an interrupted one.
# =============================================================================================
SYNTH_CLASSES = ("road", "sidewalk", "building", "vegetation", "sky", "car_moving", "car_parked", "person", "bicycle")
SYNTH_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35), (70, 130, 180), (0, 0, 142),
                 (250, 170, 30), (220, 20, 60), (119, 11, 32))
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR_MOVING, CAR_PARKED, PERSON, BICYCLE = range(len(SYNTH_CLASSES))
NUM_CLASSES = {"cityscapes": len(CITYSCAPES_CLASSES), "camvid": len(CAMVID_CLASSES), "synthetic": len(SYNTH_CLASSES)}
SNIPPET_LENGTH = 30  # frames per snippet, as in Cityscapes
LABELLED_INDEX = 19  # the 20th frame carries the gtFine label, as in Cityscapes
SYNTH_DEFAULT_ROOT = "data/synthetic"
SYNTH_FOLDERS = ("leftImg8bit_sequence", "gtFine", "gt_all", "flow_fw", "flow_bw", "occ_fw")

INCOMPLETE_MARKER = "WRITING_INCOMPLETE"


def world_is_incomplete(root):
    """True for a synthetic world whose generation did not finish (make_synthetic_world's marker)."""
    return (Path(root) / INCOMPLETE_MARKER).exists()


# =============================================================================================
# 5. Datasets. Map-style (so DataLoader workers and DistributedSampler work as they are); each
# item is a dict of tensors (see the top of the file), transformed by `transform` (a
# JointTransform) or, without one, only normalised.
# =============================================================================================
Snippet = namedtuple("Snippet", "frames labelled label")  # frame paths in time order, labelled frame's index, its label
CITYSCAPES_NAME = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_(?P<annotation>gtFine|gtCoarse)_"
                             r"(?P<kind>labelIds|labelTrainIds)\.png$")


def _cityscapes_layout(root, split, images="leftImg8bit_sequence", annotation="gtFine"):
    what = "the 30 frames of each snippet" if images == "leftImg8bit_sequence" else "the labelled frames"
    return (f"expected the Cityscapes layout {root}/{annotation}/{split}/CITY/CITY_SEQ_FRAME_{annotation}_labelIds.png "
            f"(or _labelTrainIds.png) and {root}/{images}/{split}/CITY/CITY_SEQ_FRAME_leftImg8bit.png for {what}")


def _listing(folder, layout):
    """The file names in `folder` (one directory read, then set lookups instead of a stat per frame)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} not found: {layout}")
    return set(os.listdir(folder))


def _lister(layout):
    """folder -> its file names, each folder read once: a Cityscapes split looks up some 90,000
    frames in a few dozen city folders."""
    cache = {}

    def names(folder):
        if folder not in cache:
            cache[folder] = _listing(folder, layout)
        return cache[folder]

    return names


def _cityscapes_labelled(root, split, images="leftImg8bit_sequence", annotation="gtFine"):
    """Every labelled frame of a split -> [(city, seq, frame number, label path)], sorted.

    annotation: "gtFine", or "gtCoarse" for the coarse annotations (splits train, val and
    train_extra, the 20,000 extra images). A frame with both *_labelTrainIds.png and
    *_labelIds.png uses the train ids.
    """
    layout = _cityscapes_layout(root, split, images, annotation)
    gt = Path(root) / annotation / split
    if not gt.is_dir():
        raise FileNotFoundError(f"{gt} not found: {layout}")
    found = {}
    for city in sorted(p for p in gt.iterdir() if p.is_dir()):
        for name in sorted(os.listdir(city)):
            m = CITYSCAPES_NAME.match(name)
            if m and m["annotation"] == annotation:
                key = (m["city"], m["seq"], int(m["frame"]))
                if m["kind"] == "labelTrainIds" or key not in found:
                    found[key] = city / name
    if not found:
        raise FileNotFoundError(f"{gt} holds no *_{annotation}_labelIds.png or *_{annotation}_labelTrainIds.png: "
                                f"{layout}")
    return [key + (path,) for key, path in sorted(found.items())]


def _dataset_classes(root):
    """Class names of a Cityscapes-layout root: its classes.json (the synthetic world), else Cityscapes' 19."""
    if world_is_incomplete(root):
        raise FileNotFoundError(f"{root}: an incomplete synthetic world (its generation was interrupted: "
                                f"{INCOMPLETE_MARKER} is there); write it again with "
                                f"`python synthetic.py synth --out {root} --overwrite`")
    path = Path(root) / "classes.json"
    return tuple(json.loads(path.read_text())["names"]) if path.is_file() else CITYSCAPES_CLASSES


def _read_cityscapes_label(path, num_classes):
    """A gtFine or gtCoarse label -> (H, W) int64 train ids: *_labelTrainIds.png as stored,
    *_labelIds.png mapped with the official table (every id whose trainId is 255 becomes 255; in a
    coarse label that is every unannotated pixel, id 0)."""
    if Path(path).name.endswith("_labelTrainIds.png"):
        return read_label(path, train_id_lut(num_classes), f"train ids 0..{num_classes - 1} and 255")
    return read_label(path, CITYSCAPES_LABEL_LUT, "Cityscapes label ids 0..33")


def _cityscapes_snippets(root, split):
    """The 30 frames of every labelled Cityscapes snippet -> [Snippet], checking that they all exist."""
    layout, snippets = _cityscapes_layout(root, split), []
    listing = _lister(layout)
    for city, seq, frame, label in _cityscapes_labelled(root, split):
        folder = root / "leftImg8bit_sequence" / split / city
        names = listing(folder)
        numbers = range(frame - LABELLED_INDEX, frame + SNIPPET_LENGTH - LABELLED_INDEX)
        frames = [folder / f"{city}_{seq}_{n:06d}_leftImg8bit.png" for n in numbers]
        missing = [f for f in frames if f.name not in names]
        if missing:  # (a labelled frame number below 19 leaves negative numbers, which are missing too)
            raise FileNotFoundError(f"{missing[0]} not found: the labelled frame {label.name} is the 20th of the "
                                    f"30 frames {numbers[0]:06d}..{numbers[-1]:06d} ({len(missing)} missing); {layout}")
        snippets.append(Snippet(frames, LABELLED_INDEX, label))
    return snippets


def _labelled_frame(image_path, label_path, label):
    """The sample {image, label} of one frame and its (already read) label, sizes checked."""
    image = read_image(image_path)
    _check_same_size(image_path, image.shape, label_path, label.shape)
    return {"image": _to_tensor(image), "label": torch.from_numpy(label)}


def _finish(sample, transform):
    return transform(sample) if transform is not None else normalize_sample(sample)


def sample_pairs(num_frames, labelled, count, max_gap, rng, with_label_count=None):
    """EFC "Implementation Details": `count` pairs (i, t) of frames I_i, I_{i+t} of one snippet with
    1 <= t <= max_gap, `with_label_count` (default count // 2) of which contain the labelled frame
    (i or i + t == labelled). EFC Table 1's "single pair" and "multiple pairs" rows use 1 of 1 and
    5 of 5.

    Each half is drawn without replacement from its candidates (all pairs that do, or do not,
    contain the labelled frame); when a half asks for more pairs than exist, it cycles through
    fresh random orders of them, and when a snippet has no pair without the labelled frame, the
    other half is drawn from the labelled pairs too. Returns a list of (i, t), labelled pairs first.
    """
    pairs = [(i, t) for t in range(1, max_gap + 1) for i in range(num_frames - t)]
    with_label = [p for p in pairs if labelled in (p[0], p[0] + p[1])]
    without = [p for p in pairs if labelled not in (p[0], p[0] + p[1])] or with_label

    def draw(candidates, k):
        if k == 0:
            return []
        order = np.concatenate([rng.permutation(len(candidates)) for _ in range(-(-k // len(candidates)))])
        return [candidates[j] for j in order[:k]]

    k = count // 2 if with_label_count is None else int(with_label_count)
    if not 0 <= k <= count:
        raise ValueError(f"pairs with the labelled frame ({k}) must be between 0 and the pairs per snippet ({count})")
    return draw(with_label, k) + draw(without, count - k)


class _PairDataset(Dataset):
    """EFC pairs from snippets (Cityscapes, CamVid with video frames). Subclasses set self.snippets
    (a list of Snippet), pairs_per_snippet, max_gap, seed, transform and define _read_label(path).

    Which pairs: drawn by `sample_pairs` from a generator seeded with (seed, epoch, snippet index),
    so an item is a pure function of its index (any worker, any rank draws the same pair) and
    `set_epoch(epoch)` (call it at the start of every epoch, like DistributedSampler.set_epoch)
    draws new pairs. With persistent_workers=True the workers keep the epoch they were started
    with: leave it off, or pairs repeat every epoch.
    """
    epoch = 0
    labelled_pairs = None  # how many of a snippet's pairs contain its labelled frame; None = half
    fixed_labelled = False  # those pairs drawn once for the whole run, not every epoch
    unlabelled_companion = False  # every item: a pair with the labelled frame + one without

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_pair_mode(self, labelled_pairs=None, fixed_labelled=False, unlabelled_companion=False):
        """Which pairs make the items (EFC Table 1; the paper is silent on how often pairs are drawn):
          labelled_pairs        of the pairs_per_snippet pairs, how many contain the labelled frame
                                (None: half, the paper's five of ten);
          fixed_labelled        those are drawn once per run (from (seed, snippet)): TCC_single
                                trains on one fixed pair per snippet, TCC_multi on five; the pairs
                                without the labelled frame are drawn anew every epoch, so every
                                unlabelled frame counts over a long run;
          unlabelled_companion  "+ UD" adds the unlabelled pairs instead of replacing labelled ones:
                                an item is a labelled pair and an unlabelled one, every tensor
                                stacked to (2, ...) (train.py flattens them into the batch), so the
                                labelled exposure per item equals TCC_multi's. Needs
                                pairs_per_snippet = 2 x labelled_pairs.
        """
        k = self.pairs_per_snippet // 2 if labelled_pairs is None else labelled_pairs
        if not 0 <= k <= self.pairs_per_snippet:
            raise ValueError(f"labelled_pairs ({labelled_pairs}) must be between 0 and pairs_per_snippet "
                             f"({self.pairs_per_snippet})")
        if unlabelled_companion and 2 * k != self.pairs_per_snippet:
            raise ValueError(f"an unlabelled companion for every labelled pair needs pairs_per_snippet "
                             f"({self.pairs_per_snippet}) = 2 x labelled_pairs ({k})")
        self.labelled_pairs, self.fixed_labelled, self.unlabelled_companion = k, fixed_labelled, unlabelled_companion

    def __len__(self):
        per_snippet = self.labelled_count() if self.unlabelled_companion else self.pairs_per_snippet
        return len(self.snippets) * per_snippet

    def labelled_count(self):
        return self.pairs_per_snippet // 2 if self.labelled_pairs is None else self.labelled_pairs

    def pairs(self, s):
        """The (i, t) pairs of snippet s in the current epoch, those with the labelled frame first."""
        snippet = self.snippets[s]
        n, k = self.pairs_per_snippet, self.labelled_count()
        rng = np.random.default_rng([self.seed, self.epoch, s])
        if not self.fixed_labelled:
            return sample_pairs(len(snippet.frames), snippet.labelled, n, self.max_gap, rng, k)
        fixed = np.random.default_rng([self.seed, s])  # no epoch: the same pairs all run long
        return (sample_pairs(len(snippet.frames), snippet.labelled, k, self.max_gap, fixed, k)
                + sample_pairs(len(snippet.frames), snippet.labelled, n - k, self.max_gap, rng, 0))

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        if not self.unlabelled_companion:
            s, slot = divmod(index, self.pairs_per_snippet)
            return self._pair(s, *self.pairs(s)[slot])
        s, slot = divmod(index, self.labelled_count())
        pairs = self.pairs(s)
        both = [self._pair(s, *pairs[slot]), self._pair(s, *pairs[self.labelled_count() + slot])]
        return {key: torch.stack([x[key] for x in both]) if torch.is_tensor(both[0][key])
                else torch.tensor([x[key] for x in both]) for key in both[0]}

    def _pair(self, s, i, t):
        """The sample of pair (I_i, I_i+t) of snippet s."""
        snippet = self.snippets[s]
        sample = {"i": i, "t": t}
        for name, k in (("a", i), ("b", i + t)):
            path = snippet.frames[k]
            image = read_image(path)
            if k == snippet.labelled:
                label = self._read_label(snippet.label)
                _check_same_size(path, image.shape, snippet.label, label.shape)
            else:
                label = np.full(image.shape[:2], 255, dtype=np.int64)  # unlabelled: ignored by the loss
            sample[f"image_{name}"] = _to_tensor(image)
            sample[f"label_{name}"] = torch.from_numpy(label)
            sample[f"labelled_{name}"] = torch.tensor(k == snippet.labelled)
        _check_same_size(snippet.frames[i], sample["image_a"].shape[1:], snippet.frames[i + t],
                         sample["image_b"].shape[1:])
        return _finish(sample, self.transform)


class CityscapesPairs(_PairDataset):
    """EFC training pairs from Cityscapes video snippets (EFC "Implementation Details").

    Every gtFine label marks a snippet: the labelled frame is the 20th of the 30 frames
    FRAME-19 .. FRAME+10 in leftImg8bit_sequence (FRAME is not always 000019). Each snippet gives
    `pairs_per_snippet` items (the paper: ten, with t in [1, 5], five containing the labelled frame).
    Items: image_a, image_b (3, H, W) normalised, frame b = I_{i+t}; label_a, label_b (H, W) int64,
    all 255 for an unlabelled frame; labelled_a, labelled_b bool tensors; i (frame a's index in its
    snippet, 0..29) and t. Labels: train ids (num_classes, default: classes.json's count on the
    synthetic world, else 19) or labelIds mapped to train ids.
    """

    def __init__(self, root, split, pairs_per_snippet=10, max_gap=5, transform=None, num_classes=None, seed=0,
                 labelled_pairs=None, fixed_labelled=False, unlabelled_companion=False):
        if pairs_per_snippet < 1 or not 1 <= max_gap < SNIPPET_LENGTH:
            raise ValueError(f"pairs_per_snippet ({pairs_per_snippet}) must be >= 1 and max_gap ({max_gap}) in [1, 29]")
        self.root, self.split, self.transform = Path(root), split, transform
        self.pairs_per_snippet, self.max_gap, self.seed = pairs_per_snippet, max_gap, seed
        self.set_pair_mode(labelled_pairs, fixed_labelled, unlabelled_companion)
        self.classes = _dataset_classes(root)
        self.num_classes = num_classes or len(self.classes)
        self.snippets = _cityscapes_snippets(self.root, split)

    def _read_label(self, path):
        return _read_cityscapes_label(path, self.num_classes)


def flow_path(flow_dir, split, image_path, suffix=".flo"):
    """Where a flow directory keeps the flow of an image: flow_dir/split/CITY/<image name without .png><suffix>
    (e.g. aachen_000000_000019_leftImg8bit.flo). For Flow2Seg the file holds F_t->t-1 of that frame."""
    image_path = Path(image_path)
    return Path(flow_dir) / split / image_path.parent.name / (image_path.stem + suffix)


def labelled_frames_with_previous(root, split):
    """[(labelled frame, previous frame)] image paths of a Cityscapes-layout split: the pairs whose
    flow F_t->t-1 Flow2Seg needs (train.py's --flow-from fills a flow directory with them)."""
    root = Path(root)
    frames = []
    for city, seq, frame, _ in _cityscapes_labelled(root, split):
        folder = root / "leftImg8bit_sequence" / split / city
        frames.append(tuple(folder / f"{city}_{seq}_{n:06d}_leftImg8bit.png" for n in (frame, frame - 1)))
    return frames


class CityscapesFlow2Seg(Dataset):
    """Flow2Seg 4.1: the labelled frame (the 20th), its previous frame (the 19th) and their flow.

    Items: image, image_prev (3, H, W) normalised; label (H, W) int64; flow (2, H, W) = F_t->t-1 on
    the labelled frame's grid (backward_warp(image_prev, flow) ~ image, aligned with label);
    flow_valid (H, W) bool.
    flow_dir mirrors the image names (see `flow_path`): CITY_SEQ_FRAME_leftImg8bit.flo,
    _leftImg8bit_flow.png (KITTI 16-bit) or _leftImg8bit.npy under flow_dir/split/CITY/. Without
    flow_dir, the synthetic world's ground truth root/flow_bw is used (same names). Every flow
    file is looked for when the dataset is built: a missing one is an error naming it.
    """

    def __init__(self, root, split, flow_dir=None, transform=None, num_classes=None):
        self.root, self.split, self.transform = Path(root), split, transform
        self.classes = _dataset_classes(root)
        self.num_classes = num_classes or len(self.classes)
        labelled = _cityscapes_labelled(self.root, split)
        if flow_dir is None:
            if not (self.root / "flow_bw").is_dir():
                raise FileNotFoundError(f"no flow_dir given and {self.root / 'flow_bw'} (the synthetic world's ground "
                                        f"truth) does not exist: pass flow_dir, a folder of F_t->t-1 flows named "
                                        f"FLOW_DIR/{split}/CITY/CITY_SEQ_FRAME_leftImg8bit.flo (or _flow.png, .npy)")
            flow_dir = self.root / "flow_bw"
        layout = _cityscapes_layout(root, split)
        images = _lister(layout)
        flows_in = _lister(f"expected a flow directory {flow_dir}/{split}/CITY/ (see flow_path)")
        self.items = []  # (image, previous image, label, flow) paths
        for city, seq, frame, label in labelled:
            folder = self.root / "leftImg8bit_sequence" / split / city
            names = images(folder)
            image, prev = (folder / f"{city}_{seq}_{n:06d}_leftImg8bit.png" for n in (frame, frame - 1))
            for path in (image, prev):
                if path.name not in names:
                    raise FileNotFoundError(f"{path} not found (Flow2Seg needs the labelled frame and the one "
                                            f"before); {layout}")
            expected = flow_path(flow_dir, split, image)
            flow_names = flows_in(expected.parent)
            flows = [flow_path(flow_dir, split, image, suffix) for suffix in FLOW_SUFFIXES]
            flows = [f for f in flows if f.name in flow_names]
            if not flows:
                raise FileNotFoundError(f"{expected} not found (nor _flow.png, .npy): the flow "
                                        f"F_t->t-1 of {image.name}")
            self.items.append((image, prev, label, flows[0]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_path, prev_path, label_path, flow_file = self.items[index]
        image, prev = read_image(image_path), read_image(prev_path)
        label = _read_cityscapes_label(label_path, self.num_classes)
        flow, valid = read_flow(flow_file)
        _check_same_size(image_path, image.shape, prev_path, prev.shape)
        _check_same_size(image_path, image.shape, label_path, label.shape)
        _check_same_size(image_path, image.shape, flow_file, flow.shape)
        sample = {"image": _to_tensor(image),
                  "image_prev": _to_tensor(prev),
                  "label": torch.from_numpy(label),
                  "flow": torch.from_numpy(flow).permute(2, 0, 1).contiguous(),  # (2, H, W)
                  "flow_valid": torch.from_numpy(valid)}
        return _finish(sample, self.transform)


class CityscapesImages(Dataset):
    """Single labelled frames: leftImg8bit/{split}/CITY/*_leftImg8bit.png with their gtFine labels
    (image-only training of PSPNet / Image2Seg, evaluation). On a tree without leftImg8bit (the
    synthetic world) it falls back to the labelled frames of leftImg8bit_sequence, which are the
    same images. Items: image (3, H, W) normalised, label (H, W) int64.

    coarse_splits: splits whose gtCoarse labels are added to the gtFine ones, e.g. ("train_extra",)
    for the 20,000 coarsely annotated images of EFC Table 3's "PSP CRS" (PSPNet "trained with both
    finely and coarsely annotated data") and of Flow2Seg 4.4 ("we use both coarse and fine data to
    train Image2Seg model"). Neither paper says which coarse splits: train_extra only is our choice,
    since gtCoarse/train holds coarser labels of the very images gtFine/train labels finely.
    """

    def __init__(self, root, split, transform=None, num_classes=None, coarse_splits=()):
        self.root, self.split, self.transform = Path(root), split, transform
        self.classes = _dataset_classes(root)
        self.num_classes = num_classes or len(self.classes)
        folder = "leftImg8bit" if (self.root / "leftImg8bit").is_dir() else "leftImg8bit_sequence"
        self.items = []  # (image, label) paths
        for images_of, annotation in [(split, "gtFine")] + [(s, "gtCoarse") for s in coarse_splits]:
            layout = _cityscapes_layout(root, images_of, folder, annotation)
            listing = _lister(layout)
            for city, seq, frame, label in _cityscapes_labelled(self.root, images_of, folder, annotation):
                image = self.root / folder / images_of / city / f"{city}_{seq}_{frame:06d}_leftImg8bit.png"
                if image.name not in listing(image.parent):
                    raise FileNotFoundError(f"{image} not found, the image of {label}; {layout}")
                self.items.append((image, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_path, label_path = self.items[index]
        label = _read_cityscapes_label(label_path, self.num_classes)
        return _finish(_labelled_frame(image_path, label_path, label), self.transform)


class SyntheticSequence(Dataset):
    """Every consecutive pair of frames of the synthetic world with all its ground truth (evaluation:
    flow EPE, occlusion, temporal consistency of the segmentation).

    Items, for frames a = I_i and b = I_{i+1} of a snippet (i = 0..28): image_a, image_b (3, H, W)
    normalised; label_a, label_b (H, W) int64 (every frame is labelled in gt_all); flow_fw
    (2, H, W) = F_a->b on a's grid, flow_fw_valid; occ_fw (H, W) bool, True where a's pixel is not
    visible in b; flow_bw = F_b->a on b's grid, flow_bw_valid; snippet (index) and i.
    """

    def __init__(self, root, split, transform=None):
        self.root, self.split, self.transform = Path(root), split, transform
        self.classes = _dataset_classes(root)
        self.num_classes = len(self.classes)
        for name in SYNTH_FOLDERS:
            if not (self.root / name / split).is_dir():
                raise FileNotFoundError(f"{self.root / name / split} not found: SyntheticSequence expects a world "
                                        f"written by `python synthetic.py synth` (folders {', '.join(SYNTH_FOLDERS)})")
        # per snippet, the 30 frames as "split/CITY/CITY_SEQ_FRAME": each folder appends its own suffix
        self.snippets = [[f"{split}/{f.parent.name}/{f.name[:-len('_leftImg8bit.png')]}" for f in snippet.frames]
                         for snippet in _cityscapes_snippets(self.root, split)]

    def __len__(self):
        return len(self.snippets) * (SNIPPET_LENGTH - 1)

    def __getitem__(self, index):
        s, i = divmod(index, SNIPPET_LENGTH - 1)
        a, b = self.snippets[s][i], self.snippets[s][i + 1]
        root = self.root
        sample = {"snippet": s, "i": i}
        for name, prefix in (("a", a), ("b", b)):
            image = read_image(root / "leftImg8bit_sequence" / f"{prefix}_leftImg8bit.png")
            sample[f"image_{name}"] = _to_tensor(image)
            sample[f"label_{name}"] = torch.from_numpy(
                _read_cityscapes_label(root / "gt_all" / f"{prefix}_gtFine_labelTrainIds.png", self.num_classes))
        for name, prefix in (("flow_fw", a), ("flow_bw", b)):
            flow, valid = read_kitti_flow(root / name / f"{prefix}_leftImg8bit_flow.png")
            sample[name] = torch.from_numpy(flow).permute(2, 0, 1).contiguous()
            sample[f"{name}_valid"] = torch.from_numpy(valid)
        occ = read_label(root / "occ_fw" / f"{a}_leftImg8bit_occ.png", _lut({0: 0, 255: 1}), "0 and 255")
        sample["occ_fw"] = torch.from_numpy(occ == 1)
        return _finish(sample, self.transform)


class CamVid(_PairDataset):
    """CamVid in the SegNet layout (EFC Table 4): root/{split}/NAME.png with root/{split}annot/NAME.png,
    values 0..10 the 11 classes of CAMVID_CLASSES, 11 = void -> 255.

    Without frames_dir, items are single frames: image, label. With frames_dir, a folder of video
    frames named like the labelled ones with the frame number changed (0001TP_006690.png ->
    0001TP_006689.png, Seq05VD_f00000.png -> Seq05VD_f00001.png, same digit count), items are EFC
    pairs as in CityscapesPairs. CamVid labels every 30th frame; as in Cityscapes, a labelled frame
    is taken as the 20th of the 30 frames NUMBER-19 .. NUMBER+10, cut short where frames_dir has no
    frame (the first labelled frame of a video has no predecessors).
    """

    def __init__(self, root, split, frames_dir=None, pairs_per_frame=10, max_gap=5, transform=None, seed=0):
        root = Path(root)
        self.root, self.split, self.transform = root, split, transform
        self.pairs_per_snippet, self.max_gap, self.seed = pairs_per_frame, max_gap, seed
        self.classes, self.num_classes = CAMVID_CLASSES, len(CAMVID_CLASSES)
        layout = f"expected the SegNet CamVid layout {root}/{split}/NAME.png and {root}/{split}annot/NAME.png"
        images = sorted(n for n in _listing(root / split, layout) if n.endswith(".png"))
        annotations = _listing(root / f"{split}annot", layout)
        if not images:
            raise FileNotFoundError(f"{root / split} holds no .png images: {layout}")
        for name in images:
            if name not in annotations:
                raise FileNotFoundError(f"{root / f'{split}annot' / name} not found, the label of "
                                        f"{root / split / name}; {layout}")
        self.items = [(root / split / n, root / f"{split}annot" / n) for n in images]
        self.frames_dir = None if frames_dir is None else Path(frames_dir)
        self.snippets = []
        if self.frames_dir is not None:
            video = _listing(self.frames_dir, "expected a folder of CamVid video frames named like the labelled ones")
            self.snippets = [_camvid_snippet(image, label, self.frames_dir, video) for image, label in self.items]

    def _read_label(self, path):
        return read_label(path, CAMVID_LUT, "CamVid classes 0..10 and 11 = void")

    def __len__(self):
        return len(self.items) if self.frames_dir is None else super().__len__()

    def __getitem__(self, index):
        if self.frames_dir is not None:
            return super().__getitem__(index)
        image_path, label_path = self.items[index]
        return _finish(_labelled_frame(image_path, label_path, self._read_label(label_path)), self.transform)


def _camvid_snippet(image, label, frames_dir, video):
    """The frames NUMBER-19 .. NUMBER+10 around a labelled CamVid frame, as far as frames_dir (whose
    file names are the set `video`) has them without a gap; the labelled frame is `image` itself."""
    m = re.match(r"^(.*?)(\d+)\.png$", image.name)
    if m is None:
        raise ValueError(f"{image}: no frame number at the end of the name, cannot find its video neighbours")
    stem, digits, n = m[1], m[2], int(m[2])
    window = range(n - LABELLED_INDEX, n + SNIPPET_LENGTH - LABELLED_INDEX)
    names = {k: f"{stem}{k:0{len(digits)}d}.png" for k in window}
    first = n
    while first - 1 in names and names[first - 1] in video:
        first -= 1
    last = n
    while last + 1 in names and names[last + 1] in video:
        last += 1
    if first == last:
        raise FileNotFoundError(f"{frames_dir / names[n + 1]} not found (nor {names[n - 1]}): no video neighbour "
                                f"of {image}")
    frames = [image if k == n else frames_dir / names[k] for k in range(first, last + 1)]
    return Snippet(frames, n - first, label)


class KittiFlow(Dataset):
    """KITTI 2015 optical flow (EFC Tables 2 and 5): root/{split}/image_2/ID_10.png, ID_11.png,
    root/{split}/flow_occ/ID_10.png and flow_noc/ID_10.png.

    mode "flow":      the 200 annotated pairs; items image_a, image_b, flow = F_10->11 (flow_occ),
                      flow_valid (flow_occ's mask), noc_valid (flow_noc's mask: not occluded).
    mode "pairs":     the same image pairs without ground truth (e.g. split="testing"), for
                      unsupervised flow; items image_a, image_b.
    mode "multiview": every consecutive pair ID_kk, ID_kk+1 of the multiview frames 00..20 in
                      image_2, except the pairs touching frames 9-12 (the evaluation pair and its
                      neighbours, as unsupervised-flow papers do); items image_a, image_b.
    Sizes differ (375x1242, 370x1224, 374x1238, 376x1241): with crop=None every item is padded at
    the bottom and right to a multiple of pad_multiple (64: what a 6-level encoder needs; image 0,
    flow invalid), and `size` (a (2,) int64 tensor) holds the original (H, W) to crop predictions
    back; with crop=(h, w) every item is cropped to its central h x w window instead. Padding or
    cropping happens before `transform`.
    """

    def __init__(self, root, split="training", crop=None, mode="flow", pad_multiple=64, transform=None):
        if mode not in ("flow", "pairs", "multiview"):
            raise ValueError(f"KittiFlow mode {mode!r}: expected 'flow', 'pairs' or 'multiview'")
        self.root, self.split, self.mode, self.transform = Path(root), split, mode, transform
        self.crop, self.pad_multiple = crop, pad_multiple
        layout = (f"expected the KITTI 2015 layout {root}/{split}/image_2/ID_10.png, ID_11.png"
                  + (", flow_occ/ID_10.png, flow_noc/ID_10.png" if mode == "flow" else "")
                  + (" and the multiview frames ID_00.png..ID_20.png" if mode == "multiview" else ""))
        folder = self.root / split / "image_2"
        names = _listing(folder, layout)
        self.items = []  # (image a, image b, flow_occ, flow_noc) paths, the last two None without ground truth
        if mode == "multiview":
            for name in sorted(names):
                m = re.match(r"^(\d{6})_(\d{2})\.png$", name)
                if m is None or {int(m[2]), int(m[2]) + 1} & {9, 10, 11, 12}:
                    continue
                following = f"{m[1]}_{int(m[2]) + 1:02d}.png"
                if following in names:
                    self.items.append((folder / name, folder / following, None, None))
        else:
            for name in sorted(n for n in names if re.match(r"^\d{6}_10\.png$", n)):
                second = folder / name.replace("_10.png", "_11.png")
                if second.name not in names:
                    raise FileNotFoundError(f"{second} not found, the second frame of {folder / name}; {layout}")
                flows = (None, None)
                if mode == "flow":
                    flows = tuple(self.root / split / gt / name for gt in ("flow_occ", "flow_noc"))
                    for path in flows:
                        if not path.is_file():
                            raise FileNotFoundError(f"{path} not found, the ground truth of {folder / name}; {layout}")
                self.items.append((folder / name, second) + flows)
        if not self.items:
            raise FileNotFoundError(f"{folder} holds no image pairs for mode {mode!r}: {layout}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        a, b, flow_occ, flow_noc = self.items[index]
        image_a, image_b = read_image(a), read_image(b)
        _check_same_size(a, image_a.shape, b, image_b.shape)
        sample = {"image_a": _to_tensor(image_a),
                  "image_b": _to_tensor(image_b)}
        if flow_occ is not None:
            flow, valid = read_kitti_flow(flow_occ)
            _, noc_valid = read_kitti_flow(flow_noc)
            _check_same_size(a, image_a.shape, flow_occ, flow.shape)
            _check_same_size(a, image_a.shape, flow_noc, noc_valid.shape)
            sample.update(flow=torch.from_numpy(flow).permute(2, 0, 1).contiguous(), flow_valid=torch.from_numpy(valid),
                          noc_valid=torch.from_numpy(noc_valid))
        H, W = image_a.shape[:2]
        if self.crop is not None:
            h, w = self.crop
            if h > H or w > W:
                raise ValueError(f"{a} is {W}x{H}, smaller than the crop {w}x{h} (width x height)")
            sample = crop_sample(sample, (H - h) // 2, (W - w) // 2, h, w)
        elif self.pad_multiple:
            m = self.pad_multiple
            sample = crop_sample(sample, 0, 0, -(-H // m) * m, -(-W // m) * m)
        sample["size"] = torch.tensor([H, W])
        return _finish(sample, self.transform)


# =============================================================================================
# 6. Augmentation: one random draw, applied identically to every image, label, flow and mask of a
# sample. EFC "Implementation Details": random scaling, rotation, flip, colour augmentation, crops of
# 713 x 713; Flow2Seg 4.2: flip, crop, colour jitter, scaling in [0.5, 2], "for both image and
# optical flow input".
# =============================================================================================
def _kind(key, value):
    """What a sample entry is, by dtype and shape: "image", "flow", "label", "mask", or None (passed through)."""
    if not torch.is_tensor(value) or value.dim() < 2:
        return None
    if value.dim() == 3 and value.is_floating_point() and value.shape[0] in (2, 3):
        return "image" if value.shape[0] == 3 else "flow"
    if value.dim() == 2 and value.dtype in (torch.int64, torch.bool):
        return "label" if value.dtype == torch.int64 else "mask"
    raise ValueError(f"sample entry {key!r}: cannot tell what a {tuple(value.shape)} {value.dtype} tensor is (expected "
                     "an image (3, H, W) float, a flow (2, H, W) float, a label (H, W) int64 or a mask (H, W) bool)")


def _size(sample):
    """The common (H, W) of a sample's images, labels, flows and masks."""
    sizes = {key: tuple(value.shape[-2:]) for key, value in sample.items() if _kind(key, value)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"sample entries differ in size (H, W): {sizes}")
    return next(iter(sizes.values()))


def _map_sample(sample, image, label, mask, flow):
    """Apply one function per kind to every entry: image(x), label(x), mask(x, fill), flow(f, valid)
    -> (f, valid). A flow and its "<key>_valid" mask are transformed together; an occlusion mask
    ("occ..." keys) is filled with True (no correspondence) where the transform brings in pixels
    from outside the image, other masks with False."""
    out = dict(sample)
    flows = [key for key, value in sample.items() if _kind(key, value) == "flow"]
    for key, value in sample.items():
        kind = _kind(key, value)
        if kind == "image":
            out[key] = image(value)
        elif kind == "label":
            out[key] = label(value)
        elif kind == "mask" and not (key.endswith("_valid") and key[:-len("_valid")] in flows):
            out[key] = mask(value, key.startswith("occ"))
    for key in flows:
        valid = sample.get(key + "_valid", torch.ones(sample[key].shape[1:], dtype=torch.bool))
        out[key], out[key + "_valid"] = flow(sample[key], valid)
    return out


def _crop_or_pad(x, top, left, h, w, fill):
    """The window [top, top + h) x [left, left + w) of x (..., H, W); parts outside x are `fill`."""
    H, W = x.shape[-2:]
    out = torch.full(x.shape[:-2] + (h, w), fill, dtype=x.dtype)
    y0, y1, x0, x1 = max(top, 0), min(top + h, H), max(left, 0), min(left + w, W)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = x[..., y0:y1, x0:x1]
    return out


def crop_sample(sample, top, left, h, w):
    """Crop every entry to [top, top + h) x [left, left + w); negative offsets or a window larger than
    the image pad: image 0, label 255, flow invalid (value 0), masks as in _map_sample."""
    return _map_sample(
        sample,
        image=lambda x: _crop_or_pad(x, top, left, h, w, 0.0),
        label=lambda x: _crop_or_pad(x, top, left, h, w, 255),
        mask=lambda x, fill: _crop_or_pad(x, top, left, h, w, fill),
        flow=lambda f, valid: (_crop_or_pad(f, top, left, h, w, 0.0), _crop_or_pad(valid, top, left, h, w, False)))


def _resize_sample(sample, size):
    """Resize to size = (H_new, W_new): images bilinear, labels and masks nearest, flows by
    warp.resize_flow (u scaled by W_new / W, v by H_new / H). A resized flow pixel stays valid only
    if every input pixel it interpolates is valid (a sparse flow is not blended with invalid zeros)."""
    def bilinear(x):  # (C, H, W) -> (C, H_new, W_new), align_corners=False: the pixel-area convention of resize_flow
        return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]

    def nearest(x, fill=None):  # "nearest-exact" samples the nearest pixel centre ("nearest" is off by half a pixel)
        return F.interpolate(x[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(x.dtype)

    return _map_sample(sample, image=bilinear, label=nearest, mask=nearest,
                       flow=lambda f, valid: (resize_flow(f[None], size)[0], bilinear(valid[None])[0] > 0.999))


def _rotate_sample(sample, degrees):
    """Rotate every entry by `degrees` about the image centre c.

    Pixel p of the input goes to p' = c + R (p - c), so output pixel p' samples the input at
    p = c + R^T (p' - c) (bilinear for images and flows, nearest for labels and masks, done with
    warp.backward_warp). Both ends of a flow vector turn with the image, so the vectors rotate too:
    F'(p') = R F(p). Pixels brought in from outside the image: image 0, label 255, flow invalid.
    """
    H, W = _size(sample)
    theta = np.deg2rad(degrees)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    grid = pixel_grid(H, W, dtype=torch.float64)  # (2, H, W) x, y
    dx, dy = grid[0] - (W - 1) / 2, grid[1] - (H - 1) / 2
    source = torch.stack([(W - 1) / 2 + cos * dx + sin * dy, (H - 1) / 2 - sin * dx + cos * dy])  # (2, H, W) p
    to_source = (source - grid).float()[None]  # (1, 2, H, W): backward_warp samples at p' + this
    to_nearest = (source.round() - grid).float()[None]  # integer offsets: exact nearest-pixel samples

    def bilinear(x):
        return backward_warp(x[None].float(), to_source)

    def nearest(x, fill):
        value, inside = backward_warp(x[None, None].float(), to_nearest)
        return torch.where(inside[0, 0] > 0, value[0, 0], float(fill)).to(x.dtype)

    def flow(f, valid):
        g, inside = bilinear(f)
        kept, _ = bilinear(valid[None])
        u, v = g[0, 0], g[0, 1]
        return torch.stack([cos * u - sin * v, sin * u + cos * v]), (kept[0, 0] > 0.999) & (inside[0, 0] > 0)

    return _map_sample(sample, image=lambda x: bilinear(x)[0][0], label=lambda x: nearest(x, 255), mask=nearest,
                       flow=flow)


def _flip_sample(sample):
    """Horizontal flip of every entry; a flow's u changes sign."""
    sign = torch.tensor([-1.0, 1.0]).view(2, 1, 1)
    return _map_sample(sample, image=lambda x: x.flip(-1), label=lambda x: x.flip(-1), mask=lambda x, fill: x.flip(-1),
                       flow=lambda f, valid: (f.flip(-1) * sign, valid.flip(-1)))


GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights


def _jitter_sample(sample, brightness, contrast, saturation):
    """Colour jitter with the same parameters on every image of the sample, on [0, 1] RGB.

    x * brightness; then contrast about the mean grey of all the sample's images (one pivot for all
    frames, so that every frame gets the same affine colour map and brightness constancy between
    them survives); then saturation (blend with the pixel's grey); clamp to [0, 1]."""
    grey = torch.tensor(GREY).view(3, 1, 1)
    images = {key: value * brightness for key, value in sample.items() if _kind(key, value) == "image"}
    pivot = torch.stack([(x * grey).sum(0).mean() for x in images.values()]).mean()
    out = dict(sample)
    for key, x in images.items():
        x = (x - pivot) * contrast + pivot
        g = (x * grey).sum(0, keepdim=True)
        out[key] = (g + saturation * (x - g)).clamp(0, 1)
    return out


def _shift_sample(sample, offsets):
    """Add offsets (three numbers, on [0, 1] RGB) to the channels of every image; clamp to [0, 1]."""
    offset = torch.tensor(offsets, dtype=torch.float32).view(3, 1, 1)
    return {key: (value + offset).clamp(0, 1) if _kind(key, value) == "image" else value
            for key, value in sample.items()}


def normalize_sample(sample):
    """ImageNet-normalise every image of a sample (the last step of every dataset)."""
    return {key: normalize(value[None])[0] if _kind(key, value) == "image" else value for key, value in sample.items()}


class JointTransform:
    """Augmentation of a whole sample (both frames, labels, flows, masks) with one random draw.

    In order: colour jitter (images only; factors for brightness, contrast, saturation uniform in
    [1 - j, 1 + j], the same for every frame); scale by s uniform in `scale` (flow values scaled);
    rotation by an angle uniform in [-rotate, rotate] degrees (flow vectors rotated); horizontal
    flip with probability `flip` (True = 0.5; u negated); crop (h, w) at a uniform position,
    padding where the image is smaller (image 0, label 255, flow invalid); normalisation.
    Jitter comes first because it is an affine colour map and so commutes with the resampling;
    applied first, it leaves padded pixels at exactly 0.
    With train=False only a centre crop (if `crop`) and the normalisation are applied.
    `shift` > 0 adds Flow2Seg's colour jitter after the factors: one offset per RGB channel, uniform
    in [-shift, shift] grey levels (of 255), the same for every frame.
    Defaults: scale [0.5, 2] (Flow2Seg 4.2); rotation +-10 degrees and jitter 0.1 are our choices
    (EFC uses both without giving ranges); each paper's own list is `paper_augmentation`.
    pad=False (the networks whose flow learns from photometric losses, see train.training_dataset)
    keeps every crop pixel inside the image: the scale's lower bound rises to the smallest scale at
    which the image covers the crop. With a rotation too, the angle is drawn first, the scale's lower
    bound rises to the smallest scale at which the rotated image holds the crop at that angle
    (`rotated_crop_extent`), and the crop is drawn only where all of it lies inside the rotated image
    (`_rotate_crop_sample`); the flip follows the crop.

    Randomness comes from torch's global generator, which DataLoader seeds differently in each
    worker (see worker_init_fn); every entry of one sample uses the same draw.
    """

    def __init__(self, crop=None, scale=(0.5, 2.0), flip=True, rotate=10.0, jitter=0.1, train=True, pad=True,
                 shift=0.0):
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.scale, self.rotate, self.train, self.pad, self.shift = scale, float(rotate), train, pad, float(shift)
        if not pad and self.rotate and self.crop is None:
            raise ValueError(f"JointTransform: pad=False with rotate={rotate} needs a crop: without one, the "
                             "corners of a rotated frame are padding")
        if not 0 <= self.rotate < 45:
            raise ValueError(f"JointTransform: rotate={rotate} must be in [0, 45) degrees")
        self.flip = 0.5 if flip is True else float(flip)
        self.jitter = (float(jitter),) * 3 if np.isscalar(jitter) else tuple(float(j) for j in jitter)

    def __call__(self, sample):
        sample = dict(sample)
        for key, value in list(sample.items()):  # every flow travels with its validity mask
            if _kind(key, value) == "flow" and key + "_valid" not in sample:
                sample[key + "_valid"] = torch.ones(value.shape[1:], dtype=torch.bool)
        H, W = _size(sample)
        if self.train:
            if any(self.jitter):
                sample = _jitter_sample(sample, *(1 + _uniform(-j, j) for j in self.jitter))
            if self.shift:
                sample = _shift_sample(sample, [_uniform(-self.shift, self.shift) / 255 for _ in range(3)])
            if not self.pad and self.rotate:
                return normalize_sample(self._rotate_inside(sample, H, W))
            if self.scale:
                low, high = self.scale
                if not self.pad and self.crop is not None:  # the smallest scale at which the image covers the crop
                    low = max(low, self.crop[0] / H, self.crop[1] / W)
                s = _uniform(low, max(low, high))
                H, W = max(1, round(H * s)), max(1, round(W * s))
                if not self.pad and self.crop is not None:  # rounding must not leave the crop a pixel short
                    H, W = max(H, self.crop[0]), max(W, self.crop[1])
                sample = _resize_sample(sample, (H, W))
            if self.rotate:
                sample = _rotate_sample(sample, _uniform(-self.rotate, self.rotate))
            if torch.rand(()).item() < self.flip:
                sample = _flip_sample(sample)
        if self.crop is not None:
            h, w = self.crop
            if self.train:  # anywhere the window fits, or anywhere the image fits inside a larger window
                top = int(torch.randint(min(0, H - h), max(0, H - h) + 1, ()))
                left = int(torch.randint(min(0, W - w), max(0, W - w) + 1, ()))
            else:
                top, left = (H - h) // 2, (W - w) // 2
            sample = crop_sample(sample, top, left, h, w)
        return normalize_sample(sample)

    def _rotate_inside(self, sample, H, W):
        """pad=False with a rotation: angle, then scale, then a crop inside the rotated image, then flip."""
        h, w = self.crop
        degrees = _uniform(-self.rotate, self.rotate)
        need_h, need_w = rotated_crop_extent(h, w, degrees)
        low, high = self.scale or (1.0, 1.0)  # no scale range: resized only where the frame cannot hold the crop
        low = max(low, need_h / H, need_w / W)  # the raised floor of this draw's scale
        s = _uniform(low, max(low, high))
        size = max(need_h, round(H * s)), max(need_w, round(W * s))  # rounding must not leave the crop short
        if size != (H, W):
            sample = _resize_sample(sample, size)
        sample = _rotate_crop_sample(sample, degrees, *inscribed_crop(*size, h, w, degrees))
        if torch.rand(()).item() < self.flip:
            sample = _flip_sample(sample)
        return sample


def _uniform(low, high):
    return low + (high - low) * torch.rand(()).item()


def paper_augmentation(method):
    """JointTransform keyword arguments of each paper's augmentation (train.py's --recipe paper).

    EFC "Implementation Details": "We also perform random scaling, rotation, flip and other color
    augmentations for data augmentation", with no ranges. EFC's baseline is the original PSPNet
    (Zhao et al. 2017), trained with scale [0.5, 2] and rotation [-10, 10] degrees: we take those. The colour
    augmentation's range is not given: our jitter of 0.1 (brightness, contrast, saturation). EFC's
    PSPNet baseline and flow branch alone use the same ("All experiments use the same training
    setting", "Ablation Study"). efc and flow learn their flow from photometric losses: pad=False
    keeps black borders out of them, so the crop lies inside the rotated frame (JointTransform).
    Flow2Seg 4.2: "random horizontal flipping, random cropping, random color jittering within the
    range of [-10, 10], and random scaling in the range of [0.5, 2]", on image and flow; no rotation.
    The paper does not say whether the jitter is one offset or one per channel: one per RGB channel
    ("color"), in grey levels of 255, on the images only (a flow has no colour).
    """
    if method == "flow2seg":
        return dict(scale=(0.5, 2.0), rotate=0.0, flip=True, jitter=0.0, shift=10.0, pad=True)
    if method in ("psp", "efc", "flow"):
        return dict(scale=(0.5, 2.0), rotate=10.0, flip=True, jitter=0.1, shift=0.0, pad=method == "psp")
    raise ValueError(f"paper_augmentation: unknown method {method!r}, expected psp, flow2seg, efc or flow")


def quick_augmentation(photometric):
    """JointTransform keyword arguments of the quick recipe: the defaults (scale [0.5, 2], rotation
    +-10 degrees, jitter 0.1, padding), and for a flow that learns from photometric losses no padding
    and no rotation (train.training_dataset explains why; docs/learning.md#choices-measured-on-the-world)."""
    return dict(pad=False, rotate=0.0) if photometric else {}


def rotated_crop_extent(h, w, degrees):
    """The smallest image (H, W), in whole pixels, that holds an h x w crop rotated by `degrees`
    with every crop pixel inside, after rounding the crop's position to whole pixels.

    An axis-aligned window of half-sizes a = (w - 1) / 2, b = (h - 1) / 2 (pixel centres) seen in
    the frame of an image rotated by theta spans |cos| a + |sin| b and |sin| a + |cos| b; rounding
    its position moves it by up to half a pixel in x and y, which costs (|cos| + |sin|) / 2 more on
    each side. So H - 1 >= |sin| (w - 1) + |cos| (h - 1) + |cos| + |sin|, and W likewise.
    """
    cos, sin = abs(np.cos(np.deg2rad(degrees))), abs(np.sin(np.deg2rad(degrees)))
    need_h = 1 + sin * w + cos * h
    need_w = 1 + cos * w + sin * h
    return int(np.ceil(need_h - 1e-9)), int(np.ceil(need_w - 1e-9))


def inscribed_crop(H, W, h, w, degrees):
    """A uniform random position (top, left, h, w) of an h x w crop inside an H x W image rotated by
    `degrees` about its centre (as _rotate_sample turns it), every crop pixel inside the image.

    The crop's centre C, mapped back into the unrotated image, must lie in a rectangle there (of
    half-sizes A, B: the image's half-sizes minus the rotated crop's, see rotated_crop_extent), so
    the largest region of allowed positions is that rectangle rotated: a point g drawn uniformly in
    it gives C = c + R g, c the image centre. Rounding (top, left) to whole pixels stays inside,
    because A and B keep the rounding margin.
    """
    theta = np.deg2rad(degrees)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    a, b, margin = (w - 1) / 2, (h - 1) / 2, (abs(cos) + abs(sin)) / 2
    A = (W - 1) / 2 - abs(cos) * a - abs(sin) * b - margin
    B = (H - 1) / 2 - abs(sin) * a - abs(cos) * b - margin
    if A < -1e-9 or B < -1e-9:  # an image of exactly rotated_crop_extent's size leaves 0, up to rounding
        need_h, need_w = rotated_crop_extent(h, w, degrees)
        raise ValueError(f"a {w}x{h} crop rotated by {degrees:.2f} degrees needs an image of at least "
                         f"{need_w}x{need_h}, got {W}x{H} (width x height)")
    A, B = max(A, 0.0), max(B, 0.0)
    gx, gy = _uniform(-A, A), _uniform(-B, B)
    cx, cy = (W - 1) / 2 + cos * gx - sin * gy, (H - 1) / 2 + sin * gx + cos * gy  # C = c + R g
    return int(round(cy - b)), int(round(cx - a)), h, w


def _sample_at(x, pos, mode):
    """x (C, H, W) sampled at positions pos (2, h, w) (x, y in pixels, inside [0, W-1] x [0, H-1])
    -> (C, h, w): "bilinear" by F.grid_sample (align_corners=True, coordinates normalised by
    max(W - 1, 1)), "nearest" by indexing the nearest pixel (exact, for labels and masks)."""
    H, W = x.shape[-2:]
    if mode == "nearest":
        ix = pos[0].round().long().clamp(0, W - 1)
        iy = pos[1].round().long().clamp(0, H - 1)
        return x[..., iy, ix]
    grid = torch.stack([2 * pos[0] / max(W - 1, 1) - 1, 2 * pos[1] / max(H - 1, 1) - 1], dim=-1)  # (h, w, 2)
    return F.grid_sample(x[None].float(), grid[None].float(), mode="bilinear", align_corners=True)[0]


def _rotate_crop_sample(sample, degrees, top, left, h, w):
    """The window [top, top + h) x [left, left + w) of the sample rotated by `degrees` about its
    image centre (the geometry of _rotate_sample, whose canvas is the input's size), computed for the
    window alone: crop pixel q samples the input at p = c + R^T (q - c), and flow vectors turn with
    the image, F'(q) = R F(p). `inscribed_crop` puts every p inside the image; one that is not (a
    window placed by hand) is an error, never padding."""
    H, W = _size(sample)
    theta = np.deg2rad(degrees)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    q = pixel_grid(h, w, dtype=torch.float64) + torch.tensor([left, top], dtype=torch.float64).view(2, 1, 1)
    dx, dy = q[0] - (W - 1) / 2, q[1] - (H - 1) / 2
    pos = torch.stack([(W - 1) / 2 + cos * dx + sin * dy, (H - 1) / 2 - sin * dx + cos * dy])  # (2, h, w) p
    tolerance = 1e-6  # float64 rounding of the positions, far below a pixel
    outside = ((pos[0] < -tolerance) | (pos[0] > W - 1 + tolerance)
               | (pos[1] < -tolerance) | (pos[1] > H - 1 + tolerance))
    if outside.any():
        raise ValueError(f"_rotate_crop_sample: {int(outside.sum())} pixels of the {w}x{h} window at (left={left}, "
                         f"top={top}) fall outside the {W}x{H} image rotated by {degrees:.2f} degrees")
    pos = torch.stack([pos[0].clamp(0, W - 1), pos[1].clamp(0, H - 1)])  # float rounding only

    def flow(f, valid):
        g = _sample_at(f, pos, "bilinear")
        kept = _sample_at(valid[None].float(), pos, "bilinear")[0] > 0.999  # no blend with an invalid pixel
        return torch.stack([cos * g[0] - sin * g[1], sin * g[0] + cos * g[1]]), kept

    return _map_sample(sample, image=lambda x: _sample_at(x, pos, "bilinear"),
                       label=lambda x: _sample_at(x, pos, "nearest"),
                       mask=lambda x, fill: _sample_at(x, pos, "nearest"), flow=flow)


# =============================================================================================
# 7. Loading helpers and pictures
# =============================================================================================
def one_line_errors(parser):
    """Make an argparse parser report a bad command line in one line (argparse prints the whole
    usage block first); --help still shows everything. Returns the parser."""
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (--help lists the flags)\n")
    return parser


def progress(items, total, what, every=2.0):
    """Yield from `items` (`total` of them); on a loop that lasts longer than `every` seconds, show
    "what: k/total, rate, time left" on stderr: rewritten in place on a terminal, a new line every
    10 `every` seconds in a log file, and a last line with the time taken."""
    stream = sys.stderr
    live = stream.isatty()
    back = "\r" if live else ""
    start = last = time.perf_counter()
    shown = False
    for k, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if k < total and now - last >= (every if live else 10 * every):
            rate = k / (now - start)
            print(f"{back}{what}: {k}/{total}, {rate:.2f}/s, about {(total - k) / rate:.0f} s left",
                  end="" if live else "\n", file=stream, flush=True)
            last, shown = now, True
    if shown:
        print(f"{back}{what}: {total}/{total} in {time.perf_counter() - start:.0f} s" + " " * 20,
              file=stream, flush=True)


def worker_init_fn(worker_id):
    """DataLoader(worker_init_fn=...): DataLoader already seeds torch in each worker with
    base_seed + worker_id (JointTransform draws from it); seed numpy and `random` from the same
    number, so that any numpy randomness differs between workers too and repeats with the seed.
    A terminal's Ctrl-C reaches the workers too: they ignore it and let the training process stop
    (train.stop_on_signals), which ends them. SIGTERM keeps its default: it is how multiprocessing
    ends daemonic workers at exit (ignored, the exit waited for them forever)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _colour_wheel():
    """The Middlebury flow colour wheel (Baker et al. 2011): 55 hues, red -> yellow -> green -> cyan
    -> blue -> magenta -> red, in steps of 15, 6, 4, 11, 13, 6."""
    hues = np.array([(1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 1, 1), (0, 0, 1), (1, 0, 1), (1, 0, 0)], dtype=np.float64)
    wheel = [hues[k] + (hues[k + 1] - hues[k]) * i / n for k, n in enumerate((15, 6, 4, 11, 13, 6)) for i in range(n)]
    return np.array(wheel)  # (55, 3)


def flow_to_color(flow, max_radius=None):
    """Flow (H, W, 2) -> (H, W, 3) uint8 in the Middlebury colour coding: hue = direction (right red,
    down yellow, left cyan, up blue-violet), saturation = |flow| / max_radius (default: the largest
    |flow| of the image), white = no motion; flows longer than max_radius are drawn darker."""
    flow = np.asarray(flow, dtype=np.float64)
    radius = np.hypot(flow[..., 0], flow[..., 1])
    max_radius = max(float(radius.max()) if max_radius is None else float(max_radius), 1e-9)
    radius = radius / max_radius
    wheel = _colour_wheel()
    angle = np.arctan2(-flow[..., 1], -flow[..., 0]) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (len(wheel) - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % len(wheel)
    f = (position - k0)[..., None]
    colour = (1 - f) * wheel[k0] + f * wheel[k1]
    r = radius[..., None]
    colour = np.where(r <= 1, 1 - r * (1 - colour), colour * 0.75)
    return np.rint(colour * 255).astype(np.uint8)


def colorize(label, palette):
    """Label (H, W) ints -> (H, W, 3) uint8 with palette[k] for class k; 255 (ignore) is black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(palette)] = palette
    return table[np.asarray(label)]


