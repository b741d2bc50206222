"""CIFAR-style ResNet with elastic depth, bottleneck width and kernel, and a tap after every block."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ee_nas.models.backbone import ElasticBackbone
from ee_nas.models.ops import ElasticBatchNorm2d, ElasticConv2d, ElasticConvBNAct, make_divisible


class BasicBlock(nn.Module):
    """Static residual block: conv-bn-relu-conv-bn + shortcut, then ReLU."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module):
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut, nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class ElasticBasicBlock(nn.Module):
    """Basic block whose inner width is ``out * expand`` and whose kernel is elastic."""

    def __init__(self, in_ch: int, out_ch: int, max_expand: float, max_kernel: int, stride: int):
        super().__init__()
        self.out_ch = out_ch
        self.conv1 = ElasticConvBNAct(in_ch, make_divisible(out_ch * max_expand), max_kernel, stride)
        self.conv2 = ElasticConv2d(make_divisible(out_ch * max_expand), out_ch, max_kernel)
        self.bn2 = ElasticBatchNorm2d(out_ch)
        self.project = None
        if stride != 1 or in_ch != out_ch:
            self.project = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.act = nn.ReLU()

    def forward(self, x, expand: float, kernel: int):
        y = self.conv1(x, out_ch=make_divisible(self.out_ch * expand), kernel=kernel)
        y = self.bn2(self.conv2(y, kernel=kernel))
        return self.act(y + (x if self.project is None else self.project(x)))

    def extract(self, in_ch: int, expand: float, kernel: int) -> BasicBlock:
        import copy

        mid = make_divisible(self.out_ch * expand)
        body = nn.Sequential(*self.conv1.extract(in_ch, mid, kernel), self.conv2.extract(mid, kernel=kernel),
                             self.bn2.extract(self.out_ch))
        shortcut = nn.Identity() if self.project is None else copy.deepcopy(self.project)
        return BasicBlock(body, shortcut)


class ElasticResNet(ElasticBackbone):
    """ResNet-20/32/56-style backbone for 32x32 inputs (3 stages of basic blocks)."""

    def __init__(self, stages: Sequence[Mapping], in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, stem_width: int = 16, min_depth: int = 1,
                 expand_choices: Sequence[float] = (0.5, 1.0), kernel_choices: Sequence[int] = (3,)):
        super().__init__([s["depth"] for s in stages], min_depth, expand_choices, kernel_choices,
                         image_size, in_channels, num_classes)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU())
        blocks, in_ch = [], stem_width
        for stage in stages:
            for i in range(stage["depth"]):
                blocks.append(ElasticBasicBlock(in_ch, stage["width"], self.expand_choices[-1],
                                                self.kernel_choices[-1], stage["stride"] if i == 0 else 1))
                self.block_out.append(stage["width"])
                in_ch = stage["width"]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
        self._record_tap_shapes()
