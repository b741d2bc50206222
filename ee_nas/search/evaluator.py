"""Scores one genome on the trained supernet: extract, recalibrate BN, cache logits, tune thresholds.

The same evaluator serves the search (validation split) and the final report
(validation for tuning, test for reporting), so every candidate is seen with the
same transforms and the same calibration images (NSGANetV2's 10%-accuracy trap).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ee_nas.hardware.macs import CostModel
from ee_nas.models.bn import recalibrate_bn
from ee_nas.thresholds.confidence import confidence
from ee_nas.thresholds.tuner import cross_fitted_accuracy, tune_thresholds


@dataclass
class ExitOutputs:
    """Cached per-exit outputs of one split: what threshold tuning needs, nothing more."""

    conf: np.ndarray      # [N, K] confidence of each exit
    correct: np.ndarray   # [N, K] bool
    logits: np.ndarray    # [N, K, C]
    labels: np.ndarray    # [N]

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray, measure: str) -> "ExitOutputs":
        return cls(confidence(logits, measure), logits.argmax(-1) == labels[:, None], logits, labels)


class SubnetEvaluator:
    def __init__(self, supernet, datamodule, cost_model: CostModel | None = None, measure: str = "max_softmax",
                 calibration_samples: int = 512, device: str | torch.device = "cpu",
                 max_candidates: int = 256, hardware=None, latency=None, score_folds: int = 1):
        self.supernet, self.datamodule = supernet, datamodule
        self.hardware, self.latency = hardware, latency
        self.by_latency = hardware is not None and hardware.objective == "latency"
        if self.by_latency and latency is None:
            raise ValueError("hardware.objective=latency needs a latency table (hardware.latency_lut)")
        self.costs = cost_model or CostModel(supernet)
        self.measure, self.max_candidates, self.score_folds = measure, max_candidates, score_folds
        self.device = torch.device(device)
        self.calibration = datamodule.split_tensors("train", max_samples=calibration_samples)[0]
        self.reference_macs = self.costs.costs(supernet.space.largest_backbone()).backbone_macs
        # the objective's unit: MACs, or ms from the latency table
        self.reference_cost = (latency.backbone_latency(supernet.space.largest_backbone()) if self.by_latency
                               else self.reference_macs)

    def subnet(self, genome):
        """The static subnet with inherited weights and its own BatchNorm statistics."""
        net = self.supernet.extract(genome).to(self.device)
        return recalibrate_bn(net, self.calibration.to(self.device), self.datamodule.eval_batch_size)

    @torch.no_grad()
    def outputs(self, genome, splits=("val",), net=None) -> dict[str, ExitOutputs]:
        net = net if net is not None else self.subnet(genome)
        out = {}
        for split in splits:
            x, y = self.datamodule.split_tensors(split)
            chunks = [torch.stack(net(x[i:i + self.datamodule.eval_batch_size].to(self.device)), 1).float().cpu()
                      for i in range(0, len(x), self.datamodule.eval_batch_size)]
            out[split] = ExitOutputs.from_logits(torch.cat(chunks).numpy(), y.numpy(), self.measure)
        return out

    def cum_cost(self, genome) -> np.ndarray:
        """Per-exit cumulative cost in the objective's unit: MACs, or ms from the latency table."""
        return self.latency.predict(genome) if self.by_latency else self.costs.costs(genome).cum_macs

    def exit_target(self, genome, target: float | None) -> float | None:
        """The budget thresholds are tuned to: the hardware target, tightened so that the exits save at least
        `search_space.min_exit_saving` of the network's own backbone cost (both in the objective's unit)."""
        floor = self.supernet.space.min_exit_saving
        if not floor:
            return target
        own = (self.latency.backbone_latency(genome) if self.by_latency
               else self.costs.costs(genome).backbone_macs)
        return (1.0 - floor) * own if target is None else min(target, (1.0 - floor) * own)

    def score(self, genome, target: float | None) -> dict:
        """Validation accuracy after per-candidate threshold tuning, its avg cost and the hardware caps.

        `val_acc` (what the search ranks by) is cross-fitted over `score_folds` folds when > 1; the
        thresholds, costs and `val_acc_tuned` come from tuning on all of val, as the report does.

        `target` and `avg_cost` are in the objective's unit (MACs, or ms with a latency
        objective); avg_macs is always reported from the same exit rates.
        """
        costs = self.costs.costs(genome)
        cum_cost = self.latency.predict(genome) if self.by_latency else costs.cum_macs  # = cum_cost(genome)
        val = self.outputs(genome, ("val",))["val"]
        budget = self.exit_target(genome, target)
        policy = tune_thresholds(val.conf, val.correct, cum_cost, budget, max_candidates=self.max_candidates,
                                 warn=False)
        p = policy.to_dict()
        val_acc = (cross_fitted_accuracy(val.conf, val.correct, cum_cost, budget, self.score_folds,
                                         self.max_candidates) if self.score_folds > 1 else p["accuracy"])
        violations = self._violations(genome, costs)
        record = {
            "val_acc": val_acc, "val_acc_tuned": p["accuracy"],
            "avg_cost": p["avg_macs"], "avg_macs": float(policy.exit_rates @ costs.cum_macs),
            "feasible": p["feasible"] and not violations, "violations": violations,
            "thresholds": p["thresholds"], "exit_rates": p["exit_rates"],
            "cum_macs": costs.cum_macs.tolist(), "params": costs.params, "backbone_macs": costs.backbone_macs,
            "final_exit_val_acc": float(val.correct[:, -1].mean()), "n_val": len(val.labels),
        }
        if self.latency is not None:
            cum_ms = self.latency.predict(genome)
            record.update(cum_latency_ms=cum_ms.tolist(), avg_latency_ms=float(policy.exit_rates @ cum_ms))
        return record

    def _violations(self, genome, costs) -> list[str]:
        """Broken parameter / peak-memory caps of the hardware profile (empty when none are set)."""
        if self.hardware is None:
            return []
        return self.hardware.violations(params=costs.params, memory_bytes=self._memory(genome))

    def _memory(self, genome) -> int | None:
        """Peak activation memory (bytes), only when the profile caps it."""
        if getattr(self.hardware, "max_memory_bytes", None) is None:
            return None
        if self.latency is None and getattr(self, "_memory_table", None) is None:
            from ee_nas.hardware.latency import LatencyTable

            self._memory_table = LatencyTable(self.supernet)  # memoized per component, like CostModel
        return (self.latency or self._memory_table).peak_memory_bytes(genome)

    def caps(self, genome) -> dict:
        """The hardware caps, checked before any evaluation (no forward pass): params, peak memory,
        the broken caps (`violations`) and their summed relative excess (`cap_violation`, 0 when it fits)."""
        params, memory = self.costs.costs(genome).params, self._memory(genome)
        if self.hardware is None:
            return {"params": params, "violations": [], "cap_violation": 0.0}
        return {"params": params, "memory_bytes": memory,
                "violations": self.hardware.violations(params=params, memory_bytes=memory),
                "cap_violation": self.hardware.cap_excess(params=params, memory_bytes=memory)}
