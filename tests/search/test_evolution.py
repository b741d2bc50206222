"""NSGA-II / random search, archive and resume, with a cheap synthetic evaluator (no training, no ptflops)."""
import json
import math

import numpy as np
import pytest

import ee_nas.utils
from ee_nas.hardware.macs import avg_macs, cum_macs
from ee_nas.search import evolution
from ee_nas.search.archive import Archive, hypervolume, objectives, pareto_front
from ee_nas.search.evolution import choose, search
from ee_nas.genome import Genome

OP_COST = {"conv3x3": 9.0, "dwsep3x3": 2.0, "mbconv3": 4.0, "mbconv6": 7.0, "avgpool": 0.2, "maxpool": 0.2}
OP_SKILL = {"conv3x3": 1.0, "dwsep3x3": 0.7, "mbconv3": 0.8, "mbconv6": 1.0, "avgpool": 0.1, "maxpool": 0.15}


def _genome(record):
    return Genome.from_dict(record["genome"])


class SyntheticEvaluator:
    """Deterministic stand-in for SubnetEvaluator.score: bigger backbones are more accurate and cost more;
    early exits save MACs (more when placed early and when their branch is strong) but are less accurate."""

    def __init__(self, space, target=None, fail_tap=None):
        self.space, self.target, self.fail_tap = space, target, fail_tap
        self.calls = []
        self.reference = self.costs(space.largest_backbone())[0][-1]  # the largest backbone, no exits

    def block_cost(self, genome, b):
        return genome.expands[b] * genome.kernels[b] ** 2 * (1 + self.space.block_stage[b])

    def costs(self, genome):
        active = [b for b in range(self.space.n_blocks)
                  if self.space.block_index[b] < genome.depths[self.space.block_stage[b]]]
        exits = {e.tap: e for e in genome.exits}
        seg, head, current, quality = [], [], 10.0, []
        for i, b in enumerate(active):
            current += self.block_cost(genome, b)
            if b in exits:
                layers = exits[b].layers
                strength = min(1.0, sum(OP_SKILL[l.op] * (l.width or 16) / 32 for l in layers))
                seg.append(current); head.append(2.0 + sum(OP_COST[l.op] * (l.width or 4) / 8 for l in layers))
                quality.append(((i + 1) / len(active), strength))
                current = 0.0
        seg.append(current); head.append(5.0)
        return cum_macs(seg, head), quality

    def __call__(self, genome):
        self.calls.append(genome.key())
        if self.fail_tap is not None and self.fail_tap in genome.taps:
            raise RuntimeError(f"synthetic failure at tap {self.fail_tap}")
        cum, quality = self.costs(genome)
        capacity = cum[-1] / self.reference  # grows with depth, expand ratio and kernel (and branches)
        final_acc = 0.55 + 0.4 * min(1.0, capacity) ** 0.5
        rates, accs, left = [], [], 1.0
        for depth, strength in quality:
            take = left * 0.6 * depth * (0.3 + 0.7 * strength)
            rates.append(take); left -= take
            accs.append(final_acc * (0.55 + 0.3 * depth + 0.15 * strength))
        rates.append(left); accs.append(final_acc)
        macs = avg_macs(rates, cum)
        return {"val_acc": float(np.dot(rates, accs)), "avg_macs": macs,
                "feasible": self.target is None or macs <= self.target,
                "cum_macs": cum.tolist(), "exit_rates": rates}


@pytest.fixture(scope="module")
def space(backbones, make_space):
    return make_space(backbones["mobilenetv3_small"], "aebnas")


def run(space, evaluator, archive, **kw):
    kw = dict(pop_size=12, n_generations=6, seed=0, reference_macs=evaluator.reference,
              target=evaluator.target) | kw
    return search(space, evaluator, archive, **kw)


def test_nsga2_improves_hypervolume_and_caches(space, tmp_path):
    ev = SyntheticEvaluator(space)
    archive = Archive(tmp_path / "archive.json")
    stats = []
    front = run(space, ev, archive, n_generations=8, on_generation=lambda g, s: stats.append(s))
    records = list(archive.records.values())
    gen0 = [r for r in records if r["generation"] == 0]
    assert len(gen0) == 12
    hv0, hv = hypervolume(gen0, ev.reference), hypervolume(records, ev.reference)
    assert 0 < hv0 < hv <= 1
    assert [s["generation"] for s in stats] == list(range(8))
    assert stats[-1]["hypervolume"] == pytest.approx(hv) and stats[0]["hypervolume"] == pytest.approx(hv0)
    assert all(a["hypervolume"] <= b["hypervolume"] for a, b in zip(stats, stats[1:]))
    # every candidate evaluated once, and each is a valid genome of the space
    assert len(ev.calls) == len(set(ev.calls)) == len(archive) > 12
    assert all(space.problems(space.decode(space.encode(_genome(r)))) == [] for r in records)
    # the returned front is the non-dominated set of the archive, sorted by MACs
    assert front == pareto_front(archive.evaluated(), ev.reference)
    F = np.array([objectives(r, ev.reference) for r in front])
    assert np.all(np.diff(F[:, 1]) >= 0) and np.all(np.diff(F[:, 0]) <= 0)


def test_constraint_keeps_front_under_target(space, tmp_path):
    probe = SyntheticEvaluator(space)
    target = 0.5 * probe.reference
    ev = SyntheticEvaluator(space, target=target)
    archive = Archive(tmp_path / "archive.json")
    front = run(space, ev, archive, seed=1)
    assert front and all(r["avg_macs"] <= target and r["feasible"] for r in front)
    best = choose(front)
    assert best["feasible"] and best["avg_macs"] <= target
    assert best["val_acc"] == max(r["val_acc"] for r in front)
    over = [r for r in archive.evaluated() if r["avg_macs"] > target]
    assert over and not any(r["feasible"] for r in over)
    assert max(r["val_acc"] for r in over) > best["val_acc"]  # the constraint did cost accuracy
    assert choose([]) is None


def test_resume_replays_to_the_same_front(space, tmp_path):
    path = tmp_path / "resumed.json"
    first = SyntheticEvaluator(space)
    run(space, first, Archive(path), n_generations=2, seed=5)
    n_first = len(Archive(path))
    assert len(first.calls) == n_first > 0

    resumed_ev = SyntheticEvaluator(space)
    resumed_archive = Archive(path)
    resumed = run(space, resumed_ev, resumed_archive, n_generations=5, seed=5)

    full_ev = SyntheticEvaluator(space)
    full_archive = Archive(tmp_path / "full.json")
    full = run(space, full_ev, full_archive, n_generations=5, seed=5)

    assert [r["key"] for r in resumed] == [r["key"] for r in full]
    assert [objectives(r, full_ev.reference) for r in resumed] == [objectives(r, full_ev.reference) for r in full]
    assert set(resumed_archive.records) == set(full_archive.records)
    # the resumed run paid only for the candidates the first run had not evaluated
    assert not set(resumed_ev.calls) & set(first.calls)
    assert len(resumed_ev.calls) == len(full_ev.calls) - n_first > 0


def test_failed_candidate_is_recorded_and_search_finishes(space, tmp_path):
    ev = SyntheticEvaluator(space, fail_tap=1)
    archive = Archive(tmp_path / "archive.json")
    stats = []
    front = run(space, ev, archive, n_generations=4, on_generation=lambda g, s: stats.append(s))
    failed = [r for r in archive.records.values() if r["status"] == "failed"]
    assert failed and all("synthetic failure at tap 1" in r["error"] for r in failed)
    assert all(1 in _genome(r).taps for r in failed)
    assert front and all(r["status"] == "ok" and 1 not in _genome(r).taps for r in front)
    assert stats[-1]["n_failed"] == len(failed)
    for s in stats:  # per-generation counts
        assert s["n_failed"] == sum(r["generation"] <= s["generation"] for r in failed)
        assert s["n_evaluated"] == sum(r["generation"] <= s["generation"] for r in archive.records.values())
    assert len({s["n_failed"] for s in stats}) > 1
    # failures are saved too: rerunning on the saved archive retries nothing and replays the same stats
    rerun_ev, replayed = SyntheticEvaluator(space, fail_tap=1), []
    rerun = run(space, rerun_ev, Archive(archive.path), n_generations=4,
                on_generation=lambda g, s: replayed.append(s))
    assert rerun_ev.calls == [] and rerun == front
    assert replayed == stats


@pytest.mark.parametrize("name, distinct", [("aebnas", "most"), ("fixed", "one")])
def test_random_search_budget(backbones, make_space, tmp_path, monkeypatch, name, distinct):
    space = make_space(backbones["mobilenetv3_small"], name)
    ev = SyntheticEvaluator(space)
    candidates = []
    decode = space.decode

    def counting_decode(x):
        genome = decode(x)
        candidates.append(genome.key())
        return genome

    monkeypatch.setattr(space, "decode", counting_decode)
    archive = Archive(tmp_path / "archive.json")
    front = run(space, ev, archive, algorithm="random", pop_size=8, n_generations=3)
    assert len(candidates) == 8 * 3
    assert sorted(ev.calls) == sorted(set(candidates))  # each distinct candidate once, duplicates free
    assert len(ev.calls) == (len(set(candidates)) if distinct == "most" else 1)
    if distinct == "most":
        assert len(ev.calls) > 20
    assert front and front == pareto_front(archive.evaluated(), ev.reference)


def test_search_rejects_bad_settings(space, tmp_path):
    ev = SyntheticEvaluator(space)
    with pytest.raises(ValueError, match="search.algorithm"):
        run(space, ev, Archive(), algorithm="cmaes")
    with pytest.raises(ValueError, match="pop_size"):
        run(space, ev, Archive(), pop_size=1)


# -- archive ---------------------------------------------------------------------------------------

def test_archive_save_is_atomic_and_reloads(space, tmp_path, monkeypatch):
    path = tmp_path / "run" / "archive.json"
    archive = Archive(path)
    rng = np.random.default_rng(0)
    ev = SyntheticEvaluator(space)
    for gen in range(3):
        for _ in range(5):
            evolution.evaluate_cached(space.sample(rng), ev, archive, gen)
        archive.save()
        assert sorted(p.name for p in path.parent.iterdir()) == ["archive.json"]  # no temp file left
    reloaded = Archive(path)
    assert reloaded.records == json.loads(json.dumps(archive.records))
    assert list(reloaded.records) == list(archive.records)

    # a crash in the middle of a save leaves the previous file intact and no temp file
    before = path.read_text()
    evolution.evaluate_cached(space.sample(rng), ev, archive, 3)
    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(ee_nas.utils.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        archive.save()
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["archive.json"]


def test_hypervolume_by_hand():
    ref = 100.0
    rec = lambda acc, macs, ok=True, feasible=True: {"val_acc": acc, "avg_macs": macs,  # noqa: E731
                                                     "status": "ok" if ok else "failed", "feasible": feasible}
    # front points in (error, relative MACs): (0.2, 0.5) and (0.4, 0.2); dominated (0.5, 0.6)
    records = [rec(0.8, 50), rec(0.6, 20), rec(0.5, 60), rec(0.99, 1, feasible=False), rec(0.99, 1, ok=False)]
    # area dominated within the (1, 1) box: union of [0.2,1]x[0.5,1] and [0.4,1]x[0.2,1]
    expected = 0.8 * 0.5 + 0.6 * 0.3
    assert hypervolume(records, ref) == pytest.approx(expected)
    assert [r["avg_macs"] for r in pareto_front(records, ref)] == [20, 50]
    assert hypervolume([], ref) == 0.0
    assert math.isclose(hypervolume([rec(1.0, 100)], ref), 0.0, abs_tol=1e-12)


# -- hardware caps (max_params / max_memory_bytes) are constraints --------------------------------------

@pytest.fixture(scope="module")
def capped(backbones, space):
    """A params cap between the smallest and the largest candidate's (a quarter of random genomes fit),
    checked as the callback checks it: exact params from the CostModel, before any evaluation."""
    from ee_nas.hardware.macs import CostModel
    from ee_nas.hardware.profile import HardwareProfile
    from ee_nas.models.multi_exit import MultiExitSupernet

    model = CostModel(MultiExitSupernet(backbones["mobilenetv3_small"], space))
    params = lambda g: model.costs(g).params  # noqa: E731
    rng = np.random.default_rng(0)
    cap = int(np.percentile([params(space.sample(rng)) for _ in range(100)], 25))
    assert params(space.smallest()) < cap < params(space.largest())
    profile = HardwareProfile(max_params=cap)

    def caps(genome):
        p = params(genome)
        return {"params": p, "violations": profile.violations(params=p), "cap_violation": profile.cap_excess(params=p)}
    return cap, params, caps


def test_params_cap_steers_the_search_and_is_never_evaluated_or_chosen(space, capped):
    cap, params, caps = capped
    pop, gens = 12, 6
    over_per_gen = {}
    for constrained in (True, False):
        ev, archive, stats = SyntheticEvaluator(space), Archive(), []
        front = run(space, ev, archive, pop_size=pop, n_generations=gens, caps=caps if constrained else None,
                    on_generation=lambda g, s: stats.append(s))
        records = list(archive.records.values())
        over_per_gen[constrained] = [sum(params(_genome(r)) > cap for r in records if r["generation"] == g)
                                     for g in range(gens)]
        if constrained:
            assert not any(params(_genome(archive.get(key))) > cap for key in ev.calls)  # none is evaluated
            over = [r for r in records if r["status"] == "over_cap"]
            assert len(over) == sum(over_per_gen[True]) and all(r["cap_violation"] > 0 for r in over)
            assert [s["n_over_cap"] for s in stats] == list(np.cumsum(over_per_gen[True]))
            best = choose(front)
            assert front and best is not None and all(params(_genome(r)) <= cap for r in front)
            assert params(_genome(best)) <= cap
    # random samples are drawn within the cap (without it most are over) and, by the constraint, few
    # offspring after generation 0 are over it: far fewer than without the constraint
    assert over_per_gen[True][0] == 0 and over_per_gen[False][0] > pop // 2, over_per_gen
    after = sum(over_per_gen[True][1:])
    assert after <= (gens - 1) * pop // 4, over_per_gen
    assert 2 * after < sum(over_per_gen[False][1:]), over_per_gen


def test_violation_sums_target_and_cap_excess():
    ok = {"status": "ok", "avg_macs": 120.0, "cap_violation": 0.0}
    assert evolution._violation(ok, 100.0, 200.0) == pytest.approx(0.1)         # over the target only
    assert evolution._violation({**ok, "avg_macs": 80.0}, 100.0, 200.0) < 0     # feasible: slack
    assert evolution._violation({**ok, "cap_violation": 0.5}, 100.0, 200.0) == pytest.approx(0.6)
    assert evolution._violation({**ok, "avg_macs": 80.0, "cap_violation": 0.5}, 100.0, 200.0) == pytest.approx(0.5)
    assert evolution._violation({"status": "over_cap", "cap_violation": 0.3}, 100.0, 200.0) == pytest.approx(0.3)
    # a record scored without a caps check but with a broken cap still counts as infeasible
    assert evolution._violation({"status": "ok", "avg_macs": 80.0, "violations": ["params 9 > 8"]}, 100.0, 200.0) > 0
    assert choose([{**ok, "val_acc": 0.9, "violations": ["params 9 > 8"]}, {**ok, "val_acc": 0.5}])["val_acc"] == 0.5



def test_initial_population_seeds_the_largest_backbone_with_cheap_early_exits(space, capped):
    largest = space.largest_backbone()
    on_largest = lambda g: (g.depths, g.expands, g.kernels) == (largest.depths, largest.expands, largest.kernels)  # noqa: E731
    first = {}
    for n_largest in (0, 2):
        ev, archive = SyntheticEvaluator(space), Archive()
        run(space, ev, archive, n_generations=1, n_largest=n_largest)
        first[n_largest] = [_genome(r) for r in archive.records.values() if r["generation"] == 0]
    assert not any(map(on_largest, first[0]))  # uniform draws: never the largest backbone
    seeded = [g for g in first[2] if on_largest(g)]
    taps = space.active_taps(largest.depths)
    # the most exits, then one fewer, each at the earliest taps with the cheapest branch the space allows
    assert sorted(g.taps for g in seeded) == [tuple(taps[:space.max_exits - 1]), tuple(taps[:space.max_exits])]
    assert all(layer.op in ("avgpool", "maxpool") or layer.width == min(space.widths)
               for g in seeded for e in g.exits for layer in e.layers)
    assert len(first[2]) == len(first[0])  # the budget is unchanged
    # a seed over a hardware cap is left out: the population stays within the cap
    cap, params, caps = capped
    ev, archive = SyntheticEvaluator(space), Archive()
    run(space, ev, archive, n_generations=1, n_largest=2, caps=caps)
    assert all(params(_genome(r)) <= cap for r in archive.records.values())


def test_choose_within_noise_takes_the_largest_backbone_near_the_best():
    def rec(acc, backbone, cost=1.0, **kw):
        return {"status": "ok", "feasible": True, "cap_violation": 0.0, "val_acc": acc, "backbone_macs": backbone,
                "avg_macs": cost, **kw}

    n = 400  # one standard error at 98%: 0.70 pp
    records = [rec(0.980, 5.0), rec(0.9735, 9.0), rec(0.972, 20.0), rec(0.99, 30.0, feasible=False),
               rec(0.975, 40.0, violations=["params 9 > 8"]), rec(0.9735, 9.0, cost=0.5)]
    assert choose(records)["val_acc"] == 0.980  # best_val
    picked = choose(records, "within_noise", n_val=n)  # 97.35 is within 0.70 pp of 98.0, 97.2 is not
    assert picked["backbone_macs"] == 9.0 and picked["avg_macs"] == 0.5  # then fewer avg MACs
    assert choose(records, "within_noise", n_val=n, tolerance=2.0)["backbone_macs"] == 20.0
    assert choose(records, "within_noise", n_val=n, tolerance=0.0)["val_acc"] == 0.980
    assert choose([{**r, "n_val": n} for r in records], "within_noise")["backbone_macs"] == 9.0  # the records' n_val
    with pytest.raises(ValueError, match="n_val"):
        choose(records, "within_noise")
    with pytest.raises(ValueError, match="search.choose='best'"):
        choose(records, "best")
