"""Post-search selection: pick architectures from a run's archive and export them with inherited weights.

    python -m ee_nas.select run_dir=outputs/digits_search/<time> prefer=trade_off n=3 n_exits=3

Reads `archive.json` (every evaluated candidate), keeps the feasible ones
(meeting the hardware target on validation), optionally those with `n_exits`
exits in total (final classifier included), and ranks them by `prefer`:

- `trade_off`: the knee of the feasible front first. In (error, avg_macs/reference)
  space, min-max normalized over the front, the knee is the member farthest
  from the line through the front's two extremes (on the side of the origin).
  Further picks follow by that distance, then from the next non-dominated fronts.
- `accuracy`: highest validation accuracy (ties: fewer avg MACs).
- `macs`: fewest avg MACs (ties: higher validation accuracy).

Each pick is rebuilt from the run (config `.hydra/config.yaml`, supernet
`checkpoints/last.ckpt`), extracted with recalibrated BatchNorm, its thresholds
re-tuned on validation and reported on test, and written to
`run_dir/selected/<rank>_<prefer>/` as `arch.yaml` and `subnet.pt` (the format
`ee_nas.run` writes). A table is printed and `selected/selection.json` saved.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from ee_nas.cli import arg, parse
from ee_nas.search.archive import Archive
from ee_nas.genome import Genome

log = logging.getLogger(__name__)

PREFERENCES = ("trade_off", "accuracy", "macs")


# -- ranking (pure: works on archive records) -------------------------------------------------------

def _n_exits(record: dict) -> int:
    return len(record["genome"]["exits"]) + 1


def knee_distances(records: list[dict]) -> np.ndarray:
    """Signed distance of each point to the line through the two extremes, in min-max normalized
    (error, avg_macs) space (the reference MACs cancel out); > 0 on the origin's side. Zeros when the
    set has no spread."""
    F = np.array([[1.0 - r["val_acc"], r["avg_macs"]] for r in records], dtype=float)
    span = F.max(0) - F.min(0)
    if len(F) < 3 or (span <= 0).any():
        return np.zeros(len(F))
    Z = (F - F.min(0)) / span  # the extremes map to (1, 0) and (0, 1): the line is z0 + z1 = 1
    return (1.0 - Z.sum(1)) / np.sqrt(2.0)


def select(records: list[dict], prefer: str = "trade_off", n: int = 3, n_exits: int | None = None) -> list[dict]:
    """The `n` best feasible archive records by `prefer` (see the module doc); fewer if fewer qualify."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer={prefer!r}: valid are {list(PREFERENCES)}")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    pool = [r for r in records if r.get("status") == "ok" and r.get("feasible")]
    if n_exits is not None:
        pool = [r for r in pool if _n_exits(r) == n_exits]
    if not pool:
        return []
    if prefer == "accuracy":
        return sorted(pool, key=lambda r: (-r["val_acc"], r["avg_macs"], r["key"]))[:n]
    if prefer == "macs":
        return sorted(pool, key=lambda r: (r["avg_macs"], -r["val_acc"], r["key"]))[:n]
    F = np.array([[1.0 - r["val_acc"], r["avg_macs"]] for r in pool])
    ranked = []
    for front in NonDominatedSorting().do(F):
        members = [pool[i] for i in front]
        d = knee_distances(members)
        order = sorted(range(len(members)), key=lambda i: (-d[i], -members[i]["val_acc"], members[i]["key"]))
        ranked += [members[i] for i in order]
        if len(ranked) >= n:
            break
    return ranked[:n]


# -- rebuilding a run ----------------------------------------------------------------------------------

@dataclass
class LoadedRun:
    run_dir: Path
    cfg: object
    datamodule: object
    supernet: object
    evaluator: object
    hardware: object
    target: float | None      # in the objective's unit: MACs, or ms with hardware.objective=latency
    reference_macs: float


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """The run's datamodule, trained supernet (from checkpoints/last.ckpt) and evaluator, as `ee_nas.run` built them."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from ee_nas.config import apply_debug
    from ee_nas.hardware.latency import LatencyTable
    from ee_nas.inference.runtime import build_supernet
    from ee_nas.pipeline import eval_device
    from ee_nas.search.evaluator import SubnetEvaluator

    run_dir = Path(run_dir)
    cfg_path, ckpt = run_dir / ".hydra" / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    for path in (cfg_path, ckpt):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run_dir must be a finished `python -m ee_nas.run` "
                                    "directory")
    cfg = apply_debug(OmegaConf.load(cfg_path))
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)  # was ${hydra:runtime.output_dir}: no Hydra runtime here
        if device:
            cfg.evaluation.device = device
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    supernet = build_supernet(cfg, datamodule.in_channels, datamodule.num_classes)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    supernet.load_state_dict({k[len("supernet."):]: v for k, v in state.items() if k.startswith("supernet.")})
    dev = eval_device(cfg)
    supernet = supernet.to(dev).eval()
    hardware = instantiate(cfg.hardware)
    # the run's latency table (a LUT file, or this machine's cached measurement): as ee_nas.run built it
    latency = LatencyTable.from_profile(supernet, hardware, measure=cfg.thresholds.measure)
    if latency is not None:
        latency.measure_all()
    evaluator = SubnetEvaluator(supernet, datamodule, measure=cfg.thresholds.measure,
                                calibration_samples=cfg.evaluation.calibration_samples, device=dev,
                                max_candidates=cfg.thresholds.max_candidates, hardware=hardware, latency=latency)
    target = hardware.target(evaluator.reference_cost)  # in the objective's unit (MACs, or ms)
    return LoadedRun(run_dir, cfg, datamodule, supernet, evaluator, hardware, target, evaluator.reference_macs)


def evaluate_subnet(run: LoadedRun, genome: Genome, net, val=None) -> dict:
    """Thresholds tuned on val under the run's target (in the objective's unit: avg MACs, or avg latency
    from the run's latency table), accuracy, avg MACs and avg cost reported on test. `val`: the val outputs to
    tune on, if not the net's own (`finetune.refit`: those of the network fine-tuned without val)."""
    from ee_nas.pipeline import report_policy

    report, policy, _, _ = report_policy(run.cfg, run.evaluator, genome, net, run.target, val)
    return {**report, "_thresholds": policy.thresholds}  # the array subnet.pt stores (inf = exit disabled)


def export_selection(run: LoadedRun, picks: list[dict], prefer: str) -> list[dict]:
    """Write selected/<rank>_<prefer>/{arch.yaml,subnet.pt}; returns one report row per pick."""
    from ee_nas.pipeline import save_subnet
    from ee_nas.utils import atomic_write_json

    rows = []
    for rank, record in enumerate(picks, 1):
        genome = run.supernet.space.validate(Genome.from_dict(record["genome"]))
        out = run.run_dir / "selected" / f"{rank}_{prefer}"
        net = run.evaluator.subnet(genome)
        report = evaluate_subnet(run, genome, net)
        genome.save(out / "arch.yaml")
        save_subnet(out / "subnet.pt", genome, net, report.pop("_thresholds"), run.cfg.thresholds.measure)
        # the archive's accuracy with thresholds tuned on all of val, as re-scored here (its val_acc may be
        # cross-fitted: thresholds.score_folds)
        rows.append({"rank": rank, "prefer": prefer, "dir": str(out),
                     "archive_val_acc": record.get("val_acc_tuned", record["val_acc"]),
                     "archive_avg_macs": record["avg_macs"], **report, "genome": genome.to_dict()})
    atomic_write_json(run.run_dir / "selected" / "selection.json",
                      {"prefer": prefer, "reference_macs": run.reference_macs, **target_keys(run),
                       "selected": rows})
    return rows


def target_keys(run: LoadedRun) -> dict:
    """The run's target under the key of its unit (as summary.json has it)."""
    latency = run.hardware.objective == "latency"
    return {"objective": run.hardware.objective, "target_macs": None if latency else run.target,
            "target_latency_ms": run.target if latency else None}


def format_table(rows: list[dict]) -> str:
    head = f"{'rank':>4}  {'val_acc':>7}  {'test_acc':>8}  {'avg_MACs':>10}  {'rel':>6}  {'exits':>5}  taps        dir"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['val_acc']:7.4f}  {r['test_acc']:8.4f}  {r['avg_macs']:10.4g}  "
                     f"{r['relative_macs']:6.3f}  {r['n_exits']:>5}  {str(r['taps']):<10}  {r['dir']}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------

@dataclass
class SelectArgs:
    run_dir: str = arg(help="a finished ee_nas.run directory (archive.json, checkpoints/last.ckpt, .hydra/)")
    prefer: str = arg("trade_off", "trade_off | accuracy | macs")
    n: int = arg(3, "how many architectures")
    n_exits: Optional[int] = arg(None, "only architectures with this many exits, final classifier included")
    device: Optional[str] = arg(None, "cpu | cuda (default: the run's evaluation.device)")


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse(SelectArgs, argv, "python -m ee_nas.select", __doc__.split("\n\n")[0])
    if a.prefer not in PREFERENCES:
        raise SystemExit(f"prefer={a.prefer!r}: valid are {list(PREFERENCES)}")
    run_dir = Path(a.run_dir)
    archive_path = run_dir / "archive.json"
    if not archive_path.is_file():
        raise SystemExit(f"{archive_path} does not exist: run_dir must hold a search's archive.json")
    picks = select(Archive(archive_path).evaluated(), a.prefer, a.n, a.n_exits)
    if not picks:
        raise SystemExit(f"no feasible candidate in {archive_path}"
                         + (f" with n_exits={a.n_exits}" if a.n_exits else ""))
    if len(picks) < a.n:
        log.warning("only %d feasible candidates qualify (asked for %d)", len(picks), a.n)
    rows = export_selection(load_run(run_dir, a.device), picks, a.prefer)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
