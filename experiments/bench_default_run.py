"""The default run, timed the way a new user meets it: `python -m ee_nas.run seed=S`, one seed at a time.

    python experiments/bench_default_run.py --seeds 0 1 2          # about 3 min a seed on 2 cores

Each seed runs in a fresh directory under --work (W&B offline, the default loggers) with
`/usr/bin/time -v`, alone: run nothing else meanwhile, or the wall times mean nothing. Writes
`<out>.json` (one record per seed: wall time, peak RSS, and the summary.json numbers the issue's bars
name) and `<out>.md` (mean ± sample std, ddof=1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

KEYS = ("test_acc", "val_acc", "final_exit_test_acc", "pre_finetune_test_acc", "relative_macs", "exit_saving",
        "avg_macs", "own_backbone_macs", "taps", "exit_rates", "meets_target")


def run_seed(seed: int, work: Path, overrides: list[str], threads: int | None = None) -> dict:
    """One default run; `threads`: torch's intra-op threads (OMP/MKL_NUM_THREADS), None: torch's default."""
    run_dir = work / f"seed{seed}"
    command = [sys.executable, "-m", "ee_nas.run", f"seed={seed}", *overrides, f"hydra.run.dir={run_dir}"]
    env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads),
                                              "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"error: seed {seed} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seed": seed, "command": " ".join(["python -m ee_nas.run", f"seed={seed}", *overrides]),
            **gnu_time(done.stderr), **{k: summary.get(k) for k in KEYS}}


def gnu_time(stderr: str) -> dict:
    """Wall time (s) and peak RSS (bytes) from the report of GNU `time -v`."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if not wall or not rss:
        raise ValueError("no GNU time -v report in the output")
    return {"wall_s": 3600 * int(wall.group(1) or 0) + 60 * int(wall.group(2)) + float(wall.group(3)),
            "peak_rss_bytes": int(rss.group(1)) * 1024}


def table(records: list[dict]) -> str:
    cols = [("test acc (%)", lambda r: 100 * r["test_acc"], ".2f"),
            ("avg MACs / largest backbone", lambda r: r["relative_macs"], ".3f"),
            ("exit_saving", lambda r: r["exit_saving"], ".3f"), ("wall (s)", lambda r: r["wall_s"], ".0f"),
            ("peak RSS (GB)", lambda r: r["peak_rss_bytes"] / 1e9, ".2f")]
    lines = ["| seed | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['seed']} | " + " | ".join(format(f(r), fmt) for _, f, fmt in cols) + " |" for r in records]
    if len(records) > 1:
        cells = [f"{np.mean(v):{fmt}} ± {np.std(v, ddof=1):{fmt}}"
                 for _, f, fmt in cols for v in [[f(r) for r in records]]]
        lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "default_run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's, one per core); the fine-tuned result can "
                             "differ by a test image between thread counts")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to every run")
    args = parser.parse_args()
    threads = "torch's default threads" if args.threads is None else f"{args.threads} torch thread(s)"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        records = []
        for seed in args.seeds:
            records.append(run_seed(seed, work, args.overrides, args.threads))
            print(f"seed {seed}: {records[-1]['wall_s']:.0f} s, test acc {records[-1]['test_acc']:.4f}", flush=True)
    md = table(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, alone, {threads}",
         "command": "python " + " ".join(sys.argv), "records": records}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        f"Default run `python -m ee_nas.run seed=S` (target 35%), alone, {threads}, timed with "
        f"`/usr/bin/time -v` (`python {' '.join(sys.argv)}`); raw records in `{args.out.name}.json`.\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
