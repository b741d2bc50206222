"""Hardware profiles: the budget a candidate must meet and what it costs on the device.

A profile picks the search's cost `objective`:

- ``macs``: the avg-MACs constraint is `target_macs` (absolute) or
  `target_fraction` of the reference (largest) backbone's MACs;
- ``latency``: the avg-latency constraint is `target_latency_ms` (absolute) or
  `target_fraction` of the reference backbone's latency, both predicted by a
  latency look-up table (`latency_lut`: a LUT file, or ``measure`` to time this
  machine; see `ee_nas.hardware.latency`).

No target means unconstrained. `max_params` and `max_memory_bytes` (peak
activation memory at batch size 1) are optional caps; `energy_per_mac_pj`
gives an energy estimate.

Profiles come from ``conf/hardware/*.yaml`` through `make_profile`, which names
an unknown key instead of failing with a bare ``TypeError``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

OBJECTIVES = ("macs", "latency")
MEASURE_LUT = "measure"


def _bad(key: str, value, valid: str) -> ValueError:
    return ValueError(f"hardware.{key}={value!r} is invalid; {valid}")


@dataclass(frozen=True)
class HardwareProfile:
    """A target device: the cost objective, its budget and optional caps."""

    name: str = "unconstrained"
    objective: str = "macs"                 # macs | latency
    target_macs: float | None = None        # objective macs: absolute avg-MACs budget
    target_fraction: float | None = None    # either objective: fraction of the reference backbone's cost
    target_latency_ms: float | None = None  # objective latency: absolute avg-latency budget (ms, batch 1)
    max_params: int | None = None
    max_memory_bytes: int | None = None     # peak activation memory at batch size 1
    energy_per_mac_pj: float | None = None
    latency_lut: str | None = None          # null | path to a LUT json | "measure" (time this machine)
    lut_threads: int = 1                    # torch threads while measuring (and deploying) latency

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise _bad("objective", self.objective, f"valid: {', '.join(OBJECTIVES)}")
        for key in ("target_macs", "target_latency_ms", "max_params", "max_memory_bytes", "energy_per_mac_pj"):
            value = getattr(self, key)
            if value is not None and not _positive(value):
                raise _bad(key, value, "must be > 0 (or null)")
        if self.target_fraction is not None and not (_number(self.target_fraction)
                                                     and 0 < self.target_fraction <= 1):
            raise _bad("target_fraction", self.target_fraction, "must be in (0, 1] (or null)")
        if isinstance(self.lut_threads, bool) or not isinstance(self.lut_threads, int) or self.lut_threads < 1:
            raise _bad("lut_threads", self.lut_threads, "must be an integer >= 1")
        if self.latency_lut is not None and (not isinstance(self.latency_lut, str) or not self.latency_lut):
            raise _bad("latency_lut", self.latency_lut, f"must be null, {MEASURE_LUT!r} or the path of a LUT file")
        targets = [k for k in ("target_macs", "target_fraction", "target_latency_ms") if getattr(self, k) is not None]
        if len(targets) > 1:
            raise ValueError(f"hardware {self.name!r}: set one of target_macs, target_fraction, target_latency_ms; "
                             f"got {', '.join(f'hardware.{k}={getattr(self, k)!r}' for k in targets)}")
        if self.objective == "macs" and self.target_latency_ms is not None:
            raise _bad("target_latency_ms", self.target_latency_ms,
                       "needs hardware.objective=latency (with objective macs use target_macs or target_fraction)")
        if self.objective == "latency":
            if self.target_macs is not None:
                raise _bad("target_macs", self.target_macs,
                           "needs hardware.objective=macs (with objective latency use target_latency_ms or "
                           "target_fraction)")
            if self.latency_lut is None:
                raise _bad("latency_lut", None, f"objective latency needs a latency LUT: {MEASURE_LUT!r} "
                                                "(time this machine) or the path of a LUT file")

    @property
    def unit(self) -> str:
        """Unit of the objective's costs and budget."""
        return "MACs" if self.objective == "macs" else "ms"

    @property
    def uses_latency(self) -> bool:
        """True when a latency LUT is configured (the objective, or reported next to MACs)."""
        return self.latency_lut is not None

    def target(self, reference: float) -> float | None:
        """The budget in the objective's unit (MACs or ms), given the reference backbone's cost in that unit.

        With objective macs this is the avg-MACs budget (reference = largest backbone's MACs), as before.
        """
        if self.target_fraction is not None:
            return self.target_fraction * reference
        return self.target_macs if self.objective == "macs" else self.target_latency_ms

    def energy_mj(self, macs: float) -> float | None:
        """Energy estimate in millijoules for `macs` MACs (null when the profile sets no energy)."""
        return None if self.energy_per_mac_pj is None else macs * self.energy_per_mac_pj * 1e-9

    def violations(self, params: int | None = None, memory_bytes: int | None = None) -> list[str]:
        """The caps (params, peak activation memory) a candidate breaks; empty when it fits."""
        out = []
        if self.max_params is not None and params is not None and params > self.max_params:
            out.append(f"params {params} > hardware.max_params={self.max_params}")
        if self.max_memory_bytes is not None and memory_bytes is not None and memory_bytes > self.max_memory_bytes:
            out.append(f"peak activation memory {memory_bytes} B > hardware.max_memory_bytes={self.max_memory_bytes}")
        return out

    def cap_excess(self, params: int | None = None, memory_bytes: int | None = None) -> float:
        """The search's cap constraint: the caps' relative excesses summed (params / max_params - 1, ...),
        0.0 when every cap holds (or none is set)."""
        excess = 0.0
        for value, cap in ((params, self.max_params), (memory_bytes, self.max_memory_bytes)):
            if cap is not None and value is not None and value > cap:
                excess += value / cap - 1.0
        return excess

    @property
    def caps(self) -> list[str]:
        """The caps this profile sets, as `hardware.key=value` (empty when none)."""
        return [f"hardware.{k}={getattr(self, k)}" for k in ("max_params", "max_memory_bytes")
                if getattr(self, k) is not None]

    @classmethod
    def from_dict(cls, cfg: Mapping) -> "HardwareProfile":
        return make_profile(**dict(cfg))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _number(value) and value > 0


FIELDS = tuple(f.name for f in dataclasses.fields(HardwareProfile))


def make_profile(**cfg) -> HardwareProfile:
    """Build a profile from config keys (the ``_target_`` of conf/hardware/*.yaml).

    An unknown key fails with its name and the valid keys (the dataclass alone
    would raise a bare TypeError); numbers written as YAML strings (``2.7e6``
    without a dot reads as a string in YAML 1.1) are converted.
    """
    unknown = [k for k in cfg if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown hardware key(s) {', '.join(f'hardware.{k}' for k in unknown)}; "
                         f"valid keys: {', '.join(FIELDS)}")
    for key in ("target_macs", "target_fraction", "target_latency_ms", "energy_per_mac_pj"):
        cfg[key] = _as_number(key, cfg.get(key), float)
    for key in ("max_params", "max_memory_bytes", "lut_threads"):
        if key in cfg:
            cfg[key] = _as_number(key, cfg[key], int)
    if cfg.get("latency_lut") is not None:
        cfg["latency_lut"] = str(cfg["latency_lut"])
    return HardwareProfile(**cfg)


def _as_number(key: str, value, kind):
    if value is None or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(key, value, "must be a number (or null)") from None
    if kind is int:
        if number != int(number):
            raise _bad(key, value, "must be an integer")
        return int(number)
    return number
