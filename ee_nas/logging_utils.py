"""Loggers built from conf/logger/ (CSV, W&B offline unless configured, ...); final artifacts and clean shutdown."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Every `logger` entry with a _target_ (conf/logger/: csv, wandb, tensorboard, or a file of your own)."""
    from hydra.utils import instantiate

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if "_target_" in node:
            extra = wandb_settings(cfg, run_dir, node) if str(node._target_).endswith("WandbLogger") else {}
            loggers.append(instantiate(node, _partial_=True)(**extra))  # partial: `config` is instantiate's own
    run = wandb_run(loggers)
    if run is not None and hasattr(run, "define_metric"):  # rank 0 only (Lightning's rank-zero experiment)
        # search metrics against the generation, not the training step: the hypervolume curve per generation
        run.define_metric("search/generation", hidden=True)
        run.define_metric("search/*", step_metric="search/generation")
        if isinstance(getattr(run, "url", None), str):  # online only (offline runs: wandb sync, README)
            log.info("W&B run: %s", run.url)
    return loggers


def wandb_settings(cfg: DictConfig, run_dir: Path, node: DictConfig) -> dict:
    """The W&B keys the config leaves null, per run: a multirun's jobs grouped by their sweep directory and
    typed by method, each named from its overrides; an id fixed by the run directory, so a resumed run
    continues its W&B run (resume="allow"); the whole config; offline unless W&B is configured (env)."""
    import hashlib

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    sweep = hc is not None and hc.mode == RunMode.MULTIRUN
    method = "fixed_arch" if cfg.get("arch") else cfg.search.algorithm
    values = {"group": "/".join(Path(hc.sweep.dir).parts[-2:]) if sweep else cfg.name,
              "job_type": f"{cfg.search_space.name}-{method}",
              "name": (hc.job.override_dirname if hc is not None else "") or f"{cfg.name}-seed{cfg.seed}",
              "id": hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16],
              "save_dir": str(run_dir)}
    return {**{k: v for k, v in values.items() if node.get(k) is None}, "resume": "allow",
            "config": OmegaConf.to_container(cfg, resolve=True)}


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
    archive_file = run_dir / "archive.json"
    if archive_file.exists():  # every evaluated candidate, failed and over-cap ones included
        columns = ["generation", "key", "status", "feasible", "chosen", "val_acc", "avg_macs", "avg_latency_ms",
                   "params", "n_exits", "genome"]
        chosen = json.dumps(summary.get("genome"), sort_keys=True)
        rows = [[r.get("generation"), r["key"], r.get("status"), bool(r.get("feasible")),
                 json.dumps(r["genome"], sort_keys=True) == chosen, r.get("val_acc"), r.get("avg_macs"),
                 r.get("avg_latency_ms"), r.get("params"), len(r["genome"]["exits"]) + 1, json.dumps(r["genome"])]
                for r in json.loads(archive_file.read_text())["records"]]
        run.log({"search/candidates": wandb.Table(columns=columns, data=rows)})
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


def finish_loggers(loggers: list, exit_code: int = 0) -> None:
    """Close W&B at the end of every job, or multirun jobs merge into one run; a failed run is marked failed."""
    if wandb_run(loggers) is not None:
        import wandb

        wandb.finish(exit_code=exit_code)
