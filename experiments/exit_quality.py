"""How good is each kind of exit branch of a trained supernet? Val accuracy of every branch design at every tap.

    python experiments/exit_quality.py /tmp/run_a /tmp/run_b --out experiments/results/exit_quality

For each finished run directory: the largest backbone with the same branch at every active tap, for a
few branch designs (no layer, one layer of each op, two layers), extracted with recalibrated BatchNorm
as the search sees it. The search can only pick exits that work, so a design near chance here is one it
cannot use. Writes `<out>.json` (one record per run, design and tap) and `<out>.md` (mean over runs).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

DESIGNS = {  # name -> branch layers (op, width)
    "none (pool + linear)": [],
    "conv3x3 32": [("conv3x3", 32)],
    "dwsep3x3 32": [("dwsep3x3", 32)],
    "mbconv3 32": [("mbconv3", 32)],
    "mbconv6 32": [("mbconv6", 32)],
    "2 x mbconv6 32": [("mbconv6", 32), ("mbconv6", 32)],
    "2 x dwsep3x3 16": [("dwsep3x3", 16), ("dwsep3x3", 16)],
}


def exit_accuracies(run_dir: Path) -> list[dict]:
    from ee_nas.genome import BranchLayer, ExitBranch, Genome
    from ee_nas.select import load_run

    run = load_run(run_dir, device="cpu")
    space, evaluator = run.supernet.space, run.evaluator
    top = space.largest_backbone()
    taps = space.active_taps(top.depths)
    cfg = run.cfg.training
    records = []
    for name, layers in DESIGNS.items():
        if any(op not in space.ops for op, _ in layers):
            continue
        branch = tuple(BranchLayer(op, width) for op, width in layers)
        genome = Genome(top.depths, top.expands, top.kernels, [ExitBranch(t, branch) for t in taps])
        val = evaluator.outputs(genome, ("val",))["val"]
        cum = evaluator.costs.costs(genome).cum_macs / run.reference_macs
        for k, tap in enumerate(taps):
            records.append({"run_dir": str(run_dir), "seed": int(run.cfg.seed), "design": name, "tap": int(tap),
                            "val_acc": float(val.correct[:, k].mean()), "relative_cum_macs": float(cum[k]),
                            "branch_lr_scale": float(cfg.get("branch_lr_scale", 1.0))})
    return records


def table(records: list[dict]) -> str:
    taps = sorted({r["tap"] for r in records})
    groups = defaultdict(list)
    for r in records:
        groups[(r["branch_lr_scale"], r["design"], r["tap"])].append(r["val_acc"])
    runs = defaultdict(set)
    for r in records:
        runs[r["branch_lr_scale"]].add(r["run_dir"])
    lines = ["| branch_lr_scale | runs | branch | " + " | ".join(f"tap {t}" for t in taps) + " |",
             "|---|---|---|" + "---|" * len(taps)]
    for scale in sorted(runs):
        for name in DESIGNS:
            cells = [groups.get((scale, name, t)) for t in taps]
            if not any(cells):
                continue
            lines.append(f"| {scale:g} | {len(runs[scale])} | {name} | " +
                         " | ".join(f"{100 * np.mean(c):.0f}%" if c else "–" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `python -m ee_nas.run` directories")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "exit_quality")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = [r for run in args.runs for r in exit_accuracies(run)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"records": records}, indent=1))
    md = ("Val accuracy of each exit design on the largest backbone of trained supernets, mean over runs "
          f"(`python experiments/exit_quality.py {' '.join(str(r) for r in args.runs)}`); "
          "chance is 10%.\n\n" + table(records))
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
