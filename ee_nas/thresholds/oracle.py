"""Oracle exit policy: the accuracy ceiling of any confidence-threshold policy."""
from __future__ import annotations

import numpy as np

from .confidence import as_numpy


def oracle_policy(correct, cum_macs) -> dict:
    """Each sample leaves at its earliest correct exit; wrong everywhere -> last exit.

    No threshold policy can be more accurate (it can only be right where some
    exit is right), so the gap to it bounds what better confidence measures
    could still win.
    """
    correct = as_numpy(correct, bool)
    cum_macs = as_numpy(cum_macs, np.float64)
    n, k = correct.shape
    hit = correct.any(axis=1)
    e = np.where(hit, correct.argmax(axis=1), k - 1)
    rates = np.bincount(e, minlength=k) / n
    return {
        "accuracy": float(hit.mean()),
        "avg_macs": float((rates * cum_macs).sum()),
        "exit_rates": rates.tolist(),
    }
