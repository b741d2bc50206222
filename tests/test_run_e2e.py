"""A short end-to-end run in tmp_path: summary.json, search artifacts, and the offline W&B run."""
import json
from pathlib import Path

import pytest
from inprocess import run_in_process

# 3 batches of supernet training and of fine-tuning: these tests check what a run writes, not how well it learns
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "search.pop_size=4", "search.n_generations=2",
        "finetune.epochs=1", "finetune.limit_train_batches=3", "evaluation.calibration_samples=128",
        "thresholds.sweep_points=4", "trainer.enable_progress_bar=false"]


def run_pipeline(run_dir: Path, *overrides: str) -> dict:
    return run_in_process(run_dir, *FAST, *overrides)


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    """Validates after its epoch, so that its last.ckpt is saved after a validation (a test below needs it)."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_pipeline(run_dir, "trainer.check_val_every_n_epoch=1")


def test_summary_has_the_promised_keys(search_run):
    run_dir, summary = search_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("test_acc", "final_exit_test_acc", "avg_macs", "backbone_macs", "exit_rates", "exit_accs",
                "thresholds", "dataset", "seed", "search_space", "n_evaluated", "hypervolume", "target_macs"):
        assert key in on_disk, key
    assert on_disk["dataset"] == "digits" and on_disk["search_space"] == "aebnas"
    assert abs(sum(on_disk["exit_rates"]) - 1) < 1e-9
    assert len(on_disk["exit_rates"]) == len(on_disk["thresholds"]) == on_disk["n_exits"]
    # avg MACs follows the definition from the reported exit rates and cumulative MACs
    assert on_disk["avg_macs"] == pytest.approx(sum(r * c for r, c in zip(on_disk["exit_rates"], on_disk["cum_macs"])))
    assert on_disk["n_evaluated"] >= 4
    # did the exits, not a smaller backbone, meet the budget: saving against the chosen net's own backbone
    # (the last exit's cumulative cost also pays every early head, so it bounds the own backbone from above)
    assert on_disk["own_backbone_macs"] <= on_disk["cum_macs"][-1]
    assert on_disk["exit_saving"] == pytest.approx(1 - on_disk["avg_macs"] / on_disk["own_backbone_macs"])
    assert on_disk["finetune_epochs"] == 1 and 0 <= on_disk["pre_finetune_test_acc"] <= 1
    assert summary["test_acc"] == on_disk["test_acc"]


def test_search_artifacts_are_written(search_run):
    run_dir, summary = search_run
    for name in ("archive.json", "pareto_front.json", "pareto.png", "arch.yaml", "threshold_sweep.json",
                 "threshold_sweep.png", "search_progress.csv", "subnet.pt"):
        assert (run_dir / name).stat().st_size > 0, name
    front = json.loads((run_dir / "pareto_front.json").read_text())
    target = summary["target_macs"]
    assert all(r["avg_macs"] <= target * (1 + 1e-9) for r in front["front"])
    assert not list(run_dir.glob(".*.tmp")), "half-written artifacts left behind"


def test_offline_wandb_run_holds_front_and_sweep(search_run):
    run_dir, _ = search_run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(n.startswith("pareto_front") and n.endswith(".table.json") for n in files), files
    assert any(n.startswith("sweep") and n.endswith(".table.json") for n in files), files
    # scalar history lives in the offline run's protobuf log: per-generation search keys and final numbers
    log = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"search/hypervolume", b"search/best_acc_under_target", b"final/test_acc", b"final/avg_macs"):
        assert key in log, key


def test_fixed_arch_reuses_a_saved_genome(search_run, tmp_path):
    run_dir, summary = search_run
    again = run_pipeline(tmp_path, f"arch={run_dir / 'arch.yaml'}", "logger=csv")
    assert again["genome"] == summary["genome"]
    assert again["n_evaluated"] == 0


def test_refit_deploys_a_network_trained_on_val_with_the_train_only_networks_thresholds(search_run, tmp_path):
    """finetune.refit: the same network fine-tuned on train as without refit gives the val outputs and so the
    thresholds; the deployed weights are another network's (trained on train + val from the inherited ones)."""
    import numpy as np
    import torch

    run_dir, _ = search_run
    same = (f"arch={run_dir / 'arch.yaml'}", f"supernet_from={run_dir}", "trainer.check_val_every_n_epoch=1",
            "logger=csv")
    plain = run_pipeline(tmp_path / "plain", *same)
    refit = run_pipeline(tmp_path / "refit", *same, "finetune.refit=true")
    assert refit["finetune_refit"] and not plain["finetune_refit"]
    tuned_on = [np.load(tmp_path / name / "val_logits.npz")["logits"] for name in ("plain", "refit")]
    np.testing.assert_array_equal(*tuned_on)
    deployed = [torch.load(tmp_path / name / "subnet.pt", weights_only=False) for name in ("plain", "refit")]
    np.testing.assert_array_equal(*(np.asarray(d["thresholds"]) for d in deployed))
    weights = [d["state_dict"] for d in deployed]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if weights[0][k].is_floating_point())
    assert refit["val_acc"] == plain["val_acc"]  # the val accuracy of the network that has not seen val


def test_latency_objective_searches_on_measured_latency(tmp_path, monkeypatch):
    """hardware=local_cpu: the LUT is measured, the search and thresholds use avg latency against its target."""
    monkeypatch.setenv("EE_NAS_CACHE", str(tmp_path / "cache"))
    summary = run_pipeline(tmp_path / "run", "hardware=local_cpu", "logger=csv")
    assert summary["objective"] == "latency" and summary["target_macs"] is None
    assert summary["avg_latency_ms"] > 0 and len(summary["cum_latency_ms"]) == summary["n_exits"]
    front = json.loads((tmp_path / "run" / "pareto_front.json").read_text())
    assert front["unit"] == "ms"
    target = summary["target_latency_ms"]
    assert all(r["avg_cost"] <= target * (1 + 1e-9) for r in front["front"])
    assert list((tmp_path / "cache").glob("latency_lut_*.json")), "the measured table is cached"


def test_checkpoint_after_validation_holds_only_the_supernet(search_run, tmp_path):
    """The validation copy of the largest subnet must stay out of checkpoints, or a resume fails to load."""
    import shutil

    import torch

    run_dir, summary = search_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    ckpt = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] >= 1  # validated
    state = ckpt["state_dict"]
    assert state and not [k for k in state if k.startswith("_val_net")]
    again = run_pipeline(copy, "trainer.check_val_every_n_epoch=1", "logger=csv")  # resumes from it
    assert again["test_acc"] == summary["test_acc"]
