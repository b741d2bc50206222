"""Config checks before any work: a user error stops with one line naming the key, the value and the valid range.

Types and keys are Hydra's: with the schemas of `ee_nas.schemas`, composition refuses ``search.pop_size=many``
(`composition_error` makes that one line). `validate(cfg)` checks the rest before anything is built: keys added
with ``+``, keys of targets without a schema (against the target's signature), and the project's own rules
(ranges, impossible combinations); `validate_built` once the supernet exists. `ee_nas.run` prints any
`ConfigError` as one line (exit status 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict


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
    with open_dict(cfg):
        merged = OmegaConf.merge(cfg, debug.get("overrides", {}))
        del merged["debug"]
    return merged


#: keyword arguments the pipeline passes itself: a config that sets one is told so
PIPELINE_ARGS = {key: names.split() for key, names in {
    "backbone": "in_channels num_classes image_size", "search_space": "backbone", "training.optimizer": "params",
    "search": "run_dir hardware measure max_candidates score_folds calibration_samples device predictor",
    "trainer": "callbacks logger default_root_dir plugins", "training.scheduler": "optimizer T_max"}.items()}
_TYPES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string",
          "ListConfig": "a list", "DictConfig": "a mapping"}


def _unknown(key: str, value: str, valid, owner: str = "") -> ConfigError:
    parent, _, name = key.rpartition(".")
    if name in PIPELINE_ARGS.get(parent, ()):
        return ConfigError(f"config error: {key}={value} is set by the pipeline, not the config; remove it")
    valid = sorted(v for v in valid if not v.startswith("_") and v not in PIPELINE_ARGS.get(parent, ()))
    hint = "".join(f" (did you mean {parent}.{c}?)" for c in difflib.get_close_matches(name, valid, n=1))
    return ConfigError(f"config error: {key}={value} is not a key of {parent or 'the config'}{owner}{hint}; "
                       f"valid keys: {', '.join(valid)}")


def composition_error(err: Exception) -> ConfigError:
    """Hydra's report of a failed composition (wrong type, unknown key, missing option) as one ConfigError line."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause, text = err.__cause__, str(err)
    override = re.search(r"(?:Error merging override |use \+)(\S+?)=(.*)", text)
    key = getattr(cause, "full_key", None)
    if override and key:
        key, value = override.group(1).lstrip("+~"), override.group(2).strip()
        schema = getattr(cause, "object_type", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(schema):
            return _unknown(key, value, [f.name for f in dataclasses.fields(schema)], f" ({schema.__name__})")
        reason = str(getattr(cause, "msg", cause)).splitlines()[0]
        kind = next((v for k, v in _TYPES.items() if f"converted to {k}" in reason or f"not a {k}" in reason
                     or k == "Boolean" and "not a valid bool" in reason), None)
        return ConfigError(f"config error: {key}={value} is invalid; " + (f"must be {kind}" if kind else reason))
    lines = [line.strip() for line in [text, *([str(cause)] if cause else [])] for line in line.splitlines()]
    return ConfigError("config error: " + " ".join(line for line in lines if line and "full_key" not in line))


def _check_call(key: str, node: dict) -> None:
    """A target without a schema: it must import, and take the node's keys (unless it takes **kwargs)."""
    try:
        params = inspect.signature(get_object(str(node["_target_"]))).parameters
    except Exception:
        raise ConfigError(f"config error: {key}._target_={node['_target_']!r} cannot be imported; it must name a "
                          f"class or function (module.Name)") from None
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for name, value in node.items():
            if not name.startswith("_") and name not in params:
                raise _unknown(f"{key}.{name}", repr(value), list(params), f" ({node['_target_']})")


def _check_keys(node, plain, key: str = "") -> None:
    """Keys outside their schema (added with +), missing values (???), and the keys of targets without a schema."""
    if isinstance(plain, dict):
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            valid = [f.name for f in dataclasses.fields(schema)]
            for name in (n for n in plain if n not in valid):
                raise _unknown(f"{key}.{name}".lstrip("."), repr(plain[name]), valid)
        elif "_target_" in plain:
            _check_call(key, plain)
    for name, value in plain.items() if isinstance(plain, dict) else enumerate(plain):
        full = f"{key}[{name}]" if isinstance(name, int) else f"{key}.{name}".lstrip(".")
        if value == "???":
            raise ConfigError(f"config error: {full} is missing; set it ({full}=...)")
        if isinstance(value, (dict, list)) and name != "hydra":
            _check_keys(node[name], value, full)


def _resolve(cfg: DictConfig, key: str):
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as err:  # a broken interpolation
        raise ConfigError(f"config error: {key} cannot be resolved: {err}".splitlines()[0]) from None


def _at_least(node: dict, key: str, lo, *names: str) -> None:
    for name in names:
        if node.get(name) is not None:
            _check(node[name] >= lo, f"{key}.{name}", node[name], f"must be >= {lo}")


def _one_of(value, key: str, valid) -> None:
    _check(value in valid, key, value, f"valid: {', '.join(map(str, valid))}")


# -- the project's own rules: ranges and combinations ------------------------------------------------------
#: (group, lowest value, keys): integer and weight ranges
AT_LEAST = [("data", 1, "batch_size", "eval_batch_size", "image_size"), ("data", 0, "num_workers"),
            ("search", 2, "pop_size"),
            ("search", 1, "n_generations", "n_per_iteration"), ("search", 0, "n_largest"),
            ("search_space", 0, "min_exits"),
            ("search_space.branch", 0, "min_layers"), ("thresholds", 2, "sweep_points", "max_candidates"),
            ("thresholds", 1, "score_folds"),
            ("evaluation", 1, "calibration_samples"), ("trainer", 0, "max_epochs"),
            ("trainer", 1, "check_val_every_n_epoch"),
            ("training", 0, "n_random", "final_weight", "early_weight", "distill_weight", "branch_lr_scale")]


def _check_augment(augment, key: str) -> None:
    from ee_nas.data.base import DataError, check_augment

    try:
        check_augment(augment, key)
    except DataError as err:
        raise ConfigError(f"config error: {err}") from None


def _check_data(d: dict) -> None:
    _check_augment(d.get("augment"), "data.augment")
    fractions = {n: d[n] for n in ("val_fraction", "test_fraction") if d.get(n) is not None}
    for n, f in fractions.items():
        _check(0 <= f < 1, f"data.{n}", f, "must be in [0, 1)")
    _check(len(fractions) < 2 or sum(fractions.values()) < 1, "data.val_fraction", d.get("val_fraction"),
           f"must be < 1 - data.test_fraction ({1 - d.get('test_fraction', 0):.3g}): nothing would be left to train on")
    _one_of(d.get("bad_data", "error"), "data.bad_data", ("error", "skip"))
    for name in ("mean", "std"):
        _check(d.get(name) is None or len(d[name]) > 0 and all(name == "mean" or v > 0 for v in d[name]),
               f"data.{name}", d.get(name), f"must hold one value, or one per channel{', each > 0' * (name == 'std')}")


def _check_backbone(b: dict) -> None:
    from ee_nas.models.ops import ACTIVATIONS

    for i, stage in enumerate(b.get("stages") or []):
        _at_least(stage, f"backbone.stages[{i}]", 1, "width", "depth")
        _one_of(stage.get("stride", 1), f"backbone.stages[{i}].stride", (1, 2))
        _one_of(stage.get("act", "relu"), f"backbone.stages[{i}].act", sorted(ACTIVATIONS))
    if "stages" in b:
        _check(len(b["stages"]) > 0, "backbone.stages", b["stages"], "must be a non-empty list")
        low = min(s["depth"] for s in b["stages"])
        _check(1 <= b["min_depth"] <= low, "backbone.min_depth", b["min_depth"],
               f"must be in [1, {low}] (the shallowest stage's depth)")
    for name in (n for n in ("expand_choices", "kernel_choices") if n in b):
        _check(len(b[name]) > 0 and all(v > 0 and (name == "expand_choices" or v % 2 == 1) for v in b[name]),
               f"backbone.{name}", b[name], f"must be a non-empty list of positive{' odd' * (name[0] == 'k')} numbers")


def _check_search_space(s: dict) -> None:
    from ee_nas.genome import BRANCH_OPS

    taps, lo, hi, branch = s["exit_taps"], s["min_exits"], s["max_exits"], s["branch"]
    _check(taps == "all" or isinstance(taps, list) and len(taps) > 0 and len(set(taps)) == len(taps) and
           all(isinstance(t, int) and t >= 0 for t in taps), "search_space.exit_taps", taps,
           "must be 'all' or a non-empty list of distinct block indices >= 0")
    n_taps = len(taps) if isinstance(taps, list) else None
    _check(hi >= lo and (n_taps is None or hi <= n_taps), "search_space.max_exits", hi,
           f"must be in [search_space.min_exits={lo}, {n_taps if n_taps is not None else 'the number of taps'}]"
           + (f" (exit_taps={taps})" if n_taps is not None else ""))
    _check(len(branch["ops"]) > 0 and all(op in BRANCH_OPS for op in branch["ops"]), "search_space.branch.ops",
           branch["ops"], f"must be a non-empty list of {', '.join(BRANCH_OPS)} (an empty list leaves nothing to "
           "search)")
    _check(len(branch["widths"]) > 0 and all(w > 0 for w in branch["widths"]), "search_space.branch.widths",
           branch["widths"], "must be a non-empty list of positive widths")
    _at_least(branch, "search_space.branch", branch["min_layers"], "max_layers")


def _check_training(tr: dict) -> None:
    _check(tr["distill_temperature"] > 0, "training.distill_temperature", tr["distill_temperature"], "must be > 0")
    _check("_target_" in tr["optimizer"], "training.optimizer", tr["optimizer"],
           "must be a mapping with a _target_ (e.g. torch.optim.SGD) and _partial_: true")
    lr = tr["optimizer"].get("lr")
    _check(lr is None or isinstance(lr, (int, float)) and lr > 0, "training.optimizer.lr", lr, "must be > 0")
    sched = tr.get("scheduler")
    if sched is not None:
        _check("_target_" in sched, "training.scheduler", sched, "must be null or a mapping with a _target_")
        _check("T_max" in inspect.signature(get_object(sched["_target_"])).parameters, "training.scheduler._target_",
               sched["_target_"], "the module passes T_max (the epochs); use a scheduler that takes it, e.g. "
               "torch.optim.lr_scheduler.CosineAnnealingLR, or null")


def _check_top(cfg: DictConfig, t: dict, device: str) -> None:
    _check(type(cfg.seed) is int and 0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be an integer in [0, 2**32 - 1]")
    frac = cfg.finetune.get("lr_fraction")
    _check(isinstance(frac, (int, float)) and frac > 0, "finetune.lr_fraction", frac,
           "must be > 0 (the fine-tuning lr as a fraction of training.optimizer.lr)")
    early = cfg.finetune.get("early_weight")
    _check(early is None or isinstance(early, (int, float)) and early >= 0, "finetune.early_weight", early,
           "must be null (training.early_weight) or >= 0")
    refit = cfg.finetune.get("refit", False)
    _check(isinstance(refit, bool), "finetune.refit", refit, "must be true or false")
    from ee_nas.finetune import TEACHERS

    _one_of(cfg.finetune.get("teacher", "self"), "finetune.teacher", TEACHERS)
    from ee_nas.data.base import set_keys

    _check_augment(set_keys(cfg.finetune.get("augment")), "finetune.augment")  # null keys: data.augment's
    _check(not cfg.arch or Path(cfg.arch).is_file(), "arch", cfg.arch, "must be the path of an existing arch.yaml")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None, "evaluation.device", device,
           "valid: auto, cpu, cuda, cuda:N")
    import torch

    for key, value in (("trainer.accelerator", str(t["accelerator"])), ("evaluation.device", device)):
        _check(value not in ("gpu", "cuda") and not value.startswith("cuda:") or torch.cuda.is_available(), key, value,
               "no CUDA GPU is visible here; use trainer=cpu (or accelerator=auto)" if key[0] == "t" else
               "no CUDA GPU is visible here; use auto or cpu")


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raises ConfigError naming the key, the value and the valid range."""
    from ee_nas.thresholds.confidence import MEASURES
    from ee_nas.search.evolution import CHOOSE_RULES
    from ee_nas.thresholds.tuner import TIES

    _check_keys(cfg, OmegaConf.to_container(cfg, resolve=False))
    _check_top(cfg, _resolve(cfg, "trainer"), cfg.evaluation.device)
    for key, lo, *names in AT_LEAST:
        _at_least(_resolve(cfg, key) or {}, key, lo, *names)
    search = _resolve(cfg, "search")
    _one_of(search["algorithm"], "search.algorithm", ("nsga2", "random"))
    _one_of(search.get("choose", "best_val"), "search.choose", CHOOSE_RULES)
    _check(search.get("choose_tolerance", 1.0) >= 0, "search.choose_tolerance", search.get("choose_tolerance"),
           "must be >= 0 (standard errors)")
    for name, hi in (("seed", 2**32 - 1), ("mutation_prob", 1), ("crossover_prob", 1)):
        _check(0 <= search[name] <= hi, f"search.{name}", search[name], f"must be in [0, {hi}]")
    _one_of(cfg.thresholds.measure, "thresholds.measure", MEASURES)
    _one_of(cfg.thresholds.get("ties", "cheap"), "thresholds.ties", TIES)
    margin = cfg.thresholds.get("cost_margin", 0.0)
    _check(0 <= margin < 1, "thresholds.cost_margin", margin, "must be in [0, 1)")
    for group, check in [("data", _check_data), ("backbone", _check_backbone), ("search_space", _check_search_space),
                         ("training", _check_training)]:
        check(_resolve(cfg, group))
    from ee_nas.hardware.profile import make_profile

    try:  # the profile checks its own combinations (targets, objective)
        make_profile(**{k: v for k, v in _resolve(cfg, "hardware").items() if not k.startswith("_")})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config error: {err}") from None


def validate_built(space, cost_model, hardware) -> None:
    """Checks that need the built supernet: the hardware budget must admit at least the cheapest candidate."""
    cheapest = cost_model.costs(space.smallest())
    reference = cost_model.costs(space.largest_backbone()).backbone_macs
    if hardware.objective == "macs":
        target = hardware.target(reference)
        floor = float(cheapest.cum_macs[0])  # every sample pays at least the smallest subnet's first exit
        if target is not None and target < floor:
            key = "target_fraction" if hardware.target_fraction is not None else "target_macs"
            low = math.ceil(floor / reference * 1e4) / 1e4 if key == "target_fraction" else math.ceil(floor)
            raise ConfigError(f"config error: hardware.{key}={getattr(hardware, key)!r} is invalid; must be >= {low}: "
                              f"a budget of {target:.4g} avg MACs is below the cheapest candidate (the smallest "
                              f"subnet's first exit costs {floor:.4g} MACs; the largest backbone {reference:.4g}), "
                              "so no candidate could meet it")
    if hardware.max_params is not None and cheapest.params > hardware.max_params:
        raise ConfigError(f"config error: hardware.max_params={hardware.max_params!r} is invalid; must be >= "
                          f"{cheapest.params}: the smallest subnet already has {cheapest.params} parameters")
