"""Fine-tuning: train one static subnet from its inherited supernet weights, then re-tune its thresholds.

    python -m ee_nas.finetune run_dir=outputs/digits_search/<time> epochs=5
    python -m ee_nas.finetune run_dir=... arch=.../selected/1_trade_off epochs=10 lr=0.005

The architecture (`arch=`: an arch.yaml or a directory holding one; default the
run's `arch.yaml`) is extracted from the run's supernet with recalibrated
BatchNorm, scored (thresholds tuned on val under the run's hardware target,
reported on test), trained as a standalone `MultiExitNet` for `epochs` epochs
with the supernet's joint per-exit loss (`MultiExitModule.exit_loss`: the final
exit weighted `training.final_weight`, the mean early-exit loss
`finetune.early_weight`, distillation from its own final exit or, with `finetune.teacher: largest`, from
the supernet's largest backbone), its
BatchNorm recalibrated again, its thresholds re-tuned on val and scored on
test. Writes `finetune_summary.json` (before/after), `subnet.pt` (the
`ee_nas.run` format) and `arch.yaml` into `out=` (default: `finetuned/` next to
the arch.yaml).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ee_nas.genome import Genome
from ee_nas.cli import arg, parse
from ee_nas.select import evaluate_subnet, load_run, target_keys

log = logging.getLogger(__name__)
LR_FRACTION = 0.3  # conf/config.yaml's finetune.lr_fraction, for runs made before it existed
EARLY_WEIGHT = 2.0  # conf/config.yaml's finetune.early_weight, likewise
TEACHERS = ("self", "largest")  # finetune.teacher

REPORT_KEYS = ("test_acc", "avg_macs", "relative_macs", "val_acc", "val_avg_macs", "final_exit_test_acc",
               "meets_target", "exit_rates", "thresholds", "avg_cost", "val_avg_cost",
               "avg_latency_ms", "val_avg_latency_ms")  # the latency keys only with a latency table


def finetune_net(net, train_loader, training: dict, epochs: int, lr: float | None = None,
                 lr_fraction: float = LR_FRACTION, early_weight: float | None = None,
                 device: torch.device | str = "cpu",
                 calibration: torch.Tensor | None = None, eval_batch_size: int = 512, progress_bar: bool = False,
                 logger=False, limit_train_batches: int | float | None = None, teacher=None):
    """Train an extracted static subnet for `epochs` epochs with the supernet's joint per-exit loss, then
    recalibrate its BatchNorm on `calibration`. `training` is the run's `training` config (plain dict);
    `lr` defaults to `lr_fraction` of its optimizer's (`finetune.lr_fraction`), `early_weight` (the mean
    early-exit loss's, `finetune.early_weight`) to its `early_weight`; `limit_train_batches` caps
    each epoch as Lightning's Trainer does (None: every batch); channels-last as `training.channels_last`;
    with a `teacher` (a frozen net, `finetune.teacher=largest`) every exit distils from its final exit.
    Returns the net (trained in place, back in the default layout) and the lr used."""
    import torch

    from ee_nas.models.bn import recalibrate_bn

    optimizer = dict(training["optimizer"])
    optimizer["lr"] = float(lr) if lr is not None else lr_fraction * float(optimizer.get("lr", 0.05))
    if epochs > 0:
        import lightning as L
        from omegaconf import OmegaConf

        from ee_nas.lit_module import FinetuneModule

        module = FinetuneModule(net, OmegaConf.create(optimizer), training.get("scheduler"),
                                training["final_weight"],
                                training["early_weight"] if early_weight is None else float(early_weight),
                                training["distill_weight"],
                                training["distill_temperature"], training.get("channels_last", False),
                                None if teacher is None else teacher.to(device))
        accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
        trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=logger,
                            enable_checkpointing=False, enable_progress_bar=progress_bar,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            log_every_n_steps=10, limit_train_batches=limit_train_batches)
        trainer.fit(module, train_dataloaders=train_loader)
    net = net.to(device, memory_format=torch.contiguous_format)  # the layout export and the runtime expect
    if calibration is not None:
        recalibrate_bn(net, calibration.to(device), eval_batch_size)
    return net.eval(), optimizer["lr"]


def finetune_refit(train, net, epochs: int, evaluator, genome: Genome, refit: bool) -> tuple:
    """`train(net, with_val, epochs) -> (net, lr)` on the chosen network; with `refit` (`finetune.refit`) a copy of
    its inherited weights is then trained alike on train + val (a third more digits; for as many steps as the
    first, so it costs one more fine-tuning) and deployed, with thresholds tuned on the val outputs of the one
    trained on train only, which has not seen them (no refit after 0 epochs). Returns the network to deploy, the
    lr and those val outputs (None without refit: tune on the deployed network's own)."""
    refit = refit and epochs > 0
    inherited = copy.deepcopy(net) if refit else None
    net, lr = train(net, False, epochs)
    if not refit:
        return net, lr, None
    val = evaluator.outputs(genome, ("val",), net=net)["val"]
    sizes = evaluator.datamodule.split_sizes()
    refit_epochs = max(1, epochs * sizes["train"] // (sizes["train"] + sizes["val"]))
    log.info("refit: fine-tuning the chosen network again, on train + val for %d epochs", refit_epochs)
    return *train(inherited, True, refit_epochs), val


def make_teacher(evaluator, choice: str = "self"):
    """What every exit distils from while fine-tuning (`finetune.teacher`): None for `self` (the network's own
    final exit), the supernet's largest backbone (inherited weights, recalibrated BatchNorm) for `largest`."""
    if choice not in TEACHERS:
        raise ValueError(f"finetune.teacher={choice!r} is invalid; valid: {', '.join(TEACHERS)}")
    return evaluator.subnet(evaluator.supernet.space.largest_backbone()) if choice == "largest" else None


def resolve_arch(run_dir: Path, arch: str | None) -> Path:
    path = Path(arch) if arch else run_dir / "arch.yaml"
    if path.is_dir():
        path = path / "arch.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"arch={arch!r}: {path} does not exist (give an arch.yaml or a directory with one)")
    return path


def finetune(run_dir: str | Path, arch: str | Path | None = None, epochs: int = 5, lr: float | None = None,
             out: str | Path | None = None, device: str | None = None, seed: int | None = None) -> dict:
    """Fine-tune one architecture of a finished run; returns (and writes) the before/after summary."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from ee_nas.pipeline import save_subnet
    from ee_nas.utils import atomic_write_json

    if epochs < 0:
        raise ValueError(f"epochs={epochs} must be >= 0")
    run = load_run(run_dir, device)
    arch_path = resolve_arch(run.run_dir, None if arch is None else str(arch))
    genome = run.supernet.space.validate(Genome.load(arch_path))
    out = Path(out) if out else arch_path.parent / "finetuned"
    L.seed_everything(run.cfg.seed if seed is None else seed, workers=True)

    net = run.evaluator.subnet(genome)  # inherited weights, recalibrated BatchNorm
    before = evaluate_subnet(run, genome, net)
    training = OmegaConf.to_container(run.cfg.training, resolve=True)
    options = run.cfg.get("finetune", {})
    teacher = make_teacher(run.evaluator, options.get("teacher", "self"))

    def train(net, with_val: bool, epochs: int):
        return finetune_net(net, run.datamodule.train_dataloader(options.get("augment"), with_val=with_val),
                            training, epochs, lr, options.get("lr_fraction", LR_FRACTION),
                            options.get("early_weight", EARLY_WEIGHT), run.evaluator.device,
                            run.evaluator.calibration, run.datamodule.eval_batch_size,
                            logger=CSVLogger(out, name="refit" if with_val else "csv"), teacher=teacher)

    net, lr, val = finetune_refit(train, net, epochs, run.evaluator, genome, bool(options.get("refit", False)))
    after = evaluate_subnet(run, genome, net, val=val)
    genome.save(out / "arch.yaml")
    save_subnet(out / "subnet.pt", genome, net, after.pop("_thresholds"), run.cfg.thresholds.measure)
    before.pop("_thresholds")
    summary = {"run_dir": str(run.run_dir), "arch": str(arch_path), "epochs": epochs, "lr": lr, "refit": val is not None,
               **target_keys(run), "reference_macs": run.reference_macs,
               "before": {k: before[k] for k in REPORT_KEYS if k in before},
               "after": {k: after[k] for k in REPORT_KEYS if k in after},
               "n_exits": genome.n_exits, "taps": list(genome.taps), "params": after["params"],
               "cum_macs": after["cum_macs"], "genome": genome.to_dict()}
    atomic_write_json(out / "finetune_summary.json", summary)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"fine-tuned {s['arch']} for {s['epochs']} epochs (lr {s['lr']:.3g})",
             f"{'':>7}  {'test_acc':>8}  {'avg_MACs':>10}  {'rel':>6}  {'val_acc':>7}  {'final_exit_test':>15}"]
    for name in ("before", "after"):
        r = s[name]
        lines.append(f"{name:>7}  {r['test_acc']:8.4f}  {r['avg_macs']:10.4g}  {r['relative_macs']:6.3f}  "
                     f"{r['val_acc']:7.4f}  {r['final_exit_test_acc']:15.4f}")
    return "\n".join(lines)


@dataclass
class FinetuneArgs:
    run_dir: str = arg(help="a finished ee_nas.run directory (checkpoints/last.ckpt, .hydra/)")
    arch: Optional[str] = arg(None, "arch.yaml or a directory holding one, e.g. selected/1_trade_off "
                                    "(default: run_dir/arch.yaml)")
    epochs: int = arg(5, "fine-tuning epochs")
    lr: Optional[float] = arg(None, "learning rate (default: the run's finetune.lr_fraction x training.optimizer.lr)")
    out: Optional[str] = arg(None, "output directory (default: finetuned/ next to the arch.yaml)")
    device: Optional[str] = arg(None, "cpu | cuda (default: the run's evaluation.device)")
    seed: Optional[int] = arg(None, "seed (default: the run's seed)")


def main(argv: list[str] | None = None, matmul_precision: str | None = None) -> dict:
    """The command line; `matmul_precision` (the command's "high") is set once the arguments parsed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse(FinetuneArgs, argv, "python -m ee_nas.finetune", __doc__.split("\n\n")[0])
    if matmul_precision is not None:
        import torch

        torch.set_float32_matmul_precision(matmul_precision)
    try:
        summary = finetune(**dataclasses.asdict(a))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main(matmul_precision="high")
    sys.exit(0)
