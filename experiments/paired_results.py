"""Paired differences between two sets of iso-cost records: one lever measured across sweeps.

    python experiments/paired_results.py --out experiments/results/supernet_epochs_digits \
        --pair "static_nas, 30 - 20 supernet epochs" \
            iso_cost_digits_supernet30.json,iso_cost_digits_supernet30_seeds5_9.json:static_nas \
            iso_cost_digits_nocrop.json,iso_cost_digits_nocrop_seeds5_9.json:static_nas

`compare_baselines.py` pairs methods within one sweep; a lever that retrains the supernets (its own sweep) is
paired with the recipe's records here, run by run on (target, seed). Each side is FILES:METHOD, FILES a comma list
of `compare_baselines.py` results (paths, or names under experiments/results; they hold the raw records). Writes
<out>.md and <out>.json (the command and the rows): Δ test and val accuracy, mean and 95% t-interval per seed set,
for test accuracy also the interval over the seeds' means (a seed's targets share one supernet: not independent).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from compare_baselines import RESULTS, seed_interval, t_interval


def load(side: str) -> dict:
    """{(target, seed): record} of METHOD in FILES."""
    files, _, method = side.rpartition(":")
    if not files or not method:
        raise SystemExit(f"{side!r}: expected FILES:METHOD")
    out = {}
    for name in files.split(","):
        path = Path(name) if Path(name).exists() else RESULTS / name
        if not path.is_file():
            raise SystemExit(f"{name}: no such results file (nor {RESULTS / name})")
        out.update({(r["target_fraction"], r["seed"]): r for r in json.loads(path.read_text())["records"]
                    if r["method"] == method})
    if not out:
        raise SystemExit(f"{side!r}: no records of method {method!r}")
    return out


def seed_set(text: str) -> range:
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def compare(label: str, a: dict, b: dict, seed_sets: list[range]) -> list[dict]:
    rows, done = [], []
    for seeds in [*seed_sets, None]:
        keys = sorted(k for k in set(a) & set(b) if seeds is None or k[1] in seeds)
        if len(keys) < 2 or keys in done:  # "all" adds a row only where it spans more than one seed set
            continue
        done.append(keys)
        row = {"lever": label, "seeds": "all" if seeds is None else f"{seeds.start}-{seeds.stop - 1}",
               "pairs": len(keys)}
        for key in ("test_acc", "val_acc"):
            d = np.array([100 * (a[k][key] - b[k][key]) for k in keys])
            row[key] = t_interval(d)
            if key == "test_acc":
                row["ahead_level_behind"] = [int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())]
                *row["test_acc_by_seed"], row["n_seeds"] = seed_interval({k[::-1]: x for k, x in zip(keys, d)})
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| lever | seeds | pairs | Δ test acc (pp), mean [95% CI over pairs] | 95% CI over seeds' means | "
             "ahead / level / behind | Δ val acc (pp) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s, v = r["test_acc"], r["test_acc_by_seed"], r["val_acc"]
        lines.append(f"| {r['lever']} | {r['seeds']} | {r['pairs']} | {t[0]:+.2f} [{t[1]:+.2f}, {t[2]:+.2f}] | " +
                     (f"[{s[1]:+.2f}, {s[2]:+.2f}] ({r['n_seeds']} seeds) | " if r["n_seeds"] > 1 else "– (1 seed) | ") +
                     "{} / {} / {} | ".format(*r["ahead_level_behind"]) + f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "A", "B"),
                        help="A minus B, each FILES:METHOD")
    parser.add_argument("--seed-sets", nargs="*", default=["0-4", "5-9"], help="e.g. 0-4 5-9; all pairs as well")
    parser.add_argument("--out", type=Path, required=True, help="results file stem")
    args = parser.parse_args(argv)
    seed_sets = [seed_set(s) for s in args.seed_sets]
    rows = [row for label, a, b in args.pair for row in compare(label, load(a), load(b), seed_sets)]
    md = markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python experiments/paired_results.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.with_suffix(".md").write_text(f"# Paired levers\n\n`{command}`\n\n{md}")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "pairs": args.pair, "rows": rows}, indent=1) + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()
