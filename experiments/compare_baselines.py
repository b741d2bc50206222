"""Baselines in one harness: static backbone, fixed exits, placement-only, random search and AEBNAS.

    python experiments/compare_baselines.py --seeds 1 2 3                 # digits, the default budget
    python experiments/compare_baselines.py --seeds 1 2 3 --tag cifar10 +experiment=cifar10_search

Every method runs `python -m ee_nas.run` with the same data, training budget,
hardware target and evaluation; random search reuses the AEBNAS run's trained
supernet (same space, same seed), so the two differ only in the search
algorithm, with the same number of evaluations. Writes
`experiments/results/baselines_<tag>.{md,json,png}` plus each run's directory.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregate import aggregate, markdown  # noqa: E402
from ee_nas import CONF_DIR

METHODS = {  # name -> overrides
    "aebnas": ["search_space=aebnas", "search=nsga2"],
    "random": ["search_space=aebnas", "search=random"],
    "placement_only": ["search_space=placement_only", "search=nsga2"],
    # hand-placed exits on the largest backbone, and the backbone alone, cannot meet a tight target
    # (the run refuses such a config): they run unconstrained and the table shows what they cost
    "fixed": ["search_space=fixed", "hardware=unconstrained"],
    "static": ["search_space=static", "hardware=unconstrained"],
}


CONF = CONF_DIR


def common(seed: int, overrides: list[str]) -> list[str]:
    return [f"seed={seed}", "logger=csv", "trainer.enable_progress_bar=false", *overrides]


def adopt_checkpoint(trained: Path, run_dir: Path, seed: int, overrides: list[str]) -> None:
    """Start `run_dir` from another run's trained supernet: copy last.ckpt and record this run's
    config, so the run-directory guard accepts the checkpoint as this run's own."""
    from hydra import compose, initialize_config_dir

    from ee_nas.run_dir import RUN_CONFIG, config_hash, run_config
    from ee_nas.utils import atomic_write_json

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config = run_config(compose("config", overrides=common(seed, overrides)))
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(trained, run_dir / "checkpoints" / "last.ckpt")
    atomic_write_json(run_dir / RUN_CONFIG, {"config_hash": config_hash(config), "config": config})


def run_one(run_dir: Path, seed: int, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "ee_nas.run", f"hydra.run.dir={run_dir}", *common(seed, overrides)]
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tag", default="digits")
    parser.add_argument("--runs", type=Path, default=None, help="where the run directories go")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method")
    args = parser.parse_args()
    root = args.runs or Path("experiments/results/runs") / f"baselines_{args.tag}"
    for seed in args.seeds:
        for method in args.methods:
            run_dir = root / method / f"seed{seed}"
            if (run_dir / "summary.json").exists():
                print(f"[skip] {method} seed {seed}: {run_dir} already has a summary")
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            trained = root / "aebnas" / f"seed{seed}" / "checkpoints" / "last.ckpt"
            if method == "random" and trained.exists():  # same space and seed: reuse the trained supernet
                adopt_checkpoint(trained, run_dir, seed, [*METHODS[method], *args.overrides])
            seconds = run_one(run_dir, seed, [*METHODS[method], *args.overrides])
            print(f"[done] {method} seed {seed}: {seconds:.0f} s ({run_dir})", flush=True)
    out = Path("experiments/results") / f"baselines_{args.tag}"
    summary = aggregate([root], out)
    print(markdown(summary))
    print(f"written: {out}.md, {out}.json, {out}.png")


if __name__ == "__main__":
    main()
