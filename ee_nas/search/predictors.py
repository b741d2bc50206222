"""Accuracy predictors (surrogates) over genome encodings, for surrogate-assisted search.

A predictor maps a genome's integer encoding (``space.encode``) to a score
(validation accuracy after threshold tuning, or a MAC ratio). It turns the
encoding into features itself: ``onehot`` (one column per value of each gene,
genes with two values stay one 0/1 column) or ``normalized`` (each gene scaled
to [0, 1] by ``space.bounds()``). Models are scikit-learn regressors:

- ``mlp``: MLPRegressor on standardized targets;
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

import numpy as np
from scipy.stats import kendalltau
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor, RandomForestRegressor
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.kernel_ridge import KernelRidge
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

KINDS = ("none", "mlp", "rbf", "trees")
FEATURES = ("onehot", "normalized")


class Predictor:
    """A scikit-learn regressor over genome encodings; `fit(X, y)` / `predict(X)` take raw encodings."""

    def __init__(self, model, name: str, features: str = "onehot", bounds: tuple | None = None):
        if features not in FEATURES:
            raise ValueError(f"predictor.features={features!r}: valid are {list(FEATURES)}")
        self.model, self.name, self.features = model, name, features
        self.bounds = None if bounds is None else (np.asarray(bounds[0]), np.asarray(bounds[1]))
        self._fitted = None

    def __repr__(self) -> str:
        return f"Predictor({self.name}, features={self.features})"

    def for_space(self, space) -> "Predictor":
        """A fresh, unfitted copy whose features use the space's gene bounds."""
        return Predictor(clone(self.model), self.name, self.features, space.bounds())

    def clone(self) -> "Predictor":
        return Predictor(clone(self.model), self.name, self.features, self.bounds)

    def transform(self, X) -> np.ndarray:
        """Features of raw integer encodings [N, n_var]."""
        X = np.atleast_2d(np.asarray(X, dtype=float))
        lo, hi = self.bounds if self.bounds is not None else self._data_bounds
        span = np.where(hi > lo, hi - lo, 1.0)
        if self.features == "normalized":
            return np.clip((X - lo) / span, 0.0, 1.0)
        cols = []
        for j in range(X.shape[1]):
            n = int(hi[j] - lo[j]) + 1
            if n <= 2:  # constant or binary gene: one column
                cols.append(((X[:, j] - lo[j]) / span[j])[:, None])
            else:
                cols.append((np.rint(X[:, j] - lo[j])[:, None] == np.arange(n)[None, :]).astype(float))
        return np.hstack(cols)

    def fit(self, X, y) -> "Predictor":
        X, y = np.atleast_2d(np.asarray(X, dtype=float)), np.asarray(y, dtype=float).ravel()
        if len(X) != len(y) or len(y) < 2:
            raise ValueError(f"predictor needs >= 2 samples with one target each, got X {X.shape}, y {y.shape}")
        if self.bounds is None:  # no space given: the training data's range
            self._data_bounds = (X.min(0), X.max(0))
        self._fitted = clone(self.model).fit(self.transform(X), y)
        return self

    def predict(self, X) -> np.ndarray:
        if self._fitted is None:
            raise RuntimeError(f"{self!r} is not fitted")
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
        p = dict(hidden_layer_sizes=(64, 32), alpha=1e-3, learning_rate_init=3e-3, max_iter=3000,
                 tol=1e-6, n_iter_no_change=50) | params
        p["hidden_layer_sizes"] = tuple(p["hidden_layer_sizes"])
        reg = TransformedTargetRegressor(MLPRegressor(random_state=seed, **p), transformer=StandardScaler())
        return Predictor(reg, "mlp", features or "onehot")
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
        return Predictor(reg, f"rbf:{model}", features or "onehot")
    if kind == "trees":
        model = model or "extra_trees"
        classes = {"extra_trees": ExtraTreesRegressor, "random_forest": RandomForestRegressor,
                   "gradient_boosting": GradientBoostingRegressor}
        if model not in classes:
            raise ValueError(f"predictor.model={model!r} for kind trees: valid are {list(classes)}")
        defaults = {"gradient_boosting": dict(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8)}
        p = defaults.get(model, dict(n_estimators=200, min_samples_leaf=1, max_features=0.5, n_jobs=1)) | params
        return Predictor(classes[model](random_state=seed, **p), f"trees:{model}", features or "normalized")
    raise ValueError(f"predictor.kind={kind!r}: valid are {list(KINDS)}")


def kendall_tau(y_true, y_pred) -> float:
    """Kendall rank correlation (scipy, tau-b); nan when either side is constant or has < 2 points."""
    y_true, y_pred = np.asarray(y_true, float).ravel(), np.asarray(y_pred, float).ravel()
    if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return math.nan
    return float(kendalltau(y_true, y_pred).statistic)
