"""The weight-sharing early-exit supernet and the static multi-exit network it extracts."""
from __future__ import annotations

import torch
from torch import nn

from ee_nas.models.backbone import ElasticBackbone
from ee_nas.models.branches import ElasticBranch


class MultiExitNet(nn.Module):
    """A static early-exit network: segment k runs the backbone up to exit k's tap, head k classifies.

    ``forward`` returns the logits of every exit (the last is the final classifier);
    the segment/head split is what the dynamic runtime and export use.
    """

    def __init__(self, segments: list[nn.Module], heads: list[nn.Module], taps: list[int]):
        super().__init__()
        if len(segments) != len(heads) or len(taps) != len(heads) - 1:
            raise ValueError("MultiExitNet needs one segment and one head per exit, and one tap per early exit")
        self.segments, self.heads, self.taps = nn.ModuleList(segments), nn.ModuleList(heads), list(taps)

    @property
    def n_exits(self) -> int:
        return len(self.heads)

    def truncated(self, n_exits: int) -> "MultiExitNet":
        """The first `n_exits` exits (sharing their modules): exit `n_exits - 1` becomes the final one, and the
        blocks after its tap are gone (`ee_nas.inference.load_run(drop_unreached=True)`)."""
        if not 1 <= n_exits <= self.n_exits:
            raise ValueError(f"cannot keep {n_exits} exits of a network with {self.n_exits}")
        return MultiExitNet(list(self.segments[:n_exits]), list(self.heads[:n_exits]), self.taps[:n_exits - 1])

    def forward(self, x):
        logits = []
        for segment, head in zip(self.segments, self.heads):
            x = segment(x)
            logits.append(head(x))
        return logits


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` forward; backward, its gradient times `scale` (1: unchanged, 0: none)."""
    if scale == 1.0 or not x.requires_grad:
        return x
    return x.detach() if scale == 0.0 else x * scale + x.detach() * (1.0 - scale)


class MultiExitSupernet(nn.Module):
    """Backbone supernet plus one weight-sharing branch supernet at every candidate tap."""
    # the share of the early exits' gradient that reaches the backbone (0: the exits learn on its features and
    # leave them as the final classifier alone trains them); MultiExitModule sets training.exit_grad_scale
    exit_grad_scale = 1.0

    def __init__(self, backbone: ElasticBackbone, space):
        super().__init__()
        self.backbone, self.space = backbone, space
        self.branches = nn.ModuleDict({
            str(t): ElasticBranch(backbone.block_out[t], backbone.num_classes, space.max_layers,
                                  space.ops, space.widths)
            for t in (space.candidate_taps if space.train_exits else [])  # a static net needs no branches
        })

    def forward(self, x, genome, exit_grad_scale: float | None = None):
        """Logits of every exit of `genome` (early exits in tap order, then the final classifier); the early exits
        send `exit_grad_scale` of their gradient into the backbone (None: the supernet's `exit_grad_scale`)."""
        self._check_exits(genome)
        scale = self.exit_grad_scale if exit_grad_scale is None else exit_grad_scale
        exits = {e.tap: e.layers for e in genome.exits}
        logits = []
        for block, x in self.backbone.iter_taps(x, genome):
            if block in exits:
                logits.append(self.branches[str(block)](scale_grad(x, scale), exits[block]))
        logits.append(self.backbone.head(x))
        return logits

    def _check_exits(self, genome) -> None:
        # forward would silently skip such an exit (one logit fewer than genome.n_exits)
        for exit_ in genome.exits:
            if not self.backbone.is_active(exit_.tap, genome.depths):
                raise ValueError(f"exit at tap {exit_.tap} sits on a block that the genome's depths drop")

    def extract(self, genome) -> MultiExitNet:
        """Copy the weights of one subnet into a plain static network."""
        bb = self.backbone
        self._check_exits(genome)
        segments, heads, current = [], [], [bb.extract_stem()]
        exits = {e.tap: e.layers for e in genome.exits}
        for block in bb.active_blocks(genome.depths):
            current.append(bb.extract_block(block, genome))
            if block in exits:
                segments.append(nn.Sequential(*current))
                heads.append(self.branches[str(block)].extract(exits[block]))
                current = []
        segments.append(nn.Sequential(*current))
        heads.append(bb.extract_head())
        return MultiExitNet(segments, heads, list(genome.taps))
