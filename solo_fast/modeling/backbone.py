"""ResNet-18/34/50/101 and ResNeXt-50/101 returning C2..C5, with torchvision-compatible
parameter names (which are mmdetection's too).

As mmdetection's ``frozen_stages=1, norm_eval=True``: the stem and ``layer1`` are frozen
and every BatchNorm uses its running statistics, also in training mode (detection
batches are too small to estimate them).

ResNeXt (mmdetection's ``ResNeXt(groups, base_width)``, torchvision's ``resnext*``): the
Bottleneck's 3×3 conv is grouped, ``width = floor(planes * base_width / 64) * groups``
(``planes`` itself when ``groups == 1``), e.g. ResNeXt-101 64x4d: widths 256..2048.

Deformable convs (mmdetection's ``dcn=dict(type=..., deformable_groups=1,
fallback_on_stride=False), stage_with_dcn=...``): every Bottleneck of a stage with DCN has
a :class:`~solo_fast.modeling.layers.DeformConv2d` as its 3×3 ``conv2`` (stride and groups
kept; ``conv2.conv_offset`` predicts the offsets, zero-initialised, as mmdetection's ResNet
does). BasicBlocks have none (mmdetection: "Not implemented yet").
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .layers import DCN_TYPES, DeformConv2d


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision: one fewer activation-sized tensor per block
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 groups: int = 1, base_width: int = 4, dcn: Optional[str] = None):
        super().__init__()
        width = bottleneck_width(planes, groups, base_width)
        # "pytorch" style: the stride sits on the 3x3 conv (torchvision, mmdetection default).
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if dcn is None:
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        else:  # fallback_on_stride=False: the strided first block of a stage is deformable too
            self.conv2 = DeformConv2d(width, width, 3, stride, 1, groups=groups, bias=False,
                                      modulated=dcn == "DCNv2")
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision: BatchNorm's backward does not need its output
        return self.relu(out)


ARCHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}
NO_DCN = (False, False, False, False)


def bottleneck_width(planes: int, groups: int = 1, base_width: int = 4) -> int:
    """Channels of a Bottleneck's 3×3 conv (mmdetection's ResNeXt rule; ResNet: ``planes``)."""
    return planes if groups == 1 else (planes * base_width // 64) * groups


def stage_span(stage_with_dcn: Sequence[bool]) -> str:
    """The stages flagged in ``stage_with_dcn`` (C2..C5) for messages: 'c3-c5', 'c2,c4', ''."""
    stages = [i + 2 for i, on in enumerate(stage_with_dcn) if on]
    if len(stages) > 1 and stages == list(range(stages[0], stages[-1] + 1)):
        return f"c{stages[0]}-c{stages[-1]}"
    return ",".join(f"c{i}" for i in stages)


def describe(depth: int, groups: int = 1, base_width: int = 4, stage_with_dcn: Sequence[bool] = NO_DCN,
             dcn_type: str = "DCNv2") -> str:
    """'ResNet-50', 'ResNeXt-101 64x4d', '... with DCNv2 in c3-c5' (for messages)."""
    name = f"ResNeXt-{depth} {groups}x{base_width}d" if groups > 1 else f"ResNet-{depth}"
    if any(stage_with_dcn):
        name += f" with {dcn_type} in {stage_span(stage_with_dcn)}"
    return name


class ResNet(nn.Module):
    """``groups``/``base_width``: ResNeXt; ``stage_with_dcn`` (4 bools, layer1..layer4) with
    ``dcn_type`` ("DCNv2" or "DCN"): deformable 3×3 convs in those stages (see the module
    docstring)."""

    def __init__(self, depth: int, frozen_stages: int = 1, norm_eval: bool = True, *, groups: int = 1,
                 base_width: int = 4, stage_with_dcn: Sequence[bool] = NO_DCN, dcn_type: str = "DCNv2"):
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"depth: expected one of {sorted(ARCHS)}, got {depth!r}")
        block, layers = ARCHS[depth]
        stage_with_dcn = tuple(bool(x) for x in stage_with_dcn)
        if len(stage_with_dcn) != 4:
            raise ValueError(f"stage_with_dcn: expected 4 bools (layer1..layer4), got {stage_with_dcn!r}")
        if dcn_type not in DCN_TYPES:
            raise ValueError(f"dcn_type: expected one of {DCN_TYPES}, got {dcn_type!r}")
        if block is BasicBlock and (groups != 1 or any(stage_with_dcn)):
            raise ValueError(f"depth: ResNet-{depth} has BasicBlocks, which have no grouped (ResNeXt) or "
                             "deformable convs; expected depth 50 or 101 with groups > 1 or stage_with_dcn")
        self.depth = depth
        self.groups, self.base_width = groups, base_width
        self.stage_with_dcn, self.dcn_type = stage_with_dcn, dcn_type
        self.name = describe(depth, groups, base_width, stage_with_dcn, dcn_type)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            extra = {} if block is BasicBlock else dict(
                groups=groups, base_width=base_width, dcn=dcn_type if stage_with_dcn[i] else None)
            self.add_module(f"layer{i + 1}", self._make_layer(block, planes, layers[i], stride, **extra))
        self.out_channels = [64 * block.expansion * 2**i for i in range(4)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # mmdetection's ResNet: constant_init(conv2.conv_offset, 0)
            if isinstance(m, DeformConv2d):
                m.reset_offset()
        self._freeze()

    def _make_layer(self, block, planes: int, blocks: int, stride: int, **extra) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = []
        if self.frozen_stages >= 0:
            mods += [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return mods

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def build_backbone(cfg) -> ResNet:
    """The backbone of a config (:func:`solo_fast.modeling.configs.get_config`'s flat dict;
    settings it lacks, as in configs written before ResNeXt and DCN, take their defaults)."""
    return ResNet(cfg["depth"], frozen_stages=cfg["frozen_stages"], norm_eval=cfg["norm_eval"],
                  groups=cfg["groups"], base_width=cfg["base_width"],
                  stage_with_dcn=tuple(cfg["stage_with_dcn"]), dcn_type=cfg["dcn_type"])
