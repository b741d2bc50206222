"""PNG plot of a threshold sweep (headless: Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_threshold_sweep(sweep: dict, path) -> Path:
    """Top: accuracy vs avg MACs (val, test, oracles; exits' cum_macs as vertical
    lines). Bottom: stacked test exit rates for each sweep point."""
    pts, cm = sweep["points"], sweep["cum_macs"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 7.5), height_ratios=[3, 2])
    for split, style in (("val", "o-"), ("test", "s--")):
        (line,) = ax.plot([p[f"{split}_avg_macs"] for p in pts], [p[f"{split}_acc"] for p in pts], style, ms=4,
                          label=split)
        o = sweep["oracle"][split]
        ax.plot(o["avg_macs"], o["accuracy"], "*", ms=12, color=line.get_color(), label=f"oracle ({split})")
    for k, m in enumerate(cm):
        ax.axvline(m, color="grey", lw=0.8, ls=":")
        ax.annotate(f"exit {k + 1}", (m, 0), xycoords=("data", "axes fraction"), rotation=90,
                    va="bottom", ha="right", fontsize=8, color="grey")
    ax.set(xlabel="average MACs per sample", ylabel="top-1 accuracy", title="threshold sweep (tuned on val)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    x = np.arange(len(pts))
    rates = np.array([p["test_exit_rates"] for p in pts], dtype=float).reshape(len(pts), -1)
    bottom = np.zeros(len(pts))
    for k in range(rates.shape[1]):
        bx.bar(x, rates[:, k], bottom=bottom, label=f"exit {k + 1}")
        bottom += rates[:, k]
    bx.set_xticks(x, [f"{p['target']:.3g}" for p in pts], rotation=60, fontsize=7)
    bx.set(xlabel="MAC target", ylabel="test exit rate", ylim=(0, 1))
    bx.legend(fontsize=7, ncol=min(rates.shape[1], 5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
