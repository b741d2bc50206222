"""Would another exit policy do better on the chosen networks? Rescored without training anything.

    python experiments/rescore_policies.py --runs /tmp/iso/runs --out experiments/results/rescore_digits

Each finished aebnas run directory of a `compare_baselines.py --runs DIR` sweep is loaded with its
fine-tuned weights (`subnet.pt`), its policy re-tuned on val as the run did it (`recipe`: it must reproduce the
recorded test accuracy), then changed in one way at a time, re-tuned on val where the change asks for it:

- spending more: on digits, many threshold settings reach the best val accuracy and the tuner stops short
  of the target (0.31 of the largest backbone's MACs at targets of 0.25-0.5). Coordinate ascent moves the
  recipe to the costliest policy whose val accuracy stays within `tol` images of it, `spend_tolN` under the
  run's own budget (the target, or the exit-saving floor where that is lower, less `thresholds.cost_margin`),
  `nofloor_tolN` under the target less the margin only (the exit-saving floor dropped);
- `measure_entropy`, `measure_margin`: the other confidence measures (`thresholds.measure`);
- exit ensembles, free for a sample that reaches exit k, whose earlier exits all ran: exit k answers with the
  mean of the log-probabilities (`ensemble_geo`) or probabilities (`ensemble_prob`) of exits 1..k, or only
  the final exit does (`ensemble_final`).

Writes `<out>.json` (one record per run and variant) and `<out>.md`: per variant, the change against the
recipe and the paired difference to the recorded static_nas runs of the same sweep, per seed set found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TOLERANCES = {"spend": (1, 2, 3), "nofloor": (0, 1, 2)}
MEASURES = ("entropy", "margin")
ENSEMBLES = ("geo", "prob", "final")


def spend_within(conf, correct, cum, budget: float, thresholds, tol: int, max_candidates: int) -> np.ndarray:
    """The costliest thresholds reached from `thresholds` by single-exit moves that keep val accuracy within
    `tol` images of theirs and the average cost within `budget`."""
    from ee_nas.thresholds.tuner import _Problem

    pb = _Problem(conf, correct, cum, max_candidates, spend=True)
    idx = [len(c) - 1 if not np.isfinite(t) else int(np.searchsorted(c, t)) for c, t in zip(pb.cands, thresholds)]
    floor, cur = pb.outcome(idx)
    floor -= tol
    cap = budget * len(conf) * (1 + 1e-9)
    moved = True
    while moved:
        moved = False
        for j in range(pb.k - 1):
            a, m = pb.coordinate(idx, j)
            ok = (a >= floor) & (m <= cap)
            if ok.any() and m[ok].max() > cur + 1e-9:
                idx[j] = int(np.flatnonzero(ok)[np.argmax(m[ok])])
                cur, moved = float(m[idx[j]]), True
    return pb._thr(idx)


def ensemble(logits: np.ndarray, kind: str) -> np.ndarray:
    """Per-exit log-probabilities [N, K, C] of an exit ensemble (module docstring)."""
    from scipy.special import log_softmax

    logp = log_softmax(logits.astype(np.float64), axis=-1)
    count = np.arange(1, logp.shape[1] + 1)[None, :, None]
    if kind == "geo":
        return np.cumsum(logp, 1) / count
    if kind == "prob":
        return np.log(np.cumsum(np.exp(logp), 1) / count)
    out = logp.copy()
    out[:, -1] = logp.mean(1)
    return out


def probe(run_dir: str) -> list[dict]:
    import torch

    from ee_nas.genome import Genome
    from ee_nas.pipeline import tune_on_val
    from ee_nas.select import load_run
    from ee_nas.search.evaluator import ExitOutputs
    from ee_nas.thresholds import evaluate_policy

    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    from compare_baselines import parse_run_dir

    method, target, seed = parse_run_dir(run_dir)
    run = load_run(run_dir, "cpu")
    genome = run.supernet.space.validate(Genome.load(Path(run_dir) / "arch.yaml"))
    net = run.evaluator.subnet(genome)
    net.load_state_dict(torch.load(Path(run_dir) / "subnet.pt", weights_only=False)["state_dict"])
    out = run.evaluator.outputs(genome, ("val", "test"), net=net)
    val, test, cum = out["val"], out["test"], run.evaluator.cum_cost(genome)
    recorded = json.loads((Path(run_dir) / "summary.json").read_text())["test_acc"]
    policy = tune_on_val(run.cfg, run.evaluator, genome, val, run.target)
    margin, candidates = run.cfg.thresholds.cost_margin, run.cfg.thresholds.max_candidates
    budgets = {"spend": run.evaluator.exit_target(genome, run.target) * (1 - margin),
               "nofloor": run.target * (1 - margin)}

    def record(variant: str, thresholds, val=val, test=test) -> dict:
        tested = evaluate_policy(test.conf, test.correct, cum, thresholds)
        return {"method": method, "target_fraction": target, "seed": seed, "run_dir": run_dir,
                "variant": variant, "recorded_test_acc": recorded, "test_acc": float(tested.accuracy),
                "val_acc": float(evaluate_policy(val.conf, val.correct, cum, thresholds).accuracy),
                "relative_macs": float(tested.avg_macs / run.reference_macs),
                "exit_saving": float(1 - tested.avg_macs / cum[-1]),
                "meets_target": bool(tested.avg_macs <= run.target)}

    records = [record("recipe", policy.thresholds)]
    for name, tols in TOLERANCES.items():
        records += [record(f"{name}_tol{tol}", spend_within(val.conf, val.correct, cum, budgets[name],
                                                           policy.thresholds[:-1], tol, candidates)) for tol in tols]

    def retuned(variant: str, measure: str, transform) -> dict:
        """The policy re-tuned on val with the exits' outputs changed by `transform`, scored likewise."""
        v, t = (ExitOutputs.from_logits(transform(o.logits), o.labels, measure) for o in (val, test))
        return record(variant, tune_on_val(run.cfg, run.evaluator, genome, v, run.target).thresholds, v, t)

    records += [retuned(f"measure_{m}", m, lambda z: z) for m in MEASURES]
    records += [retuned(f"ensemble_{e}", run.cfg.thresholds.measure, lambda z, e=e: ensemble(z, e)) for e in ENSEMBLES]
    return records


def report(records: list[dict], static: dict) -> str:
    from compare_baselines import seed_ci

    recipe = {(r["target_fraction"], r["seed"]): r["test_acc"] for r in records if r["variant"] == "recipe"}
    sets = sorted({r["seed"] // 5 for r in records})
    lines = ["| variant | seeds | Δ test acc vs recipe (pp) | Δ vs static_nas (pp) | avg MACs / largest | "
             "min exit_saving | meets target |", "|---|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in records):
        for s in sets:
            rs = [r for r in records if r["variant"] == v and r["seed"] // 5 == s]
            keys = [(r["target_fraction"], r["seed"]) for r in rs]
            own = {k[::-1]: 100 * (r["test_acc"] - recipe[k]) for r, k in zip(rs, keys)}
            vs = {k[::-1]: 100 * (r["test_acc"] - static[k]) for r, k in zip(rs, keys) if k in static}
            lines.append(f"| {v} | {5 * s}-{5 * s + 4} | {seed_ci(own)} | {seed_ci(vs)} | "
                         f"{np.mean([r['relative_macs'] for r in rs]):.3f} | {min(r['exit_saving'] for r in rs):.2f} | "
                         f"{sum(r['meets_target'] for r in rs)}/{len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", help="compare_baselines.py --runs directories")
    parser.add_argument("--from-json", type=Path,
                        help="redraw the table of this results file's .md from its records (and --static)")
    parser.add_argument("--static", type=Path, nargs="*", default=[],
                        help="iso-cost JSON files whose static_nas records to pair with")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rescore_digits")
    args = parser.parse_args()
    static = {(r["target_fraction"], r["seed"]): r["test_acc"] for f in args.static
              for r in json.loads(f.read_text())["records"] if r["method"] == "static_nas"}
    command = "python " + " ".join(sys.argv)
    if args.from_json:
        from compare_baselines import remake_report

        print(remake_report(args.from_json, lambda records: report(records, static), command))
        return
    if not args.runs:
        parser.error("--runs (or --from-json) is required")
    dirs = sorted(str(p) for root in args.runs for p in root.glob("aebnas/t*/seed*") if (p / "subnet.pt").exists())
    if not dirs:
        raise SystemExit(f"error: no finished aebnas run directories under {args.runs}")
    with ProcessPoolExecutor(args.jobs) as pool:
        records = [r for rs in pool.map(probe, dirs) for r in rs]
    bad = [r["run_dir"] for r in records if r["variant"] == "recipe" and r["test_acc"] != r["recorded_test_acc"]]
    if bad:
        raise SystemExit(f"error: the recipe did not reproduce the recorded test accuracy of {bad}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "records": records}, indent=1) + "\n")
    table = report(records, static)
    args.out.with_suffix(".md").write_text(f"# Other exit policies: {len(dirs)} chosen aebnas networks\n\n"
                                           f"`{command}`\n\n{__doc__.split(chr(10) * 2, 2)[2]}\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
