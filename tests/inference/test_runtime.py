"""Dynamic early-exit runtime: the same decisions as exit_indices(confidence(logits)), batch or one by one."""
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from ee_nas.inference.fold import fold_batchnorm
from ee_nas.inference.runtime import PY_CLASSES, EarlyExitRuntime, load_run, normalize_thresholds, row_confidence
from ee_nas.models.multi_exit import MultiExitSupernet
from ee_nas.genome import BranchLayer, ExitBranch, Genome
from ee_nas.thresholds.confidence import confidence
from ee_nas.thresholds.tuner import exit_indices

GENOME = Genome(depths=(2, 3, 2), expands=(2.0, 3.0, 4.0, 2.0, 3.0, 4.0, 2.0), kernels=(3, 5, 3, 5, 3, 5, 3),
                exits=[ExitBranch(0, (BranchLayer("dwsep3x3", 16),)), ExitBranch(2, (BranchLayer("avgpool"),)),
                       ExitBranch(4, (BranchLayer("mbconv3", 32), BranchLayer("conv3x3", 16)))])


def spread_out(net: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and biases that make logits (and so confidences) vary across samples and exits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    return net.eval()


@pytest.fixture(scope="module")
def net(make_backbone, make_space):
    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", image_size=16, in_channels=1)
    return spread_out(MultiExitSupernet(backbone, make_space(backbone, "aebnas")).extract(GENOME))


@pytest.fixture(scope="module")
def images():
    return torch.randn(96, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def all_logits(net, x):
    with torch.no_grad():
        return torch.stack(net(x), 1).numpy()


def midpoint_thresholds(conf, quantiles=(0.3, 0.5, 0.6)):
    """Per early exit a threshold between two observed confidences (no ties at the boundary)."""
    t = []
    for k, q in enumerate(quantiles):
        u = np.unique(conf[:, k])
        i = int(q * (len(u) - 1))
        t.append((u[i] + u[i + 1]) / 2)
    return np.array(t + [0.0])


@pytest.mark.parametrize("measure", ["max_softmax", "entropy", "margin"])
def test_batch_decisions_equal_exit_indices(net, images, measure):
    logits = all_logits(net, images)
    conf = confidence(logits, measure)
    t = midpoint_thresholds(conf)
    expected = exit_indices(conf, t)
    assert len(np.unique(expected)) == 4, "the test thresholds should use every exit"
    rt = EarlyExitRuntime(net, t, measure)
    result = rt.classify(images)
    np.testing.assert_array_equal(result.exits, expected)
    answered = logits[np.arange(len(images)), expected]
    np.testing.assert_array_equal(result.labels, answered.argmax(-1))
    np.testing.assert_allclose(result.logits, answered, atol=1e-5)
    np.testing.assert_allclose(result.confidence, conf[np.arange(len(images)), expected], atol=1e-6)
    labels, exits = rt.predict(images)
    np.testing.assert_array_equal(exits, expected)
    np.testing.assert_array_equal(labels, result.labels)


def test_batch_size_one_matches_the_batch(net, images):
    t = midpoint_thresholds(confidence(all_logits(net, images)))
    rt = EarlyExitRuntime(net, t)
    batch = rt.classify(images[:32])
    for i in range(32):
        one = rt.classify(images[i])  # a single [C, H, W] image
        assert (one.exits[0], one.labels[0]) == (batch.exits[i], batch.labels[i])
    with torch.inference_mode():  # a caller's serving loop holds inference mode: classify runs in it as it is
        held = [rt.classify(images[i:i + 1]) for i in range(32)]
    assert [(r.exits[0], r.labels[0]) for r in held] == list(zip(batch.exits, batch.labels))


@pytest.mark.parametrize("measure", ["max_softmax", "entropy", "margin"])
@pytest.mark.parametrize("classes", [1, 10, PY_CLASSES, PY_CLASSES + 1, 1000])  # Python floats, then `confidence`
def test_row_confidence_matches_confidence(measure, classes):
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 3.0, 1e4):
        logits = torch.randn(50, classes, generator=g) * scale
        expected = confidence(logits, measure)
        got = [row_confidence(logits[i:i + 1], measure) for i in range(50)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        assert row_confidence(logits[:1].numpy(), measure) == pytest.approx(expected[0], rel=0, abs=1e-12)


def test_batch_size_one_settles_ties_exactly(net, images):
    """A threshold equal to a sample's confidence accepts it; one ulp above does not (as exit_indices)."""
    x = images[3:4]
    conf0 = confidence(all_logits(net, x), "max_softmax")[0, 0]
    at = EarlyExitRuntime(net, [conf0, np.inf, np.inf]).classify(x)
    above = EarlyExitRuntime(net, [np.nextafter(conf0, 2.0), np.inf, np.inf]).classify(x)
    assert (at.exits[0], above.exits[0]) == (0, 3)
    assert at.confidence[0] == conf0


def test_samples_that_left_skip_later_segments(net, images):
    t = midpoint_thresholds(confidence(all_logits(net, images)))
    seen = []
    hooks = [seg.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for seg in net.segments]
    try:
        exits = EarlyExitRuntime(net, t).classify(images).exits
    finally:
        for h in hooks:
            h.remove()
    still_running = [len(images)] + [int((exits >= k).sum()) for k in range(1, 4)]
    assert seen == still_running


def test_last_exit_always_accepts_and_disabled_exits(net, images):
    never = EarlyExitRuntime(net, [None, float("inf"), np.nan]).classify(images)
    assert (never.exits == 3).all()
    assert (never.labels == all_logits(net, images)[:, -1].argmax(-1)).all()
    always = EarlyExitRuntime(net, [0.0, 0.0, 0.0, 1.0]).classify(images)  # the final threshold is ignored
    assert (always.exits == 0).all()


def test_folded_batchnorm_computes_the_same_function_and_decisions(net, images):
    """Every BatchNorm after a convolution is gone; logits agree to float rounding; every exit decision,
    batch and one by one, is the unfolded runtime's; the caller's network keeps its BatchNorms."""
    def count(m, kind):
        return sum(isinstance(x, kind) for x in m.modules())

    before = count(net, nn.BatchNorm2d)
    folded = fold_batchnorm(net)
    assert before > 0 and count(folded, nn.BatchNorm2d) == 0 and count(net, nn.BatchNorm2d) == before
    assert count(folded, nn.Identity) - count(net, nn.Identity) == before
    np.testing.assert_allclose(all_logits(folded, images), all_logits(net, images), rtol=1e-4, atol=1e-4)
    t = midpoint_thresholds(confidence(all_logits(net, images)))
    plain, fast = EarlyExitRuntime(net, t).classify(images), EarlyExitRuntime(net, t, fold_bn=True).classify(images)
    assert len(np.unique(plain.exits)) == 4
    np.testing.assert_array_equal(fast.exits, plain.exits)
    np.testing.assert_array_equal(fast.labels, plain.labels)
    one = EarlyExitRuntime(net, t, fold_bn=True)
    assert [int(one.classify(images[i]).exits[0]) for i in range(16)] == plain.exits[:16].tolist()


def test_threshold_count_is_checked(net):
    with pytest.raises(ValueError, match="2 thresholds for a network with 4 exits"):
        EarlyExitRuntime(net, [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown confidence measure"):
        EarlyExitRuntime(net, [0.5] * 3, measure="bogus")
    np.testing.assert_array_equal(normalize_thresholds(np.array([0.2, np.inf, 0.3, 0.9]), 4), [0.2, np.inf, 0.3, 0])


def write_run(run_dir, net, genome, thresholds, conf_dir, image_size=16):
    """A run directory as `ee_nas.run` leaves it: .hydra/config.yaml, arch.yaml, subnet.pt."""
    cfg = OmegaConf.create({
        "seed": 0,
        "data": {"_target_": "ee_nas.data.digits.DigitsDataModule", "image_size": image_size, "split_seed": "${seed}",
                 "mean": [0.5], "std": [0.25]},
        "backbone": OmegaConf.load(conf_dir / "backbone" / "mobilenetv3_small.yaml"),
        "search_space": OmegaConf.load(conf_dir / "search_space" / "aebnas.yaml"),
    })
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "arch.yaml").write_text(yaml.safe_dump(genome.to_dict()))
    torch.save({"genome": genome.to_dict(), "state_dict": net.state_dict(), "thresholds": np.asarray(thresholds),
                "measure": "max_softmax"}, run_dir / "subnet.pt")
    return run_dir


def test_from_run_dir_rebuilds_the_saved_subnet(net, images, tmp_path, conf_dir):
    t = midpoint_thresholds(confidence(all_logits(net, images)))
    t[1] = np.inf
    run_dir = write_run(tmp_path / "run", net, GENOME, t, conf_dir)
    rt = EarlyExitRuntime.from_run_dir(run_dir)
    assert rt.run.genome == GENOME and rt.run.input_shape == (1, 16, 16) and rt.run.num_classes == 10
    assert rt.run.mean == (0.5,) and rt.run.std == (0.25,) and rt.measure == "max_softmax"
    np.testing.assert_array_equal(rt.thresholds, t)
    ours, theirs = rt.classify(images), EarlyExitRuntime(net, t).classify(images)
    np.testing.assert_array_equal(ours.exits, theirs.exits)
    np.testing.assert_allclose(ours.logits, theirs.logits, atol=1e-6)
    assert 1 not in ours.exits


def test_from_run_dir_errors(tmp_path, net, conf_dir):
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        load_run(tmp_path)
    run_dir = write_run(tmp_path / "run", net, GENOME, [0.5] * 4, conf_dir)
    other = Genome(GENOME.depths, GENOME.expands, GENOME.kernels, GENOME.exits[:1])
    (run_dir / "arch.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(ValueError, match="different genomes"):
        load_run(run_dir)
