"""Latency LUT: accumulation exactly like cum_MACs, caching per machine, thread handling, mismatches."""
import json
import logging

import numpy as np
import pytest
import torch

from ee_nas.hardware.latency import (LatencyTable, LatencyTableMismatch, avg_latency, machine_hash, machine_key,
                                     time_call)
from ee_nas.hardware.macs import CostModel, module_macs
from ee_nas.hardware.profile import HardwareProfile
from ee_nas.models.multi_exit import MultiExitSupernet
from ee_nas.genome import BranchLayer, ExitBranch, Genome


@pytest.fixture(scope="module")
def supernet(make_backbone, make_space):
    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", image_size=16, in_channels=1)
    return MultiExitSupernet(backbone, make_space(backbone, "aebnas")).eval()


@pytest.fixture(scope="module")
def small_supernet(make_backbone, make_space):
    """A smaller space (2 taps, 2 ops, 1 width) for real timing."""
    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", image_size=16, in_channels=1, expand_choices=[2, 4],
                             kernel_choices=[3])
    space = make_space(backbone, "aebnas", exit_taps=[0, 3], max_exits=2,
                       branch={"ops": ["dwsep3x3", "avgpool"], "widths": [16], "min_layers": 0, "max_layers": 1})
    return MultiExitSupernet(backbone, space).eval()


class MacsTable(LatencyTable):
    """'Latency' = MACs (module_macs) of the component, decisions free: must reproduce CostModel exactly."""

    def _time(self, name, module, in_shape):
        return float(module_macs(module, in_shape)[0])

    @property
    def decision_ms(self):
        return 0.0


def genomes(supernet, n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = [supernet.space.largest(), supernet.space.smallest(), supernet.space.largest_backbone()]
    return out + [supernet.space.sample(rng) for _ in range(n)]


def test_predict_accumulates_exactly_like_cum_macs(supernet):
    table, costs = MacsTable(supernet), CostModel(supernet)
    for g in genomes(supernet):
        c = costs.costs(g)
        np.testing.assert_allclose(table.predict(g), c.cum_macs, rtol=1e-12)
        assert table.backbone_latency(g) == pytest.approx(c.backbone_macs)
        rates = np.full(g.n_exits, 1.0 / g.n_exits)
        assert table.avg_latency(g, rates) == pytest.approx(c.avg_macs(rates))


def test_calibration_corrects_every_exit(supernet):
    table = LatencyTable(supernet, timer=lambda fn: 1.0)
    g = supernet.space.sample(np.random.default_rng(3))
    seg, head = table.raw_costs(g)
    table._correction = (1.5, 0.25, 2.0)  # as `calibrate` would fit them
    k = np.arange(1, g.n_exits + 1)
    np.testing.assert_allclose(table.predict(g), 1.5 * (np.cumsum(seg) + np.cumsum(head)) + 0.25 * k + 2.0)
    assert table.backbone_latency(g) == pytest.approx(1.5 * (seg.sum() + table.head_ms) + 0.25 + 2.0)


def test_unit_latencies_count_components_and_decisions(supernet):
    table = LatencyTable(supernet, timer=lambda fn: 1.0)  # every component, and every decision, 1 ms
    g = Genome(depths=(2, 3, 2), expands=(2.0,) * 7, kernels=(3,) * 7,
               exits=[ExitBranch(0, (BranchLayer("conv3x3", 16), BranchLayer("maxpool"))), ExitBranch(3, ())])
    # exit 1: stem + block 0 | branch: 2 layers + classifier + decision
    # exit 2: blocks 1..3   | branch: classifier + decision;  final: blocks 4..6 | head + decision
    np.testing.assert_allclose(table.predict(g), [2 + 4, 6 + 3 + 2, 11 + 3 + 2])
    assert table.backbone_latency(g) == 1 + 7 + 1 + 1  # stem, 7 blocks, head, one decision


def test_avg_latency_checks_rates():
    assert avg_latency([0.5, 0.5], [1.0, 3.0]) == 2.0
    with pytest.raises(ValueError, match="sum to 1"):
        avg_latency([0.5, 0.2], [1.0, 3.0])


def test_time_call_is_a_positive_median():
    ms = time_call(lambda: sum(range(1000)), repeats=5, warmup=1)
    assert 0 < ms < 100


def test_threads_are_set_while_measuring_and_restored(small_supernet):
    seen = []

    def timer(fn):
        seen.append(torch.get_num_threads())
        return 1.0

    before = torch.get_num_threads()
    table = LatencyTable(small_supernet, threads=2, timer=timer, calibration_subnets=1, calibration_rounds=1)
    table.measure_all()
    assert table.clock == "wall" and table.key["threads"] == 2  # CPU time of one thread misses the others
    assert seen and set(seen) == {2} and torch.get_num_threads() == before


def test_measured_table_is_cached_per_machine(small_supernet, tmp_path):
    path = tmp_path / "lut.json"
    table = LatencyTable(small_supernet, path=path, repeats=3, warmup=1, sample_s=1e-4, calibration_subnets=2,
                         calibration_rounds=1)
    n = table.measure_all()
    assert table.clock == "cpu" and n == len(table.entries) - 1 > 10 and path.is_file()  # + the calibration
    data = json.loads(path.read_text())
    assert data["machine"] == machine_key(1)
    assert all(e["ms"] > 0 for k, e in data["entries"].items() if not k.startswith("calibration:"))
    cal = table.calibration
    assert cal["scale"] >= 0 and cal["per_exit_ms"] >= 0 and cal["base_ms"] >= 0 and cal["n_subnets"] == 4
    # a few noisy timings may fit scale 0 (one latency for every subnet): then the table stays uncalibrated
    expected = (cal["scale"], cal["per_exit_ms"], cal["base_ms"]) if cal["scale"] > 0 else (1.0, table.decision_ms, 0.0)
    assert table.correction() == expected
    rng = np.random.default_rng(1)
    for g in [small_supernet.space.largest()] + [small_supernet.space.sample(rng) for _ in range(5)]:
        cum = table.predict(g)
        assert cum.shape == (g.n_exits,) and np.all(np.diff(cum) > 0) and cum[0] > 0
    again = LatencyTable(small_supernet, path=path, timer=lambda fn: pytest.fail("re-measured"))
    assert again.measure_all() == 0
    np.testing.assert_array_equal(again.predict(small_supernet.space.largest()),
                                  table.predict(small_supernet.space.largest()))


def test_degenerate_calibration_warns_and_is_not_used(small_supernet, caplog):
    """Latency that does not grow with the component sums fits scale 0, which would rank every subnet equal."""
    table = LatencyTable(small_supernet, timer=lambda fn: 1.0, calibration_subnets=2, calibration_rounds=1)
    with caplog.at_level(logging.WARNING, logger="ee_nas.hardware.latency"):
        table.measure_all()
    assert table.calibration["scale"] == 0  # recorded (so it is not refitted), and named in the log
    assert "latency calibration is degenerate" in caplog.text and "2/1" in caplog.text
    assert table.correction() == (1.0, table.decision_ms, 0.0)
    small, large = small_supernet.space.smallest(), small_supernet.space.largest()
    assert table.predict(small)[-1] < table.predict(large)[-1]


def test_lut_from_another_machine_fails_clearly(small_supernet, tmp_path):
    path = tmp_path / "lut.json"
    LatencyTable(small_supernet, path=path, timer=lambda fn: 1.0).measure_all()
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "Cortex-A53"
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyTableMismatch, match=r"another machine.*cpu: LUT 'Cortex-A53' vs here"):
        LatencyTable(small_supernet, path=path)
    profile = HardwareProfile(objective="latency", latency_lut=str(path), target_fraction=0.5)
    with pytest.raises(LatencyTableMismatch, match="latency_lut=measure"):
        LatencyTable.from_profile(small_supernet, profile)


def test_lut_with_other_threads_does_not_load(small_supernet, tmp_path):
    path = tmp_path / "lut.json"
    LatencyTable(small_supernet, threads=1, path=path, timer=lambda fn: 1.0).measure_all()
    profile = HardwareProfile(objective="latency", latency_lut=str(path), lut_threads=2, target_fraction=0.5)
    with pytest.raises(LatencyTableMismatch, match="threads: LUT 1 vs here 2"):
        LatencyTable.from_profile(small_supernet, profile)


def test_from_profile(small_supernet, tmp_path):
    assert LatencyTable.from_profile(small_supernet, HardwareProfile()) is None
    measure = HardwareProfile(objective="latency", latency_lut="measure", lut_threads=1, target_fraction=0.5)
    table = LatencyTable.from_profile(small_supernet, measure, cache_dir=tmp_path, timer=lambda fn: 1.0)
    assert table.path == tmp_path / f"latency_lut_{machine_hash(machine_key(1))}.json" and table.threads == 1
    missing = HardwareProfile(objective="latency", latency_lut=str(tmp_path / "nope.json"), target_fraction=0.5)
    with pytest.raises(FileNotFoundError, match=r"hardware\.latency_lut=.*nope\.json.*measure"):
        LatencyTable.from_profile(small_supernet, missing)


def test_not_a_lut_file(small_supernet, tmp_path):
    path = tmp_path / "lut.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a LUT file"):
        LatencyTable(small_supernet, path=path)


def test_peak_memory_grows_with_the_subnet(supernet):
    table = LatencyTable(supernet, timer=lambda fn: 1.0)
    big, small = table.peak_memory_bytes(supernet.space.largest()), table.peak_memory_bytes(supernet.space.smallest())
    image = 1 * 16 * 16 * 4
    assert big >= small > image


def test_static_space_measures_without_branches(make_backbone, make_space):
    """static_nas builds no exit branches: measuring its table must not ask for them (it did: KeyError)."""
    backbone = make_backbone("mobilenetv3_small", image_size=16, in_channels=1, expand_choices=[2, 4],
                             kernel_choices=[3])
    static = MultiExitSupernet(backbone, make_space(backbone, "static_nas")).eval()
    table = MacsTable(static)
    table.measure_all(save=False, calibrate=False)
    costs = CostModel(static)
    for g in genomes(static, n=4):
        assert g.n_exits == 1
        np.testing.assert_allclose(table.predict(g), costs.costs(g).cum_macs)
