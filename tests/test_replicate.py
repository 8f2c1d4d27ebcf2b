"""replicate.py: the variant plan, the commands it hands train.py, the evaluation pairs, the table
arithmetic, the update of docs/replication.md, one real (cached) run, and a slow smoke run of a whole table."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import data
import evaluate
import replicate
import synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.make_synthetic_world(tmp_path_factory.mktemp("replicate") / "world", num_train=2, num_val=2,
                                     size=(64, 128), workers=1)


def test_every_table_runs_dependencies_first_and_once():
    order = replicate.needed_variants(list(replicate.TABLES))
    assert len(order) == len(set(order)) == len(replicate.VARIANTS)
    for name in order:
        for dependency in replicate.VARIANTS[name][2].values():
            assert order.index(dependency) < order.index(name)
    # Every row starts from the world-trained backbone; Table 3's Flow2Seg rows from the PSPNet row (--init);
    # the EFC-flow one also needs the full EFC.
    assert replicate.needed_variants(["flow2seg-table3"]) == ["world", "image-fcn", "psp", "flow2seg-gt", "full",
                                                             "flow2seg-efc", "flow2seg-zero"]
    assert replicate.needed_variants(["flow2seg-table2"]) == ["world", "flowpath-r18", "flowpath-r50",
                                                             "flowpath-r101", "flowpath-aspp", "flowpath-denseaspp",
                                                             "flowpath-psp"]
    assert not set(replicate.REFERENCES) & set(replicate.needed_variants(["efc-table2"]))
    # The run order: every variant once, what a row builds on before it, the rest in RUN_ORDER.
    assert sorted(replicate.RUN_ORDER) == sorted(replicate.VARIANTS)
    full = replicate.run_order(order)
    assert full == replicate.RUN_ORDER
    for name in full:
        for dependency in replicate.VARIANTS[name][2].values():
            assert full.index(dependency) < full.index(name)
    # --only: the named rows and what they build on, nothing else.
    assert replicate.run_order(["flow2seg-efc"]) == ["world", "psp", "full", "flow2seg-efc"]
    assert replicate.run_order(["tcc-fix", "ul"]) == ["world", "ul", "ul-oe", "tcc-fix"]


@pytest.mark.parametrize("name", sorted(replicate.VARIANTS))
def test_commands_are_valid_train_py_commands_with_the_shared_budget(name):
    settings = replicate.SETTINGS
    argv = replicate.train_command(name, 2, settings, "out/x", "runs/r", "world", None)
    args = config.parse_args(argv)
    method, _, dependency, own = replicate.VARIANTS[name]
    assert args.method == method and args.seed == 2 and args.out == "out/x"
    row = replicate.variant_settings(name, settings)  # the shared settings and the row's own changes
    for key in ("iterations", "batch", "crop", "optimizer", "lr", "flow_lr_mult", "max_displacement",
                "corr_stride", "backbone", "max_gap"):
        assert getattr(args, key) == row[key], key
    # The start: the world row is a PSPNet from scratch (train.py's world_encoder run); Table 3's Flow2Seg
    # rows start from the PSPNet row; every other row takes the world run's backbone alone.
    if name == "world":
        assert (args.iterations, args.crop, args.optimizer, args.lr) == (200, [96, 96], "sgd", 0.01)
        assert args.no_world_init and args.pretrained is None
    elif name in ("flow2seg-gt", "flow2seg-efc", "flow2seg-zero"):
        assert args.pretrained is None and (args.crop, args.lr) == ([96, 96], 2e-4)
    else:
        assert args.pretrained == "runs/r/world/seed2/ckpt.pt"
        assert (args.iterations, args.crop) == (400, [96, 96] if method == "flow2seg" else [128, 256])
    # The warm-up where the unsupervised flow trains; lambda_cons on EFC's rows (0 on the control).
    assert args.flow_warmup == (200 if method in ("efc", "flow") and name != "tcc-fix" else 0)
    if method == "efc":
        assert args.cons_weight == (0.0 if name in ("full-nocons", "full-mixed-nocons") else 0.01)
    assert args.flow_backbone == own.get("flow_backbone", settings["flow_backbone"])
    assert argv.count("--flow-backbone") == 1
    if name == "tcc-fix":
        assert args.flow_init == "runs/r/ul-oe/seed2/ckpt.pt" and args.ablation == "tcc-fix" and not args.init
    if name == "flow2seg-efc":
        assert args.flow_from == "runs/r/full/seed2/ckpt.pt"
    # the zero-flow control reads its flows from the --runs folder's zero-flows (write_zero_flows); the others
    # the world's ground truth, or (flow2seg-efc) the folder train.py fills
    assert args.flow_dir == ("runs/r/zero-flows" if name == "flow2seg-zero" else None)
    # Flow2Seg 4.3: the Table 3 Flow2Seg rows start from the PSPNet row's checkpoint
    assert args.init == (["runs/r/psp/seed2/ckpt.pt"] if name.startswith("flow2seg-") else [])
    assert args.flow_from is None or name == "flow2seg-efc"
    # Table 2: the flow path alone, trained alone, with the row's backbone and context module
    assert (args.flow2seg_stage == "flow-path") == name.startswith("flowpath-")
    assert args.flow_context == {"flowpath-aspp": "aspp", "flowpath-denseaspp": "denseaspp",
                                 "flowpath-psp": "psp"}.get(name, "fcn")
    assert args.flow_backbone == {"flowpath-r50": "resnet50", "flowpath-r101": "resnet101"}.get(name, "resnet18")
    assert args.context == ("fcn" if name == "image-fcn" else "psp") and args.backbone == "resnet18"
    if name in config.ABLATIONS:
        assert args.ablation == name


def test_table2_full_row_differs_from_ul_oe_tc_in_the_error_mask_alone():
    # EFC Table 2's "EFC full" is its own run (full-mixed), not Table 1's full EFC: against UL + OE + TC it
    # changes O_error and nothing else (same pairs, same pair mode); Table 1's row samples "+ UD" pairs.
    rows = [name for name, _, _ in replicate.TABLES["efc-table2"]["rows"]]
    assert "full" not in rows and rows[-2:] == ["full-mixed", "full-mixed-nocons"]
    full, without = config.ABLATIONS["full-mixed"], config.ABLATIONS["ul-oe-tc"]
    assert (full.method, full.pairs, full.labelled, full.pair_mode) == (without.method, without.pairs,
                                                                       without.labelled, without.pair_mode)
    assert full.switches == {} and without.switches == {"error_mask": False}
    assert config.ABLATIONS["full"].pair_mode == "ud" and full.pair_mode == "mixed"
    args = config.parse_args(replicate.train_command("full-mixed", 0, replicate.SETTINGS, "o", "r", "w", None))
    assert (args.ablation, args.pair_mode, args.pairs_per_snippet, args.labelled_pairs) == ("full-mixed", "mixed", 10, 5)
    nocons = config.parse_args(replicate.train_command("full-mixed-nocons", 0, replicate.SETTINGS, "o", "r", "w", None))
    assert (nocons.ablation, nocons.cons_weight) == ("full-mixed", 0.0)


def test_eval_pairs_window_paths_and_zero_flow(world):
    pairs = replicate.EvalPairs(world, [16, 22])
    assert len(pairs) == 2 * 6
    items = [pairs[k] for k in range(len(pairs))]
    assert [(int(it["snippet"]), int(it["i"])) for it in items] == [(s, i) for s in (0, 1) for i in range(16, 22)]
    assert len(replicate.EvalPairs(world, [16, 22], snippets=1)) == 6
    paths = pairs.frame_paths()
    assert all(b.is_file() and a.is_file() for b, a in paths)
    seq = data.SyntheticSequence(world, "val")
    assert paths[0] == (seq.root / "leftImg8bit_sequence" / f"{seq.snippets[0][17]}_leftImg8bit.png",
                        seq.root / "leftImg8bit_sequence" / f"{seq.snippets[0][16]}_leftImg8bit.png")
    # The zero flow's EPE is the mean length (float32 norms here: rel 1e-6) of the ground truth over the counted pixels.
    references = replicate.reference_flow_metrics(pairs)
    zero, const = references["zero"], references["const"]
    assert zero["pairs"] == const["pairs"] == 12
    lengths = [it["flow_fw"].norm(dim=0)[it["flow_fw_valid"]] for it in items]
    assert zero["epe_all"] == pytest.approx(torch.cat(lengths).double().mean().item(), rel=1e-6)
    noc = [it["flow_fw"].norm(dim=0)[it["flow_fw_valid"] & ~it["occ_fw"]] for it in items]
    assert zero["epe_noc"] == pytest.approx(torch.cat(noc).double().mean().item(), rel=1e-6)
    moving = pairs.classes.index("car_moving")
    cars = [it["flow_fw"].norm(dim=0)[it["flow_fw_valid"] & (it["label_a"] == moving)] for it in items]
    assert 0 < len(torch.cat(cars)) < len(torch.cat(lengths)) / 4
    assert zero["epe_moving"] == pytest.approx(torch.cat(cars).double().mean().item(), rel=1e-6)
    # The best constant flow: the vector whose mean distance to every counted true vector is least (no
    # nudge lowers it), far better than zero on a world whose camera pans.
    truths = torch.cat([it["flow_fw"].permute(1, 2, 0)[it["flow_fw_valid"]] for it in items]).double()
    vector = torch.tensor([const["const_u"], const["const_v"]], dtype=torch.float64)
    assert const["epe_all"] == pytest.approx((truths - vector).norm(dim=1).mean().item(), rel=1e-5)
    for nudge in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        assert (truths - vector - torch.tensor(nudge)).norm(dim=1).mean() >= const["epe_all"] - 1e-6
    assert const["epe_all"] < 0.7 * zero["epe_all"]
    # The camera-only flow: exact on every pixel that moves with the camera (the flow files' 1/64-px
    # rounding and the fit's float32 output aside), wrong on the cars by their own motion.
    camera = references["camera"]
    own = torch.tensor([pairs.classes.index(name) for name in evaluate.OWN_MOTION])
    residual, own_error = [], []
    for it in items:
        static = it["flow_fw_valid"] & ~torch.isin(it["label_a"], own)
        flow = evaluate.camera_flow(it["flow_fw"][None], static[None])[0]
        error = (flow - it["flow_fw"]).norm(dim=0)
        residual.append(error[static])
        own_error.append(error[it["flow_fw_valid"] & (it["label_a"] == moving)])
    assert torch.cat(residual).max() < 0.05
    assert camera["epe_moving"] == pytest.approx(torch.cat(own_error).double().mean().item(), rel=1e-5)
    assert camera["epe_moving"] > 3 and camera["epe_all"] < 0.5 * const["epe_all"]
    with pytest.raises(ValueError, match="eval window"):
        replicate.EvalPairs(world, [20, 30])


def test_camera_flow_recovers_zoom_and_translation_outside_the_mask():
    H, W = 24, 40
    ys, xs = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    z, tx, ty = 0.03, -4.25, 0.5  # a zoom of 3 % and a pan, as the world's camera makes them
    truth = torch.stack([z * xs + tx, z * ys + ty])[None]  # (1, 2, H, W)
    flow = truth.clone()
    flow[:, 0, 5:12, 8:20] += 9.0  # a car moving 9 px to the right relative to the scene
    flow[:, 1, 5:12, 8:20] -= 1.0
    static = torch.ones(1, H, W, dtype=torch.bool)
    static[:, 5:12, 8:20] = False
    fitted = evaluate.camera_flow(flow, static)
    assert torch.allclose(fitted, truth, atol=1e-5)  # the car does not pull the fit
    assert (fitted - flow)[0, :, 5:12, 8:20].norm(dim=0).mean() == pytest.approx(math.hypot(9, 1), rel=1e-5)
    # Fitted to every pixel, the car drags it off the camera's motion: the mask is what keeps it exact.
    assert not torch.allclose(evaluate.camera_flow(flow, torch.ones(1, H, W, dtype=torch.bool)), truth, atol=0.1)
    with pytest.raises(ValueError, match="1 pixels to fit"):
        evaluate.camera_flow(flow, torch.zeros(1, H, W, dtype=torch.bool).index_put_((torch.tensor([0]),) * 3,
                                                                                     torch.tensor(True)))


def test_table_means_std_and_markdown():
    seeds = [0, 1]
    settings = dict(replicate.SETTINGS)
    results = {}
    for k, name in enumerate(["psp", "tcc-fix", "tcc-single", "tcc-single-om", "tcc-multi-om", "full"]):
        for seed in seeds:
            miou = 0.40 + 0.01 * k + 0.02 * seed  # seeds 0.40 / 0.42 -> mean 41.0, std 1.4
            tc = float("nan") if name == "full" and seed == 1 else 0.9  # NaN seeds are left out
            results[(name, seed)] = {"metrics": {"miou": miou, "temporal_consistency": tc, "iou_car_merged": 0.7},
                                     "command": f"cmd {name}"}
    references = {"zero": {"pairs": 12}, "const": {"pairs": 12}}
    report, markdown = replicate.table_report("efc-table1", results, references, settings, seeds)
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["psp"]["stats"]["miou"]["mean"] == pytest.approx(0.41)
    assert rows["psp"]["stats"]["miou"]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert rows["full"]["stats"]["temporal_consistency"] == {"mean": pytest.approx(0.9), "std": None, "n": 1}
    # columns: mIoU, mIoU cars merged, car_moving, car_parked, car merged, TC; absent metrics show "-"
    assert "| PSPNet | 41.0 ± 1.4 | - | - | - | 70.0 ± 0.0 | 90.0 ± 0.0 | 76.20 |" in markdown
    assert "| + TCC_multi + OM + UD (EFC) | 46.0 ± 1.4 | - | - | - | 70.0 ± 0.0 | 90.0 (n=1) | 78.44 |" in markdown
    # A row without results (the control, here) is marked, not dropped; one seed of two shows n=1.
    assert "| EFC without L_cons (lambda_cons 0; a control) (not run yet) | - | - | - | - | - | - | - |" in markdown
    assert rows["full-nocons"]["seeds"] == [] and rows["full-nocons"]["command"] is None
    results[("full-nocons", 1)] = {"metrics": {"miou": 0.5}, "command": "cmd nocons"}
    report, markdown = replicate.table_report("efc-table1", results, references, settings, seeds)
    assert "| EFC without L_cons (lambda_cons 0; a control) | 50.0 (n=1) | - |" in markdown
    assert report["rows"][-1]["seeds"] == [1] and report["rows"][-1]["command"] == "cmd nocons"
    # The note: seeds, the shared settings and where a row differs, the start, the pairs.
    assert markdown.startswith("EFC Table 1: segmentation. Mean ± sample std over 2 seeds (0, 1); 400 iterations, "
                               "200 of them the flow warm-up where the flow trains, batch 4, crop 128x256, resnet18, "
                               "adam, lr 0.0001, lambda_cons 0.01 (EFC without L_cons (lambda_cons 0; a control): "
                               "lambda_cons 0.0); every row's backbone from a PSPNet trained 200 iterations on the "
                               "world; 12 validation pairs.")
    assert replicate.format_value(None, None, "pct") == "-"
    assert replicate.format_value(1.23456, None, "px") == "1.235"
    # The reference flows are one evaluation whatever the seeds: no spread, no n; paper EPE in the table's column order.
    for k, name in enumerate(["ul", "ul-oe", "ul-tc", "ul-oe-tc", "full-mixed", "full-mixed-nocons"]):
        for seed in seeds:
            results[(name, seed)] = {"metrics": {"epe_all": 1.0 + k + seed, "epe_noc": 0.5, "epe_moving": 2.0,
                                                 "fl_all": 0.1}, "command": f"cmd {name}"}
    references = {"zero": {"pairs": 12, "epe_all": 1.4, "epe_noc": 1.3, "epe_moving": 3.0, "fl_all": 0.02},
                  "const": {"pairs": 12, "epe_all": 1.1, "epe_noc": 1.0, "epe_moving": 2.5, "fl_all": 0.01},
                  "camera": {"pairs": 12, "epe_all": 0.3, "epe_noc": 0.25, "epe_moving": 2.4, "fl_all": 0.005}}
    report, markdown = replicate.table_report("efc-table2", results, references, settings, seeds)
    assert "| zero flow (reference) | 1.400 | 1.300 | 3.000 | 2.0 | - |" in markdown
    assert ("| best constant flow (reference: the geometric median of the true flows) | 1.100 | 1.000 | 2.500 | 1.0 "
            "| - |") in markdown
    assert ("| camera-only flow (reference: each pair's zoom + translation fitted to the true flow of the classes "
            "that do not move on their own) | 0.300 | 0.250 | 2.400 | 0.5 | - |") in markdown
    assert "| UL | 1.500 ± 0.707 | 0.500 ± 0.000 | 2.000 ± 0.000 | 10.0 ± 0.0 | 11.03 / 7.53 |" in markdown
    assert "paper: EPE all / noc (KITTI 2015)" in markdown
    # The JSON layout the README and the closing notes read: rows with variant and stats means, a const row.
    variants = [row["variant"] for row in report["rows"]]
    assert variants[:3] == ["zero", "const", "camera"] and report["rows"][1]["stats"]["epe_all"]["mean"] == 1.1
    assert report["rows"][0]["seeds"] == [] and report["rows"][0]["per_seed"] == {"any": references["zero"]}


def test_default_folders_keep_other_settings_apart():
    assert replicate.default_folders(dict(replicate.SETTINGS)) == (Path("results"), Path("runs/replicate"))
    assert replicate.default_folders(dict(replicate.QUICK)) == (Path("results/quick"), Path("runs/replicate-quick"))
    longer = replicate.default_folders({**replicate.SETTINGS, "iterations": 5000})
    assert longer == replicate.default_folders({**replicate.SETTINGS, "iterations": 5000})  # stable
    assert longer[0].name.startswith("custom-") and longer[1].name == "replicate-" + longer[0].name
    assert longer != replicate.default_folders({**replicate.SETTINGS, "iterations": 4000})


def test_a_row_whose_dependency_lost_its_checkpoint_trains_it_again(world, tmp_path, monkeypatch):
    """flow2seg-efc is not cached and full's checkpoint was deleted: full is trained again (not taken
    from the cache), then flow2seg-efc; its other dependency, psp, still has its checkpoint and is not
    trained again; the rows that need nothing stay cached. flow2seg-zero is not cached either: it builds on
    psp alone, whose checkpoint is there and which was not trained now, so it is run with use_cache."""
    cached = {"world", "image-fcn", "psp", "flow2seg-gt", "full"}
    calls = []

    def fake_run_variant(name, seed, settings, paths, device, log, use_cache=True):
        calls.append((name, use_cache))
        trained = not (use_cache and name in cached)
        return {"metrics": {"miou": 0.5}, "command": f"cmd {name}"}, trained

    monkeypatch.setattr(replicate, "run_variant", fake_run_variant)
    monkeypatch.setattr(replicate, "cached_result",
                        lambda name, seed, *a: {"metrics": {}} if name in cached else None)
    (tmp_path / "runs" / "psp" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "psp" / "seed0" / "ckpt.pt").touch()
    replicate.main(["flow2seg-table3", "--seeds", "1", "--eval-snippets", "1", "--data-root", str(world),
                    "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    # full builds on the world run, whose checkpoint is gone too: that one first.
    assert calls == [("world", True), ("psp", True), ("flow2seg-gt", True), ("full", True), ("image-fcn", True),
                     ("world", False), ("full", False), ("flow2seg-efc", False), ("flow2seg-zero", True)]


def test_readme_update_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- replicate:efc-table2 -->\nold\n<!-- /replicate:efc-table2 -->\nbottom\n")
    replicate.update_readme(readme, "efc-table2", "new table\n")
    assert readme.read_text() == "top\n<!-- replicate:efc-table2 -->\nnew table\n<!-- /replicate:efc-table2 -->\nbottom\n"
    with pytest.raises(SystemExit, match="markers"):
        replicate.update_readme(readme, "efc-table1", "x\n")


def test_readme_flag_writes_into_the_replication_page_which_holds_every_tables_markers():
    target = replicate.parse_args(["all", "--readme"]).readme
    assert target == "docs/replication.md" and replicate.parse_args(["all"]).readme is None
    text = (Path(__file__).resolve().parent.parent / target).read_text()
    for table in [*replicate.TABLES, "goals"]:
        assert text.count(f"<!-- replicate:{table} -->") == 1 and text.count(f"<!-- /replicate:{table} -->") == 1


def test_one_run_trains_evaluates_and_is_cached(world, tmp_path, monkeypatch):
    # The world row: a PSPNet from scratch, the start of every other row (which would need its checkpoint).
    settings = {**replicate.QUICK, "world_iterations": 2, "workers": 0, "eval_snippets": 1}
    paths = {"results": tmp_path / "results", "runs": tmp_path / "runs", "data": world}
    result, trained = replicate.run_variant("world", 0, settings, paths, "cpu", print)
    assert trained
    metrics = result["metrics"]
    assert metrics["pairs"] == 6 and 0 <= metrics["miou"] <= 1 and 0 <= metrics["temporal_consistency"] <= 1
    assert len(metrics["iou"]) == 9 and "iou_car_moving" in metrics and 0 <= metrics["iou_car_merged"] <= 1
    saved = json.loads((tmp_path / "results" / "runs" / "world" / "seed0.json").read_text())
    assert saved["settings"] == settings and saved["command"].startswith("python train.py --method psp")
    assert " --iterations 2 " in saved["command"] and " --crop 96 96 " in saved["command"]
    assert saved["variant_settings"] == {**settings, "iterations": 2, "crop": [96, 96], "optimizer": "sgd", "lr": 0.01}
    assert saved["resumed"] is False
    # Cached: train.py is not started again; with other settings it is.
    calls = []
    monkeypatch.setattr(replicate.subprocess, "call", lambda argv, **kw: calls.append(argv) or 1)
    assert replicate.run_variant("world", 0, settings, paths, "cpu", print) == (saved, False)
    assert calls == []
    with pytest.raises(SystemExit, match="train.py exited with 1"):
        replicate.run_variant("world", 0, {**settings, "world_iterations": 3}, paths, "cpu", print)
    assert len(calls) == 1 and calls[0][calls[0].index("--iterations") + 1] == "3"
    assert "--resume" not in calls[0]  # the old run's checkpoint had other settings: started afresh
    # The same settings but another train.py command (here: another data root) is not the cached run either.
    assert replicate.cached_result("world", 0, settings, {**paths, "data": tmp_path / "elsewhere"}, "cpu") is None
    assert replicate.cached_result("world", 0, settings, paths, "cpu")["metrics"] == metrics


def test_report_trains_nothing_and_only_trains_the_named_rows_and_what_they_build_on(world, tmp_path, monkeypatch,
                                                                                     capsys):
    calls = []

    def fake_run_variant(name, seed, settings, paths, device, log, use_cache=True):
        calls.append((name, seed))
        (paths["runs"] / name / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        (paths["runs"] / name / f"seed{seed}" / "ckpt.pt").touch()  # what a trained run leaves
        return {"metrics": {"miou_flow_path": 0.25}, "command": f"cmd {name}"}, True

    monkeypatch.setattr(replicate, "run_variant", fake_run_variant)
    cache = {("flowpath-r50", 1): {"metrics": {"miou_flow_path": 0.5}, "command": "cmd r50"}}
    monkeypatch.setattr(replicate, "cached_result", lambda name, seed, *a: cache.get((name, seed)))
    common = ["flow2seg-table2", "--seeds", "2", "--eval-snippets", "1", "--data-root", str(world),
              "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    replicate.main(common + ["--report"])
    assert calls == []
    report = json.loads((tmp_path / "results" / "flow2seg-table2.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["flowpath-r50"]["seeds"] == [1] and rows["flowpath-r50"]["stats"]["miou_flow_path"]["mean"] == 0.5
    assert rows["flowpath-r18"]["seeds"] == [] and "(not run yet)" in rows["flowpath-r18"]["label"] + \
        (tmp_path / "results" / "flow2seg-table2.md").read_text()
    replicate.main(common + ["--only", "flowpath-r18"])
    assert calls == [("world", 0), ("flowpath-r18", 0), ("world", 1), ("flowpath-r18", 1)]
    report = json.loads((tmp_path / "results" / "flow2seg-table2.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["flowpath-r18"]["seeds"] == [0, 1] and rows["flowpath-r50"]["seeds"] == [1]
    # --only-seeds: seed 1 alone trains (the fake cache has no world row, so that runs too); seed 0 nothing.
    calls.clear()
    replicate.main(common + ["--only", "flowpath-aspp", "--only-seeds", "1"])
    assert calls == [("world", 1), ("flowpath-aspp", 1)]
    for bad, message in ((["--only", "flowpath-r19"], "--only flowpath-r19: not a variant"),
                         (["--only", "ul", "--report"], "give one of them"),
                         (["--only-seeds", "3"], "--only-seeds 3: not among the seeds 0..2"),
                         (["--only-seeds", "1", "--report"], "give one of them")):
        with pytest.raises(SystemExit):
            replicate.parse_args(["all"] + bad)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_smoke_run_of_a_table_has_every_variant(world, tmp_path):
    replicate.main(["flow2seg-table3", "--quick", "--seeds", "1", "--iterations", "2", "--crop", "64", "64",
                    "--data-root", str(world), "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = json.loads((tmp_path / "results" / "flow2seg-table3.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["image-fcn", "psp", "flow2seg-gt", "flow2seg-efc", "flow2seg-zero"]
    for row in report["rows"]:  # mIoU cells finite (not the image networks' absent flow path); a class IoU is
        stats = row["stats"]     # finite, or None where the class is in neither labels nor prediction (NaN)
        assert np.isfinite(stats["miou"]["mean"]) and stats["miou"]["n"] == 1
        if row["variant"] not in ("image-fcn", "psp"):
            assert np.isfinite(stats["miou_flow_path"]["mean"]) and stats["miou_flow_path"]["n"] == 1
        for key in ("iou_car_moving", "iou_car_parked"):
            assert stats[key]["n"] == 1 and np.isfinite(stats[key]["mean"]) or stats[key] == {"mean": None,
                                                                                              "std": None, "n": 0}
    assert (tmp_path / "results" / "flow2seg-table3.md").read_text().count("\n|") >= 5


def test_flow2seg_tables_rows_labels_and_the_flow_paths_columns():
    table2, table3 = replicate.TABLES["flow2seg-table2"], replicate.TABLES["flow2seg-table3"]
    assert [(name, paper) for name, _, paper in table2["rows"]] == [
        ("flowpath-r18", "39.6"), ("flowpath-r50", "37.4"), ("flowpath-r101", "35.4"), ("flowpath-aspp", "39.4"),
        ("flowpath-denseaspp", "39.3"), ("flowpath-psp", "38.2")]
    # the flow path's mIoU and its IoU of every class: what motion alone tells apart
    assert [key for key, _, _ in table2["columns"]] == ["miou_flow_path"] + [f"iou_flow_path_{name}" for name
                                                                             in data.SYNTH_CLASSES]
    assert [name for name, _, _ in table3["rows"]] == ["image-fcn", "psp", "flow2seg-gt", "flow2seg-efc", "flow2seg-zero"]
    assert replicate.VARIANTS["flow2seg-efc"][2] == {"--init": "psp", "--flow-from": "full"}
    # Table 2 reads the flow path: the fused 'miou' (an untrained image path in this stage) is not shown.
    seeds, results = [0, 1], {}
    for k, (name, _, _) in enumerate(table2["rows"]):
        for seed in seeds:
            results[(name, seed)] = {"command": f"cmd {name}", "metrics": {
                "miou": 0.9, "miou_flow_path": 0.30 + 0.01 * k + 0.02 * seed,
                "iou_flow_path_car_moving": 0.5, "iou_flow_path_car_parked": 0.25, "iou_car_moving": 0.99}}
    references = {"zero": {"pairs": 12}, "const": {"pairs": 12}}
    report, markdown = replicate.table_report("flow2seg-table2", results, references, dict(replicate.SETTINGS),
                                              seeds)
    labels = [row["label"] for row in report["rows"]]  # the backbones that ran
    assert labels == ["ResNet18-FCN", "ResNet50-FCN", "ResNet101-FCN", "ResNet18 + ASPP", "ResNet18 + DenseASPP",
                      "ResNet18 + PSP"]
    assert report["rows"][1]["stats"]["miou_flow_path"]["mean"] == pytest.approx(0.32)
    assert report["rows"][1]["settings_changed"] == {"crop": [96, 96], "lr": 2e-4, "flow_backbone": "resnet50"}
    assert ("| ResNet50-FCN | 32.0 ± 1.4 | - | - | - | - | - | 50.0 ± 0.0 | 25.0 ± 0.0 | - | - | 37.4 |" in markdown
            and "90.0" not in markdown)
    # its rows train on 96x96 crops at 2e-4 (their flow is an input, not a correlation)
    assert "; 400 iterations, batch 4, crop 96x96, resnet18, adam, lr 0.0002; every row's" in markdown
    # Table 3 labels name the image backbone that ran (ResNet18 in the quick settings; the paper's is ResNet101)
    for name, _, _ in table3["rows"]:
        results.update({(name, seed): {"command": "c", "metrics": {"miou": 0.5}} for seed in seeds})
    report, markdown = replicate.table_report("flow2seg-table3", results, references, dict(replicate.SETTINGS),
                                              seeds)
    assert [row["label"] for row in report["rows"]][:2] == ["ResNet18-FCN (image only)",
                                                            "ResNet18 + PSP (PSPNet, image only)"]
    assert "| ResNet18-FCN (image only) | 50.0 ± 0.0 | - | - | - | - | - | - | - | 75.3 (R101-FCN) |" in markdown


def test_evaluation_flows_come_from_the_flow_from_dependency_not_the_init_one(world, tmp_path, monkeypatch):
    """flow2seg-gt builds on the PSPNet (--init) and reads the ground-truth flow; flow2seg-efc also builds
    on the full EFC (--flow-from), whose network computes its evaluated frames' flows."""
    settings = {**replicate.QUICK, "eval_snippets": 1}
    paths = {"results": tmp_path / "results", "runs": tmp_path / "runs", "data": world}
    filled, evaluated = [], []
    monkeypatch.setattr(replicate.checkpoints, "read_checkpoint", lambda path: {"iteration": settings["iterations"]})
    monkeypatch.setattr(replicate.train, "fill_flow_dir", lambda source, *a, **kw: filled.append(Path(source)))
    monkeypatch.setattr(replicate, "evaluate_run", lambda ckpt, seq, device, flow_dir: evaluated.append(flow_dir) or {})
    for name in ("flow2seg-gt", "flow2seg-efc"):
        (tmp_path / "runs" / name / "seed0").mkdir(parents=True)
        (tmp_path / "runs" / name / "seed0" / "ckpt.pt").touch()  # finished: evaluated only
        (tmp_path / "runs" / name / "seed0" / "settings.json").write_text(json.dumps(settings))
        replicate.run_variant(name, 0, settings, paths, "cpu", print)
    assert filled == [tmp_path / "runs" / "full" / "seed0" / "ckpt.pt"]
    assert evaluated == [None, tmp_path / "runs" / "flow2seg-efc" / "seed0" / "val_flows"]


def test_the_zero_flow_control_reads_zeros_of_each_frames_size_in_training_and_evaluation(world, tmp_path, monkeypatch):
    settings = {**replicate.QUICK, "eval_snippets": 1}
    paths = {"results": tmp_path / "results", "runs": tmp_path / "runs", "data": world}
    evaluated = []
    monkeypatch.setattr(replicate.checkpoints, "read_checkpoint", lambda path: {"iteration": settings["iterations"]})
    monkeypatch.setattr(replicate, "evaluate_run", lambda ckpt, seq, device, flow_dir: evaluated.append(flow_dir) or {})
    run = tmp_path / "runs" / "flow2seg-zero" / "seed0"
    run.mkdir(parents=True)
    (run / "ckpt.pt").touch()  # finished: the flows are written, then it is evaluated
    (run / "settings.json").write_text(json.dumps(settings))
    replicate.run_variant("flow2seg-zero", 0, settings, paths, "cpu", print)
    zeros = tmp_path / "runs" / "zero-flows"
    assert evaluated == [zeros]
    # train.py's Flow2Seg dataset finds a flow for every labelled frame of both splits, all zeros at the image's size
    for split in ("train", "val"):
        items = data.CityscapesFlow2Seg(world, split, flow_dir=zeros)
        assert len(items) == len(data.labelled_frames_with_previous(world, split)) > 0
        item = items[0]
        assert item["flow"].shape == (2, *item["image"].shape[1:]) == (2, 64, 128)
        assert item["flow"].abs().max() == 0
    # every evaluated frame b has one too (SecondFrames reads it in place of the true flow, which is not zero)
    pairs = replicate.EvalPairs(world, settings["eval_window"], 1)
    frames = replicate.SecondFrames(pairs, zeros)
    assert all(frames[k]["flow"].abs().max() == 0 for k in range(len(frames)))
    assert replicate.SecondFrames(pairs)[0]["flow"].abs().max() > 0


def test_goals_are_checked_on_the_tables_means_and_missing_rows_are_not_run_yet():
    def report(table, means):
        return {"seeds": [0, 1, 2], "rows": [{"variant": variant, "stats": {k: {"mean": v} for k, v in stats.items()}}
                                             for variant, stats in means.items()]}
    reports = {"efc-table1": report("efc-table1", {"psp": {"miou": 0.55}, "full": {"miou": 0.54}}),
               "efc-table2": report("efc-table2", {"zero": {"epe_all": 6.0}, "const": {"epe_all": 4.0},
                                                   "ul": {"epe_all": 2.9}, "full-mixed": {"epe_all": 2.8}}),
               "flow2seg-table3": report("flow2seg-table3", {"psp": {"iou_car_moving": 0.2, "iou_car_parked": 0.3},
                                                            "flow2seg-gt": {"iou_car_moving": 0.6,
                                                                            "iou_car_parked": 0.49}})}
    goals, markdown = replicate.goals_report(reports)
    status = [g["status"] for g in goals]
    # UL 2.9 <= 0.5 x 6.0 (met); 2.9 > 0.7 x 4.0 = 2.8 (missed); full 2.8 <= UL 2.9 (met); full 54 < PSPNet 55
    # (missed); car_parked 49 % < 50 % (missed); cars' mean 54.5 vs 25.0: +29.5 points (met)
    assert status == ["met", "missed", "met", "missed", "missed", "met"], goals
    assert goals[0]["measured"] == "2.900 px = 0.483x the zero flow's 6.000 px"
    assert goals[1]["measured"] == "2.900 px = 0.725x the best constant flow's 4.000 px"
    assert goals[5]["measured"] == "Flow2Seg 54.5 %, PSPNet 25.0 %: +29.5 points"
    assert "| the full EFC's mIoU not below the PSPNet's | full EFC 54.00 %, PSPNet 55.00 % | missed |" in markdown
    reports["efc-table2"]["rows"][2]["stats"]["epe_all"]["mean"] = None  # UL has no seed yet
    goals, _ = replicate.goals_report(reports)
    assert [g["status"] for g in goals[:3]] == ["not run yet"] * 3 and goals[0]["measured"] == "ul not run yet"


def test_all_writes_the_goals_and_their_block_from_the_cached_rows(world, tmp_path, monkeypatch):
    cache = {("psp", 0): {"miou": 0.5, "iou_car_moving": 0.2, "iou_car_parked": 0.3},
             ("full", 0): {"miou": 0.6, "epe_all": 0.1},
             ("flow2seg-gt", 0): {"iou_car_moving": 0.6, "iou_car_parked": 0.7}}
    monkeypatch.setattr(replicate, "cached_result", lambda name, seed, *a: {"metrics": cache[(name, seed)],
                                                                              "command": f"cmd {name}"}
                        if (name, seed) in cache else None)
    page = tmp_path / "replication.md"
    page.write_text("".join(f"<!-- replicate:{t} -->\n<!-- /replicate:{t} -->\n" for t in [*replicate.TABLES, "goals"]))
    replicate.main(["all", "--report", "--seeds", "1", "--eval-snippets", "1", "--data-root", str(world),
                    "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--readme", str(page)])
    goals = json.loads((tmp_path / "results" / "goals.json").read_text())
    assert goals["seeds"] == [0]
    # UL not run: its two goals and the full EFC's flow goal wait; the full EFC's mIoU and both Flow2Seg goals
    # are read from the cached rows (60 >= 50 %; cars 65 against 25 %: +40 points)
    assert [g["status"] for g in goals["goals"]] == ["not run yet"] * 3 + ["met"] * 3
    text = page.read_text()
    assert "| the full EFC's mIoU not below the PSPNet's | full EFC 60.00 %, PSPNet 50.00 % | met |" in text
    assert (tmp_path / "results" / "goals.md").read_text() in text


def test_every_stored_result_is_what_its_command_trains_now():
    # results/runs/ holds the runs behind docs/replication.md: a change of a variant's flags (or of a recipe
    # default that a row then pins) must keep each stored command equal to the one train_command builds now,
    # or --report silently drops the row and the next replicate run trains it again.
    settings = dict(replicate.SETTINGS)
    results, runs = replicate.default_folders(settings)
    repo = Path(__file__).parent.parent
    # the commands name the folders as a run from the repository root does: runs/replicate, data/synthetic
    paths = {"results": repo / results, "runs": Path(runs), "data": Path(replicate.parse_args(["all"]).data_root)}
    stored = sorted((repo / results / "runs").glob("*/seed*.json"))
    assert len(stored) >= 60
    stale = [f"{p.parent.name}/{p.stem}" for p in stored
             if replicate.cached_result(p.parent.name, int(p.stem[4:]), settings, paths, None) is None]
    assert stale == []
