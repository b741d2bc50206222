"""MobileNetV3-style elastic supernet for small (32x32) inputs, OFA-style weight sharing."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ee_nas.models.backbone import ElasticBackbone
from ee_nas.models.ops import ElasticMBConv, MBConv, activation


class MobileNetV3Head(nn.Sequential):
    """MobileNetV3 final classifier: 1x1 conv -> pool -> hidden linear -> logits."""

    def __init__(self, in_ch: int, conv_width: int, hidden: int, num_classes: int, dropout: float):
        super().__init__(
            nn.Conv2d(in_ch, conv_width, 1, bias=False), nn.BatchNorm2d(conv_width), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(conv_width, hidden), nn.Hardswish(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


class ElasticMobileNetV3(ElasticBackbone):
    """Stages of elastic inverted-residual blocks (depth, expand ratio, kernel are searched).

    The stem keeps stride 1 so 32x32 inputs keep enough resolution for early exits.
    `first_block` adds MobileNetV3's (and OFA's) fixed unexpanded first block (depthwise 3x3 +
    pointwise, residual) to the stem: at full resolution an expanded block holds a third of the
    network's MACs, so no early exit could be cheap.
    """

    def __init__(self, stages: Sequence[Mapping], in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, stem_width: int = 16, stem_stride: int = 1,
                 min_depth: int = 1, expand_choices: Sequence[float] = (3, 4, 6),
                 kernel_choices: Sequence[int] = (3, 5, 7), head_conv_width: int = 256,
                 head_hidden: int = 256, dropout: float = 0.1, first_block: bool = False):
        super().__init__([s["depth"] for s in stages], min_depth, expand_choices, kernel_choices,
                         image_size, in_channels, num_classes)
        stem = [nn.Conv2d(in_channels, stem_width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem_width),
                activation("hswish")]
        if first_block:
            stem.append(MBConv(nn.Sequential(
                nn.Conv2d(stem_width, stem_width, 3, 1, 1, groups=stem_width, bias=False),
                nn.BatchNorm2d(stem_width), activation("relu"),
                nn.Conv2d(stem_width, stem_width, 1, bias=False), nn.BatchNorm2d(stem_width)), residual=True))
        self.stem = nn.Sequential(*stem)
        blocks, in_ch = [], stem_width
        for stage in stages:
            for i in range(stage["depth"]):
                blocks.append(ElasticMBConv(in_ch, stage["width"], self.expand_choices[-1],
                                            self.kernel_choices[-1], stage["stride"] if i == 0 else 1,
                                            se=stage.get("se", False), act=stage.get("act", "relu")))
                self.block_out.append(stage["width"])
                in_ch = stage["width"]
        self.blocks = nn.ModuleList(blocks)
        self.head = MobileNetV3Head(in_ch, head_conv_width, head_hidden, num_classes, dropout)
        self._record_tap_shapes()
