"""Benchmark of the latency LUT and the dynamic early-exit runtime on this CPU (batch size 1).

    python experiments/bench_latency.py --run-dir DIR [--run-dir DIR2 ...]   # finished `ee_nas.run` directories
    python experiments/bench_latency.py                                      # trains a quick digits run first

1. builds the latency LUT of the run's supernet (timed);
2. LUT-predicted vs measured batch-1 latency over random subnets: the full
   multi-exit network run to its final exit by the dynamic runtime, and the
   subnet's backbone alone; Spearman rank correlation (target >= 0.9) and mean
   absolute percentage error (target <= 15%);
3. each run's chosen subnet on the digits test set, one image at a time: mean
   latency of the dynamic runtime / the static backbone (no exits), next to
   avg_MACs / backbone_MACs (target: latency ratio <= 1.15 x MAC ratio).

Writes experiments/results/bench_latency.json and .md.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ee_nas.hardware.latency import CLOCKS, LatencyTable, cpu_model, time_call  # noqa: E402
from ee_nas.hardware.macs import CostModel  # noqa: E402
from ee_nas.inference.export import ExportedRuntime, export_net  # noqa: E402
from ee_nas.inference.runtime import EarlyExitRuntime, load_run, load_supernet  # noqa: E402
from ee_nas.genome import Genome  # noqa: E402
from ee_nas.utils import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
# enough epochs for confident early exits (2 epochs leave nearly every sample to the final exit)
QUICK_RUN = ["trainer.max_epochs=15", "search.pop_size=8", "search.n_generations=2", "logger=csv",
             "trainer.enable_progress_bar=false"]


def quick_run() -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_latency_run_"))
    print(f"training a quick digits run in {run_dir} (minutes) ...", flush=True)
    # one thread unless the user says otherwise: on 2 shared cores two threads mostly wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(run_dir / "bench_train.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "ee_nas.run", f"hydra.run.dir={run_dir}", *QUICK_RUN],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"training the quick run failed; see {run_dir / 'bench_train.log'}")
    return run_dir


def backbone_only(net) -> nn.Module:
    """The static network without early exits: every segment, then the final classifier."""
    return nn.Sequential(*net.segments, net.heads[-1]).eval()


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def mape(pred, meas) -> float:
    pred, meas = np.asarray(pred), np.asarray(meas)
    return float(np.mean(np.abs(pred - meas) / meas) * 100)


def bench_lut(supernet, table: LatencyTable, n_subnets: int, rounds: int, seed: int) -> dict:
    """Predicted vs measured latency of random subnets (not those the calibration saw: another seed).

    Both run through the dynamic runtime, timed on the table's clock: the subnet to its final exit,
    and its backbone alone (no early exits). Rounds interleave the subnets so that load drifts hit all.
    """
    rng = np.random.default_rng(seed)
    genomes = [supernet.space.sample(rng) for _ in range(n_subnets)]
    x = torch.randn(1, *table._in_shape)
    full_rt, bb_rt = [], []
    for g in genomes:
        full_rt.append(EarlyExitRuntime(supernet.extract(g).eval(), [None] * (g.n_exits - 1)))
        bb_rt.append(EarlyExitRuntime(supernet.extract(Genome(g.depths, g.expands, g.kernels)).eval(), []))
    times = {name: [[] for _ in genomes] for name in ("full", "backbone", "full_wall")}
    with torch.inference_mode():
        for _ in range(rounds):
            for i in range(len(genomes)):
                times["full"][i].append(time_call(lambda: full_rt[i].classify(x), 5, 2, clock=table.clock))
                times["backbone"][i].append(time_call(lambda: bb_rt[i].classify(x), 5, 2, clock=table.clock))
                times["full_wall"][i].append(time_call(lambda: full_rt[i].classify(x), 5, 2, clock="wall"))
    med = {k: [statistics.median(t) for t in v] for k, v in times.items()}
    rows = [{"n_exits": g.n_exits, "depths": list(g.depths), "pred_full_ms": float(table.predict(g)[-1]),
             "meas_full_ms": med["full"][i], "meas_full_wall_ms": med["full_wall"][i],
             "pred_backbone_ms": table.backbone_latency(g), "meas_backbone_ms": med["backbone"][i],
             "uncalibrated_full_ms": float(sum(table.raw_costs(g)[0]) + sum(table.raw_costs(g)[1])
                                           + g.n_exits * table.decision_ms)}
            for i, g in enumerate(genomes)]
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return {"subnets": rows,
            "full": {"spearman": spearman(col("pred_full_ms"), col("meas_full_ms")),
                     "mape_pct": mape(col("pred_full_ms"), col("meas_full_ms"))},
            "backbone": {"spearman": spearman(col("pred_backbone_ms"), col("meas_backbone_ms")),
                         "mape_pct": mape(col("pred_backbone_ms"), col("meas_backbone_ms"))},
            "uncalibrated_full": {"spearman": spearman(col("uncalibrated_full_ms"), col("meas_full_ms")),
                                  "mape_pct": mape(col("uncalibrated_full_ms"), col("meas_full_ms"))},
            "full_wall_clock": {"spearman": spearman(col("pred_full_ms"), col("meas_full_wall_ms")),
                                "mape_pct": mape(col("pred_full_ms"), col("meas_full_wall_ms"))}}


def bench_dynamic(run, table: LatencyTable, repeats: int) -> dict:
    """Per test image: median of `repeats` interleaved timings of the dynamic runtime and of the
    static backbone (plain forward + argmax), on the table's clock and on the wall clock."""
    from hydra.utils import instantiate

    dm = instantiate(run.cfg.data)
    dm.setup()
    x_test, y_test = dm.split_tensors("test")
    rt = EarlyExitRuntime(run.net, run.thresholds, run.measure)
    static = backbone_only(run.net)
    # deployment: the exported TorchScript segments/heads vs the traced static backbone
    export_dir = Path(tempfile.mkdtemp(prefix="bench_latency_export_"))
    export_net(run.net, export_dir, run.input_shape, run.thresholds, run.measure, backends=["torchscript"])
    ts_rt = ExportedRuntime(export_dir, "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts_static = torch.jit.trace(static, x_test[:2], check_trace=False)
    pairs = {"": (rt.classify, lambda x: static(x).argmax(-1)),
             "_ts": (ts_rt.classify, lambda x: ts_static(x).argmax(-1))}
    clocks = {"": CLOCKS[table.clock], "_wall": CLOCKS["wall"]}
    per_image = {f"{k}{p}{c}": [] for k in ("dynamic", "static") for p in pairs for c in clocks}
    with torch.inference_mode():
        for i in range(len(x_test)):
            x = x_test[i:i + 1]
            for p, (dyn_fn, static_fn) in pairs.items():
                for _ in range(2):  # warm-up
                    dyn_fn(x), static_fn(x)
                for c, now in clocks.items():
                    d, s = [], []
                    for _ in range(repeats):  # interleaved, so both see the same machine load
                        t0 = now(); dyn_fn(x); d.append(now() - t0)  # noqa: E702
                        t0 = now(); static_fn(x); s.append(now() - t0)  # noqa: E702
                    per_image[f"dynamic{p}{c}"].append(statistics.median(d) / 1e6)
                    per_image[f"static{p}{c}"].append(statistics.median(s) / 1e6)
        result = rt.classify(x_test)
        assert (ts_rt.classify(x_test).exits == result.exits).all()
    shutil.rmtree(export_dir, ignore_errors=True)
    rates = np.bincount(result.exits, minlength=rt.n_exits) / len(x_test)
    cm = CostModel(table.supernet).costs(run.genome)
    avg_macs = float(rates @ cm.cum_macs)
    mean = {k: float(np.mean(v)) for k, v in per_image.items()}
    lat_ratio = mean["dynamic"] / mean["static"]
    mac_ratio = avg_macs / cm.backbone_macs
    return {
        "n_test": len(x_test), "test_acc": float((result.labels == y_test.numpy()).mean()),
        "exit_rates": rates.tolist(), "thresholds": [None if not np.isfinite(t) else float(t) for t in rt.thresholds],
        "cum_macs": cm.cum_macs.tolist(), "taps": list(run.genome.taps),
        "dynamic_ms": mean["dynamic"], "static_ms": mean["static"],
        "dynamic_wall_ms": mean["dynamic_wall"], "static_wall_ms": mean["static_wall"],
        "dynamic_ts_ms": mean["dynamic_ts"], "static_ts_ms": mean["static_ts"],
        "latency_ratio_ts": mean["dynamic_ts"] / mean["static_ts"],
        "pred_dynamic_ms": table.avg_latency(run.genome, rates), "pred_static_ms": table.backbone_latency(run.genome),
        "latency_ratio": lat_ratio, "latency_ratio_wall": mean["dynamic_wall"] / mean["static_wall"],
        "avg_macs": avg_macs, "backbone_macs": int(cm.backbone_macs),
        "mac_ratio": mac_ratio, "latency_over_mac_ratio": lat_ratio / mac_ratio,
    }


def markdown(r: dict) -> str:
    lut, t, cal = r["lut"], r["targets"], r["calibration"]
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    clock = r["clock"]
    lines = [
        "# Latency LUT and dynamic early-exit runtime (batch size 1, CPU)", "",
        f"Machine: {r['machine']['cpu']} ({r['machine']['machine']}), torch {r['machine']['torch']}, "
        f"{r['threads']} thread(s), clock `{clock}`"
        + (" (this thread's CPU time: the 2 cores are shared with other jobs, whose preemptions the wall "
           "clock counts)" if clock == "cpu" else "") + ". "
        "Generated by `experiments/bench_latency.py`.", "",
        f"LUT: {r['lut_entries']} components in {r['lut_build_s']:.1f} s (components, then the calibration "
        f"on {cal['n_subnets']} other subnets: measured = {cal['scale']:.3f} x component sum + "
        f"{cal['per_exit_ms'] * 1e3:.0f} us per exit + {cal['base_ms'] * 1e3:.0f} us).", "",
        f"## LUT-predicted vs measured latency, {len(lut['subnets'])} random subnets", "",
        "| prediction vs measurement | Spearman | MAPE % |", "|---|---|---|",
        f"| full multi-exit net to its final exit (runtime), calibrated LUT | {lut['full']['spearman']:.3f} "
        f"(>= 0.9: {ok(t['spearman_ok'])}) | {lut['full']['mape_pct']:.1f} (<= 15: {ok(t['mape_ok'])}) |",
        f"| same, component sums + decisions, uncalibrated | {lut['uncalibrated_full']['spearman']:.3f} | "
        f"{lut['uncalibrated_full']['mape_pct']:.1f} |",
        f"| same, measured on the wall clock | {lut['full_wall_clock']['spearman']:.3f} | "
        f"{lut['full_wall_clock']['mape_pct']:.1f} |",
        f"| backbone alone (runtime, one exit), calibrated | {lut['backbone']['spearman']:.3f} | "
        f"{lut['backbone']['mape_pct']:.1f} |", "",
        "| # | exits | predicted full ms | measured full ms | uncalibrated ms | wall ms | predicted backbone ms "
        "| measured backbone ms |", "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(lut["subnets"]):
        lines.append(f"| {i} | {s['n_exits']} | {s['pred_full_ms']:.3f} | {s['meas_full_ms']:.3f} | "
                     f"{s['uncalibrated_full_ms']:.3f} | {s['meas_full_wall_ms']:.3f} | "
                     f"{s['pred_backbone_ms']:.3f} | {s['meas_backbone_ms']:.3f} |")
    for i, dyn in enumerate(r["dynamic"]):
        lines += [
            "", f"## Dynamic runtime vs static backbone, run {i + 1}: digits test set "
            f"({dyn['n_test']} images, one at a time)", "",
            f"Run `{dyn['run_dir']}`; its chosen subnet has exits at taps {dyn['taps']}, cum_MACs "
            f"{', '.join(f'{m / 1e6:.3f}M' for m in dyn['cum_macs'])}. Static = the same backbone without exits, "
            "plain forward + argmax.", "",
            "| | value |", "|---|---|",
            f"| test accuracy (dynamic) | {dyn['test_acc']:.4f} |",
            f"| exit rates | {', '.join(f'{v:.3f}' for v in dyn['exit_rates'])} |",
            f"| mean latency dynamic / static, {clock} clock (ms) | {dyn['dynamic_ms']:.3f} / {dyn['static_ms']:.3f} |",
            f"| mean latency dynamic / static, wall clock (ms) | {dyn['dynamic_wall_ms']:.3f} / "
            f"{dyn['static_wall_ms']:.3f} |",
            f"| LUT-predicted dynamic / backbone (ms) | {dyn['pred_dynamic_ms']:.3f} / {dyn['pred_static_ms']:.3f} |",
            f"| latency ratio ({clock}; wall) | {dyn['latency_ratio']:.3f}; {dyn['latency_ratio_wall']:.3f} |",
            f"| TorchScript export: dynamic / traced static ({clock}, ms) | {dyn['dynamic_ts_ms']:.3f} / "
            f"{dyn['static_ts_ms']:.3f} (ratio {dyn['latency_ratio_ts']:.3f}) |",
            f"| avg_MACs / backbone_MACs | {dyn['mac_ratio']:.3f} |",
            f"| latency ratio / MAC ratio (target <= 1.15) | {dyn['latency_over_mac_ratio']:.3f} "
            f"{ok(dyn['ratio_ok'])} |",
        ]
    lines += ["", f"Peak RSS: {r['peak_rss_mb']:.0f} MB (this process; a training subprocess not included).",
              f"Wall time: {r['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, action="append",
                    help="finished run directory; repeat to compare several runs' chosen subnets "
                         "(the first one's supernet is used for the LUT; default: train a quick run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-subnets", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per random subnet")
    ap.add_argument("--repeats", type=int, default=5, help="timings per test image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    start = time.perf_counter()
    run_dirs = args.run_dir or [quick_run()]
    torch.set_num_threads(args.threads)
    lut_path = run_dirs[0] / "latency_lut.json"
    supernet = load_supernet(run_dirs[0]).eval()
    table = LatencyTable(supernet, threads=args.threads, path=lut_path)
    t0 = time.perf_counter()
    table.measure_all()
    build_s = time.perf_counter() - t0
    n_components = sum(not k.startswith("calibration:") for k in table.entries)
    print(f"LUT: {n_components} components ({table.n_measured} measured now) in {build_s:.1f} s", flush=True)
    lut = bench_lut(supernet, table, args.n_subnets, args.rounds, args.seed)
    print(f"full net: Spearman {lut['full']['spearman']:.3f}, MAPE {lut['full']['mape_pct']:.1f}%; "
          f"backbone: Spearman {lut['backbone']['spearman']:.3f}, MAPE {lut['backbone']['mape_pct']:.1f}%", flush=True)
    dynamic = []
    for run_dir in run_dirs:
        run_table = table if run_dir == run_dirs[0] else LatencyTable(load_supernet(run_dir).eval(),
                                                                     threads=args.threads, path=lut_path)
        run_table.measure_all()
        dyn = bench_dynamic(load_run(run_dir), run_table, args.repeats)
        dynamic.append({"run_dir": str(run_dir), **dyn, "ratio_ok": dyn["latency_over_mac_ratio"] <= 1.15})
        print(f"{run_dir}: latency ratio {dyn['latency_ratio']:.3f}, MAC ratio {dyn['mac_ratio']:.3f}", flush=True)
    result = {
        "run_dirs": [str(r) for r in run_dirs], "threads": args.threads, "machine": table.key,
        "platform": platform.platform(), "clock": table.clock, "calibration": table.calibration,
        "lut_entries": n_components, "lut_build_s": build_s, "lut": lut, "dynamic": dynamic,
        "targets": {"spearman_ok": lut["full"]["spearman"] >= 0.9, "mape_ok": lut["full"]["mape_pct"] <= 15,
                    "ratio_ok": [d["ratio_ok"] for d in dynamic]},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench_latency.json", result)
    md = markdown(result)
    atomic_write_text(args.out / "bench_latency.md", md)
    print(md)


if __name__ == "__main__":
    if cpu_model() == "unknown":
        print("warning: CPU model unknown; the LUT key falls back to the architecture", file=sys.stderr)
    main()
