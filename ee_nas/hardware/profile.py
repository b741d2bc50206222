"""Hardware profiles: the budget a candidate must meet and what its MACs cost on the device."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareProfile:
    """A target device.

    `target_macs` (absolute) or `target_fraction` (of the reference backbone's
    MACs) sets the avg-MACs constraint; both null means unconstrained.
    """

    name: str = "unconstrained"
    target_macs: float | None = None
    target_fraction: float | None = None
    max_params: int | None = None
    energy_per_mac_pj: float | None = None

    def __post_init__(self):
        if self.target_macs is not None and self.target_fraction is not None:
            raise ValueError(f"hardware {self.name!r}: set target_macs or target_fraction, not both")
        if self.target_macs is not None and self.target_macs <= 0:
            raise ValueError(f"hardware.target_macs={self.target_macs}: must be > 0 (or null for no target)")
        if self.target_fraction is not None and not 0 < self.target_fraction <= 1:
            raise ValueError(f"hardware.target_fraction={self.target_fraction}: must be in (0, 1]")
        if self.max_params is not None and self.max_params <= 0:
            raise ValueError(f"hardware.max_params={self.max_params}: must be > 0 (or null)")

    def target(self, reference_macs: float) -> float | None:
        """The avg-MACs budget in MACs, given the reference (largest) backbone's MACs."""
        if self.target_fraction is not None:
            return self.target_fraction * reference_macs
        return self.target_macs

    def energy_mj(self, macs: float) -> float | None:
        """Energy estimate in millijoules for `macs` MACs (null when the profile sets no energy)."""
        return None if self.energy_per_mac_pj is None else macs * self.energy_per_mac_pj * 1e-9
