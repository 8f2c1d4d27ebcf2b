"""bench.py: the references agree with the definitions, the timing method interleaves, alternates and
retakes loaded rounds, tiny runs of every part fill the report's fields, and the GPU check's plan holds
every step (smoke tests: they check fields, ratios and plans, never a timing)."""
import json
import math
import sys

import pytest
import torch

import bench
import config
import losses
import warp
from test_warp import naive_correlation

TINY = ["--device", "cpu", "--size", "64", "64", "--crop", "64", "64", "--batch", "1", "--backbones", "resnet18",
        "--repeats", "1", "--layer-repeats", "1", "--warmup", "1", "--matmul-size", "128"]


@pytest.fixture
def quick(monkeypatch):
    """One torch thread (restored afterwards) and no retaken rounds. On the 2-core machine with other
    jobs running, a multi-threaded op waits ~16 ms for a busy core (bench.LOADED's comment): an EFC
    step at 64x64 took 11.7 s with 2 threads and 1.6 s with one. The retakes are tested on their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(bench, "LOADED", 1.0)
    yield
    torch.set_num_threads(threads)


def is_number(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("B,C,H,W,d,s", [(2, 3, 5, 7, 2, 1), (1, 4, 7, 5, 4, 2), (2, 5, 3, 11, 4, 4)])
def test_reference_correlation_agrees_with_the_definition_and_with_warp(B, C, H, W, d, s):
    torch.manual_seed(d * 10 + s)
    f1 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    reference = bench.reference_correlation(f1, f2, d, s)
    assert torch.allclose(reference, naive_correlation(f1.detach(), f2.detach(), d, s), atol=1e-12)
    weights = torch.randn_like(reference)
    grads_reference = torch.autograd.grad((reference * weights).sum(), (f1, f2))
    for path in ("tiled", "all_pairs"):
        ours = warp.correlation(f1, f2, d, s, path=path)
        assert torch.allclose(reference, ours, atol=1e-12)
        grads_ours = torch.autograd.grad((ours * weights).sum(), (f1, f2))
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads_reference, grads_ours))


def test_grid_sample_reference_agrees_with_backward_warp():
    torch.manual_seed(0)
    x, flow = torch.randn(2, 3, 9, 13), 3 * torch.randn(2, 2, 9, 13)
    assert torch.allclose(bench.grid_sample_warp(x, flow), warp.backward_warp(x, flow)[0], atol=1e-5)


# -------------------------------------------------------------------------------------------- timing
def test_interleaved_warms_up_then_alternates_the_order(monkeypatch):
    calls = []
    fns = {"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}
    # Every call takes 0.06 s (a fake clock): two back-to-back calls make the 0.1 s of MIN_TIMING_S.
    monkeypatch.setattr(bench, "timed", lambda fn, device: (fn(), 0.06))
    loads = iter([0.0] * 4)
    monkeypatch.setattr(bench, "other_load", lambda before, min_seconds=1.0: next(loads))
    result = bench.interleaved(fns, torch.device("cpu"), rounds=4, warmup=2)
    assert result["calls"] == {"A": 2, "B": 2}
    # Warm-up: A twice, B twice; then rounds AB, BA, AB, BA, two calls per timing.
    assert "".join(calls) == "AABB" + "AABB" + "BBAA" + "AABB" + "BBAA"
    assert result["loads"] == [0.0] * 4 and result["loaded"] == result["retaken"] == 0
    assert len(result["seconds"]["A"]) == len(result["seconds"]["B"]) == 4


def test_interleaved_retakes_loaded_rounds_and_counts_those_it_keeps(monkeypatch):
    order = []
    fns = {"A": lambda: order.append("A"), "B": lambda: order.append("B")}
    monkeypatch.setattr(bench, "timed", lambda fn, device: (fn(), 1.0))
    # Round loads: loaded, clean (kept as round 0), loaded, loaded (retakes spent: 3 > rounds = 2, kept as round 1).
    loads = iter([0.5, 0.0, 0.3, 0.4, 0.9])
    monkeypatch.setattr(bench, "other_load", lambda before, min_seconds=1.0: next(loads))
    result = bench.interleaved(fns, torch.device("cpu"), rounds=2, warmup=1)
    assert result["retaken"] == 2 and result["loads"] == [0.0, 0.4] and result["loaded"] == 1
    # A retaken round keeps its order: AB (loaded), AB (kept); BA (loaded), BA (loaded), BA (kept)
    assert "".join(order) == "AB" + "AB" + "AB" + "BA" + "BA"
    fields = bench.load_fields(result)
    assert fields["other_load"] == 0.4 and fields["loaded_rounds"] == 1 and fields["retaken_rounds"] == 2
    assert fields["runs"] == 2 and fields["round_loads"] == [0.0, 0.4]


def test_ratio_fields_take_the_ratio_within_each_round():
    # A drift between rounds (rounds 2 and 4 ten and eight times slower for both) cancels within a
    # round: the ratios are 0.5, 0.5, 0.6, 0.5.
    fields = bench.ratio_fields("r", [0.5, 5.0, 0.6, 4.0], [1.0, 10.0, 1.0, 8.0])
    assert fields["r"] == pytest.approx(0.5) and fields["r_spread"] == pytest.approx([0.5, 0.6])
    assert fields["r_iqr"][0] == pytest.approx(0.5) and fields["r_iqr"][1] == pytest.approx(0.525)
    assert bench.spread([2.0]) == {"median": 2.0, "min": 2.0, "max": 2.0, "q1": 2.0, "q3": 2.0}


# ------------------------------------------------------------------------------------- micro shapes
def test_default_micro_shapes_are_efcs_then_the_sweep():
    shapes = bench.micro_shapes(batch=2)
    # batch 2B: the flow decoder runs on the pairs in both directions
    assert shapes[:4] == [(4, 256, 90, 90, 20, 2), (4, 1024, 90, 90, 20, 2), (4, 256, 16, 32, 4, 1),
                          (4, 1024, 16, 32, 4, 1)]
    assert shapes[4:] == [(4, 256, side, side, 20, 2) for side in bench.SWEEP_MAPS]
    assert bench.parse_args(["--device", "cpu"]).micro_shapes == bench.micro_shapes(2)
    args = bench.parse_args(["--device", "cpu", "--micro-shapes", "4x256x90x90", "2x8x12x12:4:1"])
    assert args.micro_shapes == [(4, 256, 90, 90, 20, 2), (2, 8, 12, 12, 4, 1)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--micro-shapes", "4x256x90"])


def test_crossover_reads_the_sweep():
    def row(side, ratio, d=20, s=2, channels=256):
        return {"op": "correlation", "b": "all-pairs", "shape": [4, channels, side, side], "d": d, "s": s,
                "b_over_a": ratio}

    threshold = warp.ALL_PAIRS_MAX_PIXELS
    # other d, s (the quick recipe's 4, 1) and other channels (1024: faster at 90x90) are not the sweep
    clean = bench.all_pairs_crossover([row(12, 0.2), row(45, 0.6), row(64, 1.3), row(90, 2.5), row(12, 9, 4, 1),
                                       row(90, 0.9, channels=1024)])
    assert clean == {"faster_up_to_pixels": 45 * 45, "slower_from_pixels": 64 * 64, "threshold_pixels": threshold,
                     "clean": True, "agrees": 45 * 45 <= threshold < 64 * 64}
    noisy = bench.all_pairs_crossover([row(12, 0.2), row(32, 1.1), row(45, 0.9)])
    assert noisy["clean"] is False and noisy["agrees"] is False
    assert bench.all_pairs_crossover([row(12, 0.2)])["agrees"] is None  # no slower map: no verdict
    assert bench.all_pairs_crossover([]) is None


# ----------------------------------------------------------------------------------------- tiny runs
def test_a_tiny_run_of_flops_and_inference_fills_every_field(tmp_path, quick):
    out = tmp_path / "bench.json"
    report = bench.main(TINY + ["--parts", "flops", "inference", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {"cpu", "cores", "torch", "device"} <= set(report["machine"]) and is_number(report["matmul_peak_tflops"])
    flops = {(r["network"], tuple(r["size"])): r for r in report["flops"]}
    for size in bench.PAPER_SIZES:
        assert flops[("EFCNet-R18 inference", size)]["vs_pspnet"] == 1.0  # the same modules: exactly equal
        assert 1 < flops[("Flow2SegNet-R18+R18", size)]["vs_pspnet"] < 3
    assert all(is_number(b["extra_gflops"]) and b["extra_gflops"] > 0 for b in report["flops_breakdown"])

    assert [r["network"] for r in report["inference"]] == ["PSPNet-R18", "EFCNet-R18 inference", "Flow2SegNet-R18+R18"]
    for r in report["inference"]:
        assert all(is_number(r[k]) and r[k] > 0 for k in ("gflops_per_image", "ms_per_image", "images_per_s",
                                                          "vs_pspnet_time", "peak_mb"))
        low, high = r["vs_pspnet_time_spread"]
        assert low <= r["vs_pspnet_time"] <= high and len(r["ms_runs"]) == r["runs"] == len(r["round_loads"]) == 1
        assert r["other_load"] is None or 0 <= r["other_load"] <= 1
    assert report["inference"][0]["vs_pspnet_time"] == 1.0  # PSPNet against itself, round by round
    statuses = {g["goal"]: g["status"] for g in report["goals"]}
    assert set(statuses.values()) <= {"met", "missed", "not measured"}
    assert statuses["EFC inference FLOPs = PSPNet's (R18)"] == "met"
    assert not any("training" in goal for goal in statuses)  # no training part: no training goals


def test_a_tiny_run_of_training_fills_every_field(monkeypatch, quick):
    # efc alone (the correlation and the warping; the base of its own ratio), and psp and flow2seg in
    # the next test: each step is timed, profiled and measured five times, 1-2 s each here.
    monkeypatch.setattr(bench, "METHODS", ("efc",))
    report = bench.main(TINY + ["--parts", "training"])
    r, = report["training"]
    assert r["method"] == "efc" and r["vs_psp_time"] == 1.0
    assert all(is_number(r[k]) and r[k] > 0 for k in ("gflops_per_step", "ms_per_step", "images_per_s",
                                                      "achieved_tflops", "share_of_matmul_peak", "peak_mb"))
    shares = r["shares"]
    assert set(shares) == set(bench.REGIONS) | {"other"}
    assert all(is_number(v) and v >= 0 for k, v in shares.items() if k != "other")
    assert sum(shares[k] for k in bench.TOP_REGIONS) + shares["other"] == pytest.approx(1)
    assert all(shares[k] > 0 for k in ("encoder", "seg decoder", "flow decoder", "losses", "optimizer", "correlation",
                                       "warping"))
    assert shares["correlation"] <= shares["flow decoder"] and shares["flow path"] == shares["fusion"] == 0
    statuses = {g["goal"]: g["status"] for g in report["goals"]}
    assert any(goal.startswith("correlation + warping <= 5 %") for goal in statuses)
    assert statuses["EFC-R101 training pair at 713x713 <= 10 GB (GPU)"] == "not measured"  # no GPU run
    # The profiler labels are gone: the functions and methods are the originals again.
    assert warp.correlation.__module__ == "warp" and losses.efc_loss.__module__ == "losses"
    assert warp.backward_warp.__name__ == "backward_warp"


def test_a_tiny_run_of_psp_and_flow2seg_steps(monkeypatch, quick):
    monkeypatch.setattr(bench, "METHODS", ("psp", "flow2seg"))
    report = bench.main(TINY + ["--parts", "training"])
    psp, flow2seg = report["training"]
    assert psp["vs_psp_time"] == 1.0 and is_number(flow2seg["vs_psp_time"])
    low, high = flow2seg["vs_psp_time_spread"]
    assert low <= flow2seg["vs_psp_time"] <= high
    assert flow2seg["shares"]["flow path"] > 0 and flow2seg["shares"]["fusion"] > 0
    for r in (psp, flow2seg):
        assert r["shares"]["encoder"] > 0 and r["shares"]["losses"] > 0
        assert r["shares"]["flow decoder"] == r["shares"]["correlation"] == r["shares"]["warping"] == 0


def test_a_tiny_run_of_the_micro_benchmarks(quick):
    # 256 channels: the crossover reads the sweep's channel count (bench.SWEEP_CHANNELS) only
    report = bench.main(TINY + ["--parts", "micro", "--micro-shapes", f"2x{bench.SWEEP_CHANNELS}x12x12", "2x4x6x6:2:1"])
    rows = {(r["a"], r["b"], tuple(r["shape"])): r for r in report["micro"]}
    assert len(rows) == 6  # at each shape: tiled vs all-pairs, ours vs the loop, ours vs grid_sample
    for r in report["micro"]:
        assert all(is_number(r[k]) and r[k] > 0 for k in ("ms_a", "ms_b", "b_over_a"))
        assert r["b_over_a_spread"][0] <= r["b_over_a"] <= r["b_over_a_spread"][1]
        assert r["max_abs_diff"] < 1e-4  # the two sides computed the same thing
        assert len(r["ms_runs_a"]) == len(r["ms_runs_b"]) == r["runs"] == 1
    assert rows[("tiled", "all-pairs", (2, bench.SWEEP_CHANNELS, 12, 12))]["path"] == "all_pairs"  # 144 pixels <= the threshold
    assert rows[("warp.correlation", "per-displacement loop", (2, 4, 6, 6))]["d"] == 2
    assert report["all_pairs_crossover"]["threshold_pixels"] == warp.ALL_PAIRS_MAX_PIXELS
    goals = {g["goal"]: g for g in report["goals"]}
    assert "correlation forward + backward >= 5x faster than the naive reference on the CPU" in goals
    assert goals["warp.ALL_PAIRS_MAX_PIXELS lies at the measured crossover of the correlation's paths"]["status"] in (
        "met", "missed", "not measured")


def test_ddp_on_one_process_gives_the_steps_loss_and_gradients(quick):
    # gloo on the CPU, as the GPU check runs it with NCCL: the same step with and without DDP.
    report = bench.main(TINY + ["--parts", "ddp"])
    r, = report["ddp"]
    assert r["backend"] == "gloo" and r["world"] == 1 and r["gradients_missing"] == 0
    assert r["loss_ddp"] == pytest.approx(r["loss_plain"], rel=1e-5)
    assert r["gradient_difference"] < 1e-4  # float32; CPUSyncBatchNorm's sums round differently from BatchNorm
    assert is_number(r["ddp_over_plain"]) and r["ms_ddp"] > 0
    status, = [g["status"] for g in report["goals"] if g["goal"].startswith("DDP (gloo)")]
    assert status == "met"
    assert not torch.distributed.is_initialized()  # the group is gone again


# ---------------------------------------------------------------------------------------- GPU check
def test_gpu_check_plan_holds_every_step(tmp_path, capsys):
    plan = bench.gpu_check_plan(str(tmp_path), python="python")
    steps = {step["name"]: step for step in plan}
    assert list(steps) == ["bench", "ddp", "compile"]
    assert sum(step["timeout"] for step in plan) <= 60 * bench.GPU_CHECK_MINUTES
    for step in plan:
        assert {"--device", "cuda", "--amp", "--channels-last"} <= set(step["command"])
    bench_args = bench.parse_args(steps["bench"]["command"][2:])
    assert bench_args.parts == ["flops", "inference", "training", "micro"] and bench_args.backbones == ["resnet101"]
    assert bench.parse_args(steps["ddp"]["command"][2:]).parts == ["ddp"]
    compile_args = config.parse_args(steps["compile"]["command"][2:])  # train.py accepts the run
    assert compile_args.method == "efc" and compile_args.compile and compile_args.iterations == bench.COMPILE_ITERATIONS
    assert compile_args.flow_warmup == 0  # EFC's own losses from the first iteration
    assert bench.main(["--gpu-check", str(tmp_path), "--dry-run"]) is None
    printed = capsys.readouterr().out
    assert all(" ".join(step["command"][1:]) in printed for step in bench.gpu_check_plan(str(tmp_path)))


def test_gpu_check_runs_steps_with_timeouts_and_reads_their_goals(tmp_path):
    plan = [{"name": "bench", "command": [sys.executable, "-c", "pass"], "timeout": 20, "checks": "-"},
            {"name": "ddp", "command": [sys.executable, "-c", "import time; time.sleep(30)"], "timeout": 1, "checks": "-"},
            {"name": "compile", "command": [sys.executable, "-c", "raise SystemExit(3)"], "timeout": 20, "checks": "-"}]
    results = bench.run_plan(plan)
    assert results["bench"]["returncode"] == 0 and results["ddp"]["timed_out"] and results["compile"]["returncode"] == 3
    # What the steps would have written: bench.json's goals, and the compile run's log.
    (tmp_path / "bench.json").write_text(json.dumps({"goals": [bench.goal("EFC-R101 training pair at 713x713 <= 10 GB (GPU)",
                                                                          "8.10 GB", True)]}))
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "log.jsonl").write_text(
        json.dumps({"config": {}}) + "\n"
        + "\n".join(json.dumps({"iteration": i, "loss": 1.0 / i, "images_per_s": 9.0}) for i in (5, 10, 15, 20)))
    rows = {g["goal"]: g for g in bench.gpu_check_goals(str(tmp_path), plan, results)}
    assert rows["step 'bench' completes within 20 s"]["status"] == "met"
    assert rows["step 'ddp' completes within 1 s"]["status"] == "missed"
    assert rows["step 'compile' completes within 20 s"]["status"] == "missed"
    assert rows["EFC-R101 training pair at 713x713 <= 10 GB (GPU)"]["status"] == "met"
    compile_goal = rows[f"train.py --method efc --compile runs {bench.COMPILE_ITERATIONS} iterations with finite losses"]
    assert compile_goal["status"] == "met" and compile_goal["measured"].startswith("20 iterations")
    assert rows[f"the GPU check takes under {bench.GPU_CHECK_MINUTES} minutes"]["status"] == "met"
