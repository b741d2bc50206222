"""A real two-job multirun through Hydra's submitit launcher (local executor: the SLURM code path)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_two_job_multirun_with_submitit_local(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ee_nas.run", "-m", "hydra/launcher=local_submitit", "seed=1,2", "debug=smoke",
           "logger=csv", "search.n_generations=1", "finetune.epochs=0", "trainer.enable_progress_bar=false",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"]
    assert [summaries[j]["seed"] for j in ("0", "1")] == [1, 2]
    assert all(0.0 <= s["test_acc"] <= 1.0 and s["n_evaluated"] >= 2 for s in summaries.values())
    # the jobs ran through submitit: each left its pickled result in the submitit folder
    results = list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
