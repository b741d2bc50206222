import itertools
import logging

import numpy as np
import pytest

from ee_nas.thresholds import (evaluate_policy, exit_indices, oracle_policy, tune_thresholds,
                               tune_thresholds_from_logits)


def synthetic(n, k, seed):
    """Later exits are more often right; confidence correlates with correctness.
    Confidences are rounded so that ties occur (checks the >= rule)."""
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.3, 0.9, k)
    ease = rng.random(n)[:, None]
    conf = np.clip(skill * (0.5 + ease) + rng.normal(0, 0.15, (n, k)), 0, 1).round(2)
    correct = rng.random((n, k)) < conf
    cum_macs = np.cumsum(rng.uniform(1, 3, k))
    return conf, correct, cum_macs


def brute_force(conf, correct, cum_macs, target=None, lam=None):
    """Best policy over every combination of observed confidences (+inf) per exit."""
    n, k = conf.shape
    cands = [np.append(np.unique(conf[:, j]), np.inf) for j in range(k - 1)]
    combos = list(itertools.product(*cands))
    grid = np.array(combos, dtype=float).reshape(len(combos), k - 1)
    accept = np.concatenate([conf[None, :, :-1] >= grid[:, None, :], np.ones((len(grid), n, 1), bool)], axis=2)
    e = accept.argmax(axis=2)
    acc = correct[np.arange(n), e].mean(axis=1)
    macs = cum_macs[e].mean(axis=1)
    if lam is not None:
        return (acc - lam * macs / cum_macs[-1]).max()
    ok = macs <= target * (1 + 1e-9) if target is not None else np.ones(len(grid), bool)
    return acc[ok].max()


def test_exit_rule_by_hand():
    conf = np.array([[0.9, 0.2, 0.1], [0.5, 0.8, 0.3], [0.1, 0.1, 0.0], [0.6, 0.1, 0.0]])
    t = np.array([0.6, 0.7, 0.99])  # last threshold is ignored: the last exit always accepts
    assert exit_indices(conf, t).tolist() == [0, 1, 2, 0]
    assert exit_indices(conf, [np.inf, np.inf, np.inf]).tolist() == [2, 2, 2, 2]


def test_evaluate_policy_by_hand():
    conf = np.array([[0.9, 0.2, 0.1], [0.5, 0.8, 0.3], [0.1, 0.1, 0.0], [0.6, 0.1, 0.0]])
    correct = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 1]], bool)
    cum = np.array([1.0, 3.0, 6.0])
    p = evaluate_policy(conf, correct, cum, [0.6, 0.7, 0.5], target=2.5)
    assert p.accuracy == pytest.approx(0.5)  # right, wrong, right, wrong
    assert p.exit_rates.tolist() == [0.5, 0.25, 0.25]
    assert p.avg_macs == pytest.approx(0.5 * 1 + 0.25 * 3 + 0.25 * 6)
    assert p.exit_accs[0] == 0.5 and p.exit_accs[1] == 0.0 and p.exit_accs[2] == 1.0
    assert not p.feasible and p.thresholds[-1] == 0.0
    q = evaluate_policy(conf, correct, cum, [0.0, np.inf, 0.0])
    assert q.avg_macs == cum[0] and q.feasible  # everyone leaves at exit 1
    assert np.isnan(q.exit_accs[1]) and q.to_dict()["exit_accs"][1] is None


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuner_matches_exhaustive_search(k, seed):
    conf, correct, cum = synthetic(120, k, seed)
    targets = [None] + list(cum[0] + np.array([0.0, 0.15, 0.4, 0.7, 1.0]) * (cum[-1] - cum[0]))
    for target in targets:
        p = tune_thresholds(conf, correct, cum, target)
        assert p.accuracy >= brute_force(conf, correct, cum, target) - 0.005
        assert p.feasible
        if target is not None:
            assert p.avg_macs <= target * (1 + 1e-9)
        again = evaluate_policy(conf, correct, cum, p.thresholds, target)
        assert again.accuracy == p.accuracy and again.avg_macs == p.avg_macs


def costliest_at_best_accuracy(conf, correct, cum_macs, target):
    """Exhaustively, for two exits: the most avg MACs of any policy with the best accuracy under the target."""
    n = len(conf)
    e = np.where(conf[None, :, 0] >= np.append(np.unique(conf[:, 0]), np.inf)[:, None], 0, 1)
    acc, macs = correct[np.arange(n), e].mean(axis=1), cum_macs[e].mean(axis=1)
    ok = macs <= target * (1 + 1e-9)
    return acc[ok].max(), macs[ok & (acc == acc[ok].max())].max()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spending_ties_keeps_the_best_accuracy_and_spends_the_budget(seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(1, 11, (120, 2)) / 10
    # the first exit is right from confidence 0.5 on, the final one everywhere but on some of the most
    # confident: the best policies leave there, and anywhere from 0.5 up accuracy has a plateau (as on a
    # small val set of an easy dataset)
    correct = np.stack([conf[:, 0] >= 0.5, (conf[:, 0] < 1) | (rng.random(120) < 0.7)], 1)
    cum = np.array([1.0, 3.0])
    spent = []
    for target in cum[0] + np.array([0.2, 0.5, 0.8]) * (cum[-1] - cum[0]):
        cheap = tune_thresholds(conf, correct, cum, target)
        spend = tune_thresholds(conf, correct, cum, target, ties="spend")
        best_acc, most_macs = costliest_at_best_accuracy(conf, correct, cum, target)
        assert spend.accuracy == pytest.approx(best_acc) == pytest.approx(cheap.accuracy)
        assert spend.avg_macs == pytest.approx(most_macs) and spend.feasible
        spent.append(spend.avg_macs - cheap.avg_macs)
    assert min(spent) >= 0 and max(spent) > 0.1  # ties were there, and spending took the costlier side
    for k in (3, 4):  # more exits: the same accuracy, never cheaper
        conf, correct, cum = synthetic(150, k, seed)
        target = cum[0] + 0.4 * (cum[-1] - cum[0])
        cheap, spend = (tune_thresholds(conf, correct, cum, target, ties=t) for t in ("cheap", "spend"))
        assert spend.accuracy == pytest.approx(cheap.accuracy) and cheap.avg_macs <= spend.avg_macs <= target
    # no target, no budget to spend: ties go to the cheaper policy either way
    assert tune_thresholds(conf, correct, cum, None, ties="spend").avg_macs == tune_thresholds(conf, correct, cum,
                                                                                                None).avg_macs
    with pytest.raises(ValueError, match="ties='most'"):
        tune_thresholds(conf, correct, cum, target, ties="most")


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 3.0])
def test_lagrangian_matches_exhaustive_search(lam):
    conf, correct, cum = synthetic(100, 3, 7)
    p = tune_thresholds(conf, correct, cum, None, lam=lam)
    assert p.accuracy - lam * p.avg_macs / cum[-1] >= brute_force(conf, correct, cum, lam=lam) - 1e-9


def test_unconstrained_is_max_accuracy_then_cheaper():
    conf, correct, cum = synthetic(150, 3, 3)
    p = tune_thresholds(conf, correct, cum, None)
    assert p.accuracy == pytest.approx(brute_force(conf, correct, cum))
    assert tune_thresholds(conf, correct, cum, p.avg_macs).accuracy == pytest.approx(p.accuracy)


def test_infeasible_target_returns_cheapest(caplog):
    conf, correct, cum = synthetic(80, 3, 4)
    with caplog.at_level(logging.WARNING):
        p = tune_thresholds(conf, correct, cum, cum[0] * 0.5)
    assert not p.feasible
    assert p.exit_rates.tolist() == [1.0, 0.0, 0.0] and p.avg_macs == cum[0]
    assert "target" in caplog.text


def test_oracle_bounds_every_tuned_policy():
    conf, correct, cum = synthetic(300, 4, 5)
    o = oracle_policy(correct, cum)
    assert o["accuracy"] == correct.any(axis=1).mean()
    for target in np.linspace(cum[0], cum[-1], 6):
        assert tune_thresholds(conf, correct, cum, target).accuracy <= o["accuracy"]


def test_from_logits_and_quantile_candidates():
    rng = np.random.default_rng(0)
    n, k, c = 2000, 4, 10
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, k, c))
    x[np.arange(n), :, y] += np.linspace(0.5, 3, k)
    cum = np.array([1.0, 2.0, 3.0, 4.0])
    p = tune_thresholds_from_logits(x, y, cum, 2.5, measure="entropy", max_candidates=32)
    assert p.feasible and p.avg_macs <= 2.5 * (1 + 1e-9)
    assert p.exit_rates.sum() == pytest.approx(1.0)
    assert p.accuracy >= (x[:, 0].argmax(-1) == y).mean()  # never worse than the cheapest policy
    d = p.to_dict()
    assert len(d["thresholds"]) == k and d["thresholds"][-1] == 0.0


def test_cross_fitted_accuracy_does_not_reward_thresholds_that_fit_noise():
    """Exit 0 is right half the time whatever its confidence: thresholds tuned on the same samples find
    confidence bands where it happened to be right; tuned on the other fold, that luck does not carry over.
    With one exit there is nothing to tune and both scores are the same."""
    from ee_nas.thresholds import cross_fitted_accuracy

    rng = np.random.default_rng(0)
    n = 400
    conf = np.column_stack([rng.random(n), np.ones(n)])
    correct = np.column_stack([rng.random(n) < 0.5, rng.random(n) < 0.5])
    cum = np.array([1.0, 2.0])
    in_sample = tune_thresholds(conf, correct, cum, None).accuracy
    crossed = cross_fitted_accuracy(conf, correct, cum, None, folds=2)
    assert in_sample - crossed > 0.03
    # the same number by hand: tune on the odd samples, score the even ones, and the other way round
    even, odd = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    by_hand = sum(evaluate_policy(conf[a], correct[a], cum, tune_thresholds(conf[b], correct[b], cum, None).thresholds)
                  .accuracy * a.sum() for a, b in ((even, odd), (odd, even))) / n
    assert crossed == pytest.approx(by_hand)
    one = correct[:, :1]
    assert cross_fitted_accuracy(conf[:, :1], one, cum[:1], None) == pytest.approx(one.mean())
