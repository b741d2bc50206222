"""What `drop_unreached` does to finished runs: exits and parameters shipped, test accuracy and avg MACs.

    python experiments/drop_unreached.py RUN_DIR [RUN_DIR ...] --out experiments/results/drop_unreached_digits

Each run's chosen network is loaded whole and with the exits no val image reaches dropped
(`load_run(drop_unreached=True)`), and both run on the run's test split with the eager runtime.
Writes OUT.json (one record per run) and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_exit_latency import test_split  # noqa: E402
from ee_nas.inference.runtime import EarlyExitRuntime, load_run  # noqa: E402
from ee_nas.utils import atomic_write_json, atomic_write_text  # noqa: E402


def measure(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    full, cut = load_run(run_dir), load_run(run_dir, drop_unreached=True)
    x, y = test_split(full)
    cum = np.asarray(summary["cum_macs"], dtype=float)
    record = {"run_dir": str(run_dir), "seed": summary["seed"], "exits": full.net.n_exits, "kept": cut.net.n_exits}
    for name, run in (("full", full), ("cut", cut)):
        result = EarlyExitRuntime(run.net, run.thresholds, run.measure).classify(x)
        rates = np.bincount(result.exits, minlength=run.net.n_exits) / len(y)
        record |= {f"{name}_test_acc": float((result.labels == y.numpy()).mean()),
                   f"{name}_relative_macs": float(rates @ cum[:run.net.n_exits]) / summary["reference_macs"],
                   f"{name}_params": sum(p.numel() for p in run.net.parameters())}
    if abs(record["full_test_acc"] - summary["test_acc"]) > 1e-9:
        raise SystemExit(f"{run_dir}: the eager runtime scores {record['full_test_acc']}, its summary "
                         f"{summary['test_acc']}: not the network the run reported")
    return record


def markdown(records: list[dict], command: str) -> str:
    lines = [f"`{command}`", "",
             "| run | exits kept | params (full → kept) | test acc (%) full → kept | avg MACs / largest full → kept |",
             "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['run_dir']} | {r['kept']} of {r['exits']} | "
                     f"{r['full_params']:,} → {r['cut_params']:,} | "
                     f"{100 * r['full_test_acc']:.2f} → {100 * r['cut_test_acc']:.2f} | "
                     f"{r['full_relative_macs']:.3f} → {r['cut_relative_macs']:.3f} |")
    dropped = [r for r in records if r["kept"] < r["exits"]]
    lines += ["", f"{len(dropped)} of {len(records)} runs drop a tail; test accuracy changes in "
              f"{sum(r['cut_test_acc'] != r['full_test_acc'] for r in records)}; parameters shipped, summed over "
              f"the runs: {sum(r['cut_params'] for r in records) / sum(r['full_params'] for r in records):.2f} "
              "of the full networks'."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "drop_unreached_digits")
    args = parser.parse_args()
    records = [measure(d) for d in args.run_dirs]
    command = "python experiments/drop_unreached.py " + " ".join(sys.argv[1:])
    atomic_write_json(args.out.with_suffix(".json"), {"command": command, "records": records})
    text = markdown(records, command)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
