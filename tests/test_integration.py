"""The networks of model.py feed the losses of losses.py: the dict contract, gradients, a descent step."""
import torch

import losses
from model import EFCNet, Flow2SegNet


def pair_batch(B=2, K=5, H=65, W=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (B, H, W), generator=g)
    labels[:, :5] = 255
    return {"image_a": torch.randn(B, 3, H, W, generator=g), "image_b": torch.randn(B, 3, H, W, generator=g),
            "label_a": labels, "label_b": torch.full((B, H, W), 255, dtype=torch.int64)}


def test_efcnet_outputs_feed_efc_loss_and_every_parameter_learns():
    torch.manual_seed(0)
    net = EFCNet(5, "resnet18").train()
    batch = pair_batch()
    total, terms = losses.efc_loss(net(batch["image_a"], batch["image_b"]), batch)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    assert all(terms[name] > 0 for name in ("seg", "cons", "sm", "pm"))
    total.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # at 65x97 the grids of strides 16, 32, 64 (5x7, 3x4, 2x2) are below losses.MIN_GRID: their
    # occlusion heads get no loss; their flows still feed the finer predictions, so they learn
    assert sorted({n.split(".")[1] for n in missing}) == ["occ4", "occ5", "occ6"], missing


def test_flow_only_training_skips_segmentation():
    net = EFCNet(5, "resnet18").train()
    batch = pair_batch()
    out = net(batch["image_a"], batch["image_b"], segment=False)
    total, terms = losses.efc_loss(out, batch, flow_only=True)
    total.backward()
    assert terms["seg"] == 0 and terms["cons"] == 0
    assert net.flow.predict_flow2.weight.grad.abs().sum() > 0
    assert net.seg.head[0][0].weight.grad is None  # the PSP head was not run


def test_a_few_sgd_steps_lower_the_efc_and_flow2seg_losses():
    torch.manual_seed(1)
    batch = pair_batch(B=2, H=49, W=65)
    efc = EFCNet(5, "resnet18").train()
    f2s = Flow2SegNet(5, "resnet18", "resnet18").train()
    flow = 3 * torch.randn(2, 2, 49, 65)
    for net, step in ((efc, lambda: losses.efc_loss(efc(batch["image_a"], batch["image_b"]), batch)[0]),
                      (f2s, lambda: losses.flow2seg_loss(f2s(batch["image_a"], flow), batch["label_a"])[0])):
        # Dropout off so that the losses of successive steps are comparable.
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        # Adam, as FlowNet is trained: plain SGD at the papers' lr 0.01 moves an untrained flow
        # decoder by hundreds of pixels in one step (measured).
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        history = []
        for _ in range(6):
            optimizer.zero_grad()
            loss = step()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        assert history[-1] < history[0], history
