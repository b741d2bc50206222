"""The search space: which genomes exist, and how to sample, mutate, cross, repair and encode them.

One class serves the three spaces of the paper's comparison, set by config:
``aebnas`` (backbone + exit placement + branch depth/ops/widths),
``placement_only`` (one fixed branch design, searched placement: NACHOS/EDANAS)
and ``fixed`` (hand-placed exits, fixed backbone: BranchyNet/SDN, no search).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ee_nas.genome import BRANCH_OPS, POOL_OPS, BranchLayer, ExitBranch, Genome

# from the most to the least expensive; "largest"/"smallest" subnets for the sandwich rule use it
OP_COST_ORDER = ("mbconv6", "mbconv3", "conv3x3", "dwsep3x3", "avgpool", "maxpool")


class SearchSpace:
    def __init__(self, backbone, name: str = "aebnas", exit_taps: str | Sequence[int] = "all",
                 min_exits: int = 1, max_exits: int = 3, search_backbone: bool = True,
                 branch: Mapping | None = None, min_exit_saving: float = 0.0, train_exits: bool | None = None):
        branch = dict(branch or {})
        self.name, self.search_backbone = name, bool(search_backbone)
        self.stage_depths, self.min_depth = list(backbone.stage_depths), backbone.min_depth
        self.expand_choices, self.kernel_choices = list(backbone.expand_choices), list(backbone.kernel_choices)
        self.block_stage, self.block_index = list(backbone.block_stage), list(backbone.block_index)
        self.n_blocks = backbone.n_blocks
        self.ops = [str(op) for op in branch.get("ops", ["dwsep3x3"])]
        self.widths = sorted(int(w) for w in branch.get("widths", [32]))
        self.min_layers, self.max_layers = int(branch.get("min_layers", 0)), int(branch.get("max_layers", 2))
        self._check_branch()
        last = self.n_blocks - 1
        taps = list(range(last)) if exit_taps == "all" else [int(t) for t in exit_taps]
        bad = [t for t in taps if not 0 <= t < last]
        if bad or not taps or len(set(taps)) != len(taps):
            raise ValueError(f"search_space.exit_taps={list(taps)}: taps must be distinct block indices in "
                             f"[0, {last - 1}] (the backbone has {self.n_blocks} blocks; the last one feeds "
                             f"the final classifier)")
        self.candidate_taps = sorted(taps)
        if not 0 <= min_exits <= max_exits or max_exits > len(self.candidate_taps):
            raise ValueError(f"search_space.min_exits={min_exits}, max_exits={max_exits}: need "
                             f"0 <= min_exits <= max_exits <= {len(self.candidate_taps)} (candidate taps)")
        self.min_exits, self.max_exits = int(min_exits), int(max_exits)
        if not 0.0 <= float(min_exit_saving) < 1.0 or (min_exit_saving and not self.max_exits):
            raise ValueError(f"search_space.min_exit_saving={min_exit_saving}: need 0 <= min_exit_saving < 1, and "
                             "0 for a space without early exits")
        # a network whose exits save less than this share of its own backbone's cost is no early-exit network
        self.min_exit_saving = float(min_exit_saving)
        # branches at every tap while the supernet trains (null: where the search may deploy exits). True with
        # max_exits 0: auxiliary exits that train the backbone (deep supervision) and are never deployed
        self.train_exits = bool(self.max_exits) if train_exits is None else bool(train_exits)
        if self.max_exits and not self.train_exits:
            raise ValueError(f"search_space.train_exits=false with max_exits={self.max_exits}: the search would "
                             "deploy exits the supernet never trained")

    def _check_branch(self) -> None:
        unknown = [op for op in self.ops if op not in BRANCH_OPS]
        if not self.ops or unknown:
            raise ValueError(f"search_space.branch.ops={self.ops}: valid ops are {list(BRANCH_OPS)}")
        if not self.widths or min(self.widths) <= 0:
            raise ValueError(f"search_space.branch.widths={self.widths}: need at least one positive width")
        if not 0 <= self.min_layers <= self.max_layers:
            raise ValueError(f"search_space.branch: need 0 <= min_layers ({self.min_layers}) <= "
                             f"max_layers ({self.max_layers})")

    # -- structure -------------------------------------------------------------------------------
    def depth_range(self, stage: int) -> tuple[int, int]:
        top = self.stage_depths[stage]
        return (self.min_depth if self.search_backbone else top), top

    def active_taps(self, depths: Sequence[int]) -> list[int]:
        """Candidate taps whose block runs and is not the last running block."""
        active = [b for b in range(self.n_blocks) if self.block_index[b] < depths[self.block_stage[b]]]
        return [t for t in self.candidate_taps if t in active[:-1]]

    @property
    def is_fixed(self) -> bool:
        """True when the space holds one genome (nothing to search)."""
        one_branch = self.min_layers == self.max_layers and (
            self.max_layers == 0 or (len(self.ops) == 1 and (self.ops[0] in POOL_OPS or len(self.widths) == 1)))
        backbone_fixed = not self.search_backbone or (
            all(d == self.min_depth for d in self.stage_depths)
            and len(self.expand_choices) == len(self.kernel_choices) == 1)
        if self.max_exits == 0:  # a static network (no early exits)
            return backbone_fixed
        return one_branch and backbone_fixed and self.min_exits == self.max_exits == len(self.candidate_taps)

    def training_taps(self, depths: Sequence[int]) -> list[int]:
        """Taps that carry a branch while the supernet trains: all active ones (none without `train_exits`)."""
        return self.active_taps(depths) if self.train_exits else []

    def _backbone(self, depths, expands, kernels) -> dict:
        if not self.search_backbone:
            return dict(depths=self.stage_depths, expands=[self.expand_choices[-1]] * self.n_blocks,
                        kernels=[self.kernel_choices[-1]] * self.n_blocks)
        return dict(depths=depths, expands=expands, kernels=kernels)

    # -- sampling --------------------------------------------------------------------------------
    def _random_layer(self, rng: np.random.Generator) -> BranchLayer:
        return BranchLayer(str(rng.choice(self.ops)), int(rng.choice(self.widths)))

    def _random_branch(self, tap: int, rng: np.random.Generator) -> ExitBranch:
        n = int(rng.integers(self.min_layers, self.max_layers + 1))
        return ExitBranch(tap, tuple(self._random_layer(rng) for _ in range(n)))

    def _random_backbone(self, rng: np.random.Generator) -> dict:
        depths = [int(rng.integers(lo, hi + 1)) for lo, hi in map(self.depth_range, range(len(self.stage_depths)))]
        expands = [float(rng.choice(self.expand_choices)) for _ in range(self.n_blocks)]
        kernels = [int(rng.choice(self.kernel_choices)) for _ in range(self.n_blocks)]
        return self._backbone(depths, expands, kernels)

    def sample(self, rng: np.random.Generator) -> Genome:
        """A uniformly drawn valid genome (search population)."""
        bb = self._random_backbone(rng)
        taps = self.active_taps(bb["depths"])
        hi = min(self.max_exits, len(taps))
        n = int(rng.integers(min(self.min_exits, hi), hi + 1))
        chosen = sorted(int(t) for t in rng.choice(taps, size=n, replace=False)) if n else []
        return self.repair(Genome(**bb, exits=[self._random_branch(t, rng) for t in chosen]))

    def _fixed_layers(self, op_order: Sequence[str], width: int, n: int) -> tuple[BranchLayer, ...]:
        op = next(op for op in op_order if op in self.ops)
        return tuple(BranchLayer(op, width) for _ in range(n))

    def largest(self) -> Genome:
        """Biggest subnet, with a branch at every candidate tap (sandwich rule, training)."""
        layers = self._fixed_layers(OP_COST_ORDER, self.widths[-1], self.max_layers)
        bb = self._backbone(self.stage_depths, [self.expand_choices[-1]] * self.n_blocks,
                            [self.kernel_choices[-1]] * self.n_blocks)
        return Genome(**bb, exits=[ExitBranch(t, layers) for t in self.training_taps(bb["depths"])])

    def largest_backbone(self) -> Genome:
        """The largest backbone with no early exits: the reference for relative MACs and hypervolume."""
        return Genome(self.stage_depths, [self.expand_choices[-1]] * self.n_blocks,
                      [self.kernel_choices[-1]] * self.n_blocks)

    def smallest(self) -> Genome:
        """Smallest subnet, still with a branch at every tap it keeps (sandwich rule, training)."""
        layers = self._fixed_layers(OP_COST_ORDER[::-1], self.widths[0], self.min_layers)
        depths = [self.depth_range(s)[0] for s in range(len(self.stage_depths))]
        bb = self._backbone(depths, [self.expand_choices[0]] * self.n_blocks, [self.kernel_choices[0]] * self.n_blocks)
        return Genome(**bb, exits=[ExitBranch(t, layers) for t in self.training_taps(bb["depths"])])

    def sample_training(self, rng: np.random.Generator) -> Genome:
        """A random subnet with a random branch at every active tap, so each step trains every tap."""
        bb = self._random_backbone(rng)
        return Genome(**bb, exits=[self._random_branch(t, rng) for t in self.training_taps(bb["depths"])])

    def training_genomes(self, rng: np.random.Generator, n_random: int) -> list[Genome]:
        """Sandwich rule: the largest backbone, the smallest subnet and `n_random` random subnets (duplicates
        dropped), each with a branch at every tap it keeps. The largest backbone's branches are random too: the
        costliest branch at every tap took 40% of a training step and gave one op most of the updates."""
        top = self.largest()
        top = Genome(top.depths, top.expands, top.kernels, [self._random_branch(e.tap, rng) for e in top.exits])
        genomes = [top, self.smallest()] + [self.sample_training(rng) for _ in range(n_random)]
        unique = {g.key(): g for g in genomes}
        return list(unique.values())

    def default_genome(self) -> Genome:
        """The genome a fixed space stands for; for others the largest backbone with the first taps."""
        return self.largest_with_cheap_exits(self.max_exits if self.is_fixed else self.min_exits)

    def largest_with_cheap_exits(self, n: int) -> Genome:
        """The largest backbone with the cheapest branch (fewest layers, cheapest op, narrowest) at its first `n`
        taps: the best-trained subnet (the sandwich rule trains it at every step), with exits cheap and early
        enough to pay for it under a tight budget."""
        g = self.largest()
        layers = self._fixed_layers(OP_COST_ORDER[::-1], self.widths[0], self.min_layers)
        return self.repair(Genome(g.depths, g.expands, g.kernels, [ExitBranch(e.tap, layers) for e in g.exits[:n]]))

    # -- variation ---------------------------------------------------------------------------------
    def mutate(self, genome: Genome, rng: np.random.Generator, prob: float = 0.1) -> Genome:
        """Resample each gene with probability `prob`; exits appear/disappear per tap likewise."""
        fresh = self._random_backbone(rng)
        bb = {k: [f if rng.random() < prob else o for o, f in zip(getattr(genome, k), fresh[k])]
              for k in ("depths", "expands", "kernels")}
        exits = {e.tap: e for e in genome.exits}
        for tap in self.candidate_taps:
            if rng.random() < prob:
                exits.pop(tap, None) if tap in exits else exits.__setitem__(tap, self._random_branch(tap, rng))
            elif tap in exits:
                exits[tap] = self._mutate_branch(exits[tap], rng, prob)
        return self.repair(Genome(**self._backbone(**bb), exits=list(exits.values())))

    def _mutate_branch(self, branch: ExitBranch, rng: np.random.Generator, prob: float) -> ExitBranch:
        layers = [self._random_layer(rng) if rng.random() < prob else layer for layer in branch.layers]
        if rng.random() < prob:
            n = int(rng.integers(self.min_layers, self.max_layers + 1))
            layers = (layers + [self._random_layer(rng) for _ in range(n)])[:n]
        return ExitBranch(branch.tap, tuple(layers))

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        """Uniform crossover per backbone gene and per tap (an exit travels with its branch)."""
        pick = lambda x, y: [u if rng.random() < 0.5 else v for u, v in zip(x, y)]  # noqa: E731
        bb = {k: pick(getattr(a, k), getattr(b, k)) for k in ("depths", "expands", "kernels")}
        ea, eb = {e.tap: e for e in a.exits}, {e.tap: e for e in b.exits}
        exits = [e for t in self.candidate_taps
                 if (e := (ea.get(t) if rng.random() < 0.5 else eb.get(t))) is not None]
        return self.repair(Genome(**self._backbone(**bb), exits=exits))

    # -- validity ----------------------------------------------------------------------------------
    def problems(self, genome: Genome) -> list[str]:
        """Every reason this genome is outside the space (empty when valid)."""
        out = []
        if len(genome.depths) != len(self.stage_depths) or len(genome.expands) != self.n_blocks:
            return [f"genome has {len(genome.depths)} stages / {len(genome.expands)} blocks; the backbone has "
                    f"{len(self.stage_depths)} / {self.n_blocks}"]
        for s, d in enumerate(genome.depths):
            lo, hi = self.depth_range(s)
            if not lo <= d <= hi:
                out.append(f"depth of stage {s} is {d}, valid {lo}..{hi}")
        for b, (e, k) in enumerate(zip(genome.expands, genome.kernels)):
            if e not in self.expand_choices or k not in self.kernel_choices:
                out.append(f"block {b}: expand {e} / kernel {k} not in {self.expand_choices} / {self.kernel_choices}")
        if not self.search_backbone and genome.to_dict() != self._fixed_backbone_dict(genome):
            out.append("this search space keeps the backbone fixed at its largest setting")
        active = self.active_taps(genome.depths)
        for e in genome.exits:
            if e.tap not in active:
                out.append(f"exit at tap {e.tap} is not an active candidate tap {active}")
            if not self.min_layers <= len(e.layers) <= self.max_layers:
                out.append(f"exit at tap {e.tap} has {len(e.layers)} layers, valid {self.min_layers}..{self.max_layers}")
            for layer in e.layers:
                if layer.op not in self.ops or (layer.width and layer.width not in self.widths):
                    out.append(f"exit at tap {e.tap}: layer {layer.op}/{layer.width} not in ops {self.ops} "
                               f"widths {self.widths}")
        if not self.min_exits <= len(genome.exits) <= self.max_exits:
            out.append(f"{len(genome.exits)} early exits, valid {self.min_exits}..{self.max_exits}")
        return out

    def _fixed_backbone_dict(self, genome: Genome) -> dict:
        return Genome(**self._backbone(None, None, None), exits=genome.exits).to_dict()

    def validate(self, genome: Genome) -> Genome:
        problems = self.problems(genome)
        if problems:
            raise ValueError(f"genome is not in search space {self.name!r}: " + "; ".join(problems))
        return genome

    def repair(self, genome: Genome) -> Genome:
        """Drop exits on inactive taps, clip to max_exits, fill to min_exits at the earliest free taps."""
        active = self.active_taps(genome.depths)
        exits = [e for e in genome.exits if e.tap in active][: self.max_exits]
        taken = {e.tap for e in exits}
        layers = self._fixed_layers(OP_COST_ORDER[::-1], self.widths[0], self.min_layers)
        for tap in active:
            if len(exits) >= self.min_exits:
                break
            if tap not in taken:
                exits.append(ExitBranch(tap, layers))
        return Genome(genome.depths, genome.expands, genome.kernels, exits)

    # -- integer encoding (pymoo, predictors) ------------------------------------------------------
    @property
    def n_var(self) -> int:
        return len(self.stage_depths) + 2 * self.n_blocks + len(self.candidate_taps) * (2 + 2 * self.max_layers)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = [self.depth_range(s)[0] for s in range(len(self.stage_depths))] + [0] * (2 * self.n_blocks)
        hi = [self.depth_range(s)[1] for s in range(len(self.stage_depths))]
        hi += [len(self.expand_choices) - 1, len(self.kernel_choices) - 1] * self.n_blocks
        per_tap_hi = [1, self.max_layers] + [len(self.ops) - 1, len(self.widths) - 1] * self.max_layers
        lo += [0] * len(self.candidate_taps) * len(per_tap_hi)
        hi += per_tap_hi * len(self.candidate_taps)
        return np.array(lo), np.array(hi)

    def encode(self, genome: Genome) -> np.ndarray:
        x = list(genome.depths)
        for e, k in zip(genome.expands, genome.kernels):
            x += [self.expand_choices.index(e), self.kernel_choices.index(k)]
        exits = {e.tap: e for e in genome.exits}
        for tap in self.candidate_taps:
            e = exits.get(tap)
            genes = [0, 0] + [0, 0] * self.max_layers
            if e is not None:
                genes[0], genes[1] = 1, len(e.layers)
                for i, layer in enumerate(e.layers):
                    genes[2 + 2 * i] = self.ops.index(layer.op)
                    genes[3 + 2 * i] = self.widths.index(layer.width) if layer.width else 0
            x += genes
        return np.array(x, dtype=np.int64)

    def decode(self, x: Sequence[int]) -> Genome:
        x = [int(v) for v in x]
        n_st, n_b = len(self.stage_depths), self.n_blocks
        depths = x[:n_st]
        expands = [self.expand_choices[x[n_st + 2 * b]] for b in range(n_b)]
        kernels = [self.kernel_choices[x[n_st + 2 * b + 1]] for b in range(n_b)]
        exits, pos, per_tap = [], n_st + 2 * n_b, 2 + 2 * self.max_layers
        for i, tap in enumerate(self.candidate_taps):
            genes = x[pos + i * per_tap: pos + (i + 1) * per_tap]
            if genes[0]:
                layers = [BranchLayer(self.ops[genes[2 + 2 * j]], self.widths[genes[3 + 2 * j]])
                          for j in range(genes[1])]
                exits.append(ExitBranch(tap, tuple(layers)))
        return Genome(depths, expands, kernels, exits)
