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
from the full EFC run. Cost of the default: about 95 minutes per seed on 2 CPU cores (the EFC rows
about 8 minutes each), so `all --seeds 3` takes about 4.75 hours; `--quick` takes minutes.

Evaluation (the same for every row): the synthetic validation world, the consecutive pairs
(I_i, I_i+1) with 16 <= i < 22 of every snippet (60 pairs around the labelled 20th frame; all 290
pairs cost about 3 minutes per run on 2 cores; `--quick` takes 2 snippets). The world labels every
frame (gt_all), so mIoU is taken over the second frame b of every pair, 60 frames, rather than the
10 frames that gtFine labels; Flow2Seg's input for b is F_b->a (ground truth, or the EFC
network's). Temporal consistency and EPE are evaluate.py's (evaluate_consistency, evaluate_flow)
on the same pairs.

Outputs: runs under --runs (default runs/replicate/VARIANT/seedS), one JSON per run under
results/runs/ (the cache: a run whose JSON exists with the same settings is not trained again;
an interrupted run resumes from its checkpoint), results/TABLE.json (settings, every seed's
numbers, mean and sample std) and results/TABLE.md (the markdown table); `--readme` also puts the
tables into README.md between the markers <!-- replicate:TABLE --> and <!-- /replicate:TABLE -->.
`--quick` writes under results/quick/ and runs/replicate-quick/ instead, so it never mixes with a
full run.
"""
import argparse
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
#    world (README, "Evaluation"); Adam at 2e-4 is train.py's quick Flow2Seg setting.
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
    "tcc-fix": ("efc", ["--ablation", "tcc-fix"], "ul-oe", {}),  # --init with the UL + OE flow branch
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
        "rows": [("zero", "zero flow (reference)", "-"), ("ul", "UL", "7.53 / 11.03"),
                 ("ul-oe", "UL + OE", "7.23 / 8.72"), ("ul-tc", "UL + TC", "4.94 / 8.84"),
                 ("ul-oe-tc", "UL + OE + TC", "4.51 / 7.79"), ("full", "EFC full", "3.93 / 7.05")],
        "columns": [("epe_all", "EPE all", "px"), ("epe_noc", "EPE noc", "px"), ("fl_all", "Fl all %", "pct")],
        "paper": "EPE noc / all (KITTI 2015)",
    },
    "flow2seg-table3": {
        "title": "Flow2Seg Table 3 (and Table 2): motion for segmentation",
        "rows": [("psp", "PSPNet (image only)", "77.8"), ("flow2seg-gt", "+ Flow2Seg, ground-truth flow", "-"),
                 ("flow2seg-efc", "+ Flow2Seg, flow of the full EFC", "79.7 (FlowNet2 flow)"),
                 ("flow2seg-r50", "+ Flow2Seg, ResNet-50 flow path, ground-truth flow", "flow path: R18 39.6, R50 37.4")],
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
            "--log-every", str(max(1, settings["iterations"] // 20))]
    if device:
        args += ["--device", device]
    if dependency is not None:
        source = Path(runs_root) / dependency / f"seed{seed}" / "ckpt.pt"
        args += ["--init" if method == "efc" else "--flow-from", str(source)]
    return args + extra


def run_variant(name, seed, settings, paths, device, log):
    """Train (or resume) and evaluate one variant and seed, unless its result is cached -> result dict."""
    result_path = paths["results"] / "runs" / name / f"seed{seed}.json"
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("settings") == settings:
            log(f"{name} seed {seed}: cached ({result_path})")
            return cached
    run_dir = paths["runs"] / name / f"seed{seed}"
    stamp = run_dir / "settings.json"
    if run_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != settings):
        shutil.rmtree(run_dir)  # a run with other settings: start again
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings, indent=1))
    args = train_command(name, seed, settings, run_dir, paths["runs"], paths["data"], device)
    checkpoint = run_dir / "ckpt.pt"
    finished = False
    if checkpoint.is_file():
        finished = train.read_checkpoint(checkpoint)["iteration"] >= settings["iterations"]
        if not finished:
            args += ["--resume", str(checkpoint)]
    t0 = time.time()
    if not finished:
        log(f"{name} seed {seed}: python train.py {' '.join(args)}")
        with open(run_dir / "train.out", "a") as out:
            code = subprocess.call([sys.executable, str(Path(__file__).with_name("train.py")), *args],
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
    result = {"variant": name, "seed": seed, "settings": settings, "command": "python train.py " + " ".join(args),
              "metrics": evaluate.json_safe(metrics), "train_seconds": train_seconds,
              "eval_seconds": time.time() - t1}
    write_json(result_path, result)
    log(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return result


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def summarise(values):
    """mean and sample std (None for one seed) of finite values; NaN values (a class absent from
    both ground truth and prediction) are left out."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def format_value(mean, std, kind):
    if mean is None:
        return "-"
    scale, digits = (100.0, 1) if kind == "pct" else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def table_report(table, results, zero, settings, seeds):
    """The JSON report and the markdown table of one table from the per-run results."""
    spec = TABLES[table]
    rows = []
    for name, label, paper in spec["rows"]:
        per_seed = {seed: zero for seed in seeds} if name == "zero" else \
            {seed: results[(name, seed)]["metrics"] for seed in seeds}
        stats = {}
        for key, _, _ in spec["columns"]:
            mean, std = summarise([m.get(key) for m in per_seed.values()])
            stats[key] = {"mean": mean, "std": std}
        rows.append({"variant": name, "label": label, "paper": paper, "per_seed": per_seed, "stats": stats,
                     "command": None if name == "zero" else results[(name, seeds[0])]["command"]})
    header = ["variant"] + [h for _, h, _ in spec["columns"]] + [f"paper: {spec['paper']}"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(spec["columns"]) + " ---: |"]
    for row in rows:
        cells = [format_value(row["stats"][k]["mean"], row["stats"][k]["std"], kind) for k, _, kind in spec["columns"]]
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
    p.add_argument("--results", help="results folder (default results, or results/quick with --quick)")
    p.add_argument("--runs", help="run folders (default runs/replicate, or runs/replicate-quick with --quick)")
    p.add_argument("--device", help="cpu or cuda (train.py's default: cuda if available)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every run's checkpoint (default: only those other rows build on, ul-oe and full)")
    p.add_argument("--readme", metavar="FILE", nargs="?", const="README.md",
                   help="put the tables into this README between its replicate markers (default file README.md)")
    args = p.parse_args(argv)
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
    paths = {"results": Path(args.results or ("results/quick" if args.quick else "results")),
             "runs": Path(args.runs or ("runs/replicate-quick" if args.quick else "runs/replicate")),
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
        for name in order:
            results[(name, seed)] = run_variant(name, seed, settings, paths, args.device, log)
        if not args.keep_checkpoints:  # the rows built on ul-oe and full are done for this seed
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
