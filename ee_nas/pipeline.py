"""Stages of a run after composition: the callbacks, and the post-search threshold/test report."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ee_nas.checkpointing import LastCheckpoint
from ee_nas.hardware.latency import LatencyTable
from ee_nas.search.evaluator import SubnetEvaluator
from ee_nas.genome import Genome
from ee_nas.thresholds import evaluate_policy, oracle_policy, threshold_sweep, tune_thresholds
from ee_nas.utils import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


def eval_device(cfg: DictConfig) -> str:
    device = cfg.evaluation.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def save_subnet(path: Path, genome: Genome, net, thresholds, measure: str) -> Path:
    """`subnet.pt`: the static subnet's weights with its genome and exit policy (written atomically)."""
    return atomic_write(path, lambda f: torch.save({"genome": genome.to_dict(), "state_dict": net.state_dict(),
                                                    "thresholds": thresholds, "measure": measure}, f), binary=True)


def make_callbacks(cfg: DictConfig, run_dir: Path, hardware) -> tuple[list, object | None]:
    """The pipeline's own callbacks (checkpointing, which resuming relies on, and the NAS callback unless the
    user fixed the architecture with +arch: both need run-time arguments), then every `callbacks` entry with
    a _target_ (conf/callbacks/, e.g. callbacks=[default,lr_monitor])."""
    callbacks = [LastCheckpoint(run_dir / "checkpoints")]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if "_target_" in c]
    nas = None
    if not cfg.get("arch"):
        # partial: a dataclass argument would be turned into a DictConfig by instantiate
        nas = instantiate(cfg.search, _partial_=True)(
            run_dir=str(run_dir), hardware=hardware, measure=cfg.thresholds.measure,
            max_candidates=cfg.thresholds.max_candidates, score_folds=cfg.thresholds.score_folds,
            calibration_samples=cfg.evaluation.calibration_samples, device=eval_device(cfg),
            predictor=instantiate(cfg.predictor) if "_target_" in (cfg.get("predictor") or {}) else None)
        callbacks.append(nas)
    return callbacks, nas


def tune_on_val(cfg: DictConfig, evaluator, genome: Genome, val, target):
    """The deployed exit policy of `genome`: tuned on its val outputs under the target (and the exit-saving
    floor) less `thresholds.cost_margin` when it has early exits (their avg cost on new images varies around
    val's; a static network's does not), or under the whole budget where the margin leaves no policy at all;
    ties in val accuracy broken by `thresholds.ties`."""
    def tune(budget, warn=True):
        return tune_thresholds(val.conf, val.correct, evaluator.cum_cost(genome), budget, warn=warn,
                               max_candidates=cfg.thresholds.max_candidates, ties=cfg.thresholds.get("ties", "cheap"))

    budget = evaluator.exit_target(genome, target)
    margin = cfg.thresholds.get("cost_margin", 0.0)
    if budget is not None and genome.n_exits > 1 and margin > 0:
        policy = tune(budget * (1.0 - margin), warn=False)
        if policy.feasible:
            return policy
    return tune(budget)


def finetune_chosen(cfg: DictConfig, net, genome: Genome, evaluator, datamodule, target) -> tuple:
    """Fine-tune the chosen network as a static net (`finetune.epochs`, 0 = off; at most
    `finetune.limit_train_batches` batches an epoch, null = all; `finetune.refit`: see `finetune_refit`).
    Returns the network to deploy, the summary entries that record the fine-tuning (with the val/test accuracy
    it had before, thresholds tuned alike) and the val outputs to tune its thresholds on (None: its own)."""
    epochs = int(cfg.finetune.epochs)
    if epochs <= 0:
        return net, {"finetune_epochs": 0}, None
    from omegaconf import OmegaConf

    from ee_nas.finetune import finetune_net, finetune_refit, make_teacher

    out = evaluator.outputs(genome, ("val", "test"), net=net)
    policy = tune_on_val(cfg, evaluator, genome, out["val"], target)
    before = evaluate_policy(out["test"].conf, out["test"].correct, evaluator.cum_cost(genome), policy.thresholds)
    log.info("fine-tuning the chosen network for %d epochs (test acc before: %.4f)", epochs, before.accuracy)
    # before the seed: the teacher's BatchNorm recalibration runs in train mode, whose dropout draws random numbers
    teacher = make_teacher(evaluator, cfg.finetune.get("teacher", "self"))

    def train(net, with_val: bool, epochs: int):
        torch.manual_seed(cfg.seed)  # the same run of random numbers for both (refit)
        return finetune_net(net, datamodule.train_dataloader(cfg.finetune.get("augment"), with_val=with_val),
                            OmegaConf.to_container(cfg.training, resolve=True), epochs,
                            cfg.finetune.get("lr"), cfg.finetune.lr_fraction, cfg.finetune.early_weight,
                            evaluator.device, evaluator.calibration, datamodule.eval_batch_size,
                            progress_bar=bool(cfg.trainer.get("enable_progress_bar", False)),
                            limit_train_batches=cfg.finetune.get("limit_train_batches"), teacher=teacher)

    refit = bool(cfg.finetune.get("refit", False))
    net, _, val = finetune_refit(train, net, epochs, evaluator, genome, refit)
    return net, {"finetune_epochs": epochs, "pre_finetune_test_acc": float(before.accuracy),
                 "pre_finetune_val_acc": float(policy.accuracy), "finetune_refit": refit}, val


def report_policy(cfg: DictConfig, evaluator, genome: Genome, net, target, val=None) -> tuple:
    """`net`'s deployed exit policy (`tune_on_val`, on its own val outputs or on `val`'s: `finetune.refit`) and
    what it does on test: accuracy, avg MACs, avg cost in the objective's unit (and the latency the run's table
    predicts at batch size 1), exit rates. Returns (report, policy, val outputs, test outputs); the run's
    summary and `ee_nas.select` / `ee_nas.finetune` report a network alike through it."""
    out = evaluator.outputs(genome, ("val", "test") if val is None else ("test",), net=net)
    val, test = out.get("val", val), out["test"]
    costs = evaluator.costs.costs(genome)
    cum, cum_cost = costs.cum_macs, evaluator.cum_cost(genome)  # cum_cost: MACs, or ms
    policy = tune_on_val(cfg, evaluator, genome, val, target)
    tested = evaluate_policy(test.conf, test.correct, cum, policy.thresholds).to_dict()
    test_cost = evaluate_policy(test.conf, test.correct, cum_cost, policy.thresholds).avg_macs
    latency = {}
    if evaluator.latency is not None:  # predicted by the run's table at batch size 1
        cum_ms = evaluator.latency.predict(genome)
        latency = {"cum_latency_ms": cum_ms.tolist(), "val_avg_latency_ms": float(policy.exit_rates @ cum_ms),
                   "avg_latency_ms": float(np.asarray(tested["exit_rates"]) @ cum_ms)}
    report = {
        "val_acc": float(policy.accuracy), "val_avg_macs": float(policy.exit_rates @ cum),
        "test_acc": tested["accuracy"], "avg_macs": tested["avg_macs"],
        "relative_macs": tested["avg_macs"] / evaluator.reference_macs,
        "objective": evaluator.hardware.objective if evaluator.hardware is not None else "macs",
        "avg_cost": float(test_cost), "val_avg_cost": float(policy.avg_macs), **latency,
        "final_exit_val_acc": float(val.correct[:, -1].mean()),
        "final_exit_test_acc": float(test.correct[:, -1].mean()),
        "meets_target": target is None or test_cost <= target, "val_meets_target": policy.feasible,
        "exit_rates": tested["exit_rates"], "exit_accs": tested["exit_accs"], "thresholds": tested["thresholds"],
        "cum_macs": cum.tolist(), "params": costs.params, "n_exits": genome.n_exits, "taps": list(genome.taps),
        # did the exits, not a smaller backbone, meet the budget? (DESIGN: exit_saving)
        "own_backbone_macs": costs.backbone_macs, "exit_saving": 1.0 - tested["avg_macs"] / costs.backbone_macs,
    }
    return report, policy, val, test


def evaluate_and_report(cfg: DictConfig, run_dir: Path, module, datamodule, hardware, nas) -> dict:
    """Tune the chosen subnet's thresholds on val, report on test, sweep, write summary.json."""
    supernet = module.supernet.eval()  # each extracted subnet goes to the evaluation device
    latency = nas.latency if nas is not None else LatencyTable.from_profile(supernet, hardware,
                                                                             measure=cfg.thresholds.measure)
    if latency is not None and nas is None:
        latency.measure_all()
    evaluator = SubnetEvaluator(supernet, datamodule, measure=cfg.thresholds.measure,
                                calibration_samples=cfg.evaluation.calibration_samples, device=eval_device(cfg),
                                max_candidates=cfg.thresholds.max_candidates, hardware=hardware, latency=latency)
    ref = evaluator.reference_macs
    target = hardware.target(evaluator.reference_cost)  # in the objective's unit (MACs, or ms)
    if cfg.get("arch"):
        genome = supernet.space.validate(Genome.load(cfg.arch))
        genome.save(run_dir / "arch.yaml")
        search = {"n_evaluated": 0, "hypervolume": None}
    else:
        genome, search = nas.result["genome"], nas.result
    net = evaluator.subnet(genome)
    net, finetuned, val = finetune_chosen(cfg, net, genome, evaluator, datamodule, target)
    report, policy, val, test = report_policy(cfg, evaluator, genome, net, target, val)
    cum = np.asarray(report["cum_macs"])
    sweep = threshold_sweep(val.conf, val.correct, test.conf, test.correct, cum,
                            n_points=cfg.thresholds.sweep_points, max_candidates=cfg.thresholds.max_candidates)
    atomic_write_json(run_dir / "threshold_sweep.json", sweep)
    from ee_nas.thresholds.plots import plot_threshold_sweep

    plot_threshold_sweep(sweep, run_dir / "threshold_sweep.png")
    atomic_write(run_dir / "val_logits.npz", lambda f: np.savez_compressed(
        f, logits=val.logits, labels=val.labels, cum_macs=cum), binary=True)
    save_subnet(run_dir / "subnet.pt", genome, net, policy.thresholds, cfg.thresholds.measure)
    oracle = oracle_policy(test.correct, cum)
    summary = {
        "dataset": datamodule.name, "seed": int(cfg.seed), "search_space": supernet.space.name,
        "hardware": hardware.name, **report, "backbone_macs": report["own_backbone_macs"], "reference_macs": ref,
        "target_macs": target if hardware.objective == "macs" else None,
        "measure": cfg.thresholds.measure,
        "oracle_test_acc": oracle["accuracy"], "oracle_avg_macs": oracle["avg_macs"],
        "energy_mj": hardware.energy_mj(report["avg_macs"]),
        "n_evaluated": search["n_evaluated"], "hypervolume": search["hypervolume"],
        "genome": genome.to_dict(), **finetuned,
    }
    if latency is not None:  # measured on this machine at batch size 1 (hardware.lut_threads threads)
        summary["target_latency_ms"] = target if hardware.objective == "latency" else None
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
