"""Benchmarks: FLOPs, speed and memory of every network, of one training step per method, and of the
correlation and warping layers against their alternatives; and one command that checks the GPU goals.

    python bench.py [--device cpu|cuda] [--size H W] [--crop H W] [--batch N] [--backbones B ...]
                    [--amp] [--channels-last] [--parts P ...] [--micro-shapes BxCxHxW[:d:s] ...] [--json OUT]
    python bench.py --gpu-check [DIR] [--dry-run]

prints one table (and, below it, the micro-benchmarks, the training-step shares and the goals) and
writes the same numbers, with the machine they came from, as JSON. Parts (`--parts`; the first four
by default):
  flops      GFLOPs of PSPNet, EFCNet inference and Flow2SegNet at 713x713 and 1024x2048 for every
             backbone, counted by torch.utils.flop_counter on the meta device (exact, no memory), the
             ratios to PSPNet of the same backbone, and Flow2Seg's extra FLOPs per module.
  inference  the same networks at --size: ms per image, images/s, peak memory, time ratios to PSPNet.
  training   one step of train.py (train.compute_loss, train.parameter_groups, train.make_optimizer;
             forward, loss, backward, gradient clipping where train.py clips, optimiser) for psp,
             flow2seg, efc and flow: ms/step, images/s (pairs for efc and flow, as train.py logs), peak
             memory, GFLOPs per step and the achieved rate against the matmul peak, the share of the step
             in each region (see `region_shares`) and the time ratio to psp.
  micro      at each of --micro-shapes (default: MICRO_MAPS and SWEEP_MAPS), forward + backward, side by
             side: warp.correlation's two paths (tiled, all-pairs), warp.correlation against the
             per-displacement loop (reference_correlation), warp.backward_warp against F.grid_sample;
             time and peak memory of each, and where the all-pairs path stops being the faster.
  ddp        one EFC step under DistributedDataParallel on one process (NCCL on CUDA, gloo on the CPU,
             SyncBatchNorm, as train.py under torchrun) against the same step without it: equal loss and
             gradients, and the time ratio.
The matmul peak (bf16 on CUDA, float32 on the CPU unless --amp) is measured in the same run.

Timing (`interleaved`, the one method of every comparison): the things compared are warmed up, then
timed in rounds, each once per round, the order alternating (AB, BA, AB, ...); a ratio is the median
of the per-round ratios, reported with its spread (min-max over rounds, and the quartiles in the
JSON). A call shorter than MIN_TIMING_S is repeated within its timing. The other processes' share of
the machine's CPU time is measured per round: a round above LOADED is taken again (up to as many
retakes as rounds), and rounds still loaded are counted in the table ("loaded").

Peak memory is what the benchmark's own tensors need, measured in one more run after the timed ones:
the bytes held when the run starts (parameters, buffers, gradients, optimiser state, inputs) plus the
largest increase during the run. On CUDA the increase comes from torch's allocator
(max_memory_allocated); on the CPU from the process's resident set (VmHWM, reset through
/proc/self/clear_refs after malloc_trim), which is coarser.

--gpu-check runs, on one GPU, in under 8 minutes (gpu_check_plan): this file with --device cuda --amp
--channels-last (the EFC-R101 pair's memory, PSPNet-R101's share of the bf16 matmul peak, the
correlation + warping share of an EFC step), the ddp part (NCCL), and a short `train.py --method efc
--compile` run; then prints every goal with its value, met or missed. --dry-run prints the plan only.

Defaults: on CUDA the papers' sizes (inference 1024x2048; crops 713x713 for psp, efc and flow and
832x832 for flow2seg), ResNet-50 and -101. On the CPU sizes that take seconds per step (inference
256x512, crop 192x192 for every method) and ResNet-101 only; on 2 cores the micro part alone takes
minutes (the per-displacement loop at 90x90 and the all-pairs path at 1024x90x90 take 10-40 s a call).
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import math
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

import config
import data
import losses
import model
import train
import warp

PAPER_SIZES = ((713, 713), (1024, 2048))  # the sizes of the FLOP ratios (EFC crops; Cityscapes frames)
# Training crops (H, W): EFC "Implementation Details" crops to 713x713, and psp and flow share it ("All
# experiments use the same training setting", EFC "Ablation Study"); Flow2Seg 4.2 crops images to
# 832x832 (its 1024x1024 flow crop is not modelled: here the flow has the image's crop).
PAPER_CROPS = {"psp": (713, 713), "efc": (713, 713), "flow": (713, 713), "flow2seg": (832, 832)}
# psp first: training_rows takes the first method's step as the base of every time ratio.
METHODS = ("psp", "flow2seg", "efc", "flow")
# Prefix of the profiler labels of the step's regions: it tells region_shares our labels apart from
# the op events (aten::..., autograd::...) that torch.profiler records around and inside them.
REGION = "bench::"
# Regions of a training step; "correlation" lies inside "flow decoder" and "warping" inside "losses".
REGIONS = ("encoder", "seg decoder", "flow decoder", "flow path", "fusion", "losses", "optimizer",
           "correlation", "warping")
TOP_REGIONS = REGIONS[:7]  # disjoint; "other" is the rest of the step

# Timing (see `interleaved`). A timing lasts at least MIN_TIMING_S: a shorter call is repeated back
# to back within it (as timeit's autorange does), so that the clock and the load, counted in 10 ms
# ticks, resolve it.
MIN_TIMING_S = 0.1
# A round during which other processes took more than this share of the machine's CPU time is taken
# again. A round of two timings lasts >= 0.2 s: 40 ticks on 2 cores, one tick 2.5 %, so 10 % is a
# few ticks of real work, not the counters' rounding. Why it matters on a small machine: torch's
# parallel regions wait for every thread, and a thread whose core another process holds waits for
# the scheduler: on the 2-core machine under load a 20x20 bmm took 16 ms with 2 threads, 2 us with one.
LOADED = 0.10

# Micro-benchmark features (--micro-shapes default): layer3 of R18 (256 channels) and of R50/R101
# (1024) for 2 x --batch items, since EFCNet.forward_pair runs the flow decoder once on the pairs
# in both directions, [(a, b); (b, a)], and L_cons warps such features. Map (H, W) -> (max
# displacement, stride) of the recipe that makes it: 713x713 crops (EFC) give 90x90 at stride 8
# with EFC's d = 20, s = 2; train.py's quick recipe trains efc and flow on whole 128x256 frames of
# the world: 16x32 with d = 4, s = 1.
MICRO_MAPS = {(90, 90): (20, 2), (16, 32): (4, 1)}
MICRO_CHANNELS = (256, 1024)
# Map sides between, at SWEEP_CHANNELS and d = 20, s = 2, where warp.correlation's all-pairs path
# stops being the faster (all_pairs_crossover): warp.ALL_PAIRS_MAX_PIXELS is set from them. The
# crossover moves with the channels (on the CPU at 90x90: all-pairs 2.4x the tiled time at 256
# channels, 0.89x at 1024), so it is read at one channel count: ResNet-18's layer3, the quick recipe's.
SWEEP_MAPS = (12, 24, 32, 45, 64)
SWEEP_CHANNELS = 256
# The per-displacement loop runs at shapes of at most this many channels: its time, like the
# correlation's, is linear in C, and at 1024 x 90 x 90 it takes minutes a call on the CPU.
REFERENCE_MAX_CHANNELS = 256
# --gpu-check's bound on the gradients of one EFC step with and without DDP (relative L2 difference):
# one process changes nothing in the arithmetic, but bf16 autocast rounds to 8 bits and cudnn.benchmark
# may pick other convolution algorithms for the second network.
DDP_TOLERANCE = 1e-2


def progress(message):
    """A progress line on stderr, so that stdout holds the report alone (and can be redirected)."""
    print(message, file=sys.stderr, flush=True)


def short(backbone):
    """'resnet101' -> 'R101', the backbone as the tables' network names write it."""
    return "R" + backbone.removeprefix("resnet")


def sync(device):
    """Wait for every queued CUDA kernel; nothing on the CPU. CUDA launches return before the work is
    done, so a clock read without this measures the launch, not the computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device):
    """Where the numbers come from: CPU model, cores, torch threads, versions, date and, on CUDA, the
    GPU and its memory in GiB. Stored with every report: a time compares only with times from the
    same machine."""
    cpu = platform.processor() or platform.machine()
    # platform.processor() is often empty or just the architecture on Linux: /proc/cpuinfo names the model.
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return info


# ---------------------------------------------------------------------------------------------
# Measuring: time, memory, FLOPs
# ---------------------------------------------------------------------------------------------
def tensor_bytes(*collections):
    """Bytes of the distinct storages among the tensors in `collections` (iterables of tensors or None)."""
    # Keyed by storage, not by tensor: a view (a slice, a reshape) shares its base's bytes and must not
    # count twice.
    seen, total = set(), 0
    for tensors in collections:
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _proc_status(key):
    """The value of the /proc/self/status line starting with `key` (e.g. 'VmRSS:'), in bytes (the
    kernel writes kB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_memory(fn, device, *held):
    """Peak memory of one run of fn(), in bytes: the tensors in `held` (the network's state, the
    inputs) plus the largest increase of memory in use during the run. CUDA: torch's allocator. CPU:
    the process's resident set, after handing freed heap memory back to the system (malloc_trim) and
    resetting its high-water mark (/proc/self/clear_refs, Linux); None where that is not possible."""
    # Both devices report the same quantity: the bytes of `held` plus the run's own growth. An absolute
    # reading could not be compared: the CPU's resident set also holds the interpreter and libraries,
    # and CUDA's allocated bytes whatever earlier runs left alive.
    held = tensor_bytes(*held)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return held + torch.cuda.max_memory_allocated(device) - start
    try:
        # Without the trim, memory freed by earlier runs stays in malloc's free lists and the run reuses
        # it without the resident set growing: its need would be under-counted.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = _proc_status("VmRSS:")
    except (OSError, StopIteration):  # no glibc, or no writable /proc (not Linux)
        fn()  # still run once, so that the caller's sequence of runs is the same either way
        return None
    fn()
    return held + max(_proc_status("VmHWM:") - start, 0)


def cpu_ticks():
    """(busy clock ticks of the whole machine, clock ticks of this process, wall seconds); None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # from field 3 on: utime, stime are fields 14, 15
    except OSError:
        return None
    # Busy = all but idle and iowait (steal counts as busy: the hypervisor gave that time to another
    # guest). own[11], own[12] are fields 14 and 15 (utime, stime), summed over all of this process's
    # threads; the split at the last ")" skips field 2, the command name, which may contain spaces.
    return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12]), time.perf_counter()


def other_load(before, min_seconds=1.0):
    """Share of the machine's CPU time that other processes (and the hypervisor: steal) took since
    `before` = cpu_ticks(): timings taken while it is more than a few % are not clean. None off Linux
    and for windows under `min_seconds`."""
    after = cpu_ticks()
    if before is None or after is None or after[2] - before[2] < min_seconds:
        return None  # clock ticks are 10 ms: a window of a few ticks says little
    capacity = (after[2] - before[2]) * os.sysconf("SC_CLK_TCK") * os.cpu_count()  # ticks all cores had
    # (machine busy - our own) / capacity, clamped to [0, 1]: the counters are in 10 ms ticks and are
    # read one after the other.
    return min(max((after[0] - before[0]) - (after[1] - before[1]), 0) / capacity, 1.0)


def timed(fn, device):
    """Run fn() once; -> (its result, wall seconds), synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def interleaved(fns, device, rounds, warmup):
    """Time the callables `fns` (name -> fn, each one unit of work: a forward + backward, a training
    step) against each other: the method of every comparison in this file.

      * Warm-up: `warmup` untimed calls of each (at least one: first calls allocate, fault pages in
        and, on CUDA, autotune), the last of which sizes the timing: `calls` back-to-back calls
        lasting at least MIN_TIMING_S (one call for anything slower).
      * Rounds: every fn is timed once per round, in the order of `fns` in even rounds and reversed in
        odd ones (AB, BA, AB, ...), so that whatever a position in the round costs or gains (caches
        warmed or flushed by the call before, a clock that rises or falls) falls on each fn equally;
        ratios are taken within a round (`ratio_fields`), where a drift between rounds cancels.
      * Load: other_load over each round. A round above LOADED is taken again, in the same order, up
        to `rounds` retakes in all; rounds still loaded after that are kept and counted.
    -> {"seconds": {name: [seconds per call, one per round]}, "loads": [other load per round, or None],
        "loaded": rounds kept above LOADED, "retaken": rounds taken again, "calls": {name: calls per timing}}
    """
    names = list(fns)
    calls = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            _, last = timed(fns[name], device)
        calls[name] = max(1, math.ceil(MIN_TIMING_S / max(last, 1e-9)))

    def run(name):
        for _ in range(calls[name]):
            fns[name]()

    seconds, loads, retaken = {name: [] for name in names}, [], 0
    while len(loads) < rounds:
        order = names if len(loads) % 2 == 0 else names[::-1]
        before = cpu_ticks()
        times = {name: timed(lambda: run(name), device)[1] / calls[name] for name in order}
        load = other_load(before, min_seconds=MIN_TIMING_S)
        if load is not None and load > LOADED and retaken < rounds:
            retaken += 1
            continue
        for name in names:
            seconds[name].append(times[name])
        loads.append(load)
    loaded = sum(load is not None and load > LOADED for load in loads)
    return {"seconds": seconds, "loads": loads, "loaded": loaded, "retaken": retaken, "calls": calls}


def spread(values):
    """Median, min, max and quartiles of per-round values (a single round: all the same)."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": quartiles[0],
            "q3": quartiles[2]}


def ratio_fields(key, seconds, base_seconds):
    """A time ratio of two things timed in the same rounds, as report fields: `key` the median of the
    per-round ratios, `key`_spread [min, max] and `key`_iqr [q1, q3] over the rounds."""
    s = spread([t / b for t, b in zip(seconds, base_seconds)])
    return {key: s["median"], f"{key}_spread": [s["min"], s["max"]], f"{key}_iqr": [s["q1"], s["q3"]]}


def load_fields(timing):
    """The other processes' load during an `interleaved` timing, as report fields: other_load, the
    largest of its rounds (None where not measured), the load of every round, the rounds kept above
    LOADED and the rounds taken again."""
    measured = [load for load in timing["loads"] if load is not None]
    return {"other_load": max(measured, default=None), "round_loads": timing["loads"],
            "loaded_rounds": timing["loaded"], "retaken_rounds": timing["retaken"], "runs": len(timing["loads"])}


def count_flops(fn):
    """FLOPs of fn() (forward and, if fn runs it, backward) as torch.utils.flop_counter counts them:
    2 per multiply-add of convolutions and matmuls; elementwise ops, pooling, interpolation and
    gathers count 0. -> (total, {module name: flops})."""
    with FlopCounterMode(display=False) as counter:
        fn()
    # get_flop_counts() keys: 'Global' and every module as a dotted path under the root's class name
    # ('Flow2SegNet.flow_backbone.layer4'). An op counts for every module on the call stack, so a
    # module's total includes its children's: 'flow_backbone.layer4' is part of 'flow_backbone'.
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def matmul_peak(device, dtype, size, repeats):
    """The rate of a large square matmul (n^3 multiply-adds = 2 n^3 FLOPs): the best of `repeats`
    timings of a few back-to-back products, after one warm-up. -> FLOP/s."""
    # The best, not the median: a peak is what the machine can do, and every disturbance only slows it.
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.matmul(a, b)  # the warm-up, and the output buffer: the timed products allocate nothing
    # Products per timing: 10 on CUDA, where one 8192^3 product (1.1 TFLOP) takes milliseconds, so that
    # the synchronisation and clock reads around a timing stay a small part of it; 2 on the CPU, where
    # one 2048^3 product (17 GFLOP) takes about 0.13 s at docs/benchmarks.md's 0.13 TFLOP/s.
    inner = 10 if device.type == "cuda" else 2

    def products():
        for _ in range(inner):
            torch.matmul(a, b, out=out)

    best = min(timed(products, device)[1] for _ in range(max(repeats, 3))) / inner
    return 2 * size ** 3 / best


# ---------------------------------------------------------------------------------------------
# 1. FLOPs at the papers' sizes, on the meta device
# ---------------------------------------------------------------------------------------------
def inference_networks(backbone, classes):
    """name -> (network, whether it takes a flow): PSPNet, EFCNet (inference path), Flow2SegNet
    (flow path ResNet-18, as in the paper). Built on the current default device.
    PSPNet first: flop_rows and inference_rows take the first network as the base of their ratios."""
    return {f"PSPNet-{short(backbone)}": (model.PSPNet(classes, backbone), False),
            f"EFCNet-{short(backbone)} inference": (model.EFCNet(classes, backbone), False),
            f"Flow2SegNet-{short(backbone)}+R18": (model.Flow2SegNet(classes, backbone, "resnet18"), True)}


def inputs_of(takes_flow, batch, size, device):
    """A network's forward inputs: (image,) or (image, flow), image (B, 3, H, W), flow (B, 2, H, W) in
    pixels, channel 0 = u. Random values: the FLOPs and the dense layers' time depend on shapes alone."""
    image = torch.randn(batch, 3, *size, device=device)  # normalised images are O(1)
    return (image, 4 * torch.randn(batch, 2, *size, device=device)) if takes_flow else (image,)


def flop_rows(backbones, classes):
    """GFLOPs per image in eval mode at 713x713 and 1024x2048 (flow computation excluded for
    Flow2Seg, as in the paper: its flow is an input), and Flow2Seg's extra FLOPs per module."""
    # The meta device: tensors with shapes and no storage, so R101 at 1024x2048 costs neither memory nor
    # time; FlopCounterMode counts from the shapes, exactly.
    rows, breakdown = [], []
    for backbone in backbones:
        with torch.device("meta"):
            networks = inference_networks(backbone, classes)
        for size in PAPER_SIZES:
            base = None
            for name, (net, takes_flow) in networks.items():
                net.eval()  # inference's FLOPs: PSPNet.decode skips the auxiliary head outside training
                with torch.device("meta"), torch.no_grad():
                    inputs = inputs_of(takes_flow, 1, size, "meta")
                    flops, per_module = count_flops(lambda: net(*inputs))
                base = flops if base is None else base  # PSPNet's, of this backbone and size
                rows.append({"network": name, "backbone": backbone, "size": list(size), "gflops": flops / 1e9,
                             "vs_pspnet": flops / base})
                if takes_flow:
                    # Flow2Seg's image path is a PSPNet of the same backbone, so flops - base is what the
                    # flow path adds: flow_backbone + flow_head + fusion (the upsampling counts 0), with
                    # flow_backbone.layer4 shown as the part of flow_backbone it is.
                    root = type(net).__name__
                    extra = {part: per_module.get(f"{root}.{part}", 0) / 1e9
                             for part in ("flow_backbone", "flow_backbone.layer4", "flow_head", "fusion")}
                    breakdown.append({"network": name, "size": list(size), "image_path_gflops": base / 1e9,
                                      **{f"{part}_gflops": v for part, v in extra.items()},
                                      "extra_gflops": (flops - base) / 1e9})
    return rows, breakdown


# ---------------------------------------------------------------------------------------------
# 2. Inference at --size
# ---------------------------------------------------------------------------------------------
def to_device(net, device, channels_last):
    """net moved to `device`, its 4-D weights in channels_last (NHWC) with --channels-last, as
    train.py's flag does; returns net (moved in place)."""
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def layout(x, channels_last):
    """x in channels_last if asked and 4-D (images, flows); labels (B, H, W) have no channel axis."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def inference_rows(args, device):
    """One row per network and backbone: ms per image (median over rounds), images/s, GFLOPs per image
    at --size, peak memory, the time ratio to PSPNet with its spread, and the other processes' load.
    The three networks are timed in the same rounds (`interleaved`)."""
    rows = []
    for backbone in args.backbones:
        progress(f"inference {short(backbone)} at {args.size[0]}x{args.size[1]}")
        torch.manual_seed(0)
        networks = inference_networks(backbone, args.classes)
        psp, efc = list(networks.values())[0][0], list(networks.values())[1][0]
        # EFCNet.forward(image) is its PSPNet alone (EFC: "no extra calculation in inference"); built
        # after PSPNet, it drew other random weights. Copied, the two rows run the same computation,
        # so their time ratio can differ from 1 only by noise and the wrapper's call.
        efc.seg.load_state_dict(psp.state_dict())  # the same weights: the same computation
        runs = {}
        for name, (net, takes_flow) in networks.items():
            to_device(net, device, args.channels_last).eval()
            inputs = inputs_of(takes_flow, args.infer_batch, args.size, device)
            inputs = tuple(layout(x, args.channels_last) for x in inputs)
            runs[name] = {"net": net, "inputs": inputs}

        def run(entry):
            # inference_mode: no autograd records at all; bf16 autocast only with --amp.
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                entry["net"](*entry["inputs"])

        for entry in runs.values():  # an untimed first run that counts the FLOPs
            # (FlopCounterMode intercepts every op); interleaved's own warm-up follows
            entry["flops"], _ = count_flops(lambda: run(entry))
        timing = interleaved({name: (lambda e=entry: run(e)) for name, entry in runs.items()}, device,
                             args.repeats, args.warmup)
        for entry in runs.values():  # memory last: on the CPU, peak_memory hands freed memory back to the system
            entry["peak"] = peak_memory(lambda: run(entry), device, entry["net"].parameters(), entry["net"].buffers(),
                                        entry["inputs"])
        base = timing["seconds"][next(iter(runs))]  # PSPNet's, round by round
        for name, entry in runs.items():
            per_round = timing["seconds"][name]  # seconds of one batch; per image below (n images)
            seconds, n = statistics.median(per_round), args.infer_batch
            rows.append({"network": name, "backbone": backbone, "size": list(args.size), "batch": n,
                         "gflops_per_image": entry["flops"] / n / 1e9, "ms_per_image": 1000 * seconds / n,
                         "images_per_s": n / seconds, **ratio_fields("vs_pspnet_time", per_round, base),
                         "peak_mb": None if entry["peak"] is None else entry["peak"] / 2 ** 20,
                         "ms_runs": [1000 * t / n for t in per_round], **load_fields(timing)})
        del runs, networks, psp, efc  # every reference, so that release() can free the networks
        release(device)
    return rows


def release(device):
    """Free what deleted networks held before the next backbone: gc collects what reference cycles
    keep alive, and on CUDA the caching allocator hands its cached blocks back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 3. One training step of train.py
# ---------------------------------------------------------------------------------------------
def training_batch(method, batch, crop, classes, device, channels_last):
    """Random inputs of the shapes train.py's datasets give: normalised images, int64 labels (the
    second frame of an EFC pair unlabelled, 255), Flow2Seg's flow in pixels.
    efc and flow get `batch` pairs: image_a, image_b (B, 3, H, W). train.py's full EFC ("+ UD")
    items hold a labelled and an unlabelled pair each (train.merge_companions), so its --batch N
    means 2N pairs; here --batch N is N pairs, each with a labelled first frame."""
    def image():
        return torch.randn(batch, 3, *crop, device=device)

    def labels():
        return torch.randint(0, classes, (batch, *crop), device=device)

    # (B, H, W) int64 train ids in [0, classes): every pixel labelled, so the cross-entropy covers all.
    if method == "psp":
        items = {"image": image(), "label": labels()}
    elif method == "flow2seg":
        items = {"image": image(), "label": labels(), "flow": 4 * torch.randn(batch, 2, *crop, device=device)}
    else:
        items = {"image_a": image(), "image_b": image(), "label_a": labels(),
                 "label_b": torch.full((batch, *crop), losses.IGNORE_INDEX, device=device)}
    return {k: layout(v, channels_last) for k, v in items.items()}


def training_step(net, batch, args, optimizer, clipped, device):
    """The body of train.main's loop (the learning-rate schedule, autocast, train.compute_loss,
    backward, train.py's gradient clipping of `clipped`, the optimiser), without its logging.
    net: the network, or its DistributedDataParallel wrapper. -> the loss (detached)."""
    # The paper recipe's flow_warmup is 0, so this is iteration 0: lr factor 1, and for efc and flow
    # compute_loss runs EFC eq. (9)'s terms, not the warm-up's regression (iteration < flow_warmup is False).
    iteration = args.flow_warmup  # the first step of the paper's losses (after the flow warm-up)
    train.poly_lr(optimizer, args, iteration)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        total, _ = train.compute_loss(net, batch, args, iteration)
    # zero_grad after the forward, as train.py: the previous step's gradients are alive during the
    # forward (step_peak_memory counts them as held).
    with record_function(REGION + "optimizer"):
        optimizer.zero_grad(set_to_none=True)
    # The backward has no label of its own: region_shares gives each autograd node to the region of
    # the forward op that created it.
    total.backward()
    with record_function(REGION + "optimizer"):
        # config.parse_args sets clip_grad 10 for efc and flow (their flow decoder alone) and 0 (off)
        # for psp and flow2seg: the same parameters as train.py's.
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(clipped, args.clip_grad)
        optimizer.step()
    return total.detach()


@contextlib.contextmanager
def labelled_regions(net):
    """Wrap the calls that make up a step's regions in profiler labels, for one profiled step; the
    network, warp.py and losses.py are unchanged afterwards. Labels: the shared encoder
    (PSPNet.encode), the decoders (PSPNet.decode, EFC's FlowDecoder, Flow2Seg's flow path and
    fusion), warp.correlation, warp.backward_warp and the losses train.compute_loss calls."""
    # Patching, rather than labels written into model.py, warp.py and losses.py, keeps profiling out of
    # the code the papers are read against. It works because every call site looks the name up when it
    # runs: net.flow(...) finds an instance attribute "forward" before the class's method, model.py
    # calls warp.correlation and losses.py warp.backward_warp through the module, and train.py calls
    # losses.efc_loss likewise (efc_loss and flow2seg_loss then call the patched segmentation_loss,
    # giving nested "losses" labels, which region_shares counts once).
    patches = []

    def label(owner, name, region):
        original = getattr(owner, name)

        def labelled(*a, **k):
            with record_function(REGION + region):
                return original(*a, **k)

        # What to restore: None for a method (it lives on the class, not in the instance's __dict__),
        # the original function for a module attribute.
        patches.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, labelled)

    # The PSPNet inside each network: psp itself, Flow2Seg's image path (Image2Seg), EFC's segmentation branch.
    seg = net if isinstance(net, model.PSPNet) else net.image if isinstance(net, model.Flow2SegNet) else net.seg
    label(seg, "encode", "encoder")
    label(seg, "decode", "seg decoder")
    if isinstance(net, model.EFCNet):
        label(net.flow, "forward", "flow decoder")
    if isinstance(net, model.Flow2SegNet):
        label(net.flow_backbone, "forward", "flow path")
        label(net.flow_head, "forward", "flow path")
        label(net.fusion, "forward", "fusion")
    label(warp, "correlation", "correlation")
    label(warp, "backward_warp", "warping")
    for name in ("segmentation_loss", "flow2seg_loss", "efc_loss"):
        label(losses, name, "losses")
    try:
        yield
    finally:
        for owner, name, before in reversed(patches):
            if before is None:
                delattr(owner, name)  # an instance attribute we added: the class's method shows again
            else:
                setattr(owner, name, before)


def region_shares(events, step_us, cuda):
    """Share of a profiled step spent in each region, forward and backward together.

    Forward: the duration of each region's label (the outermost of nested labels of the same name).
    Backward: every autograd node is timed by its 'autograd::engine::evaluate_function' event, whose
    sequence number is that of the forward op that created the node; the node counts for the regions
    around that op (the last-started forward op with that number: composite and no-grad ops record
    the number of the next node as well). Durations are CPU wall time on the CPU and GPU kernel time
    on CUDA; shares are of the step's wall time. "correlation" is part of "flow decoder" and
    "warping" part of "losses"; the other regions are disjoint and "other" is the rest (the
    concatenations and slicing between regions, gradient accumulation, autograd overhead)."""
    NODE = "autograd::engine::evaluate_function"

    def duration(e):  # microseconds, the event's children included
        return e.device_time_total if cuda else e.cpu_time_total

    def ancestors(e):
        e = e.cpu_parent
        while e is not None:
            yield e
            e = e.cpu_parent

    totals = dict.fromkeys(REGIONS, 0.0)
    creator = {}  # (thread, sequence number) -> (start, regions around the forward op)
    backward = []
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue  # a kernel's own event: its time is already in the device_time_total of the CPU op
        chain = list(ancestors(e))
        if any(a.name.startswith(NODE) for a in chain):
            continue  # inside a backward node: counted with the node
        if e.name.startswith(NODE):
            backward.append(e)
        elif e.name.startswith(REGION):
            if all(a.name != e.name for a in chain):  # e.g. segmentation_loss inside efc_loss: once
                totals[e.name.removeprefix(REGION)] += duration(e)
        elif e.sequence_nr >= 0:
            key = (e.thread, e.sequence_nr)
            start = e.time_range.start
            if key not in creator or start >= creator[key][0]:
                creator[key] = (start, {a.name.removeprefix(REGION) for a in chain if a.name.startswith(REGION)})
    for e in backward:
        for region in creator.get((e.fwd_thread, e.sequence_nr), (0, ()))[1]:
            totals[region] += duration(e)
    # step_us is the profiled step's own wall time (the profiler slows a step down), so the shares are
    # fractions of that step, comparable with each other but not to be multiplied by ms_per_step.
    shares = {region: totals[region] / step_us for region in REGIONS}
    shares["other"] = 1 - sum(shares[r] for r in TOP_REGIONS)
    return shares


def train_args(method, backbone, crop, batch, amp, channels_last):
    """train.py's arguments for a method with the paper recipe's optimiser (SGD, or Adam for flow2seg).
    Parsed by config.parse_args itself, so every setting a step reads (lr, flow_lr_mult, clip_grad,
    loss weights and switches, correlation range) is train.py's own; random weights (--from-scratch) and
    random inputs (--dataset synthetic, never read). The optimiser matters here: SGD with momentum
    keeps one buffer per parameter, Adam two, both in the step's time and its memory."""
    return config.parse_args(["--method", method, "--recipe", "paper", "--dataset", "synthetic", "--from-scratch",
                              "--backbone", backbone, "--crop", *map(str, crop), "--batch", str(batch)]
                             + ["--amp"] * amp + ["--channels-last"] * channels_last)


def training_setup(method, backbone, crop, batch, args, device, ddp=False):
    """method's network, parameter groups and optimiser built as train.main builds them, and a batch.
    ddp: as train.py under torchrun, BatchNorm synchronised (before the optimiser takes the
    parameters: the CPU's CPUSyncBatchNorm has parameters of its own) and the network wrapped in
    DistributedDataParallel; needs an initialised process group.
    -> dict with 'step', a function running one training step and returning its loss."""
    targs = train_args(method, backbone, crop, batch, args.amp, args.channels_last)
    torch.manual_seed(0)  # the same initialisation on every run of the benchmark
    net = model.build_model(method, args.classes, targs.backbone, targs.flow_backbone, targs.max_displacement,
                            targs.corr_stride)
    if ddp:
        net = train.synchronise_batchnorm(net, device)
    to_device(net, device, args.channels_last).train()
    groups = train.parameter_groups(net, targs)
    optimizer = train.make_optimizer(groups, targs)
    # train.py clips by the bare network's parameter names (train.clipped_parameters), which DDP's
    # wrapper would prefix with "module.".
    clipped = train.clipped_parameters(net, method)
    wrapped = net
    if ddp:
        # train.build_training: EFC's steps may leave parameters without a gradient (the flow warm-up)
        wrapped = DistributedDataParallel(net, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                          find_unused_parameters=method in ("efc", "flow"))
    # One batch, reused by every step: the step is measured without data loading (train.py's
    # DataLoader workers prepare batches in other processes).
    data = training_batch(method, batch, crop, args.classes, device, args.channels_last)
    return {"method": method, "backbone": backbone, "crop": list(crop), "batch": batch, "net": net,
            "optimizer": optimizer, "data": data,
            "step": lambda: training_step(wrapped, data, targs, optimizer, clipped, device)}


def step_shares(setup, device):
    """One step under torch.profiler with the regions labelled -> region_shares."""
    # CUDA activity too on a GPU: region_shares then reads kernel time (device_time_total), since the
    # CPU time of an asynchronous launch says nothing about the work.
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labelled_regions(setup["net"]), profile(activities=activities) as prof:
        _, seconds = timed(setup["step"], device)
    return region_shares(prof.events(), 1e6 * seconds, device.type == "cuda")


def step_peak_memory(setup, device):
    """peak_memory of one step. Held when a step starts: parameters, buffers, the previous step's
    gradients (train.py frees them only after the forward), optimiser state, the batch."""
    # The optimiser's state (momentum; Adam's two moments) exists only after its first step(): callers
    # measure after the warm-up steps, so that it is counted as held.
    net, optimizer = setup["net"], setup["optimizer"]
    return peak_memory(setup["step"], device, net.parameters(), net.buffers(), (p.grad for p in net.parameters()),
                       setup["data"].values(), (t for s in optimizer.state.values() for t in s.values()))


def training_rows(args, device, peak):
    """Per backbone, the four methods side by side: a first step each that counts the step's FLOPs,
    then `interleaved` (--warmup steps each, --repeats rounds), then one profiled step each and one
    step each measuring memory (last: on the CPU, peak_memory hands freed memory back to the system)."""
    rows = []
    for backbone in args.backbones:
        progress(f"training steps {short(backbone)}, batch {args.batch}")
        setups = [training_setup(m, backbone, args.crop or PAPER_CROPS[m], args.batch, args, device) for m in METHODS]
        for s in setups:
            # A whole step under FlopCounterMode: forward and backward (the optimiser's elementwise
            # updates count 0). It is a real step: every step, timed or not, updates the weights,
            # which changes no shape, so every step does the same work.
            s["flops"], _ = count_flops(s["step"])
        timing = interleaved({s["method"]: s["step"] for s in setups}, device, args.repeats, args.warmup)
        for s in setups:
            s["shares"] = step_shares(s, device)
        for s in setups:
            s["peak"] = step_peak_memory(s, device)
        base = timing["seconds"][setups[0]["method"]]  # psp's, round by round
        for s in setups:
            per_round = timing["seconds"][s["method"]]
            median = statistics.median(per_round)  # seconds per step
            # no ratio where the crops differ (flow2seg's 832 against psp's 713 on CUDA): the steps
            # would not do comparable work
            comparable = s["crop"] == setups[0]["crop"]
            ratio = ratio_fields("vs_psp_time", per_round, base) if comparable else \
                {"vs_psp_time": None, "vs_psp_time_spread": None, "vs_psp_time_iqr": None}
            rows.append({"method": s["method"], "backbone": backbone, "crop": s["crop"], "batch": s["batch"],
                         "gflops_per_step": s["flops"] / 1e9, "ms_per_step": 1000 * median,
                         "images_per_s": s["batch"] / median, "achieved_tflops": s["flops"] / median / 1e12,
                         "share_of_matmul_peak": s["flops"] / median / peak, **ratio,
                         "peak_mb": None if s["peak"] is None else s["peak"] / 2 ** 20,
                         "ms_runs": [1000 * t for t in per_round], **load_fields(timing), "shares": s["shares"]})
        del setups
        release(device)
    return rows


def efc_pair_memory(args, device):
    """EFC's memory goal: one training pair (batch 1) of 713x713 frames with ResNet-101."""
    # EFC "Implementation Details": a mini-batch of 16 on 16 TITAN Xp GPUs, i.e. one item per 12 GB
    # GPU; the goal (goals()) asks for at most 10 GB. main calls this on CUDA only: a GPU memory goal.
    progress("training step efc R101 at 713x713, batch 1: memory")
    setup = training_setup("efc", "resnet101", (713, 713), 1, args, device)
    for _ in range(max(args.warmup, 1)):  # at least one step: the optimiser state must exist (held)
        setup["step"]()
    peak = step_peak_memory(setup, device)
    del setup
    release(device)
    return {"crop": [713, 713], "batch": 1, "peak_mb": peak / 2 ** 20}  # MB = 2^20 bytes throughout


# ---------------------------------------------------------------------------------------------
# 4. Correlation and warping against their references
# ---------------------------------------------------------------------------------------------
def reference_correlation(f1, f2, max_displacement=20, stride=2):
    """The micro-benchmark's reference: warp.correlation's definition, one displacement at a time
    (warp.correlation_by_definition, divided by C). f1, f2: (B, C, H, W) -> (B, D^2, H, W)."""
    return warp.correlation(f1, f2, max_displacement, stride, path="definition")


def grid_sample_warp(x, flow):
    """backward_warp by F.grid_sample (align_corners=True, positions normalised by W - 1 and H - 1),
    as tests/test_warp.py checks it, and zeroed where the sample leaves the image, as backward_warp
    does (grid_sample's zero padding would blend half a pixel beyond the border). Its flow gradient
    is backward_warp's except at positions within float32 rounding of an integer, which the round
    trip through [-1, 1] can move across it: there grid_sample takes the slope of the neighbouring
    cell (issue #18: up to 6.0 on a scale of 21 at 512x1024; see tests/test_warp.py, backward_warp)."""
    H, W = x.shape[-2:]
    pos = warp.pixel_grid(H, W, x.device) + flow  # (B, 2, H, W) sampling points in pixels
    # grid_sample wants (B, H, W, 2) with x first, in [-1, 1]: -1 and 1 are the centres of the border
    # pixels under align_corners=True, i.e. pixel coordinates 0 and W - 1 (H - 1).
    grid = torch.stack((2 * pos[:, 0] / max(W - 1, 1) - 1, 2 * pos[:, 1] / max(H - 1, 1) - 1), dim=-1)  # (B, H, W, 2)
    inside = ((grid >= -1) & (grid <= 1)).all(-1).unsqueeze(1)  # (B, 1, H, W), border included, as `valid`
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True) * inside


def micro_shapes(batch):
    """The default --micro-shapes: (B, C, H, W, d, s) for EFC's maps and channels (MICRO_MAPS,
    MICRO_CHANNELS), then the sweep (SWEEP_MAPS, SWEEP_CHANNELS, d = 20, s = 2), B = 2 * batch."""
    efc = [(2 * batch, C, H, W, *MICRO_MAPS[H, W]) for H, W in MICRO_MAPS for C in MICRO_CHANNELS]
    sweep = [(2 * batch, SWEEP_CHANNELS, side, side, 20, 2) for side in SWEEP_MAPS]
    return efc + [shape for shape in sweep if shape not in efc]


def parse_micro_shape(text):
    """'BxCxHxW' or 'BxCxHxW:d:s' (d, s default 20, 2: EFC's correlation) -> (B, C, H, W, d, s)."""
    dims, *range_ = text.split(":")
    try:
        B, C, H, W = (int(v) for v in dims.split("x"))
        d, s = (int(v) for v in range_) if range_ else (20, 2)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxCxHxW or BxCxHxW:d:s, e.g. 4x256x90x90:20:2") from None
    return B, C, H, W, d, s


def forward_backward(fn, inputs, amp, device):
    """A function running fn(*inputs) forward and backward once, as the timed unit of a micro
    comparison. The backward of sum(out) (a gradient of ones) reaches every input, as in training,
    where the correlation's gradient flows to both frames' features and the warp's to the features
    and the flow. bf16 autocast with --amp, as a training step runs the layers."""
    def run():
        for x in inputs:
            x.grad = None  # fresh gradients every run: accumulating into the last run's would add work
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def micro_cases(B, C, H, W, d, s, device):
    """The comparisons made at one shape: (op, name A, name B, fn A, fn B, inputs), B against A."""
    torch.manual_seed(0)
    f1, f2 = (torch.randn(B, C, H, W, device=device, requires_grad=True) for _ in range(2))
    # The warped features have the correlation's shape; the flow, a few pixels, samples mostly inside
    # the map and needs a gradient: EFC trains its flow through the warp (eq. (1)).
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    flow = (4 * torch.randn(B, 2, H, W, device=device)).requires_grad_()
    cases = [("correlation", "tiled", "all-pairs", lambda a, b: warp.correlation(a, b, d, s, path="tiled"),
              lambda a, b: warp.correlation(a, b, d, s, path="all_pairs"), (f1, f2))]
    if C <= REFERENCE_MAX_CHANNELS:
        cases.append(("correlation", "warp.correlation", "per-displacement loop",
                      lambda a, b: warp.correlation(a, b, d, s), lambda a, b: reference_correlation(a, b, d, s),
                      (f1, f2)))
    cases.append(("backward_warp", "warp.backward_warp", "F.grid_sample", lambda a, b: warp.backward_warp(a, b)[0],
                  grid_sample_warp, (x, flow)))
    return cases


def micro_rows(args, device):
    """One row per comparison and shape (micro_cases at each of --micro-shapes): the median ms of
    forward + backward of A and B, B's time over A's per round (median and spread: > 1 means A is
    faster), the peak memory of each and their ratio, the largest |difference| of the two outputs
    (a check that the timed computations are the same), the load; for the correlation, the path
    warp.correlation takes at this map size."""
    rows = []
    # One warm-up call on the CPU, where a call at 90x90 takes up to tens of seconds (it allocates and
    # faults the pages in; the rounds' spread shows what else a first call costs); --warmup on CUDA,
    # where the first calls also autotune.
    warmup = args.warmup if device.type == "cuda" else 1
    for B, C, H, W, d, s in args.micro_shapes:
        for op, name_a, name_b, fn_a, fn_b, inputs in micro_cases(B, C, H, W, d, s, device):
            progress(f"{op}: {name_a} vs {name_b}, {B}x{C}x{H}x{W}" + (f", d {d} s {s}" if op == "correlation" else ""))
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                difference = (fn_a(*inputs).float() - fn_b(*inputs).float()).abs().max().item()
            runs = {name_a: forward_backward(fn_a, inputs, args.amp, device),
                    name_b: forward_backward(fn_b, inputs, args.amp, device)}
            timing = interleaved(runs, device, args.layer_repeats, warmup)
            # memory last: on the CPU, peak_memory hands freed memory back to the system
            peaks = {name: peak_memory(run, device, inputs) for name, run in runs.items()}
            a, b = timing["seconds"][name_a], timing["seconds"][name_b]
            row = {"op": op, "a": name_a, "b": name_b, "shape": [B, C, H, W], "d": d, "s": s,
                   "ms_a": 1000 * statistics.median(a), "ms_b": 1000 * statistics.median(b),
                   **ratio_fields("b_over_a", b, a),
                   "peak_mb_a": None if peaks[name_a] is None else peaks[name_a] / 2 ** 20,
                   "peak_mb_b": None if peaks[name_b] is None else peaks[name_b] / 2 ** 20,
                   "memory_b_over_a": peaks[name_b] / peaks[name_a] if peaks[name_a] and peaks[name_b] else None,
                   "max_abs_diff": difference, "ms_runs_a": [1000 * t for t in a], "ms_runs_b": [1000 * t for t in b],
                   **load_fields(timing)}
            if op == "correlation":
                row["path"] = warp.correlation_path(H, W, d, s)
            rows.append(row)
            for x in inputs:
                x.grad = None  # this comparison's gradients, before the next one allocates its own
            release(device)
    return rows


def all_pairs_crossover(micro):
    """Where warp.correlation's all-pairs path stops being the faster, from the "tiled vs all-pairs"
    rows at EFC's d = 20, s = 2 and SWEEP_CHANNELS (the sweep; EFC's maps at other channel counts
    do not count): the largest map (H * W pixels) at which all-pairs was
    faster (median ratio < 1) and the smallest at which it was not. warp.ALL_PAIRS_MAX_PIXELS agrees
    when it lies between the two (None: no map was slower); `clean` says whether every faster map is smaller than every slower
    one (a noisy run can interleave them). None without such rows."""
    rows = [r for r in micro if r["op"] == "correlation" and r["b"] == "all-pairs" and (r["d"], r["s"]) == (20, 2)
            and r["shape"][1] == SWEEP_CHANNELS]
    if not rows:
        return None
    faster = [r["shape"][2] * r["shape"][3] for r in rows if r["b_over_a"] < 1]
    slower = [r["shape"][2] * r["shape"][3] for r in rows if r["b_over_a"] >= 1]
    up_to, from_ = max(faster, default=0), min(slower, default=None)
    threshold = warp.ALL_PAIRS_MAX_PIXELS
    # Without a map where all-pairs was slower the run bounds the threshold from below only: no verdict.
    return {"faster_up_to_pixels": up_to, "slower_from_pixels": from_, "threshold_pixels": threshold,
            "clean": from_ is None or up_to < from_,
            "agrees": None if from_ is None else up_to <= threshold < from_}


# ---------------------------------------------------------------------------------------------
# 5. DistributedDataParallel on one process
# ---------------------------------------------------------------------------------------------
def ddp_rows(args, device):
    """One EFC training step (the last of --backbones, its crop, --batch pairs) under
    DistributedDataParallel in a process group of one (NCCL on CUDA, gloo on the CPU), built as
    train.py builds it under torchrun (train.synchronise_batchnorm, find_unused_parameters), against
    the same step without it: from the same weights, batch and random state, the loss and the
    gradients must agree (one process changes no arithmetic), and the time ratio is DDP's overhead
    (gradient bucketing, the all-reduce of one process, the search for unused parameters).
    train.py itself starts a process group only for two or more processes: this is where NCCL meets
    the network on one GPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    backbone = args.backbones[-1]
    crop = args.crop or PAPER_CROPS["efc"]
    progress(f"ddp: efc {short(backbone)} at {crop[0]}x{crop[1]}, batch {args.batch}, {backend}, one process")
    # A store in this process (HashStore): a group of one needs no address or port to meet at.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        setups = {"plain": training_setup("efc", backbone, crop, args.batch, args, device),
                  "ddp": training_setup("efc", backbone, crop, args.batch, args, device, ddp=True)}
        losses_, grads = {}, {}
        for name, setup in setups.items():
            torch.manual_seed(1)  # the same dropout masks in both steps
            losses_[name] = setup["step"]().float().item()
            grads[name] = [p.grad for p in setup["net"].parameters()]  # after the step, before the next zero_grad
        # Parameters without a gradient (unused in this step) are None in both or in neither.
        pairs = [(a, b) for a, b in zip(grads["plain"], grads["ddp"]) if a is not None and b is not None]
        missing = sum((a is None) != (b is None) for a, b in zip(grads["plain"], grads["ddp"]))
        norm = torch.sqrt(sum(a.float().pow(2).sum() for a, _ in pairs)).item()
        gap = torch.sqrt(sum((a.float() - b.float()).pow(2).sum() for a, b in pairs)).item()
        del grads, pairs
        timing = interleaved({name: setup["step"] for name, setup in setups.items()}, device, args.repeats,
                             args.warmup)
        plain, wrapped = timing["seconds"]["plain"], timing["seconds"]["ddp"]
        row = {"backend": backend, "world": 1, "method": "efc", "backbone": backbone, "crop": list(crop),
               "batch": args.batch, "loss_plain": losses_["plain"], "loss_ddp": losses_["ddp"],
               "gradient_difference": gap / max(norm, 1e-30), "gradients_missing": missing,
               "ms_plain": 1000 * statistics.median(plain), "ms_ddp": 1000 * statistics.median(wrapped),
               **ratio_fields("ddp_over_plain", wrapped, plain), **load_fields(timing)}
    finally:
        dist.destroy_process_group()
    del setups
    release(device)
    return [row]


# ---------------------------------------------------------------------------------------------
# Goals of the issue
# ---------------------------------------------------------------------------------------------
def goal(text, measured, met, note=""):
    """A goal's row: met is True, False, or None where this run cannot judge it (a GPU goal on the
    CPU, a goal that needs --amp --channels-last)."""
    return {"goal": text, "measured": measured, "status": "not measured" if met is None else "met" if met else "missed",
            "note": note}


def goals(report, args, device):
    """The cost goals set for this benchmark, each judged from the report's numbers; most read a claim
    of the papers as a number (docs/benchmarks.md says why a missed one is missed)."""
    out, cuda = [], device.type == "cuda"
    flops = {(r["network"], tuple(r["size"])): r for r in report.get("flops", [])}
    for backbone in args.backbones:
        efc = f"EFCNet-{short(backbone)} inference"
        # EFC: "no extra calculation in inference" (Abstract, Introduction). Equality, not a tolerance:
        # EFCNet.forward(image) runs exactly PSPNet's modules, so the counts must be identical.
        if flops:
            ratios = [flops[(efc, size)]["vs_pspnet"] for size in PAPER_SIZES]
            out.append(goal(f"EFC inference FLOPs = PSPNet's ({short(backbone)})",
                            " and ".join(f"{r:.6f}x" for r in ratios) + " at 713x713 and 1024x2048",
                            all(r == 1 for r in ratios)))
        timing = {r["network"]: r for r in report.get("inference", []) if r["backbone"] == backbone}
        if timing:  # the same claim in time: with copied weights, any difference is noise or overhead
            ratio = timing[efc]["vs_pspnet_time"]
            out.append(goal(f"EFC inference time <= 1.02x PSPNet ({short(backbone)})",
                            f"{ratio:.3f}x at {args.size[0]}x{args.size[1]} on {device.type}", ratio <= 1.02))
    # Flow2Seg 4.3: "our method only costs a little extra computation compared with PSPNet", read as
    # at most 15 % more FLOPs at a full Cityscapes frame, with its own image backbone (R101, 4.2).
    r101 = ("Flow2SegNet-R101+R18", (1024, 2048))
    if r101 in flops:
        row = flops[r101]
        parts = next(b for b in report["flops_breakdown"] if b["network"] == r101[0] and tuple(b["size"]) == r101[1])
        timing = {r["network"]: r for r in report.get("inference", []) if r["backbone"] == "resnet101"}
        time_note = (f"; time {timing[r101[0]]['vs_pspnet_time']:.2f}x at {args.size[0]}x{args.size[1]}"
                     if r101[0] in timing else "")
        out.append(goal("Flow2Seg inference FLOPs <= 1.15x PSPNet-R101 at 1024x2048", f"{row['vs_pspnet']:.3f}x"
                        + time_note, row["vs_pspnet"] <= 1.15,
                        f"+{parts['extra_gflops']:.0f} GFLOPs over {parts['image_path_gflops']:.0f}: the dilated "
                        f"2-channel ResNet-18 {parts['flow_backbone_gflops']:.0f} (its layer4, 512 channels at stride "
                        f"8: {parts['flow_backbone.layer4_gflops']:.0f}), FCN head {parts['flow_head_gflops']:.1f}, "
                        f"fusion {parts['fusion_gflops']:.1f}"))
    training = {(r["method"], r["backbone"]): r for r in report.get("training", [])}
    for backbone in args.backbones:
        efc = training.get(("efc", backbone))
        if efc:
            # The pure-PyTorch correlation and warping (no CUDA extension, see warp.py) must not
            # dominate a step; a GPU goal, so judged only on CUDA.
            share = efc["shares"]["correlation"] + efc["shares"]["warping"]
            out.append(goal(f"correlation + warping <= 5 % of an EFC-{short(backbone)} training step on GPU",
                            f"{100 * share:.1f} % on {device.type}", share <= 0.05 if cuda else None,
                            "" if cuda else "GPU goal; the CPU share is shown for information"))
            # An EFC step segments both frames of a pair (2x a PSPNet step by itself) and adds the flow
            # decoder and the losses of eq. (9): 2.6x leaves 0.6x for those.
            ratio = efc["vs_psp_time"]
            out.append(goal(f"EFC training step <= 2.6x PSPNet's ({short(backbone)}, crop "
                            f"{efc['crop'][0]}x{efc['crop'][1]}, batch {efc['batch']})",
                            f"{ratio:.2f}x on {device.type}", ratio <= 2.6))
    # The per-displacement loop at the largest map it ran at (EFC's 90x90 by default).
    references = [r for r in report.get("micro", []) if r["b"] == "per-displacement loop"]
    if references:
        r = max(references, key=lambda r: (r["shape"][2] * r["shape"][3], r["shape"][1]))
        out.append(goal("correlation forward + backward >= 5x faster than the naive reference on the CPU",
                        f"{r['b_over_a']:.1f}x [{r['b_over_a_spread'][0]:.1f}-{r['b_over_a_spread'][1]:.1f}] on "
                        f"{device.type} at B, C, H, W = {tuple(r['shape'])}, d = {r['d']}, s = {r['s']}",
                        r["b_over_a"] >= 5 if not cuda else None))
    crossover = report.get("all_pairs_crossover")
    if crossover:
        side = math.isqrt
        measured = (f"all-pairs faster up to {side(crossover['faster_up_to_pixels'])}^2 pixels, slower from "
                    + (f"{side(crossover['slower_from_pixels'])}^2" if crossover["slower_from_pixels"] else "-")
                    + f" on {device.type}; the constant is {crossover['threshold_pixels']}")
        out.append(goal("warp.ALL_PAIRS_MAX_PIXELS lies at the measured crossover of the correlation's paths",
                        measured, crossover["agrees"],
                        "no map where all-pairs was slower: add larger --micro-shapes" if crossover["agrees"] is None
                        else "" if crossover["clean"] else "faster and slower maps interleave: a noisy run"))
    for r in report.get("ddp", []):
        ok = (r["gradient_difference"] <= DDP_TOLERANCE and r["gradients_missing"] == 0
              and math.isfinite(r["loss_ddp"]) and abs(r["loss_ddp"] - r["loss_plain"]) <= DDP_TOLERANCE * abs(r["loss_plain"]))
        out.append(goal(f"DDP ({r['backend']}) on one process: the step's loss and gradients as without DDP",
                        f"relative gradient difference {r['gradient_difference']:.1e}, loss {r['loss_ddp']:.4f} vs "
                        f"{r['loss_plain']:.4f}, time x{r['ddp_over_plain']:.2f} on {device.type}", ok))
    # The last two goals are about the fast GPU configuration (bf16 autocast, NHWC); other runs with
    # training steps show their numbers without a verdict.
    if "training" not in report:
        return out
    psp = training.get(("psp", "resnet101"))
    fast = cuda and args.amp and args.channels_last
    out.append(goal("PSPNet-R101 training step >= 30 % of the bf16 matmul peak (bf16, channels_last, GPU)",
                    f"{100 * psp['share_of_matmul_peak']:.1f} % of the {report['settings']['peak_dtype']} peak on "
                    f"{device.type}" if psp else "-",
                    psp["share_of_matmul_peak"] >= 0.30 if psp and fast else None,
                    "" if fast else "needs --device cuda --amp --channels-last"))
    pair = report.get("efc_pair_memory")  # one EFC item per 12 GB TITAN Xp (see efc_pair_memory)
    out.append(goal("EFC-R101 training pair at 713x713 <= 10 GB (GPU)",
                    f"{pair['peak_mb'] / 1024:.2f} GB" if pair else "-",
                    pair["peak_mb"] <= 10 * 1024 if pair and fast else None,
                    "" if fast else "needs --device cuda --amp --channels-last"))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def fmt(value, spec):
    """value formatted, or '-' where it was not measured (None)."""
    return "-" if value is None else format(value, spec)


def print_report(report):
    """The report as text on stdout: the machine and settings, one table (ms, img/s, MB = 2^20 bytes,
    'others' the largest per-round load in %, 'loaded' the rounds kept above LOADED, the ratio's
    median [min-max] over rounds), the micro-benchmarks, the training steps' region shares, Flow2Seg's
    extra FLOPs and the goals."""
    m, s = report["machine"], report["settings"]
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), device {m['device']}, "
          f"torch {m['torch']}, {m['date']}")
    print(f"settings: inference {s['size'][0]}x{s['size'][1]} batch {s['infer_batch']}; training crops {s['crops']} "
          f"batch {s['batch']}; {s['repeats']} rounds after {s['warmup']} warm-up (layers {s['layer_repeats']}); "
          f"amp {s['amp']}, channels_last {s['channels_last']}; matmul peak "
          f"{fmt(report.get('matmul_peak_tflops'), '.2f')} TFLOP/s ({s['peak_dtype']})")
    header = (f"{'part':<10}{'what':<34}{'size':>10}{'GFLOPs':>10}{'ms':>10}{'img/s':>8}{'peak MB':>9}{'others':>8}"
              f"{'loaded':>8}{'ratio [min-max]':>26}  ratio to")

    def ratio_text(r, key):
        if r.get(key) is None:
            return "-"
        low, high = r.get(f"{key}_spread") or (r[key], r[key])
        return f"{r[key]:.3f} [{low:.3f}-{high:.3f}]"

    def loaded(r):
        return f"{r['loaded_rounds']}/{r['runs']}" if "runs" in r else "-"

    def line(part, what, size, gflops, ms, rate, peak, r, ratio, to):
        others = r.get("other_load") if r else None
        print(f"{part:<10}{what:<34}{size:>10}{fmt(gflops, '.2f'):>10}{fmt(ms, '.1f'):>10}{fmt(rate, '.2f'):>8}"
              f"{fmt(peak, '.0f'):>9}{fmt(others if others is None else 100 * others, '.1f'):>8}"
              f"{loaded(r) if r else '-':>8}{ratio:>26}  {to}")

    if any(report.get(part) for part in ("flops", "inference", "training", "ddp")):
        print(header)
        print("-" * len(header))
    for r in report.get("flops", []):
        line("flops", r["network"], "x".join(map(str, r["size"])), r["gflops"], None, None, None, None,
             f"{r['vs_pspnet']:.3f}", "PSPNet FLOPs")
    for r in report.get("inference", []):
        line("inference", r["network"], "x".join(map(str, r["size"])), r["gflops_per_image"], r["ms_per_image"],
             r["images_per_s"], r["peak_mb"], r, ratio_text(r, "vs_pspnet_time"), "PSPNet time")
    for r in report.get("training", []):
        line("training", f"{r['method']} {short(r['backbone'])} batch {r['batch']}", "x".join(map(str, r["crop"])),
             r["gflops_per_step"], r["ms_per_step"], r["images_per_s"], r["peak_mb"], r,
             ratio_text(r, "vs_psp_time"), "psp step time")
    for r in report.get("ddp", []):
        line("ddp", f"efc {short(r['backbone'])} batch {r['batch']} {r['backend']}", "x".join(map(str, r["crop"])),
             None, r["ms_ddp"], None, None, r, ratio_text(r, "ddp_over_plain"), "the step without DDP")
    print("ms: per image (inference), per step (training); others: the largest share of the machine's CPU time "
          f"that other processes took in a round, in %; loaded: rounds kept with others above {100 * LOADED:.0f} % "
          "/ rounds (after retaking such rounds as many times as there are rounds)")
    if report.get("micro"):
        print(f"\nmicro-benchmarks: forward + backward of A and B in the same rounds; B/A > 1: A is faster "
              f"(median [min-max] over rounds); correlation path: warp.correlation's at this map size "
              f"(all-pairs up to {warp.ALL_PAIRS_MAX_PIXELS} pixels)")
        head = (f"{'A':<20}{'B':<23}{'B x C x H x W':>16}{'d,s':>7}{'ms A':>10}{'ms B':>10}{'B/A time [min-max]':>26}"
                f"{'MB A':>8}{'MB B':>8}{'B/A mem':>8}{'max|A-B|':>10}{'others':>8}{'loaded':>8}  path")
        print(head)
        print("-" * len(head))
        for r in report["micro"]:
            ds = f"{r['d']},{r['s']}" if r["op"] == "correlation" else "-"
            others = r["other_load"]
            print(f"{r['a']:<20}{r['b']:<23}{'x'.join(map(str, r['shape'])):>16}{ds:>7}{r['ms_a']:>10.2f}"
                  f"{r['ms_b']:>10.2f}{ratio_text(r, 'b_over_a'):>26}{fmt(r['peak_mb_a'], '.0f'):>8}"
                  f"{fmt(r['peak_mb_b'], '.0f'):>8}{fmt(r['memory_b_over_a'], '.2f'):>8}{r['max_abs_diff']:>10.1e}"
                  f"{fmt(others if others is None else 100 * others, '.1f'):>8}{loaded(r):>8}  {r.get('path', '')}")
        crossover = report.get("all_pairs_crossover")
        if crossover:
            print(f"all-pairs path faster (median) up to {crossover['faster_up_to_pixels']} pixels, slower from "
                  f"{fmt(crossover['slower_from_pixels'], 'd')}; warp.ALL_PAIRS_MAX_PIXELS = "
                  f"{crossover['threshold_pixels']} ("
                  + {True: "agrees", False: "to be changed", None: "no verdict"}[crossover["agrees"]] + ")")
    timed_rows = [r for part in ("inference", "training", "micro", "ddp") for r in report.get(part, [])]
    loaded_rounds = sum(r["loaded_rounds"] for r in timed_rows)
    if loaded_rounds:
        print(f"WARNING: {loaded_rounds} timed rounds were taken while other processes took more than "
              f"{100 * LOADED:.0f} % of the CPU (after retakes): those timings are not clean")
    if report.get("training"):
        print("\ntraining steps: achieved rate and share of the profiled step per region (forward + backward; "
              "correlation is inside the flow decoder, warping inside the losses)")
        names = ["TFLOP/s", "of peak"] + list(REGIONS) + ["other"]
        print(f"{'step':<22}" + "".join(f"{n:>13}" for n in names))
        for r in report["training"]:
            values = [fmt(r["achieved_tflops"], ".3f"), fmt(100 * r["share_of_matmul_peak"], ".1f") + " %"]
            values += [fmt(100 * r["shares"][n], ".1f") + " %" for n in list(REGIONS) + ["other"]]
            print(f"{r['method'] + ' ' + short(r['backbone']):<22}" + "".join(f"{v:>13}" for v in values))
    if report.get("efc_pair_memory"):
        print(f"\nEFC-R101 training pair at 713x713 (batch 1): peak {report['efc_pair_memory']['peak_mb']:.0f} MB")
    if report.get("flops_breakdown"):
        print("\nFlow2Seg's FLOPs over PSPNet's (GFLOPs): image path | flow backbone (layer4) | flow head | fusion "
              "| extra")
        for b in report["flops_breakdown"]:
            print(f"  {b['network']} {b['size'][0]}x{b['size'][1]}: {b['image_path_gflops']:.1f} | "
                  f"{b['flow_backbone_gflops']:.1f} ({b['flow_backbone.layer4_gflops']:.1f}) | "
                  f"{b['flow_head_gflops']:.1f}"
                  f" | {b['fusion_gflops']:.1f} | +{b['extra_gflops']:.1f}")
    print("\ngoals")
    print_goals(report["goals"])


def print_goals(goals_):
    """One line per goal: [status] goal: measured value (note)."""
    for g in goals_:
        print(f"  [{g['status']}] {g['goal']}: {g['measured']}" + (f" ({g['note']})" if g["note"] else ""))


# ---------------------------------------------------------------------------------------------
# The GPU check: one command for a machine with one GPU
# ---------------------------------------------------------------------------------------------
GPU_CHECK_MINUTES = 8  # the issue's bound on the whole check; the steps' timeouts sum to it
COMPILE_ITERATIONS = 20


def gpu_check_plan(out, python=sys.executable):
    """The steps of --gpu-check, in order: dicts with name, command (argv), timeout (s) and what it
    checks. Each runs as a process of its own, so that a step that fails or runs out of time (a
    CUDA error, an out-of-memory) leaves the others to run; the timeouts sum to GPU_CHECK_MINUTES."""
    gpu = ["--device", "cuda", "--amp", "--channels-last"]
    return [
        # About 25 micro comparisons of >= 2 x 0.1 s a round: 6 rounds keep them near a minute.
        {"name": "bench", "timeout": 210,
         "command": [python, "bench.py", *gpu, "--backbones", "resnet101", "--warmup", "3", "--repeats", "10",
                     "--layer-repeats", "6", "--json", os.path.join(out, "bench.json")],
         "checks": "every part of bench.py with ResNet-101 at the papers' sizes: the EFC-R101 pair's memory at "
                   "713x713, PSPNet-R101's share of the bf16 matmul peak, the correlation + warping share of an "
                   "EFC step, the micro-benchmarks and the all-pairs crossover"},
        {"name": "ddp", "timeout": 50,
         "command": [python, "bench.py", *gpu, "--parts", "ddp", "--backbones", "resnet101", "--warmup", "2",
                     "--repeats", "5", "--json", os.path.join(out, "ddp.json")],
         "checks": "an EFC-R101 step under DistributedDataParallel with NCCL on one process, against the same step "
                   "without it"},
        # The quick recipe on the synthetic world (written first if missing, about 25 s), with no flow
        # warm-up and no world-trained encoder: the first iteration already runs EFC eq. (9)'s losses,
        # and nothing else is trained first. Validation runs once, at the end, on 8 items. The longest
        # limit: torch.compile traces and compiles the training graph and, for that validation, the
        # eval one.
        {"name": "compile", "timeout": 220,
         "command": [python, "train.py", "--method", "efc", *gpu, "--compile", "--iterations", str(COMPILE_ITERATIONS),
                     "--flow-warmup", "0", "--no-world-init", "--val-every", "0", "--val-items", "8",
                     "--log-every", "5", "--out", os.path.join(out, "compile"), "--overwrite"],
         "checks": f"train.py --method efc --compile: {COMPILE_ITERATIONS} iterations with finite losses"},
    ]


def run_plan(plan):
    """Run the steps one after the other, each killed at its timeout; their output goes to this
    process's. -> {name: {"returncode": int or None, "seconds": float, "timed_out": bool}}."""
    results = {}
    for step in plan:
        progress(f"gpu-check: {step['name']}: {' '.join(step['command'])}")
        start = time.perf_counter()
        try:
            returncode, timed_out = subprocess.run(step["command"], timeout=step["timeout"]).returncode, False
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            returncode, timed_out = None, True
        results[step["name"]] = {"returncode": returncode, "seconds": time.perf_counter() - start,
                                 "timed_out": timed_out}
    return results


def read_json_lines(path):
    """The records of a .json (one) or .jsonl (one per line) file; [] if it is missing or unreadable."""
    try:
        with open(path) as f:
            text = f.read()
        return [json.loads(text)] if path.endswith(".json") else [json.loads(line) for line in text.splitlines() if line]
    except (OSError, ValueError):
        return []


def gpu_check_goals(out, plan, results):
    """The goals of --gpu-check from what its steps wrote under `out`: each step finished in time;
    every goal of bench.json (the GPU ones among them) and ddp.json; the compile run's iterations and
    losses (its log.jsonl); the whole check under GPU_CHECK_MINUTES."""
    rows = []
    for step in plan:
        r = results.get(step["name"])
        measured = ("not run" if r is None else f"timed out after {r['seconds']:.0f} s" if r["timed_out"]
                    else f"{r['seconds']:.0f} s, exit status {r['returncode']}")
        rows.append(goal(f"step '{step['name']}' completes within {step['timeout']} s", measured,
                         None if r is None else r["returncode"] == 0, step["checks"]))
    for name in ("bench.json", "ddp.json"):
        for report in read_json_lines(os.path.join(out, name)):
            rows += report["goals"]
    records = [r for r in read_json_lines(os.path.join(out, "compile", "log.jsonl")) if "loss" in r]
    done = max((r["iteration"] for r in records), default=0)
    finite = all(math.isfinite(r["loss"]) for r in records)
    rows.append(goal(f"train.py --method efc --compile runs {COMPILE_ITERATIONS} iterations with finite losses",
                     f"{done} iterations" + (f", last loss {records[-1]['loss']:.4f}, "
                                             f"{records[-1]['images_per_s']:.1f} img/s" if records else ""),
                     done == COMPILE_ITERATIONS and finite if "compile" in results else None))
    total = sum(r["seconds"] for r in results.values())
    rows.append(goal(f"the GPU check takes under {GPU_CHECK_MINUTES} minutes", f"{total / 60:.1f} min",
                     total <= 60 * GPU_CHECK_MINUTES if results else None))
    return rows


def gpu_check(out, dry_run=False):
    """--gpu-check: print the plan; unless dry_run, run it (CUDA needed) and print every goal with its
    value, met or missed. -> the goals (None for a dry run)."""
    plan = gpu_check_plan(out)
    print(f"GPU check: {len(plan)} steps, at most {GPU_CHECK_MINUTES} minutes, results in {out}/")
    for step in plan:
        print(f"  {step['name']} (<= {step['timeout']} s): {' '.join(step['command'])}\n      checks {step['checks']}")
    if dry_run:
        return None
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-check needs a CUDA device (--dry-run prints the plan anywhere)")
    os.makedirs(out, exist_ok=True)
    for stale in ("bench.json", "ddp.json", os.path.join("compile", "log.jsonl")):  # an earlier check's results
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    rows = gpu_check_goals(out, plan, run_plan(plan))
    print("\nGPU check goals")
    print_goals(rows)
    with open(os.path.join(out, "goals.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def parse_args(argv=None):
    """The command line, with the device-dependent defaults filled in (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="inference size (cuda 1024 2048; cpu 256 512)")
    p.add_argument("--infer-batch", type=int, default=1, help="inference batch; ms are per image")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                   help="training crop of every method (cuda: the papers', 713 or 832; cpu 192 192)")
    p.add_argument("--batch", type=int, default=2, help="training batch (pairs for efc and flow)")
    p.add_argument("--backbones", nargs="+", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="image backbones to measure (cuda: resnet50 resnet101; cpu: resnet101)")
    p.add_argument("--classes", type=int, default=19, help="Cityscapes: 19")
    p.add_argument("--repeats", type=int, help="rounds of the networks, training steps and DDP step (cuda 20; cpu 5)")
    p.add_argument("--layer-repeats", type=int, help="rounds of the micro-benchmarks (cuda 20; cpu 3)")
    p.add_argument("--warmup", type=int, help="untimed calls of each thing compared before its rounds (cuda 5; cpu 2; "
                                              "cpu micro-benchmarks 1); networks and steps have one more, counting "
                                              "their FLOPs")
    p.add_argument("--micro-shapes", nargs="+", type=parse_micro_shape, metavar="BxCxHxW[:d:s]",
                   help="features of the micro-benchmarks (d, s: the correlation's range and stride, default 20:2); "
                        "default: 2 x --batch items of 256 and 1024 channels at 90x90 (d, s 20, 2) and 16x32 "
                        "(4, 1), then 256 channels at 12-64 (20, 2)")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's, one per core); 1 avoids the "
                                               "stalls of multi-threaded ops on a core another process holds (see "
                                               "LOADED)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (train.py's --amp)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (train.py's flag)")
    p.add_argument("--parts", nargs="+", default=["flops", "inference", "training", "micro"],
                   choices=["flops", "inference", "training", "micro", "ddp"],
                   help="what to measure (default: all but ddp)")
    p.add_argument("--matmul-size", type=int, help="n of the n x n matmul of the peak (cuda 8192; cpu 2048)")
    p.add_argument("--json", metavar="OUT", help="write the report here as JSON")
    p.add_argument("--gpu-check", nargs="?", const="runs/gpu-check", metavar="DIR",
                   help="run the GPU check (see the docstring) and write its results to DIR (default runs/gpu-check)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: print its plan, run nothing")
    args = data.one_line_errors(p).parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.device = "cuda" if cuda else "cpu"
    # CPU defaults keep the networks and steps to seconds a call on 2 cores: 256x512 is 1/16 of a
    # Cityscapes frame's pixels, crops are 192x192 for every method, ResNet-101 only. crop None on
    # CUDA: each method's PAPER_CROPS.
    defaults = {"size": [1024, 2048] if cuda else [256, 512], "crop": None if cuda else [192, 192],
                "backbones": ["resnet50", "resnet101"] if cuda else ["resnet101"], "repeats": 20 if cuda else 5,
                "layer_repeats": 20 if cuda else 3, "warmup": 5 if cuda else 2, "matmul_size": 8192 if cuda else 2048}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.micro_shapes is None:
        args.micro_shapes = micro_shapes(args.batch)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_check:
        return gpu_check(args.gpu_check, args.dry_run)
    if args.threads:
        torch.set_num_threads(args.threads)  # before machine() records the count
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    # bf16 on CUDA even without --amp: the GPU goal is stated against the bf16 peak. On the CPU the peak
    # is of the dtype the networks run in: float32, or bf16 under --amp.
    peak_dtype = torch.bfloat16 if device.type == "cuda" or args.amp else torch.float32
    crops = {m: list(args.crop or PAPER_CROPS[m]) for m in METHODS}
    report = {"machine": machine(device),
              "settings": {"size": args.size, "infer_batch": args.infer_batch, "crops": crops, "batch": args.batch,
                           "backbones": args.backbones, "classes": args.classes, "repeats": args.repeats,
                           "warmup": args.warmup, "layer_repeats": args.layer_repeats,
                           "micro_shapes": [list(shape) for shape in args.micro_shapes], "amp": args.amp,
                           "channels_last": args.channels_last, "min_timing_s": MIN_TIMING_S, "loaded": LOADED,
                           "peak_dtype": str(peak_dtype).removeprefix("torch."), "matmul_size": args.matmul_size}}
    # First: training_rows divides each step's FLOP rate by it (share_of_matmul_peak). FLOP/s.
    peak = matmul_peak(device, peak_dtype, args.matmul_size, args.repeats)
    report["matmul_peak_tflops"] = peak / 1e12
    if "flops" in args.parts:
        report["flops"], report["flops_breakdown"] = flop_rows(args.backbones, args.classes)
    if "inference" in args.parts:
        report["inference"] = inference_rows(args, device)
    if "training" in args.parts:
        report["training"] = training_rows(args, device, peak)
        if device.type == "cuda":  # EFC's memory goal: one pair of 713x713 frames, ResNet-101
            report["efc_pair_memory"] = efc_pair_memory(args, device)
    if "micro" in args.parts:
        report["micro"] = micro_rows(args, device)
        report["all_pairs_crossover"] = all_pairs_crossover(report["micro"])
    if "ddp" in args.parts:
        report["ddp"] = ddp_rows(args, device)
    report["goals"] = goals(report, args, device)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
