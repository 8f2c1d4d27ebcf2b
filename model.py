"""The networks of both papers: ResNet backbones, PSPNet, EFC's joint segmentation-and-flow network
and Flow2Seg's image + flow network, plus a parameter/FLOP summary.

Covers
  Flow2Seg 3.1  dilated ResNet (output stride 8); 2-channel ResNet-18 for flow; FCN head
                                                                -> resnet, load_pretrained, fcn_head
  Flow2Seg 3.1, Table 2  the flow path's context modules: DeepLabv3's ASPP, DenseASPP, pyramid
                pooling                                          -> ASPP, DenseASPP, context_module
  Flow2Seg 3.2  Image2Seg = PSPNet: pyramid pooling, auxiliary head  -> PyramidPooling, PSPNet
  Flow2Seg Table 3  "ResNet101-FCN": PSPNet without its pyramid  -> PSPNet(context="fcn")
  Flow2Seg 3.3  residual fusion                                  -> ResidualFusion, Flow2SegNet
  EFC "Framework Overview": shared encoder = ResNet layers 1-3, segmentation decoder = layer 4 +
                PSP head, flow decoder on the features of both frames -> EFCNet
  EFC "Implementation Details": FlowNetS modified to share the encoder, with a FlowNetC correlation
                and two 3x3 occlusion convs (32, 1 channels)     -> FlowDecoder
  Not in the papers: the cost volume's own flow estimate, the target of the flow warm-up
                (train.py --flow-warmup)                          -> soft_argmax_flow, FlowDecoder.matching_flow
  `summary` and the command line (`python model.py --net efc --backbone resnet101 --size 713 713`)
  print parameters and FLOPs per module.

Conventions (see warp.py): images arrive normalised with the ImageNet mean/std (data.normalize);
nothing here re-normalises. A flow is (B, 2, H, W), u (x, right) first, v (y, down) second, in
pixels of its own grid. Occlusion 1 = occluded. Every network's forward returns a dict.
"H/4", "H/8", ... in shape comments mean the grid of that stride; each stride-2 layer rounds up
(97 -> 49 -> 25 -> 13 -> 7 -> 4 -> 2).
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import warp

# FlowNet trains on flow / 20 (Dosovitskiy et al. 2015), which keeps targets and predictions O(1).
# Our flow decoder predicts in these units at every scale; Flow2Seg feeds flow / 20 to its flow path.
FLOW_DIV = 20.0
FLOW_INPUT_SCALE = 1.0 / FLOW_DIV


def upsample(x, size):
    """Bilinear resize of logits or features to `size`. Everywhere in this file: align_corners=False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def check_input(x, channels, name):
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")


def init_weights(module):
    """torchvision's ResNet initialisation, used for every module here (the papers are silent):
    convs kaiming-normal (fan_out, ReLU gain), biases 0, BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ResNet (He et al. 2016) with torchvision's parameter names, so that torchvision's ImageNet files
# load unchanged. The stem is torchvision's (one 7x7 conv), not the three 3x3 convs of semseg's
# "deep stem" PSPNet: the deep-stem weights are not torchvision's ImageNet weights.
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1  # output channels = planes * expansion

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        # A dilated BasicBlock dilates both of its 3x3 convs; padding = dilation keeps the size.
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        # torchvision's "ResNet v1.5": the stride sits on the 3x3 conv, not on the first 1x1.
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


RESNET_LAYOUT = {  # depth -> (block, blocks in layer1..layer4), He et al. 2016 Table 1
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def make_layer(block, in_channels, planes, blocks, stride, dilation):
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:  # the shortcut must match the block's output
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    layers = [block(in_channels, planes, stride, dilation, downsample)]
    layers += [block(out_channels, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """conv1, bn1, relu, maxpool, layer1..layer4; no fc. forward(x) returns layer4's output."""

    def __init__(self, block, blocks, dilated=True, in_channels=3):
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        # Flow2Seg 3.1 / PSPNet: stride 1 in layer3 and layer4 with dilation 2 and 4 -> output
        # stride 8. As in semseg, *every* block of layer3 has dilation 2 and every block of
        # layer4 dilation 4 (torchvision's replace_stride_with_dilation keeps the first block of
        # each at the previous dilation; the parameters are the same either way).
        strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if dilated else ((1, 2, 2, 2), (1, 1, 1, 1))
        self.layer_channels = tuple(w * block.expansion for w in widths)  # outputs of layer1..layer4
        inputs = (64,) + self.layer_channels[:3]
        self.layer1 = make_layer(block, inputs[0], widths[0], blocks[0], strides[0], dilations[0])
        self.layer2 = make_layer(block, inputs[1], widths[1], blocks[1], strides[1], dilations[1])
        self.layer3 = make_layer(block, inputs[2], widths[2], blocks[2], strides[2], dilations[2])
        self.layer4 = make_layer(block, inputs[3], widths[3], blocks[3], strides[3], dilations[3])
        init_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, C2, H/8, W/8)
        return self.layer4(self.layer3(x))  # (B, C4, H/8, W/8) dilated, else (B, C4, H/32, W/32)


def resnet(depth, dilated=True, in_channels=3):
    if depth not in RESNET_LAYOUT:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUT)}, got {depth}")
    block, blocks = RESNET_LAYOUT[depth]
    return ResNet(block, blocks, dilated, in_channels)


def backbone_depth(name):
    """'resnet50' -> 50."""
    depths = {f"resnet{d}": d for d in RESNET_LAYOUT}
    if name not in depths:
        raise ValueError(f"backbone must be one of {sorted(depths)}, got {name!r}")
    return depths[name]


# Where each method's image backbone sits in its state dict (build_model's networks).
CHECKPOINT_BACKBONE = {"psp": "backbone.", "flow2seg": "image.backbone.", "efc": "seg.backbone.",
                       "flow": "seg.backbone."}


def load_pretrained(backbone, path):
    """Load an ImageNet ResNet state-dict file from disk into `backbone` (a ResNet); nothing is downloaded.

    Accepts a raw state dict or a dict with 'state_dict'; strips a leading 'module.' (DataParallel)
    and ignores 'fc.*'. A checkpoint of this project's train.py (a dict with 'method', 'config' and
    'model') gives its image backbone, the ResNet under the segmentation head (replicate.py starts
    every row from the backbone of a PSPNet trained on the synthetic world, as the papers start from
    ImageNet's). Strict on every other key and shape. For in_channels != 3, conv1's filter for
    each input channel is the mean of its RGB filters (Flow2Seg 3.1). Returns a one-line report.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"pretrained weights {path}: torch.load cannot read it ({error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    elif isinstance(state, dict) and {"method", "config", "model"} <= set(state):
        prefix = CHECKPOINT_BACKBONE.get(state["method"])
        if prefix is None:
            raise ValueError(f"pretrained weights {path}: a train.py checkpoint of unknown method {state['method']!r}")
        state = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained weights {path}: expected a state dict (name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    ignored = sorted(k for k in state if k.startswith("fc."))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    conv1 = state.get("conv1.weight")
    averaged = conv1 is not None and conv1.shape[1] == 3 and backbone.in_channels != 3
    if averaged:  # (64, 3, 7, 7) -> (64, in_channels, 7, 7), every channel the RGB mean
        state["conv1.weight"] = conv1.mean(1, keepdim=True).expand_as(own["conv1.weight"])
    # num_batches_tracked is BatchNorm's step counter, not a weight; files saved before
    # PyTorch 0.4.1 (torchvision's original ResNet files) do not have it.
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"pretrained weights {path} do not fit the backbone: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
                         f"{len(mismatched)} shape mismatches (file vs model) {mismatched[:5]}")
    own.update(state)
    backbone.load_state_dict(own)
    return (f"{path}: loaded {len(state)} tensors, ignored {ignored}"
            + (f", conv1 = RGB mean for {backbone.in_channels} input channels" if averaged else ""))


# ---------------------------------------------------------------------------------------------
# Segmentation heads
# ---------------------------------------------------------------------------------------------
def conv_bn_relu(in_channels, out_channels, kernel_size, dilation=1):
    # padding = dilation * (k // 2) keeps h and w for an odd kernel k at any dilation
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                                   dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def fcn_head(in_channels, mid_channels, num_classes, dropout=0.1):
    """3x3 conv + BN + ReLU, dropout, 1x1 classifier: PSPNet's final and auxiliary heads and
    Flow2Seg's FCN head. Dropout is elementwise (nn.Dropout) as in the Caffe PSPNet."""
    head = nn.Sequential(conv_bn_relu(in_channels, mid_channels, 3), nn.Dropout(dropout),
                         nn.Conv2d(mid_channels, num_classes, 1))
    init_weights(head)
    # The classifier starts small (normal, std 0.01, as mmsegmentation's heads): kaiming fan_out
    # init gives logits of std ~10, an initial cross-entropy of ~10 instead of log K, and a first
    # SGD step that throws the network far off (measured on the synthetic world).
    nn.init.normal_(head[-1].weight, std=0.01)
    return head


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling (Zhao et al. 2017; Flow2Seg 3.2): average-pool to b x b for each
    bin b, reduce to C_in / len(bins) channels, upsample back, concatenate with the input."""

    def __init__(self, in_channels, bins=(1, 2, 3, 6)):
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList()
        for b in bins:
            if b == 1:
                # One pooled pixel per image: training-mode BN would normalise over B values per
                # channel (an error at batch 1, noise at small batches), so this branch has a
                # conv bias and no BatchNorm.
                layers = [nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch_channels, 1), nn.ReLU()]
            else:
                layers = [nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                          nn.BatchNorm2d(branch_channels), nn.ReLU()]
            self.branches.append(nn.Sequential(*layers))
        self.out_channels = in_channels + len(bins) * branch_channels

    def forward(self, x):
        pooled = [upsample(branch(x), x.shape[-2:]) for branch in self.branches]  # each (B, C_in/len(bins), h, w)
        return torch.cat([x] + pooled, 1)  # (B, out_channels, h, w)


class ASPP(nn.Module):
    """DeepLabv3's atrous spatial pyramid pooling (Chen et al. 2017, Flow2Seg's [4]; a context module
    of Flow2Seg Table 2): five parallel branches on the backbone output, each to `channels` with BN and
    ReLU: a 1x1 conv, three 3x3 convs at dilations `rates`, and image pooling (global mean, 1x1 conv,
    upsampled); concatenated (5 x channels) and projected by a 1x1 conv + BN + ReLU to `channels`.

    Rates (12, 24, 36): DeepLabv3 uses (6, 12, 18) at output stride 16 and doubles them at output
    stride 8, the stride of our flow path; Flow2Seg gives none. Where the feature map is no larger than
    a rate in height and width (the quick recipe's 96x96 crop is 12x12 at stride 8), every off-centre
    tap of that branch falls in the zero padding and the branch is a 1x1 conv: DeepLabv3's reason for
    adding image pooling.
    The image-pooling branch has one pixel per image: a conv bias and no BatchNorm, as PyramidPooling's
    bin 1 (DeepLabv3 has BN there, at batch 16). No dropout after the projection (the head has its own).
    """

    def __init__(self, in_channels, channels, rates=(12, 24, 36)):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, channels, 1)]
                                      + [conv_bn_relu(in_channels, channels, 3, rate) for rate in self.rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU())
        self.project = conv_bn_relu((len(self.rates) + 2) * channels, channels, 1)
        self.out_channels = channels
        init_weights(self)

    def forward(self, x):
        pooled = upsample(self.image_pool(x), x.shape[-2:])  # (B, channels, h, w), one value per image
        branches = [branch(x) for branch in self.branches] + [pooled]  # 5 x (B, channels, h, w)
        return self.project(torch.cat(branches, 1))  # (B, 5 * channels, h, w) -> (B, channels, h, w)


class DenseASPP(nn.Module):
    """DenseASPP (Yang et al. CVPR 2018, Flow2Seg's [36]; a context module of Flow2Seg Table 2): atrous
    layers at dilations `rates` in a cascade, densely connected: layer l reads the input and every
    earlier layer's output, concatenated (C_in + l * growth channels), reduces them with a 1x1 conv
    to `bottleneck` channels and adds `growth` channels with a 3x3 conv at its dilation. The output is
    all of it concatenated: C_in + len(rates) * growth channels.

    As in DenseASPP's code, with one difference: its layers are pre-activation (BN, ReLU, conv; the
    DenseNet style) with dropout 0.1 each; ours are conv + BN + ReLU like every head here (their
    input, ResNet's layer4, is post-ReLU already), without dropout (the head has its own).
    """

    def __init__(self, in_channels, bottleneck, growth, rates=(3, 6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(rates)
        self.layers = nn.ModuleList()
        for l, rate in enumerate(self.rates):
            self.layers.append(nn.Sequential(conv_bn_relu(in_channels + l * growth, bottleneck, 1),
                                             conv_bn_relu(bottleneck, growth, 3, rate)))
        self.out_channels = in_channels + len(self.rates) * growth
        init_weights(self)

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)  # (B, C_in + (l + 1) * growth, h, w)
        return x  # (B, out_channels, h, w)


FLOW_CONTEXTS = ("fcn", "aspp", "denseaspp", "psp")


def context_module(name, channels):
    """Flow2Seg 3.1 and Table 2: the context module between the flow backbone's output (B, channels,
    h, w) and the FCN head -> (module, its output channels). 'fcn' is none (the paper's choice)."""
    # Widths: the papers give none for the flow path; each module keeps its own paper's ratio to its input:
    # ASPP channels/8 (DeepLabv3: 256 on 2048), DenseASPP bottleneck channels/4 and growth channels/8
    # (DenseASPP-121: 128 and 64 on 512), PSP channels/4 per bin (PSPNet). On ResNet-18 (512): 64; 128, 64; 128.
    if name == "fcn":
        return nn.Identity(), channels
    if name == "aspp":
        module = ASPP(channels, channels // 8)
    elif name == "denseaspp":
        module = DenseASPP(channels, channels // 4, channels // 8)
    elif name == "psp":
        module = PyramidPooling(channels)
        init_weights(module)
    else:
        raise ValueError(f"flow context must be one of {FLOW_CONTEXTS}, got {name!r}")
    return module, module.out_channels


class PSPNet(nn.Module):
    """PSPNet (Zhao et al. 2017) on a dilated ResNet: the image-only baseline of both papers,
    Flow2Seg's Image2Seg path (3.2) and EFC's segmentation branch.

    context "fcn" builds Flow2Seg Table 3's "ResNet101-FCN" instead: the same network without its
    pyramid pooling (self.ppm passes layer4 through), with the same head width and auxiliary head,
    so that it and the PSPNet differ in the context module alone."""

    def __init__(self, num_classes, backbone="resnet50", bins=(1, 2, 3, 6), mid_channels=512,
                 aux_channels=256, dropout=0.1, context="psp"):
        super().__init__()
        if context not in ("psp", "fcn"):
            raise ValueError(f"PSPNet context must be 'psp' or 'fcn', got {context!r}")
        self.backbone = resnet(backbone_depth(backbone), dilated=True)
        c1, _, c3, c4 = self.backbone.layer_channels
        self.skip_channels, self.enc_channels = c1, c3  # layer1 (stride 4) and layer3 (stride 8, S)
        self.ppm = PyramidPooling(c4, bins) if context == "psp" else nn.Identity()
        head_channels = self.ppm.out_channels if context == "psp" else c4  # 2 * C4 with the pyramid, else C4
        # The PSPNet paper fuses the pyramid with a 3x3 conv to 512 (Flow2Seg 3.2 writes "1x1"); 3x3 here.
        self.head = fcn_head(head_channels, mid_channels, num_classes, dropout)
        # Auxiliary head on layer3 ("stage 4", Flow2Seg 3.2), used by the loss in training only.
        self.aux_head = fcn_head(c3, aux_channels, num_classes, dropout)
        init_weights(self.ppm)

    def encode(self, image, with_layer2=False):
        """image (B, 3, H, W) -> f4 (B, C1, H/4, W/4) layer1 output, S (B, C3, H/8, W/8) layer3 output.
        S is EFC's shared-encoder feature map (layers 1-3, "Framework Overview"). with_layer2=True
        returns (f4, f8, S), f8 (B, C2, H/8, W/8) the layer2 output (what EFCNet may correlate)."""
        check_input(image, 3, "image")
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(image))))  # (B, 64, H/4, W/4)
        f4 = b.layer1(x)  # (B, C1, H/4, W/4)
        f8 = b.layer2(f4)  # (B, C2, H/8, W/8)
        S = b.layer3(f8)  # (B, C3, H/8, W/8)
        return (f4, f8, S) if with_layer2 else (f4, S)

    def decode(self, S, size=None):
        """S (B, C3, H/8, W/8) -> {'logits', 'aux'} (B, K, size); size None keeps stride 8.
        aux is None in eval mode."""
        x = self.backbone.layer4(S)  # (B, C4, H/8, W/8): dilated, same grid as S
        logits = self.head(self.ppm(x))  # (B, 2 * C4 (FCN: C4), H/8, W/8) -> (B, K, H/8, W/8)
        aux = self.aux_head(S) if self.training else None  # (B, K, H/8, W/8)
        if size is not None:
            logits = upsample(logits, size)  # (B, K, H, W)
            aux = upsample(aux, size) if aux is not None else None
        return {"logits": logits, "aux": aux}

    def forward(self, image):
        return self.decode(self.encode(image)[1], image.shape[-2:])


# ---------------------------------------------------------------------------------------------
# EFC's flow decoder: FlowNetC's correlation and contracting path on the shared encoder's stride-8
# features, FlowNetS's refinement (Dosovitskiy et al. 2015), and an occlusion head at each scale.
# Plain conv + LeakyReLU(0.1), no BatchNorm, as in FlowNet.
# ---------------------------------------------------------------------------------------------
def conv_lrelu(in_channels, out_channels, kernel_size=3, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2),
                         nn.LeakyReLU(0.1))


def deconv_lrelu(in_channels, out_channels):  # 4x4 stride-2 transposed conv: doubles h and w
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(0.1))


def predict_flow(in_channels):  # raw flow in FlowNet units (see flow_to_pixels)
    return nn.Conv2d(in_channels, 2, 3, padding=1)


def occlusion_head(in_channels, mid_channels=32):
    """EFC "Implementation Details": two 3x3 convs with 32 and 1 channels -> O_est in (0, 1)."""
    return nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(mid_channels, 1, 3, padding=1), nn.Sigmoid())


def upsampled_flow():  # FlowNetS's learned 2 -> 2 upsampling of the coarser prediction
    return nn.ConvTranspose2d(2, 2, 4, 2, 1, bias=False)


def crop_like(x, target):
    """FlowNet's crop: a 2x upsampled map is >= the finer map since every stride-2 layer rounds up."""
    return x[:, :, :target.shape[2], :target.shape[3]]


def flow_to_pixels(raw, image_size):
    """FlowNet units (full-resolution pixels / FLOW_DIV) -> pixels of raw's own (h, w) grid:
    u = FLOW_DIV * raw_u * w / W, v = FLOW_DIV * raw_v * h / H. These are the ratios warp.resize_flow
    uses, so resize_flow(flow, (H, W)) gives FLOW_DIV * raw (upsampled) in image pixels."""
    H, W = image_size
    h, w = raw.shape[-2:]
    scale = raw.new_tensor([FLOW_DIV * w / W, FLOW_DIV * h / H]).view(1, 2, 1, 1)
    return raw * scale


def matching_features(S):
    """What the correlation compares: the shared encoder's features (B, C, h, w), centred over the
    channels and scaled to unit length at each pixel, so that their dot product is a cosine.

    Our choice where EFC is silent. FlowNetC correlates raw conv3 features, trained for flow alone;
    EFC's are the segmentation encoder's, after a ReLU: non-negative and smooth, so every
    displacement correlates about equally and the largest raw product is not the match (measured:
    docs/learning.md#choices-measured-on-the-world).
    """
    S = S - S.mean(1, keepdim=True)
    return S / S.norm(dim=1, keepdim=True).clamp(min=1e-6)


# Soft-argmax temperature of the matching flow (on cosines in [-1, 1]), with a 3x3 box smoothing: the
# lowest EPE of the values tried on the world (docs/learning.md#choices-measured-on-the-world).
MATCH_TEMPERATURE = 0.02


def soft_argmax_flow(corr, max_displacement, stride, temperature=MATCH_TEMPERATURE, with_peak=False):
    """The flow a cost volume itself votes for: (B, D*D, h, w) cosine correlations, channels in
    warp.correlation's order (dy major, dx minor, each from -max_displacement to +max_displacement
    in steps of stride) -> (B, 2, h, w), u first, in pixels of the correlation's grid: the
    softmax(corr / T)-weighted mean displacement, then a 3x3 box mean (replicate border) that
    averages out single-cell mistakes. No parameters and no labels: classical block matching.
    with_peak=True also returns the largest softmax weight (B, 1, h, w) in (0, 1]: how sure the
    cost volume is (near 1: one clear match; near 1/D^2: no match stands out).
    """
    d = torch.arange(-max_displacement, max_displacement + 1, stride, dtype=corr.dtype, device=corr.device)
    D = len(d)
    if corr.shape[1] != D * D:
        raise ValueError(f"soft_argmax_flow: corr has {corr.shape[1]} channels, expected {D * D} for "
                         f"max_displacement {max_displacement} and stride {stride}")
    p = (corr / temperature).softmax(1).view(corr.shape[0], D, D, *corr.shape[2:])  # (B, dy, dx, h, w)
    u = (p.sum(1) * d.view(1, D, 1, 1)).sum(1)  # (B, h, w), marginal over dy, mean dx
    v = (p.sum(2) * d.view(1, D, 1, 1)).sum(1)  # (B, h, w), marginal over dx, mean dy
    flow = F.avg_pool2d(F.pad(torch.stack([u, v], 1), (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # (B, 2, h, w)
    if with_peak:
        return flow, p.flatten(1, 2).amax(1, keepdim=True)
    return flow


class FlowDecoder(nn.Module):
    """Flow and occlusion of the first frame towards the second, from shared-encoder features.

    forward(S1, S2, f4, image_size, M1=None, M2=None): S1, S2 (B, C_S, H/8, W/8) layer3 features of
    the first and second frame, f4 (B, C_skip, H/4, W/4) layer1 features of the first frame,
    image_size (H, W); M1, M2 (B, C_M, H/8, W/8) the features the correlation compares (None: S1, S2;
    EFCNet passes layer2's with corr_layer "layer2"). The redirect always reads S1.
    Returns flows, occlusions: lists of 5 tensors, finest first (strides 4, 8, 16, 32, 64);
    flows (B, 2, h_l, w_l) in pixels of their own grid; occlusions (B, 1, h_l, w_l) probabilities.

    match_input=True (not in FlowNet or EFC; train.py --match-input) also gives the stride-8 layers
    conv3_1 and predict_flow3 the cost volume's own answer: its soft-argmax flow (FlowNet units) and
    peak weight, 3 channels. Why: from the correlation to flow3 FlowNetC has two convs and one
    LeakyReLU, too shallow to find a peak among D^2 cosines; the deep path that can is at strides
    16-64, where a car is one or two cells. Measured in docs/moving-cars.md.

    fine_match=R > 0 (not in FlowNet or EFC; train.py --fine-match) gives predict_flow2 a second,
    stride-4 match: the second frame's layer1 features (f4_2) warped by the upsampled flow3, a
    correlation within +-R cells of layer1 (PWC-Net's warp-then-correlate), its soft-argmax residual
    (FlowNet units) and peak weight, 3 channels. Why: a stride-8 cell is as wide as a third of a car's
    height and half of the car pixels lie within 4 px of its outline, so the stride-8 match mixes the
    car with what surrounds it (docs/moving-cars.md, section 7).

    cost_volume "cosine" (ours; train.py --cost-volume) correlates matching_features, each channel a
    cosine in [-1, 1]; "raw" correlates the features as they are, divided by their channel count
    (FlowNetC's raw correlation / C). docs/choices.md#the-paper-recipe-against-the-papers says why the
    paper recipe keeps the cosine. The soft-argmax of match_input, fine_match and matching_flow is
    calibrated for cosines: config.py refuses them with "raw".
    """

    def __init__(self, enc_channels, skip_channels, max_displacement=20, stride=2, redirect_channels=32,
                 match_input=False, pass_through=False, fine_match=0, cost_volume="cosine"):
        super().__init__()
        if cost_volume not in COST_VOLUMES:
            raise ValueError(f"cost_volume must be one of {COST_VOLUMES}, got {cost_volume!r}")
        self.max_displacement, self.stride, self.match_input = max_displacement, stride, match_input
        self.cost_volume = cost_volume
        self.fine_match = int(fine_match)
        D = 2 * (max_displacement // stride) + 1  # displacements per axis (21 for 20, 2)
        m = 3 if match_input else 0  # the cost volume's soft-argmax flow (2) and peak weight (1)
        f = 3 if self.fine_match else 0  # the stride-4 match's residual flow (2) and peak weight (1)
        c3, c4, c5, c6 = 256, 512, 512, 1024  # FlowNetC widths at strides 8, 16, 32, 64
        d5, d4, d3, d2 = 512, 256, 128, 64  # FlowNetS deconv widths towards strides 32, 16, 8, 4
        # FlowNetC: 1x1 "redirect" of the first frame's features, concatenated with the correlation.
        self.redirect = conv_lrelu(enc_channels, redirect_channels, kernel_size=1)
        self.conv3_1 = conv_lrelu(D * D + redirect_channels + m, c3)
        self.conv4 = conv_lrelu(c3, c4, stride=2)
        self.conv4_1 = conv_lrelu(c4, c4)
        self.conv5 = conv_lrelu(c4, c5, stride=2)
        self.conv5_1 = conv_lrelu(c5, c5)
        self.conv6 = conv_lrelu(c5, c6, stride=2)
        self.conv6_1 = conv_lrelu(c6, c6)
        # Refinement: what predict_flow sees at each scale is [skip, deconv, upsampled flow].
        concat6 = c6
        concat5 = c5 + d5 + 2
        concat4 = c4 + d4 + 2
        concat3 = c3 + d3 + 2 + m
        concat2 = skip_channels + d2 + 2 + f  # EFC: the encoder's layer1 plays FlowNetS's conv2
        self.deconv5, self.deconv4 = deconv_lrelu(concat6, d5), deconv_lrelu(concat5, d4)
        self.deconv3, self.deconv2 = deconv_lrelu(concat4, d3), deconv_lrelu(concat3, d2)
        self.upsampled_flow6_to_5, self.upsampled_flow5_to_4 = upsampled_flow(), upsampled_flow()
        self.upsampled_flow4_to_3, self.upsampled_flow3_to_2 = upsampled_flow(), upsampled_flow()
        self.predict_flow6, self.predict_flow5 = predict_flow(concat6), predict_flow(concat5)
        self.predict_flow4, self.predict_flow3 = predict_flow(concat4), predict_flow(concat3)
        self.predict_flow2 = predict_flow(concat2)
        self.occ6, self.occ5, self.occ4 = occlusion_head(concat6), occlusion_head(concat5), occlusion_head(concat4)
        self.occ3, self.occ2 = occlusion_head(concat3), occlusion_head(concat2)
        init_weights(self)
        # The last layers start small (the papers are silent). predict_flow: near-zero initial flow,
        # i.e. the identity warp, a sane start for the photometric and consistency losses (kaiming
        # init gives O(1) raw values = ~20 px of random flow). Occlusion: O_est ~ 0.5 everywhere,
        # so that the log-likelihood of EFC eq. (4) starts finite and unbiased.
        occ_heads = (self.occ6, self.occ5, self.occ4, self.occ3, self.occ2)
        last_layers = [self.predict_flow6, self.predict_flow5, self.predict_flow4, self.predict_flow3,
                       self.predict_flow2] + [head[2] for head in occ_heads]
        for conv in last_layers:
            nn.init.normal_(conv.weight, std=1e-3)
            nn.init.zeros_(conv.bias)
        if pass_through:
            self.init_pass_through(concat5 - 2, concat4 - 2, concat3 - 2 - m, concat2 - 2 - f)

    @torch.no_grad()
    def init_pass_through(self, at5, at4, at3, at2):
        """pass_through=True (not in FlowNet or EFC; train.py --flow-pass-through): every learned 2x
        upsampling of a flow starts as the bilinear one, and every predict_flow as the identity on the
        flow it is given (channels at5.. of its input: the upsampled coarser flow; at stride 8 with
        match_input the cost volume's soft-argmax instead). So the decoder starts by handing the
        cost volume's answer (or the coarse flow) down to stride 4 and learns corrections to it.
        Why: from near-zero weights Adam moves each weight by about lr a step, 0.04 in 400 steps
        at 1e-4, so a FlowNet decoder in the quick budget passes on at most ~10 % of a flow from one
        scale or from the cost volume to the next and regresses the rest from its features, which
        know the camera but not the cars (docs/moving-cars.md, section 3). With fine_match,
        predict_flow2 also starts as the identity on the stride-4 match's residual: flow2 = the
        upsampled flow3 + that residual."""
        k = torch.tensor([0.25, 0.75, 0.75, 0.25])
        bilinear = k[:, None] * k[None, :]  # (4, 4): ConvTranspose2d(4, stride 2, padding 1) = bilinear x2
        for up in (self.upsampled_flow6_to_5, self.upsampled_flow5_to_4, self.upsampled_flow4_to_3,
                   self.upsampled_flow3_to_2):
            up.weight.zero_()
            up.weight[0, 0], up.weight[1, 1] = bilinear, bilinear
        at3 = self.predict_flow3.weight.shape[1] - 3 if self.match_input else at3
        for predict, at in ((self.predict_flow5, at5), (self.predict_flow4, at4), (self.predict_flow3, at3),
                            (self.predict_flow2, at2)):
            predict.weight[:, at:at + 2].zero_()
            predict.weight[0, at, 1, 1] = predict.weight[1, at + 1, 1, 1] = 1.0
        if self.fine_match:  # the residual's two channels come third and second from last
            at = self.predict_flow2.weight.shape[1] - 3
            self.predict_flow2.weight[:, at:at + 2].zero_()
            self.predict_flow2.weight[0, at, 1, 1] = self.predict_flow2.weight[1, at + 1, 1, 1] = 1.0

    def correlate(self, S1, S2):
        """FlowNetC correlation (kernel 1): (B, D^2, h, w), each channel comparing S1 at p with S2 at
        p + displacement (stride-8 feature pixels): their cosine similarity (cost_volume "cosine", the
        dot product of matching_features), or FlowNetC's raw dot product / C ("raw")."""
        if self.cost_volume == "raw":
            return warp.correlation(S1, S2, self.max_displacement, self.stride, normalize=True)
        return warp.correlation(matching_features(S1), matching_features(S2), self.max_displacement, self.stride,
                                normalize=False)

    def fine_residual(self, f4_1, f4_2, flow4):
        """The stride-4 match (fine_match = R): f4_1, f4_2 (B, C1, H/4, W/4) layer1 features of both
        frames, flow4 (B, 2, H/4, W/4) a flow in pixels of that grid -> the soft-argmax residual
        (B, 2, H/4, W/4) of the cosine correlation within +-R cells of f4_2 warped by flow4 (same
        units), and its peak weight (B, 1, H/4, W/4). flow4 + residual is the refined flow."""
        warped, _ = warp.backward_warp(matching_features(f4_2.float()), flow4.float())
        cost = warp.correlation(matching_features(f4_1.float()), warped, self.fine_match, 1, normalize=False)
        return soft_argmax_flow(cost, self.fine_match, 1, with_peak=True)

    @torch.no_grad()
    def matching_flow(self, S1, S2, f4_1=None, f4_2=None):
        """The correlation's own flow estimate F_1->2 (soft_argmax_flow), (B, 2, h, w) in pixels of
        the feature grid, no gradient: the label-free target of the warm-up (train.py --flow-warmup).
        With fine_match (f4_1, f4_2 given) it is refined by the stride-4 match (fine_residual), on
        the stride-4 grid: the answer an untrained pass-through decoder gives."""
        flow = soft_argmax_flow(self.correlate(S1.float(), S2.float()), self.max_displacement, self.stride)
        if not self.fine_match:
            return flow
        flow4 = warp.resize_flow(flow, f4_1.shape[-2:])  # (B, 2, H/4, W/4), stride-4 pixels
        return flow4 + self.fine_residual(f4_1, f4_2, flow4)[0]

    def forward(self, S1, S2, f4, image_size, M1=None, M2=None, f4_2=None):
        M1, M2 = (S1, S2) if M1 is None else (M1, M2)
        if self.fine_match and f4_2 is None:
            raise ValueError("FlowDecoder(fine_match > 0) needs f4_2, the second frame's layer1 features")
        # FlowNetC correlation (kernel 1) on the stride-8 features: D^2 channels, displacements up to
        # max_displacement feature pixels = 8x that many image pixels. With cost_volume "cosine" it
        # correlates matching_features, so each channel is a cosine in [-1, 1] (FlowNetC: raw / C).
        cost = self.correlate(M1, M2)  # (B, D^2, H/8, W/8)
        stride8 = [F.leaky_relu(cost, 0.1), self.redirect(S1)]
        match = []
        if self.match_input:  # the cost volume's own flow, in FlowNet units like every raw prediction
            flow8, peak = soft_argmax_flow(cost.float(), self.max_displacement, self.stride, with_peak=True)
            H, W = image_size
            to_raw = flow8.new_tensor([W / flow8.shape[3], H / flow8.shape[2]]).view(1, 2, 1, 1) / FLOW_DIV
            match = [(flow8 * to_raw).to(cost.dtype), peak.to(cost.dtype)]  # (B, 2, H/8, W/8), (B, 1, H/8, W/8)
        x3 = self.conv3_1(torch.cat(stride8 + match, 1))  # (B, 256, H/8, W/8)
        x4 = self.conv4_1(self.conv4(x3))  # (B, 512, H/16, W/16)
        x5 = self.conv5_1(self.conv5(x4))  # (B, 512, H/32, W/32)
        concat6 = self.conv6_1(self.conv6(x5))  # (B, 1024, H/64, W/64)

        # Raw predictions are in FlowNet units (flow / FLOW_DIV in full-resolution pixels) at every
        # scale, so a coarse prediction is upsampled and concatenated without rescaling.
        flow6 = self.predict_flow6(concat6)  # (B, 2, H/64, W/64)
        concat5 = torch.cat([x5, crop_like(self.deconv5(concat6), x5),
                             crop_like(self.upsampled_flow6_to_5(flow6), x5)], 1)  # (B, concat5, H/32, W/32)
        flow5 = self.predict_flow5(concat5)  # (B, 2, H/32, W/32)
        concat4 = torch.cat([x4, crop_like(self.deconv4(concat5), x4),
                             crop_like(self.upsampled_flow5_to_4(flow5), x4)], 1)  # (B, concat4, H/16, W/16)
        flow4 = self.predict_flow4(concat4)  # (B, 2, H/16, W/16)
        concat3 = torch.cat([x3, crop_like(self.deconv3(concat4), x3),
                             crop_like(self.upsampled_flow4_to_3(flow4), x3)] + match, 1)  # (B, concat3, H/8, W/8)
        flow3 = self.predict_flow3(concat3)  # (B, 2, H/8, W/8)
        up3 = crop_like(self.upsampled_flow3_to_2(flow3), f4)  # (B, 2, H/4, W/4), FlowNet units
        fine = []
        if self.fine_match:  # FlowNet units <-> stride-4 pixels: x FLOW_DIV x (grid / image size)
            to_grid = up3.new_tensor([f4.shape[3] / image_size[1], f4.shape[2] / image_size[0]]).view(1, 2, 1, 1)
            residual, peak = self.fine_residual(f4, f4_2, up3 * (FLOW_DIV * to_grid))
            fine = [(residual / (FLOW_DIV * to_grid)).to(up3.dtype), peak.to(up3.dtype)]
        concat2 = torch.cat([f4, crop_like(self.deconv2(concat3), f4), up3] + fine, 1)  # (B, concat2, H/4, W/4)
        flow2 = self.predict_flow2(concat2)  # (B, 2, H/4, W/4)

        flows = [flow_to_pixels(raw, image_size) for raw in (flow2, flow3, flow4, flow5, flow6)]
        occlusions = [self.occ2(concat2), self.occ3(concat3), self.occ4(concat4),
                      self.occ5(concat5), self.occ6(concat6)]  # (B, 1, h_l, w_l) each, O_est
        return flows, occlusions


class EFCNet(nn.Module):
    """EFC (Ding et al. 2020): PSPNet whose layers 1-3 are shared with a flow decoder.

    forward(image) is inference and runs exactly PSPNet (EFC: no extra computation at test time).
    forward(image_a, image_b) = forward_pair(image_a, image_b) is training; calling it through
    forward keeps DistributedDataParallel's hooks working.

    corr_layer: the encoder output the correlation compares (EFC: "intermediate feature", following
    FlowNetC, which correlates its conv3, stride 8). "layer3" = S; "layer2" = ResNet's conv3_x stage,
    also stride 8 and less semantic: its cosine matches match the moving cars where layer3's match
    the background around them; "layer2+3" compares both (the mean of their cosines): between the two
    on the cars and on the static scene (docs/moving-cars.md).
    match_input, pass_through, fine_match, cost_volume: FlowDecoder's switches (the first three not in
    EFC and off in its recipe; cost_volume "raw" is FlowNetC's, "cosine" ours).
    """

    def __init__(self, num_classes, backbone="resnet50", max_displacement=20, corr_stride=2, corr_layer="layer3",
                 match_input=False, pass_through=False, fine_match=0, cost_volume="cosine"):
        super().__init__()
        if corr_layer not in CORR_LAYERS:
            raise ValueError(f"corr_layer must be one of {CORR_LAYERS}, got {corr_layer!r}")
        self.corr_layer = corr_layer
        self.seg = PSPNet(num_classes, backbone)
        self.flow = FlowDecoder(self.seg.enc_channels, self.seg.skip_channels, max_displacement, corr_stride,
                                match_input=match_input, pass_through=pass_through, fine_match=fine_match,
                                cost_volume=cost_volume)

    def forward(self, image, image_b=None, segment=True, warmup=False, flow=True, seg_frames=None):
        if image_b is None:
            return self.seg(image)
        return self.forward_pair(image, image_b, segment, warmup, flow, seg_frames)

    def forward_pair(self, image_a, image_b, segment=True, warmup=False, flow=True, seg_frames=None):
        """Everything the EFC losses need for a pair of normalised images (a, b), (B, 3, H, W) each:
          'logits_a', 'logits_b'  (B, K, H, W); 'aux_a', 'aux_b' the same in training mode, else None
          'S_a', 'S_b'            (B, C_S, H/8, W/8) shared-encoder (layer3) features
          'flow_ab', 'flow_ba'    5 x (B, 2, h_l, w_l), strides 4, 8, 16, 32, 64, pixels of own grid
          'occ_a', 'occ_b'        5 x (B, 1, h_l, w_l) O_est; occ_a: pixels of a with no match in b
                                  (from the run that gave flow_ab), occ_b likewise from flow_ba's run
        segment=False (flow-only training) skips layer4 and the PSP heads: logits and aux are None.
        warmup=True (train.py --flow-warmup) adds 'match_ab', 'match_ba' (B, 2, H/8, W/8; H/4 with fine_match), the
        FlowDecoder.matching_flow of the pair in feature pixels (the warm-up's targets, no
        gradient), and the decoder reads detached features: the warm-up teaches the decoder to read
        the encoder, it must not move the encoder, whose features make the targets.
        flow=False skips the flow decoder (Table 1's TCC_fix takes its flow from a fixed network):
        'flow_ab', 'flow_ba', 'occ_a', 'occ_b' are None.
        seg_frames (train.py --seg-batch labelled; not in EFC): None decodes all 2B frames as one batch
        (the paper). Else (trained, other) (2B,) bool masks over [a frames; b frames]: the segmentation
        of the `trained` frames is decoded with gradient as one batch (its BatchNorm statistics theirs),
        that of the `other` frames without gradient and with BatchNorm's running statistics (O_seg, a
        detached mask, is all that reads them), and the remaining frames are not decoded: their logits
        and aux are zeros (nothing reads them)."""
        if image_a.shape != image_b.shape:
            raise ValueError(f"image_a {tuple(image_a.shape)} and image_b {tuple(image_b.shape)} "
                             "must have equal shapes")
        B, size = image_a.shape[0], image_a.shape[-2:]
        # (2B, C1, H/4, W/4), (2B, C2, H/8, W/8), (2B, C_S, H/8, W/8)
        f4, f8, S = self.seg.encode(torch.cat([image_a, image_b]), with_layer2=True)
        S_a, S_b = S[:B], S[B:]
        M = {"layer3": S, "layer2": f8}.get(self.corr_layer)  # what the correlation compares
        if M is None:  # layer2+3: both, each a unit vector, so each cosine is the mean of the two maps'
            M = torch.cat([matching_features(f8), matching_features(S)], 1)
        # One decoder run on the batch of pairs [(a, b); (b, a)]: the same weights give F_a->b
        # (first half) and F_b->a (second half). The first frames are [a; b] = S and f4 as they are.
        S1, S2, skip, skip2 = S, torch.cat([S_b, S_a]), f4, torch.cat([f4[B:], f4[:B]])
        M1, M2 = M, torch.cat([M[B:], M[:B]])
        if warmup:
            S1, S2, skip, skip2, M1, M2 = (t.detach() for t in (S1, S2, skip, skip2, M1, M2))
        out = {"S_a": S_a, "S_b": S_b, "flow_ab": None, "flow_ba": None, "occ_a": None, "occ_b": None,
               "logits_a": None, "logits_b": None, "aux_a": None, "aux_b": None}
        if flow:
            flows, occlusions = self.flow(S1, S2, skip, size, M1, M2, skip2)
            out.update({"flow_ab": [f[:B] for f in flows], "flow_ba": [f[B:] for f in flows],
                        "occ_a": [o[:B] for o in occlusions], "occ_b": [o[B:] for o in occlusions]})
        if warmup:
            matches = self.flow.matching_flow(M1, M2, skip, skip2)  # (2B, 2, H/8, W/8); H/4 with fine_match
            out["match_ab"], out["match_ba"] = matches[:B], matches[B:]
        if segment:
            seg = self.seg.decode(S, size) if seg_frames is None else self.decode_some(S, size, *seg_frames)
            # logits (2B, K, H, W); aux likewise or None
            out["logits_a"], out["logits_b"] = seg["logits"][:B], seg["logits"][B:]
            if seg["aux"] is not None:
                out["aux_a"], out["aux_b"] = seg["aux"][:B], seg["aux"][B:]
        return out

    def decode_some(self, S, size, trained, other):
        """PSPNet.decode of some frames of S (2B, C_S, H/8, W/8): `trained` with gradient, `other`
        without, the rest not at all (zeros): forward_pair's seg_frames. Why: in a Cityscapes-like
        batch one frame in four has labels (EFC "+ UD"), and layer4 + PSP on the others, forward and
        backward, is two thirds of a step on a CPU, for a loss that is zero there."""
        trained_seg = self.seg.decode(S[trained], size)  # at least one frame: train.py makes sure
        full = {}
        for key, value in trained_seg.items():
            if value is None:
                full[key] = None
                continue
            # out of place, so that the gradient reaches the decoded frames
            full[key] = value.new_zeros((S.shape[0], *value.shape[1:])).index_put((trained.nonzero()[:, 0],), value)
        if other.any():
            # BatchNorm's running statistics, as at inference: no statistics of their own to collect, so
            # no collective under DDP, where one process may hold such frames and another none
            modes = {m: m.training for m in self.seg.modules()}
            self.seg.eval()
            try:
                with torch.no_grad():
                    logits = self.seg.decode(S[other], size)["logits"]
            finally:
                for m, mode in modes.items():
                    m.training = mode
            full["logits"] = full["logits"].index_put((other.nonzero()[:, 0],), logits)
        return full


# ---------------------------------------------------------------------------------------------
# Flow2Seg (Li et al.): PSPNet on the image + a shallow FCN on the flow, fused residually.
# ---------------------------------------------------------------------------------------------
class ResidualFusion(nn.Module):
    """Flow2Seg 3.3: concat(image logits, flow logits) -> 2 x [conv + BN] -> 1x1 conv -> + image logits.
    The paper does not give the kernel size or a nonlinearity: 3x3 convs with ReLU here."""

    def __init__(self, num_classes, channels=128):
        super().__init__()
        self.blocks = nn.Sequential(conv_bn_relu(2 * num_classes, channels, 3), conv_bn_relu(channels, channels, 3))
        self.residual = nn.Conv2d(channels, num_classes, 1)
        init_weights(self.blocks)
        # Zero init: training starts with fused == image logits. The module is a correction that
        # should "leave the well segmented part unaffected", and a trained PSPNet loaded into the
        # image path (Flow2Seg 4.3) keeps its exact predictions at the start.
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def forward(self, image_logits, flow_logits):
        x = self.blocks(torch.cat([image_logits, flow_logits], 1))  # (B, channels, h, w)
        return image_logits + self.residual(x)  # (B, K, h, w)


class Flow2SegNet(nn.Module):
    """forward(image, flow): image (B, 3, H, W) normalised; flow (B, 2, H, W) F from this frame
    (Flow2Seg 4.3: towards the previous frame) in pixels of the image grid. Returns 'logits' (fused),
    'image_logits', 'flow_logits', 'aux' (None in eval), all (B, K, H, W)."""

    def __init__(self, num_classes, image_backbone="resnet101", flow_backbone="resnet18", fusion_channels=128,
                 flow_context="fcn"):
        super().__init__()
        self.image = PSPNet(num_classes, image_backbone)  # Image2Seg, 3.2
        # Flow2Seg 3.1: a dilated ResNet with a 2-channel conv1 (load_pretrained averages RGB).
        self.flow_backbone = resnet(backbone_depth(flow_backbone), dilated=True, in_channels=2)
        c4 = self.flow_backbone.layer_channels[3]
        # Flow2Seg 3.1 / Table 2: ASPP, DenseASPP or pyramid pooling may sit on the backbone; "fcn": none.
        self.flow_context, context_channels = context_module(flow_context, c4)
        # FCN head; the paper gives no width: c4 / 4 in the middle, as torchvision's FCNHead.
        self.flow_head = fcn_head(context_channels, c4 // 4, num_classes)
        self.fusion = ResidualFusion(num_classes, fusion_channels)

    def forward(self, image, flow):
        check_input(image, 3, "image")
        check_input(flow, 2, "flow")
        if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and flow {tuple(flow.shape)} must share B, H, W")
        size = image.shape[-2:]
        image_out = self.image.decode(self.image.encode(image)[1])  # logits (B, K, H/8, W/8), aux or None
        image8 = image_out["logits"]
        context8 = self.flow_context(self.flow_backbone(flow * FLOW_INPUT_SCALE))  # (B, C_context, H/8, W/8)
        flow8 = self.flow_head(context8)  # (B, K, H/8, W/8)
        if flow8.shape[-2:] != image8.shape[-2:]:  # equal whenever both backbones have stride 8
            flow8 = upsample(flow8, image8.shape[-2:])
        fused8 = self.fusion(image8, flow8)  # (B, K, H/8, W/8), fused at stride 8
        aux = image_out["aux"]
        return {"logits": upsample(fused8, size), "image_logits": upsample(image8, size),
                "flow_logits": upsample(flow8, size), "aux": upsample(aux, size) if aux is not None else None}


METHODS = ("psp", "flow2seg", "efc", "flow")
CORR_LAYERS = ("layer3", "layer2", "layer2+3")  # EFCNet's corr_layer
COST_VOLUMES = ("cosine", "raw")  # FlowDecoder's cost_volume


def build_model(method, num_classes, backbone="resnet50", flow_backbone="resnet18", max_displacement=20,
                corr_stride=2, context="psp", flow_context="fcn", corr_layer="layer3", match_input=False,
                pass_through=False, fine_match=0, cost_volume="cosine"):
    """The network of a training method (train.py's --method; checkpoints store these arguments):
      psp       PSPNet, the image-only baseline of both papers; with context 'fcn' the same network
                without its pyramid pooling (Flow2Seg Table 3's "ResNet101-FCN")
      flow2seg  Flow2SegNet (image path `backbone`, flow path `flow_backbone` + `flow_context`)
      efc       EFCNet
      flow      EFCNet trained with forward(a, b, segment=False): the flow branch alone (EFC Table 2
                "UL"); the segmentation decoder stays untrained, so its checkpoint can initialise efc.
    """
    if context != "psp" and method != "psp":
        raise ValueError(f"context {context!r} is the image network of method psp; {method} keeps PSPNet")
    if flow_context != "fcn" and method != "flow2seg":
        raise ValueError(f"flow_context {flow_context!r} is Flow2Seg's flow path; {method} has none")
    if method == "psp":
        return PSPNet(num_classes, backbone, context=context)
    if method == "flow2seg":
        return Flow2SegNet(num_classes, backbone, flow_backbone, flow_context=flow_context)
    if method in ("efc", "flow"):
        return EFCNet(num_classes, backbone, max_displacement, corr_stride, corr_layer, match_input, pass_through,
                      fine_match, cost_volume)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs
# ---------------------------------------------------------------------------------------------
def summary(model, inputs, depth=1):
    """Print parameters and GFLOPs of model(*inputs) per submodule (`depth` levels) and in total.

    FLOPs are torch.utils.flop_counter's: 2 per multiply-add of convs and matmuls (the correlation
    included); elementwise ops, pooling and interpolation are not counted. torchvision's "GFLOPS"
    column counts multiply-adds, half of this. Works on the meta device. Returns (params, flops).
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__

    def flops(name, module):
        # A module entered through a method other than forward (PSPNet.encode) has no entry of
        # its own: sum its children's.
        if f"{root}.{name}" in counts:
            return counts[f"{root}.{name}"]
        return sum(flops(f"{name}.{child}", sub) for child, sub in module.named_children())

    print(f"{'module':<32}{'params':>16}{'GFLOPs':>12}")
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            params = sum(p.numel() for p in module.parameters())
            print(f"{'  ' * name.count('.') + name:<32}{params:>16,}{flops(name, module) / 1e9:>12.2f}")
    total_params, total_flops = sum(p.numel() for p in model.parameters()), counter.get_total_flops()
    print(f"{'total':<32}{total_params:>16,}{total_flops / 1e9:>12.2f}")
    return total_params, total_flops


def main():
    parser = argparse.ArgumentParser(description="Parameters and FLOPs of the networks, on the meta "
                                                 "device (no memory, instant).")
    parser.add_argument("--net", choices=["pspnet", "efc", "efc-pair", "flow2seg"], default="pspnet",
                        help="efc = EFCNet inference (= PSPNet), efc-pair = its training forward on a pair")
    parser.add_argument("--backbone", default="resnet50", help="image backbone")
    parser.add_argument("--flow-backbone", default="resnet18", help="Flow2Seg's flow backbone")
    parser.add_argument("--context", choices=["psp", "fcn"], default="psp", help="pspnet: fcn = without the pyramid")
    parser.add_argument("--flow-context", choices=FLOW_CONTEXTS, default="fcn",
                        help="Flow2Seg's flow-path context module")
    parser.add_argument("--size", type=int, nargs=2, default=[713, 713], metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=1, help="submodule levels to list")
    parser.add_argument("--train", action="store_true", help="training mode (runs the auxiliary heads)")
    args = parser.parse_args()
    with torch.device("meta"):
        image = torch.zeros(args.batch, 3, *args.size)
        if args.net == "pspnet":
            net, inputs = PSPNet(args.classes, args.backbone, context=args.context), (image,)
        elif args.net == "efc":
            net, inputs = EFCNet(args.classes, args.backbone), (image,)
        elif args.net == "efc-pair":
            net, inputs = EFCNet(args.classes, args.backbone), (image, image.clone())
        else:
            net = Flow2SegNet(args.classes, args.backbone, args.flow_backbone, flow_context=args.flow_context)
            inputs = (image, torch.zeros(args.batch, 2, *args.size))
        net.train(args.train)
        print(f"{args.net} {args.backbone} input {args.batch}x{args.size[0]}x{args.size[1]}, "
              f"{args.classes} classes, {'train' if args.train else 'eval'} mode")
        summary(net, inputs, args.depth)


if __name__ == "__main__":
    main()
