"""What makes early exits a fair contender: per-op exit classifiers, the exit-saving floor, and
starting a run from another run's trained supernet (one supernet searched at several targets)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inprocess import compose_run

from ee_nas.config import ConfigError
from ee_nas.data.digits import DigitsDataModule
from ee_nas.genome import BranchLayer, ExitBranch, Genome
from ee_nas.models.branches import classifier_key
from ee_nas.models.multi_exit import MultiExitSupernet
from ee_nas.run_dir import adopt_supernet, claim_run_dir
from ee_nas.search.evaluator import SubnetEvaluator
from ee_nas.search.space import SearchSpace


def test_each_kind_of_branch_trains_its_own_classifier(make_backbone, make_space):
    """A branch ending in raw tap features and one ending in a dwsep layer must not share a classifier:
    a loss through one leaves the other's classifier untouched."""
    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    space = make_space(backbone, "aebnas")
    net = MultiExitSupernet(backbone, space)
    largest = space.largest_backbone()
    genome = Genome(largest.depths, largest.expands, largest.kernels,
                    [ExitBranch(0, (BranchLayer("dwsep3x3", 16),))])
    logits = net(torch.randn(4, 1, 16, 16), genome)
    F.cross_entropy(logits[0], torch.tensor([0, 1, 2, 3])).backward()
    classifiers = net.branches["0"].classifiers
    assert classifiers["dwsep3x3"].weight.grad is not None and classifiers["dwsep3x3"].weight.grad.abs().sum() > 0
    assert classifiers["none"].weight.grad is None and classifiers["mbconv6"].weight.grad is None
    assert classifier_key(()) == "none"
    assert classifier_key((BranchLayer("mbconv3", 16), BranchLayer("maxpool"))) == "mbconv3"  # pooling keeps the kind


def test_branches_train_at_a_scaled_lr_the_backbone_at_the_base_lr(make_backbone, make_space):
    """One SGD step from zero momentum moves a parameter by lr * grad: branch weights by branch_lr_scale
    times the configured lr, backbone weights by the lr itself."""
    from ee_nas.lit_module import MultiExitModule

    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    net = MultiExitSupernet(backbone, make_space(backbone, "aebnas"))
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    module = MultiExitModule(net, optimizer=sgd, branch_lr_scale=12.0)
    optimizer = module.configure_optimizers()
    branch, stem = net.branches["0"].classifiers["none"].weight, next(net.backbone.parameters())
    before = [branch.detach().clone(), stem.detach().clone()]
    top = net.space.largest_backbone()
    logits = net(torch.randn(8, 1, 16, 16), Genome(top.depths, top.expands, top.kernels, [ExitBranch(0, ())]))
    sum(F.cross_entropy(z, torch.arange(8) % 10) for z in logits).backward()
    grads = [branch.grad.clone(), stem.grad.clone()]
    optimizer.step()
    assert torch.allclose(before[0] - branch.detach(), 1.2 * grads[0], atol=1e-6)
    assert torch.allclose(before[1] - stem.detach(), 0.1 * grads[1], atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_exit_grad_scale_scales_what_the_early_exits_send_into_the_backbone(make_backbone, make_space, scale):
    """training.exit_grad_scale: the backbone's gradient from an early exit's loss is that scale times the
    unscaled one, the branch's own gradient and both forward outputs unchanged."""
    from ee_nas.lit_module import MultiExitModule

    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    net = MultiExitSupernet(backbone, make_space(backbone, "aebnas"))
    top = net.space.largest_backbone()
    genome = Genome(top.depths, top.expands, top.kernels, [ExitBranch(1, (BranchLayer("conv3x3", 16),))])
    net.train(False)  # BatchNorm in eval mode: the two passes see identical layers
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    stem, branch = next(net.backbone.parameters()), net.branches["1"].classifiers["conv3x3"].weight

    def grads(s):
        MultiExitModule(net, optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
                        exit_grad_scale=s)
        net.zero_grad()
        logits = net(x, genome)
        F.cross_entropy(logits[0], y).backward()
        return logits, torch.zeros_like(stem) if stem.grad is None else stem.grad.clone(), branch.grad.clone()

    (full_logits, full_stem, full_branch), (logits, stem_grad, branch_grad) = grads(1.0), grads(scale)
    assert full_stem.abs().sum() > 0
    assert torch.allclose(stem_grad, scale * full_stem, atol=1e-7)
    assert torch.allclose(branch_grad, full_branch) and all(torch.equal(a, b) for a, b in zip(logits, full_logits))


def test_exit_grad_scale_outside_0_1_fails_by_name(make_backbone, make_space):
    from ee_nas.lit_module import MultiExitModule

    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    with pytest.raises(ValueError, match="exit_grad_scale"):
        MultiExitModule(MultiExitSupernet(backbone, make_space(backbone, "aebnas")), optimizer={}, exit_grad_scale=2)


def test_static_nas_aux_exits_trains_aebnas_supernet_and_searches_static_networks(make_backbone, make_space):
    """search_space=static_nas_aux_exits: the same branches and the same training subnets (same draws) as aebnas,
    so the same supernet; every network its search can draw or repair is static. static_nas trains no branch."""
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    aux, ae, static = (make_space(backbone, n) for n in ("static_nas_aux_exits", "aebnas", "static_nas"))
    assert aux.train_exits and ae.train_exits and not static.train_exits
    nets = [MultiExitSupernet(backbone, s) for s in (aux, ae, static)]
    assert set(nets[0].state_dict()) == set(nets[1].state_dict()) != set(nets[2].state_dict())
    rng_aux, rng_ae = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(5):
        assert ([g.key() for g in aux.training_genomes(rng_aux, 2)] ==
                [g.key() for g in ae.training_genomes(rng_ae, 2)])
    assert all(g.n_exits > 1 for g in aux.training_genomes(rng_aux, 2))
    rng = np.random.default_rng(0)
    assert all(aux.sample(rng).n_exits == 1 for _ in range(20))
    assert aux.repair(ae.largest()).n_exits == 1 and aux.problems(ae.largest())
    with pytest.raises(ValueError, match="train_exits=false with max_exits=3"):
        SearchSpace(backbone, max_exits=3, train_exits=False)


@pytest.fixture(scope="module")
def evaluator(make_backbone, make_space):
    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=16, val_fraction=0.2, test_fraction=0.2, eval_batch_size=256)
    dm.setup()
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    supernet = MultiExitSupernet(backbone, make_space(backbone, "aebnas", min_exit_saving=0.4)).eval()
    return SubnetEvaluator(supernet, dm, calibration_samples=64)


def test_exit_saving_floor_tightens_the_budget_to_the_own_backbone(evaluator):
    space = evaluator.supernet.space
    genome = space.sample(np.random.default_rng(3))
    own = evaluator.costs.costs(genome).backbone_macs
    assert evaluator.exit_target(genome, None) == pytest.approx(0.6 * own)
    assert evaluator.exit_target(genome, 0.1 * own) == pytest.approx(0.1 * own)  # a tighter target wins
    record = evaluator.score(genome, None)
    saving = 1 - record["avg_macs"] / record["backbone_macs"]
    if record["feasible"]:  # the tuned thresholds send enough samples out early
        assert saving >= 0.4 - 1e-9
    else:  # not even the cheapest policy saves 40%: no early-exit network, never chosen
        assert saving < 0.4


def test_deployed_thresholds_keep_a_cost_margin_for_early_exits_only(evaluator, monkeypatch):
    """An early-exit network's deployed policy is tuned to (1 - cost_margin) x the target and spends ties up to
    it; a static network's cost does not vary, so its budget is the target itself."""
    from omegaconf import OmegaConf

    from ee_nas.pipeline import tune_on_val

    space = evaluator.supernet.space
    monkeypatch.setattr(space, "min_exit_saving", 0.0)  # the budget is the target alone
    top = space.largest_backbone()
    genome = Genome(top.depths, top.expands, top.kernels, [ExitBranch(0, ()), ExitBranch(1, ())])
    val = evaluator.outputs(genome, ("val",))["val"]
    cum = evaluator.cum_cost(genome)
    target = 0.85 * cum[-1]
    cfg = lambda **t: OmegaConf.create({"thresholds": {"max_candidates": 64, **t}})  # noqa: E731
    full = tune_on_val(cfg(ties="spend", cost_margin=0.0), evaluator, genome, val, target)
    assert full.feasible and full.avg_macs <= target and cum[0] < full.avg_macs
    # a margin whose budget lies between everyone-at-the-first-exit and the policy without a margin: it binds
    margin = float(1 - (cum[0] + full.avg_macs) / (2 * target))
    kept = tune_on_val(cfg(ties="spend", cost_margin=margin), evaluator, genome, val, target)
    cheap = tune_on_val(cfg(ties="cheap", cost_margin=margin), evaluator, genome, val, target)
    assert kept.feasible and kept.avg_macs <= (1 - margin) * target * (1 + 1e-9) < full.avg_macs
    assert cheap.avg_macs <= kept.avg_macs
    # a margin that leaves no policy (not even everyone at the first exit) gives way to the whole target
    assert cum[0] > 0.1 * target
    wide = tune_on_val(cfg(ties="spend", cost_margin=0.9), evaluator, genome, val, target)
    assert wide.feasible and wide.avg_macs <= target and wide.accuracy == full.accuracy
    assert cheap.accuracy == kept.accuracy
    static = Genome(top.depths, top.expands, top.kernels)
    own = evaluator.cum_cost(static)[-1]
    assert tune_on_val(cfg(cost_margin=0.2), evaluator, static, evaluator.outputs(static, ("val",))["val"],
                       own).feasible  # exactly at the target: feasible, no margin


def test_a_floor_needs_exits(make_backbone, make_space):
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="min_exit_saving=0.3: .* 0 for a space without early exits"):
        make_space(backbone, "static_nas", min_exit_saving=0.3)


def test_a_run_starts_from_another_runs_supernet_only_if_it_trained_the_same_one(tmp_path):
    source = tmp_path / "trained"
    trained = compose_run(source, "hardware.target_fraction=0.25")
    source.mkdir()
    claim_run_dir(trained, source)
    (source / "checkpoints").mkdir()
    (source / "checkpoints" / "last.ckpt").write_bytes(b"supernet weights")

    # another target and another exit-saving floor: the same supernet, adopted
    other = tmp_path / "other_target"
    other.mkdir()
    cfg = compose_run(other, "hardware.target_fraction=0.5", "search_space.min_exit_saving=0",
                      f"supernet_from={source}")
    assert adopt_supernet(cfg, other) == source / "checkpoints" / "last.ckpt"
    assert (other / "checkpoints" / "last.ckpt").read_bytes() == b"supernet weights"
    assert adopt_supernet(cfg, other) is None  # it has a checkpoint of its own now: resume from that

    # another backbone would load weights of the wrong shapes: refused, the key named
    wrong = tmp_path / "other_backbone"
    wrong.mkdir()
    cfg = compose_run(wrong, "backbone.head_hidden=64", f"supernet_from={source}")
    with pytest.raises(ConfigError, match=r"backbone\.head_hidden is 128 there and 64 here"):
        adopt_supernet(cfg, wrong)
    assert not (wrong / "checkpoints").exists()
    with pytest.raises(ConfigError, match="no supernet checkpoint"):
        adopt_supernet(compose_run(wrong, f"supernet_from={tmp_path / 'missing'}"), wrong)


def test_exit_grad_from_largest_keeps_the_other_subnets_exits_out_of_the_backbone(make_backbone, make_space):
    """training.exit_grad_from=largest: a training step's backbone gradient is the largest subnet's whole loss plus
    only the final exits of the other subnets; with `all` the other subnets' early exits add to it."""
    from ee_nas.lit_module import MultiExitModule

    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    net = MultiExitSupernet(backbone, make_space(backbone, "aebnas"))
    net.train(False)  # BatchNorm in eval mode: every pass sees identical layers
    x, y = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    stem = next(net.backbone.parameters())

    def step_grad(source):
        module = MultiExitModule(net, optimizer={}, n_random=1, exit_grad_from=source, seed=3)
        module.log = lambda *a, **k: None
        net.zero_grad()
        module.training_step((x, y), 0).backward()
        assert net.exit_grad_scale == 1.0  # the supernet's own scale is untouched by the step
        return stem.grad.clone()

    def reference(scales):  # the same step by hand: each subnet's loss with its own exit gradient scale
        module = MultiExitModule(net, optimizer={}, n_random=1, seed=3)
        net.zero_grad()
        genomes = module.space.training_genomes(module.rng, 1)
        teacher, total = None, 0.0
        for genome, scale in zip(genomes, scales(len(genomes))):
            logits = net(x, genome, scale)
            total = total + module.exit_loss(logits, y, teacher)
            teacher = logits[-1].detach() if teacher is None else teacher
        (total / len(genomes)).backward()
        return stem.grad.clone()

    largest_only, every = step_grad("largest"), step_grad("all")
    assert torch.allclose(largest_only, reference(lambda n: [1.0] + [0.0] * (n - 1)), atol=1e-6)
    assert torch.allclose(every, reference(lambda n: [1.0] * n), atol=1e-6)
    assert not torch.allclose(largest_only, every, atol=1e-6)
    with pytest.raises(ValueError, match="exit_grad_from"):
        MultiExitModule(net, optimizer={}, exit_grad_from="smallest")
