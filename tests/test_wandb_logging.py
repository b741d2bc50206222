"""An offline W&B run of the pipeline holds the per-generation search history and the all-candidates table."""
import copy
import json
import time

import pytest
from inprocess import run_in_process
from omegaconf import OmegaConf

wandb = pytest.importorskip("wandb")


def wandb_records(run_file):
    """The protobuf records of an offline run's .wandb file: wandb's LevelDB-style log (a 7-byte ':W&B' header,
    32 KiB blocks of chunks: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, parts = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the block's tail is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_history(run_file) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]


def test_offline_wandb_run_holds_search_history_and_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    summary = run_in_process(run_dir, "debug=smoke", "data.image_size=16", "logger=default",
                             "callbacks=[default,lr_monitor]")
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    for _ in range(600):  # wandb's service may still be writing the file when finish() returns
        records = list(wandb_records(runs[0]))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    assert next(r.exit for r in records if r.WhichOneof("record_type") == "exit").exit_code == 0  # finish(exit_code)
    # search metrics are drawn against the generation (define_metric), not the training step
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records
               if r.WhichOneof("record_type") == "metric"}
    assert metrics.get("search/*") == "search/generation"
    history = read_history(runs[0])
    generations = [row for row in history if "search/hypervolume" in row]
    assert [row["search/generation"] for row in generations] == [0, 1]  # debug=smoke: 2 generations
    assert generations[-1]["search/hypervolume"] == pytest.approx(summary["hypervolume"])
    # the table of every evaluated candidate, read back from the run's files
    row = next(row for row in history if "search/candidates/path" in row)
    assert row["search/candidates/nrows"] == summary["n_evaluated"]
    table = json.loads((runs[0].parent / "files" / row["search/candidates/path"]).read_text())
    assert table["columns"] == ["generation", "key", "status", "feasible", "chosen", "val_acc", "avg_macs",
                                "avg_latency_ms", "params", "n_exits", "genome"]
    assert sorted({r[0] for r in table["data"]}) == [0, 1] and sum(r[4] for r in table["data"]) == 1
    # callbacks=[default,lr_monitor] reached the trainer (one lr per param group: lr-SGD/shared, lr-SGD/branches)
    assert any(key.startswith("lr-SGD") for row in history for key in row)
    # one stable id per run directory, named and typed for the dashboard
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id in runs[0].name and run.job_type == "aebnas-nsga2" and run.run_group == "digits_search"
    assert run.display_name == "callbacks=[default,lr_monitor],data.image_size=16,debug=smoke,logger=default"


def test_multirun_jobs_grouped_by_sweep_named_by_overrides_with_a_stable_id(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from inprocess import compose_run

    from ee_nas.logging_utils import wandb_settings

    cfg = compose_run(tmp_path / "0", "seed=1", "search_space=placement_only", "search=random")
    hydra = copy.deepcopy(HydraConfig.get())  # as a multirun job sees it
    OmegaConf.set_readonly(hydra, False)
    hydra.mode, hydra.sweep.dir = RunMode.MULTIRUN, "multirun/x/2026-01-02_03-04-05"
    hydra.job.override_dirname = "seed=1"
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra}))
    settings = wandb_settings(cfg, tmp_path / "0", cfg.logger.wandb)
    assert settings["group"] == "x/2026-01-02_03-04-05" and settings["name"] == "seed=1"
    assert settings["job_type"] == "placement_only-random" and settings["resume"] == "allow"
    assert settings["id"] == wandb_settings(cfg, tmp_path / "0", cfg.logger.wandb)["id"]  # a rerun continues it
    assert settings["id"] != wandb_settings(cfg, tmp_path / "1", cfg.logger.wandb)["id"]
    cfg.logger.wandb.group = "mine"  # what the config sets wins
    assert "group" not in wandb_settings(cfg, tmp_path / "0", cfg.logger.wandb)
