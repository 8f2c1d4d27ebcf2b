"""Tests of model.py: backbones against torchvision's published numbers and key names, pretrained
loading, output shapes and values of every network, flow units, FLOPs and gradients.

Forward passes use ResNet-18 and small odd inputs (97x131, 65x65); big models are only built on
the meta device (no memory, no compute), which is enough for parameter and FLOP counts.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import warp  # noqa: E402

K = 5  # classes
H, W = 97, 131  # odd on purpose: stride-4 grid 25x33, stride-8 13x17, then 7x9, 4x5, 2x3
GRIDS = [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]  # strides 4, 8, 16, 32, 64, rounded up


def torchvision_keys(depth):
    """torchvision's ResNet state-dict names without fc, written out from torchvision's naming rules."""
    block, blocks = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                     50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}[depth]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{n}" for n in bn]
    convs = 2 if block == "basic" else 3
    for layer, count in enumerate(blocks, start=1):
        for i in range(count):
            p = f"layer{layer}.{i}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{n}" for n in bn]
            # torchvision adds a projection shortcut where the first block changes shape.
            if i == 0 and (layer > 1 or block == "bottleneck"):
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{n}" for n in bn]
    return keys


# torchvision's published totals with the fc layer, minus fc (in * 1000 + 1000).
@pytest.mark.parametrize("depth, total, fc_in", [(18, 11_689_512, 512), (34, 21_797_672, 512),
                                                 (50, 25_557_032, 2048), (101, 44_549_160, 2048)])
def test_resnet_matches_torchvision(depth, total, fc_in):
    for dilated in (True, False):
        with torch.device("meta"):
            net = model.resnet(depth, dilated=dilated)
        assert sum(p.numel() for p in net.parameters()) == total - (fc_in * 1000 + 1000)
        assert sorted(net.state_dict()) == sorted(torchvision_keys(depth))


def test_dilation_and_output_stride():
    net = model.resnet(18, dilated=True).eval()
    assert all(b.conv1.dilation == (2, 2) and b.conv2.dilation == (2, 2) for b in net.layer3)
    assert all(b.conv1.dilation == (4, 4) and b.conv2.dilation == (4, 4) for b in net.layer4)
    with torch.no_grad():
        assert net(torch.randn(1, 3, H, W)).shape == (1, 512, *GRIDS[1])  # output stride 8
        assert model.resnet(18, dilated=False).eval()(torch.randn(1, 3, H, W)).shape == (1, 512, 4, 5)
    with torch.device("meta"):
        r50 = model.resnet(50, dilated=True)
    assert r50.layer3[0].conv2.dilation == (2, 2) and r50.layer3[0].conv2.stride == (1, 1)
    assert r50.layer4[2].conv2.dilation == (4, 4)


def torchvision_file(net, path, depth, with_counters=True):
    """Write random weights under torchvision's names, as DataParallel + a checkpoint dict would."""
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            if with_counters:
                state[k] = torch.tensor(7)
        else:
            state[k] = torch.randn(v.shape)
    state["conv1.weight"] = torch.randn(64, 3, 7, 7)  # the ImageNet file is RGB
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, net.layer_channels[3]), torch.randn(1000)
    assert sorted(k for k in state if not k.startswith("fc.") and (with_counters or "num_batches" not in k)) \
        == sorted(k for k in torchvision_keys(depth) if with_counters or "num_batches" not in k)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return state


@pytest.mark.parametrize("depth, in_channels", [(18, 3), (18, 2), (34, 3), (50, 3), (101, 3)])
def test_load_pretrained(tmp_path, depth, in_channels):
    net = model.resnet(depth, dilated=True, in_channels=in_channels)
    path = str(tmp_path / "resnet.pth")
    state = torchvision_file(net, path, depth, with_counters=(depth != 34))  # R34: an old file, no counters
    report = model.load_pretrained(net, path)
    assert "fc.weight" in report
    loaded = net.state_dict()
    for k, v in state.items():
        if k != "conv1.weight" and not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    if in_channels == 3:
        assert torch.equal(net.conv1.weight, state["conv1.weight"])
    else:  # Flow2Seg 3.1: every flow channel gets the mean of the RGB filters
        mean = state["conv1.weight"].mean(1)  # (64, 7, 7)
        assert net.conv1.weight.shape == (64, 2, 7, 7)
        assert torch.equal(net.conv1.weight[:, 0], mean) and torch.equal(net.conv1.weight[:, 1], mean)


@pytest.mark.parametrize("method", ["psp", "flow2seg", "efc", "flow"])
def test_load_pretrained_takes_the_image_backbone_of_a_train_py_checkpoint(tmp_path, method):
    """replicate.py starts every row from the backbone of a world-trained PSPNet (--pretrained CKPT):
    the ResNet under each method's segmentation head, bitwise, and nothing else."""
    torch.manual_seed(0)
    net = model.build_model(method, 5, "resnet18", max_displacement=2, corr_stride=1)
    source = {"psp": lambda n: n.backbone, "flow2seg": lambda n: n.image.backbone,
              "efc": lambda n: n.seg.backbone, "flow": lambda n: n.seg.backbone}[method](net)
    path = tmp_path / "ckpt.pt"
    torch.save({"method": method, "config": {}, "model": net.state_dict(), "iteration": 3}, path)
    target = model.resnet(18, dilated=True)
    report = model.load_pretrained(target, str(path))
    assert isinstance(report, str)
    expected, loaded = source.state_dict(), target.state_dict()
    for key, value in loaded.items():
        if not key.startswith("fc."):
            assert torch.equal(value, expected[key]), key
    torch.save({"method": "segformer", "config": {}, "model": net.state_dict()}, path)
    with pytest.raises(ValueError, match="unknown method 'segformer'"):
        model.load_pretrained(target, str(path))


def test_load_pretrained_errors(tmp_path):
    net = model.resnet(18)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        model.load_pretrained(net, str(tmp_path / "nowhere.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        model.load_pretrained(net, str(garbage))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    del state["layer2.1.bn2.weight"]
    state["layer4.0.conv1.weight"] = torch.zeros(512, 256, 1, 1)
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        model.load_pretrained(net, str(tmp_path / "bad.pth"))
    for expected in ("bad.pth", "layer2.1.bn2.weight", "head.weight", "layer4.0.conv1.weight"):
        assert expected in str(error.value)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_pspnet_shapes(batch, training):
    torch.manual_seed(0)
    net = model.PSPNet(K, "resnet18").train(training)
    with torch.no_grad():
        out = net(torch.randn(batch, 3, H, W))  # batch 1 in training: the bin-1 branch has no BN
    assert out["logits"].shape == (batch, K, H, W)
    if training:
        assert out["aux"].shape == (batch, K, H, W)
    else:
        assert out["aux"] is None
    assert torch.isfinite(out["logits"]).all()


def test_pspnet_rejects_bad_input():
    net = model.PSPNet(K, "resnet18")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(1, 2, H, W))
    with pytest.raises(ValueError, match="backbone"):
        model.PSPNet(K, "resnet17")


PAIR_KEYS = {"logits_a", "logits_b", "aux_a", "aux_b", "S_a", "S_b", "flow_ab", "flow_ba", "occ_a", "occ_b"}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_efcnet_pair_shapes(batch, training):
    torch.manual_seed(0)
    net = model.EFCNet(K, "resnet18").train(training)
    a, b = torch.randn(batch, 3, H, W), torch.randn(batch, 3, H, W)
    with torch.no_grad():
        out = net(a, b)
        flow_only = net.forward_pair(a, b, segment=False)
        inference = net(a)
    assert set(out) == PAIR_KEYS and set(flow_only) == PAIR_KEYS
    for side in "ab":
        assert out[f"logits_{side}"].shape == (batch, K, H, W)
        assert (out[f"aux_{side}"].shape == (batch, K, H, W)) if training else out[f"aux_{side}"] is None
        assert out[f"S_{side}"].shape == (batch, 256, *GRIDS[1])
        assert flow_only[f"logits_{side}"] is None and flow_only[f"aux_{side}"] is None
    for key in ("flow_ab", "flow_ba", "occ_a", "occ_b"):
        channels = 2 if key.startswith("flow") else 1
        assert [tuple(t.shape) for t in out[key]] == [(batch, channels, *g) for g in GRIDS]
    for occ in out["occ_a"] + out["occ_b"]:
        assert occ.min() > 0 and occ.max() < 1
    if not training:  # eval: batching a with b changes nothing, so the pair's a-half is PSPNet(a)
        assert torch.allclose(out["logits_a"], inference["logits"], atol=1e-4)
        assert torch.equal(out["flow_ab"][0], flow_only["flow_ab"][0])


def test_flow_decoder_swaps_frames():
    """F_b->a from the pair (a, b) is F_a->b from the pair (b, a): same weights, frames swapped."""
    torch.manual_seed(0)
    net = model.EFCNet(K, "resnet18").eval()
    for p in [net.flow.predict_flow2.weight, net.flow.occ2[2].weight]:  # make the outputs non-trivial
        torch.nn.init.normal_(p, std=0.1)
    a, b = torch.randn(1, 3, 65, 65), torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ab, ba = net.forward_pair(a, b, segment=False), net.forward_pair(b, a, segment=False)
    for l in range(5):
        assert torch.allclose(ab["flow_ba"][l], ba["flow_ab"][l], atol=1e-5)
        assert torch.allclose(ab["occ_b"][l], ba["occ_a"][l], atol=1e-5)
    assert not torch.allclose(ab["flow_ab"][0], ab["flow_ba"][0])


def test_flow_units_are_pixels_of_own_grid():
    """A constant raw prediction r (FlowNet units) is 20 * r full-resolution pixels at every scale."""
    torch.manual_seed(0)
    net = model.EFCNet(K, "resnet18").eval()
    for l in range(2, 7):
        conv = getattr(net.flow, f"predict_flow{l}")
        torch.nn.init.zeros_(conv.weight)
        conv.bias.data = torch.tensor([0.5, -0.25])  # raw u, v
    with torch.no_grad():
        flows = net.forward_pair(torch.randn(1, 3, H, W), torch.randn(1, 3, H, W), segment=False)["flow_ab"]
    for flow, (h, w) in zip(flows, GRIDS):
        assert torch.allclose(flow[0, 0], torch.full((h, w), 20 * 0.5 * w / W))
        assert torch.allclose(flow[0, 1], torch.full((h, w), 20 * -0.25 * h / H))
        full = warp.resize_flow(flow, (H, W))  # back in image pixels: exactly 20 * raw
        assert torch.allclose(full[0, 0], torch.full((H, W), 10.0), atol=1e-5)
        assert torch.allclose(full[0, 1], torch.full((H, W), -5.0), atol=1e-5)


def flops(net, *inputs):
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops()


def test_flops():
    with torch.device("meta"):
        # torchvision publishes 1.81 / 4.09 GFLOPS (multiply-adds) for ResNet-18 / 50 at 224x224,
        # fc included (0.0005 / 0.002 G); flop_counter counts 2 per multiply-add.
        image = torch.zeros(1, 3, 224, 224)
        assert flops(model.resnet(18, dilated=False), image) / 2e9 == pytest.approx(1.81, abs=0.01)
        assert flops(model.resnet(50, dilated=False), image) / 2e9 == pytest.approx(4.09, abs=0.02)
        # EFC: inference costs exactly PSPNet; training adds the flow decoder.
        image = torch.zeros(1, 3, 65, 65)
        efc, psp = model.EFCNet(K, "resnet50").eval(), model.PSPNet(K, "resnet50").eval()
        assert flops(efc, image) == flops(psp, image) > 0
        assert flops(efc, image, image) > 2 * flops(psp, image)
    assert sorted(efc.seg.state_dict()) == sorted(psp.state_dict())  # a PSPNet checkpoint loads as is


def test_summary(capsys):
    with torch.device("meta"):
        net = model.Flow2SegNet(K, "resnet18", "resnet18").eval()
        params, total = model.summary(net, (torch.zeros(1, 3, 65, 65), torch.zeros(1, 2, 65, 65)))
    printed = capsys.readouterr().out
    for name in ("image", "flow_backbone", "flow_head", "fusion", "total"):
        assert name in printed
    assert params == sum(p.numel() for p in net.parameters())
    assert total == flops(net, torch.zeros(1, 3, 65, 65, device="meta"), torch.zeros(1, 2, 65, 65, device="meta"))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_flow2seg_shapes_and_fusion_start(batch, training):
    torch.manual_seed(0)
    net = model.Flow2SegNet(K, "resnet18", "resnet18").train(training)
    image, flow = torch.randn(batch, 3, H, W), 10 * torch.randn(batch, 2, H, W)
    seen = []
    net.flow_backbone.conv1.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        out = net(image, flow)
    for key in ("logits", "image_logits", "flow_logits"):
        assert out[key].shape == (batch, K, H, W)
    assert (out["aux"].shape == (batch, K, H, W)) if training else out["aux"] is None
    assert torch.equal(out["logits"], out["image_logits"])  # zero-initialised residual
    assert torch.allclose(seen[0], flow / 20)  # FLOW_INPUT_SCALE
    with pytest.raises(ValueError, match="share B, H, W"):
        net(image, flow[:, :, :-1])
    # Flow2Seg 4.3: a trained PSPNet initialises the image path.
    net.image.load_state_dict(model.PSPNet(K, "resnet18").state_dict())


@pytest.mark.parametrize("name", ["efc", "flow2seg"])
def test_training_forward_reaches_every_parameter(name):
    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 65, 65), torch.randn(1, 3, 65, 65)
    if name == "efc":
        net = model.EFCNet(K, "resnet18").train()
        out = net(a, b)
        tensors = [v for v in out.values() if torch.is_tensor(v)]
        tensors += [t for v in out.values() if isinstance(v, list) for t in v]  # flows, occlusions
    else:
        net = model.Flow2SegNet(K, "resnet18", "resnet18").train()
        tensors = list(net(a, torch.randn(1, 2, 65, 65)).values())
    sum(t.square().mean() for t in tensors).backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        # Behind the zero-initialised last fusion conv the gradient is exactly 0 at the start.
        if not n.startswith("fusion.blocks"):
            assert p.grad.abs().sum() > 0, n


def test_matching_features_are_unit_cosines_and_find_a_shift_that_raw_features_miss():
    torch.manual_seed(0)
    # non-negative features with a large shared offset, as after a ReLU: raw products favour the
    # brightest neighbour, the cosine the true match
    S = torch.rand(1, 32, 12, 12) + 3.0
    S[..., 6:, :] += 2.0 * torch.rand(1, 32, 6, 12)  # a brighter lower half
    shifted = torch.roll(S, shifts=1, dims=3)  # frame b: everything moved one pixel to the right
    m = model.matching_features(S)
    assert torch.allclose(m.norm(dim=1), torch.ones(1, 12, 12), atol=1e-5)
    assert torch.allclose(m.mean(1), torch.zeros(1, 12, 12), atol=1e-6)
    d = 2
    cosine = warp.correlation(m, model.matching_features(shifted), d, 1, normalize=False)  # (1, 25, 12, 12)
    best = cosine[..., 3:9, 3:9].argmax(1)  # interior pixels
    assert (best == 2 * 5 + 3).all()  # dy = 0, dx = +1 (k = iy * D + ix)
    assert cosine.max() <= 1 + 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_soft_argmax_flow_recovers_a_shift_of_random_features(stride):
    """matching_flow of features moved by (dx, dy) = (+2, -2) cells: the soft-argmax of the cosine
    correlation is that shift (u first, feature pixels) wherever the shift stays in the map."""
    torch.manual_seed(0)
    S1 = torch.randn(2, 64, 16, 20)
    S2 = torch.roll(S1, shifts=(-2, 2), dims=(2, 3))  # S2[p + (dy, dx)] = S1[p] with dy = -2, dx = +2
    decoder = model.FlowDecoder(64, 16, max_displacement=4, stride=stride)
    flow = decoder.matching_flow(S1, S2)  # (2, 2, 16, 20)
    assert flow.shape == (2, 2, 16, 20) and not flow.requires_grad
    inner = flow[..., 4:12, 2:14]  # pixels whose match and 3x3 neighbours' matches lie inside
    assert torch.allclose(inner[:, 0], torch.full_like(inner[:, 0], 2.0), atol=1e-3)
    assert torch.allclose(inner[:, 1], torch.full_like(inner[:, 1], -2.0), atol=1e-3)
    # a flat cost volume votes for the mean displacement, zero; a wrong channel count is refused
    D2 = (2 * (4 // stride) + 1) ** 2
    assert model.soft_argmax_flow(torch.zeros(1, D2, 3, 3), 4, stride).abs().max() < 1e-6
    with pytest.raises(ValueError, match="channels"):
        model.soft_argmax_flow(torch.zeros(1, D2 + 1, 3, 3), 4, stride)


def test_forward_pair_returns_the_matching_flows_of_both_directions_on_request():
    torch.manual_seed(0)
    net = model.EFCNet(5, "resnet18", max_displacement=4, corr_stride=1).eval()
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net.forward_pair(a, b, segment=False, warmup=True)
        assert "match_ab" not in net.forward_pair(a, b, segment=False)
        assert out["match_ab"].shape == (1, 2, 8, 8)
        assert torch.allclose(out["match_ab"], net.flow.matching_flow(out["S_a"], out["S_b"]))
        assert torch.allclose(out["match_ba"], net.flow.matching_flow(out["S_b"], out["S_a"]))


def test_corr_layer_layer2_correlates_layer2_and_keeps_S_for_the_redirect_and_segmentation():
    """corr_layer 'layer2': the matching flow is that of the encoder's layer2 outputs (not S), while
    S_a / S_b (L_cons, segmentation) stay layer3's; an unknown layer is refused."""
    torch.manual_seed(0)
    net = model.EFCNet(5, "resnet18", max_displacement=4, corr_stride=1, corr_layer="layer2").eval()
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net.forward_pair(a, b, segment=False, warmup=True)
        f4, f8, S = net.seg.encode(torch.cat([a, b]), with_layer2=True)
        assert f8.shape == (2, 128, 8, 8) and torch.equal(out["S_a"], S[:1])
        assert torch.allclose(out["match_ab"], net.flow.matching_flow(f8[:1], f8[1:]))
        assert not torch.allclose(out["match_ab"], net.flow.matching_flow(S[:1], S[1:]))
    both = model.EFCNet(5, "resnet18", max_displacement=4, corr_stride=1, corr_layer="layer2+3").eval()
    both.load_state_dict(net.state_dict())
    with torch.no_grad():
        M = torch.cat([model.matching_features(f8), model.matching_features(S)], 1)
        c2, c3, c23 = (both.flow.correlate(X[:1], X[1:]) for X in (f8, S, M))
        assert torch.allclose(c23, (c2 + c3) / 2, atol=1e-5)  # each cosine the mean of the two maps'
        assert torch.allclose(both.forward_pair(a, b, segment=False, warmup=True)["match_ab"],
                              both.flow.matching_flow(M[:1], M[1:]))
    with pytest.raises(ValueError, match="corr_layer"):
        model.EFCNet(5, "resnet18", corr_layer="layer1")


def test_soft_argmax_peak_tells_a_clear_match_from_a_flat_cost_volume():
    D2 = 9 * 9
    flat = torch.zeros(1, D2, 2, 2)
    sharp = torch.full((1, D2, 2, 2), -1.0)
    sharp[:, 40] = 1.0  # the zero displacement, alone at cosine 1
    _, peak_flat = model.soft_argmax_flow(flat, 4, 1, with_peak=True)
    flow, peak_sharp = model.soft_argmax_flow(sharp, 4, 1, with_peak=True)
    assert torch.allclose(peak_flat, torch.full_like(peak_flat, 1 / D2))
    assert torch.allclose(peak_sharp, torch.ones_like(peak_sharp)) and flow.abs().max() < 1e-6


def test_match_input_gives_the_stride8_layers_the_soft_argmax_in_flownet_units():
    """match_input: conv3_1 and predict_flow3 read 3 more channels, the cost volume's soft-argmax
    flow in FlowNet units (full-resolution pixels / FLOW_DIV) and its peak weight."""
    torch.manual_seed(0)
    decoder = model.FlowDecoder(64, 16, max_displacement=4, stride=1, match_input=True)
    S1 = torch.randn(1, 64, 8, 12)
    S2 = torch.roll(S1, shifts=2, dims=3)  # everything 2 feature pixels to the right
    seen = {}
    decoder.conv3_1.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    decoder.predict_flow3.register_forward_hook(lambda m, i, o: seen.update(c3=i[0]))
    with torch.no_grad():
        decoder(S1, S2, torch.randn(1, 16, 16, 24), (64, 96))
    assert seen["x"].shape[1] == 81 + 32 + 3 and torch.equal(seen["x"][:, -3:], seen["c3"][:, -3:])
    u = seen["x"][0, -3, 3:5, 4:8]  # interior: 2 feature pixels = 16 image pixels = 0.8 FlowNet units
    assert torch.allclose(u, torch.full_like(u, 2 * 8 / model.FLOW_DIV), atol=1e-3)
    assert seen["x"][0, -1, 3:5, 4:8].min() > 0.9  # random features: one clear match


def test_pass_through_init_hands_the_cost_volumes_answer_down_to_stride_4():
    """pass_through + match_input: an untrained decoder already outputs the soft-argmax shift at
    strides 8 and 4 (2 stride-8 cells = 4 stride-4 pixels); FlowNet's init outputs about zero. The
    bilinear upsampling keeps a constant flow constant."""
    torch.manual_seed(0)
    S1 = torch.randn(1, 64, 8, 12)
    S2 = torch.roll(S1, shifts=2, dims=3)  # everything 2 feature pixels to the right
    f4 = torch.randn(1, 16, 16, 24)
    with torch.no_grad():
        plain = model.FlowDecoder(64, 16, 4, 1, match_input=True)(S1, S2, f4, (64, 96))[0]
        passed = model.FlowDecoder(64, 16, 4, 1, match_input=True, pass_through=True)(S1, S2, f4, (64, 96))[0]
        up = model.FlowDecoder(64, 16, 4, 1, pass_through=True).upsampled_flow3_to_2(torch.full((1, 2, 5, 5), 3.0))
    assert plain[0][0, 0].abs().max() < 0.5
    u8, u4 = passed[1][0, 0, 3:5, 4:8], passed[0][0, 0, 6:10, 8:16]  # interior cells
    assert (u8 - 2.0).abs().max() < 0.3 and (u4 - 4.0).abs().max() < 0.5
    assert passed[0][0, 1, 6:10, 8:16].abs().max() < 0.5  # no vertical motion
    assert torch.allclose(up[..., 1:-1, 1:-1], torch.full_like(up[..., 1:-1, 1:-1], 3.0))


def test_fine_match_adds_the_stride4_residual_the_coarse_match_cannot_see():
    """fine_match: the stride-8 features do not move (coarse match 0), the second frame's layer1
    features are the first's moved 2 px right and 1 px down on the stride-4 grid. An untrained
    pass-through decoder outputs that motion at stride 4 (and 0 at stride 8); without fine_match it
    outputs 0; matching_flow (the warm-up's target) says the same; R must cover the motion."""
    torch.manual_seed(0)
    S = torch.randn(1, 64, 8, 12)
    f4 = torch.randn(1, 16, 16, 24)
    f4_2 = torch.roll(f4, shifts=(1, 2), dims=(2, 3))
    with torch.no_grad():
        fine = model.FlowDecoder(64, 16, 4, 1, match_input=True, pass_through=True, fine_match=2)
        coarse = model.FlowDecoder(64, 16, 4, 1, match_input=True, pass_through=True)
        flows = fine(S, S, f4, (64, 96), f4_2=f4_2)[0]
        plain = coarse(S, S, f4, (64, 96))[0]
        target = fine.matching_flow(S, S, f4, f4_2)
    inner = (slice(None), slice(None), slice(3, 13), slice(3, 21))  # away from the rolled borders
    motion = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1)
    assert target.shape == (1, 2, 16, 24) and torch.allclose(target[inner], motion.expand_as(target[inner]), atol=0.01)
    error = (flows[0][inner] - motion).abs()  # what the untrained layers add: small, without bias
    assert error.mean() < 0.1 and error.max() < 0.6
    assert flows[1].abs().max() < 0.3 and (plain[0][inner] - motion).abs().mean() > 0.9
    with pytest.raises(ValueError, match="needs f4_2"):
        fine(S, S, f4, (64, 96))


# ---------------------------------------------------------------------------------------------
# Flow2Seg Table 2's context modules on the flow path, Table 3's image-only FCN
# ---------------------------------------------------------------------------------------------
def conv_params(c_in, c_out, k, bias=False):
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_aspp_has_deeplabv3s_branches_rates_and_parameters():
    torch.manual_seed(0)
    aspp = model.ASPP(16, 4).eval()
    convs = [branch[0] for branch in aspp.branches]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [c.dilation for c in convs] == [(1, 1), (12, 12), (24, 24), (36, 36)]  # DeepLabv3 at output stride 8
    assert [c.padding for c in convs] == [(0, 0), (12, 12), (24, 24), (36, 36)]  # sizes kept
    # by hand: 1x1 + BN, three 3x3 + BN, image pooling (1x1 with bias, no BN), 1x1 projection of 5 x 4 + BN
    by_hand = (conv_params(16, 4, 1) + 8 + 3 * (conv_params(16, 4, 3) + 8) + conv_params(16, 4, 1, bias=True)
               + conv_params(5 * 4, 4, 1) + 8)
    assert by_hand == 1980 and sum(p.numel() for p in aspp.parameters()) == by_hand
    x = torch.randn(2, 16, 12, 13)
    with torch.no_grad():
        assert aspp(x).shape == (2, 4, 12, 13) and aspp.out_channels == 4
        pooled = aspp.image_pool(x)  # (2, 4, 1, 1): one value per image and channel
        assert torch.allclose(pooled, torch.relu(aspp.image_pool[1](x.mean((2, 3), keepdim=True))))
        # On a 12x13 map, rate 24's off-centre taps all fall in the padding: the branch is its centre tap,
        # a 1x1 conv (docs/networks.md); rate 12 still reaches across the 13 columns, so it is not.
        for index, degenerate in ((2, True), (1, False)):
            conv = aspp.branches[index][0]
            centre = torch.nn.functional.conv2d(x, conv.weight[:, :, 1:2, 1:2])
            assert torch.allclose(conv(x), centre, atol=1e-5) == degenerate


def test_denseaspp_layers_read_the_dense_concatenation():
    torch.manual_seed(0)
    dense = model.DenseASPP(16, 8, 4).eval()
    bottlenecks = [layer[0][0] for layer in dense.layers]
    atrous = [layer[1][0] for layer in dense.layers]
    assert [c.in_channels for c in bottlenecks] == [16, 20, 24, 28, 32]  # C_in + l * growth
    assert [c.out_channels for c in bottlenecks] == [8] * 5 and [c.kernel_size for c in bottlenecks] == [(1, 1)] * 5
    assert [c.dilation for c in atrous] == [(d, d) for d in (3, 6, 12, 18, 24)] and dense.out_channels == 36
    # by hand: per layer a 1x1 conv (16 + 4l -> 8) + BN and a 3x3 conv (8 -> 4) + BN
    by_hand = sum(conv_params(16 + 4 * l, 8, 1) + 16 + conv_params(8, 4, 3) + 8 for l in range(5))
    assert by_hand == 2520 and sum(p.numel() for p in dense.parameters()) == by_hand
    x = torch.randn(2, 16, 11, 9)
    with torch.no_grad():
        out = dense(x)
        assert out.shape == (2, 36, 11, 9)
        assert torch.equal(out[:, :16], x)  # the input passes through
        first = dense.layers[0](x)  # (2, 4, 11, 9)
        assert torch.equal(out[:, 16:20], first)
        assert torch.equal(out[:, 20:24], dense.layers[1](torch.cat([x, first], 1)))  # reads input and layer 0


@pytest.mark.parametrize("context,channels", [("fcn", 512), ("aspp", 64), ("denseaspp", 512 + 5 * 64),
                                              ("psp", 2 * 512)])
def test_flow2seg_flow_path_context_modules(context, channels):
    torch.manual_seed(0)
    net = model.Flow2SegNet(K, "resnet18", "resnet18", flow_context=context).eval()
    seen = []
    net.flow_head.register_forward_hook(lambda m, inputs, output: seen.append((inputs[0].shape, output.shape)))
    image, flow = torch.randn(1, 3, 65, 65), torch.randn(1, 2, 65, 65)
    with torch.no_grad():
        out = net(image, flow)
    assert seen == [((1, channels, 9, 9), (1, K, 9, 9))]  # stride 8, K classes
    assert out["flow_logits"].shape == (1, K, 65, 65) and torch.equal(out["logits"], out["image_logits"])
    assert net.flow_head[0][0].out_channels == 512 // 4  # the FCN head, c4 / 4 for every context
    expected = {"fcn": torch.nn.Identity, "aspp": model.ASPP, "denseaspp": model.DenseASPP,
                "psp": model.PyramidPooling}[context]
    assert type(net.flow_context) is expected
    # Widths scaled to ResNet-18's 512 channels: ASPP 512 / 8; DenseASPP 512 / 4 and 512 / 8; PSP 512 / 4 per bin.
    params = sum(p.numel() for p in net.flow_context.parameters())
    assert params == {"fcn": 0, "aspp": 971_456, "denseaspp": 780_160, "psp": 263_040}[context]
    if context == "fcn":  # today's network, unchanged: old checkpoints load
        assert not any(k.startswith("flow_context.") for k in net.state_dict())


def test_image_only_fcn_is_the_pspnet_without_its_pyramid():
    torch.manual_seed(0)
    psp = model.PSPNet(K, "resnet18")
    torch.manual_seed(0)
    fcn = model.PSPNet(K, "resnet18", context="fcn")
    assert not any(isinstance(m, model.PyramidPooling) for m in fcn.modules())
    assert isinstance(fcn.ppm, torch.nn.Identity) and fcn.head[0][0].in_channels == 512
    assert psp.head[0][0].in_channels == 1024 and fcn.head[0][0].out_channels == psp.head[0][0].out_channels == 512
    assert fcn.aux_head[0][0].in_channels == 256  # the auxiliary head stays
    # What the PPM brings, by hand: 4 branches of 512 -> 128 (bin 1 with a bias, the others with BN),
    # and the head's 3x3 conv reading 1024 instead of 512 channels.
    ppm = conv_params(512, 128, 1, bias=True) + 3 * (conv_params(512, 128, 1) + 256)
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(psp) - count(fcn) == ppm + conv_params(512, 512, 3) == 2_622_336
    assert torch.equal(fcn.backbone.conv1.weight, psp.backbone.conv1.weight)  # same backbone, same start
    fcn.train()
    with torch.no_grad():
        out = fcn(torch.randn(2, 3, 65, 65))
    assert out["logits"].shape == out["aux"].shape == (2, K, 65, 65)
    fcn.eval()
    image = torch.randn(1, 3, 65, 65)
    with torch.no_grad():  # the head reads layer4 directly
        direct = fcn.head(fcn.backbone.layer4(fcn.encode(image)[1]))
        assert torch.equal(fcn.decode(fcn.encode(image)[1])["logits"], direct)
    with pytest.raises(ValueError, match="context"):
        model.PSPNet(K, "resnet18", context="aspp")


def test_build_model_takes_each_context_only_where_it_means_something():
    with torch.device("meta"):
        assert isinstance(model.build_model("psp", K, "resnet18", context="fcn").ppm, torch.nn.Identity)
        net = model.build_model("flow2seg", K, "resnet18", "resnet18", flow_context="denseaspp")
        assert isinstance(net.flow_context, model.DenseASPP)
    for method, kwargs in (("efc", {"context": "fcn"}), ("flow2seg", {"context": "fcn"}),
                           ("psp", {"flow_context": "aspp"}), ("flow", {"flow_context": "psp"})):
        with pytest.raises(ValueError, match="context"):
            model.build_model(method, K, "resnet18", **kwargs)
    with pytest.raises(ValueError, match="flow context"):
        model.context_module("nonlocal", 512)


def test_cost_volume_raw_is_flownetc_correlation_over_C_and_cosine_correlates_unit_features():
    torch.manual_seed(0)
    S1, S2 = torch.randn(2, 64, 9, 11) * 3, torch.randn(2, 64, 9, 11) * 3
    raw = model.FlowDecoder(64, 16, max_displacement=4, stride=2, cost_volume="raw")
    cosine = model.FlowDecoder(64, 16, max_displacement=4, stride=2)
    assert torch.allclose(raw.correlate(S1, S2), warp.correlation(S1, S2, 4, 2, normalize=True), atol=1e-5)
    expected = warp.correlation(model.matching_features(S1), model.matching_features(S2), 4, 2, normalize=False)
    assert torch.allclose(cosine.correlate(S1, S2), expected, atol=1e-6)
    assert cosine.correlate(S1, S2).abs().max() <= 1 + 1e-5 < raw.correlate(S1, S2).abs().max()  # not the same volume
    net = model.build_model("efc", 5, "resnet18", max_displacement=4, corr_stride=1, cost_volume="raw")
    assert net.flow.cost_volume == "raw"
    with pytest.raises(ValueError, match="cost_volume must be one of"):
        model.FlowDecoder(64, 16, cost_volume="dot")
