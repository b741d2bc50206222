"""EvolutionaryNASCallback: after the supernet is fitted, search it (no per-candidate training).

Writes into the run directory: `archive.json` (every candidate, after each
generation), `search_progress.csv`, `pareto_front.json`, `pareto.png` and the
chosen architecture as `arch.yaml`; rerunning in the same directory resumes.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch

from ee_nas import distributed
from ee_nas.hardware.latency import LatencyTable
from ee_nas.search.archive import Archive, hypervolume, pareto_front
from ee_nas.search.evaluator import SubnetEvaluator
from ee_nas.search.evolution import cap_violation, choose, evaluate_generation, evaluate_one, search
from ee_nas.genome import Genome
from ee_nas.search.report import write_front
from ee_nas.utils import atomic_write

log = logging.getLogger(__name__)


class EvolutionaryNASCallback(L.Callback):
    def __init__(self, run_dir: str, hardware, algorithm: str = "nsga2", pop_size: int = 16,
                 n_generations: int = 8, seed: int = 0, crossover_prob: float = 0.9, mutation_prob: float = 0.1,
                 measure: str = "max_softmax", max_candidates: int = 256, calibration_samples: int = 512,
                 device: str = "cpu", predictor=None, n_per_iteration: int = 8, score_folds: int = 1,
                 n_largest: int = 0, choose: str = "best_val", choose_tolerance: float = 1.0):
        self.run_dir, self.hardware = Path(run_dir), hardware
        # a Predictor (conf/predictor/): surrogate-assisted search, n_per_iteration true evaluations per generation
        self.predictor = None if predictor in (None, "none") else predictor
        self.n_per_iteration = n_per_iteration
        self.algorithm, self.pop_size, self.n_generations, self.seed = algorithm, pop_size, n_generations, seed
        self.crossover_prob, self.mutation_prob = crossover_prob, mutation_prob
        self.n_largest = n_largest  # NSGA-II: initial genomes on the largest backbone
        self.choose, self.choose_tolerance = choose, choose_tolerance  # the rule that picks the network
        self.measure, self.max_candidates, self.score_folds = measure, max_candidates, score_folds
        self.calibration_samples, self.device = calibration_samples, device
        self.result: dict | None = None
        self.latency = None  # the latency table, when the hardware profile has one

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        """Every rank searches (DDP): each scores its share of every generation and the scores are
        gathered, so all ranks hold the same archive and result; rank 0 alone writes files."""
        started = time.perf_counter()
        writer = trainer.global_rank == 0
        supernet = pl_module.supernet
        self.latency = self._latency_table(supernet, writer)
        device = self.device  # under DDP each rank evaluates on its own GPU
        if distributed.world_size() > 1 and torch.device(device).type == trainer.strategy.root_device.type:
            device = trainer.strategy.root_device
        evaluator = SubnetEvaluator(supernet, trainer.datamodule, measure=self.measure,
                                    calibration_samples=self.calibration_samples, device=device,
                                    max_candidates=self.max_candidates, hardware=self.hardware,
                                    latency=self.latency, score_folds=self.score_folds)
        ref = evaluator.reference_cost  # in the objective's unit (MACs, or ms)
        target = self.hardware.target(ref)
        space = supernet.space
        archive_path = self.run_dir / "archive.json"
        archive = Archive(archive_path if writer else None)
        archive.records = distributed.share(archive.records)  # rank 0's (resumed) archive on every rank
        if len(archive):
            log.info("resuming the search from %s (%d candidates already evaluated)", archive_path, len(archive))
        score = lambda g: evaluator.score(g, target)  # noqa: E731
        # this rank's share of each generation's new candidates, split by their MACs; all shares gathered
        evaluate_batch = distributed.distributed_batch(lambda g: evaluate_one(g, score, evaluator.caps),
                                                       cost=lambda g: float(evaluator.costs.costs(g).cum_macs[-1]))
        if space.is_fixed:  # nothing to search: score the one genome the space holds
            evaluate_generation([space.default_genome()], score, archive, 0, evaluator.caps, evaluate_batch)
            archive.save()
            front = pareto_front(archive.evaluated(), ref)
        else:
            progress_file = self.run_dir / "search_progress.csv"
            self._progress: list[dict] = []  # rewritten in full (atomically) by the (replayed) generations
            on_generation = lambda gen, stats: self._log_generation(trainer, progress_file, stats)  # noqa: E731
            if self.predictor is not None:
                from ee_nas.search.surrogate import surrogate_search

                front = surrogate_search(space, score, archive, self.predictor,
                                         pop_size=self.pop_size, n_iterations=self.n_generations,
                                         n_per_iteration=self.n_per_iteration, seed=self.seed, reference_macs=ref,
                                         target=target, cost_fn=evaluator.cum_cost,
                                         crossover_prob=self.crossover_prob, mutation_prob=self.mutation_prob,
                                         on_generation=on_generation, caps=evaluator.caps,
                                         evaluate_batch=evaluate_batch)
            else:
                front = search(space, score, archive, algorithm=self.algorithm,
                               pop_size=self.pop_size, n_generations=self.n_generations, seed=self.seed,
                               reference_macs=ref, target=target, crossover_prob=self.crossover_prob,
                               mutation_prob=self.mutation_prob, n_largest=self.n_largest,
                               on_generation=on_generation, caps=evaluator.caps, evaluate_batch=evaluate_batch)
        ok = archive.evaluated()
        chosen = choose(ok, self.choose, tolerance=self.choose_tolerance)
        if chosen is None:
            fit = [r for r in ok if cap_violation(r) == 0]
            scored = [r for r in archive.records.values() if r["status"] != "failed"]  # ok or over_cap
            if not fit and scored:
                # a cap is a hard device limit: stop rather than hand back a network that cannot run there
                closest = min(scored, key=cap_violation)
                raise RuntimeError(f"no candidate fits {', '.join(self.hardware.caps)}: the closest "
                                   f"({closest['key']}) has {'; '.join(closest['violations'])}")
            if not ok:
                raise RuntimeError(f"every candidate failed; see the errors in {archive_path}")
            # only the avg-cost target is unmet: the cheapest candidate within the caps, with a warning
            chosen = min(fit, key=lambda r: r.get("avg_cost", r["avg_macs"]))
            log.warning("no candidate meets the target of %.3g %s; choosing the cheapest (%.3g)",
                        target, self.hardware.unit, chosen.get("avg_cost", chosen["avg_macs"]))
        genome = Genome.from_dict(chosen["genome"])
        if writer:
            genome.save(self.run_dir / "arch.yaml")
        self.result = {"genome": genome, "front": front, "chosen": chosen, "reference_cost": ref, "target": target,
                       "unit": self.hardware.unit,
                       "n_evaluated": len(archive), "hypervolume": hypervolume(archive.evaluated(), ref),
                       "records": archive.evaluated(), "search_space": space.name,
                       "algorithm": ("none" if space.is_fixed else f"surrogate-{self.predictor.name}"
                                     if self.predictor is not None else self.algorithm),
                       "search_seconds": time.perf_counter() - started}
        if writer:
            write_front(self.run_dir, self.result)

    def _latency_table(self, supernet, writer: bool):
        """The profile's latency table, timed once per machine: rank 0 measures and saves it while the
        other ranks wait (timings taken side by side would disturb each other), then they load it."""
        if self.hardware.latency_lut is None:
            return None
        table = None
        if writer:
            table = LatencyTable.from_profile(supernet, self.hardware, measure=self.measure)
            table.measure_all()
        distributed.barrier()
        if not writer:
            table = LatencyTable.from_profile(supernet, self.hardware, measure=self.measure)
            table.measure_all(save=False)  # found in rank 0's cache file (timed here if another machine)
        return table

    def _log_generation(self, trainer: L.Trainer, path: Path, stats: dict) -> None:
        log.info("generation %d: %d evaluated, hypervolume %.4f, best val acc under target %.4f",
                 stats["generation"], stats["n_evaluated"], stats["hypervolume"], stats["best_acc_under_target"])
        self._progress.append(stats)
        if trainer.global_rank != 0:
            return

        def write_rows(f) -> None:
            writer = csv.DictWriter(f, fieldnames=list(stats))
            writer.writeheader()
            writer.writerows(self._progress)
        atomic_write(path, write_rows)
        metrics = {f"search/{k}": v for k, v in stats.items() if not (isinstance(v, float) and math.isnan(v))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step + stats["generation"] + 1)
