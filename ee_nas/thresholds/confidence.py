"""Per-exit confidence scores from logits (higher = more confident, all in [0, 1])."""
from __future__ import annotations

import numpy as np

MEASURES = ("max_softmax", "entropy", "margin")


def as_numpy(x, dtype=None) -> np.ndarray:
    """Accept numpy arrays, lists and torch tensors (detached, moved to CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def confidence(logits, measure: str = "max_softmax") -> np.ndarray:
    """Confidence of logits [N,K,C] -> [N,K] (or [N,C] -> [N]).

    Softmax is computed in float64 after subtracting the row max, so huge logits
    do not overflow. "entropy" is 1 - H(p)/log(C): 1 for one-hot, 0 for uniform.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown confidence measure {measure!r}; valid: {', '.join(MEASURES)}")
    x = as_numpy(logits, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    p = e / s
    c = x.shape[-1]
    if measure == "max_softmax":
        return p.max(axis=-1)
    if measure == "entropy":
        if c == 1:
            return np.ones(x.shape[:-1])
        logp = z - np.log(s)
        h = -(p * logp).sum(axis=-1)
        return np.clip(1.0 - h / np.log(c), 0.0, 1.0)
    # margin
    if c == 1:
        return np.ones(x.shape[:-1])
    top2 = np.partition(p, c - 2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]
