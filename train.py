"""Training: one entry point for the image-only PSPNet baseline, Flow2Seg, EFC and EFC's flow branch alone.

    python train.py --method {psp,flow2seg,efc,flow} [--recipe quick|paper] [flags]

With no other flag it trains on the synthetic world (written to ./data/synthetic if missing), on the
CPU, with ResNet-18 backbones, in a few minutes, and ends by printing the validation numbers and
where the checkpoint and the log are. There, efc, flow and flow2seg start from a PSPNet trained on the
world, made once and cached (world_encoder: the papers' ImageNet start, which cannot ship), and efc and
flow first warm their flow decoder up towards its cost volume's own soft-argmax (--flow-warmup, label-free;
losses.efc_loss explains why). `--recipe paper` sets each paper's published recipe (EFC "Implementation
Details", Flow2Seg 4.2) and needs --dataset and a start (--pretrained / --init, or --from-scratch).
Every setting, and where its value comes from (recipe, rule, flag, checkpoint), is config.py's; a run
prints them first. The settings of ours that the paper recipe keeps, or not, each with the switch back to
the paper's value: docs/choices.md#the-paper-recipe-against-the-papers. The ablations of EFC Tables 1
and 2 are --ablation NAME (config.ABLATIONS).

This file reads in the order a run takes: data (SeededItems, GlobalBatches, training_dataset), the
network and its optimiser (world_encoder .. build_training; checkpoints are checkpoints.py's), one step
(compute_loss, train_step), the loop (train_loop) and main.

Distributed: `torchrun --nproc_per_node=N train.py ...` runs DistributedDataParallel (NCCL on GPUs,
gloo on CPUs) with SyncBatchNorm; --batch is the global batch, split over the processes, and every
process draws its share of the same global batch a single process would draw, with the same
augmentation; every pixel mean of the losses is taken over the global batch (losses.masked_mean).
So N processes train like one, to float32 rounding, except for dropout, whose masks depend on the
split (--no-dropout removes that difference; tests/test_train.py checks psp, flow2seg and efc).

Reproducibility: the data order and every random augmentation are functions of (--seed, epoch, item
index) (see SeededItems), so a run resumed from a checkpoint continues exactly as the uninterrupted
run would (bitwise on the CPU; on GPUs, up to nondeterministic kernels such as scatter-add).
"""
import contextlib
import json
import math
import os
import resource
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

import config
import data
import evaluate
import kitti_raw
import losses
import synthetic
from checkpoints import read_checkpoint, rng_state, save_best, save_checkpoint, set_rng_state, truncate_log
from model import build_model, load_pretrained

# ---------------------------------------------------------------------------------------------
# Data: datasets per method, and an order of items that is a pure function of (seed, iteration)
# ---------------------------------------------------------------------------------------------
class SeededItems(Dataset):
    """Wraps a dataset so that item (epoch, index) is a pure function of (seed, epoch, index).

    The batch sampler below yields (epoch, index) pairs; here the pair datasets draw that epoch's
    pairs (set_epoch) and torch's generator, from which data.JointTransform draws every random
    augmentation, is seeded with (seed, epoch, index) for the duration of the item. So the same
    item comes out in any worker, on any rank, before or after a resume.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            return self.dataset[index]


class GlobalBatches:
    """Batch sampler: iteration k takes items [k * B, (k + 1) * B) of an endless stream made of one
    random permutation of the dataset per epoch (seeded by (seed, epoch)); process `rank` of `world`
    takes its consecutive share of B / world. Starting at `start` iterations resumes the stream."""

    def __init__(self, size, global_batch, world, rank, seed, start=0):
        self.size, self.global_batch, self.world, self.rank = size, global_batch, world, rank
        self.seed, self.start = seed, start
        self.local = global_batch // world

    def __iter__(self):
        position = self.start * self.global_batch + self.rank * self.local  # in the endless stream
        order, epoch = None, None
        while True:
            batch = []
            for p in range(position, position + self.local):
                e, i = divmod(p, self.size)
                if e != epoch:
                    epoch = e
                    order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + e))
                batch.append((e, int(order[i])))
            yield batch
            position += self.global_batch


def training_dataset(args):
    """The training set of a method and dataset, with the joint augmentation (data.JointTransform):
    each paper's under --recipe paper (data.paper_augmentation), else the quick recipe's."""
    # Quick: no padding and no rotation where the flow learns from photometric losses (efc, flow):
    # padded pixels (the image scaled below the crop, a rotated frame's corners) are black in both
    # frames at the same place, a static pattern with sharp edges that L_pm scores best at zero flow,
    # so they pull the learned motion towards zero (docs/learning.md#choices-measured-on-the-world).
    # The paper recipe rotates as EFC does, the crop drawn inside the rotated frame (pad=False).
    photometric = args.method in ("efc", "flow") and not args.flow_supervised
    augmentation = data.paper_augmentation(args.method) if args.recipe == "paper" else \
        data.quick_augmentation(photometric)
    transform = data.JointTransform(crop=args.crop, train=not args.no_augment, **augmentation)
    root = args.data_root
    pairs, labelled, mode = args.pairs_per_snippet, args.labelled_pairs, args.pair_mode  # the row's (config)
    modes = dict(labelled_pairs=labelled, fixed_labelled=mode != "mixed", unlabelled_companion=mode == "ud")
    if args.dataset == "kitti" and args.kitti_raw:  # EFC on KITTI raw with pseudo-labels; --data-root validates
        dataset = kitti_raw.KittiRaw(args.kitti_raw, args.pseudo_labels, pairs_per_snippet=pairs,
                                     max_gap=args.max_gap, transform=transform, seed=args.seed)
        dataset.set_pair_mode(**modes)
        return dataset
    if args.dataset == "kitti":
        return data.KittiFlow(root, "training", mode="multiview", transform=transform)
    if args.flow_supervised:  # consecutive frames with their true flows in both directions
        return data.SyntheticSequence(root, "train", transform=transform)
    if args.dataset == "camvid":
        if args.method == "psp":
            return data.CamVid(root, "train", transform=transform)
        if not args.frames_dir:
            raise SystemExit(f"--method {args.method} on CamVid needs --frames-dir (video frames for the pairs)")
        dataset = data.CamVid(root, "train", frames_dir=args.frames_dir, pairs_per_frame=pairs, max_gap=args.max_gap,
                              transform=transform, seed=args.seed)
        dataset.set_pair_mode(**modes)
        return dataset
    if args.method == "psp":
        return data.CityscapesImages(root, "train", transform=transform,
                                     coarse_splits=("train_extra",) if args.coarse else ())
    if args.method == "flow2seg":
        return data.CityscapesFlow2Seg(root, "train", flow_dir=args.flow_dir, transform=transform)
    return data.CityscapesPairs(root, "train", pairs_per_snippet=pairs, max_gap=args.max_gap, transform=transform,
                                seed=args.seed, **modes)



@torch.no_grad()
def fill_flow_dir(checkpoint, root, out_dir, device, frames=None):
    """Flow2Seg's input from EFC's flow: F_t->t-1 of every labelled frame (train and val), computed once
    by a trained efc/flow network and written as .flo files named as data.flow_path expects.
    `frames` ({split: [(frame, previous frame)] image paths}) replaces the labelled frames."""
    net, ckpt = evaluate.load_checkpoint(checkpoint, device)
    if ckpt["method"] not in ("efc", "flow"):
        raise SystemExit(f"--flow-from {checkpoint}: a {ckpt['method']} checkpoint has no flow branch (need efc or flow)")
    if frames is None:
        frames = {split: data.labelled_frames_with_previous(root, split) for split in ("train", "val")}
    for split, pairs in frames.items():
        for k, (image, previous) in enumerate(pairs):
            a, b = (data.normalize(data.image_tensor(path)[None]).to(device) for path in (image, previous))
            flow = evaluate.predict_flow(net, a, b)  # (1, 2, H, W) F_t->t-1
            target = data.flow_path(out_dir, split, image)
            target.parent.mkdir(parents=True, exist_ok=True)
            data.write_flo(target, flow[0].permute(1, 2, 0).cpu().numpy())
            print(f"\rflows from {checkpoint}: {split} {k + 1}/{len(pairs)}", end="", flush=True)
    print()


# ---------------------------------------------------------------------------------------------
# Model and optimiser (their checkpoints: checkpoints.py)
# ---------------------------------------------------------------------------------------------
WORLD_INIT_ITERATIONS = 200  # the quick recipe's PSPNet run


def world_encoder(args, world, log, outer_command=None):
    """The encoder the quick recipe starts efc, flow and flow2seg from on the synthetic world: a
    PSPNet trained on the world (`python train.py --method psp`, 200 iterations), run once per
    (backbone, seed, world) and cached in runs/world-init/. Returns its checkpoint, or None where it
    does not apply (another recipe or dataset, --no-world-init, or an explicit --init / --pretrained
    / --resume).

    Why: both papers start from ImageNet-pretrained ResNets, and EFC's flow decoder correlates the
    encoder's layer3 features, which must already match across frames: a random encoder's do not
    (docs/learning.md#choices-measured-on-the-world). No ImageNet file can ship with the code, so the
    world itself pretrains the encoder; with real data, give --pretrained FILE instead.
    A stage stopped by Ctrl-C or SIGTERM continues from its checkpoint when the run is started
    again (outer_command, the command its stop line names).
    """
    if (args.recipe != "quick" or args.dataset != "synthetic" or args.method not in ("efc", "flow", "flow2seg")
            or args.no_world_init or args.init or args.pretrained or args.resume):
        return None
    root = Path(args.data_root).resolve()
    folder = Path("runs") / "world-init" / f"psp-{args.backbone}-seed{args.seed}-{root.name}"
    command = ["--method", "psp", "--backbone", args.backbone, "--data-root", str(args.data_root),
               "--seed", str(args.seed), "--iterations", str(WORLD_INIT_ITERATIONS), "--val-every", "0", "--no-world-init",
               "--out", str(folder)] + (["--device", args.device] if args.device else [])
    path = folder / "ckpt.pt"
    if path.is_file():
        ckpt = read_checkpoint(path)
        config = ckpt["config"]
        if (ckpt["method"] == "psp" and ckpt["iteration"] == WORLD_INIT_ITERATIONS
                and config["backbone"] == args.backbone and Path(config["data_root"]).resolve() == root):
            log(f"encoder: {path}, a PSPNet trained on the world (cached; made by `python train.py "
                f"{' '.join(command)}`)")
            return str(path)
        if (ckpt["method"] == "psp" and "optimizer" in ckpt and config["iterations"] == WORLD_INIT_ITERATIONS
                and config["backbone"] == args.backbone and Path(config["data_root"]).resolve() == root):
            log(f"encoder: continuing the PSPNet stage stopped at iteration {ckpt['iteration']} ({path})")
            command = ["--method", "psp", "--resume", str(path)] + (["--device", args.device] if args.device else [])
        else:
            log(f"encoder: {path} does not match this run (another backbone, world or length): retraining it")
            command.append("--overwrite")
    elif (folder / "log.jsonl").exists():  # a first attempt killed before its first checkpoint
        command.append("--overwrite")
    printed = "python train.py " + " ".join(command)
    if world > 1:
        raise SystemExit(f"the quick recipe starts {args.method} from a PSPNet trained on the world: run "
                         f"`{printed}` once before torchrun (or pass --no-world-init)")
    log(f"encoder: training a PSPNet on the world first: `{printed}`")
    main(command, stage_of=outer_command)
    log(f"encoder: {path} done; now {args.method}")
    return str(path)


def initialise(net, args, log):
    """--pretrained ImageNet files and --init checkpoints of this project."""
    if args.pretrained:
        backbone = net.backbone if args.method == "psp" else net.image.backbone if args.method == "flow2seg" \
            else net.seg.backbone
        log(load_pretrained(backbone, args.pretrained))
    if args.pretrained_flow:
        if args.method != "flow2seg":
            raise SystemExit("--pretrained-flow is Flow2Seg's flow backbone: use it with --method flow2seg")
        log(load_pretrained(net.flow_backbone, args.pretrained_flow))
    for path in args.init:
        ckpt = read_checkpoint(path)
        state, source = ckpt["model"], ckpt["method"]
        # A PSPNet is a part of the other networks: its names gain the prefix of that part (Flow2Seg's
        # image path, EFC's segmentation branch, whose layers 1-3 are the shared encoder).
        if source == "psp" and args.method == "flow2seg":
            state = {"image." + k: v for k, v in state.items()}
        elif source == "psp" and args.method in ("efc", "flow"):
            state = {"seg." + k: v for k, v in state.items()}
        elif not (source == args.method or {source, args.method} <= {"efc", "flow"}):
            raise SystemExit(f"--init {path}: a {source} checkpoint cannot initialise --method {args.method}")
        # Flow2Seg 4.3 initialises its image path from a PSPNet: an FCN (--context fcn) has no pyramid to give.
        if source == "psp" and args.method != "psp" and ckpt["config"].get("context", "psp") != "psp":
            raise SystemExit(f"--init {path}: an image-only FCN (--context fcn), not a PSPNet: it cannot "
                             f"initialise the PSPNet of --method {args.method}")
        own = net.state_dict()
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise SystemExit(f"--init {path}: {len(bad)} tensors do not fit this {args.method} network "
                             f"(e.g. {bad[:3]}); check --backbone / --flow-backbone / --context / --flow-context")
        net.load_state_dict(state, strict=False)  # the rest (a flow decoder, a fusion module) keeps its init
        log(f"--init {path}: loaded {len(state)} of {len(own)} tensors from a {source} checkpoint")


def fixed_flow_network(path, device, log):
    """EFC Table 1's TCC_fix: "a fixed pre-trained FlowNetS". The whole flow network of a trained
    flow/efc checkpoint, its own encoder included, frozen in eval mode: the segmentation network's
    encoder trains (from the same start as the other rows) without moving the flow it is tied by."""
    try:
        net, ckpt = evaluate.load_checkpoint(path, device)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--flow-init: {one_line(error)}") from None
    if ckpt["method"] not in ("efc", "flow"):
        raise SystemExit(f"--flow-init {path}: a {ckpt['method']} checkpoint has no flow network (need efc or flow)")
    log(f"--flow-init {path}: a fixed {ckpt['method']} network supplies the flow")
    return net.requires_grad_(False)


def frozen_prefixes(args):
    """--freeze, plus what a stage or ablation freezes: Flow2Seg's image path and fusion while its flow
    path trains alone; EFC's own flow decoder for Table 1's TCC_fix, which takes its flow from a
    fixed network instead (fixed_flow_network): the decoder does not run and gets no optimizer state."""
    frozen = [p.strip() for p in args.freeze.split(",") if p.strip()]
    if args.method == "flow2seg" and args.flow2seg_stage == "flow-path":
        frozen += ["image", "fusion"]
    if args.ablation == "tcc-fix":
        frozen += ["flow"]
    return frozen


def train_mode(net, args):
    """Training mode, except frozen parts, whose BatchNorm statistics must not move either."""
    net.train()
    for prefix in frozen_prefixes(args):
        net.get_submodule(prefix).eval()


def parameter_groups(net, args):
    """Trainable parameters, EFC's flow decoder at lr * flow_lr_mult (see --flow-lr-mult)."""
    frozen = frozen_prefixes(args)
    main, flow = [], []
    for name, param in net.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in frozen):
            param.requires_grad_(False)
        elif args.method in ("efc", "flow") and name.startswith("flow."):
            flow.append(param)
        else:
            main.append(param)
    unknown = [f for f in frozen if not any(n == f or n.startswith(f + ".") for n, _ in net.named_parameters())]
    if unknown:
        raise SystemExit(f"--freeze {args.freeze}: no parameters start with {unknown}")
    groups = [{"params": main, "lr_mult": 1.0}]
    if flow:
        groups.append({"params": flow, "lr_mult": args.flow_lr_mult})
    return [g for g in groups if g["params"]]


def make_optimizer(groups, args):
    """The papers' optimisers: EFC (and PSPNet) SGD with momentum 0.9, Flow2Seg Adam; weight decay
    1e-4 in both papers. The lr is set per group at every step by poly_lr (groups carry 'lr_mult')."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)


def poly_lr(optimizer, args, iteration):
    """'poly' policy (EFC, Flow2Seg, PSPNet): lr = base * (1 - iteration / iterations)^0.9. A function
    of the iteration alone, so resuming needs no scheduler state."""
    factor = (1 - iteration / args.iterations) ** 0.9
    for group in optimizer.param_groups:
        group["lr"] = args.lr * group["lr_mult"] * factor
    return args.lr * factor


def one_line(error):
    """The message of a data error in one line. An error raised in a DataLoader worker arrives as
    "Caught ValueError in DataLoader worker process 0. Original Traceback ...": its last line is
    the original "ValueError: message"."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    last = lines[-1] if lines[0].startswith("Caught ") else lines[0]
    return last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ": ") else last


class CPUSyncBatchNorm(torch.nn.BatchNorm2d):
    """SyncBatchNorm for CPU processes (gloo), which torch.nn.SyncBatchNorm refuses: in training,
    mean and variance come from the sums over the *global* batch, through all_reduces that
    autograd differentiates (their backward all-reduces the gradients), so N processes normalise and
    back-propagate like one process holding the whole batch. Two passes, as torch's own BatchNorm:
    the mean first, then the mean of (x - mean)^2. The one-pass E[x^2] - mean^2 cancels where
    |mean| >> std (at |mean| / std = 2000 it keeps about one of float32's seven digits of the
    variance: tests/test_train.py::test_cpu_sync_batchnorm_is_batchnorm), and its backward carries
    that error into every weight before the layer."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        C = x.shape[1]
        all_reduce = torch.distributed.nn.functional.all_reduce  # summed over processes
        total = all_reduce(torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() // C)]))  # (C + 1,)
        n = total[-1]
        mean = total[:C] / n  # (C,)
        centred = x - mean.view(1, C, 1, 1)
        var = all_reduce(centred.square().sum((0, 2, 3))) / n  # (C,), biased, as BatchNorm normalises with
        with torch.no_grad():  # running statistics as nn.BatchNorm2d: momentum 0.1, unbiased variance
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        return centred * scale.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)


def synchronise_batchnorm(net, device):
    """SyncBatchNorm for a multi-process run: torch's on GPUs, CPUSyncBatchNorm on CPUs."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in net.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum)
            synced.load_state_dict(child.state_dict())
            setattr(net, name, synced)
        else:
            synchronise_batchnorm(child, device)
    return net


# ---------------------------------------------------------------------------------------------
# One step: forward, the method's loss, and its terms for the log
# ---------------------------------------------------------------------------------------------
def merge_companions(batch):
    """EFC "+ UD" items hold a labelled pair and an unlabelled one, every tensor (B, 2, ...): the
    batch becomes 2B pairs, (B * 2, ...). Other batches pass unchanged."""
    if "image_a" not in batch or batch["image_a"].dim() != 5:
        return batch
    return {k: v.flatten(0, 1) if torch.is_tensor(v) else v for k, v in batch.items()}


def compute_loss(net, batch, args, iteration, flow_net=None):
    """-> (total, terms: dict of detached scalars) at 0-based `iteration` (which decides the flow
    warm-up). The forward runs under autocast when --amp; losses.py keeps the photometric family in
    float32 inside. flow_net: TCC_fix's fixed flow network (an EFCNet in eval mode), whose flow and
    occlusion replace the trained network's (whose flow decoder then does not run)."""
    batch = merge_companions(batch)
    if args.method == "psp":  # EFC eq. (8) alone, with PSPNet's auxiliary loss (weight 0.4)
        out = net(batch["image"])
        total = losses.segmentation_loss(out["logits"], batch["label"], out["aux"])
        return total, {"seg": total.detach()}
    if args.method == "flow2seg":  # Flow2Seg eq. (1); batch["flow"] is F_t->t-1 of the labelled frame t
        out = net(batch["image"], batch["flow"])
        total, terms = losses.flow2seg_loss(out, batch["label"])
        if args.flow2seg_stage == "flow-path":  # the flow path alone: L_Flow2Seg (its eq. (1) term)
            total = losses.segmentation_loss(out["flow_logits"], batch["label"])
        return total, terms
    if args.flow_supervised:  # the diagnostic: the same decoder regressed on the true flows of both directions
        out = net(batch["image_a"], batch["image_b"], segment=False)
        total = losses.flow_regression_loss(out, batch["flow_fw"], batch["flow_bw"], batch["flow_fw_valid"],
                                            batch["flow_bw_valid"])
        return total, {"epe": total.detach()}
    # EFC eq. (9): a pair (I_a, I_b) through both branches; the ablation row decides which terms run.
    switches = dict(config.ABLATIONS[args.ablation].switches) if args.ablation else {}
    if args.method == "flow":
        switches.setdefault("flow_only", True)
    # During the warm-up the decoder regresses its correlation's own flow (losses.efc_loss explains why);
    # the segmentation terms train as usual.
    warmup = iteration < args.flow_warmup
    out = net(batch["image_a"], batch["image_b"], segment=not switches.get("flow_only", False),
              warmup=warmup, flow=flow_net is None, seg_frames=seg_frames(batch, args, warmup, switches))
    if flow_net is not None:  # TCC_fix: the fixed network's flow and occlusion, no gradient into them
        with torch.no_grad():
            fixed = flow_net(batch["image_a"], batch["image_b"], segment=False)
        out.update({key: fixed[key] for key in ("flow_ab", "flow_ba", "occ_a", "occ_b")})
    weights = {"cons": args.cons_weight, "occ": args.occ_weight, "sm": args.sm_weight}
    total, terms = losses.efc_loss(out, batch, weights, warmup=warmup, edge_weight=args.edge_weight,
                                   full_res_scale=args.full_res_scale, detach_occ_in_cons=args.detach_occ_in_cons,
                                   reduction=args.loss_reduction, **switches)
    # The log shows only the terms this run can have (efc_loss returns every term, a dropped one as 0):
    # a constant 0 for a term the method never uses reads like a term that failed to learn.
    unused = set()
    if switches.get("flow_only"):
        unused |= {"seg", "cons"}
    if switches.get("consistency") is False:
        unused.add("cons")
    if switches.get("occlusion") is False:
        unused.add("occ")
    if switches.get("frozen_flow"):
        unused |= {"pm", "sm", "occ"}
    if not args.flow_warmup:
        unused.add("warmup")
    return total, {name: value for name, value in terms.items() if name not in unused}


def seg_frames(batch, args, warmup, switches):
    """--seg-batch labelled: forward_pair's (trained, other) masks over the 2B frames [a; b] of an EFC
    batch, else None (every frame decoded as one batch, as in EFC). trained: the frames with labels
    (the first frame if none has: its loss is 0, but the segmentation weights take part in the step,
    which DDP needs on every process); other: the rest where O_error reads their segmentation
    (EFC eq. (5), a detached mask: not in the warm-up, TCC_fix or the rows without O_error)."""
    if args.seg_batch != "labelled" or args.method != "efc":
        return None
    trained = torch.cat((batch["labelled_a"], batch["labelled_b"])).bool()  # (2B,)
    if not trained.any():
        trained = trained.clone()
        trained[0] = True
    reads_other = not (warmup or switches.get("frozen_flow") or switches.get("error_mask") is False)
    return trained, ~trained if reads_other else torch.zeros_like(trained)


def peak_memory_mb(device):
    """Peak memory so far, in MiB: allocated tensors on a GPU; on the CPU the process's peak resident
    size (tensors, the Python heap and the loader's buffers: an upper bound on what training needs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ---------------------------------------------------------------------------------------------
# The run, in the order main() takes its steps: processes, data, run folder, network, loop, end
# ---------------------------------------------------------------------------------------------
def start_processes(args):
    """-> (world, rank, device). One process, or one of WORLD_SIZE started by torchrun: each process
    takes the GPU of its LOCAL_RANK (NCCL) or stays on the CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: the autotuned kernels are reused every step
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch % world:  # --batch is global: every process must take an equal share of it
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    return world, rank, device


def ensure_data_root(args, world, is_main, log):
    """--data-root must hold its dataset. The synthetic world is written without asking only at its
    default place, data/synthetic (synthetic.write_world_once: once, however many runs start at once;
    rank 0 writes while the other ranks wait): a world elsewhere is written by `synthetic.py synth`,
    so that a misspelled --data-root stops here instead of filling the disk with a second world."""
    root = Path(args.data_root)
    synthetic_world = args.dataset == "synthetic"
    if synthetic_world and root.resolve() == Path(data.SYNTH_DEFAULT_ROOT).resolve():
        if not synthetic.is_complete_world(root):
            if is_main:
                synthetic.write_world_once(root, log)
            if world > 1:
                dist.barrier()
        return
    write = f"python synthetic.py synth --out {root}"
    if not root.is_dir():
        raise SystemExit(f"--data-root {root}: no such folder" + (
            f"; write a synthetic world there with `{write}`, or drop the flag for {data.SYNTH_DEFAULT_ROOT}"
            if synthetic_world else f" (expected the {args.dataset} layout; see docs/data.md)"))
    if synthetic_world and data.world_is_incomplete(root):
        raise SystemExit(f"--data-root {root}: an incomplete synthetic world (its writer was interrupted); write "
                         f"it again with `{write} --overwrite`")
    if synthetic_world and not (root / "classes.json").is_file():
        raise SystemExit(f"--data-root {root}: not a synthetic world (no classes.json); write one with `{write}` "
                         "into an empty folder, or give --dataset cityscapes / camvid / kitti for real data")


def claim_run_folder(args, out, is_main):
    """A fresh run must not replace another run's checkpoint or append to its log (running the same
    command twice would do both): it needs an empty --out, or --overwrite. A resumed run drops the
    log records after its checkpoint, since it repeats those iterations."""
    previous = [name for name in ("ckpt.pt", "best.pt", "log.jsonl") if (out / name).exists()]
    if previous and not args.resume and not args.overwrite:
        if "ckpt.pt" in previous:  # the hint names a file only where it exists
            raise SystemExit(f"--out {out} already holds a run ({', '.join(previous)}): continue it with "
                             f"`{command_line(args, '--method', args.method, '--resume', str(out / 'ckpt.pt'))}`, "
                             "or start again there with --overwrite")
        raise SystemExit(f"--out {out} holds the log of a run stopped before its first checkpoint (nothing to "
                         "resume): start again there with --overwrite, or choose another --out")
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues a run and --overwrite starts one afresh: choose one")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for name in previous:
                (out / name).unlink()
        if args.resume:
            truncate_log(out / "log.jsonl", read_checkpoint(args.resume)["iteration"])


def build_training(args, world, rank, device, log, outer_command):
    """The network, its optimizer and where the run starts -> dict with 'bare' (the network itself:
    checkpoints and validation read it), 'model' (what the loop calls: DDP- and compile-wrapped as
    asked), 'optimizer', 'flow_net' (TCC_fix's frozen flow network or None), 'clipped' (the
    parameters --clip-grad bounds), 'device', 'start', 'best', 'best_iteration' (from --resume, else
    0 / None), 'pending_validation' (a validation the resumed run owes first)."""
    encoder = world_encoder(args, world, log, outer_command)
    if encoder is not None:
        args.init, args.sources["init"] = [encoder], "derived"
    resume = read_checkpoint(args.resume) if args.resume else None
    if resume is not None and resume["method"] != args.method:
        raise SystemExit(f"--resume {args.resume}: a {resume['method']} checkpoint, not {args.method}")
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for every rerun
    net = build_model(args.method, args.num_classes, args.backbone, args.flow_backbone, args.max_displacement,
                      args.corr_stride, args.context, args.flow_context, args.corr_layer, args.match_input,
                      args.pass_through, args.fine_match, args.cost_volume)
    if args.no_dropout:  # dropout masks are the one thing that differs between 1 and N processes
        for module in net.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if resume is None:
        initialise(net, args, log)
    else:
        net.load_state_dict(resume["model"])
    flow_net = fixed_flow_network(args.flow_init, device, log) if args.flow_init else None
    if world > 1:
        net = synchronise_batchnorm(net, device)  # SyncBN only when it has something to sync
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(parameter_groups(net, args), args)
    start, best, best_iteration = 0, None, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start, best, best_iteration = resume["iteration"], resume.get("best"), resume.get("best_iteration")
        # each rank continues its own random stream (dropout); a run resumed on more ranks than it
        # was saved with gives the new ranks rank 0's
        set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    # --clip-grad bounds EFC's flow decoder only, the reason it exists (its gradients are 10-20x the
    # rest's early on): one norm over the whole network would scale the segmentation path's gradient
    # by the decoder's (docs/learning.md#choices-measured-on-the-world). Other methods clip every parameter.
    clipped = clipped_parameters(net, args.method)
    model = net
    if world > 1:
        # EFC's parameters that some steps leave without a gradient: the segmentation decoder in the
        # flow branch alone, the occlusion heads without occlusion (tcc-single, ul, ul-tc) and during
        # the flow warm-up. DDP must be told, or it waits for their gradients and fails.
        unused = args.method in ("efc", "flow")
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=unused)
    if args.compile:
        model = torch.compile(model)
    return {"bare": net, "model": model, "device": device, "optimizer": optimizer, "flow_net": flow_net, "clipped": clipped,
            "start": start, "best": best, "best_iteration": best_iteration,
            # a run stopped during a validation (its checkpoint written just before, without numbers)
            "pending_validation": resume is not None and resume.get("metrics") is None and (
                start == args.iterations or bool(args.val_every and start % args.val_every == 0))}


def clipped_parameters(net, method):
    """The parameters --clip-grad bounds (see build_training): EFC's flow decoder for efc and flow,
    every trainable parameter otherwise."""
    return [q for name, q in net.named_parameters() if q.requires_grad
            and (method not in ("efc", "flow") or name.startswith("flow."))]


def train_step(run, batch, args, iteration, world, out):
    """One optimiser step at 0-based `iteration` -> (lr, values, names): values[0] is the total loss,
    values[k + 1] the term names[k], each averaged over processes, so that every process sees the
    same numbers and takes the same decisions (a process stopping alone would leave the others
    waiting in the next collective)."""
    optimizer = run["optimizer"]
    lr = poly_lr(optimizer, args, iteration)  # set from the iteration alone: a resumed run needs no scheduler
    with torch.autocast(run["device"].type, dtype=torch.bfloat16, enabled=args.amp):
        total, terms = compute_loss(run["model"], batch, args, iteration, run["flow_net"])
    names = sorted(terms)  # a fixed order, the same on every process, for the one all_reduce below
    values = torch.stack([total.detach().float()] + [terms[n].float() for n in names])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    if not torch.isfinite(values).all():  # stop before the step: the weights are still the finite ones
        bad = ["total"] + names
        culprit = next(bad[k] for k in range(1, len(bad)) if not torch.isfinite(values[k])) \
            if not torch.isfinite(values[1:]).all() else "total"
        raise SystemExit(f"iteration {iteration + 1}: loss term '{culprit}' is not finite ({values.tolist()}); "
                         f"stopping. The last checkpoint, {out / 'ckpt.pt'}, is from before this iteration "
                         "and was checked finite when saved.")
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # under DDP the gradients are averaged over the processes here
    if args.clip_grad:  # EFC's flow decoder alone for efc / flow (build_training says why)
        torch.nn.utils.clip_grad_norm_(run["clipped"], args.clip_grad)
    optimizer.step()
    return lr, values, names


def to_device(items, device, channels_last):
    """A loader batch on `device` (EFC "+ UD" pairs flattened: merge_companions), image-like tensors
    in channels-last order when asked (the layout tensor cores prefer; the values are unchanged)."""
    batch = merge_companions({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                              for k, v in items.items()})
    if channels_last:
        batch = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                 for k, v in batch.items()}
    return batch


def log_record(done, args, lr, values, names, rate, device):
    """The log.jsonl record of iteration `done` and its printed line. Terms are logged unweighted
    (the weights are in the config record); `loss` is the weighted total that was optimised."""
    eta = (args.iterations - done) * args.batch / max(rate, 1e-9)
    record = {"iteration": done, "loss": values[0].item(), **{n: values[k + 1].item() for k, n in enumerate(names)},
              "lr": lr, "images_per_s": rate, "eta_s": eta, "peak_memory_mb": peak_memory_mb(device)}
    line = (f"it {done}/{args.iterations}  loss {record['loss']:.4f}  "
            + "  ".join(f"{n} {record[n]:.4f}" for n in names)
            + f"  lr {lr:.2e}  {rate:.1f} img/s  eta {eta / 60:.1f} min  peak {record['peak_memory_mb']:.0f} MB")
    return record, line


def summarise(args, out, end, best_iteration, seconds, log):
    """The end of a run (rank 0): where it stopped and how to continue (--stop-after), or the curves
    picture and where the checkpoint, the best weights and the log are."""
    if end < args.iterations:
        log(f"stopped after iteration {end} (--stop-after); continue with: "
            f"{command_line(args, '--method', args.method, '--resume', str(out / 'ckpt.pt'))}")
        return
    try:
        log(f"curves: {evaluate.draw_curves(out / 'log.jsonl', out / 'curves.png')}")
    except (OSError, ValueError) as error:  # a picture must not fail a finished run
        log(f"curves: not drawn ({one_line(error)})")
    where = (f"{out / 'best.pt'} (iteration {best_iteration}, weights only)" if (out / "best.pt").exists()
             else "the same file" if best_iteration == args.iterations else "no validation ran")
    log(f"done in {seconds / 60:.1f} min. checkpoint {out / 'ckpt.pt'} (best: {where}), log {out / 'log.jsonl'}")


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: the run ends after the iteration in progress, with its checkpoint, in one line
# ---------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Raised by the signal handler where dropping the work in progress loses nothing."""


@contextlib.contextmanager
def stop_on_signals(stop):
    """While inside: Ctrl-C (SIGINT) and SIGTERM (`kill`, a cluster's time limit) record their name
    in stop["signal"]. Where stop["abortable"] is true (waiting for data, validating, preparing)
    the handler raises Interrupted at once; elsewhere the iteration in progress runs to its end
    first, because a step cut midway would leave the weights and the optimizer state at different
    iterations, and only a finished iteration can be checkpointed and resumed bitwise."""
    def handler(signum, frame):
        stop["signal"] = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if stop["abortable"]:
            raise Interrupted

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def command_line(args, *flags):
    """The command that runs train.py with `flags` as this run was launched (torchrun for N > 1);
    --device is kept, since a checkpoint does not decide where it continues."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    launcher = "python train.py" if world == 1 else f"torchrun --nproc_per_node={world} train.py"
    device = ["--device", args.device] if args.device and "--device" not in flags else []
    return " ".join([launcher, *map(shlex.quote, [*flags, *device])])


def report_stop(args, out, stop, this_command, stage_of):
    """The one line of an interrupted run: where its last finished iteration is kept and the exact
    command that continues it; with no checkpoint yet, the command that starts it again (a fresh
    run's folder is emptied for it). stage_of: the command of the run this one is a stage of
    (world_encoder), which continues the stage by itself."""
    ckpt = out / "ckpt.pt"
    if stop["saved"] is not None and ckpt.is_file():
        hint = stage_of or command_line(args, "--method", args.method, "--resume", str(ckpt))
        return (f"stopped by {stop['signal']} after iteration {stop['saved']} of {args.iterations}; checkpoint "
                f"{ckpt}. Continue with: {hint}")
    if not args.resume:  # the config record is all this run wrote
        (out / "log.jsonl").unlink(missing_ok=True)
    return (f"stopped by {stop['signal']} before an iteration finished; nothing to keep. "
            f"Run again: {stage_of or this_command}")


# ---------------------------------------------------------------------------------------------
# The loop: train_step, logging, checkpoints (before every validation, so that a failing
# validation loses no training) and validations
# ---------------------------------------------------------------------------------------------
def append_log(out, record):
    """One JSON line of log.jsonl (rank 0)."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def write_checkpoint(run, args, iteration, metrics=None):
    """Save ckpt.pt (rank 0) after checking every weight is finite; -> the saved dict (rank 0).
    Every rank calls it: each one's RNG state is gathered, so that each continues its own stream."""
    world, out = run["world"], run["out"]
    rngs = [None] * world
    state = rng_state()
    if world > 1:
        dist.all_gather_object(rngs, state)
    else:
        rngs = [state]
    weights = run["bare"].state_dict()
    bad = evaluate.non_finite_tensors(weights)
    if bad:  # e.g. BatchNorm statistics of a forward pass that overflowed: never save them
        raise SystemExit(f"iteration {iteration}: {len(bad)} weight/buffer tensors hold NaN or inf (e.g. {bad[0]}); "
                         f"stopping without saving. The last checkpoint in {out} is intact")
    if not run["is_main"]:
        return None
    obj = {"method": args.method, "config": run["config"], "model": weights,
           "optimizer": run["optimizer"].state_dict(), "iteration": iteration, "best": run["best"],
           "best_iteration": run["best_iteration"], "rng": rngs, "metrics": metrics}
    save_checkpoint(out / "ckpt.pt", obj)
    return obj


def validate_and_record(run, args, iteration, obj, final):
    """Validate (rank 0), log it, and store its numbers in the checkpoint `obj` just written for
    this iteration; a new best also goes to best.pt. The best: highest mIoU; the flow branch alone:
    lowest EPE; Flow2Seg's flow-path stage: its flow path's mIoU (the fused output reads an image
    path that stage does not train)."""
    if run["is_main"]:
        metrics = evaluate.validate(run["bare"], run["config"], run["device"], max_items=args.val_items)
        score = (metrics["miou_flow_path"] if args.flow2seg_stage == "flow-path"
                 else metrics.get("miou", -metrics.get("epe_all", math.inf)))
        append_log(run["out"], {"iteration": iteration, "validation": evaluate.json_safe(metrics)})
        run["log"](f"validation at {iteration}{validation_scope(args, metrics)}: " + ", ".join(
            evaluate.format_metric(k, v) for k, v in metrics.items() if isinstance(v, float)))
        is_best = run["best"] is None or score > run["best"]
        if is_best:
            run["best"], run["best_iteration"] = score, iteration
        obj["metrics"], obj["best"], obj["best_iteration"] = metrics, run["best"], run["best_iteration"]
        save_checkpoint(run["out"] / "ckpt.pt", obj)
        if is_best:
            save_best(run["out"], obj, final)
    if run["world"] > 1:
        dist.barrier()
    run["model"].train()
    train_mode(run["bare"], args)


def validation_scope(args, metrics):
    """What a training validation covers, for its printed line: --val-items caps every validation
    set, and temporal consistency needs consecutive pairs, so it is read on the first snippets
    only; evaluate.py's numbers (every item) differ for the same checkpoint."""
    if not args.val_items:
        return ""
    pairs = f", temporal consistency over {metrics['consistency_pairs']} frame pairs" \
        if "consistency_pairs" in metrics else ""
    return f" (at most {args.val_items} items per set{pairs}; evaluate.py takes all)"


def next_batch(iterator, iteration, out, stop, abortable):
    """The loader's next batch; a signal aborts the wait where `abortable` (one process reading its
    own data: nothing is in progress while it waits; under DDP a process must not leave the others'
    collectives)."""
    stop["abortable"] = abortable
    try:
        return next(iterator)
    except (OSError, ValueError) as error:  # also raised again here from a DataLoader worker
        raise SystemExit(f"training data, iteration {iteration + 1}: {one_line(error)}; the last checkpoint "
                         f"in {out} is intact") from None
    finally:
        stop["abortable"] = False


def stop_everywhere(stop, world, device):
    """True once a signal has reached any process: all of them stop after the same iteration (one
    stopping alone would leave the others waiting in the next collective)."""
    if world == 1:
        return stop["signal"] is not None
    flag = torch.tensor([float(stop["signal"] is not None)], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def train_loop(run, args, loader, end, stop):
    """Iterations run["start"] + 1 .. `end`: a step, its log line, checkpoints and validations; a
    signal ends the loop after the iteration in progress (stop_on_signals), whose checkpoint is
    written if it is not yet. stop["saved"] follows the iteration held by ckpt.pt."""
    out, world, is_main, device = run["out"], run["world"], run["is_main"], run["device"]
    run["model"].train()  # the DDP wrapper too
    train_mode(run["bare"], args)
    done, t0 = run["start"], time.time()
    try:
        if run["pending_validation"]:  # a run stopped during this iteration's validation repeats it
            stop["abortable"] = world == 1
            validate_and_record(run, args, done, read_checkpoint(out / "ckpt.pt"), done == args.iterations)
            stop["saved"] = done
            stop["abortable"] = False
        iterator = iter(loader)
        seen, step_time = 0, time.time()
        for iteration in range(run["start"], end):
            # A signal may cut the wait short only without worker processes: one cut midway through
            # receiving a batch from a worker leaves that worker a broken connection to report.
            items = next_batch(iterator, iteration, out, stop, world == 1 and args.workers == 0)
            if world == 1 and stop["signal"]:  # it came while the batch was fetched: stop before stepping
                raise Interrupted
            batch = to_device(items, device, args.channels_last)
            lr, values, names = train_step(run, batch, args, iteration, world, out)
            seen += args.batch
            done = iteration + 1
            if is_main and (done % args.log_every == 0 or done in (run["start"] + 1, args.iterations)):
                record, line = log_record(done, args, lr, values, names, seen / max(time.time() - step_time, 1e-9),
                                          device)  # the first line is a sign of life
                append_log(out, record)
                run["log"](line)
                seen, step_time = 0, time.time()
            paused = time.time()
            final = done == args.iterations
            validating = final or (args.val_every and done % args.val_every == 0)
            # Asked once per iteration, after its step: a signal that came during the step is
            # honoured here, with the step complete.
            stopping = stop_everywhere(stop, world, device)
            if validating or done % args.ckpt_every == 0 or done == end or stopping:
                obj = write_checkpoint(run, args, done)  # before validating: a failure there loses no training
                stop["saved"] = done
            if validating and not stopping:  # a stopped run validates when resumed (pending_validation)
                stop["abortable"] = world == 1  # the checkpoint of `done` is written: nothing to lose
                validate_and_record(run, args, done, obj, final)
                stop["abortable"] = False
            step_time += time.time() - paused  # images/s and ETA count training time only
            if stopping:
                break
    except Interrupted:  # raised only where nothing was half done: the weights are those of `done`
        stop["abortable"] = False
        if stop["saved"] != done and done > 0:  # stopped while waiting for the next batch: keep the last step
            write_checkpoint(run, args, done)
            stop["saved"] = done
    return done, time.time() - t0


# ---------------------------------------------------------------------------------------------
# The run, in the order main() takes its steps
# ---------------------------------------------------------------------------------------------
def prepare(args, world, rank, device, log, outer_command):
    """Data, run folder and network -> (run, loader): run is build_training's dict plus what the
    loop needs ('out', 'world', 'is_main', 'log', 'config')."""
    out, is_main = Path(args.out), rank == 0
    ensure_data_root(args, world, is_main, log)
    claim_run_folder(args, out, is_main)
    if args.flow_from:  # Flow2Seg on EFC's flow: computed once, by rank 0, into the run folder
        args.flow_dir, args.sources["flow_dir"] = str(out / "flows"), "derived"
        if is_main:
            fill_flow_dir(args.flow_from, args.data_root, args.flow_dir, device)
        if world > 1:
            dist.barrier()
    try:
        train_set = training_dataset(args)
    except (OSError, ValueError) as error:  # a folder without the dataset's layout
        raise SystemExit(f"--data-root {args.data_root}: {one_line(error)}") from None
    # KITTI has no labels: the flow branch's EFCNet keeps a Cityscapes-sized (19-class) head.
    args.num_classes = getattr(train_set, "num_classes", len(data.CITYSCAPES_CLASSES))
    run = build_training(args, world, rank, device, log, outer_command)
    # The data stream starts where the run does: a resumed run draws the batches the uninterrupted
    # one would have drawn next (GlobalBatches, SeededItems).
    sampler = GlobalBatches(len(train_set), args.batch, world, rank, args.seed, run["start"])
    # The loader's own generator: its per-worker seeds must not consume the global generator, whose
    # state (dropout) is saved in checkpoints.
    loader = DataLoader(SeededItems(train_set, args.seed), batch_sampler=sampler, num_workers=args.workers,
                        worker_init_fn=data.worker_init_fn, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))
    settings = {k: v for k, v in vars(args).items() if k != "sources"}  # the checkpoint's "config"
    if is_main:  # every validation file, read once now: a broken one must not wait for the first validation
        try:
            evaluate.check_validation_data(settings, args.val_items)
        except (OSError, ValueError) as error:
            raise SystemExit(f"validation data: {one_line(error)}") from None
    log(f"{args.method}{' (' + args.ablation + ')' if args.ablation else ''} on {args.dataset} ({args.data_root}): "
        f"{len(train_set)} training items, {args.num_classes} classes, {args.backbone}, crop {args.crop[0]}x"
        f"{args.crop[1]}, batch {args.batch} on {world} process(es), {args.iterations} iterations, "
        f"{args.optimizer} lr {args.lr}, device {device}{', bf16' if args.amp else ''}")
    log(config.describe(args))
    if is_main:  # the log's first record of a run (or of its resumption) is the whole config, and whence
        append_log(out, {"iteration": run["start"], "resumed": bool(args.resume), "config": settings,
                         "sources": args.sources})
    run.update(out=out, world=world, is_main=is_main, log=log, config=settings)
    return run, loader


def main(argv=None, stage_of=None):
    """A training run: processes, then data, run folder and network (prepare), the loop
    (train_loop) and a summary. Every process runs this; rank 0 alone prints and writes.
    Ctrl-C or SIGTERM ends it with one line (report_stop) and exit status 130 or 143. stage_of: the
    command of the run this one is a stage of (world_encoder's PSPNet)."""
    args = config.parse_args(argv)
    world, rank, device = start_processes(args)
    out, is_main = Path(args.out), rank == 0
    this_command = command_line(args, *(sys.argv[1:] if argv is None else argv))

    def log(message):
        if is_main:
            print(message, flush=True)

    # stop_on_signals records the signal; "saved" is the iteration ckpt.pt holds (train_loop keeps it)
    stop = {"signal": None, "abortable": True, "saved": None}
    with stop_on_signals(stop):
        try:
            run, loader = prepare(args, world, rank, device, log, stage_of or this_command)
            stop["saved"] = run["start"] if args.resume else None
            end = args.iterations if args.stop_after is None else min(args.iterations, run["start"] + args.stop_after)
            stop["abortable"] = False
            done, seconds = train_loop(run, args, loader, end, stop)
        except Interrupted:
            pass
    if stop["signal"]:
        if is_main:
            print(report_stop(args, out, stop, this_command, stage_of), file=sys.stderr, flush=True)
        raise SystemExit(130 if stop["signal"] == "Ctrl-C" else 143)  # 128 + the signal's number, as shells report
    if is_main:
        summarise(args, out, done, run["best_iteration"], seconds, log)
    if world > 1:
        # Teardown, the same on every rank: the loader's worker processes ended with train_loop
        # (not during interpreter shutdown, while the process group may already be gone), and no
        # rank destroys the group before all have left the loop (rank 0 is still writing the last
        # checkpoint when the others finish; tearing a gloo group down under a peer is a known
        # source of exit hangs).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
