"""Config validation before any work: user errors stop with the key, the value and the valid range."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    pass


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}={value!r} is invalid; {valid}")


def apply_debug(cfg: DictConfig) -> DictConfig:
    """Merge a debug preset (conf/debug/) over everything else, whatever experiment was chosen."""
    debug = cfg.get("debug")
    if not debug:
        return cfg
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        merged = OmegaConf.merge(cfg, debug.get("overrides", {}))
        del merged["debug"]
    return merged


def validate(cfg: DictConfig) -> None:
    s = cfg.search
    _check(s.algorithm in ("nsga2", "random"), "search.algorithm", s.algorithm, "valid: nsga2, random")
    _check(int(s.pop_size) >= 2, "search.pop_size", s.pop_size, "must be >= 2")
    _check(int(s.n_generations) >= 1, "search.n_generations", s.n_generations, "must be >= 1")
    _check(0 <= float(s.mutation_prob) <= 1, "search.mutation_prob", s.mutation_prob, "must be in [0, 1]")
    _check(0 <= float(s.crossover_prob) <= 1, "search.crossover_prob", s.crossover_prob, "must be in [0, 1]")
    from ee_nas.thresholds.confidence import MEASURES

    _check(cfg.thresholds.measure in MEASURES, "thresholds.measure", cfg.thresholds.measure, f"valid: {list(MEASURES)}")
    _check(int(cfg.thresholds.sweep_points) >= 2, "thresholds.sweep_points", cfg.thresholds.sweep_points, "must be >= 2")
    _check(int(cfg.trainer.max_epochs) >= 0, "trainer.max_epochs", cfg.trainer.max_epochs, "must be >= 0")
    _check(int(cfg.evaluation.calibration_samples) >= 1, "evaluation.calibration_samples",
           cfg.evaluation.calibration_samples, "must be >= 1")
    if cfg.get("arch"):
        _check(Path(cfg.arch).is_file(), "arch", cfg.arch, "must be the path of an existing arch.yaml")
    tr = cfg.training
    _check(int(tr.n_random) >= 0, "training.n_random", tr.n_random, "must be >= 0")
    for key in ("final_weight", "early_weight", "distill_weight"):
        _check(float(tr[key]) >= 0, f"training.{key}", tr[key], "must be >= 0")
