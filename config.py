"""The settings of a train.py run: the two recipes, EFC's ablation rows, the command line, and the
one resolved configuration a run uses, with where each of its values came from.

    args = config.parse_args(argv)   # an argparse.Namespace holding every setting; args.sources says whence
    print(config.describe(args))     # train.py prints this at the start of every run

A value comes from the first of these layers that sets it, read from the bottom up:
  default     the parser's own default of a flag no recipe sets (--seed 0, --context psp, ...)
  recipe      QUICK ("quick": the synthetic world on a CPU in minutes, the optimiser from OPTIMIZER)
              or, with --recipe paper, each paper's published setting:
                EFC "Implementation Details" (PAPER_EFC): SGD, momentum 0.9, weight decay 1e-4, base lr
                  0.01, poly power 0.9, crop 713, batch 16, 120K iterations, ten pairs per snippet (five
                  with the labelled frame), t in [1, 5], the loss weights of eq. (9); the PSPNet baseline
                  and the flow branch alone use the same setting ("All experiments use the same training
                  setting", EFC "Ablation Study");
                Flow2Seg 4.2 (PAPER_FLOW2SEG): Adam, lr 2e-5, weight decay 1e-4, poly power 0.9, crop 832,
                  batch 8, 100K iterations; the two paths trained separately, then jointly with the fusion
                  module (--flow2seg-stage, --init, --freeze);
  rule        RULES: a setting a recipe gives one method or dataset only, named, with its reason
  flag        the command line; an explicit flag always wins over the three above
  checkpoint  --resume: every setting of the run being resumed (resume_settings), except RESUME_FREE's
  derived     a value that follows from the others (--data-root's default, --out's, the pair mode)
--recipe paper starts only from given weights (--pretrained, --pretrained-flow or --init; --from-scratch
says otherwise) and only on a named --dataset. Where it keeps a setting of ours that is not in the
papers, and the switch that restores the paper's value: docs/choices.md#the-paper-recipe-against-the-papers.
"""
import argparse
import os
import sys
from typing import Callable, NamedTuple

import checkpoints
import data
import kitti_raw
import losses
import synthetic
from model import CORR_LAYERS, COST_VOLUMES, FLOW_CONTEXTS, METHODS

# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------
# Quick: the correlation reaches +-4 cells at stride 1 of the stride-8 features (+-32 image pixels,
# 81 channels; EFC's +-20 cells at stride 2 is +-160 pixels, wider than a whole 128x256 frame), and
# pairs are at most 2 frames apart, because the world moves 5-9 px per frame (synthetic.py), 3-5x more
# than Cityscapes does at this scale: t = 5 would move the background by up to 45 px. Loss weights
# other than lambda_cons, weight decay and the loss switches are the paper recipe's.
QUICK = {"dataset": "synthetic", "backbone": "resnet18", "flow_backbone": "resnet18", "crop": [96, 96], "batch": 4,
         "iterations": 200, "pairs_per_snippet": 10, "workers": 1, "val_every": 100, "val_items": 60,
         "log_every": 10, "ckpt_every": 100, "max_displacement": 4, "corr_stride": 1, "max_gap": 2,
         "weight_decay": 1e-4, "clip_grad": 0.0, "freeze": "", "flow_warmup": 100, "flow_lr_mult": 1.0,
         "cons_weight": 0.01, "occ_weight": losses.EFC_WEIGHTS["occ"], "sm_weight": losses.EFC_WEIGHTS["sm"],
         "edge_weight": losses.EDGE_WEIGHT, "full_res_scale": True, "detach_occ_in_cons": True,
         "loss_reduction": "mean", "corr_layer": "layer3", "match_input": False, "pass_through": False,
         "fine_match": 0, "cost_volume": "cosine", "coarse": False, "seg_batch": "labelled"}
QUICK_FLOW_ITERATIONS = 200  # the quick recipe's efc and flow on the synthetic world (RULES' flow-budget)
# The paper recipe's values that are not in the paper (flow_lr_mult 0.1, edge_weight 150, means, O_est
# detached in L_cons, and clip-flow-decoder below): the table of docs/choices.md, with each switch.
PAPER_EFC = {"backbone": "resnet101", "flow_backbone": "resnet18", "optimizer": "sgd", "lr": 0.01,
             "weight_decay": 1e-4, "crop": [713, 713], "batch": 16, "iterations": 120_000,
             "pairs_per_snippet": 10, "workers": 8, "val_every": 5000, "val_items": None, "log_every": 50,
             "ckpt_every": 2000, "max_displacement": 20, "corr_stride": 2, "max_gap": 5, "clip_grad": 0.0,
             "freeze": "", "flow_warmup": 0, "flow_lr_mult": 0.1, "cons_weight": losses.EFC_WEIGHTS["cons"],
             "occ_weight": losses.EFC_WEIGHTS["occ"], "sm_weight": losses.EFC_WEIGHTS["sm"],
             "edge_weight": losses.EDGE_WEIGHT, "full_res_scale": False, "detach_occ_in_cons": True,
             "loss_reduction": "mean", "corr_layer": "layer3", "match_input": False, "pass_through": False,
             "fine_match": 0, "cost_volume": "cosine", "coarse": False, "seg_batch": "all"}
PAPER_FLOW2SEG = {**PAPER_EFC, "optimizer": "adam", "lr": 2e-5, "crop": [832, 832], "batch": 8,
                  "iterations": 100_000}
OPTIMIZER = {  # quick recipe: the papers' optimisers
    "psp": ("sgd", 0.01), "efc": ("adam", 1e-4), "flow": ("adam", 1e-4), "flow2seg": ("adam", 2e-5 * 10),
}
# Where the quick recipe leaves the papers' values, and why (the measurements:
# docs/learning.md#choices-measured-on-the-world):
#   lambda_cons 0.01, not 10: at 10, L_cons's gradient on a small encoder is 15-45x L_seg's, and it
#       ties features through a flow still half a feature cell off;
#   Adam 1e-4 for efc and flow, the flow decoder at the full lr: with EFC's SGD the warm-up does not
#       teach the decoder to read its cost volume within the budget;
#   Flow2Seg 2e-4, not 2e-5: 2e-5 is a fine-tuning rate for ImageNet starts, and learns little here.


def trains_flow(args):
    """Whether the run's unsupervised flow trains: efc and flow, but not the supervised diagnostic and
    not TCC_fix (its flow is a frozen, already trained network)."""
    return args.method in ("efc", "flow") and not args.flow_supervised and args.ablation != "tcc-fix"


def quick_flow_on_world(args):
    return args.recipe == "quick" and args.method in ("efc", "flow") and args.dataset == "synthetic"


class Rule(NamedTuple):
    """A setting a recipe gives some runs only: where `applies(args)`, `values(args)` replaces the
    recipe's values (an explicit flag still wins)."""
    name: str
    applies: Callable
    values: Callable
    reason: str


RULES = [
    Rule("flow-alone-freezes-encoder", lambda a: a.recipe == "quick" and a.method == "flow",
         lambda a: {"freeze": "seg"},
         "with no L_seg to hold it, L_pm moves the features the correlation matches, and the flow drifts after "
         "the warm-up (docs/learning.md#choices-measured-on-the-world)"),
    Rule("whole-frames", quick_flow_on_world, lambda a: {"crop": list(synthetic.FRAME_SIZE)},
         "a 96x96 crop is 12x12 stride-8 cells, most within reach of the encoder's zero padding, which looks "
         "alike in both frames and so votes for zero motion"),
    Rule("flow-budget", quick_flow_on_world,
         lambda a: {"iterations": QUICK_FLOW_ITERATIONS, "flow_warmup": QUICK_FLOW_ITERATIONS // 2},
         "the budget whose numbers the README and docs/ report: with the decoder that starts as block matching "
         "(flow-finds-the-moving-cars) the warm-up reaches in 100 iterations what it reached in 200 (EPE 3.04 and "
         "3.01 px, moving cars 5.21 and 5.12 px, UL + OE), L_pm then as many (docs/moving-cars.md)"),
    Rule("flow-finds-the-moving-cars", quick_flow_on_world,
         lambda a: {"corr_layer": "layer2+3", "match_input": True, "pass_through": True, "fine_match": 2},
         "the decoder starts as two-level block matching (stride 8 on layers 2+3, stride 4 on layer1) and learns "
         "corrections: the moving cars at 0.46-0.47x the camera-only flow's error, not 0.94x, at the same EPE "
         "over the frame, in UL + OE and in the full EFC, whose mIoU stays above the PSPNet's "
         "(docs/moving-cars.md)"),
    Rule("kitti-raw-crop", lambda a: a.recipe == "paper" and a.dataset == "kitti" and a.kitti_raw is not None,
         lambda a: {"crop": list(kitti_raw.CROP)},
         "KITTI frames are about 375x1242: a 713x713 crop would force the scale into [1.9, 2]; 256x640 fits every "
         "KITTI frame size at scale 1 and any angle of the paper's rotation (kitti_raw.py)"),
    Rule("clip-flow-decoder", lambda a: a.method in ("efc", "flow"), lambda a: {"clip_grad": 10.0},
         "the flow decoder's early gradients are 10-20x the rest's (train.build_training clips it alone)"),
    Rule("ablation-pairs", lambda a: a.ablation is not None,
         lambda a: {"pairs_per_snippet": ABLATIONS[a.ablation].pairs,
                    "labelled_pairs": ABLATIONS[a.ablation].labelled},
         "each row of EFC Tables 1 and 2 trains on its own pairs (ABLATIONS)"),
    Rule("warmup-where-the-flow-trains", lambda a: not trains_flow(a), lambda a: {"flow_warmup": 0},
         "the warm-up exists for an unsupervised flow that trains: not psp / flow2seg, the supervised "
         "diagnostic, or TCC_fix's fixed flow"),
]


# ---------------------------------------------------------------------------------------------
# EFC Tables 1 and 2
# ---------------------------------------------------------------------------------------------
class Ablation(NamedTuple):
    """One row of EFC Table 1 or 2."""
    method: str  # train.py --method
    switches: dict  # losses.efc_loss keywords (its ablation switches)
    pairs: int  # pairs per snippet and epoch
    labelled: int  # of them, pairs with the labelled frame
    pair_mode: str  # "fixed", "ud" or "mixed", below


# The paper is silent on how often pairs are drawn; the pair modes (data._PairDataset.set_pair_mode)
# make each row differ only in what its name says:
#   "fixed"  the labelled pairs are drawn once for the whole run: TCC_single trains on one pair per
#            snippet, TCC_multi on five (redrawn every epoch, "single" would only mean more epochs);
#   "ud"     the same five fixed labelled pairs, each item with one unlabelled pair added (drawn
#            anew every epoch): "+ UD" adds data, the labelled exposure stays TCC_multi's;
#   "mixed"  every pair drawn anew each epoch, half with the labelled frame (Table 2, flow rows).
# TCC_fix: "a fixed pre-trained FlowNetS": a frozen copy of a trained flow network (--flow-init,
# encoder included) supplies the flow; the segmentation network starts like the other rows (its own
# flow decoder is frozen and unused, so evaluation scores no flow for it: evaluate.has_own_flow).
# Table 2's "EFC full" is full-mixed: UL + OE + TC with O_error ("the occlusion handling module"),
# on the same pairs as the other Table 2 rows, so that it differs from UL + OE + TC in O_error alone
# (Table 1's "full" also changes the pair sampling).
ABLATIONS = {
    # Table 1 (segmentation)
    "tcc-fix": Ablation("efc", dict(frozen_flow=True, occlusion=False, error_mask=False), 1, 1, "fixed"),
    "tcc-single": Ablation("efc", dict(occlusion=False, error_mask=False), 1, 1, "fixed"),
    "tcc-single-om": Ablation("efc", dict(), 1, 1, "fixed"),
    "tcc-multi-om": Ablation("efc", dict(), 5, 5, "fixed"),
    "full": Ablation("efc", dict(), 10, 5, "ud"),  # --method efc without --ablation is this row
    # Table 2 (flow)
    "ul": Ablation("flow", dict(flow_only=True, occlusion=False), 10, 5, "mixed"),
    "ul-oe": Ablation("flow", dict(flow_only=True), 10, 5, "mixed"),
    "ul-tc": Ablation("efc", dict(occlusion=False, error_mask=False), 10, 5, "mixed"),
    "ul-oe-tc": Ablation("efc", dict(error_mask=False), 10, 5, "mixed"),
    "full-mixed": Ablation("efc", dict(), 10, 5, "mixed"),
}


def pair_mode(args):
    """The pair mode of an EFC run (see ABLATIONS): its row's, else "ud" for efc (the full EFC) and
    "mixed" for the flow branch alone; None for methods without pairs."""
    if args.ablation:
        return ABLATIONS[args.ablation].pair_mode
    return {"efc": "ud", "flow": "mixed"}.get(args.method)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def build_parser():
    """Every flag of train.py. A flag whose default is None takes the recipe's value in parse_args;
    the help of each shows it (recipe_help)."""
    p = argparse.ArgumentParser(prog="train.py", description="Training: one entry point for the image-only "
                                "PSPNet baseline, Flow2Seg, EFC and EFC's flow branch alone.",
                                allow_abbrev=False,  # explicit_flags reads the command line by full names
                                epilog="Unset flags take the recipe's value (see config.py and docs/training.md).")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="psp: image-only PSPNet; flow2seg: Flow2Seg; efc: EFC; flow: EFC's flow branch alone (Table 2 'UL')")
    p.add_argument("--recipe", choices=["quick", "paper"], default="quick",
                   help="quick: synthetic world, CPU, minutes (default); paper: the paper's setting for the method "
                        "(needs --dataset and --pretrained / --init, or --from-scratch)")
    p.add_argument("--ablation", choices=sorted(ABLATIONS),
                   help="an EFC Table 1/2 row: tcc-fix (needs --flow-init with a trained flow model), tcc-single, "
                        "tcc-single-om, tcc-multi-om, full (= --method efc); ul, ul-oe (method flow), ul-tc, "
                        "ul-oe-tc, full-mixed (Table 2's EFC full). Which pairs each row trains on: see ABLATIONS "
                        "in config.py")
    p.add_argument("--flow-init", metavar="CKPT",
                   help="--ablation tcc-fix: a trained flow/efc checkpoint whose whole flow network (its encoder "
                        "too) is kept fixed and supplies the flow")
    # Which data, and which frames EFC pairs ("Implementation Details": t in [1, 5], ten pairs a snippet).
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["synthetic", "cityscapes", "camvid", "kitti"],
                   help="kitti: unsupervised flow on KITTI 2015 multiview frames (method flow), or with --kitti-raw "
                        "and --pseudo-labels EFC on KITTI raw (--data-root: KITTI 2015, for validation); "
                        "--recipe paper needs it named")
    g.add_argument("--data-root", help="dataset folder (default for synthetic: data/synthetic, generated if missing)")
    g.add_argument("--frames-dir", help="CamVid: folder of video frames for the unlabelled neighbours (efc, flow)")
    g.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    g.add_argument("--pairs-per-snippet", type=int, help="EFC: pairs per snippet per epoch (paper: 10); --method "
                   "efc: half of them with the labelled frame, each item one of those plus one without")
    g.add_argument("--labelled-pairs", type=int, help="EFC: how many of them contain the labelled frame (default: half)")
    g.add_argument("--max-gap", type=int, help="EFC: pairs (I_i, I_i+t) with 1 <= t <= max-gap")
    g.add_argument("--kitti-raw", metavar="DIR",
                   help="--dataset kitti: train on the KITTI raw drives under DIR (kitti_raw.KittiRaw; the KITTI 2015 "
                        "scenes left out), with --pseudo-labels")
    g.add_argument("--pseudo-labels", metavar="DIR",
                   help="with --kitti-raw: the pseudo-label folder written by evaluate.py --pseudo-labels")
    g.add_argument("--coarse", action="store_true",
                   help="--method psp --dataset cityscapes: add the gtCoarse labels of train_extra to the training set")
    g.add_argument("--no-augment", action="store_true", help="no scale/rotation/flip/jitter; centre crop only")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per training process")
    g = p.add_argument_group("Flow2Seg flow input (F_t->t-1 of the labelled frame)")
    g.add_argument("--flow-dir", help="precomputed flows (.flo, KITTI _flow.png or .npy) named like the frames "
                                      "(see docs/data.md); default on the synthetic world: its ground truth")
    g.add_argument("--flow-from", metavar="CHECKPOINT",
                   help="an efc/flow checkpoint: compute the flows once with it into RUN/flows, then train on them")
    add_model_flags(p)
    add_run_flags(p)
    recipe_help(p)
    return data.one_line_errors(p)


def add_model_flags(p):
    """build_parser's network and start flags."""
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="image backbone")
    g.add_argument("--flow-backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="Flow2Seg's flow-path backbone")
    # Flow2Seg Table 3's image-only rows (--context) and Table 2's flow-path rows (--flow-context):
    # stored in the checkpoint's config, from which evaluate.load_checkpoint rebuilds the network.
    g.add_argument("--context", choices=["psp", "fcn"], default="psp",
                   help="--method psp's image network: psp = PSPNet; fcn = the same without its pyramid pooling "
                        "(Flow2Seg Table 3's 'ResNet101-FCN')")
    g.add_argument("--flow-context", choices=FLOW_CONTEXTS, default="fcn",
                   help="Flow2Seg's flow-path context module (Table 2): fcn = none (the paper's choice), aspp "
                        "(DeepLabv3), denseaspp, psp (pyramid pooling)")
    g.add_argument("--pretrained", metavar="FILE", help="ImageNet ResNet state dict (torchvision names) for the "
                                                        "image backbone, or a train.py checkpoint (its image "
                                                        "backbone only); for flow2seg also --pretrained-flow")
    g.add_argument("--pretrained-flow", metavar="FILE", help="ImageNet ResNet file for Flow2Seg's flow backbone "
                                                             "(conv1 becomes the mean of its RGB filters)")
    g.add_argument("--init", metavar="CHECKPOINT", action="append", default=[],
                   help="initialise from a checkpoint of this project (repeatable): psp -> flow2seg's image path or "
                        "efc's segmentation branch; flow -> efc; same method -> everything")
    g.add_argument("--from-scratch", action="store_true",
                   help="--recipe paper from random weights (both papers start from ImageNet ones): without it the "
                        "paper recipe needs --pretrained, --pretrained-flow or --init")
    g.add_argument("--freeze", help="comma-separated parameter-name prefixes to freeze, e.g. 'image' (Flow2Seg's "
                                    "image path) or 'flow' (EFC's flow decoder); 'none' freezes nothing")
    g.add_argument("--flow2seg-stage", choices=["joint", "flow-path"], default="joint",
                   help="flow-path: train Flow2Seg's flow path alone (loss L_Flow2Seg, the rest frozen); "
                        "joint: all of eq. (1)")
    g.add_argument("--max-displacement", type=int, help="EFC correlation range in stride-8 pixels")
    g.add_argument("--corr-stride", type=int, help="EFC correlation displacement stride")
    g.add_argument("--corr-layer", choices=CORR_LAYERS,
                   help="encoder output the EFC correlation compares: layer3 (S) or layer2 (FlowNetC's conv3 stage)")
    g.add_argument("--match-input", action=argparse.BooleanOptionalAction,
                   help="feed the cost volume's soft-argmax flow and peak to the flow decoder's stride-8 layers "
                        "(not in EFC; docs/choices.md)")
    g.add_argument("--flow-pass-through", dest="pass_through", action=argparse.BooleanOptionalAction,
                   help="start the flow decoder's upsamplings bilinear and its predict_flow layers as the identity "
                        "on the flow they are given (not in EFC; docs/choices.md)")
    g.add_argument("--fine-match", type=int, metavar="R",
                   help="give the flow decoder's stride-4 layer a second match: layer1 features warped by the "
                        "upsampled stride-8 flow, correlated within +-R cells; 0 = off (not in EFC; docs/choices.md)")
    g.add_argument("--cost-volume", choices=COST_VOLUMES,
                   help="what the flow decoder's correlation computes: cosine (ours: the cosines of unit features) or "
                        "raw (FlowNetC's dot product / C); raw refuses --flow-warmup > 0, --match-input and "
                        "--fine-match, whose soft-argmax is calibrated for cosines (docs/choices.md)")
    g.add_argument("--no-world-init", action="store_true",
                   help="quick recipe on the synthetic world: start efc / flow / flow2seg from scratch instead of "
                        "from a PSPNet trained on the world (see world_encoder)")


def add_run_flags(p):
    """build_parser's optimisation, loss and run flags."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--iterations", type=int, help="training iterations")
    g.add_argument("--batch", type=int, help="global batch, split over processes (efc: items of a labelled + an unlabelled pair)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], help="sgd (momentum 0.9) or adam")
    g.add_argument("--lr", type=float, help="base learning rate, decayed by (1 - it/iterations)^0.9")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (both papers: 1e-4)")
    g.add_argument("--flow-lr-mult", type=float,
                   help="lr multiplier of EFC's flow decoder (see docs/choices.md: at the full lr, SGD moves an "
                        "untrained decoder's flow by hundreds of pixels in one step; the paper: 1)")
    g.add_argument("--no-dropout", action="store_true",
                   help="turn the heads' dropout (p 0.1) off: its masks are the one thing that differs between a "
                        "run on N processes and on one (a check, not a recipe)")
    g.add_argument("--clip-grad", type=float,
                   help="clip the gradient norm (0: off, the papers); efc and flow clip their flow decoder's alone")
    g.add_argument("--flow-warmup", type=int, metavar="N",
                   help="efc / flow: the first N iterations train the flow decoder towards its correlation's own "
                        "soft-argmax flow (label-free; not in the paper) before the paper's flow losses take over "
                        "(see losses.efc_loss)")
    g.add_argument("--seg-batch", choices=["all", "labelled"],
                   help="efc: which frames the segmentation branch trains on as one batch: all (EFC: every frame of "
                        "every pair) or labelled (the frames with labels; the others are decoded without gradient "
                        "for O_seg alone, or not at all when nothing reads them: the same loss terms, BatchNorm "
                        "statistics from the labelled frames; steps 1.3-2x faster on a CPU, docs/choices.md)")
    g.add_argument("--flow-supervised", action="store_true",
                   help="diagnostic (--method flow, synthetic world): train the same flow decoder on the true flow "
                        "(EPE) instead of the unsupervised losses, to tell the decoder's capacity from the losses'")
    # EFC eq. (9)'s weights, and the switches between our settings and the paper's (docs/choices.md).
    g = p.add_argument_group("EFC losses")
    g.add_argument("--cons-weight", type=float, help="EFC lambda_cons (see QUICK's comment for the quick value)")
    g.add_argument("--occ-weight", type=float, help="EFC lambda_occ")
    g.add_argument("--sm-weight", type=float, help="EFC lambda_sm")
    g.add_argument("--edge-weight", type=float, help="L_sm's edge weight exp(-W |grad I|) (eq. (7): W = 1)")
    g.add_argument("--full-res-scale", action=argparse.BooleanOptionalAction,
                   help="L_pm, L_sm and L_occ also on the finest flow upsampled to the input resolution (not in "
                        "EFC, which uses the decoder's grids only)")
    g.add_argument("--detach-occ-in-cons", action=argparse.BooleanOptionalAction,
                   help="O_est a weight without gradient inside L_cons (eq. (2) as written passes its gradient)")
    g.add_argument("--loss-reduction", choices=["mean", "sum"],
                   help="efc / flow: each term's pixels averaged (mean) or summed per image as eqs. (2)-(8) write "
                        "sum_xy (sum)")
    add_execution_flags(p)


def add_execution_flags(p):
    """Where and how a run executes and what it writes; those in RESUME_FREE (device, workers,
    logging, checkpoints, speed flags) may differ when the run is resumed."""
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/METHOD)")
    g.add_argument("--resume", metavar="CHECKPOINT", help="continue a run exactly where its checkpoint stopped")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that already holds a run (its ckpt.pt, best.pt and "
                        "log.jsonl are replaced); without it such a folder is refused")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order and the augmentation")
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (photometric-family losses stay float32)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--log-every", type=int, help="iterations between log lines")
    g.add_argument("--val-every", type=int, help="iterations between validations (0: only at the end)")
    g.add_argument("--val-items", type=int, help="cap on the items of each validation set (none: all)")
    g.add_argument("--ckpt-every", type=int, help="iterations between checkpoints")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="stop (with a checkpoint) after N iterations of this invocation, e.g. to fit a cluster's "
                        "time limit; --resume continues as if never stopped")


def recipe_help(parser):
    """Append to every flag's help what it defaults to: the recipes' values for the flags a recipe
    sets (quick per method where they differ; paper for efc / flow / psp and for flow2seg), else
    the parser default. Generated from QUICK, OPTIMIZER and PAPER_*, so --help cannot drift."""
    computed = {"clip_grad": "10 for efc and flow, else 0", "freeze": "quick: seg for flow, else none; paper: none",
                "iterations": f"quick: {QUICK['iterations']}, {QUICK_FLOW_ITERATIONS} for efc and flow on the synthetic "
                              f"world; paper: {PAPER_EFC['iterations']}, flow2seg {PAPER_FLOW2SEG['iterations']}",
                "flow_warmup": f"quick: {QUICK['flow_warmup']}, {QUICK_FLOW_ITERATIONS // 2} for efc and flow on the "
                               f"synthetic world; paper: {PAPER_EFC['flow_warmup']}",
                "crop": f"quick: {QUICK['crop'][0]} {QUICK['crop'][1]}, whole frames ({synthetic.FRAME_SIZE[0]} "
                        f"{synthetic.FRAME_SIZE[1]}) for efc and flow on the synthetic world; paper: "
                        f"{PAPER_EFC['crop'][0]} {PAPER_EFC['crop'][1]} (flow2seg: {PAPER_FLOW2SEG['crop'][0]} "
                        f"{PAPER_FLOW2SEG['crop'][1]})",
                "dataset": "quick: synthetic; paper: none, name it"}
    quick = {**QUICK,
             "optimizer": ", ".join(f"{m} {o}" for m, (o, _) in OPTIMIZER.items()),
             "lr": ", ".join(f"{m} {lr:g}" for m, (_, lr) in OPTIMIZER.items())}
    for action in parser._actions:
        key = action.dest
        if action.help in (None, argparse.SUPPRESS) or key == "help":
            continue
        if key in computed:
            action.help += f" [default: {computed[key]}]"
        elif key in quick:
            paper = ("" if key not in PAPER_EFC else
                     f"; paper: {PAPER_EFC[key]}" if PAPER_EFC[key] == PAPER_FLOW2SEG[key] else
                     f"; paper: {PAPER_EFC[key]}, flow2seg {PAPER_FLOW2SEG[key]}")
            action.help += f" [quick: {quick[key]}{paper}]"
        elif action.default not in (None, False, [], argparse.SUPPRESS):
            action.help += f" [default: {action.default}]"


def explicit_flags(parser, argv):
    """The dests of the options given on the command line `argv` (full names; allow_abbrev is off)."""
    names = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {names[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in names}


# ---------------------------------------------------------------------------------------------
# The resolved configuration
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """The command line -> args, complete, with args.sources {setting: where its value came from}:
    the layers of the module docstring, in order (recipe, RULES, flags, then the checkpoint of
    --resume); combinations that cannot mean anything stop here with one line (check_combinations)
    rather than after the data is read or the network is built."""
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    given = explicit_flags(p, argv)
    sources = {key: "flag" if key in given else "default" for key in vars(args)}

    def take(values, source):  # a recipe's or a rule's values, for every setting no flag gives
        for key, value in values.items():
            if key not in given:
                setattr(args, key, value)
                sources[key] = source

    if args.recipe == "paper":
        take(PAPER_FLOW2SEG if args.method == "flow2seg" else PAPER_EFC, "paper")
    else:
        optimizer, lr = OPTIMIZER[args.method]
        take({**QUICK, "optimizer": optimizer, "lr": lr}, "quick")
    check_start(p, args, given)
    if args.ablation and ABLATIONS[args.ablation].method != args.method:
        p.error(f"--ablation {args.ablation} is an EFC row for --method {ABLATIONS[args.ablation].method}, "
                f"not {args.method}")
    for rule in RULES:
        if rule.applies(args):
            take(rule.values(args), "rule " + rule.name)
    if args.freeze == "none":
        args.freeze = ""
    check_combinations(p, args, given)
    if args.data_root is None:
        args.data_root, sources["data_root"] = data.SYNTH_DEFAULT_ROOT, "derived"
    if args.resume:  # last: the checkpoint's settings replace the recipe's, and contradictions are refused
        resume_settings(p, args, given, sources)
    if args.out is None:
        args.out, sources["out"] = os.path.join("runs", args.method if not args.ablation else f"efc-{args.ablation}"), \
            "derived"
    args.pair_mode, sources["pair_mode"] = pair_mode(args), "derived"
    args.sources = sources
    return args


def check_start(p, args, given):
    """--recipe paper is the papers' training: on their data and from their ImageNet start, both named
    on the command line (a resumed run was checked when it started)."""
    if args.from_scratch and args.recipe != "paper":
        p.error("--from-scratch is --recipe paper's start from random weights; the quick recipe's is --no-world-init")
    if args.from_scratch and (args.pretrained or args.pretrained_flow or args.init):
        p.error("--from-scratch starts from random weights: drop it, or drop --pretrained / --pretrained-flow / --init")
    if args.recipe != "paper" or args.resume:
        return
    if "dataset" not in given:
        p.error("--recipe paper trains on the papers' data: give --dataset cityscapes, camvid or kitti "
                "(--dataset synthetic runs the recipe on the synthetic world)")
    if not (args.pretrained or args.pretrained_flow or args.init or args.from_scratch):
        p.error("--recipe paper starts from ImageNet weights, as both papers do: give --pretrained FILE (a "
                "torchvision ResNet state dict) or --init CHECKPOINT, or --from-scratch for random weights")


def check_combinations(p, args, given):
    """The refusals of parse_args: flags that mean nothing for this method, dataset or row."""
    if args.ablation == "tcc-fix" and not args.flow_init:
        p.error("--ablation tcc-fix takes its flow from a fixed, trained network: give --flow-init with a "
                "flow/efc checkpoint")
    if args.flow_init and args.ablation != "tcc-fix":
        p.error("--flow-init is the fixed flow network of --ablation tcc-fix")
    if args.ablation and {"pairs_per_snippet", "labelled_pairs"} & given:
        row = ABLATIONS[args.ablation]
        p.error(f"--ablation {args.ablation} trains on its own pairs ({row.pairs} per snippet, {row.labelled} with "
                "the labelled frame): drop --pairs-per-snippet / --labelled-pairs")
    # Flow2Seg's image path and EFC's segmentation branch are PSPNets; only Flow2Seg has a flow path.
    if args.context != "psp" and args.method != "psp":
        p.error(f"--context {args.context} is the image-only network of --method psp (Flow2Seg Table 3's FCN row); "
                f"--method {args.method} keeps its PSPNet")
    if args.flow_context != "fcn" and args.method != "flow2seg":
        p.error(f"--flow-context {args.flow_context} is a context module of Flow2Seg's flow path: use it with "
                "--method flow2seg")
    # The full EFC ("+ UD") pairs every labelled pair with an unlabelled one (ABLATIONS' "ud" mode),
    # so the pairs of a snippet split in two equal halves.
    if args.method == "efc" and not args.ablation and (args.pairs_per_snippet % 2 or args.labelled_pairs not in
                                                       (None, args.pairs_per_snippet // 2)):
        p.error(f"--method efc adds one unlabelled pair to each labelled one: --pairs-per-snippet "
                f"({args.pairs_per_snippet}) must be even and --labelled-pairs ({args.labelled_pairs}) half of it")
    if args.data_root is None and args.dataset not in (None, "synthetic"):
        p.error(f"--dataset {args.dataset} needs --data-root (the folder holding the dataset)")
    check_data_flags(p, args)
    if args.flow_warmup < 0 or (args.flow_warmup and not trains_flow(args) and "flow_warmup" in given):
        p.error("--flow-warmup N (N >= 0) warms up the unsupervised flow of --method efc / flow (not tcc-fix)")
    if args.fine_match < 0:
        p.error(f"--fine-match R is the flow decoder's stride-4 match range in cells: R >= 0 (0 = off), "
                f"got {args.fine_match}")
    check_cost_volume(p, args)
    if args.flow_supervised and (args.method != "flow" or args.dataset != "synthetic" or args.ablation):
        p.error("--flow-supervised trains --method flow on the synthetic world's true flow (no --ablation)")
    if args.loss_reduction != "mean" and args.method not in ("efc", "flow"):
        p.error(f"--loss-reduction {args.loss_reduction} is the reduction of EFC's losses: use it with --method "
                "efc or flow")
    if args.method == "flow2seg" and args.dataset not in ("synthetic", "cityscapes"):
        p.error("--method flow2seg needs Cityscapes-layout video (--dataset synthetic or cityscapes)")
    if args.flow2seg_stage != "joint" and args.method != "flow2seg":
        p.error(f"--flow2seg-stage {args.flow2seg_stage} is a stage of --method flow2seg, not {args.method}")
    if args.flow_dir and args.flow_from:
        p.error("give --flow-dir or --flow-from, not both")
    if (args.flow_dir or args.flow_from) and args.method != "flow2seg":
        p.error("--flow-dir / --flow-from are Flow2Seg's flow input: use them with --method flow2seg")


def check_data_flags(p, args):
    """The refusals of the KITTI and Cityscapes data flags: KITTI 2015 has flow but no segmentation
    labels, KITTI raw has pseudo-labels (evaluate.py --pseudo-labels), gtCoarse is PSPNet's."""
    if (args.kitti_raw or args.pseudo_labels) and args.dataset != "kitti":
        p.error("--kitti-raw / --pseudo-labels are KITTI raw training data: use them with --dataset kitti")
    if bool(args.kitti_raw) != bool(args.pseudo_labels):
        p.error("--kitti-raw DIR and --pseudo-labels DIR go together: KITTI raw is read with its pseudo-labels")
    if args.dataset == "kitti" and args.method == "efc" and not args.kitti_raw:
        p.error("--method efc on --dataset kitti trains on KITTI raw with pseudo-labels: give --kitti-raw DIR "
                "and --pseudo-labels DIR")
    if args.dataset == "kitti" and args.method not in ("flow", "efc"):
        p.error("--dataset kitti has no segmentation labels: use it with --method flow, or --method efc with "
                "--kitti-raw and --pseudo-labels")
    if args.coarse and (args.method != "psp" or args.dataset != "cityscapes"):
        p.error("--coarse adds Cityscapes' gtCoarse train_extra to PSPNet's training set: use it with --method psp "
                "--dataset cityscapes")


def check_cost_volume(p, args):
    """--cost-volume raw: FlowNetC's raw correlation / C has no fixed range, and the soft-argmax of
    the warm-up, --match-input and --fine-match is calibrated for cosines in [-1, 1]; refused with
    them rather than silently mixing two cost volumes."""
    if args.cost_volume != "raw":
        return
    conflicts = [(args.flow_warmup > 0, "--flow-warmup 0", "the warm-up's target"),
                 (args.match_input, "--no-match-input", "--match-input"),
                 (args.fine_match > 0, "--fine-match 0", "--fine-match"),
                 (args.corr_layer == "layer2+3", "--corr-layer layer3",  # or layer2
                  "--corr-layer layer2+3 (two maps made unit length to weigh them alike)")]
    found = [(flag, what) for on, flag, what in conflicts if on]
    if found:  # one line naming every setting to change (a quick-recipe rule may have set several)
        p.error(f"--cost-volume raw (FlowNetC's raw correlation) does not go with {'; '.join(w for _, w in found)}, "
                f"made for cosines in [-1, 1]: give {' '.join(flag for flag, _ in found)}")


# Flags that may differ between a run and its --resume: where and how it runs, not what it computes.
RESUME_FREE = {"resume", "overwrite", "stop_after", "device", "workers", "log_every", "val_every", "val_items",
               "ckpt_every", "amp", "channels_last", "compile", "out", "method"}


# Settings added after runs were made: the value a checkpoint without the key trained with.
ADDED_LATER = {"seg_batch": "all"}


def resume_settings(parser, args, given, sources):
    """--resume continues the run as it was: every setting comes from the checkpoint's config; a flag
    on the command line that contradicts it is refused (it would change the run, e.g. its lr curve),
    except RESUME_FREE's. --out defaults to the run's own folder; --method must be the run's."""
    checkpoint = checkpoints.read_checkpoint(args.resume)
    if checkpoint["method"] != args.method:
        raise SystemExit(f"--resume {args.resume}: a {checkpoint['method']} checkpoint, not {args.method}")
    if "optimizer" not in checkpoint:
        raise SystemExit(f"--resume {args.resume}: weights only (a best.pt keeps no optimizer state); resume from "
                         "the run's ckpt.pt, or start a new run from these weights with --init")
    config = {**ADDED_LATER, **checkpoint["config"]}
    for key, value in config.items():
        if not hasattr(args, key) or key in RESUME_FREE:
            continue
        if key in given and getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            parser.error(f"{flag} {getattr(args, key)} contradicts the run being resumed ({args.resume} has "
                         f"{value}); drop the flag to continue that run, or start a new one")
        setattr(args, key, value)
        sources[key] = "flag" if key in given else "checkpoint"
    if "out" not in given:
        args.out = config.get("out", args.out)
        sources["out"] = "checkpoint"


def describe(args, width=110):
    """The printout of a run's settings: one paragraph per group of flags, each value followed by where
    it came from unless that is the recipe ([flag], [checkpoint], [rule NAME], [default], [derived]);
    unset flags with no value are left out. Then the reason of every rule that set a value."""
    recipe = args.recipe
    table = "QUICK" if recipe == "quick" else "PAPER_FLOW2SEG" if args.method == "flow2seg" else "PAPER_EFC"
    lines = [f"settings ({args.method}, --recipe {recipe}; unmarked values are the {recipe} recipe's, config.{table}):"]
    groups = [("recipe" if g.title == "options" else g.title, [a.dest for a in g._group_actions if a.dest != "help"])
              for g in build_parser()._action_groups]
    flags = {key for _, keys in groups for key in keys}
    groups = [(title, keys + [k for k in vars(args) if k not in flags and k != "sources"] * (title == "data"))
              for title, keys in groups]
    for title, keys in groups:
        entries = []
        for key in keys:
            value, source = getattr(args, key, None), args.sources.get(key, "derived")
            if source == "default" and (value is None or value is False or value in ([], "")):
                continue
            shown = " ".join(map(str, value)) if isinstance(value, list) else "none" if value == "" else value
            entries.append(f"{key} {shown}" + ("" if source == recipe else f" [{source}]"))
        if entries:
            lines += wrap(f"  {title}: ", entries, width)
    used = {source[len("rule "):] for source in args.sources.values() if source.startswith("rule ")}
    for rule in RULES:
        if rule.name in used:
            lines += wrap(f"  rule {rule.name}: ", rule.reason.split(" "), width, separator="")
    return "\n".join(lines)


def wrap(head, entries, width, separator=","):
    """entries joined by `separator` and a space after `head`, in lines of at most `width` characters
    (continuations indented)."""
    lines, line = [], head
    for k, entry in enumerate(entries):
        piece = entry + (separator if k < len(entries) - 1 else "")
        if len(line) + len(piece) + 1 > width and line.strip() != head.strip():
            lines.append(line.rstrip())
            line = " " * 4
        line += piece + " "
    return lines + [line.rstrip()]
