"""Config validation before any work: user errors stop with the key, the value and the valid range.

`validate(cfg)` runs on the composed config, before anything is built:

- every group with a ``_target_`` (data, backbone, search_space, hardware, search, trainer, and
  training's optimizer/scheduler) is checked against the target's signature: unknown keys
  (with a close match suggested), keys the pipeline sets itself, and values of the wrong type
  (from the signature's annotations);
- the groups without a target (thresholds, training, evaluation, logger, nested mappings such as
  search_space.branch or backbone.stages) against the dataclass schemas below;
- value ranges and impossible combinations (population < 2, an empty search space, a GPU trainer
  without a GPU, ...).

`validate_built(space, cost_model, hardware)` runs once the supernet exists: a target below the
cheapest candidate fails there. Everything raises `ConfigError`, which `ee_nas.run` prints as
one line (exit status 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf


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


# -- schemas of the config nodes without a _target_ ---------------------------------------------------------
@dataclass
class ThresholdsSchema:
    measure: str = "max_softmax"
    max_candidates: int = 256
    sweep_points: int = 20


@dataclass
class EvaluationSchema:
    calibration_samples: int = 512
    device: str = "auto"


@dataclass
class WandbSchema:
    enabled: bool = False
    project: str = "ee_nas"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class LoggerSchema:
    csv: bool = True
    wandb: dict | None = None


@dataclass
class StageSchema:
    width: int
    depth: int
    stride: int = 1
    se: bool = False
    act: str = "relu"


@dataclass
class BranchSchema:
    ops: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    min_layers: int = 0
    max_layers: int = 2


@dataclass
class AugmentSchema:
    random_crop_padding: int = 0
    horizontal_flip: bool = False


#: keyword arguments the pipeline passes itself: a config that sets them is a mistake
PIPELINE_ARGS = {
    "backbone": ("in_channels", "num_classes", "image_size"),
    "search_space": ("backbone",),
    "search": ("run_dir", "hardware", "measure", "max_candidates", "calibration_samples", "device", "predictor"),
    "trainer": ("callbacks", "logger", "default_root_dir", "plugins"),
    "training": ("supernet", "calibration_samples", "seed"),
    "training.optimizer": ("params",),
    "training.scheduler": ("optimizer", "T_max"),
}
#: targets that take **kwargs: the schema their keys follow
KWARGS_SCHEMAS = {"ee_nas.hardware.profile.make_profile": "ee_nas.hardware.profile.HardwareProfile"}


# -- generic checks ---------------------------------------------------------------------------------------
def _resolve(cfg: DictConfig, key: str):
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True) if OmegaConf.is_config(node) \
            else node
    except Exception as err:  # a missing mandatory value, a broken interpolation
        raise ConfigError(f"config error: {key} cannot be resolved: {err}".splitlines()[0]) from None


def _import(key: str, target) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(str(target))
    except Exception:
        raise ConfigError(f"config error: {key}._target_={target!r} cannot be imported; it must name a class "
                          f"or function (module.Name)") from None


def _params(obj) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Named keyword parameters of a class/function (following **kwargs up the MRO), their types, and
    whether it still takes other keywords (then unknown keys cannot be told apart)."""
    if dataclasses.is_dataclass(obj):
        fns, hint_sources = [obj], [obj]
    elif isinstance(obj, type):
        fns = [k.__init__ for k in obj.__mro__ if "__init__" in vars(k) and k is not object]
        hint_sources = fns
    else:
        fns = hint_sources = [obj]
    params, hints, open_ended = {}, {}, False
    for fn, source in zip(fns, hint_sources):
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, hints, True
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, p)
        try:
            hints = {**typing.get_type_hints(inspect.unwrap(source)), **hints}
        except Exception:  # an annotation that does not resolve here: the default's type is used
            pass
        open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not open_ended:
            break
    return params, hints, open_ended


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:  # YAML 1.1 reads 2.7e6 (no dot) as a string; the profiles convert it
        float(value)
        return isinstance(value, str)
    except (TypeError, ValueError):
        return False


def _conforms(value, hint) -> bool:
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (typing.TypeVar, typing.ForwardRef, str)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, set, Sequence, Iterable, typing.Sequence, typing.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (container is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return all(_conforms(v, item) for v in value)
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    if isinstance(value, dict) and "_target_" in value:  # an object built by instantiate
        return True
    if container in (Path,):
        return isinstance(value, str)
    if isinstance(container, type) and container not in (object,):
        return isinstance(value, container)
    return True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if hint is None or hint is type(None):
        return "null"
    if origin is Literal:
        return f"one of {list(args)}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if hint in names:
        return names[hint]
    container = origin or hint
    if container in (list, tuple, set, Sequence, Iterable, typing.Sequence, typing.Iterable):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if container in (dict, Mapping, typing.Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _check_node(key: str, node: dict, params: dict, hints: dict, owner: str, pipeline: Sequence[str] = ()) -> None:
    """Unknown keys, keys the pipeline sets, and value types of one mapping."""
    if not isinstance(node, dict):
        raise ConfigError(f"config error: {key}={node!r} is invalid; must be a mapping of the keys of {owner}")
    for name, value in node.items():
        if str(name).startswith("_"):  # _target_, _partial_, _recursive_ ...
            continue
        full = f"{key}.{name}"
        if name in pipeline:
            raise ConfigError(f"config error: {full}={value!r} is set by the pipeline, not the config; remove it")
        if name not in params:
            valid = sorted(p for p in params if p not in pipeline)
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" (did you mean {key}.{close[0]}?)" if close else ""
            raise ConfigError(f"config error: {full}={value!r} is not a key of {owner}{hint}; valid keys: "
                              f"{', '.join(valid)}")
        hint = hints.get(name, inspect.Parameter.empty)
        if hint is inspect.Parameter.empty and params[name].default not in (inspect.Parameter.empty, None):
            hint = type(params[name].default)  # unannotated: the default's type
            hint = float if hint is int else hint  # an int default accepts 0.5 too
        if not _conforms(value, hint):
            raise ConfigError(f"config error: {full}={value!r} is invalid; must be {_describe(hint)}")


def _check_target(cfg: DictConfig, key: str) -> dict:
    """Check a node with a _target_ against the target's signature; returns the resolved node."""
    node = _resolve(cfg, key)
    target = node.get("_target_")
    obj = _import(key, target)
    schema = KWARGS_SCHEMAS.get(str(target))
    params, hints, open_ended = _params(_import(key, schema) if schema else obj)
    if open_ended:  # **kwargs we cannot follow: check the types of the named keys only
        _check_node(key, {k: v for k, v in node.items() if k in params}, params, hints, f"{key} ({target})",
                    PIPELINE_ARGS.get(key, ()))
    else:
        _check_node(key, node, params, hints, f"{key} ({target})", PIPELINE_ARGS.get(key, ()))
    return node


def _check_schema(key: str, node, schema: type) -> dict:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    params = {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in fields}
    _check_node(key, node, params, typing.get_type_hints(schema), key)
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in node]
    if missing:
        raise ConfigError(f"config error: {key}.{missing[0]} is missing; {key} needs {', '.join(required)}")
    return node


def _int_range(node: dict, key: str, name: str, lo: int, hi: int | None = None) -> None:
    value = node.get(name)
    if value is None:
        return
    ok = value >= lo and (hi is None or value <= hi)
    _check(ok, f"{key}.{name}", value, f"must be >= {lo}" if hi is None else f"must be in [{lo}, {hi}]")


# -- the groups -------------------------------------------------------------------------------------------
def _check_data(cfg: DictConfig) -> None:
    d = _check_target(cfg, "data")
    for name in ("batch_size", "eval_batch_size", "image_size"):
        _int_range(d, "data", name, 1)
    _int_range(d, "data", "num_workers", 0)
    fractions = {n: float(d[n]) for n in ("val_fraction", "test_fraction") if d.get(n) is not None}
    for n, f in fractions.items():
        _check(0 <= f < 1, f"data.{n}", d[n], "must be in [0, 1)")
    if len(fractions) == 2 and sum(fractions.values()) >= 1:
        _check(False, "data.val_fraction", d["val_fraction"], f"must be < 1 - data.test_fraction "
               f"({1 - fractions['test_fraction']:.3g}): nothing would be left to train on")
    if "bad_data" in d:
        _check(d["bad_data"] in ("error", "skip"), "data.bad_data", d["bad_data"], "valid: error, skip")
    if d.get("augment") is not None:
        aug = _check_schema("data.augment", d["augment"], AugmentSchema)
        _int_range(aug, "data.augment", "random_crop_padding", 0)
    for name in ("mean", "std"):
        values = d.get(name)
        if isinstance(values, list):
            _check(len(values) > 0, f"data.{name}", values, "must hold one value, or one per channel")
    if isinstance(d.get("std"), list):
        _check(all(float(v) > 0 for v in d["std"]), "data.std", d["std"], "every value must be > 0")


def _check_backbone(cfg: DictConfig) -> None:
    from ee_nas.models.ops import ACTIVATIONS

    b = _check_target(cfg, "backbone")
    stages = b.get("stages")
    if stages is not None:
        _check(isinstance(stages, list) and len(stages) > 0, "backbone.stages", stages, "must be a non-empty list")
        for i, stage in enumerate(stages):
            key = f"backbone.stages[{i}]"
            _check_schema(key, stage, StageSchema)
            _int_range(stage, key, "width", 1)
            _int_range(stage, key, "depth", 1)
            _check(stage.get("stride", 1) in (1, 2), f"{key}.stride", stage.get("stride"), "valid: 1, 2")
            _check(stage.get("act", "relu") in ACTIVATIONS, f"{key}.act", stage.get("act"),
                   f"valid: {', '.join(sorted(ACTIVATIONS))}")
        if isinstance(b.get("min_depth"), int):
            low = min(s["depth"] for s in stages)
            _check(1 <= b["min_depth"] <= low, "backbone.min_depth", b["min_depth"],
                   f"must be in [1, {low}] (the shallowest stage's depth)")
    for name in ("expand_choices", "kernel_choices"):
        values = b.get(name)
        if values is not None:
            _check(len(values) > 0 and all(v > 0 for v in values), f"backbone.{name}", values,
                   "must be a non-empty list of positive numbers")
    if b.get("kernel_choices"):
        _check(all(int(k) % 2 == 1 for k in b["kernel_choices"]), "backbone.kernel_choices", b["kernel_choices"],
               "kernels must be odd")


def _check_search_space(cfg: DictConfig) -> None:
    from ee_nas.genome import BRANCH_OPS

    s = _check_target(cfg, "search_space")
    taps = s.get("exit_taps", "all")
    if isinstance(taps, str):
        _check(taps == "all", "search_space.exit_taps", taps, "must be 'all' or a list of block indices")
    else:
        _check(len(taps) > 0 and all(t >= 0 for t in taps) and len(set(taps)) == len(taps),
               "search_space.exit_taps", taps, "must be 'all' or a non-empty list of distinct block indices >= 0")
    lo, hi = s.get("min_exits", 1), s.get("max_exits", 3)
    _int_range(s, "search_space", "min_exits", 0)
    n_taps = len(taps) if isinstance(taps, list) else None
    _check(hi >= lo and (n_taps is None or hi <= n_taps), "search_space.max_exits", hi,
           f"must be in [search_space.min_exits={lo}, {n_taps if n_taps is not None else 'the number of taps'}]"
           + (f" (exit_taps={taps})" if n_taps is not None else ""))
    branch = s.get("branch")
    if branch is not None:
        branch = _check_schema("search_space.branch", branch, BranchSchema)
        ops = branch.get("ops", [])
        _check(len(ops) > 0 and all(op in BRANCH_OPS for op in ops), "search_space.branch.ops", ops,
               f"must be a non-empty list of {', '.join(BRANCH_OPS)} (an empty list leaves nothing to search)")
        widths = branch.get("widths", [])
        _check(len(widths) > 0 and all(w > 0 for w in widths), "search_space.branch.widths", widths,
               "must be a non-empty list of positive widths")
        _int_range(branch, "search_space.branch", "min_layers", 0)
        low = branch.get("min_layers", 0)
        _check(branch.get("max_layers", 2) >= low, "search_space.branch.max_layers", branch.get("max_layers"),
               f"must be >= search_space.branch.min_layers={low}")


def _check_hardware(cfg: DictConfig) -> None:
    h = _check_target(cfg, "hardware")
    if str(h.get("_target_")) in KWARGS_SCHEMAS:  # let the profile check its combinations (targets, objective)
        from ee_nas.hardware.profile import make_profile

        try:
            make_profile(**{k: v for k, v in h.items() if not k.startswith("_")})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config error: {err}") from None


def _check_search(cfg: DictConfig) -> None:
    s = _check_target(cfg, "search")
    _check(s.get("algorithm") in ("nsga2", "random"), "search.algorithm", s.get("algorithm"),
           "valid: nsga2, random")
    _int_range(s, "search", "pop_size", 2)
    _int_range(s, "search", "n_generations", 1)
    _int_range(s, "search", "seed", 0, 2**32 - 1)
    for name in ("mutation_prob", "crossover_prob"):
        if s.get(name) is not None:
            _check(0 <= float(s[name]) <= 1, f"search.{name}", s[name], "must be in [0, 1]")


def _check_trainer(cfg: DictConfig) -> None:
    t = _check_target(cfg, "trainer")
    if t.get("max_epochs") is not None:
        _int_range(t, "trainer", "max_epochs", 0)
    _int_range(t, "trainer", "check_val_every_n_epoch", 1)
    accelerator = str(t.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        _check(torch.cuda.is_available(), "trainer.accelerator", accelerator,
               "no CUDA GPU is visible here; use trainer=cpu (or accelerator=auto)")


def _check_training(cfg: DictConfig) -> None:
    from ee_nas.lit_module import MultiExitModule

    tr = _resolve(cfg, "training")
    params, hints, _ = _params(MultiExitModule)
    _check_node("training", tr, params, hints, "training (ee_nas.lit_module.MultiExitModule)",
                PIPELINE_ARGS["training"])
    _int_range(tr, "training", "n_random", 0)
    for key in ("final_weight", "early_weight", "distill_weight"):
        if tr.get(key) is not None:
            _check(float(tr[key]) >= 0, f"training.{key}", tr[key], "must be >= 0")
    if tr.get("distill_temperature") is not None:
        _check(float(tr["distill_temperature"]) > 0, "training.distill_temperature", tr["distill_temperature"],
               "must be > 0")
    _check(isinstance(tr.get("optimizer"), dict) and "_target_" in tr["optimizer"], "training.optimizer",
           tr.get("optimizer"), "must be a mapping with a _target_ (e.g. torch.optim.SGD) and _partial_: true")
    opt = _check_target(cfg, "training.optimizer")
    if opt.get("lr") is not None:
        _check(_is_number(opt["lr"]) and float(opt["lr"]) > 0, "training.optimizer.lr", opt["lr"], "must be > 0")
    if tr.get("scheduler") is not None:
        _check(isinstance(tr["scheduler"], dict) and "_target_" in tr["scheduler"], "training.scheduler",
               tr["scheduler"], "must be null or a mapping with a _target_")
        sched = _check_target(cfg, "training.scheduler")
        names = _params(_import("training.scheduler", sched["_target_"]))[0]
        _check("T_max" in names, "training.scheduler._target_", sched["_target_"],
               "the module passes T_max (the epochs); use a scheduler that takes it, e.g. "
               "torch.optim.lr_scheduler.CosineAnnealingLR, or null")


def _check_plain_groups(cfg: DictConfig) -> None:
    from ee_nas.thresholds.confidence import MEASURES

    th = _check_schema("thresholds", _resolve(cfg, "thresholds"), ThresholdsSchema)
    _check(th.get("measure") in MEASURES, "thresholds.measure", th.get("measure"), f"valid: {', '.join(MEASURES)}")
    _int_range(th, "thresholds", "sweep_points", 2)
    _int_range(th, "thresholds", "max_candidates", 2)
    ev = _check_schema("evaluation", _resolve(cfg, "evaluation"), EvaluationSchema)
    _int_range(ev, "evaluation", "calibration_samples", 1)
    device = ev.get("device", "auto")
    _check(device in ("auto", "cpu") or device == "cuda" or device.startswith("cuda:"), "evaluation.device", device,
           "valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        _check(torch.cuda.is_available(), "evaluation.device", device, "no CUDA GPU is visible here; use auto or cpu")
    if "logger" in cfg:
        lg = _check_schema("logger", _resolve(cfg, "logger"), LoggerSchema)
        if lg.get("wandb") is not None:
            _check_schema("logger.wandb", lg["wandb"], WandbSchema)


def _check_top(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    _check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32, "seed", seed,
           "must be an integer in [0, 2**32 - 1]")
    _check(isinstance(cfg.get("resume", True), bool), "resume", cfg.get("resume"), "must be true or false")
    if cfg.get("arch"):
        _check(Path(cfg.arch).is_file(), "arch", cfg.arch, "must be the path of an existing arch.yaml")


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raises ConfigError naming the key, the value and the valid range."""
    _check_top(cfg)
    _check_data(cfg)
    _check_backbone(cfg)
    _check_search_space(cfg)
    _check_hardware(cfg)
    _check_search(cfg)
    _check_plain_groups(cfg)
    _check_training(cfg)
    _check_trainer(cfg)
    for key in cfg:  # any other group with a target (added groups included)
        if key not in ("data", "backbone", "search_space", "hardware", "search", "trainer", "training") \
                and isinstance(cfg.get(key), DictConfig) and "_target_" in cfg[key]:
            _check_target(cfg, str(key))


def validate_built(space, cost_model, hardware) -> None:
    """Checks that need the built supernet: the hardware budget must admit at least the cheapest candidate."""
    cheapest = cost_model.costs(space.smallest())
    reference = cost_model.costs(space.largest_backbone()).backbone_macs
    if hardware.objective == "macs":
        target = hardware.target(reference)
        floor = float(cheapest.cum_macs[0])  # every sample pays at least the smallest subnet's first exit
        if target is not None and target < floor:
            key, value = ("target_fraction", hardware.target_fraction) if hardware.target_fraction is not None \
                else ("target_macs", hardware.target_macs)
            valid = (f"must be >= {math.ceil(floor / reference * 1e4) / 1e4}" if key == "target_fraction"
                     else f"must be >= {math.ceil(floor)}")
            raise ConfigError(
                f"config error: hardware.{key}={value!r} is invalid; {valid}: a budget of {target:.4g} avg MACs is "
                f"below the cheapest candidate (the smallest subnet's first exit costs {floor:.4g} MACs; the "
                f"largest backbone {reference:.4g}), so no candidate could meet it")
    if hardware.max_params is not None and cheapest.params > hardware.max_params:
        raise ConfigError(f"config error: hardware.max_params={hardware.max_params!r} is invalid; must be >= "
                          f"{cheapest.params}: the smallest subnet already has {cheapest.params} parameters")
