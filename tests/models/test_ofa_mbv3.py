"""backbone=ofa_mbv3 against Once-for-All's own code: same logits, same MACs, OFA checkpoints load exactly.

The oracle is the `ofa` package (a test-only dependency, in the `dev` extra): its OFAMobileNetV3 with
random weights (transformation matrices and BatchNorm statistics included) is saved, loaded here, and
every random (ks, e, d) setting's extracted subnet must give OFA's logits at 32x32 and 224x224.
"""
import random

import pytest
import torch
from torch import nn

from ee_nas.genome import Genome
from ee_nas.hardware.macs import CostModel
from ee_nas.models.multi_exit import MultiExitSupernet
from ee_nas.models.ofa_mbv3 import OFAMobileNetV3, genome_from_ofa, ofa_setting
from ee_nas.search.space import SearchSpace

N_SETTINGS = 20
TOLERANCE = 1e-4


def random_settings(n: int, seed: int = 0) -> list[dict]:
    """The largest and the smallest subnet, then random ones: OFA's (ks, e, d) for 20 blocks in 5 stages."""
    rng = random.Random(seed)
    settings = [dict(ks=[7] * 20, e=[6] * 20, d=[4] * 5), dict(ks=[3] * 20, e=[3] * 20, d=[2] * 5)]
    while len(settings) < n:
        settings.append(dict(ks=[rng.choice([3, 5, 7]) for _ in range(20)], e=[rng.choice([3, 4, 6]) for _ in range(20)],
                             d=[rng.choice([2, 3, 4]) for _ in range(5)]))
    return settings


def randomize_(state: dict, seed: int = 0) -> dict:
    """Random values for every tensor: kernel transforms away from identity, BN statistics away from 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in state.items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("_matrix"):
                t.copy_(torch.eye(t.shape[0]) + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif ".bn." in name and name.endswith("weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return state


@pytest.fixture(scope="module")
def oracle():
    """OFA's supernet (ofa_mbv3_d234_e346_k357_w1.0 layout, 10 classes) with random weights, in eval mode."""
    networks = pytest.importorskip("ofa.imagenet_classification.elastic_nn.networks")
    torch.manual_seed(0)
    ref = networks.OFAMobileNetV3(n_classes=10, dropout_rate=0, width_mult=1.0, ks_list=[3, 5, 7],
                                  expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    randomize_(ref.state_dict())
    return ref.eval()


def ofa_macs_and_logits(subnet: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Logits and the convolution + linear MACs per sample (bias adds excluded) of a static OFA subnet."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs.append(output[0].numel() * module.in_channels // module.groups * k)
        else:
            macs.append(module.in_features * module.out_features)

    hooks = [m.register_forward_hook(count) for m in subnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        logits = subnet(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(macs), logits


@pytest.mark.parametrize("resolution", [32, 224])
def test_subnets_match_ofa_logits_and_macs(oracle, resolution, record_property):
    """>= 20 random (ks, e, d): ee_nas's extracted subnet gives OFA's logits (1e-4) and OFA's conv+linear MACs."""
    ours = OFAMobileNetV3(num_classes=10, image_size=resolution)
    ours.load_ofa_state_dict(oracle.state_dict())
    supernet = MultiExitSupernet(ours, SearchSpace(ours, min_exits=0, max_exits=0)).eval()
    costs = CostModel(supernet)
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(resolution))
    worst, checked = 0.0, 0
    with torch.no_grad():
        for i, setting in enumerate(random_settings(N_SETTINGS)):
            oracle.set_active_subnet(**setting)
            ofa_macs, expected = ofa_macs_and_logits(oracle.get_active_subnet(preserve_weight=True).eval(), x)
            genome = genome_from_ofa(**setting)
            assert ofa_setting(genome) == setting
            diffs = [(supernet.extract(genome).eval()(x)[-1] - expected).abs().max().item()]
            if i < 4:  # the elastic (training and search) path too, not only the extracted static net
                diffs.append((supernet(x, genome)[-1] - expected).abs().max().item())
            assert max(diffs) < TOLERANCE, (setting, diffs)
            if resolution == 32 or i < 4:  # counting every block at 224x224 is slow; the arithmetic is the same
                assert costs.costs(genome).backbone_macs == ofa_macs, setting
            worst, checked = max([worst, *diffs]), checked + 1
    assert checked >= 20
    record_property(f"max_abs_logit_diff_{resolution}", worst)
    print(f"{resolution}x{resolution}: {checked} settings, max |logit diff| {worst:.2e}")


def test_kernel_transforms_are_what_makes_it_exact(oracle):
    """A plain centre crop of the 7x7 (transforms reset to identity) computes something else."""
    ours = OFAMobileNetV3(num_classes=10, image_size=32)
    ours.load_ofa_state_dict(oracle.state_dict())
    setting = dict(ks=[3] * 20, e=[4] * 20, d=[3] * 5)
    oracle.set_active_subnet(**setting)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = oracle.get_active_subnet().eval()(x)
        for name, p in ours.named_parameters():
            if "transform_" in name:
                p.copy_(torch.eye(p.shape[0]))
        cropped = MultiExitSupernet(ours, SearchSpace(ours, min_exits=0, max_exits=0)).eval()(
            x, genome_from_ofa(**setting))[-1]
    assert (cropped - expected).abs().max() > 1e-2


def ofa_checkpoint(backbone: OFAMobileNetV3) -> dict:
    """What OFA's model zoo file holds: {"state_dict": {OFA's tensor names: tensors}}."""
    return {"state_dict": {backbone.ofa_key(k): v.clone() for k, v in backbone.state_dict().items()}}


def test_checkpoint_loads_every_tensor_and_replaces_the_classifier(tmp_path):
    source = OFAMobileNetV3(num_classes=1000, image_size=32)
    randomize_(source.state_dict(), seed=3)
    state = ofa_checkpoint(source)["state_dict"]
    # the model zoo's older files say mobile_inverted_conv and drop the dynamic layers' inner .bn/.conv
    legacy = {k.replace(".conv.", ".mobile_inverted_conv.", 1).replace(".bn.bn.", ".bn.")
              .replace(".conv.conv.weight", ".conv.weight") if k.startswith("blocks.") else k: v
              for k, v in state.items()}
    assert legacy.keys() != state.keys()
    torch.save({"state_dict": legacy}, tmp_path / "ofa_w10")
    loaded = OFAMobileNetV3(num_classes=10, image_size=32, pretrained=str(tmp_path / "ofa_w10"))
    theirs, ours = source.state_dict(), loaded.state_dict()
    for name in ours:
        if name.startswith("head.8."):  # the classifier: 10 classes, freshly initialised
            assert ours[name].shape[0] == 10
        else:
            assert torch.equal(ours[name], theirs[name]), name


def test_a_mismatched_checkpoint_stops_with_one_line(tmp_path, record_property):
    """The width-1.2 file into backbone=ofa_mbv3 (width 1.0): exit 2, one line naming the first differing tensor."""
    from ee_nas.config import ConfigError
    from ee_nas.run import run, user_error
    from inprocess import compose_run

    w12 = tmp_path / "ofa_mbv3_d234_e346_k357_w1.2"
    torch.save(ofa_checkpoint(OFAMobileNetV3(width_mult=1.2, image_size=32)), w12)
    with pytest.raises(ConfigError) as err:
        OFAMobileNetV3(image_size=32, pretrained=str(w12))
    assert str(err.value) == (f"config error: backbone.pretrained='{w12}' does not fit backbone "
                              "OFAMobileNetV3(width_mult=1): first_conv.conv.weight is [24, 3, 3, 3] in the "
                              "checkpoint, [16, 3, 3, 3] here; a width-1.2 supernet needs backbone=ofa_mbv3_w12")
    # through the pipeline (digits: 1 input channel): one line, exit status 2, before any training
    cfg = compose_run(tmp_path / "run", "backbone=ofa_mbv3", f"backbone.pretrained={w12}", "logger=csv")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    code, message = user_error(err.value, cfg)
    assert code == 2 and "\n" not in message and "[24, 3, 3, 3] in the checkpoint, [16, 1, 3, 3] here" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
    record_property("mismatch_message", message)
    w10 = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"
    torch.save(ofa_checkpoint(OFAMobileNetV3(image_size=32)), w10)
    with pytest.raises(ConfigError, match=r"first_conv.conv.weight is \[16, 3, 3, 3\] in the checkpoint, \[16, 1, 3, 3\] "
                                          r"here; the checkpoint takes 3 input channels, the data has 1$"):
        OFAMobileNetV3(image_size=32, in_channels=1, pretrained=str(w10))
    with pytest.raises(ConfigError, match=r"^config error: backbone.pretrained='/nonexistent' does not exist"):
        OFAMobileNetV3(image_size=32, pretrained="/nonexistent")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_pretrained_experiments_load_the_checkpoint(name, tmp_path):
    """+experiment=<data>_ofa_search points at ofa.model_zoo's file and builds the backbone from it."""
    from ee_nas.config import validate
    from ee_nas.run import build
    from inprocess import compose_run

    cfg = compose_run(tmp_path / "run", f"+experiment={name}_ofa_search", "debug=smoke")
    assert cfg.backbone.pretrained.endswith("/.torch/ofa_nets/ofa_mbv3_d234_e346_k357_w1.0")
    if name != "cifar10":
        return
    source = OFAMobileNetV3(num_classes=1000, image_size=32)
    torch.save(ofa_checkpoint(source), tmp_path / "ofa_w10")
    cfg = compose_run(tmp_path / "run", f"+experiment={name}_ofa_search", "debug=smoke",
                      f"backbone.pretrained={tmp_path / 'ofa_w10'}")
    validate(cfg)
    backbone = build(cfg, "backbone", in_channels=3, num_classes=10, image_size=32)
    assert torch.equal(backbone.stem[0].weight, source.stem[0].weight)
    assert torch.equal(backbone.blocks[19].dw_conv.transform_5to3, source.blocks[19].dw_conv.transform_5to3)


def test_digits_pipeline_runs_with_the_ofa_backbone(tmp_path):
    """The whole pipeline, debug-sized, on a random-initialised OFA supernet (16x16 digits, 1 input channel)."""
    from inprocess import run_in_process

    from inprocess import compose_run

    overrides = ["backbone=ofa_mbv3", "logger=csv", "data.image_size=16", "data.batch_size=16", "trainer.max_epochs=1",
                 "++trainer.limit_train_batches=2", "search.pop_size=2", "search.n_generations=1",
                 "evaluation.calibration_samples=32", "thresholds.sweep_points=4", "trainer.enable_progress_bar=false"]
    if "finetune" in compose_run(tmp_path, *overrides):  # the chosen subnet's fine-tuning stage, where it exists
        overrides.append("finetune.epochs=0")
    summary = run_in_process(tmp_path, *overrides)
    genome = Genome.from_dict(summary["genome"])
    assert len(genome.depths) == 5 and len(genome.kernels) == len(genome.expands) == 20
    assert all(2 <= d <= 4 for d in genome.depths) and set(genome.kernels) <= {3, 5, 7}
    assert (tmp_path / "subnet.pt").stat().st_size > 0 and summary["avg_macs"] > 0
