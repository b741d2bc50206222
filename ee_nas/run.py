"""Entry point: compose -> fit supernet -> NAS (callback) -> thresholds -> test -> summary.json.

    python -m ee_nas.run                               # digits, offline, CPU, minutes
    python -m ee_nas.run +experiment=svhn_search       # the real experiment
    python -m ee_nas.run -m hardware=mcu,edge_cpu seed=1,2,3
"""
from __future__ import annotations

import logging
import os
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ee_nas.config import ConfigError, apply_debug, validate

    cfg = apply_debug(cfg)
    try:
        validate(cfg)
    except ConfigError as err:  # a user error: one clear message, no traceback
        log.error("%s", err)
        raise SystemExit(2) from None
    summary = run(cfg)
    return summary["test_acc"]


def run(cfg: DictConfig) -> dict:
    """The whole pipeline for a composed config; returns the summary written to summary.json."""
    configure_wandb_env()
    import torch
    from hydra.utils import instantiate
    from lightning import seed_everything

    from ee_nas.logging_utils import finish_loggers, log_final, make_loggers
    from ee_nas.lit_module import MultiExitModule
    from ee_nas.models.multi_exit import MultiExitSupernet
    from ee_nas.pipeline import evaluate_and_report, make_callbacks, resume_checkpoint

    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    backbone = instantiate(cfg.backbone, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes,
                           image_size=datamodule.image_size)
    space = instantiate(cfg.search_space, backbone=backbone)
    supernet = MultiExitSupernet(backbone, space)
    module = MultiExitModule(supernet, seed=cfg.seed, calibration_samples=cfg.evaluation.calibration_samples,
                             **OmegaConf.to_container(cfg.training))
    hardware = instantiate(cfg.hardware)
    loggers = make_loggers(cfg, run_dir)
    callbacks, nas = make_callbacks(cfg, run_dir, hardware)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir))
        summary = evaluate_and_report(cfg, run_dir, module, datamodule, hardware, nas)
        log_final(loggers, run_dir, summary)
    finally:
        finish_loggers(loggers)
    log.info("summary: test_acc %.4f at %.3g avg MACs (%.1f%% of the backbone); written to %s",
             summary["test_acc"], summary["avg_macs"], 100 * summary["relative_macs"], run_dir / "summary.json")
    return summary


if __name__ == "__main__":
    main()
