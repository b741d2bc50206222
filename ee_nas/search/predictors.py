"""Accuracy predictors (surrogates) over genome encodings, for surrogate-assisted search.

A predictor maps a genome's integer encoding (``space.encode``) to a score
(validation accuracy after threshold tuning, or a MAC ratio). It turns the
encoding into features itself: ``onehot`` (one column per value of each gene,
genes with two values stay one 0/1 column) or ``normalized`` (each gene scaled
to [0, 1] by ``space.bounds()``). Models are scikit-learn regressors:

- ``mlp``: MLPRegressor (L-BFGS: the training sets are tens of genomes) on standardized targets;
- ``rbf``: Gaussian process with a constant * RBF + white-noise kernel (hyper-
  parameters fitted by marginal likelihood), or ``kernel_ridge`` with an RBF kernel;
- ``trees``: ExtraTrees, RandomForest or GradientBoosting.

Every model gets a fixed ``random_state``: the same training data gives the
same predictions, which the search's resume-by-replay relies on.

    predictor = make_predictor("trees").for_space(space)
    predictor.fit(X, y)                 # X = [space.encode(g) for g in genomes]
    predictor.predict(X_new)
    kendall_tau(y_true, predictor.predict(X_true))
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import kendalltau
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor, RandomForestRegressor
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.kernel_ridge import KernelRidge
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ee_nas.genome import POOL_OPS

KINDS = ("none", "mlp", "rbf", "trees")
FEATURES = ("onehot", "normalized")


class Predictor:
    """A scikit-learn regressor over genome encodings; `fit(X, y)` / `predict(X)` take raw encodings.

    Bound to a space (`for_space`), genes that do not matter for the genome are
    masked out of the features: the expand/kernel genes of blocks the depths
    drop, and the branch genes of absent exits and layers (and the width of a
    pooling layer). A masked gene gets all-zero one-hot columns, or 0 in
    `normalized` mode where present genes map to (1..n) / n; so "no exit" is
    never confused with "an exit with the first op". Unbound, every gene is used.
    """

    def __init__(self, model, name: str, features: str = "onehot", bounds: tuple | None = None,
                 layout: dict | None = None):
        if features not in FEATURES:
            raise ValueError(f"predictor.features={features!r}: valid are {list(FEATURES)}")
        self.model, self.name, self.features, self.layout = model, name, features, layout
        self.bounds = None if bounds is None else (np.asarray(bounds[0]), np.asarray(bounds[1]))
        self._fitted = None

    def __repr__(self) -> str:
        return f"Predictor({self.name}, features={self.features})"

    def for_space(self, space) -> "Predictor":
        """A fresh, unfitted copy whose features use the space's gene bounds and structure."""
        layout = dict(n_stages=len(space.stage_depths), block_stage=list(space.block_stage),
                      block_index=list(space.block_index), n_taps=len(space.candidate_taps),
                      max_layers=space.max_layers, pool_ops=[i for i, op in enumerate(space.ops) if op in POOL_OPS])
        return Predictor(clone(self.model), self.name, self.features, space.bounds(), layout)

    def clone(self) -> "Predictor":
        return Predictor(clone(self.model), self.name, self.features, self.bounds, self.layout)

    def relevant(self, X: np.ndarray) -> np.ndarray:
        """[N, n_var] bool: which genes of each encoding matter (all, without a layout)."""
        mask = np.ones(X.shape, dtype=bool)
        if self.layout is None:
            return mask
        L = self.layout
        ns, stage, index = L["n_stages"], np.array(L["block_stage"]), np.array(L["block_index"])
        nb = len(stage)
        active = index[None, :] < X[:, :ns][:, stage]                # [N, blocks]
        mask[:, ns:ns + 2 * nb] = np.repeat(active, 2, axis=1)
        per_tap = 2 + 2 * L["max_layers"]
        for t in range(L["n_taps"]):
            g = X[:, ns + 2 * nb + t * per_tap: ns + 2 * nb + (t + 1) * per_tap]
            m = mask[:, ns + 2 * nb + t * per_tap: ns + 2 * nb + (t + 1) * per_tap]  # a view
            present = g[:, 0] > 0
            m[:, 1] = present
            for i in range(L["max_layers"]):
                layer = present & (g[:, 1] > i)
                m[:, 2 + 2 * i] = layer
                m[:, 3 + 2 * i] = layer & ~np.isin(g[:, 2 + 2 * i], L["pool_ops"])
        return mask

    def transform(self, X) -> np.ndarray:
        """Features of raw integer encodings [N, n_var]."""
        X = np.rint(np.atleast_2d(np.asarray(X, dtype=float))).astype(np.int64)
        lo, hi = self.bounds if self.bounds is not None else self._data_bounds
        mask = self.relevant(X)
        n_values = (hi - lo + 1).astype(np.int64)
        if self.features == "normalized":  # present: (1..n)/n, masked: 0
            return np.where(mask, (np.clip(X - lo, 0, n_values - 1) + 1) / n_values, 0.0)
        cols = []
        for j in range(X.shape[1]):
            n = int(n_values[j])
            if n == 1:
                cols.append(mask[:, j:j + 1].astype(float))
            else:
                cols.append(((X[:, j:j + 1] - lo[j]) == np.arange(n)[None, :]) & mask[:, j:j + 1])
        return np.hstack(cols).astype(float)

    def fit(self, X, y) -> "Predictor":
        X, y = np.atleast_2d(np.asarray(X, dtype=float)), np.asarray(y, dtype=float).ravel()
        if len(X) != len(y) or len(y) < 2:
            raise ValueError(f"predictor needs >= 2 samples with one target each, got X {X.shape}, y {y.shape}")
        if self.bounds is None:  # no space given: the training data's range
            self._data_bounds = (X.min(0), X.max(0))
        with threadpool_limits(1), warnings.catch_warnings():  # tiny matrices: BLAS threads only contend
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._fitted = clone(self.model).fit(self.transform(X), y)
        return self

    def predict(self, X) -> np.ndarray:
        if self._fitted is None:
            raise RuntimeError(f"{self!r} is not fitted")
        with threadpool_limits(1):
            return np.asarray(self._fitted.predict(self.transform(X)), dtype=float).ravel()


def make_predictor(kind: str = "trees", features: str | None = None, model: str | None = None,
                   seed: int = 0, **params) -> Predictor | None:
    """The predictor of a config group option (conf/predictor/*.yaml); `none` gives None (plain NSGA-II).

    kind=mlp: params go to MLPRegressor (hidden_layer_sizes, alpha, max_iter, ...).
    kind=rbf: model=gp (default) or kernel_ridge; params: length_scale, noise (gp), alpha, gamma (ridge).
    kind=trees: model=extra_trees (default), random_forest or gradient_boosting; params to the regressor.
    """
    if kind in (None, "none"):
        return None
    if kind == "mlp":
        p = dict(hidden_layer_sizes=(64, 32), alpha=1e-3, solver="lbfgs", max_iter=500, tol=1e-6) | params
        p["hidden_layer_sizes"] = tuple(p["hidden_layer_sizes"])
        reg = TransformedTargetRegressor(MLPRegressor(random_state=seed, **p), transformer=StandardScaler())
        return Predictor(reg, "mlp", features or "normalized")
    if kind == "rbf":
        model = model or "gp"
        if model == "gp":
            length, noise = float(params.pop("length_scale", 3.0)), float(params.pop("noise", 1e-2))
            kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(length, (1e-2, 1e3)) + WhiteKernel(noise, (1e-6, 1.0))
            reg = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed,
                                           **params)
        elif model == "kernel_ridge":
            reg = TransformedTargetRegressor(KernelRidge(**(dict(kernel="rbf", alpha=1e-2, gamma=0.05) | params)),
                                             transformer=StandardScaler())
        else:
            raise ValueError(f"predictor.model={model!r} for kind rbf: valid are 'gp', 'kernel_ridge'")
        return Predictor(reg, f"rbf:{model}", features or "normalized")
    if kind == "trees":
        model = model or "extra_trees"
        classes = {"extra_trees": ExtraTreesRegressor, "random_forest": RandomForestRegressor,
                   "gradient_boosting": GradientBoostingRegressor}
        if model not in classes:
            raise ValueError(f"predictor.model={model!r} for kind trees: valid are {list(classes)}")
        defaults = {"gradient_boosting": dict(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8)}
        p = defaults.get(model, dict(n_estimators=100, max_features=0.5, n_jobs=1)) | params
        return Predictor(classes[model](random_state=seed, **p), f"trees:{model}", features or "normalized")
    raise ValueError(f"predictor.kind={kind!r}: valid are {list(KINDS)}")


def kendall_tau(y_true, y_pred) -> float:
    """Kendall rank correlation (scipy, tau-b); nan when either side is constant or has < 2 points."""
    y_true, y_pred = np.asarray(y_true, float).ravel(), np.asarray(y_pred, float).ravel()
    if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return math.nan
    return float(kendalltau(y_true, y_pred).statistic)
