"""DDP on CPU (gloo): the search work is split across ranks, and a 2-process run goes end to end."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ee_nas.distributed import distributed_batch, on_rank_zero, split_by_cost

ROOT = Path(__file__).resolve().parents[1]
#: what a 1-process run writes into its run directory (besides .hydra/ and its log)
ARTIFACTS = ["arch.yaml", "archive.json", "checkpoints/last.ckpt", "pareto.png", "pareto_front.json",
             "run_config.json", "search_progress.csv", "subnet.pt", "summary.json", "threshold_sweep.json",
             "threshold_sweep.png", "val_logits.npz"]


def test_split_by_cost_balances_and_is_deterministic():
    costs = [9, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # round-robin would give one rank 13, the other 5
    shares = split_by_cost(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert sorted(sum(costs[i] for i in s) for s in shares) == [9, 9]
    assert split_by_cost(costs, 2) == shares and split_by_cost([1.0], 3) == [[0], [], []]


class ToyScore:
    """A cheap deterministic stand-in for SubnetEvaluator.score (bigger nets: more accurate and costlier)."""

    def __init__(self, space):
        self.space = space
        self.reference = self.cum(space.largest_backbone())[-1]
        self.target = 0.6 * self.reference

    def cum(self, genome):
        s = self.space
        cost = {b: genome.expands[b] * genome.kernels[b] ** 2 for b in range(s.n_blocks)
                if s.block_index[b] < genome.depths[s.block_stage[b]]}
        taps = sorted(e.tap for e in genome.exits if e.tap in cost)
        points = [sum(c for b, c in cost.items() if b <= t) + 3.0 * (i + 1) for i, t in enumerate(taps)]
        return np.array(points + [sum(cost.values()) + 3.0 * len(taps) + 5.0])

    def __call__(self, genome):
        cum = self.cum(genome)
        avg = float(0.5 * cum[0] + 0.5 * cum[-1])
        return {"val_acc": 0.5 + 0.4 * min(1.0, cum[-1] / self.reference) + 0.01 * len(genome.exits),
                "avg_macs": avg, "feasible": bool(avg <= self.target), "cum_macs": cum.tolist()}


@pytest.mark.parametrize("algorithm", ["nsga2", "random", "surrogate"])
def test_batch_evaluation_gives_the_archive_of_one_by_one(backbones, make_space, algorithm):
    """The per-generation loop hands only new, distinct genomes to `evaluate_batch` and files the
    records it returns in order: the same archive as scoring them one by one (what DDP relies on)."""
    from ee_nas.search.archive import Archive
    from ee_nas.search.evolution import evaluate_one, search
    from ee_nas.search.predictors import make_predictor
    from ee_nas.search.surrogate import surrogate_search

    space = make_space(backbones["mobilenetv3_small"], "aebnas")
    ev = ToyScore(space)
    kw = dict(seed=3, reference_macs=ev.reference, target=ev.target)

    def run(**extra):
        archive = Archive()
        if algorithm == "surrogate":
            surrogate_search(space, ev, archive, make_predictor("rbf"), pop_size=6, n_iterations=3, n_per_iteration=3,
                             cost_fn=ev.cum, inner_generations=4, inner_pop_size=8, **kw, **extra)
        else:
            search(space, ev, archive, algorithm=algorithm, pop_size=6, n_generations=3, **kw, **extra)
        return archive.records

    batches = []

    def evaluate_batch(genomes):  # scored in reverse order, as another rank would: order must not matter
        batches.append([g.key() for g in genomes])
        return [evaluate_one(g, ev) for g in genomes[::-1]][::-1]
    batched = run(evaluate_batch=evaluate_batch)
    assert json.dumps(batched) == json.dumps(run())
    keys = [k for batch in batches for k in batch]
    assert len(keys) == len(set(keys)) == len(batched)  # each genome once, never one the archive holds


def test_sync_batchnorm_is_a_config_error_not_a_crash():
    """SyncBatchNorm's conversion would drop the elastic BatchNorm (its active-width forward, extract)."""
    from hydra import compose, initialize_config_dir

    from ee_nas import CONF_DIR
    from ee_nas.config import ConfigError
    from ee_nas.distributed import check_trainer_config
    from ee_nas.models.ops import ElasticBatchNorm2d

    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(ElasticBatchNorm2d(8)))[0]
    assert type(converted) is torch.nn.SyncBatchNorm and not hasattr(converted, "extract")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        ddp = compose("config", overrides=["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
        synced = compose("config", overrides=["trainer=ddp", "trainer.sync_batchnorm=true"])
    assert ddp.trainer.sync_batchnorm is False and ddp.trainer.strategy.find_unused_parameters is True
    check_trainer_config(ddp)
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true"):
        check_trainer_config(synced)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seen = []

    def score(item):
        seen.append(item)
        return {"item": item, "by": rank}
    results = distributed_batch(score, cost=lambda item: item)([5, 1, 2, 3, 4])
    shared = on_rank_zero(lambda: {"summary": "from rank 0"} if rank == 0 else None)
    try:
        distributed_batch(score)([rank])  # the ranks disagree on the candidates: refused on both
        diverged = None
    except RuntimeError as err:
        diverged = str(err)
    Path(out, f"{rank}.json").write_text(json.dumps({"results": results, "seen": seen, "shared": shared,
                                                     "diverged": diverged}))
    dist.destroy_process_group()


def test_distributed_batch_splits_gathers_and_refuses_diverged_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["results"] == r1["results"]  # every rank holds every result, in the order of the items
    assert [r["item"] for r in r0["results"]] == [5, 1, 2, 3, 4]
    assert sorted(r0["seen"] + r1["seen"]) == [1, 2, 3, 4, 5]  # each item scored once, on one rank
    assert sorted([sum(r0["seen"]), sum(r1["seen"])]) == [7, 8]  # balanced by cost
    assert all(r["by"] == (0 if r["item"] in r0["seen"] else 1) for r in r0["results"])
    assert r0["shared"] == r1["shared"] == {"summary": "from rank 0"}
    assert r0["diverged"] and r1["diverged"] and "diverged" in r0["diverged"]


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_two_process_cpu_ddp_end_to_end(tmp_path):
    """`trainer=ddp` with 2 gloo processes: both exit 0, rank 0 writes the 1-process artifact set,
    the search candidates are scored on both ranks, and both ranks end with the same summary."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ee_nas.run", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32", "trainer.max_epochs=1", "++trainer.limit_train_batches=2",
           "++trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "search.pop_size=4",
           "search.n_generations=1", "evaluation.calibration_samples=64", "evaluation.device=cpu",
           "thresholds.sweep_points=4", "finetune.epochs=0", "logger=csv", "data.num_workers=0",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = [a for a in ARTIFACTS if not (run_dir / a).exists()]
    assert not missing, missing
    archive = json.loads((run_dir / "archive.json").read_text())["records"]
    assert len(archive) == 4 and all(r["status"] == "ok" for r in archive)
    assert len((run_dir / "search_progress.csv").read_text().strip().splitlines()) == 2  # header + 1 generation
    logs = {0: (run_dir / "run.log").read_text(), 1: (run_dir / "train_ddp_process_1.log").read_text()}
    shares = {r: [int(n) for n in re.findall(r"rank %d scores (\d+) of 4 candidates" % r, text)]
              for r, text in logs.items()}
    assert sum(shares[0]) + sum(shares[1]) == 4 and shares[0][0] > 0 and shares[1][0] > 0
    finals = {r: re.findall(r"summary: test_acc ([\d.]+)", text) for r, text in logs.items()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert finals[0] == finals[1] == [f"{summary['test_acc']:.4f}"]
