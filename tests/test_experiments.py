"""Experiment configs run as smoke runs on fake local data; a 2-job multirun merges in the aggregation."""
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fake_data import write_fake
from inprocess import run_in_process

ROOT = Path(__file__).resolve().parents[1]
from ee_nas import CONF_DIR as CONF
sys.path.insert(0, str(ROOT / "experiments"))


@pytest.mark.parametrize("name", ["svhn", "cifar10", "cifar100"])
def test_experiment_smoke_on_fake_local_data(name, tmp_path, no_md5):
    root = tmp_path / "data"
    write_fake(name, root)
    # 16x16: the experiment's large supernet at a quarter of the cost; what runs is the experiment's config
    summary = run_in_process(tmp_path / "run", f"+experiment={name}_search", "debug=smoke", f"data.root={root}",
                             "data.download=false", "logger=csv", "data.batch_size=16", "data.image_size=16")
    assert summary["dataset"] == name and summary["search_space"] == "aebnas"
    assert (tmp_path / "run" / "summary.json").exists()


def test_digits_experiment_smoke(tmp_path, monkeypatch):
    import ee_nas.finetune

    calls, real = [], ee_nas.finetune.finetune_net
    monkeypatch.setattr(ee_nas.finetune, "finetune_net", lambda *a, **k: calls.append(k) or real(*a, **k))
    summary = run_in_process(tmp_path / "run", "+experiment=digits_search", "debug=smoke", "logger=csv")
    assert summary["dataset"] == "digits" and summary["finetune_epochs"] == 1
    assert [k["limit_train_batches"] for k in calls] == [3]  # the smoke's fine-tuning epoch is short too


def test_multirun_with_basic_launcher_merges_in_aggregation(tmp_path, monkeypatch):
    """`python -m ee_nas.run -m ...` run as that command runs (runpy, __main__), in this process: Hydra's
    basic launcher runs the jobs one after another in its own process anyway, and a new interpreter would
    only add its imports (the command line in a process of its own: tests/reliability, test_submitit)."""
    import logging
    import runpy

    from aggregate import aggregate

    sweep = tmp_path / "sweep"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["ee_nas.run", "-m", "seed=1,2", "debug=smoke", "logger=csv",
                                      f"hydra.sweep.dir={sweep}", "trainer.enable_progress_bar=false"])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        runpy.run_module("ee_nas.run", run_name="__main__", alter_sys=True)  # exits non-zero only on failure
    finally:  # Hydra configured the job logging; leave the logging of later tests as it was
        root.handlers[:] = handlers
        root.setLevel(level)
    jobs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert [p.name for p in jobs] == ["0", "1"]
    summary = aggregate([sweep], tmp_path / "table")
    assert summary["aebnas/nsga2"]["n_runs"] == 2 and summary["aebnas/nsga2"]["seeds"] == [1, 2]
    rows = json.loads((tmp_path / "table.json").read_text())["runs"]
    assert {r["seed"] for r in rows} == {1, 2}
    assert (tmp_path / "table.png").stat().st_size > 0 and "aebnas/nsga2" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("overrides", [["hydra/launcher=slurm"], ["hydra/launcher=local_parallel"],
                                       ["trainer=ddp"]])
def test_cluster_configs_compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    if overrides[0].startswith("hydra/launcher=slurm"):
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.cpus_per_gpu == 8
    elif overrides[0].startswith("hydra/launcher"):
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    else:
        assert cfg.trainer.strategy.find_unused_parameters  # the supernet leaves parameters unused


def test_aggregate_std_is_the_sample_std_over_seeds():
    import statistics

    from aggregate import summarize

    accs = [0.90, 0.92, 0.97]
    rows = [{"method": "m", "seed": s, "test_acc": a} for s, a in zip((1, 2, 3), accs)]
    rows.append({"method": "single", "seed": 1, "test_acc": 0.5})
    stats = summarize(rows)
    assert stats["m"]["test_acc"]["std"] == pytest.approx(statistics.stdev(accs))  # ddof=1
    assert stats["m"]["test_acc"]["std"] == pytest.approx((0.0026 / 2) ** 0.5)  # squares .0009+.0001+.0016
    assert stats["single"]["test_acc"] == {"mean": 0.5, "std": 0.0}
