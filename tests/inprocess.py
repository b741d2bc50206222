"""Run the pipeline in this process the way `python -m ee_nas.run` does (shared by tests)."""
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from ee_nas import CONF_DIR

CONF = CONF_DIR


def compose_run(run_dir, *overrides: str):
    """The task config @hydra.main would hand to the run for these overrides, with `run_dir` as output dir."""
    from ee_nas.config import apply_debug

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return apply_debug(cfg)


def run_in_process(run_dir, *overrides: str, save_config: bool = False) -> dict:
    """Validate and run; `save_config` also writes .hydra/config.yaml as Hydra does (tools reload runs from it)."""
    from ee_nas.config import validate
    from ee_nas.run import run

    cfg = compose_run(run_dir, *overrides)
    validate(cfg)
    if save_config:
        (Path(run_dir) / ".hydra").mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run(cfg)
