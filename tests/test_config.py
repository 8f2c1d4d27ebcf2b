"""config.py: one resolved configuration with the source of every value, the recipes' named rules,
the paper recipe's refusals, the switches back to the paper's settings, and the ablation rows."""
import pytest
import torch

import config
import train


def test_every_value_says_where_it_came_from():
    args = config.parse_args(["--method", "efc", "--lr", "0.001", "--crop", "64", "80"])
    assert args.sources["lr"] == "flag" and args.sources["crop"] == "flag" and args.crop == [64, 80]
    assert (args.iterations, args.sources["iterations"]) == (400, "rule flow-budget")
    assert (args.flow_warmup, args.sources["flow_warmup"]) == (200, "rule flow-budget")
    assert (args.clip_grad, args.sources["clip_grad"]) == (10.0, "rule clip-flow-decoder")
    assert (args.batch, args.sources["batch"]) == (4, "quick")
    assert (args.seed, args.sources["seed"]) == (0, "default")
    assert (args.data_root, args.sources["data_root"]) == ("data/synthetic", "derived")
    assert (args.pair_mode, args.sources["pair_mode"]) == ("ud", "derived")
    text = config.describe(args)
    assert text.startswith("settings (efc, --recipe quick; unmarked values are the quick recipe's, config.QUICK):")
    assert "lr 0.001 [flag]" in text and "crop 64 80 [flag]" in text and "batch 4," in text
    assert "iterations 400 [rule flow-budget]" in text and "seed 0 [default]" in text
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
    efc = config.parse_args(["--method", "efc"])  # efc keeps EFC's decoder (not yet measured with the rule's)
    assert tuple(getattr(efc, k) for k in decoder) == ("layer3", False, False, 0) and efc.sources["fine_match"] == "quick"
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
