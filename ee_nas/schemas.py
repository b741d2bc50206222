"""Structured-config schemas: Hydra checks every group's types and keys at composition.

`RUN_SCHEMA` types every group with one schema; data and backbone options, which hold different targets,
get theirs by option name (`OPTION_SCHEMAS`). So a wrong type (``search.pop_size=many``) or an unknown key
(``data.batch_sise=8``) fails while the config is composed, with the key named, before any code runs.
Only the project's own rules (ranges, impossible combinations) are checked by hand, in `ee_nas.config`.
Keys the pipeline passes itself (``in_channels``, ``run_dir``, ``callbacks``, ...) are deliberately absent:
a config that sets them is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# -- data -------------------------------------------------------------------------------------------------
@dataclass
class AugmentConf:
    random_crop_padding: int = 0
    horizontal_flip: bool = False
    rotation_degrees: float = 0.0  # each training image rotated by up to +- this
    scale: float = 0.0             # ... and scaled by 1 +- up to this, both about its centre, before the crop


@dataclass
class DataConf:  # ee_nas.data.base.ImageDataModule
    _target_: str = MISSING
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = 0
    pin_memory: bool = False
    split_seed: int = 0
    val_fraction: float = 0.1
    image_size: int = 32
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    augment: Optional[AugmentConf] = None
    bad_data: str = "error"  # error | skip


@dataclass
class DigitsConf(DataConf):
    test_fraction: float = 0.2


@dataclass
class TorchvisionConf(DataConf):
    root: str = "data"
    download: bool = False


@dataclass
class ImageFolderConf(DataConf):
    root: str = MISSING
    in_channels: int = 3
    test_fraction: float = 0.1
    name: str = "imagefolder"


# -- backbone ---------------------------------------------------------------------------------------------
@dataclass
class StageConf:
    width: int = MISSING
    depth: int = MISSING
    stride: int = 1
    se: bool = False
    act: str = "relu"


@dataclass
class ResStageConf:
    width: int = MISSING
    depth: int = MISSING
    stride: int = 1


@dataclass
class MobileNetV3Conf:
    _target_: str = "ee_nas.models.mobilenetv3.ElasticMobileNetV3"
    stages: List[StageConf] = MISSING
    stem_width: int = 16
    stem_stride: int = 1
    min_depth: int = 1
    expand_choices: List[float] = field(default_factory=lambda: [3, 4, 6])
    kernel_choices: List[int] = field(default_factory=lambda: [3, 5, 7])
    head_conv_width: int = 256
    head_hidden: int = 256
    dropout: float = 0.1
    first_block: bool = False


@dataclass
class ResNetConf:
    _target_: str = "ee_nas.models.resnet.ElasticResNet"
    stages: List[ResStageConf] = MISSING
    stem_width: int = 16
    min_depth: int = 1
    expand_choices: List[float] = field(default_factory=lambda: [0.5, 1.0])
    kernel_choices: List[int] = field(default_factory=lambda: [3])


@dataclass
class OFAMobileNetV3Conf:
    _target_: str = "ee_nas.models.ofa_mbv3.OFAMobileNetV3"
    width_mult: float = 1.0
    max_depth: int = 4
    min_depth: int = 2
    expand_choices: List[float] = field(default_factory=lambda: [3, 4, 6])
    kernel_choices: List[int] = field(default_factory=lambda: [3, 5, 7])
    dropout: float = 0.1
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    pretrained: Optional[str] = None


# -- search space, hardware, search, predictor -------------------------------------------------------------
@dataclass
class BranchConf:
    ops: List[str] = field(default_factory=list)
    widths: List[int] = field(default_factory=list)
    min_layers: int = 0
    max_layers: int = 2


@dataclass
class SearchSpaceConf:
    _target_: str = "ee_nas.search.space.SearchSpace"
    name: str = "aebnas"
    exit_taps: Any = "all"  # 'all' or a list of block indices (OmegaConf has no str | list type)
    min_exits: int = 1
    max_exits: int = 3
    search_backbone: bool = True
    min_exit_saving: float = 0.0  # exits must save this share of the network's own backbone cost
    train_exits: Optional[bool] = None  # branches while the supernet trains; null: where exits may be deployed
    branch: BranchConf = field(default_factory=BranchConf)


@dataclass
class HardwareConf:  # ee_nas.hardware.profile.HardwareProfile
    _target_: str = "ee_nas.hardware.profile.make_profile"
    name: str = "unconstrained"
    objective: str = "macs"  # macs | latency
    target_macs: Optional[float] = None
    target_fraction: Optional[float] = None
    target_latency_ms: Optional[float] = None
    max_params: Optional[int] = None
    max_memory_bytes: Optional[int] = None
    energy_per_mac_pj: Optional[float] = None
    latency_lut: Optional[str] = None  # null | measure | path/to/lut.json
    lut_threads: int = 1


@dataclass
class SearchConf:  # ee_nas.search.callback.EvolutionaryNASCallback, less what the pipeline passes
    _target_: str = "ee_nas.search.callback.EvolutionaryNASCallback"
    algorithm: str = "nsga2"  # nsga2 | random
    pop_size: int = 16
    n_generations: int = 8
    seed: int = 0
    crossover_prob: float = 0.9
    mutation_prob: float = 0.1
    n_per_iteration: int = 8
    n_largest: int = 0
    choose: str = "best_val"  # best_val | within_noise
    choose_tolerance: float = 1.0


# -- groups without a target ------------------------------------------------------------------------------
@dataclass
class ThresholdsConf:
    measure: str = "max_softmax"  # max_softmax | entropy | margin
    max_candidates: int = 256
    sweep_points: int = 20
    score_folds: int = 2
    ties: str = "spend"  # cheap | spend
    cost_margin: float = 0.05


@dataclass
class TrainingConf:  # ee_nas.lit_module.MultiExitModule, less what the pipeline passes
    optimizer: Dict[str, Any] = MISSING  # any torch optimizer: _target_ and _partial_: true
    scheduler: Optional[Dict[str, Any]] = None
    n_random: int = 1
    final_weight: float = 1.0
    early_weight: float = 1.0
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    channels_last: bool = True
    branch_lr_scale: float = 1.0
    exit_grad_scale: float = 1.0
    exit_grad_from: str = "all"


@dataclass
class EvaluationConf:
    calibration_samples: int = 512
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class WandbLoggerConf:  # lightning's WandbLogger and the wandb.init keywords a run sets
    _target_: str = "lightning.pytorch.loggers.WandbLogger"
    project: str = "ee_nas"
    entity: Optional[str] = None
    group: Optional[str] = None  # null: the sweep directory in a multirun, else `name`
    job_type: Optional[str] = None  # null: <search_space>-<search.algorithm>
    name: Optional[str] = None  # null: the run's overrides (hydra.job.override_dirname)
    id: Optional[str] = None  # null: stable per run directory, so a resumed run continues its W&B run
    tags: List[str] = field(default_factory=list)
    notes: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; null: offline unless W&B is configured
    log_model: bool = False
    save_dir: Optional[str] = None  # null: the run directory


# -- the trainer ------------------------------------------------------------------------------------------
TRAINER_PIPELINE_ARGS = ("callbacks", "logger", "default_root_dir", "plugins")  # set by ee_nas.run, not config


@dataclass
class TrainerConf:
    """lightning.Trainer's keywords (as of lightning 2.3, the floor) with its defaults; unions are Any.
    Left out: what the pipeline passes (callbacks, logger, plugins, default_root_dir)."""
    _target_: str = "lightning.Trainer"
    accelerator: Any = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    fast_dev_run: Any = False
    max_epochs: Optional[int] = None
    min_epochs: Optional[int] = None
    max_steps: int = -1
    min_steps: Optional[int] = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: Optional[int] = None
    log_every_n_steps: Optional[int] = None
    enable_checkpointing: Optional[bool] = None
    enable_progress_bar: Optional[bool] = None
    enable_model_summary: Optional[bool] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Any = None
    gradient_clip_algorithm: Optional[str] = None
    deterministic: Any = None
    benchmark: Optional[bool] = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: Any = None
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0


#: the top level: each group with one schema typed by it. The top level itself stays open (a plain mapping),
#: so a top-level key added to config.yaml needs no schema; seed and arch are range-checked in ee_nas.config.
RUN_SCHEMA = {"evaluation": EvaluationConf, "search_space": SearchSpaceConf, "hardware": HardwareConf,
              "search": SearchConf, "thresholds": ThresholdsConf, "training": TrainingConf, "trainer": TrainerConf}


#: data and backbone options hold different targets: each option's schema, chosen by the option's name
#: (config.yaml: `optional schema/data@data: ${data}`); an option of your own without one is not type-checked
OPTION_SCHEMAS = {
    "data": {"digits": DigitsConf, "cifar10": TorchvisionConf, "cifar100": TorchvisionConf, "svhn": TorchvisionConf,
             "imagefolder": ImageFolderConf},
    "backbone": {"mobilenetv3": MobileNetV3Conf, "mobilenetv3_small": MobileNetV3Conf, "resnet": ResNetConf,
                 "ofa_mbv3": OFAMobileNetV3Conf, "ofa_mbv3_w12": OFAMobileNetV3Conf},
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (``import ee_nas`` does this)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RUN_SCHEMA)
    for group, options in OPTION_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    cs.store(group="logger", name="wandb_schema", node={"wandb": WandbLoggerConf})
