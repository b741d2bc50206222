"""Exit branches: a searched stack of layers, then global pooling and a linear classifier.

`ElasticBranch` is the weight-sharing version that lives at one tap of the
supernet and holds every candidate op at every layer slot; `extract` turns one
choice of layers into a plain static `nn.Sequential` (the branch builder).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ee_nas.models.ops import ElasticConvBNAct, ElasticLinear, ElasticMBConv
from ee_nas.genome import CONV_OPS, BranchLayer

MBCONV_EXPAND = {"mbconv3": 3, "mbconv6": 6}


def _pool(op: str) -> nn.Module:
    # ceil_mode keeps a 1x1 map at 1x1 instead of failing deep in the network
    return (nn.AvgPool2d if op == "avgpool" else nn.MaxPool2d)(2, 2, ceil_mode=True)


class ElasticBranchLayer(nn.Module):
    """One layer slot of a branch: the shared weights of each candidate op."""

    def __init__(self, max_in: int, max_width: int, ops: Sequence[str]):
        super().__init__()
        self.ops = nn.ModuleDict()
        if "conv3x3" in ops:
            self.ops["conv3x3"] = ElasticConvBNAct(max_in, max_width, 3)
        if "dwsep3x3" in ops:
            self.ops["dwsep3x3"] = nn.ModuleList([ElasticConvBNAct(max_in, max_in, 3, depthwise=True),
                                                  ElasticConvBNAct(max_in, max_width, 1)])
        if any(op in ops for op in MBCONV_EXPAND):
            self.ops["mbconv"] = ElasticMBConv(max_in, max_width, max(MBCONV_EXPAND.values()), 3)

    def forward(self, x, layer: BranchLayer):
        if layer.op in ("avgpool", "maxpool"):
            return _pool(layer.op)(x)
        if layer.op == "dwsep3x3":
            dw, pw = self.ops["dwsep3x3"]
            return pw(dw(x), out_ch=layer.width)
        if layer.op in MBCONV_EXPAND:
            return self.ops["mbconv"](x, MBCONV_EXPAND[layer.op], 3, out_ch=layer.width)
        return self.ops[layer.op](x, out_ch=layer.width)

    def extract(self, in_ch: int, layer: BranchLayer) -> nn.Module:
        if layer.op in ("avgpool", "maxpool"):
            return _pool(layer.op)
        if layer.op == "dwsep3x3":
            dw, pw = self.ops["dwsep3x3"]
            return nn.Sequential(*dw.extract(in_ch), *pw.extract(in_ch, layer.width))
        if layer.op in MBCONV_EXPAND:
            return self.ops["mbconv"].extract(in_ch, MBCONV_EXPAND[layer.op], 3, layer.width)
        return self.ops[layer.op].extract(in_ch, layer.width)


def classifier_key(layers: Sequence[BranchLayer]) -> str:
    """Which classifier a branch ends in: that of its last convolutional op, or "none" (raw tap features).

    One classifier shared by every op saw raw tap features from the smallest subnet and mbconv
    features from the largest in the same step and fitted neither (exits at or below chance).
    """
    return next((layer.op for layer in reversed(layers) if layer.op in CONV_OPS), "none")


class ElasticBranch(nn.Module):
    """All candidate branches at one tap, sharing the layer weights; one classifier per feature kind."""

    def __init__(self, in_ch: int, num_classes: int, max_layers: int, ops: Sequence[str],
                 widths: Sequence[int]):
        super().__init__()
        self.in_ch = in_ch
        conv_ops = [op for op in ops if op in CONV_OPS]
        max_width = max(widths) if conv_ops else in_ch
        max_in = max(in_ch, max_width)
        self.layers = nn.ModuleList(
            [ElasticBranchLayer(in_ch if i == 0 else max_in, max_width, conv_ops) for i in range(max_layers)])
        self.classifiers = nn.ModuleDict({key: ElasticLinear(max_in, num_classes)
                                          for key in ["none", *conv_ops] if key == "none" or max_layers})

    def forward(self, x, layers: Sequence[BranchLayer]):
        for slot, layer in zip(self.layers, layers):
            x = slot(x, layer)
        return self.classifiers[classifier_key(layers)](x.mean(dim=(2, 3)))

    def extract(self, layers: Sequence[BranchLayer]) -> nn.Sequential:
        modules, ch = [], self.in_ch
        for slot, layer in zip(self.layers, layers):
            modules.append(slot.extract(ch, layer))
            ch = layer.width or ch
        return nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             self.classifiers[classifier_key(layers)].extract(ch))
