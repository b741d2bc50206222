"""Surrogate-assisted search (NSGANetV2 / MSUNAS style): few true supernet evaluations, many predicted ones.

Iteration 0 evaluates `pop_size` sampled genomes. Every later iteration

1. fits an accuracy predictor on the archive (true val_acc of every candidate
   evaluated in earlier iterations) and a second copy of it on the MAC ratio
   avg_macs / cum_macs[-1];
2. runs pymoo NSGA-II for `inner_generations` generations on the predicted
   objectives (error, avg_macs / reference), starting from the archive's best
   candidates, with the space's own sampling, crossover and mutation;
3. picks `n_per_iteration` candidates not in the archive from everything the
   inner search saw, by NSGA-II survival (predicted-feasible first, then
   non-dominated rank, then crowding distance), evaluates them with the true
   `evaluate`, and logs the predictor's Kendall tau on this new batch.

The true-evaluation budget is exactly pop_size + (n_iterations - 1) * n_per_iteration
calls of `evaluate` (a failed candidate counts; fewer only if the space runs out of new genomes).

Hardware caps (`caps`, ``SubnetEvaluator.caps``: params and peak memory, exact and cheap) are a
constraint of the inner search (their relative excess added to the predicted target violation),
and every pick, random fill included, fits them: no true evaluation is spent over a cap.

MAC objective of the inner search. `cost_fn(genome)` returns the genome's
per-exit cumulative MACs (exact and cheap: ``CostModel.costs(g).cum_macs``).
Threshold tuning (max accuracy s.t. avg_macs <= target) puts avg MACs in a
range known exactly from them: when cum_macs[0] > target not even "everyone
leaves at exit 1" fits, the tuner returns that policy (avg = cum_macs[0],
infeasible); otherwise avg lies in [cum_macs[0], min(cum_macs[-1], target)].
So feasibility is exact (cum_macs[0] <= target), and the second model only
predicts the position p in [0, 1] inside that range (clipped):
avg_macs = lo + p * (hi - lo). Without `cost_fn` the model learns
avg_macs / reference directly and feasibility is predicted from it.

Resume works like ``evolution.search``: iteration i fits on the records of
iterations < i only (in a fixed order, seeded models) and runs a seeded inner
search, so a rerun on a saved archive replays the same picks and finds their
evaluations in the archive (``evaluate_cached``) instead of paying again.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.operators.survival.rank_and_crowding import RankAndCrowding
from pymoo.optimize import minimize
from pymoo.problems.static import StaticProblem
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from ee_nas.search.archive import Archive, pareto_front
from ee_nas.search.evolution import (GenomeCrossover, GenomeDuplicates, GenomeMutation, _penalized_objectives,
                                     _violation, evaluate_generation, generation_stats)
from ee_nas.genome import Genome
from ee_nas.search.predictors import Predictor, kendall_tau

log = logging.getLogger(__name__)


class _PredictedProblem(Problem):
    """The inner problem: predicted (error, avg_macs / reference) and the target constraint; records what it saw."""

    def __init__(self, space, predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
        lo, hi = space.bounds()
        super().__init__(n_var=space.n_var, n_obj=2, n_ieq_constr=1, xl=lo, xu=hi, vtype=int)
        self.predict = predict
        self.seen: dict[bytes, tuple[np.ndarray, np.ndarray, float]] = {}

    def _evaluate(self, X, out, *args, **kwargs):
        X = np.asarray(X).astype(np.int64)
        F, G = self.predict(X)
        out["F"], out["G"] = F, G
        for x, f, g in zip(X, F, G):
            self.seen.setdefault(x.tobytes(), (x, f, float(g[0])))


def surrogate_search(space, evaluate: Callable, archive: Archive, predictor: Predictor, *, pop_size: int = 16,
                     n_iterations: int = 6, n_per_iteration: int = 8, seed: int = 0, reference_macs: float,
                     target: float | None, cost_fn: Callable[[Genome], Sequence[float]] | None = None,
                     inner_generations: int = 20, inner_pop_size: int | None = None, crossover_prob: float = 0.9,
                     mutation_prob: float = 0.1, min_train: int = 4,
                     on_generation: Callable[[int, dict], None] | None = None,
                     caps: Callable[[Genome], dict] | None = None,
                     evaluate_batch: Callable[[list[Genome]], list[dict]] | None = None) -> list[dict]:
    """Run the surrogate-assisted search; returns the feasible Pareto front (archive records), like `search`.

    `evaluate(genome) -> dict` (val_acc, avg_macs, feasible, ...) is the true, expensive evaluation;
    `evaluate_batch(genomes) -> records` scores an iteration's new picks together (see `search`).
    `on_generation(iteration, stats)` gets `generation_stats` plus `kendall_tau_acc` / `kendall_tau_macs`
    (predictions vs truth on this iteration's new batch; nan in iteration 0) and `n_train`.
    """
    if pop_size < 2 or n_iterations < 1 or n_per_iteration < 1 or inner_generations < 1:
        raise ValueError(f"surrogate search needs pop_size >= 2 ({pop_size}), n_iterations >= 1 ({n_iterations}), "
                         f"n_per_iteration >= 1 ({n_per_iteration}) and inner_generations >= 1 "
                         f"({inner_generations})")
    predictor = predictor.for_space(space)
    inner_pop = inner_pop_size or max(pop_size, 2 * n_per_iteration)
    cum_cache: dict[str, np.ndarray] = {}

    def cum_macs(genome: Genome) -> np.ndarray:
        key = genome.key()
        if key not in cum_cache:
            cum_cache[key] = np.asarray(cost_fn(genome), dtype=float)
        return cum_cache[key]

    caps_cache: dict[str, dict] = {}

    def checked(genome: Genome) -> dict:
        key = genome.key()
        if key not in caps_cache:
            caps_cache[key] = caps(genome) if caps is not None else {}
        return caps_cache[key]

    def cap_of(genome: Genome) -> float:
        return float(checked(genome).get("cap_violation", 0.0))

    def fits(genome: Genome) -> bool:
        return cap_of(genome) <= 0

    for it in range(n_iterations):
        known = sorted((r for r in archive.records.values() if r["generation"] < it),
                       key=lambda r: (r["generation"], r["key"]))
        train = [r for r in known if r["status"] == "ok"]
        rng = np.random.default_rng([seed, it])
        if it == 0:
            picks, predicted = _fill([], {r["key"] for r in known}, pop_size, space, rng, fits=fits), None
        elif len(train) < min_train:
            log.warning("surrogate iteration %d: %d successful evaluations, fewer than %d to fit on; "
                        "sampling at random", it, len(train), min_train)
            picks, predicted = _fill([], {r["key"] for r in known}, n_per_iteration, space, rng, fits=fits), None
        else:
            models = _fit(predictor, space, train, cum_macs if cost_fn else None, reference_macs, target)
            predict = _predictor_fn(space, models, cum_macs if cost_fn else None, reference_macs, target, cap_of)
            picks = _inner_search(space, predict, train, {r["key"] for r in known}, n_per_iteration, inner_pop,
                                  inner_generations, seed=int(rng.integers(2**31)), rng=rng,
                                  crossover_prob=crossover_prob, mutation_prob=mutation_prob,
                                  reference_macs=reference_macs, target=target, fits=fits)
            F, _ = predict(np.array([space.encode(g) for g in picks]))
            predicted = {"val_acc": 1.0 - F[:, 0], "avg_macs": F[:, 1] * reference_macs}
        records = []
        evaluated = evaluate_generation(picks, evaluate, archive, it, checked if caps is not None else None,
                                        evaluate_batch)
        for i, record in enumerate(evaluated):
            if predicted is not None:
                record.setdefault("predicted_val_acc", float(predicted["val_acc"][i]))
                record.setdefault("predicted_avg_macs", float(predicted["avg_macs"][i]))
            records.append(record)
        archive.save()
        stats = generation_stats(archive, it, reference_macs, target)
        stats.update(_batch_taus(records), n_train=len(train))
        log.info("surrogate iteration %d: %d evaluated, hypervolume %.4f, Kendall tau (new batch) acc %.3f "
                 "macs %.3f", it, stats["n_evaluated"], stats["hypervolume"], stats["kendall_tau_acc"],
                 stats["kendall_tau_macs"])
        if on_generation:
            on_generation(it, stats)
    return pareto_front(archive.evaluated(), reference_macs)


def _fill(picks: list[Genome], known: set[str], n: int, space, rng: np.random.Generator,
          max_tries: int = 50, fits: Callable[[Genome], bool] | None = None) -> list[Genome]:
    """Top `picks` up to n distinct genomes outside `known` with random samples that fit the caps
    (`fits`); fewer if the space runs out."""
    taken = known | {g.key() for g in picks}
    picks, misses = list(picks), 0
    while len(picks) < n and misses < max_tries * n:
        g = space.sample(rng)
        if g.key() in taken or (fits is not None and not fits(g)):
            misses += 1
            continue
        taken.add(g.key())
        picks.append(g)
    return picks


def _mac_range(cum: np.ndarray, target: float | None) -> tuple[float, float]:
    """[lo, hi] of the tuned avg MACs given the per-exit cum MACs (lo == hi when infeasible)."""
    lo = float(cum[0])
    hi = float(cum[-1]) if target is None else min(float(cum[-1]), float(target))
    return lo, max(lo, hi)


def _fit(predictor: Predictor, space, train: list[dict], cum_macs, reference_macs: float,
         target: float | None) -> tuple:
    X = np.array([space.encode(Genome.from_dict(r["genome"])) for r in train])
    acc = predictor.clone().fit(X, [r["val_acc"] for r in train])
    if cum_macs is None:
        return acc, predictor.clone().fit(X, [r.get("avg_cost", r["avg_macs"]) / reference_macs for r in train])
    rows, y = [], []
    for i, r in enumerate(train):
        lo, hi = _mac_range(cum_macs(Genome.from_dict(r["genome"])), target)
        if hi > lo:  # a range to place the tuned avg MACs in
            rows.append(i)
            # the tuned avg cost in the range's unit (`cost_fn`: MACs, or ms with a latency objective)
            y.append(float(np.clip((r.get("avg_cost", r["avg_macs"]) - lo) / (hi - lo), 0.0, 1.0)))
    if len(rows) < 2 or np.ptp(y) == 0:
        return acc, float(np.mean(y)) if y else 1.0  # a constant position
    return acc, predictor.clone().fit(X[rows], y)


def _predictor_fn(space, models, cum_macs, reference_macs: float, target: float | None,
                  cap_of: Callable[[Genome], float] | None = None):
    acc_model, macs_model = models

    def predict(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acc = np.clip(acc_model.predict(X), 0.0, 1.0)
        if cum_macs is not None:
            cums = [cum_macs(space.decode(x)) for x in X]
            lo, hi = np.array([_mac_range(c, target) for c in cums]).T
            pos = macs_model.predict(X) if isinstance(macs_model, Predictor) else np.full(len(X), macs_model)
            avg = lo + np.clip(pos, 0.0, 1.0) * (hi - lo)
            cv = np.array([c[0] for c in cums]) if target is not None else None
        else:
            avg = np.maximum(macs_model.predict(X), 0.0) * reference_macs
            cv = avg if target is not None else None
        G = (cv - target) / reference_macs if cv is not None else -np.ones(len(X))
        if cap_of is not None:  # exact: the caps' relative excess, summed with the target's
            cap = np.array([cap_of(space.decode(x)) for x in X])
            G = np.where(cap > 0, cap + np.maximum(G, 0.0), G)
        return np.stack([1.0 - acc, avg / reference_macs], 1), G[:, None]

    return predict


def _inner_search(space, predict, train: list[dict], known: set[str], n: int, pop_size: int, n_gen: int, *,
                  seed: int, rng: np.random.Generator, crossover_prob: float, mutation_prob: float,
                  reference_macs: float, target: float | None,
                  fits: Callable[[Genome], bool] | None = None) -> list[Genome]:
    """NSGA-II on predicted objectives, seeded with the archive's best; `n` new genomes by rank and crowding."""
    problem = _PredictedProblem(space, predict)
    X0 = _best_first(space, train, pop_size, reference_macs, target)
    seen, misses = {x.tobytes() for x in X0}, 0
    while len(X0) < pop_size:  # fill with fresh samples (duplicates only if the space is that small)
        x = space.encode(space.sample(rng))
        if x.tobytes() in seen and misses < 50 * pop_size:
            misses += 1
            continue
        seen.add(x.tobytes())
        X0 = np.vstack([X0, x[None]])
    algo = NSGA2(pop_size=pop_size, sampling=X0, crossover=GenomeCrossover(space, crossover_prob),
                 mutation=GenomeMutation(space, mutation_prob), eliminate_duplicates=GenomeDuplicates())
    minimize(problem, algo, ("n_gen", n_gen), seed=seed, verbose=False)
    pool = [(x, f, g) for x, f, g in problem.seen.values() if space.decode(x).key() not in known
            and (fits is None or fits(space.decode(x)))]
    # a decoded genome may repeat under two encodings (e.g. genes of an absent exit): keep the first
    unique: dict[str, tuple] = {}
    for x, f, g in pool:
        unique.setdefault(space.decode(x).key(), (x, f, g))
    pool = list(unique.values())
    if not pool:
        return _fill([], known, n, space, rng, fits=fits)
    pop = Population.new(X=np.array([p[0] for p in pool]))
    Evaluator().eval(StaticProblem(problem, F=np.array([p[1] for p in pool]),
                                   G=np.array([[p[2]] for p in pool])), pop)
    idx = RankAndCrowding().do(problem, pop, n_survive=min(n, len(pool)), random_state=rng, return_indices=True)
    return _fill([space.decode(pool[i][0]) for i in idx], known, n, space, rng, fits=fits)


def _best_first(space, records: list[dict], n: int, reference_macs: float, target: float | None) -> np.ndarray:
    """Encodings of up to n archive records, best first: feasible before infeasible, then by true front rank."""
    if not records:
        return np.empty((0, space.n_var), dtype=np.int64)
    F = np.array([_penalized_objectives(r, reference_macs) for r in records])
    cv = np.array([max(0.0, _violation(r, target, reference_macs)) for r in records])
    rank = np.empty(len(records), int)
    for k, front in enumerate(NonDominatedSorting().do(F)):
        rank[front] = k
    order = sorted(range(len(records)), key=lambda i: (cv[i], rank[i], F[i, 1]))[:n]
    return np.array([space.encode(Genome.from_dict(records[i]["genome"])) for i in order])


def _batch_taus(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok" and "predicted_val_acc" in r]
    if len(ok) < 2:
        return {"kendall_tau_acc": math.nan, "kendall_tau_macs": math.nan}
    return {"kendall_tau_acc": kendall_tau([r["val_acc"] for r in ok], [r["predicted_val_acc"] for r in ok]),
            "kendall_tau_macs": kendall_tau([r.get("avg_cost", r["avg_macs"]) for r in ok],
                                            [r["predicted_avg_macs"] for r in ok])}  # avg cost, as predicted

