"""Entry point: compose -> fit supernet -> NAS (callback) -> thresholds -> test -> summary.json.

    python -m ee_nas.run                               # digits, offline, CPU, minutes
    python -m ee_nas.run +experiment=svhn_search       # the real experiment
    python -m ee_nas.run -m hardware=mcu,edge_cpu seed=1,2,3
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ee_nas")


def configure_wandb_env() -> None:
    """Offline W&B unless the user configured it: tests and laptops never see a login prompt."""
    configured = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    if not configured:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ee_nas.config import apply_debug, validate

    cfg = apply_debug(cfg)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a launcher's worker): keep its handling
        previous = None
    try:
        validate(cfg)
        summary = run(cfg)
    except BaseException as err:
        code, message = user_error(err, cfg)
        if code is None:
            raise
        log.error("%s", message)  # a user error or an interruption: one clear message, no traceback
        raise SystemExit(code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return summary["val_acc"]  # what a Hydra sweeper optimizes: never the test split


def _terminate(signum, frame) -> None:
    """SIGTERM outside supernet training (setup, search, report): stop now; artifacts are written
    atomically, so the rerun resumes from the last checkpoint and archive.json. While training,
    Lightning's handler runs first and stops after the current batch (this one then stays quiet)."""
    from ee_nas.checkpointing import RunInterrupted

    if signal.getsignal(signal.SIGTERM) is _terminate:
        raise RunInterrupted(signum)


def user_error(err: BaseException, cfg: DictConfig) -> tuple[int | None, str]:
    """(exit status, message) for errors a user causes or fixes; (None, '') for bugs (traceback)."""
    from ee_nas.config import ConfigError
    from ee_nas.data import DataError
    from ee_nas.lit_module import NonFiniteLossError
    from ee_nas.checkpointing import RunInterrupted

    try:
        run_dir = cfg.paths.run_dir
    except Exception:  # not composed by hydra
        run_dir = "<the run directory>"
    if isinstance(err, (ConfigError, DataError)):
        return 2, str(err)
    if isinstance(err, NonFiniteLossError):
        return 3, (f"training stopped: {err} ({Path(run_dir) / 'checkpoints' / 'last.ckpt'}) A changed config "
                   f"(a lower learning rate) needs a new run directory (hydra.run.dir=...)")
    if isinstance(err, (RunInterrupted, KeyboardInterrupt)):
        signum = err.signum if isinstance(err, RunInterrupted) else signal.SIGINT
        return 128 + signum, (f"interrupted by {signal.Signals(signum).name}; the finished work is saved in "
                              f"{run_dir}. Resume with: {resume_command(run_dir)}")
    return None, ""


def resume_command(run_dir) -> str:
    """The command that resumes this run: the same overrides plus hydra.run.dir=<run_dir>."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    except Exception:  # not started by @hydra.main
        overrides = ["<the same overrides>"]
    return " ".join(["python -m ee_nas.run", *map(shlex.quote, overrides), shlex.quote(f"hydra.run.dir={run_dir}")])


def build(cfg: DictConfig, key: str, **kwargs):
    """`instantiate(cfg[key])`; a constructor's ValueError/TypeError becomes one ConfigError line naming the key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ee_nas.config import ConfigError
    from ee_nas.data import DataError

    try:
        return instantiate(cfg[key], **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ConfigError, DataError)):  # already a message for the user
            raise cause from None
        if not isinstance(cause, (ValueError, TypeError, FileNotFoundError, MisconfigurationException)):
            raise
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        where = "" if message.startswith(f"{key}.") else f"{key}: "
        raise ConfigError(f"config error: {where}{message}") from None


def run(cfg: DictConfig) -> dict:
    """The whole pipeline for a composed config; returns the summary written to summary.json."""
    configure_wandb_env()
    import torch
    from lightning import seed_everything
    from lightning.pytorch.trainer.states import TrainerStatus

    from ee_nas.config import validate_built
    from ee_nas.hardware.macs import CostModel
    from ee_nas.logging_utils import finish_loggers, log_final, make_loggers
    from ee_nas.lit_module import MultiExitModule
    from ee_nas.models.multi_exit import MultiExitSupernet
    from ee_nas.checkpointing import AtomicCheckpointIO, RunInterrupted, resume_checkpoint
    from ee_nas.distributed import check_trainer_config, on_rank_zero, process_rank
    from ee_nas.pipeline import evaluate_and_report, make_callbacks
    from ee_nas.run_dir import adopt_supernet, claim_run_dir
    from ee_nas.utils import remove_stale_temp_files

    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_trainer_config(cfg)
    if process_rank() == 0:  # DDP: the other ranks start in this directory once rank 0 has claimed it
        claim_run_dir(cfg, run_dir)
        if adopted := adopt_supernet(cfg, run_dir):
            log.info("starting from the trained supernet %s", adopted)
        remove_stale_temp_files(run_dir, run_dir / "checkpoints")
    seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    datamodule = build(cfg, "data")
    datamodule.setup()
    backbone = build(cfg, "backbone", in_channels=datamodule.in_channels, num_classes=datamodule.num_classes,
                     image_size=datamodule.image_size)
    space = build(cfg, "search_space", backbone=backbone)
    supernet = MultiExitSupernet(backbone, space)
    hardware = build(cfg, "hardware")
    validate_built(space, CostModel(supernet), hardware)
    module = MultiExitModule(supernet, seed=cfg.seed, calibration_samples=cfg.evaluation.calibration_samples,
                             **OmegaConf.to_container(cfg.training))
    loggers = make_loggers(cfg, run_dir)
    callbacks, nas = make_callbacks(cfg, run_dir, hardware)
    trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir),
                    plugins=[AtomicCheckpointIO()])
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir))
        except SystemExit:  # Lightning's graceful stop on SIGTERM / Ctrl+C, after saving last.ckpt
            received = next((c.received for c in callbacks if getattr(c, "received", None)), None)
            if received is None and trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            raise RunInterrupted(received or signal.SIGINT) from None
        # DDP: rank 0 reports and writes; the other ranks wait and return the same summary
        summary = on_rank_zero(lambda: evaluate_and_report(cfg, run_dir, module, datamodule, hardware, nas))
        if trainer.global_rank == 0:
            log_final(loggers, run_dir, summary)
    except BaseException as err:  # W&B marks the run with the exit status the process will have
        finish_loggers(loggers, exit_code=user_error(err, cfg)[0] or 1)
        raise
    finish_loggers(loggers)
    log.info("summary: test_acc %.4f at %.3g avg MACs (%.1f%% of the backbone); written to %s",
             summary["test_acc"], summary["avg_macs"], 100 * summary["relative_macs"], run_dir / "summary.json")
    return summary


def cli() -> None:
    """`python -m ee_nas.run`: a config Hydra cannot compose (a wrong type, an unknown key, a missing option)
    stops with one line and exit status 2, like every other config error."""
    from hydra.errors import ConfigCompositionException

    from ee_nas.config import composition_error

    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us instead of Hydra's multi-line report
    try:
        main()
    except ConfigCompositionException as err:
        if full_error == "1":
            raise
        log.error("%s", composition_error(err))
        raise SystemExit(2) from None
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    cli()
