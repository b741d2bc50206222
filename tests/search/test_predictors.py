"""Accuracy predictors: they rank a smooth function of the encoding, mask irrelevant genes, and configs build them."""
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ee_nas.genome import BranchLayer, ExitBranch, Genome
from ee_nas.search.predictors import Predictor, kendall_tau, make_predictor
from ee_nas import CONF_DIR

CONF = CONF_DIR


@pytest.fixture(scope="module")
def space(backbones, make_space):
    return make_space(backbones["mobilenetv3_small"], "aebnas")


@pytest.fixture(scope="module")
def data(space):
    """Encodings of random genomes and a smooth score of their always-relevant genes (normalized): stage
    depths, expand/kernel of each stage's first block, and which taps carry an exit."""
    rng = np.random.default_rng(0)
    X = np.array([space.encode(space.sample(rng)) for _ in range(160)])
    lo, hi = space.bounds()
    Z = (X - lo) / np.where(hi > lo, hi - lo, 1)
    n_st, n_b = len(space.stage_depths), space.n_blocks
    first = [b for b in range(n_b) if space.block_index[b] == 0]
    per_tap = 2 + 2 * space.max_layers
    cols = (list(range(n_st)) + [n_st + 2 * b + i for b in first for i in (0, 1)]
            + [n_st + 2 * n_b + t * per_tap for t in range(len(space.candidate_taps))])
    w = np.random.default_rng(1).normal(size=len(cols))
    y = np.tanh(Z[:, cols] @ w / np.sqrt(len(cols))) + 0.3 * np.sin(2 * Z[:, 0] + Z[:, 1])
    return X, y


@pytest.mark.parametrize("kind, kw", [("mlp", {}), ("rbf", {}), ("rbf", {"model": "kernel_ridge"}),
                                      ("trees", {}), ("trees", {"model": "random_forest", "n_estimators": 50}),
                                      ("trees", {"model": "gradient_boosting", "n_estimators": 100}),
                                      ("mlp", {"features": "onehot"})])
def test_predictors_rank_a_smooth_function(space, data, kind, kw):
    X, y = data
    predictor = make_predictor(kind, **kw).for_space(space)
    predictor.fit(X[:100], y[:100])
    tau = kendall_tau(y[100:], predictor.predict(X[100:]))
    assert tau > 0.5, f"{predictor}: tau {tau:.3f}"


def test_same_data_same_predictions(space, data):
    X, y = data  # the surrogate search's resume-by-replay relies on this
    for kind in ("mlp", "rbf", "trees"):
        a = make_predictor(kind).for_space(space).fit(X[:40], y[:40]).predict(X[40:60])
        b = make_predictor(kind).for_space(space).fit(X[:40], y[:40]).predict(X[40:60])
        assert np.array_equal(a, b), kind


def test_irrelevant_genes_are_masked(space):
    g = space.largest()
    tap = g.exits[0].tap
    with_exit = Genome(g.depths, g.expands, g.kernels, [ExitBranch(tap, (BranchLayer("conv3x3", 16),))])
    without = Genome(g.depths, g.expands, g.kernels, [])
    x_with, x_without = space.encode(with_exit), space.encode(without)
    for features in ("onehot", "normalized"):
        p = make_predictor("trees", features=features).for_space(space)
        f_with, f_without = p.transform(np.stack([x_with, x_without]))
        assert f_with.shape == f_without.shape and not np.array_equal(f_with, f_without)
        # an absent exit's genes are masked: changing them leaves the features as they were
        x_noise = x_without.copy()
        per_tap, start = 2 + 2 * space.max_layers, len(space.stage_depths) + 2 * space.n_blocks
        i = space.candidate_taps.index(tap)
        x_noise[start + i * per_tap + 1:start + (i + 1) * per_tap] = 1
        assert np.array_equal(p.transform(x_noise[None])[0], f_without)
    # so does a dropped block's expand/kernel: a shallower stage ignores the genes of the blocks it drops
    shallow = list(g.depths)
    stage = next(s for s, d in enumerate(shallow) if d > space.min_depth)
    shallow[stage] = space.min_depth
    a = space.encode(Genome(shallow, g.expands, g.kernels))
    b = a.copy()
    dropped = [b_ for b_ in range(space.n_blocks) if space.block_stage[b_] == stage
               and space.block_index[b_] >= space.min_depth]
    b[len(space.stage_depths) + 2 * dropped[0]] = 0
    p = make_predictor("rbf").for_space(space)
    assert np.array_equal(p.transform(a[None]), p.transform(b[None]))


def test_unbound_predictor_uses_the_data_range():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 5, size=(80, 6))
    y = X[:, 0] - 0.5 * X[:, 1] + 0.1 * X[:, 2]
    p = make_predictor("rbf").fit(X[:50], y[:50])
    assert kendall_tau(y[50:], p.predict(X[50:])) > 0.7
    with pytest.raises(RuntimeError, match="not fitted"):
        make_predictor("mlp").predict(X)


def test_factory_and_tau_edges():
    assert make_predictor("none") is None
    assert isinstance(make_predictor("trees"), Predictor)
    with pytest.raises(ValueError, match="predictor.kind"):
        make_predictor("xgboost")
    with pytest.raises(ValueError, match="predictor.model"):
        make_predictor("trees", model="svm")
    with pytest.raises(ValueError, match="predictor.features"):
        make_predictor("mlp", features="binary")
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and np.isnan(kendall_tau([1], [2]))
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "predictor").glob("*.yaml")))
def test_predictor_configs_instantiate(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"predictor={name}"])
    predictor = instantiate(cfg.predictor)
    assert (predictor is None) == (name == "none")
    if predictor is not None:
        X = np.random.default_rng(0).integers(0, 3, size=(12, 4))
        assert predictor.fit(X, X.sum(1)).predict(X).shape == (12,)
