"""Exact, vectorized per-exit threshold tuning on cached validation outputs.

Rule (DESIGN.md): a sample leaves at the first exit k with conf_k >= t_k; the
last exit always accepts. avg_macs = sum_k frac_k * cum_macs[k].

Search space: per exit, the observed confidences (or max_candidates quantiles
of them) plus +inf; every policy on the data equals one of these combinations.

Search: block coordinate ascent. With all other thresholds fixed, every
candidate of one exit is scored at once (samples reaching it are fixed; those
with conf >= t leave there, the rest go where the later exits send them): a
bincount over candidate ranks and a cumulative sum. Two exits at once are
scored exactly the same way with a 2-D histogram (O(N + m^2) for all m^2
pairs); these pair moves escape the local optima of one-exit moves under a MAC
cap and make K <= 3 exact. To meet a target, the Lagrangian acc - lam * macs /
cum_macs[-1] is bisected over lam; its best fitting solution and the cheapest
policy seed a constrained ascent (max accuracy s.t. avg_macs <= target).

Ties: many policies reach the same val accuracy (359 digits images leave wide
plateaus). `ties="cheap"` takes the cheapest of them: the lowest thresholds val
allows, which fit its noise and lose accuracy on new images (measured on
digits: -0.2 pp test). `ties="spend"` takes the costliest under the target:
the most conservative thresholds the budget pays for. Without a target there
is no budget to spend, and ties go to the cheaper policy either way.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from .confidence import as_numpy, confidence

log = logging.getLogger(__name__)

_RTOL = 1e-9  # relative slack on the MAC target, absorbs float summation error
TIES = ("cheap", "spend")
_BISECT_STEPS = 12  # log-scale halvings of lam; more changed nothing on synthetic K=5 problems


@dataclass(frozen=True)
class ExitPolicy:
    """Thresholds plus their measured outcome. thresholds[-1] is 0.0 (ignored);
    +inf means "never leave at this exit"."""

    thresholds: np.ndarray
    accuracy: float
    avg_macs: float
    exit_rates: np.ndarray
    exit_accs: np.ndarray
    feasible: bool

    def to_dict(self) -> dict:
        """Plain JSON-able dict; nan and inf become None (a None threshold = exit disabled)."""

        def clean(a):
            return [float(v) if np.isfinite(v) else None for v in np.asarray(a, dtype=float)]

        return {
            "thresholds": clean(self.thresholds),
            "accuracy": float(self.accuracy),
            "avg_macs": float(self.avg_macs),
            "exit_rates": clean(self.exit_rates),
            "exit_accs": clean(self.exit_accs),
            "feasible": bool(self.feasible),
        }


def _within(macs: float, target: float | None) -> bool:
    return target is None or macs <= target + _RTOL * abs(target)


def exit_indices(conf, thresholds) -> np.ndarray:
    """Index of the exit each sample leaves at: first k with conf[:, k] >= t_k."""
    conf = as_numpy(conf, np.float64)
    t = as_numpy(thresholds, np.float64)
    accept = conf >= t[None, :]
    accept[:, -1] = True
    return accept.argmax(axis=1)


def evaluate_policy(conf, correct, cum_macs, thresholds, target=None) -> ExitPolicy:
    """Accuracy, avg MACs, per-exit exit rates and accuracies of fixed thresholds."""
    correct = as_numpy(correct, bool)
    cum_macs = as_numpy(cum_macs, np.float64)
    n, k = correct.shape
    t = as_numpy(thresholds, np.float64).copy()
    t[-1] = 0.0
    e = exit_indices(conf, t)
    ok = correct[np.arange(n), e]
    counts = np.bincount(e, minlength=k)
    hits = np.bincount(e, weights=ok, minlength=k)
    rates = counts / n
    with np.errstate(invalid="ignore", divide="ignore"):
        accs = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    avg = float((rates * cum_macs).sum())
    return ExitPolicy(t, float(ok.mean()), avg, rates, accs, _within(avg, target))


def _candidates(col: np.ndarray, max_candidates: int) -> np.ndarray:
    """Observed confidences (or evenly spaced order statistics of them) plus +inf."""
    u = np.unique(col)
    if len(u) > max_candidates:
        u = u[np.unique(np.linspace(0, len(u) - 1, max_candidates).round().astype(int))]
    return np.append(u, np.inf)


class _Problem:
    """Cached candidates and per-sample candidate ranks; scores one or two exits exactly.

    rank[n, j] = number of candidates <= conf[n, j], so sample n leaves at j under
    candidate p iff rank > p: sums over "rank > p" for all p are total minus the
    cumulative sum of a bincount (for two exits, of a 2-D histogram).
    """

    def __init__(self, conf, correct, cum_macs, max_candidates, spend: bool = False):
        self.correct, self.cm = correct.astype(np.int64), cum_macs
        self.sign = 1.0 if spend else -1.0  # ties in accuracy: more MACs (spend) or fewer
        self.n, self.k = correct.shape
        self.rows = np.arange(self.n)
        self.norm = cum_macs[-1] if cum_macs[-1] > 0 else 1.0
        self.cands = [_candidates(conf[:, j], max_candidates) for j in range(self.k - 1)]
        # [N, K], the last exit's 1 (it always accepts). A rank is at most N (the candidates are at most N
        # confidences and +inf), so a limit of N never accepts.
        self.rank = np.stack([np.searchsorted(c, conf[:, j], side="right") for j, c in enumerate(self.cands)]
                             + [np.ones(self.n, np.int64)], axis=1)

    def _thr(self, idx):
        return np.array([self.cands[j][i] for j, i in enumerate(idx)] + [-np.inf])

    def _fallback(self, idx, off):
        """Exit of each sample when exits in `off` never accept, and its (correct, MACs)."""
        limit = np.append(np.asarray(idx, np.int64), 0)
        limit[off] = self.n
        e = (self.rank > limit).argmax(axis=1)  # the same as comparing confidences with thresholds, faster
        return e, self.correct[self.rows, e], self.cm[e]

    def outcome(self, idx):
        """(correct count, total MACs) of the policy given candidate indices."""
        _, za, zm = self._fallback(idx, [])
        return int(za.sum()), float(zm.sum())

    def coordinate(self, idx, j):
        """Correct counts and total MACs for every candidate of exit j, others fixed."""
        e, za, zm = self._fallback(idx, [j])
        m = len(self.cands[j])
        out = []
        for z, v in ((za, self.correct[:, j]), (zm, self.cm[j])):
            g = np.where(e > j, v - z, 0)  # reached j and did not leave: gain of leaving there
            out.append(z.sum() + g.sum() - np.cumsum(np.bincount(self.rank[:, j], g, m)))
        return np.rint(out[0]).astype(np.int64), out[1]

    def pair(self, idx, i, j):
        """Correct counts and MACs [m_i, m_j] for every candidate pair of exits i < j.

        total(p, q) = sum_{a > p} g_i + sum_{a <= p, b > q} g_j
                    = G_i - C_i[p] + C_j[p] - C2[p, q]   (C: cumulative sums over ranks)."""
        e, za, zm = self._fallback(idx, [i, j])
        mi, mj = len(self.cands[i]), len(self.cands[j])
        a, b = self.rank[:, i], self.rank[:, j]
        out = []
        for z, vi, vj in ((za, self.correct[:, i], self.correct[:, j]), (zm, self.cm[i], self.cm[j])):
            gi = np.where(e > i, vi - z, 0)  # reached i: gain of leaving there
            gj = np.where(e > j, vj - z, 0)  # would pass i..j: gain of leaving at j
            ci = np.cumsum(np.bincount(a, gi - gj, mi))
            c2 = np.bincount(a * mj + b, gj, mi * mj).reshape(mi, mj).cumsum(0).cumsum(1)
            out.append((z.sum() + gi.sum() - ci)[:, None] - c2)
        return np.rint(out[0]).astype(np.int64), out[1]

    def _key(self, acc, mac, lam):
        """Lexicographic score: Lagrangian (rounded), then correct count, then fewer (or, spending, more) MACs."""
        return (round(acc - lam * mac / self.norm, 9), acc, self.sign * mac)

    def _pick(self, a, m, lam, cap):
        """Flat index of the best entry under the cap (None if none fits) and its key."""
        a, m = a.ravel(), m.ravel()
        ok = m <= cap
        if not ok.any():
            return None, None
        score = np.where(ok, np.round(a - lam * m / self.norm, 9) if lam else a, -np.inf)  # lam 0: the counts
        top = score == score.max()
        top &= a == a[top].max()
        b = int(np.flatnonzero(top)[np.argmax(self.sign * m[top])])
        return b, self._key(int(a[b]), float(m[b]), lam)

    def ascend(self, idx, lam, cap, pairs=False, max_sweeps=100):
        """Block coordinate ascent on _key under macs <= cap; `idx` must fit the cap.

        Single exits first; with `pairs`, a converged point is improved by exact
        joint moves of two exits, which escapes the typical local optimum under a
        MAC cap (raise one threshold while lowering another). Moves only on
        strict improvement, so it terminates."""
        idx = list(idx)
        cur = self._key(*self.outcome(idx), lam)
        for _ in range(max_sweeps):
            moved = False
            for j in range(self.k - 1):
                b, key = self._pick(*self.coordinate(idx, j), lam, cap)
                if b is not None and key > cur:
                    idx[j], cur, moved = b, key, True
            if not moved and pairs:
                for i, j in itertools.combinations(range(self.k - 1), 2):
                    b, key = self._pick(*self.pair(idx, i, j), lam, cap)
                    if b is not None and key > cur:
                        (idx[i], idx[j]), cur, moved = divmod(b, len(self.cands[j])), key, True
            if not moved:
                break
        return idx, int(cur[1]), float(self.sign * cur[2])


def tune_thresholds(conf, correct, cum_macs, target: float | None, *, lam: float | None = None,
                    max_candidates: int = 256, warn: bool = True, ties: str = "cheap") -> ExitPolicy:
    """Maximize accuracy s.t. avg_macs <= target (None: no constraint, ties -> fewer MACs); under a
    target, `ties="spend"` breaks ties in accuracy towards the costlier policy (module docstring).

    With `lam`, maximize acc - lam * avg_macs / cum_macs[-1] instead (target, if
    given, stays a hard cap). If even "everyone leaves at exit 1" misses the
    target, that cheapest policy is returned with feasible=False and (with `warn`) a warning; the search
    passes warn=False, since an infeasible candidate is routine there and its constraint says so.
    """
    conf = as_numpy(conf, np.float64)
    correct = as_numpy(correct, bool)
    cum_macs = as_numpy(cum_macs, np.float64)
    if conf.ndim != 2 or conf.shape != correct.shape or cum_macs.shape != (conf.shape[1],):
        raise ValueError(f"shape mismatch: conf {conf.shape}, correct {correct.shape}, cum_macs {cum_macs.shape}")
    if not np.isfinite(conf).all():
        raise ValueError(f"{int((~np.isfinite(conf)).sum())} confidences are NaN/inf: the network's outputs "
                         "diverged (check its training); thresholds cannot be tuned on them")
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is invalid; valid: {', '.join(TIES)}")
    n, k = conf.shape
    pb = _Problem(conf, correct, cum_macs, max_candidates, spend=ties == "spend" and target is not None)
    cheap = [0] * (k - 1)  # lowest observed confidence: everyone leaves at exit 1
    never = [len(c) - 1 for c in pb.cands]  # +inf: everyone runs the full network
    cap = np.inf if target is None else (target + _RTOL * abs(target)) * n

    def finish(idx):
        return evaluate_policy(conf, correct, cum_macs, pb._thr(idx), target)

    if k == 1 or not _within(cum_macs[0], target):
        if warn and not _within(cum_macs[0], target):
            log.warning("no thresholds meet the cost target %.4g (cheapest policy: %.4g); returning it, infeasible",
                        target, cum_macs[0])
        return finish(cheap)

    seeds = [s for s in (cheap, never) if pb.outcome(s)[1] <= cap]
    if lam is not None:
        rs = [pb.ascend(s, lam, cap, pairs=True) for s in seeds]
        return finish(max(rs, key=lambda r: pb._key(r[1], r[2], lam))[0])

    if target is not None:
        # Bisection on lam (log scale) for the smallest lam whose Lagrangian optimum
        # fits; the best fitting solution seen seeds the constrained ascent below.
        # Above hi, one sample moved to a later exit costs more than it can gain.
        pool = [pb.ascend(s, 0.0, np.inf) for s in (cheap, never)]
        gaps = np.diff(cum_macs)
        lo, hi = 1e-6, 2.0 * pb.norm / (gaps[gaps > 0].min() if (gaps > 0).any() else pb.norm)
        prev = []
        for _ in range(_BISECT_STEPS):
            mid = np.sqrt(lo * hi)
            rs = [pb.ascend(s, mid, np.inf) for s in [cheap, never] + prev]
            pool += rs
            hi, lo = (mid, lo) if any(r[2] <= cap for r in rs) else (hi, mid)
            prev = [max(rs, key=lambda r: pb._key(r[1], r[2], mid))[0]]  # warm start for next lam
        fits = [r for r in pool if r[2] <= cap]
        seeds.append(max(fits, key=lambda r: pb._key(r[1], r[2], 0.0))[0])
    pool = [pb.ascend(s, 0.0, cap, pairs=True) for s in seeds]
    return finish(max(pool, key=lambda r: pb._key(r[1], r[2], 0.0))[0])


def cross_fitted_accuracy(conf, correct, cum_macs, target: float | None, folds: int = 2,
                          max_candidates: int = 256) -> float:
    """Accuracy of thresholds tuned on the other folds, each sample scored once (fold = index mod `folds`).

    Thresholds tuned and scored on the same images flatter a network by what they fit of the noise,
    the more exits the more (measured on digits: 99.2% val became 97.8% test), so a search that ranks
    candidates that way prefers lucky early-exit networks; a one-exit network scores the same either way.
    """
    correct = as_numpy(correct, bool)
    n, k = correct.shape
    if k == 1:  # no threshold to tune
        return float(correct[:, 0].mean())
    if folds <= 1:
        return float(tune_thresholds(conf, correct, cum_macs, target, max_candidates=max_candidates,
                                     warn=False).accuracy)
    conf = as_numpy(conf, np.float64)
    fold = np.arange(n) % folds
    hits = 0.0
    for f in range(folds):
        held = fold == f
        policy = tune_thresholds(conf[~held], correct[~held], cum_macs, target, max_candidates=max_candidates,
                                 warn=False)
        hits += evaluate_policy(conf[held], correct[held], cum_macs, policy.thresholds).accuracy * held.sum()
    return float(hits / n)


def tune_thresholds_from_logits(logits, labels, cum_macs, target, measure: str = "max_softmax", **kw) -> ExitPolicy:
    """Convenience: confidences and per-exit correctness from logits [N,K,C], labels [N]."""
    x = as_numpy(logits)
    y = as_numpy(labels).astype(np.int64)
    correct = x.argmax(axis=-1) == y[:, None]
    return tune_thresholds(confidence(x, measure), correct, cum_macs, target, **kw)
