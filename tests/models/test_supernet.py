"""The weight-sharing supernet and the static MultiExitNet it extracts compute the same function."""
import numpy as np
import pytest
import torch
from torch import nn

from ee_nas.models.bn import recalibrate_bn
from ee_nas.models.multi_exit import MultiExitNet, MultiExitSupernet
from ee_nas.models.ops import SqueezeExcite
from ee_nas.genome import BRANCH_OPS, BranchLayer, ExitBranch, Genome


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines and biases, so that any wrong slice shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
        for name, p in net.named_parameters():
            if name.endswith("bias") and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
    return net


# resnet at 8x8 input: taps at 8, 4 and 2 pixels, so two pools in a branch reach (and pool) a 1x1 map
CASES = {"mobilenetv3_small": {}, "resnet": {"image_size": 8}}


@pytest.fixture(scope="module", params=list(CASES))
def supernet(request, make_backbone, make_space):
    torch.manual_seed(0)
    backbone = make_backbone(request.param, **CASES[request.param])
    return randomize(MultiExitSupernet(backbone, make_space(backbone, "aebnas"))).eval()


def inputs(supernet, n=3, seed=1):
    s = supernet.backbone.image_size
    return torch.randn(n, supernet.backbone.in_channels, s, s, generator=torch.Generator().manual_seed(seed))


# every branch op, as first and as second layer (taps exist in both backbones: 7 and 9 blocks)
BRANCHES = [
    {0: [("mbconv3", 16)], 3: [("conv3x3", 16), ("conv3x3", 32)], 5: [("maxpool", 0), ("avgpool", 0)]},
    {1: [("dwsep3x3", 32), ("dwsep3x3", 16)], 4: [("mbconv6", 32), ("mbconv3", 32)], 5: [("conv3x3", 32), ("maxpool", 0)]},
    {2: [("avgpool", 0), ("mbconv6", 16)], 4: [("maxpool", 0)], 5: []},
    {0: [("conv3x3", 32), ("mbconv6", 16)], 3: [("mbconv3", 16), ("dwsep3x3", 32)], 5: [("avgpool", 0), ("maxpool", 0)]},
]


def hand_genomes(space, rng):
    out = []
    for spec in BRANCHES:
        bb = space.sample(rng)  # random expands/kernels; full depths so every tap above is active
        exits = [ExitBranch(t, tuple(BranchLayer(op, w) for op, w in layers)) for t, layers in spec.items()]
        out.append(space.validate(Genome(space.stage_depths, bb.expands, bb.kernels, exits)))
    return out


def test_hand_genomes_cover_every_op():
    assert {op for spec in BRANCHES for layers in spec.values() for op, _ in layers} == set(BRANCH_OPS)


def assert_same_outputs(supernet, genome, x):
    with torch.no_grad():
        dynamic = supernet(x, genome)
        static_net = supernet.extract(genome).eval()
        static = static_net(x)
    assert isinstance(static_net, MultiExitNet)
    assert len(dynamic) == len(static) == static_net.n_exits == genome.n_exits
    for a, b in zip(dynamic, static):
        assert a.shape == (len(x), supernet.backbone.num_classes)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return static_net


def test_hand_genomes_supernet_equals_extracted(supernet):
    rng = np.random.default_rng(0)
    x = inputs(supernet)
    for genome in hand_genomes(supernet.space, rng):
        static_net = assert_same_outputs(supernet, genome, x)
        assert static_net.taps == list(genome.taps)


def test_random_genomes_supernet_equals_extracted(supernet):
    rng = np.random.default_rng(1)
    x = inputs(supernet)
    space = supernet.space
    genomes = [space.sample(rng) for _ in range(8)] + [space.largest(), space.smallest()]
    genomes += [space.sample_training(rng) for _ in range(2)]
    n_exits = set()
    for genome in genomes:
        assert_same_outputs(supernet, genome, x)
        n_exits.add(genome.n_exits)
    assert len(n_exits) >= 2  # the sample is not one shape over and over


def test_squeeze_excite_stages_are_extracted(supernet):
    largest = supernet.extract(supernet.space.largest())
    has_se = any(isinstance(m, SqueezeExcite) for m in largest.modules())
    backbone_has_se = any(getattr(b, "se", None) is not None for b in supernet.backbone.blocks)
    assert has_se == backbone_has_se


def test_extracted_net_owns_its_weights(supernet):
    genome = supernet.space.largest()
    x = inputs(supernet)
    with torch.no_grad():
        before = supernet(x, genome)
        static_net = supernet.extract(genome)
        for p in static_net.parameters():
            p.zero_()
        after = supernet(x, genome)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exit_on_inactive_block_is_rejected(supernet):
    space = supernet.space
    depths = list(space.stage_depths)
    stage = next(s for s, d in enumerate(depths) if d > 1)  # drop the last block of a deep stage
    depths[stage] -= 1
    dropped = max(b for b in range(space.n_blocks) if space.block_stage[b] == stage)
    g = space.largest()
    genome = Genome(depths, g.expands, g.kernels, [ExitBranch(dropped, (BranchLayer("conv3x3", 16),))])
    with pytest.raises(ValueError, match=f"tap {dropped}"):
        supernet.extract(genome)
    with pytest.raises(ValueError, match=f"tap {dropped}"):
        supernet(inputs(supernet), genome)


# -- BatchNorm recalibration ---------------------------------------------------------------------------

def test_recalibrate_bn(make_backbone, make_space):
    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small")
    supernet = randomize(MultiExitSupernet(backbone, make_space(backbone, "aebnas")))
    net = supernet.extract(supernet.space.largest())
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(bns):
        bn.momentum = 0.01 if i % 2 else 0.1
    momenta = [bn.momentum for bn in bns]
    before = [bn.running_mean.clone() for bn in bns]
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 + 1

    out = recalibrate_bn(net.train(), images, batch_size=8)

    assert out is net and not net.training
    assert [bn.momentum for bn in bns] == momenta
    assert all(not torch.allclose(b, bn.running_mean) for b, bn in zip(before, bns))
    assert all(int(bn.num_batches_tracked) == 2 for bn in bns)
    # stem BN: a cumulative (not momentum) average over the two equal batches of the batch statistics
    stem_conv, stem_bn = net.segments[0][0][0], net.segments[0][0][1]
    with torch.no_grad():
        y = stem_conv(images)
    halves = y[:8], y[8:]
    mean = torch.stack([h.mean(dim=(0, 2, 3)) for h in halves]).mean(0)
    var = torch.stack([h.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for h in halves]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem_bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_without_bn_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    assert recalibrate_bn(net, torch.randn(2, 3, 8, 8)) is net and not net.training
