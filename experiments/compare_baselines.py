"""Early exits against static NAS at equal cost: every searchable method at several targets, several seeds.

    python experiments/compare_baselines.py                                # digits: 5 seeds x 3 targets
    python experiments/compare_baselines.py --seeds 0 1 --targets 0.35 --jobs 2
    python experiments/compare_baselines.py --tag cifar10 +experiment=cifar10_search trainer=gpu

Methods (same data, supernet recipe, training budget, search budget and evaluation):
`aebnas` (NSGA-II over backbone + exit placement + branch design), `random` (random search
over the same space and supernet), `placement_only` (NACHOS/EDANAS-style fixed head) and
`static_nas` (the backbone searched, no exits: the decisive baseline). `--references`
adds the target-independent `fixed` (hand-placed exits) and `static` (largest backbone) runs.

The supernet does not depend on the target: for each seed and space it is trained once (at the
first target) and every other target starts from it (`supernet_from=`), so a target costs a
search, not a training. Writes `experiments/results/iso_cost_<tag>.json` (one record per run),
`.md` (mean ± sample std, paired differences to static_nas with 95% intervals) and `.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

METHODS = {  # name -> (overrides, the method whose supernet it searches)
    "aebnas": (["search_space=aebnas", "search=nsga2"], "aebnas"),
    # ablations: the same supernet and search, one lever changed (ABLATIONS)
    "aebnas_no_floor": (["search_space=aebnas", "search=nsga2", "search_space.min_exit_saving=0"], "aebnas"),
    "aebnas_within_noise": (["search_space=aebnas", "search=nsga2", "search.choose=within_noise"], "aebnas"),
    "aebnas_within_noise_cheap_ties": (["search_space=aebnas", "search=nsga2", "search.choose=within_noise",
                                        "thresholds.ties=cheap"], "aebnas"),
    "aebnas_within_noise_no_largest": (["search_space=aebnas", "search=nsga2", "search.choose=within_noise",
                                        "search.n_largest=0"], "aebnas"),
    "aebnas_finetune_lr_0.1": (["search_space=aebnas", "search=nsga2", "finetune.lr_fraction=0.1"], "aebnas"),
    "aebnas_finetune_early_1": (["search_space=aebnas", "search=nsga2", "finetune.early_weight=1.0"], "aebnas"),
    "aebnas_score_folds_1": (["search_space=aebnas", "search=nsga2", "thresholds.score_folds=1"], "aebnas"),
    # a supernet of its own: the training recipe changes
    "aebnas_training_early_2": (["search_space=aebnas", "search=nsga2", "training.early_weight=2.0"],
                                "aebnas_training_early_2"),
    "static_nas": (["search_space=static_nas", "search=nsga2"], "static_nas"),
    "static_nas_finetune_lr_0.1": (["search_space=static_nas", "search=nsga2", "finetune.lr_fraction=0.1"],
                                   "static_nas"),
    # the baselines' strongest fine-tuning: every exit distils from the supernet's largest backbone
    "static_nas_finetune_teacher": (["search_space=static_nas", "search=nsga2", "finetune.teacher=largest"],
                                    "static_nas"),
    "aebnas_finetune_teacher": (["search_space=aebnas", "search=nsga2", "finetune.teacher=largest"], "aebnas"),
    # ... and a random rotation and scale of the training images while fine-tuning (`finetune.augment`), with the
    # crop it was measured with
    **{f"{m}_finetune_affine": ([f"search_space={m}", "search=nsga2",
                                 "finetune.augment={random_crop_padding:4,rotation_degrees:12,scale:0.1}"], m)
       for m in ("static_nas", "aebnas")},
    # the fine-tuning before its crop was turned off: data.augment's crop, as in the supernet's training
    **{f"{m}_finetune_crop": ([f"search_space={m}", "search=nsga2", "finetune.augment=null"], m)
       for m in ("static_nas", "aebnas")},
    # the baseline with aebnas' other choice rule: checks that it got the stronger of the two
    "static_nas_within_noise": (["search_space=static_nas", "search=nsga2", "search.choose=within_noise"],
                                "static_nas"),
    # static NAS on a supernet trained with aebnas's exits as auxiliary heads (deep supervision), deployed without
    "static_nas_aux_exits": (["search_space=static_nas_aux_exits", "search=nsga2"], "static_nas_aux_exits"),
    "placement_only": (["search_space=placement_only", "search=nsga2"], "placement_only"),
    "random": (["search_space=aebnas", "search=random"], "aebnas"),
}
REFERENCES = {  # cannot meet a tight target (their cheapest exit costs more): run unconstrained
    "fixed": ["search_space=fixed", "hardware=unconstrained"],
    "static": ["search_space=static", "hardware=unconstrained"],
}
BASELINE = "static_nas"
ABLATIONS = [  # (with the lever, without it, the lever): paired by seed and target
    ("aebnas", "aebnas_no_floor", "exit-saving floor (`search_space.min_exit_saving`)"),
    ("aebnas", "aebnas_within_noise", "choosing the best val accuracy (`search.choose=best_val`), not within_noise"),
    ("aebnas_within_noise", "aebnas_within_noise_cheap_ties",
     "spending ties under the target (`thresholds.ties=spend`), with choose=within_noise"),
    ("aebnas_within_noise", "aebnas_within_noise_no_largest",
     "largest backbone seeded in the initial population (`search.n_largest=2`), with choose=within_noise"),
    *[(m, f"{m}_finetune_lr_0.1", "fine-tuning lr 0.3 x the supernet's, not 0.1 (`finetune.lr_fraction`)")
      for m in ("aebnas", "static_nas")],
    ("aebnas", "aebnas_finetune_early_1", "fine-tuning early-exit loss weight 2, not 1 (`finetune.early_weight`)"),
    *[(m, f"{m}_finetune_crop", "fine-tuning without the random crop (`finetune.augment.random_crop_padding=0`), "
       "not with data.augment's") for m in ("aebnas", "static_nas")],
    ("aebnas", "aebnas_score_folds_1", "cross-fitted search scores (`thresholds.score_folds=2`), not thresholds "
     "tuned and scored on the same val images"),
    *[(f"{m}_finetune_teacher", m, "distilling from the largest backbone, not the own final exit "
       "(`finetune.teacher=largest`)") for m in ("aebnas", "static_nas")],
    *[(f"{m}_finetune_affine", m, "fine-tuning on rotated and scaled images (`finetune.augment`: +-12 degrees, "
       "scale 0.9-1.1)") for m in ("aebnas", "static_nas")],
    ("aebnas_training_early_2", "aebnas",
     "supernet's early-exit loss weight 2, not 1 (`training.early_weight`; not kept)"),
]
RESULTS = Path(__file__).resolve().parent / "results"


def run_one(run_dir: Path, seed: int, overrides: list[str], threads: int) -> float:
    """One `python -m ee_nas.run` in `run_dir` (skipped when it already has a summary); returns wall seconds."""
    if (run_dir / "summary.json").exists():
        return float(json.loads((run_dir / "record.json").read_text())["wall_s"]) if (run_dir / "record.json").exists() else 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ee_nas.run", f"hydra.run.dir={run_dir}", f"seed={seed}", "logger=csv",
           "trainer.enable_progress_bar=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    (run_dir / "record.json").write_text(json.dumps({"wall_s": wall}))
    return wall


def record(run_dir: Path, method: str, target: float | None, seed: int, wall_s: float, trained: bool) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "method": method, "target_fraction": target, "seed": seed, "test_acc": s["test_acc"], "val_acc": s["val_acc"],
        "relative_macs": s["relative_macs"], "own_backbone_macs": s["own_backbone_macs"], "avg_macs": s["avg_macs"],
        "hypervolume": s["hypervolume"], "wall_s": wall_s, "trained_supernet": trained,
        "exit_saving": s["exit_saving"], "n_exits": s["n_exits"], "final_exit_test_acc": s["final_exit_test_acc"],
        "pre_finetune_test_acc": s.get("pre_finetune_test_acc"), "meets_target": s["meets_target"],
        "run_dir": str(run_dir),
    }


def cheapest_fraction(method: str, overrides: list[str]) -> float:
    """The cheapest avg-MACs fraction of the largest backbone that `method`'s space can reach at all (its
    smallest subnet's first exit). A static network's is its smallest backbone: below it static NAS has no
    candidate, so it is given that budget instead (more than the others get: the comparison stays fair to it)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ee_nas import CONF_DIR
    from ee_nas.hardware.macs import CostModel
    from ee_nas.models.multi_exit import MultiExitSupernet

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*METHODS[method][0], *overrides])
    dm = instantiate(cfg.data)
    bb = instantiate(cfg.backbone, in_channels=dm.in_channels, num_classes=dm.num_classes, image_size=dm.image_size)
    space = instantiate(cfg.search_space, backbone=bb)
    costs = CostModel(MultiExitSupernet(bb, space))
    return float(costs.costs(space.smallest()).cum_macs[0] / costs.costs(space.largest_backbone()).backbone_macs)


def parse_run_dir(run_dir: str | Path) -> tuple[str, float, int]:
    """(method, target fraction, seed) of a run directory `<runs>/<method>/t<target>/seed<seed>` of a sweep."""
    found = re.search(r"(\w+)/t([\d.]+)/seed(\d+)$", str(run_dir).rstrip("/"))
    if not found:
        raise ValueError(f"{run_dir} is not a sweep's <method>/t<target>/seed<seed> run directory")
    method, target, seed = found.groups()
    return method, float(target), int(seed)


def supernet_dir(args, owner: str, seed: int) -> Path:
    """The run whose trained supernet (`owner`'s space, `seed`) the other runs search: this sweep's run at the
    first target, or with --supernets the one an earlier sweep trained (which must exist)."""
    if args.supernets is None:
        return args.runs / owner / f"t{args.targets[0]:g}" / f"seed{seed}"
    found = sorted(args.supernets.glob(f"{owner}/t*/seed{seed}/checkpoints/last.ckpt"))  # each run holds it
    if not found:
        raise SystemExit(f"--supernets {args.supernets}: no trained {owner} supernet for seed {seed} "
                         f"({args.supernets}/{owner}/t*/seed{seed}/checkpoints/last.ckpt)")
    return found[0].parents[1]


def run_all(args) -> list[dict]:
    """Phase 1 trains one supernet per (seed, space) at the first target; phase 2 searches the rest."""
    root = args.runs
    first = args.targets[0]
    # rounded up, so that the budget admits the cheapest candidate after printing
    # per supernet (methods that search the same space share it)
    floors = {owner: np.ceil(cheapest_fraction(owner, args.overrides) * 1e4) / 1e4
              for owner in {METHODS[m][1] for m in args.methods}}
    jobs1, jobs2 = [], []
    for seed in args.seeds:
        for method in args.methods:
            overrides, owner = METHODS[method]
            for target in args.targets:
                run_dir = root / method / f"t{target:g}" / f"seed{seed}"
                trains = method == owner and target == first and args.supernets is None
                budget = max(target, floors[owner])
                ovr = [*overrides, f"hardware.target_fraction={budget:.4g}", *args.overrides]
                if not trains:
                    ovr.append(f"supernet_from={supernet_dir(args, owner, seed)}")
                (jobs1 if trains else jobs2).append((run_dir, method, target, seed, ovr, trains))
        for method in args.references:
            jobs1.append((root / method / f"seed{seed}", method, None, seed, [*REFERENCES[method], *args.overrides],
                          True))

    def go(job):
        run_dir, method, target, seed, ovr, trains = job
        try:
            wall = run_one(run_dir, seed, ovr, args.threads)
        except subprocess.CalledProcessError:
            print(f"[failed] {method} target {target} seed {seed}: see {run_dir.parent / run_dir.name}.log", flush=True)
            return None
        print(f"[done] {method} target {target} seed {seed}: {wall:.0f} s", flush=True)
        rec = record(run_dir, method, target, seed, wall, trains)
        with open(args.partial, "a") as f:  # what a killed sweep had finished
            f.write(json.dumps(rec) + "\n")
        return rec

    # the decisive comparison first: a sweep cut short still has aebnas vs static_nas
    jobs2.sort(key=lambda job: list(METHODS).index(job[1]) if job[1] != BASELINE else -1)
    records = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for phase in (jobs1, jobs2):
            records += [r for r in pool.map(go, phase) if r is not None]
    return records


def t_interval(diffs: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (sample std, ddof=1)."""
    from scipy import stats

    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs)))
    return mean, mean - half, mean + half


def seed_interval(diffs: dict) -> tuple[float, float, float, int]:
    """Mean and 95% t-interval of paired differences {(seed, target): Δ} clustered by seed: each seed's targets
    search one supernet, so they are not independent pairs. The t-interval runs over the per-seed means (the
    number of seeds is returned too); over the pairs themselves it would be too narrow."""
    by_seed = defaultdict(list)
    for (seed, _), d in diffs.items():
        by_seed[seed].append(d)
    means = np.array([np.mean(by_seed[s]) for s in sorted(by_seed)])
    return (*t_interval(means), len(means))


def seed_ci(diffs: dict) -> str:
    """`seed_interval` as report text: mean [95% CI]; "–" where fewer than two seeds leave no interval."""
    if len({seed for seed, _ in diffs}) < 2:
        return "–"
    return "{:+.2f} [{:+.2f}, {:+.2f}]".format(*seed_interval(diffs)[:3])


REMADE = "Table remade from the stored records"


def remake_report(results: Path, report: Callable[[list[dict]], str], command: str) -> str:
    """Redraw a probe's report from the records stored in `results`.json (the report code changed, the probe's
    runs did not): the first table of `results`.md (its lines from the first `|` line on, while they start
    with `|`) becomes `report(records)`, with a line saying how it was remade; the notes and commands written
    around it stay. Returns the table."""
    table = report(json.loads(results.with_suffix(".json").read_text())["records"])
    md = results.with_suffix(".md")
    lines = md.read_text().split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise SystemExit(f"error: {md} has no table to remake")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    head = [line for line in lines[:start] if not line.startswith(REMADE)]  # remade again: one note
    while head and not head[-1].strip():
        head.pop()
    note = f"{REMADE} by `{command}` (intervals over the seeds' means)."
    md.write_text("\n".join(head + ["", note, ""] + table.split("\n") + lines[end:]))
    return table


def mean_std(values) -> str:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return "–"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def pair_diffs(records: list[dict], method: str, other: str) -> dict:
    """{(seed, target): Δ test acc (pp)} of `method` minus `other`, over the runs both have."""
    acc = defaultdict(dict)
    for r in records:
        acc[r["method"]][r["seed"], r["target_fraction"]] = r["test_acc"]
    return {k: 100 * (acc[method][k] - acc[other][k]) for k in sorted(set(acc[method]) & set(acc[other]))}


def paired(records: list[dict], method: str, target) -> np.ndarray:
    """Per-seed test-accuracy differences (pp) of `method` minus static_nas at `target`."""
    return np.array([d for (_, t), d in pair_diffs(records, method, BASELINE).items() if t == target])


def table(records: list[dict]) -> str:
    targets = sorted({r["target_fraction"] for r in records if r["target_fraction"] is not None})
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    lines = ["| method | target | runs | test acc (%) | avg MACs / largest backbone | exit_saving | "
             "test acc before fine-tuning (%) | Δ test acc vs static_nas (pp), 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for target in targets:
            rs = [r for r in records if r["method"] == method and r["target_fraction"] == target]
            if not rs:
                continue
            d = paired(records, method, target)
            delta = "–" if method == BASELINE or not len(d) else "{:+.2f} [{:+.2f}, {:+.2f}]".format(*t_interval(d))
            lines.append(f"| {method} | {target:g} | {len(rs)} | {mean_std(100 * r['test_acc'] for r in rs)} | "
                         f"{mean_std(r['relative_macs'] for r in rs)} | {mean_std(r['exit_saving'] for r in rs)} | "
                         f"{mean_std(None if r['pre_finetune_test_acc'] is None else 100 * r['pre_finetune_test_acc'] for r in rs)} | {delta} |")
    for method in [m for m in REFERENCES if any(r["method"] == m for r in records)]:
        rs = [r for r in records if r["method"] == method]
        lines.append(f"| {method} (unconstrained) | – | {len(rs)} | {mean_std(100 * r['test_acc'] for r in rs)} | "
                     f"{mean_std(r['relative_macs'] for r in rs)} | {mean_std(r['exit_saving'] for r in rs)} | "
                     f"{mean_std(None if r['pre_finetune_test_acc'] is None else 100 * r['pre_finetune_test_acc'] for r in rs)} | – |")
    lines.append("")
    for method in [m for m in methods if m != BASELINE]:
        d = pair_diffs(records, method, BASELINE)
        if len(d) > 1:
            m, lo, hi = t_interval(np.array(list(d.values())))
            _, slo, shi, n = seed_interval(d)
            lines.append(f"- {method} − static_nas over all {len(d)} (seed, target) pairs: **{m:+.2f} pp** "
                         f"(95% CI [{slo:+.2f}, {shi:+.2f}] over the {n} seeds' means; over the pairs, which "
                         f"share a supernet per seed: [{lo:+.2f}, {hi:+.2f}])")
    return "\n".join(lines) + "\n"


def ablation(records: list[dict]) -> str:
    """Paired effects of the levers that the records can separate: fine-tuning the chosen network
    (after vs before, per run) and each lever of ABLATIONS (the method with it vs the one without it, per seed
    and target); intervals over the seeds' means (`seed_interval`)."""
    lines = ["| lever | method | pairs | Δ test acc (pp), mean [95% CI over seeds] | Δ avg MACs / largest backbone |",
             "|---|---|---|---|---|"]
    for method in [m for m in METHODS if any(r["method"] == m for r in records)]:
        d = {(r["seed"], r["target_fraction"]): 100 * (r["test_acc"] - r["pre_finetune_test_acc"])
             for r in records if r["method"] == method and r["pre_finetune_test_acc"] is not None}
        if d:
            lines.append(f"| fine-tuning the chosen network (`finetune.epochs`) | {method} | {len(d)} | {seed_ci(d)} | – |")

    def by_pair(method):
        return {(r["seed"], r["target_fraction"]): r for r in records if r["method"] == method}

    for with_lever, without, lever in ABLATIONS:
        on, off = by_pair(with_lever), by_pair(without)
        keys = sorted(set(on) & set(off))
        if keys:
            d = {k: 100 * (on[k]["test_acc"] - off[k]["test_acc"]) for k in keys}
            dm = np.mean([on[k]["relative_macs"] - off[k]["relative_macs"] for k in keys])
            lines.append(f"| {lever} | {with_lever} vs {without} | {len(d)} | {seed_ci(d)} | {dm:+.3f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in [m for m in METHODS if any(r["method"] == m for r in records)]:
        by_target = defaultdict(list)
        for r in records:
            if r["method"] == method:
                by_target[r["target_fraction"]].append(r)
        xs, ys, es = [], [], []
        for t in sorted(by_target):
            rs = by_target[t]
            xs.append(np.mean([r["relative_macs"] for r in rs]))
            acc = [100 * r["test_acc"] for r in rs]
            ys.append(np.mean(acc))
            es.append(np.std(acc, ddof=1) if len(acc) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method, alpha=0.85)
    ax.set_xlabel("avg MACs / largest backbone MACs (test)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(records: list[dict], out: Path, meta: dict) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
    md = table(records)
    md += "\n## Ablation (paired)\n\n" + ablation(records)
    out.with_suffix(".md").write_text(f"{meta['title']}\n\n{meta.get('notes', '')}{md}")
    plot(records, out.with_suffix(".png"))
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.35, 0.5],
                        help="avg-MACs targets as fractions of the largest backbone")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--references", nargs="*", default=[], choices=list(REFERENCES))
    parser.add_argument("--tag", default="digits")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--runs", type=Path, default=None, help="where the run directories go")
    parser.add_argument("--out", type=Path, default=None, help="results file stem (default results/iso_cost_<tag>)")
    parser.add_argument("--supernets", type=Path, default=None,
                        help="an earlier sweep's --runs: search its trained supernets instead of training new ones "
                             "(every run is then a search; for changes to search, scoring or fine-tuning)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    args.runs = (args.runs or RESULTS / "runs" / f"iso_cost_{args.tag}").resolve()
    args.supernets = args.supernets.resolve() if args.supernets else None
    needs = {METHODS[m][1] for m in args.methods} - set(args.methods)
    if needs:
        parser.error(f"--methods {' '.join(args.methods)}: also list {', '.join(sorted(needs))} (whose supernet they search)")
    out = args.out or RESULTS / f"iso_cost_{args.tag}"
    args.partial = out.with_suffix(".partial.jsonl")
    records = run_all(args)
    meta = {"title": f"# Iso-cost comparison on {args.tag}: seeds {args.seeds}, targets {args.targets}",
            "command": " ".join(sys.argv), "seeds": args.seeds, "targets": args.targets, "overrides": args.overrides}
    print(write(records, out, meta))
    print(f"written: {out}.json, .md, .png")


if __name__ == "__main__":
    main()
