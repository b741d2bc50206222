"""Numerical faults and failing candidates: a NaN loss stops training with a message and keeps the last good
checkpoint; non-finite weights are never saved; a candidate whose evaluation fails is recorded and the search
goes on; an interrupted write never replaces a file with half of one."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch
from inprocess import compose_run

from ee_nas.lit_module import MultiExitModule, NonFiniteLossError, non_finite_tensors
from ee_nas.utils import atomic_write_text


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(cli, tmp_path, monkeypatch):
    from ee_nas.run import run, user_error

    exit_loss = MultiExitModule.exit_loss

    def nan_from_second_epoch(self, logits, y, teacher):
        loss = exit_loss(self, logits, y, teacher)
        return loss * float("nan") if self.current_epoch >= 1 else loss

    monkeypatch.setattr(MultiExitModule, "exit_loss", nan_from_second_epoch)
    cfg = compose_run(tmp_path, *cli.overrides)
    with pytest.raises(NonFiniteLossError, match="training loss became nan at epoch 1") as err:
        run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 3)  # the first epoch's, untouched
    assert non_finite_tensors(ckpt["state_dict"]) == []
    assert not (tmp_path / "summary.json").exists()
    code, message = user_error(err.value, cfg)
    assert code == 3 and "training stopped" in message and "last good checkpoint is kept" in message
    assert "\n" not in message


def test_non_finite_weights_are_never_saved(make_backbone, make_space):
    from ee_nas.models.multi_exit import MultiExitSupernet

    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    module = MultiExitModule(MultiExitSupernet(backbone, make_space(backbone, "aebnas")), optimizer=None)
    state = module.state_dict()
    module.on_save_checkpoint({"state_dict": state})  # finite: fine
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=f"non-finite \\({name}"):
        module.on_save_checkpoint({"state_dict": state})


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch, make_backbone, make_space):
    from ee_nas.data import DigitsDataModule
    from ee_nas.hardware.profile import make_profile
    from ee_nas.models.multi_exit import MultiExitSupernet
    from ee_nas.search.callback import EvolutionaryNASCallback
    from ee_nas.search.evaluator import SubnetEvaluator

    calls = []
    score = SubnetEvaluator.score

    def every_third_fails(self, genome, target):
        calls.append(genome.key())
        if len(calls) % 3 == 1:
            raise RuntimeError("out of memory (injected)")
        return score(self, genome, target)

    monkeypatch.setattr(SubnetEvaluator, "score", every_third_fails)
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    supernet = MultiExitSupernet(backbone, make_space(backbone, "aebnas")).eval()
    nas = EvolutionaryNASCallback(str(tmp_path), make_profile(name="unconstrained"), pop_size=4, n_generations=2,
                                  calibration_samples=64)
    trainer = SimpleNamespace(global_rank=0, datamodule=dm, loggers=[], global_step=0)
    nas.on_fit_end(trainer, SimpleNamespace(supernet=supernet))

    records = json.loads((tmp_path / "archive.json").read_text())["records"]
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and all("out of memory (injected)" in r["error"] for r in failed)
    assert len(records) == len(calls) > len(failed)
    assert nas.result["chosen"]["status"] == "ok"
    assert json.loads((tmp_path / "pareto_front.json").read_text())["front"]
    rows = list(csv.DictReader((tmp_path / "search_progress.csv").open()))
    assert [int(r["generation"]) for r in rows] == [0, 1] and int(rows[-1]["n_failed"]) == len(failed)


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"test_acc": 0.9}')

    class Killed(BaseException):
        pass

    def write_half(f):
        f.write('{"test_acc": 0.')
        raise Killed

    from ee_nas.utils import atomic_write

    with pytest.raises(Killed):
        atomic_write(path, write_half)
    assert json.loads(path.read_text()) == {"test_acc": 0.9}
    assert list(tmp_path.iterdir()) == [path]
