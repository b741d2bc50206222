"""Every option of every config group composes and instantiates, so a renamed class fails here."""
import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from ee_nas import CONF_DIR

CONF = CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def resolved(cfg, key):
    from hydra.core.hydra_config import HydraConfig

    cfg.hydra.runtime.output_dir = "/tmp/ee_nas_test_out"
    HydraConfig.instance().set_config(copy.deepcopy(cfg))  # ${hydra:runtime.output_dir} (paths.run_dir) resolves
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)


def test_default_composes_to_offline_cpu_digits():
    cfg = compose_with()
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.search_space.name == "aebnas"


@pytest.mark.parametrize("name", options("backbone"))
@pytest.mark.parametrize("space", options("search_space"))
def test_backbone_and_search_space_instantiate(name, space):
    cfg = compose_with(f"backbone={name}", f"search_space={space}")
    backbone = instantiate(resolved(cfg, "backbone"), in_channels=3, num_classes=10, image_size=32)
    sp = instantiate(resolved(cfg, "search_space"), backbone=backbone)
    assert sp.problems(sp.default_genome()) == []


@pytest.mark.parametrize("name", options("hardware"))
def test_hardware_profiles_instantiate(name):
    cfg = compose_with(f"hardware={name}")
    profile = instantiate(resolved(cfg, "hardware"))
    target = profile.target(1e6)
    assert target is None or target > 0


@pytest.mark.parametrize("name", options("search"))
def test_search_configs_instantiate(name):
    cfg = compose_with(f"search={name}")
    callback = instantiate(resolved(cfg, "search"), run_dir="/tmp/x", hardware=None)
    assert callback.algorithm in ("nsga2", "random")


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(name):
    cfg = compose_with(f"trainer={name}")
    node = resolved(cfg, "trainer")
    if node.get("accelerator") == "cpu":
        instantiate(node, logger=False, enable_checkpointing=False)
    else:  # no GPU here: resolving the class checks the config without claiming a device
        assert get_class(node["_target_"]).__name__ == "Trainer"


@pytest.mark.parametrize("name", options("data"))
def test_data_configs_resolve(name, tmp_path):
    cfg = compose_with(f"data={name}")
    node = resolved(cfg, "data")
    cls = get_class(node.pop("_target_"))
    if name == "digits":
        assert cls(**node).num_classes == 10
    else:  # real datasets and user folders: a missing root fails early and names the path
        from ee_nas.data import DataError

        node["root"] = str(tmp_path / "missing")
        if "download" in node:
            node["download"] = False
        with pytest.raises(DataError, match="missing"):
            cls(**node)


@pytest.mark.parametrize("group", ["logger", "callbacks", "thresholds", "training"])
def test_plain_groups_compose(group):
    for name in options(group):
        cfg = compose_with(f"{group}={name}")
        assert resolved(cfg, group) is not None


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose(name):
    cfg = compose_with(f"+experiment={name}")
    assert cfg.name == name
    assert resolved(cfg, "data")["_target_"]


def test_debug_smoke_wins_over_any_experiment():
    from ee_nas.config import apply_debug

    cfg = apply_debug(compose_with("+experiment=svhn_search", "debug=smoke"))
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.accelerator == "cpu"
    assert cfg.search.pop_size == 4 and "debug" not in cfg
    assert cfg.finetune.limit_train_batches == cfg.trainer.limit_train_batches == 3  # fine-tuning is short too


@pytest.mark.parametrize("name", options("logger") + options("callbacks"))
def test_logger_and_callback_options_instantiate(name, tmp_path):
    """Loggers and callbacks are config (conf/logger/, conf/callbacks/): each option builds its Lightning objects."""
    group = "logger" if name in options("logger") else "callbacks"
    if name == "tensorboard":
        pytest.importorskip("tensorboard")
    cfg = compose_with(f"{group}={name}", "logger.wandb.mode=disabled" if name in ("default", "wandb") else "seed=0")
    nodes = resolved(cfg, group)
    built = [instantiate({**n, **({"save_dir": str(tmp_path)} if "save_dir" in n else {})}) for n in nodes.values()]
    assert all(type(b).__name__ in str(n["_target_"]) for b, n in zip(built, nodes.values()))


def test_trainer_schema_follows_lightning():
    """conf's TrainerConf lists lightning.Trainer's keywords with Lightning's own defaults."""
    import dataclasses
    import inspect

    from lightning import Trainer

    from ee_nas.schemas import TRAINER_PIPELINE_ARGS, TrainerConf

    params = inspect.signature(Trainer.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TrainerConf) if f.name != "_target_"}
    assert {name: params[name].default for name in fields} == fields
    left_out = set(params) - set(fields) - {"self", *TRAINER_PIPELINE_ARGS}
    assert left_out <= {"enable_autolog_hparams", "model_registry"}  # newer than the lightning floor
