"""Weight-sharing (elastic) layers and the static layers they extract to.

An elastic layer owns the weights of its largest setting; a smaller setting uses
a slice of them (first channels, centre crop of the kernel), as in Once-for-All.
Every elastic layer can `extract(...)` a plain ``nn`` module holding a copy of
the slice, so that a chosen subnet trains, exports and is counted (ee_nas.hardware.macs)
like any ordinary network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish, "identity": nn.Identity}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` (never below 90% of value)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def _centre_crop(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    full = weight.shape[-1]
    if kernel > full or (full - kernel) % 2:
        raise ValueError(f"kernel {kernel} cannot be cut from a {full}x{full} weight")
    start = (full - kernel) // 2
    return weight[..., start:start + kernel, start:start + kernel]


class ElasticConv2d(nn.Module):
    """Conv whose input channels follow the input, and output channels/kernel are chosen."""

    def __init__(self, max_in: int, max_out: int, max_kernel: int = 1, stride: int = 1,
                 depthwise: bool = False, bias: bool = False):
        super().__init__()
        self.stride, self.depthwise, self.max_kernel = stride, depthwise, max_kernel
        in_per_group = 1 if depthwise else max_in
        self.weight = nn.Parameter(torch.empty(max_out, in_per_group, max_kernel, max_kernel))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def _slice(self, in_ch: int, out_ch: int | None, kernel: int | None):
        kernel = kernel or self.max_kernel
        out_ch = in_ch if self.depthwise else (out_ch or self.weight.shape[0])
        weight = self.weight[:out_ch] if self.depthwise else self.weight[:out_ch, :in_ch]
        weight = _centre_crop(weight, kernel)
        bias = None if self.bias is None else self.bias[:out_ch]
        return weight, bias, kernel

    def forward(self, x: torch.Tensor, out_ch: int | None = None, kernel: int | None = None):
        weight, bias, kernel = self._slice(x.shape[1], out_ch, kernel)
        groups = x.shape[1] if self.depthwise else 1
        return F.conv2d(x, weight, bias, self.stride, kernel // 2, 1, groups)

    def extract(self, in_ch: int, out_ch: int | None = None, kernel: int | None = None) -> nn.Conv2d:
        weight, bias, kernel = self._slice(in_ch, out_ch, kernel)
        conv = nn.Conv2d(in_ch, weight.shape[0], kernel, self.stride, kernel // 2,
                         groups=in_ch if self.depthwise else 1, bias=bias is not None)
        conv.weight.data.copy_(weight)
        if bias is not None:
            conv.bias.data.copy_(bias)
        return conv


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of its largest setting."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        use_batch = self.training or self.running_mean is None
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.momentum is None:
            self.num_batches_tracked += 1
            momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c],
                            self.bias[:c], use_batch, momentum, self.eps)

    def extract(self, channels: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).data.copy_(getattr(self, name)[:channels])
        bn.num_batches_tracked.data.copy_(self.num_batches_tracked)
        return bn


class ElasticLinear(nn.Linear):
    """Linear layer whose input features follow the input (first columns of the weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)

    def extract(self, in_features: int) -> nn.Linear:
        lin = nn.Linear(in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data.copy_(self.weight[:, :in_features])
        if self.bias is not None:
            lin.bias.data.copy_(self.bias)
        return lin


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-and-excitation (static)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class ElasticSqueezeExcite(nn.Module):
    """Squeeze-and-excitation whose channels follow the input."""

    def __init__(self, max_channels: int, divisor: int = 4):
        super().__init__()
        self.divisor = divisor
        max_reduced = make_divisible(max_channels / divisor)
        self.reduce = ElasticConv2d(max_channels, max_reduced, 1, bias=True)
        self.expand = ElasticConv2d(max_reduced, max_channels, 1, bias=True)

    def reduced(self, channels: int) -> int:
        return make_divisible(channels / self.divisor)

    def forward(self, x):
        c = x.shape[1]
        s = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1), out_ch=self.reduced(c)))
        return x * F.hardsigmoid(self.expand(s, out_ch=c))

    def extract(self, channels: int) -> SqueezeExcite:
        reduced = self.reduced(channels)
        se = SqueezeExcite(channels, reduced)
        se.reduce = self.reduce.extract(channels, reduced)
        se.expand = self.expand.extract(reduced, channels)
        return se


class MBConv(nn.Module):
    """Static inverted-residual block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project."""

    def __init__(self, layers: nn.Sequential, residual: bool):
        super().__init__()
        self.layers, self.residual = layers, residual

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class ElasticMBConv(nn.Module):
    """Inverted-residual block with elastic expand ratio and kernel size.

    The input width follows the input tensor, so the same block serves exit
    branches whose previous layer has a searched width.
    """

    def __init__(self, max_in: int, max_out: int, max_expand: float, max_kernel: int,
                 stride: int = 1, se: bool = False, act: str = "relu"):
        super().__init__()
        self.stride, self.act_name, self.use_se = stride, act, se
        max_mid = make_divisible(max_in * max_expand)
        self.expand_conv = ElasticConv2d(max_in, max_mid, 1)
        self.expand_bn = ElasticBatchNorm2d(max_mid)
        self.dw_conv = ElasticConv2d(max_mid, max_mid, max_kernel, stride, depthwise=True)
        self.dw_bn = ElasticBatchNorm2d(max_mid)
        self.se = ElasticSqueezeExcite(max_mid) if se else None
        self.project_conv = ElasticConv2d(max_mid, max_out, 1)
        self.project_bn = ElasticBatchNorm2d(max_out)
        self.act = activation(act)

    def _mid(self, in_ch: int, expand: float) -> int:
        return make_divisible(in_ch * expand)

    def forward(self, x, expand: float, kernel: int, out_ch: int | None = None):
        in_ch = x.shape[1]
        y = x
        if expand != 1:
            y = self.act(self.expand_bn(self.expand_conv(y, out_ch=self._mid(in_ch, expand))))
        y = self.act(self.dw_bn(self.dw_conv(y, kernel=kernel)))
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y, out_ch=out_ch))
        return x + y if self.stride == 1 and y.shape[1] == in_ch else y

    def extract(self, in_ch: int, expand: float, kernel: int, out_ch: int | None = None) -> MBConv:
        out_ch = out_ch or self.project_conv.weight.shape[0]
        mid = in_ch
        layers: list[nn.Module] = []
        if expand != 1:
            mid = self._mid(in_ch, expand)
            layers += [self.expand_conv.extract(in_ch, mid), self.expand_bn.extract(mid),
                       activation(self.act_name)]
        layers += [self.dw_conv.extract(mid, kernel=kernel), self.dw_bn.extract(mid),
                   activation(self.act_name)]
        if self.se is not None:
            layers.append(self.se.extract(mid))
        layers += [self.project_conv.extract(mid, out_ch), self.project_bn.extract(out_ch)]
        return MBConv(nn.Sequential(*layers), residual=self.stride == 1 and in_ch == out_ch)


class ElasticConvBNAct(nn.Module):
    """conv -> BN -> activation with elastic output width and kernel."""

    def __init__(self, max_in: int, max_out: int, max_kernel: int = 3, stride: int = 1,
                 depthwise: bool = False, act: str = "relu"):
        super().__init__()
        self.conv = ElasticConv2d(max_in, max_out, max_kernel, stride, depthwise)
        self.bn = ElasticBatchNorm2d(max_out)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x, out_ch: int | None = None, kernel: int | None = None):
        return self.act(self.bn(self.conv(x, out_ch=out_ch, kernel=kernel)))

    def extract(self, in_ch: int, out_ch: int | None = None, kernel: int | None = None) -> nn.Sequential:
        conv = self.conv.extract(in_ch, out_ch, kernel)
        return nn.Sequential(conv, self.bn.extract(conv.out_channels), activation(self.act_name))
