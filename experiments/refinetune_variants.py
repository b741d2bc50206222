"""Fine-tuning levers tried on the iso-cost sweep's chosen networks, without searching again.

    python experiments/refinetune_variants.py --runs /tmp/iso/runs --jobs 2 --out experiments/results/refinetune_digits

Searches do not depend on fine-tuning, so each (method, target, seed) run directory of a
`compare_baselines.py --runs DIR` sweep is re-fine-tuned from its supernet under each variant, its
thresholds re-tuned on val and scored on test, as `ee_nas.run` does:

- `recipe`: the run's own fine-tuning (a check: it must reproduce the run's recorded test accuracy);
- `swa_half`, `swa_all`: the mean of the recipe's epoch-end weights over its last half / all epochs
  (stochastic weight averaging), BatchNorm recalibrated;
- `wise0.5`, `wise0.75`: the recipe's final weights interpolated with the inherited ones (WiSE-FT);
- `teacher`: distillation from the supernet's largest backbone (recalibrated, frozen) instead of the
  network's own final exit, at `training.distill_weight` (`finetune.teacher=largest`);
- `hard_final`: the final exit's per-sample loss weighted by how unsure the early exits are (1 − their highest
  max-softmax, detached, normalized to mean 1): the final exit only sees the samples no early exit took;
- `best_val`, `best_val_or_inherited`: the recipe's epoch-end weights (BatchNorm recalibrated) of the epoch
  with the best val accuracy after threshold tuning (ties: the later epoch), without / with the
  inherited weights as epoch 0 (early stopping on val; each epoch's scores are in the records);
- `grow_tail`: the backbone after the last early exit grown to its largest (depth, expansion, kernel) where the
  network's val policy affords it under its budget (the tail runs only for the few samples no early exit took,
  and val accuracy is blind to it, so the search picks it by noise), then fine-tuned as the recipe; a network
  it cannot grow (too costly, already largest, or no early exit) keeps the recipe's result (`grown: false`).
- `affine`: fine-tuned with a random rotation (+-12 degrees) and scale (0.9-1.1) of each training image before
  the recipe's random crop, if it has one (`finetune.augment={rotation_degrees:12,scale:0.1}`): a larger chosen
  network may overfit the 1,078 training digits more than a small one;
- `teacher_affine`: both `teacher` and `affine` (the two levers that lift static_nas, together);
- `no_crop`: fine-tuned without the random crop (`finetune.augment={random_crop_padding:0}`): augmentation
  cost aebnas more than static_nas, in the fine-tuning (`affine`) and in the supernet's training (RESULTS.md), and
  the test digits are centred as the training ones are.
- `label_smoothing`: every exit's cross-entropy with label smoothing 0.1 (soft targets that keep the exits'
  confidences from saturating on the 1,078 training digits, which the thresholds then rank).
- `distill0`, `distill1`: the early exits' self-distillation from the network's own final exit at weight 0 / 1
  instead of the recipe's `training.distill_weight` (0.5) (the final exit's own term is zero: a static network's
  fine-tuning is unchanged);
- `branch_lr3`, `branch_lr10`: the early exits' heads at 3x / 10x the fine-tuning lr (the supernet trains its
  branches at `training.branch_lr_scale`; the fine-tuning at 1x), the backbone as the recipe;
- `refit`: the recipe, then the inherited weights fine-tuned alike on train + val (a third more digits) and
  deployed with the thresholds tuned on val for the recipe's network (`finetune.refit=true`); its val accuracy
  is the recipe's.

Writes `<out>.json` (one record per run and variant) and `<out>.md`: per variant, each method's mean
test accuracy and its change against the recorded runs, the paired aebnas − static_nas difference
(both with the variant) and aebnas's recipe against static_nas with the variant (a stronger
baseline), each with a 95% t-interval. Probing code: it swaps the fine-tuning module for one that
keeps its epoch-end weights, and is not part of the pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

AVERAGES = ("swa_half", "swa_all", "wise0.5", "wise0.75")
EPOCH_CHOICES = ("best_val", "best_val_or_inherited")
VARIANTS = ("recipe", *AVERAGES, "teacher", "hard_final", *EPOCH_CHOICES, "grow_tail", "affine", "teacher_affine",
            "no_crop", "label_smoothing", "refit", "distill0", "distill1", "branch_lr3", "branch_lr10")
AFFINE = {"rotation_degrees": 12.0, "scale": 0.1}  # the `affine` variant's `finetune.augment`
LABEL_SMOOTHING = 0.1  # the `label_smoothing` variant's, of every exit's cross-entropy


def _average(states: list[dict]) -> dict:
    return {k: sum(s[k] for s in states) / len(states) if states[0][k].is_floating_point() else states[-1][k]
            for k in states[0]}


def _hard_final_loss(self, logits, y, teacher):
    """`exit_loss` with the final exit's cross-entropy weighted towards the samples the early exits are unsure of."""
    import torch
    import torch.nn.functional as F

    from ee_nas.lit_module import MultiExitModule

    loss = MultiExitModule.exit_loss(self, logits, y, teacher)
    if len(logits) == 1:
        return loss
    with torch.no_grad():
        sure = torch.stack([F.softmax(z, 1).amax(1) for z in logits[:-1]]).amax(0)
        w = (1 - sure).clamp_min(1e-3)
        w = w / w.mean()
    ce = F.cross_entropy(logits[-1], y, reduction="none")
    return loss + self.final_weight * ((w * ce).mean() - ce.mean())


def grow_tail(space, genome):
    """`genome` with every block after its last early exit's tap at the space's largest choices (the same
    genome without early exits): the early exits, and so their outputs and exit rates, do not change."""
    from ee_nas.genome import Genome

    if not genome.exits:
        return genome
    tap = max(genome.taps)
    stage = space.block_stage[tap]
    return space.validate(Genome(
        [d if s < stage else space.stage_depths[s] for s, d in enumerate(genome.depths)],
        [e if b <= tap else space.expand_choices[-1] for b, e in enumerate(genome.expands)],
        [k if b <= tap else space.kernel_choices[-1] for b, k in enumerate(genome.kernels)], genome.exits))


def _grown(run, genome):
    """The grown genome if the network's val policy (inherited weights) affords it, else None."""
    from ee_nas.pipeline import tune_on_val

    big = grow_tail(run.supernet.space, genome)
    if big.key() == genome.key():
        return None
    policy = tune_on_val(run.cfg, run.evaluator, genome, run.evaluator.outputs(genome, ("val",))["val"], run.target)
    budget = run.evaluator.exit_target(big, run.target) * (1 - run.cfg.thresholds.get("cost_margin", 0.0))
    return big if float(policy.exit_rates @ run.evaluator.cum_cost(big)) <= budget else None


def finetune_config(cfg, teacher: str = "self", augment: dict | None = None, refit: bool | None = None,
                    training: dict | None = None):
    """The run's config `cfg` with `finetune.teacher` and, if given, `finetune.augment`, `finetune.refit` and the
    `training` keys the fine-tuning reads set: None keeps the run's own (merging a null augment would drop it, back
    to data.augment's random crop), no progress bar."""
    from omegaconf import OmegaConf

    changes = {"teacher": teacher, **{k: v for k, v in (("augment", augment), ("refit", refit)) if v is not None}}
    return OmegaConf.merge(cfg, {"finetune": changes, "training": training or {},
                                 "trainer": {"enable_progress_bar": False}})


def probe_module(snapshots: list, exit_loss=None, label_smoothing: float = 0.0, head_lr_scale: float = 1.0):
    """`FinetuneModule` that appends its net's epoch-end weights to `snapshots`, with `exit_loss` (if given) and
    `label_smoothing`, its early exits' heads at `head_lr_scale` times the lr."""
    import ee_nas.lit_module as lit

    class Probe(lit.FinetuneModule):
        branch_lr_scale = head_lr_scale

        def on_train_epoch_end(self):
            snapshots.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})

        def branch_parameters(self):
            return [] if head_lr_scale == 1.0 else [p for head in self.net.heads[:-1] for p in head.parameters()]

    if exit_loss is not None:
        Probe.exit_loss = exit_loss
    Probe.label_smoothing = label_smoothing
    return Probe


def _finetune(run, genome, teacher: str = "self", exit_loss=None, augment: dict | None = None,
              label_smoothing: float = 0.0, refit: bool | None = None, training: dict | None = None,
              head_lr_scale: float = 1.0) -> tuple:
    """The run's fine-tuning of `genome` as `ee_nas.run` does it (`finetune_chosen`), with `finetune.teacher`
    set to `teacher`, and `finetune.augment` to `augment`, `finetune.refit` to `refit` and `training`'s keys if given
    (and `exit_loss` in place of the module's, if given, every exit's cross-entropy smoothed by `label_smoothing`,
    the early exits' heads at `head_lr_scale` times the lr); the net, its inherited weights, its epoch-end weights
    and the val outputs to tune its thresholds on (None: its own)."""
    import ee_nas.lit_module as lit
    from ee_nas.pipeline import finetune_chosen

    snapshots = []
    Probe = probe_module(snapshots, exit_loss, label_smoothing, head_lr_scale)
    cfg = finetune_config(run.cfg, teacher, augment, refit, training)
    net = run.evaluator.subnet(genome)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    original, lit.FinetuneModule = lit.FinetuneModule, Probe
    try:
        net, _, val = finetune_chosen(cfg, net, genome, run.evaluator, run.datamodule, run.target)
    finally:
        lit.FinetuneModule = original
    return net, pre, snapshots, val


def _score(run, genome, net, val=None) -> dict:
    from ee_nas.select import evaluate_subnet

    scored = evaluate_subnet(run, genome, net, val=val)
    return {k: scored[k] for k in ("test_acc", "val_acc", "relative_macs")}


def probe(run_dir: str, variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    import torch

    from ee_nas.genome import Genome
    from ee_nas.models.bn import recalibrate_bn
    from ee_nas.select import load_run

    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    started = time.perf_counter()
    from compare_baselines import parse_run_dir

    method, target, seed = parse_run_dir(run_dir)
    run = load_run(run_dir, "cpu")
    genome = run.supernet.space.validate(Genome.load(Path(run_dir) / "arch.yaml"))
    recorded = json.loads((Path(run_dir) / "summary.json").read_text())["test_acc"]
    base = {"method": method, "target_fraction": target, "seed": seed, "run_dir": run_dir,
            "recorded_test_acc": recorded}
    net, pre, snaps, _ = _finetune(run, genome)
    records = [{**base, "variant": "recipe", **_score(run, genome, net)}]

    def scored(state: dict) -> dict:
        net.load_state_dict(state)
        recalibrate_bn(net, run.evaluator.calibration, run.datamodule.eval_batch_size)
        return _score(run, genome, net)

    half = len(snaps) // 2
    states = {"swa_half": _average(snaps[half:]), "swa_all": _average(snaps), "wise0.5": _average([pre, snaps[-1]]),
              "wise0.75": _average([pre] + [snaps[-1]] * 3)}
    for name in AVERAGES:
        if name in variants:
            records.append({**base, "variant": name, **scored(states[name])})
    if any(v in variants for v in EPOCH_CHOICES):
        epochs = [scored(state) for state in [pre, *snaps]]  # epoch 0: the inherited weights
        per_epoch = [{"val_acc": e["val_acc"], "test_acc": e["test_acc"]} for e in epochs]
        for name, first in zip(EPOCH_CHOICES, (1, 0)):
            best = max(range(first, len(epochs)), key=lambda i: (epochs[i]["val_acc"], i))
            records.append({**base, "variant": name, **epochs[best], "epoch": best, "per_epoch": per_epoch})
    if "hard_final" in variants:
        net, *_ = _finetune(run, genome, exit_loss=_hard_final_loss)
        records.append({**base, "variant": "hard_final", **_score(run, genome, net)})
    if "teacher" in variants:
        net, *_ = _finetune(run, genome, "largest")
        records.append({**base, "variant": "teacher", **_score(run, genome, net)})
    if "grow_tail" in variants:
        big = _grown(run, genome)
        grown = _score(run, big, _finetune(run, big)[0]) if big is not None else records[0]
        records.append({**base, **grown, "variant": "grow_tail", "grown": big is not None})
    if "affine" in variants:
        records.append({**base, "variant": "affine", **_score(run, genome, _finetune(run, genome, augment=AFFINE)[0])})
    if "teacher_affine" in variants:
        net, *_ = _finetune(run, genome, "largest", augment=AFFINE)
        records.append({**base, "variant": "teacher_affine", **_score(run, genome, net)})
    if "no_crop" in variants:
        net, *_ = _finetune(run, genome, augment={"random_crop_padding": 0})
        records.append({**base, "variant": "no_crop", **_score(run, genome, net)})
    if "label_smoothing" in variants:
        net, *_ = _finetune(run, genome, label_smoothing=LABEL_SMOOTHING)
        records.append({**base, "variant": "label_smoothing", **_score(run, genome, net)})
    if "refit" in variants:
        net, _, _, val = _finetune(run, genome, refit=True)
        records.append({**base, "variant": "refit", **_score(run, genome, net, val)})
    for name, weight in (("distill0", 0.0), ("distill1", 1.0)):
        if name in variants:
            net, *_ = _finetune(run, genome, training={"distill_weight": weight})
            records.append({**base, "variant": name, **_score(run, genome, net)})
    for name, scale in (("branch_lr3", 3.0), ("branch_lr10", 10.0)):
        if name in variants:
            net, *_ = _finetune(run, genome, head_lr_scale=scale)
            records.append({**base, "variant": name, **_score(run, genome, net)})
    print(f"[done] {method} t{target} seed{seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return records


def report(records: list[dict]) -> str:
    """Per variant: each method's mean test accuracy and change against its recorded runs, and the paired
    aebnas − static_nas difference; then the recipe's aebnas against static_nas at each variant."""
    from compare_baselines import BASELINE, seed_ci

    acc = {(r["variant"], r["method"], r["target_fraction"], r["seed"]): r["test_acc"] for r in records}
    acc.update({("recorded", r["method"], r["target_fraction"], r["seed"]): r["recorded_test_acc"] for r in records})
    runs = sorted({k[1:] for k in acc})
    methods = sorted({m for m, _, _ in runs})
    others = [m for m in methods if m != BASELINE]

    def diffs(v_mine: str, v_base: str) -> dict:
        """{(seed, (method, target)): Δ pp}: a seed's runs share a supernet, so the interval is over seeds."""
        return {(s, (m, t)): 100 * (acc[v_mine, m, t, s] - acc[v_base, BASELINE, t, s]) for m, t, s in runs
                if m in others and (v_base, BASELINE, t, s) in acc}

    head = [f"{m} test acc (%), change" for m in methods]
    lines = [f"| variant | {' | '.join(head)} | Δ vs static_nas, same variant (pp), 95% CI over seeds | "
             "Δ recipe vs static_nas at this variant (pp), 95% CI over seeds |", "|---" * (len(methods) + 3) + "|"]
    for v in ("recorded", *[v for v in VARIANTS if any(r["variant"] == v for r in records)]):
        cells = []
        for m in methods:
            keys = [k for k in runs if k[0] == m]
            mean = 100 * np.mean([acc[v, *k] for k in keys])
            change = 100 * np.mean([acc[v, *k] - acc["recorded", *k] for k in keys])
            cells.append(f"{mean:.2f} ({change:+.2f})")
        lines.append(f"| {v} | {' | '.join(cells)} | {seed_ci(diffs(v, v))} | {seed_ci(diffs('recipe', v))} |")
    return "\n".join(lines)


def epoch_curves(records: list[dict]) -> str:
    """Each method's mean val and test accuracy after every fine-tuning epoch (0: the inherited weights), from
    the `best_val` records; empty without them."""
    rows = [r for r in records if r["variant"] == "best_val"]
    if not rows:
        return ""
    n = len(rows[0]["per_epoch"])
    lines = ["| method | split | " + " | ".join(str(e) for e in range(n)) + " |", "|---" * (n + 2) + "|"]
    for m in sorted({r["method"] for r in rows}):
        for split in ("val_acc", "test_acc"):
            means = 100 * np.mean([[e[split] for e in r["per_epoch"]] for r in rows if r["method"] == m], axis=0)
            lines.append(f"| {m} | {split[:-4]} | " + " | ".join(f"{x:.2f}" for x in means) + " |")
    return "\n\nMean accuracy (%) after each fine-tuning epoch (0: inherited weights; thresholds tuned on val):\n\n" + \
        "\n".join(lines)


def write(records: list[dict], out: Path, command: str) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "records": records}, indent=1) + "\n")
    table = report(records) + epoch_curves(records)
    n = len({r["run_dir"] for r in records})
    out.with_suffix(".md").write_text(f"# Fine-tuning variants on {n} chosen networks\n\n`{command}`\n\n"
                                      f"{__doc__.split(chr(10) * 2, 2)[2]}\n{table}\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", help="compare_baselines.py --runs directories")
    parser.add_argument("--from-json", type=Path, help="redraw the table of this results file's .md from its records")
    parser.add_argument("--methods", nargs="+", default=["aebnas", "static_nas"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed found")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="`recipe` always runs (it checks the reproduction)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refinetune_digits")
    args = parser.parse_args()
    if args.from_json:
        from compare_baselines import remake_report

        print(remake_report(args.from_json, report, "python " + " ".join(sys.argv)))
        return
    if not args.runs:
        parser.error("--runs (or --from-json) is required")
    dirs = sorted(str(p) for root in args.runs for m in args.methods for p in root.glob(f"{m}/t*/seed*")
                  if p.is_dir() and (p / "summary.json").exists()
                  and (args.seeds is None or int(p.name[4:]) in args.seeds))
    if not dirs:
        raise SystemExit(f"error: no finished run directories of {args.methods} under {args.runs}")
    with ProcessPoolExecutor(args.jobs) as pool:
        records = [r for rs in pool.map(partial(probe, variants=tuple(args.variants)), dirs) for r in rs]
    print(write(records, args.out, "python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
