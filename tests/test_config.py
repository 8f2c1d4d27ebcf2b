"""config.py: one resolved configuration with the source of every value, the recipes' named rules,
the paper recipe's refusals, the switches back to the paper's settings, and the ablation rows."""
import pytest
import torch

import config
import train


def test_every_value_says_where_it_came_from():
    args = config.parse_args(["--method", "efc", "--lr", "0.001", "--crop", "64", "80"])
    assert args.sources["lr"] == "flag" and args.sources["crop"] == "flag" and args.crop == [64, 80]
    assert (args.iterations, args.sources["iterations"]) == (200, "rule flow-budget")
    assert (args.flow_warmup, args.sources["flow_warmup"]) == (100, "rule flow-budget")
    assert (args.clip_grad, args.sources["clip_grad"]) == (10.0, "rule clip-flow-decoder")
    assert (args.batch, args.sources["batch"]) == (4, "quick")
    assert (args.seed, args.sources["seed"]) == (0, "default")
    assert (args.data_root, args.sources["data_root"]) == ("data/synthetic", "derived")
    assert (args.pair_mode, args.sources["pair_mode"]) == ("ud", "derived")
    text = config.describe(args)
    assert text.startswith("settings (efc, --recipe quick; unmarked values are the quick recipe's, config.QUICK):")
    assert "lr 0.001 [flag]" in text and "crop 64 80 [flag]" in text and "batch 4," in text
    assert "iterations 200 [rule flow-budget]" in text and "seed 0 [default]" in text
    assert "  rule flow-budget: the budget whose numbers" in text and "rule whole-frames:" not in text  # a flag won
    assert max(len(line) for line in text.splitlines()) <= 110


def test_the_per_method_overrides_are_named_rules():
    flow = config.parse_args(["--method", "flow"])
    assert (flow.freeze, flow.sources["freeze"]) == ("seg", "rule flow-alone-freezes-encoder")
    assert (flow.crop, flow.sources["crop"]) == ([128, 256], "rule whole-frames")
    assert config.parse_args(["--method", "flow", "--freeze", "none"]).freeze == ""  # a flag wins
    decoder = ("corr_layer", "match_input", "pass_through", "fine_match")
    assert tuple(getattr(flow, k) for k in decoder) == ("layer2+3", True, True, 2)
    assert {flow.sources[k] for k in decoder} == {"rule flow-finds-the-moving-cars"}
    plain = config.parse_args(["--method", "flow", "--corr-layer", "layer3", "--no-match-input",
                               "--no-flow-pass-through", "--fine-match", "0"])  # EFC's decoder, as replicate.py asks
    assert tuple(getattr(plain, k) for k in decoder) == ("layer3", False, False, 0)
    efc = config.parse_args(["--method", "efc"])  # the full EFC on the world: the same decoder as its flow branch alone
    assert tuple(getattr(efc, k) for k in decoder) == ("layer2+3", True, True, 2)
    assert efc.sources["fine_match"] == "rule flow-finds-the-moving-cars"
    for argv in (["--method", "efc", "--recipe", "paper", "--dataset", "synthetic", "--from-scratch"],
                 ["--method", "flow", "--dataset", "kitti", "--data-root", "k"], ["--method", "flow2seg"]):
        other = config.parse_args(argv)  # the paper recipe, the papers' data and the other methods keep EFC's
        assert tuple(getattr(other, k) for k in decoder) == ("layer3", False, False, 0), argv
    psp = config.parse_args(["--method", "psp"])
    assert (psp.clip_grad, psp.sources["clip_grad"]) == (0.0, "quick") and psp.crop == [96, 96]
    assert (psp.flow_warmup, psp.sources["flow_warmup"]) == (0, "rule warmup-where-the-flow-trains")
    kitti = config.parse_args(["--method", "flow", "--dataset", "kitti", "--data-root", "k"])
    assert kitti.sources["crop"] == "quick" and kitti.sources["iterations"] == "quick"
    row = config.parse_args(["--method", "efc", "--ablation", "tcc-multi-om"])
    assert (row.pairs_per_snippet, row.labelled_pairs, row.pair_mode) == (5, 5, "fixed")
    assert row.sources["pairs_per_snippet"] == "rule ablation-pairs" and row.out == "runs/efc-tcc-multi-om"
    paper = config.parse_args(["--method", "efc", "--recipe", "paper", "--dataset", "cityscapes", "--data-root", "c",
                               "--pretrained", "r101.pth"])
    assert (paper.clip_grad, paper.sources["clip_grad"]) == (10.0, "rule clip-flow-decoder")
    assert paper.sources["lr"] == "paper" and paper.sources["crop"] == "paper" and paper.freeze == ""
    assert "unmarked values are the paper recipe's, config.PAPER_EFC" in config.describe(paper)


def refused(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        config.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_the_paper_recipe_needs_a_dataset_and_a_start(capsys):
    err = refused(capsys, ["--method", "efc", "--recipe", "paper"])
    assert "--recipe paper trains on the papers' data: give --dataset cityscapes, camvid or kitti" in err
    err = refused(capsys, ["--method", "efc", "--recipe", "paper", "--dataset", "cityscapes", "--data-root", "c"])
    assert "--recipe paper starts from ImageNet weights, as both papers do: give --pretrained FILE" in err
    assert "or --from-scratch for random weights" in err
    base = ["--method", "efc", "--recipe", "paper", "--dataset", "cityscapes", "--data-root", "c"]
    for start in (["--pretrained", "r.pth"], ["--init", "psp.pt"], ["--from-scratch"]):
        assert config.parse_args(base + start).recipe == "paper"
    flow_path = config.parse_args(["--method", "flow2seg", "--recipe", "paper", "--flow2seg-stage", "flow-path",
                                   "--dataset", "cityscapes", "--data-root", "c", "--pretrained-flow", "r18.pth"])
    assert flow_path.pretrained_flow == "r18.pth"
    assert "the quick recipe's is --no-world-init" in refused(capsys, ["--method", "efc", "--from-scratch"])
    assert "--from-scratch starts from random weights" in refused(capsys, base + ["--from-scratch", "--pretrained", "r"])
    assert config.parse_args(["--method", "efc", "--dataset", "synthetic"]).recipe == "quick"  # quick: no such need


def test_switches_restore_the_papers_values_and_reach_the_loss(monkeypatch):
    paper = ["--method", "efc", "--recipe", "paper", "--dataset", "synthetic", "--from-scratch"]
    ours = config.parse_args(paper)
    assert (ours.flow_lr_mult, ours.clip_grad, ours.edge_weight, ours.full_res_scale, ours.detach_occ_in_cons,
            ours.loss_reduction) == (0.1, 10.0, 150.0, False, True, "mean")
    theirs = config.parse_args(paper + ["--flow-lr-mult", "1", "--clip-grad", "0", "--edge-weight", "1",
                                        "--no-detach-occ-in-cons", "--loss-reduction", "sum"])
    assert (theirs.flow_lr_mult, theirs.clip_grad, theirs.edge_weight, theirs.full_res_scale,
            theirs.detach_occ_in_cons, theirs.loss_reduction) == (1.0, 0.0, 1.0, False, False, "sum")
    assert config.parse_args(["--method", "efc"]).full_res_scale is True  # the quick recipe keeps ours
    seen = {}

    def efc_loss(outputs, batch, weights, **keywords):
        seen.update(keywords)
        raise StopIteration

    monkeypatch.setattr(train.losses, "efc_loss", efc_loss)
    theirs.flow_warmup = 0
    net = lambda *a, **k: {}  # noqa: E731 (compute_loss only hands its output on)
    with pytest.raises(StopIteration):
        train.compute_loss(net, {"image_a": torch.zeros(1, 3, 8, 8), "image_b": torch.zeros(1, 3, 8, 8)}, theirs, 0)
    assert {k: seen[k] for k in ("edge_weight", "full_res_scale", "detach_occ_in_cons", "reduction")} == {
        "edge_weight": 1.0, "full_res_scale": False, "detach_occ_in_cons": False, "reduction": "sum"}


def test_ablation_rows_are_named_fields_and_their_pairs_cannot_be_overridden(capsys):
    assert all(isinstance(row, config.Ablation) for row in config.ABLATIONS.values())
    assert config.ABLATIONS["ul"].method == "flow" and config.ABLATIONS["ul"].switches["flow_only"] is True
    assert config.ABLATIONS["tcc-single"].pairs == 1 and config.ABLATIONS["full"].pair_mode == "ud"
    err = refused(capsys, ["--method", "efc", "--ablation", "tcc-single", "--pairs-per-snippet", "4"])
    assert "--ablation tcc-single trains on its own pairs (1 per snippet, 1 with the labelled frame)" in err
    assert "is the reduction of EFC's losses" in refused(capsys, ["--method", "psp", "--loss-reduction", "sum"])


PAPER_KITTI = ["--recipe", "paper", "--dataset", "kitti", "--data-root", "KITTI", "--from-scratch"]
RAW = ["--kitti-raw", "RAW", "--pseudo-labels", "LABELS"]


def test_efc_trains_on_kitti_raw_with_pseudo_labels_and_the_kitti_crop():
    import kitti_raw
    args = config.parse_args(["--method", "efc", *PAPER_KITTI, *RAW])
    assert (args.kitti_raw, args.pseudo_labels, args.data_root) == ("RAW", "LABELS", "KITTI")
    assert (args.crop, args.sources["crop"]) == ([256, 640], "rule kitti-raw-crop") and args.crop == list(kitti_raw.CROP)
    text = config.describe(args)
    assert "crop 256 640 [rule kitti-raw-crop]" in text and "kitti_raw RAW [flag]" in text and "coarse False" in text
    assert "rule kitti-raw-crop: KITTI frames are about 375x1242: a 713x713 crop would force the scale into" in text
    assert config.parse_args(["--method", "efc", *PAPER_KITTI, *RAW, "--crop", "320", "640"]).crop == [320, 640]
    assert config.parse_args(["--method", "flow", *PAPER_KITTI]).crop == [713, 713]  # KITTI 2015 multiview: no rule
    quick = config.parse_args(["--method", "efc", "--dataset", "kitti", "--data-root", "KITTI", *RAW])
    assert quick.crop == [96, 96] and quick.sources["crop"] == "quick"


@pytest.mark.parametrize("argv, message", [
    (["--method", "efc", *PAPER_KITTI], "--method efc on --dataset kitti trains on KITTI raw with pseudo-labels: "
                                        "give --kitti-raw DIR and --pseudo-labels DIR"),
    (["--method", "efc", *PAPER_KITTI, "--kitti-raw", "RAW"],
     "--kitti-raw DIR and --pseudo-labels DIR go together: KITTI raw is read with its pseudo-labels"),
    (["--method", "psp", *PAPER_KITTI, *RAW], "--dataset kitti has no segmentation labels: use it with --method "
                                              "flow, or --method efc with --kitti-raw and --pseudo-labels"),
    (["--method", "efc", *RAW], "--kitti-raw / --pseudo-labels are KITTI raw training data: use them with "
                                "--dataset kitti"),
    (["--method", "efc", "--coarse"], "--coarse adds Cityscapes' gtCoarse train_extra to PSPNet's training set: "
                                      "use it with --method psp --dataset cityscapes"),
    (["--method", "psp", "--coarse"], "use it with --method psp --dataset cityscapes"),
    # every setting that reads cosines is named in the one line, with the flags that turn it off
    (["--method", "efc", "--cost-volume", "raw"],
     "--cost-volume raw (FlowNetC's raw correlation) does not go with the warm-up's target; --match-input; "
     "--fine-match; --corr-layer layer2+3 (two maps made unit length to weigh them alike), made for cosines in "
     "[-1, 1]: give --flow-warmup 0 --no-match-input --fine-match 0 --corr-layer layer3"),
    (["--method", "flow", "--cost-volume", "raw", "--flow-warmup", "0", "--no-match-input", "--corr-layer", "layer2"],
     "does not go with --fine-match, made for cosines in [-1, 1]: give --fine-match 0"),
])
def test_the_kitti_raw_coarse_and_cost_volume_refusals_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        config.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_coarse_and_the_cost_volume_switch_resolve_with_their_recipe_values():
    for recipe in (["--recipe", "quick"], ["--recipe", "paper", "--dataset", "cityscapes", "--data-root", "C",
                                           "--from-scratch"]):
        args = config.parse_args(["--method", "psp", *recipe])
        assert (args.coarse, args.cost_volume) == (False, "cosine") and args.sources["coarse"] == recipe[1]
    coarse = config.parse_args(["--method", "psp", "--dataset", "cityscapes", "--data-root", "C", "--coarse"])
    assert coarse.coarse and "coarse True [flag]" in config.describe(coarse)
    raw = config.parse_args(["--method", "efc", "--cost-volume", "raw", "--flow-warmup", "0", "--corr-layer", "layer3",
                             "--no-match-input", "--no-flow-pass-through", "--fine-match", "0"])
    assert raw.cost_volume == "raw" and "cost_volume raw [flag]" in config.describe(raw)
    paper = config.parse_args(["--method", "efc", "--recipe", "paper", "--dataset", "synthetic", "--from-scratch",
                               "--cost-volume", "raw"])  # the paper recipe has no warm-up: accepted as it is
    assert (paper.cost_volume, paper.flow_warmup) == ("raw", 0)


def test_every_train_command_of_docs_training_md_parses():
    # the commands of its code blocks, continuation lines joined; "..." (elided flags) and --resume (it
    # reads a checkpoint) are left out
    import re
    import shlex
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    lines = [line.split("#")[0] for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    commands = [m.group(1) for m in (re.search(r"train\.py (.*)", line) for line in lines) if m]
    parsed = [config.parse_args(shlex.split(c)) for c in commands if "..." not in c and "--resume" not in c]
    assert len(parsed) >= 6 and any(a.kitti_raw for a in parsed) and any(a.coarse for a in parsed)
