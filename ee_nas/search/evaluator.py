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
from ee_nas.thresholds.tuner import tune_thresholds


@dataclass
class ExitOutputs:
    """Cached per-exit outputs of one split: what threshold tuning needs, nothing more."""

    conf: np.ndarray      # [N, K] confidence of each exit
    correct: np.ndarray   # [N, K] bool
    logits: np.ndarray    # [N, K, C]
    labels: np.ndarray    # [N]


class SubnetEvaluator:
    def __init__(self, supernet, datamodule, cost_model: CostModel | None = None, measure: str = "max_softmax",
                 calibration_samples: int = 512, device: str | torch.device = "cpu",
                 max_candidates: int = 256):
        self.supernet, self.datamodule = supernet, datamodule
        self.costs = cost_model or CostModel(supernet)
        self.measure, self.max_candidates = measure, max_candidates
        self.device = torch.device(device)
        self.calibration = datamodule.split_tensors("train", max_samples=calibration_samples)[0]
        self.reference_macs = self.costs.costs(supernet.space.largest_backbone()).backbone_macs

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
            logits = torch.cat(chunks).numpy()
            labels = y.numpy()
            out[split] = ExitOutputs(confidence(logits, self.measure), logits.argmax(-1) == labels[:, None],
                                     logits, labels)
        return out

    def score(self, genome, target: float | None) -> dict:
        """Validation accuracy after per-candidate threshold tuning, avg MACs and costs."""
        costs = self.costs.costs(genome)
        val = self.outputs(genome, ("val",))["val"]
        policy = tune_thresholds(val.conf, val.correct, costs.cum_macs, target,
                                 max_candidates=self.max_candidates)
        p = policy.to_dict()
        return {
            "val_acc": p["accuracy"], "avg_macs": p["avg_macs"], "feasible": p["feasible"],
            "thresholds": p["thresholds"], "exit_rates": p["exit_rates"],
            "cum_macs": costs.cum_macs.tolist(), "params": costs.params, "backbone_macs": costs.backbone_macs,
            "final_exit_val_acc": float(val.correct[:, -1].mean()),
        }
