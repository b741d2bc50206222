"""Search artifacts a person reads: the Pareto front as JSON and as a plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ee_nas.utils import atomic_write_json  # noqa: E402

FRONT_KEYS = ("val_acc", "avg_cost", "avg_macs", "params", "exit_rates", "thresholds", "cum_macs", "final_exit_val_acc",
              "avg_latency_ms", "cum_latency_ms")


def write_front(run_dir: Path, result: dict) -> None:
    front = [{"genome": r["genome"], **{k: r[k] for k in FRONT_KEYS if k in r}} for r in result["front"]]
    atomic_write_json(run_dir / "pareto_front.json", {
        "search_space": result["search_space"], "target_macs": result["target"],
        "reference_cost": result["reference_cost"], "unit": result["unit"], "hypervolume": result["hypervolume"],
        "n_evaluated": result["n_evaluated"], "algorithm": result["algorithm"],
        "search_seconds": result["search_seconds"], "front": front})
    plot_front(run_dir / "pareto.png", result)


def plot_front(path: Path, result: dict) -> None:
    ref = result["reference_cost"]

    def cost(r):
        return r.get("avg_cost", r["avg_macs"]) / ref

    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = result["records"]
    ax.scatter([cost(r) for r in pts], [r["val_acc"] for r in pts], s=12, c="lightgray",
               label=f"evaluated ({len(pts)})")
    front = result["front"]
    ax.plot([cost(r) for r in front], [r["val_acc"] for r in front], "o-", c="tab:blue",
            label="Pareto front (feasible)")
    chosen = result["chosen"]
    ax.scatter([cost(chosen)], [chosen["val_acc"]], s=120, marker="*", c="tab:red", zorder=5,
               label="chosen")
    if result["target"] is not None:
        ax.axvline(result["target"] / ref, ls="--", c="tab:red", lw=1, label="target")
    unit = "MACs" if result["unit"] == "MACs" else "latency"
    ax.set_xlabel(f"avg {unit} / largest backbone {unit}")
    ax.set_ylabel("validation accuracy (tuned thresholds)")
    ax.set_title(f"{result['search_space']}: hypervolume {result['hypervolume']:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
