"""Replication: the papers' ablation tables re-run on the synthetic world, reported as measured.

    python replicate.py {efc-table1,efc-table2,flow2seg-table3,all} [--seeds 3] [--quick] [--readme]

Tables (rows = variants; every variant is one `python train.py ...` command, printed as it runs):
  efc-table1       EFC Table 1, segmentation: PSPNet; + TCC_fix (pre-trained flow branch, frozen);
                   + TCC_single; + TCC_single + OM; + TCC_multi + OM; + UD (the full EFC).
                   Metrics: mIoU and temporal consistency.
  efc-table2       EFC Table 2, flow: UL; UL + OE; UL + TC; UL + OE + TC; EFC full. Metrics: EPE
                   all / noc against the exact ground truth, with the zero flow as a reference row.
  flow2seg-table3  Flow2Seg Table 3 (and its Table 2's "shallow is better"): PSPNet (image only);
                   + Flow2Seg path on the ground-truth flow; + Flow2Seg path on the flow of the
                   trained full EFC (the two papers composed); a ResNet-50 flow path. Metrics: mIoU,
                   the IoU of the two look-alike classes (car_moving, car_parked: identical sprites
                   that differ only in motion) and the mIoU of the flow path alone.

Same budget for every variant: one backbone, crop, batch, optimiser, learning rate and number of
iterations (SETTINGS), seeds 0..N-1 (train.py --seed: initialisation, data order, augmentation;
the world itself is the same). Nothing is tuned per variant. Two rows depend on another run of the
same seed: TCC_fix is initialised from the UL + OE flow branch (EFC's "fixed pre-trained FlowNetS";
so its flow saw that run's iterations too; the encoder under the frozen decoder is shared and keeps
training, so the flow is fixed only approximately), and the EFC-flow Flow2Seg row takes its flows
from the full EFC run. Cost of the default: about 90 minutes per seed on 2 CPU cores (the EFC rows
about 8 minutes each), so `all --seeds 3` took 4.6 hours; `--quick` takes minutes.

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
count) and results/TABLE.md (the markdown table); `--readme` also puts the tables into docs/replication.md
between the markers <!-- replicate:TABLE --> and <!-- /replicate:TABLE -->. Plain `--quick` writes
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

import torch
from torch import nn
from torch.utils.data import Dataset

import data
import evaluate
import train

# ---------------------------------------------------------------------------------------------
# Settings shared by every variant. Choices for this scale, each for all rows alike:
#  - ResNet-18 backbones, 96x96 crops, batch 4: a 2-core CPU budget (train.py's quick recipe).
#  - Adam, lr 2e-4, poly decay, the flow decoder at the same lr (--flow-lr-mult 1): EFC's SGD at 0.01
#    (x0.1 for the flow decoder) left the flow at the zero-flow EPE after 200 iterations on this
#    world (docs/learning.md); Adam at 2e-4 is train.py's quick Flow2Seg setting.
#  - Correlation range 4 at stride 1 on the stride-8 features (+-32 image pixels): the world's
#    motion between frames up to max-gap 5 apart stays within about 28 pixels, so EFC's +-160 pixels
#    (20 at stride 2) would be 441 channels of nothing at a 96-pixel crop.
# ---------------------------------------------------------------------------------------------
SETTINGS = {"backbone": "resnet18", "flow_backbone": "resnet18", "crop": [96, 96], "batch": 4,
            "iterations": 200, "optimizer": "adam", "lr": 2e-4, "flow_lr_mult": 1.0, "max_displacement": 4,
            "corr_stride": 1, "workers": 1, "eval_window": [16, 22], "eval_snippets": None}
QUICK = {**SETTINGS, "iterations": 20, "eval_snippets": 2}

# Variants: name -> train.py method, its extra flags, the run of the same seed it builds on, and the
# settings it changes (only the one row that is about a setting).
VARIANTS = {
    "psp": ("psp", [], None, {}),
    "tcc-fix": ("efc", ["--ablation", "tcc-fix"], "ul-oe", {}),  # --flow-init: the UL + OE flow network, fixed
    "tcc-single": ("efc", ["--ablation", "tcc-single"], None, {}),
    "tcc-single-om": ("efc", ["--ablation", "tcc-single-om"], None, {}),
    "tcc-multi-om": ("efc", ["--ablation", "tcc-multi-om"], None, {}),
    "full": ("efc", ["--ablation", "full"], None, {}),
    "ul": ("flow", ["--ablation", "ul"], None, {}),
    "ul-oe": ("flow", ["--ablation", "ul-oe"], None, {}),
    "ul-tc": ("efc", ["--ablation", "ul-tc"], None, {}),
    "ul-oe-tc": ("efc", ["--ablation", "ul-oe-tc"], None, {}),
    "flow2seg-gt": ("flow2seg", [], None, {}),
    "flow2seg-efc": ("flow2seg", [], "full", {}),  # --flow-from the full EFC run
    "flow2seg-r50": ("flow2seg", [], None, {"flow_backbone": "resnet50"}),
}

# Tables: rows (variant, label, the paper's numbers) and columns (metric key, header, format).
# Paper numbers: EFC Table 1 (Cityscapes val mIoU %, PSPNet-R50), EFC Table 2 (KITTI 2015 EPE),
# Flow2Seg Table 3 (Cityscapes val mIoU %, PSPNet-R101) and Table 2 (flow path alone, FlowNet2 flow).
TABLES = {
    "efc-table1": {
        "title": "EFC Table 1: segmentation",
        "rows": [("psp", "PSPNet", "76.20"), ("tcc-fix", "+ TCC_fix", "77.02"),
                 ("tcc-single", "+ TCC_single", "77.58"), ("tcc-single-om", "+ TCC_single + OM", "77.79"),
                 ("tcc-multi-om", "+ TCC_multi + OM", "78.07"), ("full", "+ TCC_multi + OM + UD (EFC)", "78.44")],
        "columns": [("miou", "mIoU %", "pct"), ("temporal_consistency", "TC %", "pct")],
        "paper": "mIoU % (Cityscapes val, R50)",
    },
    "efc-table2": {
        "title": "EFC Table 2: optical flow",
        "rows": [("zero", "zero flow (reference)", "-"), ("ul", "UL", "11.03 / 7.53"),
                 ("ul-oe", "UL + OE", "8.72 / 7.23"), ("ul-tc", "UL + TC", "8.84 / 4.94"),
                 ("ul-oe-tc", "UL + OE + TC", "7.79 / 4.51"), ("full", "EFC full", "7.05 / 3.93")],
        "columns": [("epe_all", "EPE all", "px"), ("epe_noc", "EPE noc", "px"), ("fl_all", "Fl all %", "pct")],
        "paper": "EPE all / noc (KITTI 2015)",
    },
    "flow2seg-table3": {
        "title": "Flow2Seg Table 3 (and Table 2): motion for segmentation",
        "rows": [("psp", "PSPNet (image only)", "77.8"), ("flow2seg-gt", "+ Flow2Seg, ground-truth flow", "-"),
                 ("flow2seg-efc", "+ Flow2Seg, flow of the full EFC", "79.7 (FlowNet2 flow)"),
                 ("flow2seg-r50", "+ Flow2Seg, ResNet-50 flow path, ground-truth flow", "- (flow path alone, Table 2: R18 39.6, R50 37.4)")],
        "columns": [("miou", "mIoU %", "pct"), ("iou_car_moving", "IoU car_moving %", "pct"),
                    ("iou_car_parked", "IoU car_parked %", "pct"), ("miou_flow_path", "flow path alone mIoU %", "pct")],
        "paper": "mIoU % (Cityscapes val)",
    },
}
NAMES = list(TABLES) + ["all"]
LOOK_ALIKE = ("car_moving", "car_parked")


def needed_variants(tables):
    """The variants of the tables, with the runs they build on first, each once, in run order."""
    order = []

    def add(name):
        if name == "zero" or name in order:
            return
        dependency = VARIANTS[name][2]
        if dependency:
            add(dependency)
        order.append(name)

    for table in tables:
        for name, _, _ in TABLES[table]["rows"]:
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
        if not 0 <= lo < hi <= data.SNIPPET_LENGTH - 1:
            raise ValueError(f"eval window {window}: expected 0 <= start < end <= {data.SNIPPET_LENGTH - 1}")
        count = len(self.snippets) if snippets is None else min(snippets, len(self.snippets))
        self.pairs = [(s, i) for s in range(count) for i in range(lo, hi)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        s, i = self.pairs[index]
        return self.sequence[s * (data.SNIPPET_LENGTH - 1) + i]

    def frame_paths(self):
        """(frame b, frame a) image paths of every pair: the frames whose F_b->a Flow2Seg reads."""
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
        flow = item["flow_bw"]
        if self.flow_dir is not None:
            found = evaluate._synthetic_flow_input(self.sequence, self.flow_dir, item["snippet"], item["i"] + 1)
            if found is None:
                raise FileNotFoundError(f"{self.flow_dir}: no flow for frame {item['i'] + 1} of val snippet "
                                        f"{item['snippet']}")
            flow = found[0]
        return {"image": item["image_b"], "label": item["label_b"], "flow": flow}


class FlowPath(nn.Module):
    """A Flow2SegNet whose 'logits' are its flow path's alone (Flow2Seg Table 2 measures that path)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image, flow):
        return {"logits": self.net(image, flow)["flow_logits"]}


def evaluate_run(checkpoint, sequence, device, flow_dir=None):
    """Every metric of a trained run on the EvalPairs `sequence`."""
    net, ckpt = evaluate.load_checkpoint(checkpoint, device)
    net.eval()
    method = ckpt["method"]
    count = len(sequence)
    metrics = {"pairs": count}
    if method != "flow":
        frames = SecondFrames(sequence, flow_dir)
        seg = evaluate.evaluate_segmentation(net, method, frames, device)
        metrics.update(miou=seg["miou"], pixel_acc=seg["pixel_acc"], iou=seg["iou"])
        for name, iou in zip(sequence.classes, seg["iou"]):
            metrics[f"iou_{name}"] = iou
        metrics.update(evaluate.evaluate_consistency(net, method, sequence, device, max_items=count,
                                                     flow_dir=flow_dir))
        if method == "flow2seg":
            metrics["miou_flow_path"] = evaluate.evaluate_segmentation(FlowPath(net), method, frames, device)["miou"]
    if method in ("efc", "flow"):
        metrics.update(evaluate.evaluate_flow(net, sequence, device, max_items=count))
    return metrics


def zero_flow_metrics(sequence):
    """EPE / Fl of the zero flow on the EvalPairs `sequence`: what a flow network must beat."""
    count = len(sequence)
    counts = {"all": [], "noc": []}
    for index in range(count):
        item = sequence[index]
        gt, valid, occ = item["flow_fw"][None], item["flow_fw_valid"][None], item["occ_fw"][None]
        counts["all"].append(evaluate.flow_error_counts(torch.zeros_like(gt), gt, valid))
        counts["noc"].append(evaluate.flow_error_counts(torch.zeros_like(gt), gt, valid & ~occ))
    metrics = {"pairs": count}
    for region in ("all", "noc"):
        metrics.update(evaluate.flow_metrics(torch.cat(counts[region]).numpy(), region))
    return metrics


# ---------------------------------------------------------------------------------------------
# Running the variants
# ---------------------------------------------------------------------------------------------
def train_command(name, seed, settings, run_dir, runs_root, data_root, device):
    """The train.py argument list of one variant and seed."""
    method, extra, dependency, own = VARIANTS[name]
    settings = {**settings, **own}
    args = ["--method", method, "--data-root", str(data_root), "--seed", str(seed), "--out", str(run_dir),
            "--backbone", settings["backbone"], "--flow-backbone", settings["flow_backbone"],
            "--crop", *map(str, settings["crop"]), "--batch", str(settings["batch"]),
            "--iterations", str(settings["iterations"]), "--optimizer", settings["optimizer"],
            "--lr", str(settings["lr"]), "--flow-lr-mult", str(settings["flow_lr_mult"]),
            "--max-displacement", str(settings["max_displacement"]), "--corr-stride", str(settings["corr_stride"]),
            "--workers", str(settings["workers"]),
            # train.py's own validation only at the end and on a few items: this script evaluates
            "--val-every", "0", "--val-items", "5", "--ckpt-every", str(max(50, settings["iterations"] // 4)),
            "--log-every", str(max(1, settings["iterations"] // 20)),
            # every row from scratch at the same budget, pairs up to 5 frames apart, as before the
            # quick recipe started efc / flow / flow2seg from a world-trained PSPNet (train.world_encoder)
            "--no-world-init", "--max-gap", "5"]
    if device:
        args += ["--device", device]
    if dependency is not None:
        source = Path(runs_root) / dependency / f"seed{seed}" / "ckpt.pt"
        args += ["--flow-init" if method == "efc" else "--flow-from", str(source)]
    return args + extra


def cached_result(name, seed, settings, paths, device):
    """The stored result of one variant and seed if it was made with these settings and this train.py
    command (which holds the variant's flags, the data root and the device), else None."""
    result_path = paths["results"] / "runs" / name / f"seed{seed}.json"
    if not result_path.is_file():
        return None
    cached = json.loads(result_path.read_text())
    args = train_command(name, seed, settings, paths["runs"] / name / f"seed{seed}", paths["runs"], paths["data"],
                         device)
    if cached.get("settings") != settings or cached.get("command") != "python train.py " + " ".join(args):
        return None
    return cached


def code_version():
    """The git commit of this checkout (None outside git): written into every result."""
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
    stamp = run_dir / "settings.json"
    if run_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != settings):
        shutil.rmtree(run_dir)  # a run with other settings: start again
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings, indent=1))
    args = train_command(name, seed, settings, run_dir, paths["runs"], paths["data"], device)
    command = "python train.py " + " ".join(args)  # the cache key's command: without --resume
    checkpoint = run_dir / "ckpt.pt"
    finished = resumed = False
    if checkpoint.is_file():
        finished = train.read_checkpoint(checkpoint)["iteration"] >= settings["iterations"]
        resumed = not finished
    t0 = time.time()
    if not finished:
        argv = args + (["--resume", str(checkpoint)] if resumed else ["--overwrite"])  # the folder is this run's
        log(f"{name} seed {seed}: python train.py {' '.join(argv)}")
        with open(run_dir / "train.out", "a") as out:
            code = subprocess.call([sys.executable, str(Path(__file__).with_name("train.py")), *argv],
                                   stdout=out, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"{name} seed {seed}: train.py exited with {code}; see {run_dir / 'train.out'}")
    train_seconds = time.time() - t0
    flow_dir = None
    sequence = EvalPairs(paths["data"], settings["eval_window"], settings["eval_snippets"])
    t1 = time.time()
    if VARIANTS[name][0] == "flow2seg" and VARIANTS[name][2] is not None:
        # Flow2Seg's input on every evaluated frame, from the network that made its training flows.
        flow_dir = run_dir / "val_flows"
        source = paths["runs"] / VARIANTS[name][2] / f"seed{seed}" / "ckpt.pt"
        train.fill_flow_dir(source, paths["data"], flow_dir, torch.device(device or "cpu"),
                            frames={"val": sequence.frame_paths()})
    metrics = evaluate_run(checkpoint, sequence, torch.device(device or "cpu"), flow_dir)
    result = {"variant": name, "seed": seed, "settings": settings,
              "variant_settings": {**settings, **VARIANTS[name][3]}, "command": command, "resumed": resumed,
              "code_version": code_version(), "metrics": evaluate.json_safe(metrics),
              "train_seconds": train_seconds, "eval_seconds": time.time() - t1}
    write_json(result_path, result)
    log(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return result, True


def write_json(path, obj):
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


def table_report(table, results, zero, settings, seeds):
    """The JSON report and the markdown table of one table from the per-run results."""
    spec = TABLES[table]
    rows = []
    for name, label, paper in spec["rows"]:
        # The zero flow does not depend on the seed: one evaluation, no spread.
        per_seed = {"any": zero} if name == "zero" else {seed: results[(name, seed)]["metrics"] for seed in seeds}
        stats = {}
        for key, _, _ in spec["columns"]:
            mean, std, n = summarise([m.get(key) for m in per_seed.values()])
            stats[key] = {"mean": mean, "std": std, "n": n}
        rows.append({"variant": name, "label": label, "paper": paper, "per_seed": per_seed, "stats": stats,
                     "settings_changed": {} if name == "zero" else VARIANTS[name][3],
                     "command": None if name == "zero" else results[(name, seeds[0])]["command"]})
    header = ["variant"] + [h for _, h, _ in spec["columns"]] + [f"paper: {spec['paper']}"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(spec["columns"]) + " ---: |"]
    for row in rows:
        count = len(row["per_seed"])
        cells = [format_value(row["stats"][k]["mean"], row["stats"][k]["std"], kind, row["stats"][k]["n"], count)
                 for k, _, kind in spec["columns"]]
        lines.append("| " + " | ".join([row["label"]] + cells + [row["paper"]]) + " |")
    n = len(seeds)
    note = (f"{spec['title']}. Mean ± sample std over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}); "
            f"{settings['iterations']} iterations, batch {settings['batch']}, crop {settings['crop'][0]}x"
            f"{settings['crop'][1]}, {settings['backbone']}, {settings['optimizer']} lr {settings['lr']}; "
            f"{zero['pairs']} validation pairs.")
    markdown = note + "\n\n" + "\n".join(lines) + "\n"
    report = {"table": table, "title": spec["title"], "settings": settings, "seeds": list(seeds), "rows": rows,
              "markdown": markdown}
    return report, markdown


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
    p.add_argument("table", choices=NAMES, help="which table to run ('all': the three)")
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
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every run's checkpoint (default: deleted once all rows of a seed are done; a row "
                        "built on a deleted one trains that run again)")
    p.add_argument("--readme", metavar="FILE", nargs="?", const="docs/replication.md",
                   help="put the tables into this file between its replicate markers (default file "
                        "docs/replication.md)")
    args = data.one_line_errors(p).parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: need at least 1")
    for flag in ("iterations", "eval_snippets"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} {value}: need at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else SETTINGS)
    for key in ("iterations", "eval_snippets", "crop"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    tables = list(TABLES) if args.table == "all" else [args.table]
    results_folder, runs_folder = default_folders(settings)
    paths = {"results": Path(args.results or results_folder), "runs": Path(args.runs or runs_folder),
             "data": Path(args.data_root)}
    if not paths["data"].is_dir():
        print(f"writing the synthetic world to {paths['data']} ...", flush=True)
        data.make_synthetic_world(paths["data"])
    seeds = list(range(args.seeds))
    order = needed_variants(tables)
    log_file = paths["results"] / "replicate.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(message):
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    log(f"replicate {args.table}: variants {', '.join(order)}; seeds {seeds}; settings {settings}")
    results, t0 = {}, time.time()
    # Seed by seed, so that an interrupted run has whole tables for the first seeds.
    for seed in seeds:
        trained = set()  # variants trained now: the rows built on them are not taken from the cache
        for name in order:
            dependency = VARIANTS[name][2]
            use_cache = dependency not in trained
            if dependency and not (use_cache and cached_result(name, seed, settings, paths, args.device)):
                if not (paths["runs"] / dependency / f"seed{seed}" / "ckpt.pt").is_file():
                    log(f"{name} seed {seed} builds on {dependency}, whose checkpoint is gone: training it again")
                    results[(dependency, seed)], _ = run_variant(dependency, seed, settings, paths, args.device,
                                                                 log, use_cache=False)
                    trained.add(dependency)
                    use_cache = False
            results[(name, seed)], now = run_variant(name, seed, settings, paths, args.device, log, use_cache)
            if now:
                trained.add(name)
        if not args.keep_checkpoints:  # every row of this seed is done
            for name in order:
                for file in ("ckpt.pt", "best.pt"):
                    (paths["runs"] / name / f"seed{seed}" / file).unlink(missing_ok=True)
    zero = zero_flow_metrics(EvalPairs(paths["data"], settings["eval_window"], settings["eval_snippets"]))
    for table in tables:
        report, markdown = table_report(table, results, zero, settings, seeds)
        write_json(paths["results"] / f"{table}.json", evaluate.json_safe(report))
        (paths["results"] / f"{table}.md").write_text(markdown)
        if args.readme:
            update_readme(args.readme, table, markdown)
        print("\n" + markdown)
    log(f"done in {(time.time() - t0) / 60:.1f} min; tables in {paths['results']}")


if __name__ == "__main__":
    main()
