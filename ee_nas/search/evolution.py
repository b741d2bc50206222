"""NSGA-II (pymoo) and random search over genomes, with an archive that makes them resumable.

pymoo sees each genome through the space's integer encoding; sampling,
crossover and mutation are the space's own (so every offspring is repaired
into a valid genome). The loop uses pymoo's ask/tell interface so that each
generation can be logged and checkpointed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import ElementwiseDuplicateElimination
from pymoo.core.evaluator import Evaluator
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.problems.static import StaticProblem
from tqdm.auto import tqdm

from ee_nas.search.archive import Archive, hypervolume, objectives, pareto_front

log = logging.getLogger(__name__)


class GenomeSampling(Sampling):
    """The initial population: `n_largest` seeds on the largest backbone with cheap early exits (the most,
    then one fewer, ...: `SearchSpace.largest_with_cheap_exits`), those within the caps; the rest drawn
    uniformly, within the caps. Uniform draws almost never hit the largest backbone, the best-trained
    subnet, and mid-sized ones with exits can rarely beat it (digits: experiments/RESULTS.md)."""

    def __init__(self, space, caps: Callable | None = None, n_largest: int = 0):
        super().__init__()
        self.space, self.caps, self.n_largest = space, caps, n_largest

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        s = self.space
        seeds = {g.key(): g for g in (s.largest_with_cheap_exits(max(s.min_exits, s.max_exits - i))
                                      for i in range(min(self.n_largest, n_samples))) if _fits(g, self.caps)}
        genomes = list(seeds.values())
        genomes += [sample_within_caps(s, random_state, self.caps) for _ in range(n_samples - len(genomes))]
        return np.array([s.encode(g) for g in genomes])


def _fits(genome, caps: Callable | None) -> bool:
    return caps is None or caps(genome).get("cap_violation", 0.0) <= 0


def sample_within_caps(space, rng, caps: Callable | None = None, max_tries: int = 50):
    """A random genome that fits the hardware caps (checked with `caps`, cheap); the last try if none fits."""
    for _ in range(max_tries):
        genome = space.sample(rng)
        if _fits(genome, caps):
            break
    return genome


class GenomeCrossover(Crossover):
    def __init__(self, space, prob: float = 0.9):
        super().__init__(n_parents=2, n_offsprings=2, prob=prob)
        self.space = space

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        _, n_matings, n_var = X.shape
        Y = np.empty((2, n_matings, n_var), dtype=X.dtype)
        for m in range(n_matings):
            a, b = self.space.decode(X[0, m]), self.space.decode(X[1, m])
            Y[0, m] = self.space.encode(self.space.crossover(a, b, random_state))
            Y[1, m] = self.space.encode(self.space.crossover(b, a, random_state))
        return Y


class GenomeMutation(Mutation):
    def __init__(self, space, gene_prob: float = 0.1):
        super().__init__()
        self.space, self.gene_prob = space, gene_prob

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        return np.array([self.space.encode(self.space.mutate(self.space.decode(x), random_state, self.gene_prob))
                         for x in X])


class GenomeDuplicates(ElementwiseDuplicateElimination):
    def is_equal(self, a, b):
        return np.array_equal(a.X, b.X)


def search(space, evaluate: Callable, archive: Archive, *, algorithm: str = "nsga2", pop_size: int = 16,
           n_generations: int = 8, seed: int = 0, reference_macs: float, target: float | None,
           crossover_prob: float = 0.9, mutation_prob: float = 0.1, n_largest: int = 0,
           on_generation: Callable[[int, dict], None] | None = None,
           caps: Callable | None = None, evaluate_batch: Callable[[list], list[dict]] | None = None) -> list[dict]:
    """Run the search; returns the feasible Pareto front (archive records).

    `evaluate(genome) -> dict` must return at least val_acc, avg_macs, feasible; an
    exception marks the candidate failed (kept in the archive, never selected).
    `caps(genome) -> dict` (``SubnetEvaluator.caps``: params, memory, `cap_violation`) checks the
    hardware caps before `evaluate`: random samples are drawn within the caps, an offspring over a
    cap is recorded as ``over_cap`` without being evaluated, and its relative excess is its
    constraint violation (summed with the target's).
    `n_largest` of NSGA-II's initial genomes are the largest backbone with cheap early exits (GenomeSampling).
    `evaluate_batch(genomes) -> records` scores each generation's new genomes together (default:
    `evaluate_one` in a loop); under DDP the callback passes one that splits them across ranks.
    """
    if pop_size < 2 or n_generations < 1:
        raise ValueError(f"search.pop_size={pop_size} must be >= 2 and search.n_generations={n_generations} >= 1")
    lo, hi = space.bounds()
    problem = Problem(n_var=space.n_var, n_obj=2, n_ieq_constr=1, xl=lo, xu=hi, vtype=int)
    rng = np.random.default_rng(seed)
    if algorithm == "nsga2":
        algo = NSGA2(pop_size=pop_size, sampling=GenomeSampling(space, caps, n_largest),
                     crossover=GenomeCrossover(space, crossover_prob), mutation=GenomeMutation(space, mutation_prob),
                     eliminate_duplicates=GenomeDuplicates())
        algo.setup(problem, termination=("n_gen", n_generations), seed=seed, verbose=False)
    elif algorithm != "random":
        raise ValueError(f"search.algorithm={algorithm!r}: valid are 'nsga2' and 'random'")
    progress = tqdm(total=pop_size * n_generations, desc=f"search ({algorithm})", unit="cand", leave=False)
    for gen in range(n_generations):
        if algorithm == "nsga2":
            pop = algo.ask()
            X = pop.get("X")
        else:
            X = np.array([space.encode(sample_within_caps(space, rng, caps)) for _ in range(pop_size)])
        records = evaluate_generation([space.decode(x) for x in X], evaluate, archive, gen, caps, evaluate_batch)
        F = [_penalized_objectives(record, reference_macs) for record in records]
        G = [[_violation(record, target, reference_macs)] for record in records]
        progress.update(len(records))
        if algorithm == "nsga2":
            Evaluator().eval(StaticProblem(problem, F=np.array(F), G=np.array(G)), pop)
            algo.tell(infills=pop)
        archive.save()
        if on_generation:
            on_generation(gen, generation_stats(archive, gen, reference_macs, target))
    progress.close()
    return pareto_front(archive.evaluated(), reference_macs)


def evaluate_generation(genomes: list, evaluate: Callable, archive: Archive, gen: int, caps: Callable | None = None,
                        evaluate_batch: Callable[[list], list[dict]] | None = None) -> list[dict]:
    """The archive records of `genomes`, in order: the ones not in the archive yet are scored in one
    `evaluate_batch(new_genomes) -> records` call (each record as `evaluate_one` makes it), then added."""
    if evaluate_batch is not None:
        new = list({g.key(): g for g in genomes if archive.get(g.key()) is None}.values())
        if new:
            records = evaluate_batch(new)
            if len(records) != len(new):
                raise RuntimeError(f"evaluate_batch returned {len(records)} records for {len(new)} genomes")
            for genome, record in zip(new, records):
                archive.add({**record, "key": genome.key(), "genome": genome.to_dict(), "generation": gen})
    return [evaluate_cached(g, evaluate, archive, gen, caps) for g in genomes]


def evaluate_cached(genome, evaluate, archive: Archive, gen: int, caps: Callable | None = None) -> dict:
    """The archive's record of `genome`, evaluated now if new; over a hardware cap (`caps`): not evaluated."""
    key = genome.key()
    record = archive.get(key)
    if record is not None:
        return record
    record = evaluate_one(genome, evaluate, caps)
    record.update(key=key, genome=genome.to_dict(), generation=gen)
    archive.add(record)
    return record


def evaluate_one(genome, evaluate: Callable, caps: Callable | None = None) -> dict:
    """One candidate's record (status ok / over_cap / failed), without archive bookkeeping: a failed
    evaluation is recorded, never raised, so one bad candidate does not stop the search (or one rank)."""
    checked = caps(genome) if caps is not None else {}
    try:
        if checked.get("cap_violation", 0.0) > 0:
            record = {**checked, "status": "over_cap"}  # cannot be chosen: spare the accuracy evaluation
        else:
            record = {**checked, **evaluate(genome), "status": "ok"}
    except Exception as err:  # a failed candidate is recorded and the search goes on
        log.warning("candidate evaluation failed (%s): %s", type(err).__name__, err)
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    return record


def _penalized_objectives(record: dict, reference_macs: float) -> list[float]:
    if record["status"] != "ok":
        return [1.0, 10.0]
    return list(objectives(record, reference_macs))


def cap_violation(record: dict) -> float:
    """Summed relative excess over the hardware caps (0 when it fits); a record scored without
    `caps` but with broken caps (`violations`) counts 1."""
    return float(record.get("cap_violation", 1.0 if record.get("violations") else 0.0))


def _violation(record: dict, target: float | None, reference_macs: float) -> float:
    """The constraint violation, <= 0 when the candidate meets the target and every cap: the excess
    over the target (relative to the reference cost) plus the caps' relative excesses (summed, each
    normalized by its cap). Failed candidates are always infeasible."""
    if record["status"] == "over_cap":
        return cap_violation(record)
    if record["status"] != "ok":
        return 10.0
    slack = -1.0 if target is None else (record.get("avg_cost", record["avg_macs"]) - target) / reference_macs
    caps = cap_violation(record)
    return caps + max(slack, 0.0) if caps > 0 else slack


def generation_stats(archive: Archive, gen: int, reference_macs: float, target: float | None) -> dict:
    records = archive.evaluated()
    feasible = [r for r in records if r["feasible"]]
    upto = [r for r in records if r["generation"] <= gen]
    return {
        "generation": gen,
        "n_evaluated": len([r for r in archive.records.values() if r["generation"] <= gen]),
        "n_failed": len([r for r in archive.records.values() if r["status"] == "failed" and r["generation"] <= gen]),
        "n_over_cap": len([r for r in archive.records.values() if r["status"] == "over_cap"
                           and r["generation"] <= gen]),
        "hypervolume": hypervolume(upto, reference_macs),
        "best_acc_under_target": max((r["val_acc"] for r in feasible if r["generation"] <= gen), default=float("nan")),
        "front_size": len(pareto_front(upto, reference_macs)),
    }


CHOOSE_RULES = ("best_val", "within_noise")


def choose(records: list[dict], rule: str = "best_val", n_val: int | None = None,
           tolerance: float = 1.0) -> dict | None:
    """The network a search hands on, among `records` that meet the target; never one over a hardware cap.

    `best_val`: the best validation accuracy; ties go to fewer avg MACs.
    `within_noise`: of those within `tolerance` binomial standard errors (over `n_val` val images) of the best
    val accuracy, the one with the largest own backbone (then the best val accuracy, then fewer avg MACs);
    `n_val` defaults to the records' own (`SubnetEvaluator.score` writes it).
    The best of ~100 scores on a few hundred images is partly luck (the winner's curse), and within that noise
    a larger backbone has the better-trained final exit; on digits, though, within_noise measured 0.11 pp
    below best_val (experiments/RESULTS.md, "Ablation"), so best_val is the default."""
    if rule not in CHOOSE_RULES:
        raise ValueError(f"search.choose={rule!r} is invalid; valid: {', '.join(CHOOSE_RULES)}")
    fits = [r for r in records if r.get("status", "ok") == "ok" and r.get("feasible", True)
            and not r.get("violations") and cap_violation(r) == 0]
    if not fits:
        return None
    cost = lambda r: -r.get("avg_cost", r["avg_macs"])  # noqa: E731
    if rule == "within_noise":
        n_val = n_val or fits[0].get("n_val")
        if not n_val:
            raise ValueError("search.choose=within_noise needs the number of val images (n_val)")
        best = max(r["val_acc"] for r in fits)
        band = best - tolerance * math.sqrt(best * (1 - best) / n_val) - 1e-12
        return max((r for r in fits if r["val_acc"] >= band), key=lambda r: (r["backbone_macs"], r["val_acc"], cost(r)))
    return max(fits, key=lambda r: (r["val_acc"], cost(r)))
