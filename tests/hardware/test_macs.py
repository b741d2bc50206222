"""MAC accounting against hand counts and torchvision's published counts, and the memoized CostModel
against measuring the extracted net.

The field's convention (ee_nas.hardware.macs): conv = Cout * (Cin/groups) * k * k * Hout * Wout,
linear = in * out; bias adds, BatchNorm (folded), activations, pooling, adds and products count nothing.
"""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ee_nas.hardware.macs import CostModel, avg_macs, module_macs, net_costs
from ee_nas.models.multi_exit import MultiExitNet, MultiExitSupernet


def conv_macs(c_out, c_in, k, h_out, w_out, groups=1):
    return c_out * (c_in // groups) * k * k * h_out * w_out


# -- module_macs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 8])
def test_module_macs_two_convs(groups):
    # 3x20x20 -> conv3x3 (pad 1) -> 8x20x20 -> conv5x5 stride 2 (pad 2) -> 8x10x10 (depthwise when groups=8)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=groups, bias=False))
    net.train()
    macs, params = module_macs(net, (3, 20, 20))
    assert macs == conv_macs(8, 3, 3, 20, 20) + conv_macs(8, 8, 5, 10, 10, groups)
    assert params == 8 * 3 * 9 + 8 * (8 // groups) * 25
    assert net.training  # the training flag is restored


class _SEResidual(nn.Module):
    """conv (with bias) -> BN -> Hardswish -> squeeze-excite product -> residual add -> pool -> linear."""

    def __init__(self, c=6, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.bn, self.act = nn.BatchNorm2d(c), nn.Hardswish()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes, bias=True)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True)) + x
        return self.fc(torch.flatten(torch.nn.functional.relu(self.pool(y)), 1))


def test_module_macs_counts_only_convs_and_linears():
    # only the 3x3 conv (6*6*9 per output position, 12x12 positions) and the linear (6*5) count
    macs, params = module_macs(_SEResidual(), (6, 12, 12))
    assert macs == conv_macs(6, 6, 3, 12, 12) + 6 * 5
    assert params == (6 * 6 * 9 + 6) + 2 * 6 + (6 * 5 + 5)  # conv + bias, BN affine, linear + bias


@pytest.mark.parametrize("name, weights", [("mobilenet_v3_large", "MobileNet_V3_Large_Weights"),
                                           ("mobilenet_v3_small", "MobileNet_V3_Small_Weights"),
                                           ("resnet18", "ResNet18_Weights")])
def test_module_macs_matches_torchvision_ops(name, weights):
    """torchvision publishes each ImageNet model's GMACs (as `_ops`, 3 decimals) in its weights enum."""
    published = getattr(torchvision.models, weights).IMAGENET1K_V1.meta["_ops"] * 1e9
    model = getattr(torchvision.models, name)(weights=None)
    macs, params = module_macs(model, (3, 224, 224))
    assert macs == pytest.approx(published, rel=0.015)
    assert params == sum(p.numel() for p in model.parameters())


def test_module_macs_scales_with_resolution():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False))
    small, _ = module_macs(net, (4, 8, 8))
    big, _ = module_macs(net, (4, 16, 16))
    assert (small, big) == (conv_macs(6, 4, 3, 8, 8), conv_macs(6, 4, 3, 16, 16))


# -- net_costs on a hand-built MultiExitNet --------------------------------------------------------

def head(c, classes=10):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def head_macs(c, classes=10):
    return c * classes  # the linear layer's multiplies; pooling and the bias add count nothing


@pytest.fixture(scope="module")
def hand_net():
    """3x16x16 -> [8x16x16] -> exit 1 -> [16x8x8] -> exit 2 -> [32x4x4] -> final exit."""
    segments = [nn.Conv2d(3, 8, 3, 1, 1, bias=False),
                nn.Conv2d(8, 16, 3, 2, 1, bias=False),
                nn.Conv2d(16, 32, 1, 2, 0, bias=False)]
    net = MultiExitNet(segments, [head(8), head(16), head(32)], taps=[0, 1])
    seg = [conv_macs(8, 3, 3, 16, 16), conv_macs(16, 8, 3, 8, 8), conv_macs(32, 16, 1, 4, 4)]
    hd = [head_macs(8), head_macs(16), head_macs(32)]
    params = 8 * 3 * 9 + 16 * 8 * 9 + 32 * 16 + (8 * 10 + 10) + (16 * 10 + 10) + (32 * 10 + 10)
    return net, seg, hd, params


def test_net_costs_hand_computed(hand_net):
    net, seg, hd, params = hand_net
    costs = net_costs(net, (3, 16, 16))
    np.testing.assert_array_equal(costs.segment_macs, seg)
    np.testing.assert_array_equal(costs.head_macs, hd)
    # DESIGN: cum_MACs(k) = backbone up to exit k's tap + branches 1..k (earlier heads ran and declined)
    expected_cum = [seg[0] + hd[0],
                    seg[0] + seg[1] + hd[0] + hd[1],
                    seg[0] + seg[1] + seg[2] + hd[0] + hd[1] + hd[2]]
    np.testing.assert_array_equal(costs.cum_macs, expected_cum)
    assert costs.params == params
    assert costs.backbone_macs == sum(seg) + hd[2]  # the same backbone without early exits


def test_avg_macs(hand_net):
    net, seg, hd, _ = hand_net
    costs = net_costs(net, (3, 16, 16))
    cum = costs.cum_macs
    assert costs.avg_macs([1, 0, 0]) == pytest.approx(seg[0] + hd[0])
    assert costs.avg_macs([0, 0, 1]) == pytest.approx(sum(seg) + sum(hd))
    rates = [0.5, 0.3, 0.2]
    assert costs.avg_macs(rates) == pytest.approx(0.5 * cum[0] + 0.3 * cum[1] + 0.2 * cum[2])
    assert avg_macs(rates, cum) == pytest.approx(costs.avg_macs(rates))


@pytest.mark.parametrize("rates", [[0.5, 0.3, 0.3], [0.5, 0.5], [0.25, 0.25, 0.25, 0.25], [1.5, -0.5, 0.0]])
def test_avg_macs_rejects_bad_rates(rates):
    cum = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="exit_rates"):
        avg_macs(rates, cum)


# -- CostModel (memoized per component) == measuring the extracted network ----------------------------

@pytest.mark.parametrize("backbone_name, n_genomes", [("mobilenetv3_small", 8), ("resnet", 8)])
def test_cost_model_matches_extracted_net(backbones, make_space, backbone_name, n_genomes):
    backbone = backbones[backbone_name]
    supernet = MultiExitSupernet(backbone, make_space(backbone, "aebnas"))
    model = CostModel(supernet)
    shape = (backbone.in_channels, backbone.image_size, backbone.image_size)
    rng = np.random.default_rng(7)
    genomes = [supernet.space.sample(rng) for _ in range(n_genomes)] + [supernet.space.smallest()]
    for genome in genomes:
        got, want = model.costs(genome), net_costs(supernet.extract(genome), shape)
        assert len(got.cum_macs) == genome.n_exits
        np.testing.assert_array_equal(got.segment_macs, want.segment_macs)
        np.testing.assert_array_equal(got.head_macs, want.head_macs)
        np.testing.assert_array_equal(got.cum_macs, want.cum_macs)
        assert (got.params, got.backbone_macs) == (want.params, want.backbone_macs)
        assert np.all(np.diff(got.cum_macs) > 0)


def test_cost_model_reference_backbone(backbones, make_space):
    """The no-exit largest backbone: one segment + final head; every exit adds MACs to the last exit."""
    backbone = backbones["resnet"]
    space = make_space(backbone, "aebnas")
    model = CostModel(MultiExitSupernet(backbone, space))
    ref = model.costs(space.largest_backbone())
    assert ref.cum_macs.tolist() == [ref.backbone_macs]
    assert ref.backbone_macs == module_macs(
        nn.Sequential(backbone.extract_stem(), *[backbone.extract_block(b, space.largest_backbone())
                                                  for b in range(backbone.n_blocks)], backbone.extract_head()),
        (3, 32, 32))[0]
    with_exits = model.costs(space.largest())
    assert with_exits.backbone_macs == ref.backbone_macs
    assert with_exits.cum_macs[-1] == ref.backbone_macs + with_exits.head_macs[:-1].sum()
