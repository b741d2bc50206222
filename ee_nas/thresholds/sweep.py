"""Post-fit accuracy-vs-avg-MACs sweep: tune on validation, report on test."""
from __future__ import annotations

import numpy as np

from .confidence import as_numpy
from .oracle import oracle_policy
from .tuner import evaluate_policy, tune_thresholds


def threshold_sweep(val_conf, val_correct, test_conf, test_correct, cum_macs, n_points: int = 20,
                    max_candidates: int = 256) -> dict:
    """Tune thresholds on val for targets from cum_macs[0] (cheapest exit) to
    cum_macs[-1] (full network) and evaluate the same thresholds on test.

    Returns {"points": [...], "oracle": {"val": ..., "test": ...}, "cum_macs": [...]},
    all plain JSON-able values (a None threshold means the exit is disabled).
    """
    cum_macs = as_numpy(cum_macs, np.float64)
    points = []
    for target in np.linspace(cum_macs[0], cum_macs[-1], n_points):
        val = tune_thresholds(val_conf, val_correct, cum_macs, float(target), max_candidates=max_candidates)
        test = evaluate_policy(test_conf, test_correct, cum_macs, val.thresholds)
        v, t = val.to_dict(), test.to_dict()
        points.append({
            "target": float(target),
            "thresholds": v["thresholds"],
            "feasible": v["feasible"],
            "val_acc": v["accuracy"],
            "val_avg_macs": v["avg_macs"],
            "test_acc": t["accuracy"],
            "test_avg_macs": t["avg_macs"],
            "val_exit_rates": v["exit_rates"],
            "test_exit_rates": t["exit_rates"],
            "test_exit_accs": t["exit_accs"],
            "gap": v["accuracy"] - t["accuracy"],
        })
    return {
        "points": points,
        "oracle": {"val": oracle_policy(val_correct, cum_macs), "test": oracle_policy(test_correct, cum_macs)},
        "cum_macs": cum_macs.tolist(),
    }
