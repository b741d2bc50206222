"""Stages of a run after composition: run-directory guard, callbacks, resume, and the post-search report."""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ee_nas.config import ConfigError
from ee_nas.lit_module import non_finite_tensors
from ee_nas.hardware.latency import LatencyTable
from ee_nas.search.evaluator import SubnetEvaluator
from ee_nas.search.genome import Genome
from ee_nas.thresholds import evaluate_policy, oracle_policy, threshold_sweep, tune_thresholds
from ee_nas.utils import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


def eval_device(cfg: DictConfig) -> str:
    device = cfg.evaluation.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# -- the run directory: one config per directory, reruns resume -----------------------------------------
RUN_CONFIG = "run_config.json"
#: keys that change how a run is executed or logged, not its results: a rerun may change them
#: (data.root: where the data lies, e.g. a node-local copy on a cluster)
RESUME_IRRELEVANT = ("paths", "logger", "name", "resume", "evaluation.device", "data.root", "data.num_workers",
                     "data.pin_memory", "data.download", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "trainer.log_every_n_steps")
RESULTS = ("summary.json", "archive.json", "checkpoints/last.ckpt")


class RunDirError(ConfigError):
    """The run directory holds results this run must not overwrite."""


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM stopped the run. A BaseException, so no `except Exception` (a failed
    candidate, for one) swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def run_config(cfg: DictConfig) -> dict:
    """The resolved config minus `RESUME_IRRELEVANT`: what decides a run's results."""
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
           for k in cfg if k not in RESUME_IRRELEVANT}
    for key in RESUME_IRRELEVANT:
        group, _, leaf = key.partition(".")
        if leaf and isinstance(out.get(group), dict):
            out[group].pop(leaf, None)
    return out


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to mix a different config's results into `run_dir`; record this run's config there.

    Rerunning the same config in the same directory resumes (a finished run is re-reported
    cheaply: training is skipped via checkpoints/last.ckpt and the search is replayed from
    archive.json); a different config, or `resume=false`, over existing results stops here.
    """
    config = run_config(cfg)
    digest = config_hash(config)
    record = run_dir / RUN_CONFIG
    results = [name for name in RESULTS if (run_dir / name).exists()]
    if record.exists():
        old = json.loads(record.read_text())
        if old["config_hash"] != digest and results:
            old_flat, new_flat = _flatten(old["config"]), _flatten(json.loads(json.dumps(config, default=str)))
            diff = [f"{k}: {old_flat.get(k, '<unset>')!r} -> {new_flat.get(k, '<unset>')!r}"
                    for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k) != new_flat.get(k)]
            raise RunDirError(
                f"run directory {run_dir} holds a run with a different config ({'; '.join(diff[:5])}"
                f"{'; ...' if len(diff) > 5 else ''}); its results are kept. Rerun with the same config to "
                f"resume it, or choose a new directory (hydra.run.dir=...)")
    elif results:
        raise RunDirError(f"run directory {run_dir} holds results ({', '.join(results)}) but no {RUN_CONFIG}, "
                          f"so this config cannot be checked against them; they are kept. Choose a new "
                          f"directory (hydra.run.dir=...)")
    if results and not cfg.get("resume", True):
        raise RunDirError(f"resume=false would overwrite the results in {run_dir} ({', '.join(results)}); "
                          f"choose a new directory (hydra.run.dir=...) or drop resume=false to resume")
    if not record.exists() or not results:  # a run that stopped before any result may change its config
        atomic_write_json(record, {"config_hash": digest, "config": config})


# -- checkpoints --------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file in the same folder and renamed: a kill never leaves half a file
    (Lightning stages local files in the system temp dir, so its final move may be a copy)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True)


class LastCheckpoint(ModelCheckpoint):
    """`checkpoints/last.ckpt` after every training epoch, and when SIGINT/SIGTERM stops training.

    SIGTERM (Lightning's handler) and the first Ctrl+C (ours, while training) let the current
    batch finish; the state is then saved and the run exits, so a rerun resumes exactly where
    it stopped. A second Ctrl+C aborts at once. Other exceptions save nothing: after a NaN loss
    the previous epoch's checkpoint stays (and non-finite weights are never saved, see
    `MultiExitModule.on_save_checkpoint`).
    """

    def __init__(self, dirpath: str | Path):
        super().__init__(dirpath=str(dirpath), filename="last", save_top_k=1, every_n_epochs=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self.received: int | None = None  # the signal that stopped training
        self._sigint = None

    @property
    def path(self) -> str:
        return str(Path(self.dirpath) / f"last{self.FILE_EXTENSION}")

    def on_train_start(self, trainer, pl_module) -> None:
        def stop_after_batch(signum, frame):
            if self.received is not None:
                raise KeyboardInterrupt
            self.received = signum
            log.warning("Ctrl+C: stopping after this batch and saving %s (press it again to abort now)", self.path)
            trainer._signal_connector.received_sigterm = True  # Lightning's graceful SIGTERM stop
        try:
            self._sigint = signal.signal(signal.SIGINT, stop_after_batch)
        except ValueError:  # not the main thread: keep Lightning's KeyboardInterrupt handling
            self._sigint = None

    def _restore_sigint(self) -> None:
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        self.received = self.received or signal.SIGTERM
        if self._last_global_step_saved == trainer.global_step:
            return
        bad = non_finite_tensors(pl_module.state_dict())
        if bad:
            log.warning("not saving the interrupted run: non-finite weights (%s)", bad[0])
            return
        self._save_checkpoint(trainer, self.path)
        log.warning("saved %s at epoch %d, step %d", self.path, trainer.current_epoch, trainer.global_step)


def make_callbacks(cfg: DictConfig, run_dir: Path, hardware) -> tuple[list, object | None]:
    """Checkpointing, plus the NAS callback unless the user fixed the architecture with +arch."""
    callbacks = [LastCheckpoint(run_dir / "checkpoints")]
    nas = None
    if not cfg.get("arch"):
        # partial: a dataclass argument would be turned into a DictConfig by instantiate
        nas = instantiate(cfg.search, _partial_=True)(
            run_dir=str(run_dir), hardware=hardware, measure=cfg.thresholds.measure,
            max_candidates=cfg.thresholds.max_candidates,
            calibration_samples=cfg.evaluation.calibration_samples, device=eval_device(cfg),
            predictor=instantiate(cfg.predictor) if "_target_" in (cfg.get("predictor") or {}) else None)
        callbacks.append(nas)
    return callbacks, nas


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.get("resume", True) and last.exists():
        log.info("resuming supernet training from %s", last)
        # a mid-epoch checkpoint (SIGTERM/Ctrl+C) resumes exactly: the sampler skips the trained batches
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        return str(last)
    return None


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
    out = evaluator.outputs(genome, ("val", "test"), net=net)
    val, test = out["val"], out["test"]
    costs = evaluator.costs.costs(genome)
    cum, cum_cost = costs.cum_macs, evaluator.cum_cost(genome)
    policy = tune_thresholds(val.conf, val.correct, cum_cost, target, max_candidates=cfg.thresholds.max_candidates)
    tested = evaluate_policy(test.conf, test.correct, cum, policy.thresholds).to_dict()
    test_cost = evaluate_policy(test.conf, test.correct, cum_cost, policy.thresholds).avg_macs
    val_macs = float(policy.exit_rates @ cum)
    sweep = threshold_sweep(val.conf, val.correct, test.conf, test.correct, cum,
                            n_points=cfg.thresholds.sweep_points, max_candidates=cfg.thresholds.max_candidates)
    atomic_write_json(run_dir / "threshold_sweep.json", sweep)
    from ee_nas.thresholds.plots import plot_threshold_sweep

    plot_threshold_sweep(sweep, run_dir / "threshold_sweep.png")
    atomic_write(run_dir / "val_logits.npz", lambda f: np.savez_compressed(
        f, logits=val.logits, labels=val.labels, cum_macs=cum), binary=True)
    atomic_write(run_dir / "subnet.pt", lambda f: torch.save(
        {"genome": genome.to_dict(), "state_dict": net.state_dict(), "thresholds": policy.thresholds,
         "measure": cfg.thresholds.measure}, f), binary=True)
    oracle = oracle_policy(test.correct, cum)
    summary = {
        "dataset": datamodule.name, "seed": int(cfg.seed), "search_space": supernet.space.name,
        "hardware": hardware.name,
        "test_acc": tested["accuracy"], "final_exit_test_acc": float(test.correct[:, -1].mean()),
        "val_acc": policy.accuracy, "final_exit_val_acc": float(val.correct[:, -1].mean()),
        "avg_macs": tested["avg_macs"], "val_avg_macs": val_macs,
        "backbone_macs": costs.backbone_macs, "reference_macs": ref,
        "relative_macs": tested["avg_macs"] / ref, "objective": hardware.objective,
        "target_macs": target if hardware.objective == "macs" else None,
        "meets_target": target is None or test_cost <= target, "val_meets_target": policy.feasible,
        "cum_macs": cum.tolist(), "params": costs.params, "n_exits": genome.n_exits, "taps": list(genome.taps),
        "exit_rates": tested["exit_rates"], "exit_accs": tested["exit_accs"], "thresholds": tested["thresholds"],
        "measure": cfg.thresholds.measure,
        "oracle_test_acc": oracle["accuracy"], "oracle_avg_macs": oracle["avg_macs"],
        "energy_mj": hardware.energy_mj(tested["avg_macs"]),
        "n_evaluated": search["n_evaluated"], "hypervolume": search["hypervolume"],
        "genome": genome.to_dict(),
    }
    if latency is not None:  # measured on this machine at batch size 1 (hardware.lut_threads threads)
        cum_ms = latency.predict(genome)
        summary.update(cum_latency_ms=cum_ms.tolist(), avg_latency_ms=float(np.asarray(tested["exit_rates"]) @ cum_ms),
                       target_latency_ms=target if hardware.objective == "latency" else None)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
