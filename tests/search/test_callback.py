"""EvolutionaryNASCallback on a small untrained supernet: the hardware caps are constraints of the search,
checked before evaluation, and a run where nothing fits stops with one line naming the caps."""
import json
from types import SimpleNamespace

import pytest

from ee_nas.data import DigitsDataModule
from ee_nas.genome import Genome
from ee_nas.hardware.profile import make_profile
from ee_nas.models.multi_exit import MultiExitSupernet
from ee_nas.search.callback import EvolutionaryNASCallback
from ee_nas.search.evaluator import SubnetEvaluator


@pytest.fixture(scope="module")
def setup(make_backbone, make_space):
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    backbone = make_backbone("mobilenetv3_small", in_channels=1, image_size=16)
    supernet = MultiExitSupernet(backbone, make_space(backbone, "aebnas")).eval()
    return dm, supernet


def nas_run(tmp_path, monkeypatch, setup, **hardware):
    dm, supernet = setup
    scored = []
    score = SubnetEvaluator.score

    def counting(self, genome, target):
        scored.append(genome)
        return score(self, genome, target)

    monkeypatch.setattr(SubnetEvaluator, "score", counting)
    nas = EvolutionaryNASCallback(str(tmp_path), make_profile(name="capped", **hardware), pop_size=4,
                                  n_generations=2, calibration_samples=64)
    trainer = SimpleNamespace(global_rank=0, datamodule=dm, loggers=[], global_step=0)
    return nas, scored, lambda: nas.on_fit_end(trainer, SimpleNamespace(supernet=supernet))


def test_params_cap_between_smallest_and_largest(tmp_path, monkeypatch, setup):
    _, supernet = setup
    from ee_nas.hardware.macs import CostModel

    model = CostModel(supernet)
    space = supernet.space
    lo, hi = model.costs(space.smallest()).params, model.costs(space.largest()).params
    cap = (lo + hi) // 4
    assert lo < cap < hi
    nas, scored, run = nas_run(tmp_path, monkeypatch, setup, max_params=cap)
    run()
    assert scored and all(model.costs(g).params <= cap for g in scored)  # nothing over the cap was evaluated
    chosen = nas.result["chosen"]
    assert chosen["params"] == model.costs(Genome.from_dict(chosen["genome"])).params <= cap
    assert chosen["violations"] == [] and chosen["cap_violation"] == 0
    records = json.loads((tmp_path / "archive.json").read_text())["records"]
    assert all(r["params"] > cap and r["cap_violation"] > 0 for r in records if r["status"] == "over_cap")


def test_nothing_fits_stops_with_one_line_naming_the_caps(tmp_path, monkeypatch, setup):
    nas, scored, run = nas_run(tmp_path, monkeypatch, setup, max_params=1000, max_memory_bytes=100)
    with pytest.raises(RuntimeError) as err:
        run()
    message = str(err.value)
    assert message.startswith("no candidate fits hardware.max_params=1000, hardware.max_memory_bytes=100: "
                              "the closest (")
    assert "> hardware.max_params=1000" in message and "> hardware.max_memory_bytes=100" in message
    assert "\n" not in message and scored == []  # no accuracy evaluation was spent on them
    assert not (tmp_path / "arch.yaml").exists()
