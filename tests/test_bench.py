"""bench.py: the correlation reference agrees with the definition, and a tiny run of every part fills
the table's fields (a smoke test: it checks fields and ratios, never a timing)."""
import json
import math

import pytest
import torch

import bench
import losses
import warp
from test_warp import naive_correlation


@pytest.mark.parametrize("B,C,H,W,d,s", [(2, 3, 5, 7, 2, 1), (1, 4, 7, 5, 4, 2), (2, 5, 3, 11, 4, 4)])
def test_reference_correlation_agrees_with_the_definition_and_with_warp(B, C, H, W, d, s):
    torch.manual_seed(d * 10 + s)
    f1 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    reference = bench.reference_correlation(f1, f2, d, s)
    assert torch.allclose(reference, naive_correlation(f1.detach(), f2.detach(), d, s), atol=1e-12)
    ours = warp.correlation(f1, f2, d, s)
    assert torch.allclose(reference, ours, atol=1e-12)
    weights = torch.randn_like(ours)
    grads_reference = torch.autograd.grad((reference * weights).sum(), (f1, f2))
    grads_ours = torch.autograd.grad((ours * weights).sum(), (f1, f2))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads_reference, grads_ours))


def test_grid_sample_reference_agrees_with_backward_warp():
    torch.manual_seed(0)
    x, flow = torch.randn(2, 3, 9, 13), 3 * torch.randn(2, 2, 9, 13)
    assert torch.allclose(bench.grid_sample_warp(x, flow), warp.backward_warp(x, flow)[0], atol=1e-5)


def is_number(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_a_tiny_run_fills_every_field(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--device", "cpu", "--size", "64", "64", "--crop", "64", "64", "--batch", "1",
                         "--backbones", "resnet18", "--repeats", "1", "--layer-repeats", "1", "--warmup", "1",
                         "--corr-shape", "1", "8", "12", "12", "--matmul-size", "256", "--json", str(out)])
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

    timed_rows = report["inference"] + report["training"] + report["micro"]
    assert all(r["other_load"] is None or 0 <= r["other_load"] <= 1 for r in timed_rows)
    assert all(len(r["ms_runs"]) == r["runs"] for r in timed_rows)

    assert [r["method"] for r in report["training"]] == list(bench.METHODS)
    for r in report["training"]:
        assert all(is_number(r[k]) and r[k] > 0 for k in ("gflops_per_step", "ms_per_step", "images_per_s",
                                                          "achieved_tflops", "share_of_matmul_peak", "peak_mb"))
        assert set(r["shares"]) == set(bench.REGIONS) | {"other"}
        assert all(is_number(v) and v >= 0 for k, v in r["shares"].items() if k != "other")
        assert sum(r["shares"][k] for k in bench.TOP_REGIONS) + r["shares"]["other"] == pytest.approx(1)
        assert r["shares"]["encoder"] > 0 and r["shares"]["losses"] > 0 and r["shares"]["optimizer"] > 0
        assert is_number(r["vs_psp_time"])  # the same crop for every method here
    shares = {r["method"]: r["shares"] for r in report["training"]}
    assert shares["efc"]["correlation"] > 0 and shares["efc"]["warping"] > 0 and shares["efc"]["seg decoder"] > 0
    assert shares["efc"]["correlation"] <= shares["efc"]["flow decoder"]
    assert shares["flow2seg"]["flow path"] > 0 and shares["flow2seg"]["fusion"] > 0
    assert shares["psp"]["flow decoder"] == shares["psp"]["correlation"] == shares["psp"]["warping"] == 0

    micro = {(r["op"], r["impl"]): r for r in report["micro"]}
    assert is_number(micro[("correlation", "warp.correlation")]["speedup_vs_reference"])
    assert micro[("correlation", "reference (per-displacement loop)")]["max_abs_diff"] < 1e-5
    assert is_number(micro[("backward_warp", "warp.backward_warp")]["speedup_vs_reference"])
    assert micro[("backward_warp", "reference (F.grid_sample)")]["max_abs_diff"] < 1e-4

    statuses = {g["goal"]: g["status"] for g in report["goals"]}
    assert set(statuses.values()) <= {"met", "missed", "not measured"}
    assert statuses["EFC inference FLOPs = PSPNet's (R18)"] == "met"
    assert statuses["EFC-R101 training pair at 713x713 <= 10 GB (GPU)"] == "not measured"  # no GPU run

    # The profiler labels are gone: the functions and methods are the originals again.
    assert warp.correlation.__module__ == "warp" and losses.efc_loss.__module__ == "losses"
    assert warp.backward_warp.__name__ == "backward_warp"
