"""Common shape of an elastic backbone: stem -> elastic blocks (one exit tap each) -> final head.

Blocks are numbered globally (0..n_blocks-1); block ``b`` belongs to stage
``block_stage[b]`` and is active when its index inside the stage is below the
genome's depth for that stage. Every active block's output is an exit tap.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class ElasticBackbone(nn.Module):
    """Subclasses fill ``stem``, ``blocks``, ``block_stage``, ``block_out`` and ``head``."""

    stem: nn.Module
    blocks: nn.ModuleList
    head: nn.Module  # the final classifier: features of the last block -> logits

    def __init__(self, stage_depths: Sequence[int], min_depth: int, expand_choices: Sequence[float],
                 kernel_choices: Sequence[int], image_size: int, in_channels: int, num_classes: int):
        super().__init__()
        if min_depth < 1 or any(d < min_depth for d in stage_depths):
            raise ValueError(f"backbone.min_depth={min_depth} must be >= 1 and <= every stage depth "
                             f"{list(stage_depths)}")
        self.stage_depths = [int(d) for d in stage_depths]
        self.min_depth = int(min_depth)
        self.expand_choices = sorted(float(e) for e in expand_choices)
        self.kernel_choices = sorted(int(k) for k in kernel_choices)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.block_stage = [s for s, d in enumerate(self.stage_depths) for _ in range(d)]
        self.block_index = [i for d in self.stage_depths for i in range(d)]
        self.block_out: list[int] = []

    @property
    def n_blocks(self) -> int:
        return len(self.block_stage)

    def is_active(self, block: int, depths: Sequence[int]) -> bool:
        return self.block_index[block] < depths[self.block_stage[block]]

    def active_blocks(self, depths: Sequence[int]) -> list[int]:
        return [b for b in range(self.n_blocks) if self.is_active(b, depths)]

    def iter_taps(self, x: torch.Tensor, genome) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (block, features) after every active block."""
        x = self.stem(x)
        for b in self.active_blocks(genome.depths):
            x = self.blocks[b](x, genome.expands[b], genome.kernels[b])
            yield b, x

    def extract_block(self, block: int, genome) -> nn.Module:
        in_ch = self.block_in(block)
        return self.blocks[block].extract(in_ch, genome.expands[block], genome.kernels[block])

    def block_in(self, block: int) -> int:
        return self.stem_out if block == 0 else self.block_out[block - 1]

    def extract_stem(self) -> nn.Module:
        return copy.deepcopy(self.stem)

    def extract_head(self) -> nn.Module:
        return copy.deepcopy(self.head)

    def _record_tap_shapes(self) -> None:
        """Spatial size at every tap, from a dry run of the largest backbone."""
        from ee_nas.genome import Genome

        largest = Genome(self.stage_depths, [self.expand_choices[-1]] * self.n_blocks,
                         [self.kernel_choices[-1]] * self.n_blocks)
        with torch.no_grad():
            was = self.training
            self.eval()
            x = torch.zeros(1, self.in_channels, self.image_size, self.image_size)
            self.stem_out = self.stem(x).shape[1]
            self.tap_resolution = [t.shape[-1] for _, t in self.iter_taps(x, largest)]
            self.train(was)
