"""Surrogate-assisted search with a cheap synthetic evaluator: budget, progress, constraint, resume."""
import math

import numpy as np
import pytest

from ee_nas.hardware.macs import cum_macs
from ee_nas.search.archive import Archive, hypervolume, pareto_front
from ee_nas.search.predictors import make_predictor
from ee_nas.search.surrogate import surrogate_search

SKILL = {"conv3x3": 1.0, "dwsep3x3": 0.7, "mbconv3": 0.8, "mbconv6": 1.0, "avgpool": 0.1, "maxpool": 0.15}


class ToyEvaluator:
    """Deterministic stand-in for SubnetEvaluator.score. Bigger backbones are more accurate and cost
    more; early exits (stronger with deeper/wider branches, placed later) take samples off at lower cost.
    Like threshold tuning under a target: infeasible iff cum_macs[0] > target, avg MACs then cum_macs[0]."""

    def __init__(self, space, target_fraction=None):
        self.space, self.calls = space, []
        self.reference = self.cum(space.largest_backbone())[-1]
        self.target = None if target_fraction is None else target_fraction * self.reference

    def cum(self, genome):
        s = self.space
        exits = {e.tap: e for e in genome.exits}
        seg, head, current = [], [], 10.0
        for b in range(s.n_blocks):
            if s.block_index[b] < genome.depths[s.block_stage[b]]:
                current += genome.expands[b] * genome.kernels[b] ** 2 * (1 + s.block_stage[b])
                if b in exits:
                    seg.append(current); current = 0.0
                    head.append(2.0 + sum(3.0 * (layer.width or 4) / 8 for layer in exits[b].layers))
        seg.append(current); head.append(5.0)
        return cum_macs(seg, head)

    def __call__(self, genome):
        self.calls.append(genome.key())
        cum = self.cum(genome)
        final = 0.55 + 0.4 * min(1.0, cum[-1] / self.reference) ** 0.5
        rates, accs, left = [], [], 1.0
        for k, e in enumerate(genome.exits):
            strength = min(1.0, sum(SKILL[layer.op] * (layer.width or 16) / 32 for layer in e.layers))
            depth = cum[k] / cum[-1]
            take = left * 0.7 * depth * (0.3 + 0.7 * strength)
            rates.append(take); left -= take
            accs.append(final * (0.6 + 0.25 * depth + 0.15 * strength))
        rates.append(left); accs.append(final)
        avg = float(np.dot(rates, cum))
        feasible = self.target is None or cum[0] <= self.target
        if self.target is not None:
            avg = float(cum[0]) if not feasible else min(avg, self.target)
        return {"val_acc": float(np.dot(rates, accs)), "avg_macs": avg, "feasible": feasible,
                "cum_macs": cum.tolist()}


@pytest.fixture(scope="module")
def space(backbones, make_space):
    return make_space(backbones["mobilenetv3_small"], "aebnas")


def run(space, ev, archive, kind="rbf", **kw):
    kw = dict(pop_size=8, n_iterations=4, n_per_iteration=4, seed=0, reference_macs=ev.reference,
              target=ev.target, cost_fn=ev.cum, inner_generations=6, inner_pop_size=16) | kw
    predictor = make_predictor(kind, **({"n_estimators": 30} if kind == "trees" else {}))
    return surrogate_search(space, ev, archive, predictor, **kw)


@pytest.mark.parametrize("kind", ["rbf", "trees", "mlp"])
def test_budget_progress_and_tau(space, tmp_path, kind):
    ev = ToyEvaluator(space, target_fraction=0.6)
    archive = Archive(tmp_path / "archive.json")
    stats = []
    front = run(space, ev, archive, kind, on_generation=lambda it, s: stats.append(s))
    # exactly the true-evaluation budget, each candidate once, and every one saved
    assert len(ev.calls) == len(set(ev.calls)) == 8 + 3 * 4 == len(Archive(archive.path))
    per_gen = [sum(r["generation"] == g for r in archive.records.values()) for g in range(4)]
    assert per_gen == [8, 4, 4, 4]
    assert [s["n_evaluated"] for s in stats] == [8, 12, 16, 20]
    # Kendall tau of the predictor on each new batch (none before the first fit)
    assert math.isnan(stats[0]["kendall_tau_acc"])
    taus = [s["kendall_tau_acc"] for s in stats[1:]]
    assert all(-1 <= t <= 1 for t in taus if not math.isnan(t)) and any(not math.isnan(t) for t in taus)
    assert all("predicted_val_acc" in r for r in archive.records.values() if r["generation"] > 0)
    # better than the first batch; the front is the archive's, under the target
    gen0 = [r for r in archive.records.values() if r["generation"] == 0]
    assert hypervolume(archive.evaluated(), ev.reference) > hypervolume(gen0, ev.reference) > 0
    assert front == pareto_front(archive.evaluated(), ev.reference)
    assert front and all(r["feasible"] and r["avg_macs"] <= ev.target for r in front)
    # the picks were predicted feasible, and feasibility is exact (cum_macs[0] <= target)
    picked = [r for r in archive.records.values() if r["generation"] > 0]
    assert all(r["feasible"] for r in picked)


def test_resume_replays_and_pays_only_for_new_candidates(space, tmp_path):
    path = tmp_path / "resumed.json"
    first = ToyEvaluator(space, 0.6)
    run(space, first, Archive(path), n_iterations=2, seed=3)
    assert len(first.calls) == 12

    resumed_ev, resumed_stats = ToyEvaluator(space, 0.6), []
    resumed = run(space, resumed_ev, Archive(path), n_iterations=4, seed=3,
                  on_generation=lambda it, s: resumed_stats.append(s))
    full_ev, full_stats = ToyEvaluator(space, 0.6), []
    full_archive = Archive(tmp_path / "full.json")
    full = run(space, full_ev, full_archive, n_iterations=4, seed=3,
               on_generation=lambda it, s: full_stats.append(s))

    assert not set(resumed_ev.calls) & set(first.calls)
    assert len(resumed_ev.calls) == len(full_ev.calls) - 12 == 8
    assert set(Archive(path).records) == set(full_archive.records)
    assert [r["key"] for r in resumed] == [r["key"] for r in full]
    assert [s["hypervolume"] for s in resumed_stats] == [s["hypervolume"] for s in full_stats]


def test_without_cost_fn_and_without_target(space):
    ev = ToyEvaluator(space)  # no target: every candidate feasible, MACs predicted directly
    archive = Archive()
    front = run(space, ev, archive, cost_fn=None, n_iterations=3)
    assert len(ev.calls) == 16 and front


class FlakyEvaluator(ToyEvaluator):
    def __call__(self, genome):
        if len(self.calls) % 5 == 4:
            self.calls.append(genome.key())
            raise RuntimeError("synthetic failure")
        return super().__call__(genome)


def test_failed_candidates_count_and_rejects_bad_settings(space):
    ev = FlakyEvaluator(space, 0.6)
    archive = Archive()
    run(space, ev, archive)
    failed = [r for r in archive.records.values() if r["status"] == "failed"]
    assert len(failed) == 4 and len(archive) == len(ev.calls) == 20  # a failure is a paid evaluation
    with pytest.raises(ValueError, match="n_per_iteration"):
        run(space, ev, Archive(), n_per_iteration=0)


def test_params_cap_is_a_constraint_and_no_pick_breaks_it(space, backbones):
    """With a params cap between the smallest and the largest candidate's, every true evaluation
    (random iteration 0 included) is of a genome under the cap, and the front stays under it."""
    from ee_nas.genome import Genome
    from ee_nas.hardware.macs import CostModel
    from ee_nas.hardware.profile import HardwareProfile
    from ee_nas.models.multi_exit import MultiExitSupernet

    model = CostModel(MultiExitSupernet(backbones["mobilenetv3_small"], space))
    rng = np.random.default_rng(0)
    cap = int(np.percentile([model.costs(space.sample(rng)).params for _ in range(100)], 25))
    assert model.costs(space.smallest()).params < cap < model.costs(space.largest()).params
    profile = HardwareProfile(max_params=cap)
    checked = []

    def caps(genome):
        p = model.costs(genome).params
        checked.append(p)
        return {"params": p, "violations": profile.violations(params=p), "cap_violation": profile.cap_excess(params=p)}

    ev = ToyEvaluator(space, target_fraction=0.6)
    archive = Archive()
    front = run(space, ev, archive, caps=caps)
    params = {r["key"]: model.costs(Genome.from_dict(r["genome"])).params for r in archive.records.values()}
    assert max(checked) > cap  # the inner search did meet over-cap genomes ...
    assert len(ev.calls) == 8 + 3 * 4 and all(params[k] <= cap for k in ev.calls)  # ... and evaluated none
    assert all(r["status"] == "ok" for r in archive.records.values())
    assert front and all(params[r["key"]] <= cap for r in front)


def test_position_model_fits_the_objectives_unit(space):
    """With a latency objective `cost_fn` gives ms and the records' `avg_cost` is in ms (avg_macs stays
    in MACs): the position inside [cum[0], min(cum[-1], target)] must come from avg_cost."""
    from ee_nas.genome import Genome
    from ee_nas.search.surrogate import _fit, _mac_range

    ev = ToyEvaluator(space)
    ms = lambda g: ev.cum(g) / 1000.0  # noqa: E731  a 'latency' table: 1 ms per 1000 MACs
    target = 0.6 * ev.reference / 1000.0
    rng = np.random.default_rng(3)
    train = []
    for g in (space.sample(rng) for _ in range(12)):
        lo, hi = _mac_range(ms(g), target)
        cost = lo + 0.3 * (hi - lo)
        train.append({"genome": g.to_dict(), "val_acc": 0.5, "avg_cost": cost, "avg_macs": cost * 1000.0})
    assert sum(np.subtract(*_mac_range(ms(Genome.from_dict(r["genome"])), target)[::-1]) > 0 for r in train) >= 2
    _, position = _fit(make_predictor("rbf"), space, train, ms, ev.reference / 1000.0, target)
    X = np.array([space.encode(Genome.from_dict(r["genome"])) for r in train])
    predicted = position.predict(X) if hasattr(position, "predict") else np.full(len(X), position)
    np.testing.assert_allclose(predicted, 0.3, atol=0.02)  # every record sits at 30% of its range
