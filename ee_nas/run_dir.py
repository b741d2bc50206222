"""The run directory: one config per directory; a rerun of the same config resumes, a different one is refused."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ee_nas.config import ConfigError
from ee_nas.utils import atomic_write_json

RUN_CONFIG = "run_config.json"
#: keys that change how a run is executed or logged, not its results: a rerun may change them
#: (data.root: where the data lies, e.g. a node-local copy on a cluster)
RESUME_IRRELEVANT = ("paths", "logger", "callbacks", "name", "resume", "evaluation.device", "data.root",
                     "data.num_workers", "data.pin_memory", "data.download", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "trainer.log_every_n_steps")
RESULTS = ("summary.json", "archive.json", "checkpoints/last.ckpt")
#: keys added after runs were made, at the value that does what those runs did: left out of the recorded config
#: at that value, so that earlier runs still resume and lend their supernets (`supernet_from`)
NEUTRAL_DEFAULTS = {"data.augment.rotation_degrees": 0, "data.augment.scale": 0, "finetune.augment": None,
                    "training.exit_grad_scale": 1.0, "training.exit_grad_from": "all",
                    "search_space.train_exits": None}


class RunDirError(ConfigError):
    """The run directory holds results this run must not overwrite."""


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
    for key, neutral in NEUTRAL_DEFAULTS.items():
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            del node[leaf]
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


#: what decides a trained supernet's weights: a run may start from another run's supernet when these agree
SUPERNET_KEYS = ("seed", "data", "backbone", "search_space", "training", "trainer")
#: ... except these, which only change how the trained supernet is searched
SEARCH_ONLY_KEYS = ("search_space.min_exit_saving",)


def adopt_supernet(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`supernet_from=RUN_DIR|CKPT`: start this run from another run's trained supernet (its
    checkpoints/last.ckpt), so searching one supernet at several targets trains it once.

    Refused, with the first differing key named, when the source run's config would have trained a
    different supernet. A run directory that has a checkpoint of its own resumes from it instead.
    """
    import shutil

    source = cfg.get("supernet_from")
    last = run_dir / "checkpoints" / "last.ckpt"
    if not source or last.exists():
        return None
    source = Path(source)
    ckpt = source / "checkpoints" / "last.ckpt" if source.is_dir() else source
    if not ckpt.is_file():
        raise ConfigError(f"config error: supernet_from={source}: no supernet checkpoint there "
                          "(give a finished run directory or its checkpoints/last.ckpt)")
    record = ckpt.parent.parent / RUN_CONFIG
    if record.is_file():
        theirs = _flatten({k: v for k, v in json.loads(record.read_text())["config"].items() if k in SUPERNET_KEYS})
        ours = _flatten(json.loads(json.dumps({k: v for k, v in run_config(cfg).items() if k in SUPERNET_KEYS},
                                              default=str)))
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key) and key not in SEARCH_ONLY_KEYS:
                raise ConfigError(f"config error: supernet_from={source} trained another supernet: {key} is "
                                  f"{theirs.get(key)!r} there and {ours.get(key)!r} here")
    last.parent.mkdir(parents=True, exist_ok=True)
    tmp = last.with_suffix(".ckpt.tmp")
    shutil.copy2(ckpt, tmp)
    tmp.replace(last)
    return ckpt
