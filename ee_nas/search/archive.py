"""The archive: every evaluated genome with its scores, saved atomically after each generation.

It doubles as the evaluation cache that makes a search resumable: a rerun
replays the seeded algorithm and finds the evaluations it already paid for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from ee_nas.utils import atomic_write_json


class Archive:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.records: dict[str, dict] = {}
        if self.path and self.path.exists():
            data = json.loads(self.path.read_text())
            self.records = {r["key"]: r for r in data["records"]}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record

    def save(self) -> None:
        if self.path:
            atomic_write_json(self.path, {"records": list(self.records.values())})

    def evaluated(self) -> list[dict]:
        return [r for r in self.records.values() if r["status"] == "ok"]


def objectives(record: dict, reference_cost: float) -> tuple[float, float]:
    """(validation error, avg cost relative to the reference backbone's): both minimized.

    The cost is avg MACs, or avg latency with a latency objective (`avg_cost`).
    """
    return 1.0 - record["val_acc"], record.get("avg_cost", record["avg_macs"]) / reference_cost


def pareto_front(records: list[dict], reference_macs: float, feasible_only: bool = True) -> list[dict]:
    pool = [r for r in records if r["status"] == "ok" and (r["feasible"] or not feasible_only)]
    if not pool:
        return []
    F = np.array([objectives(r, reference_macs) for r in pool])
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((pool[i] for i in front), key=lambda r: objectives(r, reference_macs)[1])


def hypervolume(records: list[dict], reference_macs: float) -> float:
    """Hypervolume of the feasible front in (error, avg_MACs/backbone_MACs), reference point (1, 1)."""
    front = pareto_front(records, reference_macs)
    if not front:
        return 0.0
    F = np.array([objectives(r, reference_macs) for r in front])
    return float(HV(ref_point=np.array([1.0, 1.0]))(F))
