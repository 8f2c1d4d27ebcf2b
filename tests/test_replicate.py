"""replicate.py: the variant plan, the commands it hands train.py, the evaluation pairs, the table
arithmetic, the update of docs/replication.md, one real (cached) run, and a slow smoke run of a whole table."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import replicate
import train
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
    # Table 3's Flow2Seg rows start from the PSPNet row (--init); the EFC-flow one also needs the full EFC.
    assert replicate.needed_variants(["flow2seg-table3"]) == ["image-fcn", "psp", "flow2seg-gt", "full",
                                                             "flow2seg-efc"]
    assert replicate.needed_variants(["flow2seg-table2"]) == ["flowpath-r18", "flowpath-r50", "flowpath-r101",
                                                             "flowpath-aspp", "flowpath-denseaspp", "flowpath-psp"]
    assert "zero" not in replicate.needed_variants(["efc-table2"])


@pytest.mark.parametrize("name", sorted(replicate.VARIANTS))
def test_commands_are_valid_train_py_commands_with_the_shared_budget(name):
    settings = replicate.SETTINGS
    argv = replicate.train_command(name, 2, settings, "out/x", "runs/r", "world", None)
    args = train.parse_args(argv)
    method, _, dependency, own = replicate.VARIANTS[name]
    assert args.method == method and args.seed == 2 and args.out == "out/x"
    for key in ("iterations", "batch", "crop", "optimizer", "lr", "flow_lr_mult", "max_displacement",
                "corr_stride", "backbone"):
        assert getattr(args, key) == settings[key], key
    assert args.flow_backbone == own.get("flow_backbone", settings["flow_backbone"])
    assert argv.count("--flow-backbone") == 1
    if name == "tcc-fix":
        assert args.flow_init == "runs/r/ul-oe/seed2/ckpt.pt" and args.ablation == "tcc-fix" and not args.init
    if name == "flow2seg-efc":
        assert args.flow_from == "runs/r/full/seed2/ckpt.pt"
    # Flow2Seg 4.3: the Table 3 Flow2Seg rows start from the PSPNet row's checkpoint
    assert args.init == (["runs/r/psp/seed2/ckpt.pt"] if name in ("flow2seg-gt", "flow2seg-efc") else [])
    assert args.flow_from is None or name == "flow2seg-efc"
    # Table 2: the flow path alone, trained alone, with the row's backbone and context module
    assert (args.flow2seg_stage == "flow-path") == name.startswith("flowpath-")
    assert args.flow_context == {"flowpath-aspp": "aspp", "flowpath-denseaspp": "denseaspp",
                                 "flowpath-psp": "psp"}.get(name, "fcn")
    assert args.flow_backbone == {"flowpath-r50": "resnet50", "flowpath-r101": "resnet101"}.get(name, "resnet18")
    assert args.context == ("fcn" if name == "image-fcn" else "psp") and args.backbone == "resnet18"
    if name in train.ABLATIONS:
        assert args.ablation == name


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
    zero = replicate.zero_flow_metrics(pairs)
    lengths = [it["flow_fw"].norm(dim=0)[it["flow_fw_valid"]] for it in items]
    assert zero["epe_all"] == pytest.approx(torch.cat(lengths).double().mean().item(), rel=1e-6)
    noc = [it["flow_fw"].norm(dim=0)[it["flow_fw_valid"] & ~it["occ_fw"]] for it in items]
    assert zero["epe_noc"] == pytest.approx(torch.cat(noc).double().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="eval window"):
        replicate.EvalPairs(world, [20, 30])


def test_table_means_std_and_markdown():
    seeds = [0, 1]
    settings = dict(replicate.SETTINGS)
    results = {}
    for k, name in enumerate(["psp", "tcc-fix", "tcc-single", "tcc-single-om", "tcc-multi-om", "full"]):
        for seed in seeds:
            miou = 0.40 + 0.01 * k + 0.02 * seed  # seeds 0.40 / 0.42 -> mean 41.0, std 1.4
            tc = float("nan") if name == "full" and seed == 1 else 0.9  # NaN seeds are left out
            results[(name, seed)] = {"metrics": {"miou": miou, "temporal_consistency": tc}, "command": f"cmd {name}"}
    zero = {"pairs": 12}
    report, markdown = replicate.table_report("efc-table1", results, zero, settings, seeds)
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["psp"]["stats"]["miou"]["mean"] == pytest.approx(0.41)
    assert rows["psp"]["stats"]["miou"]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert rows["full"]["stats"]["temporal_consistency"] == {"mean": pytest.approx(0.9), "std": None, "n": 1}
    assert "| PSPNet | 41.0 ± 1.4 | 90.0 ± 0.0 | 76.20 |" in markdown
    assert "| + TCC_multi + OM + UD (EFC) | 46.0 ± 1.4 | 90.0 (n=1) | 78.44 |" in markdown  # one seed was NaN
    assert "2 seeds (0, 1)" in markdown and "12 validation pairs" in markdown
    assert replicate.format_value(None, None, "pct") == "-"
    assert replicate.format_value(1.23456, None, "px") == "1.235"
    # The zero flow is one evaluation whatever the seeds: no spread, no n; paper EPE in the table's column order.
    for k, name in enumerate(["ul", "ul-oe", "ul-tc", "ul-oe-tc", "full"]):
        for seed in seeds:
            results[(name, seed)] = {"metrics": {"epe_all": 1.0 + k + seed, "epe_noc": 0.5, "fl_all": 0.1},
                                     "command": f"cmd {name}"}
    zero = {"pairs": 12, "epe_all": 1.4, "epe_noc": 1.3, "fl_all": 0.02}
    report, markdown = replicate.table_report("efc-table2", results, zero, settings, seeds)
    assert "| zero flow (reference) | 1.400 | 1.300 | 2.0 | - |" in markdown
    assert "| UL | 1.500 ± 0.707 | 0.500 ± 0.000 | 10.0 ± 0.0 | 11.03 / 7.53 |" in markdown
    assert "paper: EPE all / noc (KITTI 2015)" in markdown


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
    trained again; the rows that need nothing stay cached."""
    cached = {"image-fcn", "psp", "flow2seg-gt", "full"}
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
    assert calls == [("image-fcn", True), ("psp", True), ("flow2seg-gt", True), ("full", True), ("full", False),
                     ("flow2seg-efc", False)]


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
    for table in replicate.TABLES:
        assert text.count(f"<!-- replicate:{table} -->") == 1 and text.count(f"<!-- /replicate:{table} -->") == 1


def test_one_run_trains_evaluates_and_is_cached(world, tmp_path, monkeypatch):
    settings = {**replicate.QUICK, "iterations": 2, "crop": [64, 64], "workers": 0, "eval_snippets": 1}
    paths = {"results": tmp_path / "results", "runs": tmp_path / "runs", "data": world}
    result, trained = replicate.run_variant("psp", 0, settings, paths, "cpu", print)
    assert trained
    metrics = result["metrics"]
    assert metrics["pairs"] == 6 and 0 <= metrics["miou"] <= 1 and 0 <= metrics["temporal_consistency"] <= 1
    assert len(metrics["iou"]) == 9 and "iou_car_moving" in metrics
    saved = json.loads((tmp_path / "results" / "runs" / "psp" / "seed0.json").read_text())
    assert saved["settings"] == settings and saved["command"].startswith("python train.py --method psp")
    assert saved["variant_settings"] == settings and saved["resumed"] is False
    # Cached: train.py is not started again; with other settings it is.
    calls = []
    monkeypatch.setattr(replicate.subprocess, "call", lambda argv, **kw: calls.append(argv) or 1)
    assert replicate.run_variant("psp", 0, settings, paths, "cpu", print) == (saved, False)
    assert calls == []
    with pytest.raises(SystemExit, match="train.py exited with 1"):
        replicate.run_variant("psp", 0, {**settings, "iterations": 3}, paths, "cpu", print)
    assert len(calls) == 1 and calls[0][calls[0].index("--iterations") + 1] == "3"
    assert "--resume" not in calls[0]  # the old run's checkpoint had other settings: started afresh
    # The same settings but another train.py command (here: another data root) is not the cached run either.
    assert replicate.cached_result("psp", 0, settings, {**paths, "data": tmp_path / "elsewhere"}, "cpu") is None
    assert replicate.cached_result("psp", 0, settings, paths, "cpu")["metrics"] == metrics


@pytest.mark.slow
def test_quick_smoke_run_of_a_table_has_every_variant(world, tmp_path):
    replicate.main(["flow2seg-table3", "--quick", "--seeds", "1", "--iterations", "2", "--crop", "64", "64",
                    "--data-root", str(world), "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = json.loads((tmp_path / "results" / "flow2seg-table3.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["image-fcn", "psp", "flow2seg-gt", "flow2seg-efc"]
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
    assert [key for key, _, _ in table2["columns"]] == ["miou_flow_path", "iou_flow_path_car_moving",
                                                        "iou_flow_path_car_parked"]
    assert [name for name, _, _ in table3["rows"]] == ["image-fcn", "psp", "flow2seg-gt", "flow2seg-efc"]
    assert replicate.VARIANTS["flow2seg-efc"][2] == {"--init": "psp", "--flow-from": "full"}
    # Table 2 reads the flow path: the fused 'miou' (an untrained image path in this stage) is not shown.
    seeds, results = [0, 1], {}
    for k, (name, _, _) in enumerate(table2["rows"]):
        for seed in seeds:
            results[(name, seed)] = {"command": f"cmd {name}", "metrics": {
                "miou": 0.9, "miou_flow_path": 0.30 + 0.01 * k + 0.02 * seed,
                "iou_flow_path_car_moving": 0.5, "iou_flow_path_car_parked": 0.25, "iou_car_moving": 0.99}}
    report, markdown = replicate.table_report("flow2seg-table2", results, {"pairs": 12}, dict(replicate.SETTINGS),
                                              seeds)
    labels = [row["label"] for row in report["rows"]]  # the backbones that ran
    assert labels == ["ResNet18-FCN", "ResNet50-FCN", "ResNet101-FCN", "ResNet18 + ASPP", "ResNet18 + DenseASPP",
                      "ResNet18 + PSP"]
    assert report["rows"][1]["stats"]["miou_flow_path"]["mean"] == pytest.approx(0.32)
    assert report["rows"][1]["settings_changed"] == {"flow_backbone": "resnet50"}
    assert "| ResNet50-FCN | 32.0 ± 1.4 | 50.0 ± 0.0 | 25.0 ± 0.0 | 37.4 |" in markdown and "90.0" not in markdown
    # Table 3 labels name the image backbone that ran (ResNet18 in the quick settings; the paper's is ResNet101)
    for name, _, _ in table3["rows"]:
        results.update({(name, seed): {"command": "c", "metrics": {"miou": 0.5}} for seed in seeds})
    report, markdown = replicate.table_report("flow2seg-table3", results, {"pairs": 12}, dict(replicate.SETTINGS),
                                              seeds)
    assert [row["label"] for row in report["rows"]][:2] == ["ResNet18-FCN (image only)",
                                                            "ResNet18 + PSP (PSPNet, image only)"]
    assert "| ResNet18-FCN (image only) | 50.0 ± 0.0 | - | - | - | 75.3 (R101-FCN) |" in markdown


def test_evaluation_flows_come_from_the_flow_from_dependency_not_the_init_one(world, tmp_path, monkeypatch):
    """flow2seg-gt builds on the PSPNet (--init) and reads the ground-truth flow; flow2seg-efc also builds
    on the full EFC (--flow-from), whose network computes its evaluated frames' flows."""
    settings = {**replicate.QUICK, "eval_snippets": 1}
    paths = {"results": tmp_path / "results", "runs": tmp_path / "runs", "data": world}
    filled, evaluated = [], []
    monkeypatch.setattr(replicate.train, "read_checkpoint", lambda path: {"iteration": settings["iterations"]})
    monkeypatch.setattr(replicate.train, "fill_flow_dir", lambda source, *a, **kw: filled.append(Path(source)))
    monkeypatch.setattr(replicate, "evaluate_run", lambda ckpt, seq, device, flow_dir: evaluated.append(flow_dir) or {})
    for name in ("flow2seg-gt", "flow2seg-efc"):
        (tmp_path / "runs" / name / "seed0").mkdir(parents=True)
        (tmp_path / "runs" / name / "seed0" / "ckpt.pt").touch()  # finished: evaluated only
        (tmp_path / "runs" / name / "seed0" / "settings.json").write_text(json.dumps(settings))
        replicate.run_variant(name, 0, settings, paths, "cpu", print)
    assert filled == [tmp_path / "runs" / "full" / "seed0" / "ckpt.pt"]
    assert evaluated == [None, tmp_path / "runs" / "flow2seg-efc" / "seed0" / "val_flows"]
