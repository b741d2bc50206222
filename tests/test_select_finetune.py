"""Post-search selection (on a fake archive) and, on a short real run, export and fine-tuning."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import run_in_process

from ee_nas.select import knee_distances, select


# -- ranking on a fake archive ------------------------------------------------------------------------

def record(i, acc, macs, n_exits=2, feasible=True, ok=True):
    exits = [{"tap": t, "layers": []} for t in range(n_exits - 1)]
    return {"key": f"k{i:03d}", "val_acc": acc, "avg_macs": macs, "feasible": feasible,
            "status": "ok" if ok else "failed", "genome": {"depths": [1], "expands": [2.0], "kernels": [3],
                                                          "exits": exits}}


@pytest.fixture
def archive():
    rng = np.random.default_rng(0)
    records = [record(i, float(rng.uniform(0.5, 0.99)), float(rng.uniform(1e5, 1e6)), n_exits=int(rng.integers(1, 5)))
               for i in range(60)]
    records += [record(100, 0.999, 1.0, feasible=False), record(101, 0.999, 1.0, ok=False)]
    return records


@pytest.mark.parametrize("prefer", ["trade_off", "accuracy", "macs"])
@pytest.mark.parametrize("n_exits", [None, 1, 3])
def test_selection_count_feasibility_and_n_exits(archive, prefer, n_exits):
    picks = select(archive, prefer, n=5, n_exits=n_exits)
    assert len(picks) == 5 and len({r["key"] for r in picks}) == 5
    assert all(r["feasible"] and r["status"] == "ok" for r in picks)
    if n_exits is not None:
        assert all(len(r["genome"]["exits"]) + 1 == n_exits for r in picks)
    pool = [r for r in archive if r["feasible"] and r["status"] == "ok"
            and (n_exits is None or len(r["genome"]["exits"]) + 1 == n_exits)]
    if prefer == "accuracy":
        assert [r["val_acc"] for r in picks] == sorted((r["val_acc"] for r in pool), reverse=True)[:5]
    if prefer == "macs":
        assert [r["avg_macs"] for r in picks] == sorted(r["avg_macs"] for r in pool)[:5]


def test_trade_off_picks_the_knee_then_the_front():
    # (avg MACs, error): a clear knee at (0.2, 0.3) between the extremes (0.1, 0.9) and (1.0, 0.1)
    front = [record(0, 0.1, 0.1), record(1, 0.7, 0.2), record(2, 0.8, 0.5), record(3, 0.9, 1.0)]
    dominated = [record(4, 0.6, 0.6), record(5, 0.65, 0.9)]
    d = knee_distances(front)
    assert d[1] == d.max() > 0 and d[0] == pytest.approx(0) and d[3] == pytest.approx(0)
    picks = select(front + dominated, "trade_off", n=6)
    assert picks[0]["key"] == "k001"
    assert {r["key"] for r in picks[:4]} == {"k000", "k001", "k002", "k003"}  # the front before the rest
    assert {r["key"] for r in picks[4:]} == {"k004", "k005"}
    assert len(select(front, "trade_off", n=10)) == 4  # fewer qualify: all of them
    assert select(front, "trade_off", n_exits=4) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="prefer"):
        select([], "fastest")  # the command line's own checks: tests/test_cli.py


# -- export and fine-tuning on a short real run --------------------------------------------------------

# 2 epochs of 4 batches: the supernet is barely trained (as with full epochs: test acc about 0.2), which is
# all export and fine-tuning need; fine-tuning it still raises its accuracy
FAST = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "search.pop_size=4", "search.n_generations=2",
        "search.n_per_iteration=2", "predictor=rbf", "logger=csv", "evaluation.calibration_samples=128",
        "thresholds.sweep_points=4", "trainer.enable_progress_bar=false", "finetune.epochs=0"]


def run_pipeline(run_dir: Path, *overrides: str) -> dict:
    return run_in_process(run_dir, *FAST, *overrides, save_config=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_pipeline(run_dir)


def test_surrogate_search_ran_in_the_pipeline(trained_run):
    run_dir, summary = trained_run
    assert summary["n_evaluated"] == 4 + 2  # the initial population, then one iteration of n_per_iteration
    progress = (run_dir / "search_progress.csv").read_text().splitlines()
    assert "kendall_tau_acc" in progress[0] and len(progress) == 3


def assert_rescored_as_archived(run_dir: Path, row: dict) -> None:
    """select re-extracts the archived subnet (the same final-exit val accuracy) and tunes the deployed policy:
    under the target less thresholds.cost_margin, so never more accurate on val than the search's tuning."""
    from ee_nas.genome import Genome

    records = {r["key"]: r for r in json.loads((run_dir / "archive.json").read_text())["records"]}
    record = records[Genome.from_dict(row["genome"]).key()]
    assert row["final_exit_val_acc"] == pytest.approx(record["final_exit_val_acc"], abs=1e-9)
    assert row["archive_val_acc"] == record["val_acc_tuned"] and row["val_acc"] <= row["archive_val_acc"] + 1e-9


def test_select_exports_subnets_in_the_run_format(trained_run, capsys):
    from ee_nas.select import main

    run_dir, _ = trained_run
    rows = main([f"run_dir={run_dir}", "prefer=accuracy", "n=2"])
    assert 1 <= len(rows) <= 2 and "val_acc" in capsys.readouterr().out
    reference = torch.load(run_dir / "subnet.pt", weights_only=False)
    for rank, row in enumerate(rows, 1):
        out = run_dir / "selected" / f"{rank}_accuracy"
        saved = torch.load(out / "subnet.pt", weights_only=False)
        assert saved.keys() == reference.keys()
        assert saved["genome"] == row["genome"] and (out / "arch.yaml").is_file()
        assert_rescored_as_archived(run_dir, row)
    assert json.loads((run_dir / "selected" / "selection.json").read_text())["prefer"] == "accuracy"


def test_finetune_starts_at_inherited_accuracy_and_does_not_lower_it(trained_run):
    from ee_nas.finetune import main

    run_dir, summary = trained_run
    result = main([f"run_dir={run_dir}", "epochs=2"])
    before, after = result["before"], result["after"]
    assert abs(before["test_acc"] - summary["test_acc"]) <= 0.01
    assert after["test_acc"] >= before["test_acc"]
    on_disk = json.loads((run_dir / "finetuned" / "finetune_summary.json").read_text())
    assert on_disk["after"]["test_acc"] == after["test_acc"]
    assert after["meets_target"] == (after["avg_macs"] <= summary["target_macs"])
    saved = torch.load(run_dir / "finetuned" / "subnet.pt", weights_only=False)
    assert saved["genome"] == summary["genome"]


class TwoExits(torch.nn.Module):
    """The smallest multi-exit net: an early exit `a` and a final exit `b`; counts training forwards."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.steps = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 0

    def forward(self, x):
        self.steps += self.training
        return [self.a(x), self.b(x)]


def finetune_two_exits(training: dict | None = None, **kwargs) -> tuple[TwoExits, float]:
    """`finetune_net` for one epoch of 5 batches on random data, with a supernet lr of 0.1 and the loss weights
    updated by `training`; returns (net, lr)."""
    from torch.utils.data import DataLoader, TensorDataset

    from ee_nas.finetune import finetune_net

    net = TwoExits()
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))), batch_size=4)
    training = {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}, "final_weight": 1.0,
                "early_weight": 1.0, "distill_weight": 0.0, "distill_temperature": 2.0, **(training or {})}
    return finetune_net(net, loader, training, epochs=1, **kwargs)


@pytest.mark.parametrize("limit, steps", [(None, 5), (2, 2)])
def test_finetune_net_trains_limit_train_batches_an_epoch(limit, steps):
    """finetune.limit_train_batches (debug=smoke sets it) caps each fine-tuning epoch; None trains on all."""
    net, lr = finetune_two_exits(lr_fraction=0.25, limit_train_batches=limit)
    assert net.steps == steps
    assert lr == pytest.approx(0.025)  # finetune.lr_fraction of the supernet's lr


@pytest.mark.parametrize("early_weight", [0.0, None])
def test_finetune_net_weights_the_early_exits_by_early_weight(early_weight):
    """finetune.early_weight replaces training.early_weight while fine-tuning: at 0 the early exit gets no
    gradient (its weights stay put while the final exit's move); null keeps training.early_weight (1.0)."""
    torch.manual_seed(0)
    early, final = (layer.weight.detach().clone() for layer in TwoExits().children())
    torch.manual_seed(0)
    net, _ = finetune_two_exits(early_weight=early_weight)
    assert not torch.equal(net.b.weight, final)
    assert torch.equal(net.a.weight, early) == (early_weight == 0.0)


def test_finetune_net_distils_every_exit_from_the_teacher():
    """finetune.teacher=largest: with only the distillation loss, every exit moves towards the frozen teacher's
    final exit (without a teacher the final exit, distilling from itself, gets no gradient); the teacher stays."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    teacher, x = TwoExits(), torch.randn(64, 4)
    frozen = [p.detach().clone() for p in teacher.parameters()]
    soft = F.softmax(teacher.eval()(x)[-1], 1).detach()

    def gaps(net):  # KL(teacher || exit) of each exit
        with torch.no_grad():
            return [float(F.kl_div(F.log_softmax(z, 1), soft, reduction="batchmean")) for z in net.eval()(x)]

    only_distill = {"final_weight": 0.0, "early_weight": 0.0, "distill_weight": 1.0}
    torch.manual_seed(1)
    start = gaps(TwoExits())
    nets = {}
    for name, t in (("self", None), ("largest", teacher)):
        torch.manual_seed(1)
        nets[name], _ = finetune_two_exits(only_distill, lr=1.0, teacher=t)
    assert all(after < before for after, before in zip(gaps(nets["largest"]), start))
    assert gaps(nets["self"])[1] == pytest.approx(start[1])  # its own final exit: no gradient
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), frozen))


def test_finetune_fallbacks_are_the_configs():
    """`python -m ee_nas.finetune` on a run made before finetune.lr_fraction / early_weight existed uses the
    config's defaults."""
    from omegaconf import OmegaConf

    import ee_nas
    from ee_nas.finetune import EARLY_WEIGHT, LR_FRACTION

    config = OmegaConf.load(Path(ee_nas.__file__).parent / "conf" / "config.yaml")
    assert config.finetune.lr_fraction == LR_FRACTION
    assert config.finetune.early_weight == EARLY_WEIGHT


# -- a latency-objective run: select and fine-tune tune thresholds against the target in ms ------------

@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    import os

    from hydra.utils import instantiate
    from inprocess import compose_run

    from ee_nas.hardware.latency import LatencyTable
    from ee_nas.inference.runtime import build_supernet

    cache = tmp_path_factory.mktemp("lut_cache")
    old = os.environ.get("EE_NAS_CACHE")
    os.environ["EE_NAS_CACHE"] = str(cache)  # the run's LUT, found again by select/finetune
    try:
        run_dir = tmp_path_factory.mktemp("latency_run")
        # debug-sized: the costs and thresholds are under test here, not the accuracy. At 16x16 the fixed costs
        # (stem, head, exit decision) dominate, so the 8 candidates cost 0.86-1.17 of half the largest backbone's
        # latency, and on CI once none met it: a budget of 0.75 keeps the test about the latency path, not luck
        overrides = (*FAST, "hardware=local_cpu", "hardware.target_fraction=0.75", "predictor=none",
                     "trainer.max_epochs=1", "++trainer.limit_train_batches=1", "data.image_size=16")
        # this machine's LUT, timed with few repeats (the run would take 15): the run finds it in the cache
        cfg = compose_run(run_dir, *overrides)
        LatencyTable.from_profile(build_supernet(cfg, 1, 10).eval(), instantiate(cfg.hardware), repeats=3,
                                  warmup=1, sample_s=1e-4).measure_all()
        yield run_dir, run_in_process(run_dir, *overrides, save_config=True)
    finally:
        if old is None:
            os.environ.pop("EE_NAS_CACHE")
        else:
            os.environ["EE_NAS_CACHE"] = old


def test_select_and_finetune_report_latency_under_the_latency_target(latency_run):
    from ee_nas.finetune import main as finetune_main
    from ee_nas.select import main as select_main

    run_dir, summary = latency_run
    target = summary["target_latency_ms"]
    assert summary["objective"] == "latency" and target > 0 and summary["target_macs"] is None
    rows = select_main([f"run_dir={run_dir}", "prefer=accuracy", "n=2"])
    selection = json.loads((run_dir / "selected" / "selection.json").read_text())
    assert (selection["objective"], selection["target_latency_ms"], selection["target_macs"]) == ("latency", target,
                                                                                                   None)
    for row in rows:
        assert row["objective"] == "latency" and row["avg_cost"] == pytest.approx(row["avg_latency_ms"])
        assert row["val_meets_target"] and row["val_avg_latency_ms"] <= target * (1 + 1e-9)  # tuned in ms
        assert row["meets_target"] == (row["avg_latency_ms"] <= target)
        assert_rescored_as_archived(run_dir, row)
    result = finetune_main([f"run_dir={run_dir}", "epochs=0"])  # re-scored: the threshold path under test
    assert (result["objective"], result["target_latency_ms"]) == ("latency", target)
    for name in ("before", "after"):
        r = result[name]
        assert r["val_avg_latency_ms"] <= target * (1 + 1e-9) and r["avg_cost"] == pytest.approx(r["avg_latency_ms"])
        assert r["meets_target"] == (r["avg_latency_ms"] <= target)
    assert result["before"]["avg_latency_ms"] == pytest.approx(summary["avg_latency_ms"])  # the run's own report


@pytest.mark.parametrize("refit", [False, True])
def test_finetune_refit_deploys_the_inherited_weights_trained_on_train_and_val_tuned_on_the_others_val(refit):
    """finetune.refit: the first fine-tuning (train only) gives the val outputs the thresholds are tuned on; the
    network deployed is a copy of the inherited weights trained on train + val for as many steps (epochs scaled
    by train / (train + val)). Without refit: the first network, tuned on its own val outputs."""
    from types import SimpleNamespace

    from ee_nas.finetune import finetune_refit

    calls = []

    def train(net, with_val, epochs):  # marks each network it trains, and what it started from
        calls.append((with_val, epochs, float(net.a.weight.sum())))
        with torch.no_grad():
            net.a.weight += 1.0 + with_val
        return net, 0.01

    class Evaluator:
        datamodule = SimpleNamespace(split_sizes=lambda: {"train": 1079, "val": 359, "test": 359})

        def outputs(self, genome, splits, net):
            return {"val": ("outputs of", float(net.a.weight.sum()))}

    torch.manual_seed(0)
    net = TwoExits()
    inherited = float(net.a.weight.sum())
    deployed, lr, val = finetune_refit(train, net, 10, Evaluator(), genome=None, refit=refit)
    first = inherited + net.a.weight.numel()  # what the first fine-tuning (train only) left
    assert lr == 0.01 and calls[0][:2] == (False, 10)
    if not refit:
        assert len(calls) == 1 and val is None and deployed is net
        return
    assert calls[1][:2] == (True, 7)  # 10 * 1079 // 1438: no more optimizer steps than the first
    assert calls[1][2] == pytest.approx(inherited)  # trained from the inherited weights, not the first's
    assert val == ("outputs of", pytest.approx(first))  # tuned on the first's val outputs
    assert deployed is not net and float(deployed.a.weight.sum()) == pytest.approx(inherited + 2 * net.a.weight.numel())
    calls.clear()
    assert finetune_refit(train, net, 0, Evaluator(), genome=None, refit=True)[2] is None  # 0 epochs: nothing to refit
    assert [c[:2] for c in calls] == [(False, 0)]
