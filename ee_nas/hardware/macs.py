"""MAC accounting, per module, and the early-exit cost definitions of DESIGN.md.

MACs are counted the field's way (AEBNAS, NACHOS, EDANAS, OFA, torchvision's
published ``_ops``): multiply-accumulates of convolutions and linear layers
(matmuls) only. BatchNorm is taken as folded into the preceding convolution;
activations, pooling, residual adds, squeeze-excitation products and bias adds
are not counted. A conv is Cout * Cin/groups * k*k * Hout*Wout, a linear layer
in * out per row. On torchvision's ImageNet models at 224x224 this reproduces
the published ``_ops`` (MobileNetV3-Large 216.6 M vs 0.217 G, MobileNetV3-Small
56.5 M vs 0.057 G, ResNet-18 1814.1 M vs 1.814 G), so a budget from a paper
(NACHOS's 2.7 M MACs) means the same thing here.

Counter: torch's own ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x MACs
of convolution / mm / addmm / bmm ops, bias adds excluded), not ptflops. ptflops
can ignore module types, but only from a list we would derive from its internal
``pytorch_ops.MODULES_MAPPING``, and its conv and linear hooks count bias adds,
which the convention above leaves out (so does ``_ops``; at three decimals the
bias adds, < 0.01 %, are below its rounding): we would have had to replace both
of its hooks, leaving ptflops nothing to do. FlopCounterMode counts at the aten
level, so a conv or matmul called functionally is counted too and nothing else is.

cum_macs[k] = MACs of the backbone up to exit k's tap + MACs of branches 1..k.
avg_macs    = sum_k exit_rate[k] * cum_macs[k].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def module_macs(module: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass of `module` on one sample of shape C,H,W.

    MACs of convolutions and linear layers only (see the module docstring); parameters: all of them.
    """
    was = module.training
    module.eval()
    first = next(module.parameters(), None)
    x = torch.zeros(1, *input_shape, dtype=first.dtype if first is not None else torch.float32,
                    device=first.device if first is not None else "cpu")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was)
    return counter.get_total_flops() // 2, sum(p.numel() for p in module.parameters())


def cum_macs(segment_macs: Sequence[float], head_macs: Sequence[float]) -> np.ndarray:
    """cum_macs[k]: every segment up to k plus every head up to k (earlier heads ran and declined)."""
    return np.cumsum(segment_macs) + np.cumsum(head_macs)


def avg_macs(exit_rates: Sequence[float], cum: Sequence[float]) -> float:
    rates = np.asarray(exit_rates, dtype=float)
    if rates.shape != np.shape(cum) or not np.isclose(rates.sum(), 1.0) or (rates < 0).any():
        raise ValueError(f"exit_rates {rates.tolist()} must be >= 0, sum to 1 and match the {len(cum)} exits")
    return float(rates @ np.asarray(cum, dtype=float))


@dataclass(frozen=True)
class ExitCosts:
    segment_macs: np.ndarray   # backbone MACs between consecutive taps (final segment included)
    head_macs: np.ndarray      # MACs of each exit head (final classifier last)
    params: int                # parameters of the whole multi-exit network
    backbone_macs: int         # the same backbone with no early exits (segments + final head)

    @property
    def cum_macs(self) -> np.ndarray:
        return cum_macs(self.segment_macs, self.head_macs)

    def avg_macs(self, exit_rates) -> float:
        return avg_macs(exit_rates, self.cum_macs)


def net_costs(net, input_shape: Sequence[int]) -> ExitCosts:
    """Costs of a static `MultiExitNet`, measured module by module."""
    seg, head, params = [], [], 0
    x = torch.zeros(1, *input_shape)
    with torch.no_grad():
        for segment, h in zip(net.segments, net.heads):
            m, p = module_macs(segment, x.shape[1:])
            seg.append(m); params += p
            x = segment.eval()(x)
            m, p = module_macs(h, x.shape[1:])
            head.append(m); params += p
    return ExitCosts(np.array(seg, float), np.array(head, float), params, int(sum(seg) + head[-1]))


class CostModel:
    """Per-component MACs of any subnet of a supernet, memoized.

    Each backbone block (at each elastic setting) and each branch design at
    each tap is extracted once and counted (`module_macs`); a genome's costs are
    then sums, so scoring thousands of candidates costs no model building.
    """

    def __init__(self, supernet):
        self.supernet = supernet
        bb = supernet.backbone
        self._in_shape = (bb.in_channels, bb.image_size, bb.image_size)
        self._tap_shape = self._tap_shapes()
        self.block_cost = lru_cache(maxsize=None)(self._block_cost)
        self.branch_cost = lru_cache(maxsize=None)(self._branch_cost)
        # counted on CPU copies, wherever the supernet lives
        self.stem_cost = module_macs(bb.extract_stem().cpu(), self._in_shape)
        self.head_cost = module_macs(bb.extract_head().cpu(), self._tap_shape[bb.n_blocks - 1])

    def _tap_shapes(self) -> list[tuple[int, int, int]]:
        bb = self.supernet.backbone
        return [(c, r, r) for c, r in zip(bb.block_out, bb.tap_resolution)]

    def _block_in_shape(self, block: int) -> tuple[int, int, int]:
        bb = self.supernet.backbone
        if block == 0:
            with torch.no_grad():
                return tuple(bb.extract_stem().cpu().eval()(torch.zeros(1, *self._in_shape)).shape[1:])
        return self._tap_shape[block - 1]

    def _block_cost(self, block: int, expand: float, kernel: int) -> tuple[int, int]:
        module = self.supernet.backbone.blocks[block].extract(
            self.supernet.backbone.block_in(block), expand, kernel)
        return module_macs(module.cpu(), self._block_in_shape(block))

    def _branch_cost(self, tap: int, layers) -> tuple[int, int]:
        module = self.supernet.branches[str(tap)].extract(layers)
        return module_macs(module.cpu(), self._tap_shape[tap])

    def costs(self, genome) -> ExitCosts:
        bb = self.supernet.backbone
        exits = {e.tap: e.layers for e in genome.exits}
        seg, head = [], []
        current, params = self.stem_cost[0], self.stem_cost[1]
        for b in bb.active_blocks(genome.depths):
            m, p = self.block_cost(b, genome.expands[b], genome.kernels[b])
            current += m; params += p
            if b in exits:
                hm, hp = self.branch_cost(b, exits[b])
                seg.append(current); head.append(hm); params += hp
                current = 0
        seg.append(current); head.append(self.head_cost[0]); params += self.head_cost[1]
        return ExitCosts(np.array(seg, float), np.array(head, float), params, int(sum(seg) + head[-1]))
