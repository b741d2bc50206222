"""Crash-safe resume: a run stopped by SIGTERM or killed (SIGKILL) during training or during the search
resumes by rerunning the same command in the same directory, and ends with exactly the results of an
uninterrupted run; no artifact is ever half-written, and a different config never clobbers a run."""
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ee_nas.run_dir import RUN_CONFIG, RunDirError, claim_run_dir
from ee_nas import CONF_DIR

CONF = str(CONF_DIR)


def test_interrupted_run_resumes_to_the_uninterrupted_result(cli, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    ckpt, archive = run_dir / "checkpoints" / "last.ckpt", run_dir / "archive.json"

    # 1. SIGTERM during training: the batch finishes, last.ckpt is saved mid-epoch, exit 143 with the resume command
    proc = cli.start(run_dir)
    cli.wait_until(proc, ckpt.exists)  # the first epoch (3 steps) is done
    time.sleep(0.2)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "interrupted by SIGTERM" in out and f"hydra.run.dir={run_dir}" in out and "Traceback" not in out
    state = torch.load(ckpt, weights_only=False)
    if "saved " in out:  # stopped mid-epoch (not right at the epoch's end, where last.ckpt is current already)
        assert state["global_step"] > 3
    assert not archive.exists()
    cli.assert_artifacts_whole(run_dir)

    # 2. SIGKILL during training, right after the next epoch's checkpoint
    proc = cli.start(run_dir)
    first = cli.file_version(ckpt)
    cli.wait_until(proc, lambda: cli.file_version(ckpt) != first)
    proc.kill()
    proc.communicate()
    assert torch.load(ckpt, weights_only=False)["global_step"] > state["global_step"]

    # 3. SIGKILL during the search, after its first generation was archived
    proc = cli.start(run_dir)
    cli.wait_until(proc, archive.exists)
    proc.kill()
    proc.communicate()
    assert len(json.loads(archive.read_text())["records"]) == 4  # one generation of 4 (pop_size)
    assert not (run_dir / "summary.json").exists()

    # 4. the same command once more: finishes, with the uninterrupted run's numbers (the same seed in other
    # processes, trained from scratch up to step 1's checkpoint: this is also the same-seed-same-results check)
    done = cli.run(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming the search" in done.stdout + done.stderr
    assert cli.results(run_dir) == cli.results(reference_run)
    cli.assert_artifacts_whole(run_dir)


def test_rerunning_a_finished_run_reports_it_again(cli, reference_run, tmp_path):
    """Training is skipped (last.ckpt is at max_epochs), the search replays archive.json: same numbers."""
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    before = (run_dir / "archive.json").read_text()
    done = cli.run(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "resuming the search" in log and "8 candidates already evaluated" in log
    assert (run_dir / "archive.json").read_text() == before
    assert cli.results(run_dir) == cli.results(reference_run)
    cli.assert_artifacts_whole(run_dir)


def _cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


def test_a_different_config_never_clobbers_a_run(tmp_path):
    claim_run_dir(_cfg(tmp_path, "search.pop_size=6"), tmp_path)
    claim_run_dir(_cfg(tmp_path, "search.pop_size=4"), tmp_path)  # no results yet: the config may still change
    assert json.loads((tmp_path / RUN_CONFIG).read_text())["config"]["search"]["pop_size"] == 4
    (tmp_path / "summary.json").write_text("{}")
    # resume-irrelevant keys may change ...
    claim_run_dir(_cfg(tmp_path, "search.pop_size=4", "logger=csv", "trainer.enable_progress_bar=false",
                       "data.num_workers=2"), tmp_path)
    # ... a result-relevant one may not: the message names the key and both values
    with pytest.raises(RunDirError, match=r"different config \(search.pop_size: 4 -> 8\)"):
        claim_run_dir(_cfg(tmp_path, "search.pop_size=8"), tmp_path)
    with pytest.raises(RunDirError, match="resume=false would overwrite"):
        claim_run_dir(_cfg(tmp_path, "search.pop_size=4", "resume=false"), tmp_path)
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_results_without_a_config_record_are_kept(tmp_path):
    (tmp_path / "archive.json").write_text('{"records": []}')
    with pytest.raises(RunDirError, match="no run_config.json"):
        claim_run_dir(_cfg(tmp_path), tmp_path)


def test_a_run_made_before_a_key_existed_resumes_while_the_key_keeps_its_neutral_value(tmp_path):
    """Keys added later (`NEUTRAL_DEFAULTS`) at the value that does what earlier runs did leave the recorded config
    as it was: such a run still resumes (and lends its supernet); any other value is a different config."""
    from ee_nas.run_dir import NEUTRAL_DEFAULTS, config_hash, run_config

    cfg = _cfg(tmp_path, "finetune.augment=null")  # the fine-tuning's crop off is a later, non-neutral default
    config = run_config(cfg)
    assert "rotation_degrees" not in config["data"]["augment"] and "augment" not in config["finetune"]
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"config_hash": config_hash(config), "config": config}))
    (tmp_path / "summary.json").write_text("{}")
    claim_run_dir(cfg, tmp_path)  # the same config: resumes
    claim_run_dir(_cfg(tmp_path, "data.augment.rotation_degrees=0", "finetune.augment=null"), tmp_path)
    with pytest.raises(RunDirError, match=r"data.augment.rotation_degrees: '<unset>' -> 12"):
        claim_run_dir(_cfg(tmp_path, "data.augment.rotation_degrees=12", "finetune.augment=null"), tmp_path)
    with pytest.raises(RunDirError, match=r"finetune.augment.random_crop_padding: '<unset>' -> 0"):
        claim_run_dir(_cfg(tmp_path), tmp_path)  # the default fine-tuning (no crop) is not the earlier one
    assert set(NEUTRAL_DEFAULTS) >= {"data.augment.rotation_degrees", "data.augment.scale", "finetune.augment"}
