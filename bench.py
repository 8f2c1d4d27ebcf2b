"""Benchmarks: FLOPs, speed and memory of every network, of one training step per method, and of the
correlation and warping layers against their naive references.

    python bench.py [--device cpu|cuda] [--size H W] [--crop H W] [--batch N] [--backbones B ...]
                    [--amp] [--channels-last] [--json OUT]

prints one table (and, below it, the training-step shares and the goals) and writes the same numbers,
with the machine they came from, as JSON. Parts (all by default; `--parts` picks some):
  flops      GFLOPs of PSPNet, EFCNet inference and Flow2SegNet at 713x713 and 1024x2048 for every
             backbone, counted by torch.utils.flop_counter on the meta device (exact, no memory), the
             ratios to PSPNet of the same backbone, and Flow2Seg's extra FLOPs per module.
  inference  the same networks at --size: ms per image (median of --repeats runs after --warmup),
             images/s, peak memory, time ratios to PSPNet. The networks run in turn (round robin)
             and a ratio is the median of the ratios within a round, so that a drift of the
             machine cancels.
  training   one step of train.py (train.compute_loss, train.parameter_groups, train.make_optimizer;
             forward, loss, backward, gradient clipping where train.py clips, optimiser) for psp,
             flow2seg, efc and flow, in turn as well (ratios likewise): ms/step, images/s (pairs for
             efc and flow, as train.py logs), peak memory, GFLOPs per step and the achieved rate
             against the matmul peak, and the share of the step in each region (see `region_shares`).
  micro      warp.correlation and warp.backward_warp, forward + backward, against reference_correlation
             (the per-displacement loop below) and F.grid_sample (the independent implementation that
             tests/test_warp.py checks backward_warp against).
The matmul peak (bf16 on CUDA, float32 on the CPU unless --amp) is measured in the same run.

Peak memory is what the benchmark's own tensors need, measured in one more run after the timed ones:
the bytes held when the run starts (parameters, buffers, gradients, optimiser state, inputs) plus the
largest increase during the run. On CUDA the increase comes from torch's allocator
(max_memory_allocated); on the CPU from the process's resident set (VmHWM, reset through
/proc/self/clear_refs after malloc_trim), which is coarser.

Every timed row also gives the share of the machine's CPU time that other processes took meanwhile
("others"): a benchmark cannot make a shared machine quiet, but it can say when it was not.

Defaults: on CUDA the papers' sizes (inference 1024x2048; crops 713x713 for psp, efc and flow and
832x832 for flow2seg), ResNet-50 and -101. On the CPU sizes that take seconds per step (inference
256x512, crop 192x192 for every method) and ResNet-101 only; the whole default CPU run takes about
9 minutes on 2 cores, over three of them the naive correlation reference (one run at EFC's sizes).
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

import data
import losses
import model
import train
import warp

PAPER_SIZES = ((713, 713), (1024, 2048))  # the sizes of the FLOP ratios (EFC crops; Cityscapes frames)
PAPER_CROPS = {"psp": (713, 713), "efc": (713, 713), "flow": (713, 713), "flow2seg": (832, 832)}
METHODS = ("psp", "flow2seg", "efc", "flow")
REGION = "bench::"  # prefix of the profiler labels of the step's regions
# Regions of a training step; "correlation" lies inside "flow decoder" and "warping" inside "losses".
REGIONS = ("encoder", "seg decoder", "flow decoder", "flow path", "fusion", "losses", "optimizer",
           "correlation", "warping")
TOP_REGIONS = REGIONS[:7]  # disjoint; "other" is the rest of the step


def progress(message):
    print(message, file=sys.stderr, flush=True)


def short(backbone):
    return "R" + backbone.removeprefix("resnet")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device):
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
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
    seen, total = set(), 0
    for tensors in collections:
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _proc_status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_memory(fn, device, *held):
    """Peak memory of one run of fn(), in bytes: the tensors in `held` (the network's state, the
    inputs) plus the largest increase of memory in use during the run. CUDA: torch's allocator. CPU:
    the process's resident set, after handing freed heap memory back to the system (malloc_trim) and
    resetting its high-water mark (/proc/self/clear_refs, Linux); None where that is not possible."""
    held = tensor_bytes(*held)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return held + torch.cuda.max_memory_allocated(device) - start
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = _proc_status("VmRSS:")
    except (OSError, StopIteration):
        fn()
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
    return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12]), time.perf_counter()


def other_load(before):
    """Share of the machine's CPU time that other processes (and the hypervisor: steal) took since
    `before` = cpu_ticks(): timings taken while it is more than a few % are not clean. None off Linux
    and for windows under a second."""
    after = cpu_ticks()
    if before is None or after is None or after[2] - before[2] < 1:
        return None  # clock ticks are 10 ms: a window under a second says little
    capacity = (after[2] - before[2]) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    return min(max((after[0] - before[0]) - (after[1] - before[1]), 0) / capacity, 1.0)


def timed(fn, device):
    """Run fn() once; -> (its result, wall seconds), synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def round_ratio(seconds, base_seconds):
    """Time ratio of two things timed in turn: the median over rounds of the ratio within a round, so
    that a drift of the machine between rounds cancels."""
    return statistics.median(t / b for t, b in zip(seconds, base_seconds))


def count_flops(fn):
    """FLOPs of fn() (forward and, if fn runs it, backward) as torch.utils.flop_counter counts them:
    2 per multiply-add of convolutions and matmuls; elementwise ops, pooling, interpolation and
    gathers count 0. -> (total, {module name: flops})."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def matmul_peak(device, dtype, size, repeats):
    """The rate of a large square matmul (n^3 multiply-adds = 2 n^3 FLOPs): the best of `repeats`
    timings of a few back-to-back products, after one warm-up. -> FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.matmul(a, b)
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
    (flow path ResNet-18, as in the paper). Built on the current default device."""
    return {f"PSPNet-{short(backbone)}": (model.PSPNet(classes, backbone), False),
            f"EFCNet-{short(backbone)} inference": (model.EFCNet(classes, backbone), False),
            f"Flow2SegNet-{short(backbone)}+R18": (model.Flow2SegNet(classes, backbone, "resnet18"), True)}


def inputs_of(takes_flow, batch, size, device):
    image = torch.randn(batch, 3, *size, device=device)  # normalised images are O(1)
    return (image, 4 * torch.randn(batch, 2, *size, device=device)) if takes_flow else (image,)


def flop_rows(backbones, classes):
    """GFLOPs per image in eval mode at 713x713 and 1024x2048 (flow computation excluded for
    Flow2Seg, as in the paper: its flow is an input), and Flow2Seg's extra FLOPs per module."""
    rows, breakdown = [], []
    for backbone in backbones:
        with torch.device("meta"):
            networks = inference_networks(backbone, classes)
        for size in PAPER_SIZES:
            base = None
            for name, (net, takes_flow) in networks.items():
                net.eval()
                with torch.device("meta"), torch.no_grad():
                    inputs = inputs_of(takes_flow, 1, size, "meta")
                    flops, per_module = count_flops(lambda: net(*inputs))
                base = flops if base is None else base
                rows.append({"network": name, "backbone": backbone, "size": list(size), "gflops": flops / 1e9,
                             "vs_pspnet": flops / base})
                if takes_flow:
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
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def inference_rows(args, device):
    rows = []
    for backbone in args.backbones:
        progress(f"inference {short(backbone)} at {args.size[0]}x{args.size[1]}")
        torch.manual_seed(0)
        networks = inference_networks(backbone, args.classes)
        psp, efc = list(networks.values())[0][0], list(networks.values())[1][0]
        efc.seg.load_state_dict(psp.state_dict())  # the same weights: the same computation
        runs = {}
        for name, (net, takes_flow) in networks.items():
            to_device(net, device, args.channels_last).eval()
            inputs = inputs_of(takes_flow, args.infer_batch, args.size, device)
            inputs = tuple(layout(x, args.channels_last) for x in inputs)
            runs[name] = {"net": net, "inputs": inputs, "seconds": []}

        def run(entry):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                entry["net"](*entry["inputs"])

        for entry in runs.values():  # warm-up, the first run counting FLOPs
            entry["flops"], _ = count_flops(lambda: run(entry))
            for _ in range(args.warmup - 1):
                run(entry)
        before = cpu_ticks()
        for _ in range(args.repeats):  # round robin: the networks take turns
            for entry in runs.values():
                entry["seconds"].append(timed(lambda: run(entry), device)[1])
        others = other_load(before)
        for entry in runs.values():  # memory last: on the CPU, peak_memory hands freed memory back to the system
            entry["peak"] = peak_memory(lambda: run(entry), device, entry["net"].parameters(), entry["net"].buffers(),
                                        entry["inputs"])
        base = list(runs.values())[0]["seconds"]
        for name, entry in runs.items():
            seconds = statistics.median(entry["seconds"])
            n = args.infer_batch
            rows.append({"network": name, "backbone": backbone, "size": list(args.size), "batch": n,
                         "gflops_per_image": entry["flops"] / n / 1e9, "ms_per_image": 1000 * seconds / n,
                         "images_per_s": n / seconds, "vs_pspnet_time": round_ratio(entry["seconds"], base),
                         "peak_mb": None if entry["peak"] is None else entry["peak"] / 2 ** 20,
                         "runs": args.repeats, "ms_runs": [1000 * t / n for t in entry["seconds"]],
                         "other_load": others})
        del runs, networks, psp, efc
        release(device)
    return rows


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 3. One training step of train.py
# ---------------------------------------------------------------------------------------------
def training_batch(method, batch, crop, classes, device, channels_last):
    """Random inputs of the shapes train.py's datasets give: normalised images, int64 labels (the
    second frame of an EFC pair unlabelled, 255), Flow2Seg's flow in pixels."""
    def image():
        return torch.randn(batch, 3, *crop, device=device)

    def labels():
        return torch.randint(0, classes, (batch, *crop), device=device)

    if method == "psp":
        items = {"image": image(), "label": labels()}
    elif method == "flow2seg":
        items = {"image": image(), "label": labels(), "flow": 4 * torch.randn(batch, 2, *crop, device=device)}
    else:
        items = {"image_a": image(), "image_b": image(), "label_a": labels(),
                 "label_b": torch.full((batch, *crop), losses.IGNORE_INDEX, device=device)}
    return {k: layout(v, channels_last) for k, v in items.items()}


def training_step(net, batch, args, optimizer, groups, device):
    """The body of train.main's loop (the learning-rate schedule, autocast, train.compute_loss,
    backward, train.py's gradient clipping, the optimiser), without its logging."""
    iteration = args.flow_warmup  # the first step of the paper's losses (after the flow warm-up)
    train.poly_lr(optimizer, args, iteration)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        total, _ = train.compute_loss(net, batch, args, iteration)
    with record_function(REGION + "optimizer"):
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    with record_function(REGION + "optimizer"):
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.clip_grad)
        optimizer.step()


@contextlib.contextmanager
def labelled_regions(net):
    """Wrap the calls that make up a step's regions in profiler labels, for one profiled step; the
    network, warp.py and losses.py are unchanged afterwards. Labels: the shared encoder
    (PSPNet.encode), the decoders (PSPNet.decode, EFC's FlowDecoder, Flow2Seg's flow path and
    fusion), warp.correlation, warp.backward_warp and the losses train.compute_loss calls."""
    patches = []

    def label(owner, name, region):
        original = getattr(owner, name)

        def labelled(*a, **k):
            with record_function(REGION + region):
                return original(*a, **k)

        patches.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, labelled)

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

    def duration(e):
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
            continue
        chain = list(ancestors(e))
        if any(a.name.startswith(NODE) for a in chain):
            continue  # inside a backward node: counted with the node
        if e.name.startswith(NODE):
            backward.append(e)
        elif e.name.startswith(REGION):
            if all(a.name != e.name for a in chain):
                totals[e.name.removeprefix(REGION)] += duration(e)
        elif e.sequence_nr >= 0:
            key = (e.thread, e.sequence_nr)
            start = e.time_range.start
            if key not in creator or start >= creator[key][0]:
                creator[key] = (start, {a.name.removeprefix(REGION) for a in chain if a.name.startswith(REGION)})
    for e in backward:
        for region in creator.get((e.fwd_thread, e.sequence_nr), (0, ()))[1]:
            totals[region] += duration(e)
    shares = {region: totals[region] / step_us for region in REGIONS}
    shares["other"] = 1 - sum(shares[r] for r in TOP_REGIONS)
    return shares


def train_args(method, backbone, crop, batch, amp, channels_last):
    """train.py's arguments for a method with the paper recipe's optimiser (SGD, or Adam for flow2seg)."""
    return train.parse_args(["--method", method, "--recipe", "paper", "--backbone", backbone, "--crop", *map(str, crop),
                             "--batch", str(batch)] + ["--amp"] * amp + ["--channels-last"] * channels_last)


def training_setup(method, backbone, crop, batch, args, device):
    """method's network, parameter groups and optimiser built as train.main builds them, and a batch.
    -> dict with 'step', a function running one training step."""
    targs = train_args(method, backbone, crop, batch, args.amp, args.channels_last)
    torch.manual_seed(0)
    net = model.build_model(method, args.classes, targs.backbone, targs.flow_backbone, targs.max_displacement,
                            targs.corr_stride)
    to_device(net, device, args.channels_last).train()
    groups = train.parameter_groups(net, targs)
    optimizer = train.make_optimizer(groups, targs)
    data = training_batch(method, batch, crop, args.classes, device, args.channels_last)
    return {"method": method, "backbone": backbone, "crop": list(crop), "batch": batch, "net": net,
            "optimizer": optimizer, "data": data, "seconds": [],
            "step": lambda: training_step(net, data, targs, optimizer, groups, device)}


def step_shares(setup, device):
    """One step under torch.profiler with the regions labelled -> region_shares."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labelled_regions(setup["net"]), profile(activities=activities) as prof:
        _, seconds = timed(setup["step"], device)
    return region_shares(prof.events(), 1e6 * seconds, device.type == "cuda")


def step_peak_memory(setup, device):
    """peak_memory of one step. Held when a step starts: parameters, buffers, the previous step's
    gradients (train.py frees them only after the forward), optimiser state, the batch."""
    net, optimizer = setup["net"], setup["optimizer"]
    return peak_memory(setup["step"], device, net.parameters(), net.buffers(), (p.grad for p in net.parameters()),
                       setup["data"].values(), (t for s in optimizer.state.values() for t in s.values()))


def training_rows(args, device, peak):
    """Per backbone, the four methods side by side: --warmup steps each (at least one; the first counts
    the step's FLOPs), --repeats timed steps in turn (round robin, so the ratios to psp see the same
    machine), then one profiled step each and one step each measuring memory (last: on the CPU,
    peak_memory hands freed memory back to the system)."""
    rows = []
    for backbone in args.backbones:
        progress(f"training steps {short(backbone)}, batch {args.batch}")
        setups = [training_setup(m, backbone, args.crop or PAPER_CROPS[m], args.batch, args, device) for m in METHODS]
        for s in setups:
            s["flops"], _ = count_flops(s["step"])
            for _ in range(args.warmup - 1):
                s["step"]()
        before = cpu_ticks()
        for _ in range(args.repeats):
            for s in setups:
                s["seconds"].append(timed(s["step"], device)[1])
        others = other_load(before)
        for s in setups:
            s["shares"] = step_shares(s, device)
        for s in setups:
            s["peak"] = step_peak_memory(s, device)
        base = setups[0]["seconds"]
        for s in setups:
            median = statistics.median(s["seconds"])
            rows.append({"method": s["method"], "backbone": backbone, "crop": s["crop"], "batch": s["batch"],
                         "gflops_per_step": s["flops"] / 1e9, "ms_per_step": 1000 * median,
                         "images_per_s": s["batch"] / median, "achieved_tflops": s["flops"] / median / 1e12,
                         "share_of_matmul_peak": s["flops"] / median / peak,
                         "vs_psp_time": round_ratio(s["seconds"], base) if s["crop"] == setups[0]["crop"] else None,
                         "peak_mb": None if s["peak"] is None else s["peak"] / 2 ** 20, "runs": args.repeats,
                         "ms_runs": [1000 * t for t in s["seconds"]], "other_load": others, "shares": s["shares"]})
        del setups
        release(device)
    return rows


def efc_pair_memory(args, device):
    """EFC's memory goal: one training pair (batch 1) of 713x713 frames with ResNet-101."""
    progress("training step efc R101 at 713x713, batch 1: memory")
    setup = training_setup("efc", "resnet101", (713, 713), 1, args, device)
    for _ in range(max(args.warmup, 1)):
        setup["step"]()
    peak = step_peak_memory(setup, device)
    del setup
    release(device)
    return {"crop": [713, 713], "batch": 1, "peak_mb": peak / 2 ** 20}


# ---------------------------------------------------------------------------------------------
# 4. Correlation and warping against their references
# ---------------------------------------------------------------------------------------------
def reference_correlation(f1, f2, max_displacement=20, stride=2):
    """FlowNetC correlation (kernel 1, divided by C) by its definition, one displacement at a time:
    for each (dy, dx) the mean over channels of f1 times f2 shifted by (dy, dx), on the overlap of the
    two maps, zero elsewhere. The reference of the micro-benchmark: tests/test_warp.py's
    naive_correlation also loops over pixels, far too slow at EFC's sizes. tests/test_bench.py checks
    that the two references and warp.correlation agree.
    f1, f2: (B, C, H, W) -> (B, D^2, H, W), D = 2 * (d // s) + 1, dy-major."""
    B, C, H, W = f1.shape
    d, s = max_displacement, stride
    out = []
    for dy in range(-d, d + 1, s):
        for dx in range(-d, d + 1, s):
            y0, y1, x0, x1 = max(0, -dy), min(H, H - dy), max(0, -dx), min(W, W - dx)  # overlap in f1
            if y0 >= y1 or x0 >= x1:
                out.append(f1.new_zeros(B, H, W))
                continue
            product = (f1[:, :, y0:y1, x0:x1] * f2[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]).mean(1)  # (B, y1-y0, x1-x0)
            out.append(F.pad(product, (x0, W - x1, y0, H - y1)))  # (B, H, W)
    return torch.stack(out, 1)  # (B, D^2, H, W)


def grid_sample_warp(x, flow):
    """backward_warp by F.grid_sample (align_corners=True, positions normalised by W - 1 and H - 1),
    as tests/test_warp.py checks it, and zeroed where the sample leaves the image, as backward_warp
    does (grid_sample's zero padding would blend half a pixel beyond the border)."""
    H, W = x.shape[-2:]
    pos = warp.pixel_grid(H, W, x.device) + flow  # (B, 2, H, W) sampling points in pixels
    grid = torch.stack((2 * pos[:, 0] / max(W - 1, 1) - 1, 2 * pos[:, 1] / max(H - 1, 1) - 1), dim=-1)  # (B, H, W, 2)
    inside = ((grid >= -1) & (grid <= 1)).all(-1).unsqueeze(1)  # (B, 1, H, W)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True) * inside


def forward_backward(fn, inputs, device):
    """-> (output, forward seconds, forward + backward seconds); gradients of all inputs."""
    for x in inputs:
        x.grad = None
    out, forward = timed(lambda: fn(*inputs), device)
    _, backward = timed(lambda: out.backward(torch.ones_like(out)), device)
    return out.detach(), forward, forward + backward


def micro_rows(args, device):
    B, C, H, W = args.corr_shape
    d, s = 20, 2  # EFC's correlation: max displacement 20, stride 2 (441 channels)
    torch.manual_seed(0)
    f1, f2 = (torch.randn(B, C, H, W, device=device, requires_grad=True) for _ in range(2))
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    flow = (4 * torch.randn(B, 2, H, W, device=device)).requires_grad_()
    # No warm-up on the CPU, where one run takes seconds (the median absorbs a slow first run) and the
    # reference minutes (after its first few displacements it is warm anyway).
    warmup = args.warmup if device.type == "cuda" else 0
    cases = [("correlation", "warp.correlation", lambda a, b: warp.correlation(a, b, d, s), (f1, f2),
              args.layer_repeats),
             ("correlation", "reference (per-displacement loop)", lambda a, b: reference_correlation(a, b, d, s),
              (f1, f2), args.reference_repeats),
             ("backward_warp", "warp.backward_warp", lambda a, b: warp.backward_warp(a, b)[0], (x, flow),
              args.layer_repeats),
             ("backward_warp", "reference (F.grid_sample)", grid_sample_warp, (x, flow), args.layer_repeats)]
    rows, outputs = [], {}
    for op, impl, fn, inputs, repeats in cases:
        progress(f"{op}: {impl}, {B}x{C}x{H}x{W}")
        forward, total, before = [], [], cpu_ticks()
        for k in range(warmup + repeats):
            out, t_forward, t_total = forward_backward(fn, inputs, device)
            if k >= warmup:
                forward.append(t_forward)
                total.append(t_total)
        row = {"op": op, "impl": impl, "shape": [B, C, H, W], "ms_forward": 1000 * statistics.median(forward),
               "ms_forward_backward": 1000 * statistics.median(total), "runs": repeats,
               "ms_runs": [1000 * t for t in total],
               "other_load": other_load(before)}
        if op in outputs:  # the reference: speed-up of ours, and how far apart the outputs are
            ours_row, ours_out = outputs[op]
            row["max_abs_diff"] = (ours_out - out).abs().max().item()
            ours_row["speedup_vs_reference"] = row["ms_forward_backward"] / ours_row["ms_forward_backward"]
        else:
            outputs[op] = (row, out)
        rows.append(row)
        del out
    return rows


# ---------------------------------------------------------------------------------------------
# Goals of the issue
# ---------------------------------------------------------------------------------------------
def goal(text, measured, met, note=""):
    return {"goal": text, "measured": measured, "status": "not measured" if met is None else "met" if met else "missed",
            "note": note}


def goals(report, args, device):
    out, cuda = [], device.type == "cuda"
    flops = {(r["network"], tuple(r["size"])): r for r in report.get("flops", [])}
    for backbone in args.backbones:
        efc = f"EFCNet-{short(backbone)} inference"
        if flops:
            ratios = [flops[(efc, size)]["vs_pspnet"] for size in PAPER_SIZES]
            out.append(goal(f"EFC inference FLOPs = PSPNet's ({short(backbone)})",
                            " and ".join(f"{r:.6f}x" for r in ratios) + " at 713x713 and 1024x2048",
                            all(r == 1 for r in ratios)))
        timing = {r["network"]: r for r in report.get("inference", []) if r["backbone"] == backbone}
        if timing:
            ratio = timing[efc]["vs_pspnet_time"]
            out.append(goal(f"EFC inference time <= 1.02x PSPNet ({short(backbone)})",
                            f"{ratio:.3f}x at {args.size[0]}x{args.size[1]} on {device.type}", ratio <= 1.02))
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
            share = efc["shares"]["correlation"] + efc["shares"]["warping"]
            out.append(goal(f"correlation + warping <= 5 % of an EFC-{short(backbone)} training step on GPU",
                            f"{100 * share:.1f} % on {device.type}", share <= 0.05 if cuda else None,
                            "" if cuda else "GPU goal; the CPU share is shown for information"))
            ratio = efc["vs_psp_time"]
            out.append(goal(f"EFC training step <= 2.6x PSPNet's ({short(backbone)}, crop "
                            f"{efc['crop'][0]}x{efc['crop'][1]}, batch {efc['batch']})",
                            f"{ratio:.2f}x on {device.type}", ratio <= 2.6))
    micro = {(r["op"], r["impl"]): r for r in report.get("micro", [])}
    ours = micro.get(("correlation", "warp.correlation"))
    if ours:
        speedup = ours["speedup_vs_reference"]
        out.append(goal("correlation forward + backward >= 5x faster than the naive reference on the CPU",
                        f"{speedup:.1f}x on {device.type} at B, C, H, W = {tuple(ours['shape'])}, d = 20, s = 2",
                        speedup >= 5 if not cuda else None))
    psp = training.get(("psp", "resnet101"))
    fast = cuda and args.amp and args.channels_last
    out.append(goal("PSPNet-R101 training step >= 30 % of the bf16 matmul peak (bf16, channels_last, GPU)",
                    f"{100 * psp['share_of_matmul_peak']:.1f} % of the {report['settings']['peak_dtype']} peak on "
                    f"{device.type}" if psp else "-",
                    psp["share_of_matmul_peak"] >= 0.30 if psp and fast else None,
                    "" if fast else "needs --device cuda --amp --channels-last"))
    pair = report.get("efc_pair_memory")
    out.append(goal("EFC-R101 training pair at 713x713 <= 10 GB (GPU)",
                    f"{pair['peak_mb'] / 1024:.2f} GB" if pair else "-",
                    pair["peak_mb"] <= 10 * 1024 if pair and fast else None,
                    "" if fast else "needs --device cuda --amp --channels-last"))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_report(report):
    m, s = report["machine"], report["settings"]
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), device {m['device']}, "
          f"torch {m['torch']}, {m['date']}")
    print(f"settings: inference {s['size'][0]}x{s['size'][1]} batch {s['infer_batch']}; training crops {s['crops']} "
          f"batch {s['batch']}; {s['repeats']} timed runs after {s['warmup']} warm-up (layers {s['layer_repeats']}, "
          f"reference {s['reference_repeats']}); amp {s['amp']}, channels_last "
          f"{s['channels_last']}; matmul peak {fmt(report.get('matmul_peak_tflops'), '.2f')} TFLOP/s "
          f"({s['peak_dtype']})")
    header = (f"{'part':<10}{'what':<46}{'size':>14}{'GFLOPs':>10}{'ms':>10}{'img/s':>8}{'peak MB':>9}{'others':>8}"
              f"{'ratio':>8}  ratio to")
    print(header)
    print("-" * len(header))

    def line(part, what, size, gflops, ms, rate, peak, others, ratio, to):
        print(f"{part:<10}{what:<46}{size:>14}{fmt(gflops, '.2f'):>10}{fmt(ms, '.1f'):>10}{fmt(rate, '.2f'):>8}"
              f"{fmt(peak, '.0f'):>9}{fmt(others if others is None else 100 * others, '.1f'):>8}{fmt(ratio, '.3f'):>8}"
              f"  {to}")

    for r in report.get("flops", []):
        line("flops", r["network"], "x".join(map(str, r["size"])), r["gflops"], None, None, None, None, r["vs_pspnet"],
             "PSPNet FLOPs")
    for r in report.get("inference", []):
        line("inference", r["network"], "x".join(map(str, r["size"])), r["gflops_per_image"], r["ms_per_image"],
             r["images_per_s"], r["peak_mb"], r["other_load"], r["vs_pspnet_time"], "PSPNet time")
    for r in report.get("training", []):
        line("training", f"{r['method']} {short(r['backbone'])} batch {r['batch']}", "x".join(map(str, r["crop"])),
             r["gflops_per_step"], r["ms_per_step"], r["images_per_s"], r["peak_mb"], r["other_load"], r["vs_psp_time"],
             "psp step time")
    for r in report.get("micro", []):
        ratio = r.get("speedup_vs_reference")
        to = "speed-up over the reference" if ratio else f"max |diff| {r['max_abs_diff']:.1e}"
        line("micro", f"{r['op']}: {r['impl']}", "x".join(map(str, r["shape"])), None, r["ms_forward_backward"], None,
             None, r["other_load"], ratio, to)
    print("ms: per image (inference), per step (training), forward + backward (micro); others: % of the machine's CPU "
          "time taken by other processes during the timed runs")
    loads = [r["other_load"] for part in ("inference", "training", "micro") for r in report.get(part, [])
             if r.get("other_load") is not None]
    if loads and max(loads) > 0.05:
        print(f"WARNING: other processes took up to {100 * max(loads):.0f} % of the CPU during timed runs: "
              "those timings are not clean")
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
    for g in report["goals"]:
        print(f"  [{g['status']}] {g['goal']}: {g['measured']}" + (f" ({g['note']})" if g["note"] else ""))


def parse_args(argv=None):
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
    p.add_argument("--repeats", type=int, help="timed runs of each network and training step (cuda 20; cpu 5); the "
                                               "median is reported")
    p.add_argument("--layer-repeats", type=int, help="timed runs of the layers (cuda 20; cpu 3)")
    p.add_argument("--warmup", type=int, help="untimed runs first (cuda 5; cpu 2, and none for the layers); the first "
                                              "of a network counts its FLOPs, so networks have at least one")
    p.add_argument("--reference-repeats", type=int, help="timed runs of the correlation reference (cuda: "
                                                         "--layer-repeats; cpu 1: minutes at EFC's sizes)")
    p.add_argument("--corr-shape", type=int, nargs=4, default=[8, 512, 90, 90], metavar=("B", "C", "H", "W"),
                   help="features of the layer micro-benchmarks (EFC: 713x713 crops give 90x90 at stride 8)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (train.py's --amp)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (train.py's flag)")
    p.add_argument("--parts", nargs="+", default=["flops", "inference", "training", "micro"],
                   choices=["flops", "inference", "training", "micro"], help="what to measure (default: all)")
    p.add_argument("--matmul-size", type=int, help="n of the n x n matmul of the peak (cuda 8192; cpu 2048)")
    p.add_argument("--json", metavar="OUT", help="write the report here as JSON")
    args = data.one_line_errors(p).parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.device = "cuda" if cuda else "cpu"
    defaults = {"size": [1024, 2048] if cuda else [256, 512], "crop": None if cuda else [192, 192],
                "backbones": ["resnet50", "resnet101"] if cuda else ["resnet101"], "repeats": 20 if cuda else 5,
                "layer_repeats": 20 if cuda else 3, "warmup": 5 if cuda else 2, "matmul_size": 8192 if cuda else 2048}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reference_repeats is None:
        args.reference_repeats = args.layer_repeats if cuda else 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    peak_dtype = torch.bfloat16 if device.type == "cuda" or args.amp else torch.float32
    crops = {m: list(args.crop or PAPER_CROPS[m]) for m in METHODS}
    report = {"machine": machine(device),
              "settings": {"size": args.size, "infer_batch": args.infer_batch, "crops": crops, "batch": args.batch,
                           "backbones": args.backbones, "classes": args.classes, "repeats": args.repeats,
                           "warmup": args.warmup, "layer_repeats": args.layer_repeats,
                           "reference_repeats": args.reference_repeats,
                           "corr_shape": args.corr_shape, "amp": args.amp, "channels_last": args.channels_last,
                           "peak_dtype": str(peak_dtype).removeprefix("torch."), "matmul_size": args.matmul_size}}
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
    report["goals"] = goals(report, args, device)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
