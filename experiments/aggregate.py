"""Collect every job of a sweep (or any set of run directories) into one table and one plot.

    python experiments/aggregate.py multirun/digits_search/2026-11-26_12-00-00 [more dirs...] \
        --out experiments/results/sweep

Each run directory is one that holds a `summary.json`; the method of a run is its
search space plus its search algorithm (e.g. `aebnas/nsga2`, `aebnas/random`, `fixed`).
Writes `<out>.json`, `<out>.md` (per method: mean ± std over seeds) and `<out>.png`
(test accuracy vs avg MACs / backbone MACs, one line per method).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = ("test_acc", "final_exit_test_acc", "avg_macs", "relative_macs", "hypervolume", "search_seconds",
           "oracle_gap")


def method_of(run: Path, summary: dict) -> str:
    front_file = run / "pareto_front.json"
    algorithm = json.loads(front_file.read_text()).get("algorithm", "none") if front_file.exists() else "none"
    space = summary.get("search_space", "?")
    return space if algorithm in ("none", None) else f"{space}/{algorithm}"


def collect(roots: list[Path]) -> list[dict]:
    """One row per run directory found under `roots` (recursively)."""
    rows = []
    for root in roots:
        for summary_file in sorted(Path(root).rglob("summary.json")):
            run = summary_file.parent
            if "selected" in run.parts:
                continue
            s = json.loads(summary_file.read_text())
            front_file = run / "pareto_front.json"
            front = json.loads(front_file.read_text()) if front_file.exists() else {}
            rows.append({
                "run_dir": str(run), "method": method_of(run, s), "dataset": s["dataset"], "seed": s["seed"],
                "hardware": s.get("hardware"), "test_acc": s["test_acc"],
                "final_exit_test_acc": s["final_exit_test_acc"], "avg_macs": s["avg_macs"],
                "relative_macs": s["relative_macs"], "backbone_macs": s["backbone_macs"],
                "hypervolume": s.get("hypervolume"), "search_seconds": front.get("search_seconds"),
                "oracle_gap": s["oracle_test_acc"] - s["test_acc"], "n_exits": s["n_exits"],
                "n_evaluated": s.get("n_evaluated"),
            })
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per method: mean and std over seeds of every numeric column."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = {}
    for method, rs in sorted(by_method.items()):
        stats = {"n_runs": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for col in COLUMNS:
            vals = [r[col] for r in rs if r.get(col) is not None]
            if vals:
                # sample std over seeds (ddof=1: 3 seeds are a sample, not the population); 0 for one run
                stats[col] = {"mean": float(np.mean(vals)),
                              "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
        out[method] = stats
    return out


def markdown(summary: dict[str, dict]) -> str:
    def cell(stats, key, scale=1.0, digits=3):
        if key not in stats:
            return "–"
        m, s = stats[key]["mean"] * scale, stats[key]["std"] * scale
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    lines = ["| method | runs | test acc (%) | avg MMACs | avg MACs / backbone | hypervolume | search s | oracle gap (pp) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, st in summary.items():
        lines.append(f"| {method} | {st['n_runs']} | {cell(st, 'test_acc', 100, 2)} | {cell(st, 'avg_macs', 1e-6, 3)} | "
                     f"{cell(st, 'relative_macs', 1, 3)} | {cell(st, 'hypervolume', 1, 4)} | "
                     f"{cell(st, 'search_seconds', 1, 1)} | {cell(st, 'oracle_gap', 100, 2)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["relative_macs"])
        ax.plot([r["relative_macs"] for r in rs], [100 * r["test_acc"] for r in rs], "o-", label=method, alpha=0.8)
    ax.set_xlabel("avg MACs / largest backbone MACs")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregate(roots: list[Path], out: Path) -> dict:
    rows = collect(roots)
    if not rows:
        raise SystemExit(f"no summary.json found under {', '.join(map(str, roots))}")
    summary = summarize(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"methods": summary, "runs": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    plot(rows, out.with_suffix(".png"))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/aggregate"))
    args = parser.parse_args()
    summary = aggregate(args.roots, args.out)
    print(markdown(summary))
    print(f"written: {args.out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
