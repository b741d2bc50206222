"""The statistics behind the README's Results: paired differences by seed, their t-intervals, and the
fine-tuning probe's table and loss variant (experiments/compare_baselines.py, refinetune_variants.py)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import compare_baselines  # noqa: E402
import paired_results  # noqa: E402
import refinetune_variants  # noqa: E402

from ee_nas.lit_module import MultiExitModule  # noqa: E402


def test_t_interval_is_the_sample_std_t_interval():
    d = np.array([0.28, 0.56, -0.28, 0.0, 0.84])
    mean, lo, hi = compare_baselines.t_interval(d)
    ref = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))  # sem: ddof=1
    assert mean == pytest.approx(d.mean()) and (lo, hi) == pytest.approx(ref)
    assert np.isnan(compare_baselines.t_interval(np.array([0.5]))[1])


def test_seed_interval_runs_over_the_seeds_means_not_the_correlated_pairs():
    """Three targets of one seed search one supernet: a seed that is ahead at every target is one piece of
    evidence, not three. The interval is the t-interval of the per-seed means, wider than the pairs' one."""
    d = {(0, 0.25): 1.0, (0, 0.5): 0.8, (1, 0.25): -0.2, (1, 0.5): 0.0, (2, 0.25): 0.6, (2, 0.5): 0.4}
    mean, lo, hi, n = compare_baselines.seed_interval(d)
    assert n == 3 and (mean, lo, hi) == pytest.approx(compare_baselines.t_interval(np.array([0.9, -0.1, 0.5])))
    _, plo, phi = compare_baselines.t_interval(np.array(list(d.values())))
    assert hi - lo > phi - plo
    one_target = {(s, 0.35): x for s, x in enumerate([0.3, -0.1, 0.7])}  # one pair a seed: the pairs' interval
    assert compare_baselines.seed_interval(one_target)[:3] == pytest.approx(
        compare_baselines.t_interval(np.array([0.3, -0.1, 0.7])))


def test_the_overall_comparison_reports_the_interval_over_seeds():
    rec = lambda m, s, t, acc: {"method": m, "target_fraction": t, "seed": s, "test_acc": acc,  # noqa: E731
                                "relative_macs": 0.3, "exit_saving": 0.0, "pre_finetune_test_acc": None}
    records = [rec(m, s, t, 0.98 + (0.01 * ((s + 1) % 3) + 0.002 * (t == 0.5) if m == "aebnas" else 0))
               for m in ("aebnas", "static_nas") for s in range(3) for t in (0.25, 0.5)]
    md = compare_baselines.table(records)
    _, lo, hi, _ = compare_baselines.seed_interval(compare_baselines.pair_diffs(records, "aebnas", "static_nas"))
    assert f"over all 6 (seed, target) pairs: **+1.10 pp** (95% CI [{lo:+.2f}, {hi:+.2f}] over the 3 seeds' means" in md


def test_paired_differences_match_seeds_and_skip_unpaired_runs():
    rec = lambda m, s, acc, t=0.35: {"method": m, "target_fraction": t, "seed": s, "test_acc": acc}  # noqa: E731
    records = [rec("static_nas", 0, 0.98), rec("static_nas", 1, 0.97), rec("aebnas", 1, 0.99),
               rec("aebnas", 0, 0.985), rec("aebnas", 2, 0.99), rec("static_nas", 0, 0.5, t=0.5)]
    np.testing.assert_allclose(compare_baselines.paired(records, "aebnas", 0.35), [0.5, 2.0])  # seed 0, 1 (pp)


def test_paired_results_pair_two_sweeps_run_by_run_per_seed_set(tmp_path):
    """A lever that retrained the supernets is its own sweep: its runs pair with the recipe's on (target, seed),
    unpaired runs and other methods left out, one row per seed set and one over all."""
    rec = lambda m, s, t, acc: {"method": m, "target_fraction": t, "seed": s, "test_acc": acc,  # noqa: E731
                                "val_acc": acc - 0.01}
    lever = [rec("aebnas", 0, 0.25, 0.99), rec("aebnas", 1, 0.25, 0.98), rec("aebnas", 5, 0.25, 0.97),
             rec("aebnas", 6, 0.5, 0.97), rec("aebnas", 9, 0.5, 0.5), rec("static_nas", 0, 0.25, 0.1)]
    recipe = [rec("aebnas", 0, 0.25, 0.98), rec("aebnas", 1, 0.25, 0.98), rec("aebnas", 5, 0.25, 0.98),
              rec("aebnas", 6, 0.5, 0.96), rec("aebnas", 6, 0.25, 0.2)]
    for name, records in (("lever", lever), ("recipe", recipe)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"records": records}))
    out = tmp_path / "paired"
    rows = paired_results.main(["--out", str(out), "--pair", "x", f"{tmp_path / 'lever.json'}:aebnas",
                                f"{tmp_path / 'recipe.json'}:aebnas"])
    assert [(r["seeds"], r["pairs"]) for r in rows] == [("0-4", 2), ("5-9", 2), ("all", 4)]
    expected = {"0-4": [1.0, 0.0], "5-9": [-1.0, 1.0], "all": [1.0, 0.0, -1.0, 1.0]}
    for r in rows:
        assert r["test_acc"] == pytest.approx(compare_baselines.t_interval(np.array(expected[r["seeds"]])))
        assert r["val_acc"] == pytest.approx(r["test_acc"])
    assert rows[2]["ahead_level_behind"] == [2, 1, 1]
    # one pair a seed here, so the interval over seeds' means is the pairs' one
    assert rows[2]["n_seeds"] == 4 and rows[2]["test_acc_by_seed"] == pytest.approx(rows[2]["test_acc"])
    assert "| x | all | 4 | +0.25 [" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no records of method 'fixed'"):
        paired_results.main(["--out", str(out), "--pair", "x", f"{tmp_path / 'lever.json'}:fixed",
                             f"{tmp_path / 'recipe.json'}:aebnas"])


def _records(variant_acc: dict, recorded: dict) -> list[dict]:
    return [{"variant": v, "method": m, "target_fraction": 0.35, "seed": s, "test_acc": acc,
             "recorded_test_acc": recorded[m, s], "run_dir": f"{m}/{s}"}
            for v, accs in variant_acc.items() for (m, s), acc in accs.items()]


def test_variant_report_pairs_each_variant_with_the_baseline():
    recorded = {("aebnas", 0): 0.99, ("aebnas", 1): 0.98, ("static_nas", 0): 0.97, ("static_nas", 1): 0.97}
    swa = {("aebnas", 0): 0.995, ("aebnas", 1): 0.985, ("static_nas", 0): 0.98, ("static_nas", 1): 0.96}
    table = refinetune_variants.report(_records({"recipe": recorded, "swa_half": swa}, recorded))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert set(rows) == {"recorded", "recipe", "swa_half"}
    assert rows["swa_half"][0] == "99.00 (+0.50)" and rows["swa_half"][1] == "97.00 (+0.00)"
    # with the variant on both sides: aebnas - static_nas = +1.5, +2.5 pp; the recipe's aebnas against it: +1, +2
    for cell, d in ((rows["swa_half"][2], [1.5, 2.5]), (rows["swa_half"][3], [1.0, 2.0])):
        mean, lo, hi = compare_baselines.t_interval(np.array(d))
        assert cell.strip(" |") == f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


class _Loss:
    final_weight, early_weight, distill_weight, distill_temperature, label_smoothing = 1.0, 2.0, 0.5, 2.0, 0.0


@pytest.mark.parametrize("refit", [False, True])
def test_probe_keeps_the_runs_own_fine_tuning_augment_and_refit_unless_a_variant_sets_them(refit):
    from omegaconf import OmegaConf

    run = OmegaConf.create({"finetune": {"teacher": "self", "augment": {"random_crop_padding": 0, "scale": None},
                                         "refit": refit}, "trainer": {"enable_progress_bar": True}})
    recipe = refinetune_variants.finetune_config(run)  # a null augment would mean data.augment's crop
    assert recipe.finetune.augment == run.finetune.augment and not recipe.trainer.enable_progress_bar
    assert recipe.finetune.refit == refit  # the recipe row must reproduce the run
    affine = refinetune_variants.finetune_config(run, "largest", refinetune_variants.AFFINE)
    assert affine.finetune.teacher == "largest" and affine.finetune.refit == refit
    assert affine.finetune.augment == {"random_crop_padding": 0, **refinetune_variants.AFFINE}
    assert refinetune_variants.finetune_config(run, refit=True).finetune.refit
    assert refinetune_variants.finetune_config(run, training={"distill_weight": 0.0}).training.distill_weight == 0.0


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_probe_trains_the_early_heads_at_their_lr_scale_and_the_rest_at_the_lr(scale):
    """branch_lr3/10: the early exits' heads learn at that multiple of the fine-tuning lr, the final head and the
    backbone segments at the lr itself, each parameter in exactly one group."""
    from torch import nn

    from ee_nas.models.multi_exit import MultiExitNet

    net = MultiExitNet([nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)],
                       [nn.Sequential(nn.Flatten(), nn.LazyLinear(10)), nn.Sequential(nn.Flatten(), nn.LazyLinear(10))],
                       [0])
    net(torch.zeros(1, 1, 8, 8))  # materialize the lazy heads
    module = refinetune_variants.probe_module([], head_lr_scale=scale)(
        net, {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    lr = {id(p): group["lr"] for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert len(lr) == len(list(net.parameters()))
    assert all(lr[id(p)] == pytest.approx(0.1 * scale) for p in net.heads[0].parameters())
    assert all(lr[id(p)] == pytest.approx(0.1) for m in (net.heads[1], *net.segments) for p in m.parameters())


def test_hard_final_loss_weights_the_samples_the_early_exits_are_unsure_of():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 3])
    final = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    even = torch.zeros(4, 10)  # every sample equally unsure: the weights are all 1, the loss the module's
    loss = refinetune_variants._hard_final_loss(_Loss(), [even, final], y, teacher)
    assert loss.item() == pytest.approx(MultiExitModule.exit_loss(_Loss(), [even, final], y, teacher).item())
    sure = torch.zeros(4, 10)
    sure[0, 0] = 50.0  # the early exit is sure of sample 0 only: its final-exit loss gets (almost) no gradient
    refinetune_variants._hard_final_loss(_Loss(), [sure, final], y, None).backward()
    grad = final.grad.abs().sum(1)
    assert grad[0] < 1e-2 * grad[1:].min()


def test_rescore_spending_finds_the_costliest_policy_within_tolerance_as_exhaustive_search_does():
    import rescore_policies

    from ee_nas.thresholds import evaluate_policy, tune_thresholds

    rng = np.random.default_rng(1)
    conf = rng.uniform(size=(60, 2))
    correct = rng.uniform(size=(60, 2)) < np.array([0.85, 0.8])  # the final exit no better: spending costs accuracy
    cum = np.array([1.0, 3.0])
    base = tune_thresholds(conf, correct, cum, 2.6, ties="cheap")
    costs = []
    for tol, budget in ((0, 2.6), (1, 2.6), (4, 2.6), (4, 1.5)):
        thr = rescore_policies.spend_within(conf, correct, cum, budget, base.thresholds[:-1], tol, 256)
        got = evaluate_policy(conf, correct, cum, thr)
        # one early exit: every policy is one threshold among the observed confidences (or +inf)
        allowed = [p for p in (evaluate_policy(conf, correct, cum, np.array([t, 0.0]))
                               for t in np.append(np.unique(conf[:, 0]), np.inf))
                   if p.accuracy >= base.accuracy - tol / 60 - 1e-12 and p.avg_macs <= budget + 1e-12]
        assert got.avg_macs == pytest.approx(max(p.avg_macs for p in allowed))
        assert got.accuracy >= base.accuracy - tol / 60 - 1e-12 and got.avg_macs >= base.avg_macs
        costs.append(got.avg_macs)
    assert costs[0] < costs[1] < costs[2] and costs[3] <= 1.5  # each image of tolerance buys more spend


def test_grow_tail_grows_only_what_follows_the_last_early_exit(make_backbone, make_space):
    from ee_nas.hardware.macs import CostModel
    from ee_nas.models.multi_exit import MultiExitSupernet

    backbone = make_backbone("mobilenetv3_small")
    space = make_space(backbone, "aebnas")
    costs = CostModel(MultiExitSupernet(backbone, space))
    largest = space.largest_backbone()
    rng, grown = np.random.default_rng(0), 0
    for _ in range(20):
        genome = space.sample(rng)
        big = refinetune_variants.grow_tail(space, genome)
        before, after = costs.costs(genome).cum_macs, costs.costs(big).cum_macs
        np.testing.assert_array_equal(after[:-1], before[:-1])  # the early exits cost what they did: same prefix
        tail = slice(max(genome.taps) + 1, None)
        assert big.exits == genome.exits and big.expands[tail] == largest.expands[tail]
        assert refinetune_variants.grow_tail(space, big) == big and after[-1] >= before[-1]
        grown += after[-1] > before[-1]
    assert grown > 10
    assert refinetune_variants.grow_tail(space, largest) == largest  # no early exit: nothing to grow after


def test_exit_ensembles_average_the_exits_a_sample_has_passed():
    import rescore_policies

    logits = np.random.default_rng(0).normal(size=(5, 3, 4)) * 3
    logp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    geo, prob, final = (rescore_policies.ensemble(logits, k) for k in ("geo", "prob", "final"))
    np.testing.assert_allclose(geo[:, 0], logp[:, 0])  # the first exit has nothing to average with
    np.testing.assert_allclose(geo[:, 2], logp.mean(1))
    np.testing.assert_allclose(np.exp(prob[:, 1]), np.exp(logp[:, :2]).mean(1))
    np.testing.assert_allclose(final[:, :2], logp[:, :2])  # only the final exit changes
    np.testing.assert_allclose(final[:, 2], logp.mean(1))


def test_default_run_benchmark_reads_gnu_time_and_reports_the_sample_std():
    import bench_default_run

    report = "\tElapsed (wall clock) time (h:mm:ss or m:ss): {}\n\tMaximum resident set size (kbytes): 1332044\n"
    assert bench_default_run.gnu_time(report.format("2:59.77")) == {"wall_s": 179.77,
                                                                   "peak_rss_bytes": 1332044 * 1024}
    assert bench_default_run.gnu_time(report.format("1:02:03.50"))["wall_s"] == 3723.5
    with pytest.raises(ValueError):
        bench_default_run.gnu_time("Command exited with non-zero status 1")
    records = [{"seed": s, "test_acc": acc, "relative_macs": 0.3, "exit_saving": 0.5, "wall_s": w,
                "peak_rss_bytes": 1.4e9} for s, acc, w in ((0, 0.98, 170.0), (1, 0.99, 180.0))]
    last = bench_default_run.table(records).splitlines()[-1]
    assert last.startswith("| mean ± std | 98.50 ± 0.71 |") and "175 ± 7 |" in last  # std with ddof=1


def test_rescore_report_pairs_each_policy_with_the_recipe_over_the_seeds_means():
    import rescore_policies

    rec = lambda v, s, t, acc: {"variant": v, "seed": s, "target_fraction": t, "test_acc": acc,  # noqa: E731
                                "relative_macs": 0.3, "exit_saving": 0.5, "meets_target": True}
    recipe = {(s, t): 0.98 for s in range(3) for t in (0.25, 0.5)}
    gain = {0: (0.01, 0.0), 1: (0.0, 0.0), 2: (0.02, 0.01)}  # per seed, at 0.25 and 0.5
    records = [rec("recipe", s, t, a) for (s, t), a in recipe.items()]
    records += [rec("entropy", s, t, recipe[s, t] + gain[s][i]) for s in range(3) for i, t in enumerate((0.25, 0.5))]
    static = {(t, s): 0.97 for s, t in recipe}
    table = rescore_policies.report(records, static)
    row = next(line for line in table.splitlines() if line.startswith("| entropy"))
    mean, lo, hi = compare_baselines.t_interval(np.array([0.5, 0.0, 1.5]))  # the seeds' mean gains (pp)
    assert f"| {mean:+.2f} [{lo:+.2f}, {hi:+.2f}] |" in row
    one_seed = rescore_policies.report([r for r in records if r["seed"] == 0], static)
    assert "| entropy | 0-4 | – | – |" in one_seed


def test_remade_report_replaces_only_its_first_table_and_keeps_one_note(tmp_path):
    md = tmp_path / "probe.md"
    md.write_text("# Probe\n\n`python probe.py --runs R`\n\nA note.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                  "Per epoch:\n\n| e | acc |\n|---|---|\n| 0 | 9 |\n")
    md.with_suffix(".json").write_text(json.dumps({"records": [{"acc": 3}, {"acc": 4}]}))
    report = lambda records: "| a | b |\n|---|---|\n| " + " | ".join(str(r["acc"]) for r in records) + " |"  # noqa: E731
    for _ in range(2):  # remade twice: the second note replaces the first
        table = compare_baselines.remake_report(md, report, "python probe.py --from-json X")
    text = md.read_text()
    assert table == "| a | b |\n|---|---|\n| 3 | 4 |"  # drawn from the stored records
    assert text.count(compare_baselines.REMADE) == 1 and "| 1 | 2 |" not in text and "| 3 | 4 |" in text
    assert text.startswith(f"# Probe\n\n`python probe.py --runs R`\n\nA note.\n\n{compare_baselines.REMADE} by "
                           "`python probe.py --from-json X` (intervals over the seeds' means).\n\n| a | b |\n")
    assert text.endswith("\n\nPer epoch:\n\n| e | acc |\n|---|---|\n| 0 | 9 |\n")  # the second table kept
    (tmp_path / "empty.md").write_text("# no table\n")
    (tmp_path / "empty.json").write_text(json.dumps({"records": []}))
    with pytest.raises(SystemExit, match="no table"):
        compare_baselines.remake_report(tmp_path / "empty.md", lambda records: "| a |", "cmd")
