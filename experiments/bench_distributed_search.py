"""Distributed search speedup: the search phase on 2 CPU processes (DDP, gloo) vs 1, one thread each.

    python experiments/bench_distributed_search.py                    # trains a digits supernet first
    python experiments/bench_distributed_search.py --ckpt RUN/checkpoints/last.ckpt --pop-size 8

Both runs search the same trained supernet (one checkpoint) with the same seed, through the
pipeline's own code path: a Lightning Trainer (max_epochs=0, so fit only restores the weights)
whose `EvolutionaryNASCallback.on_fit_end` runs the search; with 2 devices Lightning starts the
second rank by re-running this script, and each generation's candidates are split across the ranks.
Reported: the search phase's seconds (`search_seconds` of pareto_front.json, rank 0), the speedup,
whether the two archives are identical, and the machine's load (`os.getloadavg`) before and after
each run; written to experiments/results/distributed_search.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
#: the supernet the setup run trains (digits, the default small MobileNetV3), quick on a CPU
TRAIN_OVERRIDES = ["trainer.max_epochs=3", "search.pop_size=2", "search.n_generations=1", "finetune.epochs=0",
                   "logger=csv", "trainer.enable_progress_bar=false"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from ee_nas import CONF_DIR
    from ee_nas.config import apply_debug

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return apply_debug(hydra_compose("config", overrides=overrides))


def worker(args) -> None:
    """One search on `args.devices` CPU processes (this function runs on every rank)."""
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from ee_nas.lit_module import MultiExitModule
    from ee_nas.models.multi_exit import MultiExitSupernet
    from ee_nas.pipeline import make_callbacks
    from ee_nas.run import build

    cfg = compose(args.overrides + [f"search.pop_size={args.pop_size}", f"search.n_generations={args.generations}",
                                    "evaluation.device=cpu"])
    L.seed_everything(cfg.seed)
    datamodule = build(cfg, "data")
    datamodule.setup()
    backbone = build(cfg, "backbone", in_channels=datamodule.in_channels, num_classes=datamodule.num_classes,
                     image_size=datamodule.image_size)
    supernet = MultiExitSupernet(backbone, build(cfg, "search_space", backbone=backbone))
    module = MultiExitModule.load_from_checkpoint(args.ckpt, supernet=supernet, map_location="cpu", weights_only=False)
    out = Path(args.out)
    _, nas = make_callbacks(cfg, out, build(cfg, "hardware"))
    strategy = DDPStrategy(find_unused_parameters=True) if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[nas])
    started, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=datamodule)
    # CPU seconds of this rank's fit (the search, almost all of it): unlike wall time, hardly changed by
    # other processes on the machine, so max over ranks estimates the speedup on a quiet machine
    (out / f"bench_worker_rank{trainer.global_rank}.json").write_text(json.dumps({
        "fit_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
        "world_size": trainer.world_size, "threads": torch.get_num_threads()}))


def run_worker(devices: int, ckpt: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("archive.json", "search_progress.csv", "pareto_front.json", "bench_worker_rank0.json",
                  "bench_worker_rank1.json"):
        (out / stale).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--devices", str(devices), "--ckpt", str(ckpt),
           "--out", str(out), "--pop-size", str(args.pop_size), "--generations", str(args.generations),
           "--", *args.overrides]
    load_before = os.getloadavg()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    front = json.loads((out / "pareto_front.json").read_text())
    ranks = [json.loads((out / f"bench_worker_rank{r}.json").read_text()) for r in range(devices)]
    return {"devices": devices, "search_seconds": front["search_seconds"], "n_evaluated": front["n_evaluated"],
            "hypervolume": front["hypervolume"], "load_before": load_before, "load_after": os.getloadavg(),
            "cpu_seconds_per_rank": [r["cpu_seconds"] for r in ranks], "threads": ranks[0]["threads"]}


def archive_records(out: Path) -> list[dict]:
    return json.loads((out / "archive.json").read_text())["records"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a trained supernet (checkpoints/last.ckpt); default: train one first")
    parser.add_argument("--workdir", default="/tmp/ee_nas_bench_distributed_search")
    parser.add_argument("--pop-size", type=int, default=16)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="alternating 1-/2-process runs; medians reported")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for the supernet (both runs)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.workdir)
    ckpt = Path(args.ckpt) if args.ckpt else work / "train" / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        print(f"training the supernet once into {ckpt.parent.parent}", flush=True)
        subprocess.run([sys.executable, "-m", "ee_nas.run", *TRAIN_OVERRIDES, *args.overrides,
                        f"hydra.run.dir={ckpt.parent.parent}"], check=True, cwd=ROOT,
                       env={**os.environ, "WANDB_MODE": "offline"})
    runs = {1: [], 2: []}
    for rep in range(args.repeats):
        for devices in (1, 2):
            result = run_worker(devices, ckpt, work / f"search_{devices}proc_{rep}", args)
            runs[devices].append(result)
            print(f"{devices} process(es): search {result['search_seconds']:.1f} s, load "
                  f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}", flush=True)
    median = {d: sorted(r["search_seconds"] for r in rs)[len(rs) // 2] for d, rs in runs.items()}
    identical = all(archive_records(work / f"search_1proc_{rep}") == archive_records(work / f"search_2proc_{rep}")
                    for rep in range(args.repeats))
    n_cores = os.cpu_count()
    loads = [r["load_before"][0] for rs in runs.values() for r in rs] + \
            [r["load_after"][0] for rs in runs.values() for r in rs]
    speedup = median[1] / median[2]
    cpu = {d: sorted(max(r["cpu_seconds_per_rank"]) for r in rs)[len(rs) // 2] for d, rs in runs.items()}
    cpu_speedup = cpu[1] / cpu[2]
    result = {"speedup": speedup, "search_seconds_1proc": median[1], "search_seconds_2proc": median[2],
              "cpu_bound_speedup": cpu_speedup, "max_rank_cpu_seconds_1proc": cpu[1],
              "max_rank_cpu_seconds_2proc": cpu[2],
              "identical_archive": identical, "n_evaluated": runs[1][0]["n_evaluated"],
              "pop_size": args.pop_size, "n_generations": args.generations, "threads_per_process": 1,
              "cpu_count": n_cores, "max_load_1min": max(loads), "checkpoint": str(ckpt),
              "overrides": args.overrides, "runs": runs,
              "load_note": ("quiet machine" if max(loads) < 0.5 * n_cores else
                            f"machine busy (1-min load up to {max(loads):.1f} on {n_cores} cores): other "
                            "processes shared the cores, so the timings (the 2-process run most) are unreliable")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed_search.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Distributed search: 2 CPU processes vs 1 (one thread each)", "",
             f"`python experiments/bench_distributed_search.py {' '.join(sys.argv[1:])}`".replace("` ", "`"), "",
             f"Same trained digits supernet (`{ckpt}`) and seed; NSGA-II, population {args.pop_size}, "
             f"{args.generations} generations ({result['n_evaluated']} candidates); {args.repeats} run(s) each, "
             f"median; wall clock: `search_seconds` of pareto_front.json (rank 0).", "",
             "| processes | search phase (s) | speedup |", "|---|---|---|",
             f"| 1 | {median[1]:.1f} | 1.00x |", f"| 2 | {median[2]:.1f} | {speedup:.2f}x |", "",
             f"CPU seconds of the busiest rank (its whole fit: setup and search): 1 process {cpu[1]:.1f}, "
             f"2 processes {cpu[2]:.1f} ({' + '.join(f'{c:.1f}' for c in runs[2][0]['cpu_seconds_per_rank'])}): "
             f"**{cpu_speedup:.2f}x** fewer on the critical path. CPU time hardly depends on what else runs on "
             "the machine, so this is the speedup to expect on quiet cores.", "",
             f"- identical archive (every record, same order): **{identical}**",
             f"- target >= 1.6x (wall clock): **{'met' if speedup >= 1.6 else 'not met'}**; CPU critical path "
             f"{cpu_speedup:.2f}x",
             f"- load: {result['load_note']} (1-min load before/after each run: "
             + ", ".join(f"{d}p {r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}"
                         for d, rs in runs.items() for r in rs) + ")", ""]
    (RESULTS / "distributed_search.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
