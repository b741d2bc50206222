"""Plain NSGA-II vs surrogate-assisted search at the same number of true supernet evaluations (digits).

    python experiments/bench_surrogate.py                         # trains a supernet once, then compares
    python experiments/bench_surrogate.py --supernet-dir DIR      # reuse a finished ee_nas.run directory

One trained supernet serves every method and seed. Each method gets the same
budget of true evaluations (extract + recalibrate BN + val logits + threshold
tuning): NSGA-II and random search `pop_size x generations`; surrogate search
`pop_size + (iterations - 1) x n_per_iteration`. Reported: final hypervolume
(feasible front, error vs avg MACs / largest backbone, reference (1, 1)), best
val accuracy under the target, the predictor's Kendall tau on each new batch
(mean over iterations) and on held-out random candidates (predictor fitted on
the surrogate run's archive, and on a random-search archive of the same size),
and the surrogate's own overhead (time outside true evaluations).

True evaluations are memoized across methods (scoring is deterministic), in
`<supernet-dir>/bench_eval_cache.json`, so reruns are fast.
Writes experiments/results/bench_surrogate.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ee_nas.search.archive import Archive, hypervolume  # noqa: E402
from ee_nas.search.evolution import search  # noqa: E402
from ee_nas.genome import Genome  # noqa: E402
from ee_nas.search.predictors import kendall_tau, make_predictor  # noqa: E402
from ee_nas.search.surrogate import surrogate_search  # noqa: E402
from ee_nas.select import load_run  # noqa: E402
from ee_nas.utils import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def train_supernet(run_dir: Path, epochs: int) -> None:
    if (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file():
        print(f"reusing the supernet in {run_dir}")
        return
    print(f"training a supernet for {epochs} epochs into {run_dir} ...", flush=True)
    subprocess.run([sys.executable, "-m", "ee_nas.run", f"hydra.run.dir={run_dir}", f"trainer.max_epochs={epochs}",
                    "search.pop_size=2", "search.n_generations=1", "logger=csv",
                    "trainer.enable_progress_bar=false"], cwd=ROOT, check=True)


class CachedScore:
    """The true evaluation, memoized on disk; times the calls that did the work."""

    def __init__(self, run, path: Path):
        self.run, self.path = run, path
        self.cache = json.loads(path.read_text()) if path.is_file() else {}
        self.seconds = 0.0

    def __call__(self, genome):
        key = genome.key()
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = self.run.evaluator.score(genome, self.run.target)
            self.seconds += time.perf_counter() - t
        return dict(self.cache[key])

    def save(self):
        atomic_write_json(self.path, self.cache)


def timed(score: CachedScore, fn):
    """(result, seconds outside true evaluations)."""
    s0, t0 = score.seconds, time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) - (score.seconds - s0)


def heldout_tau(kind: str, space, train: list[dict], heldout: list[dict]) -> float:
    ok = [r for r in train if r["status"] == "ok"]
    p = make_predictor(kind).for_space(space)
    p.fit([space.encode(Genome.from_dict(r["genome"])) for r in ok], [r["val_acc"] for r in ok])
    pred = p.predict([space.encode(Genome.from_dict(r["genome"])) for r in heldout])
    return kendall_tau([r["val_acc"] for r in heldout], pred)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--supernet-dir", type=Path, default=Path("/tmp/ee_nas_bench_surrogate"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--pop-size", type=int, default=8)
    ap.add_argument("--generations", type=int, default=6, help="NSGA-II generations = surrogate iterations")
    ap.add_argument("--n-per-iteration", type=int, default=8)
    ap.add_argument("--inner-generations", type=int, default=20)
    ap.add_argument("--predictors", nargs="+", default=["mlp", "rbf", "trees"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--heldout", type=int, default=40, help="random candidates for the held-out Kendall tau")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    train_supernet(args.supernet_dir, args.epochs)
    run = load_run(args.supernet_dir, device="cpu")
    space, ref, target = run.supernet.space, run.reference_macs, run.target
    score = CachedScore(run, args.supernet_dir / "bench_eval_cache.json")
    budget = args.pop_size * args.generations
    assert args.pop_size + (args.generations - 1) * args.n_per_iteration == budget, "budgets differ"
    rng = np.random.default_rng(12345)
    heldout_genomes = {}
    while len(heldout_genomes) < args.heldout:
        g = space.sample(rng)
        heldout_genomes.setdefault(g.key(), g)
    heldout = [{**score(g), "genome": g.to_dict(), "status": "ok"} for g in heldout_genomes.values()]
    score.save()
    rows = []
    for seed in args.seeds:
        runs = {}
        for algorithm in ("nsga2", "random"):
            archive, stats = Archive(), []
            _, overhead = timed(score, lambda: search(
                space, score, archive, algorithm=algorithm, pop_size=args.pop_size, n_generations=args.generations,
                seed=seed, reference_macs=ref, target=target, mutation_prob=0.15,
                on_generation=lambda g, s: stats.append(s)))
            runs[algorithm] = (archive, stats, overhead)
        for kind in args.predictors:
            archive, stats = Archive(), []
            _, overhead = timed(score, lambda: surrogate_search(
                space, score, archive, make_predictor(kind, seed=seed), pop_size=args.pop_size,
                n_iterations=args.generations, n_per_iteration=args.n_per_iteration, seed=seed, reference_macs=ref,
                target=target, cost_fn=lambda g: run.evaluator.costs.costs(g).cum_macs,
                inner_generations=args.inner_generations, mutation_prob=0.15,
                on_generation=lambda g, s: stats.append(s)))
            runs[f"surrogate:{kind}"] = (archive, stats, overhead)
        score.save()
        random_archive = list(runs["random"][0].records.values())
        for method, (archive, stats, overhead) in runs.items():
            records = archive.evaluated()
            row = {"method": method, "seed": seed, "n_true_evaluations": len(archive),
                   "hypervolume": hypervolume(records, ref),
                   "best_acc_under_target": max((r["val_acc"] for r in records if r["feasible"]), default=None),
                   "hypervolume_per_generation": [s["hypervolume"] for s in stats],
                   "overhead_s": overhead}
            if method.startswith("surrogate:"):
                kind = method.split(":")[1]
                taus = [s["kendall_tau_acc"] for s in stats[1:] if not np.isnan(s["kendall_tau_acc"])]
                row["batch_tau_mean"] = float(np.mean(taus)) if taus else None
                row["heldout_tau_own_archive"] = heldout_tau(kind, space, list(archive.records.values()), heldout)
                row["heldout_tau_random_archive"] = heldout_tau(kind, space, random_archive, heldout)
            rows.append(row)
            print(f"seed {seed} {method:>16}: {row['n_true_evaluations']} evals, HV {row['hypervolume']:.4f}, "
                  f"best acc {row['best_acc_under_target']}, tau {row.get('batch_tau_mean')} / "
                  f"{row.get('heldout_tau_own_archive')} / {row.get('heldout_tau_random_archive')}, "
                  f"overhead {overhead:.1f}s", flush=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def mean(method, key):
        vals = [r[key] for r in rows if r["method"] == method and r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    summary = {m: {k: mean(m, k) for k in ("hypervolume", "best_acc_under_target", "batch_tau_mean",
                                           "heldout_tau_own_archive", "heldout_tau_random_archive", "overhead_s")}
               for m in methods}
    result = {"setup": {"supernet_dir": str(args.supernet_dir), "epochs": int(run.cfg.trainer.max_epochs),
                        "budget": budget,
                        "pop_size": args.pop_size, "generations": args.generations,
                        "n_per_iteration": args.n_per_iteration, "inner_generations": args.inner_generations,
                        "seeds": args.seeds, "heldout": args.heldout, "reference_macs": ref, "target_macs": target,
                        "heldout_val_acc_range": [min(r["val_acc"] for r in heldout),
                                                  max(r["val_acc"] for r in heldout)],
                        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}"},
              "summary": summary, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "bench_surrogate.json", result)
    atomic_write_text(RESULTS / "bench_surrogate.md", markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    s = result["setup"]
    fmt = lambda v, spec=".4f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# Surrogate-assisted search vs plain NSGA-II (digits)",
        "",
        f"One supernet ({s['epochs']} epochs), {s['budget']} true evaluations per method and seed "
        f"(NSGA-II / random: {s['pop_size']} x {s['generations']}; surrogate: {s['pop_size']} + "
        f"{s['generations'] - 1} x {s['n_per_iteration']}, {s['inner_generations']} predicted NSGA-II "
        f"generations per iteration), seeds {s['seeds']}, target {s['target_macs']:.4g} avg MACs "
        f"(reference {s['reference_macs']:.4g}). Hypervolume of the feasible front in (error, avg MACs / "
        "reference), reference point (1, 1). Kendall tau of the accuracy predictor: mean over each "
        "iteration's new batch (before it was evaluated), and on "
        f"{s['heldout']} held-out random candidates (val acc {s['heldout_val_acc_range'][0]:.3f}.."
        f"{s['heldout_val_acc_range'][1]:.3f}) when fitted on the run's own archive or on a random-search "
        "archive of the same size. Overhead: seconds outside true evaluations. At a seed every method "
        "starts from the same sampled generation 0 (equal first hypervolume).",
        "",
        "| method | hypervolume (mean) | best val acc under target | batch tau | held-out tau (own) "
        "| held-out tau (random) | overhead s |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, v in result["summary"].items():
        lines.append(f"| {m} | {fmt(v['hypervolume'])} | {fmt(v['best_acc_under_target'])} | "
                     f"{fmt(v['batch_tau_mean'], '.3f')} | {fmt(v['heldout_tau_own_archive'], '.3f')} | "
                     f"{fmt(v['heldout_tau_random_archive'], '.3f')} | {fmt(v['overhead_s'], '.1f')} |")
    lines += ["", "Per seed:", "", "| method | seed | evals | hypervolume | best val acc | HV per generation |",
              "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        curve = " ".join(f"{h:.3f}" for h in r["hypervolume_per_generation"])
        lines.append(f"| {r['method']} | {r['seed']} | {r['n_true_evaluations']} | {r['hypervolume']:.4f} | "
                     f"{fmt(r['best_acc_under_target'])} | {curve} |")
    lines += ["", f"Machine: {s['machine']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
