"""Loggers for a run: CSV always, W&B (offline unless configured); final artifacts and clean shutdown."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.get("csv", True):
        # a version folder per (re)start: Lightning empties an existing one, so a resumed run keeps its old log
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    wb = cfg.logger.get("wandb") or {}
    if wb.get("enabled", False):
        mode = wb.get("mode", "auto")
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE", "online")
        loggers.append(WandbLogger(project=wb.get("project", "ee_nas"), entity=wb.get("entity"),
                                   group=wb.get("group"), tags=list(wb.get("tags") or []), mode=mode,
                                   save_dir=str(run_dir), name=f"{cfg.name}-seed{cfg.seed}",
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def wandb_run(loggers: list):
    from lightning.pytorch.loggers import WandbLogger

    return next((lg.experiment for lg in loggers if isinstance(lg, WandbLogger)), None)


def log_final(loggers: list, run_dir: Path, summary: dict) -> None:
    """Final numbers to every logger; tables, plots and the chosen architecture to W&B."""
    scalars = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
    for lg in loggers:
        lg.log_metrics(scalars)
        lg.save()
    run = wandb_run(loggers)
    if run is None:
        return
    import json

    import wandb

    run.summary.update(scalars)
    front_file = run_dir / "pareto_front.json"
    if front_file.exists():
        front = json.loads(front_file.read_text())["front"]
        table = wandb.Table(columns=["val_acc", "avg_macs", "params", "n_exits", "genome"],
                            data=[[r["val_acc"], r["avg_macs"], r["params"], len(r["genome"]["exits"]) + 1,
                                   json.dumps(r["genome"])] for r in front])
        run.log({"search/pareto_front": table,
                 "search/pareto_scatter": wandb.plot.scatter(table, "avg_macs", "val_acc", title="Pareto front")})
    sweep_file = run_dir / "threshold_sweep.json"
    if sweep_file.exists():
        points = json.loads(sweep_file.read_text())["points"]
        table = wandb.Table(columns=["target", "val_acc", "val_avg_macs", "test_acc", "test_avg_macs"],
                            data=[[p["target"], p["val_acc"], p["val_avg_macs"], p["test_acc"], p["test_avg_macs"]]
                                  for p in points])
        run.log({"thresholds/sweep": table,
                 "thresholds/sweep_plot": wandb.plot.line(table, "test_avg_macs", "test_acc",
                                                          title="threshold sweep (test)")})
    images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(run_dir.glob("*.png"))}
    if images:
        run.log(images)
    artifact = wandb.Artifact(f"{summary['dataset']}-{summary['search_space']}-seed{summary['seed']}", type="model")
    for name in ("arch.yaml", "pareto_front.json", "threshold_sweep.json", "summary.json", "subnet.pt"):
        if (run_dir / name).exists():
            artifact.add_file(str(run_dir / name))
    run.log_artifact(artifact)


def finish_loggers(loggers: list) -> None:
    """Close W&B at the end of every job, or multirun jobs merge into one run."""
    if wandb_run(loggers) is not None:
        import wandb

        wandb.finish()
