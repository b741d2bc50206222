"""The genome: one early-exit architecture inside the supernet.

A genome fixes the backbone (depth per stage, expand ratio and kernel per
block) and the exits: which blocks carry one (``tap``, a global block index)
and each branch's layers. The final classifier is always the last exit and is
not listed. Genomes are plain frozen data: hashable (archive keys), readable
as YAML (``arch.yaml``), and rebuilt with ``+arch=path``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

POOL_OPS = ("avgpool", "maxpool")
CONV_OPS = ("conv3x3", "dwsep3x3", "mbconv3", "mbconv6")
BRANCH_OPS = CONV_OPS + POOL_OPS


@dataclass(frozen=True)
class BranchLayer:
    op: str
    width: int = 0  # output channels; 0 for pooling (keeps its input width)

    def __post_init__(self):
        if self.op not in BRANCH_OPS:
            raise ValueError(f"unknown branch op {self.op!r}; valid: {list(BRANCH_OPS)}")
        if self.op in POOL_OPS:
            object.__setattr__(self, "width", 0)
        elif self.width <= 0:
            raise ValueError(f"branch layer {self.op!r} needs a positive width, got {self.width}")


@dataclass(frozen=True)
class ExitBranch:
    tap: int
    layers: tuple[BranchLayer, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(
            layer if isinstance(layer, BranchLayer) else BranchLayer(**layer) for layer in self.layers))


@dataclass(frozen=True)
class Genome:
    depths: tuple[int, ...]
    expands: tuple[float, ...]
    kernels: tuple[int, ...]
    exits: tuple[ExitBranch, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "expands", tuple(float(e) for e in self.expands))
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        exits = tuple(e if isinstance(e, ExitBranch) else ExitBranch(**e) for e in self.exits)
        object.__setattr__(self, "exits", tuple(sorted(exits, key=lambda e: e.tap)))
        if len(self.expands) != len(self.kernels):
            raise ValueError("genome needs one expand ratio and one kernel per block")
        taps = [e.tap for e in self.exits]
        if len(set(taps)) != len(taps):
            raise ValueError(f"genome has two exits at the same tap: {taps}")

    @property
    def taps(self) -> tuple[int, ...]:
        return tuple(e.tap for e in self.exits)

    @property
    def n_exits(self) -> int:
        """Number of exits including the final classifier."""
        return len(self.exits) + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"], d["expands"], d["kernels"] = list(self.depths), list(self.expands), list(self.kernels)
        d["exits"] = [{"tap": e.tap, "layers": [{"op": l.op, "width": l.width} for l in e.layers]}
                      for e in self.exits]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Genome":
        unknown = set(d) - {"depths", "expands", "kernels", "exits"}
        if unknown:
            raise ValueError(f"unknown genome keys {sorted(unknown)}")
        return cls(**d)

    def key(self) -> str:
        """Stable text key (archive index, caches)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        from ee_nas.utils import atomic_write_text

        return atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "Genome":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"architecture file {path} does not exist")
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "genome" in data:
            data = data["genome"]
        return cls.from_dict(data)
