"""Shared by the reliability tests: tiny command-line runs of ``python -m ee_nas.run`` and their results.

Every run here uses the same tiny settings (3 epochs of 3 batches of 16x16 digits, 2 generations of 4
candidates), so runs with the same seed must agree to the last bit: resumed ones included.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["trainer.max_epochs=3", "++trainer.limit_train_batches=3", "data.batch_size=32", "data.image_size=16",
        "search.pop_size=4", "search.n_generations=2", "evaluation.calibration_samples=64",
        "thresholds.sweep_points=4", "logger=csv", "trainer.enable_progress_bar=false", "finetune.epochs=1",
        "finetune.limit_train_batches=3"]
# one thread, as in-process tests use (tests/conftest.py): the same arithmetic, and no thread fights on 2 cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


class CLI:
    """Helpers for command-line runs (a fixture: test modules cannot import this conftest by name)."""

    overrides = TINY

    @staticmethod
    def command(run_dir: Path, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "ee_nas.run", f"hydra.run.dir={run_dir}", *TINY, *overrides]

    @staticmethod
    def run(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(CLI.command(run_dir, *overrides), cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=timeout)

    @staticmethod
    def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen(CLI.command(run_dir, *overrides), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def wait_until(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
        """Poll `ready()` every 10 ms while `proc` runs."""
        end = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"the run ended (rc {proc.returncode}) too early:\n{out[-3000:]}")
            if time.monotonic() > end:
                proc.kill()
                raise TimeoutError("the awaited moment never came")
            time.sleep(0.01)

    @staticmethod
    def file_version(path: Path):
        """Changes whenever `path` is (atomically) rewritten."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    @staticmethod
    def _numbers(obj):
        """Drop wall-clock fields: everything else must match exactly."""
        if isinstance(obj, dict):
            return {k: CLI._numbers(v) for k, v in obj.items() if "seconds" not in k and not k.endswith("_time")}
        if isinstance(obj, list):
            return [CLI._numbers(v) for v in obj]
        return obj

    @staticmethod
    def results(run_dir: Path) -> dict:
        """summary.json and pareto_front.json (and the per-generation search log) of a finished run."""
        return {"summary": CLI._numbers(json.loads((run_dir / "summary.json").read_text())),
                "front": CLI._numbers(json.loads((run_dir / "pareto_front.json").read_text())),
                "progress": (run_dir / "search_progress.csv").read_text()}

    @staticmethod
    def assert_artifacts_whole(run_dir: Path) -> None:
        """No temp file of an interrupted write is left, and every JSON artifact parses."""
        leftovers = [str(p) for p in run_dir.rglob(".*.tmp")]
        assert not leftovers, f"half-written artifacts left behind: {leftovers}"
        for path in run_dir.glob("*.json"):
            json.loads(path.read_text())


@pytest.fixture(scope="session")
def cli() -> type[CLI]:
    return CLI


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted tiny run: what resumed and repeated runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = CLI.run(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir
