"""train.py: tiny runs of every method, exact resume, DDP = one process, atomic checkpoints, errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import config
import data
import evaluate
import model
import train
import synthetic

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return str(synthetic.make_synthetic_world(tmp_path_factory.mktemp("train") / "world", num_train=2, num_val=1,
                                         size=(48, 64), seed=3, workers=1))


def tiny(world, out, method, *extra):
    """Flags of a tiny run: whole 48x64 frames, batch 2, one-line logs, no worker processes, and no
    PSPNet stage first (test_world_encoder covers it)."""
    return ["--method", method, "--data-root", world, "--out", str(out), "--crop", "48", "64", "--batch", "2",
            "--workers", "0", "--log-every", "1", "--val-every", "0", "--val-items", "2", "--ckpt-every", "1000",
            "--no-world-init", *extra]


def losses_logged(out):
    lines = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.parametrize("method,lr,steps", [("psp", "0.01", 24), ("flow2seg", "0.001", 24), ("efc", "0.0003", 16),
                                             ("flow", "0.0003", 16)])
def test_every_method_lowers_its_loss_and_writes_a_loadable_checkpoint(world, tmp_path, method, lr, steps):
    # efc / flow: the paper's losses from the first iteration (the warm-up has its own test), Adam; 16 steps
    # (2.7 s each for efc: its Adam step and backward over ~60M weights, not the 48x64 frames, cost the time)
    torch.set_num_threads(1)
    extra = ("--flow-warmup", "0") if method in ("efc", "flow") else ()
    train.main(tiny(world, tmp_path, method, "--iterations", str(steps), "--no-augment", "--lr", lr, *extra))
    history = losses_logged(tmp_path)
    assert len(history) == steps
    assert sum(history[-4:]) < sum(history[:4]), history
    net, ckpt = evaluate.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["method"] == method and ckpt["iteration"] == steps
    validation = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "validation" in line]
    assert validation and validation[-1]["iteration"] == steps
    metrics = validation[-1]["validation"]
    assert ("miou" in metrics) == (method != "flow") and ("epe_all" in metrics) == (method in ("efc", "flow"))


def test_resume_continues_bitwise(world, tmp_path):
    torch.set_num_threads(1)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    flags = ("--iterations", "4", "--lr", "0.005")  # augmentation on: it must be reproduced too
    train.main(tiny(world, straight, "efc", *flags))
    train.main(tiny(world, halves, "efc", *flags, "--stop-after", "2"))
    assert torch.load(halves / "ckpt.pt", weights_only=True)["iteration"] == 2
    train.main(tiny(world, halves, "efc", *flags, "--resume", str(halves / "ckpt.pt"), "--workers", "2"))
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(halves / "ckpt.pt", weights_only=True)
    assert b["iteration"] == 4
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert losses_logged(straight) == losses_logged(halves)


# efc by default: its run holds every piece the others use (the PSPNet, synchronised BatchNorm, the
# global-batch means, the sampler) and its own; psp and flow2seg (70 s together) run with -m slow.
@pytest.mark.parametrize("method", [pytest.param("psp", marks=pytest.mark.slow),
                                    pytest.param("flow2seg", marks=pytest.mark.slow), "efc"])
def test_two_gloo_processes_train_like_one(world, tmp_path, method):
    # Augmentation on (every item is a function of (seed, epoch, index), not of the split), dropout off
    # (its masks are the one thing that depends on the split), BatchNorm synchronised
    # (train.CPUSyncBatchNorm), and every pixel mean taken over the global batch (losses.masked_mean):
    # 2 processes take the steps 1 process takes, up to float32 rounding and what ReLU makes of it.
    # efc: Table 2's UL + TC row, whose pairs with and without the labelled frame put different
    # numbers of labelled pixels in the two halves of the batch, with L_seg, L_pm and L_sm. Left out,
    # each because it turns rounding into more than rounding: O_hat and O_seg threshold the flow and
    # the argmax (a pixel can flip), and L_cons's ||S - S'||_2 has a unit-vector gradient whose
    # direction is rounding noise where S' ~ S.
    # SGD for every method: Adam's first steps are lr * g / (|g| + eps), which turns the rounding of
    # gradients near eps into differences of up to lr; SGD's steps are linear in the gradient.
    flags = ["--iterations", "2", "--batch", "4", "--optimizer", "sgd", "--lr", "0.001", "--no-dropout"]
    if method == "efc":
        flags += ["--flow-warmup", "1", "--ablation", "ul-tc", "--cons-weight", "0"]  # warm-up, then the paper losses
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {name: tiny(world, tmp_path / name, method) + flags for name in ("start", "one", "two")}
    runs["start"][runs["start"].index("--lr") + 1] = "0"  # the initial weights, to measure the steps against
    for name in ("start", "one"):
        subprocess.run([sys.executable, "train.py", *runs[name]], cwd=ROOT, env=env, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                             "train.py", *runs["two"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    start, one, two = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"] for name in runs)
    assert one.keys() == two.keys()
    # The two-step update D = weights - initial weights, compared as a whole and per tensor. Not per
    # element: float32 rounding moves a pre-activation that sits within ~1e-6 of a ReLU's kink across
    # it, and that pixel's whole gradient is then in one run and not the other (measured on flow2seg:
    # 2 of 98k elements of the flow path's last ReLU flip between the two BatchNorm codes on the same
    # batch, and its last conv's gradient moves by 6 % of its largest element). Measured (AMD EPYC,
    # 4 seeds of flow2seg, psp, efc): |D_two - D_one| / |D_one| <= 6e-3 over all weights, <= 5e-2 for
    # any one tensor (BatchNorm weights near 1, whose steps of ~1e-6 are a few float32 ulps); with
    # BatchNorm left unsynchronised (the bug this test is for) 0.84 over all weights and 1.5 per tensor.
    steps = {name: (one[name].double() - start[name].double(), two[name].double() - start[name].double())
             for name, value in one.items() if value.is_floating_point() and "running_" not in name}
    difference = sum((b - a).square().sum() for a, b in steps.values()).sqrt()
    size = sum(a.square().sum() for a, _ in steps.values()).sqrt()
    assert size > 0 and difference <= 3e-2 * size, (difference / size).item()
    for name, (a, b) in steps.items():
        ulps = (torch.finfo(torch.float32).eps * one[name].double().abs()).square().sum().sqrt()  # the weights' rounding
        assert (b - a).norm() <= 0.25 * a.norm() + 2 * ulps, name
    for name in one:  # BatchNorm's running statistics, whose second update sees the first step's kinks:
        if "running_" in name:  # measured <= 2.4e-5 of their size; 0.6 unsynchronised
            a, b = one[name].double(), two[name].double()
            assert (b - a).norm() <= 1e-3 * a.norm(), name
    assert losses_logged(tmp_path / "one") == pytest.approx(losses_logged(tmp_path / "two"), rel=1e-5)


def test_cpu_sync_batchnorm_is_batchnorm(monkeypatch):
    # CPUSyncBatchNorm on one process (its all_reduce the identity) computes what torch's BatchNorm
    # does: the output, every gradient and the running statistics, in float64 to 1e-12; in float32
    # to rounding, also for a channel whose |mean| is 1000x its std (the one-pass E[x^2] - mean^2
    # loses ~6 of float32's 7 digits of the variance there).
    monkeypatch.setattr(torch.distributed.nn.functional, "all_reduce", lambda x: x)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=generator, dtype=torch.float64)
    x[:, 2] = 1000 + 0.5 * x[:, 2]  # |mean| / std = 2000
    g = torch.randn(4, 3, 5, 6, generator=generator, dtype=torch.float64)

    def run(bn, dtype):
        bn = bn.to(dtype).train()
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        xx = x.to(dtype).clone().requires_grad_()
        out = bn(xx)
        out.backward(g.to(dtype))
        return [t.double() for t in (out, xx.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)]

    reference = run(torch.nn.BatchNorm2d(3), torch.float64)
    for got, want in zip(run(train.CPUSyncBatchNorm(3), torch.float64), reference):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(run(train.CPUSyncBatchNorm(3), torch.float32), reference):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def torchrun_ablation(world, out, ablation, port, flow_init=None):
    """One iteration of an EFC ablation on 2 gloo processes -> the CompletedProcess."""
    method = config.ABLATIONS[ablation].method
    argv = tiny(world, out, method, "--iterations", "1", "--batch", "2", "--ablation", ablation, "--flow-warmup", "0")
    if flow_init:
        argv += ["--flow-init", flow_init]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "train.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# suite time: test_two_gloo_processes_train_like_one[efc] runs an ablation (ul-tc) under torchrun by default
@pytest.mark.parametrize("ablation", [pytest.param("tcc-single", marks=pytest.mark.slow),
                                      pytest.param("ul-tc", marks=pytest.mark.slow),
                                      pytest.param("tcc-fix", marks=pytest.mark.slow)])
def test_ablations_without_occlusion_or_with_a_fixed_flow_run_under_torchrun(world, tmp_path, ablation):
    # The rows whose occlusion heads (tcc-single, ul-tc) or whole flow decoder (tcc-fix) get no
    # gradient: DDP failed on them ("Expected to have finished reduction"). tcc-single runs by default,
    # ul-tc, tcc-fix and the other rows with pytest -m slow (each is a 2-process run of ~40 s).
    flow_init = None
    if ablation == "tcc-fix":
        train.main(tiny(world, tmp_path / "flow", "flow", "--iterations", "1"))
        flow_init = str(tmp_path / "flow" / "ckpt.pt")
    result = torchrun_ablation(world, tmp_path / "run", ablation, 29523, flow_init)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints.read_checkpoint(tmp_path / "run" / "ckpt.pt")["iteration"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["tcc-single-om", "tcc-multi-om", "full", "ul", "ul-oe", "ul-oe-tc"])
def test_every_other_ablation_runs_under_torchrun(world, tmp_path, ablation):
    result = torchrun_ablation(world, tmp_path / "run", ablation, 29524)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_finished_torchrun_run_exits_every_time(world, tmp_path):
    # The exit hang of #15: `--ablation full`, 2 iterations, 2 gloo processes printed "done", then rank 0
    # waited until killed in 2 of 5 runs (150 s and 18 minutes). Five runs in a row must each exit well
    # within torchrun_ablation's 300 s (a healthy run takes ~40 s on 2 cores).
    for k in range(5):
        started = time.time()
        result = torchrun_ablation(world, tmp_path / f"run{k}", "full", 29525 + k)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "done in" in result.stdout and time.time() - started < 150, (k, time.time() - started)


def test_killing_a_checkpoint_write_never_leaves_a_broken_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(target, {"iteration": -1, "weights": torch.zeros(10)})
    writer = ("import sys, torch, checkpoints\n"
              "i = 0\n"
              "while True:\n"
              "    checkpoints.save_checkpoint(sys.argv[1], {'iteration': i, 'weights': torch.full((3_000_000,), float(i))})\n"
              "    i += 1\n")
    tmp = target.with_name(target.name + ".tmp")
    seen = set()
    # Three kills: early in a write, in the middle, after a few writes. Each round starts a fresh
    # Python that imports torch and train.py (seconds each), which makes this the suite's slowest
    # default test; six rounds took over two minutes on a loaded 2-core machine.
    for delay in (0.0, 0.05, 0.4):
        tmp.unlink(missing_ok=True)  # left by the previous round's kill
        process = subprocess.Popen([sys.executable, "-c", writer, str(target)], cwd=ROOT)
        deadline = time.time() + 60
        while not tmp.exists() and time.time() < deadline:  # the writer is inside a write now
            time.sleep(0.001)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        ckpt = torch.load(target, weights_only=True)  # never raises
        i = ckpt["iteration"]
        assert i == -1 or torch.equal(ckpt["weights"], torch.full((3_000_000,), float(i)))
        seen.add(i)
    assert len(seen) > 1  # the writer did replace the file between kills


def poison_step(monkeypatch, step, poison):
    """Make train.compute_loss call poison(net, terms) -> terms at its step-th call (1-based, as the log)."""
    real, calls = train.compute_loss, []

    def poisoned(net, batch, args, iteration, flow_net=None):
        total, terms = real(net, batch, args, iteration, flow_net)
        calls.append(1)
        return total, poison(net, terms) if len(calls) == step else terms

    monkeypatch.setattr(train, "compute_loss", poisoned)


def test_a_non_finite_loss_stops_naming_the_term_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    poison_step(monkeypatch, 4, lambda net, terms: dict(terms, pm=torch.tensor(float("nan"))))
    with pytest.raises(SystemExit, match=r"iteration 4: loss term 'pm' is not finite"):
        train.main(tiny(world, tmp_path, "flow", "--iterations", "8", "--ckpt-every", "2"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iteration"] == 2


def test_command_line_errors(world, tmp_path, capsys):
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_text.returncode == 0 and "--flow-lr-mult" in help_text.stdout and "--recipe" in help_text.stdout
    # every recipe-dependent flag says what each recipe gives it (generated from the recipe tables)
    flat = " ".join(help_text.stdout.split())
    assert ("[default: quick: 96 96, whole frames (128 256) for efc and flow on the synthetic world; paper: 713 713 "
            "(flow2seg: 832 832)]") in flat
    assert "[quick: psp 0.01, efc 0.0001, flow 0.0001, flow2seg 0.0002; paper: 0.01, flow2seg 2e-05]" in flat
    unknown = subprocess.run([sys.executable, "train.py", "--method", "unet"], cwd=ROOT, capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice: 'unet'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1  # one line, no usage block
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--method", "psp", "--dataset", "cityscapes", "--data-root", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        train.main(["--method", "psp", "--dataset", "camvid"])
    assert "--dataset camvid needs --data-root" in capsys.readouterr().err
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path / "psp", "psp", "--iterations", "1"))
    with pytest.raises(SystemExit, match="a psp checkpoint, not efc"):
        train.main(tiny(world, tmp_path / "efc", "efc", "--iterations", "2", "--resume", str(tmp_path / "psp" / "ckpt.pt")))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        train.main(tiny(world, tmp_path / "x", "efc", "--resume", str(tmp_path / "missing.pt")))


def test_flow2seg_trains_on_flows_computed_by_a_trained_flow_branch(world, tmp_path):
    # The two papers composed: EFC's unsupervised flow (--method flow) feeds Flow2Seg (--flow-from).
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path / "flow", "flow", "--iterations", "2"))
    train.main(tiny(world, tmp_path / "f2s", "flow2seg", "--iterations", "2", "--flow-from",
                    str(tmp_path / "flow" / "ckpt.pt")))
    flows = sorted((tmp_path / "f2s" / "flows").rglob("*.flo"))
    assert len(flows) == 3  # the labelled frames of 2 train + 1 val snippets
    assert data.read_flo(flows[0]).shape == (48, 64, 2)
    ckpt = torch.load(tmp_path / "f2s" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["flow_dir"] == str(tmp_path / "f2s" / "flows")


@pytest.mark.slow  # 66-72 s on a 2-core CPU without bf16 instructions (emulated): over the default suite's minute
def test_bf16_autocast_run_on_cpu(world, tmp_path):
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path, "efc", "--iterations", "2", "--amp"))
    assert all(torch.isfinite(torch.tensor(losses_logged(tmp_path))))


def test_frozen_parts_stay_exactly_as_initialised(world, tmp_path, capsys, monkeypatch):
    # EFC Table 1 "TCC_fix": a trained flow branch, fixed; Flow2Seg's flow-path stage: the image path
    # and the fusion fixed. Parameters and BatchNorm statistics of frozen parts must not move.
    torch.set_num_threads(1)
    with pytest.raises(SystemExit):
        train.main(tiny(world, tmp_path / "x", "efc", "--ablation", "tcc-fix"))
    assert "give --flow-init" in capsys.readouterr().err
    train.main(tiny(world, tmp_path / "flow", "flow", "--iterations", "1"))
    flow_ckpt = str(tmp_path / "flow" / "ckpt.pt")
    train.main(tiny(world, tmp_path / "fix", "efc", "--iterations", "2", "--ablation", "tcc-fix",
                    "--flow-init", flow_ckpt))
    # Its own flow decoder never ran, so it has no flow to score: evaluation leaves EPE out (it was
    # 6.29 px on the replication's world, near the zero flow's 6.35, where the fixed network had 3.11)
    fixed, ckpt = evaluate.load_checkpoint(tmp_path / "fix" / "ckpt.pt")
    scored = evaluate.validate(fixed, evaluate.config_of(ckpt), "cpu", max_items=2)
    assert "epe_all" not in scored and scored["segmentation_images"] == 1 and "temporal_consistency" in scored
    flow_net, ckpt = evaluate.load_checkpoint(flow_ckpt)
    assert "epe_all" in evaluate.validate(flow_net, evaluate.config_of(ckpt), "cpu", max_items=2)
    # TCC_fix's flow comes from a frozen copy of the whole flow network (encoder included): on one
    # pair it stays the same while the segmentation encoder trains (before, it moved by 4.77 px in
    # 8 steps because the decoder read the training encoder)
    args = config.parse_args(tiny(world, tmp_path / "y", "efc", "--ablation", "tcc-fix", "--flow-init", flow_ckpt))
    net = train.build_model("efc", 9, args.backbone, args.flow_backbone, args.max_displacement, args.corr_stride)
    flow_net = train.fixed_flow_network(flow_ckpt, torch.device("cpu"), print)
    groups = train.parameter_groups(net, args)
    optimizer = torch.optim.Adam([q for g in groups for q in g["params"]], lr=1e-3)
    item = train.training_dataset(args)[0]
    batch = {k: v[None] for k, v in item.items() if torch.is_tensor(v)}
    seen = []
    efc_loss = train.losses.efc_loss
    def spy(outputs, *a, **kw):
        seen.append(outputs["flow_ab"][0].clone())
        return efc_loss(outputs, *a, **kw)
    monkeypatch.setattr(train.losses, "efc_loss", spy)
    start = net.seg.backbone.layer3[0].conv1.weight.clone()
    for _ in range(3):
        total, _ = train.compute_loss(net, batch, args, 0, flow_net)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert seen[0].abs().mean() > 0 and all(torch.equal(seen[0], f) for f in seen[1:])
    assert not torch.equal(start, net.seg.backbone.layer3[0].conv1.weight)
    assert all(q.grad is None for q in flow_net.parameters())

    train.main(tiny(world, tmp_path / "f2s", "flow2seg", "--iterations", "1"))
    train.main(tiny(world, tmp_path / "path", "flow2seg", "--iterations", "2", "--flow2seg-stage", "flow-path",
                    "--init", str(tmp_path / "f2s" / "ckpt.pt")))
    before = torch.load(tmp_path / "f2s" / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "path" / "ckpt.pt", weights_only=True)["model"]
    frozen = [k for k in before if k.startswith(("image.", "fusion."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # running stats included
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("flow_backbone."))


# 27 s: behind -m slow to keep the default suite under 10 minutes; every fresh run of the README's main
# command goes through the same stage (it trains, prints and caches the world's PSPNet).
@pytest.mark.slow
def test_world_encoder_trains_a_pspnet_once_then_uses_the_cached_one(world, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # runs/world-init/ is relative to the working directory
    monkeypatch.setattr(train, "WORLD_INIT_ITERATIONS", 2)
    def flags(method):
        return [f for f in tiny(world, tmp_path / method, method, "--iterations", "1") if f != "--no-world-init"]

    train.main(flags("flow"))
    first = capsys.readouterr().out
    encoder = Path("runs/world-init") / f"psp-resnet18-seed0-{Path(world).name}" / "ckpt.pt"
    assert "training a PSPNet on the world first: `python train.py --method psp" in first and encoder.is_file()
    psp = torch.load(encoder, weights_only=True)
    flow = torch.load(tmp_path / "flow" / "ckpt.pt", weights_only=True)
    assert psp["iteration"] == 2 and flow["config"]["init"] == [str(encoder)]
    train.main(flags("efc"))
    second = capsys.readouterr().out
    assert "(cached; made by `python train.py --method psp" in second and "training a PSPNet" not in second
    # an explicit --init, or --no-world-init, skips the stage
    assert train.world_encoder(config.parse_args(flags("efc") + ["--init", str(encoder)]), 1, print) is None
    assert train.world_encoder(config.parse_args(flags("efc") + ["--no-world-init"]), 1, print) is None


def test_flow_supervised_diagnostic_lowers_the_epe_loss(world, tmp_path):
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path, "flow", "--flow-supervised", "--iterations", "16", "--no-augment",
                    "--optimizer", "adam", "--lr", "1e-3", "--flow-lr-mult", "1"))
    history = losses_logged(tmp_path)
    assert len(history) == 16 and sum(history[-4:]) / 4 < 0.9 * sum(history[:4]) / 4, history
    with pytest.raises(SystemExit):
        config.parse_args(["--method", "efc", "--flow-supervised"])


def test_flow_warmup_trains_towards_the_matching_flow_then_hands_over_to_the_paper_losses(world, tmp_path):
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path, "efc", "--iterations", "4", "--flow-warmup", "2"))
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"loss"' in line]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4]
    assert all(line["warmup"] > 0 and line["pm"] == 0 and line["cons"] == 0 and line["seg"] > 0 for line in lines[:2])
    assert all(line["warmup"] == 0 and line["pm"] > 0 and line["cons"] > 0 for line in lines[2:])
    # the quick recipe warms up efc and flow only; asking for it elsewhere is an error
    # efc and flow on the world run the budget the README reports: 200 iterations, 100 of warm-up
    for method in ("efc", "flow"):
        args = config.parse_args(["--method", method])
        assert (args.iterations, args.flow_warmup) == (200, 100) and args.sources["iterations"] == "rule flow-budget"
    assert config.parse_args(["--method", "flow2seg"]).iterations == 200
    args = config.parse_args(["--method", "flow", "--dataset", "kitti", "--data-root", "k"])
    assert (args.iterations, args.flow_warmup) == (200, 100)  # elsewhere the quick recipe's own
    assert args.sources["iterations"] == args.sources["flow_warmup"] == "quick"
    paper = ["--method", "efc", "--recipe", "paper", "--dataset", "synthetic", "--from-scratch"]
    assert config.parse_args(paper).flow_warmup == 0
    assert config.parse_args(["--method", "psp"]).flow_warmup == 0
    assert config.parse_args(["--method", "flow", "--flow-supervised"]).flow_warmup == 0
    for argv in (["--method", "psp", "--flow-warmup", "5"], ["--method", "flow", "--flow-warmup", "-1"]):
        with pytest.raises(SystemExit):
            config.parse_args(argv)


def test_the_unsupervised_flow_trains_on_whole_unpadded_frames(world, tmp_path):
    # Quick recipe, synthetic world: efc and flow crop whole frames and never pad (docs/choices.md);
    # an explicit --crop wins; the segmentation-only methods keep 96x96 crops with padding and rotation.
    for method, crop in (("flow", [128, 256]), ("efc", [128, 256]), ("psp", [96, 96]), ("flow2seg", [96, 96])):
        assert config.parse_args(["--method", method]).crop == crop, method
    assert config.parse_args(["--method", "efc", "--crop", "64", "80"]).crop == [64, 80]
    paper = ["--method", "efc", "--recipe", "paper", "--dataset", "synthetic", "--from-scratch"]
    assert config.parse_args(paper).crop == [713, 713]
    for method, pad in (("efc", False), ("flow", False), ("psp", True), ("flow2seg", True)):
        transform = train.training_dataset(config.parse_args(tiny(world, tmp_path, method))).transform
        assert transform.pad is pad and (transform.rotate == 0) is not pad, method


def test_a_run_folder_is_never_reused_silently_and_resume_keeps_the_runs_settings(world, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    train.main(tiny(world, run, "psp", "--iterations", "4", "--crop", "32", "32", "--stop-after", "2"))
    log_before = (run / "log.jsonl").read_text()
    # the same command again would replace the checkpoint and append to the log: refused
    with pytest.raises(SystemExit, match=r"already holds a run .*--resume .*--overwrite"):
        train.main(tiny(world, run, "psp", "--iterations", "4"))
    assert (run / "log.jsonl").read_text() == log_before
    # a flag that contradicts the run is refused, naming it; one that changes nothing is accepted
    with pytest.raises(SystemExit):
        train.main(tiny(world, run, "psp", "--iterations", "9", "--resume", str(run / "ckpt.pt")))
    args = config.parse_args(["--method", "psp", "--resume", str(run / "ckpt.pt"), "--iterations", "4"])
    # settings not given come from the checkpoint (crop 32x32, batch 2, its folder), not the recipe
    assert args.crop == [32, 32] and args.batch == 2 and args.iterations == 4 and Path(args.out) == run
    assert (args.sources["crop"], args.sources["iterations"], args.sources["out"]) == ("checkpoint", "flag", "checkpoint")
    # a kill after iteration 3's log line but before its checkpoint: resume drops that line
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "loss": 123.0}) + "\n")
    train.main(["--method", "psp", "--resume", str(run / "ckpt.pt"), "--workers", "0", "--log-every", "1"])
    iterations = [line["iteration"] for line in map(json.loads, open(run / "log.jsonl")) if "loss" in line]
    assert iterations == [1, 2, 3, 4] and 123.0 not in losses_logged(run)
    # --overwrite starts afresh
    train.main(tiny(world, run, "psp", "--iterations", "1", "--overwrite"))
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [line["iteration"] for line in records] == [0, 1, 1]  # config, loss, validation
    assert records[0]["config"]["iterations"] == 1 and records[0]["resumed"] is False


def test_best_pt_holds_weights_only_and_only_when_it_is_not_the_last_checkpoint(world, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    scores = iter([0.5, 0.2, 0.3, 0.9])  # validations at 1, 2, 3 and (second run) 1, 2
    monkeypatch.setattr(train.evaluate, "validate", lambda *args, **kwargs: {"miou": next(scores)})
    run = tmp_path / "run"
    train.main(tiny(world, run, "psp", "--iterations", "3", "--crop", "32", "32", "--val-every", "1"))
    best = checkpoints.read_checkpoint(run / "best.pt")
    assert best["iteration"] == 1 and best["metrics"] == {"miou": 0.5} and "optimizer" not in best and "rng" not in best
    assert checkpoints.read_checkpoint(run / "ckpt.pt")["best_iteration"] == 1
    assert (run / "best.pt").stat().st_size < 0.6 * (run / "ckpt.pt").stat().st_size  # psp: SGD momentum
    evaluate.load_checkpoint(run / "best.pt")  # evaluate.py reads it like any checkpoint
    with pytest.raises(SystemExit, match="weights only"):
        config.parse_args(["--method", "psp", "--resume", str(run / "best.pt")])
    # the last validation is the best: no copy of ckpt.pt
    scores = iter([0.5, 0.9])
    train.main(tiny(world, run, "psp", "--iterations", "2", "--crop", "32", "32", "--val-every", "1", "--overwrite"))
    assert not (run / "best.pt").exists() and checkpoints.read_checkpoint(run / "ckpt.pt")["best_iteration"] == 2


def test_a_failed_checkpoint_write_stops_with_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(target, {"iteration": 1, "weights": torch.zeros(4)})

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"ckpt.pt \(.*No space left on device\).*previous checkpoint is intact"):
        checkpoints.save_checkpoint(target, {"iteration": 2, "weights": torch.ones(4)})
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["iteration"] == 1


def test_broken_data_stops_with_one_line_before_training_or_naming_the_iteration(world, tmp_path, capsys):
    torch.set_num_threads(1)
    broken = tmp_path / "world"
    shutil.copytree(world, broken)
    val_image = sorted((broken / "leftImg8bit_sequence" / "val").rglob("*.png"))[0]
    val_image.write_bytes(val_image.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit, match=rf"validation data: .*{val_image.name}") as info:
        train.main(tiny(str(broken), tmp_path / "a", "psp", "--iterations", "50"))
    assert "\n" not in str(info.value) and not (tmp_path / "a" / "log.jsonl").exists()  # no iteration ran
    shutil.copy(sorted((Path(world) / "leftImg8bit_sequence" / "val").rglob("*.png"))[0], val_image)
    for image in (broken / "leftImg8bit_sequence" / "train").rglob("*.png"):
        image.write_bytes(b"not a png")
    for workers in ("0", "2"):  # the error comes from the main process or through a DataLoader worker
        with pytest.raises(SystemExit, match=r"training data, iteration 1: .*cannot read image") as info:
            train.main(tiny(str(broken), tmp_path / f"b{workers}", "psp", "--iterations", "2", "--workers", workers))
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_non_finite_weights_are_never_saved_and_a_nan_init_is_refused(world, tmp_path, monkeypatch):
    torch.set_num_threads(1)

    def overflow(net, terms):  # a forward pass whose BatchNorm statistics overflowed, with a finite loss
        bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var = torch.full_like(bn.running_var, float("inf"))  # a new tensor: the graph keeps the old
        return terms

    poison_step(monkeypatch, 2, overflow)
    with pytest.raises(SystemExit, match=r"iteration 2: 1 weight/buffer tensors hold NaN or inf .*running_var"):
        train.main(tiny(world, tmp_path / "run", "psp", "--iterations", "4", "--ckpt-every", "1"))
    saved = checkpoints.read_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert saved["iteration"] == 1
    monkeypatch.undo()
    nan = dict(saved, model={k: v.float() * float("nan") if v.is_floating_point() else v
                             for k, v in saved["model"].items()})
    checkpoints.save_checkpoint(tmp_path / "nan.pt", nan)
    with pytest.raises(SystemExit, match=r"nan.pt: .* hold NaN or inf"):
        train.main(tiny(world, tmp_path / "efc", "efc", "--iterations", "1", "--init", str(tmp_path / "nan.pt")))


def test_flow_context_round_trips_through_a_checkpoint(world, tmp_path):
    # Flow2Seg Table 2's context modules (--flow-context) and Table 3's image-only FCN (--context) are
    # stored in the checkpoint's config; evaluate.load_checkpoint and --init rebuild the right network.
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path / "aspp", "flow2seg", "--iterations", "1", "--flow2seg-stage", "flow-path",
                    "--flow-context", "aspp", "--val-items", "1"))
    net, ckpt = evaluate.load_checkpoint(tmp_path / "aspp" / "ckpt.pt")
    assert ckpt["config"]["flow_context"] == "aspp" and ckpt["config"]["context"] == "psp"
    assert isinstance(net.flow_context, model.ASPP)
    assert torch.equal(net.flow_context.project[0].weight, ckpt["model"]["flow_context.project.0.weight"])
    # The flow-path stage trains the context module with the flow path; the image path and fusion stay frozen.
    args = config.parse_args(tiny(world, tmp_path / "x", "flow2seg", "--flow2seg-stage", "flow-path",
                                 "--flow-context", "aspp"))
    fresh = train.build_model("flow2seg", 9, args.backbone, args.flow_backbone, args.max_displacement,
                              args.corr_stride, args.context, args.flow_context)
    trained = {id(q) for g in train.parameter_groups(fresh, args) for q in g["params"]}
    names = {n for n, q in fresh.named_parameters() if id(q) in trained}
    assert names == {n for n, _ in fresh.named_parameters() if n.startswith(("flow_backbone.", "flow_context.",
                                                                             "flow_head."))}
    assert any(n.startswith("flow_context.") for n in names)


def test_image_only_fcn_round_trips_through_a_checkpoint_and_cannot_initialise_flow2seg(world, tmp_path):
    torch.set_num_threads(1)
    train.main(tiny(world, tmp_path / "fcn", "psp", "--iterations", "1", "--context", "fcn", "--val-items", "1"))
    net, ckpt = evaluate.load_checkpoint(tmp_path / "fcn" / "ckpt.pt")
    assert ckpt["config"]["context"] == "fcn" and isinstance(net.ppm, torch.nn.Identity)
    # The config, not the weights, decides the network: without the key it is the default PSPNet, which
    # these weights do not fit (and a checkpoint from before the flags, all defaults, still loads).
    stripped = {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "context"}}
    torch.save(stripped, tmp_path / "stripped.pt")
    with pytest.raises(ValueError, match="do not fit a psp network with backbone resnet18, context psp"):
        evaluate.load_checkpoint(tmp_path / "stripped.pt")
    # Flow2Seg 4.3's image path is a PSPNet: the FCN cannot initialise it.
    with pytest.raises(SystemExit, match=r"image-only FCN \(--context fcn\), not a PSPNet"):
        train.main(tiny(world, tmp_path / "f2s", "flow2seg", "--iterations", "1", "--init",
                        str(tmp_path / "fcn" / "ckpt.pt")))


def test_context_flags_are_refused_where_they_mean_nothing(world, tmp_path, capsys):
    cases = [(["--method", "efc", "--context", "fcn"], "--context fcn is the image-only network of --method psp"),
             (["--method", "flow2seg", "--context", "fcn"], "--method flow2seg keeps its PSPNet"),
             (["--method", "psp", "--flow-context", "aspp"], "--flow-context aspp is a context module of Flow2Seg's"),
             (["--method", "flow", "--flow-context", "psp"], "use it with --method flow2seg")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            config.parse_args(argv + ["--data-root", world])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    args = config.parse_args(["--method", "flow2seg", "--flow-context", "denseaspp", "--data-root", world])
    assert (args.context, args.flow_context) == ("psp", "denseaspp")
    assert config.parse_args(["--method", "psp", "--data-root", world]).context == "psp"


# ------------------------------------------------------------------ Ctrl-C, SIGTERM, --data-root
def test_ctrl_c_keeps_the_last_finished_iteration_and_names_the_command_that_continues_it(world, tmp_path):
    # A terminal's Ctrl-C reaches the whole process group (the loader's worker too): one line on
    # stderr, exit status 130, a checkpoint of the iteration it names, and its command continues.
    out = tmp_path / "run"
    argv = tiny(world, out, "psp", "--iterations", "60")
    argv[argv.index("--workers") + 1] = "1"
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = ""
    while "it 2/60" not in seen:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        seen += line
    os.killpg(process.pid, signal.SIGINT)
    rest, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    stopped = int(lines[0].split("after iteration ")[1].split()[0])
    command = lines[0].split("Continue with: ")[1]
    assert command == f"python train.py --method psp --resume {out / 'ckpt.pt'}"
    assert 2 <= stopped < 60 and torch.load(out / "ckpt.pt", weights_only=True)["iteration"] == stopped
    train.main(command.split()[2:] + ["--stop-after", "1", "--workers", "0"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["iteration"] == stopped + 1


def test_a_signal_during_validation_or_before_training_loses_nothing(world, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    real_validate = train.evaluate.validate

    def killed(*a, **k):  # SIGTERM arrives while the last iteration is validated
        os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(*a, **k)

    monkeypatch.setattr(train.evaluate, "validate", killed)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(world, out, "psp", "--iterations", "2"))
    assert stop.value.code == 143
    assert f"stopped by SIGTERM after iteration 2 of 2; checkpoint {out / 'ckpt.pt'}" in capsys.readouterr().err
    assert torch.load(out / "ckpt.pt", weights_only=True)["metrics"] is None
    monkeypatch.setattr(train.evaluate, "validate", real_validate)
    train.main(["--method", "psp", "--resume", str(out / "ckpt.pt"), "--workers", "0"])  # validates first
    assert "validation at 2" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["metrics"]["miou"] >= 0
    # Ctrl-C before the first iteration: nothing to keep, and the same command starts afresh
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(train, "training_dataset", lambda args: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(world, fresh, "psp", "--iterations", "1"))
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "nothing to keep. Run again: python train.py --method psp" in err
    assert not (fresh / "log.jsonl").exists() and "ckpt.pt" not in err
    monkeypatch.undo()
    train.main(tiny(world, fresh, "psp", "--iterations", "1"))
    assert (fresh / "ckpt.pt").is_file()


def test_a_run_folder_without_a_checkpoint_is_not_offered_for_resuming(world, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="stopped before its first checkpoint") as stop:
        train.main(tiny(world, tmp_path / "run", "psp", "--iterations", "1"))
    assert "--resume" not in str(stop.value.code)


def test_a_data_root_elsewhere_is_never_written_and_a_wrong_one_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train.synthetic, "make_synthetic_world", lambda *a, **k: pytest.fail("wrote a world"))
    typo = tmp_path / "data" / "synthtic"
    with pytest.raises(SystemExit, match=rf"--data-root {typo}: no such folder; write a synthetic world there "
                                         rf"with `python synthetic.py synth --out {typo}`"):
        train.main(["--method", "efc", "--data-root", str(typo), "--out", str(tmp_path / "run")])
    assert not typo.exists()
    (tmp_path / "other" / "images").mkdir(parents=True)
    with pytest.raises(SystemExit, match="not a synthetic world .no classes.json.; write one with"):
        train.main(["--method", "psp", "--data-root", str(tmp_path / "other"), "--out", str(tmp_path / "run")])
    # another dataset's layout missing: its reader's message, as one line naming the flag
    with pytest.raises(SystemExit) as stop:
        train.main(["--method", "psp", "--dataset", "cityscapes", "--data-root", str(tmp_path / "other"),
                    "--out", str(tmp_path / "run")])
    message = str(stop.value.code)
    assert message.startswith(f"--data-root {tmp_path / 'other'}: ") and "gtFine" in message and "\n" not in message


def test_the_paper_recipe_trains_with_each_papers_augmentation(world, tmp_path):
    paper = ["--recipe", "paper", "--dataset", "synthetic", "--from-scratch"]
    for method in ("efc", "flow", "psp"):  # EFC: PSPNet's scale and rotation; efc / flow crop inside the rotated frame
        t = train.training_dataset(config.parse_args(tiny(world, tmp_path, method, *paper))).transform
        assert (t.scale, t.rotate, t.shift, t.pad, t.train) == ((0.5, 2.0), 10.0, 0.0, method == "psp", True), method
    t = train.training_dataset(config.parse_args(tiny(world, tmp_path, "flow2seg", *paper))).transform
    assert (t.scale, t.rotate, t.shift, t.pad) == ((0.5, 2.0), 0.0, 10.0, True)  # Flow2Seg 4.2: +-10 grey levels
    t = train.training_dataset(config.parse_args(tiny(world, tmp_path, "efc", *paper, "--no-augment"))).transform
    assert t.train is False
    for method in ("efc", "psp"):  # the quick recipe's, unchanged
        t = train.training_dataset(config.parse_args(tiny(world, tmp_path, method))).transform
        assert (t.rotate, t.shift, t.pad) == ((0.0, 0.0, False) if method == "efc" else (10.0, 0.0, True)), method


def test_efc_on_kitti_trains_on_kitti_raw_with_its_pseudo_labels(tmp_path):
    import kitti_raw
    from test_data import KEPT, make_kitti_raw
    root, labels = make_kitti_raw(tmp_path / "raw", KEPT, frames=8, size=(40, 56)), tmp_path / "labels"
    for frame in kitti_raw.labelled_frames(root, snippet_length=5, labelled_index=3):
        kitti_raw.write_label(kitti_raw.label_path(labels, root, frame), torch.full((40, 56), 7).numpy())
    kitti_raw_args = dict(snippet_length=5, labelled_index=3)
    original = kitti_raw.KittiRaw.__init__
    with pytest.MonkeyPatch.context() as m:  # the tiny drives have 8 frames, not 30
        m.setattr(kitti_raw.KittiRaw, "__init__", lambda self, *a, **k: original(self, *a, **k, **kitti_raw_args))
        args = config.parse_args(["--method", "efc", "--dataset", "kitti", "--data-root", str(tmp_path / "k2015"),
                                  "--kitti-raw", str(root), "--pseudo-labels", str(labels), "--crop", "32", "48",
                                  "--max-gap", "2", "--pairs-per-snippet", "4"])
        dataset = train.training_dataset(args)
    assert isinstance(dataset, kitti_raw.KittiRaw) and dataset.num_classes == 19 and len(dataset) == 4 * 2
    item = dataset[0]  # "+ UD": 4 snippets x 2 labelled pairs, each item one of them and an unlabelled pair
    assert item["image_a"].shape == (2, 3, 32, 48) and item["label_a"].shape == (2, 32, 48)
    assert {"image_b", "label_b", "labelled_a", "labelled_b", "t"} <= set(item)
    assert set(item["label_a"][0].unique().tolist()) | set(item["label_b"][0].unique().tolist()) >= {7}


def test_seg_batch_labelled_computes_the_papers_loss_and_gradients_on_fewer_frames(world, tmp_path):
    # --seg-batch labelled (the quick recipe's) decodes the labelled frames as one batch and the rest
    # without gradient, for O_seg alone, or not at all where nothing reads them. With BatchNorm at fixed
    # statistics (eval mode: the one thing that differs in training is whose batch statistics normalise)
    # it is the paper's loss with the paper's gradients, in the warm-up and after it.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = config.parse_args(tiny(world, tmp_path / "x", "efc", "--batch", "3"))
    net = train.build_model("efc", 9, args.backbone, args.flow_backbone, args.max_displacement, args.corr_stride,
                            corr_layer=args.corr_layer, match_input=args.match_input, pass_through=args.pass_through,
                            fine_match=args.fine_match).eval()
    data = train.training_dataset(args)
    batch = train.merge_companions({k: torch.stack([data[i][k] for i in range(2)]) for k in data[0]
                                    if torch.is_tensor(data[0][k])})  # 2 items -> 4 pairs, 8 frames
    labelled = torch.cat((batch["labelled_a"], batch["labelled_b"]))
    assert labelled.sum() == 2 and labelled.numel() == 8  # one labelled frame per "+ UD" item
    for warmup in (1, 0):
        args.flow_warmup = warmup
        results = {}
        for seg_batch in ("all", "labelled"):
            args.seg_batch = seg_batch
            net.zero_grad()
            total, terms = train.compute_loss(net, batch, args, 0)
            total.backward()
            results[seg_batch] = (total.detach(), terms, {n: q.grad.clone() for n, q in net.named_parameters()
                                                          if q.grad is not None})
        (total_all, terms_all, grads_all), (total_lab, terms_lab, grads_lab) = results["all"], results["labelled"]
        assert torch.allclose(total_lab, total_all, rtol=1e-5) and total_all > 0
        assert terms_all["seg"] > 0 and (terms_all["cons"] > 0) == (not warmup)
        assert all(torch.allclose(terms_lab[k], terms_all[k], rtol=1e-5, atol=1e-7) for k in terms_all)
        assert grads_lab.keys() == grads_all.keys() and any(k.startswith("seg.head") for k in grads_all)
        assert all(torch.allclose(grads_lab[k], grads_all[k], rtol=1e-3, atol=1e-6) for k in grads_all)

    # What reads which frame: O_seg reads every frame after the warm-up (other = the unlabelled ones);
    # nothing does in the warm-up, in TCC_fix or without O_error; a batch without labels trains its first
    # frame (a zero loss, but the weights take part, as DDP needs); --seg-batch all and flow: one batch.
    args.seg_batch = "labelled"
    trained, other = train.seg_frames(batch, args, False, {})
    assert torch.equal(trained, labelled) and torch.equal(other, ~labelled)
    for warmup, switches in ((True, {}), (False, {"frozen_flow": True}), (False, {"error_mask": False})):
        trained, other = train.seg_frames(batch, args, warmup, switches)
        assert torch.equal(trained, labelled) and not other.any()
    unlabelled = {**batch, "labelled_a": torch.zeros(4, dtype=torch.bool), "labelled_b": torch.zeros(4, dtype=torch.bool)}
    trained, other = train.seg_frames(unlabelled, args, False, {})
    assert trained.tolist() == [True] + [False] * 7 and other.tolist() == [False] + [True] * 7
    # In training mode: the frames nothing reads get zeros; the no-gradient ones are decoded with the
    # running statistics (they neither move them nor, under DDP, need a collective), and every module
    # keeps its mode (a frozen part stays in eval mode)
    net.train()
    net.seg.backbone.layer4[0].eval()
    out = net(batch["image_a"], batch["image_b"], seg_frames=train.seg_frames(batch, args, True, {}))
    logits = torch.cat((out["logits_a"], out["logits_b"]))  # (8, K, H, W)
    assert (logits[~labelled] == 0).all() and (logits[labelled] != 0).all()
    bn = net.seg.head[0][1]  # the PSP head's BatchNorm
    moved = bn.running_mean.clone()
    net.seg.decode(net.seg.encode(torch.cat((batch["image_a"], batch["image_b"])))[1][labelled])
    after_labelled_only = bn.running_mean.clone()
    bn.running_mean.copy_(moved)
    out = net(batch["image_a"], batch["image_b"], seg_frames=train.seg_frames(batch, args, False, {}))
    assert torch.allclose(bn.running_mean, after_labelled_only)
    assert not net.seg.backbone.layer4[0].training and net.seg.backbone.layer4[1].training and net.flow.training
    logits = torch.cat((out["logits_a"], out["logits_b"]))
    weight = next(net.seg.head.parameters())
    grad_unlabelled, = torch.autograd.grad(logits[~labelled].sum(), weight, retain_graph=True)
    grad_labelled, = torch.autograd.grad(logits[labelled].sum(), weight)
    assert (logits != 0).all() and (grad_unlabelled == 0).all() and grad_labelled.abs().sum() > 0
    args.seg_batch, args.method = "all", "efc"
    assert train.seg_frames(batch, args, False, {}) is None
    args.seg_batch, args.method = "labelled", "flow"
    assert train.seg_frames(batch, args, False, {}) is None
