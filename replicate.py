"""Replication: the papers' ablation tables re-run on the synthetic world, reported as measured.

    python replicate.py {efc-table1,efc-table2,flow2seg-table2,flow2seg-table3,all} [--seeds 3] [--quick] [--readme]

Tables (rows = variants; every variant is one `python train.py ...` command, printed as it runs):
  efc-table1       EFC Table 1, segmentation: PSPNet; + TCC_fix (pre-trained flow branch, frozen);
                   + TCC_single; + TCC_single + OM; + TCC_multi + OM; + UD (the full EFC); and a
                   control in neither paper, the full EFC with lambda_cons = 0 (what L_cons adds).
                   Metrics: mIoU, mIoU with the look-alike cars merged, the cars' IoU (moving,
                   parked, merged) and temporal consistency.
  efc-table2       EFC Table 2, flow: UL; UL + OE; UL + TC; UL + OE + TC; EFC full (full-mixed: UL + OE + TC
                   with O_error, on Table 2's pairs, not Table 1's "+ UD" ones); the control on the same pairs.
                   Metrics: EPE all / noc / on car_moving pixels against the exact ground truth, Fl,
                   with three reference rows that need no training: the zero flow, the best constant
                   flow (what a network that ignores its input reaches at best) and the camera-only
                   flow (the camera's motion exactly, none of the cars' own: evaluate.camera_flow).
  flow2seg-table2  Flow2Seg Table 2, the flow path alone, trained alone (train.py --flow2seg-stage
                   flow-path) on the ground-truth flow: ResNet-18 / 50 / 101 with the FCN head;
                   ResNet-18 + ASPP, + DenseASPP, + PSP. Metrics: the flow path's mIoU and its IoU of
                   every class (car_moving and car_parked are identical sprites that differ only in
                   motion); not the fused output, whose image path this stage never trains.
  flow2seg-table3  Flow2Seg Table 3: FCN (image only: the PSPNet without its pyramid pooling);
                   PSPNet (image only); + Flow2Seg started from that PSPNet (--init), on the
                   ground-truth flow, and on the flow of the trained full EFC (the two papers
                   composed); and a control in neither paper, the same Flow2Seg training on zero
                   flow (what the longer training and the fusion buy without any motion).
                   Metrics: Table 1's segmentation columns, the flow path alone's mIoU and its IoU
                   of the two look-alike cars.

One budget for every variant (SETTINGS, its comment says why: the budget at which the mechanisms
showed in the learning runs), seeds 0..N-1 (train.py --seed: initialisation, data order,
augmentation; the world itself is the same). Nothing is tuned per row; the rows that change a
setting say so in VARIANTS (the Flow2Seg rows' crop and learning rate, Table 2's flow backbones, the
control's lambda_cons). Every row starts from the backbone of a PSPNet trained on the world by the
"world" run of the same seed (the papers' ImageNet start, which cannot ship). Three rows build on
other runs too (VARIANTS' dependencies, run first): TCC_fix takes its flow from the UL + OE network,
frozen (EFC's "fixed pre-trained FlowNetS"); both Flow2Seg rows of Table 3 start from the PSPNet run
(Flow2Seg 4.3: "We use weights of PSPNet to initialize our Image2Seg module"; so their image path
has trained twice as long as the PSPNet row's), and the EFC-flow one takes its flows from the full
EFC run. Cost (2-core AMD EPYC, measured; train_seconds in each row's JSON): the full EFC rows about
36 minutes each (every item is a labelled and an unlabelled pair, 4 frames), UL 7 and UL + OE 15, the
PSPNet 9-16, the world row 2, the flow-path rows 3 (ResNet-18), the Flow2Seg rows 5; about 5 hours per
seed for `all`, so a run spans sessions: every finished row is cached (results/runs/) and an interrupted run
resumes; RUN_ORDER puts the rows the papers' claims rest on first, `--only` trains a subset and
`--only-seeds` the seeds it names, `--report` writes the tables from what is cached, marking what is missing.
`--quick` takes minutes.

Evaluation (the same for every row): the synthetic validation world, the consecutive pairs
(I_i, I_i+1) with 16 <= i < 22 of every snippet (60 pairs around the labelled 20th frame; all 290
pairs cost about 3 minutes per run on 2 cores; `--quick` takes 2 snippets). The world labels every
frame (gt_all), so mIoU is taken over the second frame b of every pair, 60 frames, rather than the
10 frames that gtFine labels; Flow2Seg's input for b is F_b->a (ground truth, or the EFC
network's). Temporal consistency and EPE are evaluate.py's (evaluate_consistency, evaluate_flow)
on the same pairs.

Outputs: runs under --runs (default runs/replicate/VARIANT/seedS), one JSON per run under
results/runs/ (the cache: a run whose JSON holds the same settings and the same train.py command is
not trained again; an interrupted run resumes from its checkpoint; a row built on a run trained now
is trained again too), results/TABLE.json (settings, every seed's numbers, mean, sample std and
count) and results/TABLE.md (the markdown table); with `all`, results/goals.json and goals.md (GOALS: the
targets the replication is held to, each met, missed or not run yet); `--readme` also puts the tables
and the goals into docs/replication.md between the markers <!-- replicate:TABLE --> and
<!-- /replicate:TABLE -->. Plain `--quick` writes
under results/quick/ and runs/replicate-quick/, and any other settings (--iterations, --crop,
--eval-snippets) under results/custom-HASH/ and runs/replicate-custom-HASH/, so they never mix with
or overwrite the default run. Checkpoints are deleted once every row of a seed is done
(--keep-checkpoints keeps them); a row whose run it builds on has lost its checkpoint trains that
run again.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import checkpoints
import data
import evaluate
import train
import synthetic

# ---------------------------------------------------------------------------------------------
# Settings shared by every variant: the budget at which the mechanisms showed in the learning runs
# (docs/learning.md), the same for every row unless the row's own settings (VARIANTS) say otherwise.
#  - The start: every row's image backbone is that of a PSPNet trained on the world first (the
#    "world" row, 200 iterations: train.py's world_encoder run), given as --pretrained, so only the
#    backbone carries over, as with the papers' ImageNet start; heads and decoders start from scratch.
#    From a random encoder the correlation cannot match frames (docs/learning.md) and no flow learns.
#  - 400 iterations, of which the unsupervised flow's warm-up takes 200: UL + OE reached 0.59x the
#    zero flow's EPE at 200 and 0.47x at 400 (docs/learning.md); fewer would test nothing.
#  - Whole 128x256 frames, batch 4: on 96x96 crops the encoder's zero padding shrinks the pan that
#    the correlation sees (slope 0.47 against 0.77, docs/learning.md). efc / flow never pad
#    (train.py); the psp rows keep train.py's padded scale and rotation augmentation.
#  - Adam at 1e-4 with poly decay for every row (EFC's quick recipe; EFC's SGD at 0.01 left the flow
#    decoder unable to read its cost volume, docs/learning.md); the flow decoder at the same lr.
#  - lambda_cons 0.01 (config.py's QUICK comment: at the paper's 10 L_cons swamps L_seg on this scale).
#  - Correlation range 4 at stride 1 on the stride-8 features (+-32 image pixels) and pairs up to 2
#    frames apart: the world moves 5-9 px per frame (config.py's QUICK comment).
#  - The Flow2Seg rows train on 96x96 crops at 2e-4 (train.py's Flow2Seg quick recipe): their flow is
#    an input, not a correlation, so the crop's padding does not shrink it, and whole frames would
#    cost 3.6x on the six flow-path rows; 2e-4 because the flow path starts from scratch.
# ---------------------------------------------------------------------------------------------
# eval_window [16, 22]: the pairs (I_i, I_i+1), i = 16..21 (0-based), whose second frames 17..22
# surround the labelled frame I_19 (the 20th); eval_snippets None: every validation snippet (10 in
# the default world: 60 pairs). QUICK keeps everything but the iterations and evaluates 2 snippets.
# world_iterations: the "world" row's (train.WORLD_INIT_ITERATIONS in the default settings).
SETTINGS = {"backbone": "resnet18", "flow_backbone": "resnet18", "crop": [128, 256], "batch": 4,
            "iterations": 400, "flow_warmup": 200, "world_iterations": 200, "optimizer": "adam", "lr": 1e-4,
            "flow_lr_mult": 1.0, "cons_weight": 0.01, "max_displacement": 4, "corr_stride": 1, "max_gap": 2,
            "workers": 1, "eval_window": [16, 22], "eval_snippets": None}
QUICK = {**SETTINGS, "iterations": 20, "flow_warmup": 10, "world_iterations": 10, "eval_snippets": 2}

# Variants: name -> train.py method, its extra flags, the runs of the same seed it builds on, and the
# settings it changes. The runs it builds on are a dict {train.py flag: variant}: the flag gets that
# variant's checkpoint (needed_variants runs it first). Table 2's "UL" and "UL + OE" train the flow
# alone (--method flow: no segmentation, so no L_seg and no L_cons; the encoder stays the world's);
# every row with "TC" needs the segmentation branch, hence --method efc. TCC_fix builds on UL + OE,
# the flow network trained without segmentation, as EFC's "fixed pre-trained FlowNetS" was.
WORLD = {"--pretrained": "world"}  # every row's image backbone: the world-trained PSPNet's
FLOW2SEG = {"crop": [96, 96], "lr": 2e-4}  # the Flow2Seg rows' own settings (see SETTINGS' comment)
ZERO_FLOWS = "zero-flows"  # the folder under --runs with flow2seg-zero's input (write_zero_flows)
VARIANTS = {
    # The start of every row (not a table row): train.py's world_encoder run, a PSPNet from scratch with
    # train.py's quick psp recipe (SGD 0.01, 96x96 crops), world_iterations long.
    "world": ("psp", ["--no-world-init"], {}, {"crop": [96, 96], "optimizer": "sgd", "lr": 0.01}),
    "psp": ("psp", [], WORLD, {}),
    "tcc-fix": ("efc", ["--ablation", "tcc-fix"], {**WORLD, "--flow-init": "ul-oe"}, {}),  # UL + OE's network, fixed
    "tcc-single": ("efc", ["--ablation", "tcc-single"], WORLD, {}),
    "tcc-single-om": ("efc", ["--ablation", "tcc-single-om"], WORLD, {}),
    "tcc-multi-om": ("efc", ["--ablation", "tcc-multi-om"], WORLD, {}),
    "full": ("efc", ["--ablation", "full"], WORLD, {}),
    # A control that is in neither paper: the full EFC with lambda_cons = 0, so that L_seg, the flow
    # losses and the shared encoder stay and only the temporal consistency term goes.
    "full-nocons": ("efc", ["--ablation", "full"], WORLD, {"cons_weight": 0.0}),
    "ul": ("flow", ["--ablation", "ul"], WORLD, {}),
    "ul-oe": ("flow", ["--ablation", "ul-oe"], WORLD, {}),
    "ul-tc": ("efc", ["--ablation", "ul-tc"], WORLD, {}),
    "ul-oe-tc": ("efc", ["--ablation", "ul-oe-tc"], WORLD, {}),
    # Table 2's "EFC full": UL + OE + TC with O_error, on the pairs of the other Table 2 rows (config.ABLATIONS'
    # "mixed"), so that it differs from UL + OE + TC in O_error alone; its control likewise without L_cons.
    "full-mixed": ("efc", ["--ablation", "full-mixed"], WORLD, {}),
    "full-mixed-nocons": ("efc", ["--ablation", "full-mixed"], WORLD, {"cons_weight": 0.0}),
    # Flow2Seg Table 2: the flow path alone, trained alone on the ground-truth flow (L_Flow2Seg only;
    # the image path and the fusion stay frozen at their initialisation and the table does not read them).
    "flowpath-r18": ("flow2seg", ["--flow2seg-stage", "flow-path"], WORLD, FLOW2SEG),
    "flowpath-r50": ("flow2seg", ["--flow2seg-stage", "flow-path"], WORLD, {**FLOW2SEG, "flow_backbone": "resnet50"}),
    "flowpath-r101": ("flow2seg", ["--flow2seg-stage", "flow-path"], WORLD,
                      {**FLOW2SEG, "flow_backbone": "resnet101"}),
    "flowpath-aspp": ("flow2seg", ["--flow2seg-stage", "flow-path", "--flow-context", "aspp"], WORLD, FLOW2SEG),
    "flowpath-denseaspp": ("flow2seg", ["--flow2seg-stage", "flow-path", "--flow-context", "denseaspp"], WORLD,
                           FLOW2SEG),
    "flowpath-psp": ("flow2seg", ["--flow2seg-stage", "flow-path", "--flow-context", "psp"], WORLD, FLOW2SEG),
    # Flow2Seg Table 3: the image-only FCN (the PSPNet without its pyramid), the PSPNet ("psp" above), and
    # Flow2Seg started from that PSPNet (4.3), on the ground-truth flow and on the full EFC run's flow.
    "image-fcn": ("psp", ["--context", "fcn"], WORLD, {}),
    "flow2seg-gt": ("flow2seg", [], {"--init": "psp"}, FLOW2SEG),
    "flow2seg-efc": ("flow2seg", [], {"--init": "psp", "--flow-from": "full"}, FLOW2SEG),
    # A control that is in neither paper: Flow2Seg trained and evaluated exactly as flow2seg-gt, on a flow
    # of zeros. Its image path trains 400 iterations past the PSPNet it starts from and its fusion
    # learns a correction as before, but its input carries no motion: the gap between this row and
    # flow2seg-gt is what the motion itself buys. "{runs}": the --runs folder (train_command).
    "flow2seg-zero": ("flow2seg", ["--flow-dir", "{runs}/" + ZERO_FLOWS], {"--init": "psp"}, FLOW2SEG),
}
# Reference rows of Table 2: no training, one evaluation of a fixed flow (reference_flow_metrics).
REFERENCES = ("zero", "const", "camera")
CARS = ("car_moving", "car_parked")  # the look-alike classes: the same sprites, told apart by motion alone

# Tables: rows (variant, label, the paper's numbers) and columns (metric key, header, format).
# Paper numbers: EFC Table 1 (Cityscapes val mIoU %, PSPNet-R50), EFC Table 2 (KITTI 2015 EPE),
# Flow2Seg Table 2 (flow path alone, FlowNet2 flow) and Table 3 (Cityscapes val mIoU %, ResNet-101 image path).
# Column formats: "pct" a fraction shown x100, "px" pixels (format_value). Labels may name {backbone}
# and {flow_backbone}: row_label fills in the backbones the row really trains (ResNet18 in these
# settings, where the paper's Table 3 has ResNet101); the paper column keeps the paper's rows.
# "cars merged": car_moving and car_parked counted as one class (evaluate.py), the segmentation without
# the part that needs motion; the split columns are the part that does.
SEGMENTATION = [("miou", "mIoU %", "pct"), ("miou_cars_merged", "mIoU cars merged %", "pct"),
                ("iou_car_moving", "IoU car_moving %", "pct"), ("iou_car_parked", "IoU car_parked %", "pct"),
                ("iou_car_merged", "IoU car merged %", "pct")]
TABLES = {
    "efc-table1": {
        "title": "EFC Table 1: segmentation",
        "rows": [("psp", "PSPNet", "76.20"), ("tcc-fix", "+ TCC_fix", "77.02"),
                 ("tcc-single", "+ TCC_single", "77.58"), ("tcc-single-om", "+ TCC_single + OM", "77.79"),
                 ("tcc-multi-om", "+ TCC_multi + OM", "78.07"), ("full", "+ TCC_multi + OM + UD (EFC)", "78.44"),
                 ("full-nocons", "EFC without L_cons (lambda_cons 0; a control)", "-")],
        "columns": SEGMENTATION + [("temporal_consistency", "TC %", "pct")],
        "paper": "mIoU % (Cityscapes val, R50)",
    },
    "efc-table2": {
        "title": "EFC Table 2: optical flow",
        "rows": [("zero", "zero flow (reference)", "-"),
                 ("const", "best constant flow (reference: the geometric median of the true flows)", "-"),
                 ("camera", "camera-only flow (reference: each pair's zoom + translation fitted to the true flow of "
                            "the classes that do not move on their own)", "-"),
                 ("ul", "UL", "11.03 / 7.53"), ("ul-oe", "UL + OE", "8.72 / 7.23"), ("ul-tc", "UL + TC", "8.84 / 4.94"),
                 ("ul-oe-tc", "UL + OE + TC", "7.79 / 4.51"), ("full-mixed", "EFC full", "7.05 / 3.93"),
                 ("full-mixed-nocons", "EFC full without L_cons (a control)", "-")],
        "columns": [("epe_all", "EPE all", "px"), ("epe_noc", "EPE noc", "px"),
                    ("epe_moving", "EPE car_moving", "px"), ("fl_all", "Fl all %", "pct")],
        "paper": "EPE all / noc (KITTI 2015)",
    },
    "flow2seg-table2": {
        "title": "Flow2Seg Table 2: the flow path alone, trained alone on the ground-truth flow",
        "rows": [("flowpath-r18", "{flow_backbone}-FCN", "39.6"), ("flowpath-r50", "{flow_backbone}-FCN", "37.4"),
                 ("flowpath-r101", "{flow_backbone}-FCN", "35.4"), ("flowpath-aspp", "{flow_backbone} + ASPP", "39.4"),
                 ("flowpath-denseaspp", "{flow_backbone} + DenseASPP", "39.3"),
                 ("flowpath-psp", "{flow_backbone} + PSP", "38.2")],
        # A flow-path-stage checkpoint is a flow2seg one: its fused 'miou' is there but means nothing.
        # Every class's IoU: what motion alone tells apart (the static classes share the camera's motion).
        "columns": [("miou_flow_path", "flow path mIoU %", "pct")]
                   + [(f"iou_flow_path_{name}", name, "pct") for name in data.SYNTH_CLASSES],
        "paper": "flow path mIoU % (Cityscapes val, FlowNet2 flow)",
    },
    "flow2seg-table3": {
        "title": "Flow2Seg Table 3: motion for segmentation",
        "rows": [("image-fcn", "{backbone}-FCN (image only)", "75.3 (R101-FCN)"),
                 ("psp", "{backbone} + PSP (PSPNet, image only)", "77.8 (R101 + PSP)"),
                 ("flow2seg-gt", "+ Flow2Seg from that PSPNet, ground-truth flow", "-"),
                 ("flow2seg-efc", "+ Flow2Seg from that PSPNet, flow of the full EFC",
                  "79.7 (R101 + PSP + Flow2Seg, FlowNet2 flow)"),
                 ("flow2seg-zero", "+ Flow2Seg from that PSPNet, zero flow (a control: no motion)", "-")],
        "columns": SEGMENTATION + [("miou_flow_path", "flow path alone mIoU %", "pct"),
                                   ("iou_flow_path_car_moving", "flow path car_moving %", "pct"),
                                   ("iou_flow_path_car_parked", "flow path car_parked %", "pct")],
        "paper": "mIoU % (Cityscapes val)",
    },
}
NAMES = list(TABLES) + ["all"]  # the command line's choices


def needed_variants(tables):
    """The variants of the tables, with the runs they build on first, each once, in run order."""
    order = []

    def add(name):
        if name in REFERENCES or name in order:
            return
        for dependency in VARIANTS[name][2].values():
            add(dependency)
        order.append(name)

    for table in tables:
        for name, _, _ in TABLES[table]["rows"]:
            add(name)
    return order


# The order the variants of a seed train in: the start, then the rows the papers' claims rest on and
# the cheap ones, so that a run cut short (on 2 CPU cores `all` takes hours per seed) has them first.
RUN_ORDER = ["world", "psp", "ul-oe", "ul", "flowpath-r18", "flow2seg-gt", "full", "full-nocons", "image-fcn",
             "tcc-single", "tcc-single-om", "tcc-multi-om", "tcc-fix", "ul-tc", "ul-oe-tc", "full-mixed",
             "full-mixed-nocons", "flow2seg-efc",
             "flow2seg-zero",
             "flowpath-aspp", "flowpath-denseaspp", "flowpath-psp", "flowpath-r50", "flowpath-r101"]


def run_order(names):
    """`names` and the runs they build on, each once, dependencies first, otherwise in RUN_ORDER."""
    order = []

    def add(name):
        if name not in order:
            for dependency in VARIANTS[name][2].values():
                add(dependency)
            order.append(name)

    for name in sorted(set(names), key=RUN_ORDER.index):
        add(name)
    return order


# ---------------------------------------------------------------------------------------------
# Evaluation on every pair of the validation world
# ---------------------------------------------------------------------------------------------
class EvalPairs(Dataset):
    """The evaluated pairs of the validation world, in order: pairs (I_i, I_i+1) with i in
    [window[0], window[1]) of the first `snippets` snippets (None: all). Items are SyntheticSequence's;
    it carries the attributes evaluate.py's loops read from a sequence (root, split, snippets, classes)."""

    def __init__(self, data_root, window, snippets=None):
        self.sequence = data.SyntheticSequence(data_root, "val")
        self.root, self.split, self.snippets = self.sequence.root, self.sequence.split, self.sequence.snippets
        self.classes = self.sequence.classes
        lo, hi = window
        # hi <= 29: pair i needs frame i + 1, and a 30-frame snippet has 29 pairs (i = 0..28).
        if not 0 <= lo < hi <= data.SNIPPET_LENGTH - 1:
            raise ValueError(f"eval window {window}: expected 0 <= start < end <= {data.SNIPPET_LENGTH - 1}")
        count = len(self.snippets) if snippets is None else min(snippets, len(self.snippets))
        # Snippet-major, i ascending: evaluate_consistency compares each pair's frame b with the
        # prediction kept from the previous item, so consecutive pairs of a snippet must follow each other.
        self.pairs = [(s, i) for s in range(count) for i in range(lo, hi)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        s, i = self.pairs[index]
        return self.sequence[s * (data.SNIPPET_LENGTH - 1) + i]  # SyntheticSequence: 29 pairs per snippet

    def frame_paths(self):
        """(frame b, frame a) image paths of every pair: the frames whose F_b->a Flow2Seg reads."""
        # In train.fill_flow_dir's (frame, previous frame) order: it writes F_frame->previous = F_b->a.
        folder = self.root / "leftImg8bit_sequence"
        return [tuple(folder / f"{self.snippets[s][n]}_leftImg8bit.png" for n in (i + 1, i)) for s, i in self.pairs]


class SecondFrames(Dataset):
    """Frame b of every EvalPairs pair as a labelled segmentation item for
    evaluate.evaluate_segmentation: image, label (gt_all) and Flow2Seg's input F_b->a, the
    ground truth (flow_bw) or, with flow_dir, that directory's file for b."""

    def __init__(self, sequence, flow_dir=None):
        self.sequence, self.flow_dir = sequence, flow_dir
        self.classes = sequence.classes

    def __len__(self):
        return len(self.sequence)

    def __getitem__(self, index):
        item = self.sequence[index]
        flow = item["flow_bw"]  # (2, H, W) F_b->a in pixels, exact: Flow2Seg 4.3 feeds F_t->t-1
        if self.flow_dir is not None:
            found = evaluate._synthetic_flow_input(self.sequence, self.flow_dir, item["snippet"], item["i"] + 1)
            if found is None:
                raise FileNotFoundError(f"{self.flow_dir}: no flow for frame {item['i'] + 1} of val snippet "
                                        f"{item['snippet']}")
            flow = found[0]  # (1, 2, H, W) -> (2, H, W): evaluate adds the batch axis itself
        return {"image": item["image_b"], "label": item["label_b"], "flow": flow}


def evaluate_run(checkpoint, sequence, device, flow_dir=None):
    """Every metric of a trained run on the EvalPairs `sequence`: mIoU, pixel accuracy, per-class IoU
    (iou_NAME) and temporal consistency for the segmenting methods; the flow path's miou_flow_path and
    iou_flow_path_NAME for flow2seg; EPE
    and Fl (all, noc) for the networks with a flow branch. flow_dir: Flow2Seg's input flows."""
    net, ckpt = evaluate.load_checkpoint(checkpoint, device)
    net.eval()
    method = ckpt["method"]
    count = len(sequence)
    metrics = {"pairs": count}
    if method != "flow":  # the flow branch alone has no trained segmentation decoder
        frames = SecondFrames(sequence, flow_dir)
        seg = evaluate.evaluate_segmentation(net, method, frames, device)
        metrics.update(miou=seg["miou"], pixel_acc=seg["pixel_acc"], iou=seg["iou"],
                       miou_cars_merged=seg["miou_cars_merged"], iou_car_merged=seg["iou_car_merged"])
        for name, iou in zip(sequence.classes, seg["iou"]):
            metrics[f"iou_{name}"] = iou
        # Consistency of consecutive predictions across the exact F_a->b; the first pair of each
        # snippet's window only supplies the prediction of its frame b.
        metrics.update(evaluate.evaluate_consistency(net, method, sequence, device, max_items=count,
                                                     flow_dir=flow_dir))
        if method == "flow2seg":  # Flow2Seg Table 2 reads the flow path alone: evaluate_segmentation scores it too
            metrics["miou_flow_path"] = seg["miou_flow_path"]
            for name, iou in zip(sequence.classes, seg["iou_flow_path"]):
                metrics[f"iou_flow_path_{name}"] = iou
    if evaluate.has_own_flow(evaluate.config_of(ckpt)):  # F_a->b against the exact flow; 'noc' leaves out occ_fw
        metrics.update(evaluate.evaluate_flow(net, sequence, device, max_items=count))
    return metrics


def reference_flow_metrics(sequence):
    """EPE / Fl of the flows that need no training, on the EvalPairs `sequence`: what a flow network
    must beat. In evaluate_flow's regions: all = flow_fw_valid, noc = those pixels not occluded
    (occ_fw), moving = those labelled car_moving in frame a (the cars' own motion; the rest of a
    frame moves with the camera alone).
      zero    no motion;
      const   the best constant flow under EPE all: the geometric median of every counted true vector
              of these pairs (evaluate.geometric_median), what a network that ignores its input can
              reach at best (a collapsed flow decoder lands here); const_u / const_v give it, in px;
      camera  evaluate.camera_flow of each pair, fitted to its true flow on the valid pixels of the
              classes not in evaluate.OWN_MOTION: the camera's motion exactly and nothing of the cars',
              persons' and bicycles' own (an oracle: it reads the true flow and the labels). A network below it on
              car_moving pixels has learned some of the cars' own motion.
    -> {"zero": metrics, "const": metrics, "camera": metrics}, each with 'pairs' and epe_/fl_ of the
    three regions."""
    items = [sequence[k] for k in range(len(sequence))]
    classes = list(sequence.classes)
    moving_class = classes.index("car_moving")
    own_motion = torch.tensor([classes.index(name) for name in evaluate.OWN_MOTION])
    # (N, 2) every counted true vector of every pair, u first
    truths = torch.cat([item["flow_fw"].permute(1, 2, 0)[item["flow_fw_valid"]] for item in items])
    const = evaluate.geometric_median(truths).float()  # (2,) px

    def constant(vector):
        return lambda gt, item: vector.view(1, 2, 1, 1).expand_as(gt)  # the same vector at every pixel

    def camera(gt, item):
        static = item["flow_fw_valid"][None] & ~torch.isin(item["label_a"][None], own_motion)  # (1, H, W)
        return evaluate.camera_flow(gt, static)

    references = {}
    for name, make_flow in (("zero", constant(torch.zeros(2))), ("const", constant(const)), ("camera", camera)):
        counts = {"all": [], "noc": [], "moving": []}
        for item in items:
            # (1, 2, H, W) and (1, H, W) masks
            gt, valid, occ = item["flow_fw"][None], item["flow_fw_valid"][None], item["occ_fw"][None]
            flow = make_flow(gt, item)
            regions = {"all": valid, "noc": valid & ~occ, "moving": valid & (item["label_a"][None] == moving_class)}
            for region, mask in regions.items():
                counts[region].append(evaluate.flow_error_counts(flow, gt, mask))
        metrics = {"pairs": len(items)}
        for region, rows in counts.items():  # EPE pooled over every counted pixel, as the network rows'
            metrics.update(evaluate.flow_metrics(torch.cat(rows).numpy(), region))
        references[name] = metrics
    references["const"].update(const_u=float(const[0]), const_v=float(const[1]))
    return references


# ---------------------------------------------------------------------------------------------
# Running the variants
# ---------------------------------------------------------------------------------------------
def variant_settings(name, settings):
    """The settings a variant trains with: the shared ones, its own changes on top (VARIANTS), and for
    the "world" row the shared world_iterations."""
    own = {**settings, **VARIANTS[name][3]}
    if name == "world":
        own["iterations"] = settings["world_iterations"]
    return own


def train_command(name, seed, settings, run_dir, runs_root, data_root, device):
    """The train.py argument list of one variant and seed."""
    method, extra, dependencies, _ = VARIANTS[name]
    settings = variant_settings(name, settings)  # the row's own changes win
    args = ["--method", method, "--data-root", str(data_root), "--seed", str(seed), "--out", str(run_dir),
            "--backbone", settings["backbone"], "--flow-backbone", settings["flow_backbone"],
            "--crop", *map(str, settings["crop"]), "--batch", str(settings["batch"]),
            "--iterations", str(settings["iterations"]), "--optimizer", settings["optimizer"],
            "--lr", str(settings["lr"]), "--flow-lr-mult", str(settings["flow_lr_mult"]),
            "--max-displacement", str(settings["max_displacement"]), "--corr-stride", str(settings["corr_stride"]),
            "--max-gap", str(settings["max_gap"]), "--workers", str(settings["workers"]),
            # train.py's own validation only at the end and on a few items: this script evaluates.
            # A checkpoint every quarter of the run (an interrupted run loses at most that);
            # train.py also writes one at the last iteration.
            "--val-every", "0", "--val-items", "5", "--ckpt-every", str(max(50, settings["iterations"] // 4)),
            "--log-every", str(max(1, settings["iterations"] // 20))]
    # The warm-up belongs to the rows whose unsupervised flow trains (train.py refuses it elsewhere);
    # lambda_cons to EFC's rows.
    if method in ("efc", "flow") and name != "tcc-fix":
        args += ["--flow-warmup", str(settings["flow_warmup"])]
    if method == "efc":
        args += ["--cons-weight", str(settings["cons_weight"])]
    # Every row keeps EFC's FlowNet decoder: the tables of docs/replication.md were measured with it,
    # and Table 2 compares UL with UL + TC on the same decoder. The quick recipe's efc and flow now start
    # their decoder as two-level block matching (config.RULES flow-finds-the-moving-cars,
    # docs/moving-cars.md), so these rows say no to it.
    if method in ("efc", "flow"):
        args += ["--corr-layer", "layer3", "--no-match-input", "--no-flow-pass-through", "--fine-match", "0"]
    if method == "efc":  # and every frame's segmentation in one batch, as EFC (the quick recipe's is --seg-batch labelled)
        args += ["--seg-batch", "all"]
    if device:
        args += ["--device", device]
    # The world-trained backbone (--pretrained), TCC_fix's --flow-init (its fixed flow network), Flow2Seg's
    # --init (the PSPNet of its image path) and --flow-from (the network that computes its input flows):
    # each the checkpoint of that run.
    for flag, dependency in dependencies.items():
        args += [flag, str(Path(runs_root) / dependency / f"seed{seed}" / "ckpt.pt")]
    return args + [part.replace("{runs}", str(runs_root)) for part in extra]


def write_zero_flows(out_dir, frames):
    """flow2seg-zero's input: a flow of zeros, (H, W, 2) .flo at each image's own size, for every
    (frame, previous frame) pair of frames ({split: pairs}, named as data.flow_path expects). Written
    every time (a few hundred small files): a folder left by another world cannot hold the wrong size."""
    for split, pairs in frames.items():
        for image, _ in pairs:
            with Image.open(image) as opened:
                width, height = opened.size
            target = data.flow_path(out_dir, split, image)
            target.parent.mkdir(parents=True, exist_ok=True)
            data.write_flo(target, np.zeros((height, width, 2), np.float32))


def cached_result(name, seed, settings, paths, device):
    """The stored result of one variant and seed if it was made with these settings and this train.py
    command (which holds the variant's flags, the data root and the device), else None."""
    result_path = paths["results"] / "runs" / name / f"seed{seed}.json"
    if not result_path.is_file():
        return None
    cached = json.loads(result_path.read_text())
    # The command as this code builds it now, against the stored one: a change of a variant's flags, of
    # the settings or of the data root gives another string, and the stored result no longer counts.
    args = train_command(name, seed, settings, paths["runs"] / name / f"seed{seed}", paths["runs"], paths["data"],
                         device)
    if cached.get("settings") != settings or cached.get("command") != "python train.py " + " ".join(args):
        return None
    return cached


def code_version():
    """The git commit of this checkout (None outside git): written into every result. HEAD only:
    uncommitted edits in the working tree are not recorded."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def run_variant(name, seed, settings, paths, device, log, use_cache=True):
    """Train (or resume) and evaluate one variant and seed, unless its result is cached (and use_cache)
    -> (result dict, whether it was trained now)."""
    result_path = paths["results"] / "runs" / name / f"seed{seed}.json"
    cached = cached_result(name, seed, settings, paths, device) if use_cache else None
    if cached is not None:
        log(f"{name} seed {seed}: cached ({result_path})")
        return cached, False
    run_dir = paths["runs"] / name / f"seed{seed}"
    # The run folder's settings: a checkpoint made with other settings must not be resumed.
    stamp = run_dir / "settings.json"
    if run_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != settings):
        shutil.rmtree(run_dir)  # a run with other settings: start again
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings, indent=1))
    args = train_command(name, seed, settings, run_dir, paths["runs"], paths["data"], device)
    command = "python train.py " + " ".join(args)  # the cache key's command: without --resume
    checkpoint = run_dir / "ckpt.pt"
    finished = resumed = False
    if checkpoint.is_file():  # finished: its training is done (e.g. stopped during evaluation): evaluate only
        finished = checkpoints.read_checkpoint(checkpoint)["iteration"] >= settings["iterations"]
        resumed = not finished
    if "--flow-dir" in VARIANTS[name][1]:  # the zero-flow control's training input (train.py checks every file)
        write_zero_flows(paths["runs"] / ZERO_FLOWS, {split: data.labelled_frames_with_previous(paths["data"], split)
                                                      for split in ("train", "val")})
    t0 = time.time()
    if not finished:
        argv = args + (["--resume", str(checkpoint)] if resumed else ["--overwrite"])  # the folder is this run's
        log(f"{name} seed {seed}: python train.py {' '.join(argv)}")
        # A separate process running exactly the logged command (sys.executable: this interpreter and
        # its packages); its memory is freed when it ends. train.out keeps the output of every attempt.
        with open(run_dir / "train.out", "a") as out:
            code = subprocess.call([sys.executable, str(Path(__file__).with_name("train.py")), *argv],
                                   stdout=out, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"{name} seed {seed}: train.py exited with {code}; see {run_dir / 'train.out'}")
    train_seconds = time.time() - t0
    flow_dir = None
    sequence = EvalPairs(paths["data"], settings["eval_window"], settings["eval_snippets"])
    t1 = time.time()
    flow_source = VARIANTS[name][2].get("--flow-from")
    if "--flow-dir" in VARIANTS[name][1]:  # the zero-flow control's input on every evaluated frame
        flow_dir = paths["runs"] / ZERO_FLOWS
        write_zero_flows(flow_dir, {"val": sequence.frame_paths()})
    if flow_source is not None:
        # Flow2Seg's input on every evaluated frame, from the network that made its training flows.
        flow_dir = run_dir / "val_flows"
        source = paths["runs"] / flow_source / f"seed{seed}" / "ckpt.pt"
        train.fill_flow_dir(source, paths["data"], flow_dir, torch.device(device or "cpu"),
                            frames={"val": sequence.frame_paths()})
    # Evaluation on the CPU unless --device is given (train.py itself picks cuda when available).
    metrics = evaluate_run(checkpoint, sequence, torch.device(device or "cpu"), flow_dir)
    # settings: the shared SETTINGS, the cache key; variant_settings: what this row really trained with.
    result = {"variant": name, "seed": seed, "settings": settings,
              "variant_settings": variant_settings(name, settings), "command": command, "resumed": resumed,
              "code_version": code_version(), "metrics": evaluate.json_safe(metrics),
              "train_seconds": train_seconds, "eval_seconds": time.time() - t1}
    write_json(result_path, result)
    log(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return result, True


def write_json(path, obj):
    """obj as JSON at path, written to a .tmp file and renamed: an interrupted write leaves no
    half-written file that the cache would later read as a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def summarise(values):
    """(mean, sample std (None for one value), n) of the finite values; NaN values (a class absent from
    both ground truth and prediction) are left out, and n says how many were left."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None, 0
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None), len(finite)


def format_value(mean, std, kind, n=None, seeds=None):
    """'41.0 ± 1.4' (pct: x100, 1 digit; px: 3 digits); '(n=2)' where fewer than all seeds had a value."""
    if mean is None:
        return "-"
    scale, digits = (100.0, 1) if kind == "pct" else (1.0, 3)
    text = f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")
    return text + (f" (n={n})" if n is not None and seeds is not None and n < seeds else "")


def row_label(label, settings):
    """A row's label with {backbone} and {flow_backbone} filled in from the settings the row trains
    with ('resnet18' -> 'ResNet18', the papers' spelling): the label names what ran."""
    names = {key: "ResNet" + settings[key].removeprefix("resnet") for key in ("backbone", "flow_backbone")}
    return label.format(**names)


# Settings named in a table's note (key, how it reads), in this order; the rest are in the JSON.
NOTE_SETTINGS = [("iterations", "{} iterations"), ("flow_warmup", "{} of them the flow warm-up where the flow trains"), ("batch", "batch {}"),
                 ("crop", "crop {0[0]}x{0[1]}"), ("backbone", "{}"), ("optimizer", "{}"), ("lr", "lr {}"),
                 ("cons_weight", "lambda_cons {}")]


def table_note(table, settings, seeds, pairs):
    """The sentence above a table: the seeds, the settings its rows train with (a value that only some
    rows change is given with those rows' labels), the start every row shares and the evaluated pairs."""
    spec = TABLES[table]
    rows = [(name, label) for name, label, _ in spec["rows"] if name not in REFERENCES]
    methods = {VARIANTS[name][0] for name, _ in rows}
    parts = []
    for key, text in NOTE_SETTINGS:
        if key == "flow_warmup" and not methods & {"efc", "flow"} or key == "cons_weight" and "efc" not in methods:
            continue  # the warm-up trains efc / flow only; lambda_cons is EFC's
        values = [variant_settings(name, settings)[key] for name, _ in rows]
        common = max(values, key=values.count)  # the value most rows train with
        others = [f"{row_label(label, variant_settings(name, settings))}: {text.format(value)}"
                  for (name, label), value in zip(rows, values) if value != common]
        parts.append(text.format(common) + (f" ({'; '.join(others)})" if others else ""))
    n = len(seeds)
    return (f"{spec['title']}. Mean ± sample std over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}); "
            f"{', '.join(parts)}; every row's backbone from a PSPNet trained {settings['world_iterations']} "
            f"iterations on the world; {pairs} validation pairs.")


def table_report(table, results, references, settings, seeds):
    """The JSON report and the markdown table of one table from the per-run results, {(variant, seed):
    result}, and the reference_flow_metrics. A row has the seeds that results holds for it: a cell
    over fewer than `seeds` shows (n=...), a row with none is marked not run yet."""
    spec = TABLES[table]
    rows = []
    for name, template, paper in spec["rows"]:
        reference = name in REFERENCES
        label = row_label(template, settings if reference else variant_settings(name, settings))
        # A reference flow does not depend on the seed: one evaluation, no spread.
        per_seed = {"any": references[name]} if reference else \
            {seed: results[(name, seed)]["metrics"] for seed in seeds if (name, seed) in results}
        stats = {}
        for key, _, _ in spec["columns"]:
            mean, std, n = summarise([m.get(key) for m in per_seed.values()])
            stats[key] = {"mean": mean, "std": std, "n": n}
        first = next((results[(name, seed)] for seed in seeds if (name, seed) in results), None)
        # "command": the first seed's; the other seeds' differ only in --seed and --out.
        rows.append({"variant": name, "label": label, "paper": paper, "per_seed": per_seed, "stats": stats,
                     "seeds": [] if reference else sorted(per_seed),
                     "settings_changed": {} if reference else VARIANTS[name][3],
                     "command": None if reference or first is None else first["command"]})
    header = ["variant"] + [h for _, h, _ in spec["columns"]] + [f"paper: {spec['paper']}"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(spec["columns"]) + " ---: |"]
    for row in rows:
        reference = row["variant"] in REFERENCES
        count = 1 if reference else len(seeds)  # a cell over fewer values shows (n=...)
        cells = [format_value(row["stats"][k]["mean"], row["stats"][k]["std"], kind, row["stats"][k]["n"], count)
                 for k, _, kind in spec["columns"]]
        label = row["label"] + ("" if reference or row["per_seed"] else " (not run yet)")
        lines.append("| " + " | ".join([label] + cells + [row["paper"]]) + " |")
    markdown = table_note(table, settings, seeds, references["zero"]["pairs"]) + "\n\n" + "\n".join(lines) + "\n"
    report = {"table": table, "title": spec["title"], "settings": settings, "seeds": list(seeds), "rows": rows,
              "markdown": markdown}
    return report, markdown


# The goals the replication is held to (issue #19, as on the learning issue), each checked on the
# tables' means: (goal, check), where check(mean) -> (what was measured, met?) and mean(table,
# variant, metric) is that row's mean; it raises LookupError for a row with no seed yet, whose goal
# then reads "not run yet".
def _ratio_goal(variant, reference, factor):
    def check(mean):
        value, base = mean("efc-table2", variant, "epe_all"), mean("efc-table2", reference, "epe_all")
        name = {"zero": "zero flow", "const": "best constant flow"}[reference]
        return f"{value:.3f} px = {value / base:.3f}x the {name}'s {base:.3f} px", value <= factor * base
    return check


def _full_flow_check(mean):
    full, ul = mean("efc-table2", "full-mixed", "epe_all"), mean("efc-table2", "ul", "epe_all")
    return f"full EFC {full:.3f} px, UL {ul:.3f} px", full <= ul


def _full_miou_check(mean):
    full, psp = mean("efc-table1", "full", "miou"), mean("efc-table1", "psp", "miou")
    return f"full EFC {100 * full:.2f} %, PSPNet {100 * psp:.2f} %", full >= psp  # 2 digits: they can be close


def _cars_check(mean):
    ious = [mean("flow2seg-table3", "flow2seg-gt", f"iou_{car}") for car in CARS]
    return " / ".join(f"{car} {100 * iou:.1f} %" for car, iou in zip(CARS, ious)), min(ious) >= 0.5


def _cars_gain_check(mean):
    def cars(variant):
        return statistics.fmean(mean("flow2seg-table3", variant, f"iou_{car}") for car in CARS)
    gain = 100 * (cars("flow2seg-gt") - cars("psp"))
    return (f"Flow2Seg {100 * cars('flow2seg-gt'):.1f} %, PSPNet {100 * cars('psp'):.1f} %: "
            f"{gain:+.1f} points"), gain >= 15


GOALS = [("UL's flow: EPE all <= 0.5x the zero flow's", _ratio_goal("ul", "zero", 0.5)),
         ("UL's flow: EPE all <= 0.7x the best constant flow's", _ratio_goal("ul", "const", 0.7)),
         ("the full EFC's flow no worse than UL's (EPE all)", _full_flow_check),
         ("the full EFC's mIoU not below the PSPNet's", _full_miou_check),
         ("Flow2Seg on the ground-truth flow: >= 50 % IoU on car_moving and on car_parked", _cars_check),
         ("Flow2Seg on the ground-truth flow: the two cars' mean IoU >= 15 points above the PSPNet's",
          _cars_gain_check)]


def goals_report(reports):
    """The GOALS checked on the table reports {table: report} -> (list of {goal, measured, status},
    markdown). status: "met", "missed", or "not run yet" where a row it reads has no mean."""
    def mean(table, variant, key):
        row = next(r for r in reports[table]["rows"] if r["variant"] == variant)
        value = row["stats"].get(key, {}).get("mean")
        if value is None:
            raise LookupError(variant)
        return value

    goals = []
    for goal, check in GOALS:
        try:
            measured, met = check(mean)
            goals.append({"goal": goal, "measured": measured, "status": "met" if met else "missed"})
        except LookupError as missing:
            goals.append({"goal": goal, "measured": f"{missing} not run yet", "status": "not run yet"})
    seeds = reports["efc-table1"]["seeds"]
    lines = [f"Goals, on the means over the seeds each row has (of {', '.join(map(str, seeds))}):", "",
             "| goal | measured | status |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['measured']} | {g['status']} |" for g in goals]
    return goals, "\n".join(lines) + "\n"


def update_readme(readme, table, markdown):
    """Replace the block between <!-- replicate:TABLE --> and <!-- /replicate:TABLE --> in the README."""
    text = Path(readme).read_text()
    start, end = f"<!-- replicate:{table} -->", f"<!-- /replicate:{table} -->"
    if start not in text or end not in text:
        raise SystemExit(f"--readme {readme}: no '{start}' ... '{end}' markers to put the table between")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    Path(readme).write_text(before + start + "\n" + markdown + end + after)


def default_folders(settings):
    """(results, runs) folders of a settings dict: the default's, plain --quick's, or one pair per other
    settings (a short hash of them), so that a run at other settings never overwrites these results."""
    if settings == SETTINGS:
        return Path("results"), Path("runs/replicate")
    if settings == QUICK:
        return Path("results/quick"), Path("runs/replicate-quick")
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(f"results/custom-{tag}"), Path(f"runs/replicate-custom-{tag}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=NAMES, help="which table to run ('all': the four)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['iterations']} iterations, {QUICK['eval_snippets']} "
                                                        "validation snippets: minutes, a check that everything runs")
    p.add_argument("--iterations", type=int, help="override the iterations of every variant")
    p.add_argument("--eval-snippets", type=int, help="override the number of validation snippets evaluated (default all)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="override the training crop")
    p.add_argument("--data-root", default=data.SYNTH_DEFAULT_ROOT, help="the synthetic world (written if missing)")
    p.add_argument("--results", help="results folder (default: results; results/quick with plain --quick; "
                                      "results/custom-HASH for any other settings)")
    p.add_argument("--runs", help="run folders (default: runs/replicate, runs/replicate-quick, or "
                                   "runs/replicate-custom-HASH, as --results)")
    p.add_argument("--device", help="cpu or cuda (train.py's default: cuda if available); part of the cache key")
    p.add_argument("--only", metavar="VARIANTS", type=lambda text: text.split(","),
                   help="train only these variants (comma-separated names of VARIANTS) and the runs they build "
                        "on; the tables take the other rows from the cache where it has them")
    p.add_argument("--only-seeds", metavar="SEEDS", type=lambda text: [int(s) for s in text.split(",")],
                   help="train only these seeds (comma-separated, each of 0..N-1); the tables take the other "
                        "seeds from the cache where it has them")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write the tables from the cached results (a row without them is marked "
                        "not run yet, a cell over fewer seeds shows n)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every run's checkpoint (default: deleted once all rows of a seed are done; a row "
                        "built on a deleted one trains that run again)")
    p.add_argument("--readme", metavar="FILE", nargs="?", const="docs/replication.md",
                   help="put the tables into this file between its replicate markers (default file "
                        "docs/replication.md)")
    args = data.one_line_errors(p).parse_args(argv)
    unknown = [name for name in args.only or [] if name not in VARIANTS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: not a variant (expected some of {', '.join(RUN_ORDER)})")
    if args.only and args.report:
        p.error("--only trains, --report trains nothing: give one of them")
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: need at least 1")
    outside = [seed for seed in args.only_seeds or [] if not 0 <= seed < args.seeds]
    if outside:
        p.error(f"--only-seeds {','.join(map(str, outside))}: not among the seeds 0..{args.seeds - 1} of --seeds")
    if args.only_seeds and args.report:
        p.error("--only-seeds trains, --report trains nothing: give one of them")
    for flag in ("iterations", "eval_snippets"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} {value}: need at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else SETTINGS)
    # Overrides change the settings dict itself, so they change the cache key and (default_folders)
    # the output folders.
    for key in ("iterations", "eval_snippets", "crop"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    tables = list(TABLES) if args.table == "all" else [args.table]
    results_folder, runs_folder = default_folders(settings)
    paths = {"results": Path(args.results or results_folder), "runs": Path(args.runs or runs_folder),
             "data": Path(args.data_root)}
    if not paths["data"].is_dir():
        print(f"writing the synthetic world to {paths['data']} ...", flush=True)
        synthetic.make_synthetic_world(paths["data"])
    seeds = list(range(args.seeds))
    needed = needed_variants(tables)  # every row of the tables and the runs they build on
    order = [] if args.report else run_order(args.only or needed)  # what this invocation may train
    log_file = paths["results"] / "replicate.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(message):
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    trained_seeds = seeds if args.only_seeds is None else sorted(set(args.only_seeds))
    log(f"replicate {args.table}: variants {', '.join(order) or 'none (--report)'}; seeds {seeds} "
        f"(training {trained_seeds}); "
        f"settings {settings}")
    results, t0 = {}, time.time()
    # Seed by seed, so that an interrupted run has whole tables for the first seeds.
    def checkpoint(name, seed):
        return paths["runs"] / name / f"seed{seed}" / "ckpt.pt"

    def restore(name, seed, trained):
        """Train `name` again for a row that builds on it: its checkpoint is gone (deleted once a seed was
        done, or a new checkout); first the runs it builds on itself, where theirs are gone too."""
        for dependency in VARIANTS[name][2].values():
            if not checkpoint(dependency, seed).is_file():
                restore(dependency, seed, trained)
        results[(name, seed)], _ = run_variant(name, seed, settings, paths, args.device, log, use_cache=False)
        trained.add(name)

    for seed in seeds:
        trained = set()  # variants trained now: the rows built on them are not taken from the cache
        # A seed outside --only-seeds trains nothing: its rows come from the cache below.
        for name in order if args.only_seeds is None or seed in args.only_seeds else []:  # dependencies first
            dependencies = list(VARIANTS[name][2].values())
            use_cache = not trained.intersection(dependencies)  # a row built on a run trained in this pass: not cached
            # A row not taken from the cache needs its dependencies' checkpoints, which an earlier, completed
            # pass over this seed may have deleted: each missing one is trained again, and the row after them.
            if dependencies and not (use_cache and cached_result(name, seed, settings, paths, args.device)):
                for dependency in dependencies:
                    if not checkpoint(dependency, seed).is_file():
                        log(f"{name} seed {seed} builds on {dependency}, whose checkpoint is gone: training it again")
                        restore(dependency, seed, trained)
                        use_cache = False
            results[(name, seed)], now = run_variant(name, seed, settings, paths, args.device, log, use_cache)
            if now:
                trained.add(name)
        # The rows this invocation did not train: from the cache, where it has them.
        for name in needed:
            if (name, seed) not in results:
                cached = cached_result(name, seed, settings, paths, args.device)
                if cached is not None:
                    results[(name, seed)] = cached
        # Every row of this seed done: its checkpoints are no longer needed (a later row would train them again).
        if not args.keep_checkpoints and all((name, seed) in results for name in needed):
            for name in needed:
                for path in (checkpoint(name, seed), checkpoint(name, seed).with_name("best.pt")):
                    path.unlink(missing_ok=True)
    # The reference flows need no training and no seed: evaluated once, after the runs.
    references = reference_flow_metrics(EvalPairs(paths["data"], settings["eval_window"], settings["eval_snippets"]))
    reports = {}
    for table in tables:
        report, markdown = table_report(table, results, references, settings, seeds)
        write_json(paths["results"] / f"{table}.json", evaluate.json_safe(report))  # NaN -> null
        (paths["results"] / f"{table}.md").write_text(markdown)
        if args.readme:
            update_readme(args.readme, table, markdown)
        print("\n" + markdown)
        reports[table] = report
    if all(table in reports for table in ("efc-table1", "efc-table2", "flow2seg-table3")):
        goals, markdown = goals_report(reports)
        write_json(paths["results"] / "goals.json", {"settings": settings, "seeds": seeds, "goals": goals})
        (paths["results"] / "goals.md").write_text(markdown)
        if args.readme:
            update_readme(args.readme, "goals", markdown)
        print("\n" + markdown)
    log(f"done in {(time.time() - t0) / 60:.1f} min; tables in {paths['results']}")


if __name__ == "__main__":
    main()
