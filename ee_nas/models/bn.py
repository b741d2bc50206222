"""BatchNorm recalibration: every extracted subnet needs statistics of its own.

Shared supernet statistics mix many subnets (and MobileNetV3's low momentum
leaves them stale after short runs): a fresh cumulative average over a fixed
calibration batch of training images fixes both (DESIGN.md, pitfalls).
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def recalibrate_bn(net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return net.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every calibration batch counts equally
    net.train()
    for start in range(0, len(images), batch_size):
        net(images[start:start + batch_size])
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return net.eval()
